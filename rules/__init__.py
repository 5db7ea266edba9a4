"""The rule model and the evaluation that turns detector output into alert events.

Pure: models and arrays in, events out; time is passed in as a value.
"""
