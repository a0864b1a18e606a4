"""The paravirtual stream device: TCP clients <-> rings in guest memory.

The VMM accepts TCP connections on a service port and gives each one a
connection slot in guest memory: a control record, a receive (RX) ring the
VMM fills with the client's bytes, and a transmit (TX) ring the guest fills
with replies. Two queues in guest memory name the slots that changed, one
each way, so that neither side polls every slot: the cost of a request does
not grow with the client limit. The guest OUTs a doorbell port after telling
the host about changes and an idle port when it has nothing to do. The ABI
is ring/guest/programs/stream.h (mirrored here: change both).

Some facts this module is built on:

- The number of slots is the client limit (`slots`, the service's
  max_clients). A client beyond it gets Redis's own answer, "-ERR max number
  of clients reached", and is closed, as redis-server does: those bytes come
  from the VMM, not the guest, and tell nothing of the guest's state, so they
  need no output commit. A client that finds every slot taken but one closing
  (the guest has not acknowledged the close yet) waits for it.
- The slot table, the queues and the rings sit at the top of the data region,
  sized by the slot count; the VMM lowers params.data_pages so the program's
  heap stops below them. A device attached to restored memory reads the
  geometry from the header there (a replica needs no setting to adopt it).
- The VMM's own stores into guest memory are not in the dirty ring. Every
  store here (RX bytes, indices, state, queue entries, the header) is
  followed by `machine.note_vmm_write()`, so that the next harvest carries it
  into the checkpoint. The data is stored before it is noted: a harvest that
  sees the note copies the page after the store.
- vCPUs run while the device writes. The indices are free-running counters,
  each written by one side only, so nothing is ever reset under the other
  side's feet. Writers store the data before the index that publishes it and
  readers load the index before the data; x86 is TSO, and numpy's stores of
  at most a ring's size are plain stores, far below the size at which glibc's
  memcpy switches to non-temporal ones, so that order is what the other side
  sees. Neither side skips a queue entry because it believes the other has
  seen the change already (that belief would rest on a stale index: the
  store-to-load reordering x86 does allow).
- A connection's identity is (slot, generation). The host bumps `generation`
  at every open and every close and waits for the guest to acknowledge
  (guest_generation == generation) before it reuses a slot or sends RX bytes
  to a new connection; TX bytes left over from an older connection are
  dropped when a slot opens. So a stale reply never reaches a new client, and
  a device started over memory restored from a checkpoint simply closes every
  slot the checkpoint shows open: the guest resets those connections and the
  clients (whose TCP connections went with the old host) reconnect.
- A vCPU that OUTs the idle port is parked (the port handler returns
  `(None, "idle")`) and released with `runner.release(vcpu, "idle")` when the
  device changed something, or by a timer (`idle_interval`) so nothing can
  hang. The handler runs on the vCPU thread and only flips flags under a small
  lock: a wake-up that arrives while the vCPU is deciding to park is never
  lost (see _on_idle and _wake).
- Output commit: TX bytes go to `output(slot, data, generation)`. The default
  writes them to the client at once (`write_to_client`); an output-commit
  layer holds them until their epoch is acknowledged and then calls
  `write_to_client` itself, which drops bytes whose connection is gone. An
  empty `data` marks the end of a connection the client half-closed: its last
  reply went out, and `write_to_client(slot, b"", generation)` closes it.
- Backpressure, per connection: a client that does not read stops its TX
  drain (the transport's pause_writing), so its TX ring fills and the guest
  stops answering that slot only; a client that sends faster than the guest
  consumes has its socket reading paused once `rx_backlog` bytes wait on the
  host. Other connections are not held up.
- Checkpoint consistency: every device action that touches guest memory runs
  under `device.lock` (a threading.RLock). A checkpointer that does not run on
  the device's event loop holds it from before pause() until after the
  capture, so that no device write straddles a harvest. The ring indices,
  slot states and queues live in guest memory, so they are in every
  checkpoint; `device_state()` adds the host's view (JSON) of the slots in
  use for the DEVICE_STATE frame.

Threads: the TCP side runs on one asyncio loop (start() must be awaited on
it; every public method except the port handlers must be called on it). The
port handlers run on vCPU threads and hop to the loop with
call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import resource
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import ring._native as native        # the native core (ring/native/stream.c: the checkpoint state)
from .errors import ConfigError, RingError, StateError
from .guest import layout

log = logging.getLogger(__name__)

# --- the ABI (stream.h) ---------------------------------------------------

STREAM_GPA = 0x500000
STREAM_MAGIC = 0x314D52545330434C          # "LC0STRM1" little-endian
STREAM_VERSION = 2
CTRL_SIZE = 128
RX_SIZE = 0x2000                           # per slot; powers of two (the header carries them)
TX_SIZE = 0x2000
DEFAULT_SLOTS = 1024                       # the client limit (Redis's maxclients is 10,000)
MAX_SLOTS = 1 << 16
PAGE = 4096

PORT_DOORBELL = 0x30
PORT_IDLE = 0x31

HEADER_DTYPE = np.dtype([
    ("magic", "<u8"), ("version", "<u8"), ("slots", "<u8"), ("ctrl_gpa", "<u8"), ("queue_gpa", "<u8"),
    ("queue_entries", "<u8"), ("rings_gpa", "<u8"), ("rx_size", "<u8"), ("tx_size", "<u8"),
    ("region_gpa", "<u8"), ("region_size", "<u8"), ("reserved", "<u8", 21),
    ("to_guest_head", "<u8"), ("to_host_tail", "<u8"), ("host_reserved", "<u8", 6),
    ("to_guest_tail", "<u8"), ("to_host_head", "<u8"), ("guest_reserved", "<u8", 6),
])
assert HEADER_DTYPE.itemsize == 0x180 and HEADER_DTYPE.fields["to_guest_head"][1] == 0x100
GEOMETRY = ("slots", "ctrl_gpa", "queue_gpa", "queue_entries", "rings_gpa", "rx_size", "tx_size",
            "region_gpa", "region_size")
CTRL_DTYPE = np.dtype([
    ("state", "<u8"), ("generation", "<u8"), ("rx_head", "<u8"), ("tx_tail", "<u8"), ("host_reserved", "<u8", 4),
    ("guest_generation", "<u8"), ("rx_tail", "<u8"), ("tx_head", "<u8"), ("busy", "<u8"), ("guest_reserved", "<u8", 4),
])
assert CTRL_DTYPE.itemsize == CTRL_SIZE
_FIELD_OFFSET = {name: CTRL_DTYPE.fields[name][1] for name in CTRL_DTYPE.names}
# The hot path reads and writes the slot table and the header's queue indices as 64-bit words
# through a memoryview (tens of ns a word; a numpy structured field costs microseconds here).
WORDS_PER_SLOT = CTRL_SIZE // 8
STATE, GENERATION, RX_HEAD, TX_TAIL = (_FIELD_OFFSET[n] // 8 for n in ("state", "generation", "rx_head", "tx_tail"))
GUEST_GENERATION, RX_TAIL, TX_HEAD, BUSY = (_FIELD_OFFSET[n] // 8 for n in ("guest_generation", "rx_tail",
                                                                              "tx_head", "busy"))
_HEADER_OFFSET = {name: HEADER_DTYPE.fields[name][1] for name in HEADER_DTYPE.names}
TO_GUEST_HEAD, TO_HOST_TAIL, TO_GUEST_TAIL, TO_HOST_HEAD = (
    _HEADER_OFFSET[n] // 8 for n in ("to_guest_head", "to_host_tail", "to_guest_tail", "to_host_head"))
#: the slot fields a checkpoint's device state records (and a restore checks against memory)
SLOT_FIELDS = ("state", "generation", "guest_generation", "rx_head", "rx_tail", "tx_head", "tx_tail")

assert STREAM_GPA >= layout.STACK_GPA + layout.MAX_VCPUS * layout.STACK_SIZE, "stream header overlaps the stacks"
assert STREAM_GPA + PAGE <= layout.LOW_SIZE, "stream header does not fit the low slot"

CLOSED, OPEN = 0, 1
MAX_CLIENTS_REPLY = b"-ERR max number of clients reached\r\n"

#: output(slot, data, generation): where TX bytes go (b"" = close after what came before).
Output = Callable[[int, bytes, int], None]


def _round_up(value: int, to: int = PAGE) -> int:
    return -(-value // to) * to


@dataclass(frozen=True)
class Geometry:
    """Where the device's slot table, queues and rings sit, for `slots` connections."""

    slots: int
    ctrl_gpa: int
    queue_gpa: int
    queue_entries: int
    rings_gpa: int
    rx_size: int
    tx_size: int
    region_gpa: int
    region_size: int

    @staticmethod
    def region_bytes(slots: int, rx_size: int = RX_SIZE, tx_size: int = TX_SIZE) -> int:
        """The data region the device takes for `slots` connections."""
        entries = _queue_entries(slots)
        return _round_up(slots * CTRL_SIZE) + _round_up(2 * entries * 4) + slots * (rx_size + tx_size)

    @classmethod
    def at_top(cls, slots: int, data_gpa: int, data_bytes: int) -> "Geometry":
        """The layout for a fresh guest: at the top of the data region."""
        if not 1 <= slots <= MAX_SLOTS:
            raise ConfigError(f"the stream device takes 1 to {MAX_SLOTS} client slots, not {slots}")
        size = cls.region_bytes(slots)
        if size > data_bytes // 2:
            raise ConfigError(f"{slots} client slots need {size >> 20} MiB of guest memory for the stream "
                              f"device, more than half of the {data_bytes >> 20} MiB data region")
        region = data_gpa + data_bytes - size
        entries = _queue_entries(slots)
        ctrl = region
        queue = ctrl + _round_up(slots * CTRL_SIZE)
        rings = queue + _round_up(2 * entries * 4)
        return cls(slots, ctrl, queue, entries, rings, RX_SIZE, TX_SIZE, region, size)

    @classmethod
    def from_header(cls, header, data_gpa: int, data_bytes: int) -> "Geometry":
        """The layout a header in restored memory describes, checked against the data region."""
        found = cls(**{name: int(header[name]) for name in GEOMETRY})
        problem = found._problem(data_gpa, data_bytes)
        if problem:
            raise StreamError(f"the stream device header at {STREAM_GPA:#x} describes {found}: {problem}: "
                              f"memory from another device version, or corrupt")
        return found

    def _problem(self, data_gpa: int, data_bytes: int) -> str:
        def power_of_two(value: int) -> bool:
            return value > 0 and value & (value - 1) == 0
        if not 1 <= self.slots <= MAX_SLOTS:
            return f"{self.slots} slots"
        if not (power_of_two(self.rx_size) and power_of_two(self.tx_size) and power_of_two(self.queue_entries)):
            return "ring and queue sizes must be powers of two"
        if self.queue_entries < self.slots:
            return "fewer queue entries than slots"
        end = data_gpa + data_bytes
        if not (data_gpa <= self.region_gpa and self.region_gpa + self.region_size <= end):
            return "the region is not inside the data region"
        parts = [(self.ctrl_gpa, self.slots * CTRL_SIZE), (self.queue_gpa, 2 * self.queue_entries * 4),
                 (self.rings_gpa, self.slots * (self.rx_size + self.tx_size))]
        if any(not (self.region_gpa <= gpa and gpa + size <= self.region_gpa + self.region_size)
               for gpa, size in parts):
            return "a part of it lies outside its region"
        ordered = sorted(parts)
        if any(a + size > b for (a, size), (b, _) in zip(ordered, ordered[1:])):
            return "its parts overlap"
        return ""

    def rx_gpa(self, slot: int) -> int:
        return self.rings_gpa + slot * (self.rx_size + self.tx_size)

    def ctrl_of(self, slot: int) -> int:
        return self.ctrl_gpa + slot * CTRL_SIZE


