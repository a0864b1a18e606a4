"""Real KVM: exits reach the caller as events; the pause barrier really stops every vCPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from ring import Done, Fault, KvmMachine, MachineConfig, Output, Progress, Workload


pytestmark = pytest.mark.kvm

EVENTS_GUEST = str(Path(__file__).resolve().parent.parent / "guests" / "events.c")   # tests/guests/
CONFIG = MachineConfig(vcpus=1, data_bytes=2 << 20, ring_entries=256)


def _events_until(vm: KvmMachine, last: type) -> list:
    seen = []
    while not seen or not isinstance(seen[-1], last):
        seen.append(vm.wait_for(lambda e: True, timeout=20))
    return seen


def test_output_progress_and_done_events() -> None:
    with KvmMachine(CONFIG, Workload(seed=1), program=EVENTS_GUEST) as vm:
        vm.start()
        seen = _events_until(vm, Done)
    assert [type(e) for e in seen] == [Output, Output, Progress, Done]
    assert b"".join(e.data for e in seen if isinstance(e, Output)) == b"hi"
    assert seen[-1].code == 7


def test_triple_fault_is_a_shutdown_event() -> None:
    with KvmMachine(CONFIG, Workload(seed=2), program=EVENTS_GUEST) as vm:
        vm.start()
        seen = _events_until(vm, Fault)
    assert seen[-1].reason == "shutdown", seen[-1]


def test_write_outside_memory_is_reported_with_its_address() -> None:
    with KvmMachine(CONFIG, Workload(seed=3), program=EVENTS_GUEST) as vm:
        vm.start()
        fault = _events_until(vm, Fault)[-1]
    assert fault.reason == "mmio" and "0x41200000" in fault.detail, fault


def test_port_in_gets_the_handlers_value() -> None:
    ports = {0x77: lambda vcpu, value: 1234}
    with KvmMachine(CONFIG, Workload(seed=4), program=EVENTS_GUEST, ports=ports) as vm:
        vm.start()
        seen = _events_until(vm, Done)
    assert vm_progress_values(seen) == [1235]


def vm_progress_values(events) -> list[int]:
    return [e.value for e in events if isinstance(e, Progress)]


def test_pause_stops_every_vcpu_until_resume() -> None:
    config = MachineConfig(vcpus=2, data_bytes=16 << 20, ring_entries=1024)
    with KvmMachine(config, Workload("uniform", seed=3)) as vm:
        vm.start()
        vm.wait_for(lambda e: True, timeout=20)          # running: the first ring fills
        for _ in range(20):
            vm.pause()
            before = [s.regs for s in vm.capture_vcpus()], vm.progress_all()
            vm.harvest()
            after = [s.regs for s in vm.capture_vcpus()], vm.progress_all()
            assert before == after, "a vCPU ran while the VM was paused"
            vm.resume()
        vm.pause()
        assert sum(vm.progress_all()) > 0
