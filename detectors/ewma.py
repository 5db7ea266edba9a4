"""EWMA z-score: how unusual a reading is against the series' own exponentially weighted mean and
variance (Roberts 1959; the incremental variance of Finch 2009), scored before the reading updates
them. ``alpha`` is the weight of a new reading (1/n while fewer than 1/alpha were seen); no score
during the first ``warmup`` readings.

>>> import numpy as np
>>> detector = Ewma(1, alpha=0.1, warmup=5)
>>> scores = [float(detector.step(np.array([0]), np.array([v]))[0]) for v in [10, 11, 9, 10, 11, 10, 30]]
>>> [round(s, 1) if s == s else None for s in scores]
[None, None, None, None, None, -0.3, 28.9]
"""

from __future__ import annotations

import numpy as np

VARIANCE_FLOOR = 1e-6  # a perfectly flat history must not turn every wobble into an infinite score


class Ewma:
    def __init__(self, n_series: int, alpha: float, warmup: int):
        self.alpha = alpha
        self.warmup = warmup
        self.mean = np.zeros(n_series)
        self.var = np.zeros(n_series)
        self.count = np.zeros(n_series, dtype=np.int32)

    def grow(self, n_series: int) -> None:
        extra = n_series - self.mean.shape[0]
        if extra > 0:
            self.mean = np.concatenate([self.mean, np.zeros(extra)])
            self.var = np.concatenate([self.var, np.zeros(extra)])
            self.count = np.concatenate([self.count, np.zeros(extra, dtype=np.int32)])

    def state(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def step(self, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Score one reading per row (rows unique, values not NaN), then learn it."""
        mean, var, count = self.mean[rows], self.var[rows], self.count[rows]
        z = (values - mean) / np.sqrt(np.maximum(var, VARIANCE_FLOOR))
        z = np.where(count >= self.warmup, z, np.nan)
        # weight max(alpha, 1/n): an exact running mean and variance until the EWMA's horizon is
        # reached, so the first scores are not inflated by a variance that starts at zero
        weight = np.maximum(self.alpha, 1.0 / (count + 1))
        diff = values - mean
        increment = weight * diff
        self.mean[rows] = mean + increment
        self.var[rows] = (1 - weight) * (var + diff * increment)
        self.count[rows] = count + 1
        return z
