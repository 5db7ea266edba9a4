"""The detection core: each condition type and default rule against hand-computed cases, and the
vectorised engine against the one-reading-at-a-time reference for random disordered streams."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import load_config
from gateway.registry import Registry
from gateway.schemas import READING_MODELS
from rules.engine import ColumnBatch, KindEngine
from rules.model import KindProfile, Rule, Severity
from tests.conftest import ROOT
from tests.reference import ReferenceRule

SHANGHAI = timezone(timedelta(hours=8))
STREET = load_config(ROOT / "config.yaml", env={})


def local(day: int, hour: int, minute: int = 0) -> float:
    """Device time of a local (Asia/Shanghai) wall-clock time in November 2026."""
    return datetime(2026, 11, day, hour, minute, tzinfo=SHANGHAI).timestamp()


class Series:
    """Series of a test kind: ids d0, d1, …; attributes and tags as given."""

    def __init__(self, n: int, attributes: list[dict] | None = None, tags: list[list[str]] | None = None):
        self.device_ids = [f"d{i}" for i in range(n)]
        self.ports = [0] * n
        self.sites = ["s"] * n
        self.names = [f"point {i}" for i in range(n)]
        self.attributes = attributes or [{} for _ in range(n)]
        self.tags = tags or [[] for _ in range(n)]

    def __len__(self) -> int:
        return len(self.device_ids)


def engine_for(rules: dict, n: int = 1, fields: tuple[str, ...] = ("laeq_db",), **profile) -> KindEngine:
    prof = KindProfile.model_validate({"rules": rules, **profile})
    return KindEngine("noise", prof, fields, Series(n, profile.get("_attributes")), started_at=0)


def feed(engine: KindEngine, values, ts=None, rows=None, seq=None, t0: float = 1.8e9, step: float = 60.0):
    n = len(values)
    ts = np.array(ts if ts is not None else [t0 + i * step for i in range(n)], dtype=float)
    rows = np.array(rows if rows is not None else [0] * n, dtype=np.int64)
    batch = ColumnBatch(rows=rows, ts=ts, values=np.array(values, dtype=float).reshape(n, -1),
                        fields=engine.fields, seq=None if seq is None else np.array(seq, dtype=np.int64))
    return engine.evaluate(batch, gateway_time=float(ts.max()))


def summary(evaluation):
    return [(e.event, e.severity, e.value) for e in evaluation.events]


# -- hysteresis, severities, debounce ---------------------------------------------------------

def test_hysteresis_holds_at_73_db_between_raise_at_75_and_clear_below_72():
    engine = engine_for({"loud": {"field": "laeq_db", "raise": {"warning": 75}, "clear": 72}})
    assert summary(feed(engine, [74, 75, 73, 74.9, 72.0, 71.9, 73, 74])) == [
        ("raised", "warning", 75.0), ("cleared", "warning", 71.9)]


def test_one_alert_escalates_and_de_escalates_without_being_raised_again():
    engine = engine_for({"loud": {"field": "laeq_db", "raise": {"warning": 70, "major": 75, "critical": 85},
                                  "clear": 67, "flapping": None}})
    events = feed(engine, [71, 76, 90, 74, 68, 66]).events
    assert [(e.event, e.severity, e.previous_severity) for e in events] == [
        ("raised", "warning", None), ("updated", "major", "warning"), ("updated", "critical", "major"),
        ("updated", "warning", "critical"), ("cleared", "warning", "warning")]
    assert len({e.alert_id for e in events}) == 1


def test_duration_condition_needs_the_value_held_for_its_seconds_of_device_time():
    engine = engine_for({"loud": {"field": "laeq_db", "raise": {"warning": {"threshold": 70, "for_s": 300}}}})
    # readings a minute apart: over the limit at 0..4 min (4 min held), broken, then 0..5 min
    assert summary(feed(engine, [71, 72, 71, 73, 72, 60, 71, 71, 71, 71, 71, 71])) == [("raised", "warning", 71.0)]
    assert feed(engine, [71], t0=1.8e9 + 12 * 60).events == []  # already raised: nothing new


def test_repeating_condition_needs_n_readings_in_a_row():
    engine = engine_for({"loud": {"field": "laeq_db", "raise": {"major": {"threshold": 80, "count": 3}}}})
    events = feed(engine, [81, 82, 60, 81, 81, 85]).events
    assert [(e.event, e.value) for e in events] == [("raised", 85.0)]


def test_clear_condition_can_have_its_own_duration():
    engine = engine_for({"loud": {"field": "laeq_db", "raise": {"warning": 75},
                                  "clear": {"threshold": 72, "for_s": 120}}})
    assert summary(feed(engine, [76, 70, 70, 76, 70, 70, 70])) == [("raised", "warning", 76.0), ("cleared", "warning", 70.0)]


def test_a_reading_without_the_field_changes_nothing():
    engine = engine_for({"loud": {"field": "laeq_db", "raise": {"warning": 75}}})
    assert [e.event for e in feed(engine, [80, math.nan, math.nan, 60]).events] == ["raised", "cleared"]


# -- windows ----------------------------------------------------------------------------------

def test_window_leq_is_an_energy_average_not_an_arithmetic_mean():
    # 60 and 70 dB average to 67.4 dB(A) of energy (GB 3096), not 65.
    engine = engine_for({"loud": {"field": "laeq_db", "op": ">", "window": {"seconds": 300, "aggregate": "leq"},
                                  "raise": {"warning": 67}}})
    events = feed(engine, [60, 70]).events
    assert [(e.event, round(e.value, 2)) for e in events] == [("raised", 67.4)]


def test_window_forgets_readings_older_than_its_seconds():
    engine = engine_for({"loud": {"field": "laeq_db", "window": {"seconds": 120, "aggregate": "max"},
                                  "raise": {"warning": 80}, "clear": 79}})
    assert summary(feed(engine, [85, 60, 60, 60])) == [("raised", "warning", 85.0), ("cleared", "warning", 60.0)]


def test_rate_of_rise_of_10_k_per_minute_raises_heat_alert():
    engine = engine_for({"heat": {"field": "laeq_db", "window": {"seconds": 120, "aggregate": "rise_per_min",
                                                                 "min_samples": 3}, "raise": {"major": 10}}})
    events = feed(engine, [25, 26, 30, 35, 40, 46], step=20.0).events  # 15 °C/min by the end
    assert [(e.event, e.severity) for e in events] == [("raised", "major")]
    assert events[0].value >= 10


def test_rate_of_rise_needs_its_window_to_span_time_so_sensor_noise_is_not_a_fire():
    engine = engine_for({"heat": {"field": "laeq_db", "window": {"seconds": 120, "aggregate": "rise_per_min",
                                                                 "min_samples": 3, "min_span_s": 60},
                                  "raise": {"major": 10}}})
    # readings 2 s apart, ±1 °C of noise: a 30 K/min "slope" over 4 s, but flat over a minute
    noisy = [22.0, 21.0, 23.0] + [22.0, 22.5, 21.5] * 12
    assert feed(engine, noisy, step=2.0).events == []


def test_stuck_sensor_shows_as_a_range_near_zero():
    engine = engine_for({"stuck": {"field": "laeq_db", "op": "<", "window": {"seconds": 1800, "aggregate": "range",
                                                                             "min_samples": 5},
                                   "raise": {"warning": 0.1}, "clear": 0.5}})
    assert summary(feed(engine, [55.0, 55.0, 55.0, 55.0, 55.0, 55.0, 58.0])) == [
        ("raised", "warning", 0.0), ("cleared", "warning", 3.0)]


def test_thermal_runaway_is_power_climbing_back_after_the_taper_not_a_new_session():
    profile = STREET.kinds["ev_charger"]
    series = Series(2, attributes=[{"rated_power_w": 1000.0}] * 2)
    engine = KindEngine("ev_charger", profile, READING_MODELS["ev_charger"].FIELDS, series, started_at=0)
    fields = READING_MODELS["ev_charger"].FIELDS
    failing = [160, 150, 130, 110, 95, 90, 100, 120, 140, 150, 155, 160, 165]  # tapers, then climbs back
    replugged = [160, 150, 130, 0, 0, 150, 160, 160, 160, 160, 160, 160, 160]  # a new bike, a new session
    values = np.full((26, len(fields)), np.nan)
    values[:, fields.index("power_w")] = failing + replugged
    rows = np.array([0] * 13 + [1] * 13)
    ts = 1.8e9 + 60.0 * np.array(list(range(13)) * 2)
    events = [e for e in engine.evaluate(ColumnBatch(rows, ts, values, fields), 1.8e9).events if e.rule == "thermal_runaway"]
    assert [(e.device_id, e.event, e.severity) for e in events] == [("d0", "raised", "major")]
    assert events[0].value >= 40


def test_robust_z_ignores_one_wild_reading_in_the_history():
    engine = engine_for({"odd": {"field": "laeq_db", "window": {"seconds": 3600, "aggregate": "robust_z",
                                                                "min_samples": 5}, "raise": {"warning": 4}}})
    history = [50, 51, 49, 50, 95, 50, 51, 49, 50]  # one spike long ago
    assert [(e.event, e.value > 4) for e in feed(engine, history + [58]).events][-1:] == [("raised", True)]


def test_dirty_smoke_chamber_creeping_up_raises_an_info_alert():
    profile = STREET.kinds["smoke"]
    engine = KindEngine("smoke", profile, READING_MODELS["smoke"].FIELDS, Series(2), started_at=0)
    fields = READING_MODELS["smoke"].FIELDS
    rng = np.random.default_rng(3)
    clean = 0.08 + rng.normal(0, 0.01, 300)
    creeping = clean + np.concatenate([np.zeros(150), np.linspace(0, 0.15, 150)])  # +0.15 %/m over days
    values = np.full((600, len(fields)), np.nan)
    values[:, fields.index("smoke_obscuration_pct_m")] = np.concatenate([clean, creeping]).clip(0)
    rows = np.array([0] * 300 + [1] * 300)
    ts = 1.8e9 + 3600.0 * np.array(list(range(300)) * 2)
    events = engine.evaluate(ColumnBatch(rows, ts, values, fields), 1.8e9).events
    assert [(e.device_id, e.rule, e.event, e.severity) for e in events] == [("d1", "chamber_drift", "raised", "info")]


# -- schedules and per-device parameters -----------------------------------------------------------

NOISE = STREET.kinds["noise"]


def noise_engine(zone: str = "1") -> KindEngine:
    series = Series(1, attributes=[{"zone_class": zone}])
    return KindEngine("noise", NOISE, READING_MODELS["noise"].FIELDS, series, started_at=0)


def noise(engine: KindEngine, start: float, laeq: list[float], lmax: list[float] | None = None, step: float = 60.0):
    n = len(laeq)
    lmax = lmax or [v + 8 for v in laeq]
    values = np.array([[a, b, a - 8, 60.0] for a, b in zip(laeq, lmax)])
    batch = ColumnBatch(np.zeros(n, dtype=np.int64), start + step * np.arange(n), values,
                        READING_MODELS["noise"].FIELDS)
    return engine.evaluate(batch, gateway_time=start)


def test_night_lmax_over_limit_plus_15_db_raises_warning():
    engine = noise_engine("1")  # residential: night limit 45 dB(A), so Lmax may reach 60
    events = noise(engine, local(22, 23, 30), laeq=[40, 40], lmax=[59.5, 61.0]).events
    assert [(e.rule, e.event, e.severity, e.threshold) for e in events] == [("night_lmax", "raised", "warning", 60.0)]


def test_the_same_lmax_by_day_raises_nothing():
    engine = noise_engine("1")
    assert noise(engine, local(22, 14, 0), laeq=[40, 40], lmax=[61.0, 75.0]).events == []


def test_night_schedule_crosses_midnight_and_ends_at_six():
    engine = noise_engine("1")
    events = noise(engine, local(22, 23, 50), laeq=[40] * 3, lmax=[70, 50, 50], step=600.0).events  # 23:50, 00:00, 00:10
    assert [(e.event, e.ts) for e in events] == [("raised", local(22, 23, 50)), ("cleared", local(23, 0, 10))]
    # a sudden noise at 05:59 still counts, at 06:00 the rule is off and the alert ends
    events = noise(engine, local(23, 5, 59), laeq=[40, 40], lmax=[70, 70]).events
    assert [(e.event, e.ts) for e in events] == [("raised", local(23, 5, 59)), ("cleared", local(23, 6, 0))]


def test_zone_class_selects_the_laeq_limit_day_and_night():
    # 58 dB(A) sustained: over class 1's day limit (55), under class 2's (60)
    day = local(22, 10)
    residential, mixed = noise_engine("1"), noise_engine("2")
    events = noise(residential, day, laeq=[58] * 8).events
    assert [(e.rule, e.event, e.severity, e.threshold) for e in events] == [("laeq_over_limit", "raised", "warning", 55.0)]
    assert noise(mixed, day, laeq=[58] * 8).events == []
    # at night class 2's limit is 50
    events = noise(noise_engine("2"), local(22, 23), laeq=[52] * 8).events
    assert [(e.rule, e.threshold) for e in events] == [("laeq_over_limit", 50.0)]


def test_sustained_noise_escalates_from_warning_to_major_after_30_minutes():
    engine = noise_engine("1")
    events = noise(engine, local(22, 10), laeq=[62.0, 62.4] * 20).events  # a live microphone is never constant
    # the rolling LAeq exists from the third reading (minute 2); over the limit 5 min → warning, 30 → major
    assert [(e.event, e.severity, round((e.ts - local(22, 10)) / 60)) for e in events] == [
        ("raised", "warning", 7), ("updated", "major", 32)]


def test_port_rating_sets_the_overload_level():
    profile = STREET.kinds["ev_charger"]
    series = Series(2, attributes=[{"rated_power_w": 1000.0}, {"rated_power_w": 600.0}])
    engine = KindEngine("ev_charger", profile, READING_MODELS["ev_charger"].FIELDS, series, started_at=0)
    power = np.full((4, 6), np.nan)
    power[:, 2] = [700, 700, 700, 700]  # power_w column
    batch = ColumnBatch(np.array([0, 0, 1, 1]), np.array([0.0, 10.0, 0.0, 10.0]) + 1.8e9, power,
                        READING_MODELS["ev_charger"].FIELDS)
    events = [e for e in engine.evaluate(batch, 1.8e9).events if e.rule == "port_overload"]
    assert [(e.device_id, e.severity, e.threshold) for e in events] == [("d1", "critical", 600.0)]


def test_elderly_alone_tag_raises_the_severity():
    profile = STREET.kinds["smoke"]
    series = Series(2, tags=[["elderly_alone"], []])
    engine = KindEngine("smoke", profile, READING_MODELS["smoke"].FIELDS, series, started_at=0)
    values = np.full((2, 8), np.nan)
    values[:, 1] = 3.5  # obscuration 3.5 %/m: over the alarm-level threshold
    events = engine.evaluate(ColumnBatch(np.array([0, 1]), np.array([1.8e9, 1.8e9]), values,
                                         READING_MODELS["smoke"].FIELDS), 1.8e9).events
    assert sorted((e.device_id, e.severity) for e in events) == [("d0", "critical"), ("d1", "major")]


def test_smoke_alarm_is_critical_on_its_first_reading_and_never_held_as_flapping():
    profile = STREET.kinds["smoke"]
    engine = KindEngine("smoke", profile, READING_MODELS["smoke"].FIELDS, Series(1), started_at=0)
    values = np.full((30, 8), np.nan)
    values[:, 0] = [1.0, 0.0] * 15  # the alarm goes on and off every reading
    events = engine.evaluate(ColumnBatch(np.zeros(30, dtype=np.int64), 1.8e9 + np.arange(30.0), values,
                                         READING_MODELS["smoke"].FIELDS), 1.8e9).events
    assert [e.event for e in events] == ["raised", "cleared"] * 15


# -- flapping -----------------------------------------------------------------------------------

def test_flapping_alert_is_held_and_the_flap_itself_is_visible():
    engine = engine_for({"loud": {"field": "laeq_db", "raise": {"warning": 75},
                                  "flapping": {"history": 8, "high": 0.5, "low": 0.125}}})
    events = feed(engine, [80, 70] * 4 + [70] * 8 + [80]).events
    kinds = [e.event for e in events]
    # raised/cleared while it settles in, then one "flapping" event, silence, then the settled state
    assert kinds[:kinds.index("flapping")] == ["raised", "cleared", "raised"]
    assert kinds.count("flapping") == 1
    # held while flapping; once it settles (cleared) that is said once, then the last raise
    held = events[kinds.index("flapping") + 1:]
    assert [(e.event, e.flapping) for e in held] == [("cleared", False), ("raised", False)]


# -- duplicates, disorder, lateness ----------------------------------------------------------------

def test_repeated_seq_and_repeated_newest_reading_are_processed_once():
    engine = engine_for({"loud": {"field": "laeq_db", "raise": {"warning": {"threshold": 75, "count": 2}}}})
    evaluation = feed(engine, [80, 80], ts=[1.8e9, 1.8e9], seq=[1, 1])  # a QoS 1 redelivery in the same batch
    assert evaluation.duplicate.tolist() == [1]
    assert evaluation.events == []  # one counted reading, where two in a row are needed
    again = feed(engine, [80, 80], ts=[1.8e9 - 60, 1.8e9], seq=[1, -1])  # seq 1 again; no seq, newest time again
    assert again.duplicate.tolist() == [0, 1] and again.events == []
    assert [e.event for e in feed(engine, [80], ts=[1.8e9 + 60], seq=[2]).events] == ["raised"]


def test_a_redelivered_device_batch_is_recognised_as_a_replay():
    engine = engine_for({"loud": {"field": "laeq_db", "raise": {"warning": {"threshold": 75, "count": 100}}}})
    batch = dict(ts=[1.8e9 + i for i in range(100)], seq=list(range(1000, 1100)))
    assert feed(engine, [80] * 100, **batch).duplicate.tolist() == []
    replay = feed(engine, [80] * 100, **batch)
    assert replay.duplicate.tolist() == list(range(100)) and replay.events == []


def test_a_device_that_rebooted_and_counts_seq_from_zero_again_is_not_a_replay():
    engine = engine_for({"loud": {"field": "laeq_db", "raise": {"warning": 75}}})
    feed(engine, [60] * 3, seq=[500, 501, 502])
    rebooted = feed(engine, [80, 60], ts=[1.8e9 + 600, 1.8e9 + 660], seq=[0, 1])
    assert rebooted.duplicate.tolist() == []
    assert [e.event for e in rebooted.events] == ["raised", "cleared"]
    assert feed(engine, [80], ts=[1.8e9 + 600], seq=[0]).duplicate.tolist() == [0]  # and its replays are caught


def test_readings_older_than_the_lateness_bound_are_rejected():
    engine = engine_for({"loud": {"field": "laeq_db", "raise": {"warning": 75}}}, lateness_s=120)
    feed(engine, [60], ts=[1.8e9 + 1000])
    evaluation = feed(engine, [90, 90], ts=[1.8e9 + 800, 1.8e9 + 900])
    assert evaluation.too_late.tolist() == [0]
    assert [e.value for e in evaluation.events] == [90.0]


def test_a_batch_in_any_order_gives_the_alerts_of_device_time_order():
    engine = engine_for({"loud": {"field": "laeq_db", "raise": {"warning": 75}, "clear": 72}}, n=2)
    events = feed(engine, [70, 71, 80, 79], ts=[1.8e9 + 30, 1.8e9 + 20, 1.8e9 + 10, 1.8e9 + 10], rows=[1, 0, 1, 0]).events
    assert [(e.device_id, e.event, e.ts - 1.8e9) for e in events] == [
        ("d0", "raised", 10.0), ("d1", "raised", 10.0), ("d0", "cleared", 20.0), ("d1", "cleared", 30.0)]


# -- staleness --------------------------------------------------------------------------------------

def test_silent_series_goes_offline_on_the_gateway_clock_and_comes_back_with_a_reading():
    profile = STREET.kinds["smoke"]
    engine = KindEngine("smoke", profile, READING_MODELS["smoke"].FIELDS, Series(2, tags=[["elderly_alone"], []]),
                        started_at=1000.0)
    assert engine.check_offline(1000.0 + profile.offline_after_s) == []
    events = engine.check_offline(1001.0 + profile.offline_after_s)
    assert sorted((e.device_id, e.rule, e.event, e.severity) for e in events) == [
        ("d0", "offline", "raised", "major"), ("d1", "offline", "raised", "warning")]
    assert engine.check_offline(2000.0 + profile.offline_after_s) == []  # raised once
    values = np.full((1, 8), np.nan)
    back = engine.evaluate(ColumnBatch(np.array([0]), np.array([1.8e9]), values, READING_MODELS["smoke"].FIELDS),
                           2000.0 + profile.offline_after_s).events
    assert [(e.device_id, e.rule, e.event) for e in back] == [("d0", "offline", "cleared")]


def test_a_too_late_reading_never_clears_an_offline_alert():
    profile = STREET.kinds["smoke"]
    engine = KindEngine("smoke", profile, READING_MODELS["smoke"].FIELDS, Series(1), started_at=0.0)
    values = np.full((1, 8), np.nan)
    engine.evaluate(ColumnBatch(np.array([0]), np.array([1.8e9]), values, READING_MODELS["smoke"].FIELDS), 0.0)
    assert [e.event for e in engine.check_offline(profile.offline_after_s + 1)] == ["raised"]
    late = engine.evaluate(ColumnBatch(np.array([0]), np.array([1.8e9 - 3600]), values, READING_MODELS["smoke"].FIELDS),
                           profile.offline_after_s + 2)
    assert late.too_late.tolist() == [0] and late.events == []
    assert engine.offline[0]


# -- snapshot -----------------------------------------------------------------------------------------

def test_restored_state_neither_re_raises_active_alerts_nor_forgets_a_half_counted_duration():
    rules = {"loud": {"field": "laeq_db", "raise": {"warning": 75}},
             "long": {"field": "laeq_db", "raise": {"major": {"threshold": 70, "for_s": 300}}}}
    first = engine_for(rules)
    assert [e.rule for e in feed(first, [80, 72, 72]).events] == ["loud", "loud"]  # raised, cleared
    assert [e.rule for e in feed(first, [80], t0=1.8e9 + 180).events] == ["loud"]  # raised again, "long" 3 min in
    saved = {k: v.copy() for k, v in first.snapshot().items()}

    second = engine_for(rules)
    assert second.restore(saved, now=1.8e9 + 200) == 1
    events = feed(second, [80, 80, 80], t0=1.8e9 + 240).events  # 4, 5, 6 minutes into the run
    assert [(e.rule, e.event, e.ts - 1.8e9) for e in events] == [("long", "raised", 300.0)]


def test_after_a_long_outage_a_condition_held_before_it_starts_its_duration_again():
    rules = {"loud": {"field": "laeq_db", "raise": {"warning": 75}},
             "long": {"field": "laeq_db", "raise": {"major": {"threshold": 70, "for_s": 300}}}}
    first = engine_for(rules)
    feed(first, [80, 72, 72])
    feed(first, [80], t0=1.8e9 + 180)  # "long" holds since 60 s
    saved = {k: v.copy() for k, v in first.snapshot().items()}
    for down, raised_at in ((1800.0, 0.0), (7200.0, 300.0)):  # within the tolerance: the run goes on
        second = engine_for(rules)
        assert second.restore(saved, now=1.8e9 + 180 + down) == 1
        t0 = 1.8e9 + 240 + down
        events = feed(second, [80] * 7, t0=t0).events
        assert [(e.rule, e.event, e.ts - t0) for e in events] == [("long", "raised", raised_at)], down
        assert second.state[0].announced[0] == first.state[0].announced[0] > 0  # "loud" stays raised


def test_snapshot_keys_follow_rows_registered_since_and_a_snapshot_taken_before_keeps_its_own():
    engine = engine_for({"loud": {"field": "laeq_db", "raise": {"warning": 75}}}, n=2)
    series = engine.series
    before = engine.snapshot()["keys"]
    assert before.tolist() == ["d0#0", "d1#0"]
    series.device_ids.append("a-much-longer-device-id")  # registered since (auto-registration)
    series.ports.append(3)
    engine.ensure_series()
    assert engine.snapshot()["keys"].tolist() == ["d0#0", "d1#0", "a-much-longer-device-id#3"]
    assert before.tolist() == ["d0#0", "d1#0"]  # replaced, not written in place
    other = Series(1)  # another registry entirely: keys built afresh, not extended
    engine.series = other
    assert engine.snapshot_keys().tolist() == ["d0#0"]


def test_state_per_device_stays_within_2_kb():
    registry = Registry.from_config(STREET)
    for kind, model in READING_MODELS.items():
        engine = KindEngine(kind, STREET.kinds[kind], model.FIELDS, registry.series[kind])
        assert engine.state_bytes_per_series() <= 2048, (kind, engine.state_bytes_per_series())


# -- the vectorised core equals the one-by-one reference ---------------------------------------------

RULES = [
    {"field": "laeq_db", "raise": {"warning": 70, "major": 75, "critical": 85}, "clear": 67},
    {"field": "laeq_db", "op": ">", "raise": {"warning": {"threshold": 72, "for_s": 120}, "major": {"threshold": 80, "count": 3}},
     "clear": {"threshold": 68, "for_s": 60}},
    {"field": "laeq_db", "op": "<", "raise": {"warning": 40, "major": {"threshold": 35, "count": 2}}, "clear": 45,
     "flapping": {"history": 6, "high": 0.5, "low": 0.2}},
    {"field": "laeq_db", "op": ">", "window": {"seconds": 300, "aggregate": "leq", "min_samples": 2},
     "raise": {"warning": {"param": "limit_db"}}, "clear": {"param": "limit_db", "offset": -3},
     "schedule": ["22:00-06:00", "12:00-13:00"], "escalate_tags": {"loud_area": 1}},
    {"field": "laeq_db", "window": {"seconds": 600, "aggregate": "range", "min_samples": 3}, "op": "<=",
     "raise": {"info": 1.0}, "flapping": None},
    {"field": "laeq_db", "window": {"seconds": 240, "aggregate": "rise_per_min", "min_samples": 2, "min_span_s": 90},
     "raise": {"major": 5}, "clear": 1},
    {"field": "laeq_db", "window": {"seconds": 900, "aggregate": "robust_z", "min_samples": 4},
     "raise": {"warning": 3, "major": 6}, "clear": 1.5},
    {"field": "laeq_db", "transform": {"kind": "rebound"}, "op": ">", "raise": {"major": {"threshold": 10, "for_s": 60}},
     "clear": 2},
    {"field": "laeq_db", "transform": {"kind": "ewma_z", "alpha": 0.2, "warmup": 3}, "raise": {"warning": 2.5},
     "clear": 1},
    {"field": "laeq_db", "transform": {"kind": "cusum", "alpha": 0.1, "k": 0.5, "warmup": 3},
     "raise": {"info": 4, "warning": {"threshold": 8, "count": 2}}, "clear": 1},
    {"field": "laeq_db", "transform": {"kind": "anomaly", "warmup": 3},
     "raise": {"info": 0.2, "warning": 0.4}, "clear": {"threshold": 0.1, "count": 2}},
    {"field": "laeq_db", "transform": {"kind": "anomaly", "warmup": 3, "sustain": True},
     "raise": {"info": 0.2, "warning": {"threshold": 0.4, "for_s": 60}}, "clear": 0.1},
]
PARAM = {"limit_db": {"attribute": "zone_class", "day": {"1": 55, "2": 60}, "night": {"1": 45, "2": 50}}}
ZONES = ["1", "2", "1", "2"]
TAGS = [["loud_area"], [], [], ["loud_area"]]


def reference_param(name: str, row: int, ts: float) -> float:
    local_s = (ts + 8 * 3600) % 86400
    night = local_s >= 22 * 3600 or local_s < 6 * 3600
    return PARAM[name]["night" if night else "day"][ZONES[row]]


levels = st.integers(60, 180).map(lambda v: v / 2)  # 30 … 90 dB in half-dB steps (exact in float32)
reading = st.tuples(st.integers(0, 3), st.integers(0, 40), st.one_of(levels, st.just(math.nan)),
                    st.one_of(st.just(-1), st.integers(0, 60)))


@settings(max_examples=500, deadline=None)
@given(rule_index=st.integers(0, len(RULES) - 1), start_hour=st.sampled_from([2, 11, 12, 21]),
       batches=st.lists(st.lists(reading, max_size=25), min_size=1, max_size=5))
def test_vectorised_engine_equals_the_one_by_one_reference(rule_index, start_hour, batches):
    """Random streams: several series, readings in any order within a batch, repeated seqs and device
    times, late readings across batches (batches step 20 minutes forward; lateness is 10 minutes)."""
    spec = RULES[rule_index]
    profile = KindProfile.model_validate({"rules": {"r": spec}, "params": PARAM, "lateness_s": 600,
                                          "window_samples": 16})
    series = Series(4, attributes=[{"zone_class": z} for z in ZONES], tags=TAGS)
    engine = KindEngine("noise", profile, ("laeq_db",), series, started_at=0)
    reference = ReferenceRule(Rule.model_validate(spec), 4, reference_param,
                              [sum(spec.get("escalate_tags", {}).get(t, 0) for t in tags) for tags in TAGS],
                              lateness_s=600, window_samples=16)
    t0 = local(22, start_hour)
    got, expected = [], []
    for b, batch in enumerate(batches):
        readings = [(row, t0 + b * 1200 + minute * 60 - 900, value, seq) for row, minute, value, seq in batch]
        expected += [(b, *event) for event in reference.feed(readings)]
        if readings:
            rows, ts, values, seqs = (np.array(column) for column in zip(*readings))
            evaluation = engine.evaluate(ColumnBatch(rows.astype(np.int64), ts.astype(float),
                                                     values.astype(float).reshape(-1, 1), ("laeq_db",),
                                                     seqs.astype(np.int64)), t0)
            got += [(b, int(e.device_id[1:]), e.event, int(Severity[e.severity]), e.ts) for e in evaluation.events]
    by_batch_series_time = lambda e: (e[0], e[1], e[4])  # noqa: E731
    assert sorted(got, key=by_batch_series_time) == sorted(expected, key=by_batch_series_time)


THRESHOLD_ONLY = [spec for spec in RULES if "window" not in spec and "transform" not in spec] + [
    {"field": "laeq_db", "raise": {"warning": {"param": "limit_db"}, "major": {"param": "limit_db", "offset": 10}},
     "clear": {"threshold": {"param": "limit_db", "offset": -3}, "for_s": 120}, "schedule": ["22:00-06:00", "12:00-13:00"],
     "escalate_tags": {"loud_area": 1}}]
# mostly rising device times and seqs per series (long calm runs), now and then a repeat, a step back or a hot value
calm_reading = st.tuples(st.integers(0, 3), st.integers(1, 4), st.one_of(levels, st.just(math.nan)),
                         st.sampled_from(["next", "next", "next", "none", "repeat", "back"]))


@settings(max_examples=300, deadline=None)
@given(rule_indexes=st.lists(st.sampled_from(range(len(THRESHOLD_ONLY))), min_size=1, max_size=3, unique=True),
       start_hour=st.sampled_from([2, 11, 12, 21]),
       batches=st.lists(st.lists(calm_reading, max_size=40), min_size=1, max_size=4))
def test_calm_readings_settled_in_one_pass_leave_the_state_and_events_of_rounds(rule_indexes, start_hour, batches):
    """A threshold-only profile settles each series' calm prefix without rounds (rules/engine.py): every
    state array and every event must be what stepping the same readings round by round gives."""
    profile = KindProfile.model_validate({"rules": {f"r{i}": THRESHOLD_ONLY[i] for i in rule_indexes}, "params": PARAM,
                                          "lateness_s": 600})
    engines = []
    for calm in (True, False):
        engine = KindEngine("noise", profile, ("laeq_db",), Series(4, attributes=[{"zone_class": z} for z in ZONES],
                                                                    tags=TAGS), started_at=0)
        assert engine.calm_settles
        engine.calm_settles = calm
        engines.append(engine)
    clock, seqs = [local(22, start_hour)] * 4, [0] * 4
    for batch in batches:
        readings = []
        for row, gap, value, how in batch:
            if how == "back":
                t, q = clock[row] - 30 * gap, seqs[row] - gap
            elif how == "repeat":
                t, q = clock[row], seqs[row]
            else:
                clock[row] += 30 * gap
                seqs[row] += gap
                t, q = clock[row], (seqs[row] if how == "next" else -1)
            readings.append((row, t, value, q))
        if not readings:
            continue
        rows, ts, values, seq = (np.array(column) for column in zip(*readings))
        results = [engine.evaluate(ColumnBatch(rows.astype(np.int64), ts.astype(float),
                                               values.astype(float).reshape(-1, 1), ("laeq_db",),
                                               seq.astype(np.int64)), float(ts.max()))
                   for engine in engines]
        calm, rounds = results
        # in device-time order per series (the order of equal times across series is not defined)
        per_series = [sorted([(e.device_id, e.ts, e.rule, e.event, e.severity) for e in r.events],
                             key=lambda e: (e[0], e[1])) for r in results]
        assert per_series[0] == per_series[1]
        assert calm.duplicate.tolist() == rounds.duplicate.tolist()
        assert calm.too_late.tolist() == rounds.too_late.tolist()
        settled, stepped = engines[0].snapshot(), engines[1].snapshot()
        assert settled.keys() == stepped.keys()
        for name in settled:
            np.testing.assert_array_equal(settled[name], stepped[name], err_msg=name)


def test_a_series_that_raises_and_clears_mid_batch_costs_a_few_rounds_not_one_per_reading():
    """The replay shadow takes thousands of readings at once; one series raising and clearing in the
    middle of its readings must not send every reading after it (of every series) round by round."""
    profile = KindProfile.model_validate({"rules": {"r": RULES[0]}, "params": PARAM, "lateness_s": 600})
    engine = KindEngine("noise", profile, ("laeq_db",), Series(4, attributes=[{"zone_class": z} for z in ZONES],
                                                                tags=TAGS), started_at=0)
    rounds = []
    step = engine._round
    engine._round = lambda rows, *rest: (rounds.append(rows.shape[0]), step(rows, *rest))  # type: ignore[method-assign]
    t0 = local(22, 2)
    readings = [(row, t0 + i * 10, 90.0 if (row, i) == (1, 10) else 50.0, i) for row in range(4) for i in range(60)]
    rows, ts, values, seq = (np.array(column) for column in zip(*readings))
    out = engine.evaluate(ColumnBatch(rows.astype(np.int64), ts.astype(float), values.reshape(-1, 1), ("laeq_db",),
                                      seq.astype(np.int64)), t0)
    assert [(e.device_id, e.event) for e in out.events] == [("d1", "raised"), ("d1", "cleared")]
    assert len(rounds) <= 3 and sum(rounds) <= 3
