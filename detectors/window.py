"""Rolling windows in device time over a ring buffer per series, and their aggregates.

Each series keeps its last K readings of a field (device time and value). A window aggregate for a
reading looks at the readings of its series within ``seconds`` of device time up to and including
itself, all series at once, as a (readings × K) matrix with NaN outside the window.

Aggregates follow their standards: ``leq`` is GB 3096-2008's energy average
10·log10(mean(10^(L/10))); ``rise_per_min`` is a least-squares slope per minute (EN 54-5 rate of
rise, ≈10 K/min); ``rebound`` measures a value that fell from a peak and climbs again (a charge that
tapered and draws more again: thermal runaway).

>>> import numpy as np
>>> ring = Ring(n_series=1, samples=4)
>>> for t, level in [(0.0, 60.0), (60.0, 70.0)]:
...     ring.push(np.array([0]), np.array([t]), np.array([level]))
>>> ts, values = ring.window(np.array([0]), np.array([60.0]), 300.0)
>>> round(float(aggregate("leq", ts, values)[0]), 2)  # not 65: energy average
67.4
"""

from __future__ import annotations

import numpy as np


class Ring:
    """The last ``samples`` readings (device time, value) of one field for every series."""

    def __init__(self, n_series: int, samples: int):
        self.samples = samples
        self.ts = np.full((n_series, samples), np.nan)
        self.values = np.full((n_series, samples), np.nan, dtype=np.float32)
        self.pos = np.zeros(n_series, dtype=np.int32)  # next slot to write

    def grow(self, n_series: int) -> None:
        extra = n_series - self.ts.shape[0]
        if extra > 0:
            self.ts = np.vstack([self.ts, np.full((extra, self.samples), np.nan)])
            self.values = np.vstack([self.values, np.full((extra, self.samples), np.nan, dtype=np.float32)])
            self.pos = np.concatenate([self.pos, np.zeros(extra, dtype=np.int32)])

    def push(self, rows: np.ndarray, ts: np.ndarray, values: np.ndarray) -> None:
        """Append one reading per row (rows unique); NaN values are not stored."""
        keep = ~np.isnan(values)
        rows, ts, values = rows[keep], ts[keep], values[keep]
        slot = self.pos[rows]
        self.ts[rows, slot] = ts
        self.values[rows, slot] = values
        self.pos[rows] = (slot + 1) % self.samples

    def window(self, rows: np.ndarray, now: np.ndarray, seconds: float) -> tuple[np.ndarray, np.ndarray]:
        """(ts, values) matrices of the readings of each row within ``(now - seconds, now]``."""
        ts = self.ts[rows]
        values = self.values[rows].astype(np.float64)
        with np.errstate(invalid="ignore"):
            inside = (ts > now[:, None] - seconds) & (ts <= now[:, None])
        return np.where(inside, ts, np.nan), np.where(inside, values, np.nan)


def _ordered(ts: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Columns sorted by device time (NaN last), for the order-sensitive aggregates."""
    order = np.argsort(np.where(np.isnan(ts), np.inf, ts), axis=1)
    return np.take_along_axis(ts, order, axis=1), np.take_along_axis(values, order, axis=1)


def samples(values: np.ndarray) -> np.ndarray:
    return np.count_nonzero(~np.isnan(values), axis=1)


def span(ts: np.ndarray) -> np.ndarray:
    """Device time between the oldest and the newest reading of each row's window (0 if < 2)."""
    newest = np.max(np.where(np.isnan(ts), -np.inf, ts), axis=1)
    oldest = np.min(np.where(np.isnan(ts), np.inf, ts), axis=1)
    return np.where(np.isfinite(newest) & np.isfinite(oldest), newest - oldest, 0.0)


def aggregate(name: str, ts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """One value per row; NaN where the window is empty (or too short for a slope)."""
    n = samples(values)
    empty = n == 0
    out: np.ndarray
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if name == "leq":
            out = 10.0 * np.log10(np.nansum(np.power(10.0, values / 10.0), axis=1) / n)
        elif name == "mean":
            out = np.nansum(values, axis=1) / n
        elif name == "max":
            out = np.max(np.where(np.isnan(values), -np.inf, values), axis=1)
        elif name == "min":
            out = np.min(np.where(np.isnan(values), np.inf, values), axis=1)
        elif name == "range":
            out = (np.max(np.where(np.isnan(values), -np.inf, values), axis=1)
                   - np.min(np.where(np.isnan(values), np.inf, values), axis=1))
        elif name in ("p10", "p50", "p90"):
            q = {"p10": 10, "p50": 50, "p90": 90}[name]
            safe = np.where(empty[:, None], 0.0, values)  # nanpercentile warns on all-NaN rows
            out = np.nanpercentile(safe, q, axis=1)
        elif name == "rise_per_min":
            valid = ~np.isnan(values)
            t0 = np.min(np.where(valid, ts, np.inf), axis=1, keepdims=True)
            x = np.where(valid, (ts - t0) / 60.0, 0.0)
            y = np.where(valid, values, 0.0)
            x_mean = x.sum(axis=1) / n
            y_mean = y.sum(axis=1) / n
            sxx = np.where(valid, (x - x_mean[:, None]) ** 2, 0.0).sum(axis=1)
            sxy = np.where(valid, (x - x_mean[:, None]) * (y - y_mean[:, None]), 0.0).sum(axis=1)
            out = np.where((n >= 2) & (sxx > 0), sxy / sxx, np.nan)
        elif name == "rebound":
            # Fell from a peak to a trough, then rose again: min(peak - trough, now - trough), within
            # the current session only (after the last reading at or below 0: unplugged).
            _, v = _ordered(ts, values)
            columns = np.arange(v.shape[1])[None, :]
            last = np.maximum(samples(v) - 1, 0)
            idle = ~np.isnan(v) & (v <= 0)
            last_idle = np.max(np.where(idle, columns, -1), axis=1)
            v = np.where(columns > last_idle[:, None], v, np.nan)
            peak_so_far = np.maximum.accumulate(np.where(np.isnan(v), -np.inf, v), axis=1)
            drop = np.where(np.isnan(v), -np.inf, peak_so_far - v)  # depth under the peak before it
            trough = np.argmax(drop, axis=1)
            rows = np.arange(v.shape[0])
            fall = drop[rows, trough]
            rise = v[rows, last] - v[rows, trough]
            out = np.where(samples(v) >= 3, np.maximum(np.minimum(fall, rise), 0.0), np.nan)
        else:
            raise ValueError(f"unknown aggregate {name!r}")
    return np.where(empty, np.nan, out)
