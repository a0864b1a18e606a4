"""The replica agent reads an epoch sent as one ZeroMQ message (wire version 2), over real sockets.

A primary that negotiates version 2 sends each epoch as one message; the replica handles its
frames in order with every per-frame check. A message that is truncated, has a bad frame in the
middle, or mixes in a frame of another session is refused, and nothing of its epoch is committed.
No KVM needed.
"""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest
import zmq
import zmq.asyncio

from checkpointer import wire
from checkpointer.codec import PageEncoder
from checkpointer.config import load_config
from checkpointer.pipeline import EncodedEpoch, Pipeline, encode_epoch
from checkpointer.snapshot import Snapshot, StagingPool
from replica.agent import ReplicaAgent
from ring import pages as pagekeys
from ring.memory import page_buffer
from ring.vcpu_state import VcpuState
from tests.system.test_agents import FakePrimary

SLOTS = [wire.SlotLayout(0, 0, 1 << 20), wire.SlotLayout(1, 1 << 30, 4 << 20)]


class Primary(FakePrimary):
    """A hand-driven primary of version 2: an epoch is one message (wire.join_frames)."""

    def __init__(self, context: zmq.asyncio.Context, endpoint: str) -> None:
        super().__init__(context, endpoint)
        self.encoder = PageEncoder(cache_pages=2048)

    async def hello(self) -> wire.Frame:
        await self.socket.send_multipart(self.writer.message(wire.Hello(
            versions=[1, 2], session=self.writer.session, slots=SLOTS, vcpus=1, page_size=4096, agent="test")))
        welcome = await self.receive()
        self.writer.version = wire.decode_payload(welcome).version
        return welcome

    def encoded(self, epoch: int, pages: dict[int, int], noise: bool = False) -> EncodedEpoch:
        """A consistent epoch writing byte `value` into data page `offset`, encoded as the primary
        encodes one (with `noise`, random bytes too: a batch too large to travel inline)."""
        offsets = sorted(pages)
        content = page_buffer(len(offsets))
        for row, offset in enumerate(offsets):
            content[row] = pages[offset]
        if noise:
            content[:, 1:] = np.random.default_rng(epoch).integers(0, 256, (len(offsets), 4095), dtype=np.uint8)
        snapshot = Snapshot(epoch, wire.EpochReason.RING_FULL, pagekeys.of_slot(1, offsets), content, content,
                            [VcpuState(0, regs=bytes(144), sregs=bytes(312))], b"", True)
        return encode_epoch(self.encoder, snapshot, batch_pages=512)

    def epoch(self, epoch: int, pages: dict[int, int]) -> list[list]:
        """The frames of that epoch, numbered, each as ``[header, payload]``."""
        encoded = self.encoded(epoch, pages)
        return [self.writer.message(item[0]) if len(item) == 1 else
                self.writer.frame(item[0], epoch=epoch, count=item[1], payload=item[2])
                for _, *item in encoded.frames]

    async def send_epoch(self, epoch: int, pages: dict[int, int], noise: bool = False) -> None:
        """As the primary agent sends one (Pipeline.send: at version 2, one message)."""
        pipeline = Pipeline(self.encoder, StagingPool(1, 1), None, 512)
        assert await pipeline.send(lambda: self.socket, self.writer, self.encoded(epoch, pages, noise))


def replica_config():
    return load_config("replica", None, {"replica.listen": "tcp://127.0.0.1:0", "security.insecure": True,
                                         "replication.heartbeat_ms": 20, "replication.timeout_ms": 60000})


@contextlib.asynccontextmanager
async def welcomed_pair():
    """A replica agent and a primary it welcomed at version 2."""
    agent = ReplicaAgent(replica_config())
    agent.bind()
    task = asyncio.ensure_future(agent.run())
    context = zmq.asyncio.Context()
    primary = Primary(context, agent.endpoint)
    try:
        welcome = await primary.hello()
        assert welcome.kind == wire.Kind.WELCOME and primary.writer.version == 2
        yield agent, task, primary
    finally:
        primary.socket.close()
        agent.stop()
        await asyncio.wait_for(task, 10)
        context.term()


