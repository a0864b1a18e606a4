"""The network-namespace harness (tests/netns.py) on real namespaces, veths, nftables and tc.

Hosts on the switch reach each other; a cut or an isolation is silence (a connect times out,
it is never refused) and leaves every other path working; a slowed pair is measurably slow
while the sender's other destinations are not; every fault undoes; closing a network stops
its processes and leaves no namespace behind, also after a failed test or a crashed run.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import netns
from tests.netns import Network, Reach

PORT = 7000  # every host has its own stack: the same port everywhere
UNUSED = 7001  # no listener: a reachable host answers a connect with a RST
HOSTS = ("a", "b", "w", "c")
ROOT = Path(__file__).resolve().parents[2]

LISTENER = """
import socket, sys
server = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    server.accept()[0].close()
"""

SINK = """
import socket, sys, time
server = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
connection, _ = server.accept()
first, received = None, 0
while chunk := connection.recv(1 << 16):
    first = first or time.monotonic()
    received += len(chunk)
print(received, time.monotonic() - first, flush=True)
"""

SEND = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30) as s:
    s.sendall(bytes(int(sys.argv[3])))
"""

IGNORES_TERM = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(600)
"""


@pytest.fixture
def net() -> Iterator[Network]:
    netns.require()
    with Network(*HOSTS) as network:
        yield network


def read_line(process: subprocess.Popen, timeout: float = 10.0) -> str:
    """The next line the process prints, waiting at most `timeout` (its death is an error)."""
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, f"no line from {process.args} within {timeout} s"
    line = process.stdout.readline()
    assert line, f"{process.args} exited ({process.wait()}) before printing"
    return line.strip()


def start(network: Network, host: str, script: str, *args: str) -> subprocess.Popen:
    """A Python script in `host` that prints "ready" once it can be used."""
    process = network.popen(host, [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True)
    assert read_line(process) == "ready"
    return process


def listen_everywhere(network: Network) -> None:
    for host in network.hosts:
        start(network, host, LISTENER, str(PORT))


def transfer_rate(network: Network, source: str, destination: str, size: int) -> float:
    """Bytes per second of a `size`-byte TCP transfer, timed by the receiver from its first byte."""
    sink = start(network, destination, SINK, str(PORT + 1))
    network.run(source, [sys.executable, "-c", SEND, network.address(destination), str(PORT + 1), str(size)])
    received, seconds = read_line(sink).split()
    assert int(received) == size
    return size / float(seconds)


def test_every_host_reaches_every_other_through_the_switch(net):
    listen_everywhere(net)
    addresses = [net.address(host) for host in HOSTS]
    assert len(set(addresses)) == len(HOSTS)
    for source in HOSTS:
        for destination in HOSTS:
            if source != destination:
                assert net.tcp_probe(source, destination, PORT) is Reach.CONNECTED, (source, destination)
    assert net.tcp_probe("c", "a", UNUSED) is Reach.REFUSED


def test_a_failed_command_names_itself_its_host_and_its_stderr(net):
    with pytest.raises(netns.NetnsError, match=r"in host b\): exit status 3: no such thing"):
        net.run("b", [sys.executable, "-c", "import sys; print('no such thing', file=sys.stderr); sys.exit(3)"])


def test_cut_is_silence_between_the_pair_only_and_heal_restores_it(net):
    listen_everywhere(net)
    net.cut("a", "b")
    assert net.tcp_probe("a", "b", PORT, timeout=0.3) is Reach.TIMEOUT
    assert net.tcp_probe("b", "a", PORT, timeout=0.3) is Reach.TIMEOUT
    assert net.tcp_probe("a", "b", UNUSED, timeout=0.3) is Reach.TIMEOUT  # dropped, not rejected: no RST
    assert net.tcp_probe("a", "w", PORT) is Reach.CONNECTED
    assert net.tcp_probe("c", "b", PORT) is Reach.CONNECTED
    net.heal("a", "b")
    assert net.tcp_probe("a", "b", PORT) is Reach.CONNECTED
    assert net.tcp_probe("b", "a", PORT) is Reach.CONNECTED


def test_isolate_cuts_a_host_from_all_others_but_not_from_itself(net):
    listen_everywhere(net)
    net.isolate("a")
    for other in ("b", "w", "c"):
        assert net.tcp_probe("a", other, PORT, timeout=0.3) is Reach.TIMEOUT, other
    assert net.tcp_probe("b", "a", PORT, timeout=0.3) is Reach.TIMEOUT
    assert net.tcp_probe("a", "127.0.0.1", PORT) is Reach.CONNECTED
    assert net.tcp_probe("a", "a", PORT) is Reach.CONNECTED
    assert net.tcp_probe("b", "w", PORT) is Reach.CONNECTED
    net.rejoin("a")
    assert net.tcp_probe("a", "b", PORT) is Reach.CONNECTED
    assert net.tcp_probe("c", "a", PORT) is Reach.CONNECTED


def test_a_pulled_link_is_silence_until_plugged_back(net):
    listen_everywhere(net)
    net.link_down("a")
    assert net.tcp_probe("b", "a", PORT, timeout=0.3) is Reach.TIMEOUT
    assert net.tcp_probe("a", "b", PORT, timeout=0.3) is Reach.TIMEOUT
    net.link_up("a")
    assert net.tcp_probe("a", "b", PORT) is Reach.CONNECTED


def test_slow_limits_one_direction_of_one_pair(net):
    size = 2_000_000
    limit = 16e6 / 8  # bytes per second of "16mbit": the slowed transfer takes about a second
    unlimited = transfer_rate(net, "a", "b", size)
    net.slow("a", "b", rate="16mbit")
    slowed = transfer_rate(net, "a", "b", size)
    assert slowed <= 2 * limit, f"{slowed:.0f} B/s despite a limit of {limit:.0f}"
    assert unlimited >= 3 * slowed, f"unlimited {unlimited:.0f} B/s vs slowed {slowed:.0f}"
    assert transfer_rate(net, "a", "w", size) >= 3 * slowed  # a's other destinations
    assert transfer_rate(net, "b", "a", size) >= 3 * slowed  # the other direction
    net.unslow("a", "b")
    assert transfer_rate(net, "a", "b", size) >= 3 * slowed


def test_heal_all_undoes_every_kind_of_fault(net):
    listen_everywhere(net)
    net.cut("a", "b")
    net.isolate("c")
    net.link_down("w")
    net.slow("a", "w", rate="1mbit")
    net.heal_all()
    for source, destination in (("a", "b"), ("b", "c"), ("c", "w"), ("w", "a")):
        assert net.tcp_probe(source, destination, PORT) is Reach.CONNECTED, (source, destination)
    assert "htb" not in net.run("a", ["tc", "qdisc", "show", "dev", "eth0"]).stdout
    rules = subprocess.run(["ip", "netns", "exec", net.switch, "nft", "list", "ruleset"],
                           capture_output=True, text=True, check=True).stdout
    assert "drop" not in rules


def machine_links() -> set[str]:
    listing = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip() for line in listing.splitlines()}


def test_close_stops_every_process_and_removes_every_namespace():
    netns.require()
    namespaces, links = set(netns.namespaces()), machine_links()
    with Network("a", "b", stop_timeout=0.5) as network:
        polite = network.popen("a", ["sleep", "600"])
        stubborn = start(network, "b", IGNORES_TERM)
        untracked = subprocess.Popen(network.command("a", ["sleep", "600"]))  # as a launcher of its own would
        assert {network.prefix + h for h in ("a", "b", "switch")} <= set(netns.namespaces())
    assert polite.returncode == -15
    assert stubborn.returncode == -9
    assert untracked.wait(timeout=10) == -9  # killed by the sweep of what is left in the namespace
    assert set(netns.namespaces()) == namespaces
    assert machine_links() == links


def test_a_failing_test_still_removes_its_network():
    netns.require()
    before = set(netns.namespaces())
    with pytest.raises(RuntimeError, match="the test failed"), Network("a", "b") as network:
        network.cut("a", "b")
        raise RuntimeError("the test failed")
    assert set(netns.namespaces()) == before


def test_a_crashed_runs_leftovers_are_removed_when_the_next_network_starts():
    netns.require()
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is free: the namespace below belongs to a run that is gone
    leftover = f"{netns.PREFIX}{dead.pid}-0-a"
    subprocess.run(["ip", "netns", "add", leftover], check=True)
    try:
        with Network("a"):
            assert leftover not in netns.namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", leftover], capture_output=True, check=False)


WHY_NOT = "from tests.netns import available, require\nprint(available())\nrequire()\n"


def why_not(*, env: dict[str, str] | None = None, user: int | None = None) -> str:
    """What available() says, and require() skips with, in a fresh interpreter."""
    argv = [sys.executable, "-c", WHY_NOT]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}, check=False)
    assert "Skipped: network namespaces unavailable" in done.stderr, done.stderr
    return done.stdout.strip()


def test_unavailable_says_why_and_skips_with_the_reason(tmp_path):
    if os.geteuid() != 0:
        assert netns.available().startswith("not root")
        return
    assert why_not(user=65534).startswith("not root")
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("ip", "tc"):
        (tools / tool).symlink_to(shutil.which(tool))
    assert why_not(env={"PATH": str(tools)}) == "`nft` not found on PATH (Debian package nftables)"
