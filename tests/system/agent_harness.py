"""Run a real agent in its own process with test hooks (used by the system tests through tests/support.py).

    python -m tests.system.agent_harness primary --record FILE [--kill-at POINT:N] -- <colo-primary flags>
    python -m tests.system.agent_harness replica --record FILE [--ack-delay-ms MS] [--hold-acks] -- <colo-replica flags>

The primary records, while the guest is paused at each checkpoint, a digest of
all guest memory, of the vCPU state and the guest's progress; the replica
records the same of its standby after each consistent commit. Records are JSON
lines written with os.write, so a SIGKILL loses none. `--hold-acks` lets the
test hold the replica's acks: SIGUSR2 starts holding, SIGUSR2 again releases.
`--kill-at POINT:N` SIGKILLs the primary at the N-th checkpoint taken while
protected, at POINT, one of checkpointer.faults.KillPoint: begin, pages, vcpu,
device, end, acked (each documented there); the target epoch is written to
FILE.target.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys

import xxhash

from checkpointer.agent import PrimaryAgent
from checkpointer.config import parse_primary_args, parse_replica_args
from checkpointer.faults import KillPoint, KillSwitch, parse_kill_at
from checkpointer.launch import configure_logging, run_until_signal
from replica.agent import ReplicaAgent, ReplicaHooks
from replica.standby import memory_digest
from ring.vcpu_state import pack_vcpu_states


def vcpu_digest(states) -> str:
    return xxhash.xxh3_128(pack_vcpu_states(states)).hexdigest()


class Recorder:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, **record) -> None:
        os.write(self.fd, (json.dumps(record) + "\n").encode())


def run_primary(args, agent_args) -> int:
    config = parse_primary_args(agent_args)
    recorder = Recorder(args.record)
    agent: PrimaryAgent

    def record(snapshot, machine) -> None:
        if snapshot.consistent:
            recorder.write(epoch=snapshot.epoch, reason=snapshot.reason,
                           memory=memory_digest(machine.memory).hex(), vcpus=vcpu_digest(snapshot.vcpus),
                           progress=sum(machine.progress_all()))

    def note_target(epoch: int) -> None:
        with open(args.record + ".target", "w") as handle:
            handle.write(str(epoch))

    switch = KillSwitch.for_agent(args.kill_at, lambda: agent, on_target=note_target)
    agent = PrimaryAgent(config, hooks=switch.hooks(on_snapshot=record))
    asyncio.run(run_until_signal(agent))
    return 1 if agent.last_error else 0


def run_replica(args, agent_args) -> int:
    config = parse_replica_args(agent_args)
    recorder = Recorder(args.record)

    def on_commit(epoch: int, standby) -> None:
        if standby.consistent:
            recorder.write(epoch=epoch, memory=standby.digest_memory().hex(),
                           vcpus=vcpu_digest(standby.vcpus), progress=standby.progress())

    held: list[asyncio.Future] = []
    state = {"holding": False}

    def toggle_acks() -> None:               # SIGUSR2: start holding acks; again: let them go
        state["holding"] = not state["holding"]
        if state["holding"]:
            with open(args.record + ".holding", "w") as handle:
                handle.write("holding")
            return
        for future in held:
            if not future.done():
                future.set_result(None)
        held.clear()

    def hold_ack(epoch: int):
        loop = asyncio.get_running_loop()
        if args.hold_acks and not state.get("handler"):
            loop.add_signal_handler(signal.SIGUSR2, toggle_acks)
            state["handler"] = True
        if state["holding"]:
            future = loop.create_future()
            held.append(future)
            return future
        if not args.ack_delay_ms:
            return None
        future = loop.create_future()
        loop.call_later(args.ack_delay_ms / 1000, future.set_result, None)
        return future

    agent = ReplicaAgent(config, hooks=ReplicaHooks(on_commit=on_commit, hold_ack=hold_ack))
    agent.bind()
    asyncio.run(run_until_signal(agent))
    return 1 if agent.last_error else 0


def main() -> int:
    configure_logging()
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("primary", "replica"))
    parser.add_argument("--record", required=True)
    parser.add_argument("--kill-at", default=None, type=parse_kill_at, metavar="POINT:N",
                        help="SIGKILL the primary at POINT (" + ", ".join(p.value for p in KillPoint)
                             + ") of its N-th protected checkpoint")
    parser.add_argument("--ack-delay-ms", type=float, default=0.0)
    parser.add_argument("--hold-acks", action="store_true",
                        help="SIGUSR2 starts holding every ack (writes RECORD.holding); SIGUSR2 again releases")
    args = parser.parse_args(argv[:split])
    agent_args = argv[split + 1:]
    return run_primary(args, agent_args) if args.role == "primary" else run_replica(args, agent_args)


if __name__ == "__main__":
    sys.exit(main())
