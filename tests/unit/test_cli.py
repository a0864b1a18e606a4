"""The agents' command lines: bad input gets a clear error and exit status 2, nothing runs."""

from __future__ import annotations

import pytest

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
