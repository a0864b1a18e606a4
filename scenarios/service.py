"""The protected service: the kvstore guest (guests/kvstore.c) behind the stream device (ring/stream.py).

Two ways to run it:

    async with Service(6380) as svc:              # on a running asyncio loop
        ...                                       # svc.machine, svc.device, svc.port

    with start_service(6380) as handle:           # its own loop in a thread (sync code, tests)
        redis.Redis(port=handle.port).ping()
        state, device_state = handle.checkpoint() # a consistent capture, then the guest runs on

A service restored from a checkpoint (`restore=MachineState` with memory)
builds its VM over a copy of that memory with load=False, and its stream
device closes every connection the checkpoint shows open: the guest resets
them and continues from the captured state; clients reconnect.

Service parameters travel in the guest's parameter block (ring/guest/layout.py):
reserved[0] = hash table buckets, reserved[1] = the largest request in bytes;
report_every = a progress report every N commands (vcpu[0].progress counts them).
"""

from __future__ import annotations

import asyncio
import collections
import threading
from pathlib import Path
from typing import Callable

from ring.backend import open_machine, restore_machine
from ring.errors import ConfigError, GuestFault
from ring.guest import layout
from ring.guest.spec import STREAM_DEVICE, GuestParam, GuestSpec
from ring.machine import Machine, MachineConfig, MachineState
from ring.memory import GuestMemory
from ring.stream import DEFAULT_SLOTS, Geometry, StreamDevice
from ring.vcpus import Done, Event, Fault, Output, Progress, install_kick_handler
from ring.workloads import Workload

KVSTORE = Path(__file__).with_name("guests") / "kvstore.c"

DEFAULT_TABLE_ENTRIES = 65536
DEFAULT_REQUEST_MAX = 65536
PARAM_TABLE_ENTRIES = 0          # index into params["reserved"]
PARAM_REQUEST_MAX = 1

_PAGE = 4096
CONN_BYTES = 168                 # sizeof(struct conn) in kvstore.c (a static assertion there)
SMALL_BUF = 4096                 # each connection's own input and output buffers (kvstore.c)


