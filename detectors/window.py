"""Rolling windows in device time over a ring buffer per series, and their aggregates.

Each series keeps its last K readings of a field (device time and value). A window aggregate for a
reading looks at the readings of its series within ``seconds`` of device time up to and including
itself, all series at once, as a (readings × K) matrix and a mask of what lies inside the window;
reductions take the mask (``where=``) instead of filling NaN, which saves passes over the matrix.

Aggregates follow their standards: ``leq`` is GB 3096-2008's energy average
10·log10(mean(10^(L/10))); ``rise_per_min`` is a least-squares slope per minute (EN 54-5 rate of
rise, ≈10 K/min); ``robust_z`` scores the newest reading against the window's median and MAD.

>>> import numpy as np
>>> ring = Ring(n_series=1, samples=4)
>>> for t, level in [(0.0, 60.0), (60.0, 70.0)]:
...     ring.push(np.array([0]), np.array([t]), np.array([level]))
>>> usable, frame = ring.window(np.array([0]), np.array([60.0]), 300.0, latest=np.array([70.0]))
>>> round(float(aggregate("leq", frame)[0]), 2)  # not 65: energy average
67.4
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def window(self, rows: np.ndarray, now: np.ndarray, seconds: float, latest: np.ndarray,
               min_samples: int = 1, min_span_s: float = 0.0) -> tuple[np.ndarray, Frame]:
        """The readings of each row within ``(now - seconds, now]``; ``latest`` is the reading at ``now``.

        Returns which rows have a usable window (at least ``min_samples`` readings spanning
        ``min_span_s``) and the frame of those rows only: values are gathered, and aggregates
        computed, just where they can count (a detector heard from every few hours has no window).
        """
        ts = self.ts[rows]
        with np.errstate(invalid="ignore"):
            inside = (ts > now[:, None] - seconds) & (ts <= now[:, None])
        n = np.count_nonzero(inside, axis=1)
        usable = n >= min_samples
        if min_span_s > 0:
            oldest = np.min(ts, axis=1, where=inside, initial=np.inf)
            usable &= (n > 0) & (now - oldest >= min_span_s)
        pick = np.flatnonzero(usable)
        frame = Frame(ts[pick], self.values[rows[pick]].astype(np.float64), inside[pick], n[pick], now[pick],
                      latest[pick])
        return usable, frame


@dataclass(frozen=True)
class Frame:
    """Windows of several series: raw ring contents, what lies inside, how many, and their ``now``."""

    ts: np.ndarray  # (m, K) device time; meaningless where not inside
    values: np.ndarray  # (m, K)
    inside: np.ndarray  # (m, K) bool
    n: np.ndarray  # (m,) readings inside
    now: np.ndarray  # (m,) device time of the reading each window ends at
    latest: np.ndarray  # (m,) the value of the reading each window ends at

MAD_FLOOR = 1e-6  # a window of identical readings must not make every change an infinite score


def _median_sorted(ordered: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Median of each row of an ascending matrix whose first ``n`` columns are its readings."""
    rows = np.arange(ordered.shape[0])
    low = np.maximum((n - 1) // 2, 0)
    high = np.maximum(n // 2, 0)
    return (ordered[rows, low] + ordered[rows, high]) / 2


def _sum(a: np.ndarray, inside: np.ndarray) -> np.ndarray:
    return np.add.reduce(a, axis=1, where=inside, initial=0.0)


def aggregate(name: str, frame: Frame) -> np.ndarray:
    """One value per row; NaN where the window is empty (or too short for a slope)."""
    values, inside, n = frame.values, frame.inside, frame.n
    empty = n == 0
    out: np.ndarray
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if name == "leq":
            out = 10.0 * np.log10(_sum(np.power(10.0, values / 10.0), inside) / n)
        elif name == "mean":
            out = _sum(values, inside) / n
        elif name == "max":
            out = np.max(values, axis=1, where=inside, initial=-np.inf)
        elif name == "min":
            out = np.min(values, axis=1, where=inside, initial=np.inf)
        elif name == "range":
            out = (np.max(values, axis=1, where=inside, initial=-np.inf)
                   - np.min(values, axis=1, where=inside, initial=np.inf))
        elif name in ("p10", "p50", "p90"):
            # linear interpolation between order statistics (numpy's default), NaN sorted last
            q = {"p10": 0.10, "p50": 0.50, "p90": 0.90}[name] * (np.maximum(n, 1) - 1)
            ordered = np.sort(np.where(inside, values, np.nan), axis=1)
            low = np.floor(q).astype(np.intp)
            high = np.minimum(low + 1, np.maximum(n - 1, 0))
            rows = np.arange(values.shape[0])
            out = ordered[rows, low] + (ordered[rows, high] - ordered[rows, low]) * (q - low)
        elif name == "rise_per_min":
            # least squares with centred sums: sxy = Σ(x - x̄)y, sxx = Σ(x - x̄)x (x in minutes)
            t0 = np.min(frame.ts, axis=1, where=inside, initial=np.inf)
            x = (frame.ts - t0[:, None]) / 60.0
            dx = x - (_sum(x, inside) / n)[:, None]
            sxx = _sum(dx * x, inside)
            sxy = _sum(dx * values, inside)
            out = np.where((n >= 2) & (sxx > 0), sxy / sxx, np.nan)
        elif name == "robust_z":
            # distance of the newest reading from the median, in MADs scaled to σ (×1.4826)
            ordered = np.sort(np.where(inside, values, np.nan), axis=1)
            median = _median_sorted(ordered, n)
            deviation = np.sort(np.abs(np.where(inside, values, np.nan) - median[:, None]), axis=1)
            mad = 1.4826 * _median_sorted(deviation, n)
            out = (frame.latest - median) / np.maximum(mad, MAD_FLOOR)
        else:
            raise ValueError(f"unknown aggregate {name!r}")
    return np.where(empty, np.nan, out)
