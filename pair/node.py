"""colo-node: one command for either node of a protected pair, the same on both hosts.

    colo-node --config pair.toml --name a

The file holds the agents' sections (checkpointer.config: [guest], [service], [fencing] with etcd,
[security] ...) and a [nodes] table naming both nodes:

    [nodes.a]
    replication = "tcp://10.0.0.1:7800"   # where this node's replica role listens
    service = "10.0.0.1:6379"             # where this node serves the clients when active
    sentinel = "10.0.0.1:26379"           # optional: its discovery endpoint (Redis Sentinel)
    listen = "tcp://10.0.0.1:7800"        # optional: where it binds, if not `replication` (a proxy)
    [nodes.b]
    ...

Roles come from etcd, never from the file: the node that holds the pair's key is the primary, the
other joins it as its replica. The loop, for as long as the node runs:

- the pair's key is held by the peer: be its replica (listen; the peer's primary connects and
  syncs us while its service runs). When the peer is lost and this node takes over, the taken-over
  guest is handed, running, to a primary role of this node (same lease, same token), which serves
  unprotected and syncs the peer as soon as it comes back: re-protection without an operator.
- nobody holds it, and the pair has never run (no standby key yet: checkpointer.fencing): take the
  key and boot a fresh guest. The transaction decides between two nodes starting at once.
- nobody holds it and the pair has run before: the last active node is frozen, cut off or gone.
  Its state lives only there (or in a standby it named), so this node never boots an empty guest
  by itself: it waits as a replica, and a node that comes back with the state takes the key again
  and syncs it. `--fresh` says the state is lost and an empty guest may boot.
- a primary role that is superseded (the peer took the key) drops its guest and becomes a replica.

Roles keep one Fence (the lease, its token, its history) across changes; the status file shows the
role, each role change with its time and token, and the protection state.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from checkpointer.agent import PrimaryAgent
from checkpointer.config import (ConfigError, PrimaryAgentConfig, ReplicaAgentConfig, add_common_flags,
                                 flag_overrides, load_config, read_toml, validate_endpoint)
from checkpointer.fencing import EtcdUnavailable, Fence, FencingError
from checkpointer.launch import check_listen_addresses, configure_logging
from replica.agent import ReplicaAgent
from ring.errors import RingError

from .sentinel import MASTER_NAME, SentinelServer

log = logging.getLogger("colo.node")

DECIDE_POLL_S = 0.2             # how often a node without a role looks at etcd again


@dataclass(frozen=True)
class PairNode:
    """One node of the pair, as [nodes.NAME] describes it."""

    name: str
    replication: str            # tcp://HOST:PORT: where the peer's primary connects to its replica role
    service_host: str
    service_port: int
    sentinel: tuple[str, int] | None = None
    listen: str = ""            # where its replica role binds ("": `replication`)

    @property
    def service(self) -> tuple[str, int]:
        return self.service_host, self.service_port


@dataclass(frozen=True)
class NodeConfig:
    """What colo-node NAME runs: its two roles' configurations, and both nodes."""

    name: str
    nodes: dict[str, PairNode]
    primary: PrimaryAgentConfig
    replica: ReplicaAgentConfig
    fresh: bool = False

    @property
    def me(self) -> PairNode:
        return self.nodes[self.name]

    @property
    def peer(self) -> PairNode:
        return next(node for name, node in self.nodes.items() if name != self.name)


def _host_port(value: object, key: str) -> tuple[str, int]:
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(f"{key}: expected \"HOST:PORT\", got {value!r}")
    host, _, port = value.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ConfigError(f"{key}: expected \"HOST:PORT\" with a port in 1..65535, got {value!r}")
    return host.strip("[]"), int(port)


def _nodes(table: object, path: str) -> dict[str, PairNode]:
    if table is None:
        raise ConfigError(f"config file {path}: no [nodes] table: name both nodes of the pair ([nodes.a], "
                          f"[nodes.b], each with replication and service)")
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise ConfigError(f"config file {path}: [nodes] must hold one table per node ([nodes.a], [nodes.b])")
    if len(table) != 2:
        raise ConfigError(f"config file {path}: [nodes] must name exactly two nodes, got {len(table)}: "
                          f"{', '.join(table) or 'none'}")
    nodes = {}
    for name, entry in table.items():
        known = {"replication", "service", "sentinel", "listen"}
        unknown = set(entry) - known
        if unknown:
            raise ConfigError(f"config file {path}: unknown key nodes.{name}.{sorted(unknown)[0]}; the keys of "
                              f"a node are replication, service, sentinel, listen")
        for needed in ("replication", "service"):
            if needed not in entry:
                raise ConfigError(f"config file {path}: nodes.{name}.{needed} is missing")
        try:
            replication = validate_endpoint(entry["replication"], f"nodes.{name}.replication")
            listen = validate_endpoint(entry["listen"], f"nodes.{name}.listen", bind=True) if "listen" in entry else ""
        except ValueError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        host, port = _host_port(entry["service"], f"nodes.{name}.service")
        sentinel = _host_port(entry["sentinel"], f"nodes.{name}.sentinel") if "sentinel" in entry else None
        nodes[name] = PairNode(name, replication, host, port, sentinel, listen)
    return nodes


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))                 # a TOML basic string (JSON's escapes are TOML's)


