"""Output commit: what the guest sends out is held until the replica has its epoch.

A byte the guest transmits during epoch N (console output now, the stream
device's replies next) must not reach anyone before the replica acknowledged
epoch N: otherwise a failover could lose a state that a client already saw.
The buffer tags each output with the epoch it was produced in, releases every
output of epochs <= N when ack N arrives (acks are cumulative), in the order
it was produced, and releases everything at once when the guest runs
unprotected (there is no replica to wait for). It measures the added latency
(hold to release) for the status file and the drill.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class Held:
    epoch: int
    send: Callable[[bytes], None]    # where it goes: the console, a client connection
    data: bytes
    held_at: float


class OutputBuffer:
    """Outputs per epoch, released in production order when their epoch is acknowledged."""

    def __init__(self, window: int = 4096, *, gate: Callable[[], bool] = lambda: True) -> None:
        """`gate`: whether output may leave this node at all now (fencing: only while the
        lease is valid); releases asked while it is shut wait for flush()."""
        self.gate = gate
        self._deferred: int | None = None     # the epochs released while the gate was shut
        self._held: collections.deque[Held] = collections.deque()
        self.latency_us: collections.deque[float] = collections.deque(maxlen=window)
        self.released_bytes = 0
        self.held_bytes = 0

    def hold(self, epoch: int, send: Callable[[bytes], None], data: bytes) -> None:
        """Keep `data` (produced during `epoch`) until release(upto >= epoch), then send(data).

        Empty data is held too: a device may use it to close a connection after its replies.
        """
        self._held.append(Held(epoch, send, bytes(data), time.monotonic()))
        self.held_bytes += len(data)

    def release(self, upto: int | None) -> int:
        """Deliver every output of epochs <= upto (None: everything held); returns bytes delivered.

        The gate is checked here, at the moment of release, and again before each further output:
        shut, the release is remembered (as the epoch bound it means now: what is held later is
        not covered) and nothing more leaves.
        """
        if not self.gate():
            bound = upto if upto is not None else (self._held[-1].epoch if self._held else None)
            if bound is not None:
                self._deferred = bound if self._deferred is None else max(self._deferred, bound)
            return 0
        if self._deferred is not None:
            upto = None if upto is None else max(upto, self._deferred)
            self._deferred = None
        now = time.monotonic()
        delivered = sent = 0
        while self._held and (upto is None or self._held[0].epoch <= upto):
            if sent and not self.gate():
                # checked again before each write: a stop between two (SIGSTOP, a long preemption)
                # outlasts the lease, and the rest must not leave late, once another node serves
                bound = upto if upto is not None else self._held[-1].epoch
                self._deferred = bound if self._deferred is None else max(self._deferred, bound)
                break
            item = self._held.popleft()
            item.send(item.data)
            sent += 1
            self.latency_us.append((now - item.held_at) * 1e6)
            delivered += len(item.data)
        self.released_bytes += delivered
        self.held_bytes -= delivered
        return delivered

    def flush(self) -> int:
        """Deliver what was released while the gate was shut (call when it opens again)."""
        if self._deferred is None:
            return 0
        return self.release(self._deferred)

    def drop_deferred(self) -> None:
        """Forget releases asked while the gate was shut (this node will never serve them)."""
        self._deferred = None

    def pending_since(self, epoch: int) -> bool:
        """Whether outputs of `epoch` or later wait (the output trigger closes their epoch)."""
        return bool(self._held) and self._held[-1].epoch >= epoch

    def __len__(self) -> int:
        return len(self._held)

    def latency_percentiles(self) -> tuple[float, float]:
        if not self.latency_us:
            return 0.0, 0.0
        values = np.fromiter(self.latency_us, float)
        return float(np.percentile(values, 50)), float(np.percentile(values, 99))
