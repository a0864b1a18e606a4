"""The pair's fault suite across real network namespaces: hosts a and b run colo-node, w runs
etcd, c runs the clients (scenarios/clients.py), which know only the pair's Sentinel endpoints.

Every fault ends the same way: the clients stop and verify, from c, that no acknowledged write is
lost and that no node acknowledged a request sent after a node of a newer era had answered one
(the eras are gathered from both nodes' status files all through the test: a restarted node
starts a new file). Each test also asserts what its fault must do: who takes over and when, who
must not, what is fenced, and that the pair protects itself again.

Timing: TTL 1 s, renewal every 100 ms, replication timeout 1 s. A fault that must last a while
(a freeze, a partition, etcd down past the lease) is held for a fixed duration: that is the
fault's length, not a wait for a state. Every state is waited for by polling with a deadline,
and a wait that fails shows the nodes' log tails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from checkpointer.cluster import LocalEtcd
from checkpointer.security import generate_keys
from pair.node import PairNode, pair_file
from scenarios.clients import Ack, Eras, load_workers
from scenarios.drill import GUEST
from tests import netns
from tests.netns import Network

pytestmark = [pytest.mark.kvm,
              pytest.mark.skipif(shutil.which("etcd") is None,
                                 reason="etcd is not installed (Debian: etcd-server; .ci/run installs it)")]

ROOT = Path(__file__).resolve().parents[2]
NODES = ("a", "b")
REPLICATION_PORT, SERVICE_PORT, SENTINEL_PORT = 7800, 6379, 26379    # each host has its own ports
ETCD_CLIENT_PORT, ETCD_PEER_PORT = 2379, 2380
TTL_S = 1
TIMEOUT_S = 1.0                  # [replication] timeout_ms
PAST_THE_LEASE_S = TTL_S + TIMEOUT_S + 1.0     # how long a freeze or a partition lasts
POLL_S = 0.05
LOG_TAIL = 3000

T = TypeVar("T")


class PairError(AssertionError):
    pass


class NetPair:
    """colo-node a and b, etcd in w and the clients in c, on one Network; the status files read
    all along (eras, role histories) and every fact the tests assert kept with its time."""

    def __init__(self, network: Network, folder: Path) -> None:
        self.net = network
        self.folder = folder
        self.ip = {host: network.address(host) for host in network.hosts}
        keys = folder / "keys"
        for name in NODES:
            generate_keys(keys, name)
        self.etcd = LocalEtcd(folder / "etcd", self.ip["w"], client_port=ETCD_CLIENT_PORT,
                              peer_port=ETCD_PEER_PORT, prefix=network.command("w", []))
        self.file = folder / "pair.toml"
        self.file.write_text(pair_file({
            "guest": GUEST, "replication": {"heartbeat_ms": 20, "timeout_ms": int(TIMEOUT_S * 1000)},
            "security": {"keys_dir": str(keys)},
            "status": {"log_interval_s": 0.2},                      # the status file every 0.2 s too
            "fencing": {"etcd": self.etcd.url, "key": "/colo-ring/netns", "ttl_s": TTL_S, "renew_ms": 100}},
            [PairNode(name, f"tcp://{self.ip[name]}:{REPLICATION_PORT}", self.ip[name], SERVICE_PORT,
                      (self.ip[name], SENTINEL_PORT)) for name in NODES]))
        self.service = {name: (self.ip[name], SERVICE_PORT) for name in NODES}
        self.processes: dict[str, subprocess.Popen] = {}
        self.expected_exit: set[str] = set()
        self.clients: subprocess.Popen | None = None
        self.records = folder / "records.json"
        # gathered from the status files by a thread, all through the test
        self.eras = Eras()
        self.history: dict[str, list[tuple[float, str, str]]] = {n: [] for n in NODES}  # (time, node_role, protection)
        self._lock = threading.Lock()
        self._watching = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)

    # -- the processes -----------------------------------------------------------------------
    def status_path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def log_path(self, name: str) -> Path:
        return self.folder / f"{name}.log"

    def start(self, name: str) -> None:
        self.status_path(name).unlink(missing_ok=True)      # a dead run's status is not this one's
        with open(self.log_path(name), "ab") as log:
            self.processes[name] = self.net.popen(
                name, [sys.executable, "-m", "pair.node", "--config", str(self.file), "--name", name,
                       "--status-json", str(self.status_path(name))],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.expected_exit.discard(name)

    def signal(self, name: str, signum: int) -> None:
        """Signal the node's process group (it leads one)."""
        os.killpg(self.processes[name].pid, signum)

    def kill(self, name: str) -> tuple[float, float]:
        """SIGKILL the node; returns when (wall clock) the signal went and when the process was gone."""
        self.expected_exit.add(name)
        at = time.time()
        self.signal(name, signal.SIGKILL)
        self.processes[name].wait(10)
        return at, time.time()

    def start_clients(self) -> None:
        sentinels = ",".join(f"{self.ip[n]}:{SENTINEL_PORT}" for n in NODES)
        with open(self.log_path("clients"), "ab") as log:
            self.clients = self.net.popen("c", [sys.executable, "-m", "scenarios.clients", "run", "--sentinels",
                                                sentinels, "--out", str(self.records)],
                                          cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.wait("the clients to start", lambda: "clients running" in self.log_path("clients").read_text()
                  or self.clients.poll() is not None)
        assert self.clients.poll() is None, f"the clients exited: {self.log_path('clients').read_text()}"

    def stop_clients(self) -> list:
        self.clients.send_signal(signal.SIGTERM)
        self.clients.wait(60)
        assert self.clients.returncode == 0, \
            f"the clients failed ({self.clients.returncode}): {self.log_path('clients').read_text()[-LOG_TAIL:]}"
        return load_workers(str(self.records))

    # -- the status files --------------------------------------------------------------------
    def status(self, name: str) -> dict:
        try:
            return json.loads(self.status_path(name).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _watch(self) -> None:
        while not self._watching.is_set():
            self.observe()
            self._watching.wait(POLL_S)

    def observe(self) -> None:
        for name in NODES:
            status = self.status(name)
            if not status:
                continue
            with self._lock:
                self.eras.observe(status)
                entry = (time.time(), status.get("node_role"), status.get("protection"))
                if not self.history[name] or self.history[name][-1][1:] != entry[1:]:
                    self.history[name].append(entry)

    def roles_since(self, name: str, since: float) -> set[str]:
        """Every node_role the node's status showed since `since` (wall clock), and the one before."""
        with self._lock:
            seen = self.history[name]
            before = [e for e in seen if e[0] < since][-1:]
            return {role for _, role, _ in before + [e for e in seen if e[0] >= since]}

    def protections_since(self, name: str, since: float) -> list[str]:
        """Every protection state the node's status showed since `since`, and the one before."""
        with self._lock:
            seen = self.history[name]
            before = [e for e in seen if e[0] < since][-1:]
            return [p for _, _, p in before + [e for e in seen if e[0] >= since] if p]

    def role(self, name: str) -> str | None:
        if self.processes.get(name) is None or self.processes[name].poll() is not None:
            return None
        return self.status(name).get("node_role")

    def released(self, name: str) -> int:
        status = self.status(name)
        return status.get("released_output_bytes", 0) if status.get("node_role") == "primary" else 0

    def protected(self, name: str) -> bool:
        status = self.status(name)
        return self.role(name) == "primary" and status.get("protection") == "protected"

    # -- waiting -----------------------------------------------------------------------------
    def log_tails(self) -> str:
        parts = []
        for name in (*NODES, "clients", "etcd"):
            path = self.log_path(name) if name != "etcd" else self.folder / "etcd" / "etcd.log"
            try:
                text = path.read_text(errors="replace")
            except FileNotFoundError:
                continue
            # the agents' periodic figures (every 0.2 s here) would hide what happened
            events = "".join(line for line in text.splitlines(keepends=True) if " ckpt/s" not in line)
            parts.append(f"--- {name} ({path}, periodic figures left out)\n{events[-LOG_TAIL:]}")
        return "\n".join(parts)

    def wait(self, what: str, predicate: Callable[[], T], timeout: float = 30.0) -> T:
        """Poll `predicate` until it is true (returns its value); fail at the deadline, or as soon as
        a node that should run has exited, with the nodes' log tails."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            for name, process in self.processes.items():
                if name not in self.expected_exit and process.poll() is not None:
                    raise PairError(f"node {name} exited ({process.returncode}) while waiting for {what}\n"
                                    f"{self.log_tails()}")
            if time.monotonic() >= deadline:
                raise PairError(f"timed out after {timeout} s waiting for {what}\n{self.log_tails()}")
            time.sleep(POLL_S)

    def wait_protected(self, primary: str, timeout: float = 60.0) -> float:
        """Wait until `primary` protects the pair (the other node its replica); returns when."""
        peer = next(n for n in NODES if n != primary)
        self.wait(f"{primary} protecting the pair with {peer} as its replica",
                  lambda: self.protected(primary) and self.role(peer) == "replica", timeout)
        return time.time()

    def wait_serving(self, name: str, more: int = 2000, timeout: float = 30.0) -> None:
        """Wait until `name`, as primary, has released `more` bytes of replies beyond what it had now
        (the clients are being answered)."""
        start = self.released(name)
        self.wait(f"{name} to answer clients ({more} more bytes of replies)",
                  lambda: self.released(name) >= start + more, timeout)

    def became_primary_at(self, name: str, after: float) -> float:
        """When (wall clock) the node's status says it became primary after `after`."""
        changes = self.status(name).get("role_changes", [])
        return min(c["at"] for c in changes if c["role"] == "primary" and c["at"] >= after)

    # -- the whole ---------------------------------------------------------------------------
    def bring_up(self) -> None:
        """etcd, a (takes the fresh pair), b (its replica), protection, clients answered by a."""
        self.etcd.start()
        self._watcher.start()
        self.start("a")
        self.wait("a to take the fresh pair", lambda: self.role("a") == "primary")
        self.start("b")
        started = time.time()
        protected = self.wait_protected("a")
        print(f"a protected {protected - started:.2f} s after b started")
        self.start_clients()
        self.wait_serving("a")

    def finish(self) -> tuple[list[Ack], dict]:
        """Stop the clients, verify from c; returns every acknowledgement and the verdict."""
        workers = self.stop_clients()
        self.observe()
        eras = self.folder / "eras.json"
        with self._lock:
            eras.write_text(json.dumps([[e.node, e.token, e.start] for e in self.eras.eras]))
        nodes = ",".join(f"{n}={self.ip[n]}:{SERVICE_PORT}" for n in NODES)
        done = subprocess.run(self.net.command("c", [sys.executable, "-m", "scenarios.clients", "verify",
                                                     "--records", str(self.records), "--eras", str(eras),
                                                     "--nodes", nodes]),
                              cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
        try:
            report = json.loads(done.stdout.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            raise PairError(f"verify printed no verdict ({done.returncode}): {done.stdout}{done.stderr}\n"
                            f"{self.log_tails()}") from None
        acks = [ack for worker in workers for ack in worker.acks]
        print(f"verdict: {report['acked_writes']} acknowledged writes, {len(acks)} acknowledgements, "
              f"eras {[(e.node, e.token) for e in self.eras.eras]}")
        assert report["lost_writes"] == 0 and not report["problems"], f"writes lost: {report}\n{self.log_tails()}"
        assert not report["dual_active"], f"two active nodes: {report['dual_active']}\n{self.log_tails()}"
        assert done.returncode == 0, f"verify failed: {done.stdout}{done.stderr}"
        assert report["acked_writes"] > 0 and acks, "the clients were never answered"
        return acks, report

    def acks_of(self, acks: list[Ack], name: str, start: float = 0.0, end: float = float("inf"),
                sent_after: float = 0.0) -> list[Ack]:
        """The acknowledgements from `name` received within [start, end] (wall clock), of requests
        sent after `sent_after`."""
        return [a for a in acks if tuple(a.node) == self.service[name] and start <= a.received <= end
                and a.sent >= sent_after]

    def close(self) -> None:
        self._watching.set()
        if self._watcher.is_alive():
            self._watcher.join(5)
        for process in self.processes.values():
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGCONT)       # a frozen node cannot stop
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for process in self.processes.values():
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.etcd.stop()


@pytest.fixture
def pair(tmp_path) -> Iterator[NetPair]:
    netns.require()
    with Network("a", "b", "w", "c") as network:
        running = NetPair(network, tmp_path)
        try:
            running.bring_up()
            yield running
        finally:
            running.close()


def hold(seconds: float, start: float) -> None:
    """Keep a fault in place until `start + seconds` (the fault's length, not a wait for a state)."""
    time.sleep(max(0.0, start + seconds - time.time()))


# -- the faults ------------------------------------------------------------------------------------

def test_kill_the_primary_then_the_new_primary(pair: NetPair) -> None:
    """Faults 1 and 8: SIGKILL the active node; the peer takes over; the killed one, restarted,
    rejoins as the replica and the pair is protected again; then the same the other way."""
    token_a = pair.status("a")["token"]
    killed, a_dead = pair.kill("a")
    pair.wait("b to take over", lambda: pair.role("b") == "primary")
    took = pair.became_primary_at("b", killed)
    print(f"fault 1: b primary {took - killed:.3f} s after a was killed")
    assert pair.status("b")["token"] > token_a
    pair.wait_serving("b")
    restarted = time.time()
    pair.start("a")
    protected = pair.wait_protected("b")
    print(f"fault 1: b protected again {protected - restarted:.2f} s after a restarted")
    pair.wait_serving("b")
    # fault 8: the active node again, now b
    token_b = pair.status("b")["token"]
    killed_b, b_dead = pair.kill("b")
    pair.wait("a to take over", lambda: pair.role("a") == "primary")
    took = pair.became_primary_at("a", killed_b)
    print(f"fault 8: a primary {took - killed_b:.3f} s after b was killed")
    assert pair.status("a")["token"] > token_b
    pair.wait_serving("a")
    restarted = time.time()
    pair.start("b")
    protected = pair.wait_protected("a")
    print(f"fault 8: a protected again {protected - restarted:.2f} s after b restarted")
    pair.wait_serving("a")
    acks, _ = pair.finish()
    assert pair.acks_of(acks, "b", killed, killed_b), "b never answered while it was active"
    assert pair.acks_of(acks, "a", killed_b), "a never answered after it took over again"
    # a request sent once a was dead could be answered by a only after a took over again
    assert not pair.acks_of(acks, "a", end=killed_b, sent_after=a_dead), "a answered while dead or b's replica"
    assert not pair.acks_of(acks, "b", sent_after=b_dead), "b answered after it was killed"


def test_freeze_the_primary_past_its_lease(pair: NetPair) -> None:
    """Fault 2: SIGSTOP a past its lease: b takes over; a, woken, acknowledges nothing, steps down
    to b's replica, and b protects the pair."""
    pair.signal("a", signal.SIGSTOP)
    frozen = time.time()
    try:
        pair.wait("b to take over from the frozen a", lambda: pair.role("b") == "primary",
                  timeout=PAST_THE_LEASE_S + 5)
        hold(PAST_THE_LEASE_S, frozen)                  # the freeze's length
    finally:
        woken = time.time()
        pair.signal("a", signal.SIGCONT)
    took = pair.became_primary_at("b", frozen)
    print(f"fault 2: b primary {took - frozen:.3f} s after a froze; a woken after {woken - frozen:.2f} s")
    # A freeze is no death: b claimed on silence and took the key only once a's lease had ended (it
    # revoked nothing; with TTL = timeout the lease may be gone by the time b calls a silent). b sees
    # the silence first either way: its own tick ("primary silent"), or ZeroMQ's heartbeat timeout,
    # also the replica's timeout, closing the connection (then without proof of death, since a had
    # been silent past half the timeout). Not a timing bound from the freeze: on a loaded host a's
    # last renewal may come well before its SIGSTOP.
    b_log = pair.log_path("b").read_text()
    assert "primary silent for" in b_log or "no proof of death" in b_log, b_log[-LOG_TAIL:]
    assert "is revoked" not in b_log, b_log[-LOG_TAIL:]
    pair.wait("a to step down to replica", lambda: pair.role("a") == "replica")
    protected = pair.wait_protected("b")
    print(f"fault 2: b protected {protected - woken:.2f} s after a woke")
    pair.wait_serving("b")
    acks, _ = pair.finish()
    # a frozen process answers nothing; woken, its lease has ended: whatever it sends is too late
    assert not pair.acks_of(acks, "a", sent_after=frozen), "a answered a request sent after it froze"
    assert not pair.acks_of(acks, "a", start=woken), "a acknowledged requests after it woke without its lease"
    served = pair.acks_of(acks, "b", took)
    assert served, "b never answered"
    print(f"fault 2: b's first answer {min(a.received for a in served) - frozen:.2f} s after a froze")
    changes = [c["role"] for c in pair.status("a")["role_changes"]]
    assert changes[-1] == "replica"


def test_cut_between_the_nodes(pair: NetPair) -> None:
    """Fault 3: a and b cannot reach each other, both reach etcd: a keeps its lease and serves
    unprotected; b's claim fails and it stays a replica; healed, a protects the pair again."""
    cut = time.time()
    pair.net.cut("a", "b")
    try:
        pair.wait("a to serve unprotected",
                  lambda: str(pair.status("a").get("protection", "")).startswith("unprotected"),
                  timeout=TIMEOUT_S + 10)
        unprotected = time.time()
        pair.wait_serving("a")
        hold(PAST_THE_LEASE_S, unprotected)             # the partition lasts past b's claim and a lease
        assert pair.role("a") == "primary" and pair.role("b") == "replica"
    finally:
        healed = time.time()
        pair.net.heal("a", "b")
    print(f"fault 3: a unprotected {unprotected - cut:.2f} s after the cut")
    assert pair.roles_since("b", cut) == {"replica"}, f"b took a role: {pair.roles_since('b', cut)}"
    assert pair.roles_since("a", cut) == {"primary"}
    assert "fenced" not in pair.protections_since("a", cut), "a fenced itself while it held its lease"
    protected = pair.wait_protected("a")
    print(f"fault 3: a protected again {protected - healed:.2f} s after the heal")
    pair.wait_serving("a")
    acks, _ = pair.finish()
    assert pair.acks_of(acks, "a", unprotected, healed), "a did not serve during the cut"
    assert not pair.acks_of(acks, "b"), "b answered clients"



def test_isolate_the_primary(pair: NetPair) -> None:
    """Fault 4: a cut off from everything fences itself; b takes over after the lease; a, back,
    steps down to b's replica and b protects the pair."""
    pair.net.isolate("a")
    isolated = time.time()                              # from here, nothing of a's reaches c
    try:
        pair.wait("a to fence itself", lambda: pair.status("a").get("protection") == "fenced",
                  timeout=TTL_S + 10)
        fenced = time.time()
        pair.wait("b to take over", lambda: pair.role("b") == "primary", timeout=TTL_S + TIMEOUT_S + 10)
        pair.wait_serving("b")
        hold(PAST_THE_LEASE_S, isolated)                # the partition's length
    finally:
        rejoined = time.time()
        pair.net.rejoin("a")
    took = pair.became_primary_at("b", isolated)
    print(f"fault 4: a seen fenced {fenced - isolated:.2f} s and b primary {took - isolated:.3f} s after "
          f"the isolation")
    pair.wait("a to step down to replica", lambda: pair.role("a") == "replica")
    protected = pair.wait_protected("b")
    print(f"fault 4: b protected {protected - rejoined:.2f} s after a rejoined")
    pair.wait_serving("b")
    acks, _ = pair.finish()
    # a answers no request sent after the isolation, during it or once back (fenced, then
    # superseded). Judged by the send time: an answer a released before the isolation may be read
    # by c just after it (in c's socket buffer), or after the rejoin (TCP retransmits what the cut
    # dropped); that answer was a's to give.
    assert not pair.acks_of(acks, "a", sent_after=isolated), "a answered a request sent after it was isolated"
    served = pair.acks_of(acks, "b", took)
    assert served, "b never answered"
    print(f"fault 4: b's first answer {min(a.received for a in served) - isolated:.2f} s after the isolation")


def test_cut_the_replica_from_etcd(pair: NetPair) -> None:
    """Fault 5: b cannot reach etcd: nothing changes for the clients; b never takes over."""
    cut = time.time()
    pair.net.cut("b", "w")
    try:
        pair.wait_serving("a")
        hold(PAST_THE_LEASE_S, cut)                     # the partition's length
    finally:
        healed = time.time()
        pair.net.heal("b", "w")
    assert pair.roles_since("b", cut) == {"replica"}, f"b took a role: {pair.roles_since('b', cut)}"
    assert pair.roles_since("a", cut) == {"primary"}
    seen = pair.protections_since("a", cut)
    print(f"fault 5: a's protection during the cut: {sorted(set(seen))}")
    assert "fenced" not in seen
    pair.wait_protected("a")
    pair.wait_serving("a")
    acks, _ = pair.finish()
    assert pair.acks_of(acks, "a", cut, healed), "a did not serve during the cut"
    assert not pair.acks_of(acks, "b"), "b answered clients"


def test_slow_link_from_the_primary_to_the_replica(pair: NetPair) -> None:
    """Fault 6: what a sends to b goes at 2 Mbit/s: the service stays available, nothing is lost,
    and the pair is protected once the link is fast again."""
    pair.net.slow("a", "b", rate="2mbit")
    slowed = time.time()
    try:
        pair.wait_serving("a", more=200)
        hold(3.0, slowed)                               # the slow link's length
        pair.wait_serving("a", more=200)
    finally:
        unslowed = time.time()
        pair.net.unslow("a", "b")
    seen = pair.protections_since("a", slowed)
    print(f"fault 6: a's protection while slow: {sorted(set(seen))}")
    assert pair.roles_since("b", slowed) == {"replica"} and pair.roles_since("a", slowed) == {"primary"}
    protected = pair.wait_protected("a")
    print(f"fault 6: a protected {protected - unslowed:.2f} s after the link is fast again")
    pair.wait_serving("a")
    acks, _ = pair.finish()
    during = pair.acks_of(acks, "a", slowed, unslowed)
    ahead = pair.acks_of(acks, "a", slowed - 2.0, slowed)
    print(f"fault 6: {len(during)} acknowledgements in {unslowed - slowed:.1f} s of slow link "
          f"({len(during) / (unslowed - slowed):.0f}/s; {len(ahead) / 2.0:.0f}/s in the 2 s before)")
    assert during, "the service was not available over the slow link"


def test_etcd_down_past_the_lease(pair: NetPair) -> None:
    """Fault 7: etcd stops for longer than the lease: a fences itself and the clients get no
    acknowledgement meanwhile; etcd back (same data), the service resumes; nothing is lost."""
    pair.etcd.stop()
    stopped = time.time()                               # etcd's process has exited: no renewal after this
    try:
        pair.wait("a to fence itself", lambda: pair.status("a").get("protection") == "fenced",
                  timeout=TTL_S + 10)
        fenced = time.time()
        hold(TTL_S + 1.5, stopped)                      # etcd's downtime, past the lease
    finally:
        restarted = time.time()
        pair.etcd.start()
    answering = time.time()
    print(f"fault 7: a seen fenced {fenced - stopped:.2f} s after etcd stopped; etcd down "
          f"{restarted - stopped:.2f} s, answering {answering - restarted:.2f} s later")
    assert pair.roles_since("b", stopped) == {"replica"}
    pair.wait_serving("a", timeout=30)
    resumed = time.time()
    protected = pair.wait_protected("a")
    print(f"fault 7: service resumed within {resumed - answering:.2f} s of etcd answering; protected "
          f"{protected - answering:.2f} s after")
    acks, _ = pair.finish()
    lease_end = stopped + TTL_S + 0.1                   # the last renewal was sent before `stopped`
    fenced_acks = [a for a in acks if lease_end <= a.received <= restarted]
    assert not fenced_acks, f"{len(fenced_acks)} acknowledgements while etcd was down past the lease"
    assert pair.acks_of(acks, "a", restarted), "the service did not resume"
