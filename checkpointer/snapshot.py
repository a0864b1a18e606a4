"""The stop-the-world part of a checkpoint, and nothing else.

The guest is paused only for this: every vCPU out of KVM_RUN, every ring
harvested and reset (plus the pages the VMM wrote), the dirty pages gathered
into a preallocated staging buffer (ring._native.gather: a memcpy per run of
consecutive pages, without the GIL), the vCPU and device state captured, the
guest resumed. Encoding and sending happen after
the resume, while the guest runs, from the staging buffer; the buffer goes
back to its pool once the epoch is encoded.

Pages are named by sorted page keys (ring.pages), the same keys the codec and
the replica use.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import ring._native as native
from ring import pages as pagekeys
from ring.dirty import DirtySet, soft_limit
from ring.machine import Machine
from ring.vcpu_state import VcpuState
from ring.memory import page_buffer


def gather(machine: Machine, keys: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Copy the pages named by `keys` into out[:len(keys)]: one native call, memcpy per run of pages."""
    keys = np.ascontiguousarray(keys, dtype=np.uint64)
    native.gather(keys, [(slot, memory.pages) for slot, memory in machine.memory.slots.items()], out)
    return out[:len(keys)]


def gather_reference(machine: Machine, keys: np.ndarray, out: np.ndarray) -> np.ndarray:
    """gather() in numpy, one np.take per slot (the reference the native gather is tested against)."""
    for slot, start, end in pagekeys.by_slot(keys):
        source = machine.memory.slots[slot].pages
        np.take(source, pagekeys.offsets(keys[start:end]).astype(np.intp), axis=0,
                out=out[start:end], mode="clip")
    return out[:len(keys)]


class StagingPool:
    """Preallocated staging buffers, touched once so that no checkpoint pays first-touch faults."""

    def __init__(self, buffers: int, capacity_pages: int) -> None:
        self.capacity = capacity_pages
        self._free = [self._allocate(capacity_pages) for _ in range(buffers)]
        self._cond = threading.Condition()

    @staticmethod
    def _allocate(pages: int) -> np.ndarray:
        return page_buffer(pages)          # page-aligned, like guest memory (see page_buffer)

    def acquire(self, pages: int, timeout: float | None = 5.0) -> np.ndarray:
        """A buffer for `pages` pages; waits while all are in use (that is backpressure too)."""
        if pages > self.capacity:
            return page_buffer(pages, touch=False)   # rare (a large final sync): not pooled, touched once by the gather
        with self._cond:
            if not self._cond.wait_for(lambda: self._free, timeout):
                raise TimeoutError("no staging buffer came free: encoding is stuck")
            return self._free.pop()

    def release(self, buffer: np.ndarray) -> None:
        if len(buffer) != max(self.capacity, 1):
            return
        with self._cond:
            self._free.append(buffer)
            self._cond.notify()

    @property
    def free(self) -> int:
        return len(self._free)


@dataclass
class Snapshot:
    """One closed epoch, gathered: what the encoder needs, and what the pause cost."""

    epoch: int
    reason: str
    keys: np.ndarray
    pages: np.ndarray                   # a view into `buffer`
    buffer: np.ndarray
    vcpus: list[VcpuState]
    device: bytes
    consistent: bool                    # carries vCPU state (not a pre-copy round)
    times_ns: dict[str, int] = field(default_factory=dict)

    @property
    def pause_ns(self) -> int:
        return self.times_ns.get("pause_total", 0)


def staging_capacity(machine: Machine, extra_pages: int = 0) -> int:
    """Pages an epoch can hold: every ring up to its soft limit, plus headroom for VMM writes."""
    config = machine.config
    rings = config.vcpus * soft_limit(config.ring_entries) if config.dirty_log == "ring" else 0
    return rings + extra_pages + 256


