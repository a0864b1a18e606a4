"""Guest memory: anonymous mmaps, one per slot, each exposed as a numpy array.

Large slots are mapped with MAP_NORESERVE: a 64 GiB guest on a 24 GiB host is
fine as long as it touches little of it, and the kernel only backs what is
touched.

Slots up to half the host's RAM ask for transparent huge pages (MADV_HUGEPAGE). The point is
the takeover: a killed primary's kernel frees all its memory before it closes its sockets, and
the replica sees the death only at that close. With 4 KiB pages that took 38-46 ms for a
256 MiB guest here, with huge pages 5-6 ms (a kill -9 of a running guest to the peer's EOF).
KVM still logs dirty pages at 4 KiB: a memslot with dirty logging is mapped at 4 KiB in the
guest's page tables whatever backs it. What changes is that a first touch backs 2 MiB at once
(mincore then reports all of it, and a sync copies those pages, zero ones cost a byte each),
which is why a slot larger than half the RAM (a sparse 64 GiB benchmark guest on a 24 GiB
host) keeps 4 KiB pages. The same objects back the real VM (registered with
KVM_SET_USER_MEMORY_REGION) and the simulated one.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from .abi import PAGE_SHIFT, PAGE_SIZE
from .errors import ConfigError, SlotOverlapError

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mincore.restype = ctypes.c_int

#: Linux's MAP_NORESERVE; Python's mmap module only exports it from 3.13 on.
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
HUGE_PAGE_SIZE = 2 << 20


@dataclass(frozen=True)
class SlotSpec:
    """Where a slot sits in guest-physical space."""

    slot: int
    guest_phys_addr: int
    size: int
    name: str = ""

    @property
    def first_gfn(self) -> int:
        return self.guest_phys_addr >> PAGE_SHIFT

    @property
    def pages(self) -> int:
        return self.size >> PAGE_SHIFT

    @property
    def end(self) -> int:
        return self.guest_phys_addr + self.size


class MemorySlot:
    """One slot's host mapping; owns the mmap and closes it."""

    NORESERVE_ABOVE = 1 << 30
    HUGE_PAGES_UP_TO = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2

    def __init__(self, spec: SlotSpec) -> None:
        if spec.size <= 0 or spec.size % PAGE_SIZE or spec.guest_phys_addr % PAGE_SIZE:
            raise ConfigError(f"slot {spec.slot} ({spec.name}): address {spec.guest_phys_addr:#x} and "
                              f"size {spec.size:#x} must be positive multiples of {PAGE_SIZE}")
        self.spec = spec
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        if spec.size >= self.NORESERVE_ABOVE:
            flags |= MAP_NORESERVE
        self._map = mmap.mmap(-1, spec.size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        if spec.size <= self.HUGE_PAGES_UP_TO:
            _ask_huge_pages(self._map, spec.size)
        self.bytes = np.frombuffer(self._map, dtype=np.uint8)
        self.pages = self.bytes.reshape(spec.pages, PAGE_SIZE)
        self.words = self.bytes.view(np.uint64)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))

    def resident_pages(self) -> np.ndarray:
        """Offsets of the pages the host has backed (mincore): the only ones that can be non-zero.

        An untouched page of an anonymous mapping reads as zero, so a full copy of a
        large, mostly untouched guest only needs these.
        """
        vector = np.zeros(self.spec.pages, dtype=np.uint8)
        if _libc.mincore(ctypes.c_void_p(self.address), ctypes.c_size_t(self.spec.size),
                         vector.ctypes.data_as(ctypes.c_void_p)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mincore on slot {self.spec.slot} failed")
        return np.flatnonzero(vector & 1).astype(np.uint64)

    def page(self, offset: int) -> np.ndarray:
        """The page at `offset` pages into the slot, as a uint8 view."""
        return self.pages[offset]

    def close(self) -> None:
        if self._map is not None:
            self.bytes = self.pages = self.words = None
            try:
                self._map.close()
            except BufferError:
                pass  # a caller still holds a view; the mapping goes with it
            self._map = None


def _ask_huge_pages(mapping: mmap.mmap, size: int) -> None:
    """MADV_HUGEPAGE on a mapping of at least one huge page (where THP is off: 4 KiB pages)."""
    if size >= HUGE_PAGE_SIZE:
        try:
            mapping.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass


def page_buffer(pages: int, touch: bool = True) -> np.ndarray:
    """A page-aligned (pages, 4096) uint8 array on its own anonymous mapping.

    Why not np.empty: numpy's allocations start 16 bytes into a page, and copying
    pages between a page-aligned guest mapping and a buffer 16 bytes off makes
    every store alias the next load's 4 KiB offset (4K aliasing): np.take of
    random guest pages ran 3.5 times slower here. `touch` faults every page in
    once, so that no checkpoint pays first-touch costs. Huge pages as for guest memory (module
    docstring): the agents' staging and codec buffers are hundreds of MiB a process frees at death.
    """
    size = max(pages, 1) * PAGE_SIZE
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                        prot=mmap.PROT_READ | mmap.PROT_WRITE)
    _ask_huge_pages(mapping, size)
    buffer = np.frombuffer(mapping, dtype=np.uint8).reshape(max(pages, 1), PAGE_SIZE)
    if touch:
        buffer.fill(0)
    return buffer


