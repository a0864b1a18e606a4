"""The sync's progress and projected end (checkpointer.sync.SyncProgress), from given rates."""

from __future__ import annotations

import numpy as np
import pytest

from checkpointer.sync import SyncProgress


def test_the_first_round_projects_its_own_end() -> None:
    progress = SyncProgress(10_000, now=0.0, wall=1000.0)
    progress.begin_round(1, 10_000, now=0.0)
    progress.copied(2_000, now=1.0)                       # 2,000 pages/s
    assert progress.eta_s(1.0) == pytest.approx(4.0)
    status = progress.status(1.0)
    assert (status["round"], status["round_copied"], status["copy_rate_pages_s"]) == (1, 2_000, 2_000)
    assert status["state"] == "pre-copy" and status["throttle"] == 0.0


def test_later_rounds_shrink_by_the_last_ratio_and_a_round_that_does_not_shrink_has_no_end() -> None:
    progress = SyncProgress(10_000, now=0.0, wall=0.0)
    progress.begin_round(1, 10_000, now=0.0)
    progress.copied(10_000, now=5.0)
    progress.end_round(2_500, now=5.0)                   # a quarter dirtied again: 500 pages/s
    assert (progress.copy_rate, progress.dirty_rate, progress.left_ratio) == (2_000, 500, 0.25)
    progress.begin_round(2, 2_500, now=5.0)
    # 2,500 left in this round, then 2,500 * (1/4 + 1/16 + ...) = 2,500 / 3 more, at 2,000 pages/s
    assert progress.eta_s(5.0) == pytest.approx((2_500 + 2_500 / 3) / 2_000)
    progress.copied(2_500, now=6.25)
    progress.end_round(2_400, now=6.25)                   # not converging
    progress.begin_round(3, 2_400, now=6.25)
    assert progress.eta_s(6.25) is None
    assert "not converging yet" in progress.describe(6.25)
    progress.state = "final copy"
    assert progress.status(7.0)["eta_s"] is None


def test_what_a_lost_replica_lacks_is_what_it_never_acknowledged_or_was_dirtied_since() -> None:
    from checkpointer.sync import ReplicaCopy
    from ring import pages as pagekeys
    from ring.dirty import DirtySet

    def keys(*offsets: int, slot: int = 1) -> np.ndarray:
        return pagekeys.make(np.full(len(offsets), slot, np.uint32), np.array(offsets, np.uint64))

    copy = ReplicaCopy({0: 16, 1: 64})
    copy.dirtied(DirtySet({1: np.array([9], np.uint64)}))     # no session yet: nothing to track
    copy.start(7, keys(1, 2, 3, 4, 5, 6))                     # a full sync of six pages
    copy.gathered(keys(1, 2))
    copy.sent(10, keys(1, 2))
    copy.gathered(keys(3, 4))
    copy.sent(11, keys(3, 4))
    copy.acked(10)                                            # 1 and 2 are in the replica's copy
    copy.dirtied(DirtySet({1: np.array([2, 40], np.uint64)}))  # 2 changed since; 40 is new
    copy.lost()                                               # 11 was never acknowledged
    missing = copy.take_missing()
    assert missing.tolist() == keys(2, 3, 4, 5, 6, 40).tolist()
    assert copy.session == 7 and copy.take_missing().tolist() == []
    copy.start(8, None)                                       # resumed: the marks start empty
    assert copy.session == 8
