"""The gateway process: broker (embedded when needed), receive → pipeline → publish → acknowledge."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from pydantic import SecretStr

from gateway import security, topics
from gateway.ahead import DecodeAhead
from gateway.broker import EmbeddedBroker, reachable
from gateway.config import BrokerAddress, Config, parse_broker_url
from gateway.metrics import Stats
from gateway.hints import Twins
from gateway.mqtt import URGENT, Inbound, Publisher, Receiver
from gateway.decode import DeadLetter
from gateway.incidents.queue import IncidentQueue
from gateway.incidents.store import Database
from gateway.incidents.writer import IncidentWriter
from gateway.telemetry.sink import TelemetrySink
from gateway.pipeline import Outcome, Pipeline
from gateway.recent import RecentReadings
from gateway.registry import Registry
from gateway.schemas import READING_MODELS

log = logging.getLogger("streetbrain.gateway")

SHUTDOWN_FLUSH_S = 10.0
RECENT_ALERTS = 1000  # alert events kept for /api/alerts
RECENT_READINGS = 120  # readings kept per device for the dashboard's chart (2 h of one a minute)…
# …within a budget for the whole registry (a reading is a row of 6-10 doubles, 48-80 bytes: the budget is
# at most 40 MB): a street keeps 120 a device, a city of 300,000 devices its last reading, instead of
# 2-3 GB of chart data (bench/throughput.py measures it).
RECENT_READINGS_BUDGET = 500_000
RECENT_READINGS_MIN = 1  # the device view's last reading
LINGER_S = 0.002  # how long a small batch waits for company (a few ms on an alert's way: the target is 50 ms;
#                  4 ms until the incident commits left the loop, which shortened every batch: docs/PERFORMANCE.md)
LINGER_BATCH = 64  # messages from which a batch no longer waits (at 500, a batch at 10,000 msg/s always
#                    waited: ~60 arrive while one is processed; docs/PERFORMANCE.md)
BOUNDARY_WAIT_S = 1.0  # a snapshot waits this long for the batch in hand to finish, then comes back later
STORE_QUEUE_ALERTS = 20_000  # alerts waiting for the incident store before the ingest loop waits for it
PUBLISH_CHANGES_AT_ONCE = 200  # incident changes published between two turns of the ingest loop
GC_YOUNG_THRESHOLD = 10_000  # allocations between young collections (Python's default: 700)
GC_FULL_EVERY = 100  # middle-generation collections between full ones (Python's default: 10)


def resolve_broker(config: Config, override: str | None) -> tuple[BrokerAddress, EmbeddedBroker | None]:
    """Where to connect, and the broker we must start ourselves if there is none.

    No URL configured: an embedded Mosquitto on a free loopback port. A loopback URL that does not
    answer: an embedded Mosquitto on that port. A remote URL: used as it is (paho retries).
    """
    url = override or config.broker.url
    if url is None:
        broker = EmbeddedBroker(config.state_dir / "mosquitto", auth=_secure(config), tls=_tls(config))
        return parse_broker_url(broker.url), broker
    address = parse_broker_url(url)
    if address.is_loopback and not address.tls and not reachable(address.host, address.port):
        log.info("no broker answers on %s; starting an embedded one there", address)
        return address, EmbeddedBroker(config.state_dir / "mosquitto", port=address.port,
                                       host="127.0.0.1" if address.host == "localhost" else address.host,
                                       auth=_secure(config))
    return address, None


def _tls(config: Config) -> tuple[Path, Path, Path] | None:
    """The embedded broker's certificates when it is to speak TLS; the gateway then trusts its CA."""
    if not config.broker.embedded_tls:
        return None
    from gateway.config import TlsConfig
    from gateway.tls import local_ca

    ca, cert, key = local_ca(config.state_dir / "tls")
    if config.broker.tls is None:
        config.broker.tls = TlsConfig(ca_file=ca)
    return ca, cert, key


def _secure(config: Config) -> tuple[Path, Path]:
    """Credentials and ACL for the embedded broker, from the registry; the gateway logs in with its own."""
    credentials = security.load_or_create(config.state_dir, config.devices)
    auth = security.broker_auth(config.state_dir / "mosquitto", credentials, config.devices)
    if config.broker.username is None:
        config.broker.username = security.GATEWAY_USER
        config.broker.password = SecretStr(credentials.gateway)
    return auth


