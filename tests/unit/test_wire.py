"""Unit tests of the wire format (checkpointer/wire.py and the modules behind it): frames, guards, the
declared control messages, vCPU state (ring/vcpu_state.py)."""

from __future__ import annotations

import dataclasses
import json
import re
import struct

import numpy as np
import pytest
import xxhash
import zmq
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from checkpointer import schema, wire
from checkpointer.schema import Bool, Choice, HexBytes, Int, ListOf, Nested, Spec, Text
from checkpointer.wire import (HEADER, HEADER_SIZE, KIND_RULES, MAGIC, PRIMARY_KINDS, REPLICA_KINDS, Ack, BadChecksum,
                               BadMagic, EpochBegin, EpochEnd, EpochReason, Flag, Frame, FrameGuard, FrameWriter, Hello,
                               Kind, MalformedFrame, MalformedPayload, OutOfOrderFrame, OversizedFrame, Refuse,
                               RefuseReason, ReplayedFrame, SlotLayout, TruncatedFrame, UnexpectedKind, UnknownKind,
                               UnsupportedVersion, Welcome, WireError, WrongSession, decode_frame, decode_payload,
                               encode_frame, negotiate_version)
from ring import vcpu_state
from ring.vcpu_state import VcpuState, VcpuStateError, pack_vcpu_states, unpack_vcpu_states

U32, U64 = (1 << 32) - 1, (1 << 64) - 1
SESSION = 0x5EED_0F_C0_10
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- helpers and strategies ------------------------------------------------------------------

def forge(payload: bytes = b"", **fields) -> list:
    """A frame with arbitrary header fields and correct checksums (unless given)."""
    values = dict(magic=MAGIC, version=1, kind=int(Kind.PAGES), session=SESSION, seq=0, epoch=1, count=0, flags=0,
                  payload_len=len(payload), payload_checksum=xxhash.xxh3_64_intdigest(payload))
    values.update(fields)
    order = ("magic", "version", "kind", "session", "seq", "epoch", "count", "flags", "payload_len",
             "payload_checksum")
    head = HEADER.pack(*(values[k] for k in order), 0)[:HEADER_SIZE - 8]
    return [head + struct.pack("<Q", fields.get("header_checksum", xxhash.xxh3_64_intdigest(head))), payload]


def valid_frame_fields(kind: Kind, draw) -> dict:
    """Header fields that respect the per-kind rules of the spec."""
    epoch = 0 if kind in (Kind.HELLO, Kind.WELCOME, Kind.REFUSE) else draw(st.integers(0, U64))
    zero_count = kind in (Kind.HELLO, Kind.WELCOME, Kind.DEVICE_STATE, Kind.ACK, Kind.HEARTBEAT, Kind.REFUSE,
                          Kind.BYE)
    count = 0 if zero_count else draw(st.integers(0, U32))
    flags = {Kind.PAGES: draw(st.integers(0, U32)), Kind.EPOCH_BEGIN: draw(st.sampled_from([0, 1]))}.get(kind, 0)
    payload = b"" if kind in (Kind.HEARTBEAT, Kind.BYE) else draw(st.binary(max_size=512))
    return dict(kind=kind, session=draw(st.integers(1, U64)), seq=draw(st.integers(0, U64)), epoch=epoch,
                count=count, flags=flags, payload=payload)


@st.composite
def frames(draw) -> Frame:
    kind = draw(st.sampled_from([k for k in Kind if k is not Kind.INVALID]))
    return Frame(**valid_frame_fields(kind, draw))


def same(a: Frame, b: Frame) -> bool:
    return (a.kind, a.session, a.seq, a.epoch, a.count, a.flags, a.version, bytes(a.payload)) == \
           (b.kind, b.session, b.seq, b.epoch, b.count, b.flags, b.version, bytes(b.payload))


u64s = st.integers(0, U64)
text = st.text(max_size=40)


@st.composite
def hellos(draw) -> Hello:
    page = draw(st.sampled_from([4096, 2 << 20]))
    n = draw(st.integers(1, 5))
    ids = draw(st.lists(st.integers(0, U32), min_size=n, max_size=n, unique=True))
    gpa, slots = 0, []
    for slot in ids:
        gpa += draw(st.integers(0, 4)) * page
        size = draw(st.integers(1, 1 << 20)) * page
        slots.append(SlotLayout(slot, gpa, size))
        gpa += size
    versions = tuple(draw(st.lists(st.integers(1, 0xFFFF), min_size=1, max_size=5, unique=True)))
    return Hello(versions, SESSION, tuple(slots), draw(st.integers(1, 4096)), page, draw(text))


#: A strategy of valid messages per declared kind (test_every_declared_message_has_a_strategy keeps it complete).
MESSAGES = {
    Kind.HELLO: hellos(),
    Kind.WELCOME: st.builds(Welcome, st.integers(1, 0xFFFF), st.none() | u64s),
    Kind.EPOCH_BEGIN: st.builds(EpochBegin, u64s, st.sampled_from(EpochReason) | st.sampled_from([r.value for r in EpochReason]),
                                st.integers(0, U32), st.integers(0, U32), st.booleans()),
    Kind.EPOCH_END: st.builds(EpochEnd, u64s, st.binary(min_size=16, max_size=16), u64s, st.integers(0, U32), u64s),
    Kind.ACK: st.builds(Ack, u64s, u64s),
    Kind.REFUSE: st.builds(Refuse, st.sampled_from(RefuseReason), text),
}
messages = st.one_of(*MESSAGES.values())

blob = st.binary(max_size=300)
vcpu_states = st.builds(
    VcpuState, index=st.integers(0, U32), regs=blob, sregs=blob, fpu=blob, xsave=blob, xcrs=blob,
    msrs=st.dictionaries(st.integers(0, U32), u64s, max_size=20), events=blob, debugregs=blob, cpuid=blob)


def vcpu_lists():
    return st.lists(vcpu_states, max_size=4, unique_by=lambda s: s.index)


# --- round trips ------------------------------------------------------------------------------

def test_header_is_64_bytes_and_starts_with_magic() -> None:
    head, payload = encode_frame(Frame(Kind.PAGES, SESSION, 12, 7, 3, 0, b"abc"))
    assert HEADER_SIZE == 64 and len(head) == 64
    assert head[:4] == b"CRNG" and payload == b"abc"


