"""The colo-ring wire format, version 1: frames between a primary and a replica.

This docstring is the spec. Code that disagrees with it is the bug.

A session
=========

One primary run is one *session*: a random non-zero u64 chosen when the
primary starts, stamped on every frame either side sends, so frames of an old
primary (one that restarted, or a stale socket) are recognised and refused.
Each direction numbers its own frames: ``seq`` starts at 0 with the sender's
first frame and grows by exactly 1 per frame it sends::

    primary                                                        replica
       | HELLO(versions, session, slots, vcpus, page size)  seq 0 ---->|
       |<---- WELCOME(chosen version, last committed epoch)  seq 0     |
       |        (or REFUSE(reason, detail); the primary stops)         |
       |                                                               |
       | EPOCH_BEGIN(epoch 0, sync, pages P, batches B)    ----------->|  initial full sync
       | PAGES(epoch 0, count n) x B                        ---------->|  staged, not applied
       | VCPU_STATE(epoch 0, count = vCPUs)                 ---------->|  staged
       | DEVICE_STATE(epoch 0)                              ---------->|  staged
       | EPOCH_END(epoch 0, digest, totals)                 ---------->|  verify, commit whole
       |<---- ACK(epoch 0)                                             |
       |                                                               |
       | EPOCH_BEGIN(1, reason) PAGES... VCPU_STATE DEVICE_STATE       |
       | EPOCH_END(1)                                       ---------->|
       |<---- ACK(1)                   (outputs of epochs <= 1 leave)  |
       |  ... epoch N ...                                              |
       | HEARTBEAT(latest epoch)  <--------------------------------->  |  both ways, when idle
       | BYE(latest epoch)                                  ---------->|  orderly stop: no failover

Whether epoch N+1 may start before ACK(N) arrives is the protocol's business
(checkpointer/protocol.py); the wire only fixes the frames and their order
inside one epoch: EPOCH_BEGIN, then PAGES batches, VCPU_STATE, DEVICE_STATE
(in that order, each of the last two at most once), then EPOCH_END.

A frame
=======

A frame is a ZeroMQ multipart message of exactly two parts: ``[header,
payload]``. The header is 64 bytes, little-endian (``HEADER``)::

    offset size field             meaning
    ------ ---- ----------------- ---------------------------------------------
         0    4 magic             b"CRNG" (0x474e5243 as a little-endian u32)
         4    2 version           protocol version of this header and payload
         6    2 kind              a Kind; 0 is reserved and always invalid
         8    8 session           the primary's session id (never 0)
        16    8 seq               per-session, per-direction frame counter
        24    8 epoch             epoch the frame belongs to (see kinds)
        32    4 count             item count (see kinds)
        36    4 flags             per kind (see kinds); unknown bits rejected
        40    8 payload_len       exact length of the payload part in bytes
        48    8 payload_checksum  xxh3_64 of the payload part
        56    8 header_checksum   xxh3_64 of header bytes 0..55
    ------ ---- ----------------- ---------------------------------------------

The payload part travels as given (bytes, memoryview, a numpy buffer), so
``socket.send_multipart(encode_frame(f), copy=False)`` sends a page batch
without copying it; ``encode_frame`` only hashes it. ``decode_frame`` returns
the payload as a memoryview over the received part, again without a copy.

Kinds
=====

======  ============  =========  ================  ==========  =====================================
value   kind          direction  epoch field       count       payload
======  ============  =========  ================  ==========  =====================================
0       INVALID       -          -                 -           never valid on the wire
1       HELLO         P -> R     0                 0           JSON ``Hello``
2       WELCOME       R -> P     0                 0           JSON ``Welcome``
3       EPOCH_BEGIN   P -> R     the epoch         pages       JSON ``EpochBegin``; flags: SYNC
4       PAGES         P -> R     the epoch         pages       opaque page batch (checkpointer/codec.py);
                                                               flags belong to that codec
5       VCPU_STATE    P -> R     the epoch         vCPUs       ``pack_vcpu_states`` binary
6       DEVICE_STATE  P -> R     the epoch         0           opaque device state
7       EPOCH_END     P -> R     the epoch         batches     JSON ``EpochEnd``
8       ACK           R -> P     epoch committed   0           JSON ``Ack``
9       HEARTBEAT     both       latest epoch (1)  0           empty
10      REFUSE        R -> P     0                 0           JSON ``Refuse``
11      BYE           both       latest epoch (1)  0           empty
======  ============  =========  ================  ==========  =====================================

(1) the primary's latest epoch begun; the replica's latest epoch committed.
Fields marked 0 must be 0, flags must be 0 unless a kind defines bits, and
HEARTBEAT and BYE carry no payload: a receiver rejects anything else.

Rules
=====

- Checksums: every frame carries xxh3_64 of its header and of its payload; a
  mismatch is ``BadChecksum``. (They catch corruption and truncation, not an
  attacker: authenticate the transport, e.g. ZeroMQ CURVE.)
- Size: a receiver refuses a ``payload_len`` above its ``max_payload``
  (``OversizedFrame``) before reading or hashing the payload.
- Versions: the HELLO lists every version the primary speaks; the replica
  answers WELCOME with the highest common one (``negotiate_version``) or
  REFUSE("no_common_version"). HELLO, WELCOME and REFUSE are always sent with
  header version ``HANDSHAKE_VERSION`` (1), whose 64-byte header is frozen, so
  any two implementations can at least negotiate; every later frame uses the
  negotiated version. Decoders check magic, then version, then everything
  else, so the first 6 bytes stay meaningful across versions.
- Session and order (``FrameGuard``): the replica adopts the session of the
  first HELLO; a HELLO with a new session (the primary restarted) starts
  over and retires the old session for good. A frame of another session is
  ``WrongSession``; a seq at or below the last one accepted is
  ``ReplayedFrame``; a seq that skips one is ``OutOfOrderFrame``.
- Bad frames: a receiver rejects a frame it cannot decode or check with a
  typed ``WireError`` and never applies any of it. The replica stages an
  epoch's frames and commits nothing until EPOCH_END arrives and its digest
  (``checkpointer.codec.EpochDigest``, over the decoded content) and totals match; an epoch with any bad, missing, replayed
  or reordered frame is discarded whole, so the standby stays at its last
  complete epoch.
"""

