"""The colo-ring wire format, versions 1 to 3: frames between a primary and a replica.

This docstring is the spec. Code that disagrees with it is the bug. The code
is in three modules, all imported from here: checkpointer/frames.py (the
header, kinds, flags, reasons, errors, encode and decode), checkpointer/
messages.py (each control message declared once; checkpointer/schema.py packs
and unpacks them from the declaration), and this module (the session guard,
the writer, payload decoding). vCPU state is serialised by ring/vcpu_state.py.

A session
=========

Each connection of a primary to a replica is one *session*: a random non-zero
u64 the primary chooses when it connects (again on every reconnect), stamped
on every frame either side sends, so frames of an old primary or an old
connection (one that restarted, or a stale socket) are recognised and
refused. Each direction numbers its own frames: ``seq`` starts at 0 with the
sender's first frame and grows by exactly 1 per frame it sends.

A session starts with a *sync*: the replica's standby memory is empty, so the
primary copies every resident page, first while the guest runs (pre-copy
epochs, flagged SYNC: pages only, no vCPU state, not a checkpoint), then once
with the guest paused (the final stop-and-copy epoch: an ordinary consistent
epoch whose reason is "sync"). Sync epochs are numbered on from the epoch the
primary's guest is in when the replica welcomes it (1 for a primary that just
started), like every other epoch: ``e`` below is the first of them and ``s``
the final one::

    primary                                                        replica
       | HELLO(versions, session, slots, vcpus, page size)  seq 0 ---->|
       |<---- WELCOME(chosen version, last committed epoch)  seq 0     |
       |   (or REFUSE(reason, detail), now or later: the primary drops |
       |    this replica, runs unprotected, retries in a new session)  |
       |                                                               |
       |   pre-copy: zero or more epochs e .. s-1, guest running       |
       | EPOCH_BEGIN(e, "sync", flag SYNC, pages P, batches B) ------->|  staged
       | PAGES(e, count n) x B                              ---------->|  staged, not applied
       | EPOCH_END(e, digest, totals)                       ---------->|  verify, commit the pages:
       |<---- ACK(e)                                                   |  NOT a checkpoint yet
       |  ... e+1, e+2, ...: round 1 copies every resident page, each  |
       |      later round the pages the guest dirtied meanwhile, until |
       |      a round leaves few dirty pages or the rounds run out     |
       |                                                               |
       |   stop-and-copy: epoch s, guest paused, no SYNC flag          |
       | EPOCH_BEGIN(s, "sync") PAGES... VCPU_STATE DEVICE_STATE       |
       | EPOCH_END(s)                                       ---------->|  the first checkpoint
       |<---- ACK(s)                        (the primary is protected) |
       |                                                               |
       | EPOCH_BEGIN(s+1, reason) PAGES... VCPU_STATE DEVICE_STATE     |
       | EPOCH_END(s+1)                                     ---------->|
       |<---- ACK(s+1)                (outputs of epochs <= s+1 leave) |
       |  ... epoch N ...                                              |
       | HEARTBEAT(epoch (1))  <------------------------------------>  |  both ways, when idle
       | BYE(epoch (1))                                     ---------->|  orderly stop: no failover

Whether epoch N+1 may start before ACK(N) arrives is the protocol's business
(checkpointer/protocol.py); so is when a sync happens (once per session, after
WELCOME: a replica that gets a HELLO of a new session starts from empty
memory). The wire fixes the frames and their order inside one epoch.

An epoch
========

Two kinds of epoch, told apart by the SYNC flag of their EPOCH_BEGIN (and the
``sync`` field of its payload, which must agree):

- SYNC set, a *pre-copy* epoch: EPOCH_BEGIN, PAGES x batches, EPOCH_END. Its
  pages were read while the guest ran, so they are not a state the guest was
  ever in as a whole. It carries no VCPU_STATE and no DEVICE_STATE. A replica
  commits its pages and then has no checkpoint to fail over to until the next
  consistent epoch. Its reason is always "sync". (The flag's name is
  historical: read SYNC as "pre-copy, pages only"; the final epoch of a sync
  does *not* have it.)
- SYNC clear, a *consistent* epoch (a checkpoint): EPOCH_BEGIN, PAGES x
  batches, VCPU_STATE, DEVICE_STATE, EPOCH_END, cut with the guest paused.
  Its reason says what cut it (``EpochReason``); "sync" for the final
  stop-and-copy of a sync. A replica can fail over to it once committed.

A primary sends these frames in this order, each state frame exactly once.
What a replica enforces (checkpointer/protocol.py): EPOCH_BEGIN first, of the
epoch it expects (any epoch for the first of a session, then one more each
time); every later frame of the epoch carries its number; each PAGES frame's
count equals the pages its batch decodes to, and the PAGES add up to the
pages and batches that EPOCH_BEGIN announced and EPOCH_END repeats; a
consistent epoch has a VCPU_STATE, a pre-copy epoch none; the digest. It does
not check the order of PAGES, VCPU_STATE and DEVICE_STATE among themselves,
nor that a state frame comes only once (the last one staged is digested), nor
that a pre-copy epoch has no DEVICE_STATE (digested, never applied): the
digest over what the primary sent covers those.

A frame
=======

A frame is a 64-byte header and its payload. In version 1 a frame is a
ZeroMQ multipart message of exactly two parts: ``[header, payload]``; in
version 2 a message carries one or more frames (see "A message" below).
The header is 64 bytes, little-endian (``HEADER``)::

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

``KIND_RULES`` (checkpointer/frames.py) is this table as data; a unit test
compares the two. "0" in the epoch, count or flags column: the field must be
0 and ``decode_frame`` rejects anything else (``MalformedFrame``). "(2)": the
payload decoder checks the field against the payload (``MalformedPayload``).

======  ============  =========  ================  ============  =========  ==========================
value   kind          direction  epoch             count         flags      payload
======  ============  =========  ================  ============  =========  ==========================
0       INVALID       -          -                 -             -          never valid on the wire
1       HELLO         P -> R     0                 0             0          JSON ``Hello``
2       WELCOME       R -> P     0                 0             0          JSON ``Welcome``
3       EPOCH_BEGIN   P -> R     the epoch (2)     pages (2)     SYNC (2)   JSON ``EpochBegin``
4       PAGES         P -> R     the epoch         pages (3)     codec (4)  opaque page batch
5       VCPU_STATE    P -> R     the epoch         vCPUs (2)     0          vCPU states (5)
6       DEVICE_STATE  P -> R     the epoch         0             0          opaque device state
7       EPOCH_END     P -> R     the epoch (2)     batches (2)   0          JSON ``EpochEnd``
8       ACK           R -> P     epoch committed   0             0          JSON ``Ack``
9       HEARTBEAT     both       (1)               0             0          empty
10      REFUSE        R -> P     0                 0             0          JSON ``Refuse``
11      BYE           both       (1)               0             0          empty
======  ============  =========  ================  ============  =========  ==========================

(1) From the primary: the epoch its guest is running in (one past the last
    epoch it began). From the replica: its last committed epoch (0 if none).
    Informational: no receiver checks it. Only the primary sends BYE today;
    a primary accepts one.
(2) Checked against the payload: EPOCH_BEGIN epoch, pages and sync, EPOCH_END
    epoch and batches, the number of states in VCPU_STATE. ACK's epoch is in
    the header only.
(3) The pages in the batch; the replica checks it against the pages the
    batch decodes to (the batch is opaque to the wire).
(4) Flags of PAGES belong to the page codec (checkpointer/codec.py); the wire
    passes any.
(5) ``ring.vcpu_state.pack_vcpu_states``: the layout is in that module.

HEARTBEAT and BYE carry no payload: a receiver rejects anything else.

A message
=========

From version 2 (``MESSAGE_VERSION``) a ZeroMQ message carries one or more
frames, in order; the primary sends each epoch as one message (EPOCH_BEGIN,
PAGES..., VCPU_STATE, DEVICE_STATE, EPOCH_END), so that an epoch costs one
send, one CURVE box per part and one receive instead of one per frame. The
frames and their order are those of version 1; only their packing differs:

- The parts are read in order as a stream of frames. A part holds whole
  frames back to back: a header, then its ``payload_len`` bytes of payload,
  then the next header, and nothing else (an empty part is malformed).
- A header that ends its part has the whole next part as its payload: that
  is how a large payload (``join_frames``: from ``INLINE_PAYLOAD``, 64 KiB)
  travels as a part of its own without a copy, and how a two-part version-1
  frame ``[header, payload]`` reads as a message of one frame. A sender that
  ends a message with a frame of empty payload gives it an empty last part.
- ``decode_message`` yields the frames one by one, each checked exactly as
  ``decode_frame`` checks a lone frame; a header is checked (checksum, size
  limit) before its ``payload_len`` is used to find the next frame. A part
  that ends inside a header or a payload, or a missing payload part, is
  ``TruncatedFrame``.
- A receiver handles the frames in order as if each had come alone (the
  session guard, the sequence numbers, the epoch's rules): the frames before
  a bad one count, the bad one is refused as a lone bad frame would be, and
  nothing after it in the message is read.
- A primary packs several frames in a message only once version 2 is
  negotiated; a replica of version 2 reads a message of one or more frames
  in any session. A version-1 replica would refuse a multi-frame message as
  a frame with extra parts: hence the new version.

Control messages
================

Declared in checkpointer/messages.py; what follows is ``schema.describe`` of
each (a unit test checks it is current). A payload is one JSON object with
exactly these keys (compact, sorted keys, ASCII), every key present even when
its value may be null. Duplicate keys, NaN or Infinity, unknown or missing
keys, wrong types and values out of range are ``MalformedPayload``; "equals
header" fields must equal the header field or flag they name.

From version 3 (``BINARY_VERSION``) the three messages of every epoch,
EPOCH_BEGIN, EPOCH_END and ACK, are a fixed struct instead of JSON (the line
"from version 3" of each below): the fields that no header field or flag
carries, in the order listed, little-endian, without padding; the others are
read from the header alone, so they cannot disagree with it. A payload of any
other length, a choice code outside its enum (0 included), a bool other than
0 or 1 and a value out of its range are ``MalformedPayload``. HELLO, WELCOME
and REFUSE stay JSON (they travel at ``HANDSHAKE_VERSION``), and a session of
version 1 or 2 keeps the JSON of every message: the frame's version says which.

::

HELLO (Hello)
    versions        1 to 64 distinct x int in [1, 2^16-1]
    session         int in [1, 2^64-1]; equals header session
    slots           1 to 32768 x SlotLayout {slot: u32, guest_phys_addr: u64, size: u64}
    vcpus           int in [1, 4096]
    page_size       int in [4096, 2^32-1], a power of two
    agent           string, at most 1024 characters
    token           u64
    resume_of       u64; version 2: left out while 0
    and slots: no slot id twice, each non-empty and aligned to page_size, none overlapping another.
WELCOME (Welcome)
    version         int in [1, 2^16-1]
    last_epoch      u64, or null
    token           u64
    resumed         bool; version 2: left out while false
EPOCH_BEGIN (EpochBegin)
    epoch           u64; equals header epoch
    reason          EpochReason: ring_full | dirty_threshold | interval | output | sync
    pages           u32; equals header count
    batches         u32
    sync            bool; equals header flag SYNC
    token           u64
    from version 3: 13 bytes, reason u8, EpochReason by its place: 1 ring_full, 2 dirty_threshold, 3 interval, 4 output, 5 sync, batches u32, token u64; epoch, pages, sync only in the header
EPOCH_END (EpochEnd)
    epoch           u64; equals header epoch
    digest          16 bytes, as 32 lowercase hex digits
    pages           u64
    batches         u32; equals header count
    raw_bytes       u64
    from version 3: 32 bytes, digest 16 bytes, pages u64, raw_bytes u64; epoch, batches only in the header
ACK (Ack)
    epoch           u64; header epoch only, not in the JSON
    apply_ns        u64
    from version 3: 8 bytes, apply_ns u64; epoch only in the header
REFUSE (Refuse)
    reason          RefuseReason: no_common_version | bad_key | layout_mismatch | wrong_session | bad_frame | busy | superseded | fencing_mismatch
    detail          string, at most 1024 characters (longer is cut when sent)

Rules
=====

- Checksums: every frame carries xxh3_64 of its header and of its payload; a
  mismatch is ``BadChecksum``. (They catch corruption and truncation, not an
  attacker: authenticate the transport, e.g. ZeroMQ CURVE.)
- Size: a receiver refuses a ``payload_len`` above its ``max_payload``
  (``OversizedFrame``) before reading or hashing the payload. A JSON payload
  is at most ``MAX_CONTROL_PAYLOAD`` bytes.
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
  (``checkpointer.codec.EpochDigest``, over the decoded pages, then the
  VCPU_STATE payload, then the DEVICE_STATE payload, each empty when absent)
  and totals match; an epoch with any bad, missing, replayed or reordered
  frame is discarded whole, so the standby stays at its last complete epoch.
  A bad frame from its primary also ends the session: the replica answers
  REFUSE with the error's ``reason`` (a ``RefuseReason``) and, since the
  refused primary releases what it held, no longer fails over to that
  standby; it waits for a new HELLO. Bad frames from other peers are ignored.
"""

