"""The initial sync: copy a running guest to a new replica (pre-copy, then stop-and-copy).

Tracking starts with a drain of the rings; every resident page is then copied
in batch epochs while the guest runs (PrecopyReady: the protocol numbers
them), and each round re-copies what the ring says the guest dirtied during
the previous one. When a round leaves few enough pages (or the rounds run
out), SyncRoundsDone asks the protocol for the final stop-and-copy, a normal
consistent checkpoint that also carries what is left over (`take_leftover`).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Callable

import numpy as np
from tqdm import tqdm

from ring.pages import from_pages, to_pages
from ring.dirty import DirtySet
from ring.machine import Machine

from . import protocol as proto
from .snapshot import Snapshotter, StagingPool

log = logging.getLogger("colo.primary")


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
        self.dirty: DirtySet | None = None             # dirtied since the round began
        self.leftover: DirtySet | None = None          # what the final copy must add

    def keep(self, dirty: DirtySet) -> None:
        """Pages harvested while syncing (a full ring drained): they must be copied again."""
        self.dirty = dirty if self.dirty is None else self.dirty.merged(dirty)

    def drain(self) -> None:
        """Harvest now (the guest goes on) and keep what it dirtied."""
        self.machine.pause()
        try:
            self.keep(self.machine.harvest())
        finally:
            self.machine.resume()

    def take_leftover(self) -> DirtySet | None:
        """For the final stop-and-copy: the last round's pages and all dirtied since."""
        extra, self.leftover = self.leftover, None
        if self.dirty is not None:
            extra = self.dirty if extra is None else extra.merged(self.dirty)
            self.dirty = None
        return extra

    def pop_batch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.batches.pop(0)

    def drop(self) -> None:
        """The replica is gone: give the buffers back, forget the sets."""
        while self.batches:
            self.pool.release(self.batches.pop(0)[2])
        self.dirty = self.leftover = None

    async def run(self) -> None:
        """Pre-copy rounds while the guest runs, then SyncRoundsDone (the final stop-and-copy)."""
        self.drain()                                  # tracking starts now: everything else is resident
        self.dirty = None
        keys = from_pages({slot: memory.resident_pages() for slot, memory in self.machine.memory.slots.items()})
        log.info("sync: %d resident pages (%.1f MiB) to copy", len(keys), len(keys) * 4096 / 2**20)
        bar = tqdm(total=len(keys), unit="page", desc="initial sync", file=sys.stderr, leave=False,
                   disable=not sys.stderr.isatty())
        try:
            await self._rounds(keys, bar)
        finally:
            bar.close()

    async def _rounds(self, keys: np.ndarray, bar) -> None:
        settings = self.settings
        pending: DirtySet | None = None
        for round_number in range(settings.precopy_max_rounds):
            if round_number:
                bar.total += len(keys)
                bar.set_description(f"sync round {round_number + 1}")
            for start in range(0, len(keys), settings.precopy_epoch_pages):
                chunk = keys[start:start + settings.precopy_epoch_pages]
                while self.batches or self.pool.free == 0:
                    await asyncio.sleep(0.001)       # backpressure: wait for the previous batch to go
                pages, buffer = self.snapshotter.read_pages(chunk)
                self.batches.append((chunk, pages, buffer))
                self.feed(proto.PrecopyReady(time.monotonic()))
                bar.update(len(chunk))
            self.drain()
            pending, self.dirty = self.dirty, None
            keys = pending.keys() if pending is not None else np.empty(0, dtype=np.uint64)
            log.info("sync: round %d left %d dirty pages", round_number + 1, len(keys))
            if len(keys) <= settings.precopy_done_pages:
                self.leftover = pending
                break
        else:                                         # rounds ran out: the final copy takes the rest
            self.leftover = pending if pending is not None else DirtySet(to_pages(keys))
        while self.batches:
            await asyncio.sleep(0.001)
        self.feed(proto.SyncRoundsDone(time.monotonic(), self.next_epoch() - 1))
