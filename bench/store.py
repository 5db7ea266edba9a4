"""Telemetry store throughput: points/s through the gateway's path (TelemetrySink: encode, check,
batch, write) next to influxdb-client writing the same points directly, in the same run, against a
VictoriaMetrics (Debian's victoria-metrics, a server of InfluxDB's v2 write API) started for it.

    .venv/bin/python -m bench.store [--readings 100000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


from influxdb_client import InfluxDBClient
from influxdb_client.client.write_api import SYNCHRONOUS

from gateway.config import InfluxConfig
from gateway.schemas import MeterReading
from gateway.telemetry import points
from gateway.telemetry.sink import TelemetrySink
from tests.victoria import VictoriaMetrics


T0 = 1.8e9


def readings(n: int, offset: float) -> list[tuple[str, str, str, MeterReading]]:
    return [("meter", "wangma", f"mtr-{i % 1000:04d}",
             MeterReading(ts=T0 + offset + i * 0.001, seq=i, current_a=float(i % 40), voltage_v=220.0,
                          leakage_ma=2.0, temp_c=31.0)) for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readings", type=int, default=100000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sb-store-"))
    server = VictoriaMetrics(work / "vm").start()
    try:
        config = InfluxConfig(url=server.url, batch_size=5000, flush_interval_s=0.05, max_pending=10**7)
        n = args.readings

        data = readings(n, 0.0)
        sink = TelemetrySink(config, work / "spool")
        start = time.perf_counter()
        sink.readings(data)
        sink.flush(timeout_s=600)
        gateway_s = time.perf_counter() - start
        sink.close()

        data = readings(n, 10_000.0)
        with InfluxDBClient(url=server.url, org="streetbrain", token="") as client:
            write = client.write_api(write_options=SYNCHRONOUS)
            start = time.perf_counter()
            built = [points.reading_point(*item) for item in data]
            for i in range(0, n, 5000):
                write.write(bucket="streetbrain", record=built[i:i + 5000])
            direct_s = time.perf_counter() - start

        print(f"{n:,} readings of 4 fields each, batches of 5,000, VictoriaMetrics on loopback")
        print(f"{'path':<44} {'readings/s':>12} {'× direct':>9}")
        print(f"{'influxdb-client directly (Point → write)':<44} {n / direct_s:>12,.0f} {1.0:>9.2f}")
        print(f"{'gateway sink (queue, check, spool-ready)':<44} {n / gateway_s:>12,.0f} {direct_s / gateway_s:>9.2f}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