def _round(value: int) -> int:
    return -(-value // _PAGE) * _PAGE


def data_bytes_needed(table_entries: int, request_max: int, max_clients: int = DEFAULT_SLOTS) -> int:
    """The data region the stream device takes, and the kvstore lays out before its arena (the same
    sums as kvstore.c's setup()), plus the arena's first MiB."""
    connections = _round(max_clients * CONN_BYTES) + 2 * _round(max_clients * 4) + max_clients * 2 * SMALL_BUF
    argv = _round((request_max // 2 + 16) * 16)
    return (Geometry.region_bytes(max_clients) + connections + argv + _round(table_entries * 8)
            + (1 << 20))


def check_service_params(memory_mib: int, table_entries: int, request_max: int,
                         max_clients: int = DEFAULT_SLOTS) -> None:
    if memory_mib < 64:
        raise ConfigError(f"the kvstore guest needs at least 64 MiB of guest memory, got {memory_mib} MiB")
    if not 16 <= table_entries <= 1 << 26 or table_entries & (table_entries - 1):
        raise ConfigError(f"table_entries must be a power of two between 16 and 2^26, got {table_entries}")
    if not 1024 <= request_max <= 1 << 20:
        raise ConfigError(f"request_max must be between 1 KiB and 1 MiB, got {request_max}")
    needed = data_bytes_needed(table_entries, request_max, max_clients)
    if needed > memory_mib << 20:
        raise ConfigError(f"{memory_mib} MiB cannot hold the stream device and the kvstore's buffers for "
                          f"{max_clients} clients and a table of {table_entries} buckets ({-(-needed >> 20)} MiB "
                          f"needed before the arena): raise memory_mib or lower max_clients")


def _check_spec_params(memory_mib: int, params, max_clients: int) -> None:
    check_service_params(memory_mib, params["table_entries"], params["request_max"], max_clients or DEFAULT_SLOTS)


#: The kvstore as the agents see it (registered under the `colo_ring.guests` entry point group).
KVSTORE_SPEC = GuestSpec(
    "kvstore", program=KVSTORE, devices=(STREAM_DEVICE,),
    params=(GuestParam("table_entries", PARAM_TABLE_ENTRIES, DEFAULT_TABLE_ENTRIES),
            GuestParam("request_max", PARAM_REQUEST_MAX, DEFAULT_REQUEST_MAX)),
    min_memory_mib=64, backends=("kvm",), validate=_check_spec_params,
    description="a Redis-protocol key-value store in C (scenarios/guests/kvstore.c)")


def write_service_params(machine, table_entries: int, request_max: int) -> None:
    """Put the kvstore's settings into the parameter block (a VMM write, noted for checkpoints)."""
    machine.params["reserved"][PARAM_TABLE_ENTRIES] = table_entries
    machine.params["reserved"][PARAM_REQUEST_MAX] = request_max
    machine.note_vmm_write(layout.PARAMS_GPA, layout.PARAMS_DTYPE.itemsize)


class Service:
    """A kvstore guest on KVM with its stream device serving host:port."""

    def __init__(self, port: int = 0, *, host: str = "127.0.0.1", memory_mib: int = 64, backend: str = "kvm",
                 table_entries: int = DEFAULT_TABLE_ENTRIES, request_max: int = DEFAULT_REQUEST_MAX,
                 report_every: int = 1000, ring_entries: int = 4096, track_dirty: bool = True,
                 output=None, restore: MachineState | None = None, restore_device: bytes = b"",
                 on_event: Callable[[Event], None] | None = None, idle_interval: float = 0.05,
                 max_clients: int = DEFAULT_SLOTS) -> None:
        if backend != "kvm":
            raise ConfigError(f"the kvstore service runs C in a real guest: backend must be 'kvm', got {backend!r}")
        if restore is not None and restore.memory:
            memory_mib = restore.memory[layout.DATA_SLOT].size >> 20
        check_service_params(memory_mib, table_entries, request_max, max_clients)
        self.host = host
        self.port = port
        self.memory_mib = memory_mib
        self.table_entries = table_entries
        self.request_max = request_max
        self.report_every = report_every
        self.ring_entries = ring_entries
        self.track_dirty = track_dirty
        self.restore_state = restore
        self.restore_device = restore_device      # the checkpoint's DEVICE_STATE, checked at restore
        self.on_event = on_event
        self.device = StreamDevice(host, port, output=output, idle_interval=idle_interval, slots=max_clients)
        self.machine: Machine | None = None
        self._memory: GuestMemory | None = None
        self.progress = 0                       # commands executed (the last progress report)
        self.faults: list[Fault] = []
        self.done: Done | None = None
        self.console = bytearray()
        self.events: collections.deque[Event] = collections.deque(maxlen=1000)

    @property
    def config(self) -> MachineConfig:
        return MachineConfig(vcpus=1, data_bytes=self.memory_mib << 20, ring_entries=self.ring_entries)

    async def start(self) -> "Service":
        config = self.config
        try:
            if self.restore_state is not None:
                if not self.restore_state.memory:
                    raise ConfigError("restore needs a MachineState captured with memory")
                self._memory = GuestMemory.holding(config.slot_specs(), self.restore_state.memory)
                self.machine = restore_machine(config, self._memory, self.restore_state.vcpus, backend="kvm",
                                               workload=Workload(report_every=self.report_every),
                                               ports=self.device.ports, track_dirty=self.track_dirty)
            else:
                self.machine = open_machine(config, Workload(report_every=self.report_every), backend="kvm",
                                            program=str(KVSTORE), ports=self.device.ports,
                                            track_dirty=self.track_dirty)
                write_service_params(self.machine, self.table_entries, self.request_max)
            self.machine.set_event_sink(self._on_event)
            if self.restore_state is not None:
                self.device.restore(self.machine, self.restore_device)
            else:
                self.device.attach(self.machine)
            await self.device.start()
            self.port = self.device.port
            self.machine.start()
        except BaseException:
            await self.close()
            raise
        return self

    def _on_event(self, event: Event) -> None:          # vCPU threads
        if isinstance(event, Progress):
            self.progress = event.value
        elif isinstance(event, Fault):
            self.faults.append(event)
        elif isinstance(event, Done):
            self.done = event
        elif isinstance(event, Output):
            self.console += event.data
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)

    def check(self) -> None:
        """Raise GuestFault if the guest faulted or stopped."""
        if self.faults:
            fault = self.faults[0]
            raise GuestFault(f"the kvstore guest faulted: {fault.reason} {fault.detail}")
        if self.done is not None:
            raise GuestFault(f"the kvstore guest stopped with code {self.done.code}: "
                             f"{self.console.decode(errors='replace').strip()}")

    def commands(self) -> int:
        """Commands the guest has executed (its progress counter, read from guest memory)."""
        return self.machine.progress(0)

    async def close(self) -> None:
        self.device.close()
        await self.device.wait_closed()
        if self.machine is not None:
            self.machine.close()
        if self._memory is not None:
            self._memory.close()
            self._memory = None

    async def __aenter__(self) -> "Service":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()


class ServiceHandle:
    """A Service running on its own event loop thread, for synchronous callers."""

    def __init__(self, service: Service, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        self.service = service
        self.loop = loop
        self._thread = thread
        self._closed = False

    @property
    def machine(self) -> Machine:
        return self.service.machine

    @property
    def device(self) -> StreamDevice:
        return self.service.device

    @property
    def port(self) -> int:
        return self.service.port

    @property
    def host(self) -> str:
        return self.service.host

    def call(self, fn, *args):
        """Run fn(*args) on the service's loop and return its result."""
        async def run():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result()

    def checkpoint(self, resume: bool = True) -> tuple[MachineState, bytes]:
        """Pause, capture the machine with memory and the device state, consistently; then resume."""
        with self.device.lock:                 # no device write straddles the capture
            self.machine.pause()
            try:
                state = self.machine.capture()
                device_state = self.device.device_state()
            finally:
                if resume:
                    self.machine.resume()
        return state, device_state

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self.service.close(), self.loop).result(timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()

    def __enter__(self) -> "ServiceHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_service(port: int = 0, **kwargs) -> ServiceHandle:
    """Start a Service (keyword arguments as Service's) on a new loop thread; returns its handle.

    Call it from the main thread the first time (the vCPU kick signal's handler
    can only be installed there).
    """
    install_kick_handler()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="colo-service", daemon=True)
    thread.start()
    try:
        service = Service(port, **kwargs)
        asyncio.run_coroutine_threadsafe(service.start(), loop).result(timeout=120)
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        raise
    return ServiceHandle(service, loop, thread)


__all__ = ["Service", "ServiceHandle", "start_service", "KVSTORE", "KVSTORE_SPEC", "write_service_params",
           "check_service_params", "data_bytes_needed"]
