"""colo-primary: run a guest protected by a replica."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from ring.errors import RingError

from .config import parse_primary_args


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


async def _run(agent) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, agent.stop)
    await agent.run()


def run_agent_cli(prog: str, build, argv: list[str] | None) -> int:
    """Parse, build the agent (errors: 'prog: message', exit 2), run it until a signal."""
    configure_logging()
    try:
        agent = build(argv)
    except (RingError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    asyncio.run(_run(agent))
    if agent.last_error:
        print(f"{prog}: stopped: {agent.last_error}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    def build(args):
        from .agent import PrimaryAgent
        return PrimaryAgent(parse_primary_args(args))
    return run_agent_cli("colo-primary", build, argv)


if __name__ == "__main__":
    sys.exit(main())
