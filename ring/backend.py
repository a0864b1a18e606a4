"""The one place that chooses between the real KVM backend and the simulated one, and builds machines.

"auto" takes KVM when /dev/kvm opens and has the dirty ring, and otherwise
falls back to the simulator, logging why; "kvm" insists on KVM (and raises
KvmUnavailableError naming the problem); "sim" asks for the simulator. The
environment variable COLO_RING_BACKEND sets the default for "auto" callers
(read here only, never below).

Every machine is built here, in one of two ways:

- open_machine(): a fresh guest, its program loaded, dirty logging on (the
  primary, a service, a benchmark);
- restore_machine(): over memory that already holds a guest (the replica's
  standby memory at failover, a copy of a capture), its vCPUs restored from
  saved state, nothing loaded, dirty logging off unless asked.

The simulator runs one program, the numpy twin of workloads.c: asked for
another (the kvstore service), it refuses rather than run the wrong guest.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

from . import abi
from .errors import ConfigError, KvmUnavailableError
from .kvm import Kvm
from .machine import Machine, MachineConfig, VcpuState, workload_in_memory
from .memory import GuestMemory
from .vcpus import PortHandler
from .workloads import Workload

log = logging.getLogger(__name__)

BACKENDS = ("auto", "kvm", "sim")
SIM_PROGRAM = "workloads.c"             # the only guest program the simulator runs


def kvm_status(path: str = "/dev/kvm") -> tuple[bool, str]:
    """(usable, reason): whether a KVM guest with a dirty ring can be run here, and why not."""
    try:
        kvm = Kvm(path)
    except KvmUnavailableError as exc:
        return False, str(exc)
    try:
        vm = kvm.create_vm()
        try:
            if vm.check_extension(abi.KVM_CAP_DIRTY_LOG_RING) <= 0:
                return False, f"{path} works but this KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING)"
        finally:
            vm.close()
    except Exception as exc:  # a KvmError from KVM_CREATE_VM, say
        return False, f"{path} opens but cannot create a VM: {exc}"
    finally:
        kvm.close()
    return True, f"{path} is usable and has the dirty ring"


def choose_backend(requested: str = "auto") -> tuple[str, str]:
    """Return (backend, reason) for a request of 'auto', 'kvm' or 'sim'."""
    if requested == "auto":
        requested = os.environ.get("COLO_RING_BACKEND", "auto") or "auto"
        if requested not in BACKENDS:
            raise ConfigError(f"COLO_RING_BACKEND={requested!r} is not one of {', '.join(BACKENDS)}")
    if requested not in BACKENDS:
        raise ConfigError(f"backend {requested!r} is not one of {', '.join(BACKENDS)}")
    if requested == "sim":
        return "sim", "the simulated backend was asked for"
    usable, reason = kvm_status()
    if usable:
        return "kvm", reason
    if requested == "kvm":
        raise KvmUnavailableError(reason)
    return "sim", f"falling back to the simulated backend: {reason}"


def _build(config: MachineConfig, workload: Workload | None, backend: str, program: str | None,
           options: dict) -> Machine:
    chosen, reason = choose_backend(backend)
    log.info("backend %s: %s", chosen, reason)
    if chosen == "kvm":
        from .machine import KvmMachine
        if program is not None:
            options["program"] = program
        return KvmMachine(config, workload, **options)
    if program is not None and Path(program).name != SIM_PROGRAM:
        raise ConfigError(f"guest program {program} needs the KVM backend: the simulated backend runs "
                          f"only {SIM_PROGRAM} ({reason})")
    from .sim import SimMachine
    return SimMachine(config, workload, **options)


def open_machine(config: MachineConfig | None = None, workload: Workload | None = None,
                 backend: str = "auto", *, program: str | None = None,
                 ports: dict[int, PortHandler] | None = None, track_dirty: bool = True,
                 **options) -> Machine:
    """A fresh guest on the chosen backend: `program` (default workloads.c) loaded, not started.

    `ports` adds port handlers (a device's); `track_dirty` False runs it without dirty
    logging. Other options go to the backend's constructor (kvm_path, say).
    """
    config = config or MachineConfig()
    return _build(config, workload, backend, program,
                  dict(options, ports=ports, track_dirty=track_dirty))


def restore_machine(config: MachineConfig, memory: GuestMemory, vcpus: Sequence[VcpuState], *,
                    backend: str = "auto", workload: Workload | None = None,
                    ports: dict[int, PortHandler] | None = None, track_dirty: bool = False,
                    **options) -> Machine:
    """A machine over `memory`, which already holds a guest, with its vCPUs set from `vcpus`; not started.

    Nothing is loaded into the memory, and the machine does not own it (the caller
    closes it after the machine). The workload, unless given, is the one the guest's
    parameter block names. Dirty logging is off unless `track_dirty` (a replica's
    guest after failover has nobody to send its pages to).
    """
    if workload is None:
        workload = workload_in_memory(memory)
    machine = _build(config, workload, backend, None,
                     dict(options, memory=memory, load=False, ports=ports, track_dirty=track_dirty))
    try:
        machine.restore_vcpus(list(vcpus))
    except BaseException:
        machine.close()
        raise
    return machine