@FUZZ
@given(frames())
def test_every_kind_round_trips(frame: Frame) -> None:
    decoded = decode_frame(encode_frame(frame))
    assert same(decoded, frame)
    assert isinstance(decoded.kind, Kind)


@given(vcpu_lists(), st.integers(0, U64))
@settings(deadline=None)
def test_vcpu_state_frame_round_trips(states, epoch) -> None:
    parts = FrameWriter(SESSION).frame(Kind.VCPU_STATE, epoch, len(states), pack_vcpu_states(states))
    assert decode_payload(decode_frame(parts)) == states


@pytest.mark.parametrize("kind", [Kind.PAGES, Kind.DEVICE_STATE, Kind.HEARTBEAT, Kind.BYE])
def test_opaque_and_empty_payloads(kind) -> None:
    payload = b"" if kind in (Kind.HEARTBEAT, Kind.BYE) else b"\x00opaque"
    frame = decode_frame(FrameWriter(SESSION).frame(kind, 5, 0, payload))
    result = decode_payload(frame)
    assert (result is None) if not payload else bytes(result) == payload


def test_numpy_payload_is_sent_and_decoded_without_copy() -> None:
    pages = np.arange(4 * 1024, dtype=np.uint64).reshape(8, 512)     # 8 pages of 4 KiB
    parts = encode_frame(Frame(Kind.PAGES, SESSION, 0, 3, 8, 0, pages))
    assert parts[1] is pages
    frame = decode_frame(parts)
    assert np.shares_memory(np.frombuffer(frame.payload, dtype=np.uint8), pages)
    assert bytes(frame.payload) == pages.tobytes()


def test_memoryview_and_bytes_payload_not_copied() -> None:
    buf = bytearray(b"x" * 4096)
    view = memoryview(buf)[100:1100]
    parts = encode_frame(Frame(Kind.PAGES, SESSION, 0, 1, 1, 0, view))
    assert parts[1] is view
    frame = decode_frame([parts[0], view])
    buf[100] = ord("y")                      # the decoded payload is a view, not a copy
    assert bytes(frame.payload[:1]) == b"y"


def test_empty_numpy_payload() -> None:
    empty = np.zeros((0, 512), dtype=np.uint64)
    assert bytes(decode_frame(encode_frame(Frame(Kind.DEVICE_STATE, SESSION, 0, 1, 0, 0, empty))).payload) == b""


def test_non_contiguous_payload_rejected() -> None:
    with pytest.raises(MalformedFrame, match="contiguous"):
        encode_frame(Frame(Kind.PAGES, SESSION, 0, 1, 1, 0, np.zeros((4, 4), np.uint8)[:, ::2]))


# --- bad frames ----------------------------------------------------------------------------------

@FUZZ
@given(frames(), st.data())
def test_any_flipped_byte_is_rejected(frame: Frame, data) -> None:
    head, payload = encode_frame(frame)
    payload = bytes(payload)
    total = HEADER_SIZE + len(payload)
    where = data.draw(st.integers(0, total - 1))
    xor = data.draw(st.integers(1, 255))
    head, payload = bytearray(head), bytearray(payload)
    if where < HEADER_SIZE:
        head[where] ^= xor
    else:
        payload[where - HEADER_SIZE] ^= xor
    flipped = int.from_bytes(head[4:6], "little")
    supported = flipped in wire.SUPPORTED_VERSIONS            # (then the header checksum catches it)
    expected = BadMagic if where < 4 else UnsupportedVersion if where < 6 and not supported else BadChecksum
    with pytest.raises(expected):
        decode_frame([bytes(head), bytes(payload)])


def test_checksum_messages_name_kind_epoch_and_seq() -> None:
    head, payload = encode_frame(Frame(Kind.PAGES, SESSION, 12, 7, 1, 0, b"page"))
    with pytest.raises(BadChecksum, match="payload checksum mismatch on PAGES epoch 7 seq 12"):
        decode_frame([head, b"pagf"])
    bad = bytearray(head)
    bad[40] ^= 1                                        # payload_len
    with pytest.raises(BadChecksum, match="header checksum mismatch"):
        decode_frame([bytes(bad), payload])


def test_every_header_prefix_is_truncated() -> None:
    head, payload = encode_frame(Frame(Kind.EPOCH_END, SESSION, 3, 2, 0, 0, b"{}"))
    for n in range(HEADER_SIZE):
        with pytest.raises(TruncatedFrame, match=f"header is {n} bytes"):
            decode_frame([head[:n], payload])


def test_missing_extra_and_wrong_parts() -> None:
    head, payload = encode_frame(Frame(Kind.PAGES, SESSION, 0, 1, 1, 0, b"abcd"))
    for parts in ([], [head]):
        with pytest.raises(TruncatedFrame, match="part"):
            decode_frame(parts)
    with pytest.raises(MalformedFrame, match="3 parts"):
        decode_frame([head, payload, b""])
    with pytest.raises(MalformedFrame):
        decode_frame(None)
    with pytest.raises(MalformedFrame, match="not a bytes-like"):
        decode_frame([head, "text"])
    with pytest.raises(MalformedFrame, match="header is 65 bytes"):
        decode_frame([head + b"\0", payload])
    with pytest.raises(TruncatedFrame, match="header says 4"):
        decode_frame([head, payload[:3]])
    with pytest.raises(MalformedFrame, match="header says 4"):
        decode_frame([head, payload + b"!"])


def test_wrong_magic() -> None:
    with pytest.raises(BadMagic, match="not a colo-ring frame"):
        decode_frame(forge(magic=int.from_bytes(b"QEMU", "little")))


@pytest.mark.parametrize("kind", [0, 12, 0xFFFF])
def test_unknown_kinds_and_invalid(kind) -> None:
    with pytest.raises(UnknownKind, match="INVALID" if kind == 0 else f"unknown frame kind {kind}"):
        decode_frame(forge(kind=kind))
    with pytest.raises(UnknownKind):
        encode_frame(Frame(kind, SESSION, 0))


