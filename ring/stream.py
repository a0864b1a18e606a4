"""The paravirtual stream device: TCP clients <-> rings in guest memory.

The VMM accepts TCP connections on a service port and gives each one a
connection slot in guest memory: a control page, a receive (RX) ring the
VMM fills with the client's bytes, and a transmit (TX) ring the guest fills
with replies. The guest OUTs a doorbell port after producing TX bytes and an
idle port when it has nothing to do. The ABI is ring/guest/programs/stream.h
(mirrored here: change both).

Some facts this module is built on:

- The VMM's own stores into guest memory are not in the dirty ring. Every
  store here (RX bytes, rx_head, tx_tail, state, generation, the header) is
  followed by `machine.note_vmm_write()`, so that the next harvest carries it
  into the checkpoint. The data is stored before it is noted: a harvest that
  sees the note copies the page after the store.
- vCPUs run while the device writes. The indices are free-running byte
  counters, each written by one side only, so nothing is ever reset under
  the other side's feet. Writers store the data before the index that
  publishes it and readers load the index before the data; x86 is TSO, and
  numpy's stores of at most a ring's size (16 KiB) are plain stores, far
  below the size at which glibc's memcpy switches to non-temporal ones, so
  that order is what the other side sees.
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
  capture, so that no device write straddles a harvest. The ring indices and
  slot states live in guest memory, so they are in every checkpoint;
  `device_state()` adds the host's view (JSON) for the DEVICE_STATE frame.

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
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import RingError, StateError
from .guest import layout

log = logging.getLogger(__name__)

# --- the ABI (stream.h) ---------------------------------------------------

STREAM_GPA = 0x500000
STREAM_MAGIC = 0x314D52545330434C          # "LC0STRM1" little-endian
STREAM_VERSION = 1
STREAM_SLOTS = 32
CTRL_SIZE = 0x1000
RX_SIZE = 0x4000
TX_SIZE = 0x4000
SLOT_STRIDE = CTRL_SIZE + RX_SIZE + TX_SIZE
SLOTS_GPA = STREAM_GPA + 0x1000
STREAM_END = SLOTS_GPA + STREAM_SLOTS * SLOT_STRIDE

PORT_DOORBELL = 0x30
PORT_IDLE = 0x31

HEADER_DTYPE = np.dtype([("magic", "<u8"), ("version", "<u8"), ("slots", "<u8"), ("ctrl_size", "<u8"),
                         ("rx_size", "<u8"), ("tx_size", "<u8"), ("slots_gpa", "<u8"), ("slot_stride", "<u8")])
CTRL_DTYPE = np.dtype([
    ("state", "<u8"), ("generation", "<u8"), ("rx_head", "<u8"), ("tx_tail", "<u8"), ("host_reserved", "<u8", 4),
    ("guest_generation", "<u8"), ("rx_tail", "<u8"), ("tx_head", "<u8"), ("busy", "<u8"), ("guest_reserved", "<u8", 4),
])
assert CTRL_DTYPE.itemsize == 128
_FIELD_OFFSET = {name: CTRL_DTYPE.fields[name][1] for name in CTRL_DTYPE.names}

assert STREAM_GPA >= layout.STACK_GPA + layout.MAX_VCPUS * layout.STACK_SIZE, "stream region overlaps the stacks"
assert STREAM_END <= layout.LOW_SIZE, "stream region does not fit the low slot"

CLOSED, OPEN = 0, 1

#: output(slot, data, generation): where TX bytes go (b"" = close after what came before).
Output = Callable[[int, bytes, int], None]


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
        self.device._on_eof(self.client)
        return True                      # keep the transport open for the replies

    def connection_lost(self, exc) -> None:
        self.device._on_lost(self.client)

    def pause_writing(self) -> None:
        self.client.writing_paused = True
        self.device.stats["write_pauses"] += 1

    def resume_writing(self) -> None:
        self.client.writing_paused = False
        self.device._pump()


class StreamDevice:
    """The VMM side of the stream device.

        device = StreamDevice("127.0.0.1", 6380)
        machine = open_machine(config, program=..., ports=device.ports)   # ring.backend
        device.attach(machine)           # before machine.start(): lays out or adopts the region
        await device.start()             # on the loop: listen, start the idle timer
        machine.start()
        ...
        device.close(); await device.wait_closed()
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, output: Output | None = None,
                 idle_interval: float = 0.05, rx_backlog: int = 256 << 10) -> None:
        self.host = host
        self.port = port
        self.output: Output = output or self.write_to_client
        self.idle_interval = idle_interval
        self.rx_backlog = rx_backlog
        self.lock = threading.RLock()       # held around every write into guest memory
        self.machine = None
        self._ctrls: list = []
        self._rx: list[np.ndarray] = []
        self._tx: list[np.ndarray] = []
        self._slots: list[_Client | None] = [None] * STREAM_SLOTS
        self._by_key: dict[tuple[int, int], _Client] = {}
        self._waiting: collections.deque[_Client] = collections.deque()
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
                self._ctrls, self._rx, self._tx = [], [], []
                raise

    def _lay_out_or_adopt(self, machine, memory, header) -> None:
        """Write a fresh header, or check a restored one and close the slots it shows open."""
        fresh = int(header["magic"]) == 0
        if fresh:
            region = memory.view(STREAM_GPA, STREAM_END - STREAM_GPA)
            if region.any():
                raise StreamError(f"guest memory at {STREAM_GPA:#x} holds data but no stream device "
                                  f"header: the guest program overlaps the device region")
            values = dict(magic=STREAM_MAGIC, version=STREAM_VERSION, slots=STREAM_SLOTS,
                          ctrl_size=CTRL_SIZE, rx_size=RX_SIZE, tx_size=TX_SIZE, slots_gpa=SLOTS_GPA,
                          slot_stride=SLOT_STRIDE)
            record = np.zeros(1, HEADER_DTYPE)
            for name, value in values.items():
                record[name] = value
            machine.write_memory(STREAM_GPA, record.view(np.uint8))
        else:
            expected = (STREAM_MAGIC, STREAM_VERSION, STREAM_SLOTS, CTRL_SIZE, RX_SIZE, TX_SIZE, SLOTS_GPA,
                        SLOT_STRIDE)
            found = tuple(int(header[name]) for name in HEADER_DTYPE.names)
            if found != expected:
                raise StreamError(f"the stream device header at {STREAM_GPA:#x} is {found}, expected "
                                  f"{expected}: memory from another device version, or corrupt")
        self._ctrls = [memory.view(self._ctrl_gpa(s), CTRL_DTYPE.itemsize).view(CTRL_DTYPE)[0]
                       for s in range(STREAM_SLOTS)]
        self._rx = [memory.view(self._ctrl_gpa(s) + CTRL_SIZE, RX_SIZE) for s in range(STREAM_SLOTS)]
        self._tx = [memory.view(self._ctrl_gpa(s) + CTRL_SIZE + RX_SIZE, TX_SIZE) for s in range(STREAM_SLOTS)]
        if not fresh:
            closed = 0
            for slot in range(STREAM_SLOTS):
                if int(self._ctrls[slot]["state"]) == OPEN:
                    self._close_slot_memory(slot)
                    closed += 1
            log.info("stream device adopted restored memory: closed %d connection(s) of the old host",
                     closed)

    async def start(self) -> None:
        """Listen on host:port (port 0: any; `self.port` says which) and start the idle timer."""
        if self.machine is None:
            raise StateError("attach() the stream device to a machine before start()")
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(lambda: _Protocol(self), self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._timer = self._loop.call_later(self.idle_interval, self._tick)
        self._wake()
        log.info("stream device listening on %s:%d (%d slots)", self.host, self.port, STREAM_SLOTS)

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
        self._slots = [None] * STREAM_SLOTS
        with self.lock:                       # let go of guest memory: the machine may unmap it now
            self._ctrls, self._rx, self._tx = [], [], []
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
            self._check_saved(machine.memory, saved)
        self.attach(machine)

    @staticmethod
    def _check_saved(memory, saved: bytes) -> None:
        try:
            state = json.loads(bytes(saved))
            slots = state["slots"]
            header = (state["device"], state["version"], state["gpa"], len(slots))
        except (ValueError, KeyError, TypeError) as exc:
            raise StreamError(f"the saved stream device state is malformed: {exc}") from None
        if header != ("stream", STREAM_VERSION, STREAM_GPA, STREAM_SLOTS):
            raise StreamError(f"the saved stream device state is for {header}, this device is "
                              f"{('stream', STREAM_VERSION, STREAM_GPA, STREAM_SLOTS)}")
        fields = ("state", "generation", "guest_generation", "rx_head", "rx_tail", "tx_head", "tx_tail")
        for saved_slot in slots:
            try:
                slot = int(saved_slot["slot"])
                if not 0 <= slot < STREAM_SLOTS:
                    raise ValueError(f"slot {slot} out of range")
                ctrl = memory.view(StreamDevice._ctrl_gpa(slot), CTRL_DTYPE.itemsize).view(CTRL_DTYPE)[0]
                for name in fields:
                    if int(ctrl[name]) != int(saved_slot[name]):
                        raise StreamError(f"slot {slot}: {name} is {int(ctrl[name])} in memory but "
                                          f"{saved_slot[name]} in the saved device state: they are not "
                                          f"from the same checkpoint")
            except (KeyError, TypeError, ValueError) as exc:
                raise StreamError(f"the saved stream device state is malformed: {exc}") from None

    def device_state(self) -> bytes:
        """The device's state for a checkpoint (JSON): the slot table as memory and the host see it."""
        slots = []
        with self.lock:
            for slot in range(len(self._ctrls)):       # none once closed
                ctrl = self._ctrls[slot]
                client = self._slots[slot]
                slots.append({
                    "slot": slot, "state": int(ctrl["state"]), "generation": int(ctrl["generation"]),
                    "guest_generation": int(ctrl["guest_generation"]), "rx_head": int(ctrl["rx_head"]),
                    "rx_tail": int(ctrl["rx_tail"]), "tx_head": int(ctrl["tx_head"]),
                    "tx_tail": int(ctrl["tx_tail"]), "peer": client.peer if client is not None else None,
                })
        return json.dumps({"device": "stream", "version": STREAM_VERSION, "gpa": STREAM_GPA,
                           "slots": slots}, separators=(",", ":")).encode()

    def slot_pages(self) -> list[tuple[int, int]]:
        """(gpa, length) of every slot's RX ring: the pages this device writes data into."""
        return [(self._ctrl_gpa(s) + CTRL_SIZE, RX_SIZE) for s in range(STREAM_SLOTS)]

    # -- output ----------------------------------------------------------------
    def write_to_client(self, slot: int, data: bytes, generation: int | None = None) -> bool:
        """Write TX bytes to the slot's client (b"": close it); False if that connection is gone.

        `generation` names the connection the bytes were produced for (as passed
        to `output`); None means whatever client holds the slot now.
        """
        if generation is None:
            client = self._slots[slot] if 0 <= slot < STREAM_SLOTS else None
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
        self.stats["accepted"] += 1
        client.transport.pause_reading()
        client.reading_paused = True
        self._waiting.append(client)
        self._pump()

    def _on_data(self, client: _Client, data: bytes) -> None:
        client.pending += data
        self.stats["rx_bytes"] += len(data)
        if client.slot is not None and not self._closed:
            with self.lock:
                if self._push_rx(client):
                    self._wake()
        if len(client.pending) > self.rx_backlog and not client.reading_paused:
            client.transport.pause_reading()
            client.reading_paused = True

    def _on_eof(self, client: _Client) -> None:
        client.eof = True
        if client.slot is None:              # never got a slot: nothing to answer
            self._drop_waiting(client)
            client.transport.close()
        else:
            self._pump()

    def _on_lost(self, client: _Client) -> None:
        client.gone = True
        self._drop_waiting(client)
        if self._closed:
            return
        if client.slot is not None:
            self._by_key.pop((client.slot, client.generation), None)
            if self._slots[client.slot] is client:
                with self.lock:
                    self._close_slot(client.slot)
                    self._wake()
        self._pump()

    def _drop_waiting(self, client: _Client) -> None:
        try:
            self._waiting.remove(client)
        except ValueError:
            pass

    # -- guest memory (loop thread, under self.lock) -------------------------------
    @staticmethod
    def _ctrl_gpa(slot: int) -> int:
        return SLOTS_GPA + slot * SLOT_STRIDE

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
            if all(page in self._noted for page in range(first, last + 1)):
                return
        else:
            self._noted_token = token
            self._noted = set()
        machine.note_vmm_write(gpa, length)
        self._noted.update(range(first, last + 1))

    def _set(self, slot: int, name: str, value: int) -> None:
        self._ctrls[slot][name] = value
        self._note(self._ctrl_gpa(slot) + _FIELD_OFFSET[name], 8)

    def _close_slot_memory(self, slot: int) -> None:
        ctrl = self._ctrls[slot]
        self._set(slot, "state", CLOSED)
        self._set(slot, "generation", int(ctrl["generation"]) + 1)

    def _close_slot(self, slot: int) -> None:
        client = self._slots[slot]
        self._slots[slot] = None
        if client is not None:
            client.pending.clear()
        self._close_slot_memory(slot)
        self.stats["closed"] += 1

    def _slot_free(self, slot: int) -> bool:
        ctrl = self._ctrls[slot]
        return (self._slots[slot] is None and int(ctrl["state"]) == CLOSED
                and int(ctrl["guest_generation"]) == int(ctrl["generation"]))

    def _open_slot(self, slot: int, client: _Client) -> None:
        ctrl = self._ctrls[slot]
        generation = int(ctrl["generation"]) + 1
        self._set(slot, "tx_tail", int(ctrl["tx_head"]))      # drop what an older connection left
        self._set(slot, "generation", generation)
        self._set(slot, "state", OPEN)
        client.slot, client.generation, client.acked = slot, generation, False
        self._slots[slot] = client
        self._by_key[(slot, generation)] = client
        self.stats["opened"] += 1

    def _push_rx(self, client: _Client) -> bool:
        """Move the client's pending bytes into its RX ring as far as they fit."""
        slot = client.slot
        ctrl = self._ctrls[slot]
        if not client.acked:
            if int(ctrl["guest_generation"]) != client.generation:
                return False
            client.acked = True
        if not client.pending:
            return False
        head = int(ctrl["rx_head"])
        free = RX_SIZE - (head - int(ctrl["rx_tail"]))
        count = min(free, len(client.pending))
        if count <= 0:
            return False
        ring = self._rx[slot]
        at = head % RX_SIZE
        first = min(count, RX_SIZE - at)
        ring[at:at + first] = np.frombuffer(client.pending, np.uint8, first)
        if count > first:
            ring[:count - first] = np.frombuffer(client.pending, np.uint8, count - first, first)
        base = self._ctrl_gpa(slot) + CTRL_SIZE
        self._note(base + at, first)
        if count > first:
            self._note(base, count - first)
        del client.pending[:count]
        self._set(slot, "rx_head", head + count)              # publish after the data
        if client.reading_paused and len(client.pending) < self.rx_backlog // 4 and not client.eof:
            client.transport.resume_reading()
            client.reading_paused = False
        return True

    def _drain_tx(self, slot: int) -> bool:
        """Hand the slot's new TX bytes to `output` (or drop them if their client is gone)."""
        ctrl = self._ctrls[slot]
        head = int(ctrl["tx_head"])
        tail = int(ctrl["tx_tail"])
        count = head - tail
        if count <= 0:
            return False
        client = self._slots[slot]
        if client is not None and client.writing_paused and not client.gone:
            return False                      # a slow reader: its TX ring fills and the guest waits
        if count > TX_SIZE:
            raise StreamError(f"slot {slot}: the guest's tx_head {head} is {count} bytes past tx_tail {tail}, "
                              f"more than the ring holds")
        ring = self._tx[slot]
        at = tail % TX_SIZE
        first = min(count, TX_SIZE - at)
        data = ring[at:at + first].tobytes()
        if count > first:
            data += ring[:count - first].tobytes()
        self._set(slot, "tx_tail", head)
        if client is not None and client.acked:
            self.output(slot, data, client.generation)
        else:
            self.stats["tx_dropped"] += len(data)
        return True

    def _pump(self) -> None:
        """Everything the device does for the guest: TX out, RX in, closes, opens, then wake it."""
        with self._wake_lock:
            self._pump_scheduled = False
        if self._closed or self.machine is None:
            return
        changed = False
        with self.lock:
            for slot in range(STREAM_SLOTS):
                client = self._slots[slot]
                ctrl = self._ctrls[slot]
                if client is None:
                    if int(ctrl["state"]) == CLOSED:
                        changed |= self._drain_tx(slot)       # leftovers of a closed connection
                    continue
                rx_tail, busy = int(ctrl["rx_tail"]), int(ctrl["busy"])   # before the TX drain
                changed |= self._drain_tx(slot)
                changed |= self._push_rx(client)
                if (client.eof and client.acked and not client.pending and busy == 0
                        and rx_tail == int(ctrl["rx_head"]) and int(ctrl["tx_head"]) == int(ctrl["tx_tail"])):
                    generation = client.generation
                    self._close_slot(slot)                        # half-closed and answered
                    changed = True
                    self.output(slot, b"", generation)
            while self._waiting:
                slot = next((s for s in range(STREAM_SLOTS) if self._slot_free(s)), None)
                if slot is None:
                    break
                client = self._waiting.popleft()
                self._open_slot(slot, client)
                client.transport.resume_reading()
                client.reading_paused = False
                changed = True
            if changed:
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
        """OUT DOORBELL (vCPU thread): TX bytes are waiting; the loop drains every slot."""
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
        self._schedule_pump()                 # TX may wait (a missed doorbell), or RX room came back
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
