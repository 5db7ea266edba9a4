"""A fire under overload: how long a smoke alarm waits while bulk telemetry is offered faster than the
gateway takes it (issue 9: "a smoke alarm's alert is never queued behind bulk telemetry").

    .venv/bin/python -m bench.fire                  # about 3 minutes
    .venv/bin/python -m bench.fire --rate 8000 --seconds 20 --every 0.5

One Mosquitto from ``gateway/mosquitto.conf`` on a free loopback port; a registry of meter boxes
(``bench.throughput``'s) and smoke detectors. Two gateways run in turn on it, the same but for
``ingest.smoke_hint_lane`` (gateway/hints.py): for each, meter boxes are offered ``--rate`` 1-reading
QoS 1 messages/s for ``--seconds`` by ``bench.throughput``'s publishers, more than the gateway takes,
so a backlog fills its receive window (``broker.receive_maximum``) and then waits in the broker's
queue for its session. Every ``--every`` seconds meanwhile one smoke detector (a different one each
time) raises its alarm: a QoS 1 message whose ``ts`` is the moment it was published. Printed for each
gateway: the smoke alarms' publish → alert latency (p50 / max, the alert's arrival − its ``ts``), and,
as the baseline measured in the same run, how long the bulk waited: the gateway's lag behind the
publishers when it had taken the last meter reading it got ("taken": when the broker's queue for the
session passes ``max_queued_bytes``, Mosquitto drops what comes next, fires included). The ratio of the
two is what to compare; the machine's 2 cores are shared by broker, publishers and gateway.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from bench.throughput import GatewayProcess, alerts_client, bench_registry, publish
from gateway import topics
from gateway.broker import EmbeddedBroker

console = Console(width=200)


class Fires:
    """Raises smoke alarms at a steady pace and times their alerts."""

    def __init__(self, host: str, port: int, detectors: list[tuple[str, str]]):
        self.detectors = detectors
        self.sent: dict[str, float] = {}
        self.latency: dict[str, float] = {}
        self.lock = threading.Lock()
        self.client = alerts_client(host, port, f"bench-fire-{time.time_ns()}", "smoke_alarm", self._record)

    def _record(self, device_id: str, latency: float) -> None:
        with self.lock:
            self.latency.setdefault(device_id, latency)

    def run(self, every: float, until: float) -> None:
        for site, device in self.detectors:
            if time.time() >= until:
                return
            ts = time.time()
            self.sent[device] = ts
            self.client.publish(topics.telemetry(site, "smoke", device),
                                orjson.dumps({"ts": ts, "alarm": True}), qos=1)
            time.sleep(max(0.0, every - (time.time() - ts)))

    def wait(self, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while len(self.latency) < len(self.sent) and time.time() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def one_gateway(work: Path, broker: EmbeddedBroker, registry: Path, meters: list[tuple[str, str]],
                detectors: list[tuple[str, str]], lane: bool, args: argparse.Namespace) -> dict[str, Any]:
    gateway = GatewayProcess(work, broker.url, registry, "lane" if lane else "no-lane",
                             ingest={"smoke_hint_lane": lane})
    fires = Fires(broker.host, broker.port, detectors)
    try:
        before = gateway.counters()
        start = time.time() + 0.3  # when the publishers begin
        prober = threading.Thread(target=lambda: (time.sleep(max(0.0, start + args.every - time.time())),
                                                  fires.run(args.every, start + args.seconds)), daemon=True)
        prober.start()
        sent = publish(broker.host, broker.port, meters, args.rate, args.seconds, args.per_message, args.publishers,
                       seed=7)
        prober.join()
        last, last_change = before["valid"], time.time()
        while True:  # until the gateway has taken every meter reading, or stops making progress
            now = gateway.counters()
            if now["valid"] != last:
                last, last_change = now["valid"], time.time()
            if now["valid"] + now["rejected"] - before["valid"] - before["rejected"] >= sent["readings"] + len(fires.sent) \
                    or time.time() - last_change > 10:
                break
            time.sleep(0.1)
        fires.wait(10)
        latencies = sorted(fires.latency.values())
        taken = int(now["valid"] - before["valid"]) - len(latencies)
        return {"lane": lane, "offered": sent["messages"] / max(1e-9, sent["t_end"] - sent["t0"]),
                "meters": sent["messages"], "taken": taken // args.per_message, "bulk_lag_s": last_change - sent["t_end"],
                "fires": (len(latencies), len(fires.sent)),
                "p50": latencies[len(latencies) // 2] if latencies else None,
                "max": latencies[-1] if latencies else None,
                "late": sum(1 for device, t in fires.sent.items() if fires.latency.get(device, 1e9) > 1.0)}
    finally:
        fires.close()
        gateway.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--rate", type=float, default=9000.0, help="meter messages/s offered")
    parser.add_argument("--per-message", type=int, default=100, help="readings per meter message (1 to 100)")
    parser.add_argument("--seconds", type=float, default=45.0, help="how long the overload lasts")
    parser.add_argument("--every", type=float, default=1.0, help="a smoke alarm this often")
    parser.add_argument("--devices", type=int, default=20000, help="meter boxes")
    parser.add_argument("--publishers", type=int, default=2, help="load-generating processes")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sb-fire-"))
    registry, meters = bench_registry(work, args.devices)
    fires_each = int(args.seconds / args.every) + 1
    detectors = [(meters[i % len(meters)][0], f"smk-bench-{i:04d}") for i in range(2 * fires_each)]
    with registry.open("a", encoding="utf-8") as out:
        out.writelines(f"{device},smoke,{site},30.31,120.17,,,,,,\n" for site, device in detectors)
    rows = []
    with EmbeddedBroker(work / "broker", persistence=False) as broker:
        for k, lane in enumerate((True, False)):
            console.print(f"gateway, smoke hint lane {'on' if lane else 'off'} …")
            rows.append(one_gateway(work, broker, registry, meters, detectors[k * fires_each:(k + 1) * fires_each],
                                    lane, args))
            console.print(f"  {rows[-1]}")
    table = Table(title=f"bench.fire — meters offered {args.rate:,.0f} msg/s for {args.seconds:g} s, a smoke alarm "
                        f"every {args.every:g} s")
    for column in ("smoke hint lane", "meter msgs", "taken", "bulk waited (s)", "fire alerts", "fire p50 (ms)",
                   "fire max (ms)", "fires > 1 s or lost", "fire max ÷ bulk wait"):
        table.add_column(column, justify="right")
    for row in rows:
        p50, worst = row["p50"], row["max"]
        table.add_row("on" if row["lane"] else "off", f"{row['meters']:,}", f"{row['taken']:,}",
                      f"{row['bulk_lag_s']:.1f}",
                      f"{row['fires'][0]}/{row['fires'][1]}", "—" if p50 is None else f"{p50 * 1000:.0f}",
                      "—" if worst is None else f"{worst * 1000:.0f}", str(row["late"]),
                      "—" if worst is None else f"{worst / max(1e-9, row['bulk_lag_s']):.2f}")
    console.print(table)
    console.print(f"(work directory {work})")


if __name__ == "__main__":
    main()
