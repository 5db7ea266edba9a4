"""Coverage-guided fuzzing of what devices send (atheris, libFuzzer): topic parser, payload decoder,
validation and detection, one message at a time through the gateway's own pipeline.

    .venv/bin/python tests/fuzz/decode.py -runs=100000          # or -max_total_time=600
    .venv/bin/python tests/fuzz/decode.py CORPUS_DIR -runs=...   # seeds it with real messages, keeps finds

Any exception escaping the pipeline, a dead letter without a reason, or an internal error ends the
run with the input that caused it (libFuzzer writes it to crash-<sha1>).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["gateway", "rules", "detectors"]):
    from gateway import topics
    from gateway.config import load_config
    from gateway.pipeline import Pipeline
    from gateway.registry import Registry

ROOT = Path(__file__).resolve().parents[2]
CONFIG = load_config(ROOT / "config.yaml", env={})
CONFIG.ingest.device_rate_per_s = 0  # the limiter would drop most inputs before they are parsed
PIPELINE = Pipeline(CONFIG, Registry.from_config(CONFIG))
NOW = 1_795_300_000.0
TOPICS = [
    topics.telemetry("wangma", "smoke", "smk-wangma-001"),
    topics.telemetry("wangma", "ev_charger", "evc-wangma-01"),
    topics.telemetry("dongxin", "noise", "noise-01"),
    topics.telemetry("wangma", "meter", "mtr-wangma-001"),
    topics.status("dongxin", "noise", "noise-01"),
]


def split(data: bytes) -> tuple[str, bytes]:
    """Input layout: one byte choosing a device topic (or: a topic of its own up to a newline), then
    the payload. Seeds written the same way (``seed_corpus``) give the fuzzer real messages to mutate."""
    if not data:
        return TOPICS[0], b""
    choice = data[0] % (len(TOPICS) + 1)
    if choice < len(TOPICS):
        return TOPICS[choice], data[1:]
    topic, _, payload = data[1:].partition(b"\n")
    return topic.decode("utf-8", "replace"), payload


def seed_corpus(directory: Path) -> None:
    """Valid and nearly valid messages of every kind, as starting points."""
    samples = [
        (0, b'{"ts": 1795300000, "seq": 1, "alarm": false, "smoke_obscuration_pct_m": 0.1, "temp_c": 22.5}'),
        (0, b'{"readings": [{"ts": "2026-11-22T08:00:00+08:00", "alarm": true}, {"ts": 1795300001, "co_ppm": 5}]}'),
        (1, b'{"readings": [{"ts": 1795300000, "port": 3, "power_w": 150.5, "leakage_ma": 2}]}'),
        (1, b'{"ts": 1795300000, "port": 1, "power_w": 1200, "device_id": "evc-wangma-01"}'),
        (2, b'{"ts": 1795300000, "laeq_db": 55.1, "lmax_db": 66, "lmin_db": 48, "interval_s": 60}'),
        (3, b'{"ts": 1795300000, "current_a": 12.5, "voltage_v": 220, "leakage_ma": 3, "temp_c": 30}'),
        (4, b"offline"),
        (len(TOPICS), b"streetbrain/wangma/smoke/smk-wangma-002/telemetry\n{\"ts\": 1795300000}"),
    ]
    directory.mkdir(parents=True, exist_ok=True)
    for i, (choice, payload) in enumerate(samples):
        (directory / f"seed-{i}").write_bytes(bytes([choice]) + payload)


def one(data: bytes) -> None:
    topic, payload = split(data)
    errors = PIPELINE.stats.pipeline_errors
    out = PIPELINE.process([(topic, payload)], NOW)
    for letter in out.deadletters:
        if not letter.reason or not letter.detail or letter.reason == "internal_error":
            raise AssertionError(f"dead letter without a usable reason: {letter.problems!r}")
        letter.to_json(NOW)
    if PIPELINE.stats.pipeline_errors != errors:
        raise AssertionError("the pipeline caught an internal error")
    PIPELINE.check_offline(time.time())


if __name__ == "__main__":
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
        seed_corpus(Path(sys.argv[1]))
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
