"""The same assertions on the simulated ring and the real one.

Each test runs once per backend. The KVM run is skipped, with the reason
printed, where /dev/kvm is unusable. Page counts stay in the low thousands: a
guest's first write to a page after a reset costs about 28 us on this host.
"""

from __future__ import annotations

import numpy as np
import pytest

from ring import (ConfigError, Done, Fault, LimitReached, MachineConfig, Progress, RingSoftFull,
                  StateError, Workload, open_machine, restore_machine, soft_limit)
from ring.backend import kvm_status
from ring.guest import layout, loader
from ring.memory import GuestMemory

pytestmark = pytest.mark.contract

_kvm: tuple[bool, str] | None = None


def _kvm_status() -> tuple[bool, str]:
    global _kvm
    if _kvm is None:
        _kvm = kvm_status()
    return _kvm


@pytest.fixture(params=["sim", "kvm"])
def backend(request) -> str:
    if request.param == "kvm":
        usable, reason = _kvm_status()
        if not usable:
            print(f"contract test on KVM skipped: {reason}")
            pytest.skip(reason)
    return request.param


def machine(backend: str, workload: Workload, *, vcpus: int = 1, pages: int = 512,
            entries: int = 4096, dirty_log: str = "ring"):
    data_bytes = max(2 << 20, -(-pages * 4096 // (2 << 20)) * (2 << 20))
    config = MachineConfig(vcpus=vcpus, data_bytes=data_bytes, ring_entries=entries, dirty_log=dirty_log)
    vm = open_machine(config, workload, backend=backend)
    assert vm.backend == backend
    return vm


def start_at_zero(vm) -> None:
    """Start with every vCPU parked at limit 0 (so no stale event reaches run_to_limit)."""
    vm.set_limits(0)
    vm.start()
    parked = set()
    while len(parked) < vm.config.vcpus:
        event = vm.wait_for(lambda e: True, timeout=10)
        assert isinstance(event, LimitReached) and event.progress == 0, event
        parked.add(event.vcpu)


def wait_full(vm) -> RingSoftFull:
    return vm.wait_for(lambda e: isinstance(e, (RingSoftFull, Fault)), timeout=20,
                       on_other=lambda e: pytest.fail(f"unexpected event {e}"))


def expected_pages(vm, start: list[int] | int, stop: list[int] | int) -> set[int]:
    count = vm.config.vcpus
    start = start if isinstance(start, list) else [start] * count
    stop = stop if isinstance(stop, list) else [stop] * count
    pages = [vm.resolved.pages(v, np.arange(start[v], stop[v], dtype=np.uint64)) for v in range(count)]
    return set(np.concatenate(pages).tolist())


def ring_contents(vm) -> list[set[tuple[int, int]]]:
    """Per vCPU, the (slot, offset) entries published and not yet harvested; each ring's entries
    must be distinct (KVM logs a page at most once until its reset; two vCPUs faulting on one
    page at the same moment may each log it, so across rings a page can appear twice)."""
    contents = []
    for ring in vm.tracker.rings:
        count = ring.pending()
        positions = (ring.fetch_index + np.arange(count)) % ring.entries
        entries = list(zip(ring.ring["slot"][positions].tolist(), ring.ring["offset"][positions].tolist()))
        assert len(set(entries)) == len(entries), f"vCPU {ring.vcpu_index} logged a page twice"
        contents.append(set(entries))
    return contents


def allowed_low(vcpus: int) -> set[int]:
    """Slot-0 pages a workload guest may dirty: the status page, its code page, its stacks."""
    stacks = {(loader.initial_regs(v).rsp - 8) >> 12 for v in range(vcpus)}
    return {layout.PARAMS_GPA >> 12, layout.PROGRAM_GPA >> 12} | stacks


@pytest.mark.parametrize("entries", [256, 512, 4096])
def test_soft_full_after_exactly_entries_minus_64(backend: str, entries: int) -> None:
    with machine(backend, Workload("sequential"), pages=2 * entries, entries=entries) as vm:
        vm.start()
        event = wait_full(vm)
        assert event == RingSoftFull(0)
        vm.pause()
        progress = vm.progress(0)
        dirty = vm.harvest()
        assert dirty.entries == soft_limit(entries) == entries - 64
        assert dirty.count == dirty.entries
        # RIP is on the store that pushed the last entry: its page is logged, progress not yet.
        assert dirty.slot(layout.DATA_SLOT).tolist() == list(range(progress + 1))
        assert layout.PARAMS_GPA >> 12 in dirty.slot(layout.LOW_SLOT).tolist()
        assert set(dirty.slot(layout.LOW_SLOT).tolist()) <= allowed_low(1)


def test_full_ring_without_reset_stays_full(backend: str) -> None:
    with machine(backend, Workload("sequential"), pages=1024, entries=256) as vm:
        vm.start()
        wait_full(vm)
        vm.pause()
        stuck = vm.progress(0)
        vm.resume()                                   # no harvest, so no reset
        assert wait_full(vm) == RingSoftFull(0)
        vm.pause()
        assert vm.progress(0) == stuck
        first = vm.harvest()
        assert first.entries == 192                   # nothing was pushed beyond the soft limit
        vm.resume()
        wait_full(vm)
        vm.pause()
        second = vm.harvest()
        assert vm.progress(0) > stuck
        assert second.entries == 192
        # The in-flight store's page is logged again after the reset, then the run goes on.
        assert second.slot(layout.DATA_SLOT).tolist() == list(range(stuck, vm.progress(0) + 1))


def test_pages_redirtied_after_reset_are_reported_again(backend: str) -> None:
    with machine(backend, Workload("uniform", seed=5, working_set_pages=40), vcpus=2) as vm:
        start_at_zero(vm)
        vm.run_to_limit(100)
        first = vm.harvest()
        vm.resume()
        vm.run_to_limit(200)
        second = vm.harvest()
        assert set(first.slot(layout.DATA_SLOT).tolist()) == expected_pages(vm, 0, 100)
        assert set(second.slot(layout.DATA_SLOT).tolist()) == expected_pages(vm, 100, 200)
        again = set(first.slot(layout.DATA_SLOT).tolist()) & set(second.slot(layout.DATA_SLOT).tolist())
        assert len(again) > 20
        assert layout.PARAMS_GPA >> 12 in second.slot(layout.LOW_SLOT).tolist()


@pytest.mark.parametrize("vcpus", [1, 2])
def test_each_page_reported_once_per_reset(backend: str, vcpus: int) -> None:
    with machine(backend, Workload("uniform", seed=9, working_set_pages=4), vcpus=vcpus) as vm:
        start_at_zero(vm)
        vm.run_to_limit(1000)                          # 1000 writes per vCPU to 4 pages
        ring_contents(vm)
        dirty = vm.harvest()
        assert dirty.slot(layout.DATA_SLOT).tolist() == [0, 1, 2, 3]
        assert set(dirty.slot(layout.LOW_SLOT).tolist()) <= allowed_low(vcpus)
        if vcpus == 1:
            assert dirty.entries == dirty.count
        vm.resume()
        vm.run_to_limit(1500)
        logged = ring_contents(vm)
        dirty = vm.harvest()
        assert dirty.count == 5                        # the 4 pages and the status page
        assert dirty.entries == sum(len(entries) for entries in logged)
        assert dirty.slot(layout.LOW_SLOT).tolist() == [layout.PARAMS_GPA >> 12]
        if vcpus == 1:
            assert dirty.entries == 5


@pytest.mark.parametrize("name", ["uniform", "hotcold", "sequential", "oracle"])
def test_harvest_equals_generator_pages(backend: str, name: str) -> None:
    workload = Workload(name, seed=21, working_set_pages=1500, stride=5)
    with machine(backend, workload, vcpus=2, pages=2048) as vm:
        start_at_zero(vm)
        done = [0, 0]
        for iteration, limit in enumerate((300, 700), start=1):
            vm.set_iteration(iteration)
            vm.run_to_limit(limit)
            logged = ring_contents(vm)
            dirty = vm.harvest()
            assert vm.progress_all() == [limit, limit]
            reported = set(dirty.slot(layout.DATA_SLOT).tolist())
            assert reported == expected_pages(vm, done, [limit, limit])
            assert dirty.entries == sum(len(entries) for entries in logged) >= dirty.count
            assert {(layout.DATA_SLOT, page) for page in reported} <= logged[0] | logged[1]
            check_memory(vm, name, iteration, done, limit, reported)
            done = [limit, limit]
            vm.resume()


def check_memory(vm, name: str, iteration: int, done: list[int], limit: int,
                 reported: set[int]) -> None:
    words = vm.data.words.reshape(-1, 512)
    for v in range(vm.config.vcpus):
        items = np.arange(limit, dtype=np.uint64)
        pages = vm.resolved.pages(v, items).astype(np.int64)
        if name == "oracle":
            # the selftest's oracle: what this vCPU wrote this epoch holds this iteration (and is
            # reported); a page of it that was not reported holds an older one
            now = np.unique(pages[done[v]:])
            assert (words[now, v] == iteration).all()
            before = np.unique(pages)
            unreported = before[~np.isin(before, list(reported))]
            assert (words[unreported, v] < iteration).all()
        else:
            # the last store to each word holds its item + 1
            index = pages * 512 + vm.resolved.words(v, items).astype(np.int64)
            _, last = np.unique(index[::-1], return_index=True)
            keep = len(index) - 1 - last
            assert np.array_equal(vm.data.words[index[keep]], items[keep] + 1)


def test_progress_limit_and_done_events(backend: str) -> None:
    with machine(backend, Workload("uniform", report_every=100, total=650), vcpus=2) as vm:
        start_at_zero(vm)
        seen: dict[int, list] = {0: [], 1: []}

        def collect(until_each) -> None:
            waiting = {0, 1}
            while waiting:
                event = vm.wait_for(lambda e: True, timeout=10)
                assert not isinstance(event, (Fault, RingSoftFull)), event
                seen[event.vcpu].append(event)
                if until_each(event):
                    waiting.discard(event.vcpu)

        vm.set_limits(350)
        collect(lambda e: isinstance(e, LimitReached))
        vm.set_limits(500)
        collect(lambda e: isinstance(e, LimitReached))
        vm.set_limits(10_000)
        collect(lambda e: isinstance(e, Done))
        for v in (0, 1):
            assert seen[v] == [Progress(v, 100), Progress(v, 200), Progress(v, 300), LimitReached(v, 350),
                               Progress(v, 400), Progress(v, 500), LimitReached(v, 500),
                               Progress(v, 600), Done(v, 0)]
        assert vm.progress_all() == [650, 650]


def test_harvest_and_capture_need_a_pause(backend: str) -> None:
    with machine(backend, Workload("uniform")) as vm:
        start_at_zero(vm)
        with pytest.raises(StateError, match="pause"):
            vm.harvest()
        with pytest.raises(StateError):
            vm.capture()
        vm.pause()
        assert vm.harvest().count > 0
        assert len(vm.capture(with_memory=False).vcpus) == 1


def test_bitmap_mode_reports_the_same_pages(backend: str) -> None:
    workload = Workload("hotcold", seed=3, working_set_pages=800)
    with machine(backend, workload, vcpus=2, pages=1024, dirty_log="bitmap") as vm:
        start_at_zero(vm)
        vm.run_to_limit(150)
        first = vm.harvest()
        assert set(first.slot(layout.DATA_SLOT).tolist()) == expected_pages(vm, 0, 150)
        assert set(first.slot(layout.LOW_SLOT).tolist()) <= allowed_low(2)
        vm.resume()
        vm.run_to_limit(400)
        second = vm.harvest()
        assert set(second.slot(layout.DATA_SLOT).tolist()) == expected_pages(vm, 150, 400)


def test_vcpu_state_count_must_match(backend: str) -> None:
    with machine(backend, Workload("uniform"), vcpus=2) as vm:
        start_at_zero(vm)
        vm.pause()
        states = vm.capture_vcpus()
        assert [s.index for s in states] == [0, 1]
        vm.restore_vcpus(states)                        # its own state is accepted back
        with pytest.raises(ConfigError):
            vm.restore_vcpus(states[:1])


# --- machines built by ring.backend, on both backends -----------------------------------------

def test_a_machine_restored_over_a_capture_continues_the_same_run_untracked(backend: str) -> None:
    """The replica's failover: vCPU state onto a machine over memory it already holds, no dirty log."""
    workload = Workload("sequential", seed=4, working_set_pages=600, report_every=0)
    with machine(backend, workload, vcpus=2, pages=1024) as original:
        start_at_zero(original)
        original.run_to_limit(300, harvest_when_full=True)
        state = original.capture()
        memory = GuestMemory.holding(original.config.slot_specs(), state.memory)
        try:
            with restore_machine(original.config, memory, state.vcpus, backend=backend) as standby:
                assert standby.backend == backend
                items = np.arange(0, 2000, dtype=np.uint64)                          # workload read from memory
                assert all(np.array_equal(standby.resolved.pages(v, items), original.resolved.pages(v, items))
                           for v in (0, 1))
                assert standby.progress_all() == [300, 300]
                standby.run_to_limit(700)
                original.resume()
                original.run_to_limit(700, harvest_when_full=True)
                assert standby.progress_all() == original.progress_all() == [700, 700]
                data = layout.DATA_SLOT
                assert np.array_equal(standby.memory.slots[data].pages, original.memory.slots[data].pages)
                untracked = standby.harvest()          # only the VMM's own writes (the limits)
                assert untracked.entries == 0 and len(untracked.slot(data)) == 0
            assert memory.slots[data].bytes is not None                           # the caller owns it
        finally:
            memory.close()


def test_a_restored_machine_can_track_its_dirty_pages(backend: str) -> None:
    """A service restored from a capture is protected again: its machine logs what it writes."""
    workload = Workload("uniform", seed=8, working_set_pages=400)
    with machine(backend, workload, pages=512) as original:
        start_at_zero(original)
        original.run_to_limit(100)
        state = original.capture()
    memory = GuestMemory.holding(MachineConfig(data_bytes=2 << 20).slot_specs(), state.memory)
    try:
        with restore_machine(MachineConfig(data_bytes=2 << 20), memory, state.vcpus, backend=backend,
                             track_dirty=True) as copy:
            copy.run_to_limit(250, harvest_when_full=True)
            assert set(copy.harvest().slot(layout.DATA_SLOT).tolist()) >= expected_pages(copy, 100, 250)
    finally:
        memory.close()


def test_only_kvm_runs_another_guest_program(backend: str) -> None:
    config = MachineConfig(data_bytes=2 << 20)
    if backend == "sim":
        with pytest.raises(ConfigError, match="guest program .*kvstore.c needs the KVM backend"):
            open_machine(config, backend="sim", program="scenarios/guests/kvstore.c")
    else:
        from scenarios.service import KVSTORE
        with open_machine(config, backend="kvm", program=str(KVSTORE)) as vm:
            assert vm.backend == "kvm"
