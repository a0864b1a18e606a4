"""Guest specs: what the agents are told about the guest they protect.

The agents sit above ring/ and below scenarios/, where the services live. So
an agent never imports a guest: it receives a *spec*, a description of the
program to load, the devices it needs, the parameters it takes (and where in
the parameter block they go), and the checks those parameters must pass. The
dirtying workloads are built in here; services register their spec from the
layer that owns them through the `colo_ring.guests` entry point group (the
kvstore: `scenarios.service:KVSTORE_SPEC`), so the lookup runs at run time
and no import arrow points up the layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable, Mapping

from ..errors import ConfigError
from ..workloads import WORKLOAD_IDS
from . import layout

ENTRY_POINT_GROUP = "colo_ring.guests"
STREAM_DEVICE = "stream"              # the paravirtual stream device (ring/stream.py)
DEVICES = (STREAM_DEVICE,)


@dataclass(frozen=True)
class GuestParam:
    """One integer parameter of a guest program: its name, its word in params.reserved, its default."""

    name: str
    index: int
    default: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < layout.PARAMS_DTYPE["reserved"].shape[0]:
            raise ConfigError(f"guest parameter {self.name!r}: index {self.index} is outside the "
                              f"parameter block's reserved words")


@dataclass(frozen=True)
class GuestSpec:
    """A guest the agents can protect, as data."""

    name: str
    program: Path | None = None                       # C source; None: ring's dirtying program
    devices: tuple[str, ...] = ()
    params: tuple[GuestParam, ...] = ()
    min_memory_mib: int = 2
    backends: tuple[str, ...] = ("kvm", "sim")
    validate: Callable[[int, Mapping[str, int], int], None] | None = None   # (MiB, params, clients): raises ConfigError
    description: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.devices) - set(DEVICES)
        if unknown:
            raise ConfigError(f"guest {self.name!r}: unknown device(s) {', '.join(sorted(unknown))}; "
                              f"known: {', '.join(DEVICES)}")

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @property
    def is_service(self) -> bool:
        """It talks to clients through the stream device: its replies go through output commit."""
        return STREAM_DEVICE in self.devices

    def resolve(self, params: Mapping[str, int] | None = None) -> dict[str, int]:
        """Every parameter's value: the given ones over the defaults; unknown names refused."""
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.param_names))
        if unknown:
            takes = ", ".join(self.param_names) or "no parameters"
            raise ConfigError(f"guest {self.name!r} takes {takes}, not {', '.join(unknown)}")
        return {p.name: int(params.get(p.name, p.default)) for p in self.params}

    def check(self, memory_mib: int, params: Mapping[str, int] | None = None, backend: str = "kvm",
              max_clients: int = 0) -> None:
        """Refuse, naming the problem, a memory size, parameters, client limit (a service's: the
        stream device's slots) or backend this guest cannot run with."""
        if backend not in self.backends:
            raise ConfigError(f"the {self.name} guest runs on the {' or '.join(self.backends)} backend "
                              f"only, not {backend!r}")
        if memory_mib < self.min_memory_mib:
            raise ConfigError(f"the {self.name} guest needs at least {self.min_memory_mib} MiB of guest "
                              f"memory, got {memory_mib} MiB")
        values = self.resolve(params)
        if self.validate is not None:
            self.validate(memory_mib, values, max_clients)

    def write_params(self, machine, params: Mapping[str, int] | None = None) -> None:
        """Put the parameters into the guest's parameter block (a VMM write, noted for checkpoints)."""
        if not self.params:
            return
        for param in self.params:
            machine.params["reserved"][param.index] = self.resolve(params)[param.name]
        machine.note_vmm_write(layout.PARAMS_GPA, layout.PARAMS_DTYPE.itemsize)


BUILTIN_GUESTS: dict[str, GuestSpec] = {
    name: GuestSpec(name, description=f"the {name} dirtying workload (ring/guest/programs/workloads.c)")
    for name in WORKLOAD_IDS
}


def _registered() -> dict[str, GuestSpec]:
    found: dict[str, GuestSpec] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in BUILTIN_GUESTS or entry.name in found:
            continue                        # a built-in name cannot be taken over
        try:
            spec = entry.load()
        except Exception as exc:            # a broken plugin names itself, it does not hide the others
            raise ConfigError(f"guest {entry.name!r} ({entry.value}) could not be loaded: {exc}") from exc
        if not isinstance(spec, GuestSpec):
            raise ConfigError(f"guest {entry.name!r} ({entry.value}) is not a GuestSpec")
        found[entry.name] = spec
    return found


def guest_names() -> tuple[str, ...]:
    """The guests an agent can run: the built-in workloads, then the registered ones."""
    return tuple(BUILTIN_GUESTS) + tuple(sorted(_registered()))


def find_guest(name: str) -> GuestSpec:
    """The spec of the guest called `name`; ConfigError naming the known ones otherwise."""
    if name in BUILTIN_GUESTS:
        return BUILTIN_GUESTS[name]
    registered = _registered()
    if name in registered:
        return registered[name]
    raise ConfigError(f"unknown guest {name!r}: choose one of {', '.join(guest_names())}")


__all__ = ["GuestSpec", "GuestParam", "guest_names", "find_guest", "BUILTIN_GUESTS", "ENTRY_POINT_GROUP",
           "STREAM_DEVICE"]
