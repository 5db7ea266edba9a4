"""Incidents through the running gateway, the command line, and the crash and concurrency cases."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from gateway import topics
from gateway.incidents.queue import IncidentQueue
from gateway.incidents.store import Database
from tests.conftest import ROOT
from tests.test_incidents import alert


def write_config(tmp_path: Path, config) -> Path:
    """The street's config.yaml with this test's broker, state and store."""
    data = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    data["state_dir"] = str(config.state_dir)
    data["registry_file"] = str(ROOT / "registry" / "default-street.csv")
    data["broker"]["url"] = config.broker.url
    data["incidents"]["url"] = config.incidents.url
    path = tmp_path / "street.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def cli(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args, "--config", str(config_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})


def test_a_smoke_alarm_becomes_an_incident_on_screen_and_a_dispatch_from_the_shell_follows_it(
        config, run_gateway, mqtt, tmp_path):
    run_gateway(config)
    screen = mqtt([f"{topics.ROOT}/+/incidents/#"])
    mqtt().publish(topics.telemetry("wangma", "smoke", "smk-wangma-009"), {"ts": time.time(), "alarm": True})
    # (incident topics are retained: earlier incidents of this broker arrive too)
    topic, opened, _ = screen.wait_for(lambda t, a: a["change"]["action"] == "opened"
                                       and a["device_id"] == "smk-wangma-009", timeout_s=3)
    assert topic == topics.incident("wangma", opened["id"])
    assert (opened["state"], opened["team"], opened["fire_station"], opened["device_id"]) == (
        "new", "squad-1", "fire-west", "smk-wangma-009")

    path = write_config(tmp_path, config)
    done = cli(path, "incidents", "dispatch", opened["id"], "--team", "squad-1", "--member", "熊永信",
               "--actor", "王丽", "--note", "nearest patrol")
    assert done.returncode == 0, done.stderr
    _, dispatched, _ = screen.wait_for(lambda t, a: a["change"]["action"] == "dispatch" and a["id"] == opened["id"],
                                       timeout_s=3)
    assert (dispatched["state"], dispatched["change"]["actor"], dispatched["assignee"]) == ("dispatched", "王丽", "熊永信")

    shown = json.loads(cli(path, "incidents", "show", opened["id"], "--json").stdout)
    assert [(a["actor"], a["action"]) for a in shown["audit"]] == [("gateway", "opened"), ("王丽", "dispatch")]
    refused = cli(path, "incidents", "close", opened["id"], "--actor", "王丽")
    assert refused.returncode == 1
    assert "refused: cannot close an incident that is dispatched; from dispatched you can: reassign, arrive, " \
           "resolve, comment" in refused.stderr


def test_report_gives_sla_compliance_per_stage_and_repeat_alerts(config, tmp_path):
    db = Database(config.incidents.url)
    queue = IncidentQueue(config, db)
    now = time.time() - 3600
    fast = queue.absorb([alert("smk-wangma-001", ts=now)], now=now)[0].incident["id"]
    slow = queue.absorb([alert("smk-wangma-002", ts=now)], now=now)[0].incident["id"]
    queue.absorb([alert("smk-wangma-001", event="cleared", ts=now + 5), alert("smk-wangma-001", ts=now + 9)], now=now + 9)
    queue.act(fast, "dispatch", "王丽", now=now + 30)
    queue.act(slow, "dispatch", "王丽", now=now + 90)  # 30 s over the 1-minute target
    db.close()
    path = write_config(tmp_path, config)
    figures = json.loads(cli(path, "report", "--since", "2h", "--json").stdout)
    assert figures["incidents"] == 2
    assert figures["stages"]["dispatch"] == {"judged": 2, "within_target": 1, "within_target_pct": 50.0,
                                             "median_s": 60.0, "p90_s": 84.0}
    assert figures["repeat_alert_rate_pct"] == 50.0
    assert figures["by_rule"] == {"smoke_alarm": 2}
    png = tmp_path / "report.png"
    assert cli(path, "report", "--since", "2h", "--png", str(png)).returncode == 0
    assert png.stat().st_size > 10_000


WRITER = r"""
import sys, time
from gateway.config import load_config
from gateway.incidents.queue import IncidentQueue
from gateway.incidents.store import Database
from tests.test_incidents import alert
config = load_config(sys.argv[1], env={})
url, start, count = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
queue = IncidentQueue(config, Database(url))
for n in range(start, count):
    queue.absorb([alert(f"smk-wangma-{1 + n % 700:03d}", ts=1.8e9 + n)], now=1.8e9 + n)
    print(n, flush=True)  # acknowledged: committed before this line
