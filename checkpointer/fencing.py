"""The pair's lease in etcd: who may release output, and the fencing token that says since when.

Groundwork for fencing (issue 9): this module talks to etcd; the agents do not use it yet.

Some facts about etcd leases that the rules rest on:

- A lease has a TTL granted by the etcd leader and expires on the leader's clock; a key put
  with the lease disappears when the lease expires or is revoked. Keep-alive renews it.
- A transaction is atomic: `create_revision(key) == 0` (the key does not exist) guarded put
  succeeds for exactly one of two racing nodes, and the key's create revision is unique and
  grows with every new holder. That revision is the fencing token: a node that sees a token
  newer than its own knows another node has been active since.
- Our own clock may run slower than the leader's. A node therefore counts its lease valid only
  until the time it *sent* its last successful renewal, plus the granted TTL shortened by the
  clock-rate drift bound, less a fixed margin: `sent + ttl * (1 - DRIFT) - MARGIN_S`. Taking the
  send time (not the answer's) covers any delay on the way; the rate bound covers clocks that
  drift apart while the lease runs (quartz is within 100 ppm; DRIFT is 1%, a hundred times
  that); MARGIN_S covers the scheduling delay between checking validity and releasing output.
  So whenever this node believes it holds the lease, the leader has not yet expired it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

import aetcd

DRIFT = 0.01            # clock-rate drift bound against the etcd leader (see above)
MARGIN_S = 0.05         # release-time margin (see above)

__all__ = ["PairLease", "Holding", "Holder", "FencingError", "EtcdUnavailable", "parse_endpoints",
           "DRIFT", "MARGIN_S"]


class FencingError(Exception):
    """A fencing operation could not be carried out; the message names the endpoints."""


class EtcdUnavailable(FencingError):
    """No etcd endpoint answered."""


@dataclass(frozen=True)
class Holding:
    """This node holds the pair's key: its token, its lease, and until when it may act on it."""

    token: int
    lease_id: int
    valid_until: float          # on this node's monotonic clock

    def valid(self, now: float) -> bool:
        return now < self.valid_until


@dataclass(frozen=True)
class Holder:
    """Who holds the pair's key now, as etcd says."""

    node: str
    token: int
    lease_id: int


def parse_endpoints(text: str) -> list[tuple[str, int]]:
    """`URL[,URL...]` (http://HOST:PORT, or HOST:PORT) as (host, port) pairs; ValueError naming a bad one."""
    endpoints = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        url = urlsplit(item if "://" in item else f"http://{item}")
        if url.scheme not in ("http", "https") or not url.hostname or url.port is None:
            raise ValueError(f"etcd endpoint {item!r}: expected http://HOST:PORT")
        endpoints.append((url.hostname, url.port))
    if not endpoints:
        raise ValueError("no etcd endpoint given")
    return endpoints


class PairLease:
    """One node's view of the pair's key `key` under a lease of `ttl_s` seconds."""

    def __init__(self, endpoints: str, key: str, node: str, ttl_s: float, *, timeout_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.endpoints = parse_endpoints(endpoints)
        self.key = key.encode()
        self.node = node
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.clock = clock
        self.holding: Holding | None = None
        self._client: aetcd.Client | None = None

    # -- etcd ------------------------------------------------------------------------------
    async def _call(self, operation):
        """Run `operation(client)`, trying each endpoint in turn (a cluster answers on any member)."""
        problems = []
        for _ in range(len(self.endpoints) + 1):
            if self._client is None:
                host, port = self.endpoints[0]
                self._client = aetcd.Client(host=host, port=port, timeout=self.timeout_s,
                                            connect_wait_timeout=self.timeout_s)
            try:
                return await operation(self._client)
            except (aetcd.exceptions.ConnectionFailedError, aetcd.exceptions.ConnectionTimeoutError) as exc:
                problems.append(f"{self.endpoints[0][0]}:{self.endpoints[0][1]}: {type(exc).__name__}")
                await self._drop_client()
                self.endpoints.append(self.endpoints.pop(0))          # the next one, round robin
        raise EtcdUnavailable(f"no etcd endpoint answered ({'; '.join(problems)})")

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.close()
            except Exception:                        # a dead channel may fail to close: it is gone anyway
                pass

    async def close(self) -> None:
        await self._drop_client()

    # -- the lease ---------------------------------------------------------------------------
    def _valid_until(self, sent: float, ttl: float) -> float:
        return sent + ttl * (1 - DRIFT) - MARGIN_S

    async def acquire(self) -> Holding | None:
        """Take the key if nobody holds it (the transaction fails otherwise); None if held."""
        sent = self.clock()

        async def take(client):
            lease = await client.lease(max(1, round(self.ttl_s)))
            t = client.transactions
            ok, responses = await client.transaction(
                compare=[t.create(self.key) == 0],
                success=[t.put(self.key, self.node.encode(), lease=lease)], failure=[])
            if not ok:
                await client.revoke_lease(lease.id)
                return None
            return Holding(responses[0].response_put.header.revision, lease.id,
                           self._valid_until(sent, max(1, round(self.ttl_s))))

        self.holding = await self._call(take)
        return self.holding

    async def renew(self) -> Holding | None:
        """Renew our lease; None (and holding cleared) if it is gone: someone else may act now."""
        if self.holding is None:
            return None
        sent = self.clock()
        holding = self.holding

        async def refresh(client):
            answer = await client.refresh_lease(holding.lease_id)
            return answer.TTL

        ttl = await self._call(refresh)
        if ttl <= 0:
            self.holding = None
            return None
        self.holding = Holding(holding.token, holding.lease_id, self._valid_until(sent, ttl))
        return self.holding

    async def holder(self) -> Holder | None:
        """Who holds the key now (None: nobody)."""
        async def read(client):
            return await client.get(self.key)

        got = await self._call(read)
        if got is None:
            return None
        return Holder(got.value.decode(errors="replace"), got.create_revision, got.lease)

    async def revoke(self, lease_id: int) -> None:
        """End a lease now: its key goes at once (a dead holder's, once its death is proven)."""
        async def end(client):
            await client.revoke_lease(lease_id)

        await self._call(end)
        if self.holding is not None and self.holding.lease_id == lease_id:
            self.holding = None

    def valid(self) -> bool:
        """Whether this node may act as the active node at this moment (see the module's facts)."""
        return self.holding is not None and self.holding.valid(self.clock())
