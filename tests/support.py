"""What the system tests share: agent processes in a temporary folder, and free ports.

Not a test module: test modules import this, never each other.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from checkpointer.security import generate_keys

ROOT = Path(__file__).resolve().parents[1]
TIMING = ["--heartbeat-ms", "20", "--timeout-ms", "300"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Agents:
    """Start and watch a replica and a primary (tests/system/agent_harness.py) in a temporary folder."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        keys = tmp / "keys"
        generate_keys(keys, "primary")
        generate_keys(keys, "replica")
        self.keys = keys
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, role: str, harness: list[str] = (), agent: list[str] = ()) -> subprocess.Popen:
        status = self.tmp / f"{role}.json"
        if role == "replica":
            flags = ["--listen", self.endpoint, "--keys-dir", str(self.keys),
                     "--authorized-keys", str(self.keys / "primary.key")]
        else:
            flags = ["--replica", self.endpoint, "--keys-dir", str(self.keys),
                     "--peer-public-key", str(self.keys / "replica.key"), "--workload", "uniform",
                     "--memory-mib", "16", "--vcpus", "2", "--ring-entries", "1024",
                     "--max-interval-ms", "20"]
        command = [sys.executable, "-m", "tests.system.agent_harness", role, "--record",
                   str(self.tmp / f"{role}.jsonl"), *harness, "--", *flags, *TIMING,
                   "--status-json", str(status), *agent]
        log = open(self.tmp / f"{role}.log", "w")
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.processes[role] = process
        return process

    def status(self, role: str) -> dict:
        try:
            return json.loads((self.tmp / f"{role}.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def records(self, role: str) -> dict[int, dict]:
        path = self.tmp / f"{role}.jsonl"
        if not path.exists():
            return {}
        return {r["epoch"]: r for r in map(json.loads, path.read_text().splitlines())}

    def wait(self, what: str, predicate, timeout: float = 60.0, replica_may_exit: bool = False):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            for role, process in self.processes.items():
                if process.poll() is not None and role == "replica" and not replica_may_exit:
                    raise AssertionError(f"the replica exited ({process.returncode}) waiting for {what}:\n"
                                         + self.log("replica"))
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}\n--- primary\n{self.log('primary')}\n"
                             f"--- replica\n{self.log('replica')}")

    def log(self, role: str) -> str:
        path = self.tmp / f"{role}.log"
        return path.read_text()[-4000:] if path.exists() else ""

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
