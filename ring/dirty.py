"""Dirty tracking: the per-vCPU dirty ring, the bitmap, and the one result type.

Some facts about the dirty ring (api.rst, virt/kvm/dirty_ring.c):

- Each vCPU has its own ring of `struct kvm_dirty_gfn {u32 flags; u32 slot;
  u64 offset}` entries, mapped from the vCPU fd. KVM pushes an entry (flags =
  DIRTY) the first time the vCPU writes a page after that page was last reset.
- Userspace harvests in order from its own free-running fetch index: while an
  entry has DIRTY, read slot and offset, then set flags to RESET. It must not
  skip: KVM's KVM_RESET_DIRTY_RINGS walks each ring from its reset index and
  stops at the first entry without RESET, zeroing flags and re-arming write
  protection for those pages. Its return value is the number of entries reset
  over all vCPUs; we check it against what we harvested.
- A page re-dirtied before its reset is not logged again, so a harvest is a
  set, but an instruction KVM emulates can log a page twice: deduplicate.
- When a ring holds `entries - 64` un-reset entries (soft full), the vCPU exits
  with KVM_EXIT_DIRTY_RING_FULL before its next guest instruction, and keeps
  exiting until entries are reset.

The harvest is native (ring/native/core.c, `ring._native.harvest`): one call
without the GIL walks every ring from its fetch index, marks the entries
RESET, merges the pages the VMM wrote and returns the sorted unique page keys;
Python keeps the reset's rules (RingTracker._reset_all) and the errors. The
numpy harvest (DirtyRing.harvest, DirtySet.from_entries) stays as the
reference the native one is tested against: the ring is a numpy structured
view, and the number of consecutive DIRTY entries is found by scanning
geometrically growing chunks, O(n) numpy work for n entries. The simulated
backend hands its own buffer to the same DirtyRing class, so both backends
share this code.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from . import abi, pages as pagekeys
import ring._native as native        # the native core (ring/native/core.c), built by setup.py
from .errors import ConfigError, HarvestError, KvmError, PageKeyError, RingSizeError

_DIRTY = np.uint32(abi.KVM_DIRTY_GFN_F_DIRTY)
_RESET = np.uint32(abi.KVM_DIRTY_GFN_F_RESET)


def validate_ring_entries(entries: int, max_bytes: int | None = None) -> int:
    """Check a ring size in entries: a power of two from 256 to 65536 (and within KVM's limit)."""
    if not isinstance(entries, (int, np.integer)) or isinstance(entries, bool):
        raise RingSizeError(f"dirty ring size must be an integer number of entries, got {entries!r}")
    entries = int(entries)
    if entries < abi.DIRTY_RING_MIN_ENTRIES or entries > abi.DIRTY_RING_MAX_ENTRIES:
        raise RingSizeError(f"dirty ring size {entries} entries is out of range: it must be between "
                            f"{abi.DIRTY_RING_MIN_ENTRIES} and {abi.DIRTY_RING_MAX_ENTRIES} entries")
    if entries & (entries - 1):
        raise RingSizeError(f"dirty ring size {entries} entries is not a power of two")
    if max_bytes is not None and entries * abi.DIRTY_GFN_DTYPE.itemsize > max_bytes:
        raise RingSizeError(f"dirty ring size {entries} entries ({entries * 16} bytes) exceeds this "
                            f"host's KVM limit of {max_bytes} bytes ({max_bytes // 16} entries)")
    return entries


def soft_limit(entries: int) -> int:
    """Entries a ring holds when its vCPU is made to exit with DIRTY_RING_FULL (no PML here)."""
    return entries - abi.DIRTY_RING_RESERVED_ENTRIES


class DirtySet:
    """Pages dirtied since the last harvest: per slot, sorted unique page offsets.

    It holds either the per-slot arrays (`pages`) or the sorted unique page keys
    (ring.pages) the native harvest returns, and makes the other on first use:
    the pause only needs the keys, so it never pays for the split.
    """

    __slots__ = ("_pages", "_keys", "entries", "last_entry")

    def __init__(self, pages: dict[int, np.ndarray] | None = None, entries: int = 0,
                 last_entry: dict[int, tuple[int, int]] | None = None, *,
                 keys: np.ndarray | None = None) -> None:
        self._pages = pages if pages is not None or keys is not None else {}
        self._keys = keys
        self.entries = entries                     # raw entries harvested (before dedup)
        self.last_entry = last_entry if last_entry is not None else {}   # vCPU -> (slot, offset)

    @property
    def pages(self) -> dict[int, np.ndarray]:
        if self._pages is None:
            self._pages = pagekeys.to_pages(self._keys) if len(self._keys) else {}
        return self._pages

    @pages.setter
    def pages(self, pages: dict[int, np.ndarray]) -> None:
        self._pages, self._keys = pages, None

    def __repr__(self) -> str:
        return f"DirtySet(count={self.count}, entries={self.entries}, slots={sorted(self.pages)})"

    @property
    def count(self) -> int:
        if self._keys is not None:
            return len(self._keys)
        return int(sum(len(offsets) for offsets in self._pages.values()))

    def slot(self, slot: int) -> np.ndarray:
        return self.pages.get(slot, np.empty(0, dtype=np.uint64))

    def merged(self, other: "DirtySet") -> "DirtySet":
        """The union of two dirty sets (per slot, sorted unique); entries and last entries kept."""
        if self._keys is not None or other._keys is not None:
            if not other.count:
                return DirtySet(entries=self.entries, last_entry=self.last_entry, keys=self.keys())
            keys = np.frombuffer(native.sort_unique(np.concatenate((self.keys(), other.keys()))),
                                 dtype=np.uint64)
            return DirtySet(entries=self.entries, last_entry=self.last_entry, keys=keys)
        pages = dict(self.pages)
        for slot, offsets in other.pages.items():
            pages[slot] = np.union1d(pages[slot], offsets) if slot in pages else offsets
        return DirtySet(pages=pages, entries=self.entries, last_entry=self.last_entry)

    def same_pages(self, other: "DirtySet") -> bool:
        keys = {s for s, o in self.pages.items() if len(o)} | {s for s, o in other.pages.items() if len(o)}
        return all(np.array_equal(self.slot(s), other.slot(s)) for s in keys)

    def keys(self) -> np.ndarray:
        """The pages as sorted page keys (ring.pages)."""
        if self._keys is None:
            self._keys = pagekeys.from_pages(self._pages)
        return self._keys

    @classmethod
    def from_keys(cls, keys: np.ndarray) -> "DirtySet":
        """The dirty set of sorted unique page keys (ring.pages); entries = len(keys)."""
        return cls(entries=len(keys), keys=np.asarray(keys, dtype=np.uint64))

    @classmethod
    def from_entries(cls, slots: np.ndarray, offsets: np.ndarray, entries: int | None = None,
                     last_entry: dict[int, tuple[int, int]] | None = None) -> "DirtySet":
        """Deduplicate (slot, offset) pairs into per-slot sorted arrays, vectorised (the reference
        for the native harvest).

        Sort plus a neighbour compare: np.unique costs several times more here.
        """
        count = len(offsets)
        pages: dict[int, np.ndarray] = {}
        if count:
            try:
                keys = pagekeys.make(slots, offsets)
            except PageKeyError as exc:
                raise HarvestError(f"dirty log entry: {exc}") from exc
            keys.sort()
            keep = np.empty(count, dtype=bool)
            keep[0] = True
            np.not_equal(keys[1:], keys[:-1], out=keep[1:])
            pages = pagekeys.to_pages(keys[keep])
        return cls(pages=pages, entries=count if entries is None else entries,
                   last_entry=last_entry or {})


def merge_vmm_ranges(dirty: DirtySet, ranges: Sequence[tuple[int, int, int]]) -> DirtySet:
    """`dirty` plus the pages of (slot, first page, end page) ranges, in numpy (the reference)."""
    slots = np.concatenate([np.full(end - first, slot, dtype=np.uint32) for slot, first, end in ranges])
    offsets = np.concatenate([np.arange(first, end, dtype=np.uint64) for _, first, end in ranges])
    return dirty.merged(DirtySet.from_entries(slots, offsets))


def vmm_keys(ranges: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """Sorted unique page keys of (slot, first page, end page) ranges, in one native call."""
    keys, _, _, _ = native.harvest((), (), abi.DIRTY_RING_MIN_ENTRIES, ranges)
    return np.frombuffer(keys, dtype=np.uint64)


class DirtyRing:
    """One vCPU's ring over a buffer (the KVM mmap, or the simulator's array)."""

    def __init__(self, buffer, entries: int, vcpu_index: int) -> None:
        self.entries = validate_ring_entries(entries)
        self.vcpu_index = vcpu_index
        self.buffer = buffer                       # what the native harvest walks
        self.ring = np.frombuffer(buffer, dtype=abi.DIRTY_GFN_DTYPE, count=entries)
        # Plain strided views of the three fields: much cheaper to slice than the records.
        words = np.frombuffer(buffer, dtype=np.uint32, count=entries * 4).reshape(entries, 4)
        self.flags = words[:, 0]
        self.slots = words[:, 1]
        self.offsets = np.frombuffer(buffer, dtype=np.uint64, count=entries * 2).reshape(entries, 2)[:, 1]
        self.fetch_index = 0                       # free-running, like KVM's indices

    def _count_dirty(self, start: int) -> int:
        """Consecutive DIRTY entries from `start`, scanning growing chunks (O(result))."""
        total, position, chunk = 0, start, 256
        while total < self.entries:
            stop = min(position + chunk, self.entries, position + self.entries - total)
            dirty = self.flags[position:stop] & _DIRTY
            first_clean = int(dirty.argmin())
            if not dirty[first_clean]:
                return total + first_clean
            total += stop - position
            position = stop % self.entries
            chunk *= 4
        return total

    def harvest(self) -> tuple[np.ndarray, np.ndarray]:
        """Collect the entries KVM published since the last harvest and mark them RESET."""
        start = self.fetch_index % self.entries
        count = self._count_dirty(start)
        if count == 0:
            return np.empty(0, dtype=np.uint32), np.empty(0, dtype=np.uint64)
        end = start + count
        if end <= self.entries:
            slots, offsets = self.slots[start:end].copy(), self.offsets[start:end].copy()
            self.flags[start:end] = _RESET
        else:                                          # wrapped around the end of the ring
            end -= self.entries
            slots = np.concatenate((self.slots[start:], self.slots[:end]))
            offsets = np.concatenate((self.offsets[start:], self.offsets[:end]))
            self.flags[start:] = _RESET
            self.flags[:end] = _RESET
        self.fetch_index += count
        return slots, offsets

    def pending(self) -> int:
        """How many published entries wait to be harvested (a cheap peek, for fill triggers)."""
        return self._count_dirty(self.fetch_index % self.entries)


#: Resets in a row that may reset nothing while harvested entries remain: each is a call
#: that a stop interrupted before its first entry. More than this and the ring and the
#: harvester disagree (entries marked RESET that KVM cannot see, or the other way round).
RESET_STALL_LIMIT = 64


class RingTracker:
    """All rings of a VM plus the VM-wide reset: the harvest order, written once.

    `collect()` must only run with every vCPU out of KVM_RUN (the machine's
    pause barrier guarantees it). It harvests every ring in order, marks the
    entries RESET, calls the reset until the entries reset add up to those
    harvested, re-arms the slots if a reset was (or may have been) cut short,
    and deduplicates.

    `reset()` is KVM_RESET_DIRTY_RINGS (it returns the entries reset);
    `rearm()` write-protects every tracked slot again; `interruptions()` is a
    counter that goes up when something may have cut a reset short without
    showing in its count (a stop, see ring/kvm.py).
    """

    def __init__(self, rings: Sequence[DirtyRing], reset: Callable[[], int],
                 rearm: Callable[[], None] | None = None,
                 interruptions: Callable[[], int] = lambda: 0) -> None:
        self.rings = list(rings)
        self._reset = reset
        self._rearm = rearm
        self._interruptions = interruptions
        self.resets_cut_short = 0          # collects whose first reset came back short
        self.rearms = 0                    # collects that re-armed the slots afterwards

    def collect(self, vmm_ranges: Sequence[tuple[int, int, int]] = ()) -> DirtySet:
        """Harvest every ring, reset, and return the dirty set with the pages of `vmm_ranges`
        ((slot, first page, end page), written by the VMM) merged in: one native call for
        the walk, the RESET marks, the merge and the dedup."""
        rings = self.rings
        if not rings:
            return DirtySet(keys=vmm_keys(vmm_ranges)) if vmm_ranges else DirtySet()
        entries = rings[0].entries
        if any(ring.entries != entries for ring in rings):
            return self.collect_reference(vmm_ranges)
        keys, counts, last, bad = native.harvest([ring.buffer for ring in rings],
                                                  [ring.fetch_index for ring in rings], entries, vmm_ranges)
        return self.finish(keys, counts, last, bad)

    def finish(self, keys: bytes | bytearray, counts: Sequence[int], last: Sequence, bad,
               first_reset: tuple[int, bool] | None = None) -> DirtySet:
        """The policy after a native walk (native.harvest, or native.checkpoint, which also made the
        first reset: `first_reset` is (its count or -errno, whether the thread switched during it)):
        advance the fetch indices, reset the rest, re-arm if needed, refuse bad entries."""
        rings = self.rings
        for ring, count in zip(rings, counts):
            ring.fetch_index += count
        harvested = sum(counts)
        self._reset_all(harvested, first_reset)
        if bad is not None:
            _, slot, offset = bad
            try:
                pagekeys.make(np.array([slot], dtype=np.uint64), np.array([offset], dtype=np.uint64))
            except PageKeyError as exc:
                raise HarvestError(f"dirty log entry: {exc}") from exc
        last_entry = {ring.vcpu_index: entry for ring, entry in zip(rings, last) if entry is not None}
        return DirtySet(entries=harvested, last_entry=last_entry, keys=np.frombuffer(keys, dtype=np.uint64))

    def collect_reference(self, vmm_ranges: Sequence[tuple[int, int, int]] = ()) -> DirtySet:
        """collect() in numpy (the reference the native harvest is tested against)."""
        slots, offsets, last = [], [], {}
        for ring in self.rings:
            ring_slots, ring_offsets = ring.harvest()
            if len(ring_offsets):
                slots.append(ring_slots)
                offsets.append(ring_offsets)
                last[ring.vcpu_index] = (int(ring_slots[-1]), int(ring_offsets[-1]))
        harvested = int(sum(len(o) for o in offsets))
        self._reset_all(harvested)
        if not offsets:
            dirty = DirtySet()
        elif len(offsets) == 1:
            dirty = DirtySet.from_entries(slots[0], offsets[0], harvested, last)
        else:
            dirty = DirtySet.from_entries(np.concatenate(slots), np.concatenate(offsets), harvested, last)
        return merge_vmm_ranges(dirty, vmm_ranges) if vmm_ranges else dirty

    def _reset_all(self, harvested: int, first_reset: tuple[int, bool] | None = None) -> None:
        """Reset until `harvested` entries are reset; re-arm if a walk was cut short. `first_reset`:
        the first call was already made (its count or -errno, and whether it may have been stopped)."""
        interruptions = self._interruptions()
        total, calls, stalled = 0, 0, 0
        while True:
            if first_reset is not None and calls == 0:
                reset = first_reset[0]
                if reset < 0:
                    raise KvmError("KVM_RESET_DIRTY_RINGS", -reset)
            else:
                reset = self._reset()
            calls += 1
            if reset < 0 or total + reset > harvested:
                raise HarvestError(f"KVM_RESET_DIRTY_RINGS reset {total + reset} entries but {harvested} "
                                   f"were harvested: the ring and the harvester disagree")
            total += reset
            if total == harvested:
                break
            stalled = stalled + 1 if reset == 0 else 0
            if stalled >= RESET_STALL_LIMIT:
                raise HarvestError(f"KVM_RESET_DIRTY_RINGS reset {total} entries but {harvested} were "
                                   f"harvested, and {stalled} calls in a row reset none of the rest: "
                                   f"the ring and the harvester disagree")
        if calls > 1:
            self.resets_cut_short += 1
        stopped_first = first_reset is not None and first_reset[1]
        if calls > 1 or stopped_first or self._interruptions() != interruptions:
            if self._rearm is None:
                raise HarvestError(f"KVM_RESET_DIRTY_RINGS was cut short ({calls} calls for {harvested} "
                                   f"entries) and this tracker cannot write-protect its slots again: "
                                   f"pages may go unlogged")
            self._rearm()
            self.rearms += 1

    def fill(self) -> int:
        """Entries waiting over all rings (for a VM-wide page-count trigger)."""
        return sum(ring.pending() for ring in self.rings)


class BitmapTracker:
    """KVM_GET_DIRTY_LOG per slot into preallocated bitmaps, same result type as the ring.

    In the classic mode KVM_GET_DIRTY_LOG also clears and write-protects; with
    `manual_protect` (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) the get does not
    re-arm, and KVM_CLEAR_DIRTY_LOG re-arms only the pages found dirty.
    """

    def __init__(self, slots: dict[int, int], get_dirty_log: Callable[[int, int], None],
                 clear_dirty_log: Callable[[int, int, int, int], None] | None = None) -> None:
        self._get = get_dirty_log
        self._clear = clear_dirty_log
        self.bitmaps: dict[int, np.ndarray] = {}
        self.pages: dict[int, int] = dict(slots)
        for slot, pages in slots.items():
            words = (pages + 63) // 64
            if words == 0:
                raise ConfigError(f"slot {slot} has no pages to track")
            self.bitmaps[slot] = np.zeros(words, dtype=np.uint64)

    def collect(self) -> DirtySet:
        result: dict[int, np.ndarray] = {}
        for slot, bitmap in self.bitmaps.items():
            self._get(slot, bitmap.ctypes.data)
            offsets = set_bits(bitmap)
            if self._clear is not None and len(offsets):
                self._clear(slot, 0, self.pages[slot], bitmap.ctypes.data)
            if len(offsets):
                result[slot] = offsets
        return DirtySet(pages=result, entries=int(sum(len(o) for o in result.values())))


def set_bits(bitmap: np.ndarray) -> np.ndarray:
    """Indices of the set bits of a little-endian uint64 bitmap, sorted, as uint64."""
    words = np.flatnonzero(bitmap)
    if len(words) == 0:
        return np.empty(0, dtype=np.uint64)
    bits = np.unpackbits(bitmap[words].view(np.uint8), bitorder="little").reshape(-1, 64)
    rows, columns = np.nonzero(bits)
    return (words[rows].astype(np.uint64) << np.uint64(6)) | columns.astype(np.uint64)
