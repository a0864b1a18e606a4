"""The replica agent against a hand-driven primary over real ZeroMQ sockets (no KVM needed).

Corrupted, truncated, replayed and out-of-order frames are refused and leave the
standby exactly as it was; a primary without an authorized CURVE key is never
even heard.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from checkpointer import wire
from checkpointer.cluster import Cluster
from checkpointer.codec import EpochDigest, PageEncoder
from checkpointer.config import load_config
from checkpointer.security import generate_keys, secure_client
from ring.vcpu_state import VcpuState, pack_vcpu_states
from replica.agent import ReplicaAgent

SLOTS = [wire.SlotLayout(0, 0, 1 << 20), wire.SlotLayout(1, 1 << 30, 2 << 20)]
SLOT_SHIFT = np.uint64(40)


class FakePrimary:
    """Speaks the wire protocol by hand, so that a test can break it on purpose."""

    def __init__(self, context: zmq.asyncio.Context, endpoint: str, security=None) -> None:
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if security is not None:
            secure_client(self.socket, security)
        self.socket.connect(endpoint)
        self.writer = wire.FrameWriter()
        self.guard = wire.FrameGuard(session=self.writer.session, accept=wire.REPLICA_KINDS)
        self.encoder = PageEncoder(cache_pages=256)
        self.sent: list[list] = []

    async def send(self, parts) -> None:
        self.sent.append(parts)
        await self.socket.send_multipart(parts)

    async def receive(self, timeout: float = 5.0) -> wire.Frame | None:
        """The next frame from the replica that is not a heartbeat (None: nothing within timeout)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (remaining := deadline - loop.time()) > 0:
            try:        # asyncio's own timeout: a zmq poll future with a timeout once never resolved
                parts = await asyncio.wait_for(self.socket.recv_multipart(), remaining)
            except asyncio.TimeoutError:
                return None
            frame = wire.decode_one(parts)       # (one part, or two for an empty payload)
            self.guard.check(frame)
            if frame.kind != wire.Kind.HEARTBEAT:
                return frame
        return None

    async def hello(self) -> wire.Frame:
        await self.send(self.writer.message(wire.Hello(versions=[1], session=self.writer.session, slots=SLOTS,
                                                       vcpus=1, page_size=4096, agent="test")))
        return await self.receive()

    def epoch_frames(self, epoch: int, pages: dict[int, int]) -> list[list]:
        """Every frame of a consistent epoch writing byte `value` into data page `offset`."""
        keys = np.array(sorted((np.uint64(1) << SLOT_SHIFT) | np.uint64(o) for o in pages), dtype=np.uint64)
        content = np.zeros((len(keys), 4096), dtype=np.uint8)
        for row, offset in enumerate(sorted(pages)):
            content[row] = pages[offset]
        batch = self.encoder.encode(keys, content)
        vcpus = pack_vcpu_states([VcpuState(0, regs=bytes(144), sregs=bytes(312))])
        digest = EpochDigest()
        digest.update_pages(keys, content)
        digest.update_bytes(vcpus)
        digest.update_bytes(b"")
        w = self.writer
        return [w.message(wire.EpochBegin(epoch, "ring_full", len(keys), 1, False)),
                w.frame(wire.Kind.PAGES, epoch=epoch, count=len(keys), payload=batch.payload),
                w.frame(wire.Kind.VCPU_STATE, epoch=epoch, count=1, payload=vcpus),
                w.frame(wire.Kind.DEVICE_STATE, epoch=epoch),
                w.message(wire.EpochEnd(epoch, digest.digest(), len(keys), 1, len(keys) * 4096))]


def replica_config(**overrides):
    settings = {"replica.listen": "tcp://127.0.0.1:0", "security.insecure": True,
                "replication.heartbeat_ms": 20, "replication.timeout_ms": 60000}
    settings.update(overrides)
    return load_config("replica", None, settings)


