"""The frame codec of the wire format: the 64-byte header, kinds, flags, reasons, errors.

The spec is the docstring of checkpointer/wire.py, which is also where callers
import these names from. This module holds what every other part of the wire
needs and nothing that needs them: the vocabulary (Kind, Flag, the reason
enums), the error tree, the per-kind header rules (``KIND_RULES``, the kinds
table of the spec as data), ``encode_frame``/``decode_frame``, and from
version 2 ``join_frames``/``decode_message`` (several frames in one message).

What is hard: a frame comes from a peer, so ``decode_frame`` checks in an
order that never reads what it has not yet bounded (part count, magic, version,
header length, header checksum, kind, header rules, payload size, payload
checksum), and payloads are never copied (a PAGES batch is megabytes). In a
message of several frames the next frame is found from a header's
``payload_len``, so that header is checked whole (checksum, size limit) before
its length is used; one function checks a header for both.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import xxhash

__all__ = [
    "MAGIC", "PROTOCOL_VERSION", "HANDSHAKE_VERSION", "SUPPORTED_VERSIONS", "HEADER", "HEADER_SIZE", "MAX_PAYLOAD",
    "Kind", "Flag", "EpochReason", "RefuseReason", "KindRule", "KIND_RULES", "PRIMARY_KINDS", "REPLICA_KINDS",
    "HANDSHAKE_KINDS", "Frame", "encode_frame", "encode_parts", "decode_frame", "join_frames", "decode_message", "INLINE_PAYLOAD",
    "MESSAGE_VERSION", "byte_view", "kind_name", "frame_where",
    "WireError", "TruncatedFrame", "MalformedFrame", "BadMagic", "UnsupportedVersion", "BadChecksum",
    "UnknownKind", "UnexpectedKind", "OversizedFrame", "MalformedPayload", "ReplayedFrame", "OutOfOrderFrame",
    "WrongSession",
]

MAGIC = int.from_bytes(b"CRNG", "little")
PROTOCOL_VERSION = 3                # the highest version this side speaks
HANDSHAKE_VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (1, 2, 3)
MESSAGE_VERSION = 2                 # from this version on a message may carry several frames

#: magic, version, kind, session, seq, epoch, count, flags, payload_len, payload_checksum, header_checksum
HEADER = struct.Struct("<IHHQQQIIQQQ")
HEADER_SIZE = HEADER.size
_CHECKED = HEADER_SIZE - 8          # header bytes covered by header_checksum
_PREFIX = struct.Struct("<IH")      # magic and version: stable across versions
assert HEADER_SIZE == 64

MAX_PAYLOAD = 64 << 20              # default receiver limit on payload_len

U16, U32, U64 = (1 << 16) - 1, (1 << 32) - 1, (1 << 64) - 1


# --- vocabulary ---------------------------------------------------------------------


class Kind(enum.IntEnum):
    """Frame kinds; see the kinds table in the spec (checkpointer/wire.py) and ``KIND_RULES``."""

    INVALID = 0
    HELLO = 1
    WELCOME = 2
    EPOCH_BEGIN = 3
    PAGES = 4
    VCPU_STATE = 5
    DEVICE_STATE = 6
    EPOCH_END = 7
    ACK = 8
    HEARTBEAT = 9
    REFUSE = 10
    BYE = 11


class Flag(enum.IntFlag):
    """Header flag bits of the kinds that define any (PAGES flags belong to the page codec)."""

    #: EPOCH_BEGIN: a pre-copy epoch of a sync. Its pages were read while the guest ran, so it
    #: is *not* a consistent checkpoint: pages only, no VCPU_STATE or DEVICE_STATE, and a
    #: replica cannot fail over to it. Clear: a consistent checkpoint (taken with the guest
    #: paused), including the final stop-and-copy epoch of a sync, whose reason is "sync".
    #: The name is historical; read it as "pre-copy, pages only".
    SYNC = 1


class EpochReason(enum.StrEnum):
    """Why an epoch was cut: EPOCH_BEGIN ``reason``. The values are the JSON strings of version 1."""

    RING_FULL = "ring_full"                # a vCPU's dirty ring reached its soft limit
    DIRTY_THRESHOLD = "dirty_threshold"    # the dirty-page trigger fired
    INTERVAL = "interval"                  # the checkpoint interval elapsed
    OUTPUT = "output"                      # held output is waiting for a checkpoint
    SYNC = "sync"                          # a sync epoch: every pre-copy epoch, and the final stop-and-copy


class RefuseReason(enum.StrEnum):
    """Why a replica ends a session: REFUSE ``reason``. The values are the JSON strings of version 1."""

    NO_COMMON_VERSION = "no_common_version"
    BAD_KEY = "bad_key"
    LAYOUT_MISMATCH = "layout_mismatch"
    WRONG_SESSION = "wrong_session"
    BAD_FRAME = "bad_frame"
    BUSY = "busy"
    SUPERSEDED = "superseded"           # the replica has seen a newer fencing token than the primary's
    FENCING_MISMATCH = "fencing_mismatch"   # one side fences with etcd and the other does not


@dataclass(frozen=True)
class KindRule:
    """The header rules of one kind: who sends it, which fields must be 0, which flags it may set."""

    sender: str                 # "primary", "replica" or "both"
    zero_epoch: bool = False
    zero_count: bool = False
    flags: int = 0              # the flag bits this kind may set; any other bit is rejected
    empty: bool = False         # carries no payload


#: The kinds table of the spec, as data: encode_frame, decode_frame and the kind sets follow it.
KIND_RULES: dict[Kind, KindRule] = {
    Kind.HELLO: KindRule("primary", zero_epoch=True, zero_count=True),
    Kind.WELCOME: KindRule("replica", zero_epoch=True, zero_count=True),
    Kind.EPOCH_BEGIN: KindRule("primary", flags=int(Flag.SYNC)),
    Kind.PAGES: KindRule("primary", flags=U32),
    Kind.VCPU_STATE: KindRule("primary"),
    Kind.DEVICE_STATE: KindRule("primary", zero_count=True),
    Kind.EPOCH_END: KindRule("primary"),
    Kind.ACK: KindRule("replica", zero_count=True),
    Kind.HEARTBEAT: KindRule("both", zero_count=True, empty=True),
    Kind.REFUSE: KindRule("replica", zero_epoch=True, zero_count=True),
    Kind.BYE: KindRule("both", zero_count=True, empty=True),
}
assert set(KIND_RULES) == set(Kind) - {Kind.INVALID}

#: Kinds each side sends. A replica accepts PRIMARY_KINDS, a primary REPLICA_KINDS.
PRIMARY_KINDS = frozenset(k for k, r in KIND_RULES.items() if r.sender in ("primary", "both"))
REPLICA_KINDS = frozenset(k for k, r in KIND_RULES.items() if r.sender in ("replica", "both"))
#: Kinds always sent at HANDSHAKE_VERSION, whatever was negotiated.
HANDSHAKE_KINDS = frozenset({Kind.HELLO, Kind.WELCOME, Kind.REFUSE})
_KIND_OF = {int(k): k for k in Kind if k is not Kind.INVALID}      # a header's kind field -> its Kind


# --- errors -------------------------------------------------------------------


class WireError(ValueError):
    """A frame or payload the wire format does not accept. Nothing of it may be applied.

    ``reason`` is the REFUSE reason code a replica answers with when the frame
    ends the session.
    """

    reason: RefuseReason = RefuseReason.BAD_FRAME


class TruncatedFrame(WireError):
    """A part is missing, the header is short, or the payload is shorter than declared."""


class MalformedFrame(WireError):
    """The frame's shape is wrong: extra parts, a long header, a non-buffer part, bad header fields."""


