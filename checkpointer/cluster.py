"""Agent processes on one host: a replica and a primary (or a harness that wraps one), watched from outside.

The drill, colo-tune, the benchmark and the system tests all run the agents as separate processes
over loopback, as they are deployed: a SIGKILL must kill a real process, and the two agents must
not share an interpreter, a GIL or an event loop. What they need from that is the same each time,
and is written here once:

- a key pair per role (CURVE), generated in a folder unless it holds them already;
- free ports: `free_port()` asks the kernel for one (another process may take it before the
  agent binds it; on a test host that is rare enough, and the agent then fails with a clear
  error naming the setting);
- each agent started as `python -m replica.cli` / `python -m checkpointer.cli`, or as a module
  that wraps one (the drill's kill switch, the tests' harness: `python -m MODULE HARNESS-ARGS --
  AGENT-FLAGS`), with the flags that join the two (endpoint, keys, status file) already given;
- their status files (each rewritten atomically, about every second) read as dicts;
- waiting for a state until a deadline, failing as soon as an agent that should be running has
  exited, with the agents' logs in the error;
- SIGKILL, SIGTERM and the logs;
- a local one-member etcd (`LocalEtcd`) for the pair's lease, in a folder, on free ports.

This module sits at the agents' level: it starts them by module name and never imports them (nor
anything from scenarios/), so it can start agents of any backend on any host.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

from .security import generate_keys

PRIMARY_MODULE = "checkpointer.cli"
REPLICA_MODULE = "replica.cli"
ROOT = Path(__file__).resolve().parents[1]          # where the agents' packages are importable
POLL_S = 0.02                                       # how often a wait looks again
LOG_TAIL = 4000                                     # characters of each log in an error

T = TypeVar("T")


PORTS_FROM = 10000                        # free_port's ports: from here to the ephemeral range
_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    """The lowest port the kernel gives outgoing connections (ip_local_port_range)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing is bound to right now, below the kernel's ephemeral range: a port
    the kernel chose (bind to 0) may be taken as the source port of any outgoing connection before
    the agent binds it (a drill's takeover once failed with "address already in use" so)."""
    low = _ephemeral_low()
    pick = random.SystemRandom()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(200 if low > PORTS_FROM + 100 else 0):
        port = pick.randrange(PORTS_FROM, low)
        if port in _HANDED_OUT:
            continue
        with socket.socket(family) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)                 # (never twice to this process's callers)
        return port
    with socket.socket(family) as probe:      # no room below the range: the kernel's choice
        probe.bind((host, 0))
        return probe.getsockname()[1]


