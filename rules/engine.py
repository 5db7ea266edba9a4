"""Rule profiles compiled to arrays and evaluated over a columnar batch of one kind.

The engine owns the alert state of every (rule, series): the current level (0 = no alert) and the
device time the current episode was raised. Evaluation sorts the batch by (series, device time),
asks the threshold kernel for the level after every reading, and turns each change of level into
an :class:`AlertEvent`. Python only touches the readings whose level changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detectors import threshold
from rules.events import EVENT_ZH, SEVERITY_ZH, AlertEvent, SeriesInfo, alert_id, severity_name
from rules.model import KindProfile, Rule


@dataclass(frozen=True)
class ColumnBatch:
    """Readings of one kind as columns: one row per reading, one column per field."""

    rows: np.ndarray  # int64 (n,) series row of each reading
    ts: np.ndarray  # float64 (n,) device time, epoch seconds
    values: np.ndarray  # float64 (n, n_fields), NaN where a reading lacks the field
    fields: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.rows.shape[0])


@dataclass(frozen=True)
class CompiledRule:
    rule_id: str
    rule: Rule
    column: int
    thresholds: np.ndarray  # mildest → worst
    levels: np.ndarray  # int8 severity level per threshold
    clear: float

    @classmethod
    def compile(cls, rule_id: str, rule: Rule, fields: tuple[str, ...]) -> CompiledRule:
        pairs = rule.raise_.levels()
        thresholds = np.array([v for _, v in pairs], dtype=np.float64)
        clear = rule.clear if rule.clear is not None else float(thresholds[0])
        if rule.clear is None and rule.op in (">", "<"):
            # Without a band, "clear" is simply "create no longer holds": for a strict op the
            # threshold value itself no longer raises, so it clears too.
            clear = float(np.nextafter(clear, np.inf if rule.rising else -np.inf))
        return cls(rule_id, rule, fields.index(rule.field), thresholds,
                   np.array([int(s) for s, _ in pairs], dtype=np.int8), clear)

    def threshold_for(self, level: int) -> float:
        return float(self.thresholds[np.nonzero(self.levels == level)[0][0]])


class KindEngine:
    """All rules of one kind, with the alert state of every series."""

    def __init__(self, kind: str, profile: KindProfile, fields: tuple[str, ...], n_series: int):
        self.kind = kind
        self.rules = [CompiledRule.compile(rid, r, fields) for rid, r in profile.rules.items()]
        self.fields = fields
        self.level = np.zeros((len(self.rules), n_series), dtype=np.int8)
        self.raised_ts = np.zeros((len(self.rules), n_series), dtype=np.float64)

    @property
    def n_series(self) -> int:
        return int(self.level.shape[1])

    def ensure_series(self, n_series: int) -> None:
        """Grow the state for series registered since (auto-registration)."""
        grow = n_series - self.n_series
        if grow > 0:
            self.level = np.pad(self.level, ((0, 0), (0, grow)))
            self.raised_ts = np.pad(self.raised_ts, ((0, 0), (0, grow)))

    def evaluate(self, batch: ColumnBatch, series: SeriesInfo, gateway_time: float) -> list[AlertEvent]:
        if len(batch) == 0 or not self.rules:
            return []
        order = np.lexsort((batch.ts, batch.rows))  # stable: equal ts keep arrival order
        rows = batch.rows[order]
        ts = batch.ts[order]
        starts = threshold.group_starts(rows)
        last_of_series = np.ones(rows.shape[0], dtype=bool)
        last_of_series[:-1] = rows[1:] != rows[:-1]
        events: list[AlertEvent] = []
        for r, compiled in enumerate(self.rules):
            values = batch.values[order, compiled.column]
            decisions = threshold.severity_decisions(
                values, compiled.thresholds, compiled.levels,
                rising=compiled.rule.rising, inclusive=compiled.rule.op in (">=", "<="), clear=compiled.clear,
            )
            prior = self.level[r, rows]
            after = threshold.hold_last(starts, decisions, prior)
            before = threshold.previous_levels(starts, after, prior)
            for i in np.flatnonzero(after != before):
                events.append(self._event(r, compiled, int(rows[i]), int(before[i]), int(after[i]),
                                          float(values[i]), float(ts[i]), series, gateway_time))
            self.level[r, rows[last_of_series]] = after[last_of_series]
        return events

    def _event(self, r: int, compiled: CompiledRule, row: int, before: int, after: int, value: float,
               ts: float, series: SeriesInfo, gateway_time: float) -> AlertEvent:
        if before == 0:
            self.raised_ts[r, row] = ts
        raised_ts = float(self.raised_ts[r, row])
        event = "raised" if before == 0 else ("cleared" if after == 0 else "updated")
        severity = severity_name(after if after else before)
        limit = compiled.clear if after == 0 else compiled.threshold_for(after)
        rule = compiled.rule
        device_id, port = series.device_ids[row], series.ports[row]
        name = series.names[row] + (f" {port}号口" if port else "")
        fill = dict(device=device_id, name=name, value=value, threshold=limit, unit=rule.unit, severity=severity)
        if rule.message is not None:
            zh, en = rule.message.zh.format(**fill), rule.message.en.format(**fill)
        else:
            zh = f"{name} {compiled.rule_id} {value:g}{rule.unit}（阈值 {limit:g}）"
            en = f"{compiled.rule_id} {value:g}{rule.unit} at {name} (limit {limit:g})"
        zh = f"【{SEVERITY_ZH[severity]}·{EVENT_ZH[event]}】{zh}"
        en = f"[{severity} {event}] {en}"
        return AlertEvent(
            alert_id=alert_id(device_id, port, compiled.rule_id, raised_ts),
            event=event,  # type: ignore[arg-type]
            rule=compiled.rule_id,
            kind=self.kind,
            severity=severity,
            previous_severity=severity_name(before) if before else None,
            site=series.sites[row],
            device_id=device_id,
            port=port or None,
            device_name=series.names[row],
            field=rule.field,
            value=value,
            threshold=limit,
            op=rule.op,
            unit=rule.unit,
            ts=ts,
            raised_ts=raised_ts,
            gateway_time=gateway_time,
            message_zh=zh,
            message_en=en,
        )
