"""colo-replica: keep a standby of a protected guest, and take over when its primary dies."""

from __future__ import annotations

import asyncio
import sys

from checkpointer.cli import _run, configure_logging
from checkpointer.config import parse_replica_args
from ring.errors import RingError


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    try:
        config = parse_replica_args(argv)
        from .agent import ReplicaAgent
        agent = ReplicaAgent(config)
        agent.bind()
    except (RingError, ValueError) as exc:
        print(f"colo-replica: {exc}", file=sys.stderr)
        return 2
    asyncio.run(_run(agent))
    if agent.last_error:
        print(f"colo-replica: stopped: {agent.last_error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
