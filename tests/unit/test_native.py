"""The native core (ring._native) gives what the numpy reference gives, on random rings and pages.

The reference is the numpy code the native calls replaced, kept beside them: DirtyRing.harvest
plus DirtySet.from_entries plus merge_vmm_ranges (RingTracker.collect_reference), and
snapshot.gather_reference. Rings are plain buffers in the kernel's layout, so wrap-around, a full
ring, duplicates, several vCPUs and VMM-written ranges are all drawn at random.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import ring._native as native
from checkpointer.snapshot import gather, gather_reference
from ring import abi, pages as pagekeys
from ring.dirty import DirtyRing, DirtySet, RingTracker, vmm_keys
from ring.errors import HarvestError

DIRTY, RESET = abi.KVM_DIRTY_GFN_F_DIRTY, abi.KVM_DIRTY_GFN_F_RESET


def _kernel_reset(buffers):
    """KVM_RESET_DIRTY_RINGS over plain buffers: zero every RESET entry, return how many."""
    def reset() -> int:
        total = 0
        for buffer in buffers:
            flags = buffer.view(np.uint32).reshape(-1, 4)[:, 0]
            marked = flags == RESET
            total += int(marked.sum())
            flags[marked] = 0
        return total
    return reset


@st.composite
def ring_states(draw):
    """Rings of one size: each with a fetch index and a run of DIRTY entries from it, maybe wrapping."""
    entries = draw(st.sampled_from([256, 512, 1024]))
    vcpus = draw(st.integers(1, 4))
    slots = draw(st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True))
    rings = []
    for _ in range(vcpus):
        fetch = draw(st.integers(0, 10 * entries))
        count = draw(st.one_of(st.integers(0, 40), st.integers(0, entries), st.just(entries)))
        seed = draw(st.integers(0, 2**32 - 1))
        rings.append((fetch, count, seed))
    ranges = draw(st.lists(st.tuples(st.sampled_from(slots), st.integers(0, 300), st.integers(0, 40)),
                           max_size=20))
    ranges = [(slot, first, first + length) for slot, first, length in ranges]
    return entries, slots, rings, ranges


def _buffers(entries, slots, rings):
    buffers = []
    for fetch, count, seed in rings:
        rng = np.random.default_rng(seed)
        records = np.zeros(entries, dtype=abi.DIRTY_GFN_DTYPE)
        start = fetch % entries
        positions = (start + np.arange(count)) % entries
        records["flags"][positions] = DIRTY
        records["slot"][positions] = rng.choice(slots, count)
        records["offset"][positions] = rng.integers(0, 200, count)   # small: duplicates are common
        # what lies past the run is not DIRTY (KVM's reset zeroed it, or it was never written)
        buffers.append(records.view(np.uint8).copy())
    return buffers


def _tracker(entries, rings, buffers):
    dirty_rings = []
    for index, ((fetch, _, _), buffer) in enumerate(zip(rings, buffers)):
        ring = DirtyRing(buffer, entries, index)
        ring.fetch_index = fetch
        dirty_rings.append(ring)
    return RingTracker(dirty_rings, _kernel_reset(buffers))


@settings(max_examples=150, deadline=None)
@given(ring_states())
def test_native_harvest_equals_the_numpy_reference(state) -> None:
    entries, slots, rings, ranges = state
    native_buffers, reference_buffers = _buffers(entries, slots, rings), _buffers(entries, slots, rings)
    mine = _tracker(entries, rings, native_buffers)
    theirs = _tracker(entries, rings, reference_buffers)
    got = mine.collect(ranges)
    want = theirs.collect_reference(ranges)
    assert np.array_equal(got.keys(), want.keys())
    assert got.keys().dtype == np.uint64
    assert got.entries == want.entries == sum(count for _, count, _ in rings)
    assert got.last_entry == want.last_entry
    assert got.count == want.count
    assert set(got.pages) == {s for s, o in want.pages.items() if len(o)}
    assert got.same_pages(want)
    assert [r.fetch_index for r in mine.rings] == [r.fetch_index for r in theirs.rings]
    for a, b in zip(native_buffers, reference_buffers):      # the same RESET marks, then the same reset
        assert np.array_equal(a, b)
    assert mine.collect().count == 0                         # nothing left: every entry was taken


def test_a_full_ring_that_wraps_is_harvested_whole() -> None:
    entries = 256
    rings = [(entries * 3 + 200, entries, 7)]
    buffers = _buffers(entries, [1], rings)
    tracker = _tracker(entries, rings, buffers)
    dirty = tracker.collect()
    assert dirty.entries == entries and tracker.rings[0].fetch_index == entries * 4 + 200
    flags = buffers[0].view(np.uint32).reshape(-1, 4)[:, 0]
    assert (flags == 0).all()                                # reset by the fake kernel after the marks


@pytest.mark.parametrize("slot, offset, message", [
    (1 << 16, 5, "SMM"), (2, 1 << 40, "beyond any slot")])
def test_an_entry_beyond_the_key_bounds_is_refused_like_the_reference(slot, offset, message) -> None:
    def rings_with_bad_entry():
        records = np.zeros(256, dtype=abi.DIRTY_GFN_DTYPE)
        records["flags"][:3] = DIRTY
        records["slot"][:3] = [1, slot, 1]
        records["offset"][:3] = [4, offset, 9]
        buffer = records.view(np.uint8).copy()
        return buffer, RingTracker([DirtyRing(buffer, 256, 0)], _kernel_reset([buffer]))
    for collect in ("collect", "collect_reference"):
        buffer, tracker = rings_with_bad_entry()
        with pytest.raises(HarvestError, match=message):
            getattr(tracker, collect)()
        assert tracker.rings[0].fetch_index == 3             # taken, marked and reset all the same
        assert (buffer.view(np.uint32).reshape(-1, 4)[:3, 0] == 0).all()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, pagekeys.KEY_LIMIT - 1), max_size=600), st.integers(0, 3))
def test_sort_unique_equals_np_unique(values, repeat) -> None:
    keys = np.array(values * (repeat + 1), dtype=np.uint64)
    got = np.frombuffer(native.sort_unique(keys), dtype=np.uint64)
    assert np.array_equal(got, np.unique(keys))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 500), st.integers(0, 600)), max_size=30))
def test_vmm_keys_are_the_ranges_pages(ranges) -> None:
    want = np.unique(np.array([pagekeys.make([slot], [page])[0] for slot, first, end in ranges
                               for page in range(first, end)], dtype=np.uint64))
    assert np.array_equal(vmm_keys(ranges), want)


def test_keyed_and_per_slot_dirty_sets_merge_alike() -> None:
    a = DirtySet.from_entries(np.array([1, 1, 3], dtype=np.uint32), np.array([5, 2, 9], dtype=np.uint64), 3)
    b = DirtySet.from_entries(np.array([1, 2], dtype=np.uint32), np.array([5, 7], dtype=np.uint64), 2)
    keyed = DirtySet(entries=3, keys=a.keys()).merged(DirtySet(keys=b.keys()))
    assert np.array_equal(keyed.keys(), a.merged(b).keys()) and keyed.entries == 3
    assert keyed.same_pages(a.merged(b))


def _memory(slot_pages: dict[int, int], seed: int):
    rng = np.random.default_rng(seed)
    slots = {slot: SimpleNamespace(pages=rng.integers(0, 256, (pages, 4096), dtype=np.uint8))
             for slot, pages in slot_pages.items()}
    return SimpleNamespace(memory=SimpleNamespace(slots=slots))


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.integers(0, 4), st.integers(1, 40), min_size=1, max_size=3), st.integers(0, 2**32 - 1),
       st.data())
def test_native_gather_equals_np_take(slot_pages, seed, data) -> None:
    machine = _memory(slot_pages, seed)
    all_keys = np.concatenate([pagekeys.of_slot(slot, np.arange(pages)) for slot, pages in slot_pages.items()])
    chosen = data.draw(st.lists(st.sampled_from(all_keys.tolist()), unique=True, max_size=len(all_keys)))
    keys = np.sort(np.array(chosen, dtype=np.uint64))
    out_native = np.zeros((len(keys) + 3, 4096), dtype=np.uint8)
    out_reference = np.zeros_like(out_native)
    got = gather(machine, keys, out_native)
    want = gather_reference(machine, keys, out_reference)
    assert got.shape == want.shape == (len(keys), 4096)
    assert np.array_equal(out_native, out_reference)


def test_gather_refuses_what_it_cannot_copy() -> None:
    machine = _memory({1: 4}, 0)
    out = np.zeros((4, 4096), dtype=np.uint8)
    with pytest.raises(IndexError, match="beyond its slot"):
        gather(machine, pagekeys.of_slot(1, [2, 4]), out)
    with pytest.raises(KeyError, match="slot 2"):
        gather(machine, pagekeys.of_slot(2, [0]), out)
    with pytest.raises(ValueError, match="pages need"):
        gather(machine, pagekeys.of_slot(1, [0, 1, 2]), out[:2])
