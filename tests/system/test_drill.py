"""The failover drill in CI: five runs, each with another kill point, all verified from the clients' side."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


pytestmark = pytest.mark.kvm
ROOT = Path(__file__).resolve().parents[2]


def test_drill_five_kill_points_all_verified(tmp_path) -> None:
    result = subprocess.run([sys.executable, "-m", "scenarios.drill", "--runs", "5", "--seed", "11", "--json",
                             "--warmup", "1.5", "--logs", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    report = json.loads(result.stdout)
    assert report["runs"] == 5 and len(report["per_run"]) == 5
    for run in report["per_run"]:
        assert run["verified"], f"run {run['run']} ({run['kill_point']}): {run['problems']}"
        assert run["lost_writes"] == 0 and run["acked_writes"] > 0
        assert run["takeover_ms"] is not None and run["takeover_ms"] > 0
    assert {r["kill_point"].rstrip("*") for r in report["per_run"]} == {
        "random", "transfer", "after-end", "heavy-output", "between"}
    assert report["passed"] == 5 and report["failed"] == 0 and result.returncode == 0


def test_drill_rejects_bad_flags() -> None:
    result = subprocess.run([sys.executable, "-m", "scenarios.drill", "--runs", "0"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--runs" in result.stderr
