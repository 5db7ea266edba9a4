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


def test_a_fire_overtakes_a_window_of_bulk_telemetry_queued_in_the_broker(config, run_gateway, mqtt):
    """The broker sends one session at most receive_maximum unacknowledged messages; the rest wait in
    its queue. A fire published behind them comes at once by the hint lane, and is processed once.
    A will published before a reading that the lane brought first yields to it."""
    config.ingest.device_rate_per_s = 0
    config.ingest.batch_max = 500
    config.broker.receive_maximum = 500
    config.detection.snapshot_interval_s = 0.5  # acknowledgements: 500 messages every half second at most
    run_gateway(config).stop()  # the session stays: the broker queues what comes next
    device, screen = mqtt(), mqtt([topics.ALERTS_FILTER])
    backlog = 8000
    t0 = time.time() - 120
    for i in range(backlog):
        device.client.publish(topics.telemetry("wangma", "meter", f"mtr-wangma-{1 + i % 250:03d}"),
                              b'{"ts": %.3f, "temp_c": 30}' % (t0 + i * 0.001), qos=1)
    gateway = run_gateway(config).gateway
    deadline = time.monotonic() + 10
    while not gateway.receiver.lane.subscribed.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    back = topics.telemetry("wangma", "smoke", "smk-wangma-079")
    device.publish(topics.status("wangma", "smoke", "smk-wangma-079"), b"offline")  # a will…
    device.publish(back, {"ts": time.time(), "alarm": False})  # …and the detector back at once
    device.publish(topics.telemetry("wangma", "smoke", "smk-wangma-078"), {"ts": time.time(), "alarm": True})
    _, alert, _ = screen.wait_for(lambda t, a: a["device_id"] == "smk-wangma-078", timeout_s=30)
    processed_when_fire_came = gateway.stats.valid["meter"]
    deadline = time.monotonic() + 60
    while gateway.stats.valid["meter"] < backlog and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1)  # the bulk copies of the three smoke messages come last
    assert processed_when_fire_came < backlog / 4  # by the bulk session alone it came after all 8,000
    assert gateway.stats.valid["meter"] == backlog
    assert gateway.stats.valid["smoke"] == 2 and gateway.stats.rejected[("smoke", "duplicate")] == 0  # each once
    counts = gateway.twins.counts
    assert (counts["hint_first"], counts["bulk_twin"], counts["status_yielded"]) == (2, 2, 1), dict(counts)
    assert not [a for a in gateway.recent_alerts if a["device_id"] == "smk-wangma-079"]  # never "offline"
    assert gateway.twins.state() == {"waiting": 0, "hints_ahead": 0}
