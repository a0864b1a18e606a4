"""The epoch protocol of both roles, as pure state machines (sans-I/O, after h11).

Events go in (frozen dataclasses, each stamped with the time `now` the shell
read from its clock), commands come out (a list of frozen dataclasses the
shell executes in order). Nothing here imports asyncio, zmq or KVM, sleeps
or reads a clock: tests drive both machines directly with a fake clock, and
link a primary to a replica in memory.

Primary, in short:

    connecting --Welcomed--> syncing --Acked(final sync epoch)--> protected
        ^                       |                                     |
        +------ ReplicaLost <---+------------- ReplicaLost <----------+
                (guest runs unprotected, outputs released at once, a new
                 session and a full sync when a replica answers again)

- A Trigger (ring full, dirty threshold, output waiting; the interval trigger
  is raised here from Tick) becomes TakeSnapshot(epoch) then SendEpoch(epoch)
  when fewer than `max_in_flight` epochs await their ack; otherwise the guest
  is held paused (HoldGuest) and the snapshot is taken when an ack frees a
  place. Epochs are never dropped, merged or reordered: numbers are strictly
  increasing, and an ack N (cumulative: the replica commits in order)
  releases the outputs of every epoch <= N.
- Heartbeats go out every `heartbeat_interval`; a replica silent for
  `replica_timeout` is lost.

Replica, in short: it checks that frames come in epoch order (BEGIN of
committed+1, then its PAGES / VCPU_STATE / DEVICE_STATE, then END whose counts
match), stages them, and commits an epoch only at a verified END; anything
else discards the open epoch whole. A primary silent for `primary_timeout`
triggers a failover to the last committed consistent epoch (one that carried
vCPU state, not a pre-copy round).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .wire import EpochReason, RefuseReason, UnsupportedVersion, negotiate_version


class LogLevel(str, Enum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class PartKind(str, Enum):
    """The frames of an epoch between its BEGIN and its END."""

    PAGES = "pages"
    VCPU = "vcpu"
    DEVICE = "device"

_HANDLERS: dict[tuple[type, type], object] = {}


def _handler(machine: type, event: type):
    """The `_on_<Event>` method of a protocol class for an event class (looked up once per pair)."""
    try:
        return _HANDLERS[machine, event]
    except KeyError:
        method = _HANDLERS[machine, event] = getattr(machine, f"_on_{event.__name__}", None)
        return method


# ---------------------------------------------------------------------------
# primary: events


@dataclass(frozen=True)
class PrimaryEvent:
    now: float


@dataclass(frozen=True)
class Start(PrimaryEvent):
    """The agent is up and its guest runs; connect to the replica."""


@dataclass(frozen=True)
class Welcomed(PrimaryEvent):
    """The replica answered HELLO with a common version."""

    version: int
    committed_epoch: int
    resumed: bool = False         # the replica kept its copy of our last session: resume the sync


@dataclass(frozen=True)
class Trigger(PrimaryEvent):
    """A checkpoint trigger fired (the interval trigger is raised here, from Tick).

    A full ring while nothing is checkpointed (unprotected, or a sync before its final
    copy) becomes DrainRings: the vCPU must go on, and a sync keeps what it dirtied.
    """

    reason: EpochReason


@dataclass(frozen=True)
class PrecopyReady(PrimaryEvent):
    """The shell gathered a batch of pre-copy pages while the guest runs; it needs an epoch."""


@dataclass(frozen=True)
class SyncRoundsDone(PrimaryEvent):
    """The pre-copy rounds of a sync are sent; what remains is small: stop and copy."""

    last_epoch: int


@dataclass(frozen=True)
class Acked(PrimaryEvent):
    epoch: int


@dataclass(frozen=True)
class HeardFromReplica(PrimaryEvent):
    """Any valid frame from the replica (heartbeats included)."""


@dataclass(frozen=True)
class ReplicaRefused(PrimaryEvent):
    reason: str


@dataclass(frozen=True)
class SendFailed(PrimaryEvent):
    reason: str


@dataclass(frozen=True)
class Stop(PrimaryEvent):
    """The agent is stopping on purpose: finish what is in flight, start nothing new.

    From here on time and triggers decide nothing: no new epoch (a snapshot would
    resume the guest), no pre-copy, and no silence may call the replica lost (that
    would release unacknowledged output and skip the BYE). Acks still count: they
    release what the replica has committed.
    """


@dataclass(frozen=True)
class Tick(PrimaryEvent):
    """Time passed (the shell ticks a few times per heartbeat interval)."""


@dataclass(frozen=True)
class StandbyDeclared(PrimaryEvent):
    """The pair's standby key (checkpointer.fencing, S2) now names `session` (None: no replica
    holds our writes). ok False: it could not be written, because we no longer hold the key."""

    session: int | None
    ok: bool = True


@dataclass(frozen=True)
class LeaseLost(PrimaryEvent):
    """The lease is no longer valid (not renewed in time, expired, revoked): fence the guest."""

    reason: str


@dataclass(frozen=True)
class LeaseRenewed(PrimaryEvent):
    """The same lease is valid again (etcd answered in time): the guest may go on."""


@dataclass(frozen=True)
class LeaseRetaken(PrimaryEvent):
    """Our lease ended and we took the key again under a new token (nobody else had): the standby
    key says "none" now, so no replica's copy counts any more."""

    reason: str


