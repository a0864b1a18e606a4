"""Unit tests of the harvest code on hand-made rings (no KVM needed)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ring import abi, pages as pagekeys
from ring.dirty import RESET_STALL_LIMIT, DirtyRing, DirtySet, HarvestError, RingTracker, set_bits, soft_limit
from ring.errors import PageKeyError

DIRTY, RESET = abi.KVM_DIRTY_GFN_F_DIRTY, abi.KVM_DIRTY_GFN_F_RESET


def _ring(entries: int = 256) -> tuple[np.ndarray, DirtyRing]:
    buffer = np.zeros(entries, dtype=abi.DIRTY_GFN_DTYPE)
    return buffer, DirtyRing(buffer, entries, vcpu_index=0)


def _publish(buffer: np.ndarray, start: int, pairs: list[tuple[int, int]]) -> None:
    for i, (slot, offset) in enumerate(pairs):
        entry = buffer[(start + i) % len(buffer)]
        entry["slot"], entry["offset"], entry["flags"] = slot, offset, DIRTY


def test_harvest_stops_at_first_entry_without_dirty() -> None:
    buffer, ring = _ring()
    _publish(buffer, 0, [(1, 5), (1, 6), (0, 2)])
    _publish(buffer, 4, [(1, 99)])              # a gap at 3: must not be reached
    slots, offsets = ring.harvest()
    assert offsets.tolist() == [5, 6, 2] and slots.tolist() == [1, 1, 0]
    assert buffer["flags"][:3].tolist() == [RESET] * 3
    assert buffer["flags"][4] == DIRTY and ring.fetch_index == 3


def test_harvest_wraps_around_the_ring() -> None:
    buffer, ring = _ring(256)
    ring.fetch_index = 250
    pairs = [(1, n) for n in range(20)]
    _publish(buffer, 250, pairs)
    slots, offsets = ring.harvest()
    assert offsets.tolist() == list(range(20))
    assert (buffer["flags"][250:] == RESET).all() and (buffer["flags"][:14] == RESET).all()
    assert ring.fetch_index == 270


def test_full_ring_harvests_every_entry_once() -> None:
    buffer, ring = _ring(256)
    ring.fetch_index = 1000
    _publish(buffer, 1000, [(1, n) for n in range(256)])
    _, offsets = ring.harvest()
    assert len(offsets) == 256 and len(set(offsets.tolist())) == 256


class _Resets:
    """A scripted KVM_RESET_DIRTY_RINGS: returns the given counts in turn; counts re-arms."""

    def __init__(self, *counts: int) -> None:
        self.counts = list(counts)
        self.calls = 0
        self.rearms = 0

    def reset(self) -> int:
        self.calls += 1
        return self.counts.pop(0) if self.counts else 0

    def rearm(self) -> None:
        self.rearms += 1


def test_a_short_reset_is_repeated_until_the_counts_add_up_then_the_slots_are_rearmed() -> None:
    buffer, ring = _ring()
    _publish(buffer, 0, [(1, n) for n in range(10)])
    resets = _Resets(3, 0, 0, 7)                  # a signal cut the walk twice before its first entry
    tracker = RingTracker([ring], reset=resets.reset, rearm=resets.rearm)
    dirty = tracker.collect()
    assert dirty.slot(1).tolist() == list(range(10)) and dirty.entries == 10
    assert resets.calls == 4 and resets.rearms == 1
    assert (tracker.resets_cut_short, tracker.rearms) == (1, 1)


def test_a_full_reset_in_one_call_does_not_rearm() -> None:
    buffer, ring = _ring()
    _publish(buffer, 0, [(1, 1), (1, 2)])
    resets = _Resets(2)
    tracker = RingTracker([ring], reset=resets.reset, rearm=resets.rearm)
    tracker.collect()
    assert (resets.calls, resets.rearms, tracker.resets_cut_short) == (1, 0, 0)


def test_an_interruption_with_a_complete_count_still_rearms() -> None:
    """A stop after the walk's last entry loses its last batch though the count is right."""
    buffer, ring = _ring()
    _publish(buffer, 0, [(1, 1), (1, 2)])
    stops = iter([4, 5])                          # the counter moved during the reset
    resets = _Resets(2)
    tracker = RingTracker([ring], reset=resets.reset, rearm=resets.rearm, interruptions=lambda: next(stops))
    tracker.collect()
    assert (resets.calls, resets.rearms, tracker.resets_cut_short) == (1, 1, 0)


