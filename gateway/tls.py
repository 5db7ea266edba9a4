"""A local certificate authority for the embedded broker's TLS listener (``broker.embedded_tls``).

Made once with Debian's ``openssl`` in ``state_dir/tls``: ``ca.crt`` is what devices and operators
need to trust the broker; the broker's certificate names 127.0.0.1 and localhost. Keys are 0600.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def local_ca(directory: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, broker certificate, broker key), made if missing."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    key, csr, crt = directory / "broker.key", directory / "broker.csr", directory / "broker.crt"
    if ca_crt.exists() and crt.exists() and key.exists():
        return ca_crt, crt, key
    openssl = shutil.which("openssl") or "/usr/bin/openssl"

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca_crt), "-days", "3650",
        "-subj", "/CN=streetbrain local CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost")
    extensions = directory / "san.cnf"
    extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n", encoding="utf-8")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(crt), "-days", "825", "-extfile", str(extensions))
    for secret in (ca_key, key):
        os.chmod(secret, 0o600)
    return ca_crt, crt, key
