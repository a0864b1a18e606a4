"""An agent's command line, shared by colo-primary and colo-replica: parse, check, build, run.

Bad input ends in one line that names the setting, and exit status 2, before
anything runs: the settings themselves (checkpointer.config), and the
addresses the agent will listen on. An address already taken would otherwise
surface as a raw ``zmq.error.ZMQError`` traceback, or, for the primary's
control interface (bound once the guest runs), as a stopped agent. So each
address is tried here first with a plain socket (SO_REUSEADDR, as libzmq and
asyncio bind theirs, so a port in TIME_WAIT is not "in use"), and a bind that
still fails in an agent's own set-up is mapped to its setting with
:func:`listen_error`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ring.errors import RingError

from .config import AgentConfig, SettingError
from .fencing import FencingError

__all__ = ["configure_logging", "run_until_signal", "check_listen_addresses", "listen_error",
           "run_agent_cli"]


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


async def run_until_signal(agent: Any) -> None:
    """Run the agent until it stops, or SIGINT/SIGTERM stops it."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, agent.stop)
    await agent.run()


def listen_error(config: AgentConfig, key: str, endpoint: str, err: int | None) -> SettingError:
    """The one-line error for an address the agent cannot listen on, naming its setting."""
    reason = os.strerror(err) if err else "unknown error"
    if err == errno.EADDRINUSE:
        return config.error(key, f"{endpoint} is already in use ({reason})")
    return config.error(key, f"cannot listen on {endpoint} ({reason})")


def _bind_errno(endpoint: str) -> int | None:
    """The errno of binding tcp://HOST:PORT's address now, or None: free, or nothing to try.

    Port 0 or * (any free port) needs no try; a host that does not resolve is left
    to the agent's own bind, which says what it thinks of it.
    """
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return None
    host = "0.0.0.0" if host == "*" else host.strip("[]")      # zmq's *: every IPv4 interface
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        infos = socket.getaddrinfo(host, int(port), family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        return None
    fam, kind, proto, _, address = infos[0]
    with socket.socket(fam, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return exc.errno
    return None


def check_listen_addresses(config: AgentConfig) -> None:
    """Refuse, naming the setting, an address the agent will listen on that it cannot have."""
    for key, endpoint in config.listen_addresses():
        err = _bind_errno(endpoint)
        if err is not None:
            raise listen_error(config, key, endpoint, err)


def run_agent_cli(prog: str, parse: Callable[[Sequence[str] | None], AgentConfig],
                  make: Callable[[Any], Any], argv: Sequence[str] | None) -> int:
    """Parse, check the addresses, build the agent (bad input: 'prog: message', exit 2), run it."""
    configure_logging()
    try:
        config = parse(argv)
        check_listen_addresses(config)
        agent = make(config)
    except (RingError, ValueError) as exc:          # ConfigError and SettingError are ValueErrors
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(run_until_signal(agent))
    except FencingError as exc:                     # etcd unreachable, or another node is active
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    if agent.last_error:
        print(f"{prog}: stopped: {agent.last_error}", file=sys.stderr)
        return 1
    return 0
