"""Decoding without a broker: statuses, batch limits, auto-registration, reasons for everything."""

from __future__ import annotations

import json
import time

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import topics
from gateway.config import load_config
from gateway.pipeline import Pipeline
from gateway.registry import Registry
from tests.conftest import ROOT

STREET = load_config(ROOT / "config.yaml", env={})


def pipeline(config):
    return Pipeline(config, Registry.from_config(config))


def test_status_online_offline_is_read_and_garbage_is_rejected(street_config):
    p = pipeline(street_config)
    status = topics.status("wangma", "smoke", "smk-wangma-001")
    out = p.process([(status, b"offline"), (status, b'{"state": "online"}'), (status, b"maybe")], time.time())
    assert [(s.device_id, s.online) for s in out.statuses] == [("smk-wangma-001", False), ("smk-wangma-001", True)]
    assert [d.reason for d in out.deadletters] == ["bad_status"]


def test_batch_over_the_limit_or_empty_is_rejected_whole(street_config):
    p = pipeline(street_config)
    topic = topics.telemetry("wangma", "meter", "mtr-wangma-001")
    now = time.time()
    too_many = {"readings": [{"ts": now, "temp_c": 30.0}] * (street_config.ingest.max_readings_per_message + 1)}
    out = p.process([(topic, orjson.dumps(too_many)), (topic, b'{"readings": []}')], now)
    assert [d.reason for d in out.deadletters] == ["too_many_readings", "bad_batch"]
    assert p.stats.valid["meter"] == 0


def test_rfc3339_timestamps_are_accepted_and_naive_ones_refused(street_config):
    p = pipeline(street_config)
    topic = topics.telemetry("wangma", "meter", "mtr-wangma-001")
    out = p.process([(topic, b'{"ts": "2026-11-22T08:00:00+08:00", "temp_c": 75}'),
                     (topic, b'{"ts": "2026-11-22T08:00:01", "temp_c": 75}'),
                     (topic, b'{"ts": 1795322561000, "temp_c": 75}')], 1795322561.0)
    assert [a.rule for a in out.alerts] == ["meter_overheat"]
    assert out.alerts[0].ts == 1795305600.0
    assert [d.reason for d in out.deadletters] == ["bad_timestamp", "bad_timestamp"]
    assert "UTC offset" in out.deadletters[0].detail and "milliseconds" in out.deadletters[1].detail


def test_unknown_device_is_auto_registered_only_when_switched_on(street_config):
    config = street_config.model_copy(deep=True)
    config.ingest.auto_register = True
    p = pipeline(config)
    now = time.time()
    out = p.process([(topics.telemetry("wangma", "smoke", "smk-new-1"), orjson.dumps({"ts": now, "alarm": True})),
                     (topics.telemetry("mars", "smoke", "smk-new-2"), orjson.dumps({"ts": now}))], now)
    assert [(a.device_id, a.severity) for a in out.alerts] == [("smk-new-1", "critical")]
    assert [d.reason for d in out.deadletters] == ["unknown_site"]
    assert "auto_registered" in p.registry.devices["smk-new-1"].tags


@settings(max_examples=400, deadline=None)
@given(topic=st.one_of(st.text(max_size=60), st.sampled_from([
           topics.telemetry("wangma", "smoke", "smk-wangma-001"),
           topics.telemetry("wangma", "ev_charger", "evc-wangma-01"),
           topics.telemetry("dongxin", "noise", "noise-01"),
           topics.status("dongxin", "noise", "noise-01")])),
       payload=st.one_of(st.binary(max_size=200),
                         st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=10),
                                      lambda inner: st.lists(inner, max_size=4)
                                      | st.dictionaries(st.sampled_from(
                                          ["ts", "alarm", "temp_c", "port", "power_w", "laeq_db", "readings",
                                           "seq", "device_id"]), inner, max_size=5),
                                      max_leaves=12).map(lambda v: json.dumps(v).encode())))
def test_nothing_a_device_sends_raises_and_every_reject_has_a_reason(topic, payload):
    p = pipeline(STREET)
    out = p.process([(topic, payload)], time.time())
    for letter in out.deadletters:
        assert letter.reason and letter.detail
        assert letter.reason != "internal_error", letter.problems
        orjson.loads(letter.to_json(0.0))
    assert p.stats.pipeline_errors == 0


def test_a_flooding_device_is_throttled_once_flagged_and_cleared_when_it_calms_down(street_config):
    config = street_config.model_copy(deep=True)
    config.ingest.device_rate_per_s = 1
    config.ingest.device_burst = 2
    p = pipeline(config)
    topic = topics.telemetry("wangma", "meter", "mtr-wangma-007")
    now = 1_795_300_000.0
    out = p.process([(topic, orjson.dumps({"ts": now + i, "temp_c": 30.0})) for i in range(6)], now)
    assert p.stats.valid["meter"] == 2 and p.stats.rejected[("meter", "rate_limited")] == 4
    assert [(a.rule, a.event) for a in out.alerts] == [("flooding", "raised")]
    assert [d.reason for d in out.deadletters] == ["rate_limited"]
    assert [a.rule for a in p.check_offline(now + 30)] == []  # still within the quiet time
    cleared = [a for a in p.check_offline(now + 61) if a.rule == "flooding"]
    assert [(a.event, a.value) for a in cleared] == [("cleared", 4.0)]
    assert cleared[0].alert_id == out.alerts[0].alert_id
