"""Two-sided CUSUM of the EWMA z-score: a slow drift that no single reading gives away (Page 1954).

S⁺ ← max(0, S⁺ + z − k), S⁻ ← max(0, S⁻ − z − k); the score is max(S⁺, S⁻) in standard
deviations. ``k`` is the slack (half the shift to detect, in sigmas); the baseline is an EWMA with
a small ``alpha`` so it follows the series slowly.

>>> import numpy as np
>>> detector = Cusum(1, alpha=0.01, k=0.5, warmup=20)
>>> rng = np.random.default_rng(0)
>>> steady = [detector.step(np.array([0]), np.array([v]))[0] for v in 20 + rng.normal(0, 0.5, 200)]
>>> drifting = [detector.step(np.array([0]), np.array([v]))[0] for v in 20 + np.linspace(0, 3, 60)]
>>> bool(max(steady[20:]) < 10 < max(drifting))  # h = 10: steady noise stays under it, a 3σ drift does not
True
"""

from __future__ import annotations

import numpy as np

from detectors.ewma import Ewma


class Cusum:
    def __init__(self, n_series: int, alpha: float, k: float, warmup: int):
        self.baseline = Ewma(n_series, alpha, warmup)
        self.k = k
        self.high = np.zeros(n_series)
        self.low = np.zeros(n_series)

    def grow(self, n_series: int) -> None:
        extra = n_series - self.high.shape[0]
        if extra > 0:
            self.baseline.grow(n_series)
            self.high = np.concatenate([self.high, np.zeros(extra)])
            self.low = np.concatenate([self.low, np.zeros(extra)])

    def state(self) -> dict[str, np.ndarray]:
        return {**self.baseline.state(), "high": self.high, "low": self.low}

    def step(self, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
        z = self.baseline.step(rows, values)
        ready = ~np.isnan(z)
        zz = np.where(ready, z, 0.0)
        high = np.where(ready, np.maximum(0.0, self.high[rows] + zz - self.k), 0.0)
        low = np.where(ready, np.maximum(0.0, self.low[rows] - zz - self.k), 0.0)
        self.high[rows], self.low[rows] = high, low
        return np.where(ready, np.maximum(high, low), np.nan)
