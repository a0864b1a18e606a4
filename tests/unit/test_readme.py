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


def test_readme_configuration_block_is_valid_for_both_agents(tmp_path) -> None:
    from checkpointer.config import load_config
    block = re.search(r"```toml\n(.*?)```", README.read_text(), re.S).group(1)
    path = tmp_path / "colo.toml"
    path.write_text(block)
    primary = load_config("primary", str(path))
    assert primary.replica == "tcp://127.0.0.1:7800" and primary.replication.max_in_flight == 2
    assert load_config("replica", str(path)).replica.listen == "tcp://127.0.0.1:7800"
