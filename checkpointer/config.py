"""The agents' configuration: frozen dataclasses per concern, from a TOML file and flags.

Configuration is data (Firecracker's vmm_config). Each concern is one frozen
dataclass with defaults and a check of every field; an agent's whole
configuration is read once at start-up, in this order:

1. the dataclass defaults;
2. the TOML file given with ``--config FILE`` (if any);
3. the command-line flags that were given (a flag that is not given leaves
   the file's value alone).

Unknown sections, unknown keys, values of the wrong type and values out of
range are rejected with a :class:`ConfigError` naming the key (and the file or
flag it came from); nothing here reads the environment.

One file can serve both agents. The sections:

===============  ======================================  ==================
section          what                                    used by
===============  ======================================  ==================
``[primary]``    ``replica``: the replica's endpoint     primary
``[guest]``      vCPUs, memory, ring size, workload      primary
``[triggers]``   when a checkpoint is taken              primary
``[replication]`` pipelining, batching, compression,     both
                 heartbeats and the failure timeout
``[security]``   CURVE keys, or ``insecure = true``      both
``[status]``     status file and log interval            both
``[replica]``    ``listen``: where the replica binds     replica
===============  ======================================  ==================

A section used only by the other agent is still checked (so a typo is found
whichever agent reads the file) but is not part of the result. ``DEFAULT_TOML``
is a complete, commented example holding the defaults.

Booleans are not integers here (``vcpus = true`` is an error), and an integer
is accepted where a float is expected (``max_interval_ms = 50``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import ipaddress
import re
import tomllib
import typing
from dataclasses import dataclass, field
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from ring.dirty import validate_ring_entries
from ring.errors import ConfigError, RingSizeError
from ring.guest import layout
from ring.workloads import WORKLOAD_IDS

__all__ = [
    "ConfigError", "SettingError", "GuestSection", "TriggerSection", "ReplicationSection",
    "SecuritySection", "StatusSection", "PrimarySection", "ReplicaSection", "PrimaryAgentConfig",
    "ReplicaAgentConfig", "load_config", "validate_endpoint", "to_dict", "dump_toml",
    "add_common_flags", "add_primary_flags", "add_replica_flags", "flag_overrides",
    "primary_arg_parser", "replica_arg_parser", "parse_primary_args", "parse_replica_args",
    "DEFAULT_TOML", "KINDS", "BACKENDS",
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


# -- sections ------------------------------------------------------------------

_TYPE_WORDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def _toml_type(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
             dict: "table"}
    return names.get(type(value), type(value).__name__)


def _num(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


class _Section:
    """Shared checks: every field has the type its annotation names, then `_validate`."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            expected = hints[f.name]
            value = getattr(self, f.name)
            ok = (isinstance(value, expected) and not (expected is int and isinstance(value, bool))
                  ) if expected is not float else (
                isinstance(value, (int, float)) and not isinstance(value, bool))
            if not ok:
                raise SettingError(self._key(f.name), f"must be {_TYPE_WORDS[expected]}, got "
                                   f"{_toml_type(value)} {value!r}")
            if expected is float and not isinstance(value, float):
                object.__setattr__(self, f.name, float(value))
        self._validate()

    def _validate(self) -> None:
        pass

    def _key(self, name: str) -> str:
        return f"{self.SECTION}.{name}"

    def _fail(self, name: str, detail: str) -> SettingError:
        return SettingError(self._key(name), detail)

    def _at_least(self, name: str, low: float) -> None:
        value = getattr(self, name)
        if value < low:
            raise self._fail(name, f"must be >= {low}, got {_num(value)}")

    def _between(self, name: str, low: float, high: float) -> None:
        value = getattr(self, name)
        if not low <= value <= high:
            raise self._fail(name, f"must be between {low} and {high}, got {_num(value)}")

    def _one_of(self, name: str, choices: Sequence[str]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise self._fail(name, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")


SERVICE_WORKLOAD = "kvstore"         # the Redis-protocol key-value guest (scenarios/guests/kvstore.c)


@dataclass(frozen=True)
class GuestSection(_Section):
    """[guest] (primary): the KVM guest and the workload it runs."""

    SECTION: ClassVar[str] = "guest"

    vcpus: int = 2
    memory_mib: int = 256             # the data region; a multiple of 2 MiB
    ring_entries: int = 4096          # dirty ring entries per vCPU: a power of two, 256..65536
    workload: str = "uniform"
    seed: int = 1
    working_set_pages: int = 0        # 0: the whole data region
    report_every: int = 10000         # a progress event every N writes per vCPU (0: none)
    backend: str = "kvm"              # "kvm" or "sim"
    service_port: int = 6380          # workload "kvstore": the Redis-protocol service's TCP port
    service_host: str = "127.0.0.1"
    table_entries: int = 65536        # kvstore: hash table buckets (a power of two)
    request_max: int = 65536          # kvstore: the largest request accepted, in bytes

    def _validate(self) -> None:
        self._between("vcpus", 1, layout.MAX_VCPUS)
        self._between("memory_mib", 2, MAX_MEMORY_MIB)
        if self.memory_mib % 2:
            raise self._fail("memory_mib", f"must be a multiple of 2 (MiB), got {self.memory_mib}")
        try:
            validate_ring_entries(self.ring_entries)
        except RingSizeError as exc:
            raise self._fail("ring_entries", str(exc)) from None
        self._one_of("workload", tuple(WORKLOAD_IDS) + (SERVICE_WORKLOAD,))
        self._between("service_port", 0, 65535)
        if self.workload == SERVICE_WORKLOAD and self.backend != "kvm":
            raise self._fail("backend", "the kvstore service runs on the kvm backend only")
        if self.workload == SERVICE_WORKLOAD:
            from scenarios.service import check_service_params
            try:
                check_service_params(self.memory_mib, self.table_entries, self.request_max)
            except ValueError as exc:
                raise self._fail("workload", f"kvstore: {exc}") from None
        self._between("seed", 0, (1 << 64) - 1)
        self._between("working_set_pages", 0, self.data_pages)
        self._at_least("report_every", 0)
        self._one_of("backend", BACKENDS)

    @property
    def data_pages(self) -> int:
        return self.memory_mib * PAGES_PER_MIB

    def machine_config(self) -> Any:
        """The ring.MachineConfig of this guest."""
        from ring.machine import MachineConfig
        return MachineConfig(vcpus=self.vcpus, data_bytes=self.memory_mib << 20,
                             ring_entries=self.ring_entries)

    def workload_config(self) -> Any:
        """The ring.Workload this guest runs."""
        from ring.workloads import Workload
        if self.workload == SERVICE_WORKLOAD:            # its own program reads report_every only
            return Workload(seed=self.seed, report_every=self.report_every)
        return Workload(self.workload, seed=self.seed,
                        working_set_pages=self.working_set_pages or None,
                        report_every=self.report_every)


@dataclass(frozen=True)
class TriggerSection(_Section):
    """[triggers] (primary): what starts a checkpoint. 0 turns a numeric trigger off."""

    SECTION: ClassVar[str] = "triggers"

    ring_full: bool = True            # a vCPU's dirty ring reached its soft-full mark
    dirty_pages: int = 0              # VM-wide dirty pages (all rings' fill); 0: off
    max_interval_ms: float = 50.0     # the longest time between checkpoints; 0: off
    output: bool = True               # the guest produced output (checkpoint soon to release it)
    output_delay_ms: float = 1.0      # how long output may wait for more before the checkpoint
    poll_us: int = 500                # how often the dirty-page watcher polls the rings' fill

    def _validate(self) -> None:
        self._at_least("dirty_pages", 0)
        self._at_least("max_interval_ms", 0)
        self._at_least("output_delay_ms", 0)
        self._at_least("poll_us", 1)
        if not (self.ring_full or self.dirty_pages or self.max_interval_ms or self.output):
            raise SettingError("triggers", "every trigger is off: enable at least one of ring_full, "
                                           "dirty_pages, max_interval_ms, output")


@dataclass(frozen=True)
class ReplicationSection(_Section):
    """[replication] (both): the epoch pipeline, the data path, and failure detection."""

    SECTION: ClassVar[str] = "replication"

    max_in_flight: int = 2            # epochs sent but not acknowledged before the guest waits
    batch_pages: int = 512            # pages per encoded batch (frame)
    zstd_level: int = 1
    cache_pages: int = 65536          # primary's cache of pages last sent (delta bases); 0: none
    heartbeat_ms: int = 50
    timeout_ms: int = 500             # silence after which the peer is declared gone
    precopy_max_rounds: int = 5       # live pre-copy rounds before the final synchronous copy
    precopy_done_pages: int = 1024    # pre-copy stops when a round dirtied fewer pages than this
    precopy_epoch_pages: int = 8192   # pages per pre-copy batch epoch
    encode_threads: int = 2

    def _validate(self) -> None:
        self._between("max_in_flight", 1, 1024)
        self._between("batch_pages", 1, 65536)
        self._between("zstd_level", ZSTD_MIN_LEVEL, ZSTD_MAX_LEVEL)
        self._at_least("cache_pages", 0)
        self._at_least("heartbeat_ms", 1)
        self._at_least("timeout_ms", 1)
        if self.timeout_ms <= self.heartbeat_ms:
            raise self._fail("timeout_ms", f"must be greater than replication.heartbeat_ms "
                                           f"({self.heartbeat_ms}), got {self.timeout_ms}")
        self._at_least("precopy_max_rounds", 0)
        self._at_least("precopy_done_pages", 0)
        self._at_least("precopy_epoch_pages", 1)
        self._between("encode_threads", 1, 256)


@dataclass(frozen=True)
class SecuritySection(_Section):
    """[security] (both): CURVE keys (see checkpointer.security), or insecure = true."""

    SECTION: ClassVar[str] = "security"

    insecure: bool = False            # no authentication, no encryption (local experiments only)
    keys_dir: str = ""                # where this agent's key pair NAME.key / NAME.key_secret lives
    key_name: str = ""                # "": "primary" or "replica", by role
    peer_public_key: str = ""         # primary: the replica's public key file
    authorized_keys: str = ""         # replica: a directory of primary public keys, or one file

    def _validate(self) -> None:
        if self.key_name and (self.key_name != self.key_name.strip() or "/" in self.key_name
                              or self.key_name in (".", "..")):
            raise self._fail("key_name", f"must be a plain name (files NAME.key, NAME.key_secret in "
                                         f"keys_dir), got {self.key_name!r}")


@dataclass(frozen=True)
class StatusSection(_Section):
    """[status] (both): where the agent reports what it is doing."""

    SECTION: ClassVar[str] = "status"

    status_json: str = ""             # a file rewritten with the agent's status; "": none
    log_interval_s: float = 5.0       # a status line in the log every N seconds; 0: none

    def _validate(self) -> None:
        self._at_least("log_interval_s", 0)


@dataclass(frozen=True)
class PrimarySection(_Section):
    """[primary] (primary): where the replica is."""

    SECTION: ClassVar[str] = "primary"

    replica: str = ""                 # tcp://HOST:PORT; "": not set (then --replica is required)
    control: str = ""                 # tcp://127.0.0.1:PORT: change [triggers] at run time; "": off

    def _validate(self) -> None:
        if self.replica:
            validate_endpoint(self.replica, self._key("replica"))
        if self.control:
            validate_endpoint(self.control, self._key("control"), bind=True)


@dataclass(frozen=True)
class ReplicaSection(_Section):
    """[replica] (replica): where it listens for the primary."""

    SECTION: ClassVar[str] = "replica"

    listen: str = "tcp://127.0.0.1:7800"
    service_port: int = 0             # the guest service's TCP port after failover; 0: none

    def _validate(self) -> None:
        validate_endpoint(self.listen, self._key("listen"), bind=True)
        self._between("service_port", 0, 65535)


SECTIONS: dict[str, type[_Section]] = {
    cls.SECTION: cls for cls in (PrimarySection, GuestSection, TriggerSection, ReplicationSection,
                                 SecuritySection, StatusSection, ReplicaSection)
}


@dataclass(frozen=True)
class PrimaryAgentConfig:
    """Everything colo-primary reads."""

    KIND: ClassVar[str] = "primary"

    primary: PrimarySection = field(default_factory=PrimarySection)
    guest: GuestSection = field(default_factory=GuestSection)
    triggers: TriggerSection = field(default_factory=TriggerSection)
    replication: ReplicationSection = field(default_factory=ReplicationSection)
    security: SecuritySection = field(default_factory=SecuritySection)
    status: StatusSection = field(default_factory=StatusSection)

    @property
    def replica(self) -> str:
        """The replica's endpoint, tcp://HOST:PORT ("" if not set)."""
        return self.primary.replica


@dataclass(frozen=True)
class ReplicaAgentConfig:
    """Everything colo-replica reads."""

    KIND: ClassVar[str] = "replica"

    replica: ReplicaSection = field(default_factory=ReplicaSection)
    replication: ReplicationSection = field(default_factory=ReplicationSection)
    security: SecuritySection = field(default_factory=SecuritySection)
    status: StatusSection = field(default_factory=StatusSection)


AgentConfig = PrimaryAgentConfig | ReplicaAgentConfig
_AGENTS: dict[str, type[PrimaryAgentConfig | ReplicaAgentConfig]] = {
    "primary": PrimaryAgentConfig, "replica": ReplicaAgentConfig}


def _sections_of(kind: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(_AGENTS[kind]))


# -- loading -------------------------------------------------------------------

def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_key(section: str, key: str) -> str:
    known = [f.name for f in dataclasses.fields(SECTIONS[section])]  # type: ignore[arg-type]
    return (f"unknown key '{section}.{key}'{_suggest(key, known)}; the keys of [{section}] are "
            f"{', '.join(known)}")


def _read_file(path: str) -> dict[str, Any]:
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
        cls = SECTIONS[section]
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
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


def load_config(kind: str, path: str | None = None,
                overrides: Mapping[str, object] | None = None,
                flag_names: Mapping[str, str] | None = None) -> AgentConfig:
    """Read the configuration of a 'primary' or 'replica' agent: defaults, file, then overrides.

    `overrides` maps dotted keys ("triggers.max_interval_ms") to values; `flag_names`
    optionally maps the same keys to the flags they came from, for error messages.
    Raises ConfigError (a ValueError) naming the file, section or key that is wrong.
    """
    if kind not in _AGENTS:
        raise ConfigError(f"unknown agent kind {kind!r}: choose 'primary' or 'replica'")
    overrides = dict(overrides or {})
    flag_names = dict(flag_names or {})
    values: dict[str, dict[str, Any]] = {}
    origins: dict[str, str] = {}
    if path is not None:
        values = _check_file(_read_file(path), path)
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
        if key not in {f.name for f in dataclasses.fields(SECTIONS[section])}:  # type: ignore
            raise ConfigError(_unknown_key(section, key))
        values.setdefault(section, {})[key] = value
        origins[dotted] = f"from {flag_names[dotted]}" if dotted in flag_names else ""
    security = values.setdefault("security", {})
    if not security.get("key_name"):
        security["key_name"] = kind
    sections = {name: _build(SECTIONS[name], values.get(name, {}), origins) for name in SECTIONS
                if name in values or name in used}
    return _AGENTS[kind](**{name: sections[name] for name in used})  # type: ignore[arg-type]


def _suggest_key(key: str) -> str:
    """For a stray top-level key: the section.key it probably belongs to."""
    close = difflib.get_close_matches(key, [k.split(".")[1] for k in _all_keys()], n=1)
    if not close:
        return ""
    full = next(k for k in _all_keys() if k.split(".")[1] == close[0])
    return f" (did you mean {full!r}?)"


def _all_keys() -> list[str]:
    return [f"{name}.{f.name}" for name, cls in SECTIONS.items()
            for f in dataclasses.fields(cls)]  # type: ignore[arg-type]


def to_dict(config: AgentConfig) -> dict[str, dict[str, Any]]:
    """{section: {key: value}}: for the status file and for echoing the configuration."""
    return {f.name: dataclasses.asdict(getattr(config, f.name)) for f in dataclasses.fields(config)}


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


DEFAULT_TOML = """\
# colo-ring agent configuration. One file can serve both agents: each reads the
# sections it uses and checks the others. Flags given on the command line
# override these values. Unknown sections and keys are errors.

[primary]
# Where the replica listens (colo-primary --replica).
replica = "tcp://127.0.0.1:7800"
control = ""                # tcp://127.0.0.1:PORT: change [triggers] at run time; "": off

[guest]
vcpus = 2
memory_mib = 256            # guest data memory, a multiple of 2 MiB
ring_entries = 4096         # dirty ring entries per vCPU: a power of two, 256..65536
workload = "uniform"        # uniform, hotcold, sequential, oracle
seed = 1
working_set_pages = 0       # 0: the whole data memory
report_every = 10000        # progress event every N writes per vCPU; 0: none
backend = "kvm"             # "kvm", or "sim" (the simulated ring, no /dev/kvm needed)
service_port = 6380         # workload "kvstore" (the Redis-protocol service): its clients' port
service_host = "127.0.0.1"
table_entries = 65536       # kvstore: hash table buckets, a power of two
request_max = 65536         # kvstore: the largest request accepted, in bytes

[triggers]
# A checkpoint starts when any enabled trigger fires; 0 turns a number off.
ring_full = true            # a vCPU's dirty ring reached its soft-full mark
dirty_pages = 0             # pages dirtied VM-wide since the last checkpoint
max_interval_ms = 50.0      # the longest time between checkpoints
output = true               # the guest produced output that waits for a checkpoint
output_delay_ms = 1.0       # how long output may gather before that checkpoint
poll_us = 500               # how often the dirty_pages watcher polls the rings

[replication]
max_in_flight = 2           # unacknowledged epochs before the guest is held
batch_pages = 512           # pages per frame
zstd_level = 1
cache_pages = 65536         # the primary's cache of pages last sent (delta bases); 0: none
heartbeat_ms = 50
timeout_ms = 500            # silence after which the peer is declared gone (> heartbeat_ms)
precopy_max_rounds = 5      # live pre-copy rounds before the final synchronous copy
precopy_done_pages = 1024   # stop pre-copy when a round dirtied fewer pages than this
precopy_epoch_pages = 8192  # pages per pre-copy epoch
encode_threads = 2

[security]
# CURVE authentication and encryption. Make key pairs with colo-keys:
#   colo-keys KEYS --name primary ; colo-keys KEYS --name replica
insecure = false            # true: no authentication, no encryption (local experiments only)
keys_dir = ""               # this agent's key pair: KEYS/NAME.key and KEYS/NAME.key_secret
key_name = ""               # NAME; "": "primary" or "replica", by role
peer_public_key = ""        # primary: the replica's public key (KEYS/replica.key)
authorized_keys = ""        # replica: the primary public keys allowed (a file or a directory)

[status]
status_json = ""            # a file rewritten with the agent's status; "": none
log_interval_s = 5.0        # a status line every N seconds; 0: none

[replica]
# Where the replica listens (colo-replica --listen).
listen = "tcp://127.0.0.1:7800"
service_port = 0            # the guest service's TCP port after failover; 0: none
"""


# -- command line --------------------------------------------------------------

@dataclass(frozen=True)
class _Flag:
    flag: str
    key: str
    type: Any                          # int, float, str, or bool (a switch)
    help: str
    metavar: str | None = None


_COMMON_FLAGS = (
    _Flag("--insecure", "security.insecure", bool,
          "no authentication and no encryption: for local experiments only"),
    _Flag("--keys-dir", "security.keys_dir", str, "directory of this agent's key pair (colo-keys)",
          "DIR"),
    _Flag("--key-name", "security.key_name", str, "name of this agent's key pair (default: its role)",
          "NAME"),
    _Flag("--status-json", "status.status_json", str, "rewrite this file with the agent's status",
          "FILE"),
    _Flag("--heartbeat-ms", "replication.heartbeat_ms", int, "heartbeat interval", "MS"),
    _Flag("--timeout-ms", "replication.timeout_ms", int,
          "silence after which the peer is declared gone", "MS"),
)

_PRIMARY_FLAGS = (
    _Flag("--replica", "primary.replica", str, "the replica's endpoint (required unless the config "
          "file sets [primary] replica)", "tcp://HOST:PORT"),
    _Flag("--control", "primary.control", str,
          "listen for run-time changes of [triggers] here (JSON over ZeroMQ REQ/REP)", "tcp://HOST:PORT"),
    _Flag("--workload", "guest.workload", str, f"guest workload: {', '.join(WORKLOAD_IDS)}", "NAME"),
    _Flag("--vcpus", "guest.vcpus", int, "guest vCPUs", "N"),
    _Flag("--memory-mib", "guest.memory_mib", int, "guest data memory (a multiple of 2)", "MIB"),
    _Flag("--ring-entries", "guest.ring_entries", int, "dirty ring entries per vCPU", "N"),
    _Flag("--seed", "guest.seed", int, "workload seed", "N"),
    _Flag("--service-port", "guest.service_port", int,
          "workload kvstore: the TCP port its clients connect to", "PORT"),
    _Flag("--report-every", "guest.report_every", int,
          "a guest progress report every N writes per vCPU (0: none)", "N"),
    _Flag("--backend", "guest.backend", str, "kvm or sim", "NAME"),
    _Flag("--max-interval-ms", "triggers.max_interval_ms", float,
          "longest time between checkpoints (0: off)", "MS"),
    _Flag("--dirty-pages", "triggers.dirty_pages", int,
          "checkpoint after this many dirty pages VM-wide (0: off)", "N"),
    _Flag("--max-in-flight", "replication.max_in_flight", int,
          "unacknowledged epochs before the guest is held", "N"),
    _Flag("--peer-public-key", "security.peer_public_key", str, "the replica's public key file",
          "FILE"),
)

_REPLICA_FLAGS = (
    _Flag("--listen", "replica.listen", str, "where to listen for the primary", "tcp://HOST:PORT"),
    _Flag("--service-port", "replica.service_port", int,
          "after a failover, serve the kvstore guest's clients on this port (0: no service)", "PORT"),
    _Flag("--authorized-keys", "security.authorized_keys", str,
          "the primary public keys allowed: a key file or a directory of them", "PATH"),
)


def _dest(flag: _Flag) -> str:
    return "cfg_" + flag.key.replace(".", "__")


def _add(parser: argparse.ArgumentParser, flags: Sequence[_Flag]) -> None:
    for f in flags:
        if f.type is bool:
            parser.add_argument(f.flag, dest=_dest(f), action="store_const", const=True,
                                default=None, help=f.help)
        else:
            parser.add_argument(f.flag, dest=_dest(f), type=f.type, default=None, help=f.help,
                                metavar=f.metavar)


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """--config and the flags both agents take; every flag defaults to None (not given)."""
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="TOML configuration file (flags override it)")
    _add(parser, _COMMON_FLAGS)


def add_primary_flags(parser: argparse.ArgumentParser) -> None:
    _add(parser, _PRIMARY_FLAGS)


def add_replica_flags(parser: argparse.ArgumentParser) -> None:
    _add(parser, _REPLICA_FLAGS)


def flag_overrides(args: argparse.Namespace) -> tuple[dict[str, object], dict[str, str]]:
    """(overrides, flag_names): the dotted keys of the flags that were given, and their flags."""
    overrides: dict[str, object] = {}
    names: dict[str, str] = {}
    for f in _COMMON_FLAGS + _PRIMARY_FLAGS + _REPLICA_FLAGS:
        value = getattr(args, _dest(f), None)
        if value is not None:
            overrides[f.key] = value
            names[f.key] = f.flag
    return overrides, names


def primary_arg_parser(prog: str = "colo-primary") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Run a KVM guest and checkpoint it to a colo-ring replica.",
        epilog="Settings come from the defaults, then --config FILE, then the flags given.")
    add_primary_flags(parser)
    add_common_flags(parser)
    return parser


def replica_arg_parser(prog: str = "colo-replica") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Receive checkpoints from a colo-ring primary; take over if it dies.",
        epilog="Settings come from the defaults, then --config FILE, then the flags given.")
    add_replica_flags(parser)
    add_common_flags(parser)
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