async def start_replica(config) -> tuple[ReplicaAgent, asyncio.Task]:
    agent = ReplicaAgent(config)
    agent.bind()
    return agent, asyncio.ensure_future(agent.run())


async def stop(agent: ReplicaAgent, task: asyncio.Task) -> None:
    agent.stop()
    await asyncio.wait_for(task, 10)


def standby_state(agent: ReplicaAgent) -> tuple[bytes, int]:
    return agent.standby.digest_memory(), agent.protocol.committed_epoch


def _flip(parts: list, part: int, index: int) -> list:
    data = bytearray(bytes(parts[part]))
    data[index] ^= 0x40
    return [bytes(p) if i != part else bytes(data) for i, p in enumerate(parts)]


@pytest.mark.asyncio
@pytest.mark.parametrize("damage", ["corrupt_payload", "corrupt_header", "truncated", "replayed",
                                    "out_of_order", "wrong_key", "digest", "too_many_pages"])
async def test_bad_frames_are_refused_and_the_standby_is_unchanged(damage: str) -> None:
    agent, task = await start_replica(replica_config())
    context = zmq.asyncio.Context()
    primary = FakePrimary(context, agent.endpoint)
    try:
        assert (await primary.hello()).kind == wire.Kind.WELCOME
        for frame in primary.epoch_frames(1, {3: 7, 9: 9}):
            await primary.send(frame)
        ack = await primary.receive()
        assert ack.kind == wire.Kind.ACK and ack.epoch == 1
        before = standby_state(agent)
        assert agent.standby.memory.slots[1].pages[3, 0] == 7

        frames = primary.epoch_frames(2, {3: 11, 4: 12})
        if damage == "corrupt_payload":
            frames[1] = _flip(frames[1], 1, 40)
        elif damage == "corrupt_header":
            frames[1] = _flip(frames[1], 0, 30)
        elif damage == "truncated":
            frames[1] = [bytes(frames[1][0])[:40], frames[1][1]]
        elif damage == "replayed":
            frames.insert(2, primary.sent[-2])                 # epoch 1's VCPU_STATE again
        elif damage == "out_of_order":
            frames[1], frames[2] = frames[2], frames[1]
        elif damage == "wrong_key":                            # a page outside guest memory
            bad = primary.epoch_frames(2, {100000: 1})
            frames = bad
        elif damage == "digest":
            end = wire.EpochEnd(2, bytes(16), 2, 1, 2 * 4096)
            frames[-1] = primary.writer.message(end)
        elif damage == "too_many_pages":                       # more pages than the guest has
            frames = [primary.writer.message(wire.EpochBegin(2, "ring_full", 10**6, 1, False))]
        for frame in frames:
            await primary.send(frame)
        answer = await primary.receive(timeout=5)
        assert answer is not None and answer.kind == wire.Kind.REFUSE, answer
        # whatever the damage, nothing of epoch 2 reached the standby
        assert standby_state(agent) == before
        assert agent.standby.memory.slots[1].pages[3, 0] == 7
        assert agent.standby.memory.slots[1].pages[4, 0] == 0
        assert agent.rejected_frames + agent.protocol.rejected >= 1
        assert not task.done() and agent.last_error is None      # refused, not crashed
    finally:
        primary.socket.close()
        await stop(agent, task)
        context.term()


