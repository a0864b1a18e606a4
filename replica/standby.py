"""Standby memory, the staging area of the epoch in flight, and the atomic commit.

The replica never writes a page of an epoch into standby memory before the
whole epoch arrived and its digest matched: pages are decoded into staging
(XOR pages against the committed content, which is the last version the
primary sent), the digest is computed over the decoded content in the order
the primary fed its own, and only a verified epoch is scattered into the
standby with one fancy assignment per slot. A torn epoch is dropped by
forgetting the staging cursor: nothing to undo.

Applying must not fault: every buffer the staging path writes is allocated
once and reused (the staging area, its keys, the XOR bases of a batch), and
grows only when an epoch or a batch needs more. A fresh mapping per batch
costs a page fault and a page clear for each 4 KiB written: at about 1,000
pages per epoch that was half of the replica's CPU time.
"""

from __future__ import annotations

import time

import numpy as np

from checkpointer.codec import DEFAULT_BATCH_PAGES, CodecError, EpochDigest, decode_batch
from ring import pages as pagekeys
from ring.guest import layout
from ring.vcpu_state import VcpuState, unpack_vcpu_states
from ring.memory import GuestMemory, SlotSpec, page_buffer


_VCPU_STATUS, _VCPU_OFFSET = layout.PARAMS_DTYPE.fields["vcpu"][:2]
_VCPU_STATUS_COUNT, _VCPU_STATUS_SIZE = _VCPU_STATUS.shape[0], _VCPU_STATUS.base.itemsize
_PROGRESS_OFFSET = _VCPU_OFFSET + _VCPU_STATUS.base.fields["progress"][1]


class StagingError(ValueError):
    """An epoch's content cannot be staged (bad keys, overflow, undecodable batch)."""


