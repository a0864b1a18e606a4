"""The pair's lease in etcd: which node may serve clients, and the fencing token that says since when.

This module makes the decisions that keep a pair to one active node; here is why they are safe.

Keys, under the pair's key K (``[fencing] key``):

- ``K``: the active node's name, put under its lease (a TTL, renewed by the holder). Its create
  revision is the **fencing token**: unique, and larger for every new holder.
- ``K/standby``: the replica session whose standby holds every write the active node ever
  acknowledged ("none" when no replica does). Not leased: it outlives a dead holder. Every
  acquisition of K writes it in the same transaction, so its mod revision also says whether anyone
  took K since a node's own last write of it (S5).

Facts about etcd the rules rest on: a key put with a lease disappears when the lease expires or is
revoked; a transaction is atomic, so ``create_revision(K) == 0`` (K absent) lets exactly one of two
racing nodes create K; a leader election never shortens a lease (the new leader grants every lease
a full TTL again).

**S1. At most one node releases output at any moment.** A node releases output only while
``valid()``: until ``sent + ttl * (1 - DRIFT) - MARGIN_S`` on its own monotonic clock, where `sent`
is when it sent its last successful grant or renewal. The leader starts the TTL no earlier than it
received that request, so the lease lives at least `ttl` leader-seconds after `sent`; our clock may
run slower than the leader's by at most DRIFT (1%: a hundred times what quartz drifts), so our
deadline comes first; MARGIN_S covers the time between the check and the bytes leaving (one
synchronous call: no await between them). Another node becomes active only by creating K, which is
possible only once K is gone, after that lease ended. The one exception is a revocation (S3).

**S2. No acknowledged write is lost by a takeover.** A primary releases an output only when (a)
its epoch was committed by the replica session named in ``K/standby``, or (b) ``K/standby`` is
"none", written by the holder (guarded by its token, so only while it still holds K) *before* any
unacknowledged output leaves. A replica takes over only through one transaction that requires K
absent **and** ``K/standby`` naming its own session, and that writes K (its token) and "none"
(nobody holds a copy of the new active node yet). So if the primary ever let an unacknowledged
write out (it lost its replica and ran unprotected, still holding the lease), the replica's
transaction fails, and a replica whose standby misses those writes never serves. Silence alone
never makes a replica active: it waits for the lease to end (a freeze, a partition), or proves
the primary dead (S3).

**S3. Revocation on proof of death (fast takeover after a crash).** The primary sends BYE before
every close of the replication connection it makes itself, and its ZeroMQ heartbeat timeout is
longer than its own silence timeout, so that ZeroMQ never closes first. So when the connection is
closed by the primary's side without a BYE, while the primary had spoken to us within half the
timeout and our own process was not stalled (a stall could have hidden the BYE's arrival order),
its kernel closed it: the primary process is gone, and its lease may be revoked at once
(``revoke_on_close``). The assumption is that nothing between the hosts forges a FIN or RST (a
firewall with *reject* rules would): where that may happen, set ``revoke_on_close = false`` and a
crash costs the TTL, like a freeze. Should the assumption fail, S2 still holds (the transaction and
the standby key), and the old primary learns at its next renewal that its lease is gone; until
then it may release only outputs of epochs the new active node has committed, never one it lacks.

**S4. The token.** HELLO and EPOCH_BEGIN carry the primary's token; the replica refuses a token
older than one it has seen, and a node that sees a token newer than its own (a refusal saying so,
or K held by the other node with a larger revision) knows it was superseded and stops.

**S5. etcd down.** The holder cannot renew; when its validity ends it fences itself: output held,
guest paused. Nobody else can become active either (creating K needs etcd). The service stops and
nothing is lost: the price of never running two active nodes. When etcd answers again within the
lease (extended by the election), the holder renews and goes on; if its lease ended, it takes K
again only if nobody else took it meanwhile: the retake's transaction needs K absent **and** the mod
revision of ``K/standby`` still that of this node's own last write of it (any other acquisition
rewrites it). Then its guest is the newest state: nobody served since. Otherwise another node was
active after it (took K and lost it again, say to an etcd that stalled past its TTL), and this
node's guest misses that node's writes: it steps down, even with K absent.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable

import aetcd

from .config import FencingSection, parse_endpoints

DRIFT = 0.01            # clock-rate drift bound against the etcd leader (see S1)
MARGIN_S = 0.05         # release-time margin (see S1)
NO_STANDBY = b"none"
CLAIM_POLL_S = 0.05     # how often a claiming replica looks at the key while it waits for it to go
CALL_SLACK_S = 0.25     # beyond the client's own timeouts (two RPCs at most), before an etcd call
                        # counts as unanswered
EXPIRY_SLACK_S = 1.0    # etcd revokes expired leases on a 500 ms tick, through a raft round: a dead
                        # holder's key may outlive its TTL by that much before it is "alive"

__all__ = ["PairLease", "Holding", "Holder", "FencingError", "EtcdUnavailable", "parse_endpoints",
           "Fence", "FenceMode", "LeaseChange", "Claim", "KeyHeld", "node_name", "DRIFT", "MARGIN_S"]

log = logging.getLogger("colo.fencing")


def node_name(section: FencingSection, role: str) -> str:
    """This node's name in etcd: `[fencing] node`, else ROLE@HOSTNAME (unique on one host too)."""
    return section.node or f"{role}@{socket.gethostname()}"