@pytest.mark.asyncio
async def test_a_layout_the_replica_cannot_hold_is_refused_and_the_session_goes_on() -> None:
    agent, task = await start_replica(replica_config())
    context = zmq.asyncio.Context()
    primary, stranger = FakePrimary(context, agent.endpoint), FakePrimary(context, agent.endpoint)
    try:
        assert (await primary.hello()).kind == wire.Kind.WELCOME
        for frame in primary.epoch_frames(1, {3: 7}):
            await primary.send(frame)
        assert (await primary.receive()).kind == wire.Kind.ACK
        too_large = [wire.SlotLayout(0, 0, 4 << 20), wire.SlotLayout(1, 1 << 32, 1 << 47)]   # 128 TiB
        await stranger.send(stranger.writer.message(wire.Hello(versions=[1], session=stranger.writer.session,
                                                               slots=too_large, vcpus=1, page_size=4096,
                                                               agent="test")))
        refusal = await stranger.receive()
        assert refusal.kind == wire.Kind.REFUSE
        assert wire.decode_payload(refusal).reason is wire.RefuseReason.LAYOUT_MISMATCH
        for frame in primary.epoch_frames(2, {3: 8}):          # our session was not touched
            await primary.send(frame)
        ack = await primary.receive()
        assert ack.kind == wire.Kind.ACK and ack.epoch == 2
        assert agent.standby.memory.slots[1].pages[3, 0] == 8 and agent.last_error is None
    finally:
        primary.socket.close()
        stranger.socket.close()
        await stop(agent, task)
        context.term()


def _hello_socket(context: zmq.Context, endpoint: str, keys_dir: Path, replica_key: Path,
                  monitor_events: int = 0) -> tuple[zmq.Socket, zmq.Socket | None]:
    """A DEALER with the primary key pair of `keys_dir` (CURVE), connected, its HELLO sent (zmq
    keeps it until the connection is up); and a monitor of `monitor_events`, attached before the
    connection so that no event is missed."""
    security = load_config("primary", None, {"primary.replica": endpoint, "security.keys_dir": str(keys_dir),
                                              "security.peer_public_key": str(replica_key)}).security
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    secure_client(sock, security)
    monitor = sock.get_monitor_socket(monitor_events) if monitor_events else None
    sock.connect(endpoint)
    writer = wire.FrameWriter()
    sock.send_multipart(writer.message(wire.Hello(versions=[1], session=writer.session, slots=SLOTS,
                                                  vcpus=1, page_size=4096, agent="test")))
    return sock, monitor


def _first_answer(sock: zmq.Socket, timeout_ms: int) -> wire.Kind | None:
    """The kind of the first frame that is not a heartbeat, or None when none came in time."""
    sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
    while True:
        try:
            frame = wire.decode_one(sock.recv_multipart())
        except zmq.Again:
            return None
        if frame.kind != wire.Kind.HEARTBEAT:
            return frame.kind


def test_primary_without_an_authorized_key_is_refused(tmp_path: Path) -> None:
    """The replica in its own process (CURVE server); plain blocking sockets here, bounded waits.

    The authorized primary goes first: once it is welcomed, the replica is known to be up and
    answering, so what happens to the stranger next is a refusal, not a replica still starting.
    The refusal itself is seen where CURVE puts it: the stranger's handshake fails on
    authentication (the ZAP handler said no), and not one frame reaches it.
    """
    generate_keys(tmp_path / "other", "primary")
    cluster = Cluster(tmp_path / "cluster", common=["--heartbeat-ms", "20"])
    context = zmq.Context()
    sockets: list[zmq.Socket] = []
    try:
        cluster.start_replica()
        replica_key = cluster.keys / "replica.key"
        authorized, _ = _hello_socket(context, cluster.endpoint, cluster.keys, replica_key)
        sockets.append(authorized)
        assert _first_answer(authorized, 30_000) == wire.Kind.WELCOME, cluster.log_tails()

        stranger, monitor = _hello_socket(context, cluster.endpoint, tmp_path / "other", replica_key,
                                          zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        sockets += [stranger, monitor]
        assert monitor.poll(30_000), "the stranger's handshake neither failed nor succeeded"
        event = recv_monitor_message(monitor)
        assert event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH, event
        assert _first_answer(stranger, 0) is None, "an unauthorized primary was answered"
        assert cluster.agents["replica"].running(), cluster.log("replica")
    finally:
        for sock in sockets:
            sock.close()
        context.term()
        cluster.close()