from __future__ import annotations

import secrets
from typing import Any, Iterable

from ring import vcpu_state
from ring.vcpu_state import VcpuState, VcpuStateError

from .frames import (HANDSHAKE_KINDS, HANDSHAKE_VERSION, HEADER, HEADER_SIZE, KIND_RULES, MAGIC, MAX_PAYLOAD,
                     PRIMARY_KINDS, PROTOCOL_VERSION, REPLICA_KINDS, SUPPORTED_VERSIONS, U64, BadChecksum, BadMagic,
                     EpochReason, Flag, Frame, Kind, KindRule, MalformedFrame, MalformedPayload, OutOfOrderFrame,
                     OversizedFrame, RefuseReason, ReplayedFrame, TruncatedFrame, UnexpectedKind, UnknownKind,
                     UnsupportedVersion, WireError, WrongSession, decode_frame, encode_frame, encode_parts, frame_where,
                     kind_name,
                     INLINE_PAYLOAD, MESSAGE_VERSION, decode_message, decode_one, join_frames)
from .messages import MAX_SLOTS, Ack, EpochBegin, EpochEnd, Hello, Message, Refuse, SlotLayout, Welcome
from .schema import BINARY_VERSION, MAX_CONTROL_PAYLOAD, MAX_TEXT, Packed, declared_messages, pack, unpack