def _queue_entries(slots: int) -> int:
    entries = 64
    while entries < 2 * slots:
        entries *= 2
    return entries


class StreamError(RingError):
    """The stream device cannot work with this machine (a foreign or corrupt device region)."""


@dataclass(eq=False)
class _Client:
    """One TCP connection: waiting for a slot, in a slot, or closing."""

    transport: asyncio.Transport
    peer: str
    slot: int | None = None
    generation: int = 0
    pending: bytearray = field(default_factory=bytearray)    # RX bytes not in the ring yet
    acked: bool = False                                       # the guest reset the slot for us
    eof: bool = False
    reading_paused: bool = False
    writing_paused: bool = False                              # its socket is full: leave TX in the ring
    gone: bool = False


class _Protocol(asyncio.Protocol):
    def __init__(self, device: "StreamDevice") -> None:
        self.device = device
        self.client: _Client | None = None

    def connection_made(self, transport) -> None:
        peer = transport.get_extra_info("peername")
        name = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.client = _Client(transport, name)
        self.device._accept(self.client)

    def data_received(self, data: bytes) -> None:
        self.device._on_data(self.client, data)

    def eof_received(self) -> bool:
        return self.device._on_eof(self.client)      # True: keep the transport open for the replies

    def connection_lost(self, exc) -> None:
        self.device._on_lost(self.client)

    def pause_writing(self) -> None:
        self.client.writing_paused = True
        self.device.stats["write_pauses"] += 1

    def resume_writing(self) -> None:
        self.client.writing_paused = False
        self.device._on_writable(self.client)


