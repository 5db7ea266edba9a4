"""Coverage-guided fuzzing (atheris/libFuzzer) of everything a device can send, bounded for the suite;
longer runs: `.venv/bin/python tests/fuzz/decode.py CORPUS -max_total_time=600`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_fuzzed_device_messages_never_escape_the_pipeline_and_always_get_a_reason(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "fuzz" / "decode.py"), str(tmp_path / "corpus"),
                             "-runs=30000", "-seed=20261122", "-max_total_time=120", f"-artifact_prefix={tmp_path}/"],
                            cwd=ROOT, capture_output=True, text=True, timeout=240)
    log = result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "Done 30000 runs" in log, log[-2000:]
    coverage = int(re.search(r"DONE\s+cov: (\d+)", log).group(1))
    assert coverage > 300, "the seeds reach past the JSON parser into validation and detection"
    assert not list(tmp_path.glob("crash-*"))
