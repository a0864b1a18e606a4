"""colo-primary: run a guest protected by a replica (the shared steps are in checkpointer.launch)."""

from __future__ import annotations

import sys
from typing import Any

from .config import PrimaryAgentConfig, parse_primary_args
from .launch import configure_logging, run_agent_cli, run_until_signal

__all__ = ["build", "main", "configure_logging", "run_until_signal"]



def build(config: PrimaryAgentConfig) -> Any:
    """The primary agent for `config` (the guest is built here: bad keys fail before it runs)."""
    from .agent import PrimaryAgent
    return PrimaryAgent(config)


def main(argv: list[str] | None = None) -> int:
    return run_agent_cli("colo-primary", parse_primary_args, build, argv)


if __name__ == "__main__":
    sys.exit(main())