class BadMagic(WireError):
    """The header does not start with b"CRNG": not a colo-ring frame."""


class UnsupportedVersion(WireError):
    """A version this side does not speak, or no version in common with the peer."""

    reason = RefuseReason.NO_COMMON_VERSION


class BadChecksum(WireError):
    """The header or payload checksum does not match: the frame was corrupted."""


class UnknownKind(WireError):
    """The kind is not a Kind of this version, or is 0 (INVALID)."""


class UnexpectedKind(WireError):
    """A valid kind that this receiver does not accept (wrong direction)."""


class OversizedFrame(WireError):
    """payload_len is above the receiver's max_payload."""


class MalformedPayload(WireError):
    """A payload does not parse, has wrong types, missing or unknown keys, or contradicts its header."""


class ReplayedFrame(WireError):
    """A seq at or below the last one accepted in this session."""


class OutOfOrderFrame(WireError):
    """A seq that skips past the next expected one (a frame was lost or reordered)."""


class WrongSession(WireError):
    """A frame of another (or a retired) session, or a frame before any HELLO."""

    reason = RefuseReason.WRONG_SESSION


# --- frames ---------------------------------------------------------------------------


def kind_name(kind: int) -> str:
    """The name of a kind for messages, also for values that are not a Kind."""
    try:
        return Kind(kind).name
    except ValueError:
        return f"kind {kind}"


