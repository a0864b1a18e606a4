"""A thin, typed binding over /dev/kvm: one class per fd kind, one method per ioctl.

Some facts about calling KVM from Python:

- ioctls go through ctypes (libc's ioctl), not fcntl.ioctl: ctypes releases the
  GIL for the call (so vCPU threads in KVM_RUN run beside the rest of Python),
  costs about 0.5 us instead of 1.3 us, and returns EINTR to us instead of
  retrying it, which the pause barrier depends on.
- KVM_RUN returns -1/EINTR when a signal arrives while the vCPU runs or when
  kvm_run.immediate_exit is set; that is how a vCPU is kicked out.
- Every other ioctl used here either ignores signals or returns EINTR only
  when a fatal signal is pending (the vCPU ioctls take vcpu->mutex with
  mutex_lock_killable), and each is safe to repeat (GET and full-state SET
  calls, creations that did not happen). So ioctl() retries EINTR; only
  KVM_RUN's EINTR reaches the caller, as the kick.
- Every fd and mmap is owned by one object with a close(); nothing is left to
  the garbage collector.

Some facts about KVM_RESET_DIRTY_RINGS and signals (virt/kvm/dirty_ring.c and
kvm_main.c since the 2025 dirty ring fixes; measured on Linux 6.18 here):

- kvm_vm_ioctl_reset_dirty_pages walks the vCPUs' rings in order with one
  shared counter; kvm_dirty_ring_reset checks signal_pending(current) before
  every entry and stops the walk with -EINTR. The ioctl still returns the
  entries reset so far, never EINTR: a signal makes it return a short count,
  0 included. A profiler's SIGPROF, an interval timer, SIGWINCH, SIGCHLD, a
  ptrace stop (py-spy, gdb) or SIGSTOP all do. Calling it again resets the
  rest.
- A short walk also loses work: the walk coalesces consecutive entries of one
  slot into a 64-page mask and write-protects the mask only when the next
  entry does not fit, so the mask it holds when the signal stops it is
  counted and zeroed in the ring but never write-protected. Those pages stay
  writable and the guest's next writes to them are never logged. Measured
  here with resets retried until the counts added up: under a 20 kHz SIGALRM,
  2,700 of the 3,000 pages written per harvest went unreported after 300
  harvests; under a py-spy-like ptrace sampler (2 kHz) with signals blocked,
  14,600 over 300 harvests. The signal check comes before the end-of-ring
  check, so this can happen even when the count comes out complete.
- So reset_dirty_rings() blocks every signal it can on the calling thread for
  the ioctl (in C, ring/native/core.c, with the GIL released outside the
  measured window; reset_dirty_rings_python() is the same in ctypes): blocked signals do not make signal_pending() true, and they are
  delivered as soon as the mask is restored. What a mask cannot block (a
  ptrace interrupt from py-spy or gdb, SIGSTOP, the cgroup freezer) stops
  the thread on its way out of the ioctl, which shows as a voluntary context
  switch (getrusage, RUSAGE_THREAD). Each such reset is counted in
  `Vm.reset_interruptions`, and the tracker above then write-protects the
  slots again (RingTracker, Machine.rearm_dirty_logging). A sleep inside the
  ioctl counts too: a false alarm costs one re-arm. Not seen: a SIGSTOP that
  a SIGCONT cancels before the thread gets to stop; it can only lose a batch
  if it lands while the walk handles its very last entry (a short count is
  seen and handled whatever its cause). A pending SIGCONT is no evidence
  either: any thread that does not block it consumes it.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import resource
import signal
import threading
from typing import Iterable

import numpy as np

from . import abi
import ring._native as native        # the native core (ring/native/core.c), built by setup.py
from .errors import KvmError, KvmUnavailableError

_libc = ctypes.CDLL(None, use_errno=True)
_libc_ioctl = _libc.ioctl
# The same ioctl called without releasing the GIL: taking the GIL back after a call that released
# it can block, which shows as a voluntary context switch and would look like a stop (see below).
_libc_holding_gil = ctypes.PyDLL(None, use_errno=True)
_libc_ioctl_holding_gil = _libc_holding_gil.ioctl
for _call in (_libc_ioctl, _libc_ioctl_holding_gil):
    _call.restype = ctypes.c_int
    _call.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]

#: How often ioctl() repeats a call that returned EINTR before it gives up (a fatal signal
#: ends the process long before; this only bounds a kernel that misbehaves).
EINTR_RETRIES = 1000


def ioctl(fd: int, request: int, arg: int | ctypes.Structure | ctypes.Array | None = None,
          *, name: str | None = None, holding_gil: bool = False) -> int:
    """Issue one ioctl (not KVM_RUN), repeating it on EINTR; raise KvmError(name, errno) on failure."""
    if arg is None:
        pointer = None
    elif isinstance(arg, int):
        pointer = arg
    else:
        pointer = ctypes.addressof(arg)
    call = _libc_ioctl_holding_gil if holding_gil else _libc_ioctl
    for _ in range(EINTR_RETRIES):
        result = call(fd, request, pointer)
        if result >= 0:
            return result
        err = ctypes.get_errno()
        if err != errno.EINTR:
            break
    raise KvmError(name or abi.IOCTL_NAMES.get(request, hex(request)), err)


class _SigSet(ctypes.Structure):
    """glibc's sigset_t (1024 bits)."""

    _fields_ = [("words", ctypes.c_ulong * (1024 // (8 * ctypes.sizeof(ctypes.c_ulong))))]


_sigmask = _libc_holding_gil.pthread_sigmask     # (releasing the GIL here could cost a switch interval)
_sigmask.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_libc.sigfillset.argtypes = [ctypes.c_void_p]


def _voluntary_switches(getrusage=resource.getrusage, thread=resource.RUSAGE_THREAD) -> int:
    """Times the calling thread slept (a stop, a ptrace stop, a freeze each count one)."""
    return getrusage(thread).ru_nvcsw


class SignalsBlocked:
    """Blocks every signal it can on the calling thread for a `with` block, and says what it missed.

    On exit the old mask comes back and the signals that arrived meanwhile are
    delivered. `stopped` tells whether something the mask cannot hold off may
    have interrupted the block anyway: the thread slept, as it does when it is
    stopped (ptrace, SIGSTOP, the cgroup freezer). One object per thread.
    """

    def __init__(self) -> None:
        self._all = _SigSet()
        _libc.sigfillset(ctypes.byref(self._all))
        self._old = _SigSet()
        self._all_ref, self._old_ref = ctypes.byref(self._all), ctypes.byref(self._old)
        self._switches = 0
        self.stopped = False

    def __enter__(self) -> "SignalsBlocked":
        err = _sigmask(signal.SIG_BLOCK, self._all_ref, self._old_ref)
        if err:
            raise KvmError("pthread_sigmask(SIG_BLOCK)", err)
        self._switches = _voluntary_switches()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped = _voluntary_switches() != self._switches
        _sigmask(signal.SIG_SETMASK, self._old_ref, None)


def run_ioctl(fd: int) -> int:
    """KVM_RUN without raising: returns 0 or -errno (EINTR is the normal kick)."""
    if _libc_ioctl(fd, abi.KVM_RUN, None) < 0:
        return -ctypes.get_errno()
    return 0


class _Fd:
    """An owned file descriptor."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # last resort; callers close explicitly
        try:
            self.close()
        except Exception:
            pass


class Kvm(_Fd):
    """The system fd (/dev/kvm)."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise KvmUnavailableError(f"{path} does not exist: this host has no KVM "
                                      f"(load kvm_intel/kvm_amd, or use the simulated backend)") from exc
        except PermissionError as exc:
            raise KvmUnavailableError(f"{path} is not accessible to this user "
                                      f"(add the user to group 'kvm' or run as root)") from exc
        except OSError as exc:
            raise KvmUnavailableError(f"{path} cannot be opened: {exc.strerror}") from exc
        super().__init__(fd)
        try:
            version = self.get_api_version()
        except KvmError as exc:
            self.close()
            raise KvmUnavailableError(f"{path} is not a KVM device ({exc})") from exc
        if version != abi.KVM_API_VERSION:
            self.close()
            raise KvmUnavailableError(f"{path} speaks KVM API {version}, expected {abi.KVM_API_VERSION}")

    def get_api_version(self) -> int:
        """KVM_GET_API_VERSION."""
        return ioctl(self.fd, abi.KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the system fd."""
        return ioctl(self.fd, abi.KVM_CHECK_EXTENSION, cap)

    def get_vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: bytes of the kvm_run mapping (plus the ring offset area)."""
        return ioctl(self.fd, abi.KVM_GET_VCPU_MMAP_SIZE)

    def get_supported_cpuid(self) -> list[abi.CpuidEntry2]:
        """KVM_GET_SUPPORTED_CPUID, growing the buffer until it fits."""
        count = 64
        while True:
            cpuid = abi.cpuid2_struct(count)()
            cpuid.nent = count
            try:
                ioctl(self.fd, abi.KVM_GET_SUPPORTED_CPUID, cpuid)
            except KvmError as exc:
                if exc.errno == errno.E2BIG and count < 4096:
                    count *= 2
                    continue
                raise
            return [abi.CpuidEntry2.from_buffer_copy(cpuid.entries[i]) for i in range(cpuid.nent)]

    def get_msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores for a vCPU."""
        count = 256
        while True:
            lst = abi.msr_list_struct(count)()
            lst.nmsrs = count
            try:
                ioctl(self.fd, abi.KVM_GET_MSR_INDEX_LIST, lst)
            except KvmError as exc:
                if exc.errno == errno.E2BIG and count < 65536:
                    count *= 4
                    continue
                raise
            return list(lst.indices[: lst.nmsrs])

    def create_vm(self) -> "Vm":
        """KVM_CREATE_VM (machine type 0)."""
        return Vm(self, ioctl(self.fd, abi.KVM_CREATE_VM, 0))


class Vm(_Fd):
    """A VM fd."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        super().__init__(fd)
        self.kvm = kvm
        #: Resets that something other than a blockable signal may have cut short (a stop).
        self.reset_interruptions = 0
        self._signal_guards: dict[int, SignalsBlocked] = {}

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (some caps answer per VM)."""
        return ioctl(self.fd, abi.KVM_CHECK_EXTENSION, cap)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP."""
        request = abi.EnableCap(cap=cap, flags=flags)
        for index, value in enumerate(args):
            request.args[index] = value
        ioctl(self.fd, abi.KVM_ENABLE_CAP, request, name=f"KVM_ENABLE_CAP({cap})")

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, flags: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION."""
        region = abi.UserspaceMemoryRegion(slot=slot, flags=flags, guest_phys_addr=guest_phys_addr,
                                           memory_size=memory_size, userspace_addr=userspace_addr)
        ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION, region)

    def set_tss_addr(self, address: int) -> None:
        """KVM_SET_TSS_ADDR (needed by VMX for real-mode emulation; harmless elsewhere)."""
        ioctl(self.fd, abi.KVM_SET_TSS_ADDR, address)

    def get_dirty_log(self, slot: int, bitmap_address: int) -> None:
        """KVM_GET_DIRTY_LOG into a caller-owned bitmap (one bit per page, 64-bit aligned)."""
        request = abi.DirtyLog(slot=slot, dirty_bitmap=bitmap_address)
        ioctl(self.fd, abi.KVM_GET_DIRTY_LOG, request)

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap_address: int) -> None:
        """KVM_CLEAR_DIRTY_LOG (with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled)."""
        request = abi.ClearDirtyLog(slot=slot, num_pages=num_pages, first_page=first_page,
                                    dirty_bitmap=bitmap_address)
        ioctl(self.fd, abi.KVM_CLEAR_DIRTY_LOG, request)

    def reset_dirty_rings(self, block_signals: bool = True) -> int:
        """KVM_RESET_DIRTY_RINGS: the number of entries reset over all vCPUs, short if interrupted.

        With block_signals (the default) the calling thread's signals are blocked
        for the call, so that none can cut the walk short, and a stop that can
        still do so is counted in `reset_interruptions` (see the module's facts).
        block_signals=False issues the bare ioctl (tests of the retry path).
        """
        if not block_signals:
            return ioctl(self.fd, abi.KVM_RESET_DIRTY_RINGS, 0)
        try:                          # ring/native/core.c: mask, switch count, ioctl, in C, no GIL
            reset, stopped = native.reset_dirty_rings(self.fd)
        except OSError as exc:
            raise KvmError("KVM_RESET_DIRTY_RINGS", exc.errno or 0) from None
        if stopped:
            self.reset_interruptions += 1
        return reset

    def reset_dirty_rings_python(self) -> int:
        """reset_dirty_rings() written with ctypes (SignalsBlocked): the reference for the native one."""
        guard = self._signal_guards.get(threading.get_ident())
        if guard is None:
            guard = self._signal_guards[threading.get_ident()] = SignalsBlocked()
        with guard:                   # (a short call: holding the GIL keeps the switch count honest)
            reset = ioctl(self.fd, abi.KVM_RESET_DIRTY_RINGS, 0, holding_gil=True)
        if guard.stopped:
            self.reset_interruptions += 1
        return reset

    def create_vcpu(self, index: int) -> "Vcpu":
        """KVM_CREATE_VCPU, and map its kvm_run page."""
        return Vcpu(self, index, ioctl(self.fd, abi.KVM_CREATE_VCPU, index))


class Vcpu(_Fd):
    """A vCPU fd with its kvm_run mapping."""

    def __init__(self, vm: Vm, index: int, fd: int) -> None:
        super().__init__(fd)
        self.vm = vm
        self.index = index
        size = vm.kvm.get_vcpu_mmap_size()
        try:
            self.run_map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(fd)
            self.fd = -1
            raise KvmError("mmap(kvm_run)", exc.errno or 0) from exc
        self._run_address = ctypes.addressof(ctypes.c_char.from_buffer(self.run_map))
        self._msr_requests: dict[tuple[int, ...], tuple] = {}
        #: KVM_CAP_SYNC_REGS on: every KVM_RUN exit leaves regs, sregs and events in kvm_run.
        self.sync_regs = False
        #: KVM_RUNs that returned (0 or EINTR), counted by whoever runs the vCPU (a uint64 the
        #: native run loop adds to); kvm_run.s is fresh when it moved since the last SET ioctl.
        self.run_counter = (ctypes.c_uint64 * 1)()
        self.run_counter_address = ctypes.addressof(self.run_counter)
        self.immediate_exit_address = self._run_address + abi.RUN_IMMEDIATE_EXIT
        self.sync_regs_address = self._run_address + abi.RUN_SYNC_REGS
        self._runs_at_change = 0
        #: Bumped by every SET ioctl: a capture's cache of state a CPL3 guest cannot change
        #: (XCRs, debug registers, CPUID, most MSRs) is good while this does not move.
        self.state_changes = 0
        self.io = abi.RunIo.from_buffer(self.run_map, abi.RUN_EXIT_UNION)

    def close(self) -> None:
        if getattr(self, "run_map", None) is not None:
            self.io = None
            try:
                self.run_map.close()
            except BufferError:
                pass  # a view is still exported; the mapping goes with the process
            self.run_map = None
        super().close()

    # kvm_run fields
    @property
    def exit_reason(self) -> int:
        return int.from_bytes(self.run_map[abi.RUN_EXIT_REASON:abi.RUN_EXIT_REASON + 4], "little")

    def set_immediate_exit(self, value: bool) -> None:
        self.run_map[abi.RUN_IMMEDIATE_EXIT] = 1 if value else 0

    def io_data(self) -> bytes:
        """The bytes of the pending port access (size * count)."""
        io = self.io
        start = io.data_offset
        return bytes(self.run_map[start:start + io.size * io.count])

    def set_io_in_data(self, data: bytes) -> None:
        """Fill the data of a pending IN access before the next KVM_RUN."""
        start = self.io.data_offset
        self.run_map[start:start + len(data)] = data

    def internal_error(self) -> tuple[int, list[int]]:
        """kvm_run.internal: (suberror, data words)."""
        base = abi.RUN_EXIT_UNION
        raw = self.run_map[base:base + 8 + 16 * 8]
        suberror = int.from_bytes(raw[0:4], "little")
        ndata = min(int.from_bytes(raw[4:8], "little"), 16)
        return suberror, [int.from_bytes(raw[8 + 8 * i:16 + 8 * i], "little") for i in range(ndata)]

    def run(self) -> int:
        """KVM_RUN: returns 0, or -errno (EINTR when kicked) without raising."""
        result = run_ioctl(self.fd)
        if result == 0 or result == -errno.EINTR:
            self.run_counter[0] += 1    # (KVM stores kvm_run.s on its way out, kicked or not)
        return result

    @property
    def synced(self) -> bool:
        """kvm_run.s holds the vCPU's current regs, sregs and events: a KVM_RUN returned since
        the last SET ioctl (after one, the state differs from the last exit)."""
        return self.sync_regs and self.run_counter[0] != self._runs_at_change

    def enable_sync_regs(self) -> bool:
        """Ask KVM to store regs, sregs and events into kvm_run on every exit (KVM_CAP_SYNC_REGS).

        Costs nothing measurable per KVM_RUN here and saves GET_REGS, GET_SREGS and
        GET_VCPU_EVENTS at a checkpoint. kvm_dirty_regs stays 0: KVM never loads state
        from kvm_run, so SET ioctls stay the only way in. False if the host lacks it.
        """
        supported = self.vm.check_extension(abi.KVM_CAP_SYNC_REGS)
        if supported & abi.KVM_SYNC_X86_ALL != abi.KVM_SYNC_X86_ALL:
            return False
        self.run_map[abi.RUN_VALID_REGS:abi.RUN_VALID_REGS + 8] = abi.KVM_SYNC_X86_ALL.to_bytes(8, "little")
        self.run_map[abi.RUN_DIRTY_REGS:abi.RUN_DIRTY_REGS + 8] = bytes(8)
        self.sync_regs = True
        return True

    def synced_state(self) -> tuple[bytes, bytes, bytes] | None:
        """(regs, sregs, events) as KVM stored them at the last exit, or None if they may be stale."""
        if not self.synced:
            return None
        base, regs, sregs = abi.RUN_SYNC_REGS, ctypes.sizeof(abi.Regs), ctypes.sizeof(abi.Sregs)
        run = self.run_map
        return (run[base:base + regs], run[base + regs:base + regs + sregs],
                run[base + regs + sregs:base + regs + sregs + abi.VCPU_EVENTS_SIZE])

    def _changed(self) -> None:
        self._runs_at_change = self.run_counter[0]
        self.state_changes += 1

    def get_regs(self) -> abi.Regs:
        """KVM_GET_REGS."""
        regs = abi.Regs()
        ioctl(self.fd, abi.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: abi.Regs) -> None:
        """KVM_SET_REGS."""
        self._changed()
        ioctl(self.fd, abi.KVM_SET_REGS, regs)

    def get_sregs(self) -> abi.Sregs:
        """KVM_GET_SREGS."""
        sregs = abi.Sregs()
        ioctl(self.fd, abi.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: abi.Sregs) -> None:
        """KVM_SET_SREGS."""
        self._changed()
        ioctl(self.fd, abi.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> abi.Fpu:
        """KVM_GET_FPU."""
        fpu = abi.Fpu()
        ioctl(self.fd, abi.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: abi.Fpu) -> None:
        """KVM_SET_FPU."""
        self._changed()
        ioctl(self.fd, abi.KVM_SET_FPU, fpu)

    def get_xsave(self, size: int = abi.XSAVE_LEGACY_SIZE) -> bytes:
        """KVM_GET_XSAVE, or KVM_GET_XSAVE2 when `size` (from KVM_CAP_XSAVE2) is larger."""
        buffer = (ctypes.c_uint8 * max(size, abi.XSAVE_LEGACY_SIZE))()
        request = abi.KVM_GET_XSAVE2 if size > abi.XSAVE_LEGACY_SIZE else abi.KVM_GET_XSAVE
        ioctl(self.fd, request, buffer)
        return bytes(buffer)

    def set_xsave(self, data: bytes) -> None:
        """KVM_SET_XSAVE (the kernel reads the whole area, whatever its size)."""
        self._changed()
        buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        ioctl(self.fd, abi.KVM_SET_XSAVE, buffer)

    def get_xcrs(self) -> abi.Xcrs:
        """KVM_GET_XCRS."""
        xcrs = abi.Xcrs()
        ioctl(self.fd, abi.KVM_GET_XCRS, xcrs)
        return xcrs

    def set_xcrs(self, xcrs: abi.Xcrs) -> None:
        """KVM_SET_XCRS."""
        self._changed()
        ioctl(self.fd, abi.KVM_SET_XCRS, xcrs)

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """KVM_GET_MSRS; raises if KVM processed fewer than asked.

        The request struct is built once per set of indices and reused: building
        ctypes arrays costs more than the ioctl.
        """
        indices = tuple(indices)
        cached = self._msr_requests.get(indices)
        if cached is None:
            msrs = abi.msrs_struct(len(indices))()
            msrs.nmsrs = len(indices)
            for entry, index in zip(msrs.entries, indices):
                entry.index = index
            view = np.frombuffer(msrs, dtype=np.uint64, offset=8).reshape(len(indices), 2)
            cached = self._msr_requests[indices] = (msrs, view)
        msrs, view = cached
        done = ioctl(self.fd, abi.KVM_GET_MSRS, msrs)
        if done != len(indices):
            raise KvmError("KVM_GET_MSRS", errno.EINVAL, f"MSR {indices[done]:#x} was refused")
        return dict(zip(indices, view[:, 1].tolist()))

    def set_msrs(self, values: dict[int, int]) -> None:
        """KVM_SET_MSRS; raises if KVM accepted fewer than given."""
        self._changed()
        msrs = abi.msrs_struct(len(values))()
        msrs.nmsrs = len(values)
        for entry, (index, data) in zip(msrs.entries, values.items()):
            entry.index, entry.data = index, data
        done = ioctl(self.fd, abi.KVM_SET_MSRS, msrs)
        if done != len(values):
            raise KvmError("KVM_SET_MSRS", errno.EINVAL, f"MSR {list(values)[done]:#x} was refused")

    def set_cpuid2(self, entries: list[abi.CpuidEntry2]) -> None:
        """KVM_SET_CPUID2."""
        self._changed()
        cpuid = abi.cpuid2_struct(len(entries))()
        cpuid.nent = len(entries)
        for i, entry in enumerate(entries):
            cpuid.entries[i] = entry
        ioctl(self.fd, abi.KVM_SET_CPUID2, cpuid)

    def get_cpuid2(self, capacity: int = 256) -> list[abi.CpuidEntry2]:
        """KVM_GET_CPUID2."""
        cpuid = abi.cpuid2_struct(capacity)()
        cpuid.nent = capacity
        ioctl(self.fd, abi.KVM_GET_CPUID2, cpuid)
        return [abi.CpuidEntry2.from_buffer_copy(cpuid.entries[i]) for i in range(cpuid.nent)]

    def get_vcpu_events(self) -> bytes:
        """KVM_GET_VCPU_EVENTS (kept opaque: pending exceptions, interrupt shadow, NMI state)."""
        buffer = (ctypes.c_uint8 * abi.VCPU_EVENTS_SIZE)()
        ioctl(self.fd, abi.KVM_GET_VCPU_EVENTS, buffer)
        return bytes(buffer)

    def set_vcpu_events(self, data: bytes) -> None:
        """KVM_SET_VCPU_EVENTS."""
        self._changed()
        buffer = (ctypes.c_uint8 * abi.VCPU_EVENTS_SIZE).from_buffer_copy(data)
        ioctl(self.fd, abi.KVM_SET_VCPU_EVENTS, buffer)

    def get_debugregs(self) -> bytes:
        """KVM_GET_DEBUGREGS (opaque)."""
        buffer = (ctypes.c_uint8 * abi.DEBUGREGS_SIZE)()
        ioctl(self.fd, abi.KVM_GET_DEBUGREGS, buffer)
        return bytes(buffer)

    def set_debugregs(self, data: bytes) -> None:
        """KVM_SET_DEBUGREGS."""
        self._changed()
        buffer = (ctypes.c_uint8 * abi.DEBUGREGS_SIZE).from_buffer_copy(data)
        ioctl(self.fd, abi.KVM_SET_DEBUGREGS, buffer)

    def map_dirty_ring(self, ring_bytes: int) -> mmap.mmap:
        """mmap the vCPU's dirty ring (offset KVM_DIRTY_LOG_PAGE_OFFSET pages)."""
        try:
            return mmap.mmap(self.fd, ring_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                             offset=abi.KVM_DIRTY_LOG_PAGE_OFFSET * mmap.PAGESIZE)
        except OSError as exc:
            raise KvmError("mmap(dirty ring)", exc.errno or 0) from exc