from __future__ import annotations

import enum
import json
import re
import secrets
import struct
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import xxhash

from ring.machine import VcpuState

__all__ = [
    "MAGIC", "PROTOCOL_VERSION", "HANDSHAKE_VERSION", "SUPPORTED_VERSIONS", "HEADER", "HEADER_SIZE",
    "MAX_PAYLOAD", "Kind", "Flag", "PRIMARY_KINDS", "REPLICA_KINDS", "HANDSHAKE_KINDS", "Message", "Frame", "encode_frame", "decode_frame", "FrameGuard", "FrameWriter",
    "negotiate_version", "SlotLayout", "Hello", "Welcome", "EpochBegin", "EpochEnd", "Ack", "Refuse",
    "EPOCH_REASONS", "REFUSE_REASONS", "pack_message", "decode_payload", "pack_vcpu_states",
    "unpack_vcpu_states", "WireError", "TruncatedFrame", "MalformedFrame", "BadMagic",
    "UnsupportedVersion", "BadChecksum", "UnknownKind", "UnexpectedKind", "OversizedFrame",
    "MalformedPayload", "ReplayedFrame", "OutOfOrderFrame", "WrongSession",
]

MAGIC = int.from_bytes(b"CRNG", "little")
PROTOCOL_VERSION = 1
HANDSHAKE_VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)

#: magic, version, kind, session, seq, epoch, count, flags, payload_len, payload_checksum, header_checksum
HEADER = struct.Struct("<IHHQQQIIQQQ")
HEADER_SIZE = HEADER.size
_CHECKED = HEADER_SIZE - 8          # header bytes covered by header_checksum
_PREFIX = struct.Struct("<IH")      # magic and version: stable across versions
assert HEADER_SIZE == 64

MAX_PAYLOAD = 64 << 20              # default receiver limit on payload_len
MAX_CONTROL_PAYLOAD = 1 << 20       # JSON control payloads are small
MAX_VCPUS = 4096                    # KVM_MAX_VCPUS on x86-64 is 4096
MAX_VCPU_FIELD = 1 << 20            # any single vCPU state blob (xsave is a few KiB)
MAX_MSRS = 4096
MAX_SLOTS = 32768                   # KVM_MEM_SLOTS_NUM on x86-64
MAX_TEXT = 1024

_U16, _U32, _U64 = (1 << 16) - 1, (1 << 32) - 1, (1 << 64) - 1


# --- errors -------------------------------------------------------------------


class WireError(ValueError):
    """A frame or payload the wire format does not accept. Nothing of it may be applied.

    ``reason`` is the REFUSE reason code a replica answers with when the frame
    ends the session.
    """

    reason = "bad_frame"


class TruncatedFrame(WireError):
    """A part is missing, the header is short, or the payload is shorter than declared."""


class MalformedFrame(WireError):
    """The frame's shape is wrong: extra parts, a long header, a non-buffer part, bad header fields."""


class BadMagic(WireError):
    """The header does not start with b"CRNG": not a colo-ring frame."""


class UnsupportedVersion(WireError):
    """A version this side does not speak, or no version in common with the peer."""

    reason = "no_common_version"


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

    reason = "wrong_session"


# --- kinds and frames ---------------------------------------------------------------


class Kind(enum.IntEnum):
    """Frame kinds; see the kinds table in the module docstring."""

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

    SYNC = 1        # EPOCH_BEGIN: this epoch is a full sync (the initial one)


