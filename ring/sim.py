"""The simulated backend: the kernel's dirty logging and the guest, in numpy.

For hosts where /dev/kvm is unusable, or when asked for. The fake replaces the
real thing at the lowest level: the simulator plays KVM, so everything above
it (DirtyRing, RingTracker, BitmapTracker, the VcpuRunner and its pause
barrier, the machine's events) is the code the KVM backend runs.

What the simulated kernel does, as KVM does it (virt/kvm/dirty_ring.c):

- Each vCPU has a ring of `struct kvm_dirty_gfn` entries in a plain buffer,
  wrapped by the same DirtyRing class that wraps KVM's mmap. The kernel pushes
  at its own free-running dirty index: slot and offset first, then flags =
  DIRTY.
- A page is pushed the first time it is written after its last reset, and
  not again until it is reset (a per-slot "logged" bitmap, VM-wide as KVM's
  write protection is). Reads do not log, except the very first touch of a
  page that was never mapped: this host's shadow MMU maps it writable at once
  (the loader presets the dirty bits) and logs it. That is how the program's
  code page shows up in a guest's first harvest on KVM, and it does here too.
  (KVM may log a page in two rings when two vCPUs fault on it at the same
  moment; the simulator, which logs under one lock, never does. Harvests
  deduplicate, so nothing above notices.)
- The reset (KVM_RESET_DIRTY_RINGS) walks each ring from its reset index
  while the entry's flags have RESET, zeroes the flags, re-arms the page, and
  returns the number of entries reset over all rings. It stops at the first
  entry without RESET: no skipping.
- A signal stops the walk early, as on KVM (see ring/kvm.py): give the
  kernel a plan with interrupt_resets(), and each reset stops where the plan
  says a signal is pending, returns a short count, and leaves the last entry
  it reset writable (KVM leaves the whole 64-page batch it was coalescing;
  the simulator the one entry, which is enough to lose a page). Each planned
  signal counts in `signals`, the simulator's evidence of an interruption.
  rearm_all() is KVM's write protection of a slot when its dirty logging is
  turned on again.
- Soft full: when a ring holds entries - 64 entries not yet reset, the vCPU's
  next entry exits with ring_full, and keeps doing so until a reset frees
  entries. As on KVM, the store that pushed the last entry has not retired:
  the vCPU resumes on it, and it logs its page again after the reset.
- Bitmap mode keeps the same "logged" bitmap and hands it out like classic
  KVM_GET_DIRTY_LOG, which also clears it (re-arms the pages).

The guest is ring/workloads.py's vectorised twin of programs/workloads.c, run
in batches (at most BATCH_ITEMS items, so a pause waits for little). It reads
its settings from the parameter block and keeps its progress in the status
page, exactly where the C guest does, and it makes the same memory accesses
in the same order: at entry the code fetch, the call's push onto its stack
and the read of the parameter block; then per item the data store and the
progress store. It reports through the same ports (progress every
report_every items, the limit, done). A batch is cut where the ring becomes
soft full (a cumulative sum over "this access pushes an entry"), so the ring
ends holding exactly the soft limit, as on KVM.

The vCPU's own state is its place in the program: at the entry point, at the
top of the loop, or between an item's data store and its progress store; it
is carried in RIP (stand-in addresses only this backend interprets).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from . import abi, pages as pagekeys
from .dirty import BitmapTracker, DirtyRing, RingTracker, soft_limit
from .errors import ConfigError, KvmError, StateError
from .guest import layout, loader
from .machine import Machine, MachineConfig, NoTracker, VcpuState
from ._native import Gate
from .memory import GuestMemory
from .vcpus import Exit, PortHandler
from .workloads import Workload

log = logging.getLogger(__name__)

BATCH_ITEMS = 256

_DIRTY = np.uint32(abi.KVM_DIRTY_GFN_F_DIRTY)
_RESET = np.uint32(abi.KVM_DIRTY_GFN_F_RESET)
_U32 = 0xFFFFFFFF

CODE_PAGE = layout.PROGRAM_GPA >> abi.PAGE_SHIFT
STATUS_PAGE = layout.PARAMS_GPA >> abi.PAGE_SHIFT

#: Where a simulated vCPU is, as RIP: the entry point, the top of the item loop,
#: or on an item's progress store (its data store done). Only the simulator reads these.
RIP_ENTRY = layout.PROGRAM_GPA
RIP_LOOP = layout.PROGRAM_GPA + 0x80
RIP_PROGRESS_STORE = layout.PROGRAM_GPA + 0x118
_RIPS = {RIP_ENTRY: "entry", RIP_LOOP: "loop", RIP_PROGRESS_STORE: "progress_store"}


def stack_page(vcpu: int) -> int:
    """The page the guest's call to guest_main pushes its return address into."""
    return (loader.initial_regs(vcpu).rsp - 8) >> abi.PAGE_SHIFT


