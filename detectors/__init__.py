"""Pure numerical kernels: numpy arrays in, arrays out. No I/O, no clocks, no config parsing.

Every kernel works on a batch of readings of many series at once, sorted by (series row, device
time), and keeps no state of its own beyond what the caller passes in and takes back.
"""
