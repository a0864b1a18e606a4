"""A vCPU's state as raw KVM structs, and its one serialisation (the VCPU_STATE payload).

The state lives here, beside the machines that capture and restore it, so that
ring/ owns the bytes of its own structs; the wire (checkpointer/wire.py) only
frames them. The bytes come from a peer when they are unpacked, so unpacking
trusts nothing: every count and length is checked against a limit before
anything is allocated or read, and any flaw is a ``VcpuStateError`` that names
it. Packing is deterministic (MSRs in increasing index), so the same states
always give the same bytes and both sides can digest them.

Layout, little-endian::

    u32 count
    count x:  u32 index                           (no index twice)
              8 x (u32 length, bytes)             regs sregs fpu xsave xcrs events debugregs cpuid
              u32 nmsrs, nmsrs x (u32 msr, u64 value)     packed in increasing msr index; unpacking
                                                          takes any order but no msr twice
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Sequence

from . import abi

__all__ = ["VcpuState", "VcpuStateError", "pack_vcpu_states", "unpack_vcpu_states", "MAX_VCPUS",
           "MAX_VCPU_FIELD", "MAX_MSRS", "BLOB_FIELDS"]

MAX_VCPUS = 4096                    # KVM_MAX_VCPUS on x86-64 is 4096
MAX_VCPU_FIELD = 1 << 20            # any single vCPU state blob (xsave is a few KiB)
MAX_MSRS = 4096

#: The byte fields of a VcpuState, in their order on the wire.
BLOB_FIELDS = ("regs", "sregs", "fpu", "xsave", "xcrs", "events", "debugregs", "cpuid")

_U32, _U64 = (1 << 32) - 1, (1 << 64) - 1
_U32S = struct.Struct("<I")
_MSR = struct.Struct("<IQ")


class VcpuStateError(ValueError):
    """vCPU states that this format cannot hold, or bytes that are not a valid serialisation of any."""


@dataclass
class VcpuState:
    """Everything a long-mode CPL3 vCPU needs to continue elsewhere, as raw KVM structs."""

    index: int
    regs: bytes
    sregs: bytes
    fpu: bytes = b""
    xsave: bytes = b""
    xcrs: bytes = b""
    msrs: dict[int, int] = field(default_factory=dict)
    events: bytes = b""
    debugregs: bytes = b""
    cpuid: bytes = b""                 # kvm_cpuid_entry2 records, as set on the vCPU

    @property
    def rip(self) -> int:
        return abi.Regs.from_bytes(self.regs).rip


def pack_vcpu_states(states: Sequence[VcpuState]) -> bytes:
    """The serialisation of ``states``. Refuses what unpacking would refuse, so nothing sent is unreadable."""
    if len(states) > MAX_VCPUS:
        raise VcpuStateError(f"{len(states)} vCPU states, limit {MAX_VCPUS}")
    out = [_U32S.pack(len(states))]
    seen = set()
    for st in states:
        if not 0 <= st.index <= _U32 or st.index in seen:
            raise VcpuStateError(f"vCPU index {st.index} is out of range or repeated")
        seen.add(st.index)
        out.append(_U32S.pack(st.index))
        for name in BLOB_FIELDS:
            blob = bytes(getattr(st, name))
            if len(blob) > MAX_VCPU_FIELD:
                raise VcpuStateError(f"vCPU {st.index} {name} is {len(blob)} bytes, limit {MAX_VCPU_FIELD}")
            out += (_U32S.pack(len(blob)), blob)
        if len(st.msrs) > MAX_MSRS:
            raise VcpuStateError(f"vCPU {st.index} has {len(st.msrs)} MSRs, limit {MAX_MSRS}")
        out.append(_U32S.pack(len(st.msrs)))
        for msr, value in sorted(st.msrs.items()):
            if not (0 <= msr <= _U32 and 0 <= value <= _U64):
                raise VcpuStateError(f"vCPU {st.index} MSR {msr:#x} = {value:#x} out of range")
            out.append(_MSR.pack(msr, value))
    return b"".join(out)


def _bytes_view(data: Any) -> memoryview:
    """A flat byte view of ``data`` without copying it, or VcpuStateError."""
    try:
        view = memoryview(data)
    except TypeError:
        raise VcpuStateError(f"vCPU states must be bytes-like, got a {type(data).__name__}") from None
    if not view.c_contiguous:
        raise VcpuStateError("vCPU states must be a C-contiguous buffer")
    if view.nbytes == 0:
        return memoryview(b"")
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def unpack_vcpu_states(data: Any) -> list[VcpuState]:
    """The vCPU states serialised in ``data`` (any bytes-like object); VcpuStateError on anything off."""
    view = _bytes_view(data)
    pos = 0

    def take(n: int, what: str) -> memoryview:
        nonlocal pos
        if pos + n > view.nbytes:
            raise VcpuStateError(f"vCPU state bytes truncated reading {what} at byte {pos} "
                                 f"(needs {n}, {view.nbytes - pos} left)")
        chunk = view[pos:pos + n]
        pos += n
        return chunk

    def u32(what: str) -> int:
        return _U32S.unpack(take(4, what))[0]

    count = u32("count")
    if count > MAX_VCPUS:
        raise VcpuStateError(f"vCPU state count {count} exceeds {MAX_VCPUS}")
    states = []
    seen = set()
    for _ in range(count):
        index = u32("vCPU index")
        if index in seen:
            raise VcpuStateError(f"vCPU state bytes list vCPU {index} twice")
        seen.add(index)
        blobs = {}
        for name in BLOB_FIELDS:
            size = u32(f"vCPU {index} {name} length")
            if size > MAX_VCPU_FIELD:
                raise VcpuStateError(f"vCPU {index} {name} length {size} exceeds {MAX_VCPU_FIELD}")
            blobs[name] = bytes(take(size, f"vCPU {index} {name}"))
        nmsrs = u32(f"vCPU {index} MSR count")
        if nmsrs > MAX_MSRS:
            raise VcpuStateError(f"vCPU {index} MSR count {nmsrs} exceeds {MAX_MSRS}")
        msrs: dict[int, int] = {}
        for msr, value in _MSR.iter_unpack(take(nmsrs * _MSR.size, f"vCPU {index} MSRs")):
            if msr in msrs:
                raise VcpuStateError(f"vCPU {index} lists MSR {msr:#x} twice")
            msrs[msr] = value
        states.append(VcpuState(index=index, msrs=msrs, **blobs))
    if pos != view.nbytes:
        raise VcpuStateError(f"vCPU state bytes have {view.nbytes - pos} trailing bytes")
    return states
