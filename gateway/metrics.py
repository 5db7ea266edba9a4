"""Counters of the gateway, kept as plain dicts on the hot path and exported in Prometheus form.

Incrementing a labelled prometheus_client Counter per message costs more than decoding it, so the
pipeline counts per batch into dicts and a custom collector turns them into metric families when
scraped.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


class Stats(Collector):
    def __init__(self) -> None:
        self.received: Counter[str] = Counter()  # kind → messages received
        self.valid: Counter[str] = Counter()  # kind → readings accepted
        self.rejected: Counter[tuple[str, str]] = Counter()  # (kind, reason) → readings or messages rejected
        self.alerts: Counter[tuple[str, str, str, str]] = Counter()  # (kind, rule, severity, event)
        self.statuses: Counter[tuple[str, str]] = Counter()  # (kind, online|offline)
        self.pipeline_errors = 0
        self.publish_failures = 0
        self.batches = 0
        self.ingest_queue_depth = 0
        self.ingest_urgent_depth = 0  # of which smoke detectors' messages (taken first)
        self.ingest_unacked = 0  # processed, waiting for the snapshot that lets them be acknowledged
        self.ingest_lag_s = 0.0
        self.incident_writer: Any = None  # gateway.incidents.writer.IncidentWriter, once serving
        self.telemetry: Any = None  # the telemetry sink, when a store is configured
        self.batch_decodes: Counter[str] = Counter()  # here | ahead → batch messages decoded where
        self.decode_ahead: Any = None  # gateway.ahead.DecodeAhead, when on
        self.twins: Any = None  # gateway.hints.Twins, when the smoke hint lane is on
        self.hint_lane: Any = None  # its Receiver
        self.replaying: dict[str, Any] = {}  # kind → its ReplayingEngine (rules/replay.py), when late readings replay

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Per-kind totals for the periodic log line."""
        out: dict[str, dict[str, int]] = {}
        for kind, n in self.received.items():
            out.setdefault(kind, {})["received"] = n
        for kind, n in self.valid.items():
            out.setdefault(kind, {})["valid"] = n
        for (kind, _), n in self.rejected.items():
            row = out.setdefault(kind, {})
            row["rejected"] = row.get("rejected", 0) + n
        for (kind, _, _, event), n in self.alerts.items():
            if event == "raised":
                row = out.setdefault(kind, {})
                row["alerts"] = row.get("alerts", 0) + n
        return out

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        received = CounterMetricFamily("streetbrain_messages_received", "MQTT messages received", labels=["kind"])
        for kind, n in self.received.items():
            received.add_metric([kind], n)
        yield received
        valid = CounterMetricFamily("streetbrain_readings_valid", "Readings accepted", labels=["kind"])
        for kind, n in self.valid.items():
            valid.add_metric([kind], n)
        yield valid
        rejected = CounterMetricFamily("streetbrain_rejects", "Readings or messages rejected", labels=["kind", "reason"])
        for (kind, reason), n in self.rejected.items():
            rejected.add_metric([kind, reason], n)
        yield rejected
        alerts = CounterMetricFamily("streetbrain_alert_events", "Alert events",
                                     labels=["kind", "rule", "severity", "event"])
        for key, n in self.alerts.items():
            alerts.add_metric(list(key), n)
        yield alerts
        errors = CounterMetricFamily("streetbrain_pipeline_errors", "Batches that failed inside the pipeline")
        errors.add_metric([], self.pipeline_errors)
        yield errors
        failures = CounterMetricFamily("streetbrain_publish_failures", "Alert or dead-letter publishes that failed")
        failures.add_metric([], self.publish_failures)
        yield failures
        depth = GaugeMetricFamily("streetbrain_ingest_queue_depth", "Messages received and not yet processed")
        depth.add_metric([], self.ingest_queue_depth)
        yield depth
        urgent = GaugeMetricFamily("streetbrain_ingest_urgent_depth",
                                   "Smoke detectors' messages received and not yet processed (they go first)")
        urgent.add_metric([], self.ingest_urgent_depth)
        yield urgent
        unacked = GaugeMetricFamily("streetbrain_ingest_unacked",
                                    "Messages processed and not yet acknowledged (waiting for the next detector "
                                    "snapshot); with the queue depth, at most broker.receive_maximum")
        unacked.add_metric([], self.ingest_unacked)
        yield unacked
        store = GaugeMetricFamily("streetbrain_incident_store_depth",
                                  "Alerts published and waiting for the incident store's commit (their readings "
                                  "are acknowledged after it); past a bound the ingest waits for the store")
        store.add_metric([], self.incident_writer.depth if self.incident_writer is not None else 0)
        yield store
        lag = GaugeMetricFamily("streetbrain_ingest_lag_seconds",
                                "Gateway time minus the newest device time of the last batch (overload shows here first)")
        lag.add_metric([], self.ingest_lag_s)
        yield lag
        decodes = CounterMetricFamily("streetbrain_batch_decodes",
                                      "Batch messages decoded by the main thread (here) or by the decode-ahead "
                                      "worker process (ahead)", labels=["where"])
        for where, n in self.batch_decodes.items():
            decodes.add_metric([where], n)
        yield decodes
        if self.decode_ahead is not None:
            state = self.decode_ahead.state()
            for family, name, key, text in (
                    (CounterMetricFamily, "decode_worker_starts", "starts", "Decode-ahead worker processes started"),
                    (CounterMetricFamily, "decode_worker_failures", "failures",
                     "Decode-ahead workers that died or did not start (the main thread decodes)"),
                    (GaugeMetricFamily, "decode_worker_running", "running", "1 while a decode-ahead worker runs"),
                    (CounterMetricFamily, "decode_ahead_waits", "waits",
                     "Batches whose main thread waited for the worker's answer on some of their messages"),
                    (CounterMetricFamily, "decode_ahead_dropped", "dropped",
                     "Messages not offered to decode-ahead because its thread was not taking them (decoded by "
                     "the main thread instead)")):
                metric = family(f"streetbrain_{name}", text)
                metric.add_metric([], state[key])
                yield metric
        if self.twins is not None:
            hints = CounterMetricFamily("streetbrain_smoke_hints",
                                        "Smoke telemetry by the hint lane and the bulk session (gateway/hints.py): "
                                        "which copy came first, twins skipped, bulk statuses that yielded to a "
                                        "reading the lane brought first, copies forgotten unpaired", labels=["event"])
            for event, n in self.twins.counts.items():
                hints.add_metric([event], n)
            yield hints
            state = self.twins.state()
            for name, text in (("waiting", "Smoke telemetry copies waiting for their twin"),
                               ("hints_ahead", "Hints processed whose bulk copy has not come yet")):
                gauge = GaugeMetricFamily(f"streetbrain_smoke_hints_{name}", text)
                gauge.add_metric([], state[name])
                yield gauge
            connected = GaugeMetricFamily("streetbrain_smoke_hint_lane_connected", "1 while the hint lane is connected")
            connected.add_metric([], int(self.hint_lane is not None and self.hint_lane.connected.is_set()))
            yield connected
        if self.replaying:
            replays = CounterMetricFamily("streetbrain_replays", "Series set back and replayed for a late reading",
                                          labels=["kind"])
            early = CounterMetricFamily("streetbrain_replay_settled_early",
                                        "Readings settled before their lateness bound because the replay buffer was "
                                        "full (detection.replay_max_pending); later readings than them apply in "
                                        "arrival order", labels=["kind"])
            copied = CounterMetricFamily("streetbrain_replay_caught_up",
                                         "Readings the replay's shadow took by copying their series' live state "
                                         "(every held reading of the series taken at once) instead of stepping them",
                                         labels=["kind"])
            held = GaugeMetricFamily("streetbrain_replay_pending", "Readings held for replaying late ones",
                                     labels=["kind"])
            for kind, engine in self.replaying.items():
                replays.add_metric([kind], engine.replays)
                early.add_metric([kind], engine.settled_early)
                copied.add_metric([kind], engine.caught_up)
                held.add_metric([kind], len(engine.pending))
            yield from (replays, early, copied, held)
        if self.telemetry is not None:
            for name, value in self.telemetry.state().items():
                family = GaugeMetricFamily(f"streetbrain_telemetry_{name}", f"Telemetry store: {name.replace('_', ' ')}")
                family.add_metric([], float(value))
                yield family
