"""The primary agent: the asyncio shell around the epoch protocol.

It owns the guest (a KvmMachine), the ZeroMQ socket to the replica, the
staging pool, the encoder and the triggers, and it does what the sans-I/O
PrimaryProtocol tells it: connect, sync, snapshot, send, release outputs,
hold or resume the guest. Everything the protocol decides comes from events
this shell feeds it (guest exits, frames, ticks of the clock).

Threads: vCPUs run in their own threads and post their exits to the loop
with call_soon_threadsafe; page batches are encoded in a thread pool (zstd
and xxhash release the GIL); the stop-the-world snapshot runs on the loop
(it is a few hundred microseconds, and nothing else may run during it).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import zmq
import zmq.asyncio
from tqdm import tqdm

from ring.backend import open_machine
from ring.dirty import DirtySet
from ring.errors import ConfigError
from ring.machine import KvmMachine, Machine
from ring.stream import StreamDevice
from scenarios.service import KVSTORE, write_service_params
from ring.vcpus import Done, Event, Fault, Output, Progress, RingSoftFull

from . import protocol as proto
from . import wire
from .codec import CodecError, EpochDigest, PageEncoder
from .config import SERVICE_WORKLOAD, PrimaryAgentConfig, TriggerSection
from .security import client_keys, secure_client
from .output import OutputBuffer
from .snapshot import Snapshot, Snapshotter, StagingPool, page_keys, staging_capacity

log = logging.getLogger("colo.primary")

SWITCH_INTERVAL = 0.0002
INLINE_ENCODE_PAGES = 32          # smaller epochs are encoded on the loop: a thread handoff costs more


def set_zmq_heartbeats(socket: zmq.Socket, heartbeat_ms: int, timeout_ms: int) -> None:
    """ZeroMQ's own heartbeats: a dead TCP peer is dropped even when nothing is sent."""
    socket.setsockopt(zmq.HEARTBEAT_IVL, max(1, heartbeat_ms))
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, timeout_ms))
    socket.setsockopt(zmq.HEARTBEAT_TTL, max(100, timeout_ms))


class Stats:
    """Rolling figures for the status file and the log line."""

    def __init__(self, window: int = 2048) -> None:
        self.pause_us = collections.deque(maxlen=window)
        self.parts_us: dict[str, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=window))
        self.dirty_pages = collections.deque(maxlen=window)
        self.epoch_times = collections.deque(maxlen=window)
        self.raw_bytes = collections.deque(maxlen=window)
        self.encoded_bytes = collections.deque(maxlen=window)
        self.first_write_us = collections.deque(maxlen=window)
        self.epochs = 0
        self.reasons: collections.Counter[str] = collections.Counter()

    def record(self, snapshot: Snapshot, raw: int, encoded: int) -> None:
        now = time.monotonic()
        self.epochs += 1
        self.reasons[snapshot.reason] += 1
        self.pause_us.append(snapshot.pause_ns / 1000)
        for part, ns in snapshot.times_ns.items():
            self.parts_us[part].append(ns / 1000)
        self.dirty_pages.append(len(snapshot.keys))
        self.epoch_times.append(now)
        self.raw_bytes.append((now, raw))
        self.encoded_bytes.append((now, encoded))

    @staticmethod
    def _pct(values, q: float) -> float:
        return float(np.percentile(np.fromiter(values, float), q)) if values else 0.0

    def summary(self, horizon: float = 5.0) -> dict:
        now = time.monotonic()
        recent = [t for t in self.epoch_times if now - t <= horizon]
        span = min(horizon, now - recent[0]) if len(recent) > 1 else horizon
        raw = sum(b for t, b in self.raw_bytes if now - t <= horizon)
        encoded = sum(b for t, b in self.encoded_bytes if now - t <= horizon)
        return {
            "checkpoints_per_s": len(recent) / span if span > 0 else 0.0,
            "pause_us_p50": self._pct(self.pause_us, 50),
            "pause_us_p99": self._pct(self.pause_us, 99),
            "dirty_pages_p50": self._pct(self.dirty_pages, 50),
            "raw_mb_per_s": raw / span / 1e6 if span > 0 else 0.0,
            "encoded_mb_per_s": encoded / span / 1e6 if span > 0 else 0.0,
            "pause_parts_us_p50": {part: self._pct(values, 50) for part, values in self.parts_us.items()},
        }


