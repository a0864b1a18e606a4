"""The README's first two commands are the documented ones."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_ci_runs_the_readme_test_command() -> None:
    commands = re.search(r"```sh\n(.*?)```", README.read_text(), re.S).group(1).splitlines()
    test_command = [c for c in commands if c and not c.startswith("#")][1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()


def _toml_block(first_line: str = "# colo-ring agent configuration") -> str:
    """The README's TOML block that starts with `first_line`."""
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(), re.S)
    return next(block for block in blocks if block.startswith(first_line))


def test_readme_configuration_block_is_valid_for_both_agents(tmp_path) -> None:
    from checkpointer.config import load_config
    path = tmp_path / "colo.toml"
    path.write_text(_toml_block())
    primary = load_config("primary", str(path))
    assert primary.replica == "tcp://127.0.0.1:7800" and primary.replication.max_in_flight == 2
    replica = load_config("replica", str(path))
    assert replica.replica.listen == "tcp://127.0.0.1:7800"
    assert (primary.service.port, replica.service.takeover_port) == (6380, 0)


def test_readme_configuration_block_is_the_generated_one() -> None:
    """The README shows DEFAULT_TOML as generated (regenerate it with python -m checkpointer.config)."""
    from checkpointer.config import DEFAULT_TOML
    assert _toml_block() == DEFAULT_TOML


def test_readme_pair_file_gives_each_node_its_roles(tmp_path) -> None:
    from pair.node import load_node_config
    path = tmp_path / "pair.toml"
    path.write_text(_toml_block("# pair.toml"))
    a, b = load_node_config(str(path), "a"), load_node_config(str(path), "b")
    assert a.primary.replica == "tcp://10.0.0.2:7800" and a.replica.replica.listen == "tcp://10.0.0.1:7800"
    assert b.primary.replica == "tcp://10.0.0.1:7800" and b.primary.service.port == 6379
    assert a.primary.fencing.etcd == "http://10.0.0.3:2379" and a.primary.fencing.node == "a"
    assert a.primary.security.peer_public_key == "/etc/colo/keys/b.key"
    assert a.replica.security.authorized_keys == "/etc/colo/keys/b.key"
    assert a.me.sentinel == ("10.0.0.1", 26379)
