"""The fast paths of the ingest: they must change nothing a user can see (speed is bench/throughput.py's)."""

from __future__ import annotations

import time

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway import topics
from gateway.config import BrokerConfig
from gateway.decode import FastReading
from gateway.mqtt import FrameReader, connect_packet, packet, parse_publish, string, subscribe_packet
from gateway.pipeline import Pipeline
from gateway.registry import Registry
from gateway.schemas import READING_MODELS
from gateway.service import RECENT_READINGS, recent_readings_depth

NOW = 1795322561.0
FAST = {kind: FastReading(model) for kind, model in READING_MODELS.items()}

values = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=False, allow_infinity=False), st.floats(min_value=-100, max_value=60000),
    st.text(max_size=5), st.sampled_from([0, 1, 100, 256, 257, -1, 0.0, 100.0, 1e11, 946684800]),
)


@st.composite
def readings(draw: st.DrawFn) -> tuple[str, dict[str, object]]:
    kind = draw(st.sampled_from(sorted(READING_MODELS)))
    model = READING_MODELS[kind]
    names = draw(st.lists(st.sampled_from([*model.model_fields, "firmware"]), unique=True))
    item: dict[str, object] = {name: draw(values) for name in names}
    if draw(st.booleans()):
        item["ts"] = draw(st.one_of(st.floats(min_value=9e8, max_value=2e11), st.integers(9e8, 2e11),
                                    st.just("2026-11-22T08:00:00+08:00")))
    return kind, item


@settings(max_examples=3000, deadline=None)
@given(readings())
def test_the_fast_check_accepts_only_what_pydantic_accepts_and_builds_the_same_reading(case):
    kind, item = case
    model = READING_MODELS[kind]
    fast = FAST[kind](item)
    try:
        validated = model.model_validate(item)
    except ValidationError:
        assert fast is None
        return
    if fast is not None:
        assert fast == validated
        assert fast.model_dump() == validated.model_dump()
        assert fast.model_fields_set == validated.model_fields_set
        assert [type(v) for v in fast.__dict__.values()] == [type(v) for v in validated.__dict__.values()]


def test_plain_readings_of_every_kind_take_the_fast_path():
    assert FAST["meter"]({"ts": NOW, "seq": 3, "temp_c": 31, "current_a": 9.5}) is not None
    assert FAST["smoke"]({"ts": NOW, "alarm": False, "battery_pct": 90.0}) is not None
    assert FAST["ev_charger"]({"ts": NOW, "port": 2, "power_w": 440.0}) is not None
    assert FAST["noise"]({"ts": int(NOW), "laeq_db": 55.1, "interval_s": 60}) is not None
    assert FAST["ev_charger"]({"ts": NOW, "power_w": 440.0}) is None  # no port: pydantic says so


def test_every_reading_of_batched_payloads_is_detected_and_counted(street_config):
    config = street_config.model_copy(deep=True)
    config.ingest.device_rate_per_s = 0
    pipeline = Pipeline(config, Registry.from_config(config), keep_readings=True)
    messages = []
    for n in range(1, 11):
        device = f"mtr-wangma-{n:03d}"
        batch = [{"ts": NOW - 100 + i, "seq": i, "temp_c": 75.0 if (n, i) == (4, 99) else 30.0} for i in range(100)]
        messages.append((topics.telemetry("wangma", "meter", device), orjson.dumps({"readings": batch})))
    out = pipeline.process(messages, NOW)
    assert pipeline.stats.valid["meter"] == 1000 and not out.deadletters
    assert out.count() == 1000 and len(list(out.readings())) == 1000
    assert [(a.device_id, a.rule, a.event, a.ts) for a in out.alerts] == [
        ("mtr-wangma-004", "meter_overheat", "raised", NOW - 1)]


def test_a_street_keeps_its_full_chart_and_a_city_at_least_each_device_s_last_reading():
    assert recent_readings_depth(2_200) == RECENT_READINGS
    assert 1 <= recent_readings_depth(327_000) < RECENT_READINGS


def _publish(topic: str, payload: bytes, mid: int, properties: bytes = b"\x00") -> bytes:
    return packet(0x32, string(topic) + mid.to_bytes(2, "big") + properties + payload)


def test_frames_split_anywhere_across_reads_come_out_whole_and_in_order():
    topic = topics.telemetry("wangma", "meter", "mtr-wangma-001")
    payloads = [b"x" * size for size in (0, 1, 126, 127, 128, 300, 20000)]
    stream = b"".join(_publish(topic, p, mid, b"\x02\x01\x01" if mid % 2 else b"\x00")
                      for mid, p in enumerate(payloads, 1)) + b"\xd0\x00"  # …and a PINGRESP
    for step in (1, 7, 4096, len(stream)):
        reader, frames = FrameReader(), []
        for i in range(0, len(stream), step):
            frames += reader.feed(stream[i:i + step])
        assert [f[0] >> 4 for f in frames] == [3] * len(payloads) + [13]
        parsed = [parse_publish(*frame) for frame in frames[:-1]]
        assert parsed == [(topic, p, mid, 1) for mid, p in enumerate(payloads, 1)]
        assert reader.pending == b""


def test_connect_asks_for_a_persistent_session_with_our_receive_window_and_credentials():
    config = BrokerConfig(client_id="gw-1", username="gateway", password="s3cret", session_expiry_s=86400,
                          receive_maximum=1000, keepalive_s=30)
    packet = connect_packet(config)
    assert packet[0] == 0x10 and packet[4:8] == b"MQTT" and packet[8] == 5
    assert packet[9] == 0xC0  # username and password, clean start off: the broker keeps our session
    assert b"\x11" + (86400).to_bytes(4, "big") in packet and b"\x21" + (1000).to_bytes(2, "big") in packet
    assert packet.endswith(b"\x00\x04gw-1\x00\x07gateway\x00\x06s3cret")
    assert subscribe_packet(["a/#"]) == b"\x82\x09\x00\x01\x00\x00\x03a/#\x01"


def test_the_gateway_takes_every_reading_of_batched_payloads_through_a_real_broker(config, run_gateway, mqtt):
    config.ingest.device_rate_per_s = 0
    gateway = run_gateway(config).gateway
    screen = mqtt([topics.ALERTS_FILTER])
    device = mqtt()
    now = time.time()
    for n in range(1, 21):
        batch = [{"ts": now - 50 + i * 0.5, "seq": i, "temp_c": 30.0 + (45 if (n, i) == (7, 99) else 0)}
                 for i in range(100)]
        device.publish(topics.telemetry("wangma", "meter", f"mtr-wangma-{n:03d}"), {"readings": batch})
    _, alert, _ = screen.wait_for(lambda t, a: a["rule"] == "meter_overheat" and a["device_id"] == "mtr-wangma-007")
    deadline = time.monotonic() + 5
    while gateway.stats.valid["meter"] < 2000 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gateway.stats.valid["meter"] == 2000
    assert alert["event"] == "raised" and alert["value"] == 75.0
