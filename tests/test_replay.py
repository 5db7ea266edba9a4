"""Late readings within the lateness bound: the state is what device-time order gives, and what
downstream was told is corrected (a withdrawn alert is cleared, marked retracted)."""

from __future__ import annotations

import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from rules.engine import CLOCK_STATE, ColumnBatch, KindEngine
from rules.model import KindProfile
from rules.replay import Pending, ReplayingEngine
from tests.test_rules import Series

T0 = 1.8e9
RULES = {
    "loud": {"field": "laeq_db", "raise": {"warning": 70, "major": 80}, "clear": 65, "flapping": None},
    "held": {"field": "laeq_db", "raise": {"warning": {"threshold": 72, "count": 3}}, "clear": 60,
             "flapping": None},
    "lasting": {"field": "laeq_db", "raise": {"major": {"threshold": 75, "for_s": 120}}, "clear": 70,
                "flapping": None},
    "windowed": {"field": "laeq_db", "window": {"seconds": 300, "aggregate": "leq", "min_samples": 2},
                 "raise": {"warning": 71}, "clear": 68, "flapping": None},
}


def engines(n: int, lateness_s: float = 600.0) -> tuple[KindEngine, ReplayingEngine]:
    profile = KindProfile.model_validate({"rules": RULES, "lateness_s": lateness_s, "window_samples": 16})
    make = lambda cls: cls("noise", profile, ("laeq_db",), Series(n), started_at=0)  # noqa: E731
    return make(KindEngine), make(ReplayingEngine)


def batch(readings: list[tuple[int, float, float, int]]) -> ColumnBatch:
    rows, ts, values, seq = zip(*readings)
    return ColumnBatch(np.array(rows, dtype=np.int64), np.array(ts), np.array(values, dtype=float).reshape(-1, 1),
                       ("laeq_db",), np.array(seq, dtype=np.int64))


def test_a_stale_loud_reading_after_a_quiet_one_does_not_leave_an_alert_standing():
    plain, replaying = engines(1)
    quiet, loud = (0, T0 + 60, 60.0, 2), (0, T0, 90.0, 1)
    for engine in (plain, replaying):
        engine.evaluate(batch([quiet]), T0 + 61)
    stuck = plain.evaluate(batch([loud]), T0 + 62).events
    assert [e.event for e in stuck if e.rule == "loud"] == ["raised"]  # arrival order: raised, never cleared
    events = [e for e in replaying.evaluate(batch([loud]), T0 + 62).events if e.rule == "loud"]
    assert [(e.event, e.ts) for e in events] == [("raised", T0), ("cleared", T0 + 60)]
    assert replaying.state[0].announced[0] == 0


def test_an_alert_a_late_reading_disproves_is_withdrawn():
    _, engine = engines(1)
    first = engine.evaluate(batch([(0, T0, 75.0, 1), (0, T0 + 60, 75.0, 2), (0, T0 + 180, 75.0, 4)]), T0 + 181)
    raised = [e for e in first.events if e.rule == "held"]
    assert [e.event for e in raised] == ["raised"]  # three loud readings in a row, as far as it knew
    late = engine.evaluate(batch([(0, T0 + 120, 50.0, 3)]), T0 + 182).events
    withdrawn = [e for e in late if e.rule == "held"]
    assert [(e.event, e.retracted, e.alert_id) for e in withdrawn] == [("cleared", True, raised[0].alert_id)]
    assert engine.state[1].announced[0] == 0
    assert engine.replays == 1


def test_duplicates_and_too_late_readings_are_still_told_apart():
    _, engine = engines(1, lateness_s=300)
    engine.evaluate(batch([(0, T0 + 600, 60.0, 10)]), T0)
    out = engine.evaluate(batch([(0, T0, 90.0, 1), (0, T0 + 600, 60.0, 10), (0, T0 + 500, 61.0, 9)]), T0)
    assert out.too_late.tolist() == [0] and out.duplicate.tolist() == [1]
    assert engine.last_ts[0] == T0 + 600


