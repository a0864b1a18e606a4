"""The replica agent: the asyncio shell around ReplicaProtocol.

It listens on a ROUTER socket (CURVE server unless --insecure), decodes every
frame (checksums, session, sequence), feeds what it decoded to the protocol,
and carries out what the protocol answers: adopt a session, stage a frame
into `Standby`, verify, commit, acknowledge, refuse, fail over. The decisions
(which session is ours, whether a frame belongs to the open epoch, which
refusal to send, when to fail over) are the protocol's; this shell only
knows which peer sent the frame it is handling, so that an answer goes back
to it. Supervision, dispatch and the status file are the shared agent
runtime's (checkpointer.runtime); the failover itself is replica.failover.

Everything that touches the standby (open, stage, verify, commit, discard)
runs in order on one worker thread, the standby lane: decoding and committing
a large epoch takes tens of milliseconds to seconds, and the loop must go on
answering heartbeats and receiving frames meanwhile. What must follow a
standby step runs after it: an ack only once its commit is done, a failover
only once every commit queued before it is done. A stage that fails in the
lane is refused at once (BadFrame, posted back to the loop) and its epoch is
never committed (its verification fails too).

Takeover time is measured from the last message received from the primary to
the service back (or, without a service, the standby guest's first progress
report).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from checkpointer import protocol as proto
from checkpointer import wire
from checkpointer.config import ReplicaAgentConfig
from checkpointer.fencing import Fence, FenceMode, LeaseChange, node_name
from checkpointer.guest import Guest
from checkpointer.output import OutputBuffer
from checkpointer.runtime import Channel, Rolling, Runtime, realtime, set_zmq_heartbeats
from checkpointer.security import secure_server
from ring.errors import RingError
from ring.memory import SlotSpec
from ring.vcpus import Event, Fault, Progress, RingSoftFull

from .failover import restore_standby
from .standby import Standby, StagingError

log = logging.getLogger("colo.replica")

STATUS_HORIZON = 5.0            # seconds of commits the status figures cover
INLINE_PAGES = 32               # epochs up to this many pages are staged and committed on the loop
DISCONNECT_GRACE = 0.002         # seconds between a closed connection and the failover decision
REPLICA_COMMANDS = (proto.AdoptSession, proto.SendWelcome, proto.SendRefuse, proto.OpenStaging,
                    proto.StagePart, proto.Verify, proto.SendAck, proto.Discard,
                    proto.SendHeartbeat, proto.ClaimLease, proto.Failover, proto.Log)
PART_KINDS = {wire.Kind.PAGES: proto.PartKind.PAGES, wire.Kind.VCPU_STATE: proto.PartKind.VCPU,
              wire.Kind.DEVICE_STATE: proto.PartKind.DEVICE}


@dataclass
class ReplicaHooks:
    """Test hooks."""

    on_commit: Callable[[int, Standby], None] | None = None
    hold_ack: Callable[[int], "asyncio.Future | None"] | None = None   # a future delays the ack


class StandbyLane:
    """Standby work in order on one worker thread (see the module's docstring).

    Small work (a small epoch's open, stage, verify and commit) runs on the loop itself when
    nothing is queued on the thread: a thread handoff costs more than decoding a few pages
    (a future per step, a wake-up of the worker, the GIL taken back and forth), and order is
    kept because the thread is idle. Large work, and anything queued behind it, goes to the thread.
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="colo-standby")
        self._last: asyncio.Future | None = None
        self.failed: dict[int, str] = {}          # epoch -> why a stage of it failed (lane thread only)
        self.inline = False                       # work runs on the loop right now (see post)

    def run(self, work: Callable[..., object], *args, small: bool = False) -> None:
        """Queue `work(*args)` after everything queued before it (call on the loop); `small` work
        runs at once, on the loop, if the thread has nothing queued."""
        last = self._last
        if small and (last is None or last.done()):
            self.inline = True
            try:
                work(*args)
            except Exception:                     # as on the thread: the step's own error, logged
                log.exception("standby step %s failed", getattr(work, "__name__", work))
            finally:
                self.inline = False
            return
        self._last = asyncio.get_running_loop().run_in_executor(self._executor, work, *args)

    def then(self, callback: Callable[[], None]) -> None:
        """Call `callback` on the loop once everything queued so far is done."""
        last = self._last
        if last is None or last.done():
            callback()
        else:
            last.add_done_callback(lambda _: callback())

    async def idle(self) -> None:
        """Return once everything queued so far is done (its errors are reported where it ran)."""
        last = self._last
        if last is not None and not last.done():
            await asyncio.wait([last])

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=False)


