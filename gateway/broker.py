"""An embedded Mosquitto on loopback, for one street on one machine and for the tests."""

from __future__ import annotations

import logging
import os
import resource
import shutil
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger("streetbrain.broker")

CONF_TEMPLATE = Path(__file__).with_name("mosquitto.conf")


class BrokerError(RuntimeError):
    pass


def find_mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def reachable(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


OPEN_FILES = 1_048_576  # the soft limit wanted for the broker: one socket per device, and then some


def raise_open_files_limit() -> int:
    """Every device holds a connection, a socket of the broker's: with a soft limit of 1,024 open
    files (a common default) the broker would refuse a street's 1,000th device. Raised as far as the
    hard limit allows, in our process, so that the broker started from it inherits it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES if hard == resource.RLIM_INFINITY else min(OPEN_FILES, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit for the broker soft=%s hard=%s error=%s", soft, hard, exc)
    return soft


class EmbeddedBroker:
    """Mosquitto started from ``gateway/mosquitto.conf`` with its own data directory.

    Usable as a context manager; ``stop()`` is idempotent.
    """

    def __init__(self, data_dir: Path, port: int | None = None, host: str = "127.0.0.1",
                 persistence: bool = True, auth: tuple[Path, Path] | None = None,
                 tls: tuple[Path, Path, Path] | None = None):
        self.auth = auth  # (password file, ACL file): anonymous access off; None: a rig for tests
        self.tls = tls  # (CA certificate, certificate, key): the listener speaks TLS only
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port or free_port(host)
        self.persistence = persistence
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "mosquitto.log"

    def write_conf(self) -> Path:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = CONF_TEMPLATE.read_text(encoding="utf-8").format(
            port=self.port, host=self.host, data_dir=self.data_dir.resolve(),
            persistence="true" if self.persistence else "false",
            auth=(f"allow_anonymous false\npassword_file {self.auth[0]}\nacl_file {self.auth[1]}" if self.auth
                  else "allow_anonymous true")
            + (f"\ncafile {self.tls[0]}\ncertfile {self.tls[1]}\nkeyfile {self.tls[2]}\ntls_version tlsv1.2"
               if self.tls else ""),
        )
        if os.geteuid() == 0:
            # Run as whoever started us: Mosquitto would otherwise drop root for the "mosquitto"
            # account, which cannot reach a data directory under a private (0700) parent.
            conf += "\nuser root\n"
        path = self.data_dir / "mosquitto.conf"
        path.write_text(conf, encoding="utf-8")
        os.chmod(path, 0o600)
        return path

    def start(self, timeout_s: float = 10.0) -> EmbeddedBroker:
        binary = find_mosquitto()
        if binary is None:
            raise BrokerError("mosquitto is not installed: run scripts/setup (it installs Debian's mosquitto), "
                              "or set broker.url to a broker you run")
        conf = self.write_conf()
        open_files = raise_open_files_limit()
        if open_files < 4096:
            log.warning("the broker may hold only %d connections (open-files limit): raise `ulimit -n`", open_files)
        logfile = self.log_path.open("ab")
        self.process = subprocess.Popen([binary, "-c", str(conf)], stdout=logfile, stderr=logfile,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        logfile.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerError(f"mosquitto exited at start (code {self.process.returncode}): {self._log_tail()}")
            if reachable(self.host, self.port, 0.2):
                log.info("embedded mosquitto started url=%s pid=%s data=%s", self.url, self.process.pid, self.data_dir)
                return self
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not open {self.host}:{self.port} within {timeout_s:.0f} s: {self._log_tail()}")

    def stop(self, timeout_s: float = 5.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout_s)
        log.info("embedded mosquitto stopped url=%s", self.url)

    def kill(self) -> None:
        """Stop at once, as a crash would (tests of restarts)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-600:].strip() or "(empty log)"
        except OSError:
            return "(no log)"

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
