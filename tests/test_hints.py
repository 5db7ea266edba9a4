"""The smoke hint lane (gateway/hints.py): a fire overtakes the broker's queue, each message is
processed once, and a will never overtakes the reading that came after it."""

from __future__ import annotations

import time

from gateway import topics
from gateway.hints import Twins
from gateway.mqtt import Inbound

FIRE = topics.telemetry("wangma", "smoke", "smk-wangma-001")
WILL = topics.status("wangma", "smoke", "smk-wangma-001")
METER = topics.telemetry("wangma", "meter", "mtr-wangma-001")


def bulk(topic: str, payload: bytes = b'{"ts": 1, "alarm": true}', mid: int = 1) -> Inbound:
    return Inbound(topic, payload, mid, 1, 1)


def hint(topic: str, payload: bytes = b'{"ts": 1, "alarm": true}') -> Inbound:
    return Inbound(topic, payload, 0, 0, 1, hint=True)


def test_whichever_copy_comes_first_is_processed_and_its_twin_skipped():
    twins = Twins()
    first, twin = hint(FIRE), bulk(FIRE)
    assert twins.sift([first], 0, True) == [first]
    assert twins.state() == {"waiting": 1, "hints_ahead": 1}
    meter = bulk(METER)
    assert twins.sift([twin, meter], 1, True) == [meter]  # acknowledged with its batch all the same
    assert twins.state() == {"waiting": 0, "hints_ahead": 0}
    # the other way round: the bulk copy first (the lane is connected, so its hint may come)
    late = bulk(FIRE, b'{"ts": 2, "alarm": true}')
    assert twins.sift([late], 2, True) == [late]
    assert twins.sift([hint(FIRE, b'{"ts": 2, "alarm": true}')], 3, True) == []
    # both in one batch, in either order
    a, b = hint(FIRE, b'{"ts": 3}'), bulk(FIRE, b'{"ts": 3}')
    assert twins.sift([a, b], 4, True) == [a]
    c, d = bulk(FIRE, b'{"ts": 4}'), hint(FIRE, b'{"ts": 4}')
    assert twins.sift([c, d], 5, True) == [c]
    assert dict(twins.counts) == {"hint_first": 2, "bulk_first": 2, "hint_twin": 2, "bulk_twin": 2,
                                  "status_yielded": 0, "forgotten": 0}
    assert twins.state() == {"waiting": 0, "hints_ahead": 0}


def test_bulk_messages_pass_untouched_and_a_twin_needs_the_same_topic_and_payload():
    twins = Twins()
    meters = [bulk(METER, mid=i) for i in range(3)]
    assert twins.sift(meters, 0, True) is meters  # no smoke detector's message: not looked at
    twins.sift([hint(FIRE, b'{"ts": 5, "alarm": true}')], 0, True)
    other = bulk(FIRE, b'{"ts": 5, "alarm": false}')  # the same device, another reading
    elsewhere = bulk(topics.telemetry("wangma", "smoke", "smk-wangma-002"), b'{"ts": 5, "alarm": true}')
    a_site_called_smoke = bulk(topics.telemetry("smoke", "meter", "mtr-1"), b'{"ts": 5, "alarm": true}')
    batch = [other, elsewhere, a_site_called_smoke]
    assert twins.sift(batch, 1, True) == batch
    # a device that really sent the same bytes twice: both bulk copies go on (detection calls the
    # second a duplicate), the hint pairs with one of them
    twins = Twins()
    one, two = bulk(FIRE, mid=1), bulk(FIRE, mid=2)
    assert twins.sift([hint(FIRE), one, two], 0, True)[1:] == [two]
    assert twins.sift([one, two], 1, True) == [one, two]


def test_without_the_lane_bulk_copies_are_not_kept_waiting_for_a_hint():
    twins = Twins()
    copies = [bulk(FIRE, b'{"ts": %d}' % i) for i in range(100)]
    assert twins.sift(copies, 0, lane_live=False) == copies
    assert twins.state()["waiting"] == 0
    assert twins.sift(copies[:1], 1, lane_live=True) == copies[:1] and twins.state()["waiting"] == 1


def test_a_will_delivered_after_a_reading_the_lane_brought_first_yields_to_it():
    twins = Twins()
    reading = b'{"ts": 10, "alarm": false}'
    # published: will ("offline"), then the detector is back and reports. The lane has the reading
    # first; the bulk session then delivers the will and the reading, in that order.
    assert len(twins.sift([hint(FIRE, reading)], 0, True)) == 1
    will = bulk(WILL, b"offline")
    assert twins.sift([will, bulk(FIRE, reading)], 1, True) == []
    assert twins.counts["status_yielded"] == 1
    # once the reading's bulk copy has come, a later will is news again
    again = bulk(WILL, b"offline", mid=3)
    assert twins.sift([again], 2, True) == [again]
    # another detector's will does not yield to this one's reading
    twins.sift([hint(FIRE, b'{"ts": 11}')], 3, True)
    neighbour = bulk(topics.status("wangma", "smoke", "smk-wangma-002"), b"offline")
    assert twins.sift([neighbour], 4, True) == [neighbour]


