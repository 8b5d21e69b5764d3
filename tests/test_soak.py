"""The --quick soak (bench/soak.py) as CI runs it: 3 minutes of faults on SQLite, every check passing.

It runs as its own process, as an operator would run it, and fails with the soak's report.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.harness import PY, ROOT


@pytest.mark.slow
@pytest.mark.timeout(330)
def test_quick_soak_on_sqlite_keeps_every_promise(tmp_path: Path) -> None:
    report = tmp_path / "soak-sqlite.md"
    proc = subprocess.run([PY, "-m", "bench.soak", "--quick", "--db", "sqlite", "--report", str(report),
                           "--workdir", str(tmp_path / "soak")], cwd=ROOT, capture_output=True, text=True,
                          timeout=320, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"the soak failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    text = report.read_text()
    assert "PASS" in text and "### Faults injected" in text
    assert report.with_suffix(".png").stat().st_size > 0