__all__ = [
    "MAGIC", "PROTOCOL_VERSION", "HANDSHAKE_VERSION", "SUPPORTED_VERSIONS", "HEADER", "HEADER_SIZE",
    "MAX_PAYLOAD", "MAX_CONTROL_PAYLOAD", "MAX_TEXT", "MAX_SLOTS", "Kind", "Flag", "KindRule", "KIND_RULES",
    "PRIMARY_KINDS", "REPLICA_KINDS", "HANDSHAKE_KINDS", "Frame", "encode_frame", "decode_frame",
    "decode_message", "decode_one", "join_frames", "INLINE_PAYLOAD", "MESSAGE_VERSION", "BINARY_VERSION",
    "FrameGuard", "FrameWriter", "negotiate_version",
    "Message", "SlotLayout", "Hello", "Welcome", "EpochBegin", "EpochEnd", "Ack", "Refuse", "EpochReason",
    "RefuseReason", "Packed", "pack_message", "decode_payload",
    "declared_messages",
    "WireError", "TruncatedFrame", "MalformedFrame", "BadMagic", "UnsupportedVersion", "BadChecksum",
    "UnknownKind", "UnexpectedKind", "OversizedFrame", "MalformedPayload", "ReplayedFrame", "OutOfOrderFrame",
    "WrongSession",
]



