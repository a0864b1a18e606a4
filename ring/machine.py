"""A guest machine: memory, vCPUs, dirty tracking, and the events they produce.

`Machine` holds everything both backends share (layout, parameter block,
events, the pause barrier, the harvest order); `KvmMachine` runs a real KVM
guest, `ring.sim.SimMachine` a simulated one. Build them through
`ring.backend` (open_machine, restore_machine), the one place that chooses
the backend.

The harvest order is written here once: harvest() refuses to run unless
every vCPU is parked outside KVM_RUN, then collects every ring, marks RESET,
calls the VM-wide reset and checks its count (RingTracker.collect).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from . import abi
import ring._native as native        # the native core (ring/native/core.c), built by setup.py
from .dirty import BitmapTracker, DirtyRing, DirtySet, RingTracker, validate_ring_entries, vmm_keys
from .errors import ConfigError, GuestFault, KvmError, KvmUnavailableError, StateError
from .guest import layout, loader
from .guest.build import build_program
from .kvm import Kvm, Vcpu, Vm
from .memory import GuestMemory, SlotSpec
from .vcpu_state import VcpuState     # (defined beside its serialisation; importable from here too)
from .vcpus import (STOP_PAUSE, Done, Event, Exit, Fault, LimitReached, Output, PortHandler, Progress, RingSoftFull, VcpuRunner,
                    errno_exit, install_kick_handler)
from .workloads import WORKLOAD_IDS, ResolvedWorkload, Workload

log = logging.getLogger(__name__)

MAX_DATA_BYTES = (layout.MAX_MAPPED_GIB - 1) << 30


@dataclass(frozen=True)
class MachineConfig:
    """The shape of a guest: vCPUs, data memory, and how its dirty pages are tracked."""

    vcpus: int = 1
    data_bytes: int = 64 << 20
    dirty_log: str = "ring"            # "ring" or "bitmap"
    ring_entries: int = 4096
    bitmap_manual_clear: bool = False  # bitmap: KVM_CLEAR_DIRTY_LOG re-arms (MANUAL_DIRTY_LOG_PROTECT2)

    def __post_init__(self) -> None:
        if not 1 <= self.vcpus <= layout.MAX_VCPUS:
            raise ConfigError(f"vcpus must be between 1 and {layout.MAX_VCPUS}, got {self.vcpus}")
        if self.data_bytes < 2 << 20 or self.data_bytes % (2 << 20):
            raise ConfigError(f"data_bytes must be a positive multiple of 2 MiB, got {self.data_bytes}")
        if self.data_bytes > MAX_DATA_BYTES:
            raise ConfigError(f"data_bytes {self.data_bytes} exceeds the {MAX_DATA_BYTES >> 30} GiB the "
                              f"guest layout maps")
        if self.dirty_log not in ("ring", "bitmap"):
            raise ConfigError(f"dirty_log must be 'ring' or 'bitmap', got {self.dirty_log!r}")
        if self.dirty_log == "ring":
            validate_ring_entries(self.ring_entries)

    @property
    def data_pages(self) -> int:
        return self.data_bytes // abi.PAGE_SIZE

    def slot_specs(self) -> list[SlotSpec]:
        return [SlotSpec(layout.LOW_SLOT, 0, layout.LOW_SIZE, "low"),
                SlotSpec(layout.DATA_SLOT, layout.DATA_GPA, self.data_bytes, "data")]


def workload_in_memory(memory: GuestMemory) -> Workload | None:
    """The workload a guest's parameter block names (what its loader wrote), or None if it names none.

    A machine built over memory that already holds a guest takes its workload
    from there: the simulator runs that workload, and both backends report it.
    """
    params = memory.view(layout.PARAMS_GPA, layout.PARAMS_DTYPE.itemsize).view(layout.PARAMS_DTYPE)[0]
    names = {number: name for name, number in WORKLOAD_IDS.items()}
    if int(params["magic"]) != layout.PARAMS_MAGIC or int(params["workload"]) not in names:
        return None
    return Workload(names[int(params["workload"])], seed=int(params["seed"]),
                    working_set_pages=int(params["working_set"]) or None,
                    hot_pages=int(params["hot_pages"]), hot_percent=int(params["hot_percent"]),
                    stride=int(params["stride"]) or 1, report_every=int(params["report_every"]),
                    total=int(params["total"]))


@dataclass
class Checkpoint:
    """What Machine.checkpoint() did in its one call."""

    dirty: DirtySet
    gathered: int | None              # pages copied into the buffer, None if they did not fit
    vcpus: list[VcpuState] | None     # None: not read (the caller captures, still paused)
    resumed: bool                     # the guest runs again (else the caller resumes it)
    times_ns: tuple[int, ...]         # time.monotonic_ns() at the start and after each step
    device: bytes = b""               # what paused_state() returned


#: How long a checkpoint waits for the vCPUs to stop (Machine.pause's default).
PAUSE_TIMEOUT_S = 10.0


@dataclass
class MachineState:
    """A paused machine: its vCPUs, and optionally a copy of its memory (slot -> bytes)."""

    vcpus: list[VcpuState]
    memory: dict[int, np.ndarray] = field(default_factory=dict)


class Machine:
    """What both backends share. Subclasses provide executors, trackers and vCPU state."""

    backend = "abstract"

    def __init__(self, config: MachineConfig, workload: Workload | None,
                 memory: GuestMemory | None) -> None:
        self.config = config
        self.workload = workload or Workload()
        self.resolved: ResolvedWorkload = self.workload.resolved(config.data_pages, config.vcpus)
        self.events: "queue.SimpleQueue[Event]" = queue.SimpleQueue()
        self._sink: Callable[[Event], None] = self.events.put
        self._owns_memory = memory is None
        self.memory = memory or GuestMemory(config.slot_specs())
        self._check_memory_layout()
        self.params = self.memory.view(layout.PARAMS_GPA, layout.PARAMS_DTYPE.itemsize) \
            .view(layout.PARAMS_DTYPE)[0]
        self.data = self.memory.slots[layout.DATA_SLOT]
        self.runner: VcpuRunner | None = None
        self.extra_ports: dict[int, PortHandler] = {}
        self._vmm_dirty: list[tuple[int, int, int]] = []     # (slot, first page, end page)
        self._vmm_lock = threading.Lock()
        self._closed = False

    # -- set-up shared by both backends ---------------------------------------
    def _check_memory_layout(self) -> None:
        expected = {spec.slot: spec for spec in self.config.slot_specs()}
        actual = {slot: s.spec for slot, s in self.memory.slots.items()}
        for slot, spec in expected.items():
            got = actual.get(slot)
            if got is None or got.guest_phys_addr != spec.guest_phys_addr or got.size != spec.size:
                raise ConfigError(f"memory does not match the machine's layout: slot {slot} should be "
                                  f"{spec.size:#x} bytes at {spec.guest_phys_addr:#x}, found {got}")

    def write_guest_image(self) -> None:
        """Lay out a fresh guest: tables, parameter block (the program is the subclass's)."""
        loader.write_page_tables(self.memory, layout.DATA_GPA + self.config.data_bytes)
        loader.write_descriptor_tables(self.memory)
        self.resolved.fill_params(self.params, layout.DATA_GPA, self.config.data_pages)

    def set_event_sink(self, sink: Callable[[Event], None]) -> None:
        """Deliver events somewhere else (an asyncio loop's call_soon_threadsafe, say)."""
        self._sink = sink

    def _ports(self) -> dict[int, PortHandler]:
        ports: dict[int, PortHandler] = {
            layout.PORT_PROGRESS: lambda v, value: Progress(v, self.progress(v)),
            layout.PORT_OUTPUT: lambda v, value: Output(v, bytes([value & 0xFF])),
            layout.PORT_DONE: lambda v, value: (Done(v, value), "done"),
            layout.PORT_LIMIT: lambda v, value: (LimitReached(v, self.progress(v)), "limit"),
        }
        ports.update(self.extra_ports)
        return ports

    def _start_runner(self, executors) -> None:
        self.runner = VcpuRunner(executors, lambda event: self._sink(event), self._ports())

    # -- running -----------------------------------------------------------
    def start(self) -> None:
        """Start the vCPU threads."""
        self._require_open()
        self.runner.start()

    def pause(self, timeout: float = 10.0) -> None:
        """Stop every vCPU outside KVM_RUN (the barrier)."""
        self._require_open()
        self.runner.pause(timeout)

    def resume(self) -> None:
        """Let every vCPU run again (after a harvest, vCPUs parked at a full ring go on)."""
        self._require_open()
        self.runner.resume()

    @property
    def paused(self) -> bool:
        return self.runner.paused

    def fence(self, fenced: bool = True) -> None:
        """Keep every vCPU stopped (True) until fence(False), whatever pause/resume do meanwhile."""
        self._require_open()
        self.runner.fence(fenced)

    @property
    def fenced(self) -> bool:
        return self.runner.fenced

    def throttle(self, fraction: float) -> None:
        """Hold the vCPUs `fraction` of the time (auto-converge during a sync; 0: off)."""
        self._require_open()
        self.runner.throttle(fraction)

    @property
    def throttled(self) -> float:
        return self.runner.throttled

    def checkpoint(self, out: np.ndarray, resume: bool,
                   paused_state: Callable[[], bytes] | None = None) -> Checkpoint | None:
        """The whole pause in one call, where the backend can (KvmMachine); None: it cannot."""
        return None

    def harvest(self) -> DirtySet:
        """Collect and reset the dirty log, plus the pages the VMM wrote; only while paused."""
        self._require_open()
        if not self.runner.paused:
            raise StateError("harvest() needs every vCPU paused: call pause() first")
        with self._vmm_lock:
            ranges, self._vmm_dirty = self._vmm_dirty, []
        try:
            if isinstance(self.tracker, RingTracker):   # one native call: rings, RESET, VMM pages, dedup
                return self.tracker.collect(ranges)
            dirty = self.tracker.collect()
        except BaseException:
            with self._vmm_lock:                       # not harvested: keep them for the next harvest
                self._vmm_dirty[:0] = ranges
            raise
        if ranges:
            dirty = dirty.merged(DirtySet(keys=vmm_keys(ranges)))
        return dirty

    def note_vmm_write(self, gpa: int, length: int) -> None:
        """Record pages the VMM wrote through its own mapping: the dirty ring never sees them."""
        slot = self.memory.slot_of(gpa)
        first = (gpa - slot.spec.guest_phys_addr) >> abi.PAGE_SHIFT
        end = ((gpa + max(length, 1) - 1 - slot.spec.guest_phys_addr) >> abi.PAGE_SHIFT) + 1
        with self._vmm_lock:
            self._vmm_dirty.append((slot.spec.slot, first, end))

    def write_memory(self, gpa: int, data: bytes | np.ndarray) -> None:
        """Write guest memory from the VMM, recording the pages for the next harvest."""
        self.memory.write(gpa, data)
        self.note_vmm_write(gpa, len(data))

    # -- the workload's controls ------------------------------------------
    def progress(self, vcpu: int) -> int:
        return int(self.params["vcpu"]["progress"][vcpu])

    def progress_all(self) -> list[int]:
        return [self.progress(v) for v in range(self.config.vcpus)]

    def set_limit(self, vcpu: int, limit: int) -> None:
        """Let `vcpu` run until its progress reaches `limit` (then it reports LimitReached)."""
        self.params["vcpu"]["limit"][vcpu] = limit
        self.note_vmm_write(layout.PARAMS_GPA, layout.PARAMS_DTYPE.itemsize)
        if self.runner is not None:
            self.runner.release(vcpu, "limit")

    def set_limits(self, limit: int) -> None:
        for vcpu in range(self.config.vcpus):
            self.set_limit(vcpu, limit)

    def set_iteration(self, iteration: int) -> None:
        """The oracle's iteration number (a VMM write: not in the dirty log)."""
        self.params["iteration"] = iteration
        self.note_vmm_write(layout.PARAMS_GPA, layout.PARAMS_DTYPE.itemsize)

    def wait_for(self, predicate: Callable[[Event], bool], timeout: float = 30.0,
                 on_other: Callable[[Event], None] | None = None) -> Event:
        """Return the first event matching `predicate`; other events go to `on_other`."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching vCPU event within {timeout} s")
            try:
                event = self.events.get(timeout=remaining)
            except queue.Empty:
                continue
            if predicate(event):
                return event
            if on_other is not None:
                on_other(event)

    def drain_events(self) -> list[Event]:
        """Every event queued so far (after pause() returns, that is all the vCPUs produced)."""
        drained = []
        while True:
            try:
                drained.append(self.events.get_nowait())
            except queue.Empty:
                return drained

    def run_to_limit(self, limit: int, timeout: float = 60.0, harvest_when_full: bool = False) -> list[Event]:
        """Run every vCPU until its progress reaches `limit`, then pause; return the other events.

        A full ring stops a vCPU until the VM is harvested: with harvest_when_full the
        VM is paused, harvested and resumed on the spot (the dirty sets are dropped).
        """
        waiting = {v for v in range(self.config.vcpus) if self.progress(v) < limit}
        self.set_limits(limit)
        if not self.runner.started:
            self.start()
        elif self.runner.paused:
            self.resume()
        others: list[Event] = []
        while waiting:
            event = self.wait_for(lambda e: True, timeout)
            if isinstance(event, LimitReached) and event.progress >= limit:
                waiting.discard(event.vcpu)
            elif isinstance(event, Fault):
                raise GuestFault(f"vCPU {event.vcpu} faulted: {event.reason} {event.detail}")
            elif isinstance(event, RingSoftFull) and harvest_when_full:
                self.pause()
                self.harvest()
                self.resume()
            else:
                others.append(event)
        self.pause()
        return others + self.drain_events()

    # -- state ---------------------------------------------------------------
    def capture(self, with_memory: bool = True) -> MachineState:
        """vCPU state (and a copy of memory) of the paused machine."""
        if not self.runner.paused:
            raise StateError("capture() needs the machine paused")
        memory = {slot: s.bytes.copy() for slot, s in self.memory.slots.items()} if with_memory else {}
        return MachineState(self.capture_vcpus(), memory)

    def restore(self, state: MachineState) -> None:
        """Overwrite memory (if the state has it) and vCPU state; before start() or while paused."""
        if self.runner is not None and self.runner.started and not self.runner.paused:
            raise StateError("restore() needs the machine paused or not yet started")
        for slot, content in state.memory.items():
            self.memory.slots[slot].bytes[:] = content
        self.restore_vcpus(state.vcpus)

    def rearm_dirty_logging(self) -> None:
        """Write-protect every tracked page again (after a dirty ring reset was cut short)."""
        raise NotImplementedError

    def capture_vcpus(self) -> list[VcpuState]:
        raise NotImplementedError

    def restore_vcpus(self, states: list[VcpuState]) -> None:
        raise NotImplementedError

    # -- teardown ----------------------------------------------------------
    def _require_open(self) -> None:
        if self._closed:
            raise StateError("the machine is closed")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.runner is not None:
            self.runner.close()
        self._close_backend()
        self.params = None
        self.data = None
        if self._owns_memory:
            self.memory.close()

    def _close_backend(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- the real thing ---------------------------------------------------------


class NoTracker:
    """A machine run without dirty logging (a replica's guest after failover)."""

    def collect(self) -> DirtySet:
        return DirtySet()

    def fill(self) -> int:
        return 0


class KvmExecutor:
    """Runs one KVM vCPU and decodes its exits."""

    def __init__(self, vcpu: Vcpu) -> None:
        self.vcpu = vcpu
        self.index = vcpu.index

    def run_gated(self, gate: native.Gate) -> Exit | None:
        """KVM_RUN in the gate's native loop (it parks there while stopped) until an exit."""
        vcpu = self.vcpu
        code = gate.run_kvm(self.index, vcpu.fd, vcpu.immediate_exit_address, vcpu.run_counter_address)
        if code == native.GATE_CLOSED:
            return None
        if code < 0:
            return errno_exit(code)
        reason = self.vcpu.exit_reason
        if reason == abi.KVM_EXIT_IO:
            io = self.vcpu.io
            if io.direction == abi.KVM_EXIT_IO_OUT:
                value = int.from_bytes(self.vcpu.io_data()[:io.size], "little")
                return Exit("io_out", io.port, value, io.size)
            return Exit("io_in", io.port, 0, io.size)
        if reason == abi.KVM_EXIT_DIRTY_RING_FULL:
            return Exit("ring_full")
        if reason == abi.KVM_EXIT_INTR:
            return Exit("interrupted")
        name = abi.EXIT_NAMES.get(reason, f"KVM_EXIT_{reason}")
        kind = name.removeprefix("KVM_EXIT_").lower()      # shutdown, internal_error, mmio, hlt...
        detail = name
        if reason == abi.KVM_EXIT_INTERNAL_ERROR:
            suberror, data = self.vcpu.internal_error()
            detail = f"{name}: suberror {suberror}, data {[hex(d) for d in data]}"
        elif reason == abi.KVM_EXIT_MMIO:
            gpa = int.from_bytes(self.vcpu.run_map[abi.RUN_EXIT_UNION:abi.RUN_EXIT_UNION + 8], "little")
            detail = f"{name}: the guest touched {gpa:#x}, which is in no memory slot"
        try:
            detail += f" at rip {self.vcpu.get_regs().rip:#x}"
        except KvmError:
            pass
        return Exit(kind, detail=detail)

    def set_in_value(self, value: int, size: int) -> None:
        self.vcpu.set_io_in_data(value.to_bytes(8, "little")[:size])


_host_cache: dict[str, object] = {}
_host_lock = threading.Lock()

#: MSRs a long-mode guest may use; those KVM does not list are skipped.
CANDIDATE_MSRS = (0x10, 0x174, 0x175, 0x176, 0x277, 0xC0000081, 0xC0000082, 0xC0000083,
                  0xC0000084, 0xC0000102, 0xC0000103)
#: Of those, what a CPL3 guest changes without WRMSR: the TSC. The rest need CPL0.
CPL3_VARYING_MSRS = frozenset({0x10})


def _host_facts(kvm: Kvm) -> tuple[list[abi.CpuidEntry2], list[int]]:
    with _host_lock:
        if "cpuid" not in _host_cache:
            _host_cache["cpuid"] = kvm.get_supported_cpuid()
            listed = set(kvm.get_msr_index_list())
            _host_cache["msrs"] = [m for m in CANDIDATE_MSRS if m in listed]
        return _host_cache["cpuid"], _host_cache["msrs"]


class KvmMachine(Machine):
    """A real KVM guest with one dirty ring per vCPU (or the bitmap)."""

    backend = "kvm"

    def __init__(self, config: MachineConfig, workload: Workload | None = None, *,
                 program: str = "workloads.c", memory: GuestMemory | None = None,
                 load: bool = True, kvm_path: str = "/dev/kvm",
                 ports: dict[int, PortHandler] | None = None, track_dirty: bool = True) -> None:
        install_kick_handler()
        image = build_program(program) if load else b""
        self._kvm = Kvm(kvm_path)
        self._vm: Vm | None = None
        self._vcpus: list[Vcpu] = []
        self._ring_maps = []
        self._static_state: dict[int, tuple] = {}      # vCPU -> (state_changes, xcrs, debugregs, cpuid, msrs)
        super().__init__(config, workload, memory)
        self.extra_ports.update(ports or {})
        self.track_dirty = track_dirty
        try:
            self._build(image, load)
        except Exception:
            self.close()
            raise

    def _build(self, image: bytes, load: bool) -> None:
        config = self.config
        vm = self._vm = self._kvm.create_vm()
        tracking = self.track_dirty
        if tracking and config.dirty_log == "ring":
            max_bytes = vm.check_extension(abi.KVM_CAP_DIRTY_LOG_RING)
            if max_bytes <= 0:
                raise KvmUnavailableError("this host's KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING); "
                                          "use dirty_log='bitmap'")
            validate_ring_entries(config.ring_entries, max_bytes)
            vm.enable_cap(abi.KVM_CAP_DIRTY_LOG_RING, config.ring_entries * abi.DIRTY_GFN_DTYPE.itemsize)
        for slot in self.memory.slots.values():
            vm.set_user_memory_region(slot.spec.slot, slot.spec.guest_phys_addr, slot.spec.size,
                                      slot.address, abi.KVM_MEM_LOG_DIRTY_PAGES if tracking else 0)
        if load:
            self.write_guest_image()
            loader.load_program(self.memory, image)
        cpuid, self._msrs = _host_facts(self._kvm)
        xsave2 = vm.check_extension(abi.KVM_CAP_XSAVE2)
        self._xsave_size = max(xsave2, abi.XSAVE_LEGACY_SIZE)
        self._xsave_request = abi.KVM_GET_XSAVE2 if self._xsave_size > abi.XSAVE_LEGACY_SIZE else abi.KVM_GET_XSAVE
        self._varying_msrs = tuple(m for m in self._msrs if m in CPL3_VARYING_MSRS)
        rings = []
        for index in range(config.vcpus):
            vcpu = vm.create_vcpu(index)
            self._vcpus.append(vcpu)
            vcpu.set_cpuid2(cpuid)
            vcpu.set_sregs(loader.initial_sregs(vcpu.get_sregs()))
            vcpu.set_regs(loader.initial_regs(index))
            vcpu.enable_sync_regs()
            if tracking and config.dirty_log == "ring":
                ring_map = vcpu.map_dirty_ring(config.ring_entries * abi.DIRTY_GFN_DTYPE.itemsize)
                self._ring_maps.append(ring_map)
                rings.append(DirtyRing(ring_map, config.ring_entries, index))
        if not tracking:
            self.tracker = NoTracker()
        elif config.dirty_log == "ring":
            self.tracker = RingTracker(rings, vm.reset_dirty_rings, rearm=self.rearm_dirty_logging,
                                       interruptions=lambda: vm.reset_interruptions)
        else:
            clear = None
            if config.bitmap_manual_clear:
                if not vm.check_extension(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2):
                    raise KvmUnavailableError("this host's KVM lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 "
                                              "(bitmap_manual_clear)")
                vm.enable_cap(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
                clear = vm.clear_dirty_log
            self.tracker = BitmapTracker({s: m.spec.pages for s, m in self.memory.slots.items()},
                                         vm.get_dirty_log, clear)
        # what native.checkpoint() reads: each slot's memory, and each vCPU's state in kvm_run.s
        self._slot_buffers = [(slot, memory.pages) for slot, memory in self.memory.slots.items()]
        sync_size = ctypes.sizeof(abi.Regs) + ctypes.sizeof(abi.Sregs) + abi.VCPU_EVENTS_SIZE
        self._capture_jobs = [(vcpu.fd, vcpu.sync_regs_address, sync_size, self._xsave_request, self._xsave_size,
                               self._varying_msrs) for vcpu in self._vcpus]
        self._start_runner([KvmExecutor(vcpu) for vcpu in self._vcpus])

    @property
    def vm(self) -> Vm:
        return self._vm

    def rearm_dirty_logging(self) -> None:
        """Write-protect every tracked slot again, so that every page's next write is logged.

        KVM write-protects a slot when KVM_MEM_LOG_DIRTY_PAGES is turned on, so the
        flag is cleared and set again (two KVM_SET_USER_MEMORY_REGION calls, about
        0.7 ms for 64 MiB here). The tracker calls it, paused, after a reset that a
        signal or a stop cut short: that reset left pages writable and unlogged.
        """
        for slot in self.memory.slots.values():
            spec = slot.spec
            self._vm.set_user_memory_region(spec.slot, spec.guest_phys_addr, spec.size, slot.address, 0)
            self._vm.set_user_memory_region(spec.slot, spec.guest_phys_addr, spec.size, slot.address,
                                            abi.KVM_MEM_LOG_DIRTY_PAGES)

    @property
    def vcpu_fds(self) -> list[Vcpu]:
        return list(self._vcpus)

    def capture_vcpus(self) -> list[VcpuState]:
        """Every vCPU's state, with as few ioctls as the vCPU's history allows (see _capture_vcpu)."""
        if self.runner.started and not self.runner.paused:
            raise StateError("capture_vcpus() needs the machine paused")
        return [self._capture_vcpu(vcpu) for vcpu in self._vcpus]

    def capture_vcpus_full(self) -> list[VcpuState]:
        """Every vCPU's state read with one GET ioctl per part (the reference for capture_vcpus)."""
        if self.runner.started and not self.runner.paused:
            raise StateError("capture_vcpus_full() needs the machine paused")
        states = []
        for vcpu in self._vcpus:
            states.append(VcpuState(
                index=vcpu.index,
                regs=vcpu.get_regs().to_bytes(),
                sregs=vcpu.get_sregs().to_bytes(),
                xsave=vcpu.get_xsave(self._xsave_size),     # holds the FPU/SSE state too
                xcrs=vcpu.get_xcrs().to_bytes(),
                msrs=vcpu.get_msrs(self._msrs),
                events=vcpu.get_vcpu_events(),
                debugregs=vcpu.get_debugregs(),
                cpuid=b"".join(e.to_bytes() for e in vcpu.get_cpuid2()),
            ))
        return states

    def _capture_vcpu(self, vcpu: Vcpu) -> VcpuState:
        """One vCPU's state: two ioctls at a checkpoint instead of seven.

        - regs, sregs and events come from kvm_run (KVM_CAP_SYNC_REGS), valid when the
          vCPU's last KVM_RUN returned and no SET ioctl came after (Vcpu.synced);
        - XCRs, debug registers, CPUID and the MSRs but TSC cannot change under a
          CPL3 guest with no IDT (a fault shuts it down, see ring/guest/loader.py):
          XSETBV, MOV DR, WRMSR and SWAPGS are CPL0 instructions, and DR6 only moves
          on a #DB, which this guest cannot survive. They are read once and again
          after any SET ioctl on the vCPU (Vcpu.state_changes);
        - the XSAVE area and the TSC change all the time: one native call reads both.
        """
        static = self._static_state.get(vcpu.index)
        if static is None or static[0] != vcpu.state_changes:
            changes = vcpu.state_changes
            msrs = vcpu.get_msrs(self._msrs)
            static = self._static_state[vcpu.index] = (
                changes, vcpu.get_xcrs().to_bytes(), vcpu.get_debugregs(),
                b"".join(e.to_bytes() for e in vcpu.get_cpuid2()),
                {index: value for index, value in msrs.items() if index not in CPL3_VARYING_MSRS})
        synced = vcpu.synced_state()
        if synced is None:
            regs, sregs, events = vcpu.get_regs().to_bytes(), vcpu.get_sregs().to_bytes(), vcpu.get_vcpu_events()
        else:
            regs, sregs, events = synced
        try:
            xsave, values = native.get_state(vcpu.fd, self._xsave_request, self._xsave_size, self._varying_msrs)
        except OSError as exc:
            raise KvmError(exc.filename or "KVM_GET_XSAVE", exc.errno or 0) from None
        except ValueError as exc:
            raise KvmError("KVM_GET_MSRS", errno.EINVAL, str(exc)) from None
        return self._vcpu_state(vcpu.index, static, regs, sregs, events, xsave, values)

    def _vcpu_state(self, index: int, static: tuple, regs: bytes, sregs: bytes, events: bytes, xsave: bytes,
                    varying_values: Sequence[int]) -> VcpuState:
        _, xcrs, debugregs, cpuid, fixed_msrs = static
        msrs = dict(fixed_msrs)
        msrs.update(zip(self._varying_msrs, varying_values))
        return VcpuState(index=index, regs=regs, sregs=sregs, xsave=xsave, xcrs=xcrs,
                         msrs={i: msrs[i] for i in self._msrs}, events=events,
                         debugregs=debugregs, cpuid=cpuid)

    def checkpoint(self, out: np.ndarray, resume: bool,
                   paused_state: Callable[[], bytes] | None = None) -> Checkpoint | None:
        """The whole pause in one native call (ring._native.checkpoint): stop, harvest and reset,
        gather into `out`, read the vCPUs, and (`resume`) let them go, all without the GIL and
        without Python between the steps. The Python objects are built after the guest runs again.
        `paused_state` (a device's state) is read first thing after the call, still paused, and
        the guest resumed right after it (Checkpoint.device).

        None, with the guest untouched, where the machine cannot do it that way: the bitmap,
        vCPU state not all in kvm_run (after a SET ioctl) or not cached yet. A step the native
        call could not finish cleanly (a reset cut short, pages beyond `out`, a failed ioctl)
        leaves the guest paused and is finished here, or raises as Machine.harvest would; the
        caller resumes (Checkpoint.resumed says whether it must).
        """
        self._require_open()
        tracker, runner = self.tracker, self.runner
        if not isinstance(tracker, RingTracker) or not runner.started or not tracker.rings:
            return None
        entries = tracker.rings[0].entries
        if any(ring.entries != entries for ring in tracker.rings):
            return None
        statics = [self._static_state.get(vcpu.index) for vcpu in self._vcpus]
        if not all(static is not None and static[0] == vcpu.state_changes and vcpu.synced
                   for vcpu, static in zip(self._vcpus, statics)):
            return None
        with self._vmm_lock:
            ranges, self._vmm_dirty = self._vmm_dirty, []
        try:
            (stopped, harvested, reset, switched, gathered, captures, resumed, times) = native.checkpoint(
                runner.gate, STOP_PAUSE, PAUSE_TIMEOUT_S, [r.buffer for r in tracker.rings],
                [r.fetch_index for r in tracker.rings], entries, ranges, self._vm.fd, self._slot_buffers, out,
                self._capture_jobs, resume and paused_state is None)
            if not stopped:
                runner.stuck(PAUSE_TIMEOUT_S)                                # raises
            times = list(times)
            device = b""
            if paused_state is not None:
                device = paused_state()
                _, counts, _, bad = harvested
                clean = (captures is not None and gathered >= 0 and bad is None and not switched
                         and reset == sum(counts))
                times[4] = time.monotonic_ns()
                if resume and clean:          # what the native call would have done, after the state
                    runner.gate.go(STOP_PAUSE)
                    resumed = True
                times[5] = time.monotonic_ns()
            if resumed:
                runner.resume()               # (the gate went; this lets vCPUs held at a full ring go too)
            if switched:
                self._vm.reset_interruptions += 1
            dirty = tracker.finish(*harvested, first_reset=(reset, switched))
        except BaseException:
            with self._vmm_lock:                       # not harvested: keep them for the next harvest
                self._vmm_dirty[:0] = ranges
            raise
        vcpus = None
        if captures is not None:
            regs_size, sregs_size = ctypes.sizeof(abi.Regs), ctypes.sizeof(abi.Sregs)
            vcpus = [self._vcpu_state(vcpu.index, static, sync[:regs_size], sync[regs_size:regs_size + sregs_size],
                                      sync[regs_size + sregs_size:], xsave, values)
                     for vcpu, static, (sync, xsave, values) in zip(self._vcpus, statics, captures)]
        return Checkpoint(dirty, gathered if gathered >= 0 else None, vcpus, resumed, tuple(times), device)

    def restore_vcpus(self, states: list[VcpuState]) -> None:
        if len(states) != len(self._vcpus):
            raise ConfigError(f"state has {len(states)} vCPUs, this machine {len(self._vcpus)}")
        for vcpu, state in zip(self._vcpus, states):
            if state.cpuid:                # first: KVM accepts a changed CPUID only before KVM_RUN
                size = ctypes.sizeof(abi.CpuidEntry2)
                vcpu.set_cpuid2([abi.CpuidEntry2.from_bytes(state.cpuid[i:i + size])
                                 for i in range(0, len(state.cpuid), size)])
            vcpu.set_sregs(abi.Sregs.from_bytes(state.sregs))
            vcpu.set_regs(abi.Regs.from_bytes(state.regs))
            if state.xsave:
                vcpu.set_xsave(state.xsave)
            elif state.fpu:
                vcpu.set_fpu(abi.Fpu.from_bytes(state.fpu))
            if state.xcrs:
                vcpu.set_xcrs(abi.Xcrs.from_bytes(state.xcrs))
            if state.msrs:
                vcpu.set_msrs(state.msrs)
            if state.events:
                vcpu.set_vcpu_events(state.events)
            if state.debugregs:
                vcpu.set_debugregs(state.debugregs)

    def _close_backend(self) -> None:
        self.tracker = None
        for ring_map in self._ring_maps:
            try:
                ring_map.close()
            except BufferError:
                pass
        self._ring_maps.clear()
        for vcpu in self._vcpus:
            vcpu.close()
        self._vcpus.clear()
        if self._vm is not None:
            self._vm.close()
        self._kvm.close()