def frame_where(kind: int, epoch: int, seq: int) -> str:
    """How error messages name a frame: "PAGES epoch 7 seq 12"."""
    return f"{kind_name(kind)} epoch {epoch} seq {seq}"


class _Where:
    """frame_where, formatted only if an error message needs it (every frame is checked)."""

    __slots__ = ("kind", "epoch", "seq", "prefix")

    def __init__(self, kind: int, epoch: int, seq: int, prefix: str = "") -> None:
        self.kind, self.epoch, self.seq, self.prefix = kind, epoch, seq, prefix

    def __str__(self) -> str:
        return self.prefix + frame_where(self.kind, self.epoch, self.seq)

    __format__ = lambda self, spec: format(str(self), spec)  # noqa: E731


@dataclass(frozen=True)
class Frame:
    """One decoded (or to-be-encoded) frame. ``payload`` is any contiguous bytes-like object."""

    kind: Kind
    session: int
    seq: int
    epoch: int = 0
    count: int = 0
    flags: int = 0
    payload: Any = b""
    version: int = PROTOCOL_VERSION

    def __str__(self) -> str:
        return f"{frame_where(self.kind, self.epoch, self.seq)} session {self.session:#x}"


def byte_view(obj: Any, what: object) -> memoryview:
    """A flat unsigned-byte view of ``obj`` without copying it; MalformedFrame naming ``what`` if it has none."""
    try:
        view = memoryview(obj)
    except TypeError:
        raise MalformedFrame(f"{what} is a {type(obj).__name__}, not a bytes-like object") from None
    if not view.c_contiguous:
        raise MalformedFrame(f"{what} is not a C-contiguous buffer")
    if view.nbytes == 0:
        return memoryview(b"")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _check_header_rules(kind: Kind, epoch: int, count: int, flags: int, payload_len: int, where: str) -> None:
    rule = KIND_RULES[kind]
    if rule.zero_epoch and epoch:
        raise MalformedFrame(f"epoch must be 0 on {where}")
    if rule.zero_count and count:
        raise MalformedFrame(f"count must be 0 on {where}, got {count}")
    unknown = flags & ~rule.flags
    if unknown:
        raise MalformedFrame(f"unknown flags {unknown:#x} on {where}")
    if rule.empty and payload_len:
        raise MalformedFrame(f"{where} must have an empty payload, got {payload_len} bytes")


def encode_frame(frame: Frame) -> list:
    """The two parts of ``frame``: ``[header bytes, the payload object itself]``.

    The payload is hashed, never copied; send with ``send_multipart(parts,
    copy=False)``. Raises a WireError for a frame a receiver would reject.
    """
    return encode_parts(frame.kind, frame.session, frame.seq, frame.epoch, frame.count, frame.flags,
                        frame.payload, frame.version)


_HEAD = struct.Struct(HEADER.format[:-1])   # the header without its checksum (the bytes it covers)
assert _HEAD.size == _CHECKED


def encode_parts(kind: Any, session: int, seq: int, epoch: int, count: int, flags: int, payload: Any,
                 version: int) -> list:
    """encode_frame of the frame with these fields, without building a Frame (the senders' path)."""
    if type(kind) is not Kind:
        try:
            kind = Kind(kind)
        except ValueError:
            raise UnknownKind(f"cannot encode unknown kind {kind!r}") from None
    if kind is Kind.INVALID:
        raise UnknownKind(f"cannot encode kind 0 (INVALID), {_Where(kind, epoch, seq)}")
    if not (type(version) is int and type(session) is int and type(seq) is int and type(epoch) is int
            and type(count) is int and type(flags) is int and 0 <= version <= U16 and 0 < session <= U64
            and 0 <= seq <= U64 and 0 <= epoch <= U64 and 0 <= count <= U32 and 0 <= flags <= U32):
        _field_errors(kind, session, seq, epoch, count, flags, version)
    if type(payload) is bytes:
        data, size = payload, len(payload)
    else:
        data = byte_view(payload, _Where(kind, epoch, seq, "payload of "))
        size = data.nbytes
    rule = KIND_RULES[kind]
    if (rule.zero_epoch and epoch) or (rule.zero_count and count) or flags & ~rule.flags or (rule.empty and size):
        _check_header_rules(kind, epoch, count, flags, size, _Where(kind, epoch, seq))
    head = _HEAD.pack(MAGIC, version, kind, session, seq, epoch, count, flags, size,
                      xxhash.xxh3_64_intdigest(data))
    return [head + xxhash.xxh3_64_intdigest(head).to_bytes(8, "little"), payload]


