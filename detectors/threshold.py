"""Thresholds with severities and hysteresis, vectorised over every series of a kind.

A reading is turned into a *decision*: the worst severity level whose create threshold it crosses;
0 when it is back past the clear level; -1 (hold) when it lies in the hysteresis band or does not
carry the field. The alert level after each reading is the last decision that was not a hold, so
``hold_last`` gives, for a whole batch at once, exactly what processing the readings one by one in
order would give.

Example:
    >>> import numpy as np
    >>> d = severity_decisions(np.array([74.0, 76.0, 73.0, 71.0]), np.array([75.0]), np.array([2]),
    ...                        rising=True, inclusive=True, clear=72.0)
    >>> d.tolist()
    [-1, 2, -1, 0]
    >>> hold_last(np.array([0, 0, 0, 0]), d, np.zeros(4, dtype=np.int8)).tolist()
    [0, 2, 2, 0]
"""

from __future__ import annotations

import numpy as np

HOLD = -1


def severity_decisions(
    values: np.ndarray,
    thresholds: np.ndarray,
    levels: np.ndarray,
    *,
    rising: bool,
    inclusive: bool,
    clear: float,
) -> np.ndarray:
    """Decision per reading: a level from ``levels``, 0 (clear) or -1 (hold).

    Parameters:
        values: readings of one field; NaN where a reading does not carry it (→ hold).
        thresholds: create thresholds ordered from the mildest to the worst severity: ascending
            for a rising rule (``>=``/``>``), descending for a falling one (``<=``/``<``).
        levels: the severity level (1..4) of each threshold, same order.
        rising: the bad side is above the thresholds.
        inclusive: the threshold itself counts as crossed (``>=``/``<=``).
        clear: the level a value must get back past to clear: below it (rising) or above it.
    """
    if rising:
        crossed = np.searchsorted(thresholds, values, side="right" if inclusive else "left")
        cleared = values < clear
    else:
        # A falling rule is a rising rule on negated values.
        crossed = np.searchsorted(-thresholds, -values, side="right" if inclusive else "left")
        cleared = values > clear
    lookup = np.concatenate(([HOLD], levels)).astype(np.int8)
    decisions = lookup[crossed]
    decisions[(crossed == 0) & cleared] = 0
    decisions[np.isnan(values)] = HOLD
    return decisions


def group_starts(rows: np.ndarray) -> np.ndarray:
    """For readings sorted by series row, the index of the first reading of each one's series."""
    n = rows.shape[0]
    index = np.arange(n)
    is_start = np.ones(n, dtype=bool)
    is_start[1:] = rows[1:] != rows[:-1]
    return np.maximum.accumulate(np.where(is_start, index, 0))


def hold_last(starts: np.ndarray, decisions: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """The level after each reading: its series' last non-hold decision so far, else ``prior``.

    Parameters:
        starts: ``group_starts`` of the readings' rows.
        decisions: from ``severity_decisions``.
        prior: the level of each reading's series before this batch.
    """
    index = np.arange(decisions.shape[0])
    last_decided = np.maximum.accumulate(np.where(decisions != HOLD, index, -1))
    decided = last_decided >= starts
    return np.where(decided, decisions[np.maximum(last_decided, 0)], prior).astype(np.int8)


def previous_levels(starts: np.ndarray, after: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """The level before each reading: the level after the previous reading of its series."""
    before = np.empty_like(after)
    before[1:] = after[:-1]
    first = starts == np.arange(after.shape[0])
    before[first] = prior[first]
    return before
