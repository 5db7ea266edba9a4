"""A throwaway PostgreSQL server from Debian's packages, for the tests (and benchmarks)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
from pathlib import Path

from gateway.broker import free_port


def find_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    """initdb into ``data_dir`` and start on a free loopback port; PostgreSQL will not run as root,
    so under root it runs as the ``postgres`` account."""

    def __init__(self, data_dir: Path):
        bin_dir = find_bin()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed: run scripts/test, which installs Debian's postgresql")
        self.bin = bin_dir
        self.data_dir = Path(data_dir)
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            self.as_user = [shutil.which("runuser") or "/usr/sbin/runuser", "-u", "postgres", "--"]
            self.data_dir.mkdir(parents=True, exist_ok=True)
            for parent in [self.data_dir, *self.data_dir.parents][:3]:
                os.chmod(parent, os.stat(parent).st_mode | 0o711)  # let postgres reach its directory
            os.chown(self.data_dir, account.pw_uid, account.pw_gid)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def run(self, *args: str) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, timeout=120)

    def start(self) -> PostgresServer:
        pgdata = self.data_dir / "pgdata"
        self.run(str(self.bin / "initdb"), "-D", str(pgdata), "--auth=trust", "-U", "postgres", "--no-sync",
                 "-E", "UTF8")
        self.run(str(self.bin / "pg_ctl"), "-D", str(pgdata), "-w", "-l", str(self.data_dir / "postgres.log"),
                 "-o", f"-p {self.port} -k {self.data_dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                       "-c max_connections=50", "start")
        return self

    def stop(self) -> None:
        self.run(str(self.bin / "pg_ctl"), "-D", str(self.data_dir / "pgdata"), "-m", "immediate", "stop")

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"