def test_a_reset_of_more_than_was_harvested_is_an_error() -> None:
    buffer, ring = _ring()
    _publish(buffer, 0, [(1, 1), (1, 2)])
    with pytest.raises(HarvestError, match="KVM_RESET_DIRTY_RINGS reset 3 entries but 2 were harvested"):
        RingTracker([ring], reset=_Resets(1, 2).reset, rearm=lambda: None).collect()


def test_resets_that_make_no_progress_are_an_error_after_the_stall_limit() -> None:
    buffer, ring = _ring()
    _publish(buffer, 0, [(1, 1), (1, 2)])
    resets = _Resets(1)                           # then 0 for ever: KVM cannot see the other entry
    with pytest.raises(HarvestError, match=rf"KVM_RESET_DIRTY_RINGS reset 1 entries but 2 were harvested, "
                                           rf"and {RESET_STALL_LIMIT} calls in a row reset none"):
        RingTracker([ring], reset=resets.reset, rearm=resets.rearm).collect()
    assert resets.calls == 1 + RESET_STALL_LIMIT and resets.rearms == 0


def test_a_cut_short_reset_without_a_way_to_rearm_is_an_error() -> None:
    buffer, ring = _ring()
    _publish(buffer, 0, [(1, 1), (1, 2)])
    with pytest.raises(HarvestError, match="KVM_RESET_DIRTY_RINGS was cut short"):
        RingTracker([ring], reset=_Resets(1, 1).reset).collect()


def test_nothing_harvested_still_checks_the_reset() -> None:
    _, ring = _ring()
    with pytest.raises(HarvestError, match="reset 5 entries but 0 were harvested"):
        RingTracker([ring], reset=_Resets(5).reset).collect()


def test_tracker_deduplicates_and_records_last_entries() -> None:
    buffers = [_ring() for _ in range(2)]
    for index, (_, ring) in enumerate(buffers):
        ring.vcpu_index = index
    _publish(buffers[0][0], 0, [(1, 7), (0, 3), (1, 7), (1, 2)])
    _publish(buffers[1][0], 0, [(1, 2), (1, 9)])
    dirty = RingTracker([r for _, r in buffers], reset=lambda: 6).collect()
    assert dirty.entries == 6 and dirty.count == 4
    assert dirty.slot(1).tolist() == [2, 7, 9] and dirty.slot(0).tolist() == [3]
    assert dirty.last_entry == {0: (1, 2), 1: (1, 9)}


def test_soft_limit_is_size_minus_64() -> None:
    assert [soft_limit(n) for n in (256, 512, 1024, 4096)] == [192, 448, 960, 4032]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, (1 << 20) - 1), max_size=400), st.integers(1, 20000))
def test_set_bits_matches_a_naive_scan(pages: list[int], extra: int) -> None:
    total = (1 << 20) + extra
    bitmap = np.zeros((total + 63) // 64, dtype=np.uint64)
    for page in pages:
        bitmap[page // 64] |= np.uint64(1 << (page % 64))
    assert set_bits(bitmap).tolist() == sorted(set(pages))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, (1 << 36) - 1)), max_size=300))
def test_dirty_set_from_entries_matches_python_sets(pairs) -> None:
    slots = np.array([s for s, _ in pairs], dtype=np.uint32)
    offsets = np.array([o for _, o in pairs], dtype=np.uint64)
    dirty = DirtySet.from_entries(slots, offsets)
    expected: dict[int, set[int]] = {}
    for slot, offset in pairs:
        expected.setdefault(slot, set()).add(offset)
    assert {s: a.tolist() for s, a in dirty.pages.items()} == {s: sorted(o) for s, o in expected.items()}
    assert dirty.entries == len(pairs)


# --- page keys (ring.pages) against plain Python ------------------------------------------------

_pairs = st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(0, (1 << 40) - 1)), max_size=200)


