"""The drill's primary: colo-primary with a kill switch at a chosen point of the epoch protocol.

    python -m scenarios.drill_primary --kill-at POINT:N -- <colo-primary flags>

POINT is where the process SIGKILLs itself at the N-th checkpoint taken while
protected: `transfer` (after the epoch's first page batch left), `after-end`
(after its END frame left, before its ack), `between` (when its ack arrives,
before the next epoch), `heavy-output` (after the END of the first checkpoint
after N taken while replies are held for their ack). `none` never kills (the
drill then kills from outside at a random time).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from checkpointer.agent import Hooks, PrimaryAgent
from checkpointer.launch import configure_logging, run_until_signal
from checkpointer.config import parse_primary_args

POINTS = ("none", "transfer", "after-end", "between", "heavy-output")
HEAVY_OUTPUT_BYTES = 64          # replies held for their ack at the checkpoint that is killed


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m scenarios.drill_primary")
    parser.add_argument("--kill-at", default="none:0", help="POINT:N, POINT one of " + ", ".join(POINTS))
    args = parser.parse_args(argv[:split])
    point, _, count = args.kill_at.partition(":")
    if point not in POINTS or not count.isdigit():
        parser.error(f"--kill-at {args.kill_at!r}: expected POINT:N with POINT one of {', '.join(POINTS)}")
    config = parse_primary_args(argv[split + 1:])
    state = {"protected": 0, "target": None}
    agent: PrimaryAgent

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def on_snapshot(snapshot, machine) -> None:
        if point == "none" or not agent.protocol.protected or not snapshot.consistent:
            return
        state["protected"] += 1
        if state["target"] is None and state["protected"] >= int(count):
            if point != "heavy-output" or agent.output.held_bytes >= HEAVY_OUTPUT_BYTES:
                state["target"] = snapshot.epoch

    def on_frame_sent(epoch: int, kind: int, step: str) -> None:
        if epoch != state["target"]:
            return
        if (point == "transfer" and step == "pages") or (point in ("after-end", "heavy-output")
                                                          and step == "end"):
            die()

    def on_ack(epoch: int) -> None:
        if point == "between" and state["target"] is not None and epoch >= state["target"]:
            die()

    agent = PrimaryAgent(config, hooks=Hooks(on_snapshot=on_snapshot, on_frame_sent=on_frame_sent,
                                             on_ack=on_ack))
    asyncio.run(run_until_signal(agent))
    return 1 if agent.last_error else 0


if __name__ == "__main__":
    sys.exit(main())