def test_versions() -> None:
    with pytest.raises(UnsupportedVersion, match=r"version 4 not supported; supported: \[1, 2, 3\]"):
        decode_frame(forge(version=4))
    assert decode_frame(forge(version=2)).version == 2
    assert decode_frame(forge(version=3)).version == 3
    assert decode_frame(forge(version=4), supported=(1, 2, 3, 4)).version == 4
    # a handshake frame at version 1 decodes even for a receiver that speaks only version 2 ...
    hello = FrameWriter(SESSION, version=2).message(Hello((1, 2), SESSION, (SlotLayout(0, 0, 4096),), 1))
    assert decode_frame(hello, supported=(2,)).kind is Kind.HELLO
    # ... but not any other kind
    with pytest.raises(UnsupportedVersion, match="PAGES"):
        decode_frame(forge(version=1), supported=(2,))


def test_oversized_payload_refused_before_hashing() -> None:
    with pytest.raises(OversizedFrame, match="payload of PAGES epoch 1 seq 0 is 65 bytes, limit 64"):
        decode_frame(forge(b"x" * 65), max_payload=64)
    # a header claiming a huge payload is refused without looking at the (absent) payload
    with pytest.raises(OversizedFrame):
        decode_frame(forge(b"", payload_len=U64))
    assert bytes(decode_frame(forge(b"x" * 64), max_payload=64).payload) == b"x" * 64


@pytest.mark.parametrize("fields, match", [
    (dict(kind=int(Kind.HEARTBEAT), count=1), "count must be 0"),
    (dict(kind=int(Kind.HELLO), epoch=3), "epoch must be 0"),
    (dict(kind=int(Kind.ACK), flags=1), "unknown flags"),
    (dict(kind=int(Kind.EPOCH_BEGIN), flags=2), "unknown flags 0x2"),
    (dict(session=0), "session 0"),
])
def test_header_rules(fields, match) -> None:
    with pytest.raises(MalformedFrame, match=match):
        decode_frame(forge(**fields))


def test_heartbeat_payload_must_be_empty() -> None:
    with pytest.raises(MalformedFrame, match="empty payload"):
        decode_frame(forge(b"x", kind=int(Kind.HEARTBEAT)))
    with pytest.raises(MalformedFrame):
        encode_frame(Frame(Kind.BYE, SESSION, 0, 0, 0, 0, b"x"))


@pytest.mark.parametrize("field, value", [("seq", -1), ("epoch", 1 << 64), ("count", 1 << 32), ("session", 0),
                                          ("flags", 1 << 32), ("version", 1 << 16), ("seq", True)])
def test_encode_rejects_out_of_range_fields(field, value) -> None:
    fields = dict(kind=Kind.PAGES, session=SESSION, seq=0, epoch=1, count=0, flags=0, payload=b"")
    fields[field] = value
    with pytest.raises(MalformedFrame):
        encode_frame(Frame(**fields))


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=4))
def test_random_bytes_only_raise_wire_errors(parts) -> None:
    with pytest.raises(WireError):
        decode_frame(parts)


@FUZZ
@given(st.binary(min_size=56, max_size=56), st.binary(max_size=64))
def test_random_headers_with_valid_magic_and_checksum(body, payload) -> None:
    head = b"CRNG\x01\x00" + body[6:]
    head += struct.pack("<Q", xxhash.xxh3_64_intdigest(head))
    try:
        frame = decode_frame([head, payload])
    except WireError:
        return
    assert len(encode_frame(frame)[0]) == HEADER_SIZE          # whatever decodes is a well-formed frame


@FUZZ
@given(frames(), st.data())
def test_mutated_frames_only_raise_wire_errors(frame: Frame, data) -> None:
    parts = [bytearray(p) for p in encode_frame(frame)]
    for _ in range(data.draw(st.integers(1, 4))):
        part = parts[data.draw(st.integers(0, 1))]
        op = data.draw(st.sampled_from(["flip", "cut", "grow"]))
        if op == "flip" and part:
            part[data.draw(st.integers(0, len(part) - 1))] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del part[data.draw(st.integers(0, len(part))):]
        else:
            part += data.draw(st.binary(min_size=1, max_size=8))
    assume([bytes(p) for p in parts] != [bytes(p) for p in encode_frame(frame)])
    with pytest.raises(WireError):
        decode_frame([bytes(p) for p in parts])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20)


@FUZZ
@given(st.sampled_from(list(Kind)[1:]), st.one_of(st.binary(max_size=200),
                                               json_values.map(lambda v: json.dumps(v).encode())), st.data())
def test_random_payloads_only_raise_wire_errors(kind, payload, data) -> None:
    frame = Frame(kind, SESSION, 0, data.draw(st.integers(0, 3)), data.draw(st.integers(0, 3)),
                  data.draw(st.integers(0, 1)), payload)
    try:
        decode_payload(frame)
    except WireError:
        pass


@FUZZ
@given(messages, st.sampled_from(["versions", "session", "slots", "reason", "digest", "epoch", "pages", "version",
                                  "apply_ns", "detail", "sync", "last_epoch"]),
       st.one_of(st.none(), st.booleans(), st.text(max_size=5), st.integers(-5, 5), st.floats(allow_nan=False),
                 st.lists(st.integers(-3, 3), max_size=2)))
def test_retyped_control_fields_are_malformed_or_harmless(msg, key, value) -> None:
    writer = FrameWriter(SESSION)
    frame = decode_frame(writer.message(msg))
    body = json.loads(bytes(frame.payload))
    if key not in body:
        return
    body[key] = value
    forged = Frame(frame.kind, frame.session, frame.seq, frame.epoch, frame.count, frame.flags,
                   json.dumps(body).encode(), frame.version)
    try:
        result = decode_payload(forged)
    except MalformedPayload:
        return
    assert type(result) is type(msg)              # only accepted when the value is still valid


@pytest.mark.parametrize("payload, match", [
    (b'{"apply_ns": 1, "apply_ns": 2}', "duplicate key"),
    (b'{"apply_ns": NaN}', "NaN"),
    (b'{"apply_ns": true}', "must be an integer"),
    (b'{"apply_ns": -1}', "out of range"),
    (b'{"apply_ns": 1, "extra": 0}', "unknown keys"),
    (b'{}', "lacks"),
    (b'[1]', "JSON object"),
    (b'\xff', "not JSON"),
    (b'[' * 100000 + b']' * 100000, "not JSON"),
])
def test_malformed_json_payloads(payload, match) -> None:
    with pytest.raises(MalformedPayload, match=match):
        decode_payload(Frame(Kind.ACK, SESSION, 0, 1, 0, 0, payload, version=2))   # (JSON up to version 2)


