"""The initial sync: copy a running guest to a new replica (pre-copy, then stop-and-copy).

Tracking starts with a drain of the rings; every resident page is then copied
in batch epochs while the guest runs (PrecopyReady: the protocol numbers
them), and each round re-copies what the ring says the guest dirtied during
the previous one. When a round leaves few enough pages (or the rounds run
out), SyncRoundsDone asks the protocol for the final stop-and-copy, a normal
consistent checkpoint that also carries what is left over (`take_leftover`).

Auto-converge: a round that leaves more than half of what it copied dirty again
means the guest dirties memory faster than the link carries it; the sync then
holds the guest's vCPUs a share of the time (QEMU's cpu-throttle: from 20%,
then enough for the guest to dirty at most half of the copy rate, and at least
10 points more each round, up to `throttle_max`), says so in the log and the
status, and lets it run at full speed again once the final copy is taken. The
rounds go on until one converges, or `precopy_max_rounds` have run with the
throttle at its maximum. `status()` gives the progress: the round, pages copied,
the copy and dirty rates, the throttle and the projected end.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Callable

import numpy as np
from tqdm import tqdm

from ring import pages as pagekeys
from ring.pages import from_pages, to_pages
from ring.dirty import DirtySet
from ring.machine import Machine

from . import protocol as proto
from .snapshot import Snapshotter, StagingPool

log = logging.getLogger("colo.primary")

REPORT_EVERY_S = 5.0         # a progress line in the log this often during a long round
CONVERGES_BELOW = 0.5        # a round converges when it leaves at most this share of what it copied
THROTTLE_FIRST = 0.2         # auto-converge's first hold share, then + THROTTLE_STEP a round (as QEMU)
THROTTLE_STEP = 0.1


class DirtyMarks:
    """Pages dirtied during a sync round, one flag per page: a full ring's harvest is marked in
    O(its pages), however often the rings fill. (Merging sorted sets instead cost O(the round) at
    every fill: with a large guest the loop did nothing else, and the guest waited at full rings.)"""

    def __init__(self, slot_pages: dict[int, int]) -> None:
        self._flags = {slot: np.zeros(pages, dtype=bool) for slot, pages in slot_pages.items()}
        self._marked = False

    def add(self, dirty: DirtySet) -> None:
        for slot, offsets in dirty.pages.items():
            if len(offsets):
                self._flags[slot][offsets] = True
                self._marked = True

    def add_keys(self, keys: np.ndarray) -> None:
        """Mark pages named by sorted page keys."""
        for slot, start, end in pagekeys.by_slot(keys):
            self._flags[slot][pagekeys.offsets(keys[start:end]).astype(np.intp)] = True
            self._marked = True

    def clear_keys(self, keys: np.ndarray) -> None:
        """Unmark pages named by sorted page keys (nothing to do while nothing is marked: most
        checkpoints of a protected guest, see settle)."""
        if not self._marked:
            return
        for slot, start, end in pagekeys.by_slot(keys):
            self._flags[slot][pagekeys.offsets(keys[start:end]).astype(np.intp)] = False

    def settle(self) -> None:
        """Note whether anything is still marked (after a sync gathered every page it marked)."""
        self._marked = any(flags.any() for flags in self._flags.values())

    def take(self) -> DirtySet | None:
        """What was marked (None: nothing), and start again."""
        if not self._marked:
            return None
        pages = {}
        for slot, flags in self._flags.items():
            offsets = np.flatnonzero(flags).astype(np.uint64)
            if len(offsets):
                pages[slot] = offsets
                flags[:] = False
        self._marked = False
        return DirtySet(pages=pages, entries=sum(len(o) for o in pages.values()))


class ReplicaCopy:
    """What the replica's standby lacks, so that a replica lost and found again resumes its sync
    from what it holds instead of from nothing.

    A page is marked when its content may differ from the standby's committed copy: every page a
    sync will copy (at its start), every page harvested dirty and not sent in the same pause
    (full rings drained while syncing or unprotected), and, when the replica is lost, every page
    of the epochs it had not acknowledged. A page is unmarked when its content is gathered into an
    epoch (a pre-copy batch, a checkpoint): from then on the replica gets it, or the loss marks
    it again. `session` is the session whose replica holds the copy (0: none yet).
    """

    def __init__(self, slot_pages: dict[int, int]) -> None:
        self.marks = DirtyMarks(slot_pages)
        self.session = 0
        self._sent: dict[int, np.ndarray] = {}          # epoch -> its keys, until acknowledged

    def start(self, session: int, keys: np.ndarray | None) -> None:
        """A sync of `session` begins: from nothing (`keys`: the pages it copies), or resumed (None)."""
        self.session = session
        if keys is not None:
            self.marks.take()
            self._sent.clear()
            self.marks.add_keys(keys)

    def dirtied(self, dirty: DirtySet) -> None:
        if self.session:
            self.marks.add(dirty)

    def gathered(self, keys: np.ndarray) -> None:
        if self.session:
            self.marks.clear_keys(keys)

    def sent(self, epoch: int, keys: np.ndarray) -> None:
        if self.session:
            self._sent[epoch] = keys

    def acked(self, epoch: int) -> None:
        for done in [e for e in self._sent if e <= epoch]:
            del self._sent[done]

    def lost(self) -> None:
        """The replica is gone: what it had not acknowledged is not in its copy."""
        for keys in self._sent.values():
            self.marks.add_keys(keys)
        self._sent.clear()

    def take_missing(self) -> np.ndarray:
        """The keys of the pages a resumed sync must copy (sorted), unmarked meanwhile."""
        missing = self.marks.take()
        return missing.keys() if missing is not None else np.empty(0, dtype=np.uint64)


class InitialSync:
    """The shell's half of a sync: gathers pre-copy batches, keeps the pages dirtied meanwhile."""

    def __init__(self, machine: Machine, snapshotter: Snapshotter, pool: StagingPool, settings,
                 feed: Callable[[proto.PrimaryEvent], None], next_epoch: Callable[[], int]) -> None:
        self.machine = machine
        self.snapshotter = snapshotter
        self.pool = pool
        self.settings = settings                       # the [replication] section
        self.feed = feed
        self.next_epoch = next_epoch
        self.batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []   # (keys, pages, buffer)
        slot_pages = {slot: memory.spec.pages for slot, memory in machine.memory.slots.items()}
        self.dirty = DirtyMarks(slot_pages)            # dirtied during this round
        self.copy = ReplicaCopy(slot_pages)            # what the replica's standby lacks
        self.leftover: DirtySet | None = None          # what the final copy must add
        self.progress: SyncProgress | None = None
        self.throttle = 0.0                            # auto-converge's share of time the guest is held

    def keep(self, dirty: DirtySet) -> None:
        """Pages harvested while syncing (a full ring drained): they must be copied again."""
        self.dirty.add(dirty)
        self.copy.dirtied(dirty)

    def drain(self) -> None:
        """Harvest now (the guest goes on) and keep what it dirtied."""
        self.machine.pause()
        try:
            self.keep(self.machine.harvest())
        finally:
            self.machine.resume()

    def take_leftover(self) -> DirtySet | None:
        """For the final stop-and-copy: the last round's pages and all dirtied since. The copy is
        taken in this pause, so the guest may run at full speed again."""
        extra, self.leftover = self.leftover, None
        dirtied = self.dirty.take()
        if dirtied is not None:
            extra = dirtied if extra is None else extra.merged(dirtied)
        self._unthrottle()
        return extra

    def pop_batch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.batches.pop(0)

    def drop(self) -> None:
        """The replica is gone: give the buffers back, forget the sets."""
        while self.batches:
            keys, _, buffer = self.batches.pop(0)
            self.copy.marks.add_keys(keys)            # gathered, never sent: the replica lacks them
            self.pool.release(buffer)
        self.dirty.take()
        self.copy.lost()
        self.leftover = None
        self._unthrottle()
        if self.progress is not None:
            self.progress.state = "dropped"

    def _unthrottle(self) -> None:
        if self.throttle:
            self.throttle = 0.0
            if not self.machine._closed:
                self.machine.throttle(0.0)
            log.warning("auto-converge: the guest runs at full speed again")

    def finished(self) -> None:
        """The replica committed the final copy: the guest is protected."""
        if self.progress is not None:
            self.progress.state = "done"
            self.progress.finished_at = time.monotonic()
        self.copy.marks.settle()                  # (usually nothing left: the checkpoints skip the marks)

    def status(self) -> dict | None:
        """The sync's progress for the agent's status (None before the first sync)."""
        return self.progress.status(time.monotonic()) if self.progress is not None else None

    async def run(self, session: int, resume: bool = False) -> None:
        """Pre-copy rounds while the guest runs, then SyncRoundsDone (the final stop-and-copy).
        `resume`: the replica kept its copy of the last session: copy only what it lacks."""
        self.drain()                                  # tracking starts now: everything else is resident
        self.dirty.take()
        if resume:
            keys = self.copy.take_missing()
            self.copy.start(session, None)
            log.info("sync: resumed: the replica holds its copy; %d pages (%.1f MiB) to copy again",
                     len(keys), len(keys) * 4096 / 2**20)
        else:
            keys = from_pages({slot: memory.resident_pages() for slot, memory in self.machine.memory.slots.items()})
            self.copy.start(session, keys)
            log.info("sync: %d resident pages (%.1f MiB) to copy", len(keys), len(keys) * 4096 / 2**20)
        self.progress = SyncProgress(len(keys), time.monotonic(), time.time())
        self.progress.resumed = resume
        bar = tqdm(total=len(keys), unit="page", desc="initial sync", file=sys.stderr, leave=False,
                   disable=not sys.stderr.isatty())
        try:
            await self._rounds(keys, bar)
        finally:
            bar.close()

    async def _rounds(self, keys: np.ndarray, bar) -> None:
        settings, progress = self.settings, self.progress
        pending: DirtySet | None = None
        round_number = 0
        while True:
            round_number += 1
            progress.begin_round(round_number, len(keys), time.monotonic())
            if round_number > 1:
                bar.total += len(keys)
                bar.set_description(f"sync round {round_number}")
            next_report = time.monotonic() + REPORT_EVERY_S
            for start in range(0, len(keys), settings.precopy_epoch_pages):
                chunk = keys[start:start + settings.precopy_epoch_pages]
                while self.batches or self.pool.free == 0:
                    await asyncio.sleep(0.001)       # backpressure: wait for the previous batch to go
                pages, buffer = self.snapshotter.read_pages(chunk)
                self.copy.gathered(chunk)
                self.batches.append((chunk, pages, buffer))
                self.feed(proto.PrecopyReady(time.monotonic()))
                progress.copied(len(chunk), time.monotonic())
                bar.update(len(chunk))
                if time.monotonic() >= next_report:
                    next_report = time.monotonic() + REPORT_EVERY_S
                    log.info("sync: %s", progress.describe(time.monotonic()))
            self.drain()
            pending = self.dirty.take()
            copied = len(keys)
            keys = pending.keys() if pending is not None else np.empty(0, dtype=np.uint64)
            progress.end_round(len(keys), time.monotonic())
            log.info("sync: round %d left %d dirty pages (%s)", round_number, len(keys),
                     progress.describe(time.monotonic()))
            if len(keys) <= settings.precopy_done_pages:
                self.leftover = pending
                break
            if len(keys) > copied * CONVERGES_BELOW and settings.auto_converge \
                    and self.throttle < settings.throttle_max:
                self._slow_down(progress)
            elif round_number >= settings.precopy_max_rounds and (
                    not settings.auto_converge or self.throttle >= settings.throttle_max):
                # rounds ran out: the final copy takes the rest
                self.leftover = pending if pending is not None else DirtySet(to_pages(keys))
                log.warning("sync: pre-copy did not converge in %d rounds%s: the final stop-and-copy takes "
                            "%d pages", round_number, f" (guest throttled {self.throttle:.0%})"
                            if self.throttle else "", len(keys))
                break
        progress.state = "final copy"
        while self.batches:
            await asyncio.sleep(0.001)
        self.feed(proto.SyncRoundsDone(time.monotonic(), self.next_epoch() - 1))

    def _slow_down(self, progress: "SyncProgress") -> None:
        """Auto-converge: hold the guest a larger share of the time, enough (if the rates hold)
        for it to dirty at most half of what the sync copies in the same time."""
        settings = self.settings
        copy_rate, dirty_rate = progress.copy_rate, progress.dirty_rate
        wanted = 1 - CONVERGES_BELOW * copy_rate / dirty_rate if dirty_rate > 0 else 0.0
        step = THROTTLE_FIRST if not self.throttle else self.throttle + THROTTLE_STEP
        self.throttle = round(min(settings.throttle_max, max(step, wanted)), 3)
        self.machine.throttle(self.throttle)
        progress.throttle = self.throttle
        log.warning("auto-converge: the guest dirtied %.0f pages/s while the sync copied %.0f pages/s: "
                    "holding its vCPUs %.0f%% of the time until the final copy", dirty_rate, copy_rate,
                    self.throttle * 100)


