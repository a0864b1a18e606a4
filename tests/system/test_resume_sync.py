"""A replica lost in the middle of its initial sync resumes it from what it holds (agents in separate
processes, CURVE over loopback, a real redis-py client filling the kvstore guest's memory first)."""

from __future__ import annotations

import signal

import pytest
import redis

from checkpointer.cluster import free_port
from tests.support import Agents

pytestmark = pytest.mark.kvm

VALUE = b"v" * 60000                     # 15 pages a value, each one distinct below
KEYS = 300                               # about 17 MiB of values: 4,500 pages to copy


def test_a_replica_lost_during_its_sync_resumes_it_and_its_copy_is_exact(tmp_path) -> None:
    agents = Agents(tmp_path)
    port = free_port()
    try:
        # the guest first: its memory filled by a client while no replica listens (unprotected)
        agents.start("primary", agent=["--workload", "kvstore", "--service-port", str(port), "--vcpus", "1",
                                       "--memory-mib", "64", "--report-every", "50",
                                       "--precopy-epoch-pages", "64"])
        agents.wait("the service", lambda: agents.status("primary").get("guest_progress") is not None)
        client = redis.Redis(port=port, protocol=2, socket_timeout=20)
        for i in range(KEYS):
            assert client.set(f"k{i}", VALUE[:-8] + b"%08d" % i)
        # a replica whose acks come slowly, so that the sync takes seconds
        agents.start("replica", harness=["--ack-delay-ms", "60"])
        first = agents.wait("a third of the sync copied", lambda: (s := agents.status("primary").get("sync"))
                            and s["state"] == "pre-copy" and s["copied_pages"] > s["resident_pages"] // 3 and s)
        agents.processes["replica"].send_signal(signal.SIGSTOP)          # silent past the timeout
        try:
            agents.wait("the primary dropping it", lambda: agents.status("primary").get("mode") == "connecting")
        finally:
            agents.processes["replica"].send_signal(signal.SIGCONT)
        agents.wait("protection", lambda: agents.status("primary").get("protected"), timeout=120)
        resumed = agents.status("primary")["sync"]
        assert resumed["resumed"] is True, (
            "the sync was not resumed:\n--- primary\n" + (agents.logs / "primary.log").read_text()[-4000:]
            + "\n--- replica\n" + (agents.logs / "replica.log").read_text()[-4000:])
        # it copied again what the first sync had not sent, not the whole memory
        assert resumed["resident_pages"] < first["resident_pages"] - first["copied_pages"] // 2, (first, resumed)
        assert "sync resumed from the copy it kept" in (agents.logs / "primary.log").read_text()
        assert "resuming: the standby keeps its copy" in (agents.logs / "replica.log").read_text()
        # exact: the standby equals the primary's memory and vCPUs at each consistent epoch after it
        assert client.set("after", b"resume")
        agents.wait("consistent commits", lambda: len(agents.records("replica")) >= 5)
        agents.stop()
        primary, replica = agents.records("primary"), agents.records("replica")
        for epoch, mine in replica.items():
            assert mine["memory"] == primary[epoch]["memory"], f"standby memory differs at epoch {epoch}"
            assert mine["vcpus"] == primary[epoch]["vcpus"], f"vCPU state differs at epoch {epoch}"
        client.close()
    finally:
        agents.close()