class Standby:
    """The replica's copy of the guest: committed memory and state, plus one staged epoch."""

    def __init__(self, slots: list[SlotSpec], initial_capacity: int = 4096) -> None:
        self.memory = GuestMemory(slots)
        self._slot_pages = {spec.slot: spec.pages for spec in slots}
        self._staging = page_buffer(initial_capacity)       # page-aligned: see page_buffer
        self._staging_keys = np.zeros(initial_capacity, dtype=np.uint64)
        self._bases = page_buffer(DEFAULT_BATCH_PAGES)      # a batch's XOR bases, reused batch after batch
        self.committed_epoch = 0
        self.vcpus: list[VcpuState] = []          # of the last consistent epoch
        self.device = b""
        self.consistent = False
        self._epoch: int | None = None
        self._cursor = 0
        self._digest: EpochDigest | None = None
        self._staged_vcpus: list[VcpuState] | None = None
        self._staged_vcpu_bytes = b""
        self._staged_device = b""
        self.last_apply_ns = 0

    @property
    def layout(self) -> list[SlotSpec]:
        return [slot.spec for slot in self.memory.slots.values()]

    # -- staging -----------------------------------------------------------------
    def open(self, epoch: int, pages: int) -> None:
        """Start staging `epoch` with room for `pages` pages (grows the staging area if needed)."""
        total = sum(self._slot_pages.values())
        if not 0 <= pages <= total:
            raise StagingError(f"epoch {epoch} announces {pages} pages, but the guest has {total}")
        if pages > len(self._staging):
            capacity = max(pages, 2 * len(self._staging))
            self._staging = page_buffer(capacity)
            self._staging_keys = np.zeros(capacity, dtype=np.uint64)
        self._epoch = epoch
        self._cursor = 0
        self._digest = EpochDigest()
        self._staged_vcpus = None
        self._staged_vcpu_bytes = b""
        self._staged_device = b""

    def _valid_keys(self, keys: np.ndarray) -> np.ndarray:
        return pagekeys.inside(keys, self._slot_pages)

    def _base(self, keys: np.ndarray) -> np.ndarray:
        """The committed content of `keys` (decode_batch's XOR bases), in the reused base buffer:
        valid until the next call (decode_batch uses it before it returns)."""
        if len(keys) > len(self._bases):
            self._bases = page_buffer(len(keys))
        out = self._bases[:len(keys)]
        for slot, start, end in pagekeys.by_slot(keys):
            offsets = pagekeys.offsets(keys[start:end]).astype(np.intp)
            np.take(self.memory.slots[slot].pages, offsets, axis=0, out=out[start:end])
        return out

    def stage_pages(self, payload) -> int:
        """Decode one PAGES batch into staging; returns its page count."""
        if self._epoch is None:
            raise StagingError("PAGES with no epoch open")
        room = len(self._staging) - self._cursor
        try:
            slots = tuple((slot, memory.pages, self._slot_pages[slot]) for slot, memory in self.memory.slots.items())
            keys, pages = decode_batch(payload, self._base, out=self._staging[self._cursor:],
                                       max_pages=room, valid_key=self._valid_keys, slots=slots)
        except CodecError as exc:
            raise StagingError(f"epoch {self._epoch}: {exc}") from exc
        count = len(keys)
        if self._cursor and count and keys[0] <= self._staging_keys[self._cursor - 1]:
            raise StagingError(f"epoch {self._epoch}: batches out of key order or overlapping")
        self._staging_keys[self._cursor:self._cursor + count] = keys
        self._digest.update_pages(keys, pages)
        self._cursor += count
        return count

    def stage_vcpus(self, payload, states: list[VcpuState] | None = None) -> list[VcpuState]:
        """Stage a VCPU_STATE payload; `states` if the caller already decoded it (no second parse)."""
        data = bytes(payload)
        self._staged_vcpus = unpack_vcpu_states(data) if states is None else list(states)
        self._staged_vcpu_bytes = data
        return self._staged_vcpus

    def stage_device(self, payload) -> None:
        self._staged_device = bytes(payload)

    def verify(self, digest: bytes) -> tuple[bool, str]:
        """Compare the staged content's digest with the primary's."""
        if self._digest is None:
            return False, "no epoch staged"
        self._digest.update_bytes(self._staged_vcpu_bytes)
        self._digest.update_bytes(self._staged_device)
        ours = self._digest.digest()
        if ours != bytes(digest):
            return False, f"digest mismatch: primary {bytes(digest).hex()}, replica {ours.hex()}"
        return True, ""

    def commit(self, consistent: bool) -> int:
        """Scatter the staged pages into standby memory; returns pages applied."""
        if self._epoch is None:
            raise StagingError("commit with no epoch staged")
        start = time.perf_counter_ns()
        keys = self._staging_keys[:self._cursor]
        for slot, a, b in pagekeys.by_slot(keys):
            offsets = pagekeys.offsets(keys[a:b]).astype(np.intp)
            self.memory.slots[slot].pages[offsets] = self._staging[a:b]
        if consistent:
            self.vcpus = self._staged_vcpus or []
            self.device = self._staged_device
        self.consistent = consistent
        self.committed_epoch = self._epoch
        applied = self._cursor
        self._epoch = None
        self._cursor = 0
        self.last_apply_ns = time.perf_counter_ns() - start
        return applied

    def discard(self) -> None:
        """Forget the staged epoch: standby memory was never touched."""
        self._epoch = None
        self._cursor = 0
        self._digest = None

    def progress(self) -> int:
        """The guest's progress counters (summed over vCPUs) as committed in standby memory."""
        # A strided view of the counters alone (a structured view of the whole block cost ten
        # times more, once per commit), made per call: a view kept would keep the mapping alive.
        params = self.memory.view(layout.PARAMS_GPA, layout.PARAMS_DTYPE.itemsize)
        counters = np.ndarray((_VCPU_STATUS_COUNT,), dtype="<u8", buffer=params, offset=_PROGRESS_OFFSET,
                              strides=(_VCPU_STATUS_SIZE,))
        return int(counters.sum())

    def digest_memory(self) -> bytes:
        """A digest of all standby memory (tests compare it with the primary's)."""
        return memory_digest(self.memory)

    def close(self) -> None:
        self.memory.close()


def memory_digest(memory: GuestMemory) -> bytes:
    """xxh3_128 over every slot's bytes, in slot order."""
    import xxhash
    digest = xxhash.xxh3_128()
    for slot in sorted(memory.slots):
        digest.update(memory.slots[slot].bytes)
    return digest.digest()