"""


def test_a_writer_killed_mid_burst_loses_no_acknowledged_incident_and_a_redelivery_duplicates_none(
        street_config, store_url, tmp_path):
    config_path = tmp_path / "c.yaml"
    config_path.write_text((ROOT / "config.yaml").read_text(encoding="utf-8").replace(
        "registry_file: registry/", f"registry_file: {ROOT / 'registry'}/"), encoding="utf-8")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(config_path), store_url, "0", "600"], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    acknowledged = -1
    assert writer.stdout is not None
    for line in writer.stdout:
        acknowledged = int(line)
        if acknowledged >= 150:
            writer.send_signal(signal.SIGKILL)
            break
    writer.wait()
    db = Database(store_url)
    stored = db.fetchone("SELECT COUNT(*) AS n FROM incidents")["n"]
    assert acknowledged >= 150, "the writer never got going"
    assert stored >= acknowledged + 1  # every acknowledged alert is there
    # the broker redelivers what was not acknowledged, and some of what was: run the burst again
    subprocess.run([sys.executable, "-c", WRITER, str(config_path), store_url, "0", "600"], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    counts = db.fetchall("SELECT device_id, COUNT(*) AS n FROM incidents GROUP BY device_id HAVING COUNT(*) > 1")
    assert counts == []  # one incident per device: nothing duplicated
    assert db.fetchone("SELECT COUNT(*) AS n FROM incidents")["n"] == 600
    assert db.fetchone("SELECT COUNT(*) AS n FROM occurrences")["n"] == 600
    db.close()


RACER = r"""
import sys
from gateway.config import load_config
from gateway.incidents.queue import IncidentQueue
from gateway.incidents.store import Database
from tests.test_incidents import alert
config = load_config(sys.argv[1], env={})
queue = IncidentQueue(config, Database(sys.argv[2]))
sys.stdout.write("ready\n"); sys.stdout.flush()
sys.stdin.readline()  # both start together
for n in range(100):
    queue.absorb([alert("smk-wangma-001", ts=1.8e9 + 10 * n, event="raised" if n % 2 == 0 else "cleared")],
                 now=1.8e9 + 10 * n)
"""


def test_two_gateways_on_one_postgresql_raising_the_same_alert_leave_exactly_one_open_incident(postgres, tmp_path):
    url = postgres.create_database(f"race_{time.time_ns() % 10**6}")
    config_path = tmp_path / "c.yaml"
    config_path.write_text((ROOT / "config.yaml").read_text(encoding="utf-8").replace(
        "registry_file: registry/", f"registry_file: {ROOT / 'registry'}/"), encoding="utf-8")
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(config_path), url], cwd=ROOT, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True) for _ in range(2)]
    for racer in racers:
        assert racer.stdout is not None and racer.stdout.readline().strip() == "ready"
    for racer in racers:
        assert racer.stdin is not None
        racer.stdin.write("go\n")
        racer.stdin.flush()
    for racer in racers:
        racer.stdin.close()  # type: ignore[union-attr]
        assert racer.wait(120) == 0
    db = Database(url)
    assert db.fetchone("SELECT COUNT(*) AS n FROM incidents WHERE is_open = 1")["n"] == 1
    assert db.fetchone("SELECT COUNT(*) AS n FROM incidents")["n"] == 1
    assert db.fetchone("SELECT COUNT(*) AS n FROM occurrences")["n"] == 100  # each event once, whoever wrote it
    db.close()

