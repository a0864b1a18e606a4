"""Kill points: where in the epoch protocol a primary may be made to die, named once.

The claim these serve is DESIGN.md's "atomic epochs": a primary that dies at any point of
sending epoch N leaves the replica at a complete epoch, never a torn one. Proving it takes a
process that really dies (SIGKILL: no cleanup, no BYE, nothing flushed) at a chosen point of a
chosen epoch, and the drill, the system tests' harness and the protocol's unit tests must mean
the same points by the same names. They are the members of `KillPoint`, in the order an epoch
goes through them.

What is hard about it: the points are seen from the primary's own hooks, so "after BEGIN left"
means after the frame was handed to ZeroMQ (the replica may or may not have it yet; that is
the point of killing there). An epoch is chosen by counting protected checkpoints (consistent
epochs taken once the replica holds a full copy), not by epoch number: pre-copy and sync epochs
come first, and how many there are depends on the guest.

    python -m ... --kill-at POINT:N      POINT a KillPoint value (or an alias the tool defines),
                                         N the protected checkpoint (1 = the first)

`KillSwitch` turns a `KillAt` into the primary agent's Hooks.
"""

from __future__ import annotations

import enum
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:                      # the agent imports this module (its step names), not the reverse
    from .agent import Hooks, PrimaryAgent


class KillPoint(enum.StrEnum):
    """A point of one epoch, in protocol order. The values are the agent's step names.

    With protocol version 2 an epoch leaves as one message, so the points before END are
    reached when that frame is ready, just before the message leaves: the replica gets none of
    the epoch. (A version-1 session sends frame by frame: there they come after the frame left.)
    """

    BEGIN = "begin"        # the epoch's EPOCH_BEGIN frame is ready (no page of it sent yet)
    PAGES = "pages"        # its first PAGES batch is ready (the epoch is in transfer)
    VCPU = "vcpu"          # its VCPU_STATE frame is ready
    DEVICE = "device"      # its DEVICE_STATE frame is ready (the last part before END)
    END = "end"            # after the epoch's message, EPOCH_END last, left, before its ack came back
    ACKED = "acked"        # when its ACK arrives (committed on the replica), before the next epoch

    @property
    def on_ack(self) -> bool:
        """Seen when an ack arrives, not when a frame is sent."""
        return self is KillPoint.ACKED


@dataclass(frozen=True)
class KillAt:
    """Die at `point` of the `nth` protected checkpoint (the first one at or after it whose
    epoch holds at least `min_held_output` bytes of replies waiting for their ack)."""

    point: KillPoint
    nth: int
    min_held_output: int = 0


NEVER = "none"                         # --kill-at none[:N]: no kill switch


def parse_kill_at(text: str, aliases: Mapping[str, KillAt] | None = None) -> KillAt | None:
    """`POINT:N` as a KillAt (None for `none`). POINT is a KillPoint value, or a key of `aliases`
    (whose KillAt gives the point and held-output minimum; N comes from the text). ValueError
    names what is wrong."""
    aliases = aliases or {}
    name, colon, count = text.partition(":")
    choices = ", ".join([NEVER, *(p.value for p in KillPoint), *aliases])
    if name == NEVER:
        return None
    if not colon or not count.isdigit() or int(count) < 1:
        raise ValueError(f"{text!r}: expected POINT:N with N a protected checkpoint from 1, POINT one of "
                         f"{choices}")
    if name in aliases:
        alias = aliases[name]
        return KillAt(alias.point, int(count), alias.min_held_output)
    try:
        return KillAt(KillPoint(name), int(count))
    except ValueError:
        raise ValueError(f"{text!r}: unknown kill point {name!r}; expected one of {choices}") from None


def _sigkill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillSwitch:
    """SIGKILL this process at one kill point of one protected checkpoint.

    It counts the consistent checkpoints taken while the primary is protected; the N-th one (or
    the first after it with enough output held) becomes the target epoch, reported through
    `on_target`. It then dies when the target's frame for the point has been sent, or, for
    ACKED, when an ack for the target (or a later epoch) arrives. An epoch without pages has no
    PAGES point: the switch then takes the next protected checkpoint as its target.
    """

    def __init__(self, at: KillAt | None, protected: Callable[[], bool],
                 held_output: Callable[[], int] = lambda: 0, *,
                 on_target: Callable[[int], None] | None = None,
                 kill: Callable[[], None] = _sigkill_self) -> None:
        self.at = at
        self.protected = protected
        self.held_output = held_output
        self.on_target = on_target
        self.kill = kill
        self.checkpoints = 0                 # protected checkpoints seen
        self.target: int | None = None       # the epoch to die in

    def arm(self, at: KillAt | None) -> None:
        """Aim at `at` from now on: its N counts protected checkpoints from this moment."""
        self.at, self.checkpoints, self.target = at, 0, None

    @classmethod
    def for_agent(cls, at: KillAt | None, agent: Callable[[], PrimaryAgent], **options) -> KillSwitch:
        """A switch reading the protocol's state and the held output of `agent()` (called late:
        the hooks are built before the agent)."""
        return cls(at, lambda: agent().protocol.protected, lambda: agent().output.held_bytes, **options)

    # -- the three hooks ------------------------------------------------------------------
    def on_snapshot(self, snapshot, machine=None) -> None:
        if self.at is None or self.target is not None or not snapshot.consistent or not self.protected():
            return
        if snapshot.reason == "sync":
            return
        self.checkpoints += 1
        if self.checkpoints >= self.at.nth and self.held_output() >= self.at.min_held_output:
            self.target = snapshot.epoch
            if self.on_target is not None:
                self.on_target(snapshot.epoch)

    def on_frame_sent(self, epoch: int, kind: int, step: KillPoint | str) -> None:
        """`step` is a KillPoint, or the agent's step string of the same value."""
        if self.at is None or epoch != self.target or self.at.point.on_ack:
            return
        point = KillPoint(step)
        if point is self.at.point:
            self.kill()
        elif point is KillPoint.END and self.at.point is KillPoint.PAGES:
            self.target = None               # no PAGES in this epoch: the next checkpoint

    def on_ack(self, epoch: int) -> None:
        if self.at is not None and self.at.point.on_ack and self.target is not None and epoch >= self.target:
            self.kill()

    def hooks(self, on_snapshot: Callable | None = None) -> Hooks:
        """The primary agent's Hooks for this switch; `on_snapshot` (a recorder, say) runs first."""
        from .agent import Hooks             # here: the agent module imports this one

        def snapshot_hook(snapshot, machine) -> None:
            if on_snapshot is not None:
                on_snapshot(snapshot, machine)
            self.on_snapshot(snapshot, machine)

        return Hooks(on_snapshot=snapshot_hook, on_frame_sent=self.on_frame_sent, on_ack=self.on_ack)
