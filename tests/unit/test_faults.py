"""Kill points and the kill switch, driven by hand: which epoch is chosen, where it dies (no process dies)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from checkpointer.faults import KillAt, KillPoint, KillSwitch, parse_kill_at
from scenarios.drill_primary import DRILL_POINTS, HEAVY_OUTPUT_BYTES


@dataclass
class Snap:
    epoch: int
    consistent: bool = True
    reason: str = "interval"


class Primary:
    """What the switch reads from an agent, and what it did."""

    def __init__(self) -> None:
        self.protected = False
        self.held = 0
        self.kills = 0
        self.targets: list[int] = []

    def switch(self, at: KillAt | None) -> KillSwitch:
        return KillSwitch(at, lambda: self.protected, lambda: self.held, on_target=self.targets.append,
                          kill=self.die)

    def die(self) -> None:
        self.kills += 1


def send_epoch(switch: KillSwitch, epoch: int, pages: int = 2, steps=str) -> None:
    """The frames of a consistent epoch, in the order the agent sends them."""
    points = [KillPoint.BEGIN, *[KillPoint.PAGES] * pages, KillPoint.VCPU, KillPoint.DEVICE, KillPoint.END]
    for point in points:
        switch.on_frame_sent(epoch, 0, steps(point.value) if steps is str else point)


def test_points_are_in_protocol_order_and_take_the_agents_step_names() -> None:
    assert [p.value for p in KillPoint] == ["begin", "pages", "vcpu", "device", "end", "acked"]
    assert KillPoint("end") is KillPoint.END and KillPoint.PAGES == "pages"
    assert [p for p in KillPoint if p.on_ack] == [KillPoint.ACKED]


def test_parse_kill_at() -> None:
    assert parse_kill_at("pages:8") == KillAt(KillPoint.PAGES, 8)
    assert parse_kill_at("acked:1") == KillAt(KillPoint.ACKED, 1)
    assert parse_kill_at("none") is None and parse_kill_at("none:0") is None
    for bad, words in (("pages", "POINT:N"), ("pages:0", "from 1"), ("pages:x", "POINT:N"),
                       ("8:pages", "POINT:N"), ("bogus:3", "unknown kill point 'bogus'.*begin, pages, vcpu")):
        with pytest.raises(ValueError, match=words):
            parse_kill_at(bad)


def test_the_drills_names_are_protocol_points() -> None:
    assert parse_kill_at("transfer:20", DRILL_POINTS) == KillAt(KillPoint.PAGES, 20)
    assert parse_kill_at("after-end:5", DRILL_POINTS) == KillAt(KillPoint.END, 5)
    assert parse_kill_at("between:5", DRILL_POINTS) == KillAt(KillPoint.ACKED, 5)
    assert parse_kill_at("heavy-output:5", DRILL_POINTS) == KillAt(KillPoint.END, 5, HEAVY_OUTPUT_BYTES)
    assert parse_kill_at("vcpu:5", DRILL_POINTS) == KillAt(KillPoint.VCPU, 5)
    with pytest.raises(ValueError, match="heavy-output"):
        parse_kill_at("sideways:5", DRILL_POINTS)


def test_the_nth_protected_checkpoint_is_the_target() -> None:
    primary = Primary()
    switch = primary.switch(KillAt(KillPoint.VCPU, 2))
    switch.on_snapshot(Snap(1))                          # not protected yet: not counted
    switch.on_snapshot(Snap(2, reason="sync"))           # the final sync: not counted
    primary.protected = True
    switch.on_snapshot(Snap(3, consistent=False))        # not a checkpoint
    switch.on_snapshot(Snap(4))
    send_epoch(switch, 4)
    assert switch.target is None and primary.kills == 0
    switch.on_snapshot(Snap(5))
    assert switch.target == 5 and primary.targets == [5]
    switch.on_snapshot(Snap(6))                          # epoch 6 is taken before 5 is sent
    send_epoch(switch, 6)
    assert primary.kills == 0
    switch.on_frame_sent(5, 0, KillPoint.BEGIN)
    switch.on_frame_sent(5, 0, "pages")
    assert primary.kills == 0
    switch.on_frame_sent(5, 0, "vcpu")
    assert primary.kills == 1


@pytest.mark.parametrize("steps", [str, KillPoint], ids=["step strings", "KillPoint"])
@pytest.mark.parametrize("point", [p for p in KillPoint if not p.on_ack])
def test_each_frame_point_kills_at_its_frame_only(point: KillPoint, steps) -> None:
    primary = Primary()
    primary.protected = True
    switch = primary.switch(KillAt(point, 1))
    switch.on_snapshot(Snap(7))
    sent = [KillPoint.BEGIN, KillPoint.PAGES, KillPoint.PAGES, KillPoint.VCPU, KillPoint.DEVICE, KillPoint.END]
    killed_after = []
    for frame in sent:
        switch.on_frame_sent(7, 0, frame.value if steps is str else frame)
        killed_after.append(primary.kills)
    at = sent.index(point)
    assert killed_after[:at] == [0] * at and killed_after[at] == 1
    switch.on_ack(7)
    assert primary.kills == killed_after[-1]             # an ack is no frame point


def test_acked_kills_when_the_targets_ack_arrives() -> None:
    primary = Primary()
    primary.protected = True
    switch = primary.switch(KillAt(KillPoint.ACKED, 1))
    switch.on_snapshot(Snap(3))
    send_epoch(switch, 3)
    switch.on_ack(2)
    assert primary.kills == 0
    switch.on_ack(3)
    assert primary.kills == 1


def test_heavy_output_waits_for_a_checkpoint_with_replies_held() -> None:
    primary = Primary()
    primary.protected = True
    switch = primary.switch(parse_kill_at("heavy-output:2", DRILL_POINTS))
    for epoch, held in ((10, 500), (11, 10), (12, 63), (13, HEAVY_OUTPUT_BYTES), (14, 900)):
        primary.held = held
        switch.on_snapshot(Snap(epoch))
    assert primary.targets == [13]                       # the 2nd or later, with 64 bytes held
    send_epoch(switch, 13)
    assert primary.kills == 1


def test_an_epoch_without_pages_moves_a_pages_kill_to_the_next_checkpoint() -> None:
    primary = Primary()
    primary.protected = True
    switch = primary.switch(KillAt(KillPoint.PAGES, 1))
    switch.on_snapshot(Snap(4))
    send_epoch(switch, 4, pages=0)
    assert primary.kills == 0 and switch.target is None
    switch.on_snapshot(Snap(5))
    send_epoch(switch, 5, pages=1)
    assert primary.targets == [4, 5] and primary.kills == 1


def test_no_kill_point_never_kills_and_the_hooks_run_the_recorder_first() -> None:
    primary = Primary()
    primary.protected = True
    seen = []
    switch = primary.switch(None)
    hooks = switch.hooks(on_snapshot=lambda snapshot, machine: seen.append((snapshot.epoch, switch.target)))
    for epoch in range(1, 5):
        hooks.on_snapshot(Snap(epoch), None)
        send_epoch(switch, epoch)
        hooks.on_ack(epoch)
    assert primary.kills == 0 and seen == [(1, None), (2, None), (3, None), (4, None)]
    armed = primary.switch(KillAt(KillPoint.END, 1)).hooks(on_snapshot=lambda s, m: seen.append(s.epoch))
    armed.on_snapshot(Snap(9), None)
    armed.on_frame_sent(9, 0, "end")
    assert seen[-1] == 9 and primary.kills == 1
