"""One batch of raw messages in, alert events and dead letters out: decode → columns → rules.

Synchronous and free of I/O, so the service can run it between receiving and acknowledging, and
tests and simulators can drive it directly.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from gateway.config import Config
from gateway.decode import DeadLetter, Decoder, StatusUpdate
from gateway.metrics import Stats
from gateway.registry import Registry
from gateway.schemas import READING_MODELS, Reading
from rules.engine import ColumnBatch, KindEngine
from rules.events import AlertEvent
from rules.model import KindProfile

log = logging.getLogger("streetbrain.pipeline")


@dataclass
class Outcome:
    alerts: list[AlertEvent] = field(default_factory=list)
    deadletters: list[DeadLetter] = field(default_factory=list)
    statuses: list[StatusUpdate] = field(default_factory=list)


def to_columns(items: list[tuple[int, Reading]], fields: tuple[str, ...]) -> ColumnBatch:
    """Readings of one kind → columns; the only per-reading Python here is reading the attributes."""
    n = len(items)
    nan = math.nan
    rows = np.fromiter((row for row, _ in items), dtype=np.int64, count=n)
    ts = np.fromiter((reading.ts for _, reading in items), dtype=np.float64, count=n)
    flat = [
        nan if (v := getattr(reading, name)) is None else float(v)
        for _, reading in items
        for name in fields
    ]
    values = np.array(flat, dtype=np.float64).reshape(n, len(fields))
    return ColumnBatch(rows=rows, ts=ts, values=values, fields=fields)


class Pipeline:
    def __init__(self, config: Config, registry: Registry, stats: Stats | None = None):
        self.config = config
        self.registry = registry
        self.stats = stats or Stats()
        self.decoder = Decoder(config, registry)
        self.engines = {
            kind: KindEngine(kind, config.kinds.get(kind, KindProfile()), model.FIELDS, len(registry.series[kind]))
            for kind, model in READING_MODELS.items()
        }

    def process(self, messages: list[tuple[str, bytes]], now: float) -> Outcome:
        stats = self.stats
        stats.batches += 1
        decoded = self.decoder.decode(messages, now)
        outcome = Outcome(deadletters=decoded.deadletters, statuses=decoded.statuses)
        for device in decoded.registered:
            log.warning("device auto-registered device=%s kind=%s site=%s", device.id, device.kind, device.site)
        for topic, _ in messages:
            parts = topic.split("/", 4)
            stats.received[parts[2] if len(parts) > 2 and parts[2] in READING_MODELS else "_"] += 1
        for letter in decoded.deadletters:
            kind = letter.kind if letter.kind in READING_MODELS else "_"
            for _, reason, _ in letter.problems:
                stats.rejected[(kind, reason)] += 1
            # Problems beyond the listed ones still count, under the first reason.
            stats.rejected[(kind, letter.reason)] += letter.rejected - len(letter.problems)
        for status in decoded.statuses:
            stats.statuses[(status.kind, "online" if status.online else "offline")] += 1
        for kind, items in decoded.readings.items():
            if not items:
                continue
            stats.valid[kind] += len(items)
            engine = self.engines[kind]
            series = self.registry.series[kind]
            engine.ensure_series(len(series))
            events = engine.evaluate(to_columns(items, engine.fields), series, now)
            for event in events:
                stats.alerts[(kind, event.rule, event.severity, event.event)] += 1
            outcome.alerts.extend(events)
        return outcome
