"""The primary agent: the asyncio shell around the epoch protocol.

It owns the guest (a machine from ring.backend, built from the guest's spec),
the ZeroMQ socket to the replica, and the parts that each do one job:
triggers (checkpointer.triggers), the stop-the-world snapshot
(checkpointer.snapshot), the encode-and-send pipeline (checkpointer.pipeline),
the initial sync (checkpointer.sync), output commit (checkpointer.output),
the control interface (checkpointer.control) and its figures
(checkpointer.stats). It does what the sans-I/O PrimaryProtocol tells it;
everything the protocol decides comes from events this shell feeds it (guest
exits, frames, ticks of the clock). Supervision, dispatch and the status file
are the shared agent runtime's (checkpointer.runtime).

Threads: vCPUs run in their own threads and post their exits to the loop
with call_soon_threadsafe; large epochs are encoded in a thread pool (zstd
and xxhash release the GIL); the stop-the-world snapshot runs on the loop
(it is a few hundred microseconds, and nothing else may run during it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import zmq
import zmq.asyncio

from ring.machine import Machine
from ring.stream import StreamDevice
from ring.vcpu_state import VcpuStateError
from ring.vcpus import Done, Event, Fault, Output, Progress, RingSoftFull

from . import protocol as proto
from . import wire
from .codec import CodecError, PageEncoder
from .config import PrimaryAgentConfig
from .control import ControlServer
from .faults import KillPoint
from .fencing import Fence, LeaseChange, node_name
from .guest import Guest, build_guest
from .output import OutputBuffer
from .pipeline import Pipeline
from .runtime import Channel, Runtime, rss_mib, set_zmq_heartbeats
from .security import client_keys, secure_client
from .snapshot import Snapshot, Snapshotter, StagingPool, staging_capacity
from .stats import CheckpointStats
from .sync import InitialSync
from .triggers import Triggers

log = logging.getLogger("colo.primary")

SWITCH_INTERVAL = 0.0002
PRIMARY_COMMANDS = (proto.Connect, proto.BeginSync, proto.HoldGuest, proto.DrainRings, proto.TakeSnapshot,
                    proto.SendEpoch, proto.ReleaseOutputs, proto.ResumeGuest, proto.SendHeartbeat,
                    proto.DropReplica, proto.DeclareStandby, proto.FenceGuest, proto.UnfenceGuest,
                    proto.StepDown, proto.Log)
LEASE_EVENTS = {LeaseChange.LOST: proto.LeaseLost, LeaseChange.RETAKEN: proto.LeaseRetaken,
                LeaseChange.SUPERSEDED: proto.Superseded}


@dataclass
class Hooks:
    """Test hooks: called at protocol points (never needed in production)."""

    on_snapshot: Callable[[Snapshot, Machine], None] | None = None     # called while paused
    on_frame_sent: Callable[[int, int, KillPoint], None] | None = None   # (epoch, kind, point reached)
    on_ack: Callable[[int], None] | None = None


class PrimaryAgent:
    """Protect one guest: run it, checkpoint it to the replica, release its outputs on ack."""

    def __init__(self, config: PrimaryAgentConfig, *, hooks: Hooks | None = None,
                 output_sink: Callable[[bytes], None] | None = None, guest: Guest | None = None,
                 fence: Fence | None = None) -> None:
        """Protect `guest` if given (a running guest this node already serves, e.g. after a
        takeover, with the `fence` that holds its lease), else a new one built from the config's
        guest spec, under a fence of its own that takes the pair's key at start."""
        self.config = config
        self.hooks = hooks or Hooks()
        self.output_sink = output_sink or (lambda data: log.info("guest output: %r", data))
        if not config.security.insecure:
            client_keys(config.security)           # bad keys fail here, before a guest runs
        self._handed_over = guest is not None
        self.guest = guest if guest is not None else build_guest(config)
        # The service's replies go through output commit from now on.
        self.guest.route_output(self._device_output)
        self.spec = self.guest.spec or config.guest_spec()
        self.machine: Machine = self.guest.machine
        self.device: StreamDevice | None = self.guest.device
        replication = config.replication
        self.protocol = proto.PrimaryProtocol(proto.PrimaryConfig(
            max_in_flight=replication.max_in_flight,
            heartbeat_interval=replication.heartbeat_ms / 1000,
            replica_timeout=replication.timeout_ms / 1000,
            max_interval=(config.triggers.max_interval_ms / 1000) or None,
        ))
        self.runtime = Runtime(self, log, PRIMARY_COMMANDS)
        extra = max(replication.precopy_done_pages, config.triggers.dirty_pages, 1024)
        # One buffer per epoch that may await encoding (at most max_in_flight) plus one:
        # acquiring a buffer then never waits, and the loop never blocks on it.
        self.pool = StagingPool(replication.max_in_flight + 1, staging_capacity(self.machine, extra))
        self.snapshotter = Snapshotter(self.machine, self.pool)
        self.encoder = PageEncoder(cache_pages=replication.cache_pages, level=replication.zstd_level)
        self.executor = ThreadPoolExecutor(replication.encode_threads, thread_name_prefix="encode")
        self.pipeline = Pipeline(self.encoder, self.pool, self.executor, replication.batch_pages)
        self.sync = InitialSync(self.machine, self.snapshotter, self.pool, replication, self._feed,
                                lambda: self.protocol.next_epoch)
        self.fence = fence if fence is not None else Fence(config.fencing, node_name(config.fencing, "primary"))
        self._fence_taken = fence is not None
        if self.fence.mode.value == "off":
            log.warning("NO FENCING (--no-fencing): a replica that takes this guest over on silence while this "
                        "primary still runs makes TWO ACTIVE NODES: SPLIT BRAIN")
        self.output = OutputBuffer(gate=self.fence.may_serve)
        self._declaring = asyncio.Lock()          # standby declarations reach etcd in order
        self.unprotected_since: float | None = time.time()     # wall time protection was last lost
        self.triggers = Triggers(config.triggers, self.protocol, self._feed, self.machine.tracker.fill,
                                 self.output.pending_since)
        self.stats = CheckpointStats()
        self.context = zmq.asyncio.Context()
        self.socket: zmq.asyncio.Socket | None = None
        self.channel: Channel | None = None       # the socket's reads and sends, on the loop
        self.writer: wire.FrameWriter | None = None
        self.guard: wire.FrameGuard | None = None
        self.control: ControlServer | None = None
        self._snapshots: dict[int, Snapshot] = {}
        self._sending: set[asyncio.Task] = set()          # tasks sending an epoch (finished at a stop)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.status_extra: Callable[[], dict] = dict   # what a node adds (colo-node)
        self.guest_progress = 0
        self.held = 0                            # times backpressure held the guest

    @property
    def last_error(self) -> str | None:
        return self.runtime.last_error

    @last_error.setter
    def last_error(self, value: str | None) -> None:
        self.runtime.last_error = value

    @property
    def control_endpoint(self) -> str | None:
        return self.control.endpoint if self.control is not None else None

    # -- lifecycle ---------------------------------------------------------------
    async def run(self, duration: float | None = None) -> None:
        """Run until stop() (or `duration` seconds); close everything on the way out."""
        self._loop = asyncio.get_running_loop()
        # The snapshot drops the GIL at every ioctl and wait; with encoder threads running Python,
        # taking it back costs up to the switch interval (5 ms by default) each time.
        sys.setswitchinterval(SWITCH_INTERVAL)
        loops = [self._tick_loop, self.triggers.dirty_watch_loop, self._status_loop, self._fence_loop]
        try:
            if not self._fence_taken:
                await self.fence.take()           # KeyHeld: another node is active; nothing runs
                self._fence_taken = True
            if self.config.primary.control:
                self.control = ControlServer(
                    self.context, self.config.primary.control, config=self.config, status=self.status,
                    get_triggers=lambda: dataclasses.asdict(self.triggers.settings),
                    set_triggers=self.set_triggers, reset_stats=self._reset_stats)
                loops.append(self.control.serve)
            await self.guest.start(lambda e: self._loop.call_soon_threadsafe(self._on_guest_event, e))
            if self.device is not None:
                log.info("the %s service listens on %s:%d", self.spec.name, self.device.host, self.device.port)
        except BaseException:
            await self._close()
            raise
        loops.append(self._start)
        await self.runtime.run(loops, self._shutdown, duration)

    async def _tick_loop(self) -> None:
        await self.runtime.tick_loop(self.triggers.tick_period, self.triggers.tick,
                                     lambda: self.protocol.config.replica_timeout)

    async def _start(self) -> None:
        self._feed(proto.Start(time.monotonic()))
        if self._handed_over:
            # A vCPU of a guest handed over may be parked at a full ring whose event went to the
            # role before: a drain lets it go on (unprotected, the rings are only emptied).
            self._feed(proto.Trigger(time.monotonic(), proto.EpochReason.RING_FULL))

    async def _fence_loop(self) -> None:
        await self.fence.hold(self._lease_changed)

    def _lease_changed(self, change: LeaseChange, reason: str) -> None:
        now = time.monotonic()
        if change is LeaseChange.RENEWED:
            self._feed(proto.LeaseRenewed(now))
        else:
            self._feed(LEASE_EVENTS[change](now, reason))

    def stop(self) -> None:
        self.runtime.stop()

    async def _shutdown(self) -> None:
        """Stop cleanly: no new epochs, let the ones being sent finish, say BYE, flush it, close."""
        if self._closed:
            return
        self._feed(proto.Stop(time.monotonic()))     # (the protocol now starts nothing new)
        self.runtime.cancel_loops()
        self.triggers.cancel()
        if not self.machine._closed and self.machine.runner is not None and self.machine.runner.started:
            self.machine.pause()                # no more guest events
        socket, writer = self.socket, self.writer
        sending = [t for t in self._sending if not t.done()]
        if socket is not None and sending:
            await asyncio.wait(sending, timeout=2.0)
        await self.runtime.cancel_all()         # an epoch still half-sent is discarded by the replica
        # BYE tells the replica not to take over: only for an orderly stop. A primary stopping
        # on an error (a failed task, a guest fault) says nothing, so that the replica does.
        self._close_channel()                   # (the BYE below is zmq.asyncio's: the fd is its own again)
        if socket is not None and writer is not None and socket is self.socket and self.last_error is None:
            try:                                # the lock is free now: every sender was cancelled
                await asyncio.wait_for(socket.send_multipart(
                    writer.frame(wire.Kind.BYE, epoch=self.protocol.next_epoch), copy=False), 1.0)
                socket.close(linger=1000)       # flush the BYE: a replica that misses it fails over
                self.socket = None
            except (asyncio.TimeoutError, zmq.ZMQError):
                pass
        await self._close()

    async def _close(self) -> None:
        self._closed = True
        self.output.gate = lambda: False          # nothing leaves a node that stopped serving
        await self.fence.close()
        self._close_socket()
        if self.control is not None:
            self.control.socket.close(linger=0)
        self.executor.shutdown(wait=True)
        self.guest.close()
        self.context.term()

    # -- commands ----------------------------------------------------------------
    def _feed(self, event: proto.PrimaryEvent) -> None:
        if not self._closed:
            self.runtime.execute(self.protocol.handle(event))
            if self.protocol.protected == (self.unprotected_since is None):
                return
            self.unprotected_since = None if self.protocol.protected else time.time()
            if self.protocol.protected:
                self.sync.finished()

    def _do_Connect(self, command: proto.Connect) -> None:
        self._close_socket()
        replication = self.config.replication
        socket = self.context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.IMMEDIATE, 1)
        # ZeroMQ must never close the connection before the protocol drops the replica (with a
        # BYE): a close without BYE is the replica's proof that this process died (fencing S3).
        set_zmq_heartbeats(socket, replication.heartbeat_ms, 2 * replication.timeout_ms)
        secure_client(socket, self.config.security)
        socket.connect(self.config.replica)
        self.socket = socket
        self.writer = wire.FrameWriter()
        self.guard = wire.FrameGuard(session=self.writer.session, accept=wire.REPLICA_KINDS)
        self.pipeline.token = self.fence.token
        self.channel = Channel(socket, self._on_message, on_error=self.runtime.fail)
        hello = wire.Hello(versions=list(wire.SUPPORTED_VERSIONS), session=self.writer.session,
                           slots=[wire.SlotLayout(s.spec.slot, s.spec.guest_phys_addr, s.spec.size)
                                  for s in self.machine.memory.slots.values()],
                           vcpus=self.machine.config.vcpus, page_size=4096, agent="colo-ring primary",
                           token=self.fence.token, resume_of=self.sync.copy.session)
        writer = self.writer
        self.runtime.spawn(self.pipeline.send_one(self._socket, lambda: writer.message(hello)), session=True)

    def _socket(self) -> Channel | None:
        return self.channel

    def _close_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def _close_socket(self) -> None:
        """End the session; a BYE first, so that the replica never takes our close for a death."""
        self.runtime.cancel_session()
        self._close_channel()
        if self.socket is not None:
            linger = 0
            if self.writer is not None:
                try:
                    # the plain (not asyncio) send: it either queues the BYE now or raises Again
                    zmq.Socket.shadow(self.socket.underlying).send_multipart(
                        self.writer.frame(wire.Kind.BYE, epoch=self.protocol.next_epoch), copy=False,
                        flags=zmq.NOBLOCK)
                    linger = 200
                except zmq.ZMQError:
                    pass
            self.socket.close(linger=linger)
            self.socket = None

    def _do_DropReplica(self, command: proto.DropReplica) -> None:
        log.error("dropping the replica: %s", command.reason)
        self._close_socket()                      # (the encoder is reset when the next sync starts)
        for snapshot in self._snapshots.values():
            self.pool.release(snapshot.buffer)
        self._snapshots.clear()
        self.sync.drop()

    def _do_ReleaseOutputs(self, command: proto.ReleaseOutputs) -> None:
        self.output.release(command.upto)         # (only while the lease is valid: the gate)

    def _do_DeclareStandby(self, command: proto.DeclareStandby) -> None:
        wire_session = None
        if command.session is not None:
            if command.session != self.protocol.session or self.writer is None:
                return                            # a session already gone: a later declaration follows
            wire_session = self.writer.session
        self.runtime.spawn(self._declare(command.session, wire_session))

    async def _declare(self, session: int | None, wire_session: int | None) -> None:
        async with self._declaring:
            ok = await self.fence.declare_standby(wire_session)
        self._feed(proto.StandbyDeclared(time.monotonic(), session, ok))

    def _do_FenceGuest(self, command: proto.FenceGuest) -> None:
        self.machine.fence(True)

    def _do_UnfenceGuest(self, command: proto.UnfenceGuest) -> None:
        self.output.flush()                       # what was releasable while fenced, then the guest
        self.machine.fence(False)

    def _do_StepDown(self, command: proto.StepDown) -> None:
        self.output.drop_deferred()
        self.output.gate = lambda: False
        self.last_error = f"superseded: {command.reason}"
        self.stop()

    def _device_output(self, slot: int, data: bytes, generation: int) -> None:
        """The stream device's replies: held until their epoch is acknowledged."""
        device = self.device
        self.hold_output(lambda held: device.write_to_client(slot, held, generation), data)

    def hold_output(self, send: Callable[[bytes], None], data: bytes) -> None:
        """Output commit for the guest's devices: `data` reaches `send` once its epoch is acked."""
        self.output.hold(self.protocol.next_epoch, send, data)
        if self.protocol.releases_unacked:
            self.output.release(None)             # unprotected: nothing to wait for
        else:
            self.triggers.output_produced()

    def _do_HoldGuest(self, command: proto.HoldGuest) -> None:
        self.held += 1
        self.machine.pause()

    def _do_ResumeGuest(self, command: proto.ResumeGuest) -> None:
        self.machine.resume()

    def _do_DrainRings(self, command: proto.DrainRings) -> None:
        self.machine.pause()
        try:
            dirty = self.machine.harvest()
        finally:
            self.machine.resume()
        if command.keep:
            self.sync.keep(dirty)
        else:
            self.sync.copy.dirtied(dirty)         # unprotected: a replica that comes back lacks them

    def _do_SendHeartbeat(self, command: proto.SendHeartbeat) -> None:
        if self.socket is not None and not self.pipeline.lock.locked():
            writer = self.writer
            self.runtime.spawn(self.pipeline.send_one(
                self._socket, lambda: writer.frame(wire.Kind.HEARTBEAT, epoch=self.protocol.next_epoch)),
                session=True)

    def _do_BeginSync(self, command: proto.BeginSync) -> None:
        self.runtime.spawn(self._sync(command.resume), session=True)

    async def _sync(self, resume: bool) -> None:
        await self.pipeline.idle()                # an encode of the old session may still run
        self.encoder.reset()                      # the replica holds no version we sent (XOR bases)
        await self.sync.run(self.writer.session, resume)

    def _do_TakeSnapshot(self, command: proto.TakeSnapshot) -> None:
        extra = self.sync.take_leftover() if command.final_sync else None
        device_state = self.device.device_state if self.device is not None else None   # None: resumed in C
        snapshot = self.snapshotter.take(command.epoch, command.reason, extra, device_state=device_state,
                                         while_paused=self.hooks.on_snapshot)
        self.sync.copy.gathered(snapshot.keys)
        self.sync.copy.sent(command.epoch, snapshot.keys)
        self._snapshots[command.epoch] = snapshot

    def _do_SendEpoch(self, command: proto.SendEpoch) -> None:
        snapshot = self._snapshots.get(command.epoch) if command.consistent else None
        if (snapshot is not None and not self._sending and not self.pipeline.lock.locked()
                and self.channel is not None and self.writer.version >= wire.MESSAGE_VERSION
                and self.pipeline.inline(snapshot)):
            self._send_epoch_at_once(command.epoch)
            return
        self._spawn_send(self._send_epoch(command.epoch, command.consistent))

    def _spawn_send(self, coroutine) -> None:
        task = self.runtime.spawn(coroutine, session=True)
        if task is not None:
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    # -- sending -------------------------------------------------------------------
    def _send_epoch_at_once(self, epoch: int) -> None:
        """A small epoch with no send before it: encoded and sent here, without a task (most epochs).

        The order is kept: nothing else is being sent or waits to be (no sending task, the lock
        free), and this runs to its end on the loop. If ZeroMQ has no room, the numbered message
        waits in the channel's queue at once, ahead of anything numbered later (runtime.Channel),
        and a task reaches its last kill point once it has left."""
        snapshot = self._snapshots.pop(epoch)
        channel, writer = self.channel, self.writer
        try:
            encoded = self.pipeline.encode_now(snapshot)
            self.stats.record(snapshot, encoded.raw_bytes, encoded.encoded_bytes)
            parts = self.pipeline.send_at_once(channel, writer, encoded, self.hooks.on_frame_sent)
        except (zmq.ZMQError, CodecError, wire.WireError, VcpuStateError) as exc:
            # (after this command, as a task would: the protocol is not fed from inside its commands)
            self._loop.call_soon(self._feed, proto.SendFailed(time.monotonic(), f"epoch {epoch}: {exc!r}"))
            return
        if parts is not None:
            self._spawn_send(self._send_rest(channel, encoded, parts, channel.enqueue(parts)))

    async def _send_rest(self, channel: Channel, encoded, parts: list, queued: asyncio.Future) -> None:
        """The message of an epoch that found no room in ZeroMQ (queued in the channel already)."""
        try:
            await queued
        except zmq.ZMQError as exc:
            if channel is self.channel and not channel.closed:
                self._feed(proto.SendFailed(time.monotonic(), f"epoch {encoded.epoch}: {exc!r}"))
            return                                         # (a closed channel: its session is gone)
        self.pipeline.sent(encoded, parts, self.hooks.on_frame_sent)

    async def _send_epoch(self, epoch: int, consistent: bool) -> None:
        """Encode one epoch and send its frames in order (one epoch at a time)."""
        async with self.pipeline.lock:
            if consistent:
                snapshot = self._snapshots.pop(epoch)
            else:                                                  # a pre-copy batch
                keys, pages, buffer = self.sync.pop_batch()
                self.sync.copy.sent(epoch, keys)
                snapshot = Snapshot(epoch, proto.EpochReason.SYNC, keys, pages, buffer, [], b"", False)
            try:
                encoded = await self.pipeline.encode(snapshot)
                if snapshot.consistent:
                    self.stats.record(snapshot, encoded.raw_bytes, encoded.encoded_bytes)
                await self.pipeline.send(self._socket, self.writer, encoded, self.hooks.on_frame_sent)
            except (zmq.ZMQError, CodecError, wire.WireError, VcpuStateError) as exc:
                self._feed(proto.SendFailed(time.monotonic(), f"epoch {epoch}: {exc!r}"))

    # -- receiving -------------------------------------------------------------------
    def _on_message(self, parts: list) -> bool:
        """One message from the replica (the channel's handler); True: read no more of this session."""
        now = time.monotonic()
        try:
            frame = wire.decode_one(parts)
            self.guard.check(frame)
            message = wire.decode_payload(frame)
        except wire.WrongSession:
            return False                                     # a stale answer to an older HELLO
        except wire.WireError as exc:
            self._feed(proto.ReplicaRefused(now, f"bad frame from the replica: {exc}"))
            return True
        kind = frame.kind
        if kind == wire.Kind.ACK:
            if self.hooks.on_ack is not None:
                self.hooks.on_ack(frame.epoch)
            self.sync.copy.acked(frame.epoch)
            self._feed(proto.Acked(now, frame.epoch))
        elif kind == wire.Kind.HEARTBEAT:
            self._feed(proto.HeardFromReplica(now))
        elif kind == wire.Kind.WELCOME:
            if self.fence.superseded_by(message.token):
                self._feed(proto.Superseded(now, f"the replica has seen fencing token {message.token}, "
                                                 f"newer than ours ({self.fence.token})"))
                return True
            if message.version not in wire.SUPPORTED_VERSIONS:
                self._feed(proto.ReplicaRefused(now, f"the replica chose protocol version {message.version}, "
                                                     f"which we do not speak"))
                return True
            self.writer.version = message.version     # every frame from now on (v2: an epoch a message)
            self._feed(proto.Welcomed(now, message.version, message.last_epoch or 0,
                                      message.resumed and self.sync.copy.session != 0))
        elif kind == wire.Kind.REFUSE:
            if message.reason == wire.RefuseReason.SUPERSEDED:
                self._feed(proto.Superseded(now, message.detail))
            else:
                self._feed(proto.ReplicaRefused(now, f"{message.reason}: {message.detail}"))
            return True
        elif kind == wire.Kind.BYE:
            self._feed(proto.ReplicaRefused(now, "the replica said goodbye"))
            return True
        return False

    # -- the guest -----------------------------------------------------------------
    def _on_guest_event(self, event: Event) -> None:
        if self._closed:
            return                                # queued by a vCPU thread before the machine closed
        if isinstance(event, RingSoftFull):
            self._feed(proto.Trigger(time.monotonic(), proto.EpochReason.RING_FULL))
        elif isinstance(event, Progress):
            self.guest_progress = sum(self.machine.progress_all())
        elif isinstance(event, Output):
            self.hold_output(self.output_sink, event.data)
        elif isinstance(event, (Done, Fault)):
            log.error("the guest stopped: %s", event)
            self.last_error = repr(event)
            self.stop()

    # -- run-time settings and figures -------------------------------------------------
    def set_triggers(self, changes: dict) -> dict:
        """Change [triggers] settings while running (the control interface); returns them all.

        The new values go through the same checks as the config file: a bad one raises
        ConfigError naming it, and nothing changes.
        """
        triggers = self.triggers.change(changes)
        self.config = dataclasses.replace(self.config, triggers=triggers)
        return dataclasses.asdict(triggers)

    def _reset_stats(self) -> None:
        """Measure a new setting from scratch (colo-tune)."""
        self.stats = CheckpointStats()
        self.output.latency_us.clear()

    def status(self) -> dict:
        summary = self.stats.summary()
        self.guest_progress = sum(self.machine.progress_all()) if not self.machine._closed else 0
        latency = self.output.latency_percentiles()
        if self.protocol.fenced:
            protection = "fenced"
        elif self.protocol.protected:
            protection = "protected"
        else:
            protection = f"unprotected since {time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(self.unprotected_since or time.time()))}"
        return {
            "role": "primary",
            "mode": self.protocol.mode.value,
            "protected": self.protocol.protected,
            "protection": protection,
            "unprotected_since": self.unprotected_since,
            "fencing": self.fence.status(),
            "token": self.fence.token,
            "epoch": self.protocol.next_epoch - 1,
            "committed_epoch": self.protocol.acked_epoch,
            "in_flight": len(self.protocol.in_flight),
            "sync": self.sync.status(),
            "guest_progress": self.guest_progress,
            "takeover_ms": None,
            "epochs": self.stats.epochs,
            "reasons": dict(self.stats.reasons),
            "released_output_bytes": self.output.released_bytes,
            "held_output_bytes": self.output.held_bytes,
            "output_latency_us_p50": latency[0],
            "output_latency_us_p99": latency[1],
            "held": self.held,
            # resets a signal or a stop cut short, and the re-protections of every slot they cost
            "dirty_resets_cut_short": getattr(self.machine.tracker, "resets_cut_short", 0),
            "dirty_log_rearms": getattr(self.machine.tracker, "rearms", 0),
            "rss_mib": rss_mib(),
            "last_error": self.last_error,
            **summary,
            **self.status_extra(),
        }

    def _log_line(self, figures: dict) -> None:
        log.info("%s epoch %d (committed %d) %.0f ckpt/s pause p50 %.0f us p99 %.0f us dirty p50 %.0f "
                 "raw %.1f MB/s encoded %.1f MB/s progress %d",
                 figures["mode"], figures["epoch"], figures["committed_epoch"],
                 figures["checkpoints_per_s"], figures["pause_us_p50"], figures["pause_us_p99"],
                 figures["dirty_pages_p50"], figures["raw_mb_per_s"], figures["encoded_mb_per_s"],
                 figures["guest_progress"])

    async def _status_loop(self) -> None:
        await self.runtime.status_loop(self.config.status, self.status, self._log_line)
