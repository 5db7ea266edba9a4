"""The last readings of each device, for the dashboard's chart when no telemetry store is configured.

Each device's readings are one flat ``array('d')`` of rows (ts, port, *values in the kind's FIELDS
order, NaN where a reading lacks the field, booleans as 0.0/1.0), trimmed to ``depth`` rows. An array
of doubles holds no objects: a reading added to it leaves nothing behind for the garbage collector to
look at (the array itself is one long-lived object a device). A tuple a reading did: every young
collection walked the ~10,000 tuples made since the one before, each a cache miss among the gateway's
hundreds of MB, 8-15 ms a collection every 0.4 s at 10,000 msg/s (docs/PERFORMANCE.md). Rows become
the dashboard's tuples only when someone reads them (:func:`recent_rows`).
"""

from __future__ import annotations

from array import array
from typing import Any

import numpy as np

from gateway.decode import booleans
from gateway.schemas import READING_MODELS

NAN = float("nan")
WIDTHS = {kind: 2 + len(model.FIELDS) for kind, model in READING_MODELS.items()}  # ts, port, values


def recent_rows(kind: str, block: tuple[np.ndarray, np.ndarray, np.ndarray]) -> list[tuple[Any, ...]]:
    """Columns (ts, ports, values) as the dashboard's reading tuples: (ts, port, *values in FIELDS
    order, None where absent, booleans as booleans)."""
    ts, ports, numbers = block
    shown = numbers.astype(object)  # Python floats, then None and booleans where they belong
    missing = np.isnan(numbers)
    flags = booleans(kind)
    for j, name in enumerate(READING_MODELS[kind].FIELDS):
        if name in flags:
            shown[:, j] = numbers[:, j] != 0
    shown[missing] = None
    return [(t, port, *values) for t, port, values in zip(ts.tolist(), ports.tolist(), shown.tolist())]


class RecentReadings:
    """The last ``depth`` readings of every device that has sent one."""

    def __init__(self, depth: int):
        self.depth = depth
        self.rows: dict[str, array] = {}  # device id → its rows, oldest first, one flat array

    def add(self, kind: str, device_id: str, values: dict[str, Any]) -> None:
        """One validated reading (its fields by name, as the model holds them)."""
        rows = self.rows.get(device_id)
        if rows is None:
            rows = self.rows[device_id] = array("d")
        rows.append(values["ts"])
        rows.append(values.get("port") or 0)
        for name in READING_MODELS[kind].FIELDS:
            value = values[name]
            rows.append(NAN if value is None else value)
        excess = len(rows) - self.depth * WIDTHS[kind]
        if excess > 0:
            del rows[:excess]

    def add_batches(self, batches: list[tuple[Any, np.ndarray]]) -> None:
        """The last ``depth`` kept readings of each batch message of a drain, straight from its columns:
        ``(ReadingColumns, kept)`` pairs, in the order received. A few numpy calls for the whole drain,
        not for each message: at 10,000 messages/s of 10 readings, one message's own calls took a
        tenth of the main thread."""
        kinds: dict[str, list[tuple[Any, np.ndarray]]] = {}
        for chunk, kept in batches:
            kinds.setdefault(chunk.kind, []).append((chunk, kept))
        depth = self.depth
        for kind, group in kinds.items():
            width = WIDTHS[kind]
            lengths = np.array([chunk.ts.shape[0] for chunk, _ in group])
            ends = np.cumsum(lengths)  # where each message's rows end in the drain's
            owner = np.repeat(np.arange(len(group)), lengths)
            kept = np.concatenate([k for _, k in group])
            after = np.append(np.cumsum(kept[::-1])[::-1], 0)  # kept rows from each row to the drain's end
            taken = kept & (after[:-1] - after[ends][owner] <= depth)  # among its message's last `depth` kept
            grid = np.empty((int(np.count_nonzero(taken)), width))
            grid[:, 0] = np.concatenate([chunk.ts for chunk, _ in group])[taken]
            grid[:, 1] = np.concatenate([chunk.ports for chunk, _ in group])[taken]
            grid[:, 2:] = np.concatenate([chunk.values for chunk, _ in group])[taken]
            data, step, at = memoryview(grid.tobytes()), 8 * width, 0
            for (chunk, _), count in zip(group, np.bincount(owner[taken], minlength=len(group)).tolist()):
                if not count:
                    continue
                rows = self.rows.get(chunk.device_id)
                if rows is None:
                    rows = self.rows[chunk.device_id] = array("d")
                elif count >= depth:  # the message fills the chart by itself
                    del rows[:]
                rows.frombytes(data[at:at + count * step])
                at += count * step
                excess = len(rows) - depth * width
                if excess > 0:
                    del rows[:excess]

    def last(self, kind: str, device_id: str, limit: int) -> list[tuple[Any, ...]]:
        """A device's last ``limit`` readings as the dashboard's tuples, oldest first."""
        rows = self.rows.get(device_id)
        if not rows:
            return []
        width = WIDTHS[kind]
        grid = np.frombuffer(rows.tobytes(), dtype=np.float64).reshape(-1, width)[-limit:]  # a copy: the
        # array stays free to grow (it cannot be resized while a view of it is alive)
        return recent_rows(kind, (grid[:, 0], grid[:, 1].astype(np.int64), grid[:, 2:]))