def _field_errors(kind: Kind, session: Any, seq: Any, epoch: Any, count: Any, flags: Any, version: Any) -> None:
    """The MalformedFrame naming the first header field out of range, if one is (an int subclass,
    an IntFlag say, is a valid value: then nothing is raised)."""
    where = _Where(kind, epoch, seq)
    for name, value, top in (("version", version, U16), ("session", session, U64),
                             ("seq", seq, U64), ("epoch", epoch, U64),
                             ("count", count, U32), ("flags", flags, U32)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
            raise MalformedFrame(f"{name} {value!r} out of range on {where}")
    if session == 0:
        raise MalformedFrame(f"session 0 is reserved, on {where}")


def _decode_header(header: memoryview, supported: tuple, max_payload: int) -> tuple:
    """Check one frame's header (not its payload): magic, version, length, checksum, kind, rules, size.

    Returns (kind, session, seq, epoch, count, flags, payload_len, payload_sum, version).
    """
    size = header.nbytes
    if size < _PREFIX.size:
        raise TruncatedFrame(f"header is {size} bytes, expected {HEADER_SIZE}")
    magic, version = _PREFIX.unpack_from(header)
    if magic != MAGIC:
        raise BadMagic(f"bad magic {bytes(header[:4])!r}, expected b'CRNG': not a colo-ring frame")
    if version not in supported and version != HANDSHAKE_VERSION:
        raise UnsupportedVersion(f"frame version {version} not supported; supported: {sorted(supported)}")
    if size < HEADER_SIZE:
        raise TruncatedFrame(f"header is {size} bytes, expected {HEADER_SIZE}")
    if size > HEADER_SIZE:
        raise MalformedFrame(f"header is {size} bytes, expected {HEADER_SIZE}")
    (_, _, kind, session, seq, epoch, count, flags, payload_len, payload_sum,
     header_sum) = HEADER.unpack_from(header)
    where = _Where(kind, epoch, seq)
    if xxhash.xxh3_64_intdigest(header[:_CHECKED]) != header_sum:
        raise BadChecksum(f"header checksum mismatch on {where}")
    member = _KIND_OF.get(kind)
    if member is None:
        raise UnknownKind(f"unknown frame kind {kind} (seq {seq}, epoch {epoch})"
                          if kind else f"kind 0 (INVALID) is reserved, seq {seq} epoch {epoch}")
    kind = member
    if version not in supported and kind not in HANDSHAKE_KINDS:
        raise UnsupportedVersion(f"frame version {version} not supported for {where}; "
                                 f"supported: {sorted(supported)}")
    if session == 0:
        raise MalformedFrame(f"session 0 is reserved, on {where}")
    _check_header_rules(kind, epoch, count, flags, payload_len, where)
    if payload_len > max_payload:
        raise OversizedFrame(f"payload of {where} is {payload_len} bytes, limit {max_payload}")
    return kind, session, seq, epoch, count, flags, payload_len, payload_sum, version


def _with_payload(fields: tuple, payload: memoryview) -> Frame:
    """The Frame of a checked header and its payload, once the payload's length and checksum match."""
    kind, session, seq, epoch, count, flags, payload_len, payload_sum, version = fields
    if payload.nbytes < payload_len:
        raise TruncatedFrame(f"payload of {_Where(kind, epoch, seq)} is {payload.nbytes} bytes, "
                             f"header says {payload_len}")
    if payload.nbytes > payload_len:
        raise MalformedFrame(f"payload of {_Where(kind, epoch, seq)} is {payload.nbytes} bytes, "
                             f"header says {payload_len}")
    if xxhash.xxh3_64_intdigest(payload) != payload_sum:
        raise BadChecksum(f"payload checksum mismatch on {_Where(kind, epoch, seq)}")
    return Frame(kind, session, seq, epoch, count, flags, payload, version)


def decode_frame(parts: Sequence[Any], *, max_payload: int = MAX_PAYLOAD,
                 supported: Iterable[int] = SUPPORTED_VERSIONS) -> Frame:
    """Check and decode one received two-part message (one frame). Raises only WireError subclasses.

    Order of checks: part count, magic, version, header length, header
    checksum, kind, header rules, payload size, payload checksum. The payload
    of the returned Frame is a memoryview over the received part (no copy).
    """
    try:
        n = len(parts)
    except TypeError:
        raise MalformedFrame(f"a frame is a sequence of 2 parts, got a {type(parts).__name__}") from None
    if n < 2:
        raise TruncatedFrame(f"frame has {n} part(s), expected 2 (header, payload)")
    if n > 2:
        raise MalformedFrame(f"frame has {n} parts, expected 2 (header, payload)")
    header = byte_view(parts[0], "header part")
    payload = byte_view(parts[1], "payload part")
    return _with_payload(_decode_header(header, tuple(supported), max_payload), payload)


# --- messages: several frames in one ZeroMQ message (version 2) -----------------------------


INLINE_PAYLOAD = 64 << 10           # larger payloads travel as parts of their own, without a copy


def join_frames(frames: Iterable[Sequence[Any]], inline_limit: int = INLINE_PAYLOAD) -> list:
    """The parts of one message carrying `frames` (each the ``[header, payload]`` of encode_frame).

    Headers and payloads below `inline_limit` bytes are joined into one part; a larger
    payload ends the part after its header and becomes the next part itself (not copied).
    A frame with an empty payload that would end the message is given an empty part, so
    that a header ends its part only when the next part is its payload.
    """
    parts: list = []
    joined: list = []
    frames = list(frames)
    for index, (header, payload) in enumerate(frames):
        size = memoryview(payload).nbytes
        joined.append(header)
        if size >= inline_limit or (size == 0 and index == len(frames) - 1):
            parts.append(b"".join(joined))
            parts.append(payload)
            joined = []
        elif size:
            joined.append(payload)
    if joined:
        parts.append(b"".join(joined))
    return parts


def decode_one(parts: Sequence[Any], *, max_payload: int = MAX_PAYLOAD,
               supported: Iterable[int] = SUPPORTED_VERSIONS) -> Frame:
    """The one frame of a received message (a replica's answer): two parts (header, payload) or
    one part holding both; more than one frame is MalformedFrame."""
    frames = decode_message(parts, max_payload=max_payload, supported=supported)
    frame = next(frames)
    for extra in frames:
        raise MalformedFrame(f"a message of one frame was expected, it holds more "
                             f"(the second: {_Where(extra.kind, extra.epoch, extra.seq)})")
    return frame


def decode_message(parts: Sequence[Any], *, max_payload: int = MAX_PAYLOAD,
                   supported: Iterable[int] = SUPPORTED_VERSIONS) -> Iterator[Frame]:
    """The frames of one received message, in order, each checked as decode_frame checks it.

    A generator: the frames before a bad one are yielded first, then its WireError is raised
    (nothing after it is read). The layout (spec: "A message"): each part holds whole frames
    back to back, a 64-byte header and then its payload; a header that ends its part has the
    whole next part as its payload. A two-part frame of version 1 is a message of one frame.
    """
    try:
        n = len(parts)
    except TypeError:
        raise MalformedFrame(f"a message is a sequence of parts, got a {type(parts).__name__}") from None
    if n == 0:
        raise TruncatedFrame("empty message: no part, no frame")
    supported = tuple(supported)
    index = 0
    while index < n:
        part = byte_view(parts[index], f"message part {index}")
        size = part.nbytes
        if size == 0:
            raise MalformedFrame(f"message part {index} is empty where a frame header was expected")
        at = 0
        while at < size:
            fields = _decode_header(part[at:at + HEADER_SIZE], supported, max_payload)
            at += HEADER_SIZE
            payload_len = fields[6]
            if at == size:                       # the header ends its part: the next part is its payload
                if index + 1 >= n:
                    raise TruncatedFrame(f"payload part of {_Where(fields[0], fields[3], fields[2])} "
                                         f"is missing (message of {n} part(s))")
                index += 1
                yield _with_payload(fields, byte_view(parts[index], f"message part {index}"))
                break
            if size - at < payload_len:
                raise TruncatedFrame(f"payload of {_Where(fields[0], fields[3], fields[2])} is "
                                     f"{size - at} bytes in its part, header says {payload_len}")
            yield _with_payload(fields, part[at:at + payload_len])
            at += payload_len
        index += 1
