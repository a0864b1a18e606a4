"""The one place that chooses between the real KVM backend and the simulated one.

"auto" takes KVM when /dev/kvm opens and has the dirty ring, and otherwise
falls back to the simulator, logging why; "kvm" insists on KVM (and raises
KvmUnavailableError naming the problem); "sim" asks for the simulator. The
environment variable COLO_RING_BACKEND sets the default for "auto" callers
(read here only, never below).
"""

from __future__ import annotations

import logging
import os

from . import abi
from .errors import ConfigError, KvmUnavailableError
from .kvm import Kvm
from .machine import Machine, MachineConfig
from .workloads import Workload

log = logging.getLogger(__name__)

BACKENDS = ("auto", "kvm", "sim")


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


def open_machine(config: MachineConfig | None = None, workload: Workload | None = None,
                 backend: str = "auto", **options) -> Machine:
    """Build a machine on the chosen backend (options go to the backend's constructor)."""
    config = config or MachineConfig()
    chosen, reason = choose_backend(backend)
    log.info("backend %s: %s", chosen, reason)
    if chosen == "kvm":
        from .machine import KvmMachine
        return KvmMachine(config, workload, **options)
    from .sim import SimMachine
    return SimMachine(config, workload, **options)
