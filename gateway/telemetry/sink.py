"""Everything to the telemetry store, off the hot path, and nothing lost while it is away.

The gateway hands over readings, alert events and incident changes without waiting (a bounded
in-memory queue; past its bound the oldest telemetry is dropped and counted, events never). A writer
thread encodes them with influxdb-client's points, checks each (a field that changed type or an
oversized string is refused alone), and writes batches through influxdb-client's v2 write API.

Why not the client's own batching mode: it retries in memory and, when it gives up, hands back a
whole batch; it cannot keep order with a disk spool, nor isolate one bad point from the rest. Here a
batch the store refuses as bad data is split in halves until the bad points are alone; a store that
does not answer sends batches to the on-disk spool, and everything after them too, until the spool
has been replayed, oldest first, with backoff. The store's own (series, time) identity makes a
replayed point that had in fact arrived count once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

from influxdb_client import InfluxDBClient
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.rest import ApiException

from gateway.config import InfluxConfig
from gateway.schemas import Reading
from gateway.telemetry import points
from gateway.telemetry.spool import Spool
from rules.events import AlertEvent

log = logging.getLogger("streetbrain.telemetry")


class StoreDown(RuntimeError):
    pass


class TelemetrySink:
    def __init__(self, config: InfluxConfig, spool_dir: Path):
        assert config.url is not None
        self.config = config
        self.client = InfluxDBClient(url=config.url, org=config.org,
                                     token=config.token.get_secret_value() if config.token else "",
                                     timeout=int(config.timeout_s * 1000))
        self.write_api = self.client.write_api(write_options=SYNCHRONOUS)
        self.spool = Spool(spool_dir, config.spool_max_bytes)
        self.guard = points.FieldGuard(config.max_string_bytes)
        self.pending: deque[tuple[str, Any]] = deque()
        self.pending_telemetry = 0  # readings queued, under _count_lock (two threads change it)
        self._count_lock = threading.Lock()
        self.written = 0
        self.rejected: Counter[str] = Counter()
        self.dropped_in_memory = 0
        self.up = len(self.spool) == 0
        self.retry_at = 0.0
        self.backoff_s = 1.0
        self.busy = False  # the writer holds a batch taken off the queue and not yet written or spooled
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._last_drop_log = 0.0
        self._logged_drops = 0
        self.thread = threading.Thread(target=self._run, name="telemetry-writer", daemon=True)
        self.thread.start()
        if len(self.spool):
            log.info("telemetry spool holds data from before; replaying it",
                     extra={"segments": len(self.spool), "bytes": self.spool.bytes})

    # -- the gateway hands over (never blocks) --------------------------------------------------------
    def readings(self, items: list[tuple[str, str, str, Reading]]) -> None:
        """(kind, site, device_id, reading) tuples."""
        with self._count_lock:
            overflow = self.pending_telemetry + len(items) - self.config.max_pending
            if overflow > 0:
                self.dropped_in_memory += overflow  # bulk telemetry storage degrades first
                items = items[overflow:]
            self.pending_telemetry += len(items)
        if items:
            self.pending.append(("telemetry", items))
            self._kick()

    def alerts(self, alerts: list[AlertEvent]) -> None:
        if alerts:
            self.pending.append(("alerts", alerts))
            self._kick()

    def incident_changes(self, changes: list[Any]) -> None:
        if changes:
            self.pending.append(("incidents", changes))
            self._kick()

    def _kick(self) -> None:
        if self.pending_telemetry >= self.config.batch_size or len(self.pending) > 64:
            self._wake.set()

    # -- the writer thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._wake.wait(self.config.flush_interval_s)
            self._wake.clear()
            closing = self._closing.is_set()
            try:
                self._flush()
                self._replay(force=closing)
            except Exception:  # the writer must survive anything; what it held is in the spool or counted
                log.exception("telemetry writer failed; carrying on")
            self._log_drops()
            if closing:
                return

    def _flush(self) -> None:
        while self.pending:
            self.busy = True
            try:
                telemetry, events = self._encode_some()
                for cls, lines in (("events", events), ("telemetry", telemetry)):
                    if not lines:
                        continue
                    if not self.up or len(self.spool):
                        self.spool.append(cls, lines)  # keep order: nothing overtakes what is spooled
                        continue
                    try:
                        self._write(lines)
                    except StoreDown as exc:
                        self._went_down(exc)
                        self.spool.append(cls, lines)
            finally:
                self.busy = False

    def _encode_some(self) -> tuple[list[bytes], list[bytes]]:
        telemetry: list[bytes] = []
        events: list[bytes] = []
        while self.pending and len(telemetry) + len(events) < self.config.batch_size:
            kind, items = self.pending.popleft()
            if kind == "telemetry":
                with self._count_lock:
                    self.pending_telemetry -= len(items)
                for measurement, site, device_id, reading in items:
                    self._encode(points.reading_point(measurement, site, device_id, reading), telemetry)
            elif kind == "alerts":
                for alert in items:
                    self._encode(points.alert_point(alert), events)
            else:
                for change in items:
                    self._encode(points.incident_point(change.incident, change.action, change.actor, change.at,
                                                       change.note), events)
        return telemetry, events

    def _encode(self, point: Any, out: list[bytes]) -> None:
        try:
            self.guard.check(point)
        except points.PointRejected as exc:
            self._reject(str(exc), "guard")
            return
        out.append(point.to_line_protocol().encode())

    def _write(self, lines: list[bytes]) -> None:
        """Write; a batch refused as bad data is halved until its bad points are alone."""
        try:
            self.write_api.write(bucket=self.config.bucket, org=self.config.org, record=b"\n".join(lines))
            self.written += len(lines)
        except ApiException as exc:
            if exc.status in (400, 422) and len(lines) > 1:
                middle = len(lines) // 2
                self._write(lines[:middle])
                self._write(lines[middle:])
            elif exc.status in (400, 422):
                self._reject(f"{(exc.body or exc.reason or '')!s:.200}: {lines[0][:120]!r}", "store")
            else:
                raise StoreDown(f"HTTP {exc.status} {exc.reason}") from None
        except Exception as exc:  # connection refused, reset, timeout: the store is away
            raise StoreDown(f"{type(exc).__name__}: {exc}"[:200]) from None

    def _replay(self, force: bool = False) -> None:
        if not len(self.spool) or (time.monotonic() < self.retry_at and not force):
            return
        while True:
            oldest = self.spool.oldest()
            if oldest is None:
                if not self.up:
                    log.info("telemetry store is back; spool replayed")
                self.up, self.backoff_s = True, 1.0
                return
            segment, lines = oldest
            try:
                for i in range(0, len(lines), self.config.batch_size):
                    self._write(lines[i:i + self.config.batch_size])
            except StoreDown as exc:
                self._went_down(exc)
                return
            self.spool.remove(segment)

    def _went_down(self, exc: Exception) -> None:
        if self.up:
            log.warning("telemetry store unreachable; spooling to disk", extra={"error": str(exc),
                                                                             "spool": str(self.spool.directory)})
        else:
            self.backoff_s = min(self.backoff_s * 2, 30.0)
        self.up = False
        self.retry_at = time.monotonic() + self.backoff_s

    def _reject(self, reason: str, where: str) -> None:
        self.rejected[where] += 1
        log.warning("telemetry point rejected", extra={"by": where, "reason": reason})

    def _log_drops(self) -> None:
        dropped = self.dropped_in_memory + sum(self.spool.dropped_lines.values())
        now = time.monotonic()
        if dropped != self._logged_drops and now - self._last_drop_log >= 60:
            log.warning("telemetry dropped: store away too long or the gateway too far behind", extra={
                "dropped_in_memory": self.dropped_in_memory, **{f"dropped_{k}": v for k, v in
                                                                 self.spool.dropped_lines.items()}})
            self._logged_drops, self._last_drop_log = dropped, now

    # -- lifecycle --------------------------------------------------------------------------------------
    def flush(self, timeout_s: float = 10.0) -> None:
        """Wait until what was handed over is written or spooled (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while (self.pending or self.busy or (self.up and len(self.spool))) and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.02)

    def close(self) -> None:
        self._closing.set()
        self._wake.set()
        self.thread.join(30)
        self.client.close()

    def state(self) -> dict[str, Any]:
        return {"up": self.up, "written": self.written, "rejected": sum(self.rejected.values()),
                "dropped_in_memory": self.dropped_in_memory, "spool_segments": len(self.spool),
                "spool_bytes": self.spool.bytes, **{f"spool_dropped_{k}": v for k, v in self.spool.dropped_lines.items()}}
