"""Detection core throughput: readings/s per kernel and per whole profile, next to the plain
one-reading-at-a-time reference (tests/reference.py) measured in the same run, and state bytes per
device.

    .venv/bin/python -m bench.detectors [--sizes 1000,10000,100000] [--batches 20] [--cpu 0]
    .venv/bin/python -m bench.detectors --per-device 100 --sizes 1000,10000 --batches 5

Each profile run feeds batches of one reading per device (the shape the gateway hands over after a
wake-up) with 1% of readings over a threshold; the time is wall time on one core (pinned with
--cpu where the OS allows). With ``--per-device K`` each batch holds K consecutive readings of every
device (batched payloads), and the same run is repeated with every reading stepped in rounds (calm
readings not settled in one pass: rules/engine.py) as the baseline.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np


from detectors import flapping, runs
from detectors.anomaly import Anomaly
from detectors.cusum import Cusum
from detectors.rebound import Rebound
from detectors.compare import compare
from detectors.window import Ring, aggregate
from gateway.config import load_config
from gateway.schemas import READING_MODELS
from rules.engine import ColumnBatch, KindEngine
from tests.reference import ReferenceRule

ROOT = Path(__file__).resolve().parent.parent

CONFIG = load_config(ROOT / "config.yaml", env={})
T0 = 1.8e9


class Series:
    def __init__(self, kind: str, n: int):
        self.device_ids = [f"{kind}-{i}" for i in range(n)]
        self.ports = [1 + i % 10 if kind == "ev_charger" else 0 for i in range(n)]
        self.sites = ["s"] * n
        self.names = self.device_ids
        zones = ["1", "2", "4a"]
        self.attributes = [{"zone_class": zones[i % 3], "rated_power_w": 1000.0} for i in range(n)]
        self.tags = [["elderly_alone"] if kind == "smoke" else [] for _ in range(n)]

    def __len__(self) -> int:
        return len(self.device_ids)


def readings(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """One plausible reading per device; 1% over a threshold."""
    fields = READING_MODELS[kind].FIELDS
    values = np.full((n, len(fields)), np.nan)
    hot = rng.random(n) < 0.01
    col = {f: i for i, f in enumerate(fields)}
    if kind == "smoke":
        values[:, col["alarm"]] = hot.astype(float)
        values[:, col["smoke_obscuration_pct_m"]] = np.abs(rng.normal(0.08, 0.04, n))
        values[:, col["temp_c"]] = rng.normal(22, 0.1, n) + hot * 30
        values[:, col["co_ppm"]] = np.abs(rng.normal(1, 1, n))
        values[:, col["battery_pct"]] = rng.uniform(30, 100, n)
        values[:, col["tamper"]] = 0.0
        values[:, col["fault"]] = 0.0
    elif kind == "ev_charger":
        values[:, col["power_w"]] = rng.normal(150, 5, n) + hot * 900
        values[:, col["voltage_v"]] = rng.normal(220, 2, n)
        values[:, col["current_a"]] = values[:, col["power_w"]] / values[:, col["voltage_v"]]
        values[:, col["leakage_ma"]] = rng.uniform(0.5, 4, n)
        values[:, col["socket_temp_c"]] = rng.normal(32, 1.5, n)
    elif kind == "noise":
        values[:, col["laeq_db"]] = rng.normal(50, 2, n) + hot * 25
        values[:, col["lmax_db"]] = values[:, col["laeq_db"]] + 10
        values[:, col["lmin_db"]] = values[:, col["laeq_db"]] - 8
        values[:, col["interval_s"]] = 60.0
    else:
        values[:, col["current_a"]] = rng.normal(12, 3, n)
        values[:, col["leakage_ma"]] = rng.uniform(1, 8, n) + hot * 40
        values[:, col["temp_c"]] = rng.normal(30, 2, n)
    return values


def profile_rate(kind: str, n: int, batches: int, interval_s: float = 60.0, per_device: int = 1,
                 calm: bool = True) -> tuple[float, float, int]:
    """(readings/s, bytes of state per device, alert events) for the whole shipped profile."""
    rng = np.random.default_rng(7)
    engine = KindEngine(kind, CONFIG.kinds[kind], READING_MODELS[kind].FIELDS, Series(kind, n), started_at=T0)
    engine.calm_settles &= calm
    rows = np.tile(np.arange(n, dtype=np.int64), per_device)
    step = np.repeat(np.arange(per_device, dtype=float), n)  # the k-th reading of each device in a batch

    def batch(b: int) -> ColumnBatch:
        values = np.concatenate([readings(kind, n, rng) for _ in range(per_device)])
        return ColumnBatch(rows, T0 + interval_s * (b * per_device + step), values, engine.fields)

    data = [batch(b) for b in range(batches + 2)]
    for b in range(2):  # warm up: fill the windows
        engine.evaluate(data[b], T0)
    events = 0
    start = time.perf_counter()
    for b in range(2, batches + 2):
        events += len(engine.evaluate(data[b], T0).events)
    elapsed = time.perf_counter() - start
    return n * per_device * batches / elapsed, engine.state_bytes_per_series(), events


def reference_rate(kind: str, n_readings: int) -> float:
    """Readings/s of the one-by-one reference running every rule of the profile."""
    rng = np.random.default_rng(7)
    profile = CONFIG.kinds[kind]
    n = 200
    series = Series(kind, n)
    fields = READING_MODELS[kind].FIELDS

    def param(name: str, row: int, ts: float) -> float:
        p = profile.params[name]
        raw = series.attributes[row].get(p.attribute)
        if p.day is not None:
            local = (ts + 8 * 3600) % 86400
            table = p.night if (local >= 22 * 3600 or local < 6 * 3600) else p.day
            return table.get(str(raw), math.nan) * p.scale
        return float(raw) * p.scale

    refs = [(fields.index(rule.field), ReferenceRule(rule, n, param, [0] * n, profile.lateness_s,
                                                     profile.window_samples)) for rule in profile.rules.values()]
    batches = max(1, n_readings // n)
    data = [readings(kind, n, rng) for _ in range(batches)]
    start = time.perf_counter()
    for b in range(batches):
        ts = T0 + 60.0 * b
        for col, ref in refs:
            ref.feed([(row, ts, float(data[b][row, col]), -1) for row in range(n)])
    return batches * n / (time.perf_counter() - start)


def kernel_rates(n: int) -> dict[str, float]:
    rng = np.random.default_rng(1)
    values = rng.normal(60, 5, n)
    ts = np.full(n, T0)
    thresholds = np.full(n, 65.0)
    rows = np.arange(n)
    out = {}

    def timed(name: str, fn, repeat: int = 20) -> None:
        fn()
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        out[name] = n * repeat / (time.perf_counter() - start)

    timed("compare", lambda: compare(values, thresholds, ">="))
    start_arr, count_arr = np.full(n, np.nan), np.zeros(n, dtype=np.int32)
    holds, informative = values > 62, np.ones(n, dtype=bool)
    timed("runs.step (debounce)", lambda: runs.step(holds, informative, ts, start_arr, count_arr, rows, 60.0, 1))
    bits = np.zeros(n, dtype=np.uint64)
    timed("flapping.step", lambda: flapping.step(bits, rows, holds, 20))
    ring = Ring(n, 16)
    for k in range(16):
        ring.push(rows, ts + 60 * k, rng.normal(60, 5, n))
    now = ts + 60 * 15

    def window(name: str):
        return aggregate(name, ring.window(rows, now, 900.0, values)[1])

    timed("ring.push", lambda: ring.push(rows, now, values))
    rebound, cusum = Rebound(n), Cusum(n, 0.01, 0.5, 20)
    timed("rebound.step", lambda: rebound.step(rows, values))
    timed("cusum.step", lambda: cusum.step(rows, values))
    anomaly = Anomaly(n)
    timed("anomaly.step", lambda: anomaly.step(rows, values))
    for name in ("leq", "max", "p90", "rise_per_min", "robust_z"):
        timed(f"window {name} (16 samples)", lambda name=name: window(name), repeat=5)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--cpu", type=int, default=0, help="pin to this core (-1: do not pin)")
    parser.add_argument("--kinds", default="smoke,ev_charger,noise,meter")
    parser.add_argument("--per-device", type=int, default=1, help="readings of each device in one batch")
    parser.add_argument("--interval", type=float, default=60.0,
                        help="device seconds between a device's readings (20 keeps every smoke rate-of-rise window live)")
    args = parser.parse_args()
    if args.cpu >= 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    sizes = [int(s) for s in args.sizes.split(",")]
    kinds = args.kinds.split(",")

    print(f"kernels, readings/s on arrays of {sizes[-1]:,} (one core)")
    for name, rate in kernel_rates(sizes[-1]).items():
        print(f"  {name:<28} {rate:>16,.0f}")
    print()
    k = args.per_device
    print(f"{k} reading(s) per device in a batch, every {args.interval:g} s of device time, 1% over a threshold")
    print(f"{'profile':<11} {'rules':>5} {'devices':>9} {'readings/s':>14} {'reference/s':>12} {'× ref':>7} "
          f"{'state B/dev':>11} {'events':>7}" + (f" {'in rounds/s':>12} {'× rounds':>8}" if k > 1 else ""))
    for kind in kinds:
        ref = reference_rate(kind, 4000)
        for n in sizes:
            batches = args.batches if n <= 100000 else max(3, args.batches // 4)
            rate, state, events = profile_rate(kind, n, batches, args.interval, k)
            line = (f"{kind:<11} {len(CONFIG.kinds[kind].rules):>5} {n:>9,} {rate:>14,.0f} {ref:>12,.0f} "
                    f"{rate / ref:>7.0f} {state:>11,.0f} {events:>7}")
            if k > 1:
                rounds, _, same = profile_rate(kind, n, batches, args.interval, k, calm=False)
                assert same == events, "settling calm readings changed the alerts"
                line += f" {rounds:>12,.0f} {rate / rounds:>8.1f}"
            print(line)


if __name__ == "__main__":
    main()