class SimDirtyLog:
    """The kernel's half: per-vCPU rings, the per-slot logged bitmaps, the reset walk.

    `slot_pages` maps slot id to its size in pages. With `ring_entries` None the
    VM tracks with the bitmap (no rings, get_dirty_log works); otherwise every
    vCPU gets a ring buffer (`buffers[v]`) that DirtyRing can wrap.
    """

    def __init__(self, slot_pages: dict[int, int], vcpus: int, ring_entries: int | None) -> None:
        self.slot_pages = dict(slot_pages)
        self.logged = {slot: np.zeros(pages, dtype=bool) for slot, pages in self.slot_pages.items()}
        self.mapped = {slot: np.zeros(pages, dtype=bool) for slot, pages in self.slot_pages.items()}
        self.ring_entries = ring_entries
        self.lock = threading.Lock()
        self.buffers: list[bytearray] = []
        self.views: list[np.ndarray] = []
        self.dirty_index = [0] * vcpus
        self.reset_index = [0] * vcpus
        self._interrupt_plan: Callable[[], int | None] | None = None
        self.signals = 0                       # planned signals, each one a reset interrupted
        if ring_entries is not None:
            self.soft_limit = soft_limit(ring_entries)
            self._mask = ring_entries - 1
            for _ in range(vcpus):
                buffer = bytearray(ring_entries * abi.DIRTY_GFN_DTYPE.itemsize)
                self.buffers.append(buffer)
                self.views.append(np.frombuffer(buffer, dtype=abi.DIRTY_GFN_DTYPE))

    # -- what the vCPU sees ----------------------------------------------------
    def used(self, vcpu: int) -> int:
        """Entries in the vCPU's ring not yet reset (pushed, harvested or not)."""
        return self.dirty_index[vcpu] - self.reset_index[vcpu]

    def soft_full(self, vcpu: int) -> bool:
        return self.ring_entries is not None and self.used(vcpu) >= self.soft_limit

    def access(self, vcpu: int, slots: np.ndarray, pages: np.ndarray,
               writes: np.ndarray | None = None) -> int:
        """The vCPU makes these memory accesses in order; return how many retired.

        An access pushes an entry when it is a write to a page not logged since
        its reset, or any first touch of a never-mapped page, and it is the
        first such access to that page in the sequence. When a push makes the
        ring soft full, that access does not retire and the count stops there.
        """
        slots = np.asarray(slots, dtype=np.uint32)
        pages = np.asarray(pages, dtype=np.uint64)
        count = len(pages)
        if count == 0:
            return 0
        if writes is None:
            writes = np.ones(count, dtype=bool)
        with self.lock:
            logged = np.empty(count, dtype=bool)
            mapped = np.empty(count, dtype=bool)
            present = np.unique(slots)
            for slot in present.tolist():                      # a loop per slot, not per page
                sel = slots == slot
                logged[sel] = self.logged[slot][pages[sel]]
                mapped[sel] = self.mapped[slot][pages[sel]]
            candidate = np.where(writes, ~logged, ~mapped)
            new = np.zeros(count, dtype=bool)
            where = np.flatnonzero(candidate)
            if len(where):
                keys = pagekeys.make(slots[where], pages[where])
                _, first = np.unique(keys, return_index=True)
                new[where[first]] = True
            retired = count
            if self.ring_entries is not None:
                room = self.soft_limit - self.used(vcpu)
                if room <= 0:                                   # KVM never runs a soft-full vCPU
                    return 0
                pushes = np.cumsum(new)
                if len(pushes) and pushes[-1] >= room:
                    cut = int(np.searchsorted(pushes, room))    # this access pushes the last entry
                    new[cut + 1:] = False
                    retired = cut
            pushed = np.flatnonzero(new)
            if len(pushed):
                self._log(vcpu, slots[pushed], pages[pushed])
            touched = slice(0, min(retired + 1, count))
            for slot in present.tolist():
                sel = slots[touched] == slot
                self.mapped[slot][pages[touched][sel]] = True
            return retired

    def _log(self, vcpu: int, slots: np.ndarray, pages: np.ndarray) -> None:
        for slot in np.unique(slots).tolist():
            self.logged[slot][pages[slots == slot]] = True
        if self.ring_entries is None:
            return
        ring = self.views[vcpu]
        positions = (self.dirty_index[vcpu] + np.arange(len(pages))) & self._mask
        ring["slot"][positions] = slots                  # the kernel's order: slot and offset,
        ring["offset"][positions] = pages
        ring["flags"][positions] = _DIRTY                # then flags (smp_wmb between)
        self.dirty_index[vcpu] += len(pages)

    # -- what the VMM calls ----------------------------------------------------
    def interrupt_resets(self, plan: Callable[[], int | None] | None) -> None:
        """Before each reset, plan() says after how many entries a signal is pending (None: no signal)."""
        self._interrupt_plan = plan

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: reset harvested entries in order, re-arm their pages.

        A planned signal stops the walk before the entry it falls on, and the
        last entry reset before it keeps its page writable (KVM's lost batch).
        """
        if self.ring_entries is None:
            raise KvmError("KVM_RESET_DIRTY_RINGS", errno.EINVAL, "simulated VM has no dirty ring")
        budget = self._interrupt_plan() if self._interrupt_plan is not None else None
        if budget is not None:
            self.signals += 1
        total = 0
        with self.lock:
            for vcpu, ring in enumerate(self.views):
                if budget is not None and total >= budget:
                    break                          # pending before this ring's first entry: nothing lost
                pending = self.used(vcpu)
                if pending == 0:
                    continue
                positions = (self.reset_index[vcpu] + np.arange(pending)) & self._mask
                unreset = np.flatnonzero((ring["flags"][positions] & _RESET) == 0)
                count = int(unreset[0]) if len(unreset) else pending
                cut = budget is not None and count >= budget - total
                if cut:
                    count = budget - total
                if count == 0:
                    continue
                positions = positions[:count]
                slots = ring["slot"][positions]
                offsets = ring["offset"][positions]
                ring["flags"][positions] = 0
                kept = count - 1 if cut else count     # the interrupted walk's last entry stays writable
                self._rearm(slots[:kept], offsets[:kept])
                self.reset_index[vcpu] += count
                total += count
                if cut:
                    break
        return total

    def rearm_all(self) -> None:
        """Write-protect every page again (KVM does when a slot's dirty logging is turned on)."""
        with self.lock:
            for logged in self.logged.values():
                logged[:] = False

    def _rearm(self, slots: np.ndarray, offsets: np.ndarray) -> None:
        for slot in np.unique(slots).tolist():
            if slot not in self.logged:       # unknown slot or address space: skipped, as KVM does
                continue
            pages = offsets[slots == slot]
            self.logged[slot][pages[pages < self.slot_pages[slot]]] = False

    def get_dirty_log(self, slot: int, bitmap_address: int) -> None:
        """KVM_GET_DIRTY_LOG (classic): fill the caller's bitmap, then clear and re-arm."""
        if self.ring_entries is not None:
            raise KvmError("KVM_GET_DIRTY_LOG", errno.ENXIO, "simulated VM uses the dirty ring")
        if slot not in self.logged:
            raise KvmError("KVM_GET_DIRTY_LOG", errno.EINVAL, f"no slot {slot}")
        with self.lock:
            logged = self.logged[slot]
            words = (len(logged) + 63) // 64
            target = np.ctypeslib.as_array((ctypes.c_uint64 * words).from_address(bitmap_address))
            packed = np.packbits(logged, bitorder="little")
            out = target.view(np.uint8)
            out[:len(packed)] = packed
            out[len(packed):] = 0
            logged[:] = False


class SimExecutor:
    """One simulated vCPU running the workload guest (the ring.vcpus.Executor protocol)."""

    def __init__(self, machine: SimMachine, index: int) -> None:
        self.index = index
        self.batch_items = BATCH_ITEMS
        self._machine = machine
        self._kernel = machine.kernel
        self._resolved = machine.resolved
        self._oracle = machine.resolved.workload.name == "oracle"
        self._status = machine.params["vcpu"][index]
        self._params = machine.params
        self._words = machine.data.words
        self._stack_page = stack_page(index)
        self._kicked = False
        self.place = "entry"                     # entry, loop, progress_store

    # -- the Executor protocol ----------------------------------------------
    def kick(self, thread_ident: int | None) -> None:
        self._kicked = True                      # immediate_exit: seen at the next entry

    def allow_run(self) -> None:
        self._kicked = False

    def set_in_value(self, value: int, size: int) -> None:
        pass                                     # the workload guest does no IN

    def run_gated(self, gate: Gate) -> Exit | None:
        """run() entered through the gate, which parks this vCPU while a stop bit is set; a stop
        bit set while it runs is its kick (polled between batches, like immediate_exit)."""
        if not gate.enter(self.index):
            return None
        try:
            return self.run(lambda: gate.stopping != 0)
        finally:
            gate.leave(self.index)

    def run(self, stop_requested: Callable[[], bool] | None = None) -> Exit:
        """Run batches until the guest exits (port, ring full) or is kicked."""
        while True:
            if self._kicked or (stop_requested is not None and stop_requested()):
                return Exit("interrupted")
            if self._kernel.soft_full(self.index):
                return Exit("ring_full")
            exit_ = self._batch()
            if exit_ is not None:
                return exit_

    # -- the guest -------------------------------------------------------------
    def _batch(self) -> Exit | None:
        params, status, kernel = self._params, self._status, self._kernel
        if int(params["magic"]) != layout.PARAMS_MAGIC:
            return Exit("fault", detail="simulated guest: no parameter block (memory not loaded)")
        progress = int(status["progress"])
        finishing = self.place == "progress_store"
        start = progress + finishing
        limit, total = int(status["limit"]), int(params["total"])
        every, iteration = int(params["report_every"]), int(params["iteration"])
        count, after = 0, None
        if finishing and every and start % every == 0:
            after = Exit("io_out", layout.PORT_PROGRESS, start & _U32, 4)
        elif start >= limit:
            after = Exit("io_out", layout.PORT_LIMIT, start & _U32, 4)
        elif total and start >= total:
            after = Exit("io_out", layout.PORT_DONE, 0, 4)
        else:
            end = min(limit, start + self.batch_items)
            if total:
                end = min(end, total)
            if every:
                end = min(end, (start // every + 1) * every)
                if end % every == 0:
                    after = Exit("io_out", layout.PORT_PROGRESS, end & _U32, 4)
            count = end - start

        # The accesses, in program order: what the C guest touches before its items...
        if self.place == "entry":
            prefix = [(layout.LOW_SLOT, CODE_PAGE, False), (layout.LOW_SLOT, self._stack_page, True),
                      (layout.LOW_SLOT, STATUS_PAGE, False)]
        else:
            prefix = [(layout.LOW_SLOT, CODE_PAGE, False), (layout.LOW_SLOT, STATUS_PAGE, False)]
            if self._oracle:
                prefix.append((layout.LOW_SLOT, self._stack_page, False))
        if finishing:
            prefix.append((layout.LOW_SLOT, STATUS_PAGE, True))
        head = len(prefix)
        items = np.arange(start, start + count, dtype=np.uint64)
        pages = self._resolved.pages(self.index, items)
        slots = np.empty(head + 2 * count, dtype=np.uint32)
        where = np.empty(head + 2 * count, dtype=np.uint64)
        writes = np.ones(head + 2 * count, dtype=bool)
        slots[:head], where[:head], writes[:head] = zip(*prefix)
        slots[head::2], where[head::2] = layout.DATA_SLOT, pages          # the data store,
        slots[head + 1::2], where[head + 1::2] = layout.LOW_SLOT, STATUS_PAGE  # then the progress store
        retired = kernel.access(self.index, slots, where, writes)

        # ...and what retired of them.
        done_prefix = head - finishing
        if retired < done_prefix:
            return Exit("ring_full")             # still at the same place; retried after a reset
        self.place = "loop"
        if finishing:
            if retired < head:
                self.place = "progress_store"
                return Exit("ring_full")
            status["progress"] = progress = start
        body = retired - head
        stored, completed = (body + 1) // 2, body // 2
        if stored:
            self._store(items[:stored], pages[:stored], iteration)
        if completed:
            status["progress"] = start + completed
        if stored > completed:
            self.place = "progress_store"
        if retired < len(where):
            return Exit("ring_full")
        return after

    def _store(self, items: np.ndarray, pages: np.ndarray, iteration: int) -> None:
        """The data stores, in order: where two hit one word, the later one wins."""
        words = self._resolved.words(self.index, items)
        index = pages * np.uint64(512) + words
        values = self._resolved.values(items, iteration)
        if len(np.unique(index)) != len(index):
            _, last = np.unique(index[::-1], return_index=True)
            keep = len(index) - 1 - last
            index, values = index[keep], values[keep]
        self._words[index] = values

    def drop_views(self) -> None:
        self._status = self._params = self._words = None


class SimMachine(Machine):
    """A simulated guest with one simulated dirty ring per vCPU (or the bitmap)."""

    backend = "sim"

    def __init__(self, config: MachineConfig, workload: Workload | None = None, *,
                 memory: GuestMemory | None = None, load: bool = True, program: str = "workloads.c",
                 ports: dict[int, PortHandler] | None = None, track_dirty: bool = True) -> None:
        if Path(program).name != "workloads.c":
            raise ConfigError(f"guest program {program} needs the KVM backend: the simulated backend "
                              f"runs only workloads.c")
        super().__init__(config, workload, memory)
        self.extra_ports.update(ports or {})
        self.track_dirty = track_dirty
        slot_pages = {slot: s.spec.pages for slot, s in self.memory.slots.items()}
        # Untracked, the simulated kernel still keeps its bitmap (as KVM keeps its page tables),
        # but nobody reads it and no ring can fill.
        ring_entries = config.ring_entries if config.dirty_log == "ring" and track_dirty else None
        self.kernel = SimDirtyLog(slot_pages, config.vcpus, ring_entries)
        if load:
            self.write_guest_image()
        self.executors = [SimExecutor(self, index) for index in range(config.vcpus)]
        if not track_dirty:
            self.tracker = NoTracker()
        elif ring_entries is not None:
            rings = [DirtyRing(buffer, ring_entries, index)
                     for index, buffer in enumerate(self.kernel.buffers)]
            self.tracker = RingTracker(rings, self.kernel.reset_dirty_rings, rearm=self.rearm_dirty_logging,
                                       interruptions=lambda: self.kernel.signals)
        else:
            self.tracker = BitmapTracker(slot_pages, self.kernel.get_dirty_log)
        self._start_runner(self.executors)

    def rearm_dirty_logging(self) -> None:
        """Write-protect every page again (the simulated KVM_MEM_LOG_DIRTY_PAGES toggle)."""
        self.kernel.rearm_all()

    def capture_vcpus(self) -> list[VcpuState]:
        if self.runner._started and not self.runner.paused:
            raise StateError("capture_vcpus() needs the machine paused")
        rips = {place: rip for rip, place in _RIPS.items()}
        states = []
        for executor in self.executors:
            regs = loader.initial_regs(executor.index)
            regs.rip = rips[executor.place]
            sregs = loader.initial_sregs(abi.Sregs())
            states.append(VcpuState(executor.index, regs=regs.to_bytes(), sregs=sregs.to_bytes()))
        return states

    def restore_vcpus(self, states: list[VcpuState]) -> None:
        if self.runner._started and not self.runner.paused:
            raise StateError("restore_vcpus() needs the machine paused or not yet started")
        if len(states) != len(self.executors):
            raise ConfigError(f"state has {len(states)} vCPUs, this machine {len(self.executors)}")
        places = []
        for state in states:
            place = _RIPS.get(state.rip)
            if place is None:
                raise ConfigError(f"vCPU {state.index} state has rip {state.rip:#x}, which is not a "
                                  f"place the simulated guest can be (a state from another backend?)")
            places.append(place)
        for executor, place in zip(self.executors, places):
            executor.place = place

    def _close_backend(self) -> None:
        self.tracker = None
        for executor in self.executors:
            executor.drop_views()
