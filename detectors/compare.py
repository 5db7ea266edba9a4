"""Elementwise comparison of readings with per-reading thresholds, NaN-aware.

>>> import numpy as np
>>> compare(np.array([74.0, 75.0, np.nan]), np.array([75.0, 75.0, 75.0]), ">=").tolist()
[False, True, False]
"""

from __future__ import annotations

import numpy as np

_OPS = {">": np.greater, ">=": np.greater_equal, "<": np.less, "<=": np.less_equal}
#: the comparison under which a value is back on the good side of a clear level
CLEAR_OP = {">": "<", ">=": "<", "<": ">", "<=": ">"}


def compare(values: np.ndarray, thresholds: np.ndarray, op: str) -> np.ndarray:
    """``values <op> thresholds``; NaN on either side is False."""
    with np.errstate(invalid="ignore"):
        return _OPS[op](values, thresholds)
