"""The gateway's processing of batched messages in one process, without the broker: decode, validate,
detect (with the late-reading replay), as ``Pipeline.process`` does it for each drain of the receive
queue, on meter boxes.

    .venv/bin/python -m bench.pipeline [--per-message 100] [--drain 30] [--drains 400] [--devices 20000]

Each drain holds ``--drain`` messages of ``--per-message`` readings, from ``--devices`` meter boxes of a
generated registry in turn (as bench/throughput.py's publishers send them; ``--devices 0``: the default
street's meter boxes); 1% of messages end with a reading over ``meter_overheat`` (the box's next message
clears it). The gateway's clock runs with the readings, as if they came at ``--rate`` messages a second,
so the replay buffer fills to its bound (``detection.replay_max_pending``) and the shadow settles it
as in the gateway. Printed: readings/s and µs a message, and baselines in the same run: every reading
stepped in rounds (calm readings not settled in one pass, rules/engine.py), the shadow stepping every
reading (no live state copied to it, rules/replay.py), and batches parsed by orjson and checked reading
by reading (what the gateway does with a batch that is not plain).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import orjson

from bench.throughput import bench_registry
from gateway import topics
from gateway.config import load_config
from gateway.pipeline import Pipeline
from gateway.registry import Registry

ROOT = Path(__file__).resolve().parent.parent


def drains(count: int, per_message: int, drain: int, now: float, rate: float,
           devices: list[tuple[str, str]]) -> list[list[tuple[str, bytes]]]:
    out = []
    for d in range(count):
        messages = []
        for m in range(drain):
            k = d * drain + m
            site, device = devices[k % len(devices)]
            start = now + k / rate
            hot = k % 100 == 0
            batch = [{"ts": start + i * 1e-4, "seq": k * per_message + i,
                      "temp_c": 75.0 if hot and i == per_message - 1 else 30.0 + (i % 7) * 0.1,
                      "current_a": 8.0 + i % 11, "voltage_v": 221.5, "leakage_ma": 1.2} for i in range(per_message)]
            body = {"readings": batch} if per_message > 1 else batch[0]
            messages.append((topics.telemetry(site, "meter", device), orjson.dumps(body)))
        out.append(messages)
    return out


def run(args: argparse.Namespace, registry: Path | None, calm: bool = True, typed: bool = True,
        copy: bool = True) -> tuple[float, int, int]:
    config = load_config(ROOT / "config.yaml", env={"STREETBRAIN_REGISTRY_FILE": str(registry)} if registry else {})
    if registry is not None:
        config.devices = [d for d in config.devices if d.kind == "meter" and d.id.startswith("mtr-bench-")]
    config.ingest.device_rate_per_s = 0  # the limiter is not what is measured here
    pipeline = Pipeline(config, Registry.from_config(config))
    for decoder in pipeline.decoder.typed.values():
        decoder.enabled &= typed
    for engine in pipeline.engines.values():
        engine.calm_settles &= calm
        engine.shadow.calm_settles &= calm
        engine.copies_caught_up &= copy
    devices = [(d.site, d.id) for d in config.devices if d.kind == "meter"]
    now = time.time() - 3600
    # warm up until the replay buffer is at its bound, where a gateway under load runs
    warm = config.detection.replay_max_pending // (args.drain * args.per_message) + 5
    work = drains(warm + args.drains, args.per_message, args.drain, now, args.rate, devices)

    def clock(d: int) -> float:  # the gateway's time: drain d's last message has just come
        return now + (d + 1) * args.drain / args.rate + 0.005

    for d, messages in enumerate(work[:warm]):
        pipeline.process(messages, clock(d))
    alerts = 0
    copied = pipeline.engines["meter"].caught_up
    start = time.perf_counter()
    for d, messages in enumerate(work[warm:], warm):
        outcome = pipeline.process(messages, clock(d))
        alerts += len(outcome.alerts)
        if outcome.deadletters:
            raise SystemExit(f"dead letter: {outcome.deadletters[0]}")
    return time.perf_counter() - start, alerts, pipeline.engines["meter"].caught_up - copied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-message", type=int, default=100)
    parser.add_argument("--drain", type=int, default=30, help="messages a drain of the receive queue holds")
    parser.add_argument("--drains", type=int, default=400)
    parser.add_argument("--devices", type=int, default=20_000,
                        help="meter boxes of a generated registry (0: the default street's)")
    parser.add_argument("--rate", type=float, default=5000.0, help="messages a second, for the gateway's clock")
    parser.add_argument("--cpu", type=int, default=0, help="pin to this core (-1: do not pin)")
    args = parser.parse_args()
    if args.cpu >= 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    messages = args.drains * args.drain
    readings = messages * args.per_message
    with tempfile.TemporaryDirectory() as tmp:
        registry = bench_registry(Path(tmp), args.devices)[0] if args.devices else None
        results = {}
        for label, options in (("calm readings settled", {}), ("every reading in rounds", {"calm": False}),
                               ("shadow steps every reading", {"copy": False}),
                               ("batches reading by reading", {"typed": False})):
            seconds, alerts, copied = run(args, registry, **options)
            results[label] = (readings / seconds, alerts)
            print(f"{label:<27} {readings:,} readings in {messages:,} messages: "
                  f"{readings / seconds:>10,.0f} readings/s, {seconds / messages * 1e6:6.0f} µs a message, "
                  f"{alerts} alert events, "
                  f"{copied:,} readings the shadow took as copied state")
    (fast, a1), *others = results.values()
    assert all(a == a1 for _, a in others), "settling calm readings, copying or decoding typed changed the alerts"
    print("ratio to " + "; to ".join(f"{label}: {fast / rate:.2f}×" for label, (rate, _) in list(results.items())[1:]))


if __name__ == "__main__":
    main()
