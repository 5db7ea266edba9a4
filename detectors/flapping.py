"""Flap detection: the share of recent readings at which an alert changed level.

Each (rule, series) keeps a bit history of its last ``history`` readings (1 = the level changed).
It starts flapping when the share of changes reaches ``high`` and stops when it falls to ``low``
(Kapacitor's flapping(low, high), without the weights).

>>> import numpy as np
>>> bits = np.zeros(1, dtype=np.uint64)
>>> for changed in [1, 0, 1, 0, 1, 0, 1, 0]:
...     share = step(bits, np.array([0]), np.array([bool(changed)]), 8)
>>> float(share[0])
0.5
"""

from __future__ import annotations

import numpy as np


def step(bits: np.ndarray, rows: np.ndarray, changed: np.ndarray, history: int) -> np.ndarray:
    """Shift one reading into the history of ``rows`` (in place); return the share of changes."""
    mask = np.uint64((1 << history) - 1)
    updated = ((bits[rows] << np.uint64(1)) | changed.astype(np.uint64)) & mask
    bits[rows] = updated
    return np.bitwise_count(updated).astype(np.float64) / history
