"""The benchmark's scale section: pause against vCPUs and memory, and the initial sync of large guests.

    python -m checkpointer.bench --sections scale [--quick] [--json]

Every row runs a replica and a primary as processes (checkpointer.cluster, CURVE over loopback,
as deployed), measured from the primary's status once it is protected:

- **vCPUs**: a 256 MiB `uniform` guest with 1, 2, 4 and 8 vCPUs, epochs closed at 256 dirty
  pages VM-wide (a working set of 2,048 pages: every epoch holds about the same pages whatever
  the vCPU count). The pause grows with the vCPUs to kick, harvest and capture, not with memory.
- **memory**: 1 vCPU, the same dirty rate (a 2,048-page working set, 256 pages per epoch), in
  guests of 64 MiB to 16 GiB (`--quick`: up to 4 GiB). It stays flat: the ring's cost follows the
  dirty pages, not the memory (the point of the ring; a bitmap's grows with memory).
- **initial sync**: `hotcold` guests of 4 and 8 GiB with 2 vCPUs (`--quick`: 1 and 2 GiB) run
  unprotected for a warm-up first (their memory becomes resident), then the replica starts; the
  time from its start to protection, against a plain copy of the same resident bytes measured in
  this process (np.take of random pages, the copy a sync cannot beat), with the sync's rounds
  and auto-converge throttle. Both agents share this machine, and the guest keeps dirtying.

One run of each on a shared, noisy machine: compare ratios.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import numpy as np

from .cluster import Cluster, ClusterError

VCPUS = (1, 2, 4, 8)
MEMORY_MIB = (64, 1024, 4096, 16384)
QUICK_MEMORY_MIB = (64, 1024, 4096)
SYNC_GIB = (4, 8)
QUICK_SYNC_GIB = (1, 2)
WORKING_SET = 2048
EPOCH_PAGES = 256
COMMON = ["--heartbeat-ms", "50", "--timeout-ms", "2000", "--no-fencing", "--log-interval-s", "3600"]


def _measure(cluster: Cluster, flags: list[str], seconds: float, name: str) -> dict:
    """Start the primary with `flags`, wait for protection, let it run `seconds`, read its status."""
    cluster.start_primary([*flags, "--report-every", "0"], name=name)
    try:
        cluster.wait(f"{name} protected", lambda: cluster.status(name).get("protected"), timeout=180)
        first = cluster.next_status(name)
        deadline = time.monotonic() + seconds
        status = first
        while time.monotonic() < deadline:
            status = cluster.next_status(name)
        return {"pause_us_p50": status.get("pause_us_p50"), "pause_us_p99": status.get("pause_us_p99"),
                "checkpoints_per_s": status.get("checkpoints_per_s"),
                "dirty_pages_p50": status.get("dirty_pages_p50"),
                "pause_parts_us_p50": status.get("pause_parts_us_p50", {})}
    finally:
        cluster.kill(name, signal.SIGTERM)               # (a BYE: the replica waits for the next one)


def _copy_rate_pages_per_s(pages: int = 65536, rounds: int = 5) -> float:
    """Pages per second np.take copies from random places of a 256 MiB buffer: the plain copy."""
    source = np.ones((pages, 4096), dtype=np.uint8)
    out = np.empty_like(source)
    order = np.random.default_rng(1).permutation(pages)
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        np.take(source, order, axis=0, out=out)
        times.append(time.perf_counter() - started)
    return pages / float(np.median(times))


def _sync(cluster: Cluster, gib: int, warmup_s: float, name: str) -> dict:
    """A hotcold guest of `gib` GiB runs unprotected for `warmup_s`, then the replica starts."""
    flags = ["--workload", "hotcold", "--memory-mib", str(gib << 10), "--vcpus", "2"]
    cluster.start_primary([*flags, "--report-every", "100000"], name=name)
    try:
        cluster.wait(f"{name} running", lambda: cluster.status(name).get("guest_progress"), timeout=120)
        time.sleep(warmup_s)                              # the measurement's warm-up, not a wait for an event
        started = time.monotonic()
        cluster.start_replica(name=f"{name}-replica")
        status = cluster.wait(f"{name} protected", lambda: (s := cluster.status(name)).get("protected") and s,
                              timeout=900)
        seconds = time.monotonic() - started
        sync = status.get("sync") or {}
        return {"memory_gib": gib, "sync_s": seconds, "resident_pages": sync.get("resident_pages"),
                "copied_pages": sync.get("copied_pages"), "rounds": sync.get("round"),
                "throttle_max": sync.get("throttle"), "sync_elapsed_s": sync.get("elapsed_s")}
    finally:
        cluster.kill(name, signal.SIGTERM)
        cluster.kill(f"{name}-replica", signal.SIGTERM)


def run_scale(quick: bool = False, logs: Path | None = None) -> dict:
    """The three tables; `logs` keeps the agents' logs."""
    seconds = 2.0 if quick else 5.0
    per_epoch = ["--workload", "uniform", "--working-set-pages", str(WORKING_SET), "--dirty-pages",
                 str(EPOCH_PAGES), "--max-interval-ms", "0"]
    result: dict = {"vcpus": [], "memory": [], "sync": []}
    with Cluster(logs=logs, common=COMMON) as cluster:
        cluster.start_replica()
        for vcpus in VCPUS:
            print(f"  scale: {vcpus} vCPU(s)...", file=sys.stderr)
            row = _try(lambda: _measure(cluster, [*per_epoch, "--vcpus", str(vcpus), "--memory-mib", "256"],
                                        seconds, f"v{vcpus}"))
            result["vcpus"].append({"vcpus": vcpus, **row})
        for mib in (QUICK_MEMORY_MIB if quick else MEMORY_MIB):
            print(f"  scale: {mib} MiB...", file=sys.stderr)
            row = _try(lambda: _measure(cluster, [*per_epoch, "--vcpus", "1", "--memory-mib", str(mib)],
                                        seconds, f"m{mib}"))
            result["memory"].append({"memory_mib": mib, **row})
        cluster.kill("replica", signal.SIGTERM)
    copy_rate = _copy_rate_pages_per_s()
    for gib in (QUICK_SYNC_GIB if quick else SYNC_GIB):
        print(f"  scale: initial sync of {gib} GiB...", file=sys.stderr)
        with Cluster(logs=logs / f"sync{gib}" if logs else None, common=COMMON) as cluster:
            row = _try(lambda: _sync(cluster, gib, 3.0 if quick else 10.0, f"s{gib}"))
        if row.get("resident_pages"):
            row["plain_copy_s"] = row["resident_pages"] / copy_rate
            row["sync_over_copy"] = row["sync_s"] / row["plain_copy_s"]
        result["sync"].append(row if "memory_gib" in row else {"memory_gib": gib, **row})
    result["copy_rate_mib_s"] = copy_rate * 4096 / 2**20
    return result


