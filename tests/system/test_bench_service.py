"""`python -m checkpointer.bench --sections rate,service` end to end, with a tiny redis-benchmark: the
three servers are measured in one run, the JSON has every key of the service section, and the
sections chosen give their keys and no others. The figures themselves are this machine's, for the
benchmark to print; nothing here asserts a time."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kvm

ROOT = Path(__file__).resolve().parents[2]
KEYS = ("redis_ops_per_s", "unprotected_ops_per_s", "protected_ops_per_s", "protected_p50_ms", "protected_p99_ms",
        "output_latency_p50_ms", "output_latency_p99_ms")
RATE_KEYS = ("max_checkpoints_per_s", "max_rate_pause_us_p50", "max_rate_dirty_pages_p50", "max_rate_cpu")


def test_the_service_section_measures_each_server_and_the_sections_chosen_give_only_their_keys(tmp_path) -> None:
    if shutil.which("redis-benchmark") is None:
        pytest.skip("redis-benchmark is not installed (Debian: apt-get install redis-tools)")
    # 10 clients: fewer than the kvstore's connection slots on every version of it
    done = subprocess.run([sys.executable, "-m", "checkpointer.bench", "--sections", "rate,service", "--quick",
                           "--requests", "200", "--clients", "10", "--json", "--logs", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert set(result) == {*RATE_KEYS, "service", "wall_s"}
    cpu = result["max_rate_cpu"]        # where the cores went: both agents work for every checkpoint
    assert cpu["primary_loop_us_per_checkpoint"] > 0 and cpu["replica_us_per_checkpoint"] > 0, cpu
    assert 0 < cpu["vcpu_cores"] <= os.cpu_count(), cpu
    service = result["service"]
    assert set(KEYS) <= set(service)
    assert (service["requests"], service["clients"]) == (200, 10)
    for name in ("unprotected", "protected"):
        assert "error" not in service["servers"][name], service["servers"][name]
    assert service["unprotected_ops_per_s"] > 0 and service["protected_ops_per_s"] > 0
    assert 0 < service["protected_p50_ms"] <= service["protected_p99_ms"]
    assert 0 < service["output_latency_p50_ms"] <= service["output_latency_p99_ms"]
    assert service["protected_over_unprotected"] > 0
    if shutil.which("redis-server") is None:
        assert "skipped" in service["servers"]["redis"] and service["redis_ops_per_s"] is None
    else:
        assert service["redis_ops_per_s"] > 0 and service["unprotected_over_redis"] > 0
