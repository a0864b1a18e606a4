"""colo-node's pair file: both nodes' roles from one [nodes] table, and every mistake named."""

from __future__ import annotations

import pytest

from checkpointer.config import ConfigError
from pair.node import load_node_config, main

GOOD = """
[guest]
workload = "kvstore"
[fencing]
etcd = "http://127.0.0.1:2379"
[nodes.a]
replication = "tcp://127.0.0.1:7801"
service = "127.0.0.1:6381"
[nodes.b]
replication = "tcp://127.0.0.1:7802"
service = "127.0.0.1:6382"
listen = "tcp://127.0.0.1:7902"
"""


def write(tmp_path, text: str) -> str:
    path = tmp_path / "pair.toml"
    path.write_text(text)
    return str(path)


def test_each_node_gets_its_peers_endpoint_and_its_own_service(tmp_path) -> None:
    path = write(tmp_path, GOOD)
    a, b = load_node_config(path, "a"), load_node_config(path, "b")
    assert (a.primary.replica, a.replica.replica.listen) == ("tcp://127.0.0.1:7802", "tcp://127.0.0.1:7801")
    assert (b.primary.replica, b.replica.replica.listen) == ("tcp://127.0.0.1:7801", "tcp://127.0.0.1:7902")
    assert (a.primary.service.port, a.replica.service.takeover_port) == (6381, 6381)
    assert a.peer.name == "b" and b.me.listen == "tcp://127.0.0.1:7902"
    assert load_node_config(path, "a", {"fencing.ttl_s": 3}, {"fencing.ttl_s": "--lease-ttl-s"}).primary.fencing.ttl_s == 3


@pytest.mark.parametrize("change, words", [
    (lambda t: t.split("[nodes.a]")[0], "no [nodes] table"),
    (lambda t: t + '[nodes.c]\nreplication = "tcp://h:1"\nservice = "h:2"\n', "exactly two nodes, got 3"),
    (lambda t: t.replace('service = "127.0.0.1:6381"', 'service = "127.0.0.1"'), "nodes.a.service: expected"),
    (lambda t: t.replace('service = "127.0.0.1:6381"', 'service = "127.0.0.1:6381"\nport = 1'),
     "unknown key nodes.a.port"),
    (lambda t: t.replace('replication = "tcp://127.0.0.1:7801"\n', ""), "nodes.a.replication is missing"),
    (lambda t: t.replace('"tcp://127.0.0.1:7801"', '"udp://x"'), "nodes.a.replication"),
    (lambda t: t.replace('workload = "kvstore"', 'workload = "uniform"'), "serves a service guest"),
    (lambda t: t.replace("[fencing]", "[fencin]"), "unknown section [fencin]"),
])
def test_a_bad_pair_file_is_named(tmp_path, change, words) -> None:
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        load_node_config(write(tmp_path, change(GOOD)), "a")


def test_an_unknown_name_and_a_missing_file_exit_2_with_one_line(tmp_path, capsys) -> None:
    path = write(tmp_path, GOOD)
    assert main(["--config", path, "--name", "z"]) == 2
    assert "--name 'z': the nodes in" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "none.toml"), "--name", "a"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_pair_file_written_is_the_pair_file_read(tmp_path) -> None:
    from pair.node import PairNode, pair_file
    nodes = [PairNode("a", "tcp://127.0.0.1:7801", "127.0.0.1", 6381, ("127.0.0.1", 26381), "tcp://127.0.0.1:7901"),
             PairNode("b", "tcp://127.0.0.1:7802", "127.0.0.1", 6382)]
    text = pair_file({"guest": {"workload": "kvstore", "vcpus": 1}, "fencing": {"etcd": "http://h:2379"}}, nodes)
    config = load_node_config(write(tmp_path, text), "a")
    assert list(config.nodes.values()) == nodes and config.primary.guest.vcpus == 1
