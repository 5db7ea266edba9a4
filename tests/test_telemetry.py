"""The telemetry store path against a real server of InfluxDB's v2 write API (VictoriaMetrics)."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from gateway import topics
from gateway.config import InfluxConfig
from gateway.schemas import EvChargerReading, MeterReading
from gateway.telemetry.sink import TelemetrySink
from gateway.telemetry.spool import Spool
from tests.victoria import VictoriaMetrics

T0 = 1_795_300_000.0


@pytest.fixture
def vm(tmp_path: Path):
    server = VictoriaMetrics(tmp_path / "vm").start()
    yield server
    server.stop()


def burst(n: int, start: int = 0) -> list[tuple[str, str, str, MeterReading]]:
    return [("meter", "wangma", f"mtr-wangma-{i % 50:03d}",
             MeterReading(ts=T0 + i, seq=i, current_a=float(i % 40), temp_c=30.0 + i % 7)) for i in range(start, n)]


def samples(server: VictoriaMetrics, name: str) -> Counter[tuple[str, int]]:
    """(device, timestamp ms) → how many samples the store holds for it."""
    out: Counter[tuple[str, int]] = Counter()
    for series in server.export(f'{{__name__="{name}"}}'):
        for ts in series["timestamps"]:
            out[(series["metric"]["device"], ts)] += 1
    return out


def sink_for(server: VictoriaMetrics, spool: Path, **options) -> TelemetrySink:
    return TelemetrySink(InfluxConfig(url=server.url, flush_interval_s=0.05, batch_size=500, timeout_s=2, **options), spool)


def test_a_burst_is_stored_with_its_tags_fields_and_device_times(vm, tmp_path):
    sink = sink_for(vm, tmp_path / "spool")
    sink.readings(burst(2000))
    sink.readings([("ev_charger", "fengqi", "evc-fengqi-01",
                    EvChargerReading(ts=T0 + 0.25, port=7, power_w=151.5, leakage_ma=2.0, note="unknown field"))])
    sink.flush()
    sink.close()
    stored = samples(vm, "meter_current_a")
    assert len(stored) == 2000 and set(stored.values()) == {1}
    assert (f"mtr-wangma-{1234 % 50:03d}", int((T0 + 1234) * 1000)) in stored
    [charger] = vm.export('{__name__="ev_charger_power_w"}')
    assert charger["metric"] == {"__name__": "ev_charger_power_w", "site": "fengqi", "kind": "ev_charger",
                                 "device": "evc-fengqi-01", "port": "7"}
    assert (charger["values"], charger["timestamps"]) == ([151.5], [int(T0 * 1000) + 250])


def test_store_stopped_mid_burst_then_back_holds_every_point_exactly_once(vm, tmp_path):
    sink = sink_for(vm, tmp_path / "spool")
    sink.readings(burst(1500))
    sink.flush()
    vm.stop()
    sink.readings(burst(4000, start=1500))  # the store is away: these go to the spool
    sink.flush()
    time.sleep(0.3)
    assert not sink.up and len(sink.spool) > 0
    vm.start()
    deadline = time.monotonic() + 40
    while (len(sink.spool) or not sink.up) and time.monotonic() < deadline:
        time.sleep(0.2)
    sink.close()
    stored = samples(vm, "meter_current_a")
    assert len(stored) == 4000 and set(stored.values()) == {1}


def test_gateway_restarted_while_its_spool_holds_data_replays_it(vm, tmp_path):
    vm.stop()
    first = sink_for(vm, tmp_path / "spool")
    first.readings(burst(3000))
    first.flush()
    first.close()  # the gateway stops with the store still away
    assert len(Spool(tmp_path / "spool", 2**30)) > 0
    vm.start()
    second = sink_for(vm, tmp_path / "spool")
    deadline = time.monotonic() + 40
    while len(second.spool) and time.monotonic() < deadline:
        time.sleep(0.2)
    second.close()
    stored = samples(vm, "meter_current_a")
    assert len(stored) == 3000 and set(stored.values()) == {1}


def test_a_full_spool_drops_the_oldest_telemetry_first_and_events_last(tmp_path):
    spool = Spool(tmp_path / "spool", max_bytes=4000)
    spool.append("events", [b"alerts,device=d1 value=1 1"])
    for n in range(30):
        spool.append("telemetry", [b"meter,device=d%d temp_c=30 %d" % (n, n)] * 5)
    classes = [s.cls for s in spool.segments]
    assert classes[0] == "events" and spool.bytes <= 4000
    assert spool.dropped_lines["telemetry"] > 0 and spool.dropped_lines["events"] == 0
    oldest_kept = int(spool.oldest()[1][0].rsplit(b" ", 1)[1])  # events first, then the newest telemetry
    assert oldest_kept == 1
    reopened = Spool(tmp_path / "spool", max_bytes=4000)  # survives a restart
    assert [s.seq for s in reopened.segments] == [s.seq for s in spool.segments]


def test_bad_points_are_refused_alone_and_the_rest_of_the_batch_is_written(vm, tmp_path):
    sink = sink_for(vm, tmp_path / "spool", max_string_bytes=64)
    good = burst(100)
    changed_type = ("meter", "wangma", "mtr-wangma-900", MeterReading(ts=T0, current_a=1.0, temp_c=30.0, firmware=3.1))
    now_text = ("meter", "wangma", "mtr-wangma-901", MeterReading(ts=T0, current_a=1.0, firmware="v3.1"))
    too_long = ("meter", "wangma", "mtr-wangma-902", MeterReading(ts=T0, current_a=1.0, comment="x" * 500))
    sink.readings([changed_type, *good[:50], now_text, too_long, *good[50:]])
    sink.flush()
    sink.close()
    assert sink.rejected["guard"] == 2
    stored = samples(vm, "meter_current_a")
    assert len(stored) == 101 and ("mtr-wangma-900", int(T0 * 1000)) in stored


def test_the_gateway_keeps_readings_alerts_and_incident_changes(config, run_gateway, mqtt, vm):
    config.influx.url = vm.url
    config.influx.flush_interval_s = 0.05
    gateway = run_gateway(config)
    device = mqtt()
    screen = mqtt([topics.ALERTS_FILTER])
    now = time.time()
    device.publish(topics.telemetry("wangma", "smoke", "smk-wangma-004"), {"ts": now, "alarm": True, "temp_c": 31.0})
    # a batch message (checked as columns, not reading by reading) is stored reading by reading
    batch = [{"ts": now - 30 + i, "seq": i, "port": 1 + i % 2, "power_w": 150.0 + i} for i in range(12)]
    device.publish(topics.telemetry("wangma", "ev_charger", "evc-wangma-01"), {"readings": batch})
    screen.wait_for(lambda t, a: a["device_id"] == "smk-wangma-004")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not vm.export('{__name__="incidents_occurrences"}'):
        gateway.gateway.telemetry.flush()
        time.sleep(0.2)
    [temp] = vm.export('{__name__="smoke_temp_c", device="smk-wangma-004"}')
    assert temp["values"] == [31.0] and temp["timestamps"] == [int(round(now * 1000))]
    [alert] = vm.export('{__name__="alerts_value", device="smk-wangma-004"}')
    assert (alert["metric"]["rule"], alert["metric"]["severity"], alert["metric"]["event"]) == (
        "smoke_alarm", "critical", "raised")
    [opened] = vm.export('{__name__="incidents_occurrences", action="opened", rule="smoke_alarm"}')
    assert (opened["metric"]["site"], opened["metric"]["state"], opened["values"]) == ("wangma", "new", [1.0])
    sent = {(str(1 + i % 2), int(round((now - 30 + i) * 1000)), 150.0 + i) for i in range(12)}
    deadline = time.monotonic() + 10
    while True:
        gateway.gateway.telemetry.flush()
        stored = {(s["metric"]["port"], t, v) for s in vm.export('{__name__="ev_charger_power_w", device="evc-wangma-01"}')
                  for t, v in zip(s["timestamps"], s["values"])}
        if stored == sent or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert stored == sent


def test_history_reads_a_devices_points_back_from_the_store(vm, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    sink = sink_for(vm, tmp_path / "spool")
    now = time.time()
    sink.readings([("meter", "wangma", "mtr-wangma-005", MeterReading(ts=now - 60 * i, current_a=10.0 + i, temp_c=31.0))
                   for i in range(5)])
    sink.flush()
    sink.close()
    import yaml

    data = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    data["registry_file"] = str(ROOT / "registry" / "default-street.csv")
    data["influx"]["url"] = vm.url
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    vm.export()  # flush the store's memory
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "history", "mtr-wangma-005", "--since", "10m",
                             "--field", "current_a", "--json", "--config", str(config)], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env={**os.environ})
    assert result.returncode == 0, result.stderr
    points = json.loads(result.stdout)
    assert [(p["measurement"], p["field"], p["value"]) for p in points] == [
        ("meter", "current_a", 10.0 + i) for i in reversed(range(5))]
    assert points[-1]["time"] == pytest.approx(now, abs=0.001)
