"""checkpointer.config: defaults, TOML files, flags over files, and errors that name the key."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from checkpointer.config import (DEFAULT_TOML, ConfigError, GuestSection, PrimaryAgentConfig,
                                 ReplicaAgentConfig, ReplicationSection, SecuritySection,
                                 ServiceSection, TriggerSection, dump_toml, flag_overrides,
                                 load_config, parse_primary_args, parse_replica_args,
                                 primary_arg_parser, replica_arg_parser, settings, to_dict,
                                 validate_endpoint)


def write(tmp_path, text: str, name: str = "colo.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def raises(fragment: str):
    return pytest.raises(ConfigError, match=re.escape(fragment))


# -- defaults and files ---------------------------------------------------------

def test_defaults_load_without_a_file():
    primary = load_config("primary", None, {})
    assert isinstance(primary, PrimaryAgentConfig)
    assert primary.guest == GuestSection()
    assert primary.triggers.max_interval_ms == 50.0
    assert primary.replication.max_in_flight == 2
    assert primary.security.key_name == "primary"
    assert primary.replica == ""
    replica = load_config("replica", None, {})
    assert isinstance(replica, ReplicaAgentConfig)
    assert replica.replica.listen == "tcp://127.0.0.1:7800"
    assert replica.security.key_name == "replica"
    assert not hasattr(replica, "guest")


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_a_full_file_loads(tmp_path):
    path = write(tmp_path, """
