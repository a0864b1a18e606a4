"""VcpuRunner's park reasons: a release that comes while the vCPU is still on its way to park for
that reason is not lost (a limit raised just as the vCPU reached the old one)."""

from __future__ import annotations

import threading

from ring.vcpus import Exit, VcpuRunner

LIMIT_PORT = 0x42


class Executor:
    """A vCPU that exits at a limit port; its second exit happens only once released."""

    index = 0

    def __init__(self) -> None:
        self.runs = 0
        self.second_run = threading.Event()
        self.release_now = None                 # called inside the first run, before it returns

    def run(self) -> Exit:
        self.runs += 1
        if self.runs == 1:
            self.release_now()                   # the limit is raised before the exit is handled
            return Exit("io_out", port=LIMIT_PORT, value=1, size=1)
        self.second_run.set()
        self.hold = threading.Event()
        self.hold.wait(5)                        # a guest that runs on
        return Exit("interrupted")

    def kick(self, thread_ident) -> None:
        if getattr(self, "hold", None) is not None:
            self.hold.set()

    def allow_run(self) -> None:
        pass

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
