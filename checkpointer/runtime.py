"""The agent runtime: what every colo-ring agent process runs on, whatever its role.

A role (the primary, the replica, later the active node that takes a new
replica) is a sans-I/O protocol machine plus the handlers that carry out its
commands. This module gives each role the same shell:

- command dispatch: the commands a protocol emits are executed in order by
  the role's `_do_<Command>` handlers, looked up once when the role starts, so
  a command without a handler fails at start-up, not in the middle of an epoch;
- task supervision with `asyncio.TaskGroup`: a task that fails stops the
  agent with its error recorded (`last_error`), and a session's tasks (those of
  one connection to a peer) can be cancelled together without stopping it;
- the status file, replaced atomically every second, and the periodic log line;
- the ZeroMQ transport settings both ends share: heartbeats, and CURVE
  (checkpointer.security) set by the role when it opens its socket;
- `Channel`: a ZeroMQ socket driven from the loop with plain non-blocking calls (see
  its docstring: an epoch's messages then cost no zmq.asyncio futures).

One process can change role by handing the runtime to the next role; the
runtime's tasks, status file and logger outlive any one role.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import time
from typing import Any, Awaitable, Callable, Coroutine, Iterable

import numpy as np
import zmq

from .protocol import Command, Log

__all__ = ["Runtime", "Rolling", "Channel", "set_zmq_heartbeats", "write_status", "rss_mib", "realtime"]

SETTLE_TURNS = 8          # loop turns given to unread frames after a stall, before a tick judges silence
STALL_S = 0.02            # a tick this late (or 4 periods) means the loop stalled


def set_zmq_heartbeats(socket: zmq.Socket, heartbeat_ms: int, timeout_ms: int) -> None:
    """ZeroMQ's own heartbeats: a dead TCP peer is dropped even when nothing is sent."""
    socket.setsockopt(zmq.HEARTBEAT_IVL, max(1, heartbeat_ms))
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, timeout_ms))
    socket.setsockopt(zmq.HEARTBEAT_TTL, max(100, timeout_ms))


def realtime(on: bool) -> bool:
    """Run the calling thread SCHED_FIFO (priority 1), or SCHED_OTHER again; False where the
    process may not (no CAP_SYS_NICE). For short, latency-bound stretches only, as the native
    pause does: a takeover on a host whose cores the clients, etcd and the guest's vCPUs share
    (HA stacks do the same: corosync runs SCHED_RR). The thread mostly waits on etcd meanwhile."""
    try:
        if on:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        else:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except (PermissionError, OSError):
        return False
    return True


def write_status(path: str, status: dict) -> None:
    """Replace the status file atomically (write a temporary file, then rename)."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as handle:
        json.dump(status, handle, indent=1, sort_keys=True)
    os.replace(temporary, path)


def rss_mib() -> float:
    """This process's resident memory (for the status file: bounded under backpressure)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


class Rolling:
    """The last `window` samples of a figure, each with the time it was taken.

    Both agents report percentiles of the whole window and sums or rates over the
    last few seconds; this is the one place that computes them.
    """

    def __init__(self, window: int = 2048) -> None:
        self._values: collections.deque[float] = collections.deque(maxlen=window)
        self._times: collections.deque[float] = collections.deque(maxlen=window)

    def add(self, value: float, now: float | None = None) -> None:
        self._values.append(value)
        self._times.append(time.monotonic() if now is None else now)

    def clear(self) -> None:
        self._values.clear()
        self._times.clear()

    def __len__(self) -> int:
        return len(self._values)

    def percentile(self, q: float, horizon: float | None = None) -> float:
        """The q-th percentile of the window, or of the samples of the last `horizon` seconds."""
        if not self._values:
            return 0.0
        values = np.fromiter(self._values, float, len(self._values))
        if horizon is not None:
            times = np.fromiter(self._times, float, len(self._times))
            values = values[time.monotonic() - times <= horizon]
            if not len(values):
                return 0.0
        return float(np.percentile(values, q))

    def recent(self, horizon: float, now: float | None = None) -> tuple[int, float, float]:
        """(samples, their sum, the span they cover in seconds) over the last `horizon` seconds."""
        now = time.monotonic() if now is None else now
        times = np.fromiter(self._times, float, len(self._times))
        keep = now - times <= horizon
        count = int(keep.sum())
        if count == 0:
            return 0, 0.0, horizon
        total = float(np.fromiter(self._values, float, len(self._values))[keep].sum())
        first = float(times[keep][0])
        span = min(horizon, now - first) if count > 1 else horizon
        return count, total, span if span > 0 else horizon

    def rate(self, horizon: float = 5.0) -> float:
        """Samples per second over the last `horizon` seconds."""
        count, _, span = self.recent(horizon)
        return count / span

    def throughput(self, horizon: float = 5.0) -> float:
        """Sum of the values per second over the last `horizon` seconds."""
        _, total, span = self.recent(horizon)
        return total / span


