"""The agents' configuration: frozen dataclasses per concern, from a TOML file and flags.

Configuration is data (Firecracker's vmm_config). Each concern is one frozen
dataclass, and each of its fields is one setting, declared once with
:func:`setting`: its type (the annotation), its default, its range or choices,
the help text and the command-line flag. Everything else is generated from
that declaration: the checks, the commented example file (``DEFAULT_TOML``,
which the README shows), and both agents' argparse flags. An agent's whole
configuration is read once at start-up, in this order:

1. the defaults;
2. the TOML file given with ``--config FILE`` (if any);
3. the command-line flags that were given (a flag that is not given leaves
   the file's value alone).

Unknown sections, unknown keys, values of the wrong type and values out of
range are rejected with a :class:`ConfigError` naming the key (and the file or
flag it came from); nothing here reads the environment. Booleans are not
integers here (``vcpus = true`` is an error), and an integer is accepted where
a float is expected (``max_interval_ms = 50``).

One file can serve both agents. The sections:

=================  ========================================  ==================
section            what                                      used by
=================  ========================================  ==================
``[primary]``      the replica's endpoint, the control port  primary
``[guest]``        vCPUs, memory, ring size, the guest       primary
``[service]``      a service guest's address and parameters  both
``[triggers]``     when a checkpoint is taken                primary
``[replication]``  pipelining, batching, compression,        both
                   heartbeats and the failure timeout
``[security]``     CURVE keys, or ``insecure = true``        both
``[status]``       status file and log interval              both
``[replica]``      ``listen``: where the replica binds       replica
``[fencing]``      etcd, the pair's lease and key            both
=================  ========================================  ==================

A section used only by the other agent is still checked (so a typo is found
whichever agent reads the file) but is not part of the result.

The guest is a description, not an import: ``guest.workload`` names a guest
spec (``ring.guest.spec``: the built-in dirtying workloads, and services such
as the kvstore that upper layers register), and the spec checks the memory
size, backend and parameters it gets. So this module never imports
``scenarios/``.

Why ``[service]`` has two ports. The primary serves a service guest's clients
on ``service.port``; the replica, once it has taken over, serves them on
``service.takeover_port`` (0, the default: it serves nothing). The replica
cannot tell from its own settings whether the guest has a service at all (the
workload is the primary's setting), and opening the stream device over a
guest without one would write the device's rings into that guest's memory:
so serving after a takeover is asked for explicitly. The two keys also keep
one file usable by both agents in both layouts: on one host (the drill, the
tests) the two ports must differ, and on two hosts the file sets both to the
same number, which is what clients expect. ``--service-port`` keeps its
meaning for each agent (the port *that* agent serves on) and maps to the key
of its role; ``--service-host`` (``service.host``) is the address both bind.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import ipaddress
import re
import tomllib
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import urlsplit
from typing import Any, ClassVar

from ring import abi
from ring.dirty import validate_ring_entries
from ring.errors import ConfigError, RingSizeError
from ring.guest import layout
from ring.stream import DEFAULT_SLOTS, MAX_SLOTS
from ring.guest.spec import GuestSpec, find_guest, guest_names

__all__ = [
    "ConfigError", "SettingError", "Setting", "setting", "settings", "GuestSection", "ServiceSection",
    "TriggerSection", "ReplicationSection", "SecuritySection", "StatusSection", "PrimarySection",
    "ReplicaSection", "FencingSection", "PrimaryAgentConfig", "ReplicaAgentConfig", "AgentConfig", "load_config",
    "validate_endpoint", "parse_endpoints", "read_toml", "to_dict", "dump_toml", "default_toml", "add_flags", "add_common_flags",
    "add_primary_flags", "add_replica_flags", "flag_overrides", "primary_arg_parser",
    "replica_arg_parser", "parse_primary_args", "parse_replica_args", "DEFAULT_TOML", "KINDS",
    "BACKENDS", "SECTIONS",
]

KINDS = ("primary", "replica")
BACKENDS = ("kvm", "sim")
MAX_MEMORY_MIB = ((layout.MAX_MAPPED_GIB - 1) << 30) >> 20   # what the guest layout maps (ring.machine)
PAGES_PER_MIB = (1 << 20) // 4096
ZSTD_MIN_LEVEL = -(1 << 17)     # zstd's fast levels are negative
ZSTD_MAX_LEVEL = 22


class SettingError(ConfigError):
    """One setting is wrong; `key` is its dotted name ("triggers.max_interval_ms")."""

    def __init__(self, key: str, detail: str, origin: str = "") -> None:
        self.key = key
        self.detail = detail
        self.origin = origin
        where = f" ({origin})" if origin else ""
        super().__init__(f"{key}{where}: {detail}")

    def with_origin(self, origin: str) -> SettingError:
        return SettingError(self.key, self.detail, origin)


# -- endpoints -----------------------------------------------------------------

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def validate_endpoint(value: str, key: str = "endpoint", *, bind: bool = False) -> str:
    """Check a ZeroMQ TCP endpoint tcp://HOST:PORT (HOST: name, IPv4, [IPv6]; '*' if bind)."""
    example = "tcp://HOST:PORT, e.g. tcp://127.0.0.1:7800"
    if not isinstance(value, str) or not value.startswith("tcp://"):
        raise SettingError(key, f"must look like {example}, got {value!r}")
    rest = value[len("tcp://"):]
    host, sep, port = rest.rpartition(":")
    if not sep or not host:
        raise SettingError(key, f"must look like {example} (host and port), got {value!r}")
    if bind and port in ("0", "*"):
        pass                                 # any free port: the agent logs the one it got
    elif not port.isdigit() or not 1 <= int(port) <= 65535:
        raise SettingError(key, f"port must be a number from 1 to 65535, got {port!r} in {value!r}")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise SettingError(key, f"{host} is not an IPv6 address in {value!r}") from None
    elif host == "*":
        if not bind:
            raise SettingError(key, f"'*' (any interface) is only for listening, not for connecting: "
                                    f"{value!r}")
    elif not _HOSTNAME.match(host):
        raise SettingError(key, f"{host!r} is not a host name or address in {value!r}")
    return value


