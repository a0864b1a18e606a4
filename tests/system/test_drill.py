"""The failover drill in CI: a fresh pair of colo-node processes per run, struck at every kill point and
by every fault, all verified from the clients' side (no acknowledged write lost, never two active nodes)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kvm,
              pytest.mark.skipif(shutil.which("etcd") is None,
                                 reason="etcd is not installed (Debian: etcd-server; ./install-deps installs it)")]
ROOT = Path(__file__).resolve().parents[2]


def drill(tmp_path: Path, *flags: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "scenarios.drill", "--json", "--logs", str(tmp_path), *flags],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.stdout, result.stderr[-3000:]
    report = json.loads(result.stdout)
    for run in report["per_run"]:
        assert run["verified"], f"run {run['run']} ({run['fault']}, {run['kill_point']}): {run['problems']}"
        assert run["lost_writes"] == 0 and run["acked_writes"] > 0 and not run["dual_active"]
    assert report["failed"] == 0 and result.returncode == 0
    return report


def test_drill_five_kill_points_in_a_row_with_reprotection_between(tmp_path) -> None:
    """--cycles 5: the primary is killed at each kill point in turn; each time the lost node rejoins,
    the pair protects itself again, and the new primary is killed next."""
    report = drill(tmp_path, "--cycles", "5", "--seed", "11", "--warmup", "0.5")
    (run,) = report["per_run"]
    assert {p.rstrip("*") for p in run["kill_point"].split(",")} == {
        "random", "transfer", "after-end", "heavy-output", "between"}
    assert len(run["takeovers_ms"]) == 5 and all(t > 0 for t in run["takeovers_ms"])
    assert len(run["reprotect_s"]) == 5
    summary = report["summary"]
    assert summary["runs"] == 1 and summary["verified"] == 1 and summary["dual_active"] == 0


def test_drill_every_fault(tmp_path) -> None:
    """--fault all: each fault strikes the primary once, and the pair protects itself again."""
    report = drill(tmp_path, "--runs", "5", "--fault", "all", "--seed", "5", "--warmup", "0.5")
    faults = {r["fault"]: r for r in report["per_run"]}
    assert set(faults) == {"kill", "freeze", "partition", "slow", "etcd-down"}
    for run in report["per_run"]:
        assert len(run["reprotect_s"]) == 1, run
    assert len(faults["kill"]["takeovers_ms"]) == 1 and len(faults["freeze"]["takeovers_ms"]) == 1
    assert faults["partition"]["takeovers_ms"] == []          # both reach etcd: the primary keeps its lease
    assert faults["etcd-down"]["takeovers_ms"] == []          # nobody may take over without etcd


def test_drill_rejects_bad_flags() -> None:
    for flags, words in ((["--runs", "0"], "--runs"), (["--fault", "etcd-down", "--etcd", "http://h:1"], "own")):
        result = subprocess.run([sys.executable, "-m", "scenarios.drill", *flags], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and words in result.stderr, result.stderr