def terminate(process: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM a process that still runs and wait for it; SIGKILL it after `timeout` seconds."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def endpoint(host: str = "127.0.0.1") -> str:
    """A ZeroMQ TCP endpoint on a free port."""
    return f"tcp://{host}:{free_port(host)}"


def ensure_keys(folder: Path) -> Path:
    """`folder` with a CURVE key pair for each role (generated unless already there)."""
    for role in ("primary", "replica"):
        if not (folder / f"{role}.key").exists():
            generate_keys(folder, role)
    return folder


class ClusterError(RuntimeError):
    """An agent exited, or a state was not reached in time. `reason` is the one-line cause."""

    def __init__(self, reason: str, logs: str = "") -> None:
        super().__init__(f"{reason}\n{logs}" if logs else reason)
        self.reason = reason
        self.logs = logs


@dataclass
class Agent:
    """One agent process, its status file and its log."""

    role: str
    process: subprocess.Popen
    status_path: Path
    log_path: Path
    log_file: IO[bytes]

    def running(self) -> bool:
        return self.process.poll() is None


class LocalEtcd:
    """A one-member etcd in `folder` on free loopback ports: the drill's and the tests' own.

    Its raft timing is tightened (10 ms heartbeats, 100 ms elections) so that it is up within a
    fraction of a second and grants leases down to 1 s; its data stays in the folder, so that a
    stop and a start (the etcd-down fault) keep the pair's key and leases.

    Elsewhere than on this host's loopback (a network namespace of the tests): `prefix` is put
    before its command (`ip netns exec NS`), `host` is its address there and the ports are given
    (a namespace's ports are its own; free_port() looks only at this one's). The health probe then
    runs through the same prefix, where the address is reachable.
    """

    def __init__(self, folder: Path, host: str = "127.0.0.1", *, client_port: int | None = None,
                 peer_port: int | None = None, prefix: Sequence[str] = ()) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.binary = shutil.which("etcd")
        self.host = host
        self.prefix = list(prefix)
        self.client_port = client_port if client_port is not None else free_port(host)
        self.peer_port = peer_port if peer_port is not None else free_port(host)
        self.url = f"http://{host}:{self.client_port}"
        self.process: subprocess.Popen | None = None

    _HEALTH_PROBE = """if True:
        import sys, urllib.request
        try:
            with urllib.request.urlopen(sys.argv[1] + "/health", timeout=0.5) as answer:
                sys.exit(0 if b'"true"' in answer.read() else 1)
        except OSError:
            sys.exit(1)
        """

    def start(self, timeout: float = 30.0) -> str:
        """Start it and wait until it answers; returns its client URL."""
        if self.binary is None:
            raise ClusterError("etcd is not installed (Debian: apt-get install etcd-server)")
        peer = f"http://{self.host}:{self.peer_port}"
        log = open(self.folder / "etcd.log", "ab")
        self.process = subprocess.Popen(
            [*self.prefix, self.binary, "--name", "colo", "--data-dir", str(self.folder / "data"),
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"colo={peer}", "--heartbeat-interval", "10", "--election-timeout", "100"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.process.poll() is not None:
                raise ClusterError(f"etcd exited with status {self.process.returncode}",
                                   (self.folder / "etcd.log").read_text(errors="replace")[-LOG_TAIL:])
            if time.monotonic() > deadline:
                raise ClusterError(f"etcd did not answer on {self.url} within {timeout} s")
            time.sleep(POLL_S)
        return self.url

    def healthy(self) -> bool:
        if self.prefix:
            try:
                probe = subprocess.run([*self.prefix, sys.executable, "-I", "-c", self._HEALTH_PROBE, self.url],
                                       stdin=subprocess.DEVNULL, capture_output=True, timeout=5)
            except subprocess.TimeoutExpired:
                return False
            return probe.returncode == 0
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=0.5) as answer:
                return b'"true"' in answer.read()
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        terminate(self.process)
        self.process = None

    def __enter__(self) -> LocalEtcd:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


class Cluster:
    """A replica and a primary (or more agents, by name) in their own processes.

    `folder` holds the status files (ROLE.json) and, unless `logs` says otherwise, the logs
    (ROLE.log, appended to when a role is started again); without one, a temporary folder is made
    and removed by close(). `keys` is a folder with the key pairs (default: FOLDER/keys, generated).
    `common` flags go to every agent (heartbeat and timeout settings, say). The replica listens on
    `self.endpoint`, and primaries connect to it.
    """

    def __init__(self, folder: Path | None = None, keys: Path | None = None, logs: Path | None = None,
                 common: Sequence[str] = (), host: str = "127.0.0.1") -> None:
        self._temporary = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="colo-cluster-")) if folder is None else Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.keys = ensure_keys(Path(keys) if keys is not None else self.folder / "keys")
        self.logs = Path(logs) if logs is not None else self.folder
        self.logs.mkdir(parents=True, exist_ok=True)
        self.common = list(common)
        self.endpoint = endpoint(host)
        self.agents: dict[str, Agent] = {}
        self._expected_exits: set[str] = set()

    # -- starting ----------------------------------------------------------------------------
    def replica_flags(self, name: str = "replica") -> list[str]:
        """What joins a replica to this cluster: where it listens, its keys, its status file."""
        return ["--listen", self.endpoint, "--keys-dir", str(self.keys),
                "--authorized-keys", str(self.keys / "primary.key"),
                "--status-json", str(self.status_path(name))]

    def primary_flags(self, name: str = "primary") -> list[str]:
        """What joins a primary to this cluster's replica: the endpoint, keys, its status file."""
        return ["--replica", self.endpoint, "--keys-dir", str(self.keys),
                "--peer-public-key", str(self.keys / "replica.key"),
                "--status-json", str(self.status_path(name))]

    def start_replica(self, flags: Sequence[str] = (), *, harness: str | None = None,
                      harness_args: Sequence[str] = (), name: str = "replica") -> subprocess.Popen:
        """Start a replica (colo-replica, or `harness` wrapping one) with extra agent `flags`."""
        return self.start_process(name, harness or REPLICA_MODULE, [*self.replica_flags(name), *flags],
                          harness_args if harness else None)

    def start_primary(self, flags: Sequence[str] = (), *, harness: str | None = None,
                      harness_args: Sequence[str] = (), name: str = "primary") -> subprocess.Popen:
        """Start a primary (colo-primary, or `harness` wrapping one) with extra agent `flags`."""
        return self.start_process(name, harness or PRIMARY_MODULE, [*self.primary_flags(name), *flags],
                          harness_args if harness else None)

    def start_process(self, name: str, module: str, flags: Sequence[str],
              harness_args: Sequence[str] | None = None) -> subprocess.Popen:
        """Run `python -m module` as agent `name`: `flags` (and the common ones) are the agent's;
        with `harness_args`, the module is a harness called as `module HARNESS-ARGS -- FLAGS`."""
        previous = self.agents.get(name)
        if previous is not None and previous.running():
            raise ClusterError(f"the {name} is already running (pid {previous.process.pid})")
        command = [sys.executable, "-m", module]
        if harness_args is not None:
            command += [*harness_args, "--"]
        command += [*flags, *self.common]
        self.status_path(name).unlink(missing_ok=True)      # a status left by an earlier agent is not this one's
        log_path = self.logs / f"{name}.log"
        log_file = open(log_path, "ab")
        process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT)
        if previous is not None:
            previous.log_file.close()
        self.agents[name] = Agent(name, process, self.status_path(name), log_path, log_file)
        self._expected_exits.discard(name)
        return process

    # -- watching ------------------------------------------------------------------------------
    def process(self, name: str) -> subprocess.Popen:
        return self.agents[name].process

    def status_path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def status(self, name: str) -> dict:
        """The agent's last status file ({} before the first one)."""
        try:
            return json.loads(self.status_path(name).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def next_status(self, name: str, timeout: float = 60.0) -> dict:
        """The next status file the agent writes (each is a new file renamed into place)."""
        def written() -> tuple[int, int] | None:
            try:
                stat = self.status_path(name).stat()
            except FileNotFoundError:
                return None
            return stat.st_ino, stat.st_mtime_ns
        before = written()
        self.wait(f"the {name}'s next status file", lambda: written() not in (None, before), timeout)
        return self.status(name)

    def wait(self, what: str, predicate: Callable[[], T], timeout: float = 60.0,
             may_exit: Collection[str] = ()) -> T:
        """Wait until `predicate()` is true and return its value. Raises ClusterError (with the
        logs) when `timeout` passes, or as soon as an agent exits that is not in `may_exit` and was
        not stopped through this cluster."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            for name, agent in self.agents.items():
                if name in may_exit or name in self._expected_exits or agent.running():
                    continue
                raise ClusterError(f"the {name} exited ({agent.process.returncode}) while waiting for {what}",
                                   self.log_tails())
            if time.monotonic() >= deadline:
                raise ClusterError(f"timed out waiting for {what}", self.log_tails())
            time.sleep(POLL_S)

    def log(self, name: str, tail: int = LOG_TAIL) -> str:
        """The end of the agent's log ('' if it never started)."""
        agent = self.agents.get(name)
        path = agent.log_path if agent is not None else self.logs / f"{name}.log"
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return text[-tail:] if tail else text

    def log_tails(self) -> str:
        return "\n".join(f"--- {name} (log {agent.log_path})\n{self.log(name)}"
                         for name, agent in self.agents.items())

    # -- ending -------------------------------------------------------------------------------------
    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Send `sig` to the agent, wait for it to end, return its exit status."""
        agent = self.agents[name]
        self._expected_exits.add(name)
        if agent.running():
            agent.process.send_signal(sig)
        return agent.process.wait()

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every running agent (all at once, so none waits for another), then wait;
        SIGKILL what is still running after `timeout`."""
        self._expected_exits.update(self.agents)
        for agent in self.agents.values():
            if agent.running():
                agent.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for agent in self.agents.values():
            try:
                agent.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                agent.process.kill()
                agent.process.wait()
            agent.log_file.close()

    def close(self) -> None:
        """Stop the agents and remove the temporary folder (if this cluster made it)."""
        self.stop()
        if self._temporary:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

