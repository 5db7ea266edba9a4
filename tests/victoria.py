"""A throwaway VictoriaMetrics (Debian's victoria-metrics), a server of InfluxDB's v2 write API."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

from gateway.broker import free_port, reachable


class VictoriaMetrics:
    def __init__(self, data_dir: Path, port: int | None = None):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> VictoriaMetrics:
        binary = shutil.which("victoria-metrics") or "/usr/bin/victoria-metrics"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "vm.log", "ab")
        self.process = subprocess.Popen(
            [binary, f"-httpListenAddr=127.0.0.1:{self.port}", f"-storageDataPath={self.data_dir / 'data'}",
             "-retentionPeriod=100y", "-dedup.minScrapeInterval=1ms", "-search.disableCache",
             ], stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 20
        while not reachable("127.0.0.1", self.port, 0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"victoria-metrics did not start: {(self.data_dir / 'vm.log').read_text()[-500:]}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)
        self.process = None

    def export(self, match: str = '{__name__!=""}') -> list[dict]:
        """Every series matching, with its raw samples (after flushing what is still in memory)."""
        urllib.request.urlopen(f"{self.url}/internal/force_flush", timeout=10).read()
        query = urllib.parse.urlencode({"match[]": match, "start": "0"})
        with urllib.request.urlopen(f"{self.url}/api/v1/export?{query}", timeout=30) as response:
            return [json.loads(line) for line in response.read().splitlines() if line.strip()]



