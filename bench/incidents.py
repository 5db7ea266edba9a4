"""Incident queue throughput on SQLite and PostgreSQL, next to a raw INSERT of the same rows.

    .venv/bin/python -m bench.incidents [--alerts 3000] [--no-postgres]

Measures, per store, in one run: alerts absorbed per second (a mix of new incidents and repeat
occurrences), one alert per call and 100 per call (a busy gateway's batch: one transaction), lifecycle
transitions per second
(ack → dispatch → arrive → resolve → close, each audited), and the baseline: plain single-row
INSERTs into a table of the same width, one transaction each.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


from gateway.config import load_config
from gateway.incidents.queue import IncidentQueue
from gateway.incidents.store import Database
from tests.test_incidents import alert

ROOT = Path(__file__).resolve().parent.parent

CONFIG = load_config(ROOT / "config.yaml", env={})
T0 = 1.8e9


def measure(url: str, n_alerts: int) -> dict[str, float]:
    db = Database(url)
    queue = IncidentQueue(CONFIG.model_copy(deep=True), db)
    devices = max(1, n_alerts // 3)  # each device alerts three times: one incident, two occurrences
    alerts = [alert(f"smk-wangma-{1 + n % 700:03d}" if devices <= 700 else f"dev-{n % devices}",
                    ts=T0 + n) for n in range(n_alerts)]
    start = time.perf_counter()
    for n, a in enumerate(alerts):
        queue.absorb([a], now=T0 + n)
    absorbed = n_alerts / (time.perf_counter() - start)

    batched = [alert(f"dev-b{n % devices}", ts=T0 + n) for n in range(n_alerts)]
    start = time.perf_counter()
    for i in range(0, n_alerts, 100):  # a busy gateway hands over many alerts per wake-up
        queue.absorb(batched[i:i + 100], now=T0 + i)
    absorbed_batched = n_alerts / (time.perf_counter() - start)

    ids = [r["id"] for r in db.fetchall("SELECT id FROM incidents WHERE is_open = 1")][:1000]
    steps = [("ack", None), ("dispatch", None), ("arrive", None), ("resolve", "done"), ("close", "revisited")]
    start = time.perf_counter()
    for incident_id in ids:
        for action, note in steps:
            queue.act(incident_id, action, "bench", note=note, team="squad-1" if action == "dispatch" else None)
    transitions = len(ids) * len(steps) / (time.perf_counter() - start)

    db.execute("CREATE TABLE raw_insert (id TEXT PRIMARY KEY, a TEXT, b TEXT, c DOUBLE PRECISION, d DOUBLE PRECISION)")
    start = time.perf_counter()
    for n in range(n_alerts):
        with db.transaction():
            db.execute("INSERT INTO raw_insert VALUES (?, ?, ?, ?, ?)", (f"r{n}", "smoke", "wangma", float(n), 1.0))
    raw = n_alerts / (time.perf_counter() - start)
    db.close()
    return {"absorbed": absorbed, "batched": absorbed_batched, "transitions": transitions, "raw": raw}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alerts", type=int, default=3000)
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sb-bench-"))
    stores = [("sqlite (WAL, synchronous=FULL)", f"sqlite:///{work / 'incidents.db'}")]
    server = None
    if not args.no_postgres:
        from tests.postgres import PostgresServer, find_bin

        if find_bin() is not None:
            server = PostgresServer(work / "pg").start()
            stores.append(("postgresql (loopback, fsync off)", server.create_database("bench")))
    print(f"{'store':<34} {'alerts/s':>10} {'in 100s/s':>10} {'transitions/s':>14} {'raw INSERT/s':>13} "
          f"{'alerts ÷ raw':>13}")
    try:
        for name, url in stores:
            r = measure(url, args.alerts)
            print(f"{name:<34} {r['absorbed']:>10,.0f} {r['batched']:>10,.0f} {r['transitions']:>14,.0f} "
                  f"{r['raw']:>13,.0f} {r['absorbed'] / r['raw']:>13.2f}")
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
