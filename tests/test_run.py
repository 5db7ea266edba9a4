"""`streetbrain run` as a process: embedded broker when none answers, alerts, clean SIGTERM/SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway import security, topics
from gateway.broker import EmbeddedBroker, free_port, reachable
from tests.conftest import ROOT, MqttClient


def start_run(tmp_path: Path, port: int) -> subprocess.Popen[str]:
    config = tmp_path / "street.yaml"
    text = (ROOT / "config.yaml").read_text(encoding="utf-8")
    config.write_text(text.replace("state_dir: var", f"state_dir: {tmp_path / 'var'}")
                      .replace("registry_file: registry/", f"registry_file: {ROOT / 'registry'}/"), encoding="utf-8")
    return subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--config", str(config),
                             "--broker", f"mqtt://127.0.0.1:{port}"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "STREETBRAIN_LOGGING__LEVEL": "info"})


def wait_for_line(process: subprocess.Popen[str], needle: str, timeout_s: float = 15.0) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout_s
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} not seen; output:\n{''.join(lines)}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_run_starts_its_own_broker_on_a_silent_loopback_port_alerts_and_stops_cleanly(tmp_path, signum):
    port = free_port()
    process = start_run(tmp_path, port)
    try:
        wait_for_line(process, "gateway ready")
        assert reachable("127.0.0.1", port)
        broker = EmbeddedBroker(tmp_path, port=port)  # only an address book for the test client
        credentials = security.load(tmp_path / "var")
        assert credentials is not None
        screen = MqttClient(broker, [topics.ALERTS_FILTER], security.OPERATOR_USER, credentials.operator)
        device = MqttClient(broker, username="smk-wangma-007", password=credentials.devices["smk-wangma-007"])
        device.publish(topics.telemetry("wangma", "smoke", "smk-wangma-007"), {"ts": time.time(), "alarm": True})
        _, alert, _ = screen.wait_for(lambda t, a: a["device_id"] == "smk-wangma-007", timeout_s=2)
        assert alert["severity"] == "critical"
        screen.close()
        device.close()

        process.send_signal(signum)
        output, _ = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "gateway stopped" in output
    assert "embedded mosquitto stopped" in output
    assert not reachable("127.0.0.1", port), "the embedded broker outlived the gateway"
    assert "Traceback" not in output