@settings(max_examples=200, deadline=None)
@given(_pairs)
def test_page_keys_round_trip_and_sort_by_slot_then_offset(pairs) -> None:
    slots = np.array([s for s, _ in pairs], dtype=np.uint32)
    offsets = np.array([o for _, o in pairs], dtype=np.uint64)
    keys = pagekeys.make(slots, offsets)
    assert keys.dtype == np.uint64 and (keys < np.uint64(pagekeys.KEY_LIMIT)).all()
    back_slots, back_offsets = pagekeys.split(keys)
    assert back_slots.tolist() == slots.tolist() and back_offsets.tolist() == offsets.tolist()
    assert [divmod(int(k), 1 << 40) for k in np.sort(keys)] == sorted(pairs)


@settings(max_examples=200, deadline=None)
@given(_pairs)
def test_sorted_keys_split_by_slot_and_back_into_a_dirty_set(pairs) -> None:
    unique = sorted(set(pairs))
    keys = np.array([(s << 40) | o for s, o in unique], dtype=np.uint64)
    expected: dict[int, list[int]] = {}
    for s, o in unique:
        expected.setdefault(s, []).append(o)
    assert {s: pagekeys.offsets(keys[a:b]).tolist() for s, a, b in pagekeys.by_slot(keys)} == expected
    assert {s: o.tolist() for s, o in pagekeys.to_pages(keys).items()} == expected
    dirty = DirtySet.from_keys(keys)
    assert dirty.entries == len(keys) and np.array_equal(dirty.keys(), keys)
    assert np.array_equal(pagekeys.from_pages(dirty.pages), keys)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 300)), max_size=300))
def test_runs_are_the_maximal_consecutive_offsets_within_a_slot(pairs) -> None:
    unique = sorted(set(pairs))
    keys = np.array([(s << 40) | o for s, o in unique], dtype=np.uint64)
    naive: list[tuple[int, int]] = []                     # (first key, length)
    for s, o in unique:
        if naive and naive[-1][0] + naive[-1][1] == (s << 40) | o:
            naive[-1] = (naive[-1][0], naive[-1][1] + 1)
        else:
            naive.append(((s << 40) | o, 1))
    firsts, lengths = pagekeys.runs(keys)
    assert list(zip(firsts.tolist(), lengths.tolist())) == naive


def test_a_run_never_crosses_a_slot() -> None:
    last = (1 << 40) - 1
    keys = np.array([(1 << 40) | last, 2 << 40], dtype=np.uint64)    # numerically consecutive
    firsts, lengths = pagekeys.runs(keys)
    assert lengths.tolist() == [1, 1]


@pytest.mark.parametrize("slots, offsets, words", [
    ([1], [1 << 40], "page offset 0x10000000000 is beyond any slot"),
    ([1 << 16 | 3], [0], r"slot 3 in address space 1 \(SMM\) is not supported"),
    ([-1], [0], "slot -1 is negative"),
    ([0], [-5], "page offset -5 is negative"),
])
def test_page_keys_beyond_the_bounds_are_refused(slots, offsets, words) -> None:
    with pytest.raises(PageKeyError, match=words):
        pagekeys.make(np.array(slots), np.array(offsets))


def test_a_ring_entry_beyond_the_bounds_is_a_harvest_error() -> None:
    with pytest.raises(HarvestError, match="dirty log entry: slot 9 in address space 1"):
        DirtySet.from_entries(np.array([(1 << 16) | 9], dtype=np.uint32), np.array([4], dtype=np.uint64))


@pytest.mark.parametrize("keys, words", [
    (np.array([5, 3], dtype=np.uint64), "unsorted key 0x3 at index 1"),
    (np.array([3, 3], dtype=np.uint64), "duplicate key 0x3 at index 1"),
    (np.array([1 << 56], dtype=np.uint64), "key 0x100000000000000 at index 0 is not below 2\\*\\*56"),
    (np.array([1], dtype=np.int64), "must be uint64"),
])
def test_checked_keys_are_sorted_unique_and_below_2_to_the_56(keys, words) -> None:
    with pytest.raises(PageKeyError, match=words):
        pagekeys.check(keys)


def test_keys_inside_a_layout() -> None:
    keys = np.array([(0 << 40) | 63, (0 << 40) | 64, (1 << 40) | 5, (2 << 40) | 0], dtype=np.uint64)
    assert pagekeys.inside(keys, {0: 64, 1: 10}).tolist() == [True, False, True, False]
