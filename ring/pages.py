"""Page keys: one number per guest page, across slots, for sets of pages in numpy.

A page key is `(slot << 40) | offset`, the page's offset in pages from the start
of its memory slot. Sorted keys order pages by slot, then by offset, so one
sorted uint64 array names a set of pages of the whole guest: the dirty set of an
epoch, a batch on the wire, the staging of the replica. That array is the value
type; the functions here are its operations, and every module that needs keys
(the harvest, the snapshot, the codec's batches, the standby) uses them rather
than shifting and masking on its own.

The bounds, stated once and checked in `make`:

- offsets stay below 2**40 pages (4 EiB of 4 KiB pages per slot);
- slots stay below 2**16. KVM names a slot `(address space << 16) | slot`, and
  only address space 0 is used here (no SMM), so a slot of 2**16 or more is
  refused;
- so every key stays below 2**56, and values from 2**56 up are free for
  sentinels (the codec's cache uses 2**64 - 1 for an empty line).

Everything is vectorised: a function may loop once per slot, never per page.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from .errors import PageKeyError

OFFSET_BITS = 40
SLOT_BITS = 16
KEY_BITS = OFFSET_BITS + SLOT_BITS           # keys stay below 2**56
SLOT_SHIFT = OFFSET_BITS
OFFSET_MASK = (1 << OFFSET_BITS) - 1
SLOT_LIMIT = 1 << SLOT_BITS                  # slots 0 .. 2**16 - 1
KEY_LIMIT = 1 << KEY_BITS

_SHIFT = np.uint64(SLOT_SHIFT)
_MASK = np.uint64(OFFSET_MASK)

__all__ = ["OFFSET_BITS", "SLOT_BITS", "KEY_BITS", "SLOT_SHIFT", "OFFSET_MASK", "SLOT_LIMIT", "KEY_LIMIT",
           "PageKeyError", "make", "of_slot", "from_pages", "empty", "slots", "offsets", "split",
           "by_slot", "to_pages", "runs", "check", "inside"]


def empty() -> np.ndarray:
    """No pages."""
    return np.empty(0, dtype=np.uint64)


def make(slot_ids, page_offsets) -> np.ndarray:
    """Keys of (slot, offset) pairs, in the pairs' order; raises PageKeyError beyond the bounds."""
    page_offsets = page_offsets if isinstance(page_offsets, np.ndarray) else np.asarray(page_offsets)
    slot_ids = slot_ids if isinstance(slot_ids, np.ndarray) else np.asarray(slot_ids)
    if len(page_offsets):
        if page_offsets.dtype.kind == "i" and int(page_offsets.min()) < 0:
            raise PageKeyError(f"page offset {int(page_offsets.min())} is negative")
        if int(page_offsets.max()) > OFFSET_MASK:
            raise PageKeyError(f"page offset {int(page_offsets.max()):#x} is beyond any slot "
                               f"(offsets stay below 2**{OFFSET_BITS})")
    if len(slot_ids):
        if slot_ids.dtype.kind == "i" and int(slot_ids.min()) < 0:
            raise PageKeyError(f"slot {int(slot_ids.min())} is negative")
        top = int(slot_ids.max())
        if top >= SLOT_LIMIT:
            raise PageKeyError(f"slot {top & (SLOT_LIMIT - 1)} in address space {top >> SLOT_BITS} "
                               f"(SMM) is not supported: slots stay below 2**{SLOT_BITS}")
    keys = slot_ids.astype(np.uint64)
    keys <<= _SHIFT
    keys |= page_offsets.astype(np.uint64, copy=False)
    return keys


def of_slot(slot: int, page_offsets) -> np.ndarray:
    """Keys of pages of one slot (sorted if the offsets are)."""
    page_offsets = np.asarray(page_offsets)
    return make(np.full(len(page_offsets), slot, dtype=np.uint64), page_offsets)


def from_pages(pages: Mapping[int, np.ndarray]) -> np.ndarray:
    """Sorted keys of a slot -> sorted offsets mapping (a DirtySet's pages)."""
    parts = [of_slot(slot, page_offsets) for slot, page_offsets in sorted(pages.items()) if len(page_offsets)]
    if not parts:
        return empty()
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def slots(keys: np.ndarray) -> np.ndarray:
    """The slot of each key (uint64)."""
    return keys >> _SHIFT


def offsets(keys: np.ndarray) -> np.ndarray:
    """The page offset of each key in its slot (uint64)."""
    return keys & _MASK


def split(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(slots, offsets) of the keys, the inverse of make()."""
    return keys >> _SHIFT, keys & _MASK


def by_slot(keys: np.ndarray) -> list[tuple[int, int, int]]:
    """(slot, start, end) for each slot's run of sorted keys: keys[start:end] are in that slot."""
    if len(keys) == 0:
        return []
    key_slots = keys >> _SHIFT
    bounds = [0, *(np.flatnonzero(key_slots[1:] != key_slots[:-1]) + 1).tolist(), len(keys)]
    return [(int(key_slots[a]), a, b) for a, b in zip(bounds, bounds[1:])]


def to_pages(keys: np.ndarray) -> dict[int, np.ndarray]:
    """Sorted keys as slot -> sorted offsets (uint64), the DirtySet shape."""
    if len(keys) and keys[0] >> _SHIFT == keys[-1] >> _SHIFT:      # one slot: no split needed
        return {int(keys[0] >> _SHIFT): keys & _MASK}
    return {slot: keys[a:b] & _MASK for slot, a, b in by_slot(keys)}


def runs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous runs of sorted unique keys: (first key of each run, pages in it).

    A run is pages of one slot at consecutive offsets; it never crosses a slot.
    """
    if len(keys) == 0:
        return empty(), np.empty(0, dtype=np.int64)
    breaks = (np.diff(keys) != 1) | (np.diff(keys >> _SHIFT) != 0)
    starts = np.flatnonzero(np.concatenate(([True], breaks)))
    lengths = np.diff(np.append(starts, len(keys)))
    return keys[starts], lengths


def check(keys: np.ndarray, what: str = "page keys") -> np.ndarray:
    """`keys` as uint64 if they are sorted, unique and below 2**56; raises PageKeyError naming the first bad one."""
    keys = np.asarray(keys)
    if keys.dtype != np.uint64:
        raise PageKeyError(f"{what} must be uint64, not {keys.dtype}")
    if len(keys):
        if int(keys.max()) >= KEY_LIMIT:
            bad = int(np.flatnonzero(keys >= np.uint64(KEY_LIMIT))[0])
            raise PageKeyError(f"{what}: key {int(keys[bad]):#x} at index {bad} is not below 2**{KEY_BITS}")
        order = np.flatnonzero(keys[1:] <= keys[:-1])
        if len(order):
            bad = int(order[0]) + 1
            kind = "duplicate" if keys[bad] == keys[bad - 1] else "unsorted"
            raise PageKeyError(f"{what}: {kind} key {int(keys[bad]):#x} at index {bad}")
    return keys


def inside(keys: np.ndarray, slot_pages: Mapping[int, int]) -> np.ndarray:
    """A bool mask: which keys name a page that exists in a layout of slot -> pages."""
    key_slots, key_offsets = keys >> _SHIFT, keys & _MASK
    valid = np.zeros(len(keys), dtype=bool)
    for slot, pages in slot_pages.items():           # a loop per slot, not per page
        valid |= (key_slots == np.uint64(slot)) & (key_offsets < np.uint64(pages))
    return valid
