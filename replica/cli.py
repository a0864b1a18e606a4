"""colo-replica: keep a standby of a protected guest, and take over when its primary dies."""

from __future__ import annotations

import sys

from checkpointer.cli import run_agent_cli
from checkpointer.config import parse_replica_args


def main(argv: list[str] | None = None) -> int:
    def build(args):
        from .agent import ReplicaAgent
        agent = ReplicaAgent(parse_replica_args(args))
        agent.bind()
        return agent
    return run_agent_cli("colo-replica", build, argv)


if __name__ == "__main__":
    sys.exit(main())