def pair_file(sections: Mapping[str, Mapping[str, object]], nodes: Sequence[PairNode]) -> str:
    """A pair file: the agents' `sections` and the [nodes] table of `nodes` (what load_node_config reads)."""
    lines = []
    for section, table in sections.items():
        lines += [f"[{section}]", *(f"{key} = {_toml(value)}" for key, value in table.items())]
    for node in nodes:
        lines += [f"[nodes.{node.name}]", f"replication = {_toml(node.replication)}",
                  f"service = {_toml(f'{node.service_host}:{node.service_port}')}"]
        if node.sentinel is not None:
            lines.append(f"sentinel = {_toml(f'{node.sentinel[0]}:{node.sentinel[1]}')}")
        if node.listen:
            lines.append(f"listen = {_toml(node.listen)}")
    return "\n".join(lines) + "\n"


def load_node_config(path: str, name: str, overrides: dict[str, object] | None = None,
                     flag_names: dict[str, str] | None = None, fresh: bool = False) -> NodeConfig:
    """colo-node NAME's configuration from the pair's file (and flags); ConfigError naming what is wrong."""
    data = dict(read_toml(path))
    nodes = _nodes(data.pop("nodes", None), path)
    if name not in nodes:
        raise ConfigError(f"--name {name!r}: the nodes in {path} are {', '.join(nodes)}")
    me = nodes[name]
    peer = next(node for other, node in nodes.items() if other != name)
    common = dict(overrides or {})
    common["fencing.node"] = name
    security = data.get("security", {}) if isinstance(data.get("security"), dict) else {}
    keys = Path(str(security.get("keys_dir", ""))) if security.get("keys_dir") else None
    keyed = {"security.key_name": name} if keys is not None else {}
    primary = load_config("primary", path, {
        **common, **keyed, "primary.replica": peer.replication, "service.host": me.service_host,
        "service.port": me.service_port,
        **({"security.peer_public_key": str(keys / f"{peer.name}.key")} if keys is not None else {})},
        flag_names, data=data)
    replica = load_config("replica", path, {
        **common, **keyed, "replica.listen": me.listen or me.replication, "service.host": me.service_host,
        "service.takeover_port": me.service_port,
        **({"security.authorized_keys": str(keys / f"{peer.name}.key")} if keys is not None else {})},
        flag_names, data=data)
    if not primary.guest_spec().is_service:
        raise ConfigError(f"guest.workload: colo-node serves a service guest (e.g. kvstore), got "
                          f"{primary.guest.workload!r}")
    return NodeConfig(name, nodes, primary, replica, fresh)