#: Kinds each side sends. A replica accepts PRIMARY_KINDS, a primary REPLICA_KINDS.
PRIMARY_KINDS = frozenset({Kind.HELLO, Kind.EPOCH_BEGIN, Kind.PAGES, Kind.VCPU_STATE, Kind.DEVICE_STATE,
                           Kind.EPOCH_END, Kind.HEARTBEAT, Kind.BYE})
REPLICA_KINDS = frozenset({Kind.WELCOME, Kind.ACK, Kind.HEARTBEAT, Kind.REFUSE, Kind.BYE})
HANDSHAKE_KINDS = frozenset({Kind.HELLO, Kind.WELCOME, Kind.REFUSE})
_KIND_VALUES = frozenset(int(k) for k in Kind)

_ZERO_EPOCH = frozenset({Kind.HELLO, Kind.WELCOME, Kind.REFUSE})
_ZERO_COUNT = frozenset({Kind.HELLO, Kind.WELCOME, Kind.DEVICE_STATE, Kind.ACK, Kind.HEARTBEAT,
                         Kind.REFUSE, Kind.BYE})
_EMPTY_PAYLOAD = frozenset({Kind.HEARTBEAT, Kind.BYE})
_ALLOWED_FLAGS = {Kind.EPOCH_BEGIN: int(Flag.SYNC), Kind.PAGES: _U32}


def _kind_name(kind: int) -> str:
    try:
        return Kind(kind).name
    except ValueError:
        return f"kind {kind}"


def _where(kind: int, epoch: int, seq: int) -> str:
    return f"{_kind_name(kind)} epoch {epoch} seq {seq}"


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
        return f"{_where(self.kind, self.epoch, self.seq)} session {self.session:#x}"


def _byte_view(obj: Any, what: str) -> memoryview:
    """A flat unsigned-byte view of ``obj`` without copying it."""
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
    if kind in _ZERO_EPOCH and epoch:
        raise MalformedFrame(f"epoch must be 0 on {where}")
    if kind in _ZERO_COUNT and count:
        raise MalformedFrame(f"count must be 0 on {where}, got {count}")
    unknown = flags & ~_ALLOWED_FLAGS.get(kind, 0)
    if unknown:
        raise MalformedFrame(f"unknown flags {unknown:#x} on {where}")
    if kind in _EMPTY_PAYLOAD and payload_len:
        raise MalformedFrame(f"{where} must have an empty payload, got {payload_len} bytes")


