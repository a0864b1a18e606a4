"""The benchmark's scale tables, from given figures (the runs themselves need KVM and minutes)."""

from __future__ import annotations

from checkpointer import bench_scale


def test_the_scale_tables_show_every_row_and_say_what_failed() -> None:
    row = {"pause_us_p50": 410.0, "pause_us_p99": 900.0, "checkpoints_per_s": 120.0, "dirty_pages_p50": 256.0}
    scale = {
        "vcpus": [{"vcpus": 1, **row}, {"vcpus": 8, "error": "the v8 exited (1) while waiting for v8 protected"}],
        "memory": [{"memory_mib": 16384, **row}],
        "sync": [{"memory_gib": 4, "sync_s": 12.5, "resident_pages": 1 << 20, "copied_pages": 1_300_000,
                  "rounds": 4, "throttle_max": 0.3, "plain_copy_s": 1.25, "sync_over_copy": 10.0},
                 {"memory_gib": 8, "error": "timed out waiting for s8 protected"}],
        "copy_rate_mib_s": 3276.8,
    }
    text = bench_scale.format_scale(scale)
    assert "1 vCPU(s), 256 MiB: pause p50     410 us" in text
    assert "8 vCPU(s), 256 MiB: failed: the v8 exited" in text
    assert "1 vCPU, 16384 MiB" in text
    assert "4 GiB: protected 12.5 s after the replica started; 1048576 resident pages" in text
    assert "throttle 30%" in text and "(sync / copy 10.0)" in text
    assert "8 GiB: failed: timed out" in text
