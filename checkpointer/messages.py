"""The control messages of wire version 1, each declared once (checkpointer/schema.py packs and unpacks them).

A declaration says everything the wire needs: the frame kind, and per field
its type, range or choices, limits, whether it may be null, and which header
field or flag it must equal. Rules that span fields are a ``check`` method.
The JSON these give is the JSON of version 1, key for key; changing a
declaration changes the wire, so it needs a new protocol version. A field
declared with ``added=True`` came with version 2 (the resume of a sync): it is
left out of the JSON while it has its default, so a version-1 peer reads what
it always read. The messages of every epoch (EPOCH_BEGIN, EPOCH_END, ACK) are
declared ``binary=True``: from version 3 they travel as a fixed struct of the
same fields (checkpointer/schema.py), thousands of times a second.
"""

from __future__ import annotations

from .frames import U16, U32, EpochReason, Flag, Kind, MalformedPayload, RefuseReason
from .schema import Bool, Choice, HexBytes, Int, ListOf, Nested, Text, message, record, wire_field
from ring.vcpu_state import MAX_VCPUS

__all__ = ["SlotLayout", "Hello", "Welcome", "EpochBegin", "EpochEnd", "Ack", "Refuse", "Message", "MAX_SLOTS",
           "MAX_VERSIONS"]

MAX_SLOTS = 32768                   # KVM_MEM_SLOTS_NUM on x86-64
MAX_VERSIONS = 64


@record
class SlotLayout:
    """One guest memory slot, as the replica must reproduce it."""

    slot: int = wire_field(Int(hi=U32))
    guest_phys_addr: int = wire_field(Int())
    size: int = wire_field(Int())


@message(Kind.HELLO)
class Hello:
    """The primary's first frame: the versions it speaks, its session, and the guest's shape."""

    versions: tuple[int, ...] = wire_field(ListOf(Int(1, U16), MAX_VERSIONS, unique=True))
    session: int = wire_field(Int(lo=1), header="session")
    slots: tuple[SlotLayout, ...] = wire_field(ListOf(Nested(SlotLayout), MAX_SLOTS))
    vcpus: int = wire_field(Int(1, MAX_VCPUS))
    page_size: int = wire_field(Int(4096, U32, power_of_two=True), default=4096)
    agent: str = wire_field(Text(), default="")
    #: the primary's fencing token (checkpointer.fencing; 0: it does not fence with etcd)
    token: int = wire_field(Int(), default=0)
    #: the session whose sync (or protection) the replica's copy comes from: keep it, and the
    #: sync copies only what it lacks (0: a fresh copy; protocol version 2)
    resume_of: int = wire_field(Int(), default=0, added=True)

    def check(self) -> None:
        """slots: no slot id twice, each non-empty and aligned to page_size, none overlapping another."""
        end = -1
        ids = set()
        for s in sorted(self.slots, key=lambda s: s.guest_phys_addr):
            if s.slot in ids:
                raise MalformedPayload(f"HELLO slots: slot {s.slot} listed twice")
            ids.add(s.slot)
            if s.size <= 0 or s.size % self.page_size or s.guest_phys_addr % self.page_size:
                raise MalformedPayload(f"HELLO slots: slot {s.slot} (gpa {s.guest_phys_addr:#x}, size {s.size:#x}) "
                                       f"is empty or not aligned to page_size {self.page_size}")
            if s.guest_phys_addr <= end:
                raise MalformedPayload(f"HELLO slots: slot {s.slot} at {s.guest_phys_addr:#x} overlaps another slot")
            end = s.guest_phys_addr + s.size - 1


@message(Kind.WELCOME)
class Welcome:
    """The replica accepts the session: the version both speak from now on."""

    version: int = wire_field(Int(1, U16))
    #: the replica's last committed epoch, None if it has none
    last_epoch: int | None = wire_field(Int(), optional=True, default=None)
    #: the newest fencing token the replica has seen (0: none)
    token: int = wire_field(Int(), default=0)
    #: the replica kept its copy of HELLO's resume_of session (protocol version 2)
    resumed: bool = wire_field(Bool(), default=False, added=True)


@message(Kind.EPOCH_BEGIN, binary=True)
class EpochBegin:
    """Opens an epoch: its size, so the replica can bound its staging, and whether it is a checkpoint."""

    epoch: int = wire_field(Int(), header="epoch")
    reason: EpochReason = wire_field(Choice(EpochReason))
    pages: int = wire_field(Int(hi=U32), header="count")
    batches: int = wire_field(Int(hi=U32))
    #: True: a pre-copy epoch of a sync (pages read while the guest ran; no VCPU_STATE or
    #: DEVICE_STATE; not a checkpoint to fail over to). False: a consistent checkpoint, which
    #: carries VCPU_STATE (the final stop-and-copy of a sync is one, with reason "sync").
    sync: bool = wire_field(Bool(), default=False, flag=Flag.SYNC)
    #: the primary's fencing token, as in its HELLO
    token: int = wire_field(Int(), default=0)


@message(Kind.EPOCH_END, binary=True)
class EpochEnd:
    """Closes an epoch: what the replica must have received, and the digest it must match."""

    epoch: int = wire_field(Int(), header="epoch")
    #: codec.EpochDigest of the epoch's decoded content
    digest: bytes = wire_field(HexBytes(16))
    pages: int = wire_field(Int())
    batches: int = wire_field(Int(hi=U32), header="count")
    raw_bytes: int = wire_field(Int())


@message(Kind.ACK, binary=True)
class Ack:
    """The replica committed ``epoch``: outputs of epochs up to it may leave."""

    epoch: int = wire_field(Int(), header="epoch", in_payload=False)
    #: how long the replica took to commit the epoch
    apply_ns: int = wire_field(Int(), default=0)


@message(Kind.REFUSE)
class Refuse:
    """The replica ends the session, and why."""

    reason: RefuseReason = wire_field(Choice(RefuseReason))
    detail: str = wire_field(Text(truncate=True), default="")


Message = Hello | Welcome | EpochBegin | EpochEnd | Ack | Refuse
