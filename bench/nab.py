"""The anomaly scorer (detectors/anomaly.py) over the Numenta Anomaly Benchmark's series, in NAB's
results layout, with its throughput.

    .venv/bin/python -m bench.nab --data ../shared/data/nab-dev/data --out /tmp/nab-results
    python3 ../shared/tools/nab_score.py /tmp/nab-results --nab-root ../shared/data/nab-dev --allow-subset \
        --detector streetbrain      # the results are streetbrain_<file>.csv

Every ``DATA/<category>/<file>.csv`` (columns ``timestamp,value``) is one series, as one device of a
kind would be: series sampled at the same interval share one detector, whose seasonal period is a day
of readings; each series is scored as blocks of ``--block`` readings (vectorised along time, the
state carried from block to block). Writes ``OUT/<category>/streetbrain_<file>.csv`` with
``timestamp,value,anomaly_score``, one row per input row in order. The figures printed are wall time
on one core: scoring alone (the fastest of ``--repeat`` passes over the corpus, each with fresh
detectors: a pass is ~0.1 s, at the mercy of the shared machine), and the whole run including
reading and writing the CSV files (with one pass).
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from detectors.anomaly import Anomaly

DAY_S = 86400.0
DETECTOR = "streetbrain"


def read_series(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(timestamps as written, values as written, values) of one NAB data file."""
    lines = path.read_text().splitlines()
    stamps, texts = [], []
    for line in lines[1:]:
        if line:
            stamp, text = line.rsplit(",", 1)
            stamps.append(stamp)
            texts.append(text)
    return stamps, texts, np.array(texts, dtype=np.float64)


def daily_period(stamps: list[str]) -> int:
    """Readings per day at the series' typical interval (0 when it does not divide a day)."""
    if len(stamps) < 3:
        return 0
    times = np.array([datetime.fromisoformat(s).timestamp() for s in stamps[:1000]])
    interval = float(np.median(np.diff(times)))
    per_day = DAY_S / interval if interval > 0 else 0.0
    return int(round(per_day)) if per_day >= 2 and abs(per_day - round(per_day)) < 1e-6 else 0


def score_corpus(series: list[np.ndarray], periods: list[int], block: int) -> list[np.ndarray]:
    """Scores of every series; one detector per period, each series one row of it."""
    scores: list[np.ndarray] = [np.empty(0)] * len(series)
    for period in sorted(set(periods)):
        members = [i for i, p in enumerate(periods) if p == period]
        detector = Anomaly(len(members), period=period)
        for row, i in enumerate(members):
            values = series[i]
            parts = [detector.score(np.array([row]), values[None, start:start + block])[0]
                     for start in range(0, values.shape[0], block)]
            scores[i] = np.concatenate(parts)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="NAB data folder: <category>/<file>.csv")
    parser.add_argument("--out", type=Path, required=True, help="results folder (NAB layout)")
    parser.add_argument("--block", type=int, default=4096, help="readings per scoring call per series")
    parser.add_argument("--cpu", type=int, default=0, help="pin to this core (-1: do not pin)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="score the corpus this many times (fresh detectors) and report the fastest")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.cpu >= 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    files = sorted(args.data.glob("*/*.csv"))
    if not files:
        parser.error(f"no <category>/<file>.csv under {args.data}")

    started = time.perf_counter()
    loaded = [read_series(f) for f in files]
    periods = [daily_period(stamps) for stamps, _, _ in loaded]
    passes = []
    for _ in range(args.repeat):  # a pass is ~0.1 s: one alone is at the mercy of the shared machine
        scoring = time.perf_counter()
        scores = score_corpus([values for _, _, values in loaded], periods, args.block)
        passes.append(time.perf_counter() - scoring)
    scored = time.perf_counter()
    for path, (stamps, texts, _), file_scores in zip(files, loaded, scores):
        out = args.out / path.parent.name / f"{DETECTOR}_{path.name}"
        out.parent.mkdir(parents=True, exist_ok=True)
        rows = (f"{t},{v},{s:.9f}\n" for t, v, s in zip(stamps, texts, file_scores.tolist()))
        out.write_text("timestamp,value,anomaly_score\n" + "".join(rows))
    finished = time.perf_counter()

    n = sum(values.shape[0] for _, _, values in loaded)
    whole = finished - started - sum(passes) + passes[-1]  # reading, one scoring pass, writing
    timed = ((f"scoring (fastest of {args.repeat})", min(passes)), ("whole run (CSV in and out)", whole))
    for label, seconds in timed:
        print(f"{label:<28} {len(files)} series, {n:,} readings in {seconds:.3f} s: "
              f"{len(files) / seconds:,.0f} series/s, {n / seconds:,.0f} readings/s")


if __name__ == "__main__":
    main()