# --- session and order ----------------------------------------------------------------


class _GuardWhere:
    """How the guard names a frame in its errors, formatted only when one is raised."""

    __slots__ = ("frame",)

    def __init__(self, frame: Frame) -> None:
        self.frame = frame

    def __format__(self, spec: str) -> str:
        frame = self.frame
        return format(f"{frame_where(frame.kind, frame.epoch, frame.seq)} session {frame.session:#x}", spec)


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

    def check(self, frame: Frame, adopt: bool = True) -> bool:
        """Accept ``frame`` or raise. Returns True when it is a HELLO of a new session.

        With ``adopt=False`` such a HELLO is checked but the guard stays on its session until
        ``adopt(session)``: the replica switches only once its protocol adopted the session,
        so a HELLO it refuses (a layout it cannot hold, say) leaves the current one intact.
        """
        where = _GuardWhere(frame)                # (formatted only in an error message)
        if self.accept is not None and frame.kind not in self.accept:
            raise UnexpectedKind(f"{where}: this side does not accept {kind_name(frame.kind)} frames")
        if frame.session in self._retired:
            raise WrongSession(f"{where}: session is retired (its primary restarted)")
        new = frame.session != self.session
        if new and (self.pinned or frame.kind != Kind.HELLO):
            expected = "a HELLO" if self.session is None else f"session {self.session:#x}"
            raise WrongSession(f"{where}: expected {expected}")
        if new:
            if frame.seq != 0:
                raise OutOfOrderFrame(f"{where}: a new session must start at seq 0")
            if adopt:
                self.adopt(frame.session)
            return True
        expected = self.next_seq
        if frame.seq < expected:
            raise ReplayedFrame(f"{where}: replayed, last accepted seq is {self.last_seq}")
        if frame.seq > expected:
            raise OutOfOrderFrame(f"{where}: expected seq {expected}, {frame.seq - expected} frame(s) missing")
        self.last_seq = frame.seq
        return False

    def adopt(self, session: int) -> None:
        """Follow `session` from now on (its HELLO, seq 0, was accepted); the old one is retired."""
        if self.session is not None and self.session != session:
            self._retire(self.session)
        self.session, self.last_seq = session, 0

    def _retire(self, session: int) -> None:
        self._retired[session] = None
        while len(self._retired) > self.RETIRED_LIMIT:
            del self._retired[next(iter(self._retired))]