class Channel:
    """One ZeroMQ socket on the asyncio loop, with plain non-blocking calls instead of zmq.asyncio's.

    zmq.asyncio makes futures, callbacks and flag objects for every receive and send (about a
    hundred Python calls per message); at thousands of epochs a second that was a third of an
    agent's time. Here the loop watches the socket's file descriptor itself and every message
    that is waiting is received and handed to `on_message` at once, synchronously, in order.

    Some facts about ZeroMQ's file descriptor: it is not the socket's data but its mailbox. It
    becomes readable when something changed, and any call on the socket (a send, a receive,
    reading EVENTS) may consume that signal while messages stay queued. So the only reliable
    question is EVENTS: after each send this asks it again, and keeps draining while it says
    POLLIN; a drain long enough to matter yields to the loop between turns (`BUDGET`). No
    other code may use the socket's asyncio side while a Channel is open: the loop has one
    reader per descriptor, and zmq.asyncio would take it over (then remove it).

    Sends keep their order whoever makes them: a message that finds no room in ZeroMQ waits in
    the channel's own queue (`enqueue`), and every later one queues behind it until the queue
    has drained (on POLLOUT, and every millisecond at most). A sender that numbers its frames
    just before it sends or enqueues them therefore never lets a later number out first.
    """

    BUDGET = 64                        # messages handled per loop turn
    RETRY_S = 0.001                    # a queued send is tried again at least this often

    def __init__(self, socket: zmq.Socket, on_message: Callable[[list], bool | None], *, copy: bool = True,
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        """`on_message(parts)` handles each message; True from it closes the channel (no more reads).
        An exception from it closes the channel too and goes to `on_error` (else to the loop's
        exception handler)."""
        underlying = getattr(socket, "underlying", None)
        self.socket = socket
        self.plain = zmq.Socket.shadow(underlying) if underlying is not None else socket
        self.on_message = on_message
        self.on_error = on_error
        self.copy = copy
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._fd = self.plain.getsockopt(zmq.FD)
        self._pending = False
        self._queue: collections.deque[tuple[list, asyncio.Future]] = collections.deque()
        self._retry: asyncio.TimerHandle | None = None
        self._loop.add_reader(self._fd, self._ready)
        self._schedule()                      # what arrived before the reader was added

    def _schedule(self) -> None:
        if not self._pending and not self.closed:
            self._pending = True
            self._loop.call_soon(self._ready)

    def _ready(self) -> None:
        self._pending = False
        plain = self.plain
        for _ in range(self.BUDGET):
            if self.closed:
                return
            events = plain.getsockopt(zmq.EVENTS)
            if events & zmq.POLLOUT and self._queue:
                self._flush()
            if not events & zmq.POLLIN:
                return
            try:
                message = plain.recv_multipart(zmq.NOBLOCK, copy=self.copy)
            except zmq.Again:
                return
            try:
                if self.on_message(message):
                    self.close()
            except Exception as exc:
                self.close()
                if self.on_error is None:
                    raise
                self.on_error(exc)
        self._schedule()                      # more may wait: after the loop's other work

    def try_send(self, parts: list) -> bool:
        """Queue one message in ZeroMQ now, if nothing waits in this channel's queue and ZeroMQ has
        room (False if not: nothing was queued anywhere)."""
        if self._queue:
            return False
        try:
            self.plain.send_multipart(parts, copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        if self.plain.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._schedule()                  # the send may have taken the descriptor's signal
        return True

    def enqueue(self, parts: list) -> asyncio.Future:
        """Send one message after every one queued before it; the future is done once ZeroMQ has
        it (a ZMQError if the channel closes first)."""
        done = self._loop.create_future()
        if self.closed:
            done.set_exception(zmq.ZMQError(zmq.ENOTSOCK, "the channel is closed"))
            return done
        self._queue.append((parts, done))
        self._flush()
        return done

    async def send(self, parts: list) -> None:
        """Send one message, in order, waiting for room if there is none (ZMQError once closed)."""
        if not self.try_send(parts):
            await self.enqueue(parts)

    def _flush(self) -> None:
        """Hand queued messages to ZeroMQ while it has room."""
        while self._queue and not self.closed:
            parts, done = self._queue[0]
            try:
                self.plain.send_multipart(parts, copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                if self._retry is None:
                    self._retry = self._loop.call_later(self.RETRY_S, self._retry_flush)
                return
            except zmq.ZMQError as exc:
                self._queue.popleft()
                if not done.done():
                    done.set_exception(exc)
                continue
            self._queue.popleft()
            if not done.done():
                done.set_result(None)
        if self.plain.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._schedule()

    def _retry_flush(self) -> None:
        self._retry = None
        self._flush()

    def poke(self) -> None:
        """Look at the socket again (after code outside the channel called it)."""
        self._schedule()

    def close(self) -> None:
        """Stop watching the socket (it stays open: its owner closes it); queued sends fail."""
        if not self.closed:
            self.closed = True
            if self._retry is not None:
                self._retry.cancel()
                self._retry = None
            while self._queue:
                _, done = self._queue.popleft()
                if not done.done():
                    done.set_exception(zmq.ZMQError(zmq.ENOTSOCK, "the channel is closed"))
            try:
                self._loop.remove_reader(self._fd)
            except (ValueError, OSError):
                pass


class Runtime:
    """Supervised tasks, command dispatch, and the status loop, for one agent process."""

    def __init__(self, role: Any, logger: logging.Logger, commands: Iterable[type[Command]]) -> None:
        self.log = logger
        self.last_error: str | None = None
        self.stopping = asyncio.Event()
        self._group: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task] = set()
        self._sessions: set[asyncio.Task] = set()
        self._handlers: dict[type, Callable[[Any], None]] = {}
        self.bind(role, commands)

    # -- dispatch --------------------------------------------------------------
    def bind(self, role: Any, commands: Iterable[type[Command]]) -> None:
        """Look up the role's handler for every command its protocol can emit (Log is ours)."""
        handlers: dict[type, Callable[[Any], None]] = {Log: self._log}
        missing = []
        for command in commands:
            if command is Log:
                continue
            handler = getattr(role, f"_do_{command.__name__}", None)
            if handler is None:
                missing.append(command.__name__)
            handlers[command] = handler
        if missing:
            raise TypeError(f"{type(role).__name__} has no handler for {', '.join(missing)}")
        self._handlers = handlers

    def execute(self, commands: list[Command]) -> None:
        for command in commands:
            self._handlers[type(command)](command)

    def _log(self, command: Log) -> None:
        getattr(self.log, command.level.value)(command.message)

    # -- tasks -----------------------------------------------------------------
    async def run(self, loops: Iterable[Callable[[], Coroutine]], on_stop: Callable[[], Awaitable[None]],
                  duration: float | None = None) -> None:
        """Run `loops` under one TaskGroup until stop() (or `duration`); then `on_stop`, exactly once.

        A task that raises ends the group: its error is logged and kept in last_error. `on_stop`
        runs as a task of its own (outside the group, so that a failure while it runs cannot cut
        it short) and is awaited on every way out: a normal stop, a failed task, or this
        coroutine being cancelled. So the agent always closes what it opened.
        """
        stop_task: asyncio.Task | None = None

        def stop_once() -> asyncio.Task:
            nonlocal stop_task
            if stop_task is None:
                stop_task = asyncio.ensure_future(on_stop())
            return stop_task

        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                for loop in loops:
                    self.spawn(loop())
                try:
                    await asyncio.wait_for(self.stopping.wait(), duration)
                except asyncio.TimeoutError:
                    pass
                await asyncio.shield(stop_once())
                for task in list(self._tasks):
                    task.cancel()
        except* Exception as failures:
            self._group = None
            for exc in failures.exceptions:
                self.log.error("agent task failed: %r", exc, exc_info=exc)
            self.last_error = repr(failures.exceptions[0])
        finally:
            self._group = None
            await stop_once()

    def spawn(self, coroutine: Coroutine, *, session: bool = False) -> asyncio.Task | None:
        """Start a supervised task; a session task is cancelled with its session.

        Once the group is shutting down (a task failed, or the agent stopped) there is
        nothing to run in: the work is dropped (None), as every task of the group is being
        cancelled anyway.
        """
        if self._group is None:
            coroutine.close()
            return None
        try:
            task = self._group.create_task(coroutine)
        except RuntimeError:                  # the group is aborting: a task failed
            coroutine.close()
            return None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if session:
            self._sessions.add(task)
            task.add_done_callback(self._sessions.discard)
        return task

    def cancel_loops(self) -> None:
        """Cancel every task but the sessions' (ticks, triggers, status): a stop begins."""
        current = asyncio.current_task()
        for task in list(self._tasks - self._sessions):
            if task is not current:
                task.cancel()

    def session_tasks(self) -> list[asyncio.Task]:
        return list(self._sessions)

    def cancel_session(self) -> None:
        for task in list(self._sessions):
            task.cancel()

    async def cancel_all(self) -> None:
        """Cancel every task but the caller's, and wait until they are gone."""
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        self.stopping.set()

    def fail(self, exc: BaseException) -> None:
        """Stop on an error raised outside any task (a channel's handler), as a failed task does."""
        self.log.error("agent task failed: %r", exc, exc_info=exc)
        if self.last_error is None:
            self.last_error = repr(exc)
        self.stop()

    # -- the clock -----------------------------------------------------------------
    async def tick_loop(self, period: Callable[[], float], tick: Callable[[float], None],
                        timeout: Callable[[], float]) -> None:
        """Feed `tick(now)` every `period()` seconds (re-read: settings change at run time).

        A tick is how the protocol learns that time passed, and so that a peer fell silent.
        When this process's own loop stalled (a long snapshot, the machine starved us), the
        peer's frames may be waiting unread: the loop is first given a few turns to read
        them, so that our own stall is never taken for the peer's silence, and a stall long
        enough to matter is logged.
        """
        while True:
            interval = period()
            due = time.monotonic() + interval
            await asyncio.sleep(interval)
            late = time.monotonic() - due
            if late > max(4 * interval, STALL_S):  # (a short tick always oversleeps a little)
                for _ in range(SETTLE_TURNS):
                    await asyncio.sleep(0)
                if late > timeout() / 4:
                    self.log.warning("this agent's event loop stalled for %.0f ms", late * 1000)
            tick(time.monotonic())

    # -- status ------------------------------------------------------------------
    async def status_loop(self, settings, figures: Callable[[], dict], log_line: Callable[[dict], None]) -> None:
        """The status file replaced every second, a log line every log_interval_s."""
        last_log = time.monotonic()
        while True:
            await asyncio.sleep(min(1.0, settings.log_interval_s) if settings.log_interval_s else 1.0)
            current = figures()
            if settings.status_json:
                write_status(settings.status_json, current)
            if settings.log_interval_s and time.monotonic() - last_log >= settings.log_interval_s:
                last_log = time.monotonic()
                log_line(current)
