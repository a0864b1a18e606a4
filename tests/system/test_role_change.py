"""A node's role changes over its guest: the guest a replica took over is protected by a new primary.

This is the shape re-protection needs (a replica becomes active, then primary of the next
replica): the guest outlives the role. Here a KVM guest runs, is captured into a standby (as a
replica holds it), is restored by replica.failover as the taken-over guest, and is handed, running
on, to a primary role in this process, which syncs it to a replica process and protects it. The
guest continues from where it was captured, and the replica's copy follows it.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from checkpointer.agent import PrimaryAgent
from checkpointer.cluster import Cluster
from checkpointer.config import load_config
from replica.failover import restore_standby
from replica.standby import Standby
from ring.backend import open_machine
from ring.machine import MachineConfig
from ring.workloads import Workload
from tests.support import TIMING, fencing_flags, fencing_settings

pytestmark = pytest.mark.kvm

CAPTURED_WRITES = 3000


def _taken_over_guest() -> tuple[Standby, int]:
    """A standby holding a guest captured after CAPTURED_WRITES writes, as a replica would hold it."""
    config = MachineConfig(vcpus=1, data_bytes=16 << 20, ring_entries=1024)
    with open_machine(config, Workload("hotcold", seed=3, report_every=500), backend="kvm") as vm:
        vm.run_to_limit(CAPTURED_WRITES)                   # starts with the limit set; paused at it
        standby = Standby(config.slot_specs())
        for slot, memory in vm.memory.slots.items():
            standby.memory.slots[slot].pages[:] = memory.pages
        standby.vcpus = vm.capture_vcpus()
        progress = sum(vm.progress_all())
    return standby, progress


@pytest.mark.asyncio
async def test_a_taken_over_guest_is_protected_by_a_new_primary_role(tmp_path) -> None:
    standby, captured = _taken_over_guest()
    assert captured == CAPTURED_WRITES
    fencing = fencing_flags()
    cluster = Cluster(tmp_path, common=[*TIMING, *fencing])
    agent = None
    try:
        cluster.start_replica()
        guest = restore_standby(standby, service_host="127.0.0.1", service_port=0, track_dirty=True)
        guest.machine.set_limits(10**12)                   # the captured limit no longer holds it
        config = load_config("primary", None, {
            "primary.replica": cluster.endpoint, "security.keys_dir": str(cluster.keys),
            "security.peer_public_key": str(cluster.keys / "replica.key"), "guest.vcpus": 1,
            "guest.memory_mib": 16, "triggers.max_interval_ms": 20.0,
            "replication.heartbeat_ms": 20, "replication.timeout_ms": 2000, **fencing_settings(fencing)})
        agent = PrimaryAgent(config, guest=guest)
        assert agent.machine is guest.machine and sum(agent.machine.progress_all()) == captured   # not rebuilt
        running = asyncio.ensure_future(agent.run())

        async def until(what: str, predicate) -> None:
            """Wait for a state on this loop (the primary runs on it: a blocking wait would starve it)."""
            deadline = time.monotonic() + 60
            while not predicate():
                assert not running.done(), f"the primary role stopped: {agent.last_error}"
                assert time.monotonic() < deadline, f"timed out waiting for {what}: {agent.status()}"
                await asyncio.sleep(0.02)

        await until("protection", lambda: agent.protocol.protected
                    and agent.protocol.acked_epoch >= agent.protocol.final_sync_epoch + 5)
        assert agent.status()["guest_progress"] > captured   # it ran on from the capture, not from zero
        # (a pre-copy batch may carry the guest's progress past the capture before the final copy
        # commits: the status file then says so with committed_epoch below final_sync_epoch)
        seen: dict = {}

        def past_the_capture() -> bool:
            seen.update(cluster.status("replica"))
            return (seen.get("guest_progress", 0) > captured
                    and seen.get("committed_epoch", 0) >= agent.protocol.final_sync_epoch)

        await until("the replica's copy past the capture, in a consistent epoch", past_the_capture)
        replica = seen
        assert replica["committed_epoch"] >= agent.protocol.final_sync_epoch and replica["mode"] == "receiving"
        agent.stop()
        await asyncio.wait_for(running, 30)
        assert agent.last_error is None
    finally:
        if agent is not None:
            agent.stop()
        cluster.close()
        standby.close()
