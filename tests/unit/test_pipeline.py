"""The primary's encode-and-send pipeline, end to end through the replica's staging.

The frames the agent sends are made only by checkpointer.pipeline.encode_epoch (on top of
codec.encode_all); here they go through the real wire decoder and the replica's Standby, and the
standby must end byte for byte equal to the primary's pages, with the digest agreeing.
"""

from __future__ import annotations

import numpy as np
import pytest

from checkpointer import wire
from checkpointer.codec import PageEncoder
from checkpointer.faults import KillPoint
from checkpointer.pipeline import encode_epoch
from checkpointer.snapshot import Snapshot
from replica.standby import Standby
from ring import pages as pagekeys
from ring.memory import SlotSpec, page_buffer
from ring.vcpu_state import VcpuState

SLOT_PAGES = 512


def _snapshot(epoch: int, offsets: np.ndarray, content: np.ndarray, consistent: bool) -> Snapshot:
    keys = pagekeys.of_slot(1, offsets)
    buffer = page_buffer(len(keys))
    buffer[:len(keys)] = content[offsets]
    vcpus = [VcpuState(0, regs=bytes(range(144)), sregs=bytes(312))] if consistent else []
    device = b'{"device":"none"}' if consistent else b""
    reason = wire.EpochReason.RING_FULL if consistent else wire.EpochReason.SYNC
    return Snapshot(epoch, reason, keys, buffer[:len(keys)], buffer, vcpus, device, consistent)


def _deliver(standby: Standby, encoded, epoch: int) -> tuple[bool, str, list]:
    writer = wire.FrameWriter(session=9)
    points, digest = [], b""
    for point, *item in encoded.frames:
        parts = writer.message(item[0]) if len(item) == 1 else writer.frame(item[0], epoch=epoch, count=item[1],
                                                                             payload=item[2])
        frame = wire.decode_frame([bytes(p) for p in parts])
        message = wire.decode_payload(frame)
        points.append(point)
        if frame.kind == wire.Kind.EPOCH_BEGIN:
            standby.open(epoch, message.pages)
        elif frame.kind == wire.Kind.PAGES:
            assert standby.stage_pages(frame.payload) == frame.count
        elif frame.kind == wire.Kind.VCPU_STATE:
            standby.stage_vcpus(frame.payload, message)
        elif frame.kind == wire.Kind.DEVICE_STATE:
            standby.stage_device(frame.payload)
        elif frame.kind == wire.Kind.EPOCH_END:
            digest = message.digest
    ok, reason = standby.verify(digest)
    return ok, reason, points


@pytest.mark.parametrize("batch_pages", [1, 7, 512])
def test_encoded_epochs_rebuild_the_primary_pages_on_the_replica(batch_pages: int) -> None:
    rng = np.random.default_rng(batch_pages)
    primary = rng.integers(0, 256, size=(SLOT_PAGES, 4096), dtype=np.uint8)
    primary[::5] = 0                                       # zero pages take the elided path
    standby = Standby([SlotSpec(0, 0, 2 << 20), SlotSpec(1, 1 << 30, SLOT_PAGES * 4096)])
    encoder = PageEncoder(cache_pages=1024)
    try:
        everything = np.arange(SLOT_PAGES, dtype=np.uint64)
        first = encode_epoch(encoder, _snapshot(1, everything, primary, consistent=False), batch_pages)
        ok, reason, points = _deliver(standby, first, 1)
        assert ok, reason
        assert points[0] is KillPoint.BEGIN and points[-1] is KillPoint.END
        assert KillPoint.VCPU not in points                   # a pre-copy epoch carries pages only
        standby.commit(False)
        primary[rng.choice(SLOT_PAGES, 40, replace=False), rng.integers(0, 4096, 40)] ^= 0xFF   # XOR deltas
        dirty = np.unique(rng.choice(SLOT_PAGES, 60)).astype(np.uint64)
        second = encode_epoch(encoder, _snapshot(2, dirty, primary, consistent=True), batch_pages)
        ok, reason, points = _deliver(standby, second, 2)
        assert ok, reason
        assert points == [KillPoint.BEGIN] + [KillPoint.PAGES] * -(-len(dirty) // batch_pages) + \
            [KillPoint.VCPU, KillPoint.DEVICE, KillPoint.END]
        standby.commit(True)
        assert np.array_equal(standby.memory.slots[1].pages[dirty.astype(np.intp)], primary[dirty.astype(np.intp)])
        assert standby.vcpus[0].regs == bytes(range(144)) and standby.device == b'{"device":"none"}'
        assert second.raw_bytes == len(dirty) * 4096 and second.encoded_bytes < second.raw_bytes
    finally:
        standby.close()


def test_a_corrupted_page_fails_the_digest() -> None:
    content = np.ones((SLOT_PAGES, 4096), dtype=np.uint8)
    standby = Standby([SlotSpec(0, 0, 2 << 20), SlotSpec(1, 1 << 30, SLOT_PAGES * 4096)])
    try:
        snapshot = _snapshot(1, np.arange(8, dtype=np.uint64), content, consistent=True)
        encoded = encode_epoch(PageEncoder(cache_pages=0), snapshot, 4)
        end = encoded.frames[-1][1]
        encoded.frames[-1] = (KillPoint.END, wire.EpochEnd(end.epoch, bytes(16), end.pages, end.batches,
                                                           end.raw_bytes))
        ok, reason, _ = _deliver(standby, encoded, 1)
        assert not ok and "digest mismatch" in reason
    finally:
        standby.close()
