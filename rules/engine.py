"""Rule profiles compiled to arrays and evaluated over a columnar batch of one kind.

The engine owns every piece of per-series state (alert levels, debounce runs, flap history, window
rings, the newest device time and recent ``seq`` numbers, when each series was last heard from) in
arrays, so it can be snapshotted and restored.

A batch is sorted by (series, device time) and stepped in *rounds*: round k takes the k-th reading
of every series that has one, as a single vectorised step over all those series. Every step is
elementwise, so the result is exactly that of processing each series' readings one by one in device
time order, while the usual batch (one reading per series) costs a single round. Readings that
repeat a ``seq`` (or the device time of the newest reading) are duplicates; readings older than the
newest by more than the kind's ``lateness_s`` are rejected as too late. Duplicates are found as IPsec
finds replays: per series, the highest ``seq`` and a 64-bit map of which of the 64 below it were seen;
a reading no newer than the newest one whose seq was seen, or lies further behind, is a replay (a
redelivered device batch). A newer reading is never a replay: if its seq went backwards the device's
counter was reset (a reboot) and the window starts again from it. Readings without ``seq`` are only
recognised as duplicates when they repeat the newest device time. Screening runs round by round too,
so it is as sequential as the rules.

Rounds cost a fixed handful of numpy calls per rule each, so a batch of devices that each send 100
readings would pay them 100 times. Most such readings change nothing but bookkeeping, and where a
profile has only threshold rules (no windows, no transforms) that is known before any round: a
series at rest (every rule at level 0, nothing announced, not flapping, not offline) whose next
readings are newer than everything it has seen, with rising ``seq``, and cross no create threshold,
ends exactly where those readings leave its debounce runs, flap history, newest time and seq map, all
of which have closed forms. Such a *calm prefix* of each series' readings is applied in one pass
(``_settle_calm``); the rest go round by round as before. The property test against the one-by-one
reference covers both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence
from zoneinfo import ZoneInfo

import numpy as np

from detectors import flapping as flap
from detectors import runs, schedule
from detectors.anomaly import Anomaly
from detectors.cusum import Cusum
from detectors.ewma import Ewma
from detectors.rebound import Rebound
from detectors.compare import CLEAR_OP, compare
from detectors.window import Ring, aggregate
from rules.events import EVENT_ZH, SEVERITY_ZH, AlertEvent, alert_id, severity_name
from rules.model import Condition, KindProfile, Param, ParamRef, Rule, Severity, Transform, parse_schedule

LOCAL_TZ = ZoneInfo("Asia/Shanghai")
UTC_OFFSET_S = 8 * 3600  # Asia/Shanghai: UTC+8, no daylight saving since 1991
SEQ_WINDOW = 64  # anti-replay window (as IPsec's): seqs more than this far behind the newest are replays
# A gateway down longer than this forgets how long conditions had held: a duration or count that would
# span the outage starts again at the first reading after it (Prometheus's for-outage-tolerance, 1 h).
# Nothing was seen meanwhile; a charging port "charging for over 8 hours" at the restart, from a run that
# began before a night's outage, was the demo's first alerts.
RUN_OUTAGE_TOLERANCE_S = 3600.0
CALM_RETRIES = 3  # rounds in a row that leave no calm prefix before the rest of a batch goes round by round


def last_heard(saved: dict[str, np.ndarray]) -> float | None:
    """When the gateway was last listening, by a kind's snapshot: the gateway time it last heard from
    any of its series (None for a kind with no series)."""
    seen = saved["last_seen"]
    return float(seen.max()) if seen.size else None


class SeriesInfo(Protocol):
    """What rules need to know about the series of one kind (the gateway's registry provides it)."""

    device_ids: Sequence[str]
    ports: Sequence[int]
    sites: Sequence[str]
    names: Sequence[str]
    attributes: Sequence[dict[str, Any]]
    tags: Sequence[Sequence[str]]

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class ColumnBatch:
    """Readings of one kind as columns: one row per reading, one column per field."""

    rows: np.ndarray  # int64 (n,) series row of each reading
    ts: np.ndarray  # float64 (n,) device time, epoch seconds
    values: np.ndarray  # float64 (n, n_fields), NaN where a reading lacks the field
    fields: tuple[str, ...]
    seq: np.ndarray | None = None  # int64 (n,), -1 where a reading has none

    def __len__(self) -> int:
        return int(self.rows.shape[0])


@dataclass
class Evaluation:
    events: list[AlertEvent] = field(default_factory=list)
    duplicate: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # batch indexes
    too_late: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


# --------------------------------------------------------------------------------------------
# Compilation


class ParamTable:
    """A per-series parameter, resolved for (series, device time)."""

    def __init__(self, name: str, param: Param, series: SeriesInfo):
        self.name = name
        self.param = param
        self.night_windows = parse_schedule([param.night_hours])
        self.day = self._values(param.day if param.day is not None else param.values, series)
        self.night = self._values(param.night, series) if param.night is not None else None

    def _values(self, table: dict[str, float] | None, series: SeriesInfo) -> np.ndarray:
        out = np.full(len(series), np.nan if self.param.default is None else self.param.default)
        for row, attributes in enumerate(series.attributes):
            raw = attributes.get(self.param.attribute)
            if raw is None:
                continue
            if table is None:
                try:
                    out[row] = float(raw) * self.param.scale
                except (TypeError, ValueError):
                    pass
            elif str(raw) in table:
                out[row] = table[str(raw)] * self.param.scale
        return out

    def resolve(self, rows: np.ndarray, ts: np.ndarray) -> np.ndarray:
        if self.night is None:
            return self.day[rows]
        at_night = schedule.active(ts, self.night_windows, UTC_OFFSET_S)
        return np.where(at_night, self.night[rows], self.day[rows])


@dataclass(frozen=True)
class CompiledCondition:
    condition: Condition
    constant: float | None
    param: ParamTable | None

    @classmethod
    def compile(cls, condition: Condition, params: dict[str, ParamTable]) -> CompiledCondition:
        t = condition.threshold
        if isinstance(t, ParamRef):
            return cls(condition, None, params[t.param])
        return cls(condition, float(t), None)

    def thresholds(self, rows: np.ndarray, ts: np.ndarray) -> np.ndarray:
        if self.param is None:
            return np.broadcast_to(np.float64(self.constant), rows.shape)  # a view: no allocation
        ref = self.condition.threshold
        assert isinstance(ref, ParamRef)
        return self.param.resolve(rows, ts) * ref.scale + ref.offset


class CompiledRule:
    def __init__(self, rule_id: str, rule: Rule, fields: tuple[str, ...], params: dict[str, ParamTable],
                 series: SeriesInfo):
        self.rule_id = rule_id
        self.rule = rule
        self.column = fields.index(rule.field)
        pairs = rule.raise_.levels()
        self.levels = np.array([int(s) for s, _ in pairs], dtype=np.int8)
        self.creates = [CompiledCondition.compile(c, params) for _, c in pairs]
        # Without a clear condition the alert clears once the mildest create comparison no longer holds.
        self.clear = CompiledCondition.compile(rule.clear, params) if rule.clear else None
        self.windows = parse_schedule(rule.schedule) if rule.schedule else None
        self.bump = tag_bumps(rule.escalate_tags, series)


def tag_bumps(escalate: dict[str, int], series: SeriesInfo) -> np.ndarray:
    """Severity levels added per series for its tags (computed once per distinct tag set)."""
    bump = np.zeros(len(series), dtype=np.int8)
    if escalate:
        cache: dict[tuple[str, ...], int] = {}
        for row, tags in enumerate(series.tags):
            key = tuple(tags)
            if key not in cache:
                cache[key] = sum(escalate.get(t, 0) for t in tags)
            bump[row] = cache[key]
    return bump


StatefulTransform = Rebound | Ewma | Cusum | Anomaly


def make_transform(spec: Transform, n_series: int) -> StatefulTransform:
    if spec.kind == "rebound":
        return Rebound(n_series)
    if spec.kind == "anomaly":
        return Anomaly(n_series, warmup=spec.warmup, **({"local": None} if spec.sustain else {}))
    if spec.kind == "ewma_z":
        return Ewma(n_series, spec.alpha, spec.warmup)
    return Cusum(n_series, spec.alpha, spec.k, spec.warmup)


class RuleState:
    """Per-series state of one rule."""

    def __init__(self, n_series: int, n_levels: int):
        self.level = np.zeros(n_series, dtype=np.int8)  # what the conditions say now
        self.announced = np.zeros(n_series, dtype=np.int8)  # what was last sent (differs while flapping)
        self.raised_ts = np.zeros(n_series)  # device time the announced episode was raised
        self.run_start = np.full((n_levels + 1, n_series), np.nan)  # per create condition, then clear
        self.run_count = np.zeros((n_levels + 1, n_series), dtype=np.int32)
        self.flap_bits = np.zeros(n_series, dtype=np.uint64)
        self.flapping = np.zeros(n_series, dtype=bool)

    def arrays(self) -> dict[str, np.ndarray]:
        return dict(vars(self))


CLOCK_STATE = ("last_seen", "offline", "offline_since", "offline_by_will")  # gateway-clock state


def series_last(key: str) -> bool:
    """Whether the state array of snapshot key ``key`` holds the series on its last axis (a rule's
    (levels, series) arrays) rather than its first (everything else, a rule's transform included)."""
    return key.startswith("rule.") and ".transform." not in key


def _starts(rows: np.ndarray) -> np.ndarray:
    """Where a new series begins in readings sorted by series."""
    first = np.ones(rows.shape[0], dtype=bool)
    first[1:] = rows[1:] != rows[:-1]
    return first


def _segments(first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the first and of the last reading of each series, given :func:`_starts`."""
    heads = np.flatnonzero(first)
    return heads, np.concatenate((heads[1:], [first.shape[0]])) - 1


# --------------------------------------------------------------------------------------------
# The engine


class KindEngine:
    """All rules of one kind, with the state of every series."""

    def __init__(self, kind: str, profile: KindProfile, fields: tuple[str, ...], series: SeriesInfo,
                 started_at: float = 0.0):
        self.kind = kind
        self.profile = profile
        self.fields = fields
        self.series = series
        self._keys: tuple[SeriesInfo | None, np.ndarray] = (None, np.empty(0, dtype=str))  # see snapshot_keys
        self._compile()
        n = len(series)
        self.last_ts = np.full(n, -np.inf)  # newest device time accepted
        self.max_seq = np.full(n, -1, dtype=np.int64)  # highest seq accepted
        self.seq_bits = np.zeros(n, dtype=np.uint64)  # bit k: seq max_seq - k was accepted
        self.last_seen = np.full(n, float(started_at))  # gateway time of the last accepted reading
        self.offline = np.zeros(n, dtype=bool)
        self.offline_since = np.zeros(n)  # device time the offline episode began (its alert id)
        self.offline_by_will = np.zeros(n, dtype=bool)  # offline because it said so (its will), not silence
        self.state = [RuleState(n, len(r.levels)) for r in self.rules]
        self.transforms = {i: make_transform(r.rule.transform, n) for i, r in enumerate(self.rules)
                           if r.rule.transform is not None}
        window_fields = sorted({r.column for r in self.rules if r.rule.window is not None})
        self.rings = {col: Ring(n, profile.window_samples) for col in window_fields}
        # only threshold rules: a reading's effect can be known without stepping it (see the module doc)
        self.calm_settles = not self.rings and not self.transforms

    def _compile(self) -> None:
        self.params = {name: ParamTable(name, p, self.series) for name, p in self.profile.params.items()}
        self.rules = [CompiledRule(rid, r, self.fields, self.params, self.series)
                      for rid, r in self.profile.rules.items()]
        self.offline_bump = tag_bumps(self.profile.offline.escalate_tags, self.series)

    @property
    def n_series(self) -> int:
        return int(self.last_ts.shape[0])

    def ensure_series(self) -> None:
        """Grow the state for series registered since (auto-registration) and recompile params."""
        extra = len(self.series) - self.n_series
        if extra <= 0:
            return

        def pad(a: np.ndarray, fill: Any, axis: int = 0) -> np.ndarray:
            shape = list(a.shape)
            shape[axis] = extra
            return np.concatenate([a, np.full(shape, fill, dtype=a.dtype)], axis=axis)

        self.last_ts = pad(self.last_ts, -np.inf)
        self.max_seq = pad(self.max_seq, -1)
        self.seq_bits = pad(self.seq_bits, 0)
        self.last_seen = pad(self.last_seen, float(self.last_seen.max(initial=0.0)))
        self.offline = pad(self.offline, False)
        self.offline_since = pad(self.offline_since, 0.0)
        self.offline_by_will = pad(self.offline_by_will, False)
        for st in self.state:
            for name, a in st.arrays().items():
                fill = np.nan if name == "run_start" else 0
                setattr(st, name, pad(a, fill, axis=a.ndim - 1))
        for ring in self.rings.values():
            ring.grow(len(self.series))
        for transform in self.transforms.values():
            transform.grow(len(self.series))
        self._compile()

    # -- readings ------------------------------------------------------------------------------
    def evaluate(self, batch: ColumnBatch, gateway_time: float) -> Evaluation:
        out = Evaluation()
        if len(batch) == 0:
            return out
        n = len(batch)
        seq = batch.seq if batch.seq is not None else np.full(n, -1, dtype=np.int64)
        order = np.lexsort((np.arange(n), batch.ts, batch.rows))  # equal times keep arrival order
        rows, ts, seq, values = batch.rows[order], batch.ts[order], seq[order], batch.values[order]
        first = _starts(rows)
        duplicate, too_late = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
        # Calm prefixes settle in one pass; then one round takes each series' next reading (an alert
        # raised or clearing, say), after which its remaining readings may be calm again. While that
        # pays, repeat: a few rounds in a row with nothing calm (a series hot for a while) end it.
        fruitless = 0
        while self.calm_settles and not first.all():
            calm = self._calm_prefix(rows, ts, seq, values, first)
            if calm.any():
                fruitless = 0
                self._settle_calm(rows[calm], ts[calm], seq[calm], values[calm], first[calm], gateway_time)
                order, rows, ts, seq, values, first = self._drop(~calm, order, rows, ts, seq, values)
                if first.all():
                    break
            else:
                fruitless += 1
                if fruitless > CALM_RETRIES:
                    break
            pick = np.flatnonzero(first)
            self._step_round(pick, order, rows, ts, seq, values, gateway_time, out, duplicate, too_late)
            order, rows, ts, seq, values, first = self._drop(~first, order, rows, ts, seq, values)
        n = rows.shape[0]
        starts = np.maximum.accumulate(np.where(first, np.arange(n), 0))
        rank = np.arange(n) - starts
        by_round = np.argsort(rank, kind="stable")
        bounds = np.concatenate(([0], np.cumsum(np.bincount(rank))))
        for k in range(bounds.shape[0] - 1):
            pick = by_round[bounds[k]:bounds[k + 1]]
            self._step_round(pick, order, rows, ts, seq, values, gateway_time, out, duplicate, too_late)
        out.events.sort(key=lambda e: e.ts)  # device-time order across series (stable within one)
        out.duplicate = np.sort(np.concatenate(duplicate))
        out.too_late = np.sort(np.concatenate(too_late))
        return out

    def _step_round(self, pick: np.ndarray, order: np.ndarray, rows: np.ndarray, ts: np.ndarray, seq: np.ndarray,
                    values: np.ndarray, gateway_time: float, out: Evaluation, duplicate: list[np.ndarray],
                    too_late: list[np.ndarray]) -> None:
        """Screen and step the readings at ``pick`` (at most one per series)."""
        dup, late = self._screen(rows[pick], ts[pick], seq[pick])
        duplicate.append(order[pick[dup]])
        too_late.append(order[pick[late]])
        keep = pick[~(dup | late)]
        if keep.shape[0]:
            self._round(rows[keep], ts[keep], values[keep], seq[keep], gateway_time, out.events)

    @staticmethod
    def _drop(keep: np.ndarray, *columns: np.ndarray) -> tuple[np.ndarray, ...]:
        """The columns at ``keep`` (still sorted by series: ``columns[1]`` are the rows), and which of
        them start a series."""
        kept = tuple(c[keep] for c in columns)
        return (*kept, _starts(kept[1]))

    def _quiet(self, rows: np.ndarray, ts: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Readings that meet no create condition of any rule (a threshold-only profile)."""
        quiet = np.ones(rows.shape[0], dtype=bool)
        for rule in self.rules:
            value = values[:, rule.column]  # NaN: the reading does not carry the field, the rule skips it
            in_schedule = schedule.active(ts, rule.windows, UTC_OFFSET_S) if rule.windows else True
            for create in rule.creates:
                quiet &= ~(compare(value, create.thresholds(rows, ts), rule.rule.op) & in_schedule)
        return quiet

    def _calm_prefix(self, rows: np.ndarray, ts: np.ndarray, seq: np.ndarray, values: np.ndarray,
                     first: np.ndarray) -> np.ndarray:
        """Of each series' readings (sorted by series, then time), the leading ones that can be settled
        without rounds: the series at rest, each reading newer than all before it with a rising seq
        (so none is a duplicate or too late) and meeting no create condition."""
        # the series' state is read once a series and spread over its readings (a batch message is
        # one series with many readings: gathers per reading were a third of this function)
        heads = np.flatnonzero(first)
        series = rows[heads]
        block = np.cumsum(first) - 1  # which series each reading belongs to
        at_rest = ~self.offline[series]
        for state in self.state:
            at_rest &= (state.level[series] == 0) & (state.announced[series] == 0) & ~state.flapping[series]
        newest_before = np.concatenate(([-np.inf], ts[:-1]))
        newest_before[heads] = self.last_ts[series]
        has_seq = seq >= 0
        # the seq of the previous reading that had one, or the series' highest if none in the batch yet
        index = np.arange(rows.shape[0])
        block_start = heads[block]
        last_with = np.maximum.accumulate(np.where(has_seq, index, -1))
        previous = np.concatenate(([-1], last_with[:-1]))
        seq_before = np.where(previous >= block_start, seq[np.maximum(previous, 0)], self.max_seq[series][block])
        ok = (at_rest[block] & (ts > newest_before) & (~has_seq | (seq > seq_before))
              & self._quiet(rows, ts, values))
        # a prefix: no reading after the first one that is not ok
        bad = np.cumsum(~ok)
        bad_before_block = (bad - (~ok))[block_start]
        return bad == bad_before_block

    def _settle_calm(self, rows: np.ndarray, ts: np.ndarray, seq: np.ndarray, values: np.ndarray,
                     first: np.ndarray, gateway_time: float) -> None:
        """The state after stepping calm readings (see :meth:`_calm_prefix`) one by one, in one pass."""
        starts, ends = _segments(first)
        series = rows[starts]
        self.last_ts[series] = ts[ends]  # each reading was newer than the last
        self.last_seen[series] = gateway_time
        has_seq = seq >= 0
        if has_seq.any():
            # each seq was ahead of the highest: the map shifts by the whole climb and marks every seq
            r, s = rows[has_seq], seq[has_seq]
            heads, tails = _segments(_starts(r))
            top = s[tails]
            top_each = np.repeat(top, tails - heads + 1)
            behind = top_each - s
            marks = np.where(behind < SEQ_WINDOW,
                             np.uint64(1) << np.minimum(behind, SEQ_WINDOW - 1).astype(np.uint64), np.uint64(0))
            marked = np.bitwise_or.reduceat(marks, heads)
            who = r[heads]
            climb = top - self.max_seq[who]
            kept = np.where(climb < SEQ_WINDOW,
                            self.seq_bits[who] << np.minimum(climb, SEQ_WINDOW - 1).astype(np.uint64), np.uint64(0))
            self.seq_bits[who] = kept | marked
            self.max_seq[who] = top
        block = np.cumsum(first) - 1  # which series each reading belongs to
        each = ends - starts + 1  # readings of each series
        for rule, state in zip(self.rules, self.state):
            raw = values[:, rule.column]
            carried = ~np.isnan(raw)
            if carried.all():  # the usual case: every reading carries the rule's field
                stepped, touched = each, series
                carried = slice(None)  # type: ignore[assignment]
            else:
                stepped = np.bincount(block[carried], minlength=series.shape[0])  # readings this rule stepped
                touched = series[stepped > 0]
            for j, create in enumerate(rule.creates):  # every stepped reading broke the run
                if create.condition.for_s > 0 or create.condition.count > 1:
                    state.run_start[j][touched] = np.nan
                    state.run_count[j][touched] = 0
            if rule.clear is not None and (rule.clear.condition.for_s > 0 or rule.clear.condition.count > 1):
                self._settle_clear_run(rule, state, rows[carried], ts[carried], raw[carried])
            if rule.rule.flapping is not None:  # no level changed: as many zeros shifted into the history
                k = stepped[stepped > 0].astype(np.uint64)
                mask = np.uint64((1 << rule.rule.flapping.history) - 1)
                bits = state.flap_bits[touched]
                state.flap_bits[touched] = np.where(k >= 64, np.uint64(0),
                                                    (bits << np.minimum(k, np.uint64(63))) & mask)

    def _settle_clear_run(self, rule: CompiledRule, state: RuleState, rows: np.ndarray, ts: np.ndarray,
                          value: np.ndarray) -> None:
        """The clear condition's debounce run after these readings (sorted by series, then time): it
        restarts after the last reading that broke it, or, when none did, goes on from where it was."""
        if rows.shape[0] == 0:
            return
        assert rule.clear is not None
        holds = compare(value, rule.clear.thresholds(rows, ts), CLEAR_OP[rule.rule.op])
        if rule.windows:
            holds |= ~schedule.active(ts, rule.windows, UTC_OFFSET_S)  # off schedule the alert is cleared
        index = np.arange(rows.shape[0])
        heads, tails = _segments(_starts(rows))
        last_break = np.maximum.accumulate(np.where(~holds, index, -1))[tails]
        who = rows[heads]
        broke = last_break >= heads
        count = tails - np.where(broke, last_break, heads - 1)  # readings holding since the last break
        start_after_break = np.where(broke & (last_break < tails), ts[np.minimum(last_break + 1, tails)], np.nan)
        start = np.where(broke, start_after_break, np.fmin(state.run_start[-1][who], ts[heads]))
        state.run_count[-1][who] = np.where(broke, count, state.run_count[-1][who] + count).astype(np.int32)
        state.run_start[-1][who] = start

    def _screen(self, rows: np.ndarray, ts: np.ndarray, seq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Duplicates and too-late readings among one reading per series.

        A reading newer in device time than everything processed is never a duplicate, whatever its
        seq (a device that rebooted starts counting again); an older one is a duplicate when its seq
        was seen or lies behind the window.
        """
        last_ts = self.last_ts[rows]
        older = ts <= last_ts
        has_seq = seq >= 0
        behind = self.max_seq[rows] - seq
        in_window = has_seq & (behind >= 0) & (behind < SEQ_WINDOW)
        shift = np.clip(behind, 0, SEQ_WINDOW - 1).astype(np.uint64)
        seen = in_window & (((self.seq_bits[rows] >> shift) & np.uint64(1)) == 1)
        replay = has_seq & (behind >= SEQ_WINDOW)
        duplicate = (ts == last_ts) | (older & (seen | replay))
        too_late = ~duplicate & (ts < last_ts - self.profile.lateness_s)
        return duplicate, too_late

    def _round(self, rows: np.ndarray, ts: np.ndarray, values: np.ndarray, seq: np.ndarray,
               gateway_time: float, events: list[AlertEvent]) -> None:
        """One reading for each of ``rows`` (unique), in device-time order per series."""
        advancing = ts > self.last_ts[rows]
        self.last_ts[rows] = np.maximum(self.last_ts[rows], ts)
        has_seq = seq >= 0
        if has_seq.any():
            r, s, forward = rows[has_seq], seq[has_seq], advancing[has_seq]
            newest, bits = self.max_seq[r], self.seq_bits[r]
            ahead = s > newest
            restart = forward & ~ahead  # newer reading, lower seq: the device's counter was reset
            step = np.clip(s - newest, 0, SEQ_WINDOW).astype(np.uint64)
            moved = np.where(step >= SEQ_WINDOW, np.uint64(0), bits << np.minimum(step, np.uint64(SEQ_WINDOW - 1)))
            behind = np.clip(newest - s, 0, SEQ_WINDOW - 1).astype(np.uint64)
            filled = bits | (np.uint64(1) << behind)
            self.seq_bits[r] = np.where(ahead, moved | np.uint64(1), np.where(restart, np.uint64(1), filled))
            self.max_seq[r] = np.where(ahead | restart, s, newest)
        self.last_seen[rows] = gateway_time
        back = rows[self.offline[rows]]
        if back.shape[0]:
            back_ts = ts[self.offline[rows]]
            for row, t in zip(back.tolist(), back_ts.tolist()):
                events.append(self._offline_event(row, "cleared", t, gateway_time))
            self.offline[back] = False
            self.offline_by_will[back] = False
        for col, ring in self.rings.items():
            ring.push(rows, ts, values[:, col])
        for i, (rule, state) in enumerate(zip(self.rules, self.state)):
            self._step_rule(rule, state, self.transforms.get(i), rows, ts, values, gateway_time, events)

    def _step_rule(self, rule: CompiledRule, state: RuleState, transform: StatefulTransform | None,
                   rows: np.ndarray, ts: np.ndarray, values: np.ndarray, gateway_time: float,
                   events: list[AlertEvent]) -> None:
        spec = rule.rule
        raw = values[:, rule.column]
        carries = ~np.isnan(raw)
        if not carries.any():
            return
        # Only readings that carry the field step this rule.
        rows, ts, raw = rows[carries], ts[carries], raw[carries]
        if spec.window is not None:
            usable, frame = self.rings[rule.column].window(rows, ts, spec.window.seconds, raw,
                                                           spec.window.min_samples, spec.window.min_span_s)
            value = np.full(rows.shape[0], np.nan)
            if frame.n.shape[0]:
                value[usable] = aggregate(spec.window.aggregate, frame)
        elif transform is not None:
            value = transform.step(rows, raw)
        else:
            value = raw
        in_schedule = schedule.active(ts, rule.windows, UTC_OFFSET_S) if rule.windows else np.ones(rows.shape[0], bool)
        # Outside its schedule a rule is off: nothing raises, everything clears.
        informative = ~np.isnan(value) | ~in_schedule

        worst = np.zeros(rows.shape[0], dtype=np.int8)
        worst_threshold = np.full(rows.shape[0], np.nan)
        for j, (level, create) in enumerate(zip(rule.levels, rule.creates)):
            threshold = create.thresholds(rows, ts)
            holds = compare(value, threshold, spec.op) & in_schedule
            met = runs.step(holds, informative, ts, state.run_start[j], state.run_count[j], rows,
                            create.condition.for_s, create.condition.count)
            better = met & (level > worst)
            worst = np.where(better, level, worst)
            worst_threshold = np.where(better, threshold, worst_threshold)
        if rule.clear is not None:
            clear_threshold = rule.clear.thresholds(rows, ts)
            clear_for, clear_count = rule.clear.condition.for_s, rule.clear.condition.count
            back_to_normal = compare(value, clear_threshold, CLEAR_OP[spec.op])
        else:
            clear_threshold = rule.creates[0].thresholds(rows, ts)
            clear_for, clear_count = 0.0, 1
            back_to_normal = ~compare(value, clear_threshold, spec.op) & ~np.isnan(value)
        cleared = runs.step(back_to_normal | ~in_schedule, informative, ts, state.run_start[-1],
                            state.run_count[-1], rows, clear_for, clear_count) | ~in_schedule

        if rule.bump.any():
            worst = np.where(worst > 0, np.minimum(worst + rule.bump[rows], int(Severity.critical)), worst)
        current = state.level[rows]
        level = np.where(worst > 0, worst, np.where(cleared, 0, current)).astype(np.int8)
        level = np.where(informative, level, current)
        state.level[rows] = level

        announced = state.announced[rows]
        flapping = state.flapping[rows]
        started_flapping = np.zeros(rows.shape[0], dtype=bool)
        if spec.flapping is not None:
            evaluated = informative
            share = flap.step(state.flap_bits, rows[evaluated], (level != current)[evaluated], spec.flapping.history)
            share_all = np.zeros(rows.shape[0])
            share_all[evaluated] = share
            started_flapping = evaluated & ~flapping & (share_all >= spec.flapping.high)
            stopped = evaluated & flapping & (share_all <= spec.flapping.low)
            flapping = (flapping | started_flapping) & ~stopped
            state.flapping[rows] = flapping
        send = ~flapping & (level != announced)
        for i in np.flatnonzero(send | started_flapping).tolist():
            row = int(rows[i])
            before, after = int(announced[i]), int(level[i])
            if started_flapping[i]:
                # The flap is reported at the worse of what was sent and what the conditions say now.
                shown = max(before, after) or int(Severity.info)
                events.append(self._event(rule, state, row, shown, shown, float(value[i]),
                                          float(worst_threshold[i]), float(ts[i]), gateway_time, "flapping"))
                continue
            limit = float(clear_threshold[i]) if after == 0 else float(worst_threshold[i])
            event = "raised" if before == 0 else ("cleared" if after == 0 else "updated")
            if np.isnan(limit):  # de-escalated by a flap ending: the threshold of the level held
                limit = float(clear_threshold[i])
            events.append(self._event(rule, state, row, before, after, float(value[i]), limit, float(ts[i]),
                                      gateway_time, event))
            state.announced[row] = after

    # -- staleness (gateway clock) ----------------------------------------------------------------
    def check_offline(self, now: float) -> list[AlertEvent]:
        """Raise the offline alert of every series silent for longer than the kind's timeout."""
        silent = ~self.offline & (now - self.last_seen > self.profile.offline_after_s)
        events = []
        for row in np.flatnonzero(silent).tolist():
            self.offline[row] = True
            self.offline_since[row] = now
            events.append(self._offline_event(row, "raised", now, now))
        return events

    def mark_offline(self, row: int, now: float) -> list[AlertEvent]:
        """The device said so itself (its last will, or a retained status)."""
        if self.offline[row]:
            return []
        self.offline[row] = True
        self.offline_by_will[row] = True
        self.offline_since[row] = now
        return [self._offline_event(row, "raised", now, now)]

    def mark_online(self, row: int, now: float) -> list[AlertEvent]:
        """The device said it is back ("online" on reconnecting). Ends an offline episode its will began
        (its next report may be hours away: a smoke detector's heartbeat is every 4 h), and its silence
        is counted from now; not one that silence began (a device that stays connected but reports
        nothing is still silent, and a retained "online" at a restart says nothing new)."""
        if not (self.offline[row] and self.offline_by_will[row]):
            return []
        self.offline[row] = self.offline_by_will[row] = False
        self.last_seen[row] = now
        return [self._offline_event(row, "cleared", now, now)]

    def _offline_event(self, row: int, event: str, ts: float, gateway_time: float) -> AlertEvent:
        spec = self.profile.offline
        level = min(int(Severity[spec.severity]) + int(self.offline_bump[row]), int(Severity.critical))
        silent_s = max(0.0, gateway_time - float(self.last_seen[row])) if event == "raised" else 0.0
        name = self._name(row)
        hours = self.profile.offline_after_s / 3600
        fill = dict(device=self.series.device_ids[row], name=name, value=silent_s,
                    threshold=self.profile.offline_after_s, unit="s", severity=severity_name(level))
        if spec.message is not None:
            zh, en = spec.message.zh.format(**fill), spec.message.en.format(**fill)
        else:
            zh = f"{name} 离线（{hours:g} 小时无数据）"
            en = f"{name} offline (no reading for {hours:g} h)"
        return self._build("offline", "", event, level if event == "raised" else 0, level, row,
                           float(self.offline_since[row]), silent_s, self.profile.offline_after_s, ">", "s", ts,
                           gateway_time, zh, en)

    # -- events -------------------------------------------------------------------------------
    def _name(self, row: int) -> str:
        port = self.series.ports[row]
        return self.series.names[row] + (f" {port}号口" if port else "")

    def _event(self, rule: CompiledRule, state: RuleState, row: int, before: int, after: int, value: float,
               limit: float, ts: float, gateway_time: float, event: str) -> AlertEvent:
        if event == "raised":
            state.raised_ts[row] = ts
        raised_ts = float(state.raised_ts[row]) if (before or after) else ts
        spec = rule.rule
        severity = severity_name(after if after else before) if (after or before) else "info"
        name = self._name(row)
        fill = dict(device=self.series.device_ids[row], name=name, value=value, threshold=limit, unit=spec.unit,
                    severity=severity)
        if spec.message is not None:
            zh, en = spec.message.zh.format(**fill), spec.message.en.format(**fill)
        else:
            zh = f"{name} {rule.rule_id} {value:g}{spec.unit}（阈值 {limit:g}）"
            en = f"{rule.rule_id} {value:g}{spec.unit} at {name} (limit {limit:g})"
        return self._build(rule.rule_id, spec.field, event, after, before, row, raised_ts, value, limit, spec.op,
                           spec.unit, ts, gateway_time, zh, en)

    def _build(self, rule_id: str, field_name: str, event: str, after: int, before: int, row: int,
               raised_ts: float, value: float, limit: float, op: str, unit: str, ts: float,
               gateway_time: float, zh: str, en: str) -> AlertEvent:
        severity = severity_name(after if after else before) if (after or before) else "info"
        zh = f"【{SEVERITY_ZH[severity]}·{EVENT_ZH[event]}】{zh}"
        en = f"[{severity} {event}] {en}"
        device_id, port = self.series.device_ids[row], self.series.ports[row]
        return AlertEvent(
            alert_id=alert_id(device_id, port, rule_id, raised_ts),
            event=event,  # type: ignore[arg-type]
            rule=rule_id,
            kind=self.kind,
            severity=severity,
            previous_severity=severity_name(before) if before and event != "flapping" else None,
            site=self.series.sites[row],
            device_id=device_id,
            port=port or None,
            device_name=self.series.names[row],
            field=field_name,
            value=value,
            threshold=limit,
            op=op,
            unit=unit,
            ts=ts,
            raised_ts=raised_ts,
            gateway_time=gateway_time,
            message_zh=zh,
            message_en=en,
            flapping=event == "flapping",
        )

    # -- snapshot -----------------------------------------------------------------------------
    def snapshot(self) -> dict[str, np.ndarray]:
        """Every state array, keyed for :meth:`restore`; rows are identified by device and port."""
        return {"keys": self.snapshot_keys(), **self.state_arrays()}

    def snapshot_keys(self) -> np.ndarray:
        """Each row's key, device#port. Built once a row, not at every snapshot (every second, on the loop:
        3.5 ms for 20,000 rows): rows are only ever appended (gateway/registry.py), so only new ones are added.
        The array is replaced, never written in place, so a snapshot's copy of it stays as it was."""
        series, keys = self._keys
        n = len(self.series)
        if series is not self.series or keys.shape[0] > n:
            keys = np.empty(0, dtype=str)
        if keys.shape[0] < n:
            have = keys.shape[0]
            new = [f"{d}#{p}" for d, p in zip(self.series.device_ids[have:n], self.series.ports[have:n])]
            keys = np.concatenate([keys, np.array(new, dtype=str)])
        self._keys = (self.series, keys)
        return keys

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Every state array itself (not a copy), by its snapshot key. A rule's arrays have the series
        on their last axis (see :func:`series_last`), every other array on its first."""
        out: dict[str, np.ndarray] = {
            "last_ts": self.last_ts, "max_seq": self.max_seq, "seq_bits": self.seq_bits,
            "last_seen": self.last_seen, "offline": self.offline, "offline_since": self.offline_since,
            "offline_by_will": self.offline_by_will,
        }
        for rule, st in zip(self.rules, self.state):
            for name, a in st.arrays().items():
                out[f"rule.{rule.rule_id}.{name}"] = a
        for col, ring in self.rings.items():
            field_name = self.fields[col]
            out[f"ring.{field_name}.ts"], out[f"ring.{field_name}.values"] = ring.ts, ring.values
            out[f"ring.{field_name}.pos"] = ring.pos
        for i, transform in self.transforms.items():
            for name, a in transform.state().items():
                out[f"rule.{self.rules[i].rule_id}.transform.{name}"] = a
        return out

    def copy_series(self, other: KindEngine, rows: np.ndarray) -> None:
        """Set the device-time state of ``rows`` to ``other``'s (an engine of the same profile and
        series); the gateway-clock state (last heard, offline) stays this engine's."""
        theirs = other.state_arrays()
        for key, mine in self.state_arrays().items():
            if key in CLOCK_STATE:
                continue
            if series_last(key):
                mine[..., rows] = theirs[key][..., rows]
            else:
                mine[rows] = theirs[key][rows]

    def restore(self, saved: dict[str, np.ndarray], now: float) -> int:
        """Take back state saved by :meth:`snapshot`; returns how many series were restored.

        Series are matched by device and port, so a registry that changed in between restores what
        still exists. Rules are matched by id; a rule whose levels changed starts afresh. Time the
        gateway was down is not held against devices: their silence is counted from the restart. Nor is
        it held for them: after an outage longer than RUN_OUTAGE_TOLERANCE_S, the runs of the rules'
        conditions (how long or how many readings a condition has held) start again.
        """
        keys = [str(k) for k in saved["keys"]]
        current = {k: i for i, k in enumerate(self.snapshot_keys().tolist())}
        pairs = [(i, current[k]) for i, k in enumerate(keys) if k in current]
        if not pairs:
            return 0
        src = np.array([s for s, _ in pairs])
        dst = np.array([d for _, d in pairs])
        heard = last_heard(saved)
        downtime = max(0.0, now - heard) if heard is not None else 0.0
        self.last_ts[dst] = saved["last_ts"][src]
        self.max_seq[dst] = saved["max_seq"][src]
        self.seq_bits[dst] = saved["seq_bits"][src]
        self.last_seen[dst] = saved["last_seen"][src] + downtime
        self.offline[dst] = saved["offline"][src]
        self.offline_since[dst] = saved["offline_since"][src]
        if "offline_by_will" in saved:  # (snapshots before it: silence, as before)
            self.offline_by_will[dst] = saved["offline_by_will"][src]
        for rule, st in zip(self.rules, self.state):
            prefix = f"rule.{rule.rule_id}."
            arrays = {name: saved.get(prefix + name) for name in st.arrays()}
            if any(a is None for a in arrays.values()) or arrays["run_start"].shape[0] != st.run_start.shape[0]:
                continue
            for name, a in arrays.items():
                getattr(st, name)[..., dst] = a[..., src]
            if downtime > RUN_OUTAGE_TOLERANCE_S:  # alerts stay as they are; their conditions' runs restart
                st.run_start[..., dst] = np.nan
                st.run_count[..., dst] = 0
        for i, transform in self.transforms.items():
            prefix = f"rule.{self.rules[i].rule_id}.transform."
            state = transform.state()
            # all or nothing: a snapshot from a version without some of this state (a feature added
            # since) restarts the transform from its warm-up; half-restored, the new part would judge
            # a series with a long past against a blank history and raise at once. Parts whose blank
            # start is safe (the transform's OPTIONAL_STATE) start blank instead.
            optional = getattr(transform, "OPTIONAL_STATE", frozenset())

            def held(name: str, a: np.ndarray) -> bool:
                return prefix + name in saved and saved[prefix + name].shape[1:] == a.shape[1:]

            if all(held(name, a) for name, a in state.items() if name not in optional):
                for name, a in state.items():
                    a[dst] = saved[prefix + name][src] if held(name, a) else 0
        for col, ring in self.rings.items():
            prefix = f"ring.{self.fields[col]}."
            if prefix + "ts" in saved and saved[prefix + "ts"].shape[1] == ring.samples:
                ring.ts[dst] = saved[prefix + "ts"][src]
                ring.values[dst] = saved[prefix + "values"][src]
                ring.pos[dst] = saved[prefix + "pos"][src]
        return len(pairs)

    def state_bytes_per_series(self) -> float:
        total = sum(a.nbytes for a in self.snapshot().values() if a.dtype.kind != "U")
        return total / max(1, self.n_series)
