"""The detection core inside the running gateway, through a real Mosquitto: state that survives a
restart, offline detection on the gateway clock and from a device's last will, late readings."""

from __future__ import annotations

import time

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from gateway import topics

METER = ("wangma", "meter", "mtr-wangma-001")
METER_TOPIC = topics.telemetry(*METER)


def test_restart_neither_re_raises_active_alerts_nor_forgets_a_half_counted_duration(config, run_gateway, mqtt):
    screen = mqtt([topics.ALERTS_FILTER])
    device = mqtt()
    now = time.time() - 200
    first = run_gateway(config)
    # an active alert (leakage) and an overload that has lasted 2 of the 5 minutes it needs
    device.publish(METER_TOPIC, {"ts": now, "seq": 1, "leakage_ma": 45.0, "current_a": 34.0})
    device.publish(METER_TOPIC, {"ts": now + 120, "seq": 2, "leakage_ma": 45.0, "current_a": 34.0})
    _, raised, _ = screen.wait_for(lambda t, a: a["rule"] == "meter_leakage")
    first.stop()
    assert (config.state_dir / "detectors.npz").exists()

    run_gateway(config)
    device.publish(METER_TOPIC, {"ts": now + 180, "seq": 3, "leakage_ma": 45.0, "current_a": 34.0})
    device.publish(METER_TOPIC, {"ts": now + 300, "seq": 4, "leakage_ma": 5.0, "current_a": 34.0})
    received = [a for _, a, _ in screen.collect(1.5)]
    assert [(a["rule"], a["event"]) for a in received] == [("meter_leakage", "cleared"), ("meter_overload", "raised")]
    assert received[0]["alert_id"] == raised["alert_id"]  # the same episode, not a new one
    assert received[1]["ts"] == now + 300  # five minutes after the overload began, across the restart


def test_device_last_will_raises_offline_at_once_and_a_reading_clears_it(config, run_gateway, mqtt, broker):
    run_gateway(config)
    screen = mqtt([topics.ALERTS_FILTER])
    site, kind, device_id = "fengqi", "smoke", "smk-fengqi-007"
    detector = paho.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=paho.MQTTv5)
    detector.will_set(topics.status(site, kind, device_id), b"offline", qos=1, retain=True)
    detector.connect(broker.host, broker.port)
    detector.loop_start()
    detector.publish(topics.status(site, kind, device_id), b"online", qos=1, retain=True).wait_for_publish(5)
    detector._sock.close()  # the link dies without a DISCONNECT: the broker sends the will
    detector.loop_stop()

    _, alert, _ = screen.wait_for(lambda t, a: a["rule"] == "offline", timeout_s=5)
    assert (alert["device_id"], alert["event"], alert["severity"]) == (device_id, "raised", "major")  # elderly_alone
    mqtt().publish(topics.telemetry(site, kind, device_id), {"ts": time.time(), "battery_pct": 80.0})
    _, back, _ = screen.wait_for(lambda t, a: a["rule"] == "offline")
    assert (back["event"], back["alert_id"]) == ("cleared", alert["alert_id"])
    mqtt().publish(topics.status(site, kind, device_id), b"", qos=1, retain=True)  # leave no retained will behind


def test_a_silent_device_goes_offline_within_its_timeout_plus_one_check(config, run_gateway, mqtt):
    config.kinds["noise"].offline_after_s = 2.0
    config.detection.offline_check_interval_s = 0.5
    screen = mqtt([topics.alert("dongxin", "noise", "noise-03")])
    device = mqtt()
    run_gateway(config)
    device.publish(topics.telemetry("dongxin", "noise", "noise-03"), {"ts": time.time(), "laeq_db": 48.0})
    heard = time.time()
    _, alert, received = screen.wait_for(lambda t, a: a["rule"] == "offline", timeout_s=6)
    assert 2.0 <= received - heard <= 2.0 + 0.5 + 0.5  # timeout + one check interval (+ delivery)
    assert alert["threshold"] == 2.0


def test_a_too_late_reading_is_dead_lettered_with_its_reason(config, run_gateway, mqtt):
    run_gateway(config)
    screen = mqtt([topics.DEADLETTER_FILTER, topics.ALERTS_FILTER])
    device = mqtt()
    now = time.time()
    device.publish(METER_TOPIC, {"ts": now, "temp_c": 75.0})
    screen.wait_for(lambda t, a: a.get("rule") == "meter_overheat")  # processed: the newest reading is now
    # an hour old, in a later batch: lateness is 10 minutes (within one batch it would simply come first)
    device.publish(METER_TOPIC, {"ts": now - 3600, "temp_c": 90.0})
    _, letter, _ = screen.wait_for(lambda t, a: a.get("reason") == "too_late")
    assert letter["device_id"] == "mtr-wangma-001"
    assert "3600 s older than the newest reading" in letter["detail"]
