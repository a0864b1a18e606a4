"""The replica agent: the asyncio shell around ReplicaProtocol.

It listens on a ROUTER socket (CURVE server unless --insecure), decodes every
frame (checksums, session, sequence), stages each epoch in `Standby`, commits
verified epochs and acknowledges them, and, when the primary falls silent,
starts the standby guest on a fresh KVM VM built over the standby memory
itself (no copy) with the vCPU state of the last consistent epoch.

Takeover time is measured from the last message received from the primary to
the standby guest's first progress report.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import zmq
import zmq.asyncio

from checkpointer import protocol as proto
from checkpointer import wire
from checkpointer.agent import set_zmq_heartbeats, status_loop
from checkpointer.config import ReplicaAgentConfig
from checkpointer.security import secure_server
from ring.guest import layout
from ring.machine import KvmMachine, MachineConfig
from ring.memory import SlotSpec
from ring.stream import StreamDevice
from ring.vcpus import Event, Fault, Progress, RingSoftFull

from .standby import Standby, StagingError

log = logging.getLogger("colo.replica")

DISCONNECT_GRACE = 0.02          # seconds between a closed connection and the failover decision


@dataclass
class ReplicaHooks:
    """Test hooks."""

    on_commit: Callable[[int, Standby], None] | None = None
    hold_ack: Callable[[int], "asyncio.Future | None"] | None = None   # a future delays the ack


class ReplicaAgent:
    """Receive epochs, keep the standby at the last complete one, take over when the primary dies."""

    def __init__(self, config: ReplicaAgentConfig, *, hooks: ReplicaHooks | None = None) -> None:
        self.config = config
        self.hooks = hooks or ReplicaHooks()
        replication = config.replication
        self.protocol = proto.ReplicaProtocol(proto.ReplicaConfig(
            supported_versions=wire.SUPPORTED_VERSIONS,
            heartbeat_interval=replication.heartbeat_ms / 1000,
            primary_timeout=replication.timeout_ms / 1000))
        self.context = zmq.asyncio.Context()
        self.socket: zmq.asyncio.Socket | None = None
        self.authenticator = None
        self.standby: Standby | None = None
        self.guard = wire.FrameGuard(accept=wire.PRIMARY_KINDS)
        self.writer: wire.FrameWriter | None = None
        self.peer: bytes | None = None
        self.endpoint: str | None = None
        self.machine: KvmMachine | None = None
        self.device: StreamDevice | None = None
        self.takeover_ms: float | None = None
        self.last_primary_message = 0.0
        self._digests: dict[int, bytes] = {}
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failover_started = 0.0
        self.commits = collections.deque(maxlen=4096)      # (time, pages, raw, encoded, apply_ns)
        self._epoch_bytes = [0, 0]
        self.epoch = 0
        self.rejected_frames = 0
        self._connections: set[int] = set()      # open connections' fds (socket monitor)
        self.monitor: zmq.asyncio.Socket | None = None
        self.last_error: str | None = None

    # -- lifecycle ---------------------------------------------------------------
    def bind(self) -> str:
        """Bind the listening socket; returns the endpoint (the real port if :0 or :* was asked)."""
        replication = self.config.replication
        socket = self.context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.ROUTER_HANDOVER, 1)        # a reconnecting primary takes its identity back
        set_zmq_heartbeats(socket, replication.heartbeat_ms, replication.timeout_ms)
        self.authenticator = secure_server(socket, self.context, self.config.security)
        listen = self.config.replica.listen
        if listen.endswith(":0"):
            listen = listen[:-2] + ":*"
        socket.bind(listen)
        # Failure detection at the connection: the primary's process dying closes its TCP
        # connection at once, and ZeroMQ's heartbeats close it when its host goes silent.
        self.monitor = socket.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self.socket = socket
        self.endpoint = socket.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.endpoint

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.socket is None:
            self.bind()
        log.info("replica listening on %s", self.endpoint)
        self._spawn(self._recv_loop())
        self._spawn(self._monitor_loop())
        self._spawn(self._tick_loop())
        self._spawn(self._status_loop())
        try:
            await self._stopping.wait()
        finally:
            await self._shutdown()

    def stop(self) -> None:
        self._stopping.set()

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("replica task failed: %r", exc, exc_info=exc)
            self.last_error = repr(exc)
            self._stopping.set()

    async def _shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.socket is not None:
            self.socket.disable_monitor()
            self.monitor.close(linger=0)
            self.socket.close(linger=0)
        if self.authenticator is not None:
            self.authenticator.stop()
        if self.device is not None:
            self.device.close()
        if self.machine is not None:
            self.machine.close()
        if self.standby is not None:
            self.standby.close()
        self.context.term()

    # -- frames --------------------------------------------------------------------
    async def _monitor_loop(self) -> None:
        from zmq.utils.monitor import parse_monitor_message
        while True:
            event = parse_monitor_message(await self.monitor.recv_multipart())
            # (HANDSHAKE_SUCCEEDED carries no fd, so connections are counted from ACCEPTED: a
            # refused peer can only close its own connection, never empty the set under a live primary)
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._connections.add(event["value"])
            elif event["event"] == zmq.EVENT_DISCONNECTED and event["value"] in self._connections:
                self._connections.discard(event["value"])
                if not self._connections:
                    # What the primary sent before it went (a BYE, an epoch's end) must be handled
                    # first: the receive loop gets it from ZeroMQ within this grace period.
                    await asyncio.sleep(DISCONNECT_GRACE)
                    if not self._connections:
                        self._feed(proto.PrimaryDisconnected(time.monotonic()))

    async def _recv_loop(self) -> None:
        while True:
            self._handle(await self.socket.recv_multipart(copy=True))

    def _handle(self, parts: list[bytes]) -> None:
        """Decode, check and act on one message from the socket."""
        now = time.monotonic()
        if self.protocol.mode is proto.ReplicaMode.ACTIVE:
            return
        identity, frame_parts = parts[0], parts[1:]
        try:
            frame = wire.decode_frame(frame_parts)
            new_session = self.guard.check(frame)
            message = wire.decode_payload(frame)
        except wire.WireError as exc:
            self.rejected_frames += 1
            if identity == self.peer:             # another peer's junk must not touch our session
                self._feed(proto.BadFrame(now, str(exc)))
                self._send_refuse(getattr(exc, "reason", "bad_frame"), str(exc))
            else:
                log.warning("ignored a bad frame from a peer that is not our primary: %s", exc)
            return
        self.last_primary_message = now
        if frame.kind == wire.Kind.HELLO:
            self._on_hello(identity, message, now, new_session)
            return
        if identity != self.peer:
            return
        self._on_frame(frame, message, now)

    def _on_hello(self, identity: bytes, hello: wire.Hello, now: float, new_session: bool) -> None:
        commands = self.protocol.handle(proto.Hello(now, hello.session, tuple(hello.versions)))
        if any(isinstance(c, proto.SendWelcome) for c in commands):
            # adopt the session only once the protocol welcomed it, and start from empty memory:
            # the sync sends only the pages the new guest has, so nothing old may remain
            if self.standby is not None:
                self.standby.close()
            slots = [SlotSpec(s.slot, s.guest_phys_addr, s.size) for s in hello.slots]
            self.standby = Standby(slots)
            log.info("standby memory: %s", ", ".join(f"slot {s.slot} {s.size >> 20} MiB" for s in slots))
            self.peer = identity
            self.vcpu_count = hello.vcpus
            self.writer = wire.FrameWriter(session=hello.session)
            self._digests.clear()
            self._run(commands)
            return
        peer, writer = self.peer, self.writer      # refused: answer that peer, keep ours
        self.peer, self.writer = identity, wire.FrameWriter(session=hello.session)
        try:
            self._run(commands)
        finally:
            self.peer, self.writer = peer, writer

    def _on_frame(self, frame: wire.Frame, message, now: float) -> None:
        kind = frame.kind
        standby = self.standby
        staging_open = self.protocol.open_epoch == frame.epoch and self.protocol.verifying is None
        try:
            if kind == wire.Kind.EPOCH_BEGIN:
                self.epoch = message.epoch
                self._epoch_bytes = [0, 0]
                self._feed(proto.EpochBegin(now, message.epoch, message.pages, message.batches,
                                            not message.sync))
            elif kind == wire.Kind.PAGES:
                count = standby.stage_pages(frame.payload) if staging_open else frame.count
                self._epoch_bytes[1] += len(frame.payload)
                self._feed(proto.EpochPart(now, frame.epoch, "pages", count))
            elif kind == wire.Kind.VCPU_STATE:
                if staging_open:
                    standby.stage_vcpus(frame.payload)
                self._feed(proto.EpochPart(now, frame.epoch, "vcpu"))
            elif kind == wire.Kind.DEVICE_STATE:
                if staging_open:
                    standby.stage_device(frame.payload)
                self._feed(proto.EpochPart(now, frame.epoch, "device"))
            elif kind == wire.Kind.EPOCH_END:
                self._digests = {message.epoch: message.digest}     # only the epoch being verified
                self._epoch_bytes[0] = message.raw_bytes
                self._feed(proto.EpochEnd(now, message.epoch, message.pages, message.batches))
            elif kind == wire.Kind.HEARTBEAT:
                self._feed(proto.HeardFromPrimary(now))
            elif kind == wire.Kind.BYE:
                self._feed(proto.PrimaryLeft(now))
        except (StagingError, wire.WireError) as exc:
            self.rejected_frames += 1
            self._feed(proto.BadFrame(now, str(exc)))
            self._send_refuse("bad_frame", str(exc))

    # -- commands ------------------------------------------------------------------
    def _feed(self, event: proto.ReplicaEvent) -> None:
        self._run(self.protocol.handle(event))

    def _run(self, commands: list[proto.Command]) -> None:
        for command in commands:
            getattr(self, f"_do_{type(command).__name__}")(command)

    def _send(self, build: Callable[[], list]) -> None:
        """Send one frame, built (and so numbered) only now."""
        if self.peer is None or self.socket is None or self.writer is None:
            return
        seq = self.writer.next_seq
        try:
            self.socket.send_multipart([self.peer, *build()], copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.writer.next_seq = seq            # not sent: the number is not used up
            log.warning("the primary's queue is full: a reply was dropped")

    def _send_refuse(self, reason: str, detail: str) -> None:
        if self.writer is not None:
            code = reason if reason in wire.REFUSE_REASONS else "bad_frame"
            self._send(lambda: self.writer.message(wire.Refuse(code, detail[:1000])))

    def _do_Log(self, command: proto.Log) -> None:
        getattr(log, command.level)(command.message)

    def _do_SendWelcome(self, command: proto.SendWelcome) -> None:
        self._send(lambda: self.writer.message(wire.Welcome(command.version, command.committed_epoch or None)))

    def _do_SendRefuse(self, command: proto.SendRefuse) -> None:
        reason = "no_common_version" if "version" in command.reason else "protocol"
        self._send_refuse(reason, command.reason)

    def _do_OpenStaging(self, command: proto.OpenStaging) -> None:
        self.standby.open(command.epoch, command.pages)

    def _do_Verify(self, command: proto.Verify) -> None:
        ok, reason = self.standby.verify(self._digests.pop(command.epoch, b""))
        self._feed(proto.Verified(time.monotonic(), command.epoch, ok, reason))

    def _do_Commit(self, command: proto.Commit) -> None:
        pages = self.standby.commit(command.consistent)
        self.commits.append((time.monotonic(), pages, self._epoch_bytes[0], self._epoch_bytes[1],
                             self.standby.last_apply_ns))
        if self.hooks.on_commit is not None:
            self.hooks.on_commit(command.epoch, self.standby)

    def _do_SendAck(self, command: proto.SendAck) -> None:
        ack = wire.Ack(command.epoch, self.standby.last_apply_ns)
        writer = self.writer
        send = lambda *_: self._send(lambda: writer.message(ack)) if writer is self.writer else None  # noqa: E731
        held = self.hooks.hold_ack(command.epoch) if self.hooks.hold_ack is not None else None
        if held is None:
            send()
        else:
            held.add_done_callback(send)

    def _do_Discard(self, command: proto.Discard) -> None:
        log.warning("epoch %d discarded whole: %s", command.epoch, command.reason)
        if self.standby is not None:
            self.standby.discard()

    def _do_SendHeartbeat(self, command: proto.SendHeartbeat) -> None:
        if self.writer is not None:
            self._send(lambda: self.writer.frame(wire.Kind.HEARTBEAT, epoch=self.protocol.committed_epoch))

    def _do_Failover(self, command: proto.Failover) -> None:
        log.error("FAILOVER: %s; starting the standby guest from epoch %d", command.reason, command.epoch)
        self._failover_started = time.monotonic()
        standby = self.standby
        data = standby.memory.slots[layout.DATA_SLOT].spec
        config = MachineConfig(vcpus=len(standby.vcpus), data_bytes=data.size, dirty_log="bitmap")
        service_port = self.config.replica.service_port
        if service_port:
            # The guest's service: a stream device over the restored memory. attach() closes every
            # connection the checkpoint shows open (those clients were the dead primary's).
            self.device = StreamDevice("127.0.0.1", service_port)
        ports = self.device.ports if self.device is not None else None
        machine = KvmMachine(config, memory=standby.memory, load=False, track_dirty=False, ports=ports)
        machine.restore_vcpus(standby.vcpus)
        machine.set_event_sink(lambda e: self._loop.call_soon_threadsafe(self._on_guest_event, e))
        self.machine = machine
        if self.device is not None:
            self.device.attach(machine)
            self._spawn(self._serve())
        machine.start()

    async def _serve(self) -> None:
        await self.device.start()
        if self.takeover_ms is None:             # the service is back: that is the takeover
            self.takeover_ms = (time.monotonic() - self.last_primary_message) * 1000
        log.error("the service is back on port %d (takeover %.1f ms after the primary's last message)",
                  self.device.port, self.takeover_ms)

    def _on_guest_event(self, event: Event) -> None:
        if isinstance(event, Progress) and self.takeover_ms is None:
            self.takeover_ms = (time.monotonic() - self.last_primary_message) * 1000
            log.error("the standby guest is running (takeover %.1f ms after the primary's last "
                      "message; %.1f ms after the failover decision)", self.takeover_ms,
                      (time.monotonic() - self._failover_started) * 1000)
        elif isinstance(event, RingSoftFull):
            pass                                  # not tracked after failover
        elif isinstance(event, Fault):
            log.error("the standby guest faulted: %s", event)
            self.last_error = repr(event)

    # -- clocks ----------------------------------------------------------------------
    async def _tick_loop(self) -> None:
        period = self.protocol.config.heartbeat_interval / 4
        while True:
            await asyncio.sleep(period)
            self._feed(proto.ReplicaTick(time.monotonic()))

    def guest_progress(self) -> int:
        if self.machine is not None:
            return sum(self.machine.progress_all())
        return self.standby.progress() if self.standby is not None else 0

    def status(self) -> dict:
        now = time.monotonic()
        recent = [c for c in self.commits if now - c[0] <= 5.0]
        span = min(5.0, now - recent[0][0]) if len(recent) > 1 else 5.0
        pages = np.array([c[1] for c in recent]) if recent else np.zeros(0)
        apply_us = np.array([c[4] / 1000 for c in recent]) if recent else np.zeros(0)
        return {
            "role": "active" if self.protocol.mode is proto.ReplicaMode.ACTIVE else "replica",
            "mode": self.protocol.mode.value,
            "epoch": self.epoch,
            "committed_epoch": self.protocol.committed_epoch,
            "consistent_epoch": self.protocol.consistent_epoch,
            "checkpoints_per_s": len(recent) / span if span > 0 else 0.0,
            "pause_us_p50": 0.0,
            "pause_us_p99": 0.0,
            "apply_us_p50": float(np.percentile(apply_us, 50)) if len(apply_us) else 0.0,
            "dirty_pages_p50": float(np.percentile(pages, 50)) if len(pages) else 0.0,
            "raw_mb_per_s": sum(c[2] for c in recent) / span / 1e6 if span > 0 else 0.0,
            "encoded_mb_per_s": sum(c[3] for c in recent) / span / 1e6 if span > 0 else 0.0,
            "guest_progress": self.guest_progress(),
            "takeover_ms": self.takeover_ms,
            "rejected_frames": self.rejected_frames,
            "last_error": self.last_error,
        }

    def _log_line(self, figures: dict) -> None:
        log.info("%s committed %d (%.0f ckpt/s, dirty p50 %.0f, apply p50 %.0f us, %.1f MB/s "
                 "encoded) progress %d%s", figures["role"], figures["committed_epoch"],
                 figures["checkpoints_per_s"], figures["dirty_pages_p50"], figures["apply_us_p50"],
                 figures["encoded_mb_per_s"], figures["guest_progress"],
                 f" takeover {figures['takeover_ms']:.1f} ms" if figures["takeover_ms"] else "")

    async def _status_loop(self) -> None:
        await status_loop(self.config.status, self.status, self._log_line)