def test_payloads_must_agree_with_their_header() -> None:
    _, epoch, count, flags, payload = wire.pack_message(EpochBegin(5, "ring_full", 10, 2, sync=False))
    with pytest.raises(MalformedPayload, match="header epoch 6"):
        decode_payload(Frame(Kind.EPOCH_BEGIN, SESSION, 0, 6, count, flags, payload, version=2))
    with pytest.raises(MalformedPayload, match="header count 9"):
        decode_payload(Frame(Kind.EPOCH_BEGIN, SESSION, 0, epoch, 9, flags, payload, version=2))
    with pytest.raises(MalformedPayload, match="SYNC flag"):
        decode_payload(Frame(Kind.EPOCH_BEGIN, SESSION, 0, epoch, count, int(Flag.SYNC), payload, version=2))
    hello = wire.pack_message(Hello((1,), SESSION, (SlotLayout(0, 0, 4096),), 1))[4]
    with pytest.raises(MalformedPayload, match=f"payload session {SESSION:#x} differs from header session"):
        decode_payload(Frame(Kind.HELLO, SESSION + 1, 0, 0, 0, 0, hello, version=2))
    end = wire.pack_message(EpochEnd(5, bytes(16), 3, 2, 0))
    with pytest.raises(MalformedPayload, match="payload batches 2 differs from header count 1"):
        decode_payload(Frame(Kind.EPOCH_END, SESSION, 0, 5, 1, 0, end.payload, version=2))
    states = pack_vcpu_states([VcpuState(0, b"r", b"s")])
    with pytest.raises(MalformedPayload, match="header count 2"):
        decode_payload(Frame(Kind.VCPU_STATE, SESSION, 0, 1, 2, 0, states))


@pytest.mark.parametrize("slots, match", [
    ((SlotLayout(0, 0, 8192), SlotLayout(1, 4096, 4096)), "overlaps"),
    ((SlotLayout(0, 0, 4096), SlotLayout(0, 8192, 4096)), "twice"),
    ((SlotLayout(0, 0, 100),), "not aligned"),
    ((SlotLayout(0, 0, 0),), "empty"),
])
def test_hello_layout_validated(slots, match) -> None:
    with pytest.raises(MalformedPayload, match=match):
        FrameWriter(SESSION).message(Hello((1,), SESSION, slots, 1))


def test_bad_reasons_refused_when_packing() -> None:
    writer = FrameWriter(SESSION)
    with pytest.raises(MalformedPayload, match="reason 'bored'"):
        writer.message(EpochBegin(1, "bored", 0, 0))
    with pytest.raises(MalformedPayload, match="reason 'nope'"):
        writer.message(Refuse("nope"))
    with pytest.raises(MalformedPayload, match="16 bytes"):
        writer.message(EpochEnd(1, b"short", 0, 0, 0))
    assert writer.next_seq == 0                   # nothing was sent, no seq was used


# --- session and order -----------------------------------------------------------------------------

def frame_of(kind=Kind.PAGES, session=SESSION, seq=0, epoch=1) -> Frame:
    return Frame(kind, session, seq, epoch if kind not in (Kind.HELLO,) else 0)


def test_guard_accepts_a_session_in_order() -> None:
    guard = FrameGuard(accept=PRIMARY_KINDS)
    assert guard.check(frame_of(Kind.HELLO)) is True
    for seq in range(1, 5):
        assert guard.check(frame_of(seq=seq)) is False
    assert guard.session == SESSION and guard.next_seq == 5


def test_guard_rejects_replayed_frames() -> None:
    guard = FrameGuard()
    guard.check(frame_of(Kind.HELLO))
    guard.check(frame_of(seq=1))
    for seq in (1, 0):
        with pytest.raises(ReplayedFrame, match=f"seq {seq}.*last accepted seq is 1"):
            guard.check(frame_of(seq=seq))
    with pytest.raises(ReplayedFrame):
        guard.check(frame_of(Kind.HELLO))         # the same HELLO again is a replay, not a restart
    assert guard.next_seq == 2


def test_guard_rejects_gaps_and_leaves_state_unchanged() -> None:
    guard = FrameGuard()
    guard.check(frame_of(Kind.HELLO))
    with pytest.raises(OutOfOrderFrame, match="expected seq 1, 2 frame"):
        guard.check(frame_of(seq=3))
    guard.check(frame_of(seq=1))                 # the rejected frame changed nothing
    assert guard.next_seq == 2


def test_guard_wrong_session_and_no_hello() -> None:
    guard = FrameGuard()
    with pytest.raises(WrongSession, match="expected a HELLO"):
        guard.check(frame_of())
    guard.check(frame_of(Kind.HELLO))
    with pytest.raises(WrongSession, match=f"expected session {SESSION:#x}"):
        guard.check(frame_of(session=SESSION + 1, seq=1))
    assert guard.session == SESSION


def test_new_session_hello_resets_and_retires_the_old_one() -> None:
    guard = FrameGuard()
    guard.check(frame_of(Kind.HELLO))
    guard.check(frame_of(seq=1))
    assert guard.check(frame_of(Kind.HELLO, session=SESSION + 1)) is True
    assert guard.session == SESSION + 1 and guard.next_seq == 1
    guard.check(frame_of(session=SESSION + 1, seq=1))
    with pytest.raises(WrongSession, match="retired"):
        guard.check(frame_of(session=SESSION, seq=2))          # the old primary's late frame
    with pytest.raises(WrongSession, match="retired"):
        guard.check(frame_of(Kind.HELLO, session=SESSION))     # and its HELLO cannot come back
    with pytest.raises(OutOfOrderFrame, match="seq 0"):
        guard.check(frame_of(Kind.HELLO, session=SESSION + 2, seq=5))


