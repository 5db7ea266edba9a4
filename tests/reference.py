"""A plain, one-reading-at-a-time reference of threshold rules, for checking the vectorised core."""

from __future__ import annotations

import math

from rules.model import Rule


def level_after(rule: Rule, level: int, value: float) -> int:
    """The alert level after one reading, given the level before it (0 = no alert)."""
    if math.isnan(value):
        return level
    inclusive = rule.op in (">=", "<=")
    worst = 0
    for severity, threshold in rule.raise_.levels():
        if rule.rising:
            crossed = value >= threshold if inclusive else value > threshold
        else:
            crossed = value <= threshold if inclusive else value < threshold
        if crossed:
            worst = max(worst, int(severity))
    if worst:
        return worst
    if rule.clear is not None:
        cleared = value < rule.clear if rule.rising else value > rule.clear
    else:
        # no band: clears as soon as the create condition no longer holds
        cleared = True
    return 0 if cleared else level


def run(rule: Rule, readings: list[tuple[int, float, float]], n_series: int) -> list[tuple[int, int, int, float]]:
    """Transitions (series, before, after, ts) for readings (series, ts, value) taken in device-time order."""
    levels = [0] * n_series
    out = []
    for series, ts, value in sorted(readings, key=lambda r: (r[0], r[1])):
        after = level_after(rule, levels[series], value)
        if after != levels[series]:
            out.append((series, levels[series], after, ts))
        levels[series] = after
    return out
