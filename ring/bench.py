"""Benchmarks of the ring package on the real KVM backend.

    python -m ring.bench harvest [--quick] [--json] [--memory 1,8,64] [--pages 100,1000,10000]
                                 [--rounds K]

`harvest` measures why this project uses the dirty ring: collecting a small
dirty set costs O(dirty pages) from the ring but O(guest memory) from the
bitmap. For each point (guest memory size, dirty pages per round) it builds
two one-vCPU guests of that size, one tracked by the ring and one by the
bitmap, and makes both guests write exactly the same pages: the sequential
workload with a stride that spreads the N pages over the whole data region,
so the bitmap is as sparse as in real use. Each round lets the guest write N
pages, pauses it, and times `Machine.harvest()`:

- ring: walk every ring, mark RESET, deduplicate (one native call,
  ring._native.harvest), then KVM_RESET_DIRTY_RINGS with signals blocked
  (ring._native.reset_dirty_rings), into a DirtySet (RingTracker.collect);
- bitmap: KVM_GET_DIRTY_LOG per slot, then find the set bits into the same
  DirtySet (BitmapTracker.collect).

Both trackers must report the same data-slot pages, and those must be the
pages the workload wrote; the table flags a point where any round differs. The
harvested page count also holds the guest's own low-slot pages (its
parameter block and stack), one or two a round.

As DESIGN.md ("Benchmarks") asks, the figures are medians of several rounds
after a warm-up round (this machine is shared, nested and noisy), and the
ratio (bitmap / ring) matters more than the absolute times. The times are
taken around the Python call, so they include the Python around the native
calls (and, for the bitmap, numpy's), not only the ioctls. The guest's own writes (about 28 us for a first write to a
page after a reset on this host) are not timed.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from . import abi
from .backend import open_machine
from .dirty import DirtySet, soft_limit
from .errors import RingError
from .guest import layout
from .machine import MAX_DATA_BYTES, Machine, MachineConfig
from .vcpus import RingSoftFull
from .workloads import Workload

GIB = 1 << 30
DEFAULT_MEMORY_GIB = (1, 8, 64)
DEFAULT_PAGES = (100, 1000, 10000)
#: --quick: the headline point (64 GiB, 100 pages) and a few cheap ones.
QUICK_POINTS = ((1, 100), (8, 100), (64, 100), (1, 1000))
DEFAULT_ROUNDS = 11
LARGE_SET_ROUNDS = 5          # above LARGE_SET pages a round costs ~28 us of guest time a page
LARGE_SET = 5000
QUICK_ROUNDS = 7
#: Ring entries left free beyond the data pages: the guest's stack and parameter pages.
LOW_SLOT_SLACK = 64
ROUND_TIMEOUT = 60.0


class BenchError(RuntimeError):
    """The benchmark could not run (bad guest behaviour, a ring too small)."""


# --- the harvest benchmark ----------------------------------------------------


@dataclass(frozen=True)
class HarvestPoint:
    """One point of the harvest benchmark: medians over `rounds` measured rounds."""

    memory_gib: int
    dirty_pages: int              # data pages the guest wrote per round (requested N)
    ring_us: float                # median Machine.harvest() on the ring guest
    bitmap_us: float              # median Machine.harvest() on the bitmap guest
    rounds: int
    harvested_pages: int          # median pages the ring reported, low-slot pages included
    same_pages: bool              # ring == bitmap == the workload's pages, every round

    @property
    def ratio(self) -> float:
        return self.bitmap_us / self.ring_us if self.ring_us > 0 else float("inf")

    def as_json(self) -> dict:
        """The issue's record: memory_gib, dirty_pages, ring_us, bitmap_us, ratio."""
        return {"memory_gib": self.memory_gib, "dirty_pages": self.dirty_pages,
                "ring_us": round(self.ring_us, 1), "bitmap_us": round(self.bitmap_us, 1),
                "ratio": round(self.ratio, 2)}


@dataclass
class _Series:
    """What one guest's measured rounds produced."""

    times_ns: list[int] = field(default_factory=list)
    data_pages: list[np.ndarray] = field(default_factory=list)   # per round, the data slot's pages
    harvested: list[int] = field(default_factory=list)           # per round, pages over all slots
    expected: list[np.ndarray] = field(default_factory=list)     # per round, the pages written


def ring_entries_for(pages: int) -> int:
    """The smallest valid ring whose soft limit holds `pages` plus the guest's low-slot pages."""
    entries = abi.DIRTY_RING_MIN_ENTRIES
    while soft_limit(entries) < pages + LOW_SLOT_SLACK:
        entries *= 2
    if entries > abi.DIRTY_RING_MAX_ENTRIES:
        raise BenchError(f"{pages} dirty pages a round do not fit the largest dirty ring "
                         f"({abi.DIRTY_RING_MAX_ENTRIES} entries)")
    return entries


