"""Real KVM: a checkpoint's vCPU capture the fast way (KVM_CAP_SYNC_REGS, static state cached)
equals a full capture (one GET ioctl per part), and restoring it is still exact."""

from __future__ import annotations

import numpy as np
import pytest

from ring import KvmMachine, MachineConfig, Workload
from ring.kvm import Vcpu
from ring.machine import CPL3_VARYING_MSRS

pytestmark = pytest.mark.kvm

TSC = 0x10
SLOW_READS = ("get_regs", "get_sregs", "get_vcpu_events", "get_xcrs", "get_debugregs", "get_cpuid2",
              "get_msrs", "get_xsave")


def _forbid_slow_reads(monkeypatch) -> None:
    """Make every Python GET wrapper fail: a capture that still works read none of them."""
    for name in SLOW_READS:
        def refuse(self, *args, _name=name, **kwargs):
            raise AssertionError(f"the fast capture called Vcpu.{_name}")
        monkeypatch.setattr(Vcpu, name, refuse)


def assert_same_state(fast, full) -> None:
    """Equal in every field; the TSC, read later by the full capture, only moved forward."""
    assert [s.index for s in fast] == [s.index for s in full]
    for mine, theirs in zip(fast, full):
        for name in ("regs", "sregs", "fpu", "xsave", "xcrs", "events", "debugregs", "cpuid"):
            assert getattr(mine, name) == getattr(theirs, name), f"vCPU {mine.index}: {name} differs"
        assert mine.msrs.keys() == theirs.msrs.keys()
        assert {k: v for k, v in mine.msrs.items() if k not in CPL3_VARYING_MSRS} == \
               {k: v for k, v in theirs.msrs.items() if k not in CPL3_VARYING_MSRS}
        assert mine.msrs[TSC] <= theirs.msrs[TSC]


def _paused_after(vm: KvmMachine, limit: int) -> None:
    vm.run_to_limit(limit, harvest_when_full=True)
    if not vm.paused:
        vm.pause()


def test_a_fast_capture_equals_a_full_capture_and_reads_no_slow_ioctl(monkeypatch) -> None:
    config = MachineConfig(vcpus=2, data_bytes=8 << 20, ring_entries=4096)
    with KvmMachine(config, Workload("uniform", seed=11, report_every=0)) as vm:
        assert all(v.sync_regs for v in vm.vcpu_fds), "this host's KVM lacks KVM_CAP_SYNC_REGS"
        _paused_after(vm, 2000)
        vm.capture_vcpus()                          # the first capture reads the static state once
        for limit in (4000, 6000):
            vm.resume()
            _paused_after(vm, limit)
            with monkeypatch.context() as patch:
                _forbid_slow_reads(patch)
                fast = vm.capture_vcpus()
            assert_same_state(fast, vm.capture_vcpus_full())
            assert all(v.synced for v in vm.vcpu_fds)


def test_a_fast_captured_state_restores_exactly_on_a_fresh_vm() -> None:
    config = MachineConfig(vcpus=2, data_bytes=8 << 20, ring_entries=4096)
    workload = Workload("uniform", seed=2025, report_every=0)
    with KvmMachine(config, workload) as original:
        _paused_after(original, 1500)
        original.capture_vcpus()
        original.resume()
        _paused_after(original, 3000)
        state = original.capture()                  # the fast way: kvm_run + cached static state
        assert_same_state(state.vcpus, original.capture_vcpus_full())
        with KvmMachine(config, workload, load=False) as copy:
            copy.restore(state)
            assert not any(v.synced for v in copy.vcpu_fds)     # SET ioctls: kvm_run is stale now
            assert_same_state(state.vcpus, copy.capture_vcpus())   # read back in full
            copy.run_to_limit(6000, harvest_when_full=True)
            original.resume()
            original.run_to_limit(6000, harvest_when_full=True)
            assert original.progress_all() == copy.progress_all() == [6000, 6000]
            for slot in original.memory.slots:
                a, b = original.memory.slots[slot].pages, copy.memory.slots[slot].pages
                differ = np.flatnonzero((a != b).any(axis=1))
                assert len(differ) == 0, f"slot {slot}: pages {differ[:10]} differ after the round trip"
            for mine, theirs in zip(original.capture_vcpus(), copy.capture_vcpus()):
                assert (mine.regs, mine.sregs, mine.xsave, mine.events) == \
                       (theirs.regs, theirs.sregs, theirs.xsave, theirs.events)


def test_a_restore_on_the_same_vm_is_seen_by_the_next_capture() -> None:
    """State set by ioctl after the last exit is not in kvm_run: the capture must read it back."""
    config = MachineConfig(vcpus=1, data_bytes=4 << 20, ring_entries=1024)
    with KvmMachine(config, Workload("sequential", seed=3, report_every=0)) as vm:
        _paused_after(vm, 500)
        before = vm.capture_vcpus()
        earlier = vm.capture_vcpus_full()
        vm.resume()
        _paused_after(vm, 900)
        assert vm.capture_vcpus()[0].regs != before[0].regs
        vm.restore_vcpus(earlier)                  # back to the state at 500, by SET ioctls
        assert_same_state(earlier, vm.capture_vcpus())
        assert vm.capture_vcpus()[0].regs == before[0].regs
