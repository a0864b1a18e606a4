"""System tests: the primary and the replica as separate processes over loopback TCP with CURVE.

Conditions are waited for by reading the agents' status files until a deadline
(a real wait for a state, not a sleep standing in for one).
"""

from __future__ import annotations

import signal

import pytest

from checkpointer.faults import KillPoint
from tests.support import Agents


pytestmark = pytest.mark.kvm


def test_replica_equals_primary_at_every_acknowledged_epoch(agents: Agents) -> None:
    agents.start("replica")
    agents.start("primary")
    agents.wait("protection", lambda: agents.status("primary").get("protected"))
    agents.wait("30 consistent commits", lambda: len(agents.records("replica")) >= 30)
    agents.stop()
    assert agents.processes["primary"].returncode == 0, agents.log("primary")
    primary, replica = agents.records("primary"), agents.records("replica")
    assert len(replica) >= 30
    for epoch, mine in replica.items():
        theirs = primary[epoch]
        assert mine["memory"] == theirs["memory"], f"standby memory differs at epoch {epoch}"
        assert mine["vcpus"] == theirs["vcpus"], f"vCPU state differs at epoch {epoch}"
        assert mine["progress"] == theirs["progress"]
    assert agents.status("replica")["role"] == "replica"           # BYE: no failover


@pytest.mark.parametrize("point", list(KillPoint))
def test_sigkill_of_the_primary_fails_over_to_the_last_complete_epoch(agents: Agents, point: KillPoint) -> None:
    agents.start("replica")
    primary = agents.start("primary", harness=["--kill-at", f"{point}:8"], agent=["--report-every", "2000"])
    agents.wait("the primary's death", lambda: primary.poll() is not None, timeout=60)
    assert primary.returncode == -signal.SIGKILL, agents.log("primary")
    status = agents.wait("takeover", lambda: (s := agents.status("replica")).get("takeover_ms") and s,
                         may_exit=("primary",))
    assert status["role"] == "active"
    primary_records, replica_records = agents.records("primary"), agents.records("replica")
    committed = max(replica_records)
    assert status["consistent_epoch"] == committed
    target = int((agents.tmp / "primary.jsonl.target").read_text())
    if point is KillPoint.END:
        assert committed in (target - 1, target)   # END left: the replica may have committed it
    elif point is KillPoint.ACKED:
        assert committed >= target
    else:
        assert committed == target - 1        # died before END: the epoch was discarded whole
    assert replica_records[committed]["memory"] == primary_records[committed]["memory"]
    assert replica_records[committed]["vcpus"] == primary_records[committed]["vcpus"]
    checkpointed = primary_records[committed]["progress"]
    assert replica_records[committed]["progress"] == checkpointed
    # the standby guest continues from the checkpointed value, and advances
    agents.wait("the standby guest's progress", lambda: agents.status("replica")["guest_progress"]
                > checkpointed + 20000, may_exit=("primary",))
    assert status["takeover_ms"] > 0                 # measured (its figure is the drill's to report)


def test_slow_replica_throttles_the_primary_and_loses_nothing(agents: Agents) -> None:
    agents.start("replica", harness=["--ack-delay-ms", "60", "--hold-acks"])
    agents.start("primary", agent=["--max-in-flight", "2"])
    agents.wait("protection", lambda: agents.status("primary").get("protected"))
    agents.wait("10 consistent commits", lambda: len(agents.records("replica")) >= 10)
    early = agents.wait("a status", lambda: agents.status("primary").get("rss_mib"))
    # A replica that stops acknowledging (whatever this machine's speed): the primary fills its
    # two places in flight, then holds the guest instead of queueing more epochs.
    agents.processes["replica"].send_signal(signal.SIGUSR2)
    agents.wait("the replica holding its acks", lambda: (agents.tmp / "replica.jsonl.holding").exists())
    agents.next_status("primary")             # may have been written before the acks were held
    agents.wait("two epochs in flight", lambda: agents.status("primary").get("in_flight") == 2)
    held, later = agents.next_status("primary"), agents.next_status("primary")
    assert held["held"] > 0 and held["in_flight"] == later["in_flight"] == 2
    assert later["epoch"] == held["epoch"], "epochs went out unacknowledged"
    assert later["guest_progress"] == held["guest_progress"], "the guest ran on while held"
    agents.processes["replica"].send_signal(signal.SIGUSR2)         # acks flow again (60 ms each)
    agents.wait("40 consistent commits", lambda: len(agents.records("replica")) >= 40)
    status = agents.status("primary")
    assert status["in_flight"] <= 2
    assert status["rss_mib"] - early < 64, f"primary memory grew from {early} to {status['rss_mib']} MiB"
    agents.stop()
    primary, replica = agents.records("primary"), agents.records("replica")
    epochs = sorted(replica)
    assert epochs == list(range(epochs[0], epochs[-1] + 1)), "an epoch was dropped or reordered"
    for epoch in epochs:
        assert replica[epoch]["memory"] == primary[epoch]["memory"], f"epoch {epoch} differs"


def test_replica_loss_leaves_the_guest_running_and_a_new_replica_resyncs(agents: Agents) -> None:
    agents.start("replica")
    agents.start("primary")
    agents.wait("protection", lambda: agents.status("primary").get("protected"))
    agents.kill("replica")
    agents.wait("the primary noticing", lambda: agents.status("primary").get("mode") == "connecting")
    unprotected = agents.status("primary")
    assert not unprotected["protected"]
    assert "UNPROTECTED" in agents.log("primary")
    agents.wait("the guest running on", lambda: agents.status("primary")["guest_progress"]
                > unprotected["guest_progress"] + 10000)
    (agents.tmp / "replica.jsonl").unlink(missing_ok=True)
    agents.start("replica")
    agents.wait("protection again", lambda: agents.status("primary").get("protected"))
    agents.wait("consistent commits after the resync", lambda: len(agents.records("replica")) >= 5)
    agents.stop()
    primary, replica_records = agents.records("primary"), agents.records("replica")
    for epoch, mine in replica_records.items():
        assert mine["memory"] == primary[epoch]["memory"], f"epoch {epoch} differs after the resync"
