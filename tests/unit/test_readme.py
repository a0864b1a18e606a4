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


def _toml_block() -> str:
    return re.search(r"```toml\n(.*?)```", README.read_text(), re.S).group(1)


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
