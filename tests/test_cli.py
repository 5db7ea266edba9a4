"""The `streetbrain` command line: every verb has help, lists print JSON, the demo raises alerts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VERBS = ["run", "demo", "simulate", "evaluate", "devices", "check-config"]


def streetbrain(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200"})


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help_naming_config(verb):
    result = streetbrain(verb, "--help")
    assert result.returncode == 0
    assert "--config FILE" in result.stdout


@pytest.mark.parametrize("verb", ["run", "demo", "simulate", "evaluate"])
def test_mqtt_verbs_take_a_broker_url_and_refuse_a_bad_one(verb):
    assert "--broker mqtt://HOST:PORT" in streetbrain(verb, "--help").stdout
    result = streetbrain(verb, "--broker", "http://nowhere")
    assert result.returncode == 2
    assert "is not mqtt://HOST:PORT" in result.stderr


def test_devices_json_lists_the_registry_filtered_by_kind():
    result = streetbrain("devices", "--kind", "noise", "--json")
    assert result.returncode == 0, result.stderr
    devices = json.loads(result.stdout)
    assert len(devices) == 14
    first = devices[0]
    assert {"id", "kind", "site", "lat", "lon", "zone_class", "name"} <= set(first)
    assert {d["kind"] for d in devices} == {"noise"}


def test_devices_table_shows_charging_ports():
    result = streetbrain("devices", "--kind", "ev_charger")
    assert result.returncode == 0
    assert "10 ports × 1000 W" in result.stdout


def test_missing_config_file_says_what_to_do():
    result = streetbrain("devices", "--config", "/nonexistent/street.yaml")
    assert result.returncode == 3
    assert "file not found; pass --config FILE" in result.stderr


def test_demo_street_raises_alerts_and_stops_by_itself(tmp_path):
    config = tmp_path / "demo.yaml"
    # the shipped street, with its state kept out of the repo
    text = (ROOT / "config.yaml").read_text(encoding="utf-8")
    config.write_text(text.replace("state_dir: var", f"state_dir: {tmp_path / 'var'}")
                      .replace("registry_file: registry/", f"registry_file: {ROOT / 'registry'}/"), encoding="utf-8")
    result = streetbrain("demo", "--config", str(config), "--duration", "12", "--event-every", "2",
                         "--interval", "2", timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "simulator injects" in result.stdout
    assert " raised " in result.stdout
    summary = next(line for line in result.stdout.splitlines() if line.startswith("published "))
    assert "incidents opened" in summary and "rejected 0" in summary


def test_watch_follows_alerts_and_incidents_on_the_broker(config, run_gateway, mqtt, tmp_path):
    import signal
    import time

    from gateway import topics

    run_gateway(config)
    watcher = subprocess.Popen([sys.executable, "-m", "gateway.cli", "watch", "--broker", config.broker.url,
                                "--kind", "smoke"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "COLUMNS": "200"})
    time.sleep(3.0)  # the watcher starts a Python process and subscribes: leave it the time on a busy machine
    mqtt().publish(topics.telemetry("fengqi", "smoke", "smk-fengqi-031"), {"ts": time.time(), "alarm": True})
    mqtt().publish(topics.telemetry("wangma", "meter", "mtr-wangma-031"), {"ts": time.time(), "temp_c": 80.0})
    time.sleep(2.0)
    watcher.send_signal(signal.SIGINT)
    out, err = watcher.communicate(timeout=10)
    assert watcher.returncode == 0, err
    assert "fengqi/smk-fengqi-031" in out and "烟感报警" in out  # the alert
    assert "open incidents" in out and "critical" in out  # and its incident
    assert "mtr-wangma-031" not in out  # --kind smoke