def test_pinned_guard_and_direction() -> None:
    guard = FrameGuard(session=SESSION, accept=REPLICA_KINDS)
    with pytest.raises(UnexpectedKind, match="PAGES"):
        guard.check(frame_of(Kind.PAGES))
    with pytest.raises(WrongSession):
        FrameGuard(session=SESSION).check(frame_of(Kind.HELLO, session=SESSION + 1))  # pinned: never adopts
    with pytest.raises(WrongSession):
        guard.check(frame_of(Kind.HEARTBEAT, session=SESSION + 1))
    guard.check(frame_of(Kind.WELCOME, seq=0, epoch=0))
    guard.check(frame_of(Kind.ACK, seq=1))
    assert guard.next_seq == 2


def test_writer_stamps_consecutive_seqs_that_a_guard_accepts() -> None:
    writer, guard = FrameWriter(), FrameGuard(accept=PRIMARY_KINDS)
    assert writer.session != 0
    sent = [writer.message(Hello((1,), writer.session, (SlotLayout(0, 0, 4096),), 1)),
            writer.message(EpochBegin(0, "sync", 1, 1, sync=True)),
            writer.frame(Kind.PAGES, 0, 1, b"\0" * 4096),
            writer.frame(Kind.HEARTBEAT, 0)]
    seqs = []
    for parts in sent:
        frame = decode_frame(parts)
        guard.check(frame)
        seqs.append(frame.seq)
    assert seqs == [0, 1, 2, 3] and writer.next_seq == 4
    with pytest.raises(UnknownKind):
        writer.frame(Kind.INVALID)
    assert writer.next_seq == 4


# --- versions -----------------------------------------------------------------------------------------

def test_negotiate_picks_highest_common() -> None:
    assert negotiate_version([1, 2, 3], [2, 3, 4]) == 3
    assert negotiate_version([1], wire.SUPPORTED_VERSIONS) == 1


def test_negotiate_without_common_version_names_both_lists() -> None:
    with pytest.raises(UnsupportedVersion, match=r"peer offers \[3, 4\], we support \[1, 2\]") as err:
        negotiate_version([4, 3], [2, 1])
    assert err.value.reason == "no_common_version"


# --- vCPU state -------------------------------------------------------------------------------------

@given(vcpu_lists())
@settings(deadline=None)
def test_vcpu_states_round_trip(states) -> None:
    data = pack_vcpu_states(states)
    assert unpack_vcpu_states(data) == states
    assert unpack_vcpu_states(memoryview(data)) == states
    assert pack_vcpu_states(unpack_vcpu_states(data)) == data          # deterministic


def test_vcpu_state_malformed_inputs() -> None:
    data = pack_vcpu_states([VcpuState(0, b"regs", b"sregs", msrs={0x10: 5, 0xC0000080: 1 << 63})])
    for n in range(len(data)):
        with pytest.raises(VcpuStateError, match="truncated"):
            unpack_vcpu_states(data[:n])
    with pytest.raises(VcpuStateError, match="1 trailing bytes"):
        unpack_vcpu_states(data + b"\0")
    with pytest.raises(VcpuStateError, match="exceeds"):
        unpack_vcpu_states(struct.pack("<I", vcpu_state.MAX_VCPUS + 1))
    with pytest.raises(VcpuStateError, match="length .* exceeds"):
        unpack_vcpu_states(struct.pack("<III", 1, 0, vcpu_state.MAX_VCPU_FIELD + 1))
    empty_vcpu = b"".join(struct.pack("<I", 0) for _ in range(9))    # 8 empty blobs, 0 MSRs
    two = struct.pack("<II", 2, 3) + empty_vcpu + struct.pack("<I", 3) + empty_vcpu
    with pytest.raises(VcpuStateError, match="vCPU 3 twice"):
        unpack_vcpu_states(two)
    msrs = struct.pack("<I", 2) + struct.pack("<IQ", 0x10, 5) * 2
    with pytest.raises(VcpuStateError, match="MSR 0x10 twice"):
        unpack_vcpu_states(struct.pack("<II", 1, 0) + empty_vcpu[:-4] + msrs)
    with pytest.raises(VcpuStateError, match="MSR count .* exceeds"):
        unpack_vcpu_states(struct.pack("<II", 1, 0) + empty_vcpu[:-4] + struct.pack("<I", vcpu_state.MAX_MSRS + 1))
    with pytest.raises(VcpuStateError, match="bytes-like"):
        unpack_vcpu_states("text")
    with pytest.raises(VcpuStateError, match="repeated"):
        pack_vcpu_states([VcpuState(1, b"", b""), VcpuState(1, b"", b"")])
    with pytest.raises(VcpuStateError, match="out of range"):
        pack_vcpu_states([VcpuState(1, b"", b"", msrs={1 << 32: 0})])
    with pytest.raises(VcpuStateError, match="limit"):
        pack_vcpu_states([VcpuState(0, b"", b"", xsave=bytes(vcpu_state.MAX_VCPU_FIELD + 1))])


def test_vcpu_state_error_is_a_value_error_of_ring_not_of_the_wire() -> None:
    assert issubclass(VcpuStateError, ValueError) and not issubclass(VcpuStateError, WireError)


@FUZZ
@given(st.binary(max_size=300))
def test_random_vcpu_payloads_only_raise_vcpu_state_errors(data) -> None:
    try:
        states = unpack_vcpu_states(data)
    except VcpuStateError:
        return
    assert pack_vcpu_states(states) == data


@FUZZ
@given(st.binary(max_size=300), st.integers(0, 4))
def test_bad_vcpu_state_frames_are_malformed_payloads(data, count) -> None:
    frame = Frame(Kind.VCPU_STATE, SESSION, 0, 7, count, 0, data)
    try:
        states = decode_payload(frame)
    except MalformedPayload as err:
        assert str(err).startswith("VCPU_STATE epoch 7: ")
        return
    assert len(states) == count


# --- the declarations ----------------------------------------------------------------------------

DECLARED = schema.declared_messages()


def json_keys(cls) -> set[str]:
    return {f.name for f in schema.declaration(cls).fields if f.in_payload}


def test_every_declared_message_has_a_strategy() -> None:
    assert set(MESSAGES) == set(DECLARED) == {Kind.HELLO, Kind.WELCOME, Kind.EPOCH_BEGIN, Kind.EPOCH_END, Kind.ACK,
                                              Kind.REFUSE}


