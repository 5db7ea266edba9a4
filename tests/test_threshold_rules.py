"""The vectorised threshold core: hysteresis, escalation, and equality with a one-by-one reference."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from rules.engine import ColumnBatch, KindEngine
from rules.model import KindProfile, Rule
from tests import reference


class Series:
    def __init__(self, n: int):
        self.device_ids = [f"d{i}" for i in range(n)]
        self.ports = [0] * n
        self.sites = ["s"] * n
        self.names = [f"point {i}" for i in range(n)]


def noise_engine(rule: dict, n: int = 1) -> KindEngine:
    profile = KindProfile(rules={"loud": Rule.model_validate({"field": "laeq_db", **rule})})
    return KindEngine("noise", profile, ("laeq_db",), n)


def feed(engine: KindEngine, values: list[float], rows: list[int] | None = None, t0: float = 1.8e9):
    rows = rows or [0] * len(values)
    batch = ColumnBatch(rows=np.array(rows, dtype=np.int64), ts=t0 + np.arange(len(values), dtype=float),
                        values=np.array(values, dtype=float).reshape(-1, 1), fields=("laeq_db",))
    return engine.evaluate(batch, Series(engine.n_series), gateway_time=t0)


def test_hysteresis_holds_at_73_db_between_raise_at_75_and_clear_below_72():
    engine = noise_engine({"raise": {"warning": 75}, "clear": 72})
    events = feed(engine, [74, 75, 73, 74.9, 72.0, 71.9, 73, 74])
    assert [(e.event, e.value) for e in events] == [("raised", 75.0), ("cleared", 71.9)]


def test_one_alert_escalates_and_de_escalates_without_being_raised_again():
    engine = noise_engine({"raise": {"warning": 70, "major": 75, "critical": 85}, "clear": 67})
    events = feed(engine, [71, 76, 90, 74, 68, 66])
    assert [(e.event, e.severity, e.previous_severity) for e in events] == [
        ("raised", "warning", None), ("updated", "major", "warning"), ("updated", "critical", "major"),
        ("updated", "warning", "critical"), ("cleared", "warning", "warning")]
    assert len({e.alert_id for e in events}) == 1


def test_state_carries_across_batches():
    engine = noise_engine({"raise": {"warning": 75}, "clear": 72})
    assert [e.event for e in feed(engine, [76])] == ["raised"]
    assert feed(engine, [74], t0=1.8e9 + 10) == []  # still in the band: held
    assert [e.event for e in feed(engine, [70], t0=1.8e9 + 20)] == ["cleared"]


def test_falling_rule_raises_below_and_clears_above_its_clear_level():
    engine = noise_engine({"op": "<", "raise": {"warning": 15, "major": 5}, "clear": 20})
    events = feed(engine, [30, 14, 4, 12, 18, 21])  # 18 lies in the band: held at warning
    assert [(e.event, e.severity, e.value) for e in events] == [
        ("raised", "warning", 14), ("updated", "major", 4), ("updated", "warning", 12), ("cleared", "warning", 21)]


def test_a_reading_without_the_field_changes_nothing():
    engine = noise_engine({"raise": {"warning": 75}})
    events = feed(engine, [80, math.nan, math.nan, 60])
    assert [e.event for e in events] == ["raised", "cleared"]


def test_readings_of_a_batch_are_taken_in_device_time_order_per_series():
    engine = noise_engine({"raise": {"warning": 75}, "clear": 72}, n=2)
    rows = np.array([1, 0, 1, 0], dtype=np.int64)
    ts = np.array([30.0, 20.0, 10.0, 10.0]) + 1.8e9  # arrive out of order
    values = np.array([[70.0], [71.0], [80.0], [79.0]])
    events = engine.evaluate(ColumnBatch(rows, ts, values, ("laeq_db",)), Series(2), 1.8e9)
    assert [(e.device_id, e.event, e.ts - 1.8e9) for e in events] == [
        ("d0", "raised", 10.0), ("d0", "cleared", 20.0), ("d1", "raised", 10.0), ("d1", "cleared", 30.0)]


rule_strategy = st.sampled_from([
    {"raise": {"warning": 70, "major": 75, "critical": 85}, "clear": 67},
    {"raise": {"warning": 75}, "clear": 72},
    {"raise": {"major": 60}},
    {"op": ">", "raise": {"info": 50, "critical": 50.5}},
    {"op": "<", "raise": {"warning": 40, "major": 35}, "clear": 45},
    {"op": "<=", "raise": {"critical": 30}},
])
values = st.one_of(st.floats(20, 100, allow_nan=False).map(lambda v: round(v * 2) / 2), st.just(math.nan))


@settings(max_examples=300, deadline=None)
@given(rule=rule_strategy,
       batches=st.lists(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 50), values), max_size=30),
                        min_size=1, max_size=4))
def test_vectorised_result_equals_one_reading_at_a_time(rule, batches):
    """Batches arrive in order; within one, readings of several series come in any order and repeat."""
    engine = noise_engine(rule, n=4)
    parsed = Rule.model_validate({"field": "laeq_db", **rule})
    got, expected, levels = [], [], [0] * 4
    for b, batch in enumerate(batches):
        readings = [(row, 1.8e9 + b * 100 + t, v) for row, t, v in batch]
        if readings:
            rows, ts, vals = (np.array(x) for x in zip(*readings))
            events = engine.evaluate(ColumnBatch(rows.astype(np.int64), ts.astype(float),
                                                 vals.astype(float).reshape(-1, 1), ("laeq_db",)), Series(4), 0)
            got += [(int(e.device_id[1:]), e.event, e.severity, e.ts) for e in events]
        for series, ts_, v in sorted(readings, key=lambda r: (r[0], r[1])):
            after = reference.level_after(parsed, levels[series], v)
            if after != levels[series]:
                before = levels[series]
                event = "raised" if before == 0 else ("cleared" if after == 0 else "updated")
                severity = ("none", "info", "warning", "major", "critical")[after or before]
                expected.append((series, event, severity, ts_))
            levels[series] = after
        # the reference works batch by batch too: order events of a batch by series then time
    assert sorted(got, key=lambda e: (e[3] // 100, e[0], e[3])) == sorted(expected, key=lambda e: (e[3] // 100, e[0], e[3]))
    assert engine.level[0].tolist() == levels