def _rss_mib() -> float:
    """This process's resident memory (for the status file: bounded under backpressure)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


async def status_loop(settings, figures: Callable[[], dict], log_line: Callable[[dict], None]) -> None:
    """Both agents: the status file replaced every second, a log line every log_interval_s."""
    last_log = time.monotonic()
    while True:
        await asyncio.sleep(min(1.0, settings.log_interval_s))
        current = figures()
        if settings.status_json:
            write_status(settings.status_json, current)
        if time.monotonic() - last_log >= settings.log_interval_s:
            last_log = time.monotonic()
            log_line(current)


def write_status(path: str, status: dict) -> None:
    """Replace the status file atomically (write a temporary file, then rename)."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as handle:
        json.dump(status, handle, indent=1, sort_keys=True)
    os.replace(temporary, path)


@dataclass
class Hooks:
    """Test hooks: called at protocol points (never needed in production)."""

    on_snapshot: Callable[[Snapshot, Machine], None] | None = None     # called while paused
    on_frame_sent: Callable[[int, int, str], None] | None = None      # (epoch, kind, step)
    on_ack: Callable[[int], None] | None = None


class PrimaryAgent:
    """Protect one guest: run it, checkpoint it to the replica, release its outputs on ack."""

    def __init__(self, config: PrimaryAgentConfig, *, hooks: Hooks | None = None,
                 output_sink: Callable[[bytes], None] | None = None) -> None:
        self.config = config
        self.hooks = hooks or Hooks()
        self.output_sink = output_sink or (lambda data: log.info("guest output: %r", data))
        if not config.security.insecure:
            client_keys(config.security)           # bad keys fail here, before a guest runs
        guest = config.guest
        self.device: StreamDevice | None = None
        if guest.workload == SERVICE_WORKLOAD:
            # The service guest: its stream device's output goes through output commit.
            self.device = StreamDevice(guest.service_host, guest.service_port, output=self._device_output)
            self.machine = KvmMachine(guest.machine_config(), guest.workload_config(), program=str(KVSTORE),
                                      ports=self.device.ports)
            write_service_params(self.machine, guest.table_entries, guest.request_max)
            self.device.attach(self.machine)
        else:
            self.machine = open_machine(guest.machine_config(), guest.workload_config(), backend=guest.backend)
        replication = config.replication
        self.protocol = proto.PrimaryProtocol(proto.PrimaryConfig(
            max_in_flight=replication.max_in_flight,
            heartbeat_interval=replication.heartbeat_ms / 1000,
            replica_timeout=replication.timeout_ms / 1000,
            max_interval=(config.triggers.max_interval_ms / 1000) or None,
        ))
        extra = max(replication.precopy_done_pages, config.triggers.dirty_pages, 1024)
        # One buffer per epoch that may await encoding (at most max_in_flight) plus one:
        # acquiring a buffer then never waits, and the loop never blocks on it.
        self.pool = StagingPool(replication.max_in_flight + 1, staging_capacity(self.machine, extra))
        self.snapshotter = Snapshotter(self.machine, self.pool)
        self.encoder = PageEncoder(cache_pages=replication.cache_pages, level=replication.zstd_level)
        self.executor = ThreadPoolExecutor(replication.encode_threads, thread_name_prefix="encode")
        self.context = zmq.asyncio.Context()
        self.socket: zmq.asyncio.Socket | None = None
        self.writer: wire.FrameWriter | None = None
        self.guard: wire.FrameGuard | None = None
        self.stats = Stats()
        self.output = OutputBuffer()
        self._snapshots: dict[int, Snapshot] = {}
        self._precopy: collections.deque = collections.deque()
        self._send_lock = asyncio.Lock()
        self._encoding: set[asyncio.Future] = set()
        self._tasks: set[asyncio.Task] = set()
        self._session_tasks: set[asyncio.Task] = set()
        self._sync_leftover: DirtySet | None = None
        self._syncing_dirty: DirtySet | None = None
        self._output_trigger: asyncio.TimerHandle | None = None
        self._stopping = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.guest_progress = 0
        self.held = 0                            # times backpressure held the guest
        self.last_error: str | None = None
        self.control_endpoint: str | None = None

    # -- lifecycle ---------------------------------------------------------------
    async def run(self, duration: float | None = None) -> None:
        """Run until stop() (or `duration` seconds); close everything on the way out."""
        self._loop = asyncio.get_running_loop()
        # The snapshot drops the GIL at every ioctl and wait; with encoder threads running Python,
        # taking it back costs up to the switch interval (5 ms by default) each time.
        sys.setswitchinterval(SWITCH_INTERVAL)
        self.machine.set_event_sink(lambda e: self._loop.call_soon_threadsafe(self._on_guest_event, e))
        if self.device is not None:
            await self.device.start()
            log.info("the kvstore service listens on %s:%d", self.config.guest.service_host, self.device.port)
        self.machine.start()
        self._spawn(self._tick_loop())
        self._spawn(self._dirty_watch_loop())
        if self.config.primary.control:
            self._spawn(self._control_loop(self.config.primary.control))
        self._spawn(self._status_loop())
        self._execute(self.protocol.handle(proto.Start(time.monotonic())))
        try:
            if duration is None:
                await self._stopping.wait()
            else:
                try:
                    await asyncio.wait_for(self._stopping.wait(), duration)
                except asyncio.TimeoutError:
                    pass
        finally:
            await self._shutdown()

    def stop(self) -> None:
        self._stopping.set()

    def _spawn(self, coroutine, session: bool = False) -> asyncio.Task:
        task = asyncio.ensure_future(coroutine)
        (self._session_tasks if session else self._tasks).add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._session_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("agent task failed: %r", exc, exc_info=exc)
            self.last_error = repr(exc)
            self._stopping.set()

    async def _shutdown(self) -> None:
        """Stop cleanly: no new epochs, let the ones being sent finish, say BYE, flush it, close."""
        for task in list(self._tasks):          # no more ticks, triggers or status writes
            task.cancel()
        if not self.machine._closed and self.machine.runner.started:
            self.machine.pause()                # and no more guest events
        socket, writer = self.socket, self.writer
        sending = [t for t in self._session_tasks if getattr(t, "sends_epoch", False)]
        if socket is not None and sending:
            await asyncio.wait(sending, timeout=2.0)
        for task in list(self._tasks | self._session_tasks):
            task.cancel()                       # an epoch still half-sent is discarded by the replica
        await asyncio.gather(*self._tasks, *self._session_tasks, return_exceptions=True)
        if socket is not None and writer is not None and socket is self.socket:
            try:                                # the lock is free now: every sender was cancelled
                await asyncio.wait_for(socket.send_multipart(
                    writer.frame(wire.Kind.BYE, epoch=self.protocol.next_epoch), copy=False), 1.0)
                socket.close(linger=1000)       # flush the BYE: a replica that misses it fails over
                self.socket = None
            except (asyncio.TimeoutError, zmq.ZMQError):
                pass
        self._close_socket()
        self.executor.shutdown(wait=True)
        if self.device is not None:
            self.device.close()
        self.machine.close()
        self.context.term()

    # -- commands ----------------------------------------------------------------
    def _execute(self, commands: list[proto.Command]) -> None:
        for command in commands:
            handler = getattr(self, f"_do_{type(command).__name__}")
            handler(command)

    def _feed(self, event: proto.PrimaryEvent) -> None:
        self._execute(self.protocol.handle(event))

    def _do_Log(self, command: proto.Log) -> None:
        getattr(log, command.level if command.level != "debug" else "debug")(command.message)

    def _do_Connect(self, command: proto.Connect) -> None:
        self._close_socket()
        replication = self.config.replication
        socket = self.context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.IMMEDIATE, 1)
        set_zmq_heartbeats(socket, replication.heartbeat_ms, replication.timeout_ms)
        secure_client(socket, self.config.security)
        socket.connect(self.config.replica)
        self.socket = socket
        self.writer = wire.FrameWriter()
        self.guard = wire.FrameGuard(session=self.writer.session, accept=wire.REPLICA_KINDS)
        self._spawn(self._recv_loop(socket), session=True)
        hello = wire.Hello(versions=list(wire.SUPPORTED_VERSIONS), session=self.writer.session,
                           slots=[wire.SlotLayout(s.spec.slot, s.spec.guest_phys_addr, s.spec.size)
                                  for s in self.machine.memory.slots.values()],
                           vcpus=self.machine.config.vcpus, page_size=4096, agent="colo-ring primary")
        writer = self.writer
        self._spawn(self._send(lambda: writer.message(hello)), session=True)

    def _close_socket(self) -> None:
        for task in list(self._session_tasks):
            task.cancel()
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None

    def _do_DropReplica(self, command: proto.DropReplica) -> None:
        log.error("dropping the replica: %s", command.reason)
        self._close_socket()                      # (the encoder is reset when the next sync starts)
        for snapshot in self._snapshots.values():
            self.pool.release(snapshot.buffer)
        self._snapshots.clear()
        while self._precopy:
            self.pool.release(self._precopy.popleft()[2])
        self._sync_leftover = self._syncing_dirty = None

    def _do_ReleaseOutputs(self, command: proto.ReleaseOutputs) -> None:
        self.output.release(command.upto)

    def _device_output(self, slot: int, data: bytes, generation: int) -> None:
        """The stream device's replies: held until their epoch is acknowledged."""
        device = self.device
        self.hold_output(lambda held: device.write_to_client(slot, held, generation), data)

    def hold_output(self, send: Callable[[bytes], None], data: bytes) -> None:
        """Output commit for the guest's devices: `data` reaches `send` once its epoch is acked."""
        self.output.hold(self.protocol.next_epoch, send, data)
        if not self.protocol.checkpointing:
            self.output.release(None)             # unprotected: nothing to wait for
        elif self.config.triggers.output and self._output_trigger is None:
            self._output_trigger = self._loop.call_later(
                self.config.triggers.output_delay_ms / 1000, self._fire_output_trigger)

    def _do_HoldGuest(self, command: proto.HoldGuest) -> None:
        self.held += 1
        self.machine.pause()

    def _do_ResumeGuest(self, command: proto.ResumeGuest) -> None:
        self.machine.resume()

    def _do_SendHeartbeat(self, command: proto.SendHeartbeat) -> None:
        if self.socket is not None and not self._send_lock.locked():
            writer = self.writer
            self._spawn(self._send(lambda: writer.frame(wire.Kind.HEARTBEAT, epoch=self.protocol.next_epoch)),
                        session=True)

    def _do_BeginSync(self, command: proto.BeginSync) -> None:
        self._spawn(self._sync(), session=True)

    def _do_TakeSnapshot(self, command: proto.TakeSnapshot) -> None:
        extra = None
        if command.final_sync:
            extra, self._sync_leftover = self._sync_leftover, None
            if self._syncing_dirty is not None:
                extra = self._syncing_dirty if extra is None else extra.merged(self._syncing_dirty)
                self._syncing_dirty = None
        device_state = self.device.device_state if self.device is not None else (lambda: b"")
        snapshot = self.snapshotter.take(command.epoch, command.reason, extra, device_state=device_state,
                                         while_paused=self.hooks.on_snapshot)
        self._snapshots[command.epoch] = snapshot

    def _do_SendEpoch(self, command: proto.SendEpoch) -> None:
        task = self._spawn(self._send_epoch(command.epoch), session=True)
        task.sends_epoch = True

    # -- sending -------------------------------------------------------------------
    async def _send(self, build: Callable[[], list]) -> None:
        """Send one frame, built (and so numbered) only now, in sending order."""
        socket = self.socket
        if socket is None:
            return
        async with self._send_lock:
            if socket is self.socket:
                await socket.send_multipart(build(), copy=False)

    async def _send_epoch(self, epoch: int) -> None:
        """Encode one epoch in the pool and send its frames in order (one epoch at a time)."""
        async with self._send_lock:
            snapshot = self._snapshots.pop(epoch, None)
            if snapshot is None:                                   # a pre-copy epoch
                keys, pages, buffer = self._precopy.popleft()
                snapshot = Snapshot(epoch, "precopy", keys, pages, buffer, [], b"", False)
            try:
                if len(snapshot.keys) <= INLINE_ENCODE_PAGES:    # a thread handoff costs more
                    try:
                        frames, raw, encoded = self._encode_epoch(snapshot)
                    finally:
                        self.pool.release(snapshot.buffer)
                else:
                    future = self._loop.run_in_executor(self.executor, self._encode_epoch, snapshot)
                    # The thread goes on even if this task is cancelled: the buffer goes back to
                    # the pool, and a new session may reset the encoder, only once it is done.
                    self._encoding.add(future)
                    future.add_done_callback(self._encoding.discard)
                    future.add_done_callback(lambda _, buffer=snapshot.buffer: self.pool.release(buffer))
                    frames, raw, encoded = await asyncio.shield(future)
                if snapshot.consistent:
                    self.stats.record(snapshot, raw, encoded)
                socket, writer = self.socket, self.writer
                for step, *item in frames:
                    if socket is None or socket is not self.socket:
                        return
                    if len(item) == 1:
                        parts = writer.message(item[0])
                    else:
                        kind, count, payload = item
                        parts = writer.frame(kind, epoch=epoch, count=count, payload=payload)
                    await socket.send_multipart(parts, copy=False)
                    if self.hooks.on_frame_sent is not None:
                        self.hooks.on_frame_sent(epoch, int.from_bytes(bytes(parts[0][6:8]), "little"), step)
            except (zmq.ZMQError, CodecError, wire.WireError) as exc:
                self._feed(proto.SendFailed(time.monotonic(), f"epoch {epoch}: {exc!r}"))

    def _encode_epoch(self, snapshot: Snapshot) -> tuple[list, int, int]:
        """Runs in a worker thread: batches, digest, and every frame of the epoch."""
        batch = self.config.replication.batch_pages
        keys, pages = snapshot.keys, snapshot.pages
        digest = EpochDigest()
        batches = []
        for start in range(0, len(keys), batch):               # a loop per batch, not per page
            encoded = self.encoder.encode(keys[start:start + batch], pages[start:start + batch])
            digest.update_pages(keys[start:start + batch], pages[start:start + batch])
            batches.append(encoded)
        vcpu_bytes = wire.pack_vcpu_states(snapshot.vcpus) if snapshot.consistent else b""
        digest.update_bytes(vcpu_bytes)
        digest.update_bytes(snapshot.device)
        epoch = snapshot.epoch
        raw = int(sum(b.raw_bytes for b in batches))
        encoded_total = int(sum(b.encoded_bytes for b in batches))
        reason = "sync" if snapshot.reason == "precopy" else snapshot.reason   # SYNC flag: pre-copy
        # (step, message) or (step, kind, count, payload): headers are stamped when sent
        frames: list[tuple] = [("begin", wire.EpochBegin(epoch, reason, len(keys), len(batches),
                                                         not snapshot.consistent))]
        for encoded in batches:
            frames.append(("pages", wire.Kind.PAGES, len(encoded.keys), encoded.payload))
        if snapshot.consistent:
            frames.append(("vcpu", wire.Kind.VCPU_STATE, len(snapshot.vcpus), vcpu_bytes))
            frames.append(("device", wire.Kind.DEVICE_STATE, 0, snapshot.device))
        frames.append(("end", wire.EpochEnd(epoch, digest.digest(), len(keys), len(batches), raw)))
        return frames, raw, encoded_total

    # -- receiving -------------------------------------------------------------------
    async def _recv_loop(self, socket: zmq.asyncio.Socket) -> None:
        while True:
            parts = await socket.recv_multipart(copy=True)
            now = time.monotonic()
            try:
                frame = wire.decode_frame(parts)
                self.guard.check(frame)
                message = wire.decode_payload(frame)
            except wire.WrongSession:
                continue                                     # a stale answer to an older HELLO
            except wire.WireError as exc:
                self._feed(proto.ReplicaRefused(now, f"bad frame from the replica: {exc}"))
                return
            if frame.kind == wire.Kind.WELCOME:
                self._feed(proto.Welcomed(now, message.version, message.last_epoch or 0))
            elif frame.kind == wire.Kind.ACK:
                if self.hooks.on_ack is not None:
                    self.hooks.on_ack(frame.epoch)
                self._feed(proto.Acked(now, frame.epoch))
            elif frame.kind == wire.Kind.HEARTBEAT:
                self._feed(proto.HeardFromReplica(now))
            elif frame.kind == wire.Kind.REFUSE:
                self._feed(proto.ReplicaRefused(now, f"{message.reason}: {message.detail}"))
                return
            elif frame.kind == wire.Kind.BYE:
                self._feed(proto.ReplicaRefused(now, "the replica said goodbye"))
                return

    # -- the guest -----------------------------------------------------------------
    def _on_guest_event(self, event: Event) -> None:
        if isinstance(event, RingSoftFull):
            if self.protocol.checkpointing:
                self._feed(proto.Trigger(time.monotonic(), "ring_full"))
            else:
                self._drain_rings()
        elif isinstance(event, Progress):
            self.guest_progress = sum(self.machine.progress_all())
        elif isinstance(event, Output):
            self.hold_output(self.output_sink, event.data)
        elif isinstance(event, (Done, Fault)):
            log.error("the guest stopped: %s", event)
            self.last_error = repr(event)
            self._stopping.set()

    def _fire_output_trigger(self) -> None:
        self._output_trigger = None
        if self.output.pending_since(self.protocol.next_epoch):
            self._feed(proto.Trigger(time.monotonic(), "output"))

    def _drain_rings(self) -> None:
        """Unprotected or syncing: harvest so the vCPUs go on; keep the set while syncing."""
        self.machine.pause()
        dirty = self.machine.harvest()
        if self.protocol.held_reason in (None, "sync"):      # else the protocol holds the guest
            self.machine.resume()
        if self.protocol.mode is proto.PrimaryMode.SYNCING:
            self._syncing_dirty = dirty if self._syncing_dirty is None else self._syncing_dirty.merged(dirty)

    async def _sync(self) -> None:
        """Pre-copy rounds while the guest runs, then SyncRoundsDone (the final stop-and-copy)."""
        if self._encoding:                           # an encode of the old session still runs
            await asyncio.wait(list(self._encoding))
        self.encoder.reset()                         # the new replica has nothing we sent before
        self._syncing_dirty = None
        self._drain_rings()                          # tracking starts now: everything else is resident
        self._syncing_dirty = None
        keys = np.concatenate([(np.uint64(slot) << np.uint64(40)) | memory.resident_pages()
                               for slot, memory in sorted(self.machine.memory.slots.items())])
        log.info("sync: %d resident pages (%.1f MiB) to copy", len(keys), len(keys) * 4096 / 2**20)
        bar = tqdm(total=len(keys), unit="page", desc="initial sync", file=sys.stderr, leave=False,
                   disable=not sys.stderr.isatty())
        try:
            await self._precopy_rounds(keys, bar)
        finally:
            bar.close()

    async def _precopy_rounds(self, keys: np.ndarray, bar) -> None:
        replication = self.config.replication
        for round_number in range(replication.precopy_max_rounds):
            if round_number:
                bar.total += len(keys)
                bar.set_description(f"sync round {round_number + 1}")
            for start in range(0, len(keys), replication.precopy_epoch_pages):
                chunk = keys[start:start + replication.precopy_epoch_pages]
                while len(self._precopy) >= 1 or self.pool.free == 0:
                    await asyncio.sleep(0.001)       # backpressure: wait for the previous batch to go
                pages, buffer = self.snapshotter.read_pages(chunk)
                self._precopy.append((chunk, pages, buffer))
                self._feed(proto.PrecopyReady(time.monotonic()))
                bar.update(len(chunk))
            self._drain_rings()
            pending, self._syncing_dirty = self._syncing_dirty, None
            keys = page_keys(pending) if pending is not None else np.empty(0, dtype=np.uint64)
            log.info("sync: round %d left %d dirty pages", round_number + 1, len(keys))
            if len(keys) <= replication.precopy_done_pages:
                self._sync_leftover = pending
                break
        else:
            self._sync_leftover = DirtySet.from_entries(keys >> np.uint64(40),
                                                        keys & np.uint64((1 << 40) - 1))
        while self._precopy:
            await asyncio.sleep(0.001)
        self._feed(proto.SyncRoundsDone(time.monotonic(), self.protocol.next_epoch - 1))

    # -- clocks ------------------------------------------------------------------------
    async def _tick_loop(self) -> None:
        config = self.protocol.config
        while True:                              # (re-read: the interval may change at run time)
            await asyncio.sleep(min(config.heartbeat_interval, config.max_interval or 1.0) / 4)
            self._feed(proto.Tick(time.monotonic()))

    def set_triggers(self, changes: dict) -> dict:
        """Change [triggers] settings while running (the control interface); returns them all.

        The new values go through the same checks as the config file: a bad one raises
        ConfigError naming it, and nothing changes.
        """
        known = {f.name for f in dataclasses.fields(TriggerSection)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"unknown [triggers] setting(s) {', '.join(unknown)}: the control interface "
                              f"changes {', '.join(sorted(known))}")
        triggers = dataclasses.replace(self.config.triggers, **changes)     # validates
        self.config = dataclasses.replace(self.config, triggers=triggers)
        self.protocol.config.max_interval = (triggers.max_interval_ms / 1000) or None
        log.warning("triggers changed at run time: %s", changes)
        return dataclasses.asdict(triggers)

    async def _control_loop(self, endpoint: str) -> None:
        """JSON requests on a REP socket: {"get": "triggers"} or {"set": {"dirty_pages": 512, ...}}."""
        socket = self.context.socket(zmq.REP)
        socket.setsockopt(zmq.LINGER, 0)
        socket.bind(endpoint[:-2] + ":*" if endpoint.endswith(":0") else endpoint)
        self.control_endpoint = socket.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("control interface on %s", self.control_endpoint)
        try:
            while True:
                raw = await socket.recv()
                try:
                    request = json.loads(raw)
                    if not isinstance(request, dict):
                        raise ConfigError("a request is a JSON object")
                    if "set" in request:
                        if not isinstance(request["set"], dict):
                            raise ConfigError('"set" takes an object of [triggers] settings')
                        reply = {"ok": True, "triggers": self.set_triggers(request["set"])}
                    elif request.get("get") == "triggers":
                        reply = {"ok": True, "triggers": dataclasses.asdict(self.config.triggers)}
                    elif request.get("get") == "status":
                        reply = {"ok": True, "status": self.status()}
                    elif request.get("reset") == "stats":     # measure a new setting from scratch
                        self.stats = Stats()
                        self.output.latency_us.clear()
                        reply = {"ok": True}
                    else:
                        raise ConfigError('expected {"get": "triggers" | "status"}, {"reset": "stats"} '
                                          'or {"set": {...}}')
                except (ValueError, TypeError) as exc:          # ConfigError is a ValueError
                    reply = {"ok": False, "error": str(exc)}
                await socket.send(json.dumps(reply).encode())
        finally:
            socket.close(linger=0)

    async def _dirty_watch_loop(self) -> None:
        while True:                              # settings re-read: they may change at run time
            triggers = self.config.triggers
            await asyncio.sleep(triggers.poll_us / 1e6 if triggers.dirty_pages else 0.05)
            threshold = self.config.triggers.dirty_pages
            if threshold and self.protocol.checkpointing and self.protocol.held_reason is None \
                    and self.machine.tracker.fill() >= threshold:
                self._feed(proto.Trigger(time.monotonic(), "dirty_threshold"))

    def status(self) -> dict:
        summary = self.stats.summary()
        self.guest_progress = sum(self.machine.progress_all()) if not self.machine._closed else 0
        return {
            "role": "primary",
            "mode": self.protocol.mode.value,
            "protected": self.protocol.protected,
            "epoch": self.protocol.next_epoch - 1,
            "committed_epoch": self.protocol.acked_epoch,
            "in_flight": len(self.protocol.in_flight),
            "guest_progress": self.guest_progress,
            "takeover_ms": None,
            "epochs": self.stats.epochs,
            "reasons": dict(self.stats.reasons),
            "released_output_bytes": self.output.released_bytes,
            "held_output_bytes": self.output.held_bytes,
            "output_latency_us_p50": self.output.latency_percentiles()[0],
            "output_latency_us_p99": self.output.latency_percentiles()[1],
            "held": self.held,
            "rss_mib": _rss_mib(),
            "last_error": self.last_error,
            **summary,
        }

    def _log_line(self, figures: dict) -> None:
        log.info("%s epoch %d (committed %d) %.0f ckpt/s pause p50 %.0f us p99 %.0f us dirty p50 %.0f "
                 "raw %.1f MB/s encoded %.1f MB/s progress %d",
                 figures["mode"], figures["epoch"], figures["committed_epoch"],
                 figures["checkpoints_per_s"], figures["pause_us_p50"], figures["pause_us_p99"],
                 figures["dirty_pages_p50"], figures["raw_mb_per_s"], figures["encoded_mb_per_s"],
                 figures["guest_progress"])

    async def _status_loop(self) -> None:
        await status_loop(self.config.status, self.status, self._log_line)