@pytest.mark.parametrize("kind", list(DECLARED), ids=lambda k: k.name)
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_every_declared_message_round_trips(kind, data) -> None:
    msg = data.draw(MESSAGES[kind])
    packed = wire.pack_message(msg)
    assert packed.kind is kind and type(msg).KIND is kind
    writer = FrameWriter(SESSION)
    frame = decode_frame(writer.message(msg))
    assert frame.version == 1 and writer.next_seq == 1
    decoded = decode_payload(frame)
    assert type(decoded) is type(msg) and decoded == msg
    assert wire.pack_message(decoded) == packed                        # the same bytes again
    left_out = {f.name for f in schema.declaration(type(msg)).fields if f.added and getattr(msg, f.name) == f.omitted_at}
    assert set(json.loads(packed.payload)) == json_keys(type(msg)) - left_out   # exactly the declared keys


def invalid(spec: Spec, *, packing: bool) -> st.SearchStrategy:
    """Values that ``spec`` must refuse: out of range, outside its choices, over its limits, or of the wrong type.

    The same values serve as JSON (unpacking) and as Python values (packing), but for what packing
    legitimately accepts (a string it truncates, an enum member)."""
    not_json_int = st.booleans() | st.text(max_size=3) | st.floats(allow_nan=False, allow_infinity=False) | \
        st.lists(st.integers(0, 3), max_size=2) | st.none()
    if isinstance(spec, Int):
        bad = st.integers(max_value=spec.lo - 1) | st.integers(min_value=spec.hi + 1) | not_json_int
        if spec.power_of_two:
            bad |= st.integers(spec.lo, spec.hi).filter(lambda v: v & (v - 1))
        return bad
    if isinstance(spec, Text):
        wrong = st.integers() | st.booleans() | st.none() | st.lists(st.text(max_size=2), max_size=2)
        long = st.integers(1, 5).map(lambda n: "x" * (spec.limit + n))
        return wrong if packing and spec.truncate else wrong | long
    if isinstance(spec, Bool):
        return st.integers() | st.text(max_size=3) | st.none() | st.floats(allow_nan=False, allow_infinity=False)
    if isinstance(spec, Choice):
        values = {c.value for c in spec.choices}
        return st.text(max_size=20).filter(lambda v: v not in values) | st.integers() | st.none() | st.booleans()
    if isinstance(spec, HexBytes):
        text_bad = st.text(max_size=2 * spec.size + 2).filter(
            lambda v: not re.fullmatch(f"[0-9a-f]{{{2 * spec.size}}}", v))
        bytes_bad = st.binary(max_size=2 * spec.size).filter(lambda b: len(b) != spec.size)
        return text_bad | st.integers() | st.none() | (bytes_bad if packing else st.nothing())
    if isinstance(spec, ListOf):
        bad = st.just([]) | st.integers() | st.text(max_size=3) | st.none() | \
            st.lists(invalid(spec.item, packing=packing), min_size=1, max_size=3)
        if spec.limit <= 1000:                        # longer lists would exceed the payload limit first
            bad |= st.just([1] * (spec.limit + 1))
        if spec.unique and isinstance(spec.item, Int):
            bad |= st.integers(spec.item.lo, spec.item.hi).map(lambda v: [v, v])
        return bad
    if isinstance(spec, Nested):
        good = {f.name: 0 for f in schema.declaration(spec.cls).fields}
        fields = schema.declaration(spec.cls).fields
        bad = st.integers() | st.none() | st.just({}) | st.just({**good, "extra": 1}) | st.one_of(
            *[invalid(f.spec, packing=packing).map(lambda v, n=f.name: {**good, n: v}) for f in fields])
        if packing:
            bad |= st.one_of(*[invalid(f.spec, packing=True).map(
                lambda v, n=f.name: spec.cls(**{**good, n: v})) for f in fields])
        return bad
    raise AssertionError(f"no invalid values for {spec!r}: add them here")


FIELDS = [(kind, f) for kind, cls in DECLARED.items() for f in schema.declaration(cls).fields]


def invalid_for(field: schema.WireField, *, packing: bool) -> st.SearchStrategy:
    bad = invalid(field.spec, packing=packing)
    return bad.filter(lambda v: v is not None) if field.optional else bad


@pytest.mark.parametrize("kind, field", [(k, f) for k, f in FIELDS if f.in_payload],
                         ids=lambda v: v.name if isinstance(v, (Kind, schema.WireField)) else None)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_unpacking_rejects_each_invalid_field_naming_it(kind, field, data) -> None:
    frame = decode_frame(FrameWriter(SESSION).message(data.draw(MESSAGES[kind])))
    body = json.loads(bytes(frame.payload))
    body[field.name] = data.draw(invalid_for(field, packing=False), label=field.name)
    forged = dataclasses.replace(frame, payload=json.dumps(body).encode())
    with pytest.raises(MalformedPayload, match=rf"^{kind.name} {field.name}\b"):
        decode_payload(forged)


@pytest.mark.parametrize("kind, field", FIELDS,
                         ids=lambda v: v.name if isinstance(v, (Kind, schema.WireField)) else None)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_packing_rejects_each_invalid_field_naming_it(kind, field, data) -> None:
    msg = data.draw(MESSAGES[kind])
    bad = dataclasses.replace(msg, **{field.name: data.draw(invalid_for(field, packing=True), label=field.name)})
    with pytest.raises(MalformedPayload, match=rf"^{kind.name} {field.name}\b"):
        wire.pack_message(bad)


def test_optional_fields_take_null_and_others_do_not() -> None:
    assert decode_payload(decode_frame(FrameWriter(SESSION).message(Welcome(3, None)))) == Welcome(3, None)
    assert b'"last_epoch":null' in wire.pack_message(Welcome(3)).payload
    with pytest.raises(MalformedPayload, match="WELCOME version must be an integer, got NoneType"):
        wire.pack_message(Welcome(None))


