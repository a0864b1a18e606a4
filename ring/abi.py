"""The KVM ABI for x86-64, in one place: ioctl numbers and struct layouts.

Everything the binding passes to or reads from the kernel is defined here and
nowhere else, so that a layout mistake has exactly one place to be fixed.
Values come from include/uapi/linux/kvm.h and arch/x86/include/uapi/asm/kvm.h
(see ../shared/KVM-NOTES.md for the dirty ring part).
"""

from __future__ import annotations

import ctypes

import numpy as np

# --- ioctl number encoding (asm-generic/ioctl.h) ---------------------------

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class Struct(ctypes.Structure):
    """ctypes structure with a readable repr and byte round trip."""

    def to_bytes(self) -> bytes:
        return bytes(self)

    @classmethod
    def from_bytes(cls, data: bytes):
        return cls.from_buffer_copy(data)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name, *_ in self._fields_)
        return f"{type(self).__name__}({fields})"


class UserspaceMemoryRegion(Struct):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


class EnableCap(Struct):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class DirtyLog(Struct):
    _fields_ = [("slot", u32), ("padding", u32), ("dirty_bitmap", u64)]


class ClearDirtyLog(Struct):
    _fields_ = [("slot", u32), ("num_pages", u32), ("first_page", u64), ("dirty_bitmap", u64)]


class Regs(Struct):
    _fields_ = [(name, u64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class Segment(Struct):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
                ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8),
                ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8)]


class DTable(Struct):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class Sregs(Struct):
    _fields_ = [("cs", Segment), ("ds", Segment), ("es", Segment), ("fs", Segment),
                ("gs", Segment), ("ss", Segment), ("tr", Segment), ("ldt", Segment),
                ("gdt", DTable), ("idt", DTable),
                ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64),
                ("efer", u64), ("apic_base", u64), ("interrupt_bitmap", u64 * 4)]


class Fpu(Struct):
    _fields_ = [("fpr", u8 * 128), ("fcw", u16), ("fsw", u16), ("ftwx", u8), ("pad1", u8),
                ("last_opcode", u16), ("last_ip", u64), ("last_dp", u64),
                ("xmm", u8 * 256), ("mxcsr", u32), ("pad2", u32)]


class Xcr(Struct):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class Xcrs(Struct):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", Xcr * 16), ("padding", u64 * 16)]


class MsrEntry(Struct):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class CpuidEntry2(Struct):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32),
                ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


def msrs_struct(count: int) -> type[Struct]:
    """struct kvm_msrs with room for `count` entries (a flexible array in C)."""

    class Msrs(Struct):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", MsrEntry * count)]

    return Msrs


def msr_list_struct(count: int) -> type[Struct]:
    """struct kvm_msr_list with room for `count` indices."""

    class MsrList(Struct):
        _fields_ = [("nmsrs", u32), ("indices", u32 * count)]

    return MsrList


def cpuid2_struct(count: int) -> type[Struct]:
    """struct kvm_cpuid2 with room for `count` entries."""

    class Cpuid2(Struct):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", CpuidEntry2 * count)]

    return Cpuid2


VCPU_EVENTS_SIZE = 64      # struct kvm_vcpu_events, kept opaque: saved and restored whole
DEBUGREGS_SIZE = 128       # struct kvm_debugregs, likewise
XSAVE_LEGACY_SIZE = 4096   # struct kvm_xsave without the flexible tail

# --- ioctls -----------------------------------------------------------------

KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, 4)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, 8)

KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, ctypes.sizeof(DirtyLog))
KVM_SET_USER_MEMORY_REGION = _iow(0x46, ctypes.sizeof(UserspaceMemoryRegion))
KVM_SET_TSS_ADDR = _io(0x47)
KVM_ENABLE_CAP = _iow(0xA3, ctypes.sizeof(EnableCap))
KVM_CLEAR_DIRTY_LOG = _iowr(0xC0, ctypes.sizeof(ClearDirtyLog))
KVM_RESET_DIRTY_RINGS = _io(0xC7)

KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, ctypes.sizeof(Regs))
KVM_SET_REGS = _iow(0x82, ctypes.sizeof(Regs))
KVM_GET_SREGS = _ior(0x83, ctypes.sizeof(Sregs))
KVM_SET_SREGS = _iow(0x84, ctypes.sizeof(Sregs))
KVM_GET_MSRS = _iowr(0x88, 8)
KVM_SET_MSRS = _iow(0x89, 8)
KVM_SET_CPUID2 = _iow(0x90, 8)
KVM_GET_CPUID2 = _iowr(0x91, 8)
KVM_GET_FPU = _ior(0x8C, ctypes.sizeof(Fpu))
KVM_SET_FPU = _iow(0x8D, ctypes.sizeof(Fpu))
KVM_GET_VCPU_EVENTS = _ior(0x9F, VCPU_EVENTS_SIZE)
KVM_SET_VCPU_EVENTS = _iow(0xA0, VCPU_EVENTS_SIZE)
KVM_GET_DEBUGREGS = _ior(0xA1, DEBUGREGS_SIZE)
KVM_SET_DEBUGREGS = _iow(0xA2, DEBUGREGS_SIZE)
KVM_GET_XSAVE = _ior(0xA4, XSAVE_LEGACY_SIZE)
KVM_SET_XSAVE = _iow(0xA5, XSAVE_LEGACY_SIZE)
KVM_GET_XCRS = _ior(0xA6, ctypes.sizeof(Xcrs))
KVM_SET_XCRS = _iow(0xA7, ctypes.sizeof(Xcrs))
KVM_GET_XSAVE2 = _ior(0xCF, XSAVE_LEGACY_SIZE)

IOCTL_NAMES = {value: name for name, value in globals().items()
               if name.startswith("KVM_") and isinstance(value, int) and name not in (
                   "KVM_API_VERSION",)}

KVM_API_VERSION = 12

# --- capabilities -----------------------------------------------------------

KVM_CAP_USER_MEMORY = 3
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_XSAVE2 = 208
KVM_CAP_SYNC_REGS = 74          # returns the KVM_SYNC_X86_* bits it supports (7 here)
KVM_CAP_DIRTY_LOG_RING_ACQ_REL = 223
KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP = 225

KVM_MEM_LOG_DIRTY_PAGES = 1
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1

# --- kvm_run ----------------------------------------------------------------

RUN_IMMEDIATE_EXIT = 1     # byte offset of immediate_exit
RUN_EXIT_REASON = 8        # u32
RUN_EXIT_UNION = 32        # start of the exit-specific union
RUN_VALID_REGS = 288       # u64 kvm_valid_regs: what KVM stores into kvm_run.s on every exit
RUN_DIRTY_REGS = 296       # u64 kvm_dirty_regs: what KVM loads from kvm_run.s on entry (never set here)
RUN_SYNC_REGS = 304        # struct kvm_sync_regs: kvm_regs, kvm_sregs, kvm_vcpu_events, in that order
KVM_SYNC_X86_REGS = 1
KVM_SYNC_X86_SREGS = 2
KVM_SYNC_X86_EVENTS = 4
KVM_SYNC_X86_ALL = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_DIRTY_RING_FULL = 31

EXIT_NAMES = {value: name for name, value in globals().items()
              if name.startswith("KVM_EXIT_") and isinstance(value, int)}

KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1


class RunIo(Struct):
    """kvm_run.io: where a port access's data sits inside the kvm_run page."""

    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]


# --- the dirty ring ---------------------------------------------------------

KVM_DIRTY_LOG_PAGE_OFFSET = 64          # pages into the vCPU fd
KVM_DIRTY_GFN_F_DIRTY = 1
KVM_DIRTY_GFN_F_RESET = 2
DIRTY_RING_RESERVED_ENTRIES = 64        # plus the PML buffer size, which is 0 without PML
DIRTY_RING_MIN_ENTRIES = 256            # 4096 bytes
DIRTY_RING_MAX_ENTRIES = 65536

#: struct kvm_dirty_gfn as a numpy record: harvests read the ring through this view.
DIRTY_GFN_DTYPE = np.dtype([("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")])
assert DIRTY_GFN_DTYPE.itemsize == 16

PAGE_SIZE = 4096
PAGE_SHIFT = 12
