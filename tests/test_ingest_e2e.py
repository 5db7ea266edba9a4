"""From a device's publish to an alert on the alerts topic, through a real Mosquitto."""

from __future__ import annotations

import time

import orjson
import pytest

from gateway import topics

SMOKE = topics.telemetry("wangma", "smoke", "smk-wangma-001")
SMOKE_ALERTS = topics.alert("wangma", "smoke", "smk-wangma-001")


def test_smoke_alarm_raises_a_critical_alert_within_one_second(config, run_gateway, mqtt):
    run_gateway(config)
    screen = mqtt([topics.ALERTS_FILTER])
    device = mqtt()
    sent_at = time.time()
    device.publish(SMOKE, {"ts": sent_at, "seq": 7, "alarm": True, "smoke_obscuration_pct_m": 0.4})

    topic, alert, received_at = screen.wait_for(lambda t, a: a["rule"] == "smoke_alarm", timeout_s=1.0)

    assert received_at - sent_at < 1.0
    assert topic == SMOKE_ALERTS
    assert alert["event"] == "raised"
    assert alert["severity"] == "critical"
    assert (alert["device_id"], alert["site"], alert["kind"]) == ("smk-wangma-001", "wangma", "smoke")
    assert alert["value"] == 1.0 and alert["threshold"] == 1.0
    assert alert["ts"] == pytest.approx(sent_at, abs=1e-3)
    assert sent_at <= alert["gateway_time"] <= received_at
    assert alert["alert_id"].startswith("smk-wangma-001/smoke_alarm/")
    assert "烟感报警" in alert["message"]["zh"] and "Smoke alarm" in alert["message"]["en"]


def test_alarm_that_stops_clears_the_same_alert(config, run_gateway, mqtt):
    run_gateway(config)
    screen = mqtt([SMOKE_ALERTS])
    device = mqtt()
    now = time.time()
    device.publish(SMOKE, {"ts": now, "alarm": True})
    _, raised, _ = screen.wait_for(lambda t, a: a["event"] == "raised")
    device.publish(SMOKE, {"ts": now + 30, "alarm": False})
    _, cleared, _ = screen.wait_for(lambda t, a: a["event"] == "cleared")
    assert cleared["alert_id"] == raised["alert_id"]
    assert cleared["severity"] == "critical"


NOW = time.time()
BAD_PAYLOADS = [
    # (what, topic, payload, reason)
    ("bad JSON", SMOKE, b'{"ts": 1, "alarm": tru', "bad_json"),
    ("wrong type", SMOKE, orjson.dumps({"ts": NOW, "temp_c": "hot"}), "wrong_type"),
    ("boolean as number", SMOKE, orjson.dumps({"ts": NOW, "alarm": 1}), "wrong_type"),
    ("missing ts", SMOKE, orjson.dumps({"alarm": True}), "missing_field"),
    ("NaN", SMOKE, b'{"ts": %d, "temp_c": NaN}' % NOW, "non_finite"),
    ("infinity", SMOKE, b'{"ts": %d, "temp_c": 1e999}' % NOW, "non_finite"),
    ("device id disagrees with topic", SMOKE, orjson.dumps({"ts": NOW, "device_id": "smk-wangma-002"}),
     "device_mismatch"),
    ("oversized", SMOKE, b'{"ts": %d, "pad": "%s"}' % (NOW, b"x" * 70000), "oversized"),
    ("not an object", SMOKE, b"[1, 2, 3]", "not_object"),
    ("not UTF-8", SMOKE, b'{"ts": 1, "x": "\xff\xfe"}', "bad_encoding"),
    ("future timestamp", SMOKE, orjson.dumps({"ts": NOW + 86400, "alarm": True}), "future_ts"),
    ("physically impossible", SMOKE, orjson.dumps({"ts": NOW, "battery_pct": 180}), "out_of_range"),
    ("unknown device", topics.telemetry("wangma", "smoke", "smk-nobody"), orjson.dumps({"ts": NOW}),
     "unknown_device"),
    ("unknown kind", "streetbrain/wangma/toaster/smk-wangma-001/telemetry", orjson.dumps({"ts": NOW}),
     "unknown_kind"),
    ("device under another site", topics.telemetry("fengqi", "smoke", "smk-wangma-001"),
     orjson.dumps({"ts": NOW}), "site_mismatch"),
    ("port the charger does not have", topics.telemetry("wangma", "ev_charger", "evc-wangma-01"),
     orjson.dumps({"ts": NOW, "port": 99, "power_w": 100.0}), "bad_port"),
]


