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


def test_an_etcd_call_that_never_returns_counts_as_unanswered() -> None:
    """The renew loop must reach its LOST check: a call stuck past its timeouts is cut off."""
    import asyncio
    import time

    from checkpointer.fencing import EtcdUnavailable, PairLease

    async def scenario() -> float:
        lease = PairLease("http://127.0.0.1:9", "/colo/stuck", "a", 2, timeout_s=0.1)
        started = time.monotonic()
        try:
            with pytest.raises(EtcdUnavailable, match="TimeoutError"):
                await lease._call(lambda client: asyncio.sleep(3600))
        finally:
            await lease.close()
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 5       # (bounded: 2 tries of 2 x 0.1 s + slack, not an hour)
