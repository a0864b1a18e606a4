"""The primary's rolling figures: pause, its parts, dirty pages, bandwidth, reasons."""

from __future__ import annotations

import collections
import time

from .runtime import Rolling
from .snapshot import Snapshot


class CheckpointStats:
    """Rolling figures for the status file and the log line."""

    def __init__(self, window: int = 2048) -> None:
        self.pause_us = Rolling(window)
        self.parts_us: dict[str, Rolling] = collections.defaultdict(lambda: Rolling(window))
        self.dirty_pages = Rolling(window)
        self.raw_bytes = Rolling(window)
        self.encoded_bytes = Rolling(window)
        self.epochs = 0
        self.reasons: collections.Counter[str] = collections.Counter()

    def record(self, snapshot: Snapshot, raw: int, encoded: int) -> None:
        now = time.monotonic()
        self.epochs += 1
        self.reasons[str(snapshot.reason)] += 1
        self.pause_us.add(snapshot.pause_ns / 1000, now)
        for part, ns in snapshot.times_ns.items():
            self.parts_us[part].add(ns / 1000, now)
        self.dirty_pages.add(len(snapshot.keys), now)
        self.raw_bytes.add(raw, now)
        self.encoded_bytes.add(encoded, now)

    def summary(self, horizon: float = 5.0) -> dict:
        return {
            "checkpoints_per_s": self.dirty_pages.rate(horizon),
            "pause_us_p50": self.pause_us.percentile(50),
            "pause_us_p99": self.pause_us.percentile(99),
            "dirty_pages_p50": self.dirty_pages.percentile(50),
            "raw_mb_per_s": self.raw_bytes.throughput(horizon) / 1e6,
            "encoded_mb_per_s": self.encoded_bytes.throughput(horizon) / 1e6,
            "pause_parts_us_p50": {part: values.percentile(50) for part, values in self.parts_us.items()},
        }
