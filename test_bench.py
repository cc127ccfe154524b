"""The benchmark harness, run small: measured elsewhere (bench/README.md); here it only must
not rot. Its own marker: `python -m pytest -m bench` (.ci/run runs it as a separate step)."""

from __future__ import annotations

import json
import os
import shutil
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


@pytest.mark.bench
def test_bench_skips_the_node_server_without_npm(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"  # a PATH with the bench's tools but neither npm nor node
    bin_dir.mkdir()
    for tool in ("taskset", "git"):  # CPU pinning; the commit named in the results
        if found := shutil.which(tool):
            (bin_dir / tool).symlink_to(found)
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            str(HERE / "bench" / "run.py"),
            *("--quick", "--servers", "gateway,node"),
            *("--scenarios", "relay", "--out", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"PATH": str(bin_dir)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "node server skipped: npm not found" in result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["skipped_servers"] == {"node": "npm not found"}
    assert {record["server"] for record in report["records"]} == {"gateway"}  # the rest of the run went on