def _flip(data, index: int) -> bytes:
    damaged = bytearray(bytes(data))
    damaged[index] ^= 0x40
    return bytes(damaged)


@pytest.mark.asyncio
async def test_an_epoch_in_one_message_is_committed_and_acked() -> None:
    async with welcomed_pair() as (agent, task, primary):
        await _one_message_epochs(agent, primary)


async def _one_message_epochs(agent: ReplicaAgent, primary: Primary) -> None:
    await primary.send_epoch(1, {3: 7, 9: 9})
    ack = await primary.receive()
    assert ack.kind == wire.Kind.ACK and ack.epoch == 1 and ack.version == 2
    big = {o: o % 250 + 1 for o in range(0, 1000, 3)}
    await primary.send_epoch(2, big, noise=True)              # ~1.3 MB of batch: a part of its own
    ack = await primary.receive()
    assert ack.kind == wire.Kind.ACK and ack.epoch == 2
    assert agent.standby.memory.slots[1].pages[3, 0] == 4 and agent.standby.memory.slots[1].pages[9, 0] == 10
    assert agent.protocol.committed_epoch == 2 and agent.rejected_frames == 0 and agent.last_error is None


@pytest.mark.asyncio
@pytest.mark.parametrize("damage", ["truncated", "payload_missing", "bad_frame_in_the_middle",
                                    "bad_header_in_the_middle", "other_session", "replayed_frame"])
async def test_a_bad_message_is_refused_and_nothing_of_its_epoch_is_committed(damage: str) -> None:
    async with welcomed_pair() as (agent, task, primary):
        await _bad_message(agent, task, primary, damage)


async def _bad_message(agent: ReplicaAgent, task: asyncio.Task, primary: Primary, damage: str) -> None:
    await primary.send_epoch(1, {3: 7, 9: 9})
    assert (await primary.receive()).kind == wire.Kind.ACK
    before = (agent.standby.digest_memory(), agent.protocol.committed_epoch)

    frames = primary.epoch(2, {3: 11, 4: 12})
    if damage == "replayed_frame":                           # epoch 2's BEGIN twice
        frames.insert(1, frames[0])
    if damage == "other_session":                            # a stranger's frame amid ours
        stranger = wire.FrameWriter(version=2)
        frames.insert(2, stranger.frame(wire.Kind.HEARTBEAT, epoch=2))
    parts = wire.join_frames(frames)
    (joined,) = parts
    pages_at = len(bytes(frames[0][0])) + len(bytes(frames[0][1]))
    if damage == "truncated":
        parts = [joined[:len(joined) - 20]]                  # EPOCH_END cut short
    elif damage == "payload_missing":
        parts = [joined[:pages_at + wire.HEADER_SIZE]]       # the PAGES header, then nothing
    elif damage == "bad_frame_in_the_middle":
        parts = [_flip(joined, pages_at + wire.HEADER_SIZE + 30)]
    elif damage == "bad_header_in_the_middle":
        parts = [_flip(joined, pages_at + 20)]
    await primary.socket.send_multipart(parts, copy=False)
    answer = await primary.receive()
    assert answer is not None and answer.kind == wire.Kind.REFUSE, answer
    reason = wire.decode_payload(answer).reason
    assert reason is (wire.RefuseReason.WRONG_SESSION if damage == "other_session" else wire.RefuseReason.BAD_FRAME)
    await agent.lane.idle()
    assert (agent.standby.digest_memory(), agent.protocol.committed_epoch) == before
    assert agent.standby.memory.slots[1].pages[3, 0] == 7 and agent.standby.memory.slots[1].pages[4, 0] == 0
    assert agent.rejected_frames + agent.protocol.rejected >= 1
    assert not task.done() and agent.last_error is None      # refused, not crashed