def test_copies_wait_for_their_twin_a_bounded_time_and_number():
    twins = Twins()
    twins.sift([hint(FIRE, b'{"ts": 20}')], 0, True)  # its bulk copy was dropped by the broker
    will = bulk(WILL, b"offline")
    assert twins.sift([will], 1, True) == []  # within the wait: the will yields…
    twins.sift([], Twins.TTL_S + 1, True)
    assert twins.sift([will], Twins.TTL_S + 1, True) == [will]  # …not for ever
    assert twins.state() == {"waiting": 0, "hints_ahead": 0} and twins.counts["forgotten"] == 1
    late_twin = bulk(FIRE, b'{"ts": 20}')
    assert twins.sift([late_twin], Twins.TTL_S + 2, False) == [late_twin]  # processed: a duplicate then
    twins.MAX = 50
    twins.sift([hint(FIRE, b'{"ts": %d}' % i) for i in range(200)], 0, True)
    assert twins.state() == {"waiting": 50, "hints_ahead": 50}


def test_a_batch_ends_at_its_byte_budget_and_smoke_still_goes_first():
    """5,000 messages of 100 readings were a second of work, which a fire arriving meanwhile waited for."""
    import asyncio
    from types import SimpleNamespace

    from gateway.config import BrokerConfig, parse_broker_url
    from gateway.mqtt import Receiver

    loop = asyncio.new_event_loop()
    receiver = Receiver(BrokerConfig(), parse_broker_url("mqtt://127.0.0.1:1"), [], loop, asyncio.Event())
    for mid in range(1, 101):
        receiver._on_message(None, None, SimpleNamespace(topic=METER, payload=b"x" * 1000, mid=mid, qos=1))
    receiver._on_message(None, None, SimpleNamespace(topic=FIRE, payload=b"{}", mid=101, qos=1))
    batch = receiver.drain(5000, max_bytes=10_000)
    assert [m.topic for m in batch] == [FIRE] + [METER] * 10 and len(receiver) == 90
    assert len(receiver.drain(5000, max_bytes=10)) == 1  # one message however large
    assert len(receiver.drain(5000)) == 89
    loop.close()


def test_a_fire_overtakes_bulk_held_up_in_the_broker_and_is_processed_once(config, run_gateway, mqtt, monkeypatch):
    """The bulk session's copies of smoke messages come late, as when they wait in the broker's queue
    behind a full window (its own I/O thread held for 1.5 s when they arrive). The fire comes at once by
    the hint lane and is processed once; a will published before a reading that the lane brought first
    yields to it."""
    from gateway.mqtt import Receiver

    handle = Receiver._handle
    released: list[float] = []

    def held(self, frames, generation):
        if self.sink is self and not released and any(b"/smoke/" in bytes(data[start:end]) for _, data, start, end
                                                       in frames):
            time.sleep(1.5)
            released.append(time.time())
        return handle(self, frames, generation)

    monkeypatch.setattr(Receiver, "_handle", held)
    gateway = run_gateway(config).gateway
    deadline = time.monotonic() + 10
    while not gateway.receiver.lane.subscribed.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    device, screen = mqtt(), mqtt([topics.ALERTS_FILTER])
    back = "smk-wangma-079"
    device.publish(topics.status("wangma", "smoke", back), b"offline")  # a will…
    device.publish(topics.telemetry("wangma", "smoke", back), {"ts": time.time(), "alarm": False})  # …then back
    device.publish(topics.telemetry("wangma", "smoke", "smk-wangma-078"), {"ts": time.time(), "alarm": True})
    _, alert, arrived = screen.wait_for(lambda t, a: a["device_id"] == "smk-wangma-078", timeout_s=10)
    assert alert["rule"] == "smoke_alarm" and not released  # alerted while the bulk copies were held
    deadline = time.monotonic() + 10
    while gateway.twins.counts["bulk_twin"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    counts = gateway.twins.counts
    assert (counts["hint_first"], counts["bulk_twin"], counts["status_yielded"]) == (2, 2, 1), dict(counts)
    assert gateway.stats.valid["smoke"] == 2 and gateway.stats.rejected[("smoke", "duplicate")] == 0  # each once
    assert not [a for a in gateway.recent_alerts if a["device_id"] == back]  # never marked offline
    assert gateway.twins.state() == {"waiting": 0, "hints_ahead": 0}
    time.sleep(config.detection.snapshot_interval_s + 0.5)
    assert gateway.stats.ingest_unacked == 0  # the bulk copies were acknowledged all the same
