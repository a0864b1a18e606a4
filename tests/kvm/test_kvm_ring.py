"""Real KVM: the kernel selftest's oracle, ring vs bitmap, and state round trips."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ring import KvmMachine, LimitReached, MachineConfig, RingSoftFull, RingTracker, Workload
from ring.guest import layout


pytestmark = pytest.mark.kvm


def _oracle_run(vcpus: int, iterations: int, ring_entries: int, data_pages: int, seed: int,
                rearm_every_harvest: bool = False) -> int:
    """Run the selftest oracle; return how many iterations ended with a full ring.

    Progress is read and limits are set only while the machine is paused, so an iteration's
    items are exactly those between two pauses: a vCPU that stopped at a full ring below its
    limit goes on as soon as it is resumed, and its items belong to the new iteration however
    late this thread gets to run. With rearm_every_harvest the tracker re-arms the slots
    (ring.kvm's answer to a reset that may have been cut short) after every reset: the oracle
    must then hold exactly as well.
    """
    rng = np.random.default_rng(seed)
    config = MachineConfig(vcpus=vcpus, data_bytes=data_pages * 4096, ring_entries=ring_entries)
    workload = Workload("oracle", seed=seed)
    full_iterations = 0
    with KvmMachine(config, workload) as vm:
        if rearm_every_harvest:
            calls = itertools.count()
            vm.tracker = RingTracker(vm.tracker.rings, vm.vm.reset_dirty_rings, rearm=vm.rearm_dirty_logging,
                                     interruptions=lambda: next(calls))
        resolved = vm.resolved
        words = vm.data.words.reshape(data_pages, 512)
        vm.set_iteration(1)
        vm.set_limits(0)
        vm.start()
        vm.pause()
        vm.drain_events()
        # Per vCPU, the pages reported since its progress last moved: the data store of the item
        # it stands at may have retired in any of those iterations (see counted_late below).
        reported_since: list[set[int]] = [set() for _ in range(vcpus)]
        for iteration in range(1, iterations + 1):
            before = vm.progress_all()                      # paused: nothing runs until resume()
            budget = int(rng.integers(20, 3 * ring_entries))
            for v in range(vcpus):
                vm.set_limit(v, before[v] + budget)
            vm.resume()
            at_limit, ring_full = set(), False
            while not ring_full and len(at_limit) < vcpus:
                event = vm.wait_for(lambda e: True, timeout=30)
                ring_full |= isinstance(event, RingSoftFull)
                if isinstance(event, LimitReached) and event.progress >= before[event.vcpu] + budget:
                    at_limit.add(event.vcpu)
                assert type(event).__name__ != "Fault", event
            vm.pause()
            vm.drain_events()
            full_iterations += ring_full
            dirty = vm.harvest()
            after = vm.progress_all()
            reported = set(dirty.slot(layout.DATA_SLOT).tolist())
            last = {offset for (slot, offset) in dirty.last_entry.values() if slot == layout.DATA_SLOT}

            # Every page the guest wrote this iteration is reported; nothing else is, except
            # the page of the store in flight when the vCPU stopped (logged, not yet retired).
            # A vCPU may also stop between an item's data store and its progress store (say, while
            # that store faults on the re-protected status page): the data page was reported then,
            # and the item is counted in the next iteration in which the vCPU runs (not always the
            # next one: on a loaded machine a vCPU thread can miss a whole iteration).
            written, in_flight, counted_late = set(), set(), set()
            for v in range(vcpus):
                items = np.arange(before[v], after[v], dtype=np.uint64)
                written |= set(resolved.pages(v, items).tolist())
                in_flight |= set(resolved.pages(v, np.array([after[v]], dtype=np.uint64)).tolist())
                if after[v] > before[v]:
                    first = int(resolved.pages(v, np.array([before[v]], dtype=np.uint64))[0])
                    if first in reported_since[v]:
                        counted_late.add(first)
            missing = written - reported - counted_late
            assert not missing, f"iteration {iteration}: written but not reported: {sorted(missing)[:10]}"
            extra = reported - written - in_flight
            assert not extra, f"iteration {iteration}: reported but not written: {sorted(extra)[:10]}"

            newest = words[:, :vcpus].max(axis=1)
            dirty_mask = np.zeros(data_pages, dtype=bool)
            dirty_mask[list(reported)] = True
            # Every page reported dirty holds the current iteration, except the last one each
            # vCPU logged: its store faulted, was logged, and retires after the resume (the
            # guest copies the iteration with one movsq, so that store then re-reads it).
            stale = np.flatnonzero(dirty_mask & (newest != iteration))
            allowed = last
            assert set(stale.tolist()) <= allowed, (
                f"iteration {iteration}: dirty pages without the current iteration: "
                f"{sorted(set(stale.tolist()) - allowed)[:10]}")
            # ...and every other page an older one.
            leaked = np.flatnonzero(~dirty_mask & (newest >= iteration))
            assert len(leaked) == 0, f"iteration {iteration}: clean pages hold {iteration}: {leaked[:10]}"

            for v in range(vcpus):
                reported_since[v] = set(reported) if after[v] > before[v] else reported_since[v] | reported
            vm.set_iteration(iteration + 1)
        if rearm_every_harvest:
            assert vm.tracker.rearms == iterations, vm.tracker.rearms
    return full_iterations


@pytest.mark.parametrize("vcpus", [1, 2])
def test_selftest_oracle_with_ring_full_exits(vcpus: int) -> None:
    full = _oracle_run(vcpus=vcpus, iterations=200, ring_entries=256, data_pages=2048, seed=11 + vcpus)
    assert full >= 10, f"only {full} iterations ended with a full ring: the test did not exercise it"


def test_selftest_oracle_with_a_rearm_after_every_reset() -> None:
    """Re-arming the slots (KVM_MEM_LOG_DIRTY_PAGES off and on) reports no page that was not written."""
    full = _oracle_run(vcpus=2, iterations=100, ring_entries=256, data_pages=2048, seed=17,
                       rearm_every_harvest=True)
    assert full >= 5, f"only {full} iterations ended with a full ring: the test did not exercise it"


def written_pages(vm: KvmMachine, start: list[int]) -> set[int]:
    pages: set[int] = set()
    for v, first in enumerate(start):
        items = np.arange(first, vm.progress(v), dtype=np.uint64)
        pages |= set(vm.resolved.pages(v, items).tolist())
    return pages


@pytest.mark.parametrize("name", ["uniform", "hotcold", "sequential"])
@pytest.mark.parametrize("manual_clear", [False, True])
def test_ring_and_bitmap_report_the_same_pages(name: str, manual_clear: bool) -> None:
    workload = Workload(name, seed=99, stride=3)
    results = {}
    for dirty_log in ("ring", "bitmap"):
        config = MachineConfig(vcpus=2, data_bytes=32 << 20, dirty_log=dirty_log, ring_entries=4096,
                               bitmap_manual_clear=manual_clear and dirty_log == "bitmap")
        with KvmMachine(config, workload) as vm:
            vm.run_to_limit(500)                # starts the vCPUs once their limit is set
            vm.harvest()                        # start clean: the loader's and first pages
            vm.run_to_limit(1500)
            dirty = vm.harvest()
            assert set(dirty.slot(layout.DATA_SLOT).tolist()) == written_pages(vm, [500, 500])
            results[dirty_log] = dirty
    ring, bitmap = results["ring"], results["bitmap"]
    assert ring.count > 500
    assert np.array_equal(ring.slot(layout.DATA_SLOT), bitmap.slot(layout.DATA_SLOT))
    assert np.array_equal(ring.slot(layout.LOW_SLOT), bitmap.slot(layout.LOW_SLOT))


def test_state_round_trip_continues_identically() -> None:
    config = MachineConfig(vcpus=2, data_bytes=8 << 20, ring_entries=4096)
    workload = Workload("uniform", seed=2024, report_every=0)
    with KvmMachine(config, workload) as original:
        original.start()
        original.run_to_limit(3000, harvest_when_full=True)
        state = original.capture()
        with KvmMachine(config, workload, load=False) as copy:
            copy.restore(state)
            copy.start()
            copy.run_to_limit(7000, harvest_when_full=True)
            original.run_to_limit(7000, harvest_when_full=True)
            assert original.progress_all() == copy.progress_all() == [7000, 7000]
            for slot in original.memory.slots:
                a, b = original.memory.slots[slot].pages, copy.memory.slots[slot].pages
                differ = np.flatnonzero((a != b).any(axis=1))
                assert len(differ) == 0, f"slot {slot}: pages {differ[:10]} differ after the round trip"
            for mine, theirs in zip(original.capture_vcpus(), copy.capture_vcpus()):
                assert mine.regs == theirs.regs
                assert mine.sregs == theirs.sregs
                assert mine.xsave == theirs.xsave
            # and the data region really changed after the restore point
            assert not np.array_equal(state.memory[layout.DATA_SLOT], copy.data.bytes)


def test_restored_guest_keeps_running_on_a_fresh_vm() -> None:
    """The replica's failover path: vCPU state onto a VM built over memory it already holds."""
    config = MachineConfig(vcpus=1, data_bytes=4 << 20, ring_entries=1024)
    workload = Workload("sequential", seed=1, report_every=100)
    with KvmMachine(config, workload) as original:
        original.start()
        original.run_to_limit(1000, harvest_when_full=True)
        state = original.capture()
    with KvmMachine(config, workload, load=False) as standby:
        standby.restore(state)
        assert standby.progress_all() == [1000]
        standby.start()
        standby.run_to_limit(2500, harvest_when_full=True)
        assert standby.progress_all() == [2500]
        words = standby.data.words.reshape(-1, 512)
        items = np.arange(2400, 2500, dtype=np.uint64)
        pages = standby.resolved.pages(0, items)
        slots = standby.resolved.words(0, items)
        assert np.array_equal(words[pages, slots], items + 1)
