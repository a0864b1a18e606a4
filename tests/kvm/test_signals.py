"""Real KVM: signals and stops on the harvesting thread break neither a harvest nor its completeness.

A fast interval timer (SIGALRM with a no-op handler), or a sampler that stops
every thread with ptrace as py-spy does, hits the main thread while it pauses,
harvests, captures and resumes a guest many times. KVM_RESET_DIRTY_RINGS returns
a short count when a signal is pending, and the walk it cuts short leaves pages
writable and unlogged (ring/kvm.py); every harvest must still reset exactly what
it harvested and report exactly the pages the guest wrote.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
import sys
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
SAMPLER_ROUNDS = 10                        # rounds of 2 * HARVESTS under the ptrace sampler, at most

#: py-spy's blocking sampler, in short: stop every thread (PTRACE_SEIZE, PTRACE_INTERRUPT),
#: wait for the stops, detach; about 2,000 times a second.
PTRACE_SAMPLER = """
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
SEIZE, INTERRUPT, DETACH, WALL = 0x4206, 0x4207, 17, 0x40000000
pid = int(sys.argv[1])
while True:
    seized = [t for t in map(int, os.listdir(f"/proc/{pid}/task")) if libc.ptrace(SEIZE, t, None, None) == 0]
    for t in seized:
        libc.ptrace(INTERRUPT, t, None, None)
    for t in seized:
        os.waitpid(t, WALL)
    for t in seized:
        libc.ptrace(DETACH, t, None, None)
    time.sleep(0.0005)
"""


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
        # Each page logged once since its reset, except the status page that every vCPU writes:
        # vCPUs that fault on it together may each log it (KVM logs under no VM-wide lock).
        assert dirty.count <= dirty.entries <= dirty.count + vcpus - 1
        states = vm.capture_vcpus()                # GET_REGS, SREGS, XSAVE, MSRS... under the timer
        assert [s.index for s in states] == list(range(vcpus))


def _machine(dirty_log: str = "ring") -> KvmMachine:
    # Two vCPUs, so that a reset walks two rings; each vCPU owns half of a 6,000-page working set
    # and writes it in order, so that no page repeats within a harvest and every lap re-dirties
    # pages that an interrupted walk may have left unprotected.
    config = MachineConfig(vcpus=2, data_bytes=32 << 20, ring_entries=4096, dirty_log=dirty_log)
    vm = KvmMachine(config, Workload("sequential", seed=3, working_set_pages=6000))
    vm.set_limits(0)
    vm.start()
    vm.run_to_limit(10)
    vm.harvest()                                   # start clean: the loader's pages
    return vm


@pytest.mark.parametrize("dirty_log", ["ring", "bitmap"])
def test_harvests_under_a_fast_interval_timer_reset_and_report_every_page(dirty_log: str) -> None:
    with _machine(dirty_log) as vm, interval_timer(TIMER_SECONDS) as signals:
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


def _may_ptrace_a_child() -> tuple[bool, str]:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
        if libc.ptrace(0x4206, child.pid, None, None) != 0:      # PTRACE_SEIZE
            return False, f"ptrace is not allowed here: {errno.errorcode[ctypes.get_errno()]}"
        return True, ""
    finally:
        child.kill()
        child.wait()


def test_harvests_under_a_ptrace_sampler_reset_and_report_every_page() -> None:
    """py-spy's stops cannot be blocked: the resets they cut short are completed and the slots re-armed."""
    allowed, reason = _may_ptrace_a_child()
    if not allowed:
        pytest.skip(reason)
    with _machine() as vm:
        sampler = subprocess.Popen([sys.executable, "-c", PTRACE_SAMPLER, str(os.getpid())])
        try:
            # The window a stop must hit is the reset ioctl alone (ring._native times it in C), so a
            # round of harvests may see none: go on, a bounded number of rounds, until one does.
            for _ in range(SAMPLER_ROUNDS):
                _harvest_repeatedly(vm, 2 * HARVESTS)
                if vm.vm.reset_interruptions:
                    break
        finally:
            sampler.kill()
            sampler.wait()
        assert vm.vm.reset_interruptions > 0, "the sampler never stopped a reset: the test exercised nothing"
        assert vm.tracker.rearms >= vm.tracker.resets_cut_short