# -- one declaration per setting ------------------------------------------------------

_NO_EXAMPLE: Any = object()
_TYPE_WORDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
_METAVARS = (("_ms", "MS"), ("_us", "US"), ("_s", "S"), ("_mib", "MIB"), ("port", "PORT"))


@dataclass(frozen=True)
class Setting:
    """What one setting is, declared once beside its field; the checks, TOML and flags read it.

    The first group is what `setting()` is given; `section`, `name`, `type` and
    `default` are filled in from the dataclass field it is attached to.
    """

    help: str                                   # what it is for: the flag's help, the TOML comment
    low: float | None = None                    # range, inclusive (None: unbounded)
    high: float | None = None
    choices: tuple[str, ...] | Callable[[], Sequence[str]] = ()   # a callable: looked up when used
    check: Callable[[Any], str | None] | None = None   # returns what is wrong, or None; runs first
    flag: str = ""                              # "": --NAME (underscores as dashes)
    metavar: str = ""                           # "": from the name's unit or the type
    roles: tuple[str, ...] = ()                 # the agents that read it; (): all of its section's
    example: Any = _NO_EXAMPLE                  # the value DEFAULT_TOML shows, if not the default
    section: str = ""
    name: str = ""
    type: type = object
    default: Any = None

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def readers(self) -> tuple[str, ...]:
        """The agents that read this setting (and are offered its flag)."""
        return tuple(kind for kind in KINDS if self.section in _sections_of(kind)
                     and (not self.roles or kind in self.roles))

    @property
    def shown(self) -> Any:
        """The value the example file shows: the example, or else the default."""
        return self.default if self.example is _NO_EXAMPLE else self.example

    @property
    def option(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        return "cfg_" + self.key.replace(".", "__")

    def choice_list(self) -> tuple[str, ...]:
        return tuple(self.choices() if callable(self.choices) else self.choices)

    def constraint(self) -> str:
        """The range or the choices, as the help and the example file show them."""
        if self.choices:
            return ", ".join(self.choice_list())
        if self.low is not None and self.high is not None:
            return f"{_bound(self.low)}..{_bound(self.high)}"
        if self.low is not None:
            return f">= {_bound(self.low)}"
        if self.high is not None:
            return f"<= {_bound(self.high)}"
        return ""

    def problem(self, value: Any) -> str | None:
        """What is wrong with a value of the right type, or None."""
        if self.check is not None:
            detail = self.check(value)
            if detail:
                return detail
        if self.low is not None and self.high is not None and not self.low <= value <= self.high:
            return f"must be between {_bound(self.low)} and {_bound(self.high)}, got {_num(value)}"
        if self.low is not None and value < self.low:
            return f"must be >= {_bound(self.low)}, got {_num(value)}"
        if self.high is not None and value > self.high:
            return f"must be <= {_bound(self.high)}, got {_num(value)}"
        if self.choices:
            choices = self.choice_list()
            if value not in choices:
                return f"must be one of {', '.join(map(repr, choices))}, got {value!r}"
        return None

    def metavar_text(self) -> str | None:
        if self.type is bool:
            return None
        if self.metavar:
            return self.metavar
        if self.choices:
            return "NAME"
        for suffix, word in _METAVARS:
            if self.name.endswith(suffix):
                return word
        return {int: "N", float: "X", str: "TEXT"}[self.type]

    def flag_help(self) -> str:
        shown = self.constraint()
        if self.default not in ("", None):
            default = _toml_value(self.default) if self.type is not str else self.default
            shown = f"{shown}; default {default}" if shown else f"default {default}"
        text = f"{self.help} ({shown})" if shown else self.help
        return text.replace("%", "%%")              # argparse formats help with %


def setting(default: Any, help: str, **declared: Any) -> Any:
    """A dataclass field that is a setting: its default, help, and the rest of `Setting`."""
    return field(default=default, metadata={"setting": Setting(help, **declared)})


def _bound(value: float) -> str:
    value = int(value) if float(value).is_integer() else value
    if isinstance(value, int) and value >= 1 << 32 and (value + 1) & value == 0:
        return f"2^{(value + 1).bit_length() - 1}-1"
    return _num(value)


def _num(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _toml_type(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
             dict: "table"}
    return names.get(type(value), type(value).__name__)


def _is_a(value: object, expected: type) -> bool:
    if isinstance(value, bool):
        return expected is bool
    if expected is float:
        return isinstance(value, (int, float))
    return isinstance(value, expected)


@functools.cache
def _settings_of(cls: type) -> tuple[Setting, ...]:
    """The settings of a section class, bound to their fields (name, type, default)."""
    hints = typing.get_type_hints(cls)
    return tuple(dataclasses.replace(f.metadata["setting"], section=cls.SECTION, name=f.name,
                                     type=hints[f.name], default=f.default)
                 for f in dataclasses.fields(cls))


# checks that need more than a range

def _endpoint(*, bind: bool, empty_ok: bool) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        if value == "" and empty_ok:
            return None
        try:
            validate_endpoint(value, bind=bind)
        except SettingError as exc:
            return exc.detail
        return None
    return check


def _even(value: int) -> str | None:
    return None if value % 2 == 0 else f"must be a multiple of 2 (MiB), got {value}"


def _ring_size(value: int) -> str | None:
    try:
        validate_ring_entries(value)
    except RingSizeError as exc:
        return str(exc)
    return None


def _plain_name(value: str) -> str | None:
    if value and (value != value.strip() or "/" in value or value in (".", "..")):
        return f"must be a plain name (files NAME.key, NAME.key_secret in keys_dir), got {value!r}"
    return None


def _host(value: str) -> str | None:
    try:
        ipaddress.ip_address(value)
        return None
    except ValueError:
        pass
    return None if _HOSTNAME.match(value) else f"must be a host name or an IP address, got {value!r}"


# -- sections ------------------------------------------------------------------

class _Section:
    """Shared checks: every field has its declared type, then its range, then `_validate`."""

    SECTION: ClassVar[str] = ""
    ABOUT: ClassVar[str] = ""                   # the section's comment in DEFAULT_TOML, its flags' title
    NOTES: ClassVar[tuple[str, ...]] = ()       # more comment lines under the section in DEFAULT_TOML

    def __post_init__(self) -> None:
        for s in _settings_of(type(self)):
            value = getattr(self, s.name)
            if not _is_a(value, s.type):
                raise SettingError(s.key, f"must be {_TYPE_WORDS[s.type]}, got {_toml_type(value)} "
                                          f"{value!r}")
            if s.type is float and not isinstance(value, float):
                value = float(value)
                object.__setattr__(self, s.name, value)
            detail = s.problem(value)
            if detail:
                raise SettingError(s.key, detail)
        self._validate()

    def _validate(self) -> None:
        """Checks across fields (a single field's checks are declared with it)."""

    def _fail(self, name: str, detail: str) -> SettingError:
        return SettingError(f"{self.SECTION}.{name}", detail)


@dataclass(frozen=True)
class PrimarySection(_Section):
    """[primary] (primary): where the replica is."""

    SECTION: ClassVar[str] = "primary"
    ABOUT: ClassVar[str] = "where the replica is, and the control interface"

    replica: str = setting("", "the replica's endpoint, tcp://HOST:PORT (required)",
                           check=_endpoint(bind=False, empty_ok=True), metavar="tcp://HOST:PORT",
                           example="tcp://127.0.0.1:7800")
    control: str = setting("", "listen here for run-time changes of [triggers]; \"\": off",
                           check=_endpoint(bind=True, empty_ok=True), metavar="tcp://HOST:PORT")


@dataclass(frozen=True)
class GuestSection(_Section):
    """[guest] (primary): the KVM guest and what it runs."""

    SECTION: ClassVar[str] = "guest"
    ABOUT: ClassVar[str] = "the guest the primary runs and protects"

    vcpus: int = setting(2, "guest vCPUs", low=1, high=layout.MAX_VCPUS)
    memory_mib: int = setting(256, "guest data memory, a multiple of 2 MiB", low=2, high=MAX_MEMORY_MIB,
                              check=_even)
    ring_entries: int = setting(4096, "dirty ring entries per vCPU, a power of two",
                                low=abi.DIRTY_RING_MIN_ENTRIES, high=abi.DIRTY_RING_MAX_ENTRIES,
                                check=_ring_size)
    workload: str = setting("uniform", "what the guest runs", choices=guest_names)
    seed: int = setting(1, "the workload's seed", low=0, high=(1 << 64) - 1)
    working_set_pages: int = setting(0, "pages the workload writes; 0: all of memory", low=0)
    report_every: int = setting(10000, "a progress report every N writes per vCPU; 0: none", low=0)
    backend: str = setting("kvm", "where the guest runs (sim: simulated, no /dev/kvm)",
                           choices=BACKENDS)

    def _validate(self) -> None:
        if not 0 <= self.working_set_pages <= self.data_pages:
            raise self._fail("working_set_pages", f"must be between 0 and {self.data_pages} (the data "
                                                  f"memory's pages), got {self.working_set_pages}")

    @property
    def data_pages(self) -> int:
        return self.memory_mib * PAGES_PER_MIB

    def spec(self) -> GuestSpec:
        """The guest spec `workload` names (ring.guest.spec)."""
        return find_guest(self.workload)

    def machine_config(self) -> Any:
        """The ring.MachineConfig of this guest."""
        from ring.machine import MachineConfig
        return MachineConfig(vcpus=self.vcpus, data_bytes=self.memory_mib << 20,
                             ring_entries=self.ring_entries)

    def workload_config(self) -> Any:
        """The ring.Workload this guest runs."""
        from ring.workloads import Workload
        if self.spec().program is not None:             # its own program reads report_every only
            return Workload(seed=self.seed, report_every=self.report_every)
        return Workload(self.workload, seed=self.seed,
                        working_set_pages=self.working_set_pages or None,
                        report_every=self.report_every)


@dataclass(frozen=True)
class ServiceSection(_Section):
    """[service] (both): where a service guest's clients connect, and its parameters."""

    SECTION: ClassVar[str] = "service"
    ABOUT: ClassVar[str] = "a service guest's address and parameters"
    NOTES: ClassVar[tuple[str, ...]] = (
        "The primary serves the guest's clients on host:port; once the replica has taken",
        "over, it serves them on host:takeover_port. Two ports, so that one file serves a",
        "pair on one host (different ports) and on two hosts (set both alike).",
    )

    host: str = setting("127.0.0.1", "the address the service listens on",
                        check=_host, flag="--service-host", metavar="HOST")
    port: int = setting(6380, "its clients' TCP port; 0: any free port",
                        low=0, high=65535, flag="--service-port", roles=("primary",))
    takeover_port: int = setting(0, "serve clients here after a failover; 0: none", low=0, high=65535,
                                 flag="--service-port", roles=("replica",))
    table_entries: int = setting(65536, "the kvstore's hash table buckets, a power of two",
                                 roles=("primary",))
    request_max: int = setting(65536, "the kvstore's largest request, in bytes", roles=("primary",))
    max_clients: int = setting(DEFAULT_SLOTS, "clients at once; one more is refused as Redis does",
                               low=1, high=MAX_SLOTS,
                               flag="--max-clients", roles=("primary",))

    def guest_params(self, spec: GuestSpec) -> dict[str, int]:
        """The parameters `spec` takes, from this section (the spec's defaults for the rest)."""
        mine = {s.name for s in _settings_of(type(self))}
        return spec.resolve({name: getattr(self, name) for name in spec.param_names if name in mine})


@dataclass(frozen=True)
class TriggerSection(_Section):
    """[triggers] (primary): what starts a checkpoint. 0 turns a numeric trigger off."""

    SECTION: ClassVar[str] = "triggers"
    ABOUT: ClassVar[str] = "what starts a checkpoint (any trigger on; 0: off)"

    ring_full: bool = setting(True, "when a vCPU's dirty ring reaches its soft-full mark")
    dirty_pages: int = setting(0, "after this many pages dirtied VM-wide; 0: off", low=0)
    max_interval_ms: float = setting(50.0, "the longest time between checkpoints; 0: off", low=0)
    output: bool = setting(True, "soon after the guest produced output (to release it)",
                           flag="--output-trigger")
    output_delay_ms: float = setting(1.0, "how long output may gather before that checkpoint", low=0)
    poll_us: int = setting(500, "how often the dirty_pages watcher polls the rings' fill", low=1)

    def _validate(self) -> None:
        if not (self.ring_full or self.dirty_pages or self.max_interval_ms or self.output):
            raise SettingError("triggers", "every trigger is off: enable at least one of ring_full, "
                                           "dirty_pages, max_interval_ms, output")


@dataclass(frozen=True)
class ReplicationSection(_Section):
    """[replication] (both): the epoch pipeline, the data path, and failure detection."""

    SECTION: ClassVar[str] = "replication"
    ABOUT: ClassVar[str] = "the epoch pipeline, the data path and failure detection"

    max_in_flight: int = setting(2, "unacknowledged epochs before the guest is held",
                                 low=1, high=1024)
    batch_pages: int = setting(512, "pages per encoded batch (frame)", low=1, high=65536)
    zstd_level: int = setting(1, "zstd compression level (negative: faster)", low=ZSTD_MIN_LEVEL,
                              high=ZSTD_MAX_LEVEL)
    cache_pages: int = setting(65536, "cache of pages last sent (XOR delta bases); 0: none",
                               low=0)
    heartbeat_ms: int = setting(50, "heartbeat interval", low=1)
    timeout_ms: int = setting(1000, "silence after which the peer is gone (> heartbeat_ms)",
                              low=1)
    precopy_max_rounds: int = setting(5, "live pre-copy rounds before the synchronous copy",
                                      low=0)
    precopy_done_pages: int = setting(1024, "pre-copy ends when a round dirties fewer pages",
                                      low=0)
    precopy_epoch_pages: int = setting(8192, "pages per pre-copy epoch", low=1)
    auto_converge: bool = setting(True, "slow the guest down while a sync does not converge")
    throttle_max: float = setting(0.99, "the largest share of time auto-converge holds the guest",
                                  low=0.0, high=0.99)
    encode_threads: int = setting(2, "threads that encode pages", low=1, high=256)

    def _validate(self) -> None:
        if self.timeout_ms <= self.heartbeat_ms:
            raise self._fail("timeout_ms", f"must be greater than replication.heartbeat_ms "
                                           f"({self.heartbeat_ms}), got {self.timeout_ms}")


@dataclass(frozen=True)
class SecuritySection(_Section):
    """[security] (both): CURVE keys (see checkpointer.security), or insecure = true."""

    SECTION: ClassVar[str] = "security"
    ABOUT: ClassVar[str] = "CURVE authentication and encryption"
    NOTES: ClassVar[tuple[str, ...]] = (
        "Make key pairs with colo-keys:",
        "  colo-keys KEYS --name primary ; colo-keys KEYS --name replica",
    )

    insecure: bool = setting(False, "no authentication and no encryption: for local experiments only")
    keys_dir: str = setting("", "this agent's key pair: DIR/NAME.key and DIR/NAME.key_secret",
                            metavar="DIR")
    key_name: str = setting("", "NAME of this agent's key pair; \"\": its role", check=_plain_name,
                            metavar="NAME")
    peer_public_key: str = setting("", "the replica's public key file (KEYS/replica.key)",
                                   metavar="FILE", roles=("primary",))
    authorized_keys: str = setting("", "the primary public keys allowed: a key file or a directory", metavar="PATH", roles=("replica",))


@dataclass(frozen=True)
class StatusSection(_Section):
    """[status] (both): where the agent reports what it is doing."""

    SECTION: ClassVar[str] = "status"
    ABOUT: ClassVar[str] = "what the agent reports"

    status_json: str = setting("", "a file rewritten with the agent's status; \"\": none", metavar="FILE")
    log_interval_s: float = setting(5.0, "a status line in the log every N seconds; 0: none", low=0)


@dataclass(frozen=True)
class ReplicaSection(_Section):
    """[replica] (replica): where it listens for the primary."""

    SECTION: ClassVar[str] = "replica"
    ABOUT: ClassVar[str] = "where the replica listens"

    listen: str = setting("tcp://127.0.0.1:7800", "where to listen for the primary (HOST *: all; PORT 0: any)",
                          check=_endpoint(bind=True, empty_ok=False), metavar="tcp://HOST:PORT")


def parse_endpoints(text: str) -> list[tuple[str, int]]:
    """etcd's `URL[,URL...]` (http://HOST:PORT, or HOST:PORT) as (host, port) pairs; ValueError naming a bad one."""
    endpoints = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        url = urlsplit(item if "://" in item else f"http://{item}")
        try:
            port = url.port
        except ValueError:
            port = None
        if url.scheme not in ("http", "https") or not url.hostname or port is None:
            raise ValueError(f"etcd endpoint {item!r}: expected http://HOST:PORT")
        endpoints.append((url.hostname, port))
    if not endpoints:
        raise ValueError("no etcd endpoint given")
    return endpoints


def _etcd_endpoints(value: str) -> str | None:
    if not value:
        return None
    try:
        parse_endpoints(value)
    except ValueError as exc:
        return str(exc)
    return None


def _node_name(value: str) -> str | None:
    if value and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", value):
        return f"must be a short name of letters, digits, '-', '_' and '.', got {value!r}"
    return None


def _etcd_key(value: str) -> str | None:
    if not value.startswith("/") or value.endswith("/") or any(c.isspace() for c in value):
        return f"must be an absolute key path like /colo-ring/pair (no spaces, no trailing /), got {value!r}"
    return None


@dataclass(frozen=True)
class FencingSection(_Section):
    """[fencing] (both): the pair's lease in etcd, which decides the one node that may serve."""

    SECTION: ClassVar[str] = "fencing"
    ABOUT: ClassVar[str] = "the pair's lease in etcd: only its holder serves clients"
    NOTES: ClassVar[tuple[str, ...]] = (
        "Without etcd the replica never fails over by itself; no_fencing = true makes it",
        "fail over on silence alone, which ALLOWS SPLIT BRAIN (two nodes serving).",
    )

    etcd: str = setting("", "etcd endpoints, URL[,URL...]; \"\": none (no automatic failover)",
                        check=_etcd_endpoints, metavar="URL[,URL...]", example="http://127.0.0.1:2379")
    no_fencing: bool = setting(False, "fail over on silence without etcd: ALLOWS SPLIT BRAIN",
                               flag="--no-fencing")
    key: str = setting("/colo-ring/pair", "the pair's key in etcd (both nodes use the same)",
                       check=_etcd_key, flag="--etcd-key", metavar="KEY")
    node: str = setting("", "this node's name in etcd; \"\": its role and host name",
                        check=_node_name, flag="--node-name", metavar="NAME")
    ttl_s: int = setting(2, "the lease's TTL (etcd grants whole seconds); a frozen or cut-off "
                            "node is replaced after it", low=1, high=3600, flag="--lease-ttl-s")
    renew_ms: int = setting(400, "how often the holder renews its lease", low=10,
                            flag="--lease-renew-ms")
    revoke_on_close: bool = setting(True, "a primary whose connection closed without BYE is dead: "
                                          "revoke its lease (fast takeover)")

    def _validate(self) -> None:
        if self.etcd and self.no_fencing:
            raise self._fail("no_fencing", "etcd is set too: fencing with etcd, or no fencing, not both")
        if self.renew_ms * 2 > self.ttl_s * 1000:
            raise self._fail("renew_ms", f"must be at most half the lease's TTL ({self.ttl_s} s), so that "
                                         f"one lost renewal does not lose the lease; got {self.renew_ms}")

    @property
    def mode(self) -> str:
        """"etcd" (fenced by the lease), "off" (no_fencing: split brain possible) or "manual"."""
        return "etcd" if self.etcd else "off" if self.no_fencing else "manual"


SECTIONS: dict[str, type[_Section]] = {
    cls.SECTION: cls for cls in (PrimarySection, GuestSection, ServiceSection, TriggerSection,
                                 ReplicationSection, SecuritySection, StatusSection, ReplicaSection,
                                 FencingSection)
}

# Settings moved since an earlier release: an old file gets told where they went.
_MOVED = {"guest.service_port": "service.port", "guest.service_host": "service.host",
          "guest.table_entries": "service.table_entries", "guest.request_max": "service.request_max",
          "replica.service_port": "service.takeover_port"}


# -- the agents' configurations ----------------------------------------------------------

@dataclass(frozen=True)
class _AgentConfig:
    """The sections one agent reads, and where each given setting came from."""

    KIND: ClassVar[str] = ""

    # dotted key -> "in FILE" or "from --FLAG"; not part of equality (the same settings are equal)
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False, kw_only=True)

    def origin(self, key: str) -> str:
        """Where a setting came from: "in FILE", "from --FLAG", or "" (the default)."""
        return self.origins.get(key, "")

    def error(self, key: str, detail: str) -> SettingError:
        """A SettingError for `key`, naming where its value came from."""
        return SettingError(key, detail, self.origin(key) or "the default")


@dataclass(frozen=True)
class PrimaryAgentConfig(_AgentConfig):
    """Everything colo-primary reads."""

    KIND: ClassVar[str] = "primary"

    primary: PrimarySection = field(default_factory=PrimarySection)
    guest: GuestSection = field(default_factory=GuestSection)
    service: ServiceSection = field(default_factory=ServiceSection)
    triggers: TriggerSection = field(default_factory=TriggerSection)
    replication: ReplicationSection = field(default_factory=ReplicationSection)
    security: SecuritySection = field(default_factory=SecuritySection)
    status: StatusSection = field(default_factory=StatusSection)
    fencing: FencingSection = field(default_factory=FencingSection)

    @property
    def replica(self) -> str:
        """The replica's endpoint, tcp://HOST:PORT ("" if not set)."""
        return self.primary.replica

    def guest_spec(self) -> GuestSpec:
        return self.guest.spec()

    def guest_params(self) -> dict[str, int]:
        """The guest's parameters (every one its spec takes), for GuestSpec.write_params."""
        return self.service.guest_params(self.guest_spec())

    def listen_addresses(self) -> list[tuple[str, str]]:
        """(key, tcp://HOST:PORT) of what this agent listens on from the start."""
        out = [("primary.control", self.primary.control)] if self.primary.control else []
        if self.guest_spec().is_service:
            host = f"[{self.service.host}]" if ":" in self.service.host else self.service.host
            out.append(("service.port", f"tcp://{host}:{self.service.port}"))
        return out


@dataclass(frozen=True)
class ReplicaAgentConfig(_AgentConfig):
    """Everything colo-replica reads."""

    KIND: ClassVar[str] = "replica"

    replica: ReplicaSection = field(default_factory=ReplicaSection)
    service: ServiceSection = field(default_factory=ServiceSection)
    replication: ReplicationSection = field(default_factory=ReplicationSection)
    security: SecuritySection = field(default_factory=SecuritySection)
    status: StatusSection = field(default_factory=StatusSection)
    fencing: FencingSection = field(default_factory=FencingSection)

    def listen_addresses(self) -> list[tuple[str, str]]:
        """(key, tcp://HOST:PORT) of what this agent listens on from the start."""
        return [("replica.listen", self.replica.listen)]


AgentConfig = PrimaryAgentConfig | ReplicaAgentConfig
_AGENTS: dict[str, type[PrimaryAgentConfig | ReplicaAgentConfig]] = {
    "primary": PrimaryAgentConfig, "replica": ReplicaAgentConfig}


@functools.cache
def _sections_of(kind: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(_AGENTS[kind]) if f.name in SECTIONS)


def settings(kind: str | None = None) -> tuple[Setting, ...]:
    """Every setting (or those one agent reads), in the order of the example file."""
    return tuple(s for cls in SECTIONS.values() for s in _settings_of(cls)
                 if kind is None or kind in s.readers)


# -- loading -------------------------------------------------------------------

def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_key(section: str, key: str) -> str:
    known = [s.name for s in _settings_of(SECTIONS[section])]
    moved = _MOVED.get(f"{section}.{key}")
    hint = f" (it moved to {moved!r})" if moved else _suggest(key, known)
    return f"unknown key '{section}.{key}'{hint}; the keys of [{section}] are {', '.join(known)}"


def read_toml(path: str) -> dict[str, Any]:
    """A TOML file's content; ConfigError naming the file when it cannot be read or parsed."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML (not UTF-8): {exc}") from None


def _check_file(data: Mapping[str, Any], path: str) -> dict[str, dict[str, Any]]:
    """Reject unknown sections and keys; return {section: {key: value}}."""
    out: dict[str, dict[str, Any]] = {}
    for section, table in data.items():
        if not isinstance(table, dict) and section not in SECTIONS:
            raise ConfigError(f"config file {path}: unknown key {section!r} at the top level "
                              f"(settings belong in sections: {', '.join(SECTIONS)})"
                              f"{_suggest_key(section)}")
        if section not in SECTIONS:
            raise ConfigError(f"config file {path}: unknown section [{section}]"
                              f"{_suggest(section, list(SECTIONS))}; known sections: "
                              f"{', '.join(SECTIONS)}")
        if not isinstance(table, dict):
            raise ConfigError(f"config file {path}: {section!r} must be a section [{section}], got "
                              f"{_toml_type(table)} {table!r}")
        known = {s.name for s in _settings_of(SECTIONS[section])}
        for key in table:
            if key not in known:
                raise ConfigError(f"config file {path}: {_unknown_key(section, key)}")
        out[section] = dict(table)
    return out


def _build(cls: type[_Section], values: Mapping[str, Any], origins: Mapping[str, str]) -> _Section:
    try:
        return cls(**values)
    except SettingError as exc:
        origin = origins.get(exc.key, "")
        raise exc.with_origin(origin) if origin else exc from None


def _check_guest(sections: Mapping[str, _Section], origins: Mapping[str, str]) -> None:
    """The guest spec's own check of memory, backend and parameters (across [guest] and [service])."""
    guest = sections.get("guest")
    if not isinstance(guest, GuestSection):
        return
    service = sections.get("service")
    service = service if isinstance(service, ServiceSection) else ServiceSection()
    spec = guest.spec()
    try:
        spec.check(guest.memory_mib, service.guest_params(spec), backend=guest.backend,
                   max_clients=service.max_clients)
    except ConfigError as exc:
        detail = str(exc) if spec.name in str(exc) else f"{spec.name}: {exc}"
        involved = ["guest.memory_mib", "guest.backend", *(f"service.{n}" for n in spec.param_names)]
        given = [f"{key} {origins[key]}" for key in involved if origins.get(key)]
        origin = "; ".join(filter(None, [origins.get("guest.workload", ""), *given]))
        raise SettingError("guest.workload", detail, origin) from None


def load_config(kind: str, path: str | None = None,
                overrides: Mapping[str, object] | None = None,
                flag_names: Mapping[str, str] | None = None, *,
                data: Mapping[str, Any] | None = None) -> AgentConfig:
    """Read the configuration of a 'primary' or 'replica' agent: defaults, file, then overrides.

    `overrides` maps dotted keys ("triggers.max_interval_ms") to values; `flag_names`
    optionally maps the same keys to the flags they came from, for error messages. `data`:
    the file's content already read (colo-node takes its own table out first); `path` then
    only names it. Raises ConfigError (a ValueError) naming the file, section or key that is wrong.
    """
    if kind not in _AGENTS:
        raise ConfigError(f"unknown agent kind {kind!r}: choose 'primary' or 'replica'")
    overrides = dict(overrides or {})
    flag_names = dict(flag_names or {})
    values: dict[str, dict[str, Any]] = {}
    origins: dict[str, str] = {}
    if path is not None:
        values = _check_file(read_toml(path) if data is None else data, path)
        for section, table in values.items():
            for key in table:
                origins[f"{section}.{key}"] = f"in {path}"
    used = _sections_of(kind)
    for dotted, value in overrides.items():
        section, dot, key = dotted.partition(".")
        if not dot or section not in SECTIONS:
            raise ConfigError(f"unknown setting {dotted!r}{_suggest(dotted, _all_keys())}")
        if section not in used:
            raise ConfigError(f"setting {dotted!r}: the {kind} has no [{section}] settings")
        if key not in {s.name for s in _settings_of(SECTIONS[section])}:
            raise ConfigError(_unknown_key(section, key))
        values.setdefault(section, {})[key] = value
        if dotted in flag_names:
            origins[dotted] = f"from {flag_names[dotted]}"
        else:
            origins.pop(dotted, None)
    security = values.setdefault("security", {})
    if not security.get("key_name"):
        security["key_name"] = kind
        origins.pop("security.key_name", None)
    sections = {name: _build(SECTIONS[name], values.get(name, {}), origins) for name in SECTIONS
                if name in values or name in used}
    _check_guest(sections, origins)
    return _AGENTS[kind](**{name: sections[name] for name in used},  # type: ignore[arg-type]
                         origins=MappingProxyType(origins))


def _suggest_key(key: str) -> str:
    """For a stray top-level key: the section.key it probably belongs to."""
    close = difflib.get_close_matches(key, [k.split(".")[1] for k in _all_keys()], n=1)
    if not close:
        return ""
    full = next(k for k in _all_keys() if k.split(".")[1] == close[0])
    return f" (did you mean {full!r}?)"


def _all_keys() -> list[str]:
    return [s.key for s in settings()]


def to_dict(config: AgentConfig) -> dict[str, dict[str, Any]]:
    """{section: {key: value}}: for the status file and for echoing the configuration."""
    return {name: dataclasses.asdict(getattr(config, name)) for name in _sections_of(config.KIND)}


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def dump_toml(config: AgentConfig) -> str:
    """The configuration as TOML that load_config reads back to an equal configuration."""
    lines: list[str] = []
    for section, table in to_dict(config).items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
        lines.append("")
    return "\n".join(lines)


# -- the example file, generated -----------------------------------------------------------

_COMMENT_COLUMN = 28
_TOML_HEADER = """\
# colo-ring agent configuration: every setting, with its default. One file can
# serve both agents (--config FILE): each reads the sections it uses and checks
# the others. Flags given on the command line override these values; unknown
# sections and keys are errors. (Generated: python -m checkpointer.config)
"""


def _commented(text: str, comment: str) -> str:
    return f"{text.ljust(_COMMENT_COLUMN - 1)} # {comment}" if comment else text


def _who(readers: Sequence[str]) -> str:
    return "both agents" if len(readers) == len(KINDS) else " and ".join(readers)


def default_toml() -> str:
    """The complete, commented example file: the defaults, from the settings' declarations."""
    parts = [_TOML_HEADER]
    for name, cls in SECTIONS.items():
        readers = [kind for kind in KINDS if name in _sections_of(kind)]
        lines = [_commented(f"[{name}]", f"{_who(readers)}: {cls.ABOUT}")]
        lines += [f"# {note}" for note in cls.NOTES]
        for s in _settings_of(cls):
            value = s.shown
            comment = f"{s.help} ({s.constraint()})" if s.constraint() else s.help
            if len(s.readers) < len(readers):
                comment = f"{_who(s.readers)}: {comment}"
            lines.append(_commented(f"{s.name} = {_toml_value(value)}", comment))
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def __getattr__(name: str) -> str:
    # DEFAULT_TOML lists the registered guests, which are looked up when it is first read
    # (not when this module is imported: the lookup loads the upper layers' guest specs).
    if name == "DEFAULT_TOML":
        return default_toml()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- command line --------------------------------------------------------------

def _add(parser: argparse.ArgumentParser, chosen: Sequence[Setting]) -> None:
    """The flags of `chosen`, one argument group per section; every flag defaults to None."""
    groups: dict[str, Any] = {}
    for s in chosen:
        if s.section not in groups:
            cls = SECTIONS[s.section]
            groups[s.section] = parser.add_argument_group(f"[{s.section}]", cls.ABOUT)
        group = groups[s.section]
        if s.type is bool and s.option.startswith("--no-"):    # already a negative: no --no-no-
            group.add_argument(s.option, dest=s.dest, action="store_const", const=True,
                               default=None, help=s.flag_help())
        elif s.type is bool:
            group.add_argument(s.option, dest=s.dest, action=argparse.BooleanOptionalAction,
                               default=None, help=s.flag_help())
        else:
            group.add_argument(s.option, dest=s.dest, type=s.type, default=None, help=s.flag_help(),
                               metavar=s.metavar_text())


def _add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="TOML configuration file (flags override it)")


