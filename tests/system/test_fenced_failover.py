"""Fencing with a real etcd, seen by real clients: a frozen primary never serves beside the node
that replaced it, a crash is still taken over at once, etcd down fences the active node without
losing anything, and without etcd a replica does not take over unless told it may split the brain.

The agents run as processes (kvstore guest, CURVE, redis-py clients); etcd is a real etcd that
the test starts (checkpointer.cluster.LocalEtcd), one per test where the test stops it.
"""

from __future__ import annotations

import shutil
import signal

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from checkpointer.cluster import LocalEtcd, free_port
from tests.support import Agents

pytestmark = [pytest.mark.kvm,
              pytest.mark.skipif(shutil.which("etcd") is None,
                                 reason="etcd is not installed (Debian: etcd-server; .ci/run installs it)")]
KVSTORE = ["--workload", "kvstore", "--vcpus", "1", "--memory-mib", "64", "--report-every", "50"]


@pytest.fixture
def etcd(tmp_path):
    with LocalEtcd(tmp_path / "etcd") as local:
        yield local


def pair(tmp_path, fencing: list[str]) -> Agents:
    agents = Agents(tmp_path / "pair", fencing=fencing)
    agents.primary_port, agents.replica_port = free_port(), free_port()
    agents.start("replica", agent=["--service-port", str(agents.replica_port)])
    agents.start("primary", agent=[*KVSTORE, "--service-port", str(agents.primary_port)])
    agents.wait("protection", lambda: agents.status("primary").get("protected"))
    return agents


def fenced_by(etcd: LocalEtcd, ttl_s: int = 1, key: str = "/colo-ring/test") -> list[str]:
    return ["--etcd", etcd.url, "--etcd-key", key, "--lease-ttl-s", str(ttl_s), "--lease-renew-ms", "100"]


def write_some(port: int, prefix: str, count: int = 60) -> dict[str, bytes]:
    client = redis.Redis(port=port, protocol=2, socket_timeout=10)
    acked = {}
    for i in range(count):
        key, value = f"{prefix}{i % 20}", f"{prefix}-{i}".encode()
        assert client.set(key, value)
        acked[key] = value
    client.close()
    return acked


def answers(port: int) -> bool:
    try:
        return redis.Redis(port=port, protocol=2, socket_timeout=2).ping()
    except (redis.ConnectionError, redis.TimeoutError):
        return False


def test_a_frozen_primary_is_replaced_and_never_acknowledges_beside_the_new_node(tmp_path, etcd) -> None:
    """The issue's own experiment: SIGSTOP the primary past its lease, then SIGCONT it."""
    agents = pair(tmp_path, fenced_by(etcd, ttl_s=1))
    try:
        acked = write_some(agents.primary_port, "before")
        late = redis.Redis(port=agents.primary_port, protocol=2, socket_timeout=8, retry=Retry(NoBackoff(), 0))
        late.ping()                                          # connected before the freeze
        first = agents.status("primary")["token"]
        agents.processes["primary"].send_signal(signal.SIGSTOP)
        try:
            agents.wait("the replica's takeover", lambda: agents.status("replica").get("role") == "active")
            assert agents.status("replica")["token"] > first          # a newer token: it took the key
            agents.wait("the service on the replica", lambda: answers(agents.replica_port))
        finally:
            agents.processes["primary"].send_signal(signal.SIGCONT)
        # the old primary wakes with its lease gone: it must not acknowledge anything any more
        with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
            late.set("k", "yes")
        agents.wait("the old primary stepping down", lambda: agents.processes["primary"].poll() is not None,
                    may_exit=("primary",))
        assert "superseded" in agents.log("primary"), agents.log("primary")
        standby = redis.Redis(port=agents.replica_port, protocol=2, socket_timeout=10)
        assert standby.get("k") is None
        for key, value in acked.items():
            assert standby.get(key) == value, f"acknowledged write to {key} lost"
    finally:
        agents.stop()


def test_a_crash_is_taken_over_by_revoking_the_dead_primarys_lease(tmp_path, etcd) -> None:
    """With a 30 s lease the replica could only be this quick by proof of death (fencing S3)."""
    agents = pair(tmp_path, fenced_by(etcd, ttl_s=30) + ["--lease-renew-ms", "1000"])
    try:
        acked = write_some(agents.primary_port, "crash")
        agents.kill("primary")
        agents.wait("the replica's takeover", lambda: agents.status("replica").get("takeover_ms") is not None,
                    timeout=20)
        status = agents.status("replica")
        assert status["takeover_ms"] < 20_000 and "revoked" in agents.log("replica")
        standby = redis.Redis(port=agents.replica_port, protocol=2, socket_timeout=10)
        for key, value in acked.items():
            assert standby.get(key) == value
    finally:
        agents.stop()


def test_etcd_down_fences_the_primary_and_loses_nothing(tmp_path, etcd) -> None:
    agents = pair(tmp_path, fenced_by(etcd, ttl_s=1))
    try:
        acked = write_some(agents.primary_port, "up")
        etcd.stop()
        agents.wait("the primary fencing itself", lambda: agents.status("primary").get("protection") == "fenced")
        client = redis.Redis(port=agents.primary_port, protocol=2, socket_timeout=1.5,
                             retry=Retry(NoBackoff(), 0))          # one try: redis-py retries by default
        with pytest.raises(redis.TimeoutError):
            client.set("during", "outage")                   # held: no node may acknowledge now
        assert agents.status("replica")["role"] == "replica"  # and nobody took over
        etcd.start()
        agents.wait("the primary serving again", lambda: agents.status("primary").get("protection") != "fenced")
        acked |= write_some(agents.primary_port, "after")
        # its lease ran out while etcd was down: it took the key again, and the replica's copy counts
        # only once it has synced again (the standby key says "none" until then)
        agents.wait("the primary protected again", lambda: agents.status("primary").get("protected"))
        agents.kill("primary")                               # the pair still fails over
        agents.wait("the replica's takeover", lambda: agents.status("replica").get("role") == "active")
        agents.wait("the service on the replica", lambda: answers(agents.replica_port))
        standby = redis.Redis(port=agents.replica_port, protocol=2, socket_timeout=10)
        for key, value in acked.items():
            assert standby.get(key) == value, f"acknowledged write to {key} lost"
    finally:
        agents.stop()


def test_without_etcd_a_replica_does_not_take_over_by_itself(tmp_path) -> None:
    agents = pair(tmp_path, fencing=[])
    try:
        write_some(agents.primary_port, "manual", 10)
        agents.kill("primary")
        agents.wait("the replica's decision", lambda: "not taking over" in agents.log("replica"))
        assert "no etcd configured" in agents.log("replica")
        assert agents.status("replica")["role"] == "replica" and not answers(agents.replica_port)
    finally:
        agents.stop()


def test_no_fencing_takes_over_on_a_crash_and_says_it_allows_split_brain(tmp_path) -> None:
    agents = pair(tmp_path, fencing=["--no-fencing"])
    try:
        acked = write_some(agents.primary_port, "unfenced", 20)
        assert "SPLIT BRAIN" in agents.log("replica")
        agents.kill("primary")
        agents.wait("the replica's takeover", lambda: agents.status("replica").get("role") == "active")
        agents.wait("the service on the replica", lambda: answers(agents.replica_port))
        standby = redis.Redis(port=agents.replica_port, protocol=2, socket_timeout=10)
        assert all(standby.get(key) == value for key, value in acked.items())
    finally:
        agents.stop()