class FrameWriter:
    """Sender side: one session, one version, and the next seq of this direction.

    The version is HANDSHAKE_VERSION until the caller sets the negotiated one
    (``version``): every frame after the handshake carries it."""

    def __init__(self, session: int | None = None, version: int = HANDSHAKE_VERSION) -> None:
        while session is None or session == 0:
            session = secrets.randbits(64)
        if not 0 < session <= U64:
            raise MalformedFrame(f"session {session!r} out of range")
        self.session = session
        self.version = version
        self.next_seq = 0

    def frame(self, kind: Kind, epoch: int = 0, count: int = 0, payload: Any = b"", flags: int = 0) -> list:
        """The parts of the next frame. The seq advances only when encoding succeeds."""
        version = HANDSHAKE_VERSION if kind in HANDSHAKE_KINDS else self.version
        parts = encode_parts(kind, self.session, self.next_seq, epoch, count, flags, payload, version)
        self.next_seq += 1
        return parts

    def message(self, msg: Message) -> list:
        """The parts of a control message, packed at the version its frame carries (from
        BINARY_VERSION an epoch's messages are structs); a HELLO must carry this writer's session."""
        version = HANDSHAKE_VERSION if msg.KIND in HANDSHAKE_KINDS else self.version
        kind, epoch, count, flags, payload = pack(msg, session=self.session, version=version)
        return self.frame(kind, epoch, count, payload, flags)


    def frames(self, epoch: int, items: Iterable[tuple]) -> list[list]:
        """The parts of several frames of one epoch, numbered in order: each item a control
        message ``(msg,)`` or ``(kind, count, payload)``. All or nothing: the seq advances only
        once every frame is encoded (the epoch's one message, from version 2)."""
        session, version, seq = self.session, self.version, self.next_seq
        out = []
        for item in items:
            if len(item) == 1:
                msg = item[0]
                kind, at, count, flags, payload = pack(
                    msg, session=session, version=HANDSHAKE_VERSION if msg.KIND in HANDSHAKE_KINDS else version)
            else:
                (kind, count, payload), at, flags = item, epoch, 0
            out.append(encode_parts(kind, session, seq, at, count, flags, payload,
                                    HANDSHAKE_VERSION if kind in HANDSHAKE_KINDS else version))
            seq += 1
        self.next_seq = seq
        return out


def negotiate_version(offered: Iterable[int], supported: Iterable[int] = SUPPORTED_VERSIONS) -> int:
    """The highest version in both lists, or UnsupportedVersion naming both."""
    offered, supported = sorted(set(offered)), sorted(set(supported))
    common = set(offered) & set(supported)
    if not common:
        raise UnsupportedVersion(f"no common protocol version: peer offers {offered}, we support {supported}")
    return max(common)


# --- payloads -------------------------------------------------------------------------


def pack_message(msg: Message, version: int = HANDSHAKE_VERSION) -> Packed:
    """(kind, epoch, count, flags, payload) of a control message at ``version`` (JSON below
    BINARY_VERSION), header fields consistent with it."""
    return pack(msg, version=version)


def _decode_vcpu_states(frame: Frame) -> list[VcpuState]:
    try:
        states = vcpu_state.unpack_vcpu_states(frame.payload)
    except VcpuStateError as err:
        raise MalformedPayload(f"VCPU_STATE epoch {frame.epoch}: {err}") from None
    if len(states) != frame.count:
        raise MalformedPayload(f"VCPU_STATE epoch {frame.epoch}: {len(states)} states, header count {frame.count}")
    return states


_CONTROL_KINDS = frozenset(declared_messages())


def decode_payload(frame: Frame) -> Any:
    """The payload of a decoded frame, parsed and checked against its header.

    HELLO -> Hello, WELCOME -> Welcome, EPOCH_BEGIN -> EpochBegin, EPOCH_END ->
    EpochEnd, ACK -> Ack, REFUSE -> Refuse, VCPU_STATE -> list[VcpuState],
    PAGES and DEVICE_STATE -> the payload unchanged (opaque here), HEARTBEAT and
    BYE -> None. Raises only WireError subclasses (MalformedPayload).
    """
    if frame.kind in _CONTROL_KINDS:
        return unpack(frame)
    if frame.kind == Kind.VCPU_STATE:
        return _decode_vcpu_states(frame)
    if frame.kind in (Kind.PAGES, Kind.DEVICE_STATE):
        return frame.payload
    if frame.kind in KIND_RULES and KIND_RULES[frame.kind].empty:
        return None
    raise UnknownKind(f"no payload decoder for {kind_name(frame.kind)}")
