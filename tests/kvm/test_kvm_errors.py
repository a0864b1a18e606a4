"""Errors from the kernel itself name the ioctl that failed (real KVM)."""

from __future__ import annotations

import errno

import pytest

from ring import KvmError
from ring.kvm import Kvm
from ring.memory import GuestMemory, SlotSpec


def test_kernel_refuses_overlapping_slots_with_named_ioctl() -> None:
    memory = GuestMemory([SlotSpec(0, 0, 4 << 20), SlotSpec(1, 8 << 20, 4 << 20)])
    kvm = Kvm()
    vm = kvm.create_vm()
    try:
        first = memory.slots[0]
        vm.set_user_memory_region(0, 0, 4 << 20, first.address)
        with pytest.raises(KvmError, match="KVM_SET_USER_MEMORY_REGION failed: EEXIST") as info:
            vm.set_user_memory_region(1, 2 << 20, 4 << 20, memory.slots[1].address)
        assert info.value.op == "KVM_SET_USER_MEMORY_REGION" and info.value.errno == errno.EEXIST
    finally:
        vm.close()
        kvm.close()
        memory.close()