class SyncProgress:
    """How far a sync is, how fast it copies, how fast the guest dirties, and when it should end."""

    def __init__(self, resident_pages: int, now: float, wall: float) -> None:
        self.resident_pages = resident_pages
        self.started, self.started_wall = now, wall
        self.state = "pre-copy"
        self.round = 0
        self.round_pages = 0
        self.round_copied = 0
        self.round_started = now
        self.copied_pages = 0
        self.copy_rate = 0.0           # pages/s, this round (the last one's before it copied much)
        self.dirty_rate = 0.0          # pages/s the guest dirtied during the last round
        self.left_ratio: float | None = None     # the last round's pages dirtied / pages copied
        self.throttle = 0.0
        self.finished_at: float | None = None
        self.resumed = False

    def begin_round(self, number: int, pages: int, now: float) -> None:
        self.round, self.round_pages, self.round_copied, self.round_started = number, pages, 0, now

    def copied(self, pages: int, now: float) -> None:
        self.round_copied += pages
        self.copied_pages += pages
        elapsed = now - self.round_started
        if elapsed > 0.05 or not self.copy_rate:
            self.copy_rate = self.round_copied / max(elapsed, 1e-6)

    def end_round(self, left: int, now: float) -> None:
        elapsed = max(now - self.round_started, 1e-6)
        if self.round_pages:
            self.copy_rate = self.round_pages / elapsed
            self.left_ratio = left / self.round_pages
        self.dirty_rate = left / elapsed

    def eta_s(self, now: float) -> float | None:
        """Seconds to the final copy if the rates hold: the rest of this round, then rounds that
        shrink by the last round's ratio; None while the sync does not converge."""
        if not self.copy_rate:
            return None
        remaining = self.round_pages - self.round_copied
        ratio = self.left_ratio
        if ratio is None:                          # round 1: later rounds are not known yet
            return remaining / self.copy_rate
        if ratio >= 0.9:
            return None
        return (remaining + self.round_pages * ratio / (1 - ratio)) / self.copy_rate

    def describe(self, now: float) -> str:
        eta = self.eta_s(now)
        share = self.round_copied / self.round_pages if self.round_pages else 1.0
        return (f"round {self.round} {share:.0%} of {self.round_pages} pages, {self.copy_rate * 4096 / 2**20:.0f} "
                f"MiB/s, guest dirtying {self.dirty_rate:.0f} pages/s"
                + (f", throttled {self.throttle:.0%}" if self.throttle else "")
                + (f", about {eta:.1f} s to go" if eta is not None else ", not converging yet"))

    def status(self, now: float) -> dict:
        eta = self.eta_s(now) if self.state == "pre-copy" else None
        end = self.finished_at if self.finished_at is not None else now
        return {"state": self.state, "started_at": self.started_wall, "elapsed_s": round(end - self.started, 3),
                "resident_pages": self.resident_pages, "round": self.round, "round_pages": self.round_pages,
                "round_copied": self.round_copied, "copied_pages": self.copied_pages,
                "copy_rate_pages_s": round(self.copy_rate), "dirty_rate_pages_s": round(self.dirty_rate),
                "throttle": self.throttle, "eta_s": round(eta, 2) if eta is not None else None,
                "resumed": self.resumed}