@dataclass(frozen=True)
class Superseded(PrimaryEvent):
    """Another node is active now (it holds the key, or a peer showed a newer token): stop."""

    reason: str


# primary: commands


@dataclass(frozen=True)
class Command:
    pass


@dataclass(frozen=True)
class Connect(Command):
    """Open a new session to the replica and send HELLO."""

    session: int


@dataclass(frozen=True)
class BeginSync(Command):
    """Start the copy: pre-copy rounds (numbered from first_epoch) while the guest runs; `resume`:
    only what the replica's kept copy lacks, else everything."""

    first_epoch: int
    resume: bool = False


@dataclass(frozen=True)
class HoldGuest(Command):
    """Keep the guest paused: too many epochs wait for their ack."""

    reason: str


@dataclass(frozen=True)
class DrainRings(Command):
    """Nothing is checkpointed now: harvest the rings so the vCPUs go on, and resume the guest.

    keep: a sync is running, so the harvested pages must be copied again (merged into the
    sync's dirty set); otherwise (unprotected) they are dropped.
    """

    keep: bool


@dataclass(frozen=True)
class TakeSnapshot(Command):
    """Pause (if running), harvest, gather, capture state, resume: epoch `epoch` is closed."""

    epoch: int
    reason: EpochReason
    final_sync: bool = False


@dataclass(frozen=True)
class SendEpoch(Command):
    """Encode and send epoch `epoch`; consistent: a checkpoint (vCPU and device state), not a
    pre-copy batch of pages gathered while the guest ran."""

    epoch: int
    consistent: bool = True


@dataclass(frozen=True)
class ReleaseOutputs(Command):
    """Outputs produced in epochs <= upto may reach clients (None: all, unprotected)."""

    upto: int | None


@dataclass(frozen=True)
class ResumeGuest(Command):
    """Let a held guest run again (the replica is gone: unprotected)."""


@dataclass(frozen=True)
class SendHeartbeat(Command):
    pass


@dataclass(frozen=True)
class DropReplica(Command):
    """Close the session; reset what assumed the replica's content (the delta cache)."""

    reason: str


@dataclass(frozen=True)
class DeclareStandby(Command):
    """Write the standby key: `session` (a replica holds every acknowledged write) or None (no
    replica does: from then on outputs may leave without an ack). Answered by StandbyDeclared."""

    session: int | None


@dataclass(frozen=True)
class FenceGuest(Command):
    """The lease is lost: keep the guest stopped and let no output out until LeaseRenewed."""

    reason: str


@dataclass(frozen=True)
class UnfenceGuest(Command):
    """The lease is valid again: the guest runs, and what was releasable leaves."""


@dataclass(frozen=True)
class StepDown(Command):
    """Another node is active: stop serving and stop the agent (its guest is no longer the pair's)."""

    reason: str


@dataclass(frozen=True)
class Log(Command):
    level: LogLevel
    message: str