def _disorder(readings: list[tuple[int, float, float, int]], rng: random.Random, lateness_s: float):
    """The readings in an arrival order where none comes more than ``lateness_s`` after a newer one
    of its series (so none is too late), split into random batches."""
    arrival = sorted(readings, key=lambda r: r[1] + rng.uniform(0, lateness_s * 0.9))
    batches, i = [], 0
    while i < len(arrival):
        k = rng.randint(1, 6)
        batches.append(arrival[i:i + k])
        i += k
    return batches


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 4), st.integers(5, 40))
def test_any_disorder_within_lateness_ends_in_the_state_and_alerts_of_device_time_order(seed, n_series, n):
    rng = random.Random(seed)
    readings = []
    for row in range(n_series):
        t, level = T0, rng.uniform(55, 85)
        for k in range(n):
            t += rng.choice([30.0, 60.0, 90.0])
            level = min(95.0, max(40.0, level + rng.gauss(0, 6)))
            readings.append((row, t, round(level, 1), k + 1))
    reference, engine = engines(n_series, lateness_s=400.0)
    expected = []
    for reading in sorted(readings, key=lambda r: r[1]):
        expected += reference.evaluate(batch([reading]), reading[1]).events
    told = []
    for i, part in enumerate(_disorder(readings, rng, 400.0)):
        told += engine.evaluate(batch(part), T0 + i).events
        if i % 3 == 0:
            engine.advance(T0 + i)
    for mine, theirs in zip(engine.state, reference.state):
        assert mine.announced.tolist() == theirs.announced.tolist()
        assert mine.raised_ts.tolist() == theirs.raised_ts.tolist()
    expected_ids = {e.alert_id for e in expected if e.event == "raised"}
    raised_ids = {e.alert_id for e in told if e.event == "raised"}
    assert expected_ids <= raised_ids, "every alert of device-time order was raised"
    last = {}
    for e in told:
        last[e.alert_id] = e
    for extra in raised_ids - expected_ids:
        # anything else is over: withdrawn, or an episode that ended before the late reading redrew it
        assert last[extra].event == "cleared"
    active = {e.alert_id for e in last.values() if e.event != "cleared"}
    still = {i for i in expected_ids if [e for e in expected if e.alert_id == i][-1].event != "cleared"}
    assert active == still, "downstream ends holding exactly the alerts device-time order leaves active"


