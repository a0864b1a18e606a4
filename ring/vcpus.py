"""vCPU threads, exit events, and the pause barrier.

Some facts about stopping vCPUs (Firecracker's vcpu.rs, kvmtool's pause):

- KVM_RUN blocks its thread until the guest exits, so each vCPU runs in its
  own thread, and exits reach the caller as events on a queue (or any sink).
- To stop a vCPU that is inside KVM_RUN, set kvm_run.immediate_exit and send
  its thread a signal (SIGUSR1 with a no-op handler): KVM_RUN returns EINTR.
  immediate_exit closes the race where the signal lands just before the
  thread enters KVM_RUN: KVM checks it on entry and returns EINTR at once.
- pause() is a barrier: it returns only when every vCPU thread has
  acknowledged that it is parked outside KVM_RUN. resume() releases them.
  Both are ring._native.Gate (ring/native/gate.c): the run loop, the kick and
  the wait are in C, without the GIL (a Python barrier cost 170-200 us of kick
  here, mostly threads taking the GIL in turn); Python keeps the exits and
  the park reasons.
- A vCPU may park on its own: DIRTY_RING_FULL (it cannot go on until the
  ring is reset, so it waits for resume()), the workload's limit port (it
  waits for set_limit()), done, or a fault (for good).

The runner drives "executors": the real one wraps a KVM vCPU, the simulated
one a numpy workload, so both backends share this barrier.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from ._native import Gate
from ._native import install_kick_handler as _install_native_kick_handler
from .errors import StateError

# --- what an executor reports after one run ---------------------------------


@dataclass(frozen=True)
class Exit:
    """One return from running a vCPU. kind: io_out, io_in, ring_full, interrupted, fault."""

    kind: str
    port: int = 0
    value: int = 0
    size: int = 0
    detail: str = ""


class Executor(Protocol):
    index: int

    def run_gated(self, gate: Gate) -> Exit | None:
        """Run until an exit Python must handle, entering the guest only through `gate`
        (which parks the vCPU while a stop bit is set); None once the gate is closed."""
        ...

    def set_in_value(self, value: int, size: int) -> None: ...


# --- events -----------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    vcpu: int


@dataclass(frozen=True)
class Progress(Event):
    value: int


@dataclass(frozen=True)
class RingSoftFull(Event):
    """The vCPU's ring reached its soft limit; the vCPU waits until the VM is harvested."""


@dataclass(frozen=True)
class LimitReached(Event):
    progress: int


@dataclass(frozen=True)
class Output(Event):
    data: bytes


@dataclass(frozen=True)
class Done(Event):
    code: int


@dataclass(frozen=True)
class Fault(Event):
    reason: str
    detail: str = ""


#: port -> handler(vcpu, value). For OUT it returns an Event, None, or (Event | None, park
#: reason); for IN it returns the integer the guest reads.
PortHandler = Callable[[int, int], "Event | None | tuple[Event | None, str | None]"]

RESUMABLE = {"ring_full"}


_handler_lock = threading.Lock()
_handler_installed = False


def install_kick_handler() -> None:
    """Install the kick signal's no-op handler (needed so that the kick interrupts KVM_RUN).

    It is a C handler (ring/native/gate.c), so it may be installed from any thread, and a kick
    neither runs Python nor wakes the main thread. A Python handler installed later for the
    same signal replaces it and still interrupts KVM_RUN."""
    global _handler_installed
    with _handler_lock:
        if not _handler_installed:
            _install_native_kick_handler()
            _handler_installed = True


THROTTLE_PERIOD_S = 0.02

#: The gate's stop bits: each reason stops the vCPUs until it is cleared, whatever the others do.
STOP_PAUSE, STOP_FENCE, STOP_THROTTLE = 1, 2, 4


def _plain_scheduling() -> None:
    """A vCPU thread runs SCHED_OTHER whoever started it: a thread inherits its creator's policy,
    and a guest spinning at SCHED_FIFO would starve the host (an agent runs parts of its work
    real-time: checkpointer.runtime.realtime)."""
    try:
        if os.sched_getscheduler(0) != os.SCHED_OTHER:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except OSError:
        pass


