"""Real KVM: the whole pause in one native call (Machine.checkpoint, ring._native.checkpoint) does
what the steps do: the pages written since the last harvest, their content at the pause, the
vCPU state as the full capture reads it; and a guest held at a full ring runs again after it."""

from __future__ import annotations

import numpy as np
import pytest

from checkpointer.snapshot import StagingPool, gather_reference, staging_capacity
from ring import KvmMachine, MachineConfig, RingSoftFull, Workload
from ring.guest import layout
from ring.vcpus import LimitReached, Progress

from .test_fast_capture import assert_same_state
from .test_kvm_ring import written_pages

pytestmark = pytest.mark.kvm


def _first_native(vm: KvmMachine, buffer: np.ndarray):
    """The first checkpoint has no cached vCPU state (None): take it the slow way, as the agent does."""
    assert vm.checkpoint(buffer, resume=False) is None
    vm.pause()
    vm.harvest()
    vm.capture_vcpus()
    vm.resume()


def test_one_call_reports_the_written_pages_their_content_and_the_vcpu_state() -> None:
    config = MachineConfig(vcpus=2, data_bytes=32 << 20, ring_entries=4096)
    with KvmMachine(config, Workload("sequential", seed=5, stride=3)) as vm:
        pool = StagingPool(1, staging_capacity(vm))
        buffer = pool.acquire(pool.capacity)
        vm.run_to_limit(200)
        _first_native(vm, buffer)
        for limit in (900, 1700, 2600):
            start = vm.progress_all()
            vm.set_limits(limit)
            for _ in range(config.vcpus):                 # each vCPU reaches the limit and is held there
                vm.wait_for(lambda e: isinstance(e, LimitReached) and e.progress >= limit)
            done = vm.checkpoint(buffer, resume=False)     # (held vCPUs: the state must stay for the checks)
            assert done is not None and not done.resumed and vm.paused
            keys = done.dirty.keys()
            data = set(done.dirty.slot(layout.DATA_SLOT).tolist())
            assert data == written_pages(vm, start)
            assert done.gathered == len(keys)
            expected = gather_reference(vm, keys, np.empty_like(buffer))
            assert np.array_equal(buffer[:len(keys)], expected)
            assert_same_state(done.vcpus, vm.capture_vcpus_full())
            vm.resume()


def test_a_native_resume_lets_a_vcpu_held_at_a_full_ring_run_again() -> None:
    config = MachineConfig(vcpus=1, data_bytes=16 << 20, ring_entries=256)
    with KvmMachine(config, Workload("uniform", seed=2)) as vm:
        pool = StagingPool(1, staging_capacity(vm))
        buffer = pool.acquire(pool.capacity)
        vm.set_limits(2 ** 62)
        vm.start()
        vm.wait_for(lambda e: isinstance(e, RingSoftFull))
        _first_native(vm, buffer)
        for _ in range(5):
            vm.wait_for(lambda e: isinstance(e, RingSoftFull))
            assert vm.runner.hold_reason(0) == "ring_full"
            done = vm.checkpoint(buffer, resume=True)
            assert done is not None and done.resumed and not vm.paused
            assert done.dirty.entries > 0
            assert vm.runner.hold_reason(0) is None       # released with the gate: it fills the ring again


def test_a_running_guest_is_kicked_and_the_pause_holds() -> None:
    """The kick is part of the call: a guest in KVM_RUN is stopped, and stays stopped until resumed."""
    config = MachineConfig(vcpus=2, data_bytes=32 << 20, ring_entries=4096)
    with KvmMachine(config, Workload("uniform", seed=3, working_set_pages=64, report_every=2000)) as vm:
        pool = StagingPool(1, staging_capacity(vm))
        buffer = pool.acquire(pool.capacity)
        vm.set_limits(2 ** 62)
        vm.start()
        _first_native(vm, buffer)
        for v in range(config.vcpus):       # both ran since (their kvm_run.s is fresh): Progress events
            vm.wait_for(lambda e, v=v: isinstance(e, Progress) and e.vcpu == v)
        kicks = vm.runner.kicks
        for _ in range(20):
            done = vm.checkpoint(buffer, resume=False)
            assert done is not None and vm.paused
            progress = vm.progress_all()
            assert vm.tracker.fill() == 0                 # nothing ran between the harvest and now
            assert_same_state(done.vcpus, vm.capture_vcpus_full())
            assert vm.progress_all() == progress
            vm.drain_events()
            vm.resume()
            vm.wait_for(lambda e: isinstance(e, Progress))   # in the guest again before the next call
        assert vm.runner.kicks > kicks                    # they were in the guest, and were kicked out


def test_after_a_restore_the_call_declines_and_the_guest_is_untouched() -> None:
    """SET ioctls make kvm_run.s stale: the call says None (the caller takes the steps)."""
    config = MachineConfig(vcpus=1, data_bytes=16 << 20, ring_entries=1024)
    with KvmMachine(config, Workload("uniform", seed=4)) as vm:
        pool = StagingPool(1, staging_capacity(vm))
        buffer = pool.acquire(pool.capacity)
        vm.run_to_limit(100)
        _first_native(vm, buffer)
        vm.pause()
        vm.restore_vcpus(vm.capture_vcpus())
        assert vm.checkpoint(buffer, resume=True) is None
        assert vm.paused