@dataclass
class _Incoming:
    """The message being handled: who sent it, and what it is (answers go back to `identity`).

    For a HELLO, `standby` is the standby built for its layout, adopted only if the protocol
    adopts the session (else closed): building it first means a layout this host cannot hold
    is refused before anything of the current session changes.
    """

    identity: bytes
    frame: wire.Frame | None = None
    message: object = None
    standby: Standby | None = None
    resumed: bool = False            # `standby` is ours, kept for a HELLO that resumes its session


class ReplicaAgent:
    """Receive epochs, keep the standby at the last complete one, take over when the primary dies."""

    def __init__(self, config: ReplicaAgentConfig, *, hooks: ReplicaHooks | None = None,
                 fence: Fence | None = None, track_after_takeover: bool = False) -> None:
        """`fence`: the node's (colo-node hands it on with the guest after a takeover); else one
        of its own. `track_after_takeover`: the taken-over guest keeps a dirty ring per vCPU, so
        that this node can protect it as the primary of the next replica (then hand_over())."""
        self.config = config
        self.track_after_takeover = track_after_takeover
        self.took_over = asyncio.Event()          # set once the taken-over guest serves
        self.hooks = hooks or ReplicaHooks()
        replication = config.replication
        self.protocol = proto.ReplicaProtocol(proto.ReplicaConfig(
            supported_versions=wire.SUPPORTED_VERSIONS,
            heartbeat_interval=replication.heartbeat_ms / 1000,
            primary_timeout=replication.timeout_ms / 1000))
        self.runtime = Runtime(self, log, REPLICA_COMMANDS)
        self.context = zmq.asyncio.Context()
        self.socket: zmq.asyncio.Socket | None = None
        self.channel: Channel | None = None       # the socket's reads and sends, on the loop
        self.authenticator = None
        self.standby: Standby | None = None
        self.lane = StandbyLane()
        self.guard = wire.FrameGuard(accept=wire.PRIMARY_KINDS)
        self.writer: wire.FrameWriter | None = None
        self.peer: bytes | None = None
        self.endpoint: str | None = None
        self.active: Guest | None = None          # the guest this node serves once it took over
        self.takeover_ms: float | None = None
        self._takeover_marks: dict[str, float] = {}       # step -> when (monotonic), for the log
        self.takeover_steps_ms: dict[str, float] = {}     # step -> ms after the primary's last message
        self.took_over_at: float | None = None            # wall-clock time the service was back
        self._closed_at = 0.0                             # when the primary's connection last closed
        self._realtime = False                            # the loop's thread runs SCHED_FIFO (takeover)
        self.last_primary_message = 0.0
        self._incoming: _Incoming | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.committed_progress = 0              # the guest's progress in the last committed epoch
        self._standby_session = 0                # the session the standby's copy comes from
        self._ends: dict[int, tuple[bytes, int]] = {}      # epoch -> (END digest, raw bytes)
        self.commit_pages = Rolling(4096)
        self.commit_raw = Rolling(4096)
        self.commit_encoded = Rolling(4096)
        self.apply_us = Rolling(4096)
        self._epoch_encoded = 0
        self._epoch_pages = 0                    # pages the open epoch announced
        self.epoch = 0
        self.rejected_frames = 0
        self._connections: set[int] = set()      # open connections' fds (socket monitor)
        self.monitor: zmq.asyncio.Socket | None = None
        self._closed = False
        self.status_extra: Callable[[], dict] = dict   # what a node adds (colo-node)
        self._own_fence = fence is None
        self.fence = fence if fence is not None else Fence(config.fencing, node_name(config.fencing, "replica"))
        if self.fence.mode is FenceMode.OFF:
            log.warning("NO FENCING (--no-fencing): this replica takes over on silence alone; a frozen or "
                        "cut-off primary that comes back makes TWO ACTIVE NODES: SPLIT BRAIN")
        elif self.fence.mode is FenceMode.MANUAL:
            log.warning("no etcd (--etcd): this replica will not take over by itself when the primary is "
                        "lost")
        self.active_output = OutputBuffer(gate=self.fence.may_serve)   # the active guest's replies
        self._holding: asyncio.Task | None = None
        self._last_tick = time.monotonic()
        self._stalled_at = float("-inf")        # when this process last stood still (fencing S3)

    @property
    def last_error(self) -> str | None:
        return self.runtime.last_error

    @property
    def machine(self):
        return self.active.machine if self.active is not None else None

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
        if self.socket is None:
            self.bind()
        self._loop = asyncio.get_running_loop()
        log.info("replica listening on %s", self.endpoint)
        log.info("fencing: %s", await self.fence.connect())
        await self.runtime.run([self._recv_loop, self._monitor_loop, self._tick_loop, self._status_loop],
                               self._shutdown)

    def stop(self) -> None:
        self.runtime.stop()

    async def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.runtime.cancel_all()
        await self.lane.idle()
        self.lane.close()
        if self.socket is not None:
            self.socket.disable_monitor()
            self.monitor.close(linger=0)
            self.socket.close(linger=0)
            self.socket = None
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None
        if self.active is not None:
            self.active_output.gate = lambda: False
            self.active.close()                   # (with the standby memory it runs over)
            self.active = None
            self.standby = None
        if self._own_fence:
            await self.fence.close()
        if self.standby is not None:
            self.standby.close()
            self.standby = None
        self.context.term()

    # -- frames --------------------------------------------------------------------
    async def _monitor_loop(self) -> None:
        while True:
            if self._connection_event(await self.monitor.recv_multipart()) and not self._connections:
                self._closed_at = time.monotonic()
                # What the primary sent before it went (a BYE, an epoch's end) must be handled
                # first: the receive loop takes it from ZeroMQ's queue meanwhile.
                await asyncio.sleep(DISCONNECT_GRACE)
                deadline = time.monotonic() + 1.0
                while self._unread() and time.monotonic() < deadline:
                    await asyncio.sleep(0.001)
                # A reconnecting primary's new connection may be accepted already (its HELLO even
                # handled) with the event still queued behind this close: count it first.
                while await self.monitor.poll(0):
                    self._connection_event(await self.monitor.recv_multipart())
                if not self._connections:
                    now = time.monotonic()
                    stalled = self._stalled(now)
                    # the epochs it ended before it went count: their checks and commits first
                    await self.lane.idle()
                    if not self._connections:
                        self._feed(proto.PrimaryDisconnected(now, stalled))

    def _unread(self) -> bool:
        """Whether a message waits unread (asking ZeroMQ may take the channel's signal: poke it)."""
        if self.channel is None or self.channel.closed:
            return False
        unread = bool(self.channel.plain.getsockopt(zmq.EVENTS) & zmq.POLLIN)
        self.channel.poke()
        return unread

    def _connection_event(self, message: list[bytes]) -> bool:
        """Count the connections from a socket-monitor event; True if one of ours closed."""
        event = parse_monitor_message(message)
        # (HANDSHAKE_SUCCEEDED carries no fd, so connections are counted from ACCEPTED: a
        # refused peer can only close its own connection, never empty the set under a live primary)
        if event["event"] == zmq.EVENT_ACCEPTED:
            self._connections.add(event["value"])
        elif event["event"] == zmq.EVENT_DISCONNECTED and event["value"] in self._connections:
            self._connections.discard(event["value"])
            return True
        return False

    def _stalled(self, now: float) -> bool:
        """Whether this process stood still lately (then a close proves nothing: fencing S3)."""
        timeout = self.protocol.config.primary_timeout
        return now - self._last_tick > timeout / 4 or now - self._stalled_at < timeout

    async def _recv_loop(self) -> None:
        # copy=False: the parts stay ZeroMQ's buffers (a page batch is not copied into bytes); the
        # frames' payloads are memoryviews over them, which keep them alive until the lane is done.
        # Each message is handled as it is read (runtime.Channel), then the loop goes on.
        self.channel = Channel(self.socket, self._handle, copy=False, on_error=self.runtime.fail)
        try:
            await asyncio.get_running_loop().create_future()       # until cancelled
        finally:
            self.channel.close()

    def _handle(self, parts: list) -> None:
        """Split one message from the socket into its frames (wire.decode_message) and handle each
        in order, exactly as if it had come alone; the first bad frame is refused and ends the
        message (nothing after it is read)."""
        now = time.monotonic()
        identity = bytes(parts[0])
        frames = wire.decode_message(parts[1:])
        while True:
            try:
                try:
                    frame = next(frames)
                except StopIteration:
                    return
                self.guard.check(frame, adopt=False)     # a new session only once the protocol adopts it
                message = wire.decode_payload(frame)
            except wire.WireError as exc:
                self.rejected_frames += 1
                if identity == self.peer:             # another peer's junk must not touch our session
                    self._feed(proto.BadFrame(now, str(exc), proto.RefuseReason(exc.reason)))
                else:
                    log.warning("ignored a bad frame from a peer that is not our primary: %s", exc)
                return
            self._handle_frame(identity, frame, message, now)

    def _handle_frame(self, identity: bytes, frame: wire.Frame, message, now: float) -> None:
        """Let the protocol decide about one checked frame."""
        self._incoming = _Incoming(identity)
        try:
            self._incoming.frame, self._incoming.message = frame, message
            if self.protocol.mode is not proto.ReplicaMode.ACTIVE:
                self.last_primary_message = now      # (takeover is measured from the last one)
            if frame.kind == wire.Kind.HELLO:
                layout_problem = self._prepare_standby(message)
                self._feed(proto.Hello(now, message.session, tuple(message.versions), layout_problem,
                                       message.token, self._fencing_problem(message.token),
                                       self._incoming.resumed))
            elif identity == self.peer:
                self._on_frame(frame, message, now)
        finally:
            if self._incoming.standby is not None and self._incoming.standby is not self.standby:
                self._incoming.standby.close()       # built for a HELLO that was not adopted
            self._incoming = None

    def _prepare_standby(self, hello: wire.Hello) -> str:
        """Build the standby a HELLO's layout needs, or keep ours if the HELLO resumes the session it
        holds the copy of; returns why it cannot be built ("" if it could)."""
        slots = [SlotSpec(s.slot, s.guest_phys_addr, s.size) for s in hello.slots]
        if (hello.resume_of and hello.resume_of == self._standby_session and self.standby is not None
                and self.active is None and wire.MESSAGE_VERSION in hello.versions
                and self.standby.layout == slots):
            self._incoming.standby = self.standby
            self._incoming.resumed = True
            return ""
        try:
            self._incoming.standby = Standby(slots)
        except (ValueError, OSError, RingError) as exc:
            return f"this replica cannot hold the primary's memory layout: {exc}"
        return ""

    def _fencing_problem(self, token: int) -> str:
        """Both sides must fence alike: a takeover needs the primary's lease in the same etcd."""
        if self.fence.mode is FenceMode.ETCD and not token:
            return ("this replica fences with etcd (--etcd) but the primary does not: give both the "
                    "same --etcd")
        if self.fence.mode is not FenceMode.ETCD and token:
            return (f"the primary fences with etcd (token {token}) but this replica has no --etcd: give "
                    f"both the same --etcd")
        return ""

    def _on_frame(self, frame: wire.Frame, message, now: float) -> None:
        kind = frame.kind
        if kind == wire.Kind.EPOCH_BEGIN:
            self._feed(proto.EpochBegin(now, message.epoch, message.pages, message.batches, not message.sync,
                                        message.token))
        elif kind in PART_KINDS:
            self._feed(proto.EpochPart(now, frame.epoch, PART_KINDS[kind], frame.count))
        elif kind == wire.Kind.EPOCH_END:
            self._ends = {message.epoch: (message.digest, message.raw_bytes)}   # only the epoch being verified
            self._feed(proto.EpochEnd(now, message.epoch, message.pages, message.batches))
        elif kind == wire.Kind.HEARTBEAT:
            self._feed(proto.HeardFromPrimary(now))
        elif kind == wire.Kind.BYE:
            self._feed(proto.PrimaryLeft(now))

    # -- commands ------------------------------------------------------------------
    def _feed(self, event: proto.ReplicaEvent) -> None:
        self.runtime.execute(self.protocol.handle(event))

    def _send(self, identity: bytes | None, writer: wire.FrameWriter | None, build: Callable[[], list]) -> None:
        """Send one frame to `identity`, built (and so numbered) only now."""
        if identity is None or self.socket is None or writer is None:
            return
        seq = writer.next_seq
        # One part (header and payload joined, as a message may be from version 2 on) rather than
        # two: each ZeroMQ part is a send of its own, and a message of one part can never be cut
        # after its first part (libzmq asserts on that). Frames with an empty payload keep two parts.
        parts = [identity, *wire.join_frames([build()])]
        if self.channel is not None and not self.channel.closed:
            sent = self.channel.try_send(parts)
        else:
            try:
                self.socket.send_multipart(parts, copy=False, flags=zmq.NOBLOCK)
                sent = True
            except zmq.Again:
                sent = False
        if not sent:
            writer.next_seq = seq                 # not sent: the number is not used up
            log.warning("the primary's queue is full: a reply was dropped")

    def _do_AdoptSession(self, command: proto.AdoptSession) -> None:
        kept = self._incoming.standby is self.standby
        if self.standby is not None and not kept:
            self.lane.run(self.standby.close)     # after what the lane still does with it
        self.standby, self._incoming.standby = self._incoming.standby, None
        if not kept:
            self.committed_progress = 0
        else:
            log.info("resuming: the standby keeps its copy of session %x (committed epoch %d)",
                     self._standby_session, self.standby.committed_epoch)
        self._standby_session = command.session
        log.info("standby memory: %s", ", ".join(f"slot {s.slot} {s.size >> 20} MiB" for s in self.standby.layout))
        self.peer = self._incoming.identity
        self.guard.adopt(command.session)
        self.writer = wire.FrameWriter(session=command.session)
        self._ends.clear()
        self.runtime.spawn(self.fence.learn_primary())   # who to revoke, should this primary die

    def _do_SendWelcome(self, command: proto.SendWelcome) -> None:
        welcome = wire.Welcome(command.version, command.committed_epoch or None, self.protocol.newest_token,
                               command.resumed)
        self.writer.version = command.version     # every frame after the WELCOME (itself at HANDSHAKE_VERSION)
        self._send(self.peer, self.writer, lambda: self.writer.message(welcome))

    def _do_SendRefuse(self, command: proto.SendRefuse) -> None:
        incoming = self._incoming
        if incoming is not None and incoming.frame is not None and incoming.frame.kind == wire.Kind.HELLO:
            # a HELLO we did not adopt: answer its sender in its own session, keep ours
            identity, writer = incoming.identity, wire.FrameWriter(session=incoming.message.session)
        else:
            identity, writer = self.peer, self.writer
        refuse = wire.Refuse(command.code, command.detail[:1000])
        self._send(identity, writer, lambda: writer.message(refuse))

    # The standby's steps run in the lane; `standby` is the one of the session that asked.
    def _post(self, callback: Callable, *args) -> None:
        """(Lane thread.) Run `callback(*args)` on the loop (not once it is closed: we are stopping)."""
        try:
            if self.lane.inline:                  # (the step runs on the loop: no wake-up needed)
                self._loop.call_soon(callback, *args)
            else:
                self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            pass

    def _lane_failed(self, epoch: int, problem: str) -> None:
        """(Lane thread.) A step of `epoch` failed: refuse now, and never commit that epoch."""
        self.lane.failed[epoch] = problem
        self._post(self._stage_refused, problem)

    def _stage_refused(self, problem: str) -> None:
        self.rejected_frames += 1
        self._feed(proto.BadFrame(time.monotonic(), problem))

    def _do_OpenStaging(self, command: proto.OpenStaging) -> None:
        def open_epoch(standby: Standby, epoch: int, pages: int) -> None:
            self.lane.failed.pop(epoch, None)
            try:
                standby.open(epoch, pages)
            except StagingError as exc:           # e.g. more pages announced than the guest has
                self._lane_failed(epoch, str(exc))

        self.lane.run(open_epoch, self.standby, command.epoch, command.pages,
                      small=command.pages <= INLINE_PAGES)
        self._epoch_pages = command.pages
        self.epoch = command.epoch
        self._epoch_encoded = 0

    def _do_StagePart(self, command: proto.StagePart) -> None:
        frame, message = self._incoming.frame, self._incoming.message
        self._epoch_encoded += len(frame.payload)

        def stage(standby: Standby, epoch: int) -> None:
            if epoch in self.lane.failed:
                return
            try:
                if command.kind is proto.PartKind.PAGES:
                    staged = standby.stage_pages(frame.payload)
                    if staged != frame.count:
                        raise StagingError(f"epoch {epoch}: a PAGES frame says {frame.count} pages but its "
                                           f"batch holds {staged}")
                elif command.kind is proto.PartKind.VCPU:
                    standby.stage_vcpus(frame.payload, message)
                else:
                    standby.stage_device(frame.payload)
            except (StagingError, wire.WireError, ValueError) as exc:
                self._lane_failed(epoch, str(exc))

        self.lane.run(stage, self.standby, command.epoch,
                      small=command.kind is not proto.PartKind.PAGES or frame.count <= INLINE_PAGES)

    def _do_Verify(self, command: proto.Verify) -> None:
        digest, raw = self._ends.pop(command.epoch, (b"", 0))
        encoded = self._epoch_encoded

        def verify_and_commit(standby: Standby, epoch: int, consistent: bool) -> None:
            problem = self.lane.failed.pop(epoch, None)
            ok, reason = (False, problem) if problem else standby.verify(digest)
            if ok:
                pages = standby.commit(consistent)
                if self.hooks.on_commit is not None:
                    self.hooks.on_commit(epoch, standby)  # (before the lane's next step changes it)
                self._post(self._committed, pages, raw, encoded, standby.last_apply_ns, standby.progress())
            self._post(self._feed, proto.Verified(time.monotonic(), epoch, ok, reason))

        self.lane.run(verify_and_commit, self.standby, command.epoch, command.consistent,
                      small=self._epoch_pages <= INLINE_PAGES)

    def _committed(self, pages: int, raw: int, encoded: int, apply_ns: int, progress: int) -> None:
        """(On the loop, just before the epoch's Verified.) The commit's figures; the guest's progress
        as that epoch left it, so that the status never shows a standby ahead of its committed epoch."""
        self.committed_progress = progress
        now = time.monotonic()
        self.commit_pages.add(pages, now)
        self.commit_raw.add(raw, now)
        self.commit_encoded.add(encoded, now)
        self.apply_us.add(apply_ns / 1000, now)

    def _do_SendAck(self, command: proto.SendAck) -> None:
        peer, writer, standby = self.peer, self.writer, self.standby

        def send(*_) -> None:
            if writer is self.writer:             # still the same session
                ack = wire.Ack(command.epoch, standby.last_apply_ns)
                self._send(peer, writer, lambda: writer.message(ack))

        def after_commit() -> None:               # (on the loop)
            held = self.hooks.hold_ack(command.epoch) if self.hooks.hold_ack is not None else None
            if held is None:
                send()
            else:
                held.add_done_callback(send)

        self.lane.then(after_commit)

    def _do_Discard(self, command: proto.Discard) -> None:
        log.warning("epoch %d discarded whole: %s", command.epoch, command.reason)
        if self.standby is not None:
            self.lane.run(self.standby.discard, small=True)

    def _do_SendHeartbeat(self, command: proto.SendHeartbeat) -> None:
        writer = self.writer
        if writer is not None:
            self._send(self.peer, writer,
                       lambda: writer.frame(wire.Kind.HEARTBEAT, epoch=self.protocol.committed_epoch))

    def _do_ClaimLease(self, command: proto.ClaimLease) -> None:
        if command.proven_dead:                   # a takeover in tens of ms: this thread first until it serves
            self._realtime = realtime(True)
            gc.disable()                          # and no collection of the whole heap in the middle
        now = time.monotonic()
        self._takeover_marks = {"claim started": now}
        if self.last_primary_message <= self._closed_at <= now:
            self._takeover_marks["connection closed"] = self._closed_at
        self.runtime.spawn(self._claim(command))

    async def _claim(self, command: proto.ClaimLease) -> None:
        claim = await self.fence.claim(command.primary_token, command.session, command.proven_dead)
        if claim.won:
            self._feed(proto.LeaseClaimed(time.monotonic(), claim.token))
        else:
            self._end_realtime()
            self._feed(proto.ClaimFailed(time.monotonic(), claim.reason))

    def _end_realtime(self) -> None:
        gc.enable()
        if self._realtime:
            self._realtime = not realtime(False)

    def _do_Failover(self, command: proto.Failover) -> None:
        log.error("FAILOVER: %s; starting the standby guest from epoch %d", command.reason, command.epoch)
        self._takeover_marks["key taken"] = time.monotonic()
        self.runtime.spawn(self._fail_over(command.epoch))

    async def _fail_over(self, decided_epoch: int) -> None:
        try:
            await self._restore_and_run(decided_epoch)
        finally:
            self._end_realtime()                  # the guest runs (and serves): nothing more to hurry

    async def _restore_and_run(self, decided_epoch: int) -> None:
        await self.lane.idle()                    # every check and commit queued before the decision
        self._takeover_marks["commits done"] = time.monotonic()
        if self.standby.committed_epoch != decided_epoch:
            log.info("the standby committed epoch %d meanwhile (complete and verified): it runs that",
                     self.standby.committed_epoch)
        loop = asyncio.get_running_loop()
        self.active = restore_standby(self.standby, service_host=self.config.service.host,
                                      service_port=self.config.service.takeover_port,
                                      track_dirty=self.track_after_takeover)
        self.active.owns(self.standby)
        device = self.active.device
        self.active.route_output(lambda slot, data, generation: self._active_output(device, slot, data, generation))
        self._holding = self.runtime.spawn(self.fence.hold(self._lease_changed))
        machine = self.active.machine
        machine.set_event_sink(lambda e: loop.call_soon_threadsafe(self._on_guest_event, e))
        self._takeover_marks["guest restored"] = time.monotonic()
        machine.start()                           # the vCPUs at once; the service port in _serve
        if self.active.device is not None:
            await self._serve()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        await self.active.start(lambda e: loop.call_soon_threadsafe(self._on_guest_event, e))
        if self.takeover_ms is None:             # the service is back: that is the takeover
            steps = self._took_over("serving")
            log.error("the service is back on port %d (takeover %.1f ms after the primary's last message: "
                      "%s)", self.active.device.port, self.takeover_ms, steps)
        self.took_over.set()

    def _took_over(self, last_step: str) -> str:
        """Record the takeover's figures, `last_step` done now; the steps, as the log says them: where
        the time went, each step after the one before it, from the primary's last message (ms)."""
        now = time.monotonic()
        self._takeover_marks[last_step] = now
        self.takeover_ms = (now - self.last_primary_message) * 1000
        self.took_over_at = time.time()
        marks = sorted(self._takeover_marks.items(), key=lambda item: item[1])
        self.takeover_steps_ms = {name: round((when - self.last_primary_message) * 1000, 1) for name, when in marks}
        befores = [self.last_primary_message] + [when for _, when in marks[:-1]]
        return ", ".join(f"{name} +{(when - before) * 1000:.1f}" for (name, when), before in zip(marks, befores))

    async def hand_over(self) -> Guest:
        """Stop this replica role and give its taken-over guest (and the memory and lease it runs
        on) to whoever protects it next; the fence keeps its lease (renewed again by the next role)."""
        await self.took_over.wait()
        guest, self.active = self.active, None
        self.standby = None                       # the guest owns it now
        if self._holding is not None:
            self._holding.cancel()
        self.active_output.flush()              # (its gate stays: the next role routes the replies anew)
        self.stop()
        return guest

    def _active_output(self, device, slot: int, data: bytes, generation: int) -> None:
        """The active guest's replies leave only while this node holds the lease (fencing S1)."""
        self.active_output.hold(0, lambda held: device.write_to_client(slot, held, generation), data)
        self.active_output.release(None)

    def _lease_changed(self, change: LeaseChange, reason: str) -> None:
        machine = self.machine
        if change is LeaseChange.LOST:
            log.error("FENCED: %s; the guest is held and no output leaves", reason)
            if machine is not None:
                machine.fence(True)
        elif change in (LeaseChange.RENEWED, LeaseChange.RETAKEN):
            log.warning("%s: serving again", reason)
            self.active_output.flush()
            if machine is not None:
                machine.fence(False)
        else:
            self.active_output.drop_deferred()
            self.active_output.gate = lambda: False
            self.runtime.last_error = f"superseded: {reason}"
            self.stop()

    def _on_guest_event(self, event: Event) -> None:
        if isinstance(event, Progress) and self.takeover_ms is None and self.active.device is None:
            steps = self._took_over("running")
            log.error("the standby guest is running (takeover %.1f ms after the primary's last "
                      "message: %s)", self.takeover_ms, steps)
            self.took_over.set()
        elif isinstance(event, RingSoftFull):
            pass                                  # not tracked after failover
        elif isinstance(event, Fault):
            log.error("the standby guest faulted: %s", event)
            self.runtime.last_error = repr(event)

    # -- clocks ----------------------------------------------------------------------
    async def _tick_loop(self) -> None:
        config = self.protocol.config
        await self.runtime.tick_loop(lambda: config.heartbeat_interval / 4, self._tick, lambda: config.primary_timeout)

    def _tick(self, now: float) -> None:
        if now - self._last_tick > self.protocol.config.primary_timeout / 4:
            self._stalled_at = now
        self._last_tick = now
        if self.channel is not None:
            self.channel.poke()                   # (a safety net: ZeroMQ's signal is easy to lose)
        self._feed(proto.ReplicaTick(now))

    def guest_progress(self) -> int:
        if self.active is not None:
            return sum(self.active.machine.progress_all())
        return self.committed_progress if self.standby is not None else 0

    def status(self) -> dict:
        return {
            "role": "active" if self.protocol.mode is proto.ReplicaMode.ACTIVE else "replica",
            "mode": self.protocol.mode.value,
            "epoch": self.epoch,
            "committed_epoch": self.protocol.committed_epoch,
            "consistent_epoch": self.protocol.consistent_epoch,
            "checkpoints_per_s": self.commit_pages.rate(),
            "pause_us_p50": 0.0,
            "pause_us_p99": 0.0,
            "apply_us_p50": self.apply_us.percentile(50, horizon=STATUS_HORIZON),
            "dirty_pages_p50": self.commit_pages.percentile(50, horizon=STATUS_HORIZON),
            "raw_mb_per_s": self.commit_raw.throughput() / 1e6,
            "encoded_mb_per_s": self.commit_encoded.throughput() / 1e6,
            "guest_progress": self.guest_progress(),
            "takeover_ms": self.takeover_ms,
            "takeover_steps_ms": self.takeover_steps_ms,
            "took_over_at": self.took_over_at,
            "fencing": self.fence.status(),
            "token": self.fence.token,
            "primary_token": self.protocol.primary_token,
            "protection": ("fenced" if self.fence.fenced else "unprotected (active, no replica)")
                          if self.protocol.mode is proto.ReplicaMode.ACTIVE else "standby",
            "rejected_frames": self.rejected_frames,
            "last_error": self.last_error,
            **self.status_extra(),
        }

    def _log_line(self, figures: dict) -> None:
        log.info("%s committed %d (%.0f ckpt/s, dirty p50 %.0f, apply p50 %.0f us, %.1f MB/s "
                 "encoded) progress %d%s", figures["role"], figures["committed_epoch"],
                 figures["checkpoints_per_s"], figures["dirty_pages_p50"], figures["apply_us_p50"],
                 figures["encoded_mb_per_s"], figures["guest_progress"],
                 f" takeover {figures['takeover_ms']:.1f} ms" if figures["takeover_ms"] else "")

    async def _status_loop(self) -> None:
        await self.runtime.status_loop(self.config.status, self.status, self._log_line)
