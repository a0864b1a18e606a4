"""Benchmark of the protected guest: pause, rate and bandwidth against floors measured in the same run.

    python -m checkpointer.bench [--quick] [--json] [--seconds S] [--sections points,rate,service]
                                 [--requests N] [--clients C] [--logs DIR]

For each dirty-set size (8, 64, 256, 1024, 4032 pages per epoch) a primary agent
runs the `uniform` workload protected by a replica in another process (over
loopback TCP with CURVE, as deployed), the epoch closed by the VM-wide
dirty-page trigger (4032: the ring's own soft limit), and prints:
checkpoints/s, pause p50/p99, the floor (the kick, ring harvest + reset +
gather of the same number of pages, the vCPU state capture and the resume, as
the native call the agent's pause is, back to back without the agent, measured
on its own in this run), pause/floor,
raw and encoded MB/s, compression ratio, and the guest's slowdown against the
same workload unprotected (no dirty logging at all).

A guest's first write to a page after a reset costs a write fault (about
28 us on this host, KVM-NOTES); it is the machine's cost, not the agent's,
and is reported apart (`first_write_us`, measured here) so that the pause
measures our code. Then a guest that dirties at most 8 pages per epoch runs
with the interval trigger as short as the agent allows, for the highest
sustained checkpoint rate (the `rate` section). Then the `service` section
(checkpointer.bench_service): redis-benchmark against a real redis-server, the
kvstore guest unprotected and the kvstore guest protected, in the same run.
`--sections scale` (checkpointer.bench_scale, minutes; not in the default) adds
the pause against vCPUs and memory and the initial sync of 4 and 8 GiB guests.
Medians of one run on a shared, noisy machine: compare ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from ring.backend import kvm_status, open_machine
from ring.machine import MachineConfig
from ring.workloads import Workload

from . import bench_scale, bench_service
from .agent import PrimaryAgent
from .cluster import Cluster
from .config import load_config
from .snapshot import StagingPool

log = logging.getLogger("colo.bench")
SIZES = (8, 64, 256, 1024, 4032)
FLOOR_ROUNDS = 51
SECTIONS = ("points", "rate", "service", "scale")
DEFAULT_SECTIONS = ("points", "rate", "service")      # scale takes minutes: asked for by name
MEMORY_MIB = 64


def _ring_for(pages: int) -> int:
    entries = 256
    while entries - 64 < pages + 64:
        entries *= 2
    return entries


def _primary_config(cluster: Cluster, overrides: dict):
    """The in-process primary, joined to the cluster's replica process."""
    base = {"primary.replica": cluster.endpoint, "security.keys_dir": str(cluster.keys),
            "security.peer_public_key": str(cluster.keys / "replica.key"),
            "guest.vcpus": 1, "guest.memory_mib": MEMORY_MIB, "guest.workload": "uniform",
            "guest.report_every": 0, "replication.heartbeat_ms": 50, "replication.timeout_ms": 2000,
            "replication.encode_threads": 1, "status.log_interval_s": 3600.0}
    base.update(overrides)
    return load_config("primary", None, base)