class FencingError(Exception):
    """A fencing operation could not be carried out; the message names the endpoints."""


class EtcdUnavailable(FencingError):
    """No etcd endpoint answered."""


class KeyHeld(FencingError):
    """Another node holds the pair's key: it is the active node."""

    def __init__(self, holder: "Holder", key: str) -> None:
        self.holder = holder
        super().__init__(f"the pair's key {key} is held by node {holder.node!r} (token {holder.token}): "
                         f"that node is active")


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


class PairLease:
    """One node's view of the pair's key `key` under a lease of `ttl_s` seconds."""

    def __init__(self, endpoints: str, key: str, node: str, ttl_s: float, *, timeout_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.endpoints = parse_endpoints(endpoints)
        self.key = key.encode()
        self.standby_key = self.key + b"/standby"
        self.node = node
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.clock = clock
        self.holding: Holding | None = None
        self.standby_revision = 0       # the revision of our last write of the standby key (S5)
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
                # bounded here too: a call that never returns (a gRPC channel stuck in a network
                # namespace was seen to) would stop the renew loop before it could report LOST
                return await asyncio.wait_for(operation(self._client), 2 * self.timeout_s + CALL_SLACK_S)
            except (aetcd.exceptions.ClientError, asyncio.TimeoutError) as exc:
                # Unreachable, timed out, or an error of the server's ("context deadline exceeded"
                # from a busy etcd): this endpoint did not answer; the next one may.
                problems.append(f"{self.endpoints[0][0]}:{self.endpoints[0][1]}: {type(exc).__name__}"
                                + (f" ({exc})" if str(exc) else ""))
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

    async def grant(self) -> tuple[Any, float]:
        """A new lease of our TTL, for an acquire to come (granted ahead, while other calls run).
        Its TTL counts from the grant: the holding's validity does too (acquire's `granted`)."""
        sent = self.clock()
        lease = await self._call(lambda client: client.lease(max(1, round(self.ttl_s))))
        return lease, sent

    async def acquire(self, standby: int | None = None, *, first: bool = False,
                      retake: bool = False, granted: tuple[Any, float] | None = None) -> Holding | None:
        """Create the key if it is absent (and, given `standby`, if the standby key names that
        session; `first`: if the pair never ran, i.e. there is no standby key at all; `retake`: if
        nobody wrote the standby key since we last did, i.e. nobody took the key since we held it);
        None if the transaction failed. The standby key becomes "none" (S2). `granted`: the
        lease (and when it was asked for) from grant(), else one is granted here."""
        sent = self.clock() if granted is None else granted[1]
        if retake and self.standby_revision == 0:
            return None                         # we never wrote it: we cannot know who did since

        async def take(client):
            lease = granted[0] if granted is not None else await client.lease(max(1, round(self.ttl_s)))
            t = client.transactions
            compare = [t.create(self.key) == 0]
            if standby is not None:
                compare.append(t.value(self.standby_key) == str(standby).encode())
            if first:
                compare.append(t.create(self.standby_key) == 0)
            if retake:
                compare.append(t.mod(self.standby_key) == self.standby_revision)
            ok, responses = await client.transaction(
                compare=compare,
                success=[t.put(self.key, self.node.encode(), lease=lease),
                         t.put(self.standby_key, NO_STANDBY)], failure=[])
            if not ok:
                await client.revoke_lease(lease.id)
                return None
            revision = responses[0].response_put.header.revision      # one revision per transaction
            self.standby_revision = revision
            return Holding(revision, lease.id, self._valid_until(sent, lease.ttl))

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
        if self.holding is not holding:
            return self.holding                         # revoked or replaced meanwhile
        if ttl <= 0:
            self.holding = None
            return None
        self.holding = Holding(holding.token, holding.lease_id, self._valid_until(sent, ttl))
        return self.holding

    async def declare_standby(self, session: int | None) -> bool:
        """Name the replica session whose standby has every acknowledged write (None: no replica
        has); only while we hold the key (guarded by our token). False: we do not hold it."""
        holding = self.holding
        if holding is None:
            return False
        value = NO_STANDBY if session is None else str(session).encode()

        async def write(client):
            t = client.transactions
            ok, responses = await client.transaction(compare=[t.create(self.key) == holding.token],
                                                     success=[t.put(self.standby_key, value)], failure=[])
            if ok:
                self.standby_revision = responses[0].response_put.header.revision
            return ok

        return await self._call(write)

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
            try:
                await client.revoke_lease(lease_id)
            except aetcd.exceptions.ClientError as exc:
                if "lease not found" not in str(exc):   # gone already (expired, or an earlier try
                    raise                                # that answered too late): what we wanted

        await self._call(end)
        if self.holding is not None and self.holding.lease_id == lease_id:
            self.holding = None

    def valid(self) -> bool:
        """Whether this node may act as the active node at this moment (S1)."""
        return self.holding is not None and self.holding.valid(self.clock())


class FenceMode(str, Enum):
    ETCD = "etcd"           # the lease decides
    OFF = "off"             # --no-fencing: fail over on silence, split brain possible
    MANUAL = "manual"       # no etcd: the replica never fails over by itself


class LeaseChange(str, Enum):
    LOST = "lost"                   # not valid any more: fence (hold output, pause the guest)
    RENEWED = "renewed"             # valid again, the same lease and token
    RETAKEN = "retaken"             # valid again under a new token: the standby key says "none"
    SUPERSEDED = "superseded"       # another node holds the key: stop


@dataclass(frozen=True)
class Claim:
    """The outcome of a replica's claim to the key."""

    won: bool
    token: int = 0
    reason: str = ""


class Fence:
    """A node's right to serve, under `[fencing]`: the lease (etcd), always (off), or never taken over (manual)."""

    def __init__(self, section: FencingSection, node: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.section = section
        self.mode = FenceMode(section.mode)
        self.node = node
        self.clock = clock
        self.lease = (PairLease(section.etcd, section.key, node, section.ttl_s,
                                timeout_s=max(0.25, section.renew_ms / 1000), clock=clock)
                      if self.mode is FenceMode.ETCD else None)
        self.changes: list[tuple[float, str, int]] = []    # (wall time, what, token)
        self.fenced = False
        self.problem = ""                   # why the last renewal failed, for the status
        self.primary_holder: Holder | None = None   # the key's holder as read ahead (learn_primary)

    @property
    def token(self) -> int:
        holding = self.lease.holding if self.lease is not None else None
        return holding.token if holding is not None else 0

    def may_serve(self) -> bool:
        """Whether output may leave this node now (S1); without etcd, always."""
        return self.lease is None or self.lease.valid()

    def status(self) -> dict:
        lease = self.lease
        holding = lease.holding if lease is not None else None
        return {"mode": self.mode.value, "node": self.node, "token": self.token,
                "key": self.section.key if lease is not None else None,
                "lease_valid_s": max(0.0, holding.valid_until - self.clock()) if holding else None,
                "fenced": self.fenced, "problem": self.problem or None,
                "changes": [{"at": at, "what": what, "token": token} for at, what, token in self.changes[-20:]]}

    def _note(self, what: str) -> None:
        self.changes.append((time.time(), what, self.token))

    async def close(self) -> None:
        if self.lease is not None:
            await self.lease.close()

    async def connect(self) -> str:
        """Open the channel to etcd now (a takeover must not pay for it), and say who holds the key."""
        if self.lease is None:
            return f"no etcd ({self.mode.value})"
        try:
            holder = await self.lease.holder()
        except EtcdUnavailable as exc:
            return f"etcd does not answer yet ({exc})"
        return (f"the pair's key {self.section.key} is held by {holder.node!r} (token {holder.token})"
                if holder is not None else f"nobody holds the pair's key {self.section.key}")

    # -- the active node ---------------------------------------------------------------------
    async def take(self) -> None:
        """Become the active node at start: take the key, or raise KeyHeld (another node is active)."""
        if self.lease is None:
            return
        give_up_at = self.clock() + self.section.ttl_s * (1 + DRIFT) + 1.0
        while await self.lease.acquire() is None:
            holder = await self.lease.holder()
            if holder is not None and (holder.node != self.node or self.clock() > give_up_at):
                raise KeyHeld(holder, self.section.key)
            if holder is not None:                  # an earlier run of this node: its lease runs out
                log.warning("the pair's key still names this node (token %d, an earlier run): waiting "
                            "for its lease to end", holder.token)
                await asyncio.sleep(CLAIM_POLL_S * 4)
        self._note("active")
        log.info("holding the pair's key %s (token %d)", self.section.key, self.token)

    async def take_fresh(self, force: bool = False) -> bool:
        """Take the key to boot a fresh guest: only if nobody holds it and the pair never ran (no
        standby key: a pair that ran keeps its state on the node that was active), or, `force`,
        whenever nobody holds it (the operator says the state is lost)."""
        if self.lease is None:
            return True
        if await self.lease.acquire(first=not force) is None:
            return False
        self._note("active (fresh guest)")
        log.info("holding the pair's key %s (token %d) for a fresh guest", self.section.key, self.token)
        return True

    async def declare_standby(self, session: int | None) -> bool:
        """S2's standby key; retried while etcd does not answer and the lease may still be valid."""
        if self.lease is None:
            return True
        while True:
            try:
                return await self.lease.declare_standby(session)
            except EtcdUnavailable as exc:
                self.problem = str(exc)
                if not self.lease.valid():
                    return False
                await asyncio.sleep(self.section.renew_ms / 4000)

    async def hold(self, changed: Callable[[LeaseChange, str], None]) -> None:
        """Renew the lease every renew_ms for as long as this runs, and report each change of
        the right to serve: LOST (at the validity deadline at the latest), RENEWED, RETAKEN,
        SUPERSEDED (then return)."""
        lease = self.lease
        if lease is None:
            await asyncio.Event().wait()
            return
        period = self.section.renew_ms / 1000
        next_renewal = self.clock() + period
        while True:
            holding = lease.holding
            deadline = next_renewal if holding is None or self.fenced else min(next_renewal, holding.valid_until)
            await asyncio.sleep(max(0.0, deadline - self.clock()))
            if not self.fenced and not lease.valid():
                self._lost(changed, self.problem or "the lease could not be renewed in time")
            if self.clock() < next_renewal:
                continue
            next_renewal = self.clock() + period
            try:
                if lease.holding is not None:
                    if await lease.renew() is not None:
                        self.problem = ""
                        if self.fenced and lease.valid():
                            self.fenced = False
                            self._note("renewed")
                            changed(LeaseChange.RENEWED, "the lease was renewed")
                        continue
                    self._lost(changed, "the lease expired or was revoked")
                if await lease.acquire(retake=True) is not None:
                    self.fenced = False
                    self.problem = ""
                    self._note("retaken")
                    changed(LeaseChange.RETAKEN, f"took the pair's key again (token {self.token}): nobody "
                                                 f"else had")
                    continue
                holder = await lease.holder()
                if holder is None:
                    self._note("superseded")
                    changed(LeaseChange.SUPERSEDED, "another node took the pair's key since we held it "
                                                    "(and has lost it again): our guest misses its writes")
                    return
                if holder.node != self.node:
                    self._note(f"superseded by {holder.node}")
                    changed(LeaseChange.SUPERSEDED, f"node {holder.node!r} holds the pair's key (token "
                                                    f"{holder.token}): it is the active node now")
                    return
            except EtcdUnavailable as exc:
                self.problem = str(exc)

    def _lost(self, changed: Callable[[LeaseChange, str], None], reason: str) -> None:
        if not self.fenced:
            self.fenced = True
            self._note("fenced")
            changed(LeaseChange.LOST, reason)

    def superseded_by(self, token: int) -> bool:
        """Whether a peer's token says another node has been active since we took the key (S4)."""
        return self.lease is not None and token > self.token > 0

    # -- the replica ---------------------------------------------------------------------------
    async def learn_primary(self) -> None:
        """Read who holds the key now, ahead of a takeover (a replica that adopted a session): a
        proven death then revokes that holder's lease at once, without reading it first."""
        if self.lease is None:
            return
        try:
            self.primary_holder = await self.lease.holder()
        except EtcdUnavailable:
            self.primary_holder = None            # (the claim reads it then)

    async def _revoke_and_take(self, holder: Holder, session: int) -> bool:
        """Revoke the dead holder's lease (its key goes with it) and take the key for `session`,
        our own lease granted meanwhile: two round trips of etcd's, not three."""
        lease = self.lease
        granted, _ = await asyncio.gather(lease.grant(), lease.revoke(holder.lease_id))
        log.warning("the primary's connection closed without BYE: its lease %x is revoked", holder.lease_id)
        if await lease.acquire(standby=session, granted=granted) is not None:
            self._note("active")
            return True
        return False

    async def claim(self, primary_token: int, session: int, proven_dead: bool) -> Claim:
        """Take the key for a takeover from the standby of `session` (S2, S3).

        Waits while the primary's lease lives; revokes it first if its death is proven. Gives up
        when the primary turns out alive (its lease was renewed past its TTL), when the standby key
        does not name our session (the primary ran unprotected since: our copy misses writes), or
        when another node took the key. Keeps trying while etcd does not answer: the standby may be
        the only copy of the guest.
        """
        if self.mode is FenceMode.OFF:
            return Claim(True, 0, "no fencing: taking over on silence alone")
        if self.lease is None:
            return Claim(False, 0, "no etcd configured: a replica without fencing never takes over by "
                                   "itself (give --etcd, or --no-fencing, which allows split brain)")
        lease, ttl = self.lease, self.section.ttl_s
        give_up_at: float | None = None
        revoked = False
        # The holder read ahead (learn_primary) stands in for the first read when it is the one
        # whose death is proven (a stale one, of an older token, does not).
        ahead = self.primary_holder
        if not (proven_dead and primary_token and ahead is not None and ahead.token == primary_token):
            ahead = None
        while True:
            try:
                holder = ahead if ahead is not None else await lease.holder()
                ahead = None
                if holder is None:
                    if await lease.acquire(standby=session) is not None:
                        self._note("active")
                        return Claim(True, self.token, "took the pair's key")
                    holder = await lease.holder()
                    if holder is None:
                        return Claim(False, 0, "the standby key does not name our session: the primary "
                                               "ran unprotected after it lost us, so our copy misses "
                                               "writes it acknowledged")
                if holder.node == self.node:
                    return Claim(False, holder.token, "the key names this node already (a stale lease "
                                                      "of an earlier run): not taking over on it")
                if primary_token and holder.token != primary_token:
                    return Claim(False, holder.token, f"node {holder.node!r} holds the key with token "
                                                      f"{holder.token}, not our primary's {primary_token}")
                if proven_dead and self.section.revoke_on_close and not revoked:
                    revoked = True
                    if await self._revoke_and_take(holder, session):
                        return Claim(True, self.token, "took the pair's key")
                    continue
                now = self.clock()
                if give_up_at is None:
                    give_up_at = now + ttl * (1 + DRIFT) + 2 * self.section.renew_ms / 1000 + EXPIRY_SLACK_S
                    log.warning("the primary's lease (token %d) still lives: waiting up to %.1f s for it "
                                "to expire", holder.token, give_up_at - now)
                elif now > give_up_at:
                    return Claim(False, holder.token, f"node {holder.node!r} kept renewing its lease: it "
                                                      f"is alive")
            except EtcdUnavailable as exc:
                self.problem = str(exc)
                log.error("claiming the pair's key: %s; trying again", exc)
                give_up_at = None                     # the TTL counts from when etcd answers again
            await asyncio.sleep(CLAIM_POLL_S)