class VcpuRunner:
    """Threads that run executors, with a pause barrier (ring._native.Gate) and park reasons."""

    def __init__(self, executors: Sequence[Executor], sink: Callable[[Event], None],
                 ports: dict[int, PortHandler]) -> None:
        self._executors = list(executors)
        self._sink = sink
        self._ports = dict(ports)
        count = len(self._executors)
        self._gate = Gate(max(count, 1), stop=STOP_PAUSE)
        self._cond = threading.Condition()       # park reasons (holds) and the throttle's clock
        self._closing = False
        self._hold: list[str | None] = [None] * count
        self._waiting = [False] * count          # waiting in Python for its park reason to go
        # park reasons released while the vCPU was running: its exit for that reason may come
        # before the release, and must not park it then (a raised limit would be lost)
        self._released: list[set[str]] = [set() for _ in range(count)]
        self._threads = [threading.Thread(target=self._loop, args=(i,), name=f"vcpu{i}", daemon=True)
                         for i in range(count)]
        self._started = False
        # auto-converge: hold every vCPU this share of each THROTTLE_PERIOD_S (0: never)
        self._throttle = 0.0
        self._throttle_thread: threading.Thread | None = None

    # -- control -------------------------------------------------------------
    def start(self) -> None:
        """Start the threads and let the vCPUs run."""
        if self._started:
            raise StateError("vCPUs already started")
        self._started = True
        for thread in self._threads:
            thread.start()
        self.resume()

    @property
    def started(self) -> bool:
        return self._started

    @property
    def paused(self) -> bool:
        return bool(self._gate.stopping & STOP_PAUSE)

    @property
    def kicks(self) -> int:
        """Signals sent to vCPU threads so far."""
        return self._gate.kicks

    def hold_reason(self, index: int) -> str | None:
        return self._hold[index]

    def pause(self, timeout: float = 10.0) -> None:
        """Kick every vCPU out of KVM_RUN; return once all are parked (without the GIL)."""
        self._stop(STOP_PAUSE, timeout)

    def _stop(self, reason: int, timeout: float) -> None:
        if not self._gate.stop(reason, wait=self._started, timeout=timeout):
            self.stuck(timeout)

    def stuck(self, timeout: float) -> None:
        """Raise the error of a stop that timed out, naming the vCPUs that did not stop."""
        stuck = [i for i in range(len(self._executors)) if self._gate.state(i) in ("running", "busy")]
        raise StateError(f"vCPUs {stuck} did not stop within {timeout} s of the kick")

    @property
    def gate(self) -> Gate:
        """The barrier itself, for a native pause (ring._native.checkpoint)."""
        return self._gate

    def fence(self, fenced: bool, timeout: float = 10.0) -> None:
        """Hold every vCPU (or let them go) whatever pause() and resume() do meanwhile: a node
        that lost the right to serve keeps its guest stopped across checkpoints."""
        if fenced:
            self._stop(STOP_FENCE, timeout)
        else:
            self._gate.go(STOP_FENCE)

    @property
    def fenced(self) -> bool:
        return bool(self._gate.stopping & STOP_FENCE)

    def throttle(self, fraction: float) -> None:
        """Hold every vCPU `fraction` of each THROTTLE_PERIOD_S (0 <= fraction < 1; 0: off), to slow
        down a guest that dirties memory faster than a sync can copy it (auto-converge: QEMU's
        cpu-throttle)."""
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"a throttle is a share of time in [0, 1), not {fraction}")
        with self._cond:
            self._throttle = fraction
            if fraction and self._throttle_thread is None and self._started and not self._closing:
                self._throttle_thread = threading.Thread(target=self._throttle_loop, name="vcpu-throttle",
                                                         daemon=True)
                self._throttle_thread.start()
            self._cond.notify_all()

    @property
    def throttled(self) -> float:
        return self._throttle

    def _throttle_loop(self) -> None:
        with self._cond:
            while not self._closing:
                if not self._throttle:
                    self._cond.wait()
                    continue
                self._wait_out(THROTTLE_PERIOD_S * (1 - self._throttle))       # run
                if not self._throttle or self._closing:
                    continue
                self._gate.stop(STOP_THROTTLE, wait=False)
                try:
                    self._wait_out(THROTTLE_PERIOD_S * self._throttle)         # held
                finally:
                    self._gate.go(STOP_THROTTLE)

    def _wait_out(self, seconds: float) -> None:
        """(With the lock held.) Wait `seconds`, through the notifications meanwhile."""
        deadline = time.monotonic() + seconds
        while not self._closing and (remaining := deadline - time.monotonic()) > 0:
            self._cond.wait(remaining)

    def resume(self) -> None:
        """Let every vCPU run again, including those parked at a full ring."""
        self._gate.go(STOP_PAUSE)
        if any(reason in RESUMABLE for reason in self._hold):
            with self._cond:
                for i, reason in enumerate(self._hold):
                    if reason in RESUMABLE:
                        self._hold[i] = None
                self._cond.notify_all()

    def release(self, index: int, reason: str) -> None:
        """Clear one vCPU's own park reason (the limit, after a new limit was set)."""
        with self._cond:
            if self._hold[index] == reason:
                self._hold[index] = None
                self._cond.notify_all()
            elif not self._waiting[index]:
                self._released[index].add(reason)

    @property
    def thread_ids(self) -> list[int]:
        """The vCPU threads' kernel thread ids (for /proc: what the guest's CPU time was)."""
        return [thread.native_id for thread in self._threads if thread.native_id is not None]

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._gate.close()
            self._cond.notify_all()
        if self._started:
            for thread in self._threads:
                thread.join(timeout=5.0)

    # -- the thread ------------------------------------------------------------
    def _loop(self, index: int) -> None:
        executor, gate = self._executors[index], self._gate
        _plain_scheduling()
        try:
            while True:
                with self._cond:
                    if self._hold[index] is not None and not self._closing:
                        self._waiting[index] = True
                        gate.set_held(index, True)
                        while self._hold[index] is not None and not self._closing:
                            self._cond.wait()
                        self._waiting[index] = False
                        gate.set_held(index, False)
                    if self._closing:
                        return
                    self._released[index].clear()
                try:
                    exit_ = executor.run_gated(gate)
                    if exit_ is None:                  # the gate closed
                        return
                    event, park = self._handle(index, executor, exit_)
                except Exception as exc:  # never let a vCPU thread die silently
                    event, park = Fault(index, "exception", repr(exc)), "fault"
                if park is not None:
                    with self._cond:
                        if park not in self._released[index]:
                            self._hold[index] = park
                if event is not None:
                    try:
                        self._sink(event)
                    except RuntimeError:         # the consumer's event loop is gone: we are closing
                        return
        finally:
            gate.set_exited(index)

    def _handle(self, index: int, executor: Executor, exit_: Exit) -> tuple[Event | None, str | None]:
        if exit_.kind == "interrupted":
            return None, None
        if exit_.kind == "ring_full":
            return RingSoftFull(index), "ring_full"
        if exit_.kind in ("io_out", "io_in"):
            handler = self._ports.get(exit_.port)
            if handler is None:
                detail = f"{'OUT' if exit_.kind == 'io_out' else 'IN'} to unhandled port {exit_.port:#x}"
                return Fault(index, "io", detail), "fault"
            result = handler(index, exit_.value)
            if exit_.kind == "io_in":              # an IN handler returns the value to read
                executor.set_in_value(int(result or 0), exit_.size)
                return None, None
            return result if isinstance(result, tuple) else (result, None)
        return Fault(index, exit_.kind, exit_.detail), "fault"


def errno_exit(code: int) -> Exit:
    """Map a negative errno from KVM_RUN to an Exit."""
    if code == -errno.EINTR or code == -errno.EAGAIN:
        return Exit("interrupted")
    return Exit("fault", detail=f"KVM_RUN failed: {errno.errorcode.get(-code, -code)}")
