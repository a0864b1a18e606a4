"""Hosts in network namespaces joined by one switch, and the network faults the system tests inject.

Not a test module: system tests import this to run agents as separate "hosts" and to cut,
isolate or slow the links between them. Some facts it is built on:

- Each host is a namespace with loopback up and one veth, `eth0`; the other end of every veth
  is a port `v-<host>` of a bridge that lives in a namespace of its own (the switch). Every
  interface lives in a namespace the harness made, so deleting the namespaces removes all of
  them (a veth pair dies with either end) and nothing is ever added to the machine's own.
- Faults are dropped in the switch, by one nftables table in its namespace (`bridge
  colo_faults`), matched on bridge ports. That is what a partition does: both ends see
  silence. A drop in a host's own output hook is not silent: UDP sendmsg() fails with EPERM
  there. Matching ports rather than addresses drops ARP and IPv6 too.
- A FAILED or INCOMPLETE neighbour entry left by a cut delays the first packets after it
  heals by up to a second (the ARP retransmit timer); healing flushes the neighbour caches
  of the hosts involved so new traffic resolves at once. TCP's own retransmission backoff
  on connections that lived through the cut is the real network's behaviour and stays.
- Slowing is per direction and per pair: an htb root on the sender's eth0, one class per
  slowed destination selected by a u32 match on the destination address; other traffic
  bypasses htb's classes unshaped. tbf alone cannot choose traffic by destination, and tbf
  as an htb leaf is non-work-conserving (the kernel warns). This kernel has no netem.
- Deleting a namespace kills nothing: its processes keep it (and its interfaces) alive. So
  the harness stops what it started (SIGTERM to the process group, SIGKILL after a
  timeout), then kills whatever else `ip netns pids` still finds in its namespaces.
- Namespace names are `colo-<pid>-<n>-<host>`: parallel runs never clash, and a network
  whose process is dead is a leftover of a crashed run, removed when the next one starts.
"""

from __future__ import annotations

import enum
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from types import TracebackType
from typing import Self

PREFIX = "colo-"
TABLE = "colo_faults"
SWITCH = "switch"  # the switch namespace's suffix; not a host name
HOST_NAME = re.compile(r"[a-z][a-z0-9]{0,11}")  # "v-" + name must fit IFNAMSIZ (15 characters)
SUBNETS = "10.213.0.0/16"  # each network takes the first /24 of it the machine does not use
_LEFTOVER = re.compile(rf"{re.escape(PREFIX)}(\d+)-")
_counter = itertools.count()

_PROBE = """
import socket, sys
s = socket.socket()
s.settimeout(float(sys.argv[3]))
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
except TimeoutError:
    print("timeout")
except ConnectionRefusedError:
    print("refused")
else:
    print("connected")
"""


class NetnsError(RuntimeError):
    """A command of the harness, or one it ran in a host, failed; the message has its stderr."""


class Reach(enum.Enum):
    """What a TCP connect saw: a listener, a host without one (a RST came back), or silence."""

    CONNECTED = "connected"
    REFUSED = "refused"
    TIMEOUT = "timeout"


@dataclass(frozen=True)
class _Shape:
    rate: str
    burst: str | None


