"""The anomaly score (detectors/anomaly.py): causal, bounded, in [0, 1], quiet on noise and loud on a
spike or a level shift, the same for one series or many, across blocks and across a restart; the NAB
bench's output layout; an ``anomaly`` rule raising an alert through the engine."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest

from detectors.anomaly import Anomaly
from gateway.config import load_config
from gateway.schemas import READING_MODELS
from rules.engine import ColumnBatch, KindEngine
from rules.model import KindProfile
from tests.conftest import ROOT
from tests.reference import PlainAnomaly
from tests.test_rules import Series

STREET = load_config(ROOT / "config.yaml", env={})


def noise(n: int, seed: int = 0, level: float = 150.0, sigma: float = 3.0) -> np.ndarray:
    return level + np.random.default_rng(seed).normal(0, sigma, n)


def scores(values: np.ndarray, **options) -> np.ndarray:
    return Anomaly(1, **options).score(np.array([0]), np.asarray(values, dtype=float)[None, :])[0]


@pytest.mark.parametrize("period", [0, 24])
def test_appending_or_changing_future_readings_never_changes_an_earlier_score(period):
    past = noise(400, seed=1)
    alone = scores(past, period=period)
    rng = np.random.default_rng(2)
    for future in (noise(200, seed=3), past[:50] * 10, rng.standard_cauchy(300) * 1e3):
        extended = scores(np.concatenate([past, future]), period=period)
        np.testing.assert_array_equal(extended[:400], alone)


def test_state_is_a_fixed_set_of_arrays_whatever_the_number_of_readings():
    def state_bytes(readings: int) -> dict[str, int]:
        detector = Anomaly(3, period=24)
        detector.score(np.arange(3), np.tile(noise(readings), (3, 1)))
        return {name: a.nbytes for name, a in detector.state().items()}

    assert state_bytes(10) == state_bytes(20000)
    plain = Anomaly(1)
    # per series, without a seasonal view: 22 numbers (4 of them the drift's, 1 the local record, 1 the
    # ordinary worst), 5 for the contexts and their 32-byte bitset
    assert sum(a.nbytes for a in plain.state().values()) <= 248


def test_scores_stay_within_0_and_1_on_hostile_series():
    rng = np.random.default_rng(4)
    hostile = [np.zeros(500), np.full(500, 1e8) + rng.normal(0, 1, 500), rng.standard_cauchy(500) * 1e6,
               np.repeat([0.0, 1000.0], 250), np.where(rng.random(500) < 0.5, 0.0, 1e-12), np.arange(500.0) ** 3]
    for series in hostile:
        result = scores(series, warmup=5)
        assert np.all(np.isfinite(result)) and result.min() >= 0.0 and result.max() <= 1.0
    # beyond what any field admits (the schemas bound them), but no crash: a range that overflows to inf
    # places its readings in no context (an index from a NaN position raised IndexError here)
    with np.errstate(all="ignore"):
        assert scores(np.tile([1e308, -1e308, 3.0], 100), warmup=5).shape == (300,)


def test_stationary_noise_scores_low_after_the_warm_up_and_zero_during_it():
    result = scores(noise(3000, seed=5), warmup=100)
    assert np.all(result[:100] == 0.0)
    assert result[100:].max() < 0.5  # the most unusual of 2,900 Gaussian readings (≈ 3.5 σ) stays under 0.5


def test_new_contexts_on_long_noise_are_judged_by_how_rarely_noise_makes_them():
    # On noise, new contexts (runs of rare levels) thin out like 1/n; a rate that forgot them between
    # occurrences (an EW rate) judged the next one a miracle and took this to 0.80-0.85
    rng = np.random.default_rng(100)
    for _ in range(2):
        assert scores(150 + rng.normal(0, 3, 20000)).max() < 0.6


def test_a_rhythm_that_breaks_with_every_value_ordinary_is_found_by_its_new_contexts():
    rng = np.random.default_rng(3)
    t = np.arange(3000)
    wave = 50 + 10 * np.sin(2 * np.pi * t / 40) + rng.normal(0, 0.5, t.size)  # a cycle of 40 readings
    wave[2500:2540] = 50 + 10 * np.sin(2 * np.pi * t[2500:2540] / 20) + rng.normal(0, 0.5, 40)  # twice as fast
    found, blind = scores(wave), scores(wave, context_weight=0.0)
    assert int(np.argmax(found)) in range(2500, 2510) and found.max() > 0.4
    # no value and no prediction error in it is unusual: without contexts it barely registers
    assert blind[2500:2540].max() < 0.2


def test_the_plain_reference_scores_as_the_vectorised_detector():
    rng = np.random.default_rng(15)
    wave = 50 + 10 * np.sin(np.arange(1500) * 2 * np.pi / 30) + rng.normal(0, 1, 1500)
    wave[1200:1230] = 50 + rng.normal(0, 1, 30)
    for series in (wave, noise(1500, seed=16), np.repeat([0.0, 5.0, 0.0, 7.0], 375)):
        plain = PlainAnomaly(100)
        np.testing.assert_allclose([plain.step(v) for v in series], scores(series), rtol=0, atol=1e-9)
    # a memory of 500 readings: the ordinary worst's slowest fade is reached within 1,500
    plain = PlainAnomaly(100, calibration=0.002, memory=500)
    np.testing.assert_allclose([plain.step(v) for v in wave], scores(wave, calibration=0.002, memory=500),
                               rtol=0, atol=1e-9)


def test_a_series_watched_for_weeks_raises_ever_fewer_false_scores():
    # twelve series of noise on a daily cycle, 20,000 readings each (70 days at 5 minutes), one block
    rng = np.random.default_rng(40)
    t = np.arange(20000)
    series = 80 + 5 * np.sin(2 * np.pi * t / 288)[None, :] + rng.normal(0, 1, (12, t.size))
    high = {}
    for memory in (20000.0, 2000.0):
        result = Anomaly(12, period=288, memory=memory).score(np.arange(12), series)
        high[memory] = (int((result[:, 3000:] > 0.12).sum()), int((result[:, 10000:] > 0.12).sum()))
    # the ordinary worst fades by e-folds of age for 20,000 readings: 48 scores above NAB's threshold
    # (0.12) after the first 3,000 readings, 13 in the second half; fading at a fixed rate past 2,000
    # readings, 83 and 36: the rate of false scores stopped falling
    assert high[20000.0][0] <= 60 and high[20000.0][1] <= 20
    assert high[2000.0][0] >= 70 and high[2000.0][1] >= 28


def test_settings_that_cannot_work_are_refused_when_the_detector_is_made():
    with pytest.raises(ValueError, match="local must be in"):
        Anomaly(1, local=1.0)
    with pytest.raises(ValueError, match="drift must be slower than long"):
        Anomaly(1, drift=0.02)
    with pytest.raises(ValueError, match="memory must be at least 1 reading"):
        Anomaly(1, memory=0.5)


def test_an_injected_spike_scores_highest_and_high():
    series = noise(1000, seed=6)
    series[700] += 60  # 20 σ
    result = scores(series)
    assert int(np.argmax(result)) == 700
    assert result[700] > 0.8 and result[100:700].max() < 0.55


def test_one_spike_is_one_high_score_not_a_run_of_them():
    series = noise(1000, seed=6)
    series[700] += 60
    result = scores(series)
    # after a spike every statistic is still settling, so the next readings stay surprising, each a
    # little less; only a reading that beats the recent ones echoes, so they score nothing
    assert result[701:720].max() < 0.02
    every = scores(series, local=None)  # the echo of every reading: a run of alerts at a low threshold
    assert every[701:720].max() > 0.15 and int((every[701:720] > 0.05).sum()) >= 5


def test_a_level_that_creeps_up_is_seen_by_the_drift_of_the_long_level_from_a_slower_baseline():
    # a rise of 4 σ over 300 readings: too slow for any reading or the short mean to stand out
    seeds = 48
    series = np.stack([noise(4000, seed=30 + seed) for seed in range(seeds)])  # one series a seed, one block
    series[:, 3000:] += 12 * np.minimum(np.arange(1000) / 300, 1)
    caught = {}
    for drift in (0.0015, 0.0):
        result = Anomaly(seeds, drift=drift).score(np.arange(seeds), series)
        caught[drift] = int((result[:, 3000:].max(axis=1) > result[:, 100:3000].max(axis=1)).sum())
    # the highest score of its series in 20 seeds or more with the drift (22), 13 or fewer without (12)
    assert caught[0.0015] >= 20 and caught[0.0] <= 13


def test_a_level_shift_is_flagged_at_its_first_readings_and_once():
    series = noise(1200, seed=7)
    series[800:] += 30  # a port drawing 10 σ more from one reading on
    result = scores(series)
    assert result[800:803].max() > 0.5 > result[100:800].max()
    assert result[820:].max() < 0.5  # one anomaly, one high score: the new level is soon the norm


def test_a_variance_change_is_flagged():
    series = noise(1500, seed=8)
    series[1000:] = 150 + np.random.default_rng(9).normal(0, 30, 500)  # same level, ten times the spread
    result = scores(series)
    assert result[1000:1020].max() > 0.5 > result[100:1000].max()


def test_an_event_that_recurs_about_the_same_time_each_day_stops_being_news_but_a_new_one_is():
    rng = np.random.default_rng(5)
    period, days = 96, 20  # readings every 15 minutes
    t = np.arange(days * period)
    load = 50 + 10 * np.sin(2 * np.pi * t / period) + rng.normal(0, 1, t.size)
    for day in range(5, days):  # a nightly job from day 5 on: 45 minutes of load at 02:00, give or take 45 minutes
        at = day * period + 8 + rng.integers(-3, 4)
        load[at:at + 3] += 40
    new_event = load.copy()
    new_event[15 * period + 56] += 150  # something at 14:00 it has never done, bigger than the job
    result, with_new = scores(load, period=period), scores(new_event, period=period)
    first_night = result[5 * period:6 * period].max()
    later_nights = result[8 * period:].reshape(-1, period).max(axis=1)
    assert first_night > 0.8
    # the seasonal view alone (before the recurrence band) left these at a median of 0.10, up to 0.20
    assert np.median(later_nights) < 0.03 and later_nights.max() < 0.15
    assert with_new[15 * period + 56] > 0.4 and with_new[15 * period + 56] == with_new[15 * period:16 * period].max()


def test_a_day_that_lacks_its_usual_peak_is_flagged_when_the_peak_should_have_come():
    rng = np.random.default_rng(21)
    period, days = 96, 20
    load = 20 + rng.normal(0, 1, days * period)
    for day in range(days):
        if day != 15:  # a daily peak of 30 from 10:00 to 15:00, but not on day 15
            load[day * period + 40:day * period + 60] += 30
    missed = 15 * period + 40
    result = scores(load, period=period)
    assert int(np.argmax(result)) == missed and result[missed] > 0.6
    assert result[16 * period:].max() < 0.1  # the peak coming back the next day is no news
    # every value of the missing day is ordinary: with the plain and seasonal views only combined by
    # geometric mean, the alarm came a day late, when the peak came back
    late = scores(load, period=period, seasonal_alone=0.0, drift=0.0)  # (the plain view's drift sees some of it)
    assert int(np.argmax(late)) >= 16 * period and late[missed:missed + 20].max() < 0.5


def test_many_series_in_one_block_score_as_each_does_alone():
    rng = np.random.default_rng(10)
    block = np.stack([noise(600, seed=s, level=10.0 ** s, sigma=1.0 + s) for s in range(5)])
    block[2, 400] += 500
    together = Anomaly(5, period=24).score(np.arange(5), block)
    for row in range(5):
        np.testing.assert_array_equal(together[row], scores(block[row], period=24))
    # rows in any order, and a subset of the detector's series
    detector = Anomaly(7, period=24)
    order = rng.permutation(5) + 2
    shuffled = detector.score(order, block[order - 2])
    np.testing.assert_array_equal(shuffled, together[order - 2])


def test_blocks_rounds_and_one_reading_at_a_time_agree():
    series = noise(700, seed=11)
    series[500] += 50
    whole = scores(series, period=24)
    detector = Anomaly(1, period=24)
    pieces = np.concatenate([detector.score(np.array([0]), series[None, a:b])[0]
                             for a, b in [(0, 1), (1, 64), (64, 300), (300, 301), (301, 700)]])
    stepper = Anomaly(1, period=24)
    one_by_one = np.array([stepper.step(np.array([0]), np.array([v]))[0] for v in series])
    np.testing.assert_allclose(pieces, whole, rtol=0, atol=1e-12)
    np.testing.assert_allclose(one_by_one, whole, rtol=0, atol=1e-12)


def test_a_restored_snapshot_continues_exactly_where_it_left_off():
    block = np.stack([noise(900, seed=12), noise(900, seed=13, level=20.0)])
    block[1, 700] += 40
    straight = Anomaly(2, period=24)
    expected = np.concatenate([straight.score(np.arange(2), block[:, :450]),
                               straight.score(np.arange(2), block[:, 450:])], axis=1)
    first = Anomaly(2, period=24)
    first.score(np.arange(2), block[:, :450])
    saved = {name: a.copy() for name, a in first.state().items()}
    second = Anomaly(2, period=24)
    for name, a in second.state().items():
        a[...] = saved[name]
    np.testing.assert_array_equal(second.score(np.arange(2), block[:, 450:]), expected[:, 450:])


def test_grown_series_start_fresh_beside_the_old_ones():
    detector = Anomaly(1)
    detector.score(np.array([0]), noise(300)[None, :])
    detector.grow(3)
    np.testing.assert_array_equal(detector.score(np.array([2]), noise(300, seed=14)[None, :])[0],
                                  scores(noise(300, seed=14)))


# -- the NAB bench ----------------------------------------------------------------------------------

def test_nab_bench_writes_one_result_row_per_input_row_in_nab_layout(tmp_path):
    data, out = tmp_path / "data", tmp_path / "results"
    written = {}
    for category, name, rows, step_s in [("artificialWithAnomaly", "art_a.csv", 300, 300),
                                         ("realAdExchange", "ex_b.csv", 120, 3600)]:
        (data / category).mkdir(parents=True)
        values = noise(rows, seed=rows)
        stamps = [np.datetime_as_string(np.datetime64("2014-04-01T00:00:00") + np.timedelta64(i * step_s, "s"))
                  .replace("T", " ") for i in range(rows)]
        lines = ["timestamp,value"] + [f"{t},{v:.3f}" for t, v in zip(stamps, values)]
        (data / category / name).write_text("\n".join(lines) + "\n")
        written[(category, name)] = [line.split(",") for line in lines[1:]]
    run = subprocess.run([sys.executable, "-m", "bench.nab", "--data", str(data), "--out", str(out), "--cpu", "-1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "readings/s" in run.stdout and "series/s" in run.stdout
    for (category, name), rows in written.items():
        with (out / category / f"streetbrain_{name}").open() as handle:
            result = list(csv.reader(handle))
        assert result[0] == ["timestamp", "value", "anomaly_score"]
        assert [r[:2] for r in result[1:]] == rows
        assert all(0.0 <= float(r[2]) <= 1.0 for r in result[1:])


def test_the_quiet_street_bench_counts_the_alerts_a_rule_raises_on_the_simulated_street():
    from bench.anomaly_quiet import alerts, quiet_readings

    series, rows, ts, values = quiet_readings("noise", "laeq_db", days=0.5, seed=11)
    assert len(series.device_ids) == 14 and values.shape[0] == 14 * 720 and np.all(np.diff(ts) >= 0)
    assert alerts("noise", "laeq_anomaly", 0.7, series, rows, ts, values) == 0
    late = (rows == 3) & (ts > ts[-1] - 3 * 3600)
    values[np.flatnonzero(late)[0]] += 40  # one point hears something it never has, three hours before the end
    assert alerts("noise", "laeq_anomaly", 0.7, series, rows, ts, values) == 1


# -- rules ------------------------------------------------------------------------------------------

def anomaly_engine(rule: dict, n: int = 1) -> KindEngine:
    profile = KindProfile.model_validate({"rules": {"unusual": rule}})
    return KindEngine("noise", profile, ("laeq_db",), Series(n), started_at=0)


def feed(engine: KindEngine, values: np.ndarray, t0: float = 1.8e9, step_s: float = 60.0):
    n = values.shape[0]
    batch = ColumnBatch(np.zeros(n, dtype=np.int64), t0 + step_s * np.arange(n), values.reshape(n, 1), ("laeq_db",))
    return engine.evaluate(batch, gateway_time=t0)


def test_anomaly_score_rule_raises_once_on_a_jump_and_clears_after_its_debounce():
    engine = anomaly_engine({"field": "laeq_db", "transform": {"kind": "anomaly", "warmup": 100},
                             "raise": {"warning": 0.5}, "clear": {"threshold": 0.2, "for_s": 600}})
    levels = noise(600, seed=15, level=52.0, sigma=1.0)
    levels[400] = 75.0  # a sudden new source, under any fixed limit a daytime zone 4a point has
    events = feed(engine, levels).events
    assert [(e.event, e.severity, e.ts - 1.8e9) for e in events] == [("raised", "warning", 400 * 60.0),
                                                                    ("cleared", "warning", 411 * 60.0)]
    assert events[0].value >= 0.5 and events[0].threshold == 0.5


def test_anomaly_score_held_for_a_duration_needs_the_anomaly_to_last():
    rule = {"field": "laeq_db", "transform": {"kind": "anomaly", "warmup": 100, "sustain": True},
            "raise": {"info": {"threshold": 0.07, "for_s": 300}}, "clear": 0.03}
    calm = noise(500, seed=16, level=52.0, sigma=1.0)
    erratic = calm.copy()
    erratic[400:] = 52.0 + np.random.default_rng(17).normal(0, 12, 100)  # a microphone gone erratic
    assert [e.event for e in feed(anomaly_engine(rule), calm).events] == []
    assert [e.event for e in feed(anomaly_engine(rule), erratic).events][:1] == ["raised"]
    # without sustain the score is high only where a reading beats the recent ones: never 5 minutes on
    # end, so such a rule would never raise, and the config says so
    def longest_run(result: np.ndarray) -> int:
        return max((len(run) for run in "".join("1" if v >= 0.07 else " " for v in result).split()), default=0)
    assert longest_run(scores(erratic, warmup=100)) < 5 <= longest_run(scores(erratic, warmup=100, local=None))
    onset = {**rule, "transform": {"kind": "anomaly", "warmup": 100}}
    with pytest.raises(ValueError, match="info is held .* add `sustain: true` to the transform"):
        anomaly_engine(onset)


def test_sustain_is_an_option_of_the_anomaly_transform_only():
    with pytest.raises(ValueError, match="sustain applies to the anomaly transform, not ewma_z"):
        anomaly_engine({"field": "laeq_db", "transform": {"kind": "ewma_z", "sustain": True}, "raise": {"info": 3.0}})


def test_anomaly_rule_state_survives_a_snapshot_and_restore():
    rule = {"field": "laeq_db", "transform": {"kind": "anomaly", "warmup": 100}, "raise": {"warning": 0.5}}
    levels = noise(600, seed=18, level=52.0, sigma=1.0)
    levels[500] = 75.0
    first = anomaly_engine(rule)
    feed(first, levels[:300])
    second = anomaly_engine(rule)
    assert second.restore({k: v.copy() for k, v in first.snapshot().items()}, now=1.8e9) == 1
    resumed = feed(second, levels[300:], t0=1.8e9 + 300 * 60)
    straight = anomaly_engine(rule)
    expected = feed(straight, levels)
    assert [(e.event, e.ts, e.value) for e in resumed.events] == [(e.event, e.ts, e.value) for e in expected.events]
    assert [e.event for e in expected.events] == ["raised", "cleared"]


def test_shipped_supply_voltage_anomaly_rule_catches_a_supply_gone_erratic_within_fixed_limits():
    profile = STREET.kinds["ev_charger"]
    fields = READING_MODELS["ev_charger"].FIELDS
    engine = KindEngine("ev_charger", profile, fields, Series(2, attributes=[{"rated_power_w": 1000.0}] * 2),
                        started_at=0)
    steady = noise(800, seed=19, level=220.0, sigma=1.0)
    failing = steady.copy()
    failing[600:] = 220.0 + np.random.default_rng(20).normal(0, 12, 200)  # a loose connection upstream
    values = np.full((1600, len(fields)), np.nan)
    values[:, fields.index("voltage_v")] = np.concatenate([steady, failing])
    rows = np.repeat(np.arange(2), 800)
    batch = ColumnBatch(rows, 1.8e9 + 30.0 * np.tile(np.arange(800), 2), values, fields)
    events = engine.evaluate(batch, gateway_time=1.8e9).events
    raised = [(e.device_id, e.rule, e.severity, e.ts - 1.8e9) for e in events if e.event == "raised"]
    assert [r[:3] for r in raised] == [("d1", "supply_voltage_anomaly", "warning")]
    assert 600 * 30.0 <= raised[0][3] <= 605 * 30.0  # within its first readings


def test_a_snapshot_from_before_a_feature_was_added_restarts_the_score_instead_of_half_restoring_it():
    rule = {"field": "laeq_db", "transform": {"kind": "anomaly", "warmup": 100}, "raise": {"warning": 0.5}}
    levels = noise(900, seed=19, level=52.0, sigma=1.0)
    levels[200:] += 8.0  # the point's level moved long ago and has stayed there
    first = anomaly_engine(rule)
    feed(first, levels[:600])
    saved = {k: v.copy() for k, v in first.snapshot().items() if ".drift_" not in k and ".g_drift" not in k}
    assert len(saved) < len(first.snapshot())  # as a version without the drift would have saved it
    second = anomaly_engine(rule)
    assert second.restore(saved, now=1.8e9) == 1
    resumed = feed(second, levels[600:], t0=1.8e9 + 600 * 60)
    # with the rest restored, a blank baseline (the first reading's level) against a long past: it raised
    assert [e.event for e in resumed.events] == []
    assert second.transforms[0].state()["count"][0] == 300  # it started again, warm-up and all


def test_a_snapshot_from_before_the_ordinary_worst_restores_the_rest_and_starts_it_blank():
    rule = {"field": "laeq_db", "transform": {"kind": "anomaly", "warmup": 100}, "raise": {"warning": 0.5}}
    levels = noise(900, seed=19, level=52.0, sigma=1.0)
    levels[650] += 20.0  # a jump after the restart, within what a restarted warm-up would be
    first = anomaly_engine(rule)
    feed(first, levels[:600])
    saved = {k: v.copy() for k, v in first.snapshot().items() if not k.endswith(".transform.worst")}
    assert len(saved) == len(first.snapshot()) - 1  # as the version before it would have saved it
    assert first.transforms[0].state()["worst"][0] > 0
    second = anomaly_engine(rule)
    assert second.restore(saved, now=1.8e9) == 1
    state = second.transforms[0].state()
    assert state["count"][0] == 600 and state["worst"][0] == 0  # the rest goes on; the worst starts blank
    resumed = feed(second, levels[600:], t0=1.8e9 + 600 * 60)
    # no warm-up again: the jump is seen
    assert [(e.event, e.ts - 1.8e9) for e in resumed.events][:1] == [("raised", 650 * 60.0)]
    assert state["worst"][0] > 0
