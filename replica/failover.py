"""Failover: the standby memory becomes a running guest, and its service comes back.

The VM is built (in ring.backend, like every machine) over the standby memory
itself, without a copy, untracked (nothing checkpoints it now), with the vCPU
state of the last consistent epoch. A service guest gets a new stream device
on the replica's service port; the device is restored from the epoch's
DEVICE_STATE: the slot table it saved must match the one in the committed
memory (a mismatch is a torn checkpoint, refused by name), and every
connection it shows open is closed in the guest (those clients were the dead
primary's: they reconnect).
"""

from __future__ import annotations

from typing import Callable

from ring.backend import restore_machine
from ring.guest import layout
from ring.machine import Machine, MachineConfig
from ring.stream import StreamDevice
from ring.vcpus import Event

from .standby import Standby


class ActiveGuest:
    """The guest this node now runs for its clients."""

    def __init__(self, machine: Machine, device: StreamDevice | None) -> None:
        self.machine = machine
        self.device = device

    async def serve(self) -> None:
        """Open the service port (a service guest only)."""
        if self.device is not None:
            await self.device.start()

    def close(self) -> None:
        if self.device is not None:
            self.device.close()
        self.machine.close()


def start_standby(standby: Standby, *, service_host: str, service_port: int,
                  on_event: Callable[[Event], None], backend: str = "kvm") -> ActiveGuest:
    """Start the standby guest from its last committed consistent epoch; returns it running."""
    data = standby.memory.slots[layout.DATA_SLOT].spec
    config = MachineConfig(vcpus=len(standby.vcpus), data_bytes=data.size, dirty_log="bitmap")
    device = StreamDevice(service_host, service_port) if service_port else None
    try:
        machine = restore_machine(config, standby.memory, standby.vcpus, backend=backend,
                                  ports=device.ports if device is not None else None)
    except BaseException:
        if device is not None:
            device.close()
        raise
    try:
        machine.set_event_sink(on_event)
        if device is not None:
            device.restore(machine, standby.device)
        machine.start()
    except BaseException:
        if device is not None:
            device.close()
        machine.close()
        raise
    return ActiveGuest(machine, device)