class PrimaryMode(str, Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    SYNCING = "syncing"
    PROTECTED = "protected"


@dataclass
class PrimaryConfig:
    max_in_flight: int = 2
    heartbeat_interval: float = 0.1
    replica_timeout: float = 1.0
    max_interval: float | None = 0.1      # the interval trigger; None: off
    reconnect_interval: float = 0.5


UNDECLARED = -1
MAX_VERIFYING = 64          # ended epochs a replica checks behind the one arriving (a primary keeps fewer in flight)


@dataclass
class PrimaryProtocol:
    """The primary's side. `handle(event)` returns the commands to execute, in order."""

    config: PrimaryConfig = field(default_factory=PrimaryConfig)
    mode: PrimaryMode = PrimaryMode.IDLE
    next_epoch: int = 1                 # the epoch the guest is running in now
    acked_epoch: int = 0
    in_flight: list[int] = field(default_factory=list)
    held_trigger: EpochReason | None = None   # a trigger waiting for a free place (the guest is held)
    final_sync_waiting: bool = False    # the final stop-and-copy waiting for a free place
    stopping: bool = False              # Stop was handled: only acks still count
    precopy_waiting: bool = False       # a gathered pre-copy batch waiting for a free place
    final_sync_epoch: int | None = None
    session: int = 0
    sessions_opened: int = 0
    last_heard: float = 0.0
    last_sent: float = 0.0
    last_snapshot: float = 0.0
    last_connect: float = float("-inf")
    epoch_reasons: dict[int, EpochReason] = field(default_factory=dict)   # epochs in flight
    precopy_epochs: set[int] = field(default_factory=set)                  # of those, pre-copy ones
    # The standby key (fencing S2): what was asked, and what etcd confirmed. UNDECLARED: nothing
    # yet; None: "no replica holds our writes"; a session: that session's replica holds them.
    standby_wanted: int | None = UNDECLARED
    standby_declared: int | None = UNDECLARED
    fenced: bool = False                # the lease is lost: the guest is held, no output leaves

    @property
    def protected(self) -> bool:
        return self.mode is PrimaryMode.PROTECTED

    @property
    def guest_held(self) -> bool:
        """HoldGuest was issued and no snapshot or ResumeGuest has let the guest go since."""
        return self.held_trigger is not None

    @property
    def checkpointing(self) -> bool:
        """Every dirty page now belongs to an epoch: protected, or the final sync copy was taken."""
        return self.mode is PrimaryMode.PROTECTED or (
            self.mode is PrimaryMode.SYNCING and self.final_sync_epoch is not None)

    @property
    def releases_unacked(self) -> bool:
        """Outputs leave at once, without an ack: nothing is checkpointed now, and the standby key
        says no replica holds our writes (so no replica can take over from a copy missing them)."""
        return self.standby_declared is None and self.standby_wanted is None and not self.checkpointing

    def handle(self, event: PrimaryEvent) -> list[Command]:
        if self.stopping and isinstance(event, (Tick, Trigger, PrecopyReady, SyncRoundsDone)):
            return []
        method = _handler(type(self), type(event))
        if method is None:
            raise TypeError(f"the primary protocol has no handler for {type(event).__name__}")
        return method(self, event)

    # -- connection and sync -------------------------------------------------
    def _connect(self, now: float) -> list[Command]:
        self.sessions_opened += 1
        self.session = self.sessions_opened
        self.mode = PrimaryMode.CONNECTING
        self.last_connect = now
        self.last_heard = now
        return [Connect(self.session)]

    def _on_Start(self, event: Start) -> list[Command]:
        if self.mode is not PrimaryMode.IDLE:
            return [Log(LogLevel.WARNING, "start received twice: ignored")]
        self.last_snapshot = event.now
        return [Log(LogLevel.WARNING, "guest running UNPROTECTED until a replica has synced"),
                *self._declare(None)] + self._connect(event.now)

    def _declare(self, session: int | None) -> list[Command]:
        self.standby_wanted = session
        return [DeclareStandby(session)]

    def _on_StandbyDeclared(self, event: StandbyDeclared) -> list[Command]:
        if event.session != self.standby_wanted:
            return []                               # overtaken by a later declaration
        if not event.ok:
            return [Log(LogLevel.ERROR, "the standby key could not be written: this node no longer "
                                        "holds the pair's key")]
        self.standby_declared = event.session
        if event.session is None:
            return [ReleaseOutputs(None)] if self.releases_unacked else []
        if event.session == self.session and self.mode is PrimaryMode.SYNCING \
                and self.final_sync_epoch is not None and self.acked_epoch >= self.final_sync_epoch:
            self.mode = PrimaryMode.PROTECTED
            return [Log(LogLevel.INFO, f"protected: the replica committed the full sync (epoch "
                                       f"{self.final_sync_epoch}), and etcd names its copy"),
                    ReleaseOutputs(self.acked_epoch)]
        return []

    # -- the lease -------------------------------------------------------------
    def _on_LeaseLost(self, event: LeaseLost) -> list[Command]:
        if self.fenced:
            return []
        self.fenced = True
        return [FenceGuest(event.reason), Log(LogLevel.ERROR, f"FENCED: {event.reason}; the guest is "
                                                              f"held and no output leaves")]

    def _on_LeaseRenewed(self, event: LeaseRenewed) -> list[Command]:
        self.fenced = False
        return [UnfenceGuest(), Log(LogLevel.WARNING, "the lease is valid again: serving")]

    def _on_LeaseRetaken(self, event: LeaseRetaken) -> list[Command]:
        self.fenced = False
        self.standby_wanted = self.standby_declared = None      # the acquisition wrote "none"
        commands: list[Command] = [UnfenceGuest()]
        if self.mode in (PrimaryMode.SYNCING, PrimaryMode.PROTECTED):
            commands += self._lose(event.now, f"{event.reason}; the replica's copy no longer counts")
        elif self.releases_unacked:
            commands.append(ReleaseOutputs(None))
        return commands

    def _on_Superseded(self, event: Superseded) -> list[Command]:
        self.stopping = True
        return [Log(LogLevel.ERROR, f"superseded: {event.reason}; stepping down"), StepDown(event.reason)]

    def _on_Welcomed(self, event: Welcomed) -> list[Command]:
        if self.mode is not PrimaryMode.CONNECTING:
            return [Log(LogLevel.WARNING, f"unexpected WELCOME in mode {self.mode.value}: ignored")]
        self.mode = PrimaryMode.SYNCING
        self.last_heard = event.now
        self.in_flight.clear()
        self.held_trigger = None
        self.final_sync_waiting = False
        self.precopy_waiting = False
        self.final_sync_epoch = None
        kind = "sync resumed from the copy it kept" if event.resumed else "full sync"
        return [Log(LogLevel.INFO, f"replica welcomed us (protocol v{event.version}); {kind} from "
                                   f"epoch {self.next_epoch}"), BeginSync(self.next_epoch, event.resumed)]

    def _on_Stop(self, event: Stop) -> list[Command]:
        self.stopping = True
        return []

    def _on_PrecopyReady(self, event: "PrecopyReady") -> list[Command]:
        """The shell gathered a pre-copy batch of pages (guest running): number it and send it."""
        if self.mode is not PrimaryMode.SYNCING:
            return [Log(LogLevel.WARNING, "pre-copy outside a sync: ignored")]
        if len(self.in_flight) >= self.config.max_in_flight:
            self.precopy_waiting = True          # sent when an ack frees a place
            return []
        return self._precopy(event.now)

    def _precopy(self, now: float) -> list[Command]:
        epoch = self.next_epoch
        self.next_epoch += 1
        self.in_flight.append(epoch)
        self.epoch_reasons[epoch] = EpochReason.SYNC
        self.precopy_epochs.add(epoch)
        self.last_sent = now
        return [SendEpoch(epoch, consistent=False)]

    def _on_SyncRoundsDone(self, event: SyncRoundsDone) -> list[Command]:
        if self.mode is not PrimaryMode.SYNCING or self.final_sync_epoch is not None \
                or self.final_sync_waiting:
            return [Log(LogLevel.WARNING, "sync rounds done outside a sync: ignored")]
        if len(self.in_flight) >= self.config.max_in_flight:
            self.final_sync_waiting = True       # taken when an ack frees a place
            return []
        return self._final_sync(event.now)

    def _final_sync(self, now: float) -> list[Command]:
        self.final_sync_epoch = self.next_epoch
        return self._snapshot(now, EpochReason.SYNC, final_sync=True)

    # -- epochs ----------------------------------------------------------------
    def _snapshot(self, now: float, reason: EpochReason, final_sync: bool = False) -> list[Command]:
        epoch = self.next_epoch
        self.next_epoch += 1
        self.in_flight.append(epoch)
        self.epoch_reasons[epoch] = reason
        self.last_snapshot = now
        self.last_sent = now
        return [TakeSnapshot(epoch, reason, final_sync), SendEpoch(epoch)]

    def _on_Trigger(self, event: Trigger) -> list[Command]:
        if not self.checkpointing:      # nothing to checkpoint to: a full ring must still be emptied
            if event.reason == EpochReason.RING_FULL:
                return [DrainRings(keep=self.mode is PrimaryMode.SYNCING)]
            return []
        if self.held_trigger is not None:
            return []                   # already held: one snapshot will cover it
        if len(self.in_flight) >= self.config.max_in_flight:
            self.held_trigger = event.reason
            return [HoldGuest(f"{len(self.in_flight)} epochs await their ack")]
        return self._snapshot(event.now, event.reason)

    def _on_Acked(self, event: Acked) -> list[Command]:
        self.last_heard = event.now
        if event.epoch <= self.acked_epoch:
            return [Log(LogLevel.DEBUG, f"duplicate ack for epoch {event.epoch}")]
        if event.epoch not in self.in_flight:
            return self._lose(event.now, f"replica acknowledged epoch {event.epoch}, which was never "
                                         f"sent (in flight: {self.in_flight})")
        self.acked_epoch = event.epoch
        self.in_flight = [e for e in self.in_flight if e > event.epoch]
        for epoch in [e for e in self.epoch_reasons if e <= event.epoch]:
            del self.epoch_reasons[epoch]
            self.precopy_epochs.discard(epoch)
        commands: list[Command] = []
        if self.mode is PrimaryMode.SYNCING and self.final_sync_epoch is not None \
                and event.epoch >= self.final_sync_epoch and self.standby_wanted != self.session:
            # Protected once etcd names this replica's copy (fencing S2): only then may a
            # takeover use it, so only then do its acks release output.
            commands += self._declare(self.session)
        if self.mode is PrimaryMode.PROTECTED:
            commands.append(ReleaseOutputs(event.epoch))
        if len(self.in_flight) < self.config.max_in_flight:
            if self.precopy_waiting:
                self.precopy_waiting = False
                commands += self._precopy(event.now)
            elif self.final_sync_waiting:
                self.final_sync_waiting = False
                commands += self._final_sync(event.now)
            elif self.held_trigger is not None:
                reason, self.held_trigger = self.held_trigger, None
                commands += self._snapshot(event.now, reason)
        return commands

    # -- liveness --------------------------------------------------------------
    def _on_HeardFromReplica(self, event: HeardFromReplica) -> list[Command]:
        self.last_heard = event.now
        return []

    def _on_ReplicaRefused(self, event: ReplicaRefused) -> list[Command]:
        return self._lose(event.now, f"replica refused: {event.reason}")

    def _on_SendFailed(self, event: SendFailed) -> list[Command]:
        return self._lose(event.now, f"send failed: {event.reason}")

    def _lose(self, now: float, reason: str) -> list[Command]:
        was_protected = self.mode is PrimaryMode.PROTECTED
        commands: list[Command] = [DropReplica(reason)]
        if self.held_trigger is not None:
            commands.append(ResumeGuest())            # (a fenced guest stays held: see FenceGuest)
            self.held_trigger = None
        self.final_sync_waiting = False
        self.precopy_waiting = False
        self.in_flight.clear()
        self.epoch_reasons.clear()
        self.precopy_epochs.clear()
        self.final_sync_epoch = None
        self.mode = PrimaryMode.CONNECTING
        self.last_connect = now
        commands.append(Log(LogLevel.ERROR, f"replica lost ({reason}): guest running UNPROTECTED"
                                     + ("" if was_protected else " (it was not yet protected)")))
        if self.standby_declared is None and self.standby_wanted is None:
            commands.append(ReleaseOutputs(None))     # no replica's copy was ever named: nothing waits
        else:
            commands += self._declare(None)           # outputs leave once etcd says no copy counts
        return commands

    def _on_Tick(self, event: Tick) -> list[Command]:
        now, config = event.now, self.config
        commands: list[Command] = []
        if self.mode is PrimaryMode.IDLE:
            return commands
        if self.mode is PrimaryMode.CONNECTING:
            if now - self.last_connect >= config.reconnect_interval and self.sessions_opened:
                if now - self.last_heard >= config.reconnect_interval:
                    commands += self._connect(now)
            return commands
        if now - self.last_heard > config.replica_timeout:
            return self._lose(now, f"no word from the replica for {now - self.last_heard:.3f} s "
                                   f"(timeout {config.replica_timeout} s)")
        if self.mode is PrimaryMode.PROTECTED and config.max_interval is not None \
                and now - self.last_snapshot >= config.max_interval and self.held_trigger is None:
            commands += self._on_Trigger(Trigger(now, EpochReason.INTERVAL))
        if now - self.last_sent >= config.heartbeat_interval:
            self.last_sent = now
            commands.append(SendHeartbeat())
        return commands


# replica: events


@dataclass(frozen=True)
class ReplicaEvent:
    now: float


@dataclass(frozen=True)
class Hello(ReplicaEvent):
    """A primary's HELLO. `layout_problem`: why the shell cannot hold its memory layout ("" if it can)."""

    session: int
    versions: tuple[int, ...]
    layout_problem: str = ""
    token: int = 0            # the primary's fencing token (0: it does not fence with etcd)
    fencing_problem: str = ""  # why our fencing and the primary's do not match ("" if they do)
    resumable: bool = False   # the shell kept the standby of the session this HELLO resumes


@dataclass(frozen=True)
class EpochBegin(ReplicaEvent):
    epoch: int
    pages: int
    batches: int
    consistent: bool          # carries vCPU state (not a pre-copy round)
    token: int = 0            # the primary's fencing token, as in its HELLO


@dataclass(frozen=True)
class EpochPart(ReplicaEvent):
    """A PAGES, VCPU_STATE or DEVICE_STATE frame of an epoch arrived (decoded and checked, not
    staged): the protocol answers StagePart if it belongs to the open epoch."""

    epoch: int
    kind: PartKind
    pages: int = 0            # PAGES: the batch's page count (the frame's count)


@dataclass(frozen=True)
class EpochEnd(ReplicaEvent):
    epoch: int
    pages: int
    batches: int


@dataclass(frozen=True)
class Verified(ReplicaEvent):
    """The shell checked the staged epoch's digest: ok, or not."""

    epoch: int
    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class BadFrame(ReplicaEvent):
    """A frame of our primary failed to decode, verify or stage (checksum, replay, order,
    hostile content). `code` is the refusal the primary is sent."""

    reason: str
    code: RefuseReason = RefuseReason.BAD_FRAME


@dataclass(frozen=True)
class HeardFromPrimary(ReplicaEvent):
    pass


@dataclass(frozen=True)
class ReplicaTick(ReplicaEvent):
    pass


@dataclass(frozen=True)
class PrimaryDisconnected(ReplicaEvent):
    """Every authenticated connection to the replica closed (from ZeroMQ's socket monitor), after
    everything received before the close was handled. `stalled`: this process itself was
    stalled recently, so the close is no proof of the primary's death (fencing S3)."""

    stalled: bool = False


@dataclass(frozen=True)
class LeaseClaimed(ReplicaEvent):
    """The replica holds the pair's key (fencing S2): it may take over, with this token."""

    token: int


@dataclass(frozen=True)
class ClaimFailed(ReplicaEvent):
    """The key could not be taken: the primary lives, our copy is stale, or nothing fences."""

    reason: str


@dataclass(frozen=True)
class PrimaryLeft(ReplicaEvent):
    """The primary said BYE: an orderly stop, not a failure; do not fail over."""


# replica: commands


@dataclass(frozen=True)
class AdoptSession(Command):
    """The HELLO being handled is our primary's from now on: answer that peer, and start from
    an empty standby (a sync sends only the pages the new guest has, so nothing old may stay)."""

    session: int


@dataclass(frozen=True)
class SendWelcome(Command):
    version: int
    committed_epoch: int
    resumed: bool = False


@dataclass(frozen=True)
class SendRefuse(Command):
    """Refuse the sender of the frame being handled (the adopted primary, or a new HELLO's peer)."""

    code: RefuseReason
    detail: str


@dataclass(frozen=True)
class OpenStaging(Command):
    epoch: int
    pages: int


@dataclass(frozen=True)
class StagePart(Command):
    """Stage the frame being handled into the open epoch (a StagingError becomes BadFrame)."""

    epoch: int
    kind: PartKind


@dataclass(frozen=True)
class Verify(Command):
    """Check the staged epoch against its END digest and, if it matches, commit it into the
    standby at once (atomically: the staging area is then free for the next epoch, which may
    already be arriving); answer with Verified. A mismatch commits nothing."""

    epoch: int
    consistent: bool


@dataclass(frozen=True)
class SendAck(Command):
    epoch: int


@dataclass(frozen=True)
class Discard(Command):
    epoch: int
    reason: str


@dataclass(frozen=True)
class ClaimLease(Command):
    """Take the pair's key for a takeover from the standby of `session` (fencing S2, S3):
    revoke the primary's lease first if its death is proven, else wait for it to end. Answered
    by LeaseClaimed or ClaimFailed."""

    epoch: int
    primary_token: int
    session: int
    proven_dead: bool
    reason: str


@dataclass(frozen=True)
class Failover(Command):
    """Start the standby guest from the last committed consistent epoch."""

    epoch: int
    reason: str


class ReplicaMode(str, Enum):
    WAITING = "waiting"         # no primary yet
    RECEIVING = "receiving"     # a primary streams epochs
    CLAIMING = "claiming"       # the primary is gone: taking the pair's key before taking over
    ACTIVE = "active"           # failed over: the standby guest runs


@dataclass
class ReplicaConfig:
    supported_versions: tuple[int, ...] = (1,)
    heartbeat_interval: float = 0.1
    primary_timeout: float = 1.0


@dataclass
class ReplicaProtocol:
    """The replica's side: epoch order, atomic commit, and the failover decision."""

    config: ReplicaConfig = field(default_factory=ReplicaConfig)
    mode: ReplicaMode = ReplicaMode.WAITING
    session: int | None = None
    committed_epoch: int = 0
    consistent_epoch: int | None = None      # last committed epoch we can fail over to
    open_epoch: int | None = None
    open_consistent: bool = False
    expected_pages: int = 0
    expected_batches: int = 0
    staged_pages: int = 0
    staged_batches: int = 0
    staged_vcpu: bool = False
    verifying: list[tuple[int, bool]] = field(default_factory=list)   # (epoch, consistent) ended, in order
    expect_epoch: int | None = None           # None: the first epoch of a session may be any
    last_heard: float = 0.0
    last_sent: float = 0.0
    rejected: int = 0
    warned_silent: bool = False
    primary_token: int = 0                    # the adopted session's fencing token
    newest_token: int = 0                     # the newest token seen (ours, once active)
    failover_reason: str = ""

    def handle(self, event: ReplicaEvent) -> list[Command]:
        if self.mode is ReplicaMode.ACTIVE:
            if isinstance(event, Hello):      # say why, so that a primary does not wait forever
                if event.token < self.newest_token:
                    return [SendRefuse(RefuseReason.SUPERSEDED, f"this node took over with token "
                                                                f"{self.newest_token}, newer than yours "
                                                                f"({event.token}): step down")]
                return [SendRefuse(RefuseReason.BUSY, "this replica has failed over: its guest is the "
                                                      "active one")]
            return []                # after failover the old primary's frames mean nothing
        if self.mode is ReplicaMode.CLAIMING and not isinstance(event, (LeaseClaimed, ClaimFailed)):
            if isinstance(event, Hello):
                return [SendRefuse(RefuseReason.BUSY, "this replica is claiming the pair's key to take "
                                                      "over; try again in a moment")]
            return []                # the old session's frames change nothing while the claim runs
        method = _handler(type(self), type(event))
        if method is None:
            raise TypeError(f"the replica protocol has no handler for {type(event).__name__}")
        return method(self, event)

    def _discard(self, reason: str) -> list[Command]:
        commands: list[Command] = []
        if self.open_epoch is not None:
            commands.append(Discard(self.open_epoch, reason))
        self.open_epoch = None
        self.verifying = []                     # (their results, if they come, count for nothing)
        return commands

    def _on_Hello(self, event: Hello) -> list[Command]:
        self.last_heard = event.now
        try:
            version = negotiate_version(event.versions, self.config.supported_versions)
        except UnsupportedVersion as exc:
            return [SendRefuse(RefuseReason.NO_COMMON_VERSION, str(exc))]
        if event.layout_problem:                # refused before anything of ours changes
            return [SendRefuse(RefuseReason.LAYOUT_MISMATCH, event.layout_problem)]
        if event.fencing_problem:
            return [SendRefuse(RefuseReason.FENCING_MISMATCH, event.fencing_problem)]
        if event.token < self.newest_token:
            return [SendRefuse(RefuseReason.SUPERSEDED, f"fencing token {event.token} is older than "
                                                        f"{self.newest_token}, seen before: another node "
                                                        f"has been active since")]
        self.newest_token = event.token
        self.primary_token = event.token
        commands = self._discard("a new primary session began")
        if self.session is not None and self.session != event.session:
            commands.append(Log(LogLevel.WARNING, "new primary session: the standby is not a consistent "
                                                  "checkpoint until its full sync is committed"))
        self.session = event.session
        self.mode = ReplicaMode.RECEIVING
        self.consistent_epoch = None            # a new sync overwrites the standby
        self.expect_epoch = None
        commands += [AdoptSession(event.session),
                     SendWelcome(version, self.committed_epoch, event.resumable and version >= 2)]
        return commands

    def _refuse(self, reason: str, code: RefuseReason = RefuseReason.BAD_FRAME) -> list[Command]:
        """Refuse the session. The primary will drop us and release its held outputs, so the
        standby is no longer a checkpoint anyone may fail over to: wait for a new HELLO."""
        self.rejected += 1
        commands = self._discard(reason) + [SendRefuse(code, reason), Log(LogLevel.ERROR, reason)]
        self.consistent_epoch = None
        self.mode = ReplicaMode.WAITING
        return commands

    def _on_EpochBegin(self, event: EpochBegin) -> list[Command]:
        self.last_heard = event.now
        self.warned_silent = False
        if self.mode is not ReplicaMode.RECEIVING:
            return self._refuse(f"EPOCH_BEGIN {event.epoch} before HELLO")
        if self.open_epoch is not None:
            return self._refuse(f"EPOCH_BEGIN {event.epoch} while epoch {self.open_epoch} is open")
        if len(self.verifying) >= MAX_VERIFYING:
            return self._refuse(f"EPOCH_BEGIN {event.epoch} while {len(self.verifying)} ended epochs await "
                                f"verification: more than any primary keeps in flight")
        if event.token != self.primary_token:
            return self._refuse(f"EPOCH_BEGIN {event.epoch} carries fencing token {event.token}, but the "
                                f"session's is {self.primary_token}")
        if self.expect_epoch is not None and event.epoch != self.expect_epoch:
            kind = "replays a committed epoch" if event.epoch < self.expect_epoch else "skips epochs"
            return self._refuse(f"EPOCH_BEGIN {event.epoch} {kind}: expected epoch {self.expect_epoch}")
        self.open_epoch = event.epoch
        self.open_consistent = event.consistent
        self.expected_pages, self.expected_batches = event.pages, event.batches
        self.staged_pages = self.staged_batches = 0
        self.staged_vcpu = False
        return [OpenStaging(event.epoch, event.pages)]

    def _on_EpochPart(self, event: EpochPart) -> list[Command]:
        self.last_heard = event.now
        if self.mode is not ReplicaMode.RECEIVING or event.epoch != self.open_epoch:
            return self._refuse(f"{event.kind.value} frame for epoch {event.epoch}, but the open epoch is "
                                f"{self.open_epoch}")
        if event.kind == PartKind.PAGES:
            self.staged_pages += event.pages
            self.staged_batches += 1
            if self.staged_pages > self.expected_pages or self.staged_batches > self.expected_batches:
                return self._refuse(f"epoch {event.epoch} sent more pages or batches than it announced")
        elif event.kind == PartKind.VCPU:
            if not self.open_consistent:
                return self._refuse(f"epoch {event.epoch} is pages only, but sent vCPU state")
            self.staged_vcpu = True
        return [StagePart(event.epoch, event.kind)]

    def _on_EpochEnd(self, event: EpochEnd) -> list[Command]:
        self.last_heard = event.now
        if self.mode is not ReplicaMode.RECEIVING or event.epoch != self.open_epoch:
            return self._refuse(f"EPOCH_END {event.epoch}, but the open epoch is {self.open_epoch}")
        announced = (self.expected_pages, self.expected_batches)
        if (event.pages, event.batches) != announced or (self.staged_pages, self.staged_batches) != announced:
            return self._refuse(f"epoch {event.epoch} is incomplete: announced {announced} pages/batches, "
                                f"received {(self.staged_pages, self.staged_batches)}, end says "
                                f"{(event.pages, event.batches)}")
        if self.open_consistent and not self.staged_vcpu:
            return self._refuse(f"epoch {event.epoch} announced vCPU state but sent none")
        self.verifying.append((event.epoch, self.open_consistent))
        self.open_epoch = None                  # the next epoch may begin while this one is checked
        self.expect_epoch = event.epoch + 1
        return [Verify(event.epoch, self.open_consistent)]

    def _on_Verified(self, event: Verified) -> list[Command]:
        if not self.verifying or event.epoch != self.verifying[0][0]:
            return [Log(LogLevel.WARNING, f"verification result for epoch {event.epoch} nobody asked for")]
        if not event.ok:
            reason = f"epoch {event.epoch} failed verification: {event.reason}"
            return [Discard(event.epoch, reason)] + self._refuse(reason)
        _, consistent = self.verifying.pop(0)
        self.committed_epoch = event.epoch     # (the shell committed it with the check)
        if consistent:
            self.consistent_epoch = event.epoch
        elif self.consistent_epoch is not None:
            self.consistent_epoch = None          # a pre-copy round after a checkpoint: not consistent
        self.last_sent = event.now
        return [SendAck(event.epoch)]

    def _on_BadFrame(self, event: BadFrame) -> list[Command]:
        # Refused, the primary drops us and releases what it held: the standby is stale from then
        # on, so it must not be failed over to (the same rule as every refusal).
        return self._refuse(f"rejected a frame: {event.reason}", event.code)

    def _on_HeardFromPrimary(self, event: HeardFromPrimary) -> list[Command]:
        self.last_heard = event.now
        self.warned_silent = False
        return []

    def _on_PrimaryDisconnected(self, event: "PrimaryDisconnected") -> list[Command]:
        """The primary's connection closed (its process died, or ZeroMQ's heartbeats timed out)."""
        if self.mode is not ReplicaMode.RECEIVING:
            return []
        if self.consistent_epoch is None:
            return self._discard("the primary disconnected") + [Log(
                LogLevel.ERROR, "the primary disconnected before a consistent checkpoint: nothing to fail "
                                "over to; waiting for a primary")] + self._wait()
        # Proof of death (fencing S3): closed by the primary's side while it was talking to us,
        # and not while this process stood still (then the order of BYE and close is unknown).
        silent = event.now - self.last_heard
        proven = not event.stalled and silent < self.config.primary_timeout / 2
        return self._claim(f"the primary's connection closed ({silent * 1000:.0f} ms after its last "
                           f"message{'' if proven else '; no proof of death'})", proven)

    def _claim(self, reason: str, proven_dead: bool) -> list[Command]:
        commands = self._discard("primary lost before the epoch ended")
        self.mode = ReplicaMode.CLAIMING
        self.failover_reason = reason
        return commands + [Log(LogLevel.ERROR, f"{reason}: claiming the pair's key"),
                           ClaimLease(self.consistent_epoch, self.primary_token, self.session,
                                      proven_dead, reason)]

    def _on_LeaseClaimed(self, event: LeaseClaimed) -> list[Command]:
        if self.mode is not ReplicaMode.CLAIMING:
            return [Log(LogLevel.WARNING, "a claim succeeded outside a claim: ignored")]
        self.mode = ReplicaMode.ACTIVE
        self.newest_token = max(self.newest_token, event.token)
        return [Failover(self.consistent_epoch, f"{self.failover_reason}; took the pair's key "
                                                f"(token {event.token})")]

    def _on_ClaimFailed(self, event: ClaimFailed) -> list[Command]:
        if self.mode is not ReplicaMode.CLAIMING:
            return []
        self.mode = ReplicaMode.WAITING
        return [Log(LogLevel.ERROR, f"not taking over: {event.reason}; waiting for a primary")]

    def _wait(self) -> list[Command]:
        self.mode = ReplicaMode.WAITING
        return []

    def _on_PrimaryLeft(self, event: PrimaryLeft) -> list[Command]:
        commands = self._discard("the primary left")
        self.mode = ReplicaMode.WAITING
        return commands + [Log(LogLevel.WARNING, "the primary stopped on purpose (BYE): no failover; "
                                                 "waiting for a primary")]

    def _on_ReplicaTick(self, event: ReplicaTick) -> list[Command]:
        commands: list[Command] = []
        if self.mode is not ReplicaMode.RECEIVING:
            return commands
        silent = event.now - self.last_heard
        if silent > self.config.primary_timeout:
            if self.consistent_epoch is None:
                if self.warned_silent:
                    return commands
                self.warned_silent = True               # say it once; a slow sync may still go on
                return [Log(LogLevel.ERROR, f"primary silent for {silent:.3f} s, but no consistent "
                                            f"checkpoint was committed yet: nothing to fail over to; waiting")]
            return self._claim(f"primary silent for {silent:.3f} s (timeout {self.config.primary_timeout} s)",
                               False)
        if event.now - self.last_sent >= self.config.heartbeat_interval:
            self.last_sent = event.now
            commands.append(SendHeartbeat())
        return commands
