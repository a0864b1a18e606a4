"""What the system tests share: checkpointer.cluster's agents, run through the test harness.

Not a test module: test modules import this, never each other. The harness
(tests/system/agent_harness.py) wraps each agent with hooks that record digests
(ROLE.jsonl) and can kill, hold acks or slow them; this adds the tests' defaults.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path

from checkpointer.cluster import Cluster

HARNESS = "tests.system.agent_harness"
# Heartbeats often, but a timeout well above what a loaded 2-core machine can stall a process for:
# a primary that calls its replica lost runs unprotected (by design until fencing), and a test of
# "nothing acknowledged is lost" would then fail for the machine's sake. Deaths are seen at once
# anyway: a killed agent's connection closes.
TIMING = ["--heartbeat-ms", "20", "--timeout-ms", "2000"]
PRIMARY = ["--workload", "uniform", "--memory-mib", "16", "--vcpus", "2", "--ring-entries", "1024",
           "--max-interval-ms", "20"]


class Agents(Cluster):
    """A cluster in the test's folder whose agents run under the harness, recording as they go."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, common=TIMING)
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