def _cpu_s(pid: int, tid: int | None = None) -> float:
    """CPU seconds (user + system) of a process, or of one of its threads, from /proc."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat"
    try:
        fields = open(path).read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_now(replica_pid: int | None, vcpu_tids: list[int]) -> tuple[float, float, float]:
    """(this thread's, the replica process's, the vCPU threads') CPU seconds so far."""
    return (time.thread_time(), _cpu_s(replica_pid) if replica_pid else 0.0,
            sum(_cpu_s(os.getpid(), tid) for tid in vcpu_tids))


async def _protected_run(config, seconds: float, replica_pid: int | None = None) -> dict:
    agent = PrimaryAgent(config)
    task = asyncio.ensure_future(agent.run())
    deadline = time.monotonic() + 60
    while not agent.protocol.protected:
        if task.done() or time.monotonic() > deadline:
            agent.stop()
            await task
            raise RuntimeError(f"the primary never became protected: {agent.last_error}")
        await asyncio.sleep(0.01)
    agent.stats.__init__()                   # measure from protection on
    vcpu_tids = agent.machine.runner.thread_ids
    cpu0 = _cpu_now(replica_pid, vcpu_tids)
    progress0, t0 = sum(agent.machine.progress_all()), time.monotonic()
    await asyncio.sleep(seconds)
    progress1, t1 = sum(agent.machine.progress_all()), time.monotonic()
    cpu1 = _cpu_now(replica_pid, vcpu_tids)
    status = agent.status()
    stats = agent.stats
    everything = float("inf")                # every sample the rolling window still holds
    raw = stats.raw_bytes.recent(everything)[1]
    encoded = stats.encoded_bytes.recent(everything)[1]
    epochs = stats.epochs
    agent.stop()
    await task
    return {"status": status, "epochs": epochs, "seconds": t1 - t0,
            "rate": (progress1 - progress0) / (t1 - t0), "raw": raw, "encoded": encoded,
            "pause_us_p50": stats.pause_us.percentile(50), "pause_us_p99": stats.pause_us.percentile(99),
            "dirty_p50": stats.dirty_pages.percentile(50),
            # where the two cores went: the agents' CPU per checkpoint, and the guest's share of a core
            "cpu": {"primary_loop_us_per_checkpoint": (cpu1[0] - cpu0[0]) / max(epochs, 1) * 1e6,
                    "replica_us_per_checkpoint": (cpu1[1] - cpu0[1]) / max(epochs, 1) * 1e6,
                    "vcpu_cores": (cpu1[2] - cpu0[2]) / (t1 - t0)}}


def _unprotected_rate(working_set: int, seconds: float) -> float:
    """Items per second of the same workload with no dirty logging at all."""
    config = MachineConfig(vcpus=1, data_bytes=MEMORY_MIB << 20)
    with open_machine(config, Workload("uniform", seed=1, working_set_pages=working_set), backend="kvm",
                      track_dirty=False) as vm:
        vm.start()
        p0, t0 = vm.progress(0), time.monotonic()
        time.sleep(seconds)
        p1, t1 = vm.progress(0), time.monotonic()
        vm.pause()
    return (p1 - p0) / (t1 - t0)


def _floor(pages: int, rounds: int) -> tuple[float, float]:
    """Median floor of a pause of `pages` pages, and its harvest + reset + gather part (us).

    The floor is everything the pause has to do, as the same kernel calls issued back to back
    without the agent, in the agent's own language for it (C: ring._native.checkpoint, the call
    the agent's pause is): kick the running vCPU out of KVM_RUN and wait for it, walk the ring and
    mark RESET, KVM_RESET_DIRTY_RINGS, dedup, copy the pages into a staging buffer, read the vCPU
    state (kvm_run.s, XSAVE, TSC) and let the vCPU back in. The guest is the points' own: uniform
    over all memory, paused once its ring holds `pages` entries (or is full).
    """
    config = MachineConfig(vcpus=1, data_bytes=MEMORY_MIB << 20, ring_entries=_ring_for(pages))
    workload = Workload("uniform", seed=1, working_set_pages=(MEMORY_MIB << 20) // 4096)
    totals, harvest_gather = [], []
    with open_machine(config, workload, backend="kvm") as vm:
        pool = StagingPool(1, pages + 256)
        vm.set_limits(2 ** 62)
        vm.start()
        buffer = pool.acquire(pool.capacity)
        taken = attempts = 0
        while taken < rounds:
            attempts += 1
            while vm.tracker.fill() < pages and vm.runner.hold_reason(0) is None:
                time.sleep(0)                           # (the guest dirties meanwhile; not timed)
            done = vm.checkpoint(buffer, resume=True)
            if done is None:                            # the first: no cached vCPU state yet (as the agent's)
                vm.pause()
                vm.capture_vcpus()
                vm.resume()
                continue
            if not done.resumed:
                vm.resume()
                continue
            vm.drain_events()
            if not pages * 0.9 <= done.dirty.count <= pages * 1.25 and attempts < rounds * 20:
                continue                                # not this size (held, or overshot)
            t0, stopped, harvested, gathered, captured, went = done.times_ns
            totals.append(went - t0)
            harvest_gather.append(gathered - stopped)
            taken += 1
        vm.pause()
    return float(np.median(totals)) / 1000, float(np.median(harvest_gather)) / 1000


def _first_write_us(pages: int, rounds: int) -> float:
    """The guest's cost per first write to a page after a reset (us): the machine's write fault."""
    config = MachineConfig(vcpus=1, data_bytes=MEMORY_MIB << 20, ring_entries=_ring_for(pages))
    workload = Workload("sequential", seed=1)          # distinct pages: each write is a first write
    first_write = []
    with open_machine(config, workload, backend="kvm") as vm:
        vm.run_to_limit(pages)
        vm.harvest()
        for _ in range(rounds):
            start_progress = vm.progress(0)
            t0 = time.perf_counter_ns()
            vm.run_to_limit(start_progress + pages)
            first_write.append((time.perf_counter_ns() - t0) / pages)
            vm.harvest()
    return float(np.median(first_write)) / 1000


def run(seconds: float, sizes=SIZES, rate_seconds: float | None = None, logs: Path | None = None,
        sections=("points", "rate")) -> dict:
    """The `points` and `rate` sections (those of `sections`); the replica's log goes to `logs` (a
    folder) if given, else with the run."""
    logging.getLogger("colo").setLevel(logging.WARNING)
    logging.getLogger("ring").setLevel(logging.WARNING)
    points = []
    report: dict = {}
    if not {"points", "rate"} & set(sections):
        return report
    with Cluster(logs=logs, common=["--heartbeat-ms", "50", "--timeout-ms", "2000"]) as cluster:
        cluster.start_replica()
        first_write_us = []
        for pages in (sizes if "points" in sections else ()):
            print(f"  {pages} pages per epoch...", file=sys.stderr)
            working_set = (MEMORY_MIB << 20) // 4096
            overrides = {"guest.ring_entries": _ring_for(pages), "triggers.max_interval_ms": 0.0,
                         "triggers.dirty_pages": pages if pages != 4032 else 0,
                         "triggers.poll_us": 100}
            if pages == 4032:
                overrides["guest.ring_entries"] = 4096
            result = asyncio.run(_protected_run(_primary_config(cluster, overrides), seconds))
            # the floor of the epochs the agent really took: a trigger fires at `pages`, and the guest
            # dirties more until the pause (the measured p50 is the size the pause copied)
            measured = max(pages, int(result["dirty_p50"]))
            floor_us, harvest_gather_us = _floor(min(measured, 4032), rounds=FLOOR_ROUNDS)
            first_write_us.append(_first_write_us(pages, rounds=9))
            unprotected = _unprotected_rate(working_set, min(seconds, 2.0))
            pause50 = result["pause_us_p50"]
            points.append({
                "dirty_pages": pages,
                "dirty_pages_measured_p50": result["dirty_p50"],
                "checkpoints_per_s": result["epochs"] / result["seconds"],
                "pause_us_p50": pause50,
                "pause_us_p99": result["pause_us_p99"],
                "floor_us": floor_us,
                "floor_harvest_gather_us": harvest_gather_us,
                "pause_over_floor": pause50 / floor_us if floor_us else 0.0,
                "raw_mb_per_s": result["raw"] / result["seconds"] / 1e6,
                "encoded_mb_per_s": result["encoded"] / result["seconds"] / 1e6,
                "compression_ratio": result["raw"] / result["encoded"] if result["encoded"] else 0.0,
                "slowdown": unprotected / result["rate"] if result["rate"] else float("inf"),
                "pause_parts_us_p50": result["status"].get("pause_parts_us_p50", {}),
            })
        if "points" in sections:
            report["points"] = points
        if "rate" in sections:
            print("  at most 8 pages per epoch, shortest interval...", file=sys.stderr)
            replica_pid = cluster.agents["replica"].process.pid
            fast = asyncio.run(_protected_run(_primary_config(cluster, {
                "guest.working_set_pages": 8, "guest.ring_entries": 256, "triggers.max_interval_ms": 0.05,
                "triggers.ring_full": True, "replication.max_in_flight": 4}), rate_seconds or seconds,
                replica_pid))
            report.update({"max_checkpoints_per_s": fast["epochs"] / fast["seconds"],
                           "max_rate_pause_us_p50": fast["pause_us_p50"],
                           "max_rate_dirty_pages_p50": fast["dirty_p50"], "max_rate_cpu": fast["cpu"]})
    if "points" in sections:
        report["first_write_us"] = float(np.median(first_write_us)) if first_write_us else 0.0
    return report


def format_table(result: dict) -> str:
    """The table of the sections `result` holds (points, rate, service)."""
    lines = []
    if "points" in result or "max_checkpoints_per_s" in result:
        lines.append("checkpointer: protected uniform guest (1 vCPU, 64 MiB), replica in another process over "
                     "loopback TCP with CURVE")
    if "points" in result:
        lines.append(f"{'pages':>6} {'taken':>6} {'ckpt/s':>8} {'pause p50':>10} {'p99':>9} {'floor':>8} {'ratio':>6} "
                     f"{'raw MB/s':>9} {'enc MB/s':>9} {'compr':>6} {'slowdown':>9}")
    for p in result.get("points", ()):
        lines.append(f"{p['dirty_pages']:>6} {p['dirty_pages_measured_p50']:>6.0f} {p['checkpoints_per_s']:>8.0f} "
                     f"{p['pause_us_p50']:>8.0f}us "
                     f"{p['pause_us_p99']:>7.0f}us {p['floor_us']:>6.0f}us {p['pause_over_floor']:>6.2f} "
                     f"{p['raw_mb_per_s']:>9.1f} {p['encoded_mb_per_s']:>9.2f} {p['compression_ratio']:>6.1f} "
                     f"{p['slowdown']:>8.2f}x")
    if "max_checkpoints_per_s" in result:
        lines.append(f"highest sustained rate with <= 8 dirty pages per epoch: {result['max_checkpoints_per_s']:.0f} "
                     f"checkpoints/s (pause p50 {result['max_rate_pause_us_p50']:.0f} us)")
        cpu = result.get("max_rate_cpu")
        if cpu:
            lines.append(f"  at that rate: primary loop {cpu['primary_loop_us_per_checkpoint']:.0f} us CPU and replica "
                         f"{cpu['replica_us_per_checkpoint']:.0f} us CPU per checkpoint; the guest's vCPU used "
                         f"{cpu['vcpu_cores']:.2f} of the {os.cpu_count()} cores")
    if "points" in result:
        lines += [
            f"a guest's first write to a page after a reset costs {result['first_write_us']:.1f} us here "
            "(the machine's write fault; inside the slowdown, not the pause)",
            "pages: the trigger's size; taken: the pages the pauses copied (p50), more when the guest dirties "
            "faster than the agent checkpoints (the ring's soft limit stops it); the floor is of the pages taken",
            "floor: kick + ring harvest + KVM_RESET_DIRTY_RINGS + gather of the same number of pages + "
            "the vCPU state capture + resume, the agent's own native call back to back without the agent; "
            "ratio = pause p50 / floor",
        ]
    if "service" in result:
        lines.append(bench_service.format_service(result["service"]))
    if "scale" in result:
        lines.append(bench_scale.format_scale(result["scale"]))
    lines.append("one run on a shared, nested, noisy 2-core machine (guest, agent and replica share it): "
                 "compare ratios")
    return "\n".join(lines)


def parse_sections(text: str) -> tuple[str, ...]:
    """--sections: names from SECTIONS, comma-separated, in the order given."""
    chosen = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [part for part in chosen if part not in SECTIONS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"choose from {','.join(SECTIONS)} (comma-separated), "
                                         f"not {text!r}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checkpointer.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of the table")
    parser.add_argument("--quick", action="store_true",
                        help="short runs (about 15 s for points and rate, 15 s for the service)")
    parser.add_argument("--seconds", type=float, default=None, help="protected time per point")
    parser.add_argument("--sections", type=parse_sections, default=DEFAULT_SECTIONS, metavar="LIST",
                        help=f"the sections to run, comma-separated, of {','.join(SECTIONS)} (default: "
                             f"{','.join(DEFAULT_SECTIONS)})")
    parser.add_argument("--requests", type=int, default=None, metavar="N",
                        help=f"service: redis-benchmark -n, requests per test (default "
                             f"{bench_service.DEFAULT_REQUESTS}; --quick: {bench_service.QUICK_REQUESTS})")
    parser.add_argument("--clients", type=int, default=bench_service.DEFAULT_CLIENTS, metavar="C",
                        help=f"service: redis-benchmark -c, connections (default {bench_service.DEFAULT_CLIENTS})")
    parser.add_argument("--logs", default=None, metavar="DIR",
                        help="keep the agents' logs (and etcd's, redis-server's) in DIR")
    args = parser.parse_args(argv)
    if (args.requests is not None and args.requests < 1) or args.clients < 1:
        parser.error("--requests and --clients must be at least 1")
    usable, reason = kvm_status()
    if not usable:
        print(f"checkpointer.bench: needs KVM: {reason}", file=sys.stderr)
        return 2
    seconds = args.seconds or (1.0 if args.quick else 4.0)
    started = time.monotonic()
    logs = Path(args.logs) if args.logs else None
    result = run(seconds, rate_seconds=seconds, sections=args.sections, logs=logs / "checkpoints" if logs else None)
    if "service" in args.sections:
        requests = args.requests or (bench_service.QUICK_REQUESTS if args.quick else bench_service.DEFAULT_REQUESTS)
        result["service"] = bench_service.run_service(requests, args.clients, logs / "service" if logs else None)
    if "scale" in args.sections:
        result["scale"] = bench_scale.run_scale(args.quick, logs / "scale" if logs else None)
    result["wall_s"] = time.monotonic() - started
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_table(result))
        print(f"wall time {result['wall_s']:.1f} s")
    failed = [name for name, row in result.get("service", {}).get("servers", {}).items() if "error" in row]
    return 1 if failed else 0               # (a server skipped, not installed, is no failure)


if __name__ == "__main__":
    sys.exit(main())
