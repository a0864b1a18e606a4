"""What closes an epoch, as the shell sees it: the clock, the rings' fill, and waiting output.

The protocol decides (a Trigger may become a snapshot, a hold, or a drain of the
rings); this module only notices and feeds events: a tick a few times per
heartbeat interval (the interval trigger and heartbeats are decided in the
protocol from it), the VM-wide dirty-page count polled from the rings, and an
output trigger that fires `output_delay_ms` after the first output of an epoch
so that a reply waits about one checkpoint for its ack. The settings can change
at run time (the control interface), so every loop re-reads them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Callable

from ring.errors import ConfigError

from . import protocol as proto
from .config import TriggerSection
from .protocol import EpochReason

log = logging.getLogger("colo.primary")


class Triggers:
    """The primary's trigger loops and the output timer, over its [triggers] settings."""

    def __init__(self, settings: TriggerSection, protocol: proto.PrimaryProtocol,
                 feed: Callable[[proto.PrimaryEvent], None], dirty_fill: Callable[[], int],
                 output_waiting: Callable[[int], bool]) -> None:
        self.settings = settings
        self.protocol = protocol
        self.feed = feed
        self.dirty_fill = dirty_fill
        self.output_waiting = output_waiting
        self._output_timer: asyncio.TimerHandle | None = None

    def change(self, changes: dict) -> TriggerSection:
        """New [triggers] values, checked like the config file: a bad one raises ConfigError
        naming it, and nothing changes."""
        known = {f.name for f in dataclasses.fields(TriggerSection)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"unknown [triggers] setting(s) {', '.join(unknown)}: the control interface "
                              f"changes {', '.join(sorted(known))}")
        settings = dataclasses.replace(self.settings, **changes)     # validates
        self.settings = settings
        self.protocol.config.max_interval = (settings.max_interval_ms / 1000) or None
        log.warning("triggers changed at run time: %s", changes)
        return settings

    def output_produced(self) -> None:
        """The guest produced output in the running epoch: close it soon, so it can be released."""
        if self.settings.output and self._output_timer is None:
            self._output_timer = asyncio.get_running_loop().call_later(
                self.settings.output_delay_ms / 1000, self._fire_output)

    def _fire_output(self) -> None:
        self._output_timer = None
        if self.output_waiting(self.protocol.next_epoch):
            self.feed(proto.Trigger(time.monotonic(), EpochReason.OUTPUT))

    def cancel(self) -> None:
        if self._output_timer is not None:
            self._output_timer.cancel()
            self._output_timer = None

    def tick_period(self) -> float:
        """A few ticks per heartbeat and per interval (re-read: the interval may change at run time)."""
        config = self.protocol.config
        return min(config.heartbeat_interval, config.max_interval or 1.0) / 4

    def tick(self, now: float) -> None:
        self.feed(proto.Tick(now))

    async def dirty_watch_loop(self) -> None:
        while True:
            settings = self.settings
            await asyncio.sleep(settings.poll_us / 1e6 if settings.dirty_pages else 0.05)
            threshold = self.settings.dirty_pages
            if threshold and self.protocol.checkpointing and not self.protocol.guest_held \
                    and self.dirty_fill() >= threshold:
                self.feed(proto.Trigger(time.monotonic(), EpochReason.DIRTY_THRESHOLD))