def recent_readings_depth(series: int) -> int:
    """Readings kept per device for the dashboard: RECENT_READINGS, or fewer for a registry so large
    that they would not fit RECENT_READINGS_BUDGET."""
    return max(RECENT_READINGS_MIN, min(RECENT_READINGS, RECENT_READINGS_BUDGET // max(1, series)))


@dataclass
class Gateway:
    config: Config
    broker_url: str | None = None
    stats: Stats = field(default_factory=Stats)

    def __post_init__(self) -> None:
        self.registry = Registry.from_config(self.config)
        # accepted readings are kept: for the telemetry store and the dashboard's recent readings
        self.pipeline = Pipeline(self.config, self.registry, self.stats, keep_readings=True)
        self.receiver: Receiver | None = None
        # smoke detectors' telemetry, again, on a connection of its own: a fire overtakes the broker's queue
        self.twins = Twins() if self.config.ingest.smoke_hint_lane else None
        self.stats.twins = self.twins
        # PUBACKs of messages processed, waiting for the snapshot that includes them: (connection, frames, count)
        self.unacked: list[tuple[int, bytes, int]] = []
        self.recent_alerts: deque[dict[str, Any]] = deque(maxlen=RECENT_ALERTS)
        # the dashboard's chart when no store is configured: an array of doubles a device (gateway/recent.py)
        self.recent = RecentReadings(recent_readings_depth(sum(len(s) for s in self.registry.series.values())))
        self._poke: asyncio.Event | None = None
        self._mid_batch = False  # the ingest loop is between a batch's detection and its acknowledgements
        self._state_unsafe = False  # a batch failed mid-way: the detector state is no record any more
        self._offline_unsaid = False  # offline alerts are being stored and published (see _offline_alerts)
        self._commit_lock = asyncio.Lock()
        # snapshots waiting for it: (detector state, acknowledgements covered, alerts to be committed first)
        self._boundary: list[asyncio.Future[tuple[dict[str, np.ndarray], int, int] | None]] = []
        self.address: BrokerAddress | None = None
        self.embedded: EmbeddedBroker | None = None
        self.started = asyncio.Event()
        self.alert_listeners: list[asyncio.Queue[dict]] = []  # operator surfaces that follow alerts live
        self.restore_state()
        # The store is used from one thread of its own: its writes never block the event loop.
        self.db_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="incident-store")
        self.incidents = IncidentQueue(self.config, Database(self.config.incidents.url))
        self.published_seq = self.incidents.last_audit_seq()
        self._changes_lock = asyncio.Lock()  # one publication of the incident changes at a time
        self._publisher: Publisher | None = None
        # the alerts' way into the store, off the ingest loop (started with the serving)
        self.writer = IncidentWriter(lambda batches: self.in_store(self.incidents.absorb_batches, batches),
                                     self._after_commit, self._store_failed, room=STORE_QUEUE_ALERTS)
        self.stats.incident_writer = self.writer
        # a snapshot whose alerts were not all committed when it was taken: written once they are
        self._pending: tuple[dict[str, np.ndarray], int, int] | None = None
        self.telemetry: TelemetrySink | None = None
        if self.config.influx.url is not None:
            self.telemetry = TelemetrySink(self.config.influx, self.config.state_dir / "telemetry-spool")
        else:
            log.info("no telemetry store configured (influx.url): readings are checked and alerted on, not kept")
        self.stats.telemetry = self.telemetry

    async def in_store(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.db_thread, lambda: fn(*args, **kwargs))

    @property
    def snapshot_path(self) -> Path:
        return self.config.state_dir / "detectors.npz"

    def restore_state(self) -> None:
        """Take back the detector state of the last run: active alerts stay active, half-counted
        durations go on, and nothing is raised again."""
        path = self.snapshot_path
        if not path.exists():
            return
        try:
            with np.load(path, allow_pickle=False) as data:
                restored = self.pipeline.restore({k: data[k] for k in data.files}, time.time())
        except (OSError, ValueError, KeyError) as exc:
            aside = path.with_suffix(".unreadable")
            path.replace(aside)
            log.error("detector snapshot unreadable; starting with fresh state",
                      extra={"path": str(path), "moved_to": str(aside), "error": str(exc)})
            return
        log.info("detector state restored", extra={"path": str(path), **restored})

    def write_snapshot(self, arrays: dict[str, np.ndarray] | None = None) -> None:
        """Atomically: a crash while writing leaves the previous snapshot in place."""
        arrays = arrays if arrays is not None else self.pipeline.snapshot()
        path = self.snapshot_path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    async def run(self, stop: asyncio.Event) -> None:
        self.address, self.embedded = resolve_broker(self.config, self.broker_url)
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.start)
        try:
            await self._serve(stop)
        finally:
            if self.embedded is not None:
                await asyncio.to_thread(self.embedded.stop)

    async def _serve(self, stop: asyncio.Event) -> None:
        assert self.address is not None
        # What was built at start (registry, compiled rules, detector state: millions of objects for a
        # city) lives as long as the process: out of the collector's sight, a full collection no longer
        # walks it (it was a 150-200 ms stall of the whole ingest path every few seconds under load).
        # Fewer, larger young collections (the per-batch garbage is freed by reference counting anyway),
        # and a full collection (60-110 ms with a city's recent readings) 10× rarer than Python's default.
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, 10, GC_FULL_EVERY)
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        publisher = Publisher(self.config.broker, self.address)
        ahead = None
        if self.config.ingest.decode_ahead:
            ahead = DecodeAhead(self.pipeline.decoder).start()
            self.stats.decode_ahead = ahead
        receiver = Receiver(self.config.broker, self.address, [topics.TELEMETRY_FILTER, topics.STATUS_FILTER],
                            loop, wake, ahead, hint_lane=self.twins is not None)
        self.receiver = receiver
        receiver.on_back = lambda away_s: self.pipeline.grant_backlog(away_s, time.time())
        self.stats.hint_lane = receiver.lane
        self._poke = asyncio.Event()
        self._publisher = publisher
        self.writer.start()
        api_task = await self._start_api()
        publisher.start()
        receiver.start()
        stats_task = asyncio.create_task(self._log_stats(stop), name="stats")
        housekeeping = asyncio.create_task(self._housekeeping(stop, publisher, receiver), name="housekeeping")
        log.info("gateway starting broker=%s devices=%d series=%s", self.address, len(self.registry.devices),
                 {k: len(s) for k, s in self.registry.series.items()})
        stopping = asyncio.create_task(stop.wait())
        ready = asyncio.gather(receiver.subscribed.wait(), publisher.ready.wait())
        await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if ready.done():
            self.started.set()
            log.info("gateway ready: subscribed to %s and %s", topics.TELEMETRY_FILTER, topics.STATUS_FILTER)
        else:
            ready.cancel()
        ingest = asyncio.create_task(self._ingest(receiver, publisher, wake, stop), name="ingest")
        try:
            await asyncio.wait({ingest, stopping}, return_when=asyncio.FIRST_COMPLETED)
            wake.set()  # the ingest loop sees the stop at its next turn
            if not ingest.done():
                # Stopping while a batch is in flight (its alerts may wait on a broker that is
                # gone): give it a while, then leave it unacknowledged for redelivery.
                await asyncio.wait({ingest}, timeout=SHUTDOWN_FLUSH_S)
                ingest.cancel()
            await asyncio.gather(ingest, return_exceptions=True)
        finally:
            # Take nothing new (the broker redelivers it to our session later), finish and
            # acknowledge what is buffered, then leave.
            receiver.pause()
            try:
                await asyncio.wait_for(self._process(receiver, publisher, everything=True), SHUTDOWN_FLUSH_S)
            except TimeoutError:  # the batch in hand was cancelled: _process marks the state unsafe
                log.error("shutdown: could not publish the last alerts within %.0f s; the broker redelivers "
                          "their readings on restart (no last snapshot)", SHUTDOWN_FLUSH_S)
            # the last incidents committed, then the last snapshot, then the last acknowledgements
            if not await self.writer.stop(SHUTDOWN_FLUSH_S):
                log.error("shutdown: %d alerts not committed to the incident store; the broker redelivers their "
                          "readings on restart (no snapshot holds them)", self.writer.depth)
            await self._commit(receiver, 0.0)
            await asyncio.to_thread(receiver.stop)
            if ahead is not None:
                await asyncio.to_thread(ahead.stop)
            if api_task is not None:
                self.api_server.should_exit = True
                await asyncio.wait({api_task}, timeout=5)
            stats_task.cancel()
            housekeeping.cancel()
            await asyncio.gather(housekeeping, return_exceptions=True)
            stopping.cancel()
            await publisher.stop()
            await self.in_store(self.incidents.db.close)
            self.db_thread.shutdown()
            if self.telemetry is not None:
                await asyncio.to_thread(self.telemetry.close)
            self._log_counters("gateway stopped")

    async def _ingest(self, receiver: Receiver, publisher: Publisher, wake: asyncio.Event, stop: asyncio.Event) -> None:
        """One long-lived loop: wait for messages, take a batch, process it; no task per wake-up."""
        while not stop.is_set():
            await wake.wait()
            wake.clear()
            if stop.is_set():
                return
            if not receiver.urgent and len(receiver) < LINGER_BATCH:
                # A batch costs about the same for 1 message as for 20 (numpy calls, a store round trip):
                # at moderate rates let a few more arrive. A smoke detector's message never waits.
                await asyncio.sleep(LINGER_S)
            try:
                await self._process(receiver, publisher)
            except Exception:
                # its batch stays unacknowledged: the broker delivers it again
                self.stats.pipeline_errors += 1
                log.exception("processing a batch failed; it will be delivered again")

    async def _process(self, receiver: Receiver, publisher: Publisher, everything: bool = False) -> None:
        while True:
            if self.writer.depth > self.writer.room:  # the store far behind: it sets the pace (between
                await self.writer.room_for_more()     # batches, where a snapshot can be taken)
            batch = receiver.drain(self.config.ingest.batch_max, self.config.ingest.batch_max_bytes)
            self.stats.ingest_queue_depth = len(receiver)
            self.stats.ingest_urgent_depth = len(receiver.urgent)
            self.stats.ingest_unacked = sum(n for _, _, n in self.unacked)
            if not batch:
                return
            self._mid_batch = True  # from here the detectors hold what this batch did (see _commit)
            completed = False
            try:
                await self._process_one(batch, receiver, publisher)
                completed = True
            finally:
                self._mid_batch = False
                if not completed:
                    # Its readings are in the detectors, its alerts perhaps neither committed nor
                    # published: a snapshot from now on would make their redelivery look like duplicates.
                    self._no_more_snapshots("a batch did not complete", "the broker redelivers everything "
                                            "since the last snapshot, which is replayed onto it")
                if self._boundary:  # a snapshot waits for this moment
                    taken = None if self._state_unsafe else self._snapshot_arrays()
                    for waiter in self._boundary:
                        if not waiter.done():
                            waiter.set_result(taken)
                    self._boundary.clear()
            if not everything:
                return

    async def _process_one(self, batch: list[Inbound], receiver: Receiver, publisher: Publisher) -> None:
        if receiver.ahead is not None and URGENT not in batch[0].topic:  # a fire never waits for bulk decoding
            await receiver.ahead.settled(batch)
        now = time.time()
        work = batch
        if self.twins is not None:  # the smoke hint lane's copies and their twins (gateway/hints.py)
            work = self.twins.sift(batch, now, receiver.lane is not None and receiver.lane.connected.is_set())
        outcome = self._process_batch([(m.topic, m.payload) for m in work], now,
                                      [m.ahead for m in work] if receiver.ahead is not None else None)
        newest = outcome.newest
        if newest is not None:
            # how far behind the devices the gateway is: gateway time − the newest device time taken
            self.stats.ingest_lag_s = max(0.0, now - newest)
        if self.telemetry is not None:
            self.telemetry.readings(list(outcome.readings()) if outcome.accepted_columns else outcome.accepted)
            self.telemetry.alerts(outcome.alerts)
        self._remember(outcome)
        # The alerts go out now; their incidents are committed by the writer while the loop goes on to
        # the next batch (it waited for every commit: 3.6 ms a batch with alerts at the median, up to
        # 92 ms when the store's thread was starved). The readings are acknowledged only by a snapshot taken after the
        # commit (see _commit), so a crash loses neither.
        self.writer.put(outcome.alerts, now)
        await self._publish(outcome, publisher, now)
        # acknowledged once a snapshot holds what these readings did (see _commit)
        self.unacked.extend(receiver.pubacks(batch))
        self.stats.publish_failures = publisher.failures

    async def _after_commit(self) -> None:
        """The incident writer's, after each commit: the changes out, and a failure to read them back is
        no failure of the commit (housekeeping publishes them at its next tick, from the same place)."""
        if self._publisher is not None:
            await self._tolerant("publishing incident changes", self._publish_incident_changes(self._publisher))

    def _store_failed(self, exc: Exception, delay: float) -> None:
        """The writer's commit failed (the database down, full, locked…): nothing of it was committed
        (a repeat of one that did is recognised by the store's unique index on alert id, event and
        device time); its alerts wait, and their readings stay unacknowledged."""
        self.stats.pipeline_errors += 1
        log.error("incident store write failed (%s); %d alerts wait and are tried again in %.1f s",
                  exc, self.writer.depth, delay)

    def _process_batch(self, messages: list[tuple[str, bytes]], now: float, ahead: list[Any] | None = None) -> Outcome:
        """The pipeline over a batch; if it fails, message by message (each decoded here), so that a
        reading that trips a bug costs only itself (dead-lettered as internal_error), never the other
        devices' readings."""
        try:
            return self.pipeline.process(messages, now, ahead)
        except Exception:
            self.stats.pipeline_errors += 1
            log.exception("pipeline failed on a batch; retrying its %d messages one by one", len(messages))
        outcome = Outcome()
        for topic, payload in messages:
            try:
                one = self.pipeline.process([(topic, payload)], now)
            except Exception as exc:
                self.stats.pipeline_errors += 1
                self.stats.rejected[("_", "internal_error")] += 1
                letter = DeadLetter(topic, topics.UNKNOWN, topics.UNKNOWN, topics.UNKNOWN, payload)
                parsed = topics.parse_device_topic(topic)
                if parsed is not None:
                    letter.site, letter.kind, letter.device_id = parsed.site, parsed.kind, parsed.device_id
                letter.add(None, "internal_error", f"{type(exc).__name__}: {exc} (a gateway bug: please report)")
                outcome.deadletters.append(letter)
                continue
            outcome.alerts += one.alerts
            outcome.deadletters += one.deadletters
            outcome.statuses += one.statuses
        return outcome

    async def _publish(self, outcome: Outcome, publisher: Publisher, now: float) -> None:
        out: list[tuple[str, bytes]] = []
        for alert in outcome.alerts:
            body = alert.to_dict()
            out.append((topics.alert(alert.site, alert.kind, alert.device_id), orjson.dumps(body)))
            log.log(logging.WARNING if alert.event != "cleared" else logging.INFO,
                    "alert %s", alert.event, extra={
                        "alert_id": alert.alert_id, "rule": alert.rule, "severity": alert.severity,
                        "device": alert.device_id, "site": alert.site, "value": alert.value,
                        "threshold": alert.threshold})
            self.recent_alerts.append(body)
            self._tell_listeners(body)
        for letter in outcome.deadletters:
            out.append((letter.deadletter_topic, letter.to_json(now)))
            log.info("rejected %s", letter.reason, extra={
                "topic": letter.topic, "detail": letter.detail, "rejected": letter.rejected,
                "accepted": letter.accepted})
        for status in outcome.statuses:
            log.info("device %s", "online" if status.online else "offline",
                     extra={"device": status.device_id, "kind": status.kind})
        if out:
            await publisher.publish_many(out)

    def _snapshot_arrays(self) -> tuple[dict[str, np.ndarray], int, int]:
        """A copy of the detector state, how many of the waiting acknowledgements it covers, and how
        many alerts handed to the incident writer it holds as raised or cleared."""
        return ({k: v.copy() for k, v in self.pipeline.snapshot().items()}, len(self.unacked),
                self.writer.queued)

    async def _commit(self, receiver: Receiver, wait_s: float = BOUNDARY_WAIT_S) -> None:
        """Snapshot the detector state, then acknowledge the readings it includes.

        Acknowledging a reading only once its effects are on disk is what makes a kill lose nothing:
        whatever was not acknowledged is delivered again and replayed onto exactly the state it last
        saw (a group commit, one per snapshot interval; the broker's receive window covers the wait).
        The snapshot is written only once the incident writer has committed every alert of the
        batches it holds (waiting up to ``wait_s``; else it is kept, and written at a later interval
        once they are): a snapshot with an alert raised in it and not on record would, after a crash,
        take its redelivered readings for ones already seen, and the alert would be lost.
        """
        async with self._commit_lock:  # one at a time: the shutdown's may follow housekeeping's at once
            await self._commit_now(receiver, wait_s)

    async def _fresh_snapshot(self) -> tuple[dict[str, np.ndarray], int, int] | None:
        """:meth:`_snapshot_arrays` between two batches; None if not now."""
        if not self._mid_batch:
            return self._snapshot_arrays()
        # A batch is between detection and its alerts' hand-over: a snapshot now would hold what it did
        # while its readings stay unacknowledged, and after a crash they would come back as duplicates
        # of readings "already seen", their alerts never committed nor published. The ingest loop takes
        # the snapshot at the end of the batch; give it a second, else the next snapshot interval tries
        # again. None too if the batch did not complete.
        waiter = asyncio.get_running_loop().create_future()
        self._boundary.append(waiter)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), BOUNDARY_WAIT_S)
        except TimeoutError:
            if waiter in self._boundary:
                self._boundary.remove(waiter)
            return None

    async def _commit_now(self, receiver: Receiver, wait_s: float) -> None:
        if self._state_unsafe or self._offline_unsaid:  # (see _offline_alerts)
            return
        if self._pending is not None and self.writer.depth:
            # The store is behind: the snapshot kept at an earlier interval goes once its alerts are
            # committed (a fresh one every time would wait for newer alerts still, and with a writer
            # always a second behind, a storm's, none would ever go). No second copy meanwhile: a
            # city's detector state is ~200 MB.
            if not await self.writer.settled(self._pending[2], wait_s):
                return
            taken, self._pending = self._pending, None
        else:
            self._pending = None
            fresh = await self._fresh_snapshot()
            if fresh is None:
                return
            if not await self.writer.settled(fresh[2], wait_s):
                self._pending = fresh  # its alerts are not on record yet: kept for a later interval
                return
            taken = fresh
        arrays, covered, _ = taken
        try:
            await asyncio.to_thread(self.write_snapshot, arrays)
        except OSError as exc:
            log.error("could not write the detector snapshot; readings stay unacknowledged",
                      extra={"error": str(exc)})
            return
        receiver.send_pubacks(self.unacked[:covered])
        del self.unacked[:covered]
        self.stats.ingest_unacked = sum(n for _, _, n in self.unacked)

    async def _housekeeping(self, stop: asyncio.Event, publisher: Publisher, receiver: Receiver) -> None:
        """On the gateway clock: staleness, SLA clocks, incident changes made elsewhere, snapshots."""
        detection, incidents = self.config.detection, self.config.incidents
        loop = asyncio.get_running_loop()
        tick = min(detection.offline_check_interval_s, incidents.sla_check_interval_s,
                   detection.snapshot_interval_s, 1.0)
        next_offline = loop.time() + detection.offline_check_interval_s
        next_sla = loop.time()
        next_snapshot = loop.time() + detection.snapshot_interval_s
        poke = self._poke
        assert poke is not None
        while not stop.is_set():
            try:
                await asyncio.wait_for(poke.wait(), tick)  # an operator acted: publish at once
            except TimeoutError:
                pass
            poke.clear()
            t, now = loop.time(), time.time()
            if t >= next_offline:
                next_offline = t + detection.offline_check_interval_s
                events = self.pipeline.check_offline(now)
                if events:
                    await self._offline_alerts(events, now, publisher)
            # A step the store fails is tried again at its next tick. Before, one failed SLA tick or
            # read of incident changes ended housekeeping for good: no snapshot, no acknowledgement
            # and no offline check after it, until the receive window filled and ingest stalled.
            if t >= next_sla:
                next_sla = t + incidents.sla_check_interval_s
                await self._tolerant("SLA tick", self.in_store(self.incidents.sla_tick, now))
            # ours, and the command line's, the API's… (while the incident writer is at work, its own
            # publication after each commit takes them all: housekeeping would only queue behind it;
            # not while the writer is failing, when only housekeeping publishes what operators do)
            if not self._changes_lock.locked() and not (self.writer.busy and not self.writer.failing):
                await self._tolerant("publishing incident changes", self._publish_incident_changes(publisher))
            if t >= next_snapshot:
                next_snapshot = t + detection.snapshot_interval_s
                await self._tolerant("snapshot", self._commit(receiver))

    def _no_more_snapshots(self, what: str, after_restart: str) -> None:
        """The detector state holds something not yet on record: no snapshot (nor acknowledgement) from
        this process any more, so that a restart goes back to the last good one."""
        if not self._state_unsafe:
            self._state_unsafe = True
            log.error("%s: no more snapshots or acknowledgements from this process; after a restart %s",
                      what, after_restart)

    async def _offline_alerts(self, events: list[Any], now: float, publisher: Publisher) -> None:
        """Stored however long the store is away, and published, as a batch's alerts are: the detectors
        already count these devices offline and will not raise it again. Meanwhile no snapshot is taken
        (housekeeping's is its next step; the stop's is refused), and if the gateway stops before they
        are out, none after: a snapshot holding the offline state would lose the alert for good."""
        done, self._offline_unsaid = False, True
        try:
            # Published at once, as a batch's alerts are (after its commit, a raised could come out
            # after the cleared of the device's next reading), committed behind the batches' alerts.
            upto = self.writer.put(events, now)
            await self._publish(Outcome(alerts=events), publisher, now)
            await self.writer.settled(upto, None)
            done = True
        finally:
            self._offline_unsaid = False
            if not done:
                self._no_more_snapshots("offline alerts were cut short before they were stored and published",
                                        "the devices are found silent again")
        if self.telemetry is not None:
            self.telemetry.alerts(events)

    async def _tolerant(self, what: str, step: Awaitable[Any]) -> None:
        """``step``, and if it fails, say so, count it and go on: it is tried again at its next tick."""
        try:
            await step
        except Exception as exc:
            self.stats.pipeline_errors += 1
            log.error("%s failed (%s); tried again at the next tick", what, exc or type(exc).__name__)

    async def _publish_incident_changes(self, publisher: Publisher) -> None:
        """Every audit line not yet published, as the incident's current state, retained on
        ``streetbrain/{site}/incidents/{id}`` so a screen that subscribes sees it at once (the incident
        writer's after each commit, housekeeping's every tick for changes made by the API or the command
        line: one at a time, each from where the last left off)."""
        async with self._changes_lock:
            await self._publish_changes_now(publisher)

    async def _publish_changes_now(self, publisher: Publisher) -> None:
        seq, changes = await self.in_store(self.incidents.changes_after, self.published_seq)
        if not changes:
            return
        if self.telemetry is not None:
            self.telemetry.incident_changes(changes)
        # a few hundred at a time, the ingest loop running in between: an SLA tick that warns a
        # storm's hundreds of incidents at once held the readings behind it for 100-200 ms
        for start in range(0, len(changes), PUBLISH_CHANGES_AT_ONCE):
            if start:
                await asyncio.sleep(0)
            latest: dict[str, dict[str, Any]] = {}
            for change in changes[start:start + PUBLISH_CHANGES_AT_ONCE]:
                body = change.to_dict()
                self._tell_listeners(body)
                latest[change.incident["id"]] = body
                log.info("incident %s", change.action, extra={
                    "incident": change.incident["id"], "actor": change.actor, "state": change.incident["state"],
                    "note": change.note})
            await publisher.publish_many([(topics.incident(body["site"], body["id"]), orjson.dumps(body))
                                          for body in latest.values()], retain=True)
        self.published_seq = seq

    # -- what the operators' API reads ------------------------------------------------------------------
    async def _start_api(self) -> asyncio.Task[None] | None:
        import uvicorn

        from gateway.api.app import ApiServer, create_app

        host, _, port = self.config.api.listen.rpartition(":")
        config = uvicorn.Config(create_app(self), host=host.strip("[]"), port=int(port), log_level="warning",
                                lifespan="off", access_log=False)
        self.api_server = ApiServer(config)
        task = asyncio.create_task(self.api_server.serve(), name="api")
        while not self.api_server.started and not task.done():
            await asyncio.sleep(0.02)
        if task.done():
            raise RuntimeError(f"the API could not listen on {self.config.api.listen} (in use?): set api.listen or "
                               "STREETBRAIN_API__LISTEN")
        sockets = [s for server in self.api_server.servers for s in server.sockets]
        self.api_port = sockets[0].getsockname()[1] if sockets else int(port)
        log.info("API and dashboard listening", extra={"url": f"http://{host}:{self.api_port}/",
                                                        "operators": len(self.config.api.tokens)})
        if not self.config.api.tokens:
            log.warning("no API tokens configured: every /api/ request will be refused; set STREETBRAIN_API__TOKENS "
                        "to '{\"<token>\": {\"operator\": \"<name>\", \"role\": \"dispatcher\"}}'")
        return task

    def poke_publisher(self) -> None:
        if self._poke is not None:
            self._poke.set()

    def _tell_listeners(self, item: dict[str, Any]) -> None:
        for listener in self.alert_listeners:
            if listener.qsize() < listener.maxsize - 1 or listener.maxsize == 0:
                listener.put_nowait(item)

    def _remember(self, outcome: Outcome) -> None:
        """The last readings of each device, for the dashboard's chart (:class:`RecentReadings`); of a
        batch message only its last ``depth``, straight from its columns: tuples for every batch took
        a tenth of the gateway's time at 100 readings a message."""
        recent = self.recent
        for kind, _, device_id, reading in outcome.accepted:
            recent.add(kind, device_id, reading.__dict__)  # the fields as validated (getattr on a model is slow)
        if outcome.accepted_columns:
            recent.add_batches(outcome.accepted_columns)

    def _reading_view(self, kind: str, ts: float, port: int, *values: Any) -> dict[str, Any]:
        fields = READING_MODELS[kind].FIELDS
        return {"ts": ts, **({"port": port} if port else {}),
                **{name: value for name, value in zip(fields, values) if value is not None}}

    def recent_readings(self, device_id: str, limit: int) -> list[dict[str, Any]]:
        kind = self.registry.devices[device_id].kind
        return [self._reading_view(kind, *entry) for entry in self.recent.last(kind, device_id, limit)]

    def device_views(self, kind: str | None = None, site: str | None = None) -> list[dict[str, Any]]:
        out = []
        for kind_name, engine in self.pipeline.engines.items():
            if kind is not None and kind_name != kind:
                continue
            series = self.registry.series[kind_name]
            active: dict[str, list[dict[str, Any]]] = {}
            for rule, state in zip(engine.rules, engine.state):
                for row in (state.announced > 0).nonzero()[0].tolist():
                    active.setdefault(series.device_ids[row], []).append(
                        {"rule": rule.rule_id, "severity": ("none", "info", "warning", "major", "critical")[
                            int(state.announced[row])], "port": series.ports[row] or None})
            offline = {series.device_ids[row] for row in engine.offline.nonzero()[0].tolist()}
            now = time.time()
            params: dict[str, dict[str, float]] = {}
            for name, table in engine.params.items():  # e.g. the zone's LAeq limit at this hour
                values = table.resolve(np.arange(len(series)), np.full(len(series), now))
                for row, value in enumerate(values.tolist()):
                    if value == value:
                        params.setdefault(series.device_ids[row], {})[name] = value
            for device in self.registry.devices.values():
                if device.kind != kind_name or (site is not None and device.site != site):
                    continue
                buffer = self.recent.last(kind_name, device.id, 1)
                last = self._reading_view(kind_name, *buffer[-1]) if buffer else None
                alerts = active.get(device.id, [])
                if device.id in offline:
                    alerts.append({"rule": "offline", "severity": self.config.kinds[kind_name].offline.severity
                                   if kind_name in self.config.kinds else "warning", "port": None})
                out.append({**device.model_dump(exclude_none=True), "online": device.id not in offline,
                            "last_reading": last, "active_alerts": alerts, "params": params.get(device.id, {})})
        return out

    async def _log_stats(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(self.config.logging.stats_interval_s)
            self._log_counters("counters")

    def _log_counters(self, message: str) -> None:
        for kind, row in sorted(self.stats.snapshot().items()):
            log.info(message, extra={"kind": kind, **row})
        if self.twins is not None and any(self.twins.counts.values()):
            log.info(message, extra={"smoke_hint_lane": "", **self.twins.counts, **self.twins.state()})