def add_flags(parser: argparse.ArgumentParser, kind: str) -> None:
    """--config and every flag of one agent, grouped by section."""
    _add_config_flag(parser)
    _add(parser, settings(kind))


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """--config and the flags both agents take; every flag defaults to None (not given)."""
    _add_config_flag(parser)
    _add(parser, [s for s in settings() if len(s.readers) == len(KINDS)])


def add_primary_flags(parser: argparse.ArgumentParser) -> None:
    """The flags only the primary takes."""
    _add(parser, [s for s in settings() if s.readers == ("primary",)])


def add_replica_flags(parser: argparse.ArgumentParser) -> None:
    """The flags only the replica takes."""
    _add(parser, [s for s in settings() if s.readers == ("replica",)])


def flag_overrides(args: argparse.Namespace) -> tuple[dict[str, object], dict[str, str]]:
    """(overrides, flag_names): the dotted keys of the flags that were given, and their flags."""
    overrides: dict[str, object] = {}
    names: dict[str, str] = {}
    for s in settings():
        value = getattr(args, s.dest, None)
        if value is not None:
            overrides[s.key] = value
            names[s.key] = s.option
    return overrides, names


_EPILOG = "Settings come from the defaults, then --config FILE, then the flags given."


def primary_arg_parser(prog: str = "colo-primary") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Run a KVM guest and checkpoint it to a colo-ring replica.",
        epilog=_EPILOG)
    add_flags(parser, "primary")
    return parser


def replica_arg_parser(prog: str = "colo-replica") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Receive checkpoints from a colo-ring primary; take over if it dies.",
        epilog=_EPILOG)
    add_flags(parser, "replica")
    return parser


def parse_primary_args(argv: Sequence[str] | None = None) -> PrimaryAgentConfig:
    """colo-primary's configuration. Bad flags exit 2 (argparse); bad settings raise ConfigError."""
    parser = primary_arg_parser()
    args = parser.parse_args(argv)
    overrides, names = flag_overrides(args)
    config = load_config("primary", args.config, overrides, names)
    assert isinstance(config, PrimaryAgentConfig)
    if not config.replica:
        parser.error("the following arguments are required: --replica "
                     "(or set [primary] replica in the config file)")
    return config


def parse_replica_args(argv: Sequence[str] | None = None) -> ReplicaAgentConfig:
    """colo-replica's configuration. Bad flags exit 2 (argparse); bad settings raise ConfigError."""
    args = replica_arg_parser().parse_args(argv)
    overrides, names = flag_overrides(args)
    config = load_config("replica", args.config, overrides, names)
    assert isinstance(config, ReplicaAgentConfig)
    return config


if __name__ == "__main__":  # pragma: no cover
    print(default_toml(), end="")
