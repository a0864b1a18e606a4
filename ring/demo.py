"""The ring/ demo: a guest dirtying memory, its rings harvested, a one-screen report.

This is what a checkpointer's inner loop looks like without the replica: the
guest runs until one vCPU's ring reaches its soft limit (or an interval
passes), the VM is paused, every ring is harvested and reset, and the guest
resumes. Run `colo-ring-demo --help` for the knobs.
"""

from __future__ import annotations

import argparse
import logging
import queue
import sys
import time

import numpy as np

from .backend import open_machine
from .errors import RingError
from .machine import MachineConfig
from .vcpus import Fault, RingSoftFull
from .workloads import WORKLOAD_IDS, Workload


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def run_demo(seconds: float, vcpus: int, memory_mib: int, ring_entries: int, workload_name: str,
             interval_ms: float, backend: str, progress_bar: bool = True) -> dict:
    """Run the loop; return the figures the report prints."""
    config = MachineConfig(vcpus=vcpus, data_bytes=memory_mib << 20, ring_entries=ring_entries)
    workload = Workload(workload_name, seed=42)
    pauses_us, harvests_us, pages, reasons = [], [], [], {"ring_full": 0, "interval": 0}
    with open_machine(config, workload, backend=backend) as vm:
        vm.start()
        started = last = time.monotonic()
        bar = None
        if progress_bar:
            from tqdm import tqdm
            bar = tqdm(total=round(seconds, 1), unit="s", mininterval=0.1, desc=f"{vm.backend} guest", file=sys.stderr,
                       bar_format="{desc}: {bar} {n:.1f}/{total:.1f} s {postfix}")
        while (now := time.monotonic()) - started < seconds:
            timeout = max(0.0, interval_ms / 1000 - (now - last))
            try:
                event = vm.events.get(timeout=timeout)
            except queue.Empty:
                event = None
            if isinstance(event, Fault):
                raise RingError(f"the guest faulted: {event.reason} {event.detail}")
            if event is not None and not isinstance(event, RingSoftFull):
                continue
            reasons["ring_full" if event is not None else "interval"] += 1
            t0 = time.perf_counter_ns()
            vm.pause()
            t1 = time.perf_counter_ns()
            dirty = vm.harvest()
            t2 = time.perf_counter_ns()
            vm.resume()
            t3 = time.perf_counter_ns()
            pauses_us.append((t3 - t0) / 1000)
            harvests_us.append((t2 - t1) / 1000)
            pages.append(dirty.count)
            last = time.monotonic()
            if bar is not None:
                bar.set_postfix_str(f"{len(pages)} harvests", refresh=False)
                bar.update(round(min(seconds, last - started), 1) - bar.n)  # redraws at most 10/s
        vm.pause()
        elapsed = time.monotonic() - started
        if bar is not None:
            bar.update(round(seconds, 1) - bar.n)
            bar.close()
        progress = sum(vm.progress_all())
        return {
            "backend": vm.backend, "vcpus": vcpus, "memory_mib": memory_mib, "ring_entries": ring_entries,
            "workload": workload_name, "seconds": elapsed, "harvests": len(pages), "reasons": reasons,
            "dirty_pages_p50": _percentile(pages, 50), "dirty_pages_max": max(pages, default=0),
            "harvest_us_p50": _percentile(harvests_us, 50), "harvest_us_p99": _percentile(harvests_us, 99),
            "pause_us_p50": _percentile(pauses_us, 50), "pause_us_p99": _percentile(pauses_us, 99),
            "guest_writes": progress, "guest_writes_per_s": progress / elapsed if elapsed else 0.0,
        }


def format_report(r: dict) -> str:
    lines = [
        f"colo-ring demo: {r['workload']} guest on the {r['backend']} backend, {r['vcpus']} vCPUs, "
        f"{r['memory_mib']} MiB data, rings of {r['ring_entries']} entries",
        f"  ran {r['seconds']:.1f} s; {r['harvests']} harvests "
        f"({r['reasons']['ring_full']} at a soft-full ring, {r['reasons']['interval']} at the interval)",
        f"  dirty pages per harvest   p50 {r['dirty_pages_p50']:8.0f}   max {r['dirty_pages_max']:8.0f}",
        f"  harvest + reset (us)      p50 {r['harvest_us_p50']:8.1f}   p99 {r['harvest_us_p99']:8.1f}",
        f"  pause, harvest, resume    p50 {r['pause_us_p50']:8.1f}   p99 {r['pause_us_p99']:8.1f}",
        f"  guest writes              {r['guest_writes']} ({r['guest_writes_per_s']:.0f}/s; each first "
        f"write after a reset costs the guest a write fault)",
        "  figures are medians and tails of one run on a shared machine: compare ratios, not absolutes",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="colo-ring-demo", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="how long the guest runs (default 5)")
    parser.add_argument("--vcpus", type=int, default=2)
    parser.add_argument("--memory-mib", type=int, default=256, help="data region size (multiple of 2)")
    parser.add_argument("--ring", type=int, default=1024, help="dirty ring entries per vCPU")
    parser.add_argument("--workload", choices=sorted(WORKLOAD_IDS), default="hotcold")
    parser.add_argument("--interval-ms", type=float, default=50.0,
                        help="harvest at least this often even if no ring fills")
    parser.add_argument("--backend", choices=("auto", "kvm", "sim"), default="auto")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.workload == "oracle":
        parser.error("the oracle workload needs a host that bumps its iteration: use the tests")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        report = run_demo(args.seconds, args.vcpus, args.memory_mib, args.ring, args.workload,
                          args.interval_ms, args.backend, progress_bar=not args.json)
    except RingError as exc:
        print(f"colo-ring-demo: {exc}", file=sys.stderr)
        return 2
    if args.json:
        import json
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
