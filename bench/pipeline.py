"""The gateway's processing of batched messages in one process, without the broker: decode, validate,
detect (with the late-reading replay), as ``Pipeline.process`` does it for each drain of the receive
queue, on the default street's meter boxes.

    .venv/bin/python -m bench.pipeline [--per-message 100] [--drain 30] [--drains 200]

Each drain holds ``--drain`` messages of ``--per-message`` readings from different meter boxes; 1% of
messages end with a reading over ``meter_overheat`` (the box's next message clears it), as in
bench/throughput.py. Printed: readings/s and µs a message, and two baselines in the same run: every
reading stepped in rounds (calm readings not settled in one pass, rules/engine.py), and batches
parsed by orjson and checked reading by reading (what the gateway does with a batch that is not plain).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import orjson

from gateway import topics
from gateway.config import load_config
from gateway.pipeline import Pipeline
from gateway.registry import Registry

ROOT = Path(__file__).resolve().parent.parent


def drains(count: int, per_message: int, drain: int, now: float) -> list[list[tuple[str, bytes]]]:
    out = []
    for d in range(count):
        messages = []
        for m in range(drain):
            k = d * drain + m
            device = f"mtr-wangma-{k % 100 + 1:03d}"
            start = now - 300 + k * 0.01
            hot = k % 100 == 0
            batch = [{"ts": start + i * 1e-4, "seq": k * per_message + i,
                      "temp_c": 75.0 if hot and i == per_message - 1 else 30.0 + (i % 7) * 0.1,
                      "current_a": 8.0 + i % 11, "voltage_v": 221.5, "leakage_ma": 1.2} for i in range(per_message)]
            body = {"readings": batch} if per_message > 1 else batch[0]
            messages.append((topics.telemetry("wangma", "meter", device), orjson.dumps(body)))
        out.append(messages)
    return out


def run(args: argparse.Namespace, calm: bool, typed: bool = True) -> tuple[float, int]:
    config = load_config(ROOT / "config.yaml", env={})
    config.ingest.device_rate_per_s = 0  # the limiter is not what is measured here
    pipeline = Pipeline(config, Registry.from_config(config))
    for decoder in pipeline.decoder.typed.values():
        decoder.enabled &= typed
    for engine in pipeline.engines.values():
        engine.calm_settles &= calm
        engine.shadow.calm_settles &= calm
    now = time.time()
    work = drains(args.drains + 5, args.per_message, args.drain, now)
    for messages in work[:5]:  # warm up
        pipeline.process(messages, now)
    alerts = 0
    start = time.perf_counter()
    for messages in work[5:]:
        outcome = pipeline.process(messages, now)
        alerts += len(outcome.alerts)
        if outcome.deadletters:
            raise SystemExit(f"dead letter: {outcome.deadletters[0]}")
    return time.perf_counter() - start, alerts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-message", type=int, default=100)
    parser.add_argument("--drain", type=int, default=30, help="messages a drain of the receive queue holds")
    parser.add_argument("--drains", type=int, default=200)
    parser.add_argument("--cpu", type=int, default=0, help="pin to this core (-1: do not pin)")
    args = parser.parse_args()
    if args.cpu >= 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    messages = args.drains * args.drain
    readings = messages * args.per_message
    results = {}
    for label, calm, typed in (("calm readings settled", True, True), ("every reading in rounds", False, True),
                               ("batches reading by reading", True, False)):
        seconds, alerts = run(args, calm, typed)
        results[label] = (readings / seconds, alerts)
        print(f"{label:<26} {readings:,} readings in {messages:,} messages: {readings / seconds:>10,.0f} readings/s, "
              f"{seconds / messages * 1e6:6.0f} µs a message, {alerts} alert events")
    (fast, a1), (slow, a2), (by_reading, a3) = results.values()
    assert a1 == a2 == a3, "settling calm readings or decoding typed changed the alerts"
    print(f"ratio to rounds: {fast / slow:.2f}×; to batches parsed by orjson and checked reading by reading: "
          f"{fast / by_reading:.2f}×")


if __name__ == "__main__":
    main()
