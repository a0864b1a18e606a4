"""The epoch protocol machines, without I/O: every transition, with a fake clock."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpointer import protocol as p


def _kinds(commands) -> list[str]:
    return [type(c).__name__ for c in commands]


def _of(commands, kind):
    return [c for c in commands if isinstance(c, kind)]


def run(primary: p.PrimaryProtocol, event) -> list:
    """Handle `event` as the shell would with etcd answering: a DeclareStandby is confirmed at once."""
    commands = primary.handle(event)
    for command in list(commands):
        if isinstance(command, p.DeclareStandby):
            commands += primary.handle(p.StandbyDeclared(event.now, command.session))
    return commands


def protected_primary(max_in_flight: int = 2, **config) -> tuple[p.PrimaryProtocol, float]:
    """A primary brought to PROTECTED through the real transitions; returns it and the time."""
    primary = p.PrimaryProtocol(p.PrimaryConfig(max_in_flight=max_in_flight, **config))
    now = 0.0
    run(primary, p.Start(now))
    run(primary, p.Welcomed(now, 1, 0))
    (send,) = run(primary, p.PrecopyReady(now))
    run(primary, p.Acked(now, send.epoch))
    commands = run(primary, p.SyncRoundsDone(now, send.epoch))
    final = _of(commands, p.TakeSnapshot)[0]
    run(primary, p.Acked(now, final.epoch))
    assert primary.protected
    return primary, now


# --- primary ------------------------------------------------------------------


def test_start_runs_unprotected_and_connects() -> None:
    primary = p.PrimaryProtocol()
    commands = run(primary, p.Start(0.0))
    assert _of(commands, p.Connect) == [p.Connect(1)]
    assert p.ReleaseOutputs(None) in commands
    assert any(isinstance(c, p.Log) and "UNPROTECTED" in c.message for c in commands)
    assert primary.mode is p.PrimaryMode.CONNECTING
    assert _kinds(run(primary, p.Start(0.0))) == ["Log"]


def test_sync_then_protected_on_the_final_epochs_ack() -> None:
    primary = p.PrimaryProtocol(p.PrimaryConfig(max_in_flight=3))
    run(primary, p.Start(0.0))
    # nothing to checkpoint to yet: a full ring is drained (and unprotected, its pages dropped)
    assert run(primary, p.Trigger(0.0, p.EpochReason.RING_FULL)) == [p.DrainRings(keep=False)]
    assert run(primary, p.Trigger(0.0, p.EpochReason.OUTPUT)) == []
    commands = run(primary, p.Welcomed(0.1, 1, 0))
    assert _of(commands, p.BeginSync) == [p.BeginSync(1)]
    assert run(primary, p.PrecopyReady(0.2)) == [p.SendEpoch(1, consistent=False)]
    assert run(primary, p.PrecopyReady(0.3)) == [p.SendEpoch(2, consistent=False)]
    commands = run(primary, p.SyncRoundsDone(0.4, 2))
    assert commands == [p.TakeSnapshot(3, p.EpochReason.SYNC, final_sync=True), p.SendEpoch(3)]
    assert _of(run(primary, p.Acked(0.5, 2)), p.ReleaseOutputs) == []
    assert not primary.protected
    commands = run(primary, p.Acked(0.6, 3))
    assert primary.protected and p.ReleaseOutputs(3) in commands


def test_precopy_and_final_sync_wait_for_a_free_place() -> None:
    primary = p.PrimaryProtocol(p.PrimaryConfig(max_in_flight=1))
    run(primary, p.Start(0.0))
    run(primary, p.Welcomed(0.0, 1, 0))
    assert run(primary, p.PrecopyReady(0.0)) == [p.SendEpoch(1, consistent=False)]
    assert run(primary, p.PrecopyReady(0.0)) == []                 # waits for a place
    assert run(primary, p.Acked(0.0, 1)) == [p.SendEpoch(2, consistent=False)]
    assert run(primary, p.SyncRoundsDone(0.0, 2)) == []
    assert run(primary, p.Acked(0.0, 2)) == [p.TakeSnapshot(3, p.EpochReason.SYNC, final_sync=True), p.SendEpoch(3)]
    assert p.ReleaseOutputs(3) in run(primary, p.Acked(0.0, 3)) and primary.protected


def test_trigger_snapshots_and_backpressure_holds_the_guest() -> None:
    primary, now = protected_primary(max_in_flight=2)
    first = run(primary, p.Trigger(now, p.EpochReason.RING_FULL))
    assert _kinds(first) == ["TakeSnapshot", "SendEpoch"]
    a = first[0].epoch
    b = run(primary, p.Trigger(now, p.EpochReason.DIRTY_THRESHOLD))[0].epoch
    assert b == a + 1
    held = run(primary, p.Trigger(now, p.EpochReason.OUTPUT))
    assert _kinds(held) == ["HoldGuest"]
    assert run(primary, p.Trigger(now, p.EpochReason.RING_FULL)) == []         # one snapshot will cover both
    commands = run(primary, p.Acked(now, a))
    assert commands[0] == p.ReleaseOutputs(a)
    assert commands[1:] == [p.TakeSnapshot(b + 1, p.EpochReason.OUTPUT), p.SendEpoch(b + 1)]
    assert primary.in_flight == [b, b + 1]


def test_acks_are_cumulative_and_duplicates_ignored() -> None:
    primary, now = protected_primary(max_in_flight=3)
    epochs = [run(primary, p.Trigger(now, p.EpochReason.RING_FULL))[0].epoch for _ in range(3)]
    commands = run(primary, p.Acked(now, epochs[1]))
    assert commands == [p.ReleaseOutputs(epochs[1])] and primary.in_flight == [epochs[2]]
    assert _kinds(run(primary, p.Acked(now, epochs[0]))) == ["Log"]
    assert primary.acked_epoch == epochs[1]


def test_ack_for_an_epoch_never_sent_drops_the_replica() -> None:
    primary, now = protected_primary()
    commands = run(primary, p.Acked(now, 999))
    assert isinstance(commands[0], p.DropReplica) and "never sent" in commands[0].reason
    assert p.ReleaseOutputs(None) in commands and not primary.protected


def test_heartbeats_and_replica_timeout_resume_a_held_guest() -> None:
    primary, now = protected_primary(max_in_flight=1, heartbeat_interval=0.1, replica_timeout=1.0,
                                     max_interval=None)
    run(primary, p.Trigger(now, p.EpochReason.RING_FULL))
    assert _kinds(run(primary, p.Trigger(now, p.EpochReason.RING_FULL))) == ["HoldGuest"]
    assert run(primary, p.Tick(now + 0.05)) == []
    assert run(primary, p.Tick(now + 0.15)) == [p.SendHeartbeat()]
    run(primary, p.HeardFromReplica(now + 0.5))
    assert not _of(run(primary, p.Tick(now + 1.4)), p.DropReplica)
    commands = run(primary, p.Tick(now + 1.6))
    assert _kinds(commands)[:2] == ["DropReplica", "ResumeGuest"]
    assert p.ReleaseOutputs(None) in commands
    assert primary.mode is p.PrimaryMode.CONNECTING and primary.in_flight == []


def test_reconnect_opens_a_new_session_and_resyncs() -> None:
    primary, now = protected_primary(reconnect_interval=0.5)
    run(primary, p.SendFailed(now, "boom"))
    assert run(primary, p.Tick(now + 0.1)) == []
    commands = run(primary, p.Tick(now + 0.6))
    assert commands == [p.Connect(2)]
    next_epoch = primary.next_epoch
    assert _of(run(primary, p.Welcomed(now + 0.7, 1, 0)), p.BeginSync) == [p.BeginSync(next_epoch)]


def test_interval_trigger_comes_from_the_clock() -> None:
    primary, now = protected_primary(max_interval=0.05, heartbeat_interval=10)
    assert run(primary, p.Tick(now + 0.01)) == []
    commands = run(primary, p.Tick(now + 0.06))
    assert commands[0].reason == p.EpochReason.INTERVAL and _kinds(commands) == ["TakeSnapshot", "SendEpoch"]


def test_refusal_loses_the_replica() -> None:
    primary, now = protected_primary()
    commands = run(primary, p.ReplicaRefused(now, "digest mismatch"))
    assert "digest mismatch" in commands[0].reason


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["trigger", "ack", "ack_old", "tick", "fail", "welcome",
                                            "precopy", "syncdone"]),
                          st.floats(0, 0.3)), max_size=60))
def test_primary_invariants_under_random_events(steps) -> None:
    primary = p.PrimaryProtocol(p.PrimaryConfig(max_in_flight=2))
    now = 0.0
    run(primary, p.Start(now))
    # The test's own model, from what it sent and saw (never from the protocol's fields):
    sent: list[int] = []                  # every epoch the primary sent, in order
    session_sent: set[int] = set()        # sent since the replica was last dropped
    acked_by_test = 0                     # highest epoch the test acknowledged after it was sent
    released = 0
    for action, dt in steps:
        now += dt
        if action == "trigger":
            event = p.Trigger(now, p.EpochReason.RING_FULL)
        elif action == "ack":
            event = p.Acked(now, primary.in_flight[0] if primary.in_flight else 10**6)
        elif action == "ack_old":
            event = p.Acked(now, max(primary.acked_epoch, 1))
        elif action == "fail":
            event = p.SendFailed(now, "x")
        elif action == "welcome":
            event = p.Welcomed(now, 1, 0)
        elif action == "precopy":
            event = p.PrecopyReady(now)
        elif action == "syncdone":
            event = p.SyncRoundsDone(now, 0)
        else:
            event = p.Tick(now)
        if isinstance(event, p.Acked) and event.epoch in session_sent:
            acked_by_test = max(acked_by_test, event.epoch)
        for command in run(primary, event):
            if isinstance(command, p.SendEpoch):
                assert not sent or command.epoch > sent[-1], "epochs must strictly increase"
                sent.append(command.epoch)
                session_sent.add(command.epoch)
            if isinstance(command, p.DropReplica):
                session_sent.clear()
            if isinstance(command, p.ReleaseOutputs) and command.upto is not None:
                assert isinstance(event, p.Acked) and command.upto == event.epoch, \
                    "outputs are released only by the ack of their epoch"
                assert command.upto in session_sent and command.upto <= acked_by_test, \
                    "released outputs of an epoch the replica never acknowledged in this session"
                assert command.upto >= released
                released = command.upto
        unacked = [e for e in session_sent if e > acked_by_test]
        assert len(unacked) <= primary.config.max_in_flight, f"{unacked} sent without an ack"


def test_a_stopping_primary_starts_nothing_and_never_calls_its_replica_lost() -> None:
    primary, now = protected_primary(max_in_flight=2, replica_timeout=1.0)
    (_, send) = run(primary, p.Trigger(now, p.EpochReason.RING_FULL))
    assert run(primary, p.Stop(now)) == []
    assert run(primary, p.Trigger(now, p.EpochReason.OUTPUT)) == []            # no new epoch
    assert run(primary, p.Tick(now + 5.0)) == []                              # silence: not a loss
    assert primary.mode is p.PrimaryMode.PROTECTED
    assert p.ReleaseOutputs(send.epoch) in run(primary, p.Acked(now + 5.0, send.epoch))   # acks count


# --- replica ------------------------------------------------------------------


def _epoch(replica: p.ReplicaProtocol, epoch: int, now: float = 0.0, *, pages: int = 3,
           consistent: bool = True, verify: bool = True) -> list:
    commands = replica.handle(p.EpochBegin(now, epoch, pages, 2, consistent))
    commands += replica.handle(p.EpochPart(now, epoch, p.PartKind.PAGES, pages - 1))
    commands += replica.handle(p.EpochPart(now, epoch, p.PartKind.PAGES, 1))
    if consistent:
        commands += replica.handle(p.EpochPart(now, epoch, p.PartKind.VCPU))
    commands += replica.handle(p.EpochEnd(now, epoch, pages, 2))
    if verify:
        commands += replica.handle(p.Verified(now, epoch, True))
    return commands


def takeover(replica: p.ReplicaProtocol, commands: list, now: float, token: int = 5) -> list:
    """What the shell does with a ClaimLease when etcd grants the key: LeaseClaimed."""
    for command in _of(commands, p.ClaimLease):
        commands = commands + replica.handle(p.LeaseClaimed(now, token))
    return commands


def greeted_replica(**config) -> p.ReplicaProtocol:
    replica = p.ReplicaProtocol(p.ReplicaConfig(**config))
    assert _kinds(replica.handle(p.Hello(0.0, 7, (1,)))) == ["AdoptSession", "SendWelcome"]
    return replica


def test_hello_negotiates_the_highest_common_version() -> None:
    replica = p.ReplicaProtocol(p.ReplicaConfig(supported_versions=(1, 2, 3)))
    assert replica.handle(p.Hello(0.0, 1, (2, 3, 4))) == [p.AdoptSession(1), p.SendWelcome(3, 0)]
    refused = p.ReplicaProtocol().handle(p.Hello(0.0, 1, (5, 6)))
    assert _kinds(refused) == ["SendRefuse"] and refused[0].code is p.RefuseReason.NO_COMMON_VERSION
    assert "[5, 6]" in refused[0].detail and "[1]" in refused[0].detail


def test_a_hello_whose_layout_cannot_be_held_is_refused_and_changes_nothing() -> None:
    replica = greeted_replica()
    _epoch(replica, 1)
    commands = replica.handle(p.Hello(0.1, 99, (1,), layout_problem="slots overlap"))
    assert commands == [p.SendRefuse(p.RefuseReason.LAYOUT_MISMATCH, "slots overlap")]
    assert replica.session == 7 and replica.consistent_epoch == 1 and replica.mode is p.ReplicaMode.RECEIVING


def test_a_complete_epoch_is_verified_committed_and_acked() -> None:
    replica = greeted_replica()
    commands = _epoch(replica, 1)
    assert _kinds(commands) == ["OpenStaging", "StagePart", "StagePart", "StagePart", "Verify", "SendAck"]
    assert commands[-2:] == [p.Verify(1, True), p.SendAck(1)]
    assert replica.committed_epoch == 1 and replica.consistent_epoch == 1


def test_the_next_epoch_arrives_while_the_last_one_is_checked_and_acks_keep_their_order() -> None:
    """A long check and commit (the shell's standby lane) does not hold up the frames behind it."""
    replica = greeted_replica()
    first = _epoch(replica, 1, verify=False)
    assert first[-1] == p.Verify(1, True) and replica.open_epoch is None
    second = _epoch(replica, 2, verify=False)                 # begins, stages and ends meanwhile
    assert _kinds(second)[0] == "OpenStaging" and second[-1] == p.Verify(2, True)
    assert replica.committed_epoch == 0 and replica.consistent_epoch is None
    assert replica.handle(p.Verified(0.1, 2, True))[0] == p.Log(
        p.LogLevel.WARNING, "verification result for epoch 2 nobody asked for")     # out of order
    assert replica.handle(p.Verified(0.1, 1, True)) == [p.SendAck(1)]
    assert (replica.committed_epoch, replica.consistent_epoch) == (1, 1)
    assert replica.handle(p.Verified(0.1, 2, True)) == [p.SendAck(2)]
    assert (replica.committed_epoch, replica.consistent_epoch) == (2, 2)


def test_a_failed_check_behind_a_newer_epoch_refuses_the_session() -> None:
    replica = greeted_replica()
    _epoch(replica, 1, verify=False)
    _epoch(replica, 2, verify=False)
    commands = replica.handle(p.Verified(0.1, 1, False, "digest mismatch"))
    assert "SendRefuse" in _kinds(commands) and replica.mode is p.ReplicaMode.WAITING
    assert replica.committed_epoch == 0 and replica.consistent_epoch is None
    assert replica.handle(p.Verified(0.1, 2, True))[0].level is p.LogLevel.WARNING    # counts for nothing
    assert replica.committed_epoch == 0


def test_too_many_epochs_behind_their_checks_are_refused() -> None:
    replica = greeted_replica()
    for epoch in range(1, p.MAX_VERIFYING + 1):
        _epoch(replica, epoch, verify=False)
    commands = replica.handle(p.EpochBegin(0.0, p.MAX_VERIFYING + 1, 1, 1, True))
    assert "SendRefuse" in _kinds(commands)


def test_epoch_before_hello_is_refused() -> None:
    commands = p.ReplicaProtocol().handle(p.EpochBegin(0.0, 1, 1, 1, True))
    assert "SendRefuse" in _kinds(commands)


@pytest.mark.parametrize("epoch, words", [(1, "replays"), (3, "skips")])
def test_replayed_and_skipped_epochs_are_refused(epoch: int, words: str) -> None:
    replica = greeted_replica()
    _epoch(replica, 1)
    commands = replica.handle(p.EpochBegin(0.0, epoch, 1, 1, True))
    assert "SendRefuse" in _kinds(commands) and words in commands[-1].message
    assert replica.committed_epoch == 1


def test_incomplete_epoch_is_discarded_whole() -> None:
    replica = greeted_replica()
    replica.handle(p.EpochBegin(0.0, 1, 3, 2, True))
    replica.handle(p.EpochPart(0.0, 1, p.PartKind.PAGES, 2))
    replica.handle(p.EpochPart(0.0, 1, p.PartKind.VCPU))
    commands = replica.handle(p.EpochEnd(0.0, 1, 3, 2))
    assert commands[0] == p.Discard(1, commands[0].reason) and "incomplete" in commands[0].reason
    assert replica.committed_epoch == 0 and replica.open_epoch is None


def test_too_many_batches_and_missing_vcpu_state_are_refused() -> None:
    replica = greeted_replica()
    replica.handle(p.EpochBegin(0.0, 1, 2, 1, True))
    replica.handle(p.EpochPart(0.0, 1, p.PartKind.PAGES, 1))
    assert "Discard" in _kinds(replica.handle(p.EpochPart(0.0, 1, p.PartKind.PAGES, 1)))
    replica = greeted_replica()
    commands = _epoch(replica, 1, consistent=True, verify=False)
    # (with vcpu) fine; now one that announces vCPU state but sends none
    replica.handle(p.Verified(0.0, 1, True))
    replica.handle(p.EpochBegin(0.0, 2, 1, 1, True))
    replica.handle(p.EpochPart(0.0, 2, p.PartKind.PAGES, 1))
    commands = replica.handle(p.EpochEnd(0.0, 2, 1, 1))
    assert "Discard" in _kinds(commands) and replica.committed_epoch == 1


def test_failed_verification_discards_and_refuses() -> None:
    replica = greeted_replica()
    _epoch(replica, 1, verify=False)
    commands = replica.handle(p.Verified(0.0, 1, False, "digest mismatch"))
    assert _kinds(commands)[:2] == ["Discard", "SendRefuse"] and replica.committed_epoch == 0


def test_bad_frame_discards_the_open_epoch_and_refuses_the_session() -> None:
    replica = greeted_replica()
    _epoch(replica, 1)
    replica.handle(p.EpochBegin(0.0, 2, 3, 2, True))
    commands = replica.handle(p.BadFrame(0.0, "checksum mismatch", p.RefuseReason.BAD_FRAME))
    assert commands[0] == p.Discard(2, "rejected a frame: checksum mismatch")
    assert _of(commands, p.SendRefuse)[0].code is p.RefuseReason.BAD_FRAME
    assert replica.committed_epoch == 1
    # refused, the primary releases what it held: the old checkpoint must never be failed over to
    assert replica.mode is p.ReplicaMode.WAITING and replica.consistent_epoch is None
    assert not _of(replica.handle(p.PrimaryDisconnected(0.1)), p.Failover)
    assert "SendRefuse" in _kinds(replica.handle(p.EpochBegin(0.2, 2, 1, 1, True)))   # needs a new HELLO


def test_primary_timeout_fails_over_to_the_last_consistent_epoch() -> None:
    replica = greeted_replica(primary_timeout=1.0, heartbeat_interval=0.1)
    _epoch(replica, 1)
    _epoch(replica, 2)
    replica.handle(p.EpochBegin(0.0, 3, 3, 2, True))       # dies mid-epoch
    assert replica.handle(p.ReplicaTick(0.15)) == [p.SendHeartbeat()]
    assert not _of(replica.handle(p.ReplicaTick(0.9)), p.Failover)
    commands = replica.handle(p.ReplicaTick(1.2))
    assert commands[0] == p.Discard(3, commands[0].reason)
    (claim,) = _of(commands, p.ClaimLease)
    assert claim.epoch == 2 and not claim.proven_dead and replica.mode is p.ReplicaMode.CLAIMING
    commands = takeover(replica, commands, 1.25)
    assert _of(commands, p.Failover)[0].epoch == 2
    assert replica.mode is p.ReplicaMode.ACTIVE
    assert replica.handle(p.EpochBegin(1.3, 3, 1, 1, True)) == []   # the old primary is ignored


def test_no_failover_without_a_consistent_checkpoint() -> None:
    replica = greeted_replica(primary_timeout=1.0)
    _epoch(replica, 1, consistent=False)                    # a pre-copy round only
    commands = replica.handle(p.ReplicaTick(2.0))
    assert not _of(commands, p.Failover) and "nothing to fail over to" in commands[-1].message
    assert replica.handle(p.ReplicaTick(3.0)) == []                  # said once
    # a slow sync goes on: the session is kept
    assert _kinds(_epoch(replica, 2, now=3.1)) == ["OpenStaging", "StagePart", "StagePart", "StagePart", "Verify", "SendAck"]


def test_disconnect_fails_over_at_once_or_waits_without_a_checkpoint() -> None:
    replica = greeted_replica(primary_timeout=10.0)
    _epoch(replica, 1, consistent=False)
    commands = replica.handle(p.PrimaryDisconnected(0.1))
    assert not _of(commands, p.Failover) and replica.mode is p.ReplicaMode.WAITING
    replica = greeted_replica(primary_timeout=10.0)
    _epoch(replica, 1)
    replica.handle(p.EpochBegin(0.1, 2, 3, 2, True))
    commands = replica.handle(p.PrimaryDisconnected(0.2))
    assert commands[0] == p.Discard(2, commands[0].reason)
    assert _of(commands, p.ClaimLease)[0].proven_dead          # closed while it was talking: dead
    (failover,) = _of(takeover(replica, commands, 0.21), p.Failover)
    assert failover.epoch == 1 and "connection closed" in failover.reason and "token 5" in failover.reason
    assert replica.mode is p.ReplicaMode.ACTIVE


def test_a_precopy_round_after_a_checkpoint_is_not_a_checkpoint() -> None:
    replica = greeted_replica()
    _epoch(replica, 1)                                      # the final sync epoch
    assert replica.consistent_epoch == 1
    _epoch(replica, 2, consistent=False)                    # a later pre-copy spoils it
    assert replica.consistent_epoch is None
    _epoch(replica, 3)
    assert replica.consistent_epoch == 3


def test_new_session_invalidates_the_old_checkpoint() -> None:
    replica = greeted_replica()
    _epoch(replica, 1)
    commands = replica.handle(p.Hello(0.5, 8, (1,)))
    assert _of(commands, p.SendWelcome) == [p.SendWelcome(1, 1)]
    assert replica.consistent_epoch is None
    assert _kinds(_epoch(replica, 40, now=0.5)) == ["OpenStaging", "StagePart", "StagePart", "StagePart", "Verify", "SendAck"]


# --- both, linked in memory ------------------------------------------------------


from checkpointer.faults import KillPoint      # the kill points of the drill and the system tests


@dataclass
class Link:
    """A primary and a replica joined in memory; the primary can be killed at a chosen point."""

    primary: p.PrimaryProtocol = field(default_factory=p.PrimaryProtocol)
    replica: p.ReplicaProtocol = field(default_factory=p.ReplicaProtocol)
    now: float = 0.0
    kill_at: tuple[int, KillPoint] | None = None   # (epoch, the point of it where the primary dies)
    dead: bool = False
    failovers: list = field(default_factory=list)

    def primary_do(self, event) -> None:
        for command in run(self.primary, event):
            if self.dead:
                return
            self.execute_primary(command)

    def execute_primary(self, command) -> None:
        if isinstance(command, p.Connect):
            self.replica_do(p.Hello(self.now, command.session, (1,)))
        elif isinstance(command, p.BeginSync):
            self.primary_do(p.PrecopyReady(self.now))
            self.primary_do(p.SyncRoundsDone(self.now, command.first_epoch))
        elif isinstance(command, p.SendEpoch):
            self.send_epoch(command.epoch)

    def send_epoch(self, epoch: int) -> None:
        consistent = self.primary.epoch_reasons[epoch] != "precopy"
        steps = [(KillPoint.BEGIN, p.EpochBegin(self.now, epoch, 2, 2, consistent)),
                 (KillPoint.PAGES, p.EpochPart(self.now, epoch, p.PartKind.PAGES, 1)),
                 (None, p.EpochPart(self.now, epoch, p.PartKind.PAGES, 1))]      # a second batch
        if consistent:
            steps.append((KillPoint.VCPU, p.EpochPart(self.now, epoch, p.PartKind.VCPU)))
            steps.append((KillPoint.DEVICE, p.EpochPart(self.now, epoch, p.PartKind.DEVICE)))
        steps.append((KillPoint.END, p.EpochEnd(self.now, epoch, 2, 2)))
        for name, event in steps:
            self.replica_do(event)
            if self.kill_at == (epoch, name):
                self.dead = True
                return

    def replica_do(self, event) -> None:
        for command in self.replica.handle(event):
            if isinstance(command, p.SendWelcome) and not self.dead:
                self.primary_do(p.Welcomed(self.now, command.version, command.committed_epoch))
            elif isinstance(command, p.Verify):
                self.replica_do(p.Verified(self.now, command.epoch, True))
            elif isinstance(command, p.SendAck) and not self.dead:
                if self.kill_at == (command.epoch, KillPoint.ACKED):
                    self.dead = True
                    continue
                self.primary_do(p.Acked(self.now, command.epoch))
            elif isinstance(command, p.ClaimLease):
                self.replica_do(p.LeaseClaimed(self.now, 2))
            elif isinstance(command, p.Failover):
                self.failovers.append(command.epoch)


@pytest.mark.parametrize("point", list(KillPoint))
def test_killed_primary_leaves_the_replica_at_the_last_complete_epoch(point: KillPoint) -> None:
    link = Link(kill_at=(6, point))
    link.primary_do(p.Start(0.0))
    assert link.primary.protected
    while not link.dead:
        link.now += 0.01
        link.primary_do(p.Trigger(link.now, p.EpochReason.RING_FULL))
        assert link.now < 5
    complete = 6 if point in (KillPoint.END, KillPoint.ACKED) else 5
    assert link.replica.committed_epoch == complete
    for _ in range(300):
        link.now += 0.01
        link.replica_do(p.ReplicaTick(link.now))
    assert link.failovers == [complete]


def test_orderly_goodbye_is_not_a_failure() -> None:
    replica = greeted_replica(primary_timeout=1.0)
    _epoch(replica, 1)
    replica.handle(p.EpochBegin(0.1, 2, 3, 2, True))
    commands = replica.handle(p.PrimaryLeft(0.2))
    assert commands[0] == p.Discard(2, "the primary left") and replica.mode is p.ReplicaMode.WAITING
    assert not _of(replica.handle(p.ReplicaTick(5.0)), p.Failover)


def test_triggers_after_the_final_sync_snapshot_are_checkpoints() -> None:
    """Pages dirtied after the final sync copy belong to the next epoch, even before its ack."""
    primary = p.PrimaryProtocol(p.PrimaryConfig(max_in_flight=2))
    primary.handle(p.Start(0.0))
    primary.handle(p.Welcomed(0.0, 1, 0))
    # before the final copy, a full ring is drained and its pages kept for the sync
    assert primary.handle(p.Trigger(0.0, p.EpochReason.RING_FULL)) == [p.DrainRings(keep=True)]
    assert not primary.checkpointing
    primary.handle(p.SyncRoundsDone(0.0, 0))
    assert primary.checkpointing and not primary.protected
    assert primary.handle(p.Trigger(0.0, p.EpochReason.RING_FULL)) == [p.TakeSnapshot(2, p.EpochReason.RING_FULL), p.SendEpoch(2)]


def test_after_refusing_the_primary_the_replica_never_fails_over_to_its_old_checkpoint() -> None:
    """The refused primary drops us and releases its held outputs: our checkpoint is stale."""
    replica = greeted_replica(primary_timeout=1.0)
    _epoch(replica, 1)
    replica.handle(p.EpochBegin(0.1, 2, 3, 2, True))
    commands = replica.handle(p.Verified(0.2, 2, False, "digest mismatch"))   # nobody asked: logged
    commands = replica.handle(p.EpochBegin(0.2, 7, 1, 1, True))               # out of order: refused
    assert "SendRefuse" in _kinds(commands)
    assert replica.mode is p.ReplicaMode.WAITING and replica.consistent_epoch is None
    assert not _of(replica.handle(p.PrimaryDisconnected(0.3)), p.Failover)
    assert not _of(replica.handle(p.ReplicaTick(5.0)), p.Failover)


def test_an_active_replica_refuses_a_new_primary() -> None:
    replica = greeted_replica(primary_timeout=1.0)
    _epoch(replica, 1)
    takeover(replica, replica.handle(p.PrimaryDisconnected(0.1)), 0.1)
    assert replica.mode is p.ReplicaMode.ACTIVE
    commands = replica.handle(p.Hello(0.2, 99, (1,), token=5))
    assert _kinds(commands) == ["SendRefuse"] and "failed over" in commands[0].detail
    assert commands[0].code is p.RefuseReason.BUSY


# --- fencing (checkpointer.fencing: S1 to S4) ----------------------------------------


def test_protection_begins_only_once_etcd_names_the_replicas_copy() -> None:
    primary = p.PrimaryProtocol(p.PrimaryConfig(max_in_flight=3))
    commands = primary.handle(p.Start(0.0))
    assert p.DeclareStandby(None) in commands and p.ReleaseOutputs(None) not in commands
    assert not primary.releases_unacked                   # not before etcd says no copy counts
    assert primary.handle(p.StandbyDeclared(0.0, None)) == [p.ReleaseOutputs(None)]
    assert primary.releases_unacked
    run(primary, p.Welcomed(0.1, 1, 0))
    (final, _) = run(primary, p.SyncRoundsDone(0.2, 0))
    commands = primary.handle(p.Acked(0.3, final.epoch))
    assert commands == [p.DeclareStandby(primary.session)] and not primary.protected
    assert primary.handle(p.StandbyDeclared(0.3, None)) == []          # a stale answer counts for nothing
    commands = primary.handle(p.StandbyDeclared(0.4, primary.session))
    assert primary.protected and p.ReleaseOutputs(final.epoch) in commands


def test_a_lost_replica_releases_held_output_only_once_etcd_says_no_copy_counts() -> None:
    primary, now = protected_primary()
    run(primary, p.Trigger(now, p.EpochReason.OUTPUT))
    commands = primary.handle(p.SendFailed(now, "gone"))
    assert p.DeclareStandby(None) in commands and p.ReleaseOutputs(None) not in commands
    assert not primary.releases_unacked
    # etcd refuses (we no longer hold the key): nothing leaves
    commands = primary.handle(p.StandbyDeclared(now, None, ok=False))
    assert not _of(commands, p.ReleaseOutputs) and not primary.releases_unacked
    primary, now = protected_primary()
    primary.handle(p.SendFailed(now, "gone"))
    assert primary.handle(p.StandbyDeclared(now, None)) == [p.ReleaseOutputs(None)]


def test_a_lost_lease_fences_and_a_renewal_unfences() -> None:
    primary, now = protected_primary()
    commands = primary.handle(p.LeaseLost(now, "etcd unreachable"))
    assert _kinds(commands) == ["FenceGuest", "Log"] and primary.fenced
    assert primary.handle(p.LeaseLost(now, "again")) == []
    assert _kinds(primary.handle(p.LeaseRenewed(now))) == ["UnfenceGuest", "Log"] and not primary.fenced
    assert primary.protected                               # the same lease: the replica's copy still counts


def test_a_retaken_key_drops_the_replica_whose_copy_no_longer_counts() -> None:
    primary, now = protected_primary()
    primary.handle(p.LeaseLost(now, "expired"))
    commands = primary.handle(p.LeaseRetaken(now + 3, "took the key again"))
    assert _kinds(commands)[:2] == ["UnfenceGuest", "DropReplica"]
    assert p.ReleaseOutputs(None) in commands and primary.releases_unacked  # the acquisition wrote "none"


def test_a_superseded_primary_steps_down_and_starts_nothing() -> None:
    primary, now = protected_primary()
    commands = primary.handle(p.Superseded(now, "node b holds the key"))
    assert _of(commands, p.StepDown) == [p.StepDown("node b holds the key")]
    assert primary.handle(p.Trigger(now, p.EpochReason.OUTPUT)) == []


def test_a_close_proves_death_only_after_recent_contact_and_no_stall_of_our_own() -> None:
    replica = greeted_replica(primary_timeout=1.0)
    _epoch(replica, 1, now=0.0)
    assert _of(replica.handle(p.PrimaryDisconnected(0.3)), p.ClaimLease)[0].proven_dead
    replica = greeted_replica(primary_timeout=1.0)
    _epoch(replica, 1, now=0.0)
    assert not _of(replica.handle(p.PrimaryDisconnected(0.6)), p.ClaimLease)[0].proven_dead   # silent first
    replica = greeted_replica(primary_timeout=1.0)
    _epoch(replica, 1, now=0.0)
    assert not _of(replica.handle(p.PrimaryDisconnected(0.1, stalled=True)), p.ClaimLease)[0].proven_dead


def test_a_failed_claim_never_takes_over_and_a_claim_turns_primaries_away() -> None:
    replica = greeted_replica(primary_timeout=1.0)
    _epoch(replica, 1)
    replica.handle(p.ReplicaTick(2.0))
    assert replica.mode is p.ReplicaMode.CLAIMING
    assert replica.handle(p.EpochBegin(2.0, 2, 1, 1, True)) == []          # the old session changes nothing
    refused = replica.handle(p.Hello(2.1, 8, (1,)))
    assert _kinds(refused) == ["SendRefuse"] and refused[0].code is p.RefuseReason.BUSY
    commands = replica.handle(p.ClaimFailed(2.5, "the primary kept renewing its lease: it is alive"))
    assert not _of(commands, p.Failover) and replica.mode is p.ReplicaMode.WAITING
    assert not _of(replica.handle(p.PrimaryDisconnected(2.6)), p.ClaimLease)
    assert "AdoptSession" in _kinds(replica.handle(p.Hello(2.7, 9, (1,))))


def test_tokens_older_than_seen_or_mismatched_fencing_are_refused() -> None:
    replica = p.ReplicaProtocol()
    assert _kinds(replica.handle(p.Hello(0.0, 1, (1,), token=7))) == ["AdoptSession", "SendWelcome"]
    refused = replica.handle(p.Hello(0.1, 2, (1,), token=6))
    assert refused[0].code is p.RefuseReason.SUPERSEDED and replica.session == 1
    refused = replica.handle(p.Hello(0.1, 3, (1,), token=8, fencing_problem="this replica fences with etcd"))
    assert refused[0].code is p.RefuseReason.FENCING_MISMATCH and replica.session == 1
    commands = replica.handle(p.EpochBegin(0.2, 1, 1, 1, True, token=9))
    assert "SendRefuse" in _kinds(commands) and "token 9" in commands[-1].message
    # once active with its own token, an older primary is told to step down
    replica = p.ReplicaProtocol(p.ReplicaConfig(primary_timeout=1.0))
    replica.handle(p.Hello(0.0, 1, (1,), token=7))
    _epoch_with_token(replica, 1, token=7)
    takeover(replica, replica.handle(p.PrimaryDisconnected(0.1)), 0.1, token=11)
    refused = replica.handle(p.Hello(0.3, 4, (1,), token=7))
    assert refused[0].code is p.RefuseReason.SUPERSEDED and "11" in refused[0].detail


def _epoch_with_token(replica: p.ReplicaProtocol, epoch: int, token: int) -> None:
    replica.handle(p.EpochBegin(0.0, epoch, 1, 1, True, token=token))
    replica.handle(p.EpochPart(0.0, epoch, p.PartKind.PAGES, 1))
    replica.handle(p.EpochPart(0.0, epoch, p.PartKind.VCPU))
    replica.handle(p.EpochEnd(0.0, epoch, 1, 1))
    assert _kinds(replica.handle(p.Verified(0.0, epoch, True))) == ["SendAck"]


def test_a_replica_that_kept_its_copy_resumes_the_sync() -> None:
    replica = p.ReplicaProtocol(p.ReplicaConfig(supported_versions=(1, 2)))
    commands = replica.handle(p.Hello(0.0, 8, (1, 2), resumable=True))
    assert p.SendWelcome(2, 0, True) in commands
    commands = p.ReplicaProtocol(p.ReplicaConfig(supported_versions=(1, 2))).handle(
        p.Hello(0.0, 8, (1,), resumable=True))
    assert p.SendWelcome(1, 0, False) in commands             # version 1 cannot resume
    primary = p.PrimaryProtocol(p.PrimaryConfig())
    primary.handle(p.Start(0.0))
    commands = primary.handle(p.Welcomed(0.1, 2, 5, resumed=True))
    assert p.BeginSync(primary.next_epoch, True) in commands
    assert any("sync resumed" in c.message for c in _of(commands, p.Log))
