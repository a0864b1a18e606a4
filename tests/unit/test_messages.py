"""Several frames in one ZeroMQ message (wire version 2): join_frames and decode_message.

The frames of a message must come out as they went in, each checked as decode_frame checks a lone
frame; a two-part version-1 frame reads as a message of one frame; a truncated message, a bad
frame in the middle or a frame of another session is refused with a typed error at that frame,
after the frames before it and before anything after it.
"""

from __future__ import annotations

import numpy as np
import pytest
import zmq

from checkpointer import wire
from checkpointer.wire import (HEADER_SIZE, BadChecksum, FrameGuard, FrameWriter, Kind, MalformedFrame,
                               TruncatedFrame, WrongSession, decode_frame, decode_message, join_frames)

SESSION = 0x1234_5678_9ABC_DEF0


def epoch_frames(writer: FrameWriter, epoch: int = 3, big: int = 0) -> list[list]:
    """An epoch's frames as encode_frame makes them; `big` bytes of page batch make it go out of line."""
    pages = np.arange(max(big, 40), dtype=np.uint8) if big else b"p" * 40
    return [writer.message(wire.EpochBegin(epoch, "ring_full", 2, 1, False)),
            writer.frame(Kind.PAGES, epoch=epoch, count=2, payload=pages),
            writer.frame(Kind.VCPU_STATE, epoch=epoch, count=0, payload=b""),
            writer.frame(Kind.DEVICE_STATE, epoch=epoch, payload=b"{}"),
            writer.message(wire.EpochEnd(epoch, bytes(16), 2, 1, 8192))]


def same(frames: list[list], decoded: list[wire.Frame]) -> bool:
    return [(bytes(f[0]), bytes(f[1])) for f in frames] == \
        [(bytes(wire.encode_frame(d)[0]), bytes(d.payload)) for d in decoded]


def test_an_epoch_of_small_frames_is_one_part_and_decodes_frame_by_frame() -> None:
    frames = epoch_frames(FrameWriter(SESSION, version=2))
    parts = join_frames(frames)
    assert len(parts) == 1
    decoded = list(decode_message(parts))
    assert [d.kind for d in decoded] == [Kind.EPOCH_BEGIN, Kind.PAGES, Kind.VCPU_STATE, Kind.DEVICE_STATE,
                                         Kind.EPOCH_END]
    assert [d.seq for d in decoded] == [0, 1, 2, 3, 4] and same(frames, decoded)
    guard = FrameGuard(SESSION, accept=wire.PRIMARY_KINDS)
    for frame in decoded:                 # the sequence numbers run on across the message
        guard.check(frame)
    assert guard.last_seq == 4


def test_a_large_payload_travels_as_its_own_part_without_a_copy() -> None:
    frames = epoch_frames(FrameWriter(SESSION, version=2), big=wire.INLINE_PAYLOAD)
    parts = join_frames(frames)
    assert len(parts) == 3 and parts[1] is frames[1][1]          # the page batch object itself
    assert len(parts[0]) == len(bytes(frames[0][0])) + len(bytes(frames[0][1])) + HEADER_SIZE
    decoded = list(decode_message(parts))
    assert same(frames, decoded)
    assert np.shares_memory(np.frombuffer(decoded[1].payload, np.uint8), parts[1])


def test_a_message_through_zeromq_arrives_whole() -> None:
    context = zmq.Context()
    tx, rx = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    try:
        rx.bind("inproc://messages")
        tx.connect("inproc://messages")
        frames = epoch_frames(FrameWriter(SESSION, version=2), big=1 << 20)
        tx.send_multipart(join_frames(frames), copy=False)
        assert same(frames, list(decode_message(rx.recv_multipart(copy=False))))
    finally:
        tx.close(0)
        rx.close(0)
        context.term()


def test_a_version_1_frame_is_a_message_of_one_frame() -> None:
    writer = FrameWriter(SESSION)
    for parts in (writer.frame(Kind.HEARTBEAT, epoch=4), writer.frame(Kind.PAGES, epoch=4, count=1, payload=b"xy"),
                  writer.message(wire.Ack(4, 10))):
        (frame,) = decode_message(parts)
        assert same([parts], [frame]) and same([parts], [decode_frame(parts)])


def test_an_empty_payload_at_the_end_gets_its_own_part() -> None:
    writer = FrameWriter(SESSION, version=2)
    frames = [writer.frame(Kind.DEVICE_STATE, epoch=1, payload=b"{}"), writer.frame(Kind.HEARTBEAT, epoch=1)]
    parts = join_frames(frames)
    assert len(parts) == 2 and bytes(parts[1]) == b""
    assert same(frames, list(decode_message(parts)))


