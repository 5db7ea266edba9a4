"""Nothing lost when the gateway is killed or the broker restarts, against a real Mosquitto."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from gateway import topics
from gateway.broker import EmbeddedBroker, free_port
from gateway.incidents.store import Database
from tests.conftest import ROOT, MqttClient


def street_file(tmp_path: Path, broker_url: str) -> Path:
    data = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    data.update(state_dir=str(tmp_path / "state"), registry_file=str(ROOT / "registry" / "default-street.csv"))
    data["broker"].update(url=broker_url, client_id=f"gw-rel-{time.time_ns() % 10**6}")
    data["incidents"]["url"] = f"sqlite:///{tmp_path / 'incidents.db'}"
    data["api"]["listen"] = "127.0.0.1:0"
    data["detection"]["snapshot_interval_s"] = 1
    path = tmp_path / "street.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def start_gateway(config: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--config", str(config)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "STREETBRAIN_LOGGING__LEVEL": "info"})
    assert process.stdout is not None
    for line in process.stdout:
        if "gateway ready" in line:
            threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()  # keep draining
            return process
    raise AssertionError("the gateway did not start")


def test_gateway_killed_mid_stream_loses_no_reading_alert_or_incident_and_duplicates_none(broker, mqtt, tmp_path):
    config = street_file(tmp_path, broker.url)
    screen = mqtt([topics.ALERTS_FILTER])
    device = mqtt()
    gateway = start_gateway(config)
    meters = [f"mtr-wangma-{n:03d}" for n in range(1, 101)]
    t0 = time.time() - 600
    sent = 0
    for round_ in range(10):
        for n, meter in enumerate(meters):
            # every meter overheats once, in its own round: 100 alerts expected in all
            hot = round_ == n % 10
            device.publish(topics.telemetry("wangma", "meter", meter),
                           {"ts": t0 + round_ * 10, "seq": round_, "temp_c": 80.0 if hot else 30.0}, qos=1)
            sent += 1
        if round_ == 4:
            gateway.send_signal(signal.SIGKILL)  # mid-stream, no goodbye
            gateway.wait()
    gateway = start_gateway(config)  # the rest was queued by the broker for our session
    deadline = time.monotonic() + 20
    raised: set[str] = set()
    while time.monotonic() < deadline and len(raised) < 100:
        for _, alert, _ in screen.collect(0.5):
            if alert["rule"] == "meter_overheat" and alert["event"] == "raised":
                raised.add(alert["device_id"])
    gateway.send_signal(signal.SIGTERM)
    gateway.wait(20)
    assert raised == set(meters)  # every alert, whether it came before, during or after the kill
    db = Database(f"sqlite:///{tmp_path / 'incidents.db'}")
    # each meter's alert is on record exactly once (alone, or in a storm's incident): none lost, none twice
    rows = db.fetchall("SELECT o.device_id, COUNT(*) AS n FROM occurrences o JOIN incidents i ON i.id = o.incident_id "
                       "WHERE i.rule = 'meter_overheat' AND o.event = 'raised' GROUP BY o.device_id")
    open_keys = db.fetchall("SELECT dedup_key, COUNT(*) AS n FROM incidents WHERE is_open = 1 GROUP BY dedup_key "
                            "HAVING COUNT(*) > 1")
    db.close()
    assert len(rows) == 100 and {r["n"] for r in rows} == {1}
    assert open_keys == []


def test_broker_restart_with_persistence_the_gateway_reconnects_and_misses_nothing_it_kept(mqtt, tmp_path):
    port = free_port()
    broker = EmbeddedBroker(tmp_path / "broker", port=port, persistence=True).start()
    try:
        config = street_file(tmp_path, broker.url)
        gateway = start_gateway(config)
        screen = MqttClient(broker, [topics.ALERTS_FILTER])
        screen.publish(topics.telemetry("fengqi", "smoke", "smk-fengqi-041"), {"ts": time.time(), "alarm": True})
        screen.wait_for(lambda t, a: a["device_id"] == "smk-fengqi-041", timeout_s=5)
        screen.close()
        broker.stop()  # a clean restart: Mosquitto saves its sessions and queued messages
        broker.start()
        time.sleep(0.5)
        device = MqttClient(broker)
        watcher = MqttClient(broker, [topics.ALERTS_FILTER])
        device.publish(topics.telemetry("fengqi", "smoke", "smk-fengqi-042"), {"ts": time.time(), "alarm": True})
        _, alert, _ = watcher.wait_for(lambda t, a: a["device_id"] == "smk-fengqi-042", timeout_s=40)
        assert alert["severity"] == "critical"
        device.close()
        watcher.close()
        gateway.send_signal(signal.SIGTERM)
        assert gateway.wait(20) == 0
    finally:
        broker.stop()


def test_a_flooding_device_is_throttled_flagged_and_does_not_hold_up_a_fire_elsewhere(config, run_gateway, mqtt):
    config.ingest.device_rate_per_s = 10
    config.ingest.device_burst = 50
    gateway = run_gateway(config).gateway
    screen = mqtt([topics.ALERTS_FILTER, topics.DEADLETTER_FILTER])
    flooder, neighbour = mqtt(), mqtt()
    flood_topic = topics.telemetry("wangma", "meter", "mtr-wangma-066")
    now = time.time()
    for i in range(2000):  # as fast as the client can: far over 10 messages a second
        flooder.client.publish(flood_topic, b'{"ts": %f, "temp_c": 30}' % (now + i * 0.001), qos=0)
        if i == 1000:
            sent = time.time()
            neighbour.publish(topics.telemetry("wangma", "smoke", "smk-wangma-066"), {"ts": sent, "alarm": True})
    messages = screen.collect(3.0)
    [received] = [at for t, a, at in messages if "/alerts/" in t and a["device_id"] == "smk-wangma-066"]
    assert received - sent < 1.0  # the neighbour's fire is not held up by the flood
    flood_alerts = [a for t, a, _ in messages if "/alerts/" in t and a["rule"] == "flooding"]
    assert [(a["device_id"], a["event"], a["severity"]) for a in flood_alerts] == [("mtr-wangma-066", "raised", "warning")]
    letters = [a for t, a, _ in messages if "/deadletter/" in t and a["reason"] == "rate_limited"]
    assert len(letters) == 1  # one dead letter for the flood, not one per message
    dropped = gateway.stats.rejected[("meter", "rate_limited")]
    accepted = gateway.stats.valid["meter"]
    assert accepted + dropped == 2000 and 50 <= accepted < 200


def test_a_backlog_the_broker_held_while_the_gateway_was_away_is_no_flood(config, run_gateway, mqtt):
    """What the broker queued for the gateway while it was down comes all at once at the restart, but
    it was sent at the devices' own pace: the flood limit counts the time away. Before, the burst cut
    a charging point's backlog short (ten ports fill a burst of 100 in under a minute away), the rest
    was dropped and the device flagged as flooding. A device that did flood meanwhile still is."""
    config.ingest.device_rate_per_s = 4
    config.ingest.device_burst = 5
    device = mqtt()
    charger = topics.telemetry("wangma", "ev_charger", "evc-wangma-01")
    flooder = topics.telemetry("wangma", "meter", "mtr-wangma-066")
    first = run_gateway(config)
    device.publish(charger, {"ts": time.time(), "port": 1, "power_w": 100.0})
    deadline = time.monotonic() + 10
    while first.gateway.stats.valid["ev_charger"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    first.stop()  # its last snapshot: when it last heard from a device
    away = time.time()
    for i in range(24):  # the charger's ports over 6 s away, 4 a second: within its rate
        device.publish(charger, {"ts": away + i / 4, "port": 1 + i % 10, "power_w": 100.0 + i})
        time.sleep(0.25)
    for i in range(200):  # a meter box flooding meanwhile: 200 in a moment, far over 4 a second
        device.client.publish(flooder, b'{"ts": %f, "temp_c": 30}' % (time.time() + i * 0.001), qos=1)
    screen = mqtt([topics.ALERTS_FILTER])
    second = run_gateway(config).gateway
    deadline = time.monotonic() + 15
    while (second.stats.valid["ev_charger"] < 24 or second.stats.valid["meter"]
           + second.stats.rejected[("meter", "rate_limited")] < 200) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert second.stats.valid["ev_charger"] == 24, dict(second.stats.rejected)  # the whole backlog, none dropped
    assert second.stats.rejected[("ev_charger", "rate_limited")] == 0
    floods = [(a["device_id"], a["event"]) for t, a, _ in screen.collect(1.0) if a["rule"] == "flooding"]
    assert floods == [("mtr-wangma-066", "raised")]
    assert 5 + 4 * 6 <= second.stats.valid["meter"] < 100  # what it earned while away, not its 200


def test_what_devices_kept_through_a_broker_outage_is_no_flood_when_they_send_it_at_once(config, run_gateway,
                                                                                       tmp_path):
    """A charging point that could not reach the broker for a few seconds sends what it kept as soon as
    it can: the gateway, back on the broker too, grants every device the time the connection was down."""
    config.ingest.device_rate_per_s = 4
    config.ingest.device_burst = 5
    broker = EmbeddedBroker(tmp_path / "broker", port=free_port(), persistence=True).start()
    try:
        config.broker.url = broker.url
        gateway = run_gateway(config).gateway
        assert gateway.receiver is not None
        broker.stop()
        down = time.time()
        time.sleep(5)
        broker.start()
        deadline = time.monotonic() + 20
        while not gateway.receiver.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        device = MqttClient(broker)
        charger = topics.telemetry("wangma", "ev_charger", "evc-wangma-01")
        for i in range(24):  # its ports' readings of the 6 s it could not send, all at once
            device.client.publish(charger, b'{"ts": %f, "port": %d, "power_w": 100}' % (down + i / 4, 1 + i % 10), qos=1)
        while gateway.stats.valid["ev_charger"] + gateway.stats.rejected[("ev_charger", "rate_limited")] < 24 \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        device.close()
        assert gateway.stats.valid["ev_charger"] == 24, dict(gateway.stats.rejected)
    finally:
        broker.stop()


def test_the_acknowledgements_handed_over_just_before_a_stop_are_written_before_the_disconnect(config, mqtt):
    """The stop's last snapshot acknowledges the readings since the one before, and the receiver is
    stopped right after. Its I/O thread could see the stop before it wrote those PUBACKs and leave
    without them, and when it did write them, it closed the socket at once with the broker's messages
    unread: a reset, which threw away the PUBACKs the broker had not read yet (18 of 20 here). Either
    way the broker delivered up to a second of readings again to the next start, each a duplicate (a
    demo started after another reported "rejected 211"). They are now written before the DISCONNECT,
    and the broker is heard out until it closes (on the code before, round 0 failed: 20 again)."""
    import asyncio

    from gateway.config import parse_broker_url
    from gateway.mqtt import Receiver

    loop = asyncio.new_event_loop()  # not run: the receiver's signals to it are not needed here
    address = parse_broker_url(config.broker.url)
    device = mqtt()

    def session() -> Receiver:
        receiver = Receiver(config.broker, address, [topics.TELEMETRY_FILTER], loop, asyncio.Event())
        receiver.start()
        assert receiver.connected.wait(5)
        return receiver

    def arrived(receiver: Receiver, count: int, within_s: float) -> int:
        deadline = time.monotonic() + within_s
        while len(receiver) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return len(receiver)

    receiver = session()
    time.sleep(0.3)  # subscribed
    try:
        for round_ in range(12):
            for i in range(20):
                device.client.publish(topics.telemetry("wangma", "meter", f"mtr-wangma-{1 + i:03d}"),
                                      b'{"ts": %.3f, "temp_c": 30}' % time.time(), qos=1)
            assert arrived(receiver, 20, 5) == 20, f"round {round_}: delivered {len(receiver)}"
            batch = receiver.drain(100)
            receiver.send_pubacks(receiver.pubacks(batch))  # the last snapshot's acknowledgements…
            receiver.stop()  # …and the stop, at once
            receiver = session()
            again = arrived(receiver, 1, 0.3)
            assert again == 0, f"round {round_}: {again} acknowledged messages delivered again"
    finally:
        receiver.stop()
        loop.close()


def test_smoke_messages_are_taken_before_bulk_telemetry_that_arrived_earlier():
    import asyncio

    from gateway.config import BrokerConfig, parse_broker_url
    from gateway.mqtt import Receiver

    class Message:
        def __init__(self, topic: str, mid: int):
            self.topic, self.payload, self.mid, self.qos = topic, b"{}", mid, 1

    loop = asyncio.new_event_loop()
    receiver = Receiver(BrokerConfig(), parse_broker_url("mqtt://127.0.0.1:1"), [], loop, asyncio.Event())
    for mid in range(1, 6001):  # an overloaded gateway: 6,000 meter readings waiting…
        receiver._on_message(None, None, Message(topics.telemetry("wangma", "meter", f"mtr-wangma-{mid % 700:03d}"), mid))
    receiver._on_message(None, None, Message(topics.telemetry("wangma", "smoke", "smk-wangma-001"), 9999))  # …a fire
    first = receiver.drain(5000)
    assert first[0].topic.endswith("/smoke/smk-wangma-001/telemetry")
    assert len(first) == 5000 and len(receiver) == 1001
    loop.close()


def test_under_overload_the_queue_stays_bounded_lag_shows_and_a_fire_overtakes_the_bulk(config, run_gateway, mqtt):
    config.ingest.device_rate_per_s = 0  # this test's meters are allowed to shout
    config.ingest.batch_max = 500
    config.broker.receive_maximum = 40000
    run_gateway(config).stop()  # its session stays: the broker queues what comes next
    device = mqtt()
    bulk = 30000
    t0 = time.time() - 120
    for i in range(bulk):  # a backlog far beyond one wake-up's work…
        device.client.publish(topics.telemetry("wangma", "meter", f"mtr-wangma-{1 + i % 250:03d}"),
                              b'{"ts": %.3f, "temp_c": 30}' % (t0 + i * 0.001), qos=1)
    fire = device.client.publish(topics.telemetry("wangma", "smoke", "smk-wangma-077"),
                                 b'{"ts": %.3f, "alarm": true}' % time.time(), qos=1)  # …then a fire
    fire.wait_for_publish(60)  # all of it queued for the stopped gateway (5 s was not always enough)
    assert fire.is_published()
    screen = mqtt([topics.ALERTS_FILTER])
    gateway = run_gateway(config).gateway
    _, alert, _ = screen.wait_for(lambda t, a: a["device_id"] == "smk-wangma-077", timeout_s=30)
    processed_when_fire_came = gateway.stats.valid["meter"]
    deepest = gateway.stats.ingest_queue_depth
    deadline = time.monotonic() + 60
    while gateway.stats.valid["meter"] < bulk and time.monotonic() < deadline:
        deepest = max(deepest, gateway.stats.ingest_queue_depth)
        time.sleep(0.02)
    assert processed_when_fire_came < bulk / 2  # the fire was taken before the bulk that came first
    assert gateway.stats.valid["meter"] == bulk, dict(gateway.stats.rejected)  # all processed: nothing dropped
    assert 0 < deepest <= config.broker.receive_maximum  # the broker's receive window bounds the queue
    assert gateway.stats.ingest_lag_s > 1  # the device times were old: the lag is visible


def test_the_gateway_keeps_its_receive_window_when_the_broker_does_not(config, run_gateway, mqtt):
    """Mosquitto 2.0.11 keeps to the client's receive maximum only until acknowledgements come: each
    PUBACK of a batch lets it send up to a window more (here 2,358 of 8,000 were in the gateway at once
    with a window of 500). The receiver stops reading while the window is full."""
    config.ingest.device_rate_per_s = 0
    config.broker.receive_maximum = 500
    config.detection.snapshot_interval_s = 0.2  # acknowledgements every 0.2 s
    gateway = run_gateway(config).gateway
    device = mqtt()
    backlog = 8000
    t0 = time.time() - 120
    for i in range(backlog):
        device.client.publish(topics.telemetry("wangma", "meter", f"mtr-wangma-{1 + i % 250:03d}"),
                              b'{"ts": %.3f, "temp_c": 30}' % (t0 + i * 0.001), qos=1)
    peak, deadline = 0, time.monotonic() + 60
    while gateway.stats.valid["meter"] < backlog and time.monotonic() < deadline:
        peak = max(peak, gateway.receiver.outstanding())
        time.sleep(0.005)
    assert gateway.stats.valid["meter"] == backlog, dict(gateway.stats.rejected)
    assert 0 < peak <= 500 + 4096 // 40  # at most one 4 KB read past the window
    assert gateway.receiver.holds > 0


def test_no_snapshot_holds_a_batch_whose_alerts_are_not_published_yet(config, run_gateway, mqtt, monkeypatch):
    """A snapshot taken while a batch's alerts were still on their way out held what the batch did,
    with its readings unacknowledged: after a crash they came back as duplicates of readings already
    seen, and the alert was never published. Snapshots now wait for the end of the batch in hand."""
    from gateway.service import Gateway

    publishing = threading.Event()
    publish, write = Gateway._publish, Gateway.write_snapshot
    taken_while_publishing: list[bool] = []

    async def slow_publish(self, outcome, publisher, now):  # a broker slow to acknowledge
        if not outcome.alerts:
            return await publish(self, outcome, publisher, now)
        publishing.set()
        try:
            await asyncio.sleep(0.5)
            return await publish(self, outcome, publisher, now)
        finally:
            publishing.clear()

    def recording_write(self, arrays=None):
        taken_while_publishing.append(publishing.is_set())
        return write(self, arrays)

    monkeypatch.setattr(Gateway, "_publish", slow_publish)
    monkeypatch.setattr(Gateway, "write_snapshot", recording_write)
    config.detection.snapshot_interval_s = 0.05
    run_gateway(config)
    alerts = mqtt([topics.ALERTS_FILTER])
    device = mqtt()
    device.publish(topics.telemetry("wangma", "meter", "mtr-wangma-002"), {"ts": time.time(), "seq": 1, "temp_c": 75.0})
    alerts.wait_for(lambda topic, body: body.get("device_id") == "mtr-wangma-002" and body.get("event") == "raised",
                    timeout_s=10)
    time.sleep(0.3)
    assert len(taken_while_publishing) >= 3  # snapshots went on before and after the batch
    assert not any(taken_while_publishing)


def test_a_stop_during_a_batch_writes_one_snapshot_at_a_time(config, run_gateway, mqtt, monkeypatch):
    """Housekeeping's snapshot, released at the end of the batch in hand, and the shutdown's last one
    wrote the same file at once ("could not write the detector snapshot", or a torn file)."""
    from gateway.service import Gateway

    publish, write = Gateway._publish, Gateway.write_snapshot
    inside, overlaps, errors = [0], [], []
    lock = threading.Lock()
    publishing = threading.Event()

    async def slow_publish(self, outcome, publisher, now):
        if outcome.alerts:
            publishing.set()
            await asyncio.sleep(0.6)
        return await publish(self, outcome, publisher, now)

    def recording_write(self, arrays=None):
        with lock:
            inside[0] += 1
            overlaps.append(inside[0] > 1)
        try:
            time.sleep(0.05)  # the fsync of a city's snapshot takes longer than this
            return write(self, arrays)
        except OSError as exc:
            errors.append(repr(exc))
            raise
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(Gateway, "_publish", slow_publish)
    monkeypatch.setattr(Gateway, "write_snapshot", recording_write)
    config.detection.snapshot_interval_s = 0.05
    gateway = run_gateway(config)
    device = mqtt()
    device.publish(topics.telemetry("wangma", "meter", "mtr-wangma-002"), {"ts": time.time(), "seq": 1, "temp_c": 75.0})
    assert publishing.wait(5)
    time.sleep(0.2)  # housekeeping's snapshot now waits for the end of the batch
    gateway.stop()  # while the batch's alert awaits its PUBACK
    assert len(overlaps) >= 2 and not any(overlaps) and not errors


def test_a_batch_cut_short_at_shutdown_leaves_no_snapshot_that_holds_it(config, run_gateway, mqtt, monkeypatch):
    """A stop that cannot finish the batch in hand (its alert never acknowledged) must not write a last
    snapshot holding that batch: its readings would come back as duplicates and the alert never go out."""
    from gateway import service
    from gateway.service import Gateway

    publish, write = Gateway._publish, Gateway.write_snapshot
    publishing, writes = threading.Event(), []

    async def stuck_publish(self, outcome, publisher, now):
        if outcome.alerts:
            publishing.set()
            await asyncio.sleep(3600)  # a broker that never acknowledges
        return await publish(self, outcome, publisher, now)

    def recording_write(self, arrays=None):
        writes.append(publishing.is_set())
        return write(self, arrays)

    monkeypatch.setattr(service, "SHUTDOWN_FLUSH_S", 0.5)
    monkeypatch.setattr(Gateway, "_publish", stuck_publish)
    monkeypatch.setattr(Gateway, "write_snapshot", recording_write)
    config.detection.snapshot_interval_s = 0.05
    gateway = run_gateway(config)
    device = mqtt()
    time.sleep(0.3)  # a few snapshots first
    device.publish(topics.telemetry("wangma", "meter", "mtr-wangma-002"), {"ts": time.time(), "seq": 1, "temp_c": 75.0})
    assert publishing.wait(5)
    time.sleep(0.3)
    gateway.stop()
    assert writes and not any(writes)  # snapshots before the batch, none after it began


def test_an_incident_store_that_fails_a_write_holds_the_batch_until_it_is_stored(config, run_gateway, mqtt, monkeypatch):
    """A failed incident write used to fail the batch: its readings were in the detectors, so the alert
    was never stored nor published, and every later snapshot held them. The batch now waits for the store.
    The alert itself does not wait: it goes out while the store is still failing."""
    from gateway.incidents.queue import IncidentQueue

    absorb, failures, stored = IncidentQueue.absorb_batches, [], []

    def flaky_absorb(self, *args, **kwargs):
        if len(failures) < 2:
            failures.append(time.monotonic())
            raise OSError("disk I/O error")  # as sqlite3 or psycopg would say it
        out = absorb(self, *args, **kwargs)
        stored.append(time.monotonic())
        return out

    monkeypatch.setattr(IncidentQueue, "absorb_batches", flaky_absorb)
    gateway = run_gateway(config)
    alerts = mqtt([topics.ALERTS_FILTER])
    device = mqtt()
    device.publish(topics.telemetry("wangma", "meter", "mtr-wangma-002"), {"ts": time.time(), "seq": 1, "temp_c": 75.0})
    alerts.wait_for(lambda topic, body: body.get("device_id") == "mtr-wangma-002" and body.get("event") == "raised",
                    timeout_s=10)
    seen = time.monotonic()
    deadline = time.monotonic() + 10
    while not stored and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(failures) == 2 and stored and not gateway.gateway._state_unsafe
    assert seen < stored[0], "the alert was published while its incident waited for the store"
    time.sleep(0.2)
    db = Database(config.incidents.url)
    row = db.fetchone("SELECT count(*) AS n FROM incidents WHERE device_id = ?", ("mtr-wangma-002",))
    db.close()
    assert row is not None and row["n"] == 1


def test_a_locked_incident_store_holds_up_no_alert_and_no_reading_is_acknowledged_before_its_commit(config, run_gateway,
                                                                                                  mqtt):
    """The ingest loop waited for each batch's incident commit before the next batch: while another
    writer held the store (a report, a second gateway, a slow disk), every later alert waited with it.
    The incidents are now committed off the ingest loop. The readings are still acknowledged only once
    their incidents are on record, and the store's queue shows on /metrics meanwhile."""
    import sqlite3

    config.detection.snapshot_interval_s = 0.2
    gateway = run_gateway(config)
    alerts = mqtt([topics.ALERTS_FILTER])
    device = mqtt()
    holder = sqlite3.connect(config.incidents.url.removeprefix("sqlite:///"), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another writer holds the store (the gateway waits up to 30 s)
    locked = time.time()
    try:
        raised: dict[str, float] = {}
        for n, device_id in enumerate(("mtr-wangma-002", "mtr-wangma-003", "mtr-wangma-005")):
            sent = time.time()
            device.publish(topics.telemetry("wangma", "meter", device_id), {"ts": sent, "seq": 1, "temp_c": 75.0})
            alerts.wait_for(lambda topic, body: body.get("device_id") == device_id and body.get("event") == "raised",
                            timeout_s=10)
            raised[device_id] = time.time() - sent
            time.sleep(0.3)
        time.sleep(0.5)  # several snapshot intervals
        depth = gateway.gateway.stats.incident_writer.depth
        unacked = sum(n for _, _, n in gateway.gateway.unacked)
        assert time.time() - locked < 5, "the test itself was too slow to show anything"
    finally:
        holder.execute("COMMIT")
        holder.close()
    assert max(raised.values()) < 1.0, f"alerts waited for the locked store: {raised}"
    assert depth >= 2 and unacked >= 3, "readings were acknowledged before their incidents were committed"
    deadline = time.monotonic() + 10
    while (gateway.gateway.unacked or gateway.gateway.writer.depth) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not gateway.gateway.unacked and gateway.gateway.writer.depth == 0, "acknowledged after the commit"
    db = Database(config.incidents.url)
    rows = db.fetchall("SELECT device_id FROM incidents WHERE rule = 'meter_overheat'")
    db.close()
    assert sorted(r["device_id"] for r in rows) == ["mtr-wangma-002", "mtr-wangma-003", "mtr-wangma-005"]


def test_a_store_always_behind_still_lets_snapshots_and_acknowledgements_through(config, run_gateway, mqtt,
                                                                                 monkeypatch):
    """A snapshot waits for the commit of its alerts; one that had not seen it within a second was
    dropped, and the next interval's fresh one waited for newer alerts still: with the incident writer
    always more than a second behind (a storm on a slow store), no snapshot went through and nothing
    was acknowledged until the storm ended (found by a review). A snapshot that waited too long is now
    kept, and written once its alerts are committed."""
    from gateway.incidents.queue import IncidentQueue
    from gateway.service import Gateway

    absorb, write, written = IncidentQueue.absorb_batches, Gateway.write_snapshot, []

    def slow_absorb(self, batches):
        time.sleep(1.2)  # every commit: the writer is always more than a second behind
        return absorb(self, batches)

    def recording_write(self, arrays=None):
        written.append(time.monotonic())
        return write(self, arrays)

    monkeypatch.setattr(IncidentQueue, "absorb_batches", slow_absorb)
    monkeypatch.setattr(Gateway, "write_snapshot", recording_write)
    config.detection.snapshot_interval_s = 0.2
    gateway = run_gateway(config)
    device = mqtt()
    start = time.monotonic()
    for n in range(1, 31):  # a new alert every 0.3 s for 9 s
        device.publish(topics.telemetry("wangma", "meter", f"mtr-wangma-{n:03d}"),
                       {"ts": time.time(), "seq": 1, "temp_c": 75.0})
        time.sleep(0.3)
    end = time.monotonic()
    assert gateway.gateway.writer.depth > 0, "the writer was not behind: the test shows nothing"
    during = [round(t - start, 1) for t in written if start + 3 < t < end]
    assert len(during) >= 2, f"snapshots during the storm: {during}"


def test_a_store_failing_housekeeping_once_stops_neither_snapshots_nor_acknowledgements(config, run_gateway, mqtt,
                                                                                           monkeypatch):
    """One failed SLA tick, or one failed read of incident changes right after a batch's write, ended
    housekeeping (no snapshot, no acknowledgement, no offline check after it, the receive window
    filling) or failed the batch and with it every later snapshot. Each is now tried again later."""
    from gateway.incidents.queue import IncidentQueue
    from gateway.service import Gateway

    sla_tick, changes_after, write = IncidentQueue.sla_tick, IncidentQueue.changes_after, Gateway.write_snapshot
    failed: list[str] = []
    written: list[float] = []

    def flaky_sla_tick(self, *args, **kwargs):
        if "sla" not in failed:
            failed.append("sla")
            raise OSError("disk I/O error")
        return sla_tick(self, *args, **kwargs)

    def flaky_changes_after(self, *args, **kwargs):
        if "changes" not in failed and self.db.fetchone("SELECT count(*) AS n FROM incidents")["n"]:
            failed.append("changes")  # the read right after the batch's own write
            raise OSError("disk I/O error")
        return changes_after(self, *args, **kwargs)

    def recording_write(self, arrays=None):
        written.append(time.monotonic())
        return write(self, arrays)

    monkeypatch.setattr(IncidentQueue, "sla_tick", flaky_sla_tick)
    monkeypatch.setattr(IncidentQueue, "changes_after", flaky_changes_after)
    monkeypatch.setattr(Gateway, "write_snapshot", recording_write)
    config.detection.snapshot_interval_s = 0.1
    gateway = run_gateway(config)
    alerts, incidents = mqtt([topics.ALERTS_FILTER]), mqtt([f"{topics.ROOT}/+/incidents/#"])
    device = mqtt()
    device.publish(topics.telemetry("wangma", "meter", "mtr-wangma-002"), {"ts": time.time(), "seq": 1, "temp_c": 75.0})
    alerts.wait_for(lambda topic, body: body.get("device_id") == "mtr-wangma-002" and body.get("event") == "raised",
                    timeout_s=10)
    incidents.wait_for(lambda topic, body: body.get("device_id") == "mtr-wangma-002"
                       and body["change"]["action"] == "opened", timeout_s=10)  # by housekeeping's next tick
    deadline = time.monotonic() + 10
    while (gateway.gateway.unacked or len(written) < 3) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(failed) == ["changes", "sla"]
    assert not gateway.gateway._state_unsafe and not gateway.gateway.unacked, "snapshots and acks went on"


def test_an_offline_alert_the_store_has_not_taken_at_a_stop_is_raised_after_the_restart(config, run_gateway, mqtt,
                                                                                          monkeypatch):
    """The detectors count a silent device offline before its alert is stored: a snapshot written
    after that (the stop's last one) while the store was away lost the alert for good (found by a
    review). Such a stop now writes no snapshot, and the restart finds the device silent again."""
    from gateway.incidents.queue import IncidentQueue

    config.kinds["noise"].offline_after_s = 2.0
    config.detection.offline_check_interval_s = 0.5
    config.detection.snapshot_interval_s = 0.5
    absorb, tries = IncidentQueue.absorb_batches, []

    def store_away_for_offline(self, batches):
        offline = [a.device_id for alerts, _ in batches for a in alerts if a.rule == "offline"]
        if offline:
            tries.extend(offline)
            raise OSError("disk I/O error")
        return absorb(self, batches)

    monkeypatch.setattr(IncidentQueue, "absorb_batches", store_away_for_offline)
    screen = mqtt([topics.ALERTS_FILTER])
    gateway = run_gateway(config)
    mqtt().publish(topics.telemetry("dongxin", "noise", "noise-03"), {"ts": time.time(), "laeq_db": 48.0})
    deadline = time.monotonic() + 10
    while not tries and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tries, "the offline check never tried to store its alert"
    device = tries[0]  # noise-03, or one never heard from: whichever the first offline check found
    gateway.stop()  # the store still away: the alert waits in the incident writer's retries

    def offline_raised(topic: str, body: dict) -> bool:
        return body.get("rule") == "offline" and body.get("event") == "raised" and body.get("device_id") == device

    assert screen.wait_for(offline_raised, timeout_s=5), "published at once, as a batch's alerts are"
    monkeypatch.setattr(IncidentQueue, "absorb_batches", absorb)  # the store is back
    run_gateway(config)
    assert screen.wait_for(offline_raised, timeout_s=10), "raised again after the restart"
    deadline, count = time.monotonic() + 10, 0
    while not count and time.monotonic() < deadline:
        db = Database(config.incidents.url)
        count = db.fetchone("SELECT count(*) AS n FROM incidents WHERE rule = 'offline' AND members LIKE ?",
                            (f'%"{device}"%',))["n"]  # alone, or in a storm's group incident
        db.close()
        time.sleep(0.1)
    assert count >= 1, "the restart's offline alert was stored"
