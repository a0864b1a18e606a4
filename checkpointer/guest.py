"""The guest a node runs for its clients, as one object that outlives the role protecting it.

A node changes role: a replica takes over and runs the standby guest for the clients
(replica/failover.py), then protects that same guest as the primary of the next replica
that joins. So the role does not own how the guest came to be: the primary builds one
from its spec (`build_guest`), or is handed a running one. A Guest is the machine and,
for a service, its stream device; `route_output` says where the device's replies go
(straight to the clients while nothing protects the guest, through output commit while a
primary does).
"""

from __future__ import annotations

from typing import Callable

from ring.backend import open_machine
from ring.guest.spec import GuestSpec
from ring.machine import Machine
from ring.stream import StreamDevice
from ring.vcpus import Event

DeviceOutput = Callable[[int, bytes, int], None]        # (slot, data, generation)


class Guest:
    """A machine, and the stream device of a service guest."""

    def __init__(self, machine: Machine, device: StreamDevice | None = None, spec: GuestSpec | None = None) -> None:
        self.machine = machine
        self.device = device
        self.spec = spec
        self._owned: list = []              # what must live as long as the machine (its memory)

    def owns(self, resource) -> None:
        """Close `resource` with the guest (a taken-over guest runs over the standby's memory)."""
        self._owned.append(resource)

    def route_output(self, output: DeviceOutput | None) -> None:
        """Send the device's replies to `output` (None: straight to the clients)."""
        if self.device is not None:
            self.device.output = output or self.device.write_to_client

    async def start(self, on_event: Callable[[Event], None]) -> None:
        """Deliver the guest's events to `on_event`, open the service, and run the vCPUs (if not yet)."""
        self.machine.set_event_sink(on_event)
        if self.device is not None and not self.device.listening:
            await self.device.start()
        if self.machine.runner is None or not self.machine.runner.started:
            self.machine.start()

    def close(self) -> None:
        if self.device is not None:
            self.device.close()
        self.machine.close()
        for resource in reversed(self._owned):
            resource.close()
        self._owned.clear()


def build_guest(config) -> Guest:
    """A fresh guest from the primary's config: its spec's program, devices and parameters."""
    guest, service, spec = config.guest, config.service, config.guest_spec()
    if not spec.is_service:
        return Guest(open_machine(guest.machine_config(), guest.workload_config(), backend=guest.backend),
                     spec=spec)
    device = StreamDevice(service.host, service.port, slots=service.max_clients)
    machine = open_machine(guest.machine_config(), guest.workload_config(), backend=guest.backend,
                           program=str(spec.program), ports=device.ports)
    try:
        spec.write_params(machine, config.guest_params())
        device.attach(machine)
    except BaseException:
        machine.close()
        raise
    return Guest(machine, device, spec)


__all__ = ["Guest", "build_guest", "DeviceOutput"]
