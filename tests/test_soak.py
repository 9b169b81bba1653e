"""The soak benchmark (bench/soak.py), run briefly against the real service.

Only outcomes that do not depend on timing are asserted: the machine running the tests is
shared, so latency drift and memory growth are left to the documented long run and its
--check (docs/performance.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from app.pipeline.events import KEEP_EVENTS

REPO_ROOT = Path(__file__).resolve().parents[1]
SECONDS, WINDOW, RATE = 10, 2, 100


def test_a_short_soak_loses_nothing_and_stays_within_its_bounds(tmp_path: Path) -> None:
    result_file = tmp_path / "soak.json"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "bench" / "soak.py"),
            f"--seconds={SECONDS}",
            f"--window={WINDOW}",
            f"--warmup={WINDOW}",
            f"--heartbeats-per-second={RATE}",
            # Each runner once per window: the warm-up sees every runner once.
            f"--runners={RATE * WINDOW}",
            "--orgs=100",
            f"--json={result_file}",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    report = done.stdout
    assert done.returncode == 0, f"{report}\n{done.stderr[-3000:]}"

    # The per-window table (one row per window, the first a warm-up) and the summary.
    assert "| window | load 1m |" in report
    rows = [line for line in report.splitlines() if line.startswith("| ") and " | " in line]
    numbers = [r.split("|")[1].split() for r in rows]
    assert [int(n[0]) for n in numbers if n and n[0].isdigit()] == [1, 2, 3, 4, 5]
    assert "| 1 w " in report
    assert "| measure | start | end | change | target | verdict |" in report
    assert "| heartbeat p99 ms |" in report

    result = json.loads(result_file.read_text())
    assert result["failures"] == []
    assert result["5xx"] == 0 and result["non_2xx"] == 0 and result["unfinished"] == 0
    # Open loop: every heartbeat due was sent, whatever the answers took, and answered.
    assert result["sent"]["heartbeat"] == RATE * SECONDS
    assert result["answers"]["heartbeat 200"] == RATE * SECONDS
    # Every acknowledged heartbeat counted: runner states and session totals as acknowledged.
    assert result["stored_heartbeats_ok"] is True
    assert any("equal" in line for line in result["stored_lines"])
    # Every delivery answered 202 stored, and processed or still queued, none failed.
    deliveries = result["deliveries"]
    assert deliveries["stored"] == result["deliveries_expected"] > 0
    assert "failed" not in deliveries["by_state"]
    # The service's own counts agree: no delivery processed twice, no heartbeat lost.
    assert result["service_counted"] == {
        "deliveries processed": deliveries["by_state"]["done"],
        "heartbeats accepted": RATE * SECONDS,
    }
    # The event log started full, so each append during the run pruned the oldest entry.
    events = result["tables"]["events"]
    assert events["peak"] <= KEEP_EVENTS and events["end"] == KEEP_EVENTS
    assert all(table["ok"] for table in result["tables"].values()), result["tables"]
    # Rows past their retention, written before the start, were pruned on schedule.
    assert result["expired_left"] == {"webhook_deliveries": 0, "session_counts": 0, "runners": 0}
    assert result["fds"]["change"] is not None and result["fds"]["change"] <= 2
    assert result["exit_code"] == 0
