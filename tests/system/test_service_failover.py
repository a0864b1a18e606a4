"""The protected kvstore service: output commit seen from a client, and acknowledged writes surviving
a SIGKILL of the primary (agents in separate processes, CURVE over loopback, redis-py clients)."""

from __future__ import annotations

import signal
import socket as pysocket

import pytest
import redis

from checkpointer.cluster import free_port
from tests.support import Agents

pytestmark = pytest.mark.kvm


@pytest.fixture
def service(tmp_path):
    agents = Agents(tmp_path)
    agents.primary_port, agents.replica_port = free_port(), free_port()
    yield agents
    agents.stop()


def start(agents: Agents, replica_harness: list[str] = ()) -> None:
    agents.start("replica", harness=list(replica_harness), agent=["--service-port", str(agents.replica_port)])
    agents.start("primary", agent=["--workload", "kvstore", "--service-port", str(agents.primary_port),
                                   "--vcpus", "1", "--memory-mib", "64", "--report-every", "50"])
    agents.wait("protection", lambda: agents.status("primary").get("protected"))


def test_no_reply_reaches_the_client_before_its_epoch_is_acknowledged(service: Agents) -> None:
    start(service, replica_harness=["--hold-acks"])
    client = pysocket.create_connection(("127.0.0.1", service.primary_port), timeout=5)
    client.sendall(b"PING\r\n")
    assert client.recv(100) == b"+PONG\r\n"                      # acks flow: replies come
    service.processes["replica"].send_signal(signal.SIGUSR2)      # the replica now holds its acks
    service.wait("the replica holding its acks", lambda: (service.tmp / "replica.jsonl.holding").exists())
    client.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nvalue\r\n")
    # the guest has answered (the primary holds the reply's bytes) and the client has nothing
    service.wait("the reply held by the primary",
                 lambda: service.status("primary").get("held_output_bytes", 0) >= len(b"+OK\r\n"))
    client.setblocking(False)
    with pytest.raises(BlockingIOError):
        client.recv(100)
    service.processes["replica"].send_signal(signal.SIGUSR2)      # the test lets the acks go
    client.settimeout(10)
    assert client.recv(100) == b"+OK\r\n"
    client.close()


def test_acknowledged_writes_survive_a_sigkill_of_the_primary(service: Agents) -> None:
    start(service)
    primary = redis.Redis(port=service.primary_port, protocol=2, socket_timeout=10)
    acked: dict[str, bytes] = {}
    counter = 0
    for i in range(150):
        key, value = f"key{i % 40}", f"value{i}".encode()
        assert primary.set(key, value)
        acked[key] = value
        counter = primary.incr("counter")
    primary.close()
    # the claim needs its premise: the replica was never dropped, so every reply waited for its ack
    assert "replica lost" not in (service.logs / "primary.log").read_text(), service.log("primary")
    service.kill("primary")
    service.wait("the replica's takeover", lambda: service.status("replica").get("role") == "active")
    standby = redis.Redis(port=service.replica_port, protocol=2, socket_timeout=10)

    def reachable():
        try:
            return standby.ping()
        except redis.ConnectionError:
            return False
    service.wait("the service on the replica", reachable)
    for key, value in acked.items():
        assert standby.get(key) == value, f"acknowledged write to {key} lost"
    assert int(standby.get("counter")) >= counter
    assert standby.incr("counter") == int(standby.get("counter"))     # and it keeps serving