def harvest_workload(memory_gib: int, pages: int) -> Workload:
    """Sequential writes, `pages` of them spread evenly over the whole data region."""
    data_pages = memory_gib * GIB // abi.PAGE_SIZE
    return Workload("sequential", seed=1, stride=max(1, data_pages // pages),
                    working_set_pages=data_pages)


def _run_round(machine: Machine, limit: int) -> None:
    """Let the (single) vCPU write up to item `limit`, then pause the machine."""
    try:
        others = machine.run_to_limit(limit, ROUND_TIMEOUT)
    except RingError as exc:
        raise BenchError(str(exc)) from exc
    if any(isinstance(event, RingSoftFull) for event in others):
        raise BenchError(f"the dirty ring ({machine.config.ring_entries} entries) filled before "
                         f"the guest reached item {limit}")


def _timed_harvest(machine: Machine) -> tuple[int, DirtySet]:
    """Machine.harvest() timed with perf_counter_ns, the garbage collector off (as timeit does)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        dirty = machine.harvest()
        elapsed = time.perf_counter_ns() - start
    finally:
        if enabled:
            gc.enable()
    return elapsed, dirty


def _guest(dirty_log: str, memory_gib: int, pages: int) -> Machine:
    config = MachineConfig(vcpus=1, data_bytes=memory_gib * GIB, dirty_log=dirty_log,
                           ring_entries=ring_entries_for(pages))
    return open_machine(config, harvest_workload(memory_gib, pages), backend="kvm")


def _measured_round(machine: Machine, pages: int, series: _Series) -> None:
    """One round: the guest writes `pages` pages, then a timed harvest; record it in `series`."""
    first = machine.progress(0)
    _run_round(machine, first + pages)
    elapsed, dirty = _timed_harvest(machine)
    items = np.arange(first, machine.progress(0), dtype=np.uint64)
    series.times_ns.append(elapsed)
    series.data_pages.append(dirty.slot(layout.DATA_SLOT))
    series.harvested.append(dirty.count)
    series.expected.append(np.unique(machine.resolved.pages(0, items)))


def measure_harvest_point(memory_gib: int, pages: int, rounds: int,
                          tick: Callable[[], None] = lambda: None) -> HarvestPoint:
    """Measure one (memory, dirty pages) point on a ring guest and a bitmap guest.

    Both guests live for the point only; their rounds alternate (ring, bitmap,
    ring, ...) so that both see the same drift of this shared machine.
    """
    ring, bitmap = _Series(), _Series()
    with _guest("ring", memory_gib, pages) as ring_guest, \
            _guest("bitmap", memory_gib, pages) as bitmap_guest:
        for guest in (ring_guest, bitmap_guest):
            _run_round(guest, pages)                 # warm-up: boot, host page faults, first harvest
            guest.harvest()
            tick()
        for _ in range(rounds):
            for guest, series in ((ring_guest, ring), (bitmap_guest, bitmap)):
                _measured_round(guest, pages, series)
                tick()
    same = all(np.array_equal(r, b) and np.array_equal(r, e)
               for r, b, e in zip(ring.data_pages, bitmap.data_pages, ring.expected))
    return HarvestPoint(memory_gib=memory_gib, dirty_pages=pages,
                        ring_us=float(np.median(ring.times_ns)) / 1000,
                        bitmap_us=float(np.median(bitmap.times_ns)) / 1000,
                        rounds=rounds, harvested_pages=int(np.median(ring.harvested)),
                        same_pages=same)


def default_rounds(pages: int, quick: bool = False) -> int:
    """Measured rounds for a point when --rounds is not given."""
    if quick:
        return QUICK_ROUNDS
    return LARGE_SET_ROUNDS if pages > LARGE_SET else DEFAULT_ROUNDS


def harvest_points(memory: Sequence[int] | None, pages: Sequence[int] | None,
                   quick: bool) -> list[tuple[int, int]]:
    """The (memory GiB, pages) grid: the chosen sizes, the quick set, or the full grid."""
    if quick and memory is None and pages is None:
        return list(QUICK_POINTS)
    return [(m, p) for m in (memory or DEFAULT_MEMORY_GIB) for p in (pages or DEFAULT_PAGES)]


def run_harvest(points: Sequence[tuple[int, int]], rounds: int | None = None, quick: bool = False,
                progress: bool = True) -> list[HarvestPoint]:
    """Measure every point, one point (and one pair of guests) at a time."""
    from tqdm import tqdm

    plan = [(m, p, rounds or default_rounds(p, quick)) for m, p in points]
    total = sum(2 * (1 + r) for _, _, r in plan)
    results = []
    with tqdm(total=total, desc="harvest", unit="round", file=sys.stderr, disable=not progress,
              leave=False) as bar:
        for memory_gib, pages, point_rounds in plan:
            bar.set_description(f"harvest {memory_gib} GiB, {pages} pages")
            point = measure_harvest_point(memory_gib, pages, point_rounds, lambda: bar.update(1))
            results.append(point)
            if not progress:
                print(f"harvest: {memory_gib} GiB, {pages} pages: ring {point.ring_us:.1f} us, "
                      f"bitmap {point.bitmap_us:.1f} us, ratio {point.ratio:.1f}", file=sys.stderr)
    return results


def format_harvest_table(points: Sequence[HarvestPoint]) -> str:
    """A fixed-width table of the points, with a note on what the figures are."""
    header = (f"{'memory':>8} {'dirty pages':>11} {'harvested':>9} {'rounds':>6} "
              f"{'ring us':>9} {'bitmap us':>10} {'ratio':>7}  same pages")
    lines = ["harvest: Machine.harvest() on a ring guest and a bitmap guest after the same guest writes",
             header, "-" * len(header)]
    for p in points:
        lines.append(f"{p.memory_gib:>4} GiB {p.dirty_pages:>11} {p.harvested_pages:>9} {p.rounds:>6} "
                     f"{p.ring_us:>9.1f} {p.bitmap_us:>10.1f} {p.ratio:>7.1f}  "
                     f"{'yes' if p.same_pages else 'NO: MISMATCH'}")
    counts = sorted({p.rounds for p in points})
    lines += [
        "dirty pages: data pages the guest wrote per round (spread over all its memory); harvested: "
        "pages the ring reported, with the guest's own stack/parameter pages.",
        "ring us: harvest + RESET + KVM_RESET_DIRTY_RINGS + dedup; bitmap us: KVM_GET_DIRTY_LOG + "
        "set-bit scan; both timed around the Python call. ratio = bitmap / ring.",
        f"This machine is shared, nested and noisy: times are medians of "
        f"{' or '.join(map(str, counts))} rounds after one warm-up round; compare ratios, not times.",
    ]
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The `python -m ring.bench` parser: one subcommand per benchmark."""
    parser = argparse.ArgumentParser(prog="python -m ring.bench",
                                     description="Benchmarks of the ring package on the real KVM backend.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    harvest = commands.add_parser(
        "harvest", help="dirty ring vs bitmap: harvest time by memory size and dirty pages",
        description="Time Machine.harvest() on a dirty-ring guest and a bitmap guest after the same "
                    "guest writes, by guest memory size and dirty pages per round (medians).")
    harvest.add_argument("--json", action="store_true",
                         help="print only a JSON list, one object per point, to stdout")
    harvest.add_argument("--quick", action="store_true",
                         help=f"a few points ({', '.join(f'{m} GiB/{p}' for m, p in QUICK_POINTS)}), "
                              f"{QUICK_ROUNDS} rounds each: well under 30 s")
    harvest.add_argument("--memory", type=_int_list, metavar="GIB[,GIB...]",
                         help=f"guest memory sizes in GiB (default {','.join(map(str, DEFAULT_MEMORY_GIB))})")
    harvest.add_argument("--pages", type=_int_list, metavar="N[,N...]",
                         help=f"dirty pages per round (default {','.join(map(str, DEFAULT_PAGES))})")
    harvest.add_argument("--rounds", type=int, metavar="K",
                         help=f"measured rounds per point (default {DEFAULT_ROUNDS}, "
                              f"{LARGE_SET_ROUNDS} above {LARGE_SET} pages, {QUICK_ROUNDS} with --quick)")
    harvest.set_defaults(run=_harvest_command, command_parser=harvest)
    return parser


def _harvest_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    points = harvest_points(args.memory, args.pages, args.quick)
    max_gib = MAX_DATA_BYTES // GIB
    for memory_gib, pages in points:
        if memory_gib > max_gib:
            parser.error(f"--memory {memory_gib}: the guest layout maps at most {max_gib} GiB of data")
        if pages > memory_gib * GIB // abi.PAGE_SIZE:
            parser.error(f"--pages {pages} exceeds the {memory_gib} GiB guest's pages")
        try:
            ring_entries_for(pages)
        except BenchError as exc:
            parser.error(f"--pages {pages}: {exc}")

    from .backend import kvm_status
    usable, reason = kvm_status()
    if not usable:
        print(f"ring.bench: cannot run on the real KVM backend: {reason}", file=sys.stderr)
        return 2

    started = time.monotonic()
    try:
        results = run_harvest(points, args.rounds, args.quick, progress=sys.stderr.isatty())
    except (BenchError, RingError, TimeoutError) as exc:
        print(f"ring.bench: harvest failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([p.as_json() for p in results]))
    else:
        print(format_harvest_table(results))
        print(f"Wall time {time.monotonic() - started:.1f} s.")
    bad = [p for p in results if not p.same_pages]
    if bad:
        print("ring.bench: the ring, the bitmap and the pages the guest wrote disagree at "
              + ", ".join(f"{p.memory_gib} GiB/{p.dirty_pages} pages" for p in bad), file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m ring.bench`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.run(args, args.command_parser)


if __name__ == "__main__":
    sys.exit(main())