def _messages(rng: random.Random, n_series: int, lateness_s: float) -> list[list[tuple[int, float, float, int]]]:
    """Batched devices: each series sends messages of 1-10 readings; they arrive in send order but
    for 15% of them, late by up to ``lateness_s`` * 0.9."""
    sent = []
    for row in range(n_series):
        t, level, seq = T0 + rng.uniform(0, 300), rng.uniform(55, 85), 0
        for _ in range(rng.randint(3, 10)):
            message = []
            for _ in range(rng.randint(1, 10)):
                t += rng.choice([10.0, 30.0, 60.0])
                level = min(95.0, max(40.0, level + rng.gauss(0, 6)))
                seq += 1
                message.append((row, t, round(level, 1), seq))
            sent.append((t + (rng.uniform(0, lateness_s * 0.9) if rng.random() < 0.15 else 0.0), message))
            t += rng.uniform(0, 400)
    sent.sort(key=lambda m: m[0])
    return [m for _, m in sent]


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 5), st.sampled_from([2, 4, 10]))
def test_the_shadow_copying_a_caught_up_series_ends_where_stepping_it_would(seed, n_series, share):
    """When the shadow takes every held reading of a series (the buffer settled by its bound, a
    batched message that is a series' only held readings), it copies the series' live state instead of
    stepping the readings again (rules/replay.py): the live state, the shadow's and every event are what
    stepping gives, late readings and replays included."""
    rng = random.Random(seed)
    rules = {**RULES, "odd": {"field": "laeq_db", "transform": {"kind": "anomaly", "warmup": 8},
                              "raise": {"info": 0.6}, "clear": 0.05, "flapping": None},
             "drift": {"field": "laeq_db", "transform": {"kind": "cusum", "warmup": 5},
                       "raise": {"info": {"threshold": 4, "count": 2}}, "clear": 1, "flapping": None}}
    profile = KindProfile.model_validate({"rules": rules, "lateness_s": 600.0, "window_samples": 16})
    copying, stepping = (ReplayingEngine("noise", profile, ("laeq_db",), Series(n_series), started_at=0)
                         for _ in range(2))
    stepping.copies_caught_up = False
    messages = _messages(rng, n_series, 600.0)
    for engine in (copying, stepping):
        engine.max_pending = max(5, sum(map(len, messages)) // share)  # a half, a quarter, a tenth held
        engine.settle_every_s = 0.0
    now = T0
    for i, message in enumerate(messages):
        now = max(now, max(r[1] for r in message)) + 1.0
        out = [engine.evaluate(batch(message), now) for engine in (copying, stepping)]
        assert [(e.alert_id, e.event, e.ts, e.retracted) for e in out[0].events] == [
            (e.alert_id, e.event, e.ts, e.retracted) for e in out[1].events]
        if i % 5 == 4:
            for engine in (copying, stepping):
                engine.advance(now)
    for mine, theirs, clock in ((copying, stepping, True), (copying.shadow, stepping.shadow, False)):
        ours, others = mine.state_arrays(), theirs.state_arrays()
        for key, a in ours.items():
            if key in CLOCK_STATE and not clock:  # not copied: a rewind keeps the live engine's
                continue
            if a.dtype.kind == "f":  # blocks and single readings agree to rounding (tests/test_anomaly.py)
                np.testing.assert_allclose(a, others[key], rtol=1e-9, atol=1e-12, err_msg=key)
            else:
                np.testing.assert_array_equal(a, others[key], err_msg=key)
    assert stepping.caught_up == 0 and copying.settled_early == stepping.settled_early


def test_the_shadow_copies_batched_series_under_load():
    """The case the copy is for (a city's batched boxes, the buffer at its bound): nearly every reading
    the shadow takes is copied state, not stepped a second time."""
    _, engine = engines(50)
    engine.max_pending = 200
    engine.settle_every_s = 0.0
    for k in range(150):
        row = k % 50
        part = [(row, T0 + 10 * k + 0.01 * i, 60.0 + i % 7, 20 * k + i + 1) for i in range(20)]
        engine.evaluate(batch(part), T0 + 10 * k + 2)
    assert engine.settled_early > 2000
    assert engine.caught_up >= 0.99 * engine.settled_early


def test_a_restart_replays_what_came_after_it_exactly_and_takes_older_late_readings(tmp_path):
    """The snapshot holds the live state only (it is written every second, so it must not grow with the
    message rate); after a restart, disorder among new readings is still undone exactly."""
    reference, engine = engines(2)
    first = [(0, T0, 60.0, 1), (1, T0, 60.0, 1), (0, T0 + 60, 75.0, 2)]
    engine.evaluate(batch(first), T0)
    reference.evaluate(batch(first), T0)
    saved = engine.snapshot()
    assert not any(k.startswith(("shadow.", "pending.")) for k in saved)
    np.savez(tmp_path / "s.npz", **saved)
    _, again = engines(2)
    again.restore(dict(np.load(tmp_path / "s.npz")), now=T0 + 20)
    # after the restart a loud reading is followed by a late quiet one that came before it
    again.evaluate(batch([(0, T0 + 400, 90.0, 4)]), T0 + 30)
    told = again.evaluate(batch([(0, T0 + 300, 50.0, 3)]), T0 + 31).events
    for reading in [(0, T0 + 300, 50.0, 3), (0, T0 + 400, 90.0, 4)]:
        reference.evaluate(batch([reading]), reading[1])
    for mine, theirs in zip(again.state, reference.state):
        assert mine.announced.tolist() == theirs.announced.tolist()
    assert again.replays == 1 and told, "the late reading was replayed into events"
    # a reading older than what the restart restored is taken, in arrival order (not lost, not a crash)
    out = again.evaluate(batch([(0, T0 + 30, 62.0, 5)]), T0 + 32)
    assert len(out.too_late) == 0 and len(out.duplicate) == 0


def test_readings_held_for_replay_are_bounded_and_settled_oldest_first():
    reference, engine = engines(3)
    engine.max_pending = 1000
    for k in range(40):
        part = [(row, T0 + 100 * k + i, 60.0 + (i % 30), 100 * k + i + 1) for i in range(100) for row in range(3)]
        engine.evaluate(batch(part), T0 + k)
        reference.evaluate(batch(part), T0 + k)
        assert len(engine.pending) <= engine.max_pending + len(part)
    assert engine.settled_early > 0
    for mine, theirs in zip(engine.state, reference.state):
        assert mine.announced.tolist() == theirs.announced.tolist()
        assert mine.level.tolist() == theirs.level.tolist()
    # a late reading within lateness_s but older than what was settled is still taken
    late = engine.evaluate(batch([(1, T0 + 3990 - 500.5, 61.0, 10**6)]), T0 + 50)
    assert len(late.too_late) == 0


def test_held_readings_stay_in_few_chunks_in_arrival_order_and_ripen_exactly():
    # a chunk per batch made each second's take_ripe a Python loop over thousands (p99 stalls)
    rng = np.random.default_rng(3)
    pending, rows, ts = Pending(1), [], []
    for k in range(5000):
        n = int(rng.integers(1, 8))
        # arrival nearly in device-time order, as in the gateway, some readings far behind
        r, t = rng.integers(0, 50, n), k / 5 + np.where(rng.random(n) < 0.05, -rng.uniform(0, 300, n), 0.0)
        pending.add(r, t, t[:, None], np.full(n, -1))
        rows.append(r)
        ts.append(t)
    total = sum(len(r) for r in rows)
    assert len(pending) == total and len(pending.chunks) <= 2 * np.log2(total)
    all_rows, all_ts = np.concatenate(rows), np.concatenate(ts)
    left = np.ones(total, dtype=bool)
    # per-series horizons, then the bound's cut under them (chunks wholly older or newer are not read)
    for cut in (-np.inf, 200.0, 500.0, 990.0):
        horizon = np.maximum(rng.uniform(0, 1000, 50), cut)
        ripe = pending.take_ripe(horizon)
        older = left & (all_ts < horizon[all_rows])
        assert ripe is not None
        np.testing.assert_array_equal(ripe[0], all_rows[older])
        np.testing.assert_array_equal(ripe[1], all_ts[older])
        left &= ~older
        np.testing.assert_array_equal(pending.columns()[1], all_ts[left])
        assert len(pending) == int(left.sum())
        np.testing.assert_array_equal(pending.held[:50], np.bincount(all_rows[left], minlength=50))
        assert not pending.held[50:].any()
        assert all((c[1].min(), c[1].max()) == span for c, span in zip(pending.chunks, pending.spans))


def test_the_gateway_pipeline_replays_a_late_meter_reading_across_batches():
    """Through decode and the pipeline, as the gateway runs it: a hot reading that arrives after a
    cooler, newer one raises and clears at once instead of leaving an overheating alert standing."""
    from gateway.config import load_config
    from gateway.pipeline import Pipeline
    from gateway.registry import Registry
    from tests.conftest import ROOT

    config = load_config(ROOT / "config.yaml", env={})
    pipeline = Pipeline(config, Registry.from_config(config), started_at=T0)
    topic = "streetbrain/wangma/meter/mtr-wangma-001/telemetry"
    now = 1_800_000_000.0
    first = pipeline.process([(topic, b'{"ts": %f, "seq": 2, "temp_c": 35.0}' % (now - 60))], now)
    assert not first.alerts
    late = pipeline.process([(topic, b'{"ts": %f, "seq": 1, "temp_c": 75.0}' % (now - 120))], now + 1)
    overheat = [(e.event, e.ts) for e in late.alerts if e.rule == "meter_overheat"]
    assert overheat == [("raised", now - 120), ("cleared", now - 60)]
    assert not late.deadletters
