"""The replica agent against a hand-driven primary over real ZeroMQ sockets (no KVM needed).

Corrupted, truncated, replayed and out-of-order frames are refused and leave the
standby exactly as it was; a primary without an authorized CURVE key is never
even heard.
"""

from __future__ import annotations

import asyncio
import socket as socket_module

import numpy as np
import pytest
import zmq
import zmq.asyncio

from checkpointer import wire
from checkpointer.codec import EpochDigest, PageEncoder
from checkpointer.config import load_config
from checkpointer.security import generate_keys, secure_client
from ring.machine import VcpuState
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
            frame = wire.decode_frame(parts)
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
        vcpus = wire.pack_vcpu_states([VcpuState(0, regs=bytes(144), sregs=bytes(312))])
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
                                    "out_of_order", "wrong_key", "digest"])
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
        for frame in frames:
            await primary.send(frame)
        answer = await primary.receive(timeout=5)
        assert answer is not None and answer.kind == wire.Kind.REFUSE, answer
        # whatever the damage, nothing of epoch 2 reached the standby
        assert standby_state(agent) == before
        assert agent.standby.memory.slots[1].pages[3, 0] == 7
        assert agent.standby.memory.slots[1].pages[4, 0] == 0
        assert agent.rejected_frames + agent.protocol.rejected >= 1
    finally:
        primary.socket.close()
        await stop(agent, task)
        context.term()


def test_primary_without_an_authorized_key_is_refused(tmp_path) -> None:
    """The replica in its own process (CURVE server); plain blocking sockets here, bounded waits."""
    import subprocess
    import sys
    from pathlib import Path

    keys = tmp_path / "keys"
    generate_keys(keys, "primary")
    generate_keys(keys, "replica")
    generate_keys(tmp_path / "other", "primary")
    with socket_module.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    replica = subprocess.Popen([sys.executable, "-m", "replica.cli", "--listen", endpoint, "--keys-dir", str(keys),
                                "--authorized-keys", str(keys / "primary.key"), "--heartbeat-ms", "20"],
                               cwd=Path(__file__).resolve().parents[2], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    context = zmq.Context()

    def hello_from(keys_dir: Path) -> bytes | None:
        """Send HELLO with this key pair; the first non-heartbeat answer, or None within 2 s."""
        security = load_config("primary", None, {"primary.replica": endpoint, "security.keys_dir": str(keys_dir),
                                                  "security.peer_public_key": str(keys / "replica.key")}).security
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 2000)
        secure_client(sock, security)
        sock.connect(endpoint)
        writer = wire.FrameWriter()
        try:
            sock.send_multipart(writer.message(wire.Hello(versions=[1], session=writer.session, slots=SLOTS,
                                                          vcpus=1, page_size=4096, agent="test")))
            while True:
                try:
                    frame = wire.decode_frame(sock.recv_multipart())
                except zmq.Again:
                    return None
                if frame.kind != wire.Kind.HEARTBEAT:
                    return frame.kind
        finally:
            sock.close()

    try:
        assert hello_from(tmp_path / "other") is None, "an unauthorized primary was answered"
        assert hello_from(keys) == wire.Kind.WELCOME
    finally:
        context.term()
        replica.terminate()
        replica.wait(10)
