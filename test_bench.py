"""The benchmark harness, run small: measured elsewhere (bench/README.md); here it only must
not rot. Its own marker: `python -m pytest -m bench` (.ci/run runs it as a separate step)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (
    HERE,
)


@pytest.mark.bench
def test_bench_quick_mode_runs(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(HERE / "bench" / "run.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    # The quick run stays offline: the Node reference gateway (npm ci) runs only when --servers names it.
    assert report["servers"] == ["gateway", "ceiling"]
