"""ring: real KVM guests with one dirty ring per vCPU, driven from Python.

    from ring import open_machine, MachineConfig, Workload
    with open_machine(MachineConfig(vcpus=2), Workload("uniform", seed=7)) as vm:
        vm.start()
        vm.run_to_limit(1000)          # every vCPU does 1000 writes, then the VM pauses
        dirty = vm.harvest()           # pages per slot, deduplicated, ring reset
"""

from . import pages
from .backend import choose_backend, kvm_status, open_machine, restore_machine
from .dirty import BitmapTracker, DirtyRing, DirtySet, RingTracker, soft_limit, validate_ring_entries
from .errors import (ConfigError, GuestBuildError, GuestFault, HarvestError, KvmError,
                     KvmUnavailableError, PageKeyError, RingError, RingSizeError, SlotOverlapError, StateError)
from .machine import KvmMachine, Machine, MachineConfig, MachineState, VcpuState
from .vcpus import Done, Event, Fault, LimitReached, Output, Progress, RingSoftFull
from .workloads import Workload

__all__ = [
    "open_machine", "restore_machine", "choose_backend", "kvm_status", "MachineConfig", "Machine", "KvmMachine",
    "MachineState", "VcpuState", "Workload", "DirtySet", "DirtyRing", "RingTracker", "BitmapTracker",
    "soft_limit", "validate_ring_entries", "Event", "Progress", "RingSoftFull", "LimitReached",
    "Output", "Done", "Fault", "RingError", "KvmError", "KvmUnavailableError", "ConfigError",
    "RingSizeError", "SlotOverlapError", "GuestBuildError", "GuestFault", "HarvestError", "StateError",
    "PageKeyError", "pages",
]