def test_each_invalid_payload_is_dead_lettered_with_its_reason_and_a_valid_alarm_in_the_burst_still_alerts(
        config, run_gateway, mqtt):
    gateway = run_gateway(config)
    screen = mqtt([topics.DEADLETTER_FILTER, topics.ALERTS_FILTER])
    device = mqtt()
    valid_topic = topics.telemetry("hengyanzi", "smoke", "smk-hengyanzi-001")
    for i, (_, topic, payload, _) in enumerate(BAD_PAYLOADS):
        device.publish(topic, payload)
        if i == len(BAD_PAYLOADS) // 2:
            device.publish(valid_topic, {"ts": time.time(), "alarm": True})

    received = screen.collect(2.0)
    letters = [body for topic, body, _ in received if "/deadletter/" in topic]
    alerts = [body for topic, body, _ in received if "/alerts/" in topic]

    assert [a["device_id"] for a in alerts] == ["smk-hengyanzi-001"]
    assert sorted(letter["reason"] for letter in letters) == sorted(reason for *_, reason in BAD_PAYLOADS)
    for letter in letters:
        assert letter["detail"], letter
        assert letter["payload_bytes"] > 0
    oversized = next(letter for letter in letters if letter["reason"] == "oversized")
    assert oversized["payload_truncated"] is True
    assert sum(gateway.gateway.stats.rejected.values()) == len(BAD_PAYLOADS)
    assert gateway.gateway.stats.pipeline_errors == 0


def test_batch_keeps_its_good_readings_and_dead_letters_only_the_bad_one(config, run_gateway, mqtt):
    run_gateway(config)
    screen = mqtt([topics.DEADLETTER_FILTER, topics.ALERTS_FILTER])
    device = mqtt()
    now = time.time()
    topic = topics.telemetry("wangma", "ev_charger", "evc-wangma-02")
    device.publish(topic, {"readings": [
        {"ts": now, "port": 1, "power_w": 150.0},
        {"ts": now + 1, "port": 2, "power_w": "lots"},
        {"ts": now + 2, "port": 3, "power_w": 150.0, "leakage_ma": 120.0},
    ]})
    received = screen.collect(1.5)
    letters = [body for t, body, _ in received if "/deadletter/" in t]
    alerts = [body for t, body, _ in received if "/alerts/" in t]
    assert len(letters) == 1
    assert letters[0]["problems"] == [{"index": 1, "reason": "wrong_type",
                                       "detail": "power_w: Input should be a valid number (got 'lots')"}]
    assert (letters[0]["accepted"], letters[0]["rejected"]) == (2, 1)
    assert [(a["port"], a["rule"], a["severity"]) for a in alerts] == [(3, "leakage_current", "critical")]


def test_gateway_restarted_on_its_persistent_session_gets_what_was_published_while_it_was_down(
        config, run_gateway, mqtt):
    first = run_gateway(config)
    first.stop()
    screen = mqtt([topics.ALERTS_FILTER])
    device = mqtt()
    now = time.time()
    down_topics = [topics.telemetry("fengqi", "smoke", f"smk-fengqi-{n:03d}") for n in range(1, 6)]
    for topic in down_topics:
        device.publish(topic, {"ts": now, "alarm": True})

    run_gateway(config)
    received = screen.collect(2.0)
    assert sorted(body["device_id"] for _, body, _ in received) == [f"smk-fengqi-{n:03d}" for n in range(1, 6)]


def test_a_reading_that_trips_a_bug_in_detection_costs_only_itself(config, run_gateway, mqtt):
    gateway = run_gateway(config)
    engine = gateway.gateway.pipeline.engines["meter"]
    healthy = engine.evaluate

    def evaluate(batch, gateway_time):  # a bug that only this device's readings reach
        if (batch.values[:, engine.fields.index("temp_c")] == 66.6).any():
            raise ZeroDivisionError("simulated bug")
        return healthy(batch, gateway_time)

    engine.evaluate = evaluate
    screen = mqtt([topics.DEADLETTER_FILTER, topics.ALERTS_FILTER])
    device = mqtt()
    now = time.time()
    device.publish(topics.telemetry("wangma", "meter", "mtr-wangma-002"), {"ts": now, "temp_c": 66.6})
    device.publish(topics.telemetry("wangma", "meter", "mtr-wangma-003"), {"ts": now, "temp_c": 75.0})
    received = screen.collect(1.5)
    assert [(a["device_id"], a["rule"]) for t, a, _ in received if "/alerts/" in t] == [("mtr-wangma-003", "meter_overheat")]
    letters = [a for t, a, _ in received if "/deadletter/" in t]
    assert [(letter["device_id"], letter["reason"]) for letter in letters] == [("mtr-wangma-002", "internal_error")]