class Node:
    """One node of the pair: its roles in turn, decided by etcd, over one fence."""

    def __init__(self, config: NodeConfig, *, primary_hooks=None) -> None:
        """`primary_hooks`: the primary roles' test hooks (checkpointer.agent.Hooks: the drill's kill switch)."""
        self.config = config
        self.primary_hooks = primary_hooks
        self.fence = Fence(config.primary.fencing, config.name)
        self.role = "starting"
        self.agent: PrimaryAgent | ReplicaAgent | None = None
        self.roles: list[dict[str, Any]] = []             # each role change: when, which, the token
        self._stopping = False
        self.sentinel: SentinelServer | None = None
        self.takeover: dict[str, Any] = {}        # the last takeover's figures, as its replica role measured them

    def _become(self, role: str) -> None:
        self.role = role
        self.roles.append({"at": time.time(), "role": role, "token": self.fence.token})
        log.warning("node %s is now %s (token %d)", self.config.name, role, self.fence.token)

    def stop(self) -> None:
        self._stopping = True
        if self.agent is not None:
            self.agent.stop()

    def status_extra(self) -> dict:
        extra = {"node": self.config.name, "node_role": self.role, "role_changes": self.roles[-50:]}
        if self.role == "primary":
            extra.update(self.takeover)                  # the primary role's own figures are None
        return extra

    # -- discovery ---------------------------------------------------------------------------
    async def _active_service(self) -> tuple[str, int] | None:
        """The active node's service address (for the Sentinel answer), from etcd's word."""
        if self.role == "primary" and self.fence.may_serve():
            return self.config.me.service
        holder = await self.fence.lease.holder() if self.fence.lease is not None else None
        if holder is None or holder.node not in self.config.nodes:
            return None
        return self.config.nodes[holder.node].service

    # -- the roles ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Take roles until stop(); an etcd that never answers at start is an error (FencingError)."""
        if self.fence.lease is None:
            raise FencingError("colo-node needs etcd: set [fencing] etcd or --etcd (a pair without "
                               "fencing is colo-primary and colo-replica with --no-fencing)")
        sentinel = self.config.me.sentinel
        if sentinel is not None:
            self.sentinel = SentinelServer(sentinel[0], sentinel[1], MASTER_NAME, self._active_service)
            await self.sentinel.start()
        try:
            while not self._stopping:
                role = await self._decide()
                if self._stopping:
                    break
                if role == "replica":
                    handed = await self._run_replica()
                    if handed is None:
                        continue
                    await self._run_primary(handed)
                else:
                    await self._run_primary(None)
        finally:
            if self.sentinel is not None:
                await self.sentinel.close()
            await self.fence.close()

    async def _decide(self) -> str:
        """"primary" (this node took the key for a fresh guest) or "replica"."""
        while not self._stopping:
            try:
                holder = await self.fence.lease.holder()
                if holder is not None and holder.node != self.config.name:
                    return "replica"
                if holder is None:
                    if await self.fence.take_fresh(force=self.config.fresh):
                        return "primary"
                    return "replica"              # the pair ran before: wait for its state to come back
                log.warning("the pair's key still names this node (token %d, an earlier run): waiting for "
                            "its lease to end", holder.token)
            except EtcdUnavailable as exc:
                log.error("etcd: %s; trying again", exc)
            await asyncio.sleep(DECIDE_POLL_S)
        return "replica"

    async def _run_replica(self):
        self._become("replica")
        agent = ReplicaAgent(self.config.replica, fence=self.fence, track_after_takeover=True)
        agent.status_extra = self.status_extra
        self.agent = agent
        running = asyncio.ensure_future(agent.run())
        handing = asyncio.ensure_future(agent.hand_over())
        done, _ = await asyncio.wait({running, handing}, return_when=asyncio.FIRST_COMPLETED)
        if handing in done:
            guest = handing.result()
            self.takeover = {"takeover_ms": agent.takeover_ms, "takeover_steps_ms": agent.takeover_steps_ms,
                             "took_over_at": agent.took_over_at}
            await running
            return guest
        handing.cancel()
        running.result()                          # an error of the role ends the node
        return None

    async def _run_primary(self, guest) -> None:
        self._become("primary")
        agent = PrimaryAgent(self.config.primary, guest=guest, fence=self.fence, hooks=self.primary_hooks)
        agent.status_extra = self.status_extra
        self.agent = agent
        await agent.run()
        if agent.last_error and not agent.last_error.startswith("superseded"):
            raise RuntimeError(agent.last_error)


def node_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="colo-node", description="Run one node of a protected pair; roles come from etcd.",
        epilog="Settings come from the defaults, then --config FILE, then the flags given.")
    add_common_flags(parser)
    parser.add_argument("--name", required=True, help="this node's name in the file's [nodes] table")
    parser.add_argument("--fresh", action="store_true",
                        help="the pair's state is lost: an empty guest may boot although the pair ran before")
    return parser


def main(argv: Sequence[str] | None = None, *, make_node: Callable[[NodeConfig], Node] = Node,
         signals: Mapping[int, Callable[[], None]] | None = None) -> int:
    """colo-node; `make_node` and `signals` (more handlers on the loop) serve the drill's harness."""
    configure_logging()
    parser = node_arg_parser()
    args = parser.parse_args(argv)
    if args.config is None:
        parser.error("the following arguments are required: --config (the pair's file, with [nodes])")
    overrides, names = flag_overrides(args)
    try:
        config = load_node_config(args.config, args.name, overrides, names, fresh=args.fresh)
        check_listen_addresses(config.replica)
        node = make_node(config)
    except (RingError, ValueError) as exc:
        print(f"colo-node: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, node.stop)
        for sig, handler in (signals or {}).items():
            loop.add_signal_handler(sig, handler)
        await node.run()

    try:
        asyncio.run(run())
    except (FencingError, RuntimeError) as exc:
        print(f"colo-node: stopped: {exc}", file=sys.stderr)
        return 1
    return 0


__all__ = ["Node", "NodeConfig", "PairNode", "load_node_config", "pair_file", "main"]

if __name__ == "__main__":
    sys.exit(main())
