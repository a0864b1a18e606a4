"""The primary's encode-and-send pipeline: one closed epoch in, its frames out, in order.

An epoch is encoded once (codec.encode_all: zero pages elided, XOR against the
cache of pages last sent, zstd) and its digest taken over the raw content;
its frames are then sent one epoch at a time under a lock, so frames of two
epochs never interleave, and numbered (stamped) only as they leave. Small
epochs are encoded on the loop, larger ones in a worker thread (zstd and
xxhash release the GIL); a thread handoff costs more than encoding a few pages.

The encoder's cache must match what the replica holds. An epoch whose send is
cancelled still finishes encoding in its thread (the buffer goes back to the
pool only then), and a new session resets the cache only once every encode of
the old one is done (`idle()`).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import zmq

from ring.vcpu_state import pack_vcpu_states

from . import wire
from .codec import EpochDigest, PageEncoder, encode_all
from .faults import KillPoint
from .runtime import Channel
from .snapshot import Snapshot, StagingPool

INLINE_ENCODE_PAGES = 32          # smaller epochs are encoded on the loop: a thread handoff costs more


@dataclass
class EncodedEpoch:
    """Every frame of one epoch, headers not yet stamped: (point, message) or (point, kind, count, payload);
    the point is the KillPoint reached once that frame has left."""

    epoch: int
    frames: list[tuple]
    raw_bytes: int
    encoded_bytes: int


def encode_epoch(encoder: PageEncoder, snapshot: Snapshot, batch_pages: int, token: int = 0) -> EncodedEpoch:
    """Encode an epoch's pages in batches, digest its content, and lay out its frames.

    A consistent epoch (a checkpoint) carries VCPU_STATE and DEVICE_STATE; a pre-copy
    epoch carries pages only and is flagged SYNC on the wire (see wire.py's spec).
    """
    keys, pages = snapshot.keys, snapshot.pages
    if len(keys) <= batch_pages:              # (one batch or none: encode_all's bookkeeping is not needed)
        try:
            batches = [encoder.encode(keys, pages)] if len(keys) else []
        except BaseException:
            encoder.reset()                   # as encode_all: the replica will not get this epoch
            raise
    else:
        batches, _ = encode_all(encoder, keys, pages, batch_pages=batch_pages)
    digest = EpochDigest()
    digest.update_pages(keys, pages)
    vcpu_bytes = pack_vcpu_states(snapshot.vcpus) if snapshot.consistent else b""
    digest.update_bytes(vcpu_bytes)
    digest.update_bytes(snapshot.device)
    epoch = snapshot.epoch
    raw = sum(b.raw_bytes for b in batches)
    encoded = sum(b.encoded_bytes for b in batches)
    frames: list[tuple] = [(KillPoint.BEGIN, wire.EpochBegin(epoch, snapshot.reason, len(keys), len(batches),
                                                             not snapshot.consistent, token))]
    frames += [(KillPoint.PAGES, wire.Kind.PAGES, len(batch.keys), batch.payload) for batch in batches]
    if snapshot.consistent:
        frames.append((KillPoint.VCPU, wire.Kind.VCPU_STATE, len(snapshot.vcpus), vcpu_bytes))
        frames.append((KillPoint.DEVICE, wire.Kind.DEVICE_STATE, 0, snapshot.device))
    frames.append((KillPoint.END, wire.EpochEnd(epoch, digest.digest(), len(keys), len(batches), raw)))
    return EncodedEpoch(epoch, frames, raw, encoded)


class Pipeline:
    """Encodes epochs (in `executor` when large) and sends their frames, one epoch at a time."""

    def __init__(self, encoder: PageEncoder, pool: StagingPool, executor: ThreadPoolExecutor,
                 batch_pages: int) -> None:
        self.token = 0                  # the fencing token every EPOCH_BEGIN carries (the session's)
        self.encoder = encoder
        self.pool = pool
        self.executor = executor
        self.batch_pages = batch_pages
        self.lock = asyncio.Lock()               # one sender at a time: frames never interleave
        self._encoding: set[asyncio.Future] = set()

    def inline(self, snapshot: Snapshot) -> bool:
        """Whether `snapshot` is encoded on the loop (small: a thread handoff costs more)."""
        return len(snapshot.keys) <= INLINE_ENCODE_PAGES

    def encode_now(self, snapshot: Snapshot) -> EncodedEpoch:
        """Encode a small `snapshot` on the loop; its staging buffer goes back to the pool."""
        try:
            return encode_epoch(self.encoder, snapshot, self.batch_pages, self.token)
        finally:
            self.pool.release(snapshot.buffer)

    async def encode(self, snapshot: Snapshot) -> EncodedEpoch:
        """Encode `snapshot`; its staging buffer goes back to the pool once the encode is done."""
        if self.inline(snapshot):
            return self.encode_now(snapshot)
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.executor, encode_epoch, self.encoder, snapshot, self.batch_pages,
                                      self.token)
        self._encoding.add(future)
        future.add_done_callback(self._encoding.discard)
        future.add_done_callback(lambda _, buffer=snapshot.buffer: self.pool.release(buffer))
        return await asyncio.shield(future)

    async def idle(self) -> None:
        """Wait until no encode of an earlier session still runs (before resetting the cache)."""
        if self._encoding:
            await asyncio.wait(list(self._encoding))

    async def send(self, socket_now: Callable[[], Any], writer: wire.FrameWriter, encoded: EncodedEpoch,
                   on_sent: Callable[[int, int, KillPoint], None] | None = None) -> bool:
        """Send an epoch's frames in order; False if its socket was replaced meanwhile (a new session).

        From version 2 the epoch goes as one message (wire.join_frames): ZeroMQ delivers it whole
        or not at all, so nothing of an epoch reaches the replica before all of it does. The kill
        points of its frames before the last are then reached when the message is built, just
        before it leaves (none of it has left: a death there leaves the replica without any of
        the epoch), the last one's once the message has left. In a version-1 session every frame
        is a message of its own, and each point is reached once its frame has left.
        """
        socket = socket_now()
        if socket is None:
            return False
        if writer.version < wire.MESSAGE_VERSION:
            return await self._send_frames(socket_now, socket, writer, encoded, on_sent)
        parts = self.message(writer, encoded, on_sent)
        await send_now(socket, parts)
        self.sent(encoded, parts, on_sent)
        return True

    def message(self, writer: wire.FrameWriter, encoded: EncodedEpoch,
                on_sent: Callable[[int, int, KillPoint], None] | None = None) -> list:
        """Version 2 and later: the epoch's one message, its frames numbered now, and the kill points
        of its frames before the last reached (just before it leaves: see send)."""
        stamped = writer.frames(encoded.epoch, [item[1:] for item in encoded.frames])
        if on_sent is not None:
            for (step, *_), parts in zip(encoded.frames[:-1], stamped):
                on_sent(encoded.epoch, _kind_of(parts), step)
        return wire.join_frames(stamped)

    def send_at_once(self, channel: Channel, writer: wire.FrameWriter, encoded: EncodedEpoch,
                 on_sent: Callable[[int, int, KillPoint], None] | None = None) -> list | None:
        """Send an epoch at once, without awaiting (version 2 and later, on the loop, with no other
        send queued before it: the caller checks). None once it has left; if ZeroMQ has no room,
        the message to send (numbered already: the caller sends it next, then calls `sent`)."""
        parts = self.message(writer, encoded, on_sent)
        if not channel.try_send(parts):
            return parts
        self.sent(encoded, parts, on_sent)
        return None

    @staticmethod
    def sent(encoded: EncodedEpoch, parts: list, on_sent: Callable[[int, int, KillPoint], None] | None) -> None:
        """The epoch's message has left: its last frame's kill point."""
        if on_sent is not None:
            step, *item = encoded.frames[-1]
            on_sent(encoded.epoch, int(item[0].KIND if len(item) == 1 else item[0]), step)

    @staticmethod
    def _stamp(writer: wire.FrameWriter, epoch: int, item: list) -> list:
        """The parts of one frame of an epoch, numbered now."""
        if len(item) == 1:
            return writer.message(item[0])
        kind, count, payload = item
        return writer.frame(kind, epoch=epoch, count=count, payload=payload)

    async def _send_frames(self, socket_now: Callable[[], Any], socket: Any, writer: wire.FrameWriter,
                           encoded: EncodedEpoch, on_sent: Callable[[int, int, KillPoint], None] | None) -> bool:
        """Version 1: each frame a message of its own."""
        for step, *item in encoded.frames:
            if socket is None or socket is not socket_now():
                return False
            parts = self._stamp(writer, encoded.epoch, item)
            await send_now(socket, parts)
            if on_sent is not None:
                on_sent(encoded.epoch, _kind_of(parts), step)
        return True

    async def send_one(self, socket_now: Callable[[], Any], build: Callable[[], list]) -> None:
        """Send one control frame, built (and so numbered) only now, in sending order."""
        socket = socket_now()
        if socket is None:
            return
        async with self.lock:
            if socket is socket_now():
                await send_now(socket, build())


def _kind_of(parts: list) -> int:
    """The kind field of a stamped frame's header."""
    return int.from_bytes(bytes(parts[0][6:8]), "little")


async def send_now(socket: Any, parts: list) -> None:
    """Send one message: through a runtime.Channel (the agents': its own non-blocking send,
    waiting for room only when ZeroMQ has none), or through a zmq.asyncio socket (a test's
    hand-made primary). Every send of the socket goes through here under the pipeline's lock,
    one after the other, so messages never reorder.

    A zmq.asyncio socket gets a plain non-blocking send when ZeroMQ has room (much cheaper than
    zmq.asyncio's), else zmq.asyncio's. ZeroMQ's file descriptor is edge-triggered, and a send
    behind zmq.asyncio's back may take the edge a pending receive waits for (the replica's acks
    then sat unread until the timeout dropped it): reading EVENTS through the asyncio socket,
    as it does after its own operations, hands any pending event back to its receive."""
    if isinstance(socket, Channel):
        if not socket.try_send(parts):
            await socket.send(parts)
        return
    try:
        plain = getattr(socket, "_shadow_sock", None) or zmq.Socket.shadow(socket.underlying)
        plain.send_multipart(parts, copy=False, flags=zmq.NOBLOCK)
    except zmq.Again:
        await socket.send_multipart(parts, copy=False)
    else:
        socket.get(zmq.EVENTS)


__all__ = ["Pipeline", "EncodedEpoch", "encode_epoch", "send_now", "INLINE_ENCODE_PAGES"]