def test_control_json_is_version_1_byte_for_byte() -> None:
    slots = (SlotLayout(0, 0, 4096), SlotLayout(1, 1 << 30, 8192))
    expected = {
        Hello((1,), 5, slots, 2, agent="p"):
            b'{"agent":"p","page_size":4096,"session":5,"slots":[{"guest_phys_addr":0,"size":4096,"slot":0},'
            b'{"guest_phys_addr":1073741824,"size":8192,"slot":1}],"token":0,"vcpus":2,"versions":[1]}',
        Welcome(1, None): b'{"last_epoch":null,"token":0,"version":1}',
        Welcome(1, 9, 4): b'{"last_epoch":9,"token":4,"version":1}',
        EpochBegin(7, EpochReason.RING_FULL, 10, 1):
            b'{"batches":1,"epoch":7,"pages":10,"reason":"ring_full","sync":false,"token":0}',
        EpochBegin(7, "sync", 10, 1, True, 3): b'{"batches":1,"epoch":7,"pages":10,"reason":"sync","sync":true,"token":3}',
        EpochEnd(7, bytes(range(16)), 10, 1, 40960):
            b'{"batches":1,"digest":"000102030405060708090a0b0c0d0e0f","epoch":7,"pages":10,"raw_bytes":40960}',
        Ack(7, 123): b'{"apply_ns":123}',
        Refuse(RefuseReason.BAD_KEY, "\u00e9" * 1100): b'{"detail":"' + b"\\u00e9" * 1024 + b'","reason":"bad_key"}',
    }
    for msg, payload in expected.items():
        assert wire.pack_message(msg).payload == payload, msg
    assert wire.pack_message(EpochBegin(7, "sync", 10, 1, True))[:4] == (Kind.EPOCH_BEGIN, 7, 10, int(Flag.SYNC))
    assert wire.pack_message(EpochEnd(7, bytes(16), 10, 3, 0))[:4] == (Kind.EPOCH_END, 7, 3, 0)
    assert wire.pack_message(Ack(7))[:4] == (Kind.ACK, 7, 0, 0)


def test_reasons_are_enums_with_the_version_1_strings() -> None:
    assert [r.value for r in EpochReason] == ["ring_full", "dirty_threshold", "interval", "output", "sync"]
    assert [r.value for r in RefuseReason] == ["no_common_version", "bad_key", "layout_mismatch", "wrong_session",
                                               "bad_frame", "busy", "superseded", "fencing_mismatch"]
    begin = decode_payload(decode_frame(FrameWriter(SESSION).message(EpochBegin(1, "interval", 0, 0))))
    assert begin.reason is EpochReason.INTERVAL and begin.reason == "interval" and f"{begin.reason}" == "interval"
    assert EpochBegin(1, "output", 0, 0).reason is EpochReason.OUTPUT          # normalised when built
    assert Hello([1], SESSION, [SlotLayout(0, 0, 4096)], 1).versions == (1,)   # lists become tuples
    assert WireError.reason is RefuseReason.BAD_FRAME and WrongSession.reason is RefuseReason.WRONG_SESSION
    assert UnsupportedVersion.reason is RefuseReason.NO_COMMON_VERSION


def test_a_hello_must_carry_the_writers_session() -> None:
    writer = FrameWriter(SESSION)
    with pytest.raises(MalformedPayload, match="HELLO session .* differs from the sender's session"):
        writer.message(Hello((1,), SESSION + 1, (SlotLayout(0, 0, 4096),), 1))
    assert writer.next_seq == 0


def test_declarations_refuse_what_they_cannot_carry() -> None:
    with pytest.raises(TypeError, match="not a control message"):
        wire.pack_message(SESSION)
    with pytest.raises(TypeError, match="not declared with wire_field"):
        @schema.message(Kind.BYE)
        class Loose:
            x: int = 0
    with pytest.raises(TypeError, match="HELLO is declared twice"):
        @schema.message(Kind.HELLO)
        class Again:
            x: int = schema.wire_field(Int())
    assert DECLARED[Kind.HELLO] is Hello and Kind.BYE not in DECLARED


# --- the spec is current -------------------------------------------------------------------------

def test_spec_quotes_each_declaration() -> None:
    for cls in DECLARED.values():
        assert schema.describe(cls) in wire.__doc__, f"wire.py's spec is stale for {cls.__name__}"


def test_kinds_table_of_the_spec_matches_kind_rules() -> None:
    table = wire.__doc__.split("Kinds\n=====")[1].split("\n\n(1)")[0]
    rows = [re.split(r"\s{2,}", line.strip()) for line in table.splitlines()
            if re.match(r"\d+\s{2,}[A-Z_]+\s{2,}", line)]
    senders = {"P -> R": "primary", "R -> P": "replica", "both": "both"}
    seen = set()
    for value, name, direction, epoch, count, flags, payload in rows:
        kind = Kind(int(value))
        assert kind.name == name
        if kind is Kind.INVALID:
            continue
        seen.add(kind)
        rule = KIND_RULES[kind]
        assert senders[direction] == rule.sender, kind
        assert (epoch == "0") == rule.zero_epoch, kind
        assert (count == "0") == rule.zero_count, kind
        assert (flags == "0") == (rule.flags == 0), kind
        assert (payload == "empty") == rule.empty, kind
    assert seen == set(KIND_RULES)


# --- a real socket --------------------------------------------------------------------------------------

def test_zero_copy_send_over_inproc_pair() -> None:
    ctx = zmq.Context.instance()
    tx, rx = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        rx.bind("inproc://test-wire")
        tx.connect("inproc://test-wire")
        pages = np.random.default_rng(7).integers(0, 255, size=(16, 4096), dtype=np.uint8)
        writer = FrameWriter(SESSION)
        tx.send_multipart(writer.frame(Kind.PAGES, 9, 16, pages, flags=0x3), copy=False)
        assert rx.poll(5000), "frame did not arrive"
        frame = decode_frame(rx.recv_multipart(copy=False))
        assert (frame.kind, frame.session, frame.seq, frame.epoch, frame.count, frame.flags) == \
               (Kind.PAGES, SESSION, 0, 9, 16, 3)
        assert np.array_equal(np.frombuffer(frame.payload, np.uint8).reshape(16, 4096), pages)
    finally:
        tx.close(linger=0)
        rx.close(linger=0)


def test_a_guard_that_does_not_adopt_keeps_its_session_until_told() -> None:
    guard = FrameGuard()
    assert guard.check(frame_of(Kind.HELLO), adopt=False) and guard.session is None
    guard.adopt(SESSION)
    guard.check(frame_of(seq=1))
    assert guard.check(frame_of(Kind.HELLO, session=SESSION + 1), adopt=False) is True
    assert guard.session == SESSION                            # checked, not adopted: ours goes on
    guard.check(frame_of(seq=2))
    guard.adopt(SESSION + 1)
    assert guard.session == SESSION + 1 and guard.next_seq == 1
    with pytest.raises(WrongSession, match="retired"):
        guard.check(frame_of(seq=3))