def _try(measure) -> dict:
    try:
        return measure()
    except ClusterError as exc:
        return {"error": exc.reason}


def format_scale(scale: dict) -> str:
    """The scale section's tables."""
    def pause(row: dict) -> str:
        if "error" in row:
            return f"failed: {row['error']}"
        return (f"pause p50 {row['pause_us_p50']:>7.0f} us  p99 {row['pause_us_p99']:>7.0f} us  "
                f"{row['checkpoints_per_s']:>6.0f} ckpt/s  dirty p50 {row['dirty_pages_p50']:.0f}")
    lines = [f"scale: uniform guest, {WORKING_SET}-page working set, epochs of {EPOCH_PAGES} dirty pages"]
    lines += [f"  {row['vcpus']} vCPU(s), 256 MiB: {pause(row)}" for row in scale["vcpus"]]
    lines += [f"  1 vCPU, {row['memory_mib']:>5} MiB: {pause(row)}" for row in scale["memory"]]
    lines.append(f"initial sync, hotcold, 2 vCPUs (plain copy: {scale['copy_rate_mib_s']:.0f} MiB/s of random pages here)")
    for row in scale["sync"]:
        if "error" in row:
            lines.append(f"  {row['memory_gib']} GiB: failed: {row['error']}")
            continue
        lines.append(f"  {row['memory_gib']} GiB: protected {row['sync_s']:.1f} s after the replica started; "
                     f"{row['resident_pages']} resident pages, {row['copied_pages']} copied in {row['rounds']} "
                     f"round(s), throttle {row['throttle_max'] or 0:.0%}; plain copy {row.get('plain_copy_s', 0):.2f} s "
                     f"(sync / copy {row.get('sync_over_copy', 0):.1f})")
    return "\n".join(lines)


__all__ = ["run_scale", "format_scale"]
