"""Local-time schedules: is a device time inside any of a rule's daily windows?

Windows may cross midnight (GB 3096 night is 22:00-06:00). Asia/Shanghai has kept UTC+8 without
daylight saving since 1991, so local time is a fixed offset.

>>> import numpy as np
>>> night = [(22 * 3600, 6 * 3600)]
>>> ts = np.array([1795356000.0, 1795384800.0])  # 2026-11-22 22:00 and 2026-11-23 06:00 local
>>> active(ts, night, 8 * 3600).tolist()
[True, False]
"""

from __future__ import annotations

import numpy as np

DAY_S = 86400


def seconds_of_day(ts: np.ndarray, utc_offset_s: int) -> np.ndarray:
    return np.mod(ts + utc_offset_s, DAY_S)


def active(ts: np.ndarray, windows: list[tuple[int, int]], utc_offset_s: int) -> np.ndarray:
    """Whether each device time lies in one of ``windows`` ([(start_s, end_s)) of the local day)."""
    local = seconds_of_day(ts, utc_offset_s)
    inside = np.zeros(ts.shape, dtype=bool)
    for start, end in windows:
        if start < end:
            inside |= (local >= start) & (local < end)
        else:  # crosses midnight
            inside |= (local >= start) | (local < end)
    return inside
