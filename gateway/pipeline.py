"""One batch of raw messages in, alert events and dead letters out: decode → columns → rules.

Synchronous and free of I/O, so the service can run it between receiving and acknowledging, and
tests and simulators can drive it directly. Snapshots are handed out and taken back as arrays; the
service writes them to disk.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import orjson

from gateway import topics
from gateway.config import Config
from gateway.decode import DeadLetter, Decoder, ReadingColumns, StatusUpdate
from gateway.metrics import Stats
from gateway.registry import Registry
from gateway.schemas import READING_MODELS, Reading
from rules.engine import ColumnBatch, KindEngine, last_heard
from rules.events import EVENT_ZH, AlertEvent, alert_id
from rules.model import KindProfile
from rules.replay import ReplayingEngine

log = logging.getLogger("streetbrain.pipeline")


@dataclass
class Outcome:
    alerts: list[AlertEvent] = field(default_factory=list)
    deadletters: list[DeadLetter] = field(default_factory=list)
    statuses: list[StatusUpdate] = field(default_factory=list)
    accepted: list[tuple[str, str, str, Reading]] = field(default_factory=list)  # (kind, site, device, reading)
    # batch messages taken as columns, with which of their readings were accepted
    accepted_columns: list[tuple[ReadingColumns, np.ndarray]] = field(default_factory=list)
    newest: float | None = None  # the newest device time among the accepted readings

    def readings(self) -> Iterator[tuple[str, str, str, Reading]]:
        """Every accepted reading as (kind, site, device, reading); those of column chunks are built
        here, so only a consumer that needs them one by one (the telemetry store) pays for it."""
        yield from self.accepted
        for chunk, kept in self.accepted_columns:
            for i in np.flatnonzero(kept).tolist():
                yield chunk.kind, chunk.site, chunk.device_id, chunk.reading(i)

    def count(self) -> int:
        return len(self.accepted) + sum(int(kept.sum()) for _, kept in self.accepted_columns)


def to_columns(items: list[tuple[int, Reading]], fields: tuple[str, ...]) -> ColumnBatch:
    """Readings of one kind → columns; the only per-reading Python here is reading the attributes."""
    n = len(items)
    nan = math.nan
    rows = np.fromiter((row for row, _ in items), dtype=np.int64, count=n)
    ts = np.fromiter((reading.ts for _, reading in items), dtype=np.float64, count=n)
    seq = np.fromiter((-1 if reading.seq is None else reading.seq for _, reading in items), dtype=np.int64, count=n)
    flat = [
        nan if (v := getattr(reading, name)) is None else float(v)
        for _, reading in items
        for name in fields
    ]
    values = np.array(flat, dtype=np.float64).reshape(n, len(fields))
    return ColumnBatch(rows=rows, ts=ts, values=values, fields=fields, seq=seq)


class Pipeline:
    def __init__(self, config: Config, registry: Registry, stats: Stats | None = None,
                 started_at: float | None = None, keep_readings: bool = False):
        self.config = config
        self.keep_readings = keep_readings  # hand accepted readings out (for the telemetry store)
        self.registry = registry
        self.stats = stats or Stats()
        self.decoder = Decoder(config, registry)
        started_at = time.time() if started_at is None else started_at
        self.engines = {
            # late readings rewind their series and replay it in device-time order (rules/replay.py)
            kind: (ReplayingEngine if config.detection.replay_late else KindEngine)(
                kind, config.kinds.get(kind, KindProfile()), model.FIELDS, registry.series[kind], started_at=started_at)
            for kind, model in READING_MODELS.items()
        }
        for engine in self.engines.values():
            if isinstance(engine, ReplayingEngine):
                engine.max_pending = config.detection.replay_max_pending
                self.stats.replaying[engine.kind] = engine

    def process(self, messages: list[tuple[str, bytes]], now: float, ahead: list[Any] | None = None) -> Outcome:
        """``ahead``: per message, its batch as decoded by the decode-ahead worker, or None."""
        stats = self.stats
        stats.batches += 1
        decoded = self.decoder.decode(messages, now, ahead)
        stats.batch_decodes["here"] += decoded.batches_here
        stats.batch_decodes["ahead"] += decoded.batches_ahead
        outcome = Outcome(deadletters=decoded.deadletters, statuses=decoded.statuses)
        for device in decoded.registered:
            log.warning("device auto-registered", extra={"device": device.id, "kind": device.kind, "site": device.site})
        # (kind, device) → the channel of its last message in the batch, where a status needs it
        last_word: dict[tuple[str, str], str] = {}
        for topic, _ in messages:
            parts = topic.split("/", 4)
            stats.received[parts[2] if len(parts) > 2 and parts[2] in READING_MODELS else "_"] += 1
            if decoded.statuses and len(parts) == 5:
                last_word[(parts[2], parts[3])] = parts[4]
        for kind in READING_MODELS:
            items, chunks = decoded.readings.get(kind, []), decoded.columns.get(kind, [])
            if items or chunks:
                outcome.alerts.extend(self._detect(kind, items, chunks, now, outcome))
        last_status = {(status.kind, status.device_id): at for at, status in enumerate(decoded.statuses)}
        for at, status in enumerate(decoded.statuses):
            stats.statuses[(status.kind, "online" if status.online else "offline")] += 1
            key = (status.kind, status.device_id)
            device = self.registry.devices.get(status.device_id)
            if device is None or last_status[key] != at:
                continue  # its own later status in this batch says more
            engine = self.engines[status.kind]
            engine.ensure_series()
            rows = self.registry.series[status.kind].rows_of(device)
            if status.online:
                for row in rows:
                    outcome.alerts.extend(engine.mark_online(row, now))
            elif last_word.get(key) != "telemetry" or not any(engine.last_seen[row] == now for row in rows):
                # a will is old news when a reading of the device, taken in this batch, came after it
                # (readings are applied before statuses: a device that dropped and came straight back
                # would stay offline until its next report, hours for a smoke detector)
                for row in rows:
                    outcome.alerts.extend(engine.mark_offline(row, now))
        for kind, dropped in decoded.throttled.items():
            # the first drop of a flood is also a dead letter, counted below
            stats.rejected[(kind, "rate_limited")] += dropped - sum(
                1 for d in decoded.floods_started if d.kind == kind)
        for device in decoded.floods_started:
            log.warning("device flooding: throttled", extra={"device": device.id, "kind": device.kind})
            outcome.alerts.append(self._flood_event(device, "raised", now, now, 0))
        for letter in outcome.deadletters:
            kind = letter.kind if letter.kind in READING_MODELS else "_"
            for _, reason, _ in letter.problems:
                stats.rejected[(kind, reason)] += 1
            # Problems beyond the listed ones still count, under the first reason.
            stats.rejected[(kind, letter.reason)] += letter.rejected - len(letter.problems)
        self._count(outcome.alerts)
        return outcome

    def _detect(self, kind: str, items: list[tuple[int, Reading]], chunks: list[ReadingColumns], now: float,
                outcome: Outcome) -> list[AlertEvent]:
        engine = self.engines[kind]
        engine.ensure_series()
        parts = [to_columns(items, engine.fields)] if items else []
        parts += [ColumnBatch(c.rows, c.ts, c.values, engine.fields, c.seq) for c in chunks]
        batch = parts[0] if len(parts) == 1 else ColumnBatch(
            np.concatenate([b.rows for b in parts]), np.concatenate([b.ts for b in parts]),
            np.concatenate([b.values for b in parts]), engine.fields, np.concatenate([b.seq for b in parts]))
        evaluation = engine.evaluate(batch, now)
        n = len(batch)
        rejected = len(evaluation.duplicate) + len(evaluation.too_late)
        self.stats.valid[kind] += n - rejected
        # QoS 1 redeliveries are expected: counted, not dead-lettered.
        self.stats.rejected[(kind, "duplicate")] += len(evaluation.duplicate)
        series = self.registry.series[kind]
        # batch index → (chunk, index in it); single readings come first
        offsets = np.cumsum([len(items)] + [len(c) for c in chunks])

        def reading_at(index: int) -> Reading:
            if index < len(items):
                return items[index][1]
            k = int(np.searchsorted(offsets, index, side="right")) - 1
            return chunks[k].reading(index - int(offsets[k]))

        kept = np.ones(n, dtype=bool)
        if rejected:
            kept[evaluation.duplicate] = False
            kept[evaluation.too_late] = False
        if n > rejected:
            newest = float(batch.ts[kept].max() if rejected else batch.ts.max())
            outcome.newest = newest if outcome.newest is None else max(outcome.newest, newest)
        if self.keep_readings:
            outcome.accepted.extend((kind, series.sites[row], series.device_ids[row], reading)
                                    for (row, reading), keep in zip(items, kept[:len(items)].tolist()) if keep)
            outcome.accepted_columns.extend((chunk, kept[start:start + len(chunk)])
                                            for chunk, start in zip(chunks, offsets[:-1].tolist()))
        for index in evaluation.too_late.tolist():
            row, reading = int(batch.rows[index]), reading_at(index)
            letter = DeadLetter(topics.telemetry(series.sites[row], kind, series.device_ids[row]), series.sites[row],
                                kind, series.device_ids[row], orjson.dumps(reading.model_dump()))
            newest = engine.last_ts[row]
            letter.add(None, "too_late", f"ts is {newest - reading.ts:.0f} s older than the newest reading of this "
                                         f"series (lateness allowed: {engine.profile.lateness_s:.0f} s)")
            outcome.deadletters.append(letter)
        return evaluation.events

    def check_offline(self, now: float) -> list[AlertEvent]:
        """Staleness of every kind, and floods that have calmed down (both on the gateway clock)."""
        events: list[AlertEvent] = []
        for engine in self.engines.values():
            engine.ensure_series()
            events.extend(engine.check_offline(now))
        for device_id, started, dropped in self.decoder.limiter.calmed(now, self.config.ingest.flood_quiet_s):
            device = self.registry.devices.get(device_id)
            if device is not None:
                events.append(self._flood_event(device, "cleared", now, started, dropped))
        self._count(events)
        return events

    def _flood_event(self, device: Any, event: str, now: float, started: float, dropped: int) -> AlertEvent:
        rate = self.config.ingest.device_rate_per_s
        name = device.name or device.id
        if event == "raised":
            zh, en = f"{name} 消息过多，已限流（每秒超过 {rate:g} 条）", f"{name} is flooding: throttled (over {rate:g} messages/s)"
        else:
            zh, en = f"{name} 恢复正常（限流期间丢弃 {dropped} 条）", f"{name} back within limits ({dropped} messages dropped)"
        return AlertEvent(
            alert_id=alert_id(device.id, 0, "flooding", started), event=event,  # type: ignore[arg-type]
            rule="flooding", kind=device.kind, severity="warning", previous_severity=None, site=device.site,
            device_id=device.id, port=None, device_name=name, field="messages_per_s", value=float(dropped),
            threshold=rate, op=">", unit="msg/s", ts=now, raised_ts=started, gateway_time=now,
            message_zh=f"【警告·{EVENT_ZH[event]}】{zh}", message_en=f"[warning {event}] {en}")

    def _count(self, events: list[AlertEvent]) -> None:
        for event in events:
            self.stats.alerts[(event.kind, event.rule, event.severity, event.event)] += 1

    # -- state ---------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, np.ndarray]:
        out = {}
        for kind, engine in self.engines.items():
            for name, array in engine.snapshot().items():
                out[f"{kind}/{name}"] = array
        return out

    def restore(self, saved: dict[str, np.ndarray], now: float) -> dict[str, int]:
        restored = {}
        heard = []  # when the gateway was last listening, by each kind
        for kind, engine in self.engines.items():
            prefix = f"{kind}/"
            part = {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}
            if "keys" in part:
                restored[kind] = engine.restore(part, now)
                heard.append(last_heard(part))
        known = [t for t in heard if t is not None]
        if known:
            self.grant_backlog(now - max(known), now)
        return restored

    def grant_backlog(self, away_s: float, now: float) -> None:
        """The gateway was away (down, or its broker connection): what the broker queued meanwhile is
        no flood (:meth:`RateLimiter.grant`), at most a session's worth."""
        self.decoder.limiter.grant(min(away_s, float(self.config.broker.session_expiry_s)), now)
