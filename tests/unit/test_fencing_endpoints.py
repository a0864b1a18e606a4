"""etcd endpoint lists for fencing: one endpoint or a cluster, bad ones named."""

from __future__ import annotations

import pytest

from checkpointer.fencing import parse_endpoints


@pytest.mark.parametrize("text, words", [("", "no etcd endpoint"), ("ftp://h:1", "expected http://HOST:PORT"),
                                         ("http://host", "expected http://HOST:PORT")])
def test_bad_endpoint_lists_are_named(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_endpoints(text)
    assert parse_endpoints("127.0.0.1:2379, http://e2:2380") == [("127.0.0.1", 2379), ("e2", 2380)]
