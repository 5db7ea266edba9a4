"""Debounce: how long, in device time and in readings, a condition has held without a break.

One step takes at most one reading per series (the caller feeds a batch round by round, so several
readings of one series are stepped in device-time order). A reading that does not carry the field
(``informative`` False) neither extends nor breaks a run. A run is timed from its earliest reading,
so a late reading that holds extends it backwards rather than giving it a negative age.

>>> import numpy as np
>>> start, count = np.full(1, np.nan), np.zeros(1, dtype=np.int32)
>>> for t, c in [(0.0, True), (30.0, True), (60.0, True), (90.0, False)]:
...     met = step(np.array([c]), np.array([True]), np.array([t]), start, count, np.array([0]), 60.0, 1)
...     print(t, bool(met[0]))
0.0 False
30.0 False
60.0 True
90.0 False
"""

from __future__ import annotations

import numpy as np


def step(condition: np.ndarray, informative: np.ndarray, ts: np.ndarray, run_start: np.ndarray,
         run_count: np.ndarray, rows: np.ndarray, for_s: float, count: int) -> np.ndarray:
    """Advance the runs of ``rows`` by one reading each; return where the debounced condition is met.

    Parameters:
        condition: the raw condition of each reading.
        informative: False where the reading lacks the value (the run is left as it is).
        ts: device time of each reading.
        run_start, run_count: state per series (device time the run began, NaN when none; readings in
            the run), updated in place at ``rows``.
        for_s, count: the run must have lasted this long and this many readings.
    """
    held = condition & informative
    if for_s <= 0 and count <= 1:
        return held  # no debounce: nothing to remember
    start = run_start[rows]
    broken = informative & ~condition
    start = np.where(held, np.fmin(start, ts), start)  # timed from the run's earliest reading
    start = np.where(broken, np.nan, start)
    n = run_count[rows]
    n = np.where(held, n + 1, np.where(broken, 0, n))
    run_start[rows] = start
    run_count[rows] = n
    with np.errstate(invalid="ignore"):
        return held & (ts - start >= for_s) & (n >= count)
