"""The pair's lease in a real etcd (started here, in a temporary folder, on free ports).

One node holds the key; another cannot take it while the lease lives, and takes it, with a
larger fencing token, once the holder's lease is revoked or has expired; the old holder's
renewal then fails. No etcd answering is a typed error naming the endpoints.
"""

from __future__ import annotations

import asyncio
import shutil
import time

import pytest

from checkpointer.cluster import LocalEtcd, free_port
from checkpointer.fencing import EtcdUnavailable, PairLease

ETCD = shutil.which("etcd")
pytestmark = pytest.mark.skipif(ETCD is None, reason="etcd is not installed (Debian: etcd-server; .ci/run installs it)")


@pytest.fixture
def etcd(tmp_path):
    with LocalEtcd(tmp_path / "etcd") as local:      # tuned raft timing: leases down to 1 s
        yield local.url


def test_one_holder_at_a_time_and_a_newer_token_after_a_revoke(etcd) -> None:
    async def scenario() -> None:
        a, b = PairLease(etcd, "/colo/pair", "a", 5), PairLease(etcd, "/colo/pair", "b", 5)
        try:
            held = await a.acquire()
            assert held is not None and held.token > 0 and a.valid()
            assert await b.acquire() is None and not b.valid()           # held: the transaction fails
            holder = await b.holder()
            assert (holder.node, holder.token, holder.lease_id) == ("a", held.token, held.lease_id)
            renewed = await a.renew()
            assert renewed is not None and renewed.valid_until >= held.valid_until
            await b.revoke(holder.lease_id)                              # the holder's death was proven
            taken = await b.acquire()
            assert taken is not None and taken.token > held.token       # the fencing token grows
            assert await a.renew() is None and not a.valid()            # a learns it lost the lease
            assert (await a.holder()).node == "b"
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_the_key_is_free_only_once_the_lease_expired(etcd) -> None:
    async def scenario() -> None:
        a, b = PairLease(etcd, "/colo/expiry", "a", 1), PairLease(etcd, "/colo/expiry", "b", 1)
        try:
            held = await a.acquire()
            assert held.valid_until <= time.monotonic() + 1            # never past the granted TTL
            assert await b.acquire() is None                            # silence alone is not enough
            deadline = time.monotonic() + 30
            while (taken := await b.acquire()) is None:                 # etcd expires a's lease itself
                assert time.monotonic() < deadline, "a's lease never expired"
                await asyncio.sleep(0.1)
            assert taken.token > held.token and await a.renew() is None
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_a_cluster_list_skips_a_dead_member_and_no_etcd_is_named(etcd) -> None:
    dead = f"http://127.0.0.1:{free_port()}"

    async def scenario() -> None:
        lease = PairLease(f"{dead},{etcd}", "/colo/list", "a", 5, timeout_s=0.5)
        try:
            assert await lease.acquire() is not None                    # the second endpoint answered
        finally:
            await lease.close()
        nobody = PairLease(dead, "/colo/list", "a", 5, timeout_s=0.5)
        try:
            with pytest.raises(EtcdUnavailable, match=f"no etcd endpoint answered .*{dead[7:]}"):
                await nobody.acquire()
        finally:
            await nobody.close()

    asyncio.run(scenario())


def test_a_takeover_needs_the_standby_key_to_name_the_replicas_session(etcd) -> None:
    """Fencing S2: the replica's transaction succeeds only if the primary still names its copy."""
    async def scenario() -> None:
        a, b = PairLease(etcd, "/colo/standby", "a", 5), PairLease(etcd, "/colo/standby", "b", 5)
        try:
            await a.acquire()
            assert await a.declare_standby(42)
            await b.revoke(a.holding.lease_id)                      # a is gone
            assert await b.acquire(standby=41) is None                # another session's copy: refused
            assert await b.holder() is None                           # (and nothing was written)
            taken = await b.acquire(standby=42)
            assert taken is not None and (await b.holder()).node == "b"
            assert not await a.declare_standby(None)                  # a no longer holds the key
            # b's acquisition said "no replica holds my writes": a later claim from 42 fails
            await a.revoke(b.holding.lease_id)
            assert await a.acquire(standby=42) is None
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_a_holder_retakes_the_key_only_if_nobody_took_it_since(etcd) -> None:
    """Fencing S5: a node whose lease ended takes the key again only if no other node held it
    meanwhile, even when that node's lease has ended too (an etcd that stalled past both TTLs)."""
    async def scenario() -> None:
        a, b = PairLease(etcd, "/colo/retake", "a", 5), PairLease(etcd, "/colo/retake", "b", 5)
        try:
            assert await b.acquire(retake=True) is None               # b never held it: no retake
            await a.acquire()
            assert await a.declare_standby(7)
            await a.revoke(a.holding.lease_id)                        # a's lease ends; nobody took K
            assert (retaken := await a.acquire(retake=True)) is not None
            assert await a.declare_standby(7)                         # (its replica synced again)
            await b.revoke(retaken.lease_id)                          # a is gone: b takes over
            assert await b.acquire(standby=7) is not None
            await b.revoke(b.holding.lease_id)                        # and b's lease ends too
            assert await b.holder() is None
            assert await a.acquire(retake=True) is None               # a's guest misses b's writes
            assert await a.holder() is None
            assert await b.acquire(retake=True) is not None           # b's guest is the newest
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_a_proven_death_revokes_the_holder_read_ahead_and_a_stale_one_is_read_again(etcd) -> None:
    """Fence.claim after learn_primary: the dead primary's lease is revoked without reading the
    key first (our own lease granted meanwhile), and the key is ours under a newer token. A holder
    read ahead that is stale (the primary took the key again since, under a new token) is not
    trusted: the claim reads the key and revokes the lease that really holds it."""
    from checkpointer.config import FencingSection
    from checkpointer.fencing import Fence

    def fence(node: str) -> Fence:
        return Fence(FencingSection(etcd=etcd, key="/colo/ahead", node=node, ttl_s=5, renew_ms=400), node)

    async def scenario() -> None:
        primary, replica = fence("primary"), fence("replica")
        try:
            held = await primary.lease.acquire(first=True)
            assert await primary.lease.declare_standby(7)
            await replica.learn_primary()
            assert replica.primary_holder.token == held.token
            reads = []
            read = replica.lease.holder

            async def counted():
                reads.append(1)
                return await read()

            replica.lease.holder = counted
            claim = await replica.claim(held.token, 7, proven_dead=True)
            assert not reads                                          # no read on the way
            assert claim.won and claim.token > held.token, claim
            assert (await replica.lease.holder()).node == "replica"

            # the replica's key goes; the primary takes it again under a new token and names
            # session 8: the holder the replica read ahead (the first token, its lease) is stale
            stale = replica.primary_holder
            await primary.lease.revoke(replica.lease.holding.lease_id)
            assert await primary.lease.acquire() is not None and primary.token > claim.token
            assert await primary.lease.declare_standby(8)
            assert replica.primary_holder is stale and stale.token != primary.token
            again = await replica.claim(primary.token, 8, proven_dead=True)
            assert again.won and again.token > primary.token, again
            assert reads                                              # the stale holder was read again
            assert await primary.lease.renew() is None               # its lease was the one revoked
        finally:
            await primary.close()
            await replica.close()

    asyncio.run(scenario())
