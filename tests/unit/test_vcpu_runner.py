"""VcpuRunner's park reasons: a release that comes while the vCPU is still on its way to park for
that reason is not lost (a limit raised just as the vCPU reached the old one)."""

from __future__ import annotations

import threading
import time

from ring.vcpus import Exit, VcpuRunner

LIMIT_PORT = 0x42


class Executor:
    """A vCPU that exits at a limit port; its second exit happens only once released."""

    index = 0

    def __init__(self) -> None:
        self.runs = 0
        self.second_run = threading.Event()
        self.release_now = None                 # called inside the first run, before it returns

    def run_gated(self, gate) -> Exit | None:
        if not gate.enter(self.index):
            return None
        try:
            return self.run(gate)
        finally:
            gate.leave(self.index)

    def run(self, gate) -> Exit:
        self.runs += 1
        if self.runs == 1:
            self.release_now()                   # the limit is raised before the exit is handled
            return Exit("io_out", port=LIMIT_PORT, value=1, size=1)
        self.second_run.set()
        deadline = time.monotonic() + 5
        while not gate.stopping and time.monotonic() < deadline:   # a guest that runs on
            time.sleep(0.001)
        return Exit("interrupted")

    def set_in_value(self, value: int, size: int) -> None:
        pass


def test_a_release_during_the_exit_it_releases_does_not_park_the_vcpu_for_good() -> None:
    executor = Executor()
    runner = VcpuRunner([executor], lambda event: None, {LIMIT_PORT: lambda index, value: (None, "limit")})
    executor.release_now = lambda: runner.release(0, "limit")
    runner.start()
    try:
        assert executor.second_run.wait(5), f"the vCPU stayed parked: {runner.hold_reason(0)!r}"
    finally:
        runner.close()


def test_a_vcpu_thread_runs_sched_other_even_when_a_real_time_thread_starts_it() -> None:
    """Threads inherit their creator's policy; a takeover starts the guest from a SCHED_FIFO thread
    (checkpointer.runtime.realtime), and a guest spinning at SCHED_FIFO would starve the host."""
    import os

    import pytest

    from checkpointer.runtime import realtime

    policies: dict[str, int] = {}

    class Probe(Executor):
        def run(self, gate) -> Exit:
            policies.setdefault("vcpu", os.sched_getscheduler(0))
            return super().run(gate)

    executor = Probe()
    runner = VcpuRunner([executor], lambda event: None, {LIMIT_PORT: lambda index, value: (None, "limit")})
    executor.release_now = lambda: runner.release(0, "limit")

    def start_real_time() -> None:
        policies["allowed"] = realtime(True)
        policies["starter"] = os.sched_getscheduler(0)
        try:
            runner.start()
        finally:
            realtime(False)

    starter = threading.Thread(target=start_real_time)
    starter.start()
    starter.join()
    try:
        if not policies["allowed"]:
            pytest.skip("SCHED_FIFO is not allowed here (needs CAP_SYS_NICE, root)")
        assert executor.second_run.wait(5)
        assert policies["starter"] == os.SCHED_FIFO
        assert policies["vcpu"] == os.SCHED_OTHER
    finally:
        runner.close()
