"""Rebound: how far a value climbed back after falling from its peak, within a session.

An e-bike charge draws its most at the start (constant current), tapers (constant voltage) and
floats; a battery that fails draws more again (thermal runaway risk, GB 42295-2022 field
practice). Per series, one O(1) step per reading: the session's peak, its lowest point since, and
how far it had fallen to reach it. A reading at or below 0 ends the session (unplugged).

rebound = min(fall to the trough, rise since the trough), 0 when either is 0.

>>> import numpy as np
>>> detector = Rebound(1)
>>> [float(detector.step(np.array([0]), np.array([v]))[0]) for v in [150, 120, 90, 95, 140, 170, 0, 150]]
[0.0, 0.0, 0.0, 5.0, 50.0, 60.0, 0.0, 0.0]
"""

from __future__ import annotations

import numpy as np


class Rebound:
    def __init__(self, n_series: int):
        self.peak = np.full(n_series, np.nan)
        self.trough = np.full(n_series, np.nan)
        self.fall = np.zeros(n_series)

    def grow(self, n_series: int) -> None:
        extra = n_series - self.peak.shape[0]
        if extra > 0:
            self.peak = np.concatenate([self.peak, np.full(extra, np.nan)])
            self.trough = np.concatenate([self.trough, np.full(extra, np.nan)])
            self.fall = np.concatenate([self.fall, np.zeros(extra)])

    def state(self) -> dict[str, np.ndarray]:
        return {"peak": self.peak, "trough": self.trough, "fall": self.fall}

    def step(self, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
        """One reading per row (rows unique, values not NaN); returns the rebound after it."""
        peak, trough, fall = self.peak[rows], self.trough[rows], self.fall[rows]
        idle = values <= 0
        starting = ~idle & np.isnan(peak)
        lower = ~idle & ~starting & (values < trough)
        fall = np.where(lower, peak - values, fall)
        trough = np.where(lower | starting, values, trough)
        peak = np.where(starting, values, np.fmax(peak, values))
        peak, trough, fall = (np.where(idle, np.nan, peak), np.where(idle, np.nan, trough),
                              np.where(idle | starting, 0.0, fall))
        self.peak[rows], self.trough[rows], self.fall[rows] = peak, trough, fall
        with np.errstate(invalid="ignore"):
            return np.where(idle | starting, 0.0, np.maximum(0.0, np.minimum(fall, values - trough)))
