"""The agents as processes with the primary's guest on the simulated backend: no /dev/kvm needed.

Not marked `kvm`, so it runs on every host (tests under tests/system are skipped only when
marked). The simulated ring keeps the kernel's entry layout and reset rule, so the primary's
harvest, snapshot, encoding and the whole stream to the replica are the code that runs on KVM.
No failover here: the replica's failover VM is a KVM guest.
"""

from __future__ import annotations

from tests.support import Agents

SIM = ["--backend", "sim"]


def test_replica_equals_a_simulated_primary_at_every_acknowledged_epoch(agents: Agents) -> None:
    agents.start("replica")
    agents.start("primary", agent=SIM)
    agents.wait("protection", lambda: agents.status("primary").get("protected"))
    agents.wait("20 consistent commits", lambda: len(agents.records("replica")) >= 20)
    acknowledged = agents.status("primary")["committed_epoch"]
    agents.stop()
    assert agents.processes["primary"].returncode == 0, agents.log("primary")
    assert "backend sim" in agents.log("primary", tail=0), "the primary did not run on the simulator"
    primary, replica = agents.records("primary"), agents.records("replica")
    assert len(replica) >= 20 and max(replica) >= acknowledged
    # every epoch the primary checkpointed once protected, up to the last one committed, is on
    # the replica: none skipped, each byte for byte (memory, vCPU state, the guest's progress)
    protected = sorted(e for e in primary if e >= min(replica) and e <= max(replica))
    assert sorted(replica) == protected, "a checkpoint is missing on the replica"
    for epoch, mine in replica.items():
        theirs = primary[epoch]
        assert mine["memory"] == theirs["memory"], f"standby memory differs at epoch {epoch}"
        assert mine["vcpus"] == theirs["vcpus"], f"vCPU state differs at epoch {epoch}"
        assert mine["progress"] == theirs["progress"], f"guest progress differs at epoch {epoch}"
    assert len({r["progress"] for r in replica.values()}) > 1, "the simulated guest never ran"
    assert agents.status("replica")["role"] == "replica"           # an orderly stop: no failover