class Snapshotter:
    """Takes snapshots of one machine into a pool of staging buffers."""

    def __init__(self, machine: Machine, pool: StagingPool) -> None:
        self.machine = machine
        self.pool = pool

    def take(self, epoch: int, reason: str, extra: DirtySet | None = None,
             capture_state: bool = True, device_state: Callable[[], bytes] | None = None,
             while_paused=None) -> Snapshot:
        """Pause, harvest (+ `extra` pages), gather, capture, resume. The guest runs again on return.

        Where the machine can (Machine.checkpoint: a KVM guest with dirty rings), the pause is one
        native call that also resumes the guest, or, with a device, the call and the device's state
        (`device_state`, read while paused) and then the resume; a test hook keeps it paused until
        the hook ran. Everything else in Python happens after the resume. Otherwise, and to finish what the native call could not, the
        steps are taken one by one."""
        if extra is None and capture_state:
            snapshot = self._take_native(epoch, reason, device_state, while_paused)
            if snapshot is not None:
                return snapshot
        machine = self.machine
        clock = time.monotonic_ns
        t0 = clock()
        machine.pause()
        t1 = clock()
        try:
            dirty = machine.harvest()
            if extra is not None:
                dirty = dirty.merged(extra)
            t2 = clock()
            keys = dirty.keys()
            buffer = self.pool.acquire(len(keys))
            gathered = gather(machine, keys, buffer)
            t3 = clock()
            vcpus = machine.capture_vcpus() if capture_state else []
            device = device_state() if capture_state and device_state is not None else b""
            t4 = clock()
            snapshot = Snapshot(epoch, reason, keys, gathered, buffer, vcpus, device, capture_state)
            hook_ns = 0
            if while_paused is not None:          # test hooks: inspect the machine at the checkpoint
                while_paused(snapshot, machine)
                hook_ns = clock() - t4
        finally:
            machine.resume()
        t5 = clock()
        snapshot.times_ns = {"kick": t1 - t0, "harvest": t2 - t1, "gather": t3 - t2, "capture": t4 - t3,
                             "resume": t5 - t4 - hook_ns, "pause_total": t5 - t0 - hook_ns}
        return snapshot

    def _take_native(self, epoch: int, reason: str, device_state: Callable[[], bytes] | None,
                     while_paused) -> Snapshot | None:
        machine = self.machine
        buffer = self.pool.acquire(self.pool.capacity)     # (before the pause: backpressure waits here)
        try:
            done = machine.checkpoint(buffer, resume=while_paused is None, paused_state=device_state)
        except BaseException:
            self.pool.release(buffer)
            if not machine.paused:
                raise
            machine.resume()
            raise
        if done is None:
            self.pool.release(buffer)
            return None
        clock = time.monotonic_ns
        t0, stopped, harvested, gathered_at, captured, went = done.times_ns
        hook_ns = 0
        try:
            keys = done.dirty.keys()
            if done.gathered is None:                      # more pages than a pooled buffer holds
                self.pool.release(buffer)
                buffer = self.pool.acquire(len(keys))
                gather(machine, keys, buffer)
            vcpus = done.vcpus if done.vcpus is not None else machine.capture_vcpus()
            captured = max(captured, clock()) if not done.resumed else captured
            snapshot = Snapshot(epoch, reason, keys, buffer[:len(keys)], buffer, vcpus, done.device, True)
            if while_paused is not None:
                while_paused(snapshot, machine)
                hook_ns = clock() - captured
        finally:
            if not done.resumed:
                machine.resume()
                went = clock()
        snapshot.times_ns = {"kick": stopped - t0, "harvest": harvested - stopped, "gather": gathered_at - harvested,
                             "capture": captured - gathered_at, "resume": went - captured - hook_ns,
                             "pause_total": went - t0 - hook_ns}
        return snapshot

    def read_pages(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Gather pages while the guest runs (pre-copy): returns (pages view, buffer to release)."""
        buffer = self.pool.acquire(len(keys))
        return gather(self.machine, keys, buffer), buffer