[primary]
replica = "tcp://10.0.0.2:7900"
[guest]
vcpus = 4
memory_mib = 1024
ring_entries = 8192
workload = "hotcold"
seed = 99
working_set_pages = 1000
report_every = 0
backend = "sim"
[triggers]
ring_full = false
dirty_pages = 2000
max_interval_ms = 20
output = false
output_delay_ms = 0.5
poll_us = 200
[replication]
max_in_flight = 4
batch_pages = 256
zstd_level = 3
cache_pages = 0
heartbeat_ms = 20
timeout_ms = 300
precopy_max_rounds = 2
precopy_done_pages = 64
precopy_epoch_pages = 1024
encode_threads = 4
[security]
keys_dir = "/etc/colo/keys"
peer_public_key = "/etc/colo/keys/replica.key"
[status]
status_json = "/run/colo/primary.json"
log_interval_s = 0
[service]
host = "0.0.0.0"
port = 6390
takeover_port = 6391
table_entries = 1024
request_max = 4096
[replica]
listen = "tcp://*:7900"
""")
    cfg = load_config("primary", path, {})
    assert cfg.replica == "tcp://10.0.0.2:7900"
    assert cfg.guest == GuestSection(4, 1024, 8192, "hotcold", 99, 1000, 0, "sim")
    assert cfg.triggers == TriggerSection(False, 2000, 20.0, False, 0.5, 200)
    assert isinstance(cfg.triggers.max_interval_ms, float)      # an integer is fine for a float
    assert cfg.replication.timeout_ms == 300 and cfg.replication.encode_threads == 4
    assert cfg.security.keys_dir == "/etc/colo/keys" and cfg.security.key_name == "primary"
    assert cfg.status.status_json == "/run/colo/primary.json" and cfg.status.log_interval_s == 0.0
    assert cfg.guest.machine_config().data_bytes == 1024 << 20
    assert cfg.guest.workload_config().working_set_pages == 1000
    # the same file serves the replica: it takes its own sections and shares [replication]
    assert cfg.service.port == 6390 and cfg.guest_params() == {}          # uniform takes none
    rep = load_config("replica", path, {})
    assert rep.replica.listen == "tcp://*:7900" and rep.service.takeover_port == 6391
    assert rep.service.host == cfg.service.host == "0.0.0.0"
    assert rep.replication == cfg.replication
    assert rep.security.key_name == "replica"


def test_flags_override_the_file(tmp_path):
    path = write(tmp_path, "[triggers]\nmax_interval_ms = 80\ndirty_pages = 10\n"
                           "[guest]\nvcpus = 3\n")
    cfg = load_config("primary", path, {"triggers.max_interval_ms": 20, "guest.workload": "sequential"})
    assert cfg.triggers.max_interval_ms == 20.0          # the override wins
    assert cfg.triggers.dirty_pages == 10                # the file's other values stay
    assert cfg.guest.vcpus == 3
    assert cfg.guest.workload == "sequential"


def test_explicit_key_name_is_kept():
    cfg = load_config("replica", None, {"security.key_name": "replica-b"})
    assert cfg.security.key_name == "replica-b"


# -- unknown names ----------------------------------------------------------------

def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    path = write(tmp_path, "[triggers]\nmax_intervall_ms = 20\n")
    with raises("unknown key 'triggers.max_intervall_ms' (did you mean 'max_interval_ms'?)") as info:
        load_config("primary", path, {})
    assert path in str(info.value)


def test_unknown_section_is_named_with_a_suggestion(tmp_path):
    path = write(tmp_path, "[trigger]\nmax_interval_ms = 20\n")
    with raises("unknown section [trigger] (did you mean 'triggers'?)") as info:
        load_config("replica", path, {})
    assert path in str(info.value)


def test_stray_top_level_key_is_named(tmp_path):
    path = write(tmp_path, "vcpus = 4\n")
    with raises("unknown key 'vcpus' at the top level") as info:
        load_config("primary", path, {})
    assert "guest.vcpus" in str(info.value)


def test_the_other_roles_sections_are_still_checked(tmp_path):
    path = write(tmp_path, "[guest]\nvcpu = 4\n")
    with raises("unknown key 'guest.vcpu' (did you mean 'vcpus'?)"):
        load_config("replica", path, {})
    path = write(tmp_path, "[guest]\nvcpus = 400\n")
    with raises("guest.vcpus"):
        load_config("replica", path, {})


def test_unknown_override_key_is_named():
    with raises("unknown key 'replication.max_inflight' (did you mean 'max_in_flight'?)"):
        load_config("primary", None, {"replication.max_inflight": 3})
    with raises("unknown setting 'vcpus'"):
        load_config("primary", None, {"vcpus": 3})
    with raises("the replica has no [guest] settings"):
        load_config("replica", None, {"guest.vcpus": 3})


def test_unknown_kind():
    with raises("unknown agent kind 'backup'"):
        load_config("backup", None, {})


# -- types and ranges -------------------------------------------------------------

@pytest.mark.parametrize("toml, fragment", [
    ("[guest]\nvcpus = true\n", "guest.vcpus (in {path}): must be an integer, got boolean True"),
    ("[guest]\nvcpus = 2.0\n", "guest.vcpus (in {path}): must be an integer, got float 2.0"),
    ("[triggers]\nmax_interval_ms = \"fast\"\n",
     "triggers.max_interval_ms (in {path}): must be a number, got string 'fast'"),
    ("[triggers]\nmax_interval_ms = true\n", "triggers.max_interval_ms (in {path}): must be a number"),
    ("[triggers]\nring_full = 1\n", "triggers.ring_full (in {path}): must be a boolean, got integer 1"),
    ("[security]\nkeys_dir = 7\n", "security.keys_dir (in {path}): must be a string, got integer 7"),
    ("[guest]\nworkload = [\"uniform\"]\n", "guest.workload (in {path}): must be a string, got array"),
])
def test_wrong_types_are_named(tmp_path, toml, fragment):
    path = write(tmp_path, toml)
    with raises(fragment.format(path=path)):
        load_config("primary", path, {})


def test_a_value_where_a_section_belongs(tmp_path):
    path = write(tmp_path, "guest = 3\n")
    with raises("'guest' must be a section [guest], got integer 3"):
        load_config("primary", path, {})


@pytest.mark.parametrize("key, value, fragment", [
    ("triggers.max_interval_ms", -3, "triggers.max_interval_ms: must be >= 0, got -3"),
    ("triggers.dirty_pages", -1, "triggers.dirty_pages: must be >= 0, got -1"),
    ("triggers.poll_us", 0, "triggers.poll_us: must be >= 1, got 0"),
    ("guest.vcpus", 0, "guest.vcpus: must be between 1 and 8, got 0"),
    ("guest.vcpus", 9, "guest.vcpus: must be between 1 and 8, got 9"),
    ("guest.memory_mib", 3, "guest.memory_mib: must be a multiple of 2 (MiB), got 3"),
    ("guest.ring_entries", 1000, "guest.ring_entries: dirty ring size 1000 entries is not a power of two"),
    ("guest.ring_entries", 128, "guest.ring_entries: dirty ring size 128 entries is out of range"),
    ("guest.workload", "random", "guest.workload: must be one of 'uniform', 'hotcold'"),
    ("guest.backend", "qemu", "guest.backend: must be one of 'kvm', 'sim', got 'qemu'"),
    ("guest.working_set_pages", 65537, "guest.working_set_pages: must be between 0 and 65536"),
    ("guest.seed", -1, "guest.seed: must be between 0 and"),
    ("replication.max_in_flight", 0, "replication.max_in_flight: must be between 1 and 1024, got 0"),
    ("replication.zstd_level", 23, "replication.zstd_level: must be between"),
    ("replication.timeout_ms", 50, "replication.timeout_ms: must be greater than replication.heartbeat_ms"),
    ("replication.encode_threads", 0, "replication.encode_threads: must be between 1 and 256, got 0"),
    ("status.log_interval_s", -0.5, "status.log_interval_s: must be >= 0, got -0.5"),
    ("security.key_name", "../x", "security.key_name: must be a plain name"),
])
def test_out_of_range_values_are_named(key, value, fragment):
    with raises(fragment):
        load_config("primary", None, {key: value})


def test_out_of_range_in_a_file_names_the_file(tmp_path):
    path = write(tmp_path, "[replication]\nheartbeat_ms = 0\n")
    with raises(f"replication.heartbeat_ms (in {path}): must be >= 1, got 0"):
        load_config("replica", path, {})


def test_every_trigger_off_is_refused():
    with raises("every trigger is off"):
        load_config("primary", None, {"triggers.ring_full": False, "triggers.output": False,
                                      "triggers.max_interval_ms": 0})


def test_sections_check_their_fields_when_built_directly():
    with raises("replication.batch_pages: must be an integer, got string '512'"):
        ReplicationSection(batch_pages="512")  # type: ignore[arg-type]
    with raises("security.insecure: must be a boolean, got string 'yes'"):
        SecuritySection(insecure="yes")  # type: ignore[arg-type]


def test_sections_are_frozen():
    cfg = load_config("primary", None, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.guest.vcpus = 3  # type: ignore[misc]


# -- files that are not there or not TOML -------------------------------------------

def test_malformed_toml_names_the_file_and_line(tmp_path):
    path = write(tmp_path, "[guest]\nvcpus = 2\nmemory_mib = = 4\n")
    with raises(f"config file {path} is not valid TOML") as info:
        load_config("primary", path, {})
    assert "line 3" in str(info.value)


def test_missing_file_is_named(tmp_path):
    path = str(tmp_path / "nope.toml")
    with raises(f"config file {path} does not exist"):
        load_config("replica", path, {})


def test_directory_instead_of_file(tmp_path):
    with raises(f"config file {tmp_path} is a directory"):
        load_config("replica", str(tmp_path), {})


# -- endpoints -------------------------------------------------------------------

@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:7800", "tcp://replica.example.org:1",
                                      "tcp://[::1]:65535", "tcp://localhost:7800"])
def test_good_endpoints(endpoint):
    assert validate_endpoint(endpoint) == endpoint
    assert load_config("primary", None, {"primary.replica": endpoint}).replica == endpoint


@pytest.mark.parametrize("endpoint, fragment", [
    ("127.0.0.1:7800", "must look like tcp://HOST:PORT"),
    ("udp://127.0.0.1:7800", "must look like tcp://HOST:PORT"),
    ("tcp://127.0.0.1", "(host and port), got 'tcp://127.0.0.1'"),
    ("tcp://127.0.0.1:0", "port must be a number from 1 to 65535, got '0'"),
    ("tcp://127.0.0.1:65536", "got '65536'"),
    ("tcp://127.0.0.1:http", "got 'http'"),
    ("tcp://:7800", "(host and port), got 'tcp://:7800'"),
    ("tcp://bad_host!:7800", "'bad_host!' is not a host name or address"),
    ("tcp://[zz::1]:7800", "[zz::1] is not an IPv6 address"),
    ("tcp://*:7800", "'*' (any interface) is only for listening"),
])
def test_bad_endpoints_are_named(endpoint, fragment):
    with raises(fragment) as info:
        load_config("primary", None, {"primary.replica": endpoint})
    assert str(info.value).startswith("primary.replica: ")


def test_listen_accepts_any_interface_but_checks_the_port():
    assert load_config("replica", None, {"replica.listen": "tcp://*:7801"}).replica.listen == "tcp://*:7801"
    with raises("replica.listen: port must be a number from 1 to 65535"):
        load_config("replica", None, {"replica.listen": "tcp://*:99999"})


# -- the example file and round trips ----------------------------------------------

def test_default_toml_is_valid_and_documents_the_defaults(tmp_path):
    data = tomllib.loads(DEFAULT_TOML)
    path = write(tmp_path, DEFAULT_TOML)
    primary = load_config("primary", path, {})
    replica = load_config("replica", path, {})
    assert primary.replica == "tcp://127.0.0.1:7800" == replica.replica.listen
    assert primary.fencing.etcd == "http://127.0.0.1:2379" == replica.fencing.etcd
    # apart from the example endpoints, the documented values are the defaults
    defaults_p, defaults_r = load_config("primary", None, {}), load_config("replica", None, {})
    assert dataclasses.replace(primary, primary=defaults_p.primary, fencing=defaults_p.fencing) == defaults_p
    assert dataclasses.replace(replica, fencing=defaults_r.fencing) == defaults_r
    # and it documents every key there is
    for section, table in to_dict(primary).items():
        assert set(data[section]) == set(table), section
    for section, table in to_dict(replica).items():
        assert set(data[section]) == set(table), section


@pytest.mark.parametrize("kind", ["primary", "replica"])
def test_dump_toml_round_trips(tmp_path, kind):
    overrides = {"replication.zstd_level": -5, "status.status_json": 'C:\\dir "quoted"',
                 "security.insecure": True, "status.log_interval_s": 0.25}
    if kind == "primary":
        overrides |= {"primary.replica": "tcp://[::1]:7800", "triggers.max_interval_ms": 12.5,
                      "guest.backend": "sim"}
    cfg = load_config(kind, None, overrides)
    again = load_config(kind, write(tmp_path, dump_toml(cfg)), {})
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)
    assert to_dict(cfg)["status"]["status_json"] == 'C:\\dir "quoted"'


# -- command lines --------------------------------------------------------------------

def test_parse_primary_args(tmp_path):
    path = write(tmp_path, "[triggers]\nmax_interval_ms = 80\n[guest]\nvcpus = 4\nworkload = \"uniform\"\n")
    cfg = parse_primary_args(["--replica", "tcp://10.1.2.3:7800", "--workload", "hotcold",
                              "--config", path, "--max-interval-ms", "20", "--dirty-pages", "500",
                              "--max-in-flight", "3", "--status-json", "/tmp/s.json", "--insecure",
                              "--seed", "7", "--backend", "sim", "--ring-entries", "1024",
                              "--memory-mib", "64", "--timeout-ms", "900", "--heartbeat-ms", "30"])
    assert cfg.replica == "tcp://10.1.2.3:7800"
    assert cfg.guest.workload == "hotcold" and cfg.guest.vcpus == 4   # flag over file; file kept
    assert cfg.guest.seed == 7 and cfg.guest.backend == "sim"
    assert cfg.guest.ring_entries == 1024 and cfg.guest.memory_mib == 64
    assert cfg.triggers.max_interval_ms == 20.0 and cfg.triggers.dirty_pages == 500
    assert cfg.replication.max_in_flight == 3
    assert (cfg.replication.timeout_ms, cfg.replication.heartbeat_ms) == (900, 30)
    assert cfg.status.status_json == "/tmp/s.json"
    assert cfg.security.insecure is True


def test_flags_not_given_do_not_override(tmp_path):
    path = write(tmp_path, "[primary]\nreplica = \"tcp://10.0.0.9:7800\"\n[security]\ninsecure = true\n"
                           "[triggers]\nmax_interval_ms = 80\n")
    cfg = parse_primary_args(["--config", path])
    assert cfg.replica == "tcp://10.0.0.9:7800"      # --replica may come from the file
    assert cfg.security.insecure is True
    assert cfg.triggers.max_interval_ms == 80.0


def test_primary_needs_a_replica(capsys):
    with pytest.raises(SystemExit) as info:
        parse_primary_args(["--workload", "uniform"])
    assert info.value.code == 2
    assert "--replica" in capsys.readouterr().err


def test_bad_flag_values_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as info:
        parse_primary_args(["--replica", "tcp://h:1", "--vcpus", "two"])
    assert info.value.code == 2
    assert "--vcpus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_replica_args(["--no-such-flag"])
    with pytest.raises(SystemExit):       # primary-only flags are not replica flags
        parse_replica_args(["--vcpus", "2"])


def test_bad_settings_from_flags_name_the_flag_and_key():
    with raises("guest.vcpus (from --vcpus): must be between 1 and 8, got 12"):
        parse_primary_args(["--replica", "tcp://h:1", "--vcpus", "12"])
    with raises("triggers.max_interval_ms (from --max-interval-ms): must be >= 0, got -3"):
        parse_primary_args(["--replica", "tcp://h:1", "--max-interval-ms", "-3"])
    with raises("primary.replica (from --replica): port must be a number from 1 to 65535"):
        parse_primary_args(["--replica", "tcp://h:0"])


def test_parse_replica_args(tmp_path):
    path = write(tmp_path, "[replica]\nlisten = \"tcp://127.0.0.1:7000\"\n[replication]\ntimeout_ms = 800\n")
    cfg = parse_replica_args(["--listen", "tcp://0.0.0.0:7801", "--config", path,
                              "--keys-dir", "/k", "--authorized-keys", "/k/primary.key",
                              "--heartbeat-ms", "40"])
    assert cfg.replica.listen == "tcp://0.0.0.0:7801"
    assert cfg.replication.timeout_ms == 800 and cfg.replication.heartbeat_ms == 40
    assert cfg.security.keys_dir == "/k" and cfg.security.authorized_keys == "/k/primary.key"
    assert cfg.security.key_name == "replica"
    assert parse_replica_args([]).replica.listen == "tcp://127.0.0.1:7800"
    with raises("replica.listen (from --listen): must look like tcp://HOST:PORT"):
        parse_replica_args(["--listen", "7800"])


def test_config_file_errors_surface_from_parse(tmp_path):
    with raises("does not exist"):
        parse_replica_args(["--config", str(tmp_path / "missing.toml")])


def test_help_lists_the_flags():
    text = primary_arg_parser().format_help()
    for flag in ("--replica", "--workload", "--config", "--max-interval-ms", "--dirty-pages",
                 "--max-in-flight", "--status-json", "--insecure", "--keys-dir", "--peer-public-key",
                 "--vcpus", "--memory-mib", "--ring-entries", "--seed", "--backend", "--timeout-ms",
                 "--heartbeat-ms"):
        assert flag in text, flag


# -- one declaration per setting --------------------------------------------------------

def _flag_value(s):
    """A command line giving setting `s` its default (or example) value, and that value."""
    value = s.shown
    if s.type is bool and s.option.startswith("--no-"):     # a negative flag only sets True
        return [s.option], True
    if s.type is bool:
        return [s.option if s.default else "--no-" + s.option[2:]], s.default
    return [s.option, str(value)], value


@pytest.mark.parametrize("kind", ["primary", "replica"])
def test_every_setting_an_agent_reads_has_a_flag_that_sets_its_key(kind):
    parser = primary_arg_parser() if kind == "primary" else replica_arg_parser()
    chosen = settings(kind)
    sections = {f.name for f in dataclasses.fields(load_config(kind, None, {}))} - {"origins"}
    assert {s.section for s in chosen} == sections
    for s in chosen:
        argv, value = _flag_value(s)
        overrides, names = flag_overrides(parser.parse_args(argv))
        assert overrides == {s.key: value} and names == {s.key: s.option}, s.key


def test_flags_follow_the_roles_that_read_them(capsys):
    primary, replica = primary_arg_parser().format_help(), replica_arg_parser().format_help()
    for flag in ("--replica", "--control", "--workload", "--dirty-pages", "--peer-public-key",
                 "--table-entries", "--ring-full"):
        assert flag in primary and flag not in replica, flag
    for flag in ("--listen", "--authorized-keys"):
        assert flag in replica and flag not in primary, flag
    for flag in ("--service-port", "--service-host", "--heartbeat-ms", "--status-json", "--insecure"):
        assert flag in primary and flag in replica, flag


def test_service_port_is_each_agents_own_port(tmp_path):
    cfg = parse_primary_args(["--replica", "tcp://h:1", "--service-port", "7001", "--service-host", "::1"])
    assert (cfg.service.port, cfg.service.host, cfg.service.takeover_port) == (7001, "::1", 0)
    rep = parse_replica_args(["--service-port", "7002"])
    assert (rep.service.takeover_port, rep.service.port) == (7002, 6380)
    with raises("service.takeover_port (from --service-port): must be between 0 and 65535, got 70000"):
        parse_replica_args(["--service-port", "70000"])
    with raises("service.host (from --service-host): must be a host name or an IP address"):
        parse_replica_args(["--service-host", "no host"])


def test_the_guest_is_checked_by_its_spec_with_the_keys_named(tmp_path):
    with raises("guest.workload (from --workload; guest.memory_mib from --memory-mib): the kvstore guest "
                "needs at least 64 MiB"):
        parse_primary_args(["--replica", "tcp://h:1", "--workload", "kvstore", "--memory-mib", "32"])
    path = write(tmp_path, '[guest]\nworkload = "kvstore"\nmemory_mib = 64\n[service]\ntable_entries = 1000\n')
    with raises(f"guest.workload (in {path}; guest.memory_mib in {path}; service.table_entries in {path}): "
                f"kvstore: table_entries must be a power of two"):
        load_config("primary", path, {})
    with raises("guest.workload (in"):               # the replica checks the primary's guest too
        load_config("replica", path, {})
    with raises("the kvstore guest runs on the kvm backend only"):
        load_config("primary", None, {"guest.workload": "kvstore", "guest.backend": "sim"})


def test_guest_params_come_from_the_service_section_with_the_specs_defaults():
    from ring.guest.spec import find_guest
    spec = find_guest("kvstore")
    assert {p.name: p.default for p in spec.params} == {
        "table_entries": ServiceSection().table_entries, "request_max": ServiceSection().request_max}
    cfg = load_config("primary", None, {"guest.workload": "kvstore", "guest.memory_mib": 64,
                                        "service.request_max": 4096})
    assert cfg.guest_spec() is spec or cfg.guest_spec() == spec
    assert cfg.guest_params() == {"table_entries": 65536, "request_max": 4096}
    assert cfg.guest.workload_config().name == "uniform"     # the service runs its own program


def test_workload_choices_are_the_registered_guests():
    from ring.guest.spec import guest_names
    names = guest_names()
    assert "kvstore" in names and "uniform" in names
    help_text = " ".join(primary_arg_parser().format_help().split())
    assert f"what the guest runs ({', '.join(names)};" in help_text
    assert 'workload = "uniform"' in DEFAULT_TOML and ", ".join(names) in DEFAULT_TOML


def test_settings_that_moved_are_pointed_to(tmp_path):
    path = write(tmp_path, "[guest]\nservice_port = 6380\n")
    with raises("unknown key 'guest.service_port' (it moved to 'service.port')"):
        load_config("primary", path, {})
    path = write(tmp_path, "[replica]\nservice_port = 6381\n")
    with raises("unknown key 'replica.service_port' (it moved to 'service.takeover_port')"):
        load_config("replica", path, {})


def test_default_toml_is_generated_from_the_declarations():
    lines = DEFAULT_TOML.splitlines()
    for s in settings():
        line = next(x for x in lines if x.startswith(f"{s.name} = ") and s.help in x)
        if s.constraint():
            assert f"({s.constraint()})" in line, line
    assert any(x.startswith("vcpus = 2 ") and "(1..8)" in x for x in lines)
    assert any(x.startswith("port = 6380 ") and "primary: " in x for x in lines)


def test_origins_say_where_each_setting_came_from(tmp_path):
    path = write(tmp_path, "[replication]\nheartbeat_ms = 20\n")
    cfg = parse_replica_args(["--config", path, "--listen", "tcp://127.0.0.1:7801"])
    assert cfg.origin("replica.listen") == "from --listen"
    assert cfg.origin("replication.heartbeat_ms") == f"in {path}"
    assert cfg.origin("replication.timeout_ms") == ""
    assert str(cfg.error("replication.timeout_ms", "x")) == "replication.timeout_ms (the default): x"
    assert cfg == parse_replica_args(["--listen", "tcp://127.0.0.1:7801", "--heartbeat-ms", "20"])


def test_listen_addresses_name_their_settings():
    cfg = load_config("primary", None, {"primary.control": "tcp://127.0.0.1:7900",
                                        "guest.workload": "kvstore", "guest.memory_mib": 64})
    assert cfg.listen_addresses() == [("primary.control", "tcp://127.0.0.1:7900"),
                                      ("service.port", "tcp://127.0.0.1:6380")]
    assert load_config("primary", None, {}).listen_addresses() == []
    assert load_config("replica", None, {}).listen_addresses() == [("replica.listen", "tcp://127.0.0.1:7800")]


def test_config_does_not_import_the_layers_above():
    code = ("import sys, checkpointer.config; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('scenarios', 'replica') "
            "or m in ('checkpointer.agent',)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    assert out.strip() == "[]"
