"""Late readings without corrupted state: rewind the series and replay it in device-time order.

A reading older than its series' newest (but within ``lateness_s``) cannot simply be applied after
the newer ones: a stale high value would raise an alert for a device that is fine now, a debounce
would count readings out of order, a window would see them shuffled. Kapacitor and Telegraf users
know the result. Holding every reading back until late ones might have come would delay a fire.

So :class:`ReplayingEngine` keeps, beside the live state, a *shadow*: the same engine fed only with
readings that can no longer be preceded by a late one (older than the series' newest minus the
lateness bound), and the readings since then. When a late reading comes, its series (and only it)
is set back to the shadow's state and its recent readings are replayed with the late one in device
time order: the state is exactly what in-order processing gives. Alert events the replay repeats
are not sent twice; an alert the replay no longer raises is withdrawn with a ``cleared`` event
marked ``retracted``, and one it raises anew is sent. A reading costs two detector steps (live and
shadow); the shadow is stepped at most every ``advance_every_s`` of gateway time, in one batch. When
the shadow takes every reading a series holds, it copies the series' live state instead (see
:meth:`ReplayingEngine._to_shadow`): under a city's load, most readings cost one step.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import replace
from typing import Any

import numpy as np

from rules.engine import ColumnBatch, Evaluation, KindEngine, series_last
from rules.events import EVENT_ZH, SEVERITY_ZH, AlertEvent, alert_id, severity_name

ACTIVE = ("raised", "updated", "flapping")


class Pending:
    """Accepted readings the shadow has not taken yet, as chunks of columns in arrival order, with the
    device-time span of each chunk and how many readings each series has held."""

    max_chunk = 16384  # readings a merged chunk may hold: settling the oldest never splits a giant one

    def __init__(self, n_fields: int):
        self.chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.spans: list[tuple[float, float]] = []  # each chunk's oldest and newest device time
        self.held = np.zeros(0, dtype=np.int64)  # readings held, by series
        self.n_fields = n_fields
        self.count = 0

    def add(self, rows: np.ndarray, ts: np.ndarray, values: np.ndarray, seq: np.ndarray) -> None:
        if not rows.shape[0]:
            return
        self.chunks.append((rows, ts, values, seq))
        self.spans.append((float(ts.min()), float(ts.max())))
        self.count += int(rows.shape[0])
        top = int(rows.max())
        if top >= self.held.shape[0]:  # series registered since: grown by half at least, not one by one
            grown = max(top + 1, self.held.shape[0] * 3 // 2)
            self.held = np.concatenate([self.held, np.zeros(grown - self.held.shape[0], dtype=np.int64)])
        np.add.at(self.held, rows, 1)
        # a chunk per batch would make every take_ripe a Python loop over thousands of them (a stall
        # of 100+ ms a second under load): neighbours of like size merge, as in a log-structured
        # merge, up to max_chunk, so there are few chunks and each reading is copied a few times
        while len(self.chunks) > 1 and self.chunks[-2][0].shape[0] <= 2 * self.chunks[-1][0].shape[0] and (
                self.chunks[-2][0].shape[0] + self.chunks[-1][0].shape[0] <= self.max_chunk):
            older, newer = self.chunks[-2], self.chunks[-1]
            self.chunks[-2:] = [tuple(np.concatenate(parts) for parts in zip(older, newer))]  # type: ignore[list-item]
            (a, b), (c, d) = self.spans[-2:]
            self.spans[-2:] = [(min(a, c), max(b, d))]

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if not self.chunks:
            return (np.zeros(0, np.int64), np.zeros(0), np.zeros((0, self.n_fields)), np.zeros(0, np.int64))
        if len(self.chunks) == 1:
            return self.chunks[0]
        # a copy, the chunks left as they are: one merged chunk would be split again, whole, by the
        # next take_ripe (the copy of the buffer a second that max_chunk is there to avoid)
        return tuple(np.concatenate(parts) for parts in zip(*self.chunks))  # type: ignore[return-value]

    def take_ripe(self, horizon: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """Remove and return the readings older than their series' ``horizon``; chunks are only copied
        where they split, and only read where their span straddles the horizons (reading every
        chunk at each settling was a tenth of the gateway's detection with a city's buffer full)."""
        ripe, kept, spans = [], [], []
        lowest, highest = float(horizon.min()), float(horizon.max())
        for chunk, (oldest, newest) in zip(self.chunks, self.spans):
            if oldest >= highest:  # nothing in it is older than any horizon
                kept.append(chunk)
                spans.append((oldest, newest))
                continue
            if newest < lowest:  # all of it is older than every horizon
                ripe.append(chunk)
                continue
            mask = chunk[1] < horizon[chunk[0]]
            if mask.all():
                ripe.append(chunk)
            elif mask.any():
                ripe.append(tuple(part[mask] for part in chunk))
                kept.append(tuple(part[~mask] for part in chunk))
                spans.append((float(kept[-1][1].min()), float(kept[-1][1].max())))
            else:
                kept.append(chunk)
                spans.append((oldest, newest))
        self.chunks, self.spans = kept, spans  # type: ignore[assignment]
        self.count = sum(int(c[0].shape[0]) for c in kept)
        if not ripe:
            return None
        taken = tuple(np.concatenate(parts) for parts in zip(*ripe))
        self.held -= np.bincount(taken[0], minlength=self.held.shape[0])
        return taken  # type: ignore[return-value]

    def oldest_beyond(self, keep: int) -> float:
        """A device time before which at least all but ``keep`` of the readings lie: the newest of the
        oldest chunks that hold the excess (arrival order is nearly device-time order; a reading that
        came late but is older goes with them, so each series is still settled in time order)."""
        excess, newest = self.count - keep, -np.inf
        for chunk, (_, last) in zip(self.chunks, self.spans):
            if excess <= 0:
                break
            newest = max(newest, last)
            excess -= chunk[0].shape[0]
        return float(np.nextafter(newest, np.inf))

    def __len__(self) -> int:
        return self.count


class ReplayingEngine(KindEngine):
    """A :class:`KindEngine` whose late readings rewind and replay their series (see the module)."""

    advance_every_s = 1.0
    settle_every_s = 0.1  # over its bound, the buffer is settled at most this often (each settling reads it all)
    max_pending = 500_000  # readings held for replay at most (the gateway sets detection.replay_max_pending)
    copies_caught_up = True  # see _to_shadow (off: the shadow steps every reading, as a benchmark's baseline)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.shadow = KindEngine(*args, **kwargs)
        self.pending = Pending(len(self.fields))
        self.advanced_at = -np.inf
        self.settled_at = -np.inf
        self.told: dict[tuple[int, str], AlertEvent] = {}  # alerts active downstream, by (series, rule)
        self.recent: dict[int, deque[AlertEvent]] = defaultdict(deque)  # sent since the horizon, by series
        self.replays = 0  # series rewound and replayed (a metric)
        self.settled_early = 0  # readings handed to the shadow before their lateness bound, memory being full
        self.caught_up = 0  # readings the shadow took by copying the live state of their series
        self._row_of: dict[tuple[str, int], int] = {}

    def ensure_series(self) -> None:
        super().ensure_series()
        self.shadow.ensure_series()

    # -- readings ------------------------------------------------------------------------------
    def evaluate(self, batch: ColumnBatch, gateway_time: float) -> Evaluation:
        n = len(batch)
        if n == 0:
            return Evaluation()
        seq = batch.seq if batch.seq is not None else np.full(n, -1, dtype=np.int64)
        duplicate, too_late = self._screen(batch.rows, batch.ts, seq)
        late = (batch.ts < self.last_ts[batch.rows]) & ~duplicate & ~too_late
        rewind = np.unique(batch.rows[late])
        if rewind.shape[0] == 0:
            out = super().evaluate(batch, gateway_time)
            self._sent(out.events)
        else:
            out = self._evaluate_with_replay(batch, seq, rewind, gateway_time)
        accepted = np.ones(n, dtype=bool)
        accepted[out.duplicate] = False
        accepted[out.too_late] = False
        self.pending.add(batch.rows[accepted], batch.ts[accepted], batch.values[accepted], seq[accepted])
        over = len(self.pending) - self.max_pending
        if over > 0 and (gateway_time - self.settled_at >= self.settle_every_s or over > self.max_pending // 10):
            self._settle_early(gateway_time)
        if gateway_time - self.advanced_at >= self.advance_every_s:
            self.advance(gateway_time)
        return out

    def _evaluate_with_replay(self, batch: ColumnBatch, seq: np.ndarray, rewind: np.ndarray,
                              gateway_time: float) -> Evaluation:
        replayed = np.isin(batch.rows, rewind)
        ordinary = np.flatnonzero(~replayed)
        out = super().evaluate(_take(batch, ordinary, seq), gateway_time) if ordinary.shape[0] else Evaluation()
        out.duplicate, out.too_late = ordinary[out.duplicate], ordinary[out.too_late]
        self._sent(out.events)

        mine = np.flatnonzero(replayed)
        # too late against the live newest: rejected before the series is set back
        _, too_late = self._screen(batch.rows[mine], batch.ts[mine], seq[mine])
        fresh = mine[~too_late]
        self._rewind(rewind)
        self.replays += int(rewind.shape[0])
        p_rows, p_ts, p_values, p_seq = self.pending.columns()
        held = np.isin(p_rows, rewind)
        combined = ColumnBatch(np.concatenate([p_rows[held], batch.rows[fresh]]),
                               np.concatenate([p_ts[held], batch.ts[fresh]]),
                               np.concatenate([p_values[held], batch.values[fresh]]), batch.fields,
                               np.concatenate([p_seq[held], seq[fresh]]))
        replay = super().evaluate(combined, gateway_time)
        offset = int(held.sum())
        out.duplicate = np.sort(np.concatenate([out.duplicate, fresh[replay.duplicate[replay.duplicate >= offset]
                                                                     - offset]]))
        out.too_late = np.sort(np.concatenate([out.too_late, mine[too_late],
                                               fresh[replay.too_late[replay.too_late >= offset] - offset]]))
        sent = {row: {(e.alert_id, e.event, e.ts) for e in self.recent.get(row, ())} for row in rewind.tolist()}
        news: list[AlertEvent] = []
        for e in replay.events:
            row = self._row(e)
            if (e.alert_id, e.event, e.ts) in sent.get(row, ()):
                continue
            if e.rule == "offline":  # gateway-clock state, kept across the rewind: a late reading ends it
                news.append(e)
                continue
            told = self.told.get((row, e.rule)) if row is not None else None
            if e.event == "cleared" and (told is None or told.alert_id != e.alert_id):
                continue  # downstream does not hold it active: closed already, or never shown
            if e.event in ACTIVE and told is not None and told.alert_id != e.alert_id:
                news.append(self._retraction(told, e.ts, gateway_time))  # replaced by an episode raised earlier
                self._sent(news[-1:])
            news.append(e)
            self._sent(news[-1:])
        out.events = sorted(out.events + news + self._reconcile(rewind, replay.events, gateway_time),
                            key=lambda e: e.ts)
        return out

    def _rewind(self, rows: np.ndarray) -> None:
        """Set ``rows`` back to the shadow's state; the gateway-clock state (last heard, offline) stays."""
        saved = state_of(self.shadow, rows)
        saved["last_seen"] = self.last_seen[rows].copy()
        saved["offline"] = self.offline[rows].copy()
        saved["offline_since"] = self.offline_since[rows].copy()
        saved["offline_by_will"] = self.offline_by_will[rows].copy()
        KindEngine.restore(self, saved, now=float(saved["last_seen"].max()))

    def _row(self, event: AlertEvent) -> int | None:
        rows = getattr(self.series, "rows", None)  # the gateway's registry has the index already
        if rows is not None:
            return rows.get((event.device_id, event.port or 0))
        if len(self._row_of) != self.n_series:
            self._row_of = {(d, p): i for i, (d, p) in enumerate(zip(self.series.device_ids, self.series.ports))}
        return self._row_of.get((event.device_id, event.port or 0))

    def _sent(self, events: list[AlertEvent]) -> None:
        """Remember what went out: what is active downstream, and recent events for de-duplication."""
        for e in events:
            row = self._row(e)
            if row is None or e.rule in ("offline", "flooding"):
                continue
            self.recent[row].append(e)
            key = (row, e.rule)
            if e.event in ACTIVE:
                self.told[key] = e
            elif key in self.told and self.told[key].alert_id == e.alert_id:
                del self.told[key]

    def _reconcile(self, rows: np.ndarray, replayed: list[AlertEvent], gateway_time: float) -> list[AlertEvent]:
        """After a replay, make what downstream holds active agree with the replayed state: withdraw an
        alert the replay no longer raises, and re-announce one it raises that downstream saw withdrawn."""
        out: list[AlertEvent] = []
        last_active = {}
        for e in replayed:
            if e.event in ACTIVE:
                last_active[(self._row(e), e.rule, e.alert_id)] = e
        for rule, state in zip(self.rules, self.state):
            for row in rows.tolist():
                key = (row, rule.rule_id)
                told = self.told.get(key)
                level = int(state.announced[row])
                device, port = self.series.device_ids[row], self.series.ports[row]
                live_id = alert_id(device, port, rule.rule_id, float(state.raised_ts[row])) if level else None
                if told is not None and told.alert_id != live_id:
                    out.append(self._retraction(told, float(self.last_ts[row]), gateway_time))
                    self._sent(out[-1:])
                    told = None
                if live_id is not None and told is None:  # active again, after downstream saw it end
                    again = last_active.get((row, rule.rule_id, live_id)) or next(
                        (e for e in reversed(self.recent.get(row, ())) if e.alert_id == live_id), None)
                    if again is not None and again.alert_id == live_id:
                        severity = severity_name(level)
                        out.append(replace(
                            again, event="raised", severity=severity, previous_severity=None, retracted=False,
                            ts=float(self.last_ts[row]), gateway_time=gateway_time,
                            message_zh=f"【{SEVERITY_ZH[severity]}·{EVENT_ZH['raised']}】"
                                       + again.message_zh.split("】", 1)[-1],
                            message_en=f"[{severity} raised] " + again.message_en.split("] ", 1)[-1]))
                        self._sent(out[-1:])
        return out

    @staticmethod
    def _retraction(told: AlertEvent, ts: float, gateway_time: float) -> AlertEvent:
        return replace(told, event="cleared", previous_severity=told.severity, ts=ts, gateway_time=gateway_time,
                       retracted=True, flapping=False,
                       message_zh=f"【{SEVERITY_ZH[told.severity]}·撤回】{told.device_name} {told.rule}：迟到的读数表明未发生",
                       message_en=f"[{told.severity} cleared] {told.rule} at {told.device_name} withdrawn: "
                                  "a late reading shows it did not happen")

    def advance(self, gateway_time: float) -> None:
        """Hand the shadow every pending reading no late one can precede any more."""
        self.advanced_at = gateway_time
        horizon = self.last_ts - self.profile.lateness_s
        self._to_shadow(self.pending.take_ripe(horizon), gateway_time)
        for row in list(self.recent):
            sent = self.recent[row]
            while sent and sent[0].ts < horizon[row]:
                sent.popleft()
            if not sent:
                del self.recent[row]

    def _settle_early(self, gateway_time: float) -> None:
        """A whole city reporting fast: memory bounds how far back a late reading can be replayed
        exactly; a reading older than what the shadow has taken is applied in arrival order. The
        excess and the oldest 1% go to the shadow when the buffer is over its bound, at most ten times
        a second (each settling reads the whole buffer: at 350,000 readings/s, settling 1% at every
        batch took a tenth of the gateway's time): settling half of it at once stalled the gateway
        for 300 ms every few tens of seconds, 5% once a second put 30-100 ms on the alert latency's
        p99 at 13,000 msg/s."""
        self.settled_at = gateway_time
        before = len(self.pending)
        cut = self.pending.oldest_beyond(self.max_pending - self.max_pending // 100)
        horizon = np.maximum(self.last_ts - self.profile.lateness_s, cut)
        self._to_shadow(self.pending.take_ripe(horizon), gateway_time)
        self.settled_early += before - len(self.pending)

    def _to_shadow(self, ripe: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None,
                   gateway_time: float) -> None:
        """Step the shadow through ``ripe``, taken from the buffer. A series that has no reading left
        in the buffer ends where the live state already is (the shadow's state, then every reading the
        live one took since, in device-time order: see :meth:`_rewind`): its live state is copied
        instead of stepped a second time. Under a city's load, when the buffer is settled by its bound
        and a batched message is a series' only held readings, that is most of them."""
        if ripe is None:
            return
        rows, ts, values, seq = ripe
        stepped = self.pending.held[rows] > 0
        if not self.copies_caught_up:
            stepped[:] = True
        caught_up = np.flatnonzero(np.bincount(rows[~stepped], minlength=0))  # (no sort, unlike np.unique)
        if caught_up.shape[0]:
            self.shadow.copy_series(self, caught_up)
            self.caught_up += int(rows.shape[0] - np.count_nonzero(stepped))
            if not stepped.any():
                return
            rows, ts, values, seq = rows[stepped], ts[stepped], values[stepped], seq[stepped]
        self.shadow.evaluate(ColumnBatch(rows, ts, values, self.fields, seq), gateway_time)

    # -- state -----------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, np.ndarray]:
        """The live state only. The shadow and the readings held for replay stay out of the snapshot,
        which is written every second: with them it grew with the message rate (a city's readings
        of the last lateness_s copied each time). After a restart the shadow starts from the restored
        state, so a reading later than the restart's newest is applied in arrival order; readings
        sent after the restart are replayed exactly again."""
        return super().snapshot()

    def restore(self, saved: dict[str, np.ndarray], now: float) -> int:
        live = {k: v for k, v in saved.items() if not k.startswith(("shadow.", "pending."))}  # older snapshots
        restored = super().restore(live, now)
        self.shadow.restore(super().snapshot(), now)
        self.pending = Pending(len(self.fields))
        self._told_from_state(now)
        return restored

    def _told_from_state(self, now: float) -> None:
        """After a restart, downstream holds active what the restored state announced."""
        self.told.clear()
        for rule, state in zip(self.rules, self.state):
            spec = rule.rule
            for row in np.flatnonzero(state.announced).tolist():
                name = self._name(row)
                self.told[(row, rule.rule_id)] = self._build(
                    rule.rule_id, spec.field, "raised", int(state.announced[row]), 0, row, float(state.raised_ts[row]),
                    float("nan"), float("nan"), spec.op, spec.unit, float(state.raised_ts[row]), now,
                    f"{name} {rule.rule_id}", f"{rule.rule_id} at {name}")


def state_of(engine: KindEngine, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The snapshot of ``rows`` alone, in the form :meth:`KindEngine.restore` takes."""
    out = {}
    for key, a in engine.snapshot().items():
        out[key] = a[..., rows] if series_last(key) else a[rows]
    return out


def _take(batch: ColumnBatch, index: np.ndarray, seq: np.ndarray) -> ColumnBatch:
    return ColumnBatch(batch.rows[index], batch.ts[index], batch.values[index], batch.fields, seq[index])