def encode_frame(frame: Frame) -> list:
    """The two parts of ``frame``: ``[header bytes, the payload object itself]``.

    The payload is hashed, never copied; send with ``send_multipart(parts,
    copy=False)``. Raises a WireError for a frame a receiver would reject.
    """
    try:
        kind = Kind(frame.kind)
    except ValueError:
        raise UnknownKind(f"cannot encode unknown kind {frame.kind!r}") from None
    where = _where(kind, frame.epoch, frame.seq)
    if kind is Kind.INVALID:
        raise UnknownKind(f"cannot encode kind 0 (INVALID), {where}")
    for name, value, top in (("version", frame.version, _U16), ("session", frame.session, _U64),
                             ("seq", frame.seq, _U64), ("epoch", frame.epoch, _U64),
                             ("count", frame.count, _U32), ("flags", frame.flags, _U32)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
            raise MalformedFrame(f"{name} {value!r} out of range on {where}")
    if frame.session == 0:
        raise MalformedFrame(f"session 0 is reserved, on {where}")
    view = _byte_view(frame.payload, f"payload of {where}")
    _check_header_rules(kind, frame.epoch, frame.count, frame.flags, view.nbytes, where)
    head = HEADER.pack(MAGIC, frame.version, kind, frame.session, frame.seq, frame.epoch, frame.count,
                       frame.flags, view.nbytes, xxhash.xxh3_64_intdigest(view), 0)[:_CHECKED]
    return [head + xxhash.xxh3_64_intdigest(head).to_bytes(8, "little"), frame.payload]


def decode_frame(parts: Sequence[Any], *, max_payload: int = MAX_PAYLOAD,
                 supported: Iterable[int] = SUPPORTED_VERSIONS) -> Frame:
    """Check and decode one received multipart message. Raises only WireError subclasses.

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
    header = _byte_view(parts[0], "header part")
    payload = _byte_view(parts[1], "payload part")
    size = header.nbytes
    if size < _PREFIX.size:
        raise TruncatedFrame(f"header is {size} bytes, expected {HEADER_SIZE}")
    magic, version = _PREFIX.unpack_from(header)
    if magic != MAGIC:
        raise BadMagic(f"bad magic {bytes(header[:4])!r}, expected b'CRNG': not a colo-ring frame")
    supported = tuple(supported)
    if version not in supported and version != HANDSHAKE_VERSION:
        raise UnsupportedVersion(f"frame version {version} not supported; supported: {sorted(supported)}")
    if size < HEADER_SIZE:
        raise TruncatedFrame(f"header is {size} bytes, expected {HEADER_SIZE}")
    if size > HEADER_SIZE:
        raise MalformedFrame(f"header is {size} bytes, expected {HEADER_SIZE}")
    (_, _, kind, session, seq, epoch, count, flags, payload_len, payload_sum,
     header_sum) = HEADER.unpack_from(header)
    where = _where(kind, epoch, seq)
    if xxhash.xxh3_64_intdigest(header[:_CHECKED]) != header_sum:
        raise BadChecksum(f"header checksum mismatch on {where}")
    if kind not in _KIND_VALUES or kind == Kind.INVALID:
        raise UnknownKind(f"unknown frame kind {kind} (seq {seq}, epoch {epoch})"
                          if kind else f"kind 0 (INVALID) is reserved, seq {seq} epoch {epoch}")
    kind = Kind(kind)
    if version not in supported and kind not in HANDSHAKE_KINDS:
        raise UnsupportedVersion(f"frame version {version} not supported for {where}; "
                                 f"supported: {sorted(supported)}")
    if session == 0:
        raise MalformedFrame(f"session 0 is reserved, on {where}")
    _check_header_rules(kind, epoch, count, flags, payload_len, where)
    if payload_len > max_payload:
        raise OversizedFrame(f"payload of {where} is {payload_len} bytes, limit {max_payload}")
    if payload.nbytes < payload_len:
        raise TruncatedFrame(f"payload of {where} is {payload.nbytes} bytes, header says {payload_len}")
    if payload.nbytes > payload_len:
        raise MalformedFrame(f"payload of {where} is {payload.nbytes} bytes, header says {payload_len}")
    if xxhash.xxh3_64_intdigest(payload) != payload_sum:
        raise BadChecksum(f"payload checksum mismatch on {where}")
    return Frame(kind, session, seq, epoch, count, flags, payload, version)


# --- session and order ----------------------------------------------------------------


class FrameGuard:
    """Receiver-side session and sequence check over decoded frames. Pure logic, no I/O.

    A replica builds ``FrameGuard(accept=PRIMARY_KINDS)``: its first frame
    must be a HELLO with seq 0, whose session it adopts. A later HELLO with a
    *new* session (the primary restarted) resets the guard to that session
    (again from seq 0) and retires the old session: frames of a retired
    session are refused for good, so a stale primary cannot come back. The
    caller must also discard whatever it staged for the old session.

    A primary builds ``FrameGuard(session=its own, accept=REPLICA_KINDS)``:
    the session is pinned and HELLO never resets it.

    ``check`` raises before changing anything, so a rejected frame leaves the
    guard as it was.
    """

    RETIRED_LIMIT = 1024

    def __init__(self, session: int | None = None, accept: Iterable[Kind] | None = None) -> None:
        self.pinned = session is not None
        self.session = session
        self.last_seq: int | None = None
        self.accept = frozenset(accept) if accept is not None else None
        self._retired: dict[int, None] = {}

    @property
    def next_seq(self) -> int:
        return 0 if self.last_seq is None else self.last_seq + 1

    def check(self, frame: Frame) -> bool:
        """Accept ``frame`` or raise. Returns True when it started a new session."""
        where = f"{_where(frame.kind, frame.epoch, frame.seq)} session {frame.session:#x}"
        if self.accept is not None and frame.kind not in self.accept:
            raise UnexpectedKind(f"{where}: this side does not accept {_kind_name(frame.kind)} frames")
        if frame.session in self._retired:
            raise WrongSession(f"{where}: session is retired (its primary restarted)")
        new = frame.session != self.session
        if new and (self.pinned or frame.kind != Kind.HELLO):
            expected = "a HELLO" if self.session is None else f"session {self.session:#x}"
            raise WrongSession(f"{where}: expected {expected}")
        if new:
            if frame.seq != 0:
                raise OutOfOrderFrame(f"{where}: a new session must start at seq 0")
            if self.session is not None:
                self._retire(self.session)
            self.session, self.last_seq = frame.session, 0
            return True
        expected = self.next_seq
        if frame.seq < expected:
            raise ReplayedFrame(f"{where}: replayed, last accepted seq is {self.last_seq}")
        if frame.seq > expected:
            raise OutOfOrderFrame(f"{where}: expected seq {expected}, {frame.seq - expected} frame(s) missing")
        self.last_seq = frame.seq
        return False

    def _retire(self, session: int) -> None:
        self._retired[session] = None
        while len(self._retired) > self.RETIRED_LIMIT:
            del self._retired[next(iter(self._retired))]


class FrameWriter:
    """Sender side: one session, one version, and the next seq of this direction."""

    def __init__(self, session: int | None = None, version: int = PROTOCOL_VERSION) -> None:
        while session is None or session == 0:
            session = secrets.randbits(64)
        if not 0 < session <= _U64:
            raise MalformedFrame(f"session {session!r} out of range")
        self.session = session
        self.version = version
        self.next_seq = 0

    def frame(self, kind: Kind, epoch: int = 0, count: int = 0, payload: Any = b"", flags: int = 0) -> list:
        """The parts of the next frame. The seq advances only when encoding succeeds."""
        version = HANDSHAKE_VERSION if kind in HANDSHAKE_KINDS else self.version
        parts = encode_frame(Frame(kind, self.session, self.next_seq, epoch, count, flags, payload, version))
        self.next_seq += 1
        return parts

    def message(self, msg: "Message") -> list:
        """The parts of a control message (Hello, Welcome, EpochBegin, EpochEnd, Ack, Refuse)."""
        kind, epoch, count, flags, payload = pack_message(msg)
        return self.frame(kind, epoch, count, payload, flags)


def negotiate_version(offered: Iterable[int], supported: Iterable[int] = SUPPORTED_VERSIONS) -> int:
    """The highest version in both lists, or UnsupportedVersion naming both."""
    offered, supported = sorted(set(offered)), sorted(set(supported))
    common = set(offered) & set(supported)
    if not common:
        raise UnsupportedVersion(f"no common protocol version: peer offers {offered}, we support {supported}")
    return max(common)


# --- control payloads -------------------------------------------------------------------

EPOCH_REASONS = ("ring_full", "dirty_threshold", "interval", "output", "sync")
REFUSE_REASONS = ("no_common_version", "bad_key", "layout_mismatch", "wrong_session", "bad_frame", "busy")
_HEX_DIGEST = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class SlotLayout:
    """One guest memory slot, as the replica must reproduce it."""

    slot: int
    guest_phys_addr: int
    size: int


@dataclass(frozen=True)
class Hello:
    versions: tuple[int, ...]
    session: int
    slots: tuple[SlotLayout, ...]
    vcpus: int
    page_size: int = 4096
    agent: str = ""


@dataclass(frozen=True)
class Welcome:
    version: int
    last_epoch: int | None = None        # the replica's last committed epoch, None if it has none


@dataclass(frozen=True)
class EpochBegin:
    epoch: int
    reason: str
    pages: int
    batches: int
    sync: bool = False


@dataclass(frozen=True)
class EpochEnd:
    epoch: int
    digest: bytes                        # codec.EpochDigest of the epoch's decoded content
    pages: int
    batches: int
    raw_bytes: int


@dataclass(frozen=True)
class Ack:
    epoch: int
    apply_ns: int = 0                    # how long the replica took to commit the epoch


@dataclass(frozen=True)
class Refuse:
    reason: str
    detail: str = ""


Message = Hello | Welcome | EpochBegin | EpochEnd | Ack | Refuse


def _dump(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


def _no_duplicates(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise MalformedPayload(f"duplicate key in {sorted(k for k, _ in pairs)}")
    return out


def _reject_constant(name: str) -> None:
    raise MalformedPayload(f"{name} is not valid JSON here")


def _load(data: Any, what: str, keys: set[str], optional: frozenset[str] = frozenset()) -> dict:
    view = _byte_view(data, f"{what} payload")
    if view.nbytes > MAX_CONTROL_PAYLOAD:
        raise MalformedPayload(f"{what} payload is {view.nbytes} bytes, limit {MAX_CONTROL_PAYLOAD}")
    try:
        obj = json.loads(bytes(view).decode("utf-8"), object_pairs_hook=_no_duplicates,
                         parse_constant=_reject_constant)
    except MalformedPayload as err:
        raise MalformedPayload(f"{what} payload: {err}") from None
    except (ValueError, RecursionError) as err:
        raise MalformedPayload(f"{what} payload is not JSON: {err}") from None
    if not isinstance(obj, dict):
        raise MalformedPayload(f"{what} payload must be a JSON object, got {type(obj).__name__}")
    missing = keys - optional - obj.keys()
    unknown = obj.keys() - keys
    if missing:
        raise MalformedPayload(f"{what} payload lacks {sorted(missing)}")
    if unknown:
        raise MalformedPayload(f"{what} payload has unknown keys {sorted(unknown)}")
    return obj


def _int(obj: dict, key: str, what: str, lo: int = 0, hi: int = _U64) -> int:
    value = obj[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise MalformedPayload(f"{what} {key} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise MalformedPayload(f"{what} {key} {value} out of range [{lo}, {hi}]")
    return value


def _str(obj: dict, key: str, what: str, choices: Sequence[str] | None = None) -> str:
    value = obj[key]
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise MalformedPayload(f"{what} {key} must be a string of at most {MAX_TEXT} characters")
    if choices is not None and value not in choices:
        raise MalformedPayload(f"{what} {key} {value!r} is not one of {list(choices)}")
    return value


def _bool(obj: dict, key: str, what: str) -> bool:
    value = obj[key]
    if not isinstance(value, bool):
        raise MalformedPayload(f"{what} {key} must be true or false, got {type(value).__name__}")
    return value


def _list(obj: dict, key: str, what: str, limit: int) -> list:
    value = obj[key]
    if not isinstance(value, list) or not 0 < len(value) <= limit:
        raise MalformedPayload(f"{what} {key} must be a list of 1 to {limit} items")
    return value


def _validate_hello(h: Hello) -> Hello:
    w = "HELLO"
    if not h.versions or len(set(h.versions)) != len(h.versions):
        raise MalformedPayload(f"{w} versions must be a non-empty list without duplicates, got {list(h.versions)}")
    if not 0 < h.session <= _U64:
        raise MalformedPayload(f"{w} session must be a non-zero u64")
    if h.page_size < 4096 or h.page_size & (h.page_size - 1):
        raise MalformedPayload(f"{w} page_size {h.page_size} is not a power of two >= 4096")
    if not 0 < h.vcpus <= MAX_VCPUS:
        raise MalformedPayload(f"{w} vcpus {h.vcpus} out of range [1, {MAX_VCPUS}]")
    end = -1
    ids = set()
    for s in sorted(h.slots, key=lambda s: s.guest_phys_addr):
        if s.slot in ids:
            raise MalformedPayload(f"{w} slot {s.slot} listed twice")
        ids.add(s.slot)
        if s.size <= 0 or s.size % h.page_size or s.guest_phys_addr % h.page_size:
            raise MalformedPayload(f"{w} slot {s.slot} (gpa {s.guest_phys_addr:#x}, size {s.size:#x}) is "
                                   f"empty or not aligned to page_size {h.page_size}")
        if s.guest_phys_addr <= end:
            raise MalformedPayload(f"{w} slot {s.slot} at {s.guest_phys_addr:#x} overlaps another slot")
        end = s.guest_phys_addr + s.size - 1
    return h


def pack_message(msg: Message) -> tuple[Kind, int, int, int, bytes]:
    """(kind, epoch, count, flags, payload) of a control message, header fields consistent with it."""
    if isinstance(msg, Hello):
        _validate_hello(msg)
        slots = [{"slot": s.slot, "guest_phys_addr": s.guest_phys_addr, "size": s.size} for s in msg.slots]
        body = {"versions": list(msg.versions), "session": msg.session, "slots": slots, "vcpus": msg.vcpus,
                "page_size": msg.page_size, "agent": msg.agent}
        return Kind.HELLO, 0, 0, 0, _dump(body)
    if isinstance(msg, Welcome):
        return Kind.WELCOME, 0, 0, 0, _dump({"version": msg.version, "last_epoch": msg.last_epoch})
    if isinstance(msg, EpochBegin):
        if msg.reason not in EPOCH_REASONS:
            raise MalformedPayload(f"EPOCH_BEGIN reason {msg.reason!r} is not one of {list(EPOCH_REASONS)}")
        body = {"epoch": msg.epoch, "reason": msg.reason, "pages": msg.pages, "batches": msg.batches,
                "sync": bool(msg.sync)}
        return Kind.EPOCH_BEGIN, msg.epoch, msg.pages, int(Flag.SYNC) if msg.sync else 0, _dump(body)
    if isinstance(msg, EpochEnd):
        if len(msg.digest) != 16:
            raise MalformedPayload(f"EPOCH_END digest must be 16 bytes, got {len(msg.digest)}")
        body = {"epoch": msg.epoch, "digest": bytes(msg.digest).hex(), "pages": msg.pages,
                "batches": msg.batches, "raw_bytes": msg.raw_bytes}
        return Kind.EPOCH_END, msg.epoch, msg.batches, 0, _dump(body)
    if isinstance(msg, Ack):
        return Kind.ACK, msg.epoch, 0, 0, _dump({"apply_ns": msg.apply_ns})
    if isinstance(msg, Refuse):
        if msg.reason not in REFUSE_REASONS:
            raise MalformedPayload(f"REFUSE reason {msg.reason!r} is not one of {list(REFUSE_REASONS)}")
        return Kind.REFUSE, 0, 0, 0, _dump({"reason": msg.reason, "detail": msg.detail[:MAX_TEXT]})
    raise TypeError(f"not a control message: {type(msg).__name__}")


def _unpack_hello(frame: Frame) -> Hello:
    w = "HELLO"
    obj = _load(frame.payload, w, {"versions", "session", "slots", "vcpus", "page_size", "agent"})
    versions = _list(obj, "versions", w, 64)
    for v in versions:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= _U16:
            raise MalformedPayload(f"{w} versions must be integers in [1, {_U16}], got {v!r}")
    slots = []
    for item in _list(obj, "slots", w, MAX_SLOTS):
        if not isinstance(item, dict) or item.keys() != {"slot", "guest_phys_addr", "size"}:
            raise MalformedPayload(f"{w} slots must be objects with slot, guest_phys_addr and size")
        slots.append(SlotLayout(_int(item, "slot", w, hi=_U32), _int(item, "guest_phys_addr", w),
                                _int(item, "size", w)))
    hello = Hello(tuple(versions), _int(obj, "session", w), tuple(slots), _int(obj, "vcpus", w, hi=_U32),
                  _int(obj, "page_size", w, hi=_U32), _str(obj, "agent", w))
    _validate_hello(hello)
    if hello.session != frame.session:
        raise MalformedPayload(f"HELLO payload session {hello.session:#x} differs from its header's "
                               f"{frame.session:#x}")
    return hello


def _unpack_welcome(frame: Frame) -> Welcome:
    obj = _load(frame.payload, "WELCOME", {"version", "last_epoch"})
    last = None if obj["last_epoch"] is None else _int(obj, "last_epoch", "WELCOME")
    return Welcome(_int(obj, "version", "WELCOME", lo=1, hi=_U16), last)


def _check_epoch(what: str, payload_epoch: int, frame: Frame) -> None:
    if payload_epoch != frame.epoch:
        raise MalformedPayload(f"{what} payload epoch {payload_epoch} differs from header epoch {frame.epoch} "
                               f"(seq {frame.seq})")


def _unpack_epoch_begin(frame: Frame) -> EpochBegin:
    w = "EPOCH_BEGIN"
    obj = _load(frame.payload, w, {"epoch", "reason", "pages", "batches", "sync"})
    msg = EpochBegin(_int(obj, "epoch", w), _str(obj, "reason", w, EPOCH_REASONS), _int(obj, "pages", w, hi=_U32),
                     _int(obj, "batches", w, hi=_U32), _bool(obj, "sync", w))
    _check_epoch(w, msg.epoch, frame)
    if msg.pages != frame.count:
        raise MalformedPayload(f"{w} epoch {msg.epoch}: payload pages {msg.pages} differ from header count "
                               f"{frame.count}")
    if msg.sync != bool(frame.flags & Flag.SYNC):
        raise MalformedPayload(f"{w} epoch {msg.epoch}: payload sync {msg.sync} disagrees with the SYNC flag")
    return msg


def _unpack_epoch_end(frame: Frame) -> EpochEnd:
    w = "EPOCH_END"
    obj = _load(frame.payload, w, {"epoch", "digest", "pages", "batches", "raw_bytes"})
    digest = _str(obj, "digest", w)
    if not _HEX_DIGEST.fullmatch(digest):
        raise MalformedPayload(f"{w} digest must be 32 lowercase hex digits, got {digest[:40]!r}")
    msg = EpochEnd(_int(obj, "epoch", w), bytes.fromhex(digest), _int(obj, "pages", w),
                   _int(obj, "batches", w, hi=_U32), _int(obj, "raw_bytes", w))
    _check_epoch(w, msg.epoch, frame)
    if msg.batches != frame.count:
        raise MalformedPayload(f"{w} epoch {msg.epoch}: payload batches {msg.batches} differ from header count "
                               f"{frame.count}")
    return msg


def _unpack_ack(frame: Frame) -> Ack:
    return Ack(frame.epoch, _int(_load(frame.payload, "ACK", {"apply_ns"}), "apply_ns", "ACK"))


def _unpack_refuse(frame: Frame) -> Refuse:
    obj = _load(frame.payload, "REFUSE", {"reason", "detail"})
    return Refuse(_str(obj, "reason", "REFUSE", REFUSE_REASONS), _str(obj, "detail", "REFUSE"))


def _unpack_vcpus(frame: Frame) -> list[VcpuState]:
    states = unpack_vcpu_states(frame.payload)
    if len(states) != frame.count:
        raise MalformedPayload(f"VCPU_STATE epoch {frame.epoch}: {len(states)} states, header count {frame.count}")
    return states


_PAYLOAD_DECODERS = {
    Kind.HELLO: _unpack_hello, Kind.WELCOME: _unpack_welcome, Kind.EPOCH_BEGIN: _unpack_epoch_begin,
    Kind.EPOCH_END: _unpack_epoch_end, Kind.ACK: _unpack_ack, Kind.REFUSE: _unpack_refuse,
    Kind.VCPU_STATE: _unpack_vcpus,
}


def decode_payload(frame: Frame) -> Any:
    """The payload of a decoded frame, parsed and checked against its header.

    HELLO -> Hello, WELCOME -> Welcome, EPOCH_BEGIN -> EpochBegin, EPOCH_END ->
    EpochEnd, ACK -> Ack, REFUSE -> Refuse, VCPU_STATE -> list[VcpuState],
    PAGES and DEVICE_STATE -> the payload unchanged (opaque here), HEARTBEAT and
    BYE -> None. Raises only WireError subclasses (MalformedPayload).
    """
    decoder = _PAYLOAD_DECODERS.get(frame.kind)
    if decoder is not None:
        return decoder(frame)
    if frame.kind in (Kind.PAGES, Kind.DEVICE_STATE):
        return frame.payload
    if frame.kind in _EMPTY_PAYLOAD:
        return None
    raise UnknownKind(f"no payload decoder for {_kind_name(frame.kind)}")


# --- vCPU state -----------------------------------------------------------------------------
#
#   u32 count
#   count x:  u32 index
#             8 x (u32 length, bytes)   regs sregs fpu xsave xcrs events debugregs cpuid
#             u32 nmsrs, nmsrs x (u32 msr index, u64 value), in increasing msr index

_VCPU_BLOBS = ("regs", "sregs", "fpu", "xsave", "xcrs", "events", "debugregs", "cpuid")
_U32S = struct.Struct("<I")
_MSR = struct.Struct("<IQ")


def pack_vcpu_states(states: Sequence[VcpuState]) -> bytes:
    """The VCPU_STATE payload of ``states`` (deterministic: MSRs sorted by index)."""
    if len(states) > MAX_VCPUS:
        raise MalformedPayload(f"{len(states)} vCPU states, limit {MAX_VCPUS}")
    out = [_U32S.pack(len(states))]
    seen = set()
    for st in states:
        if not 0 <= st.index <= _U32 or st.index in seen:
            raise MalformedPayload(f"vCPU index {st.index} is out of range or repeated")
        seen.add(st.index)
        out.append(_U32S.pack(st.index))
        for name in _VCPU_BLOBS:
            blob = bytes(getattr(st, name))
            if len(blob) > MAX_VCPU_FIELD:
                raise MalformedPayload(f"vCPU {st.index} {name} is {len(blob)} bytes, limit {MAX_VCPU_FIELD}")
            out += (_U32S.pack(len(blob)), blob)
        if len(st.msrs) > MAX_MSRS:
            raise MalformedPayload(f"vCPU {st.index} has {len(st.msrs)} MSRs, limit {MAX_MSRS}")
        out.append(_U32S.pack(len(st.msrs)))
        for msr, value in sorted(st.msrs.items()):
            if not (0 <= msr <= _U32 and 0 <= value <= _U64):
                raise MalformedPayload(f"vCPU {st.index} MSR {msr:#x} = {value:#x} out of range")
            out.append(_MSR.pack(msr, value))
    return b"".join(out)


def unpack_vcpu_states(data: Any) -> list[VcpuState]:
    """The vCPU states of a VCPU_STATE payload; MalformedPayload on anything off."""
    view = _byte_view(data, "VCPU_STATE payload")
    pos = 0

    def take(n: int, what: str) -> memoryview:
        nonlocal pos
        if pos + n > view.nbytes:
            raise MalformedPayload(f"VCPU_STATE payload truncated reading {what} at byte {pos} "
                                   f"(needs {n}, {view.nbytes - pos} left)")
        chunk = view[pos:pos + n]
        pos += n
        return chunk

    def u32(what: str) -> int:
        return _U32S.unpack(take(4, what))[0]

    count = u32("count")
    if count > MAX_VCPUS:
        raise MalformedPayload(f"VCPU_STATE count {count} exceeds {MAX_VCPUS}")
    states = []
    seen = set()
    for _ in range(count):
        index = u32("vCPU index")
        if index in seen:
            raise MalformedPayload(f"VCPU_STATE lists vCPU {index} twice")
        seen.add(index)
        blobs = {}
        for name in _VCPU_BLOBS:
            size = u32(f"vCPU {index} {name} length")
            if size > MAX_VCPU_FIELD:
                raise MalformedPayload(f"vCPU {index} {name} length {size} exceeds {MAX_VCPU_FIELD}")
            blobs[name] = bytes(take(size, f"vCPU {index} {name}"))
        nmsrs = u32(f"vCPU {index} MSR count")
        if nmsrs > MAX_MSRS:
            raise MalformedPayload(f"vCPU {index} MSR count {nmsrs} exceeds {MAX_MSRS}")
        msrs: dict[int, int] = {}
        for msr, value in _MSR.iter_unpack(take(nmsrs * _MSR.size, f"vCPU {index} MSRs")):
            if msr in msrs:
                raise MalformedPayload(f"vCPU {index} lists MSR {msr:#x} twice")
            msrs[msr] = value
        states.append(VcpuState(index=index, msrs=msrs, **blobs))
    if pos != view.nbytes:
        raise MalformedPayload(f"VCPU_STATE payload has {view.nbytes - pos} trailing bytes")
    return states