def _frames_until_error(parts) -> tuple[list[wire.Frame], Exception | None]:
    got, error = [], None
    try:
        for frame in decode_message(parts):
            got.append(frame)
    except wire.WireError as exc:
        error = exc
    return got, error


@pytest.mark.parametrize("cut", [10, HEADER_SIZE - 1, HEADER_SIZE + 3])
def test_a_truncated_message_is_refused_at_the_cut_frame(cut: int) -> None:
    frames = epoch_frames(FrameWriter(SESSION, version=2))
    (joined,) = join_frames(frames)
    end_at = len(joined) - (len(frames[-1][0]) + len(frames[-1][1]))    # where EPOCH_END starts
    got, error = _frames_until_error([joined[:end_at + cut]])
    assert isinstance(error, TruncatedFrame), error
    assert [f.kind for f in got] == [Kind.EPOCH_BEGIN, Kind.PAGES, Kind.VCPU_STATE, Kind.DEVICE_STATE]


def test_a_message_whose_out_of_line_payload_is_missing_is_truncated() -> None:
    parts = join_frames(epoch_frames(FrameWriter(SESSION, version=2), big=wire.INLINE_PAYLOAD))
    got, error = _frames_until_error(parts[:1])
    assert isinstance(error, TruncatedFrame) and "missing" in str(error)
    assert [f.kind for f in got] == [Kind.EPOCH_BEGIN]
    got, error = _frames_until_error([parts[0], bytes(parts[1])[:-1], parts[2]])
    assert isinstance(error, TruncatedFrame) and [f.kind for f in got] == [Kind.EPOCH_BEGIN]


@pytest.mark.parametrize("where", ["header", "payload"])
def test_a_bad_frame_in_the_middle_stops_the_message_there(where: str) -> None:
    frames = epoch_frames(FrameWriter(SESSION, version=2))
    (joined,) = join_frames(frames)
    start = len(frames[0][0]) + len(frames[0][1])                    # the PAGES frame
    damaged = bytearray(joined)
    damaged[start + (30 if where == "header" else HEADER_SIZE + 5)] ^= 0x40
    got, error = _frames_until_error([bytes(damaged)])
    assert isinstance(error, BadChecksum), error
    assert [f.kind for f in got] == [Kind.EPOCH_BEGIN]                # nothing after it was read


def test_trailing_garbage_and_empty_parts_are_malformed() -> None:
    frames = epoch_frames(FrameWriter(SESSION, version=2))
    (joined,) = join_frames(frames)
    got, error = _frames_until_error([joined, b""])
    assert isinstance(error, MalformedFrame) and len(got) == 5
    got, error = _frames_until_error([joined + b"CRNG\x02\x00"])
    assert isinstance(error, TruncatedFrame) and len(got) == 5
    assert isinstance(_frames_until_error([])[1], TruncatedFrame)
    assert isinstance(_frames_until_error([object()])[1], MalformedFrame)


def test_frames_of_two_sessions_in_one_message_are_told_apart_by_the_guard() -> None:
    ours, theirs = FrameWriter(SESSION, version=2), FrameWriter(SESSION + 1, version=2)
    hello = ours.message(wire.Hello([1, 2], SESSION, [wire.SlotLayout(0, 0, 4096)], 1))
    guard = FrameGuard()
    guard.check(decode_frame(hello))
    mixed = [ours.frame(Kind.HEARTBEAT, epoch=1), theirs.frame(Kind.HEARTBEAT, epoch=1),
             ours.frame(Kind.HEARTBEAT, epoch=1)]
    checked = []
    with pytest.raises(WrongSession):
        for frame in decode_message(join_frames(mixed)):
            guard.check(frame)
            checked.append(frame.session)
    assert checked == [SESSION] and guard.last_seq == 1


def test_a_header_is_checked_before_its_length_is_trusted() -> None:
    """A corrupted payload_len must not move the split: the header checksum catches it first."""
    frames = epoch_frames(FrameWriter(SESSION, version=2))
    (joined,) = join_frames(frames)
    damaged = bytearray(joined)
    damaged[40] ^= 0x01                                              # EPOCH_BEGIN's payload_len
    got, error = _frames_until_error([bytes(damaged)])
    assert isinstance(error, BadChecksum) and got == []
