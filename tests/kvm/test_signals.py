"""Real KVM: signals on the harvesting thread do not break a harvest, nor its completeness.

A fast interval timer (SIGALRM with a no-op handler) hits the main thread, which
pauses, harvests, captures and resumes a guest many times. KVM_RESET_DIRTY_RINGS
returns a short count when a signal is pending, and the walk it cuts short leaves
pages writable and unlogged (ring/kvm.py); every harvest must still reset exactly
what it harvested and report exactly the pages the guest wrote.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import pytest

from ring import Fault, KvmMachine, LimitReached, MachineConfig, RingTracker, Workload
from ring.guest import layout

pytestmark = pytest.mark.kvm

TIMER_SECONDS = 50e-6                      # 20 kHz: several signals during every reset of thousands
ITEMS = 1200                               # pages each vCPU writes per harvest (all distinct)
HARVESTS = 80


@contextmanager
def interval_timer(seconds: float) -> Iterator[list[int]]:
    """SIGALRM every `seconds` on this (the main) thread; yields a one-item list counting them."""
    count = [0]

    def handler(signum, frame) -> None:
        count[0] += 1

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds, seconds)
    try:
        yield count
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _harvest_repeatedly(vm: KvmMachine, harvests: int) -> None:
    """Run each vCPU ITEMS writes further, pause, harvest, capture; check every harvest exactly."""
    vcpus = vm.config.vcpus
    for number in range(harvests):
        before = vm.progress_all()
        for v in range(vcpus):
            vm.set_limit(v, before[v] + ITEMS)
        vm.resume()
        reached: set[int] = set()
        while len(reached) < vcpus:
            event = vm.wait_for(lambda e: isinstance(e, (LimitReached, Fault)), timeout=60)
            assert not isinstance(event, Fault), event
            if event.progress >= before[event.vcpu] + ITEMS:
                reached.add(event.vcpu)
        vm.pause()
        vm.drain_events()
        after = vm.progress_all()
        assert after == [b + ITEMS for b in before]
        dirty = vm.harvest()                       # raises if the reset count does not add up
        written: set[int] = set()
        for v in range(vcpus):
            written |= set(vm.resolved.pages(v, np.arange(before[v], after[v], dtype=np.uint64)).tolist())
        reported = set(dirty.slot(layout.DATA_SLOT).tolist())
        assert reported == written, (f"harvest {number}: {len(written - reported)} written pages not "
                                     f"reported, {len(reported - written)} reported but not written")
        assert dirty.entries == dirty.count        # each page logged once since its reset
        states = vm.capture_vcpus()                # GET_REGS, SREGS, XSAVE, MSRS... under the timer
        assert [s.index for s in states] == list(range(vcpus))


def _machine() -> KvmMachine:
    # Two vCPUs, so that a reset walks two rings; each vCPU owns half of a 6,000-page working set
    # and writes it in order, so that no page repeats within a harvest and every lap re-dirties
    # pages that an interrupted walk may have left unprotected.
    config = MachineConfig(vcpus=2, data_bytes=32 << 20, ring_entries=4096)
    vm = KvmMachine(config, Workload("sequential", seed=3, working_set_pages=6000))
    vm.set_limits(0)
    vm.start()
    vm.run_to_limit(10)
    vm.harvest()                                   # start clean: the loader's pages
    return vm


def test_harvests_under_a_fast_interval_timer_reset_and_report_every_page() -> None:
    with _machine() as vm, interval_timer(TIMER_SECONDS) as signals:
        _harvest_repeatedly(vm, HARVESTS)
        assert signals[0] > 0, "the timer never fired: the test did not exercise anything"


def test_resets_cut_short_by_signals_are_completed_and_the_slots_rearmed() -> None:
    """With signals not blocked for the ioctl, resets come back short: retry and re-arm keep it whole."""
    with _machine() as vm:
        tracker = vm.tracker
        vm.tracker = RingTracker(tracker.rings, lambda: vm.vm.reset_dirty_rings(block_signals=False),
                                 rearm=vm.rearm_dirty_logging, interruptions=lambda: vm.vm.reset_interruptions)
        with interval_timer(TIMER_SECONDS):
            _harvest_repeatedly(vm, HARVESTS)
        assert vm.tracker.resets_cut_short > 0, "no reset was cut short: the test did not exercise the retry"
        assert vm.tracker.rearms >= vm.tracker.resets_cut_short