def _execute(argv: Sequence[str], *, input: str | None = None, timeout: float = 30.0,
             what: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run argv to completion; a failure raises NetnsError naming the command and its stderr."""
    try:
        done = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired as e:
        raise NetnsError(f"{what or ' '.join(argv)}: no exit within {timeout} s") from e
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip() or "no output"
        raise NetnsError(f"{what or ' '.join(argv)}: exit status {done.returncode}: {detail}")
    return done


def namespaces() -> list[str]:
    """The names in `ip netns list` (all of them, not only the harness's)."""
    listing = _execute(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in listing.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_everything_in(namespace: str) -> None:
    """SIGKILL every process still in `namespace`: they would keep it alive after `ip netns del`."""
    listed = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, check=False)
    for pid in map(int, listed.stdout.split()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _delete_namespace(namespace: str) -> None:
    _kill_everything_in(namespace)
    _execute(["ip", "netns", "del", namespace])


def remove_leftovers() -> list[str]:
    """Delete the harness's namespaces whose creating process is dead (a crashed run); returns them."""
    removed = []
    for name in namespaces():
        match = _LEFTOVER.match(name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            _delete_namespace(name)
            removed.append(name)
    return removed


@cache
def available() -> str | None:
    """None if this machine can run networks of namespaces, else the reason it cannot (for pytest.skip)."""
    if os.geteuid() != 0:
        return "not root: network namespaces, veths and nftables need CAP_SYS_ADMIN and CAP_NET_ADMIN"
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` not found on PATH (Debian package {package})"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        _execute(["ip", "netns", "add", probe])
    except NetnsError as e:
        return str(e)
    try:
        _execute(["ip", "-n", probe, "link", "add", "br0", "type", "bridge"])
        _execute(["ip", "-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1"])
        _execute(["ip", "netns", "exec", probe, "nft", "add", "table", "bridge", TABLE])
    except NetnsError as e:
        return str(e)
    finally:
        _delete_namespace(probe)
    return None


def require() -> None:
    """Skip the calling test, with the reason, where networks of namespaces cannot be made."""
    import pytest

    reason = available()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")


def _free_subnet() -> ipaddress.IPv4Network:
    """The first /24 of SUBNETS that no address or route of the machine's own namespace overlaps.

    The hosts never see the machine's networks, but addresses that look like no real one
    keep logs unambiguous and leave room to connect the switch to the machine later.
    """
    used = []
    for line in _execute(["ip", "-4", "-o", "addr", "show"]).stdout.splitlines():
        used.append(ipaddress.ip_interface(line.split()[3]).network)
    for line in _execute(["ip", "-4", "route", "show", "table", "all"]).stdout.splitlines():
        words = line.split()
        destination = words[1] if words[0] in ("local", "broadcast", "unicast") else words[0]
        try:
            network = ipaddress.ip_network(destination, strict=False)
        except ValueError:  # "default", or a route type this does not parse
            continue
        if network.prefixlen > 0:
            used.append(network)
    for candidate in ipaddress.ip_network(SUBNETS).subnets(new_prefix=24):
        if not any(candidate.overlaps(network) for network in used):
            return candidate
    raise NetnsError(f"every /24 of {SUBNETS} is in use on this machine")


class Network:
    """Hosts in namespaces on one switch; faults between them; everything removed on close.

        with Network("a", "b", "w", "c") as net:
            server = net.popen("a", [sys.executable, "-m", "my.server"])
            net.cut("a", "b")
            ...

    Host names are short lowercase words (they name switch ports). Addresses come in the
    order the hosts are given, from the first free /24 of SUBNETS.
    """

    def __init__(self, *hosts: str, stop_timeout: float = 5.0) -> None:
        if not hosts or len(set(hosts)) != len(hosts):
            raise ValueError(f"hosts must be distinct and at least one: {hosts}")
        for host in hosts:
            if not HOST_NAME.fullmatch(host) or host == SWITCH:
                raise ValueError(f"host name {host!r}: want {HOST_NAME.pattern}, not {SWITCH!r}")
        self.hosts: tuple[str, ...] = hosts
        self.stop_timeout = stop_timeout
        self.prefix = f"{PREFIX}{os.getpid()}-{next(_counter)}-"
        self._made: list[str] = []  # namespaces created so far, deleted by close()
        self._processes: list[subprocess.Popen] = []
        self._addresses: dict[str, str] = {}
        self.subnet: ipaddress.IPv4Network | None = None  # set by start()
        self._cuts: set[frozenset[str]] = set()
        self._isolated: set[str] = set()
        self._down: set[str] = set()
        self._slows: dict[tuple[str, str], _Shape] = {}
        self._shaped: set[str] = set()  # hosts whose eth0 has the harness's htb root

    # --- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        """Make the switch and the hosts; on any failure, remove what was made and raise."""
        remove_leftovers()
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        self.subnet = _free_subnet()
        switch = self._add_namespace(SWITCH)
        _execute(["ip", "-n", switch, "link", "add", "br0", "type", "bridge"])
        _execute(["ip", "-n", switch, "link", "set", "br0", "up"])
        _execute(["ip", "netns", "exec", switch, "nft", "-f", "-"],
                 input=f"table bridge {TABLE} {{\n chain forward {{\n"
                       f"  type filter hook forward priority 0; policy accept;\n }}\n}}\n")
        for address, host in zip(self.subnet.hosts(), self.hosts):
            ns = self._add_namespace(host)
            port = self._port(host)
            _execute(["ip", "-n", switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                      "netns", ns])
            _execute(["ip", "-n", switch, "link", "set", port, "master", "br0", "up"])
            _execute(["ip", "-n", ns, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0"])
            _execute(["ip", "-n", ns, "link", "set", "eth0", "up"])
            self._addresses[host] = str(address)

    def _add_namespace(self, suffix: str) -> str:
        name = self.prefix + suffix
        _execute(["ip", "netns", "add", name])
        self._made.append(name)
        _execute(["ip", "-n", name, "link", "set", "lo", "up"])
        return name

    def close(self) -> None:
        """Stop the processes started here, then delete every namespace (and so every interface)."""
        self._stop_processes()
        errors = []
        for name in reversed(self._made):
            try:
                _delete_namespace(name)
            except NetnsError as e:
                errors.append(str(e))
        self._made.clear()
        if errors:
            raise NetnsError("; ".join(errors))

    def _stop_processes(self) -> None:
        running = [p for p in self._processes if p.poll() is None]
        for process in running:
            self._signal(process, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for process in running:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._signal(process, signal.SIGKILL)
                process.wait()
        for process in self._processes:
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
        self._processes.clear()

    @staticmethod
    def _signal(process: subprocess.Popen, signum: int) -> None:
        """Signal the process's group if it leads one (its children go too), else the process."""
        try:
            if os.getpgid(process.pid) == process.pid:
                os.killpg(process.pid, signum)
            else:
                process.send_signal(signum)
        except ProcessLookupError:
            pass

    # --- hosts -----------------------------------------------------------------------------

    def namespace(self, host: str) -> str:
        """The namespace name of `host` (for `ip netns exec` in commands built elsewhere)."""
        self._check(host)
        return self.prefix + host

    @property
    def switch(self) -> str:
        """The namespace of the switch (the bridge and the fault rules)."""
        return self.prefix + SWITCH

    def address(self, host: str) -> str:
        """The IPv4 address of `host` on the switch."""
        self._check(host)
        return self._addresses[host]

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        """argv wrapped to run in `host`: for launchers that make their own Popen."""
        return ["ip", "netns", "exec", self.namespace(host), *argv]

    def popen(self, host: str, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start argv in `host`; it is stopped by close(). In its own session unless told otherwise.

        `ip netns exec` execs argv (no fork), so the Popen's pid is argv's.
        """
        kw.setdefault("start_new_session", True)
        process = subprocess.Popen(self.command(host, argv), **kw)
        self._processes.append(process)
        return process

    def run(self, host: str, argv: Sequence[str], *, input: str | None = None,
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run a short command in `host` to completion; exit status != 0 raises NetnsError with its stderr."""
        return _execute(self.command(host, argv), input=input, timeout=timeout,
                        what=f"{' '.join(argv)} (in host {host})")

    def tcp_probe(self, source: str, destination: str, port: int, timeout: float = 0.5) -> Reach:
        """One TCP connect from `source` to `destination` (a host or an IP address), as Reach."""
        target = self._addresses.get(destination, destination)
        if destination not in self._addresses:
            ipaddress.ip_address(target)  # neither a host nor an address: ValueError
        seen = self.run(source, [sys.executable, "-I", "-c", _PROBE, target, str(port), str(timeout)],
                        timeout=timeout + 30).stdout.strip()
        return Reach(seen)

    def _check(self, host: str) -> None:
        if host not in self.hosts:
            raise ValueError(f"no host {host!r} in this network (hosts: {', '.join(self.hosts)})")

    def _port(self, host: str) -> str:
        return f"v-{host}"

    # --- faults ----------------------------------------------------------------------------

    def cut(self, x: str, y: str) -> None:
        """Drop everything between x and y, both ways, in the switch: each sees silence (no RST)."""
        self._pair(x, y)
        self._cuts.add(frozenset((x, y)))
        self._apply_drops()

    def heal(self, x: str, y: str) -> None:
        """Undo cut(x, y); an isolation of either still holds."""
        self._pair(x, y)
        self._cuts.discard(frozenset((x, y)))
        self._apply_drops()
        self._flush_neighbours((x, y))

    def isolate(self, x: str) -> None:
        """Drop everything between x and every other host; loopback inside x keeps working."""
        self._check(x)
        self._isolated.add(x)
        self._apply_drops()

    def rejoin(self, x: str) -> None:
        """Undo isolate(x); cuts involving x still hold."""
        self._check(x)
        self._isolated.discard(x)
        self._apply_drops()
        self._flush_neighbours(self.hosts)

    def link_down(self, x: str) -> None:
        """Pull x's cable: its switch port goes down, so x's eth0 loses carrier (the route stays, linkdown)."""
        self._check(x)
        _execute(["ip", "-n", self.switch, "link", "set", self._port(x), "down"])
        self._down.add(x)

    def link_up(self, x: str) -> None:
        """Plug x's cable back in."""
        self._check(x)
        _execute(["ip", "-n", self.switch, "link", "set", self._port(x), "up"])
        self._down.discard(x)
        self._flush_neighbours(self.hosts)

    def slow(self, x: str, y: str, rate: str = "1mbit", burst: str | None = None) -> None:
        """Limit what x sends to y to `rate` (tc units: "1mbit", "500kbit"); y -> x is untouched.

        `burst` is htb's bucket (tc's default for the rate if None). The queue is eth0's
        (txqueuelen packets), so a slowed bulk transfer delays what follows it to y, as on a
        real slow link. Calling it again for the same pair replaces the limit.
        """
        self._pair(x, y)
        self._slows[(x, y)] = _Shape(rate, burst)
        self._apply_shaping(x)

    def unslow(self, x: str, y: str) -> None:
        """Undo slow(x, y)."""
        self._pair(x, y)
        self._slows.pop((x, y), None)
        self._apply_shaping(x)

    def heal_all(self) -> None:
        """Undo every fault: cuts, isolations, links down and slowed pairs."""
        self._cuts.clear()
        self._isolated.clear()
        self._apply_drops()
        for x in list(self._down):
            self.link_up(x)
        slowed = {x for x, _ in self._slows}
        self._slows.clear()
        for x in slowed:
            self._apply_shaping(x)
        self._flush_neighbours(self.hosts)

    def _pair(self, x: str, y: str) -> None:
        self._check(x)
        self._check(y)
        if x == y:
            raise ValueError(f"a fault needs two different hosts, not {x!r} twice")

    def _apply_drops(self) -> None:
        """Replace the switch's drop rules by those of the current cuts and isolations, atomically."""
        rules = []
        for pair in sorted(sorted(p) for p in self._cuts):
            x, y = (self._port(h) for h in pair)
            rules += [f'iifname "{x}" oifname "{y}" drop', f'iifname "{y}" oifname "{x}" drop']
        for host in sorted(self._isolated):
            rules += [f'iifname "{self._port(host)}" drop', f'oifname "{self._port(host)}" drop']
        script = "".join([f"flush chain bridge {TABLE} forward\n",
                          *(f"add rule bridge {TABLE} forward {rule}\n" for rule in rules)])
        _execute(["ip", "netns", "exec", self.switch, "nft", "-f", "-"], input=script,
                 what=f"nft (switch rules: {rules})")

    def _apply_shaping(self, x: str) -> None:
        """Rebuild x's eth0 qdisc from the slowed pairs whose sender is x (queued packets are lost)."""
        lines = []
        if x in self._shaped:
            lines.append("qdisc del dev eth0 root")
        pairs = sorted((y, shape) for (sender, y), shape in self._slows.items() if sender == x)
        if pairs:
            lines.append("qdisc add dev eth0 root handle 1: htb")  # no default: unmatched traffic is not shaped
        for y, shape in pairs:
            minor = f"{self.hosts.index(y) + 1:x}"  # tc minors are hex
            burst = f" burst {shape.burst}" if shape.burst else ""
            lines += [f"class add dev eth0 parent 1: classid 1:{minor} htb rate {shape.rate} ceil {shape.rate}{burst}",
                      (f"filter add dev eth0 parent 1: protocol ip prio 1 u32 match ip dst {self.address(y)}/32 "
                       f"flowid 1:{minor}")]
        if lines:
            _execute(["tc", "-n", self.namespace(x), "-batch", "-"], input="\n".join(lines) + "\n",
                     what=f"tc in host {x}: {lines}")
        if pairs:
            self._shaped.add(x)
        else:
            self._shaped.discard(x)

    def _flush_neighbours(self, hosts: Iterable[str]) -> None:
        """Forget neighbour entries a fault left FAILED or INCOMPLETE, so healed paths resolve at once."""
        for host in hosts:
            _execute(["ip", "-n", self.namespace(host), "neigh", "flush", "dev", "eth0"])
