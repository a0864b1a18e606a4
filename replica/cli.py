"""colo-replica: keep a standby of a protected guest, and take over when its primary dies."""

from __future__ import annotations

import sys
from typing import Any

import zmq

from checkpointer.launch import listen_error, run_agent_cli
from checkpointer.config import ReplicaAgentConfig, parse_replica_args

__all__ = ["build", "main"]


def _discard(agent: Any) -> None:
    """Undo what a replica that could not bind set up (its authenticator thread, its context)."""
    authenticator = getattr(agent, "authenticator", None)
    if authenticator is not None:
        authenticator.stop()
    context = getattr(agent, "context", None)
    if context is not None:
        context.destroy(linger=0)


def build(config: ReplicaAgentConfig, agent_class: Any = None) -> Any:
    """The replica agent, bound to replica.listen; a failed bind is a SettingError naming it."""
    if agent_class is None:
        from .agent import ReplicaAgent as agent_class
    agent = agent_class(config)
    try:
        agent.bind()
    except zmq.ZMQError as exc:
        _discard(agent)
        raise listen_error(config, "replica.listen", config.replica.listen, exc.errno) from None
    return agent


def main(argv: list[str] | None = None) -> int:
    return run_agent_cli("colo-replica", parse_replica_args, build, argv)


if __name__ == "__main__":
    sys.exit(main())