class GuestMemory:
    """All of a guest's slots, checked not to overlap."""

    def __init__(self, specs: list[SlotSpec]) -> None:
        check_no_overlap(specs)
        self.slots: dict[int, MemorySlot] = {}
        try:
            for spec in specs:
                self.slots[spec.slot] = MemorySlot(spec)
        except Exception:
            self.close()
            raise

    @classmethod
    def holding(cls, specs: list[SlotSpec], contents: Mapping[int, np.ndarray]) -> "GuestMemory":
        """New memory whose slots hold a copy of `contents` (slot -> bytes, a capture's memory)."""
        memory = cls(specs)
        try:
            for slot, content in contents.items():
                if slot not in memory.slots:
                    raise ConfigError(f"the contents name slot {slot}, which the layout does not have")
                memory.slots[slot].bytes[:] = content
        except Exception:
            memory.close()
            raise
        return memory

    def slot_of(self, gpa: int) -> MemorySlot:
        for slot in self.slots.values():
            if slot.spec.guest_phys_addr <= gpa < slot.spec.end:
                return slot
        raise ConfigError(f"guest-physical address {gpa:#x} is in no memory slot")

    def view(self, gpa: int, length: int) -> np.ndarray:
        """A uint8 view of guest memory at `gpa` (must lie inside one slot)."""
        slot = self.slot_of(gpa)
        start = gpa - slot.spec.guest_phys_addr
        if start + length > slot.spec.size:
            raise ConfigError(f"range {gpa:#x}+{length:#x} crosses the end of slot {slot.spec.slot}")
        return slot.bytes[start:start + length]

    def write(self, gpa: int, data: bytes | np.ndarray) -> None:
        """Write bytes into guest memory from the VMM (not seen by the dirty ring)."""
        buffer = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray)) else data
        self.view(gpa, len(buffer))[:] = buffer

    def close(self) -> None:
        for slot in self.slots.values():
            slot.close()
        self.slots.clear()


def check_no_overlap(specs: list[SlotSpec]) -> None:
    """Raise SlotOverlapError naming the first two slots that share guest-physical space."""
    ids = [spec.slot for spec in specs]
    if len(set(ids)) != len(ids):
        raise SlotOverlapError(f"slot ids are not unique: {ids}")
    ordered = sorted(specs, key=lambda spec: spec.guest_phys_addr)
    for before, after in zip(ordered, ordered[1:]):
        if after.guest_phys_addr < before.end:
            raise SlotOverlapError(
                f"slot {after.slot} ({after.name}) at {after.guest_phys_addr:#x} overlaps slot "
                f"{before.slot} ({before.name}) {before.guest_phys_addr:#x}..{before.end:#x}")
