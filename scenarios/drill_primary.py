"""The drill's primary: colo-primary with a kill switch at a chosen point of the epoch protocol.

    python -m scenarios.drill_primary --kill-at POINT:N -- <colo-primary flags>

POINT is where the process SIGKILLs itself at the N-th checkpoint taken while
protected. The drill's names for its kill points stand for points of
checkpointer.faults.KillPoint: `transfer` (PAGES: after the epoch's first page
batch left), `after-end` (END: after its END frame left, before its ack),
`between` (ACKED: when its ack arrives, before the next epoch), `heavy-output`
(END of the first checkpoint at or after N taken while replies are held for
their ack). A KillPoint's own name (begin, pages, vcpu, device, end, acked) is
accepted too. `none` never kills (the drill then kills from outside at a random
time).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from checkpointer.agent import PrimaryAgent
from checkpointer.config import parse_primary_args
from checkpointer.faults import KillAt, KillPoint, KillSwitch, parse_kill_at
from checkpointer.launch import configure_logging, run_until_signal

HEAVY_OUTPUT_BYTES = 64          # replies held for their ack at the checkpoint that is killed
#: The drill's kill points (its --kill-point flag) as protocol points; N comes from --kill-at.
DRILL_POINTS = {"transfer": KillAt(KillPoint.PAGES, 1), "after-end": KillAt(KillPoint.END, 1),
                "between": KillAt(KillPoint.ACKED, 1),
                "heavy-output": KillAt(KillPoint.END, 1, min_held_output=HEAVY_OUTPUT_BYTES)}


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m scenarios.drill_primary")
    parser.add_argument("--kill-at", default="none", help="POINT:N, POINT one of none, "
                        + ", ".join(DRILL_POINTS) + " (or a protocol point: "
                        + ", ".join(p.value for p in KillPoint) + ")")
    args = parser.parse_args(argv[:split])
    try:
        kill_at = parse_kill_at(args.kill_at, DRILL_POINTS)
    except ValueError as exc:
        parser.error(f"--kill-at {exc}")
    config = parse_primary_args(argv[split + 1:])
    agent: PrimaryAgent
    switch = KillSwitch.for_agent(kill_at, lambda: agent)
    agent = PrimaryAgent(config, hooks=switch.hooks())
    asyncio.run(run_until_signal(agent))
    return 1 if agent.last_error else 0


if __name__ == "__main__":
    sys.exit(main())