def test_fields_added_after_version_1_are_left_out_at_their_default_and_read_back() -> None:
    """A field added in version 2 keeps the version-1 JSON byte for byte while it has its default,
    and a version-1 payload (without it) reads as the default."""
    slots = (SlotLayout(0, 0, 4096),)
    plain = wire.pack_message(Hello((1, 2), 5, slots, 1)).payload
    assert b"resume_of" not in plain
    resuming = FrameWriter(5).message(Hello((1, 2), 5, slots, 1, resume_of=0x77))
    assert b'"resume_of":119' in b"".join(bytes(p) for p in resuming)
    assert decode_payload(decode_frame(resuming)).resume_of == 0x77
    assert decode_payload(decode_frame(FrameWriter(5).message(Hello((1,), 5, slots, 1)))).resume_of == 0
    kept = wire.pack_message(Welcome(2, 9, 0, True)).payload
    assert json.loads(kept)["resumed"] is True and b"resumed" not in wire.pack_message(Welcome(2, 9)).payload


# --- binary control payloads (version 3) --------------------------------------------------------

BINARY = [kind for kind, cls in DECLARED.items() if schema.declaration(cls).binary is not None]


def test_the_messages_of_every_epoch_are_binary_from_version_3() -> None:
    assert set(BINARY) == {Kind.EPOCH_BEGIN, Kind.EPOCH_END, Kind.ACK}
    assert wire.BINARY_VERSION == 3 and wire.PROTOCOL_VERSION == 3 and 3 in wire.SUPPORTED_VERSIONS
    begin = EpochBegin(7, "output", 3, 1, False, 9)
    assert FrameWriter(SESSION, version=3).message(begin)[1] == bytes([4]) + struct.pack("<IQ", 1, 9)
    assert json.loads(FrameWriter(SESSION, version=2).message(begin)[1])["reason"] == "output"
    assert wire.pack_message(Ack(7, 5), version=3).payload == struct.pack("<Q", 5)
    # the handshake stays JSON whatever the writer's version
    assert json.loads(FrameWriter(SESSION, version=3).message(Welcome(3))[1])["version"] == 3


@pytest.mark.parametrize("kind", BINARY, ids=lambda k: k.name)
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_binary_messages_round_trip_and_equal_their_json(kind, data) -> None:
    msg = data.draw(MESSAGES[kind])
    layout = schema.declaration(type(msg)).binary
    frame = decode_frame(FrameWriter(SESSION, version=3).message(msg))
    assert frame.version == 3 and len(frame.payload) == layout.struct.size
    decoded = decode_payload(frame)
    assert type(decoded) is type(msg) and decoded == msg
    assert wire.pack_message(decoded, version=3) == wire.pack_message(msg, version=3)
    assert decode_payload(decode_frame(FrameWriter(SESSION, version=2).message(msg))) == decoded


@pytest.mark.parametrize("kind", BINARY, ids=lambda k: k.name)
@FUZZ
@given(data=st.data())
def test_binary_payloads_of_any_other_length_or_content_only_raise_malformed_payload(kind, data) -> None:
    msg = data.draw(MESSAGES[kind])
    frame = decode_frame(FrameWriter(SESSION, version=3).message(msg))
    size = schema.declaration(type(msg)).binary.struct.size
    payload = data.draw(st.one_of(st.binary(max_size=64).filter(lambda b: len(b) != size),
                                  st.binary(min_size=size, max_size=size)))
    forged = Frame(frame.kind, frame.session, frame.seq, frame.epoch, frame.count, frame.flags, payload, 3)
    try:
        decoded = decode_payload(forged)
    except MalformedPayload:
        return
    assert len(payload) == size and type(decoded) is type(msg)
    assert wire.pack_message(decoded, version=3).payload == payload     # accepted: exactly its bytes


@pytest.mark.parametrize("payload, match", [
    (bytes([0]) + bytes(12), "reason code 0 is not one of 1 to 5"),
    (bytes([6]) + bytes(12), "reason code 6"),
    (bytes(14), "is 14 bytes, version 3 has 13"),
    (b"{}", "is 2 bytes, version 3 has 13"),
])
def test_malformed_binary_epoch_begins(payload, match) -> None:
    with pytest.raises(MalformedPayload, match=match):
        decode_payload(Frame(Kind.EPOCH_BEGIN, SESSION, 0, 1, 0, 0, payload, version=3))


def test_binary_fields_bound_to_the_header_come_from_it() -> None:
    payload = wire.pack_message(EpochBegin(5, "sync", 10, 2, sync=True), version=3).payload
    decoded = decode_payload(Frame(Kind.EPOCH_BEGIN, SESSION, 0, 6, 9, 0, payload, version=3))
    assert (decoded.epoch, decoded.pages, decoded.sync) == (6, 9, False)
    end = decode_payload(Frame(Kind.EPOCH_END, SESSION, 0, 5, 1, 0,
                               wire.pack_message(EpochEnd(5, bytes(16), 3, 2, 0), version=3).payload, version=3))
    assert (end.epoch, end.batches, end.pages) == (5, 1, 3)


def test_decode_one_takes_a_frame_of_one_part_or_two_and_refuses_more_frames() -> None:
    """A replica's answer travels as one part (header and payload joined) unless its payload is
    empty; the primary reads either, and a message carrying a second frame is refused by name."""
    writer = FrameWriter(SESSION)
    ack = writer.message(Ack(7, 1234))
    heartbeat = writer.frame(Kind.HEARTBEAT, epoch=7)
    joined = wire.join_frames([ack])
    assert len(joined) == 1 and len(wire.join_frames([heartbeat])) == 2
    for parts in (ack, joined):
        frame = wire.decode_one(parts)
        assert frame.kind == Kind.ACK and decode_payload(frame) == Ack(7, 1234)
    assert wire.decode_one(wire.join_frames([heartbeat])).kind == Kind.HEARTBEAT
    with pytest.raises(MalformedFrame, match="one frame was expected"):
        wire.decode_one(wire.join_frames([ack, heartbeat]))
    with pytest.raises(TruncatedFrame):
        wire.decode_one([])
