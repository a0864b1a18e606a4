"""What the system tests share: checkpointer.cluster's agents, run through the test harness.

Not a test module: test modules import this, never each other. The harness
(tests/system/agent_harness.py) wraps each agent with hooks that record digests
(ROLE.jsonl) and can kill, hold acks or slow them; this adds the tests' defaults.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from checkpointer.cluster import Cluster, LocalEtcd

HARNESS = "tests.system.agent_harness"
# Heartbeats often, but a timeout well above what a loaded 2-core machine can stall a process for:
# a primary that calls its replica lost runs unprotected (by design until fencing), and a test of
# "nothing acknowledged is lost" would then fail for the machine's sake. Deaths are seen at once
# anyway: a killed agent's connection closes.
TIMING = ["--heartbeat-ms", "20", "--timeout-ms", "2000"]
PRIMARY = ["--workload", "uniform", "--memory-mib", "16", "--vcpus", "2", "--ring-entries", "1024",
           "--max-interval-ms", "20"]


_ETCD: LocalEtcd | None = None
_KEYS = itertools.count(1)


def shared_etcd() -> str | None:
    """The URL of one etcd for the whole test run (started on first use), or None if etcd is not
    installed. Each pair gets a key of its own (fencing_flags), so pairs never meet."""
    global _ETCD
    if shutil.which("etcd") is None:
        return None
    if _ETCD is None:
        folder = tempfile.mkdtemp(prefix="colo-test-etcd-")
        _ETCD = LocalEtcd(Path(folder))
        _ETCD.start()
        atexit.register(lambda: (_ETCD.stop(), shutil.rmtree(folder, ignore_errors=True)))
    return _ETCD.url


def fencing_flags() -> list[str]:
    """Both agents of one pair: fenced by the shared etcd under a key of their own; without etcd,
    --no-fencing (a crash then still fails over, on proof or silence)."""
    url = shared_etcd()
    if url is None:
        return ["--no-fencing"]
    return ["--etcd", url, "--etcd-key", f"/colo-ring/test/{os.getpid()}-{next(_KEYS)}",
            "--lease-ttl-s", "2", "--lease-renew-ms", "200"]


def fencing_settings(flags: Sequence[str]) -> dict[str, object]:
    """The [fencing] settings `flags` give, as load_config overrides (for an agent in the test's process)."""
    from checkpointer.config import flag_overrides, primary_arg_parser
    overrides, _ = flag_overrides(primary_arg_parser().parse_args(list(flags)))
    return overrides


class Agents(Cluster):
    """A cluster in the test's folder whose agents run under the harness, recording as they go."""

    def __init__(self, tmp: Path, fencing: Sequence[str] | None = None) -> None:
        super().__init__(tmp, common=[*TIMING, *(fencing_flags() if fencing is None else fencing)])
        self.tmp = tmp

    def start(self, role: str, harness: Sequence[str] = (), agent: Sequence[str] = ()) -> subprocess.Popen:
        """Start `role` under the harness (its `harness` arguments) with extra `agent` flags."""
        harness_args = [role, "--record", str(self.tmp / f"{role}.jsonl"), *harness]
        if role == "replica":
            return self.start_replica(agent, harness=HARNESS, harness_args=harness_args)
        return self.start_primary([*PRIMARY, *agent], harness=HARNESS, harness_args=harness_args)

    @property
    def processes(self) -> dict[str, subprocess.Popen]:
        return {name: agent.process for name, agent in self.agents.items()}

    def records(self, role: str) -> dict[int, dict]:
        """The harness's records of `role`, by epoch."""
        path = self.tmp / f"{role}.jsonl"
        if not path.exists():
            return {}
        return {r["epoch"]: r for r in map(json.loads, path.read_text().splitlines())}
