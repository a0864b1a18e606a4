"""The agents' command lines: bad input gets a clear error and exit status 2, nothing runs."""

from __future__ import annotations

import socket

import pytest
import zmq

from checkpointer import cli as primary_cli
from replica import cli as replica_cli


@pytest.mark.parametrize("argv, words", [
    (["--replica", "tcp://127.0.0.1:99999", "--workload", "uniform", "--insecure"], "port must be"),
    (["--replica", "tcp://127.0.0.1:7800", "--workload", "random", "--insecure"], "guest.workload"),
    (["--replica", "tcp://127.0.0.1:7800", "--workload", "uniform", "--max-interval-ms", "-3",
      "--insecure"], "triggers.max_interval_ms (from --max-interval-ms): must be >= 0"),
    (["--replica", "tcp://127.0.0.1:7800", "--workload", "uniform"], "colo-keys"),
    (["--replica", "tcp://127.0.0.1:7800", "--workload", "kvstore", "--memory-mib", "32", "--insecure"],
     "needs at least 64 MiB"),
])
def test_primary_refuses_bad_settings(argv, words, capsys) -> None:
    assert primary_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("colo-primary: ") and words in err


def test_replica_refuses_a_missing_config_file(tmp_path, capsys) -> None:
    assert replica_cli.main(["--config", str(tmp_path / "nope.toml"), "--insecure"]) == 2
    err = capsys.readouterr().err
    assert "colo-replica: " in err and "nope.toml" in err


def test_wrong_flag_is_an_argparse_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        primary_cli.main(["--replica", "tcp://127.0.0.1:7800", "--no-such-flag"])
    assert exit_info.value.code == 2 and "--no-such-flag" in capsys.readouterr().err


# -- addresses already in use ------------------------------------------------------------

@pytest.fixture
def held_port():
    """A TCP port on 127.0.0.1 that another socket is listening on."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    yield holder.getsockname()[1]
    holder.close()


def _agent_must_not_be_built(config):
    raise AssertionError("the agent was built although its address is taken")


def test_replica_refuses_a_listen_address_in_use(held_port, monkeypatch, capsys) -> None:
    monkeypatch.setattr(replica_cli, "build", _agent_must_not_be_built)
    endpoint = f"tcp://127.0.0.1:{held_port}"
    assert replica_cli.main(["--listen", endpoint, "--insecure"]) == 2
    err = capsys.readouterr().err
    assert err == (f"colo-replica: replica.listen (from --listen): {endpoint} is already in use "
                   f"(Address already in use)\n")


def test_primary_refuses_a_control_address_in_use(held_port, monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.setattr(primary_cli, "build", _agent_must_not_be_built)
    endpoint = f"tcp://127.0.0.1:{held_port}"
    assert primary_cli.main(["--replica", "tcp://127.0.0.1:7800", "--control", endpoint, "--insecure"]) == 2
    assert capsys.readouterr().err == (f"colo-primary: primary.control (from --control): {endpoint} is "
                                       f"already in use (Address already in use)\n")
    config = tmp_path / "colo.toml"                 # from a file, the file is named
    config.write_text(f'[primary]\nreplica = "tcp://127.0.0.1:7800"\ncontrol = "{endpoint}"\n'
                      f'[security]\ninsecure = true\n')
    assert primary_cli.main(["--config", str(config)]) == 2
    assert f"primary.control (in {config}): {endpoint} is already in use" in capsys.readouterr().err


def test_primary_refuses_a_service_port_in_use(held_port, monkeypatch, capsys) -> None:
    monkeypatch.setattr(primary_cli, "build", _agent_must_not_be_built)
    assert primary_cli.main(["--replica", "tcp://127.0.0.1:7800", "--workload", "kvstore", "--memory-mib",
                             "64", "--service-port", str(held_port), "--insecure"]) == 2
    assert (f"colo-primary: service.port (from --service-port): tcp://127.0.0.1:{held_port} is already "
            f"in use") in capsys.readouterr().err


def test_free_and_any_port_addresses_pass(monkeypatch) -> None:
    built = []
    monkeypatch.setattr(primary_cli, "build", lambda config: built.append(config) or _Stopped())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]                  # free again once closed
    for control in (f"tcp://127.0.0.1:{free}", "tcp://127.0.0.1:0", "tcp://*:0"):
        assert primary_cli.main(["--replica", "tcp://127.0.0.1:7800", "--control", control,
                                 "--insecure"]) == 0
    assert len(built) == 3


class _Stopped:
    """An agent that stops at once (what run_agent_cli runs after the checks)."""

    last_error = None

    def stop(self) -> None:
        pass

    async def run(self) -> None:
        pass


class _BindingAgent:
    """The replica agent's part that matters here: bind() binds replica.listen with ZeroMQ."""

    def __init__(self, config) -> None:
        self.context = zmq.Context()
        self.config = config
        self.authenticator = None

    def bind(self) -> str:
        sock = self.context.socket(zmq.ROUTER)
        sock.linger = 0
        sock.bind(self.config.replica.listen)
        return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def test_a_bind_that_fails_in_the_agent_names_the_setting(held_port) -> None:
    from checkpointer.config import ConfigError, parse_replica_args
    config = parse_replica_args(["--listen", f"tcp://127.0.0.1:{held_port}", "--insecure"])
    with pytest.raises(ConfigError) as info:      # the address was taken after the check
        replica_cli.build(config, agent_class=_BindingAgent)
    assert str(info.value) == (f"replica.listen (from --listen): tcp://127.0.0.1:{held_port} is already "
                               f"in use (Address already in use)")
    default = parse_replica_args(["--insecure"])
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            holder.bind(("127.0.0.1", 7800))
        except OSError:
            pytest.skip("port 7800 is taken on this machine")
        holder.listen()
        with pytest.raises(ConfigError, match=r"^replica\.listen \(the default\): tcp://127\.0\.0\.1:7800 "
                                              r"is already in use"):
            replica_cli.build(default, agent_class=_BindingAgent)
