"""colo-node: two nodes of one pair as processes, roles from a real etcd, re-protection after every
failover, and clients that never know which node is active (redis-py's Sentinel asks the pair's
discovery endpoints). Every write a client saw acknowledged must be there after each failover.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from checkpointer.cluster import Cluster, LocalEtcd, endpoint, free_port
from checkpointer.security import generate_keys
from pair.node import PairNode, pair_file
from scenarios.drill import GUEST

pytestmark = [pytest.mark.kvm,
              pytest.mark.skipif(shutil.which("etcd") is None,
                                 reason="etcd is not installed (Debian: etcd-server; .ci/run installs it)")]
NODES = ("a", "b")


class Pair:
    """Two colo-node processes sharing one pair file, an etcd, and the tests' records of writes."""

    def __init__(self, folder: Path, etcd: LocalEtcd) -> None:
        self.cluster = Cluster(folder)
        keys = folder / "node-keys"
        for name in NODES:
            generate_keys(keys, name)
        self.sentinels = {name: ("127.0.0.1", free_port()) for name in NODES}
        self.services = {name: free_port() for name in NODES}
        self.file = folder / "pair.toml"
        self.file.write_text(pair_file({
            "guest": GUEST, "replication": {"heartbeat_ms": 20, "timeout_ms": 1000},
            "security": {"keys_dir": str(keys)},
            "fencing": {"etcd": etcd.url, "key": "/colo-ring/node-test", "ttl_s": 1, "renew_ms": 100}},
            [PairNode(name, endpoint(), "127.0.0.1", self.services[name], self.sentinels[name]) for name in NODES]))
        self.acked: dict[str, bytes] = {}
        self.counter = 0

    def start(self, name: str) -> None:
        self.cluster.start_process(name, "pair.node", ["--config", str(self.file), "--name", name,
                                                      "--status-json", str(self.cluster.status_path(name))])

    def role(self, name: str) -> str | None:
        return self.cluster.status(name).get("node_role") if self.cluster.agents[name].running() else None

    def wait_protected(self, primary: str) -> None:
        self.cluster.wait(f"{primary} protecting its peer",
                          lambda: self.role(primary) == "primary" and self.cluster.status(primary).get("protected"),
                          timeout=90)

    def client(self) -> redis.Redis:
        """A client that is told only the discovery endpoints, never which node serves."""
        sentinel = Sentinel(list(self.sentinels.values()), socket_timeout=5)
        return sentinel.master_for("colo", protocol=2, socket_timeout=5, retry=Retry(NoBackoff(), 0))

    def write(self, tag: str, count: int = 40) -> None:
        client = self.client()
        for i in range(count):
            key, value = f"{tag}{i % 10}", f"{tag}-{i}".encode()
            assert client.set(key, value)
            self.acked[key] = value
            self.counter = client.incr("counter")
        client.close()

    def verify(self) -> None:
        def served() -> bool:
            try:
                return self.client().ping()
            except (redis.ConnectionError, redis.TimeoutError, redis.sentinel.MasterNotFoundError):
                return False
        self.cluster.wait("the service through the discovery endpoint", served, may_exit=NODES)
        client = self.client()
        for key, value in self.acked.items():
            assert client.get(key) == value, f"acknowledged write to {key} lost"
        assert int(client.get("counter")) >= self.counter
        client.close()


@pytest.fixture
def pair(tmp_path):
    with LocalEtcd(tmp_path / "etcd") as etcd:
        running = Pair(tmp_path, etcd)
        yield running
        running.cluster.stop()


def test_the_pair_reprotects_itself_after_crashes_and_a_freeze_in_either_direction(pair: Pair) -> None:
    pair.start("a")
    pair.cluster.wait("a to take the fresh pair", lambda: pair.role("a") == "primary")
    pair.start("b")
    pair.wait_protected("a")
    pair.write("one")
    # a crash of the active node: b takes over and waits for a peer; a restarted joins it
    pair.cluster.kill("a")
    pair.cluster.wait("b to take over", lambda: pair.role("b") == "primary", may_exit=("a",))
    pair.verify()
    pair.write("two")                                   # served unprotected, still acknowledged
    pair.start("a")
    pair.wait_protected("b")
    pair.write("three")
    # the other direction
    pair.cluster.kill("b")
    pair.cluster.wait("a to take over", lambda: pair.role("a") == "primary", may_exit=("b",))
    pair.verify()
    pair.start("b")
    pair.wait_protected("a")
    pair.write("four")
    # a freeze past the lease: b replaces a; a, woken, steps down and becomes b's replica
    process = pair.cluster.agents["a"].process
    process.send_signal(signal.SIGSTOP)
    try:
        pair.cluster.wait("b to take over from the frozen a", lambda: pair.role("b") == "primary")
    finally:
        process.send_signal(signal.SIGCONT)
    pair.verify()
    pair.wait_protected("b")
    pair.cluster.wait("a as b's replica", lambda: pair.role("a") == "replica")
    changes = pair.cluster.status("b")["role_changes"]
    assert [c["role"] for c in changes][-2:] == ["replica", "primary"]
    tokens = [c["token"] for c in changes if c["role"] == "primary"]
    assert tokens == sorted(tokens)
    status = pair.cluster.status("b")
    retaken = [change["token"] for change in status["fencing"]["changes"] if change["what"] == "retaken"]
    # its token is the one it took over with, or one it took again after its own lease lapsed
    # (a loaded machine) while nobody else held the key
    assert status["token"] == (retaken[-1] if retaken and retaken[-1] > tokens[-1] else tokens[-1])
    pair.write("five")
    pair.verify()
