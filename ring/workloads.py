"""Seeded dirtying workloads: their settings, and the numpy twin of programs/workloads.c.

Item i of vCPU v draws r = splitmix64(seed + v*STREAM + i*GOLDEN) (counter
mode, so any range of items is computed at once with numpy) and writes i+1
into word ((i & 63) << 3 | v) of the page it picks; the oracle writes the
current iteration into word v. The C guest and this module compute the same
pages and words; the simulated backend runs this module as its guest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError
from .guest import layout

WORKLOAD_IDS = {"uniform": 1, "hotcold": 2, "sequential": 3, "oracle": 4}

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
STREAM = np.uint64(0xD1B54A32D192ED03)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Workload:
    """What a dirtying guest does; every field is a guest parameter."""

    name: str = "uniform"
    seed: int = 1
    working_set_pages: int | None = None   # default: the whole data region
    hot_pages: int = 0                     # hotcold: default 1/8 of the working set
    hot_percent: int = 90
    stride: int = 1                        # sequential: pages between writes
    report_every: int = 0                  # progress event every N items (0: none)
    total: int = 0                         # items per vCPU before done (0: forever)

    def __post_init__(self) -> None:
        if self.name not in WORKLOAD_IDS:
            raise ConfigError(f"unknown workload {self.name!r}: choose one of {', '.join(WORKLOAD_IDS)}")
        if not 0 <= self.seed < 1 << 64:
            raise ConfigError(f"workload seed {self.seed} must fit in 64 bits")
        if not 0 <= self.hot_percent <= 100:
            raise ConfigError(f"hot_percent {self.hot_percent} must be between 0 and 100")
        for name in ("report_every", "total", "hot_pages"):
            if getattr(self, name) < 0:
                raise ConfigError(f"workload {name} must not be negative")
        if self.stride < 1:
            raise ConfigError(f"workload stride {self.stride} must be at least 1")

    def resolved(self, data_pages: int, vcpus: int) -> "ResolvedWorkload":
        """Check the workload against a data region and fill in the defaults."""
        working_set = self.working_set_pages or data_pages
        if not 1 <= working_set <= data_pages:
            raise ConfigError(f"working set of {working_set} pages does not fit the data region of "
                              f"{data_pages} pages")
        if self.name == "sequential" and working_set < vcpus:
            raise ConfigError("sequential workload needs at least one page per vCPU")
        hot = self.hot_pages or max(1, working_set // 8)
        if self.name == "hotcold" and not 1 <= hot < working_set:
            raise ConfigError(f"hot set of {hot} pages must be smaller than the working set "
                              f"({working_set} pages)")
        return ResolvedWorkload(self, working_set, hot, vcpus)


@dataclass(frozen=True)
class ResolvedWorkload:
    workload: Workload
    working_set: int
    hot_pages: int
    vcpus: int

    def fill_params(self, params: np.ndarray, data_gpa: int, data_pages: int) -> None:
        """Write the guest's parameter block (a PARAMS_DTYPE record view)."""
        w = self.workload
        params["magic"] = layout.PARAMS_MAGIC
        params["workload"] = WORKLOAD_IDS[w.name]
        params["seed"] = w.seed
        params["data_gpa"] = data_gpa
        params["data_pages"] = data_pages
        params["working_set"] = self.working_set
        params["hot_pages"] = self.hot_pages
        params["hot_percent"] = w.hot_percent
        params["report_every"] = w.report_every
        params["nr_vcpus"] = self.vcpus
        params["stride"] = w.stride
        params["total"] = w.total
        params["iteration"] = 1
        params["vcpu"]["progress"] = 0
        params["vcpu"]["limit"] = layout.NO_LIMIT

    def pages(self, vcpu: int, items: np.ndarray) -> np.ndarray:
        """Pages (offsets into the data region) written by items `items` of `vcpu`."""
        w = self.workload
        items = items.astype(np.uint64, copy=False)
        if w.name == "sequential":
            start = np.uint64(vcpu * (self.working_set // self.vcpus))
            return (start + items * np.uint64(w.stride)) % np.uint64(self.working_set)
        stream = np.uint64((w.seed + vcpu * int(STREAM)) & _MASK64)   # Python ints: no overflow warning
        r = mix64(stream + items * GOLDEN)
        if w.name == "hotcold":
            choice = (r >> np.uint64(32)) % np.uint64(100)
            index = r & np.uint64(0xFFFFFFFF)
            hot = np.uint64(self.hot_pages)
            cold = hot + index % np.uint64(self.working_set - self.hot_pages)
            return np.where(choice < np.uint64(w.hot_percent), index % hot, cold)
        return r % np.uint64(self.working_set)

    def words(self, vcpu: int, items: np.ndarray) -> np.ndarray:
        """Word index (0..511) inside the page that each item writes."""
        if self.workload.name == "oracle":
            return np.full(len(items), vcpu, dtype=np.uint64)
        return ((items.astype(np.uint64) & np.uint64(63)) << np.uint64(3)) | np.uint64(vcpu)

    def values(self, items: np.ndarray, iteration: int) -> np.ndarray:
        """The value each item writes."""
        if self.workload.name == "oracle":
            return np.full(len(items), iteration, dtype=np.uint64)
        return items.astype(np.uint64) + np.uint64(1)


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, vectorised (uint64 arithmetic wraps, as in C)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))