class StreamDevice:
    """The VMM side of the stream device.

        device = StreamDevice("127.0.0.1", 6380, slots=1024)
        machine = open_machine(config, program=..., ports=device.ports)   # ring.backend
        device.attach(machine)           # before machine.start(): lays out or adopts the region
        await device.start()             # on the loop: listen, start the idle timer
        machine.start()
        ...
        device.close(); await device.wait_closed()
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, output: Output | None = None,
                 idle_interval: float = 0.05, rx_backlog: int = 256 << 10, slots: int = DEFAULT_SLOTS) -> None:
        if not 1 <= slots <= MAX_SLOTS:
            raise ConfigError(f"the stream device takes 1 to {MAX_SLOTS} client slots, not {slots}")
        self.host = host
        self.port = port
        self.output: Output = output or self.write_to_client
        self.idle_interval = idle_interval
        self.rx_backlog = rx_backlog
        self.slots = slots                  # a fresh layout's; an adopted one's comes from its header
        self.lock = threading.RLock()       # held around every write into guest memory
        self.machine = None
        self.geometry: Geometry | None = None
        self._header = None
        self._table = None                  # the slot table: a structured view (slots x CTRL_DTYPE)
        self._table_words = None            # the same table as (slots, WORDS_PER_SLOT) uint64 words
        self._state_prefix = _state_prefix(None)
        self._words = None                  # the same, as 64-bit words (the hot path's)
        self._header_words = None
        self._rx: list[np.ndarray] = []
        self._tx: list[np.ndarray] = []
        self._to_guest = None
        self._to_host = None
        self._slots: list[_Client | None] = []
        self._by_key: dict[tuple[int, int], _Client] = {}
        self._waiting: collections.deque[_Client] = collections.deque()
        self._free: collections.deque[int] = collections.deque()   # closed, acknowledged, no client
        self._is_free: set[int] = set()
        self._in_use = 0                    # clients holding a slot
        self._news: dict[int, None] = {}    # slots to name in to_guest (ordered, no repeats)
        self._touched: set[int] = set()     # slots to look at on the next pump, whatever the guest says
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        # wake-up bookkeeping, shared with the vCPU threads
        self._wake_lock = threading.Lock()
        self._kicked: set[int] = set()       # vCPUs that must not park: news came while they ran
        self._idle_parked: set[int] = set()  # vCPUs whose idle handler decided to park
        self._pump_scheduled = False
        self._noted_token = None             # see _note
        self._noted: set[int] = set()
        self.stats = collections.Counter()

    # -- wiring ------------------------------------------------------------------
    @property
    def listening(self) -> bool:
        """start() has opened the service port."""
        return self._server is not None

    @property
    def ports(self) -> dict:
        """The port handlers to pass to the machine: `open_machine(..., ports=device.ports)`."""
        return {PORT_DOORBELL: self._on_doorbell, PORT_IDLE: self._on_idle}

    def attach(self, machine) -> None:
        """Lay out the device region in a fresh guest, or adopt the one in restored memory.

        Adopting closes every slot the memory shows open (their clients were
        connected to another host): the guest resets them and they are reused.
        Call before machine.start().
        """
        if self.machine is not None:
            raise StateError("the stream device is already attached to a machine")
        memory = machine.memory
        header = memory.view(STREAM_GPA, HEADER_DTYPE.itemsize).view(HEADER_DTYPE)[0]
        with self.lock:
            self.machine = machine
            try:
                self._lay_out_or_adopt(machine, memory, header)
            except BaseException:
                self.machine = None
                self._header = self._table = self._to_guest = self._to_host = None
                self._words = self._header_words = self._table_words = None
                self._state_prefix = _state_prefix(None)
                self._rx, self._tx = [], []
                raise

    def _lay_out_or_adopt(self, machine, memory, header) -> None:
        """Write a fresh header, or check a restored one and close the slots it shows open."""
        data_gpa, data_bytes = layout.DATA_GPA, machine.config.data_bytes
        fresh = int(header["magic"]) == 0
        if fresh:
            if memory.view(STREAM_GPA, PAGE).any():
                raise StreamError(f"guest memory at {STREAM_GPA:#x} holds data but no stream device "
                                  f"header: the guest program overlaps the device region")
            geometry = Geometry.at_top(self.slots, data_gpa, data_bytes)
            params = machine.params
            heap_pages = (geometry.region_gpa - int(params["data_gpa"])) // PAGE
            if heap_pages < int(params["data_pages"]):
                params["data_pages"] = heap_pages          # the program's heap stops below the region
                machine.note_vmm_write(layout.PARAMS_GPA, layout.PARAMS_DTYPE.itemsize)
            record = np.zeros(1, HEADER_DTYPE)
            record["magic"], record["version"] = STREAM_MAGIC, STREAM_VERSION
            for name in GEOMETRY:
                record[name] = getattr(geometry, name)
            machine.write_memory(STREAM_GPA, record.view(np.uint8))
        else:
            if (int(header["magic"]), int(header["version"])) != (STREAM_MAGIC, STREAM_VERSION):
                raise StreamError(f"the stream device header at {STREAM_GPA:#x} has magic "
                                  f"{int(header['magic']):#x} version {int(header['version'])}, expected "
                                  f"{STREAM_MAGIC:#x} version {STREAM_VERSION}: memory from another device "
                                  f"version, or corrupt")
            geometry = Geometry.from_header(header, data_gpa, data_bytes)
        self.geometry, self.slots, self._header = geometry, geometry.slots, header
        table_bytes = memory.view(geometry.ctrl_gpa, geometry.slots * CTRL_SIZE)
        self._table = table_bytes.view(CTRL_DTYPE)
        self._words = memoryview(table_bytes).cast("Q")
        self._table_words = table_bytes.view("<u8").reshape(geometry.slots, WORDS_PER_SLOT)
        self._state_prefix = _state_prefix(geometry)
        self._header_words = memoryview(memory.view(STREAM_GPA, HEADER_DTYPE.itemsize)).cast("Q")
        queues = memory.view(geometry.queue_gpa, 2 * geometry.queue_entries * 4).view("<u4")
        self._to_guest, self._to_host = queues[:geometry.queue_entries], queues[geometry.queue_entries:]
        rings = memory.view(geometry.rings_gpa, geometry.slots * (geometry.rx_size + geometry.tx_size))
        rings = rings.reshape(geometry.slots, geometry.rx_size + geometry.tx_size)
        self._rx = [rings[s, :geometry.rx_size] for s in range(geometry.slots)]
        self._tx = [rings[s, geometry.rx_size:] for s in range(geometry.slots)]
        self._slots = [None] * geometry.slots
        closed = 0
        if not fresh:
            for slot in np.flatnonzero(self._table["state"] == OPEN).tolist():
                self._close_slot_memory(slot)
                closed += 1
            log.info("stream device adopted restored memory: closed %d connection(s) of the old host",
                     closed)
        # One look at every slot: free ones, TX left by the old host's clients, acknowledgements
        # still to come. From then on the queues say which slots changed.
        self._touched = set(range(geometry.slots))
        self._news = dict.fromkeys(np.flatnonzero(self._table["generation"] != self._table["guest_generation"])
                                   .tolist())

    async def start(self) -> None:
        """Listen on host:port (port 0: any; `self.port` says which) and start the idle timer."""
        if self.machine is None:
            raise StateError("attach() the stream device to a machine before start()")
        self._loop = asyncio.get_running_loop()
        _allow_descriptors(self.slots)
        self._server = await self._loop.create_server(lambda: _Protocol(self), self.host, self.port,
                                                      backlog=max(511, self.slots))   # (redis: 511)
        self.port = self._server.sockets[0].getsockname()[1]
        self._timer = self._loop.call_later(self.idle_interval, self._tick)
        self._pump()
        log.info("stream device listening on %s:%d (at most %d clients)", self.host, self.port, self.slots)

    def close(self) -> None:
        """Stop listening, drop every client, stop the timer (on the loop)."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._server is not None:
            self._server.close()
        for client in list(self._by_key.values()) + list(self._waiting):
            client.transport.abort()
        self._waiting.clear()
        self._by_key.clear()
        self._slots = []
        with self.lock:                       # let go of guest memory: the machine may unmap it now
            self._header = self._table = self._to_guest = self._to_host = None
            self._words = self._header_words = self._table_words = None
            self._state_prefix = _state_prefix(None)
            self._rx, self._tx = [], []
        # let parked vCPUs go (the machine may be closing too)
        runner = getattr(self.machine, "runner", None)
        if runner is not None:
            for vcpu in range(self.machine.config.vcpus):
                runner.release(vcpu, "idle")

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()

    # -- checkpoints -----------------------------------------------------------
    def save(self) -> bytes:
        """The device's state for a checkpoint (the DEVICE_STATE frame); see restore()."""
        return self.device_state()

    def restore(self, machine, saved: bytes) -> None:
        """Attach to a machine restored from a checkpoint whose device state is `saved`.

        The rings and the slot table live in guest memory, so the memory is the state;
        `saved` is the host's view taken in the same pause. Restoring checks that the two
        agree (a disagreement means the memory and the device state come from different
        checkpoints: refused, naming the slot and field), then adopts the memory, closing
        every connection it shows open. An empty `saved` (a guest without the device's
        state in its checkpoint) is adopted without the check.
        """
        if saved:
            self._check_saved(machine, saved)
        self.attach(machine)

    @staticmethod
    def _check_saved(machine, saved: bytes) -> None:
        memory = machine.memory
        try:
            state = json.loads(bytes(saved))
            slots = state["slots"]
            identity = (state["device"], state["version"], state["gpa"])
            geometry = state["geometry"]
        except (ValueError, KeyError, TypeError) as exc:
            raise StreamError(f"the saved stream device state is malformed: {exc}") from None
        if identity != ("stream", STREAM_VERSION, STREAM_GPA):
            raise StreamError(f"the saved stream device state is for {identity}, this device is "
                              f"{('stream', STREAM_VERSION, STREAM_GPA)}")
        header = memory.view(STREAM_GPA, HEADER_DTYPE.itemsize).view(HEADER_DTYPE)[0]
        try:
            found = {name: int(header[name]) for name in GEOMETRY}
            if found != {name: int(geometry[name]) for name in GEOMETRY}:
                raise StreamError(f"the stream device header in memory is {found}, the saved state says "
                                  f"{geometry}: they are not from the same checkpoint")
        except (KeyError, TypeError, ValueError) as exc:
            raise StreamError(f"the saved stream device state is malformed: {exc}") from None
        layout_ = Geometry.from_header(header, layout.DATA_GPA, machine.config.data_bytes)
        table = memory.view(layout_.ctrl_gpa, layout_.slots * CTRL_SIZE).view(CTRL_DTYPE)
        listed = set()
        for saved_slot in slots:
            try:
                slot = int(saved_slot["slot"])
                if not 0 <= slot < layout_.slots:
                    raise ValueError(f"slot {slot} out of range")
                listed.add(slot)
                for name in SLOT_FIELDS:
                    if int(table[slot][name]) != int(saved_slot[name]):
                        raise StreamError(f"slot {slot}: {name} is {int(table[slot][name])} in memory but "
                                          f"{saved_slot[name]} in the saved device state: they are not "
                                          f"from the same checkpoint")
            except (KeyError, TypeError, ValueError) as exc:
                raise StreamError(f"the saved stream device state is malformed: {exc}") from None
        in_use = set(np.flatnonzero(_in_use(table)).tolist())
        if in_use - listed:
            slot = min(in_use - listed)
            raise StreamError(f"slot {slot} is in use in memory but not in the saved device state: they are "
                              f"not from the same checkpoint")

    def device_state(self) -> bytes:
        """The device's state for a checkpoint (JSON): the geometry, and the slots in use as memory
        shows them (open, or a change the guest has not acknowledged, see _in_use). It runs in the
        pause: the slots' part is one native call (ring/native/stream.c) that writes the same bytes
        json.dumps would, with separators (",", ":")."""
        with self.lock:
            words, prefix = self._table_words, self._state_prefix
            body = "" if words is None else native.stream_slots(words, WORDS_PER_SLOT, STATE, GENERATION,
                                                                 GUEST_GENERATION, _STATE_COLUMNS, SLOT_FIELDS)
        return (prefix + body + "]}").encode()

    def slot_record(self, slot: int) -> dict[str, int]:
        """One slot's fields as guest memory holds them now."""
        record = self._table[slot]
        return {name: int(record[name]) for name in SLOT_FIELDS}

    def connections(self) -> list[tuple[int, int, str]]:
        """(slot, generation, peer) of every client holding a slot."""
        return [(client.slot, client.generation, client.peer) for client in self._slots if client is not None]

    # -- output ----------------------------------------------------------------
    def write_to_client(self, slot: int, data: bytes, generation: int | None = None) -> bool:
        """Write TX bytes to the slot's client (b"": close it); False if that connection is gone.

        `generation` names the connection the bytes were produced for (as passed
        to `output`); None means whatever client holds the slot now.
        """
        if generation is None:
            client = self._slots[slot] if 0 <= slot < len(self._slots) else None
        else:
            client = self._by_key.get((slot, generation))
        if client is None or client.gone or client.transport.is_closing():
            self.stats["tx_dropped"] += len(data)
            return False
        if data:
            client.transport.write(data)
            self.stats["tx_bytes"] += len(data)
        else:
            client.transport.close()         # after what is buffered
            self._by_key.pop((slot, client.generation), None)
        return True

    # -- the TCP side (loop thread) -----------------------------------------------
    def _accept(self, client: _Client) -> None:
        if self._closed:
            client.transport.abort()
            return
        if self._in_use + len(self._waiting) >= self.slots:
            self.stats["rejected"] += 1      # redis-server's answer beyond maxclients
            client.transport.write(MAX_CLIENTS_REPLY)
            client.transport.close()
            client.gone = True
            return
        self.stats["accepted"] += 1
        client.transport.pause_reading()
        client.reading_paused = True
        self._waiting.append(client)
        self._pump()

    def _on_data(self, client: _Client, data: bytes) -> None:
        if client.gone:
            return
        client.pending += data
        self.stats["rx_bytes"] += len(data)
        if client.slot is not None and not self._closed:
            with self.lock:
                if self._push_rx(client):
                    self._publish_news()
                    self._wake()
        if len(client.pending) > self.rx_backlog and not client.reading_paused:
            client.transport.pause_reading()
            client.reading_paused = True

    def _on_eof(self, client: _Client) -> bool:
        client.eof = True
        if client.slot is None:              # never got a slot: nothing to answer
            self._drop_waiting(client)
            client.transport.close()
        else:
            self._touched.add(client.slot)
            self._pump()
        return True

    def _on_lost(self, client: _Client) -> None:
        was_gone, client.gone = client.gone, True
        self._drop_waiting(client)
        if self._closed or was_gone:
            return
        if client.slot is not None:
            self._by_key.pop((client.slot, client.generation), None)
            if self._slots[client.slot] is client:
                with self.lock:
                    self._close_slot(client.slot)
        self._pump()

    def _on_writable(self, client: _Client) -> None:
        if client.slot is not None:
            self._touched.add(client.slot)
        self._pump()

    def _drop_waiting(self, client: _Client) -> None:
        try:
            self._waiting.remove(client)
        except ValueError:
            pass

    # -- guest memory (loop thread, under self.lock) -------------------------------
    def _note(self, gpa: int, length: int) -> None:
        """note_vmm_write, once per page between two harvests.

        The machine swaps its list of VMM writes at every harvest; a page already
        noted in the current list need not be noted again. Without a harvest (an
        unprotected service) this keeps that list from growing with every request.
        """
        machine = self.machine
        token = getattr(machine, "_vmm_dirty", None)
        first, last = gpa >> 12, (gpa + max(length, 1) - 1) >> 12
        if token is not None and token is self._noted_token:
            if first == last and first in self._noted:
                return
            if all(page in self._noted for page in range(first, last + 1)):
                return
        else:
            self._noted_token = token
            self._noted = set()
        machine.note_vmm_write(gpa, length)
        self._noted.update(range(first, last + 1))

    def _word(self, slot: int, field: int) -> int:
        return self._words[slot * WORDS_PER_SLOT + field]

    def _set(self, slot: int, field: int, value: int) -> None:
        self._words[slot * WORDS_PER_SLOT + field] = value
        self._note(self.geometry.ctrl_gpa + (slot * WORDS_PER_SLOT + field) * 8, 8)

    def _set_header(self, field: int, value: int) -> None:
        self._header_words[field] = value
        self._note(STREAM_GPA + field * 8, 8)

    def _close_slot_memory(self, slot: int) -> None:
        self._set(slot, STATE, CLOSED)
        self._set(slot, GENERATION, self._word(slot, GENERATION) + 1)
        self._news[slot] = None

    def _close_slot(self, slot: int) -> None:
        client = self._slots[slot]
        self._slots[slot] = None
        if client is not None:
            client.pending.clear()
            self._in_use -= 1
        self._close_slot_memory(slot)
        self.stats["closed"] += 1

    def _open_slot(self, slot: int, client: _Client) -> None:
        generation = self._word(slot, GENERATION) + 1
        self._set(slot, TX_TAIL, self._word(slot, TX_HEAD))      # drop what an older connection left
        self._set(slot, GENERATION, generation)
        self._set(slot, STATE, OPEN)
        client.slot, client.generation, client.acked = slot, generation, False
        self._slots[slot] = client
        self._in_use += 1
        self._by_key[(slot, generation)] = client
        self._news[slot] = None
        self.stats["opened"] += 1

    def _push_rx(self, client: _Client) -> bool:
        """Move the client's pending bytes into its RX ring as far as they fit."""
        slot = client.slot
        if not client.acked:
            if self._word(slot, GUEST_GENERATION) != client.generation:
                return False
            client.acked = True
        if not client.pending:
            return False
        size = self.geometry.rx_size
        head = self._word(slot, RX_HEAD)
        free = size - (head - self._word(slot, RX_TAIL))
        count = min(free, len(client.pending))
        if count <= 0:
            return False
        ring = self._rx[slot]
        at = head % size
        first = min(count, size - at)
        ring[at:at + first] = np.frombuffer(client.pending, np.uint8, first)
        if count > first:
            ring[:count - first] = np.frombuffer(client.pending, np.uint8, count - first, first)
        base = self.geometry.rx_gpa(slot)
        self._note(base + at, first)
        if count > first:
            self._note(base, count - first)
        del client.pending[:count]
        self._set(slot, RX_HEAD, head + count)                # publish after the data
        self._news[slot] = None
        if client.reading_paused and len(client.pending) < self.rx_backlog // 4 and not client.eof:
            client.transport.resume_reading()
            client.reading_paused = False
        return True

    def _drain_tx(self, slot: int) -> bool:
        """Hand the slot's new TX bytes to `output` (or drop them if their client is gone)."""
        head = self._word(slot, TX_HEAD)
        tail = self._word(slot, TX_TAIL)
        count = head - tail
        if count <= 0:
            return False
        client = self._slots[slot]
        if client is not None and client.writing_paused and not client.gone:
            return False                      # a slow reader: its TX ring fills and the guest waits
        size = self.geometry.tx_size
        if count > size:
            raise StreamError(f"slot {slot}: the guest's tx_head {head} is {count} bytes past tx_tail {tail}, "
                              f"more than the ring holds")
        ring = self._tx[slot]
        at = tail % size
        first = min(count, size - at)
        data = ring[at:at + first].tobytes()
        if count > first:
            data += ring[:count - first].tobytes()
        self._set(slot, TX_TAIL, head)
        self._news[slot] = None               # TX space came back
        if client is not None and client.acked:
            self.output(slot, data, client.generation)
        else:
            self.stats["tx_dropped"] += len(data)
        return True

    def _service(self, slot: int) -> None:
        """Everything the device does for one slot: TX out, RX in, the close of an answered
        half-closed connection, or the slot's return to the free list."""
        client = self._slots[slot]
        word, base = self._words, slot * WORDS_PER_SLOT
        if client is None:
            if word[base + STATE] == CLOSED:
                self._drain_tx(slot)                              # leftovers of a closed connection
                if word[base + GUEST_GENERATION] == word[base + GENERATION] and slot not in self._is_free:
                    self._is_free.add(slot)
                    self._free.append(slot)
            return
        rx_tail, busy = word[base + RX_TAIL], word[base + BUSY]   # before the TX drain
        self._drain_tx(slot)
        self._push_rx(client)
        if (client.eof and client.acked and not client.pending and busy == 0
                and rx_tail == word[base + RX_HEAD] and word[base + TX_HEAD] == word[base + TX_TAIL]):
            generation = client.generation
            self._close_slot(slot)                                # half-closed and answered
            self.output(slot, b"", generation)

    def _guest_said(self) -> list[int]:
        """The slots the guest named in to_host since we last looked (consumed)."""
        head, tail = self._header_words[TO_HOST_HEAD], self._header_words[TO_HOST_TAIL]
        count = head - tail
        if count <= 0:
            return []
        entries = self.geometry.queue_entries
        if count > entries:
            raise StreamError(f"the guest's to_host_head {head} is {count} entries past to_host_tail {tail}, "
                              f"more than the queue holds")
        at = tail % entries
        said = self._to_host[at:at + count]
        if at + count > entries:
            said = np.concatenate([said, self._to_host[:at + count - entries]])
        self._set_header(TO_HOST_TAIL, head)
        slots = said[said < self.slots]
        self.stats["guest_news"] += count
        return np.unique(slots).tolist() if count > 8 else list(dict.fromkeys(slots.tolist()))

    def _publish_news(self) -> bool:
        """Name the slots we changed in to_guest, as far as it has room (the rest next time)."""
        if not self._news:
            return False
        entries = self.geometry.queue_entries
        head = self._header_words[TO_GUEST_HEAD]
        room = entries - (head - self._header_words[TO_GUEST_TAIL])
        if room <= 0:
            return False
        news = list(self._news)
        batch = news[:room]
        for slot in batch:
            del self._news[slot]
        at = head % entries
        first = min(len(batch), entries - at)
        self._to_guest[at:at + first] = batch[:first]
        self._note(self.geometry.queue_gpa + at * 4, first * 4)
        if len(batch) > first:
            self._to_guest[:len(batch) - first] = batch[first:]
            self._note(self.geometry.queue_gpa, (len(batch) - first) * 4)
        self._set_header(TO_GUEST_HEAD, head + len(batch))     # publish after the entries
        return True

    def _pump(self) -> None:
        """Everything the device does for the guest: the slots it named and ours, then opens, news, wake."""
        with self._wake_lock:
            self._pump_scheduled = False
        if self._closed or self.machine is None:
            return
        with self.lock:
            touched, self._touched = self._touched, set()
            for slot in self._guest_said():
                touched.add(slot)
            for slot in touched:
                self._service(slot)
            while self._waiting and self._free:
                slot = self._free.popleft()
                self._is_free.discard(slot)
                if (self._slots[slot] is not None or self._word(slot, STATE) != CLOSED
                        or self._word(slot, GUEST_GENERATION) != self._word(slot, GENERATION)):
                    continue                                      # (not free after all)
                client = self._waiting.popleft()
                self._open_slot(slot, client)
                client.transport.resume_reading()
                client.reading_paused = False
            if self._publish_news():
                self._wake()

    def _tick(self) -> None:
        if self._closed:
            return
        self._pump()
        runner = self.machine.runner
        with self._wake_lock:
            self._idle_parked.clear()
        for vcpu in range(self.machine.config.vcpus):
            runner.release(vcpu, "idle")
        self._timer = self._loop.call_later(self.idle_interval, self._tick)

    # -- the vCPU side -------------------------------------------------------------
    def _schedule_pump(self) -> None:
        loop = self._loop
        if loop is None or self._closed:
            return
        with self._wake_lock:
            if self._pump_scheduled:
                return
            self._pump_scheduled = True
        try:
            loop.call_soon_threadsafe(self._pump)
        except RuntimeError:                  # the loop is closed: we are shutting down
            pass

    def _on_doorbell(self, vcpu: int, value: int):
        """OUT DOORBELL (vCPU thread): the guest named slots in to_host; the loop serves them."""
        self.stats["doorbells"] += 1
        self._schedule_pump()
        return None

    def _on_idle(self, vcpu: int, value: int):
        """OUT IDLE (vCPU thread): park unless news arrived since the guest last looked."""
        with self._wake_lock:
            if vcpu in self._kicked:
                self._kicked.discard(vcpu)
                park = False
            else:
                self._idle_parked.add(vcpu)
                park = True
        self._schedule_pump()                 # the guest may have named slots without a doorbell
        if park:
            self.stats["idle_parks"] += 1
            return None, "idle"
        return None

    def _wake(self) -> None:
        """The device changed guest memory: make sure the guest looks again.

        A vCPU whose idle handler already decided to park is released once its
        park is in place (the runner records it right after the handler
        returns); otherwise the next idle OUT returns at once instead of parking.
        """
        with self._wake_lock:
            parked, self._idle_parked = self._idle_parked, set()
            if self.machine is not None:
                self._kicked = set(range(self.machine.config.vcpus)) - parked
        runner = getattr(self.machine, "runner", None)
        if runner is None:
            return
        for vcpu in parked:
            deadline = time.monotonic() + 0.05
            while runner.hold_reason(vcpu) != "idle" and time.monotonic() < deadline:
                time.sleep(0)                 # microseconds: the vCPU thread is between handler and park
            runner.release(vcpu, "idle")
            self.stats["wakes"] += 1


def _allow_descriptors(slots: int) -> None:
    """Raise the process's open-file limit to hold `slots` clients (as redis-server does), up to
    the hard limit; say so when even that is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = slots + 256                       # the agent's own sockets, files and the loop's
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < needed:
            log.warning("the open-file limit is %d (hard); %d clients need about %d: clients beyond "
                        "it will be refused by the kernel", target, slots, needed)


# device_state()'s JSON: a slot's object has SLOT_FIELDS in order, then "slot"
_STATE_COLUMNS = tuple(_FIELD_OFFSET[name] // 8 for name in SLOT_FIELDS)


def _state_prefix(geometry: "Geometry | None") -> str:
    """device_state()'s JSON up to its slots: identity and geometry (fixed while attached)."""
    layout_ = {name: getattr(geometry, name) for name in GEOMETRY} if geometry else {}
    head = json.dumps({"device": "stream", "version": STREAM_VERSION, "gpa": STREAM_GPA, "geometry": layout_},
                      separators=(",", ":"))
    return head[:-1] + ',"slots":['


def _in_use(table) -> np.ndarray:
    """Slots a checkpoint must describe: open, or with a change the guest has not acknowledged."""
    return (table["state"] != CLOSED) | (table["generation"] != table["guest_generation"])
