"""The drill's node: colo-node with a kill switch at a point of the epoch protocol, armed by SIGUSR2.

    python -m scenarios.drill_node --kill-file FILE -- <colo-node flags>

On SIGUSR2 (the drill strikes this node while it is the primary) the node reads POINT:N from FILE
and SIGKILLs itself at POINT of the N-th protected checkpoint from then on (the points of
scenarios.drill_primary: transfer, after-end, between, heavy-output, or a KillPoint's own name),
writing the time it died to FILE.died first (the drill's takeover from the crash). Unarmed, it is colo-node. (SIGUSR1 is the vCPUs' kick signal.)
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from checkpointer.faults import KillSwitch, parse_kill_at
from pair.node import Node, main as node_main

from .drill_primary import DRILL_POINTS

log = logging.getLogger("colo.drill")


def died_file(kill_file: str | Path) -> Path:
    """Where a node armed by `kill_file` writes the time it died (FILE.died)."""
    return Path(f"{kill_file}.died")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m scenarios.drill_node")
    parser.add_argument("--kill-file", required=True, help="where POINT:N is read when SIGUSR2 arms the switch")
    args = parser.parse_args(argv[:split])
    node: Node | None = None

    def die() -> None:
        """SIGKILL this process, its wall-clock time first in died_file (takeover from the crash)."""
        died_file(args.kill_file).write_text(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)

    switch = KillSwitch.for_agent(None, lambda: node.agent, kill=die)

    def arm() -> None:
        text = Path(args.kill_file).read_text().strip()
        try:
            switch.arm(parse_kill_at(text, DRILL_POINTS))
        except ValueError as exc:
            log.error("kill file %s: %s", args.kill_file, exc)
            return
        log.warning("kill switch armed: %s", text)

    def make(config) -> Node:
        nonlocal node
        node = Node(config, primary_hooks=switch.hooks())
        return node

    return node_main(argv[split + 1:], make_node=make, signals={signal.SIGUSR2: arm})


if __name__ == "__main__":
    sys.exit(main())
