"""Failover: the standby memory becomes a running guest, and its service comes back.

The VM is built (in ring.backend, like every machine) over the standby memory
itself, without a copy, with the vCPU state of the last consistent epoch, and
untracked unless asked (nothing checkpoints it until this node protects it as
the primary of a new replica: then `track_dirty`). A service guest gets a new
stream device on the replica's service port; the device is restored from the
epoch's DEVICE_STATE: the slot table it saved must match the one in the
committed memory (a mismatch is a torn checkpoint, refused by name), and every
connection it shows open is closed in the guest (those clients were the dead
primary's: they reconnect).

The result is a checkpointer.guest.Guest, the object that outlives the role:
the node serves it now, and can hand it to a primary role later.
"""

from __future__ import annotations

from checkpointer.guest import Guest
from ring.backend import restore_machine
from ring.guest import layout
from ring.machine import MachineConfig
from ring.stream import StreamDevice

from .standby import Standby


def restore_standby(standby: Standby, *, service_host: str, service_port: int, backend: str = "kvm",
                    track_dirty: bool = False) -> Guest:
    """The standby guest, from its last committed consistent epoch, ready to start (not started)."""
    data = standby.memory.slots[layout.DATA_SLOT].spec
    config = MachineConfig(vcpus=len(standby.vcpus), data_bytes=data.size,
                           dirty_log="ring" if track_dirty else "bitmap")
    device = StreamDevice(service_host, service_port) if service_port else None
    try:
        machine = restore_machine(config, standby.memory, standby.vcpus, backend=backend,
                                  ports=device.ports if device is not None else None, track_dirty=track_dirty)
    except BaseException:
        if device is not None:
            device.close()
        raise
    try:
        if device is not None:
            device.restore(machine, standby.device)
    except BaseException:
        if device is not None:
            device.close()
        machine.close()
        raise
    return Guest(machine, device)
