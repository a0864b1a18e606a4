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
- A vCPU may park on its own: DIRTY_RING_FULL (it cannot go on until the
  ring is reset, so it waits for resume()), the workload's limit port (it
  waits for set_limit()), done, or a fault (for good).

The runner drives "executors": the real one wraps a KVM vCPU, the simulated
one a numpy workload, so both backends share this barrier.
"""

from __future__ import annotations

import errno
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from .errors import StateError

KICK_SIGNAL = signal.SIGUSR1

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

    def run(self) -> Exit: ...

    def kick(self, thread_ident: int | None) -> None: ...

    def allow_run(self) -> None: ...

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


def install_kick_handler() -> None:
    """Install a no-op SIGUSR1 handler (needed so that the kick interrupts KVM_RUN)."""
    with _handler_lock:
        current = signal.getsignal(KICK_SIGNAL)
        if callable(current):
            return
        if threading.current_thread() is not threading.main_thread():
            raise StateError("the vCPU kick signal (SIGUSR1) needs a handler, and Python only installs "
                             "handlers from the main thread: create the first machine there, or call "
                             "ring.vcpus.install_kick_handler() from it")
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)


THROTTLE_PERIOD_S = 0.02


class VcpuRunner:
    """Threads that run executors, with a pause barrier and park reasons."""

    def __init__(self, executors: Sequence[Executor], sink: Callable[[Event], None],
                 ports: dict[int, PortHandler]) -> None:
        self._executors = list(executors)
        self._sink = sink
        self._ports = dict(ports)
        self._cond = threading.Condition()
        self._pause_requested = True
        self._fenced = False
        self._closing = False
        count = len(self._executors)
        self._parked = [False] * count
        self._hold: list[str | None] = [None] * count
        # park reasons released while the vCPU was running: its exit for that reason may come
        # before the release, and must not park it then (a raised limit would be lost)
        self._released: list[set[str]] = [set() for _ in range(count)]
        self._threads = [threading.Thread(target=self._loop, args=(i,), name=f"vcpu{i}", daemon=True)
                         for i in range(count)]
        self._started = False
        # auto-converge: hold every vCPU this share of each THROTTLE_PERIOD_S (0: never)
        self._throttle = 0.0
        self._throttled = False
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
        return self._pause_requested

    def hold_reason(self, index: int) -> str | None:
        return self._hold[index]

    def pause(self, timeout: float = 10.0) -> None:
        """Kick every vCPU out of KVM_RUN; return once all are parked."""
        with self._cond:
            self._pause_requested = True
            self._park_all(timeout)

    def fence(self, fenced: bool, timeout: float = 10.0) -> None:
        """Hold every vCPU (or let them go) whatever pause() and resume() do meanwhile: a node
        that lost the right to serve keeps its guest stopped across checkpoints."""
        with self._cond:
            self._fenced = fenced
            if fenced:
                self._park_all(timeout)
            else:
                self._cond.notify_all()

    @property
    def fenced(self) -> bool:
        return self._fenced

    def throttle(self, fraction: float) -> None:
        """Hold every vCPU `fraction` of each THROTTLE_PERIOD_S (0 <= fraction < 1; 0: off), to slow
        down a guest that dirties memory faster than a sync can copy it (auto-converge: QEMU's
        cpu-throttle). Approximate: a kick that lands just before a vCPU enters KVM_RUN is lost,
        and that vCPU runs on until the next period."""
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
                    self._throttled = False
                    self._cond.notify_all()
                    self._cond.wait()
                    continue
                self._wait_out(THROTTLE_PERIOD_S * (1 - self._throttle))       # run
                if not self._throttle or self._closing:
                    continue
                self._throttled = True
                for i, executor in enumerate(self._executors):
                    if not self._parked[i]:
                        executor.kick(self._threads[i].ident)
                self._wait_out(THROTTLE_PERIOD_S * self._throttle)             # held
                self._throttled = False
                self._cond.notify_all()

    def _wait_out(self, seconds: float) -> None:
        """(With the lock held.) Wait `seconds`, through the notifications of parks and releases."""
        deadline = time.monotonic() + seconds
        while not self._closing and (remaining := deadline - time.monotonic()) > 0:
            self._cond.wait(remaining)

    def _park_all(self, timeout: float) -> None:
        """(With the lock held.) Kick the vCPUs until every one is parked."""
        if not self._started:
            return
        deadline = time.monotonic() + timeout
        while not all(self._parked):
            for i, executor in enumerate(self._executors):
                if not self._parked[i]:
                    executor.kick(self._threads[i].ident)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                stuck = [i for i, parked in enumerate(self._parked) if not parked]
                raise StateError(f"vCPUs {stuck} did not stop within {timeout} s of the kick")
            # Re-kick now and then: a signal is only a nudge, the barrier is the count.
            self._cond.wait(min(remaining, 0.01))

    def resume(self) -> None:
        """Let every vCPU run again, including those parked at a full ring."""
        with self._cond:
            self._pause_requested = False
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
            elif not self._parked[index]:
                self._released[index].add(reason)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._started:
            try:
                self.pause(timeout=5.0)
            except StateError:
                pass
            for thread in self._threads:
                thread.join(timeout=5.0)

    # -- the thread ------------------------------------------------------------
    def _loop(self, index: int) -> None:
        executor = self._executors[index]
        while True:
            with self._cond:
                while (self._pause_requested or self._fenced or self._throttled
                       or self._hold[index] is not None) and not self._closing:
                    if not self._parked[index]:
                        self._parked[index] = True
                        self._cond.notify_all()
                    self._cond.wait()
                if self._closing:
                    self._parked[index] = True
                    self._cond.notify_all()
                    return
                self._parked[index] = False
                self._released[index].clear()
                executor.allow_run()
            try:
                event, park = self._handle(index, executor, executor.run())
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
