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


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    try:
        config = parse_primary_args(argv)
        from .agent import PrimaryAgent
        agent = PrimaryAgent(config)
    except (RingError, ValueError) as exc:
        print(f"colo-primary: {exc}", file=sys.stderr)
        return 2
    asyncio.run(_run(agent))
    if agent.last_error:
        print(f"colo-primary: stopped: {agent.last_error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
