"""docs/demo.md, run as written: its shell blocks, in order, in one bash, against a real
service and the simulator. A change that breaks the demo breaks this test."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.service_process import free_port

DEMO = Path(__file__).resolve().parent.parent / "docs" / "demo.md"
BLOCK = re.compile(r"^```sh\n(.*?)^```", re.MULTILINE | re.DOTALL)


def test_the_demo_runs_as_written(tmp_path: Path) -> None:
    for tool in ("bash", "curl", "update-pipeline", "python3"):
        if shutil.which(tool) is None:
            pytest.skip(f"the demo needs {tool} on PATH")
    blocks = BLOCK.findall(DEMO.read_text(encoding="utf-8"))
    assert len(blocks) >= 6
    script = "set -euo pipefail\n" + "\n".join(blocks)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "UPDATE_PIPELINE_PORT": str(free_port()),
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
    }
    try:
        done = subprocess.run(
            ["bash", "-c", script],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
    finally:
        subprocess.run(["pkill", "-f", str(tmp_path / "demo.db")], check=False)
    logs = "".join(
        f"\n--- {log.name} ---\n{log.read_text(errors='replace')[-3000:]}"
        for log in tmp_path.glob("demo-*.log")
    )
    assert done.returncode == 0, done.stdout + done.stderr + logs
    lines = done.stdout.splitlines()
    assert lines[:3] == ["passed", "passed", "passed"]
    assert "within thresholds" in lines
    assert re.fullmatch(r"failure rate [0-9.]+ above 0\.1 after \d+ sessions", lines[-1]), lines
