"""The clients' side of a drill: redis-py workers that remember every reply, and the two verdicts
they allow, written once for colo-drill and the network-namespace tests.

A worker is told only the pair's discovery endpoints (the Sentinel commands every node answers:
pair/sentinel.py). It asks them for the active node, sends SET, INCR and GET on its own keys, and
after any error asks again. It records, for every acknowledged write, which node answered and
when it sent the request and received the answer (wall clock: every process here shares the
host's).

- **No acknowledged write lost** (`Worker.verify`): every key holds the value of its last
  acknowledged SET or of one sent after it (whose answer was lost with a node), and every counter
  is at least its last acknowledged INCR and at most the increments sent.
- **Never two active nodes** (`dual_active`): the nodes' status files give their active eras (each
  start as primary, with its fencing token). An era is over once a newer token's era has begun, so
  a node may not acknowledge a request *sent* after a node of a newer era had already *answered*
  one: the answer proves the newer node was serving, the send time proves the older one produced
  its answer later. This has no false alarms; overlaps shorter than a round trip go unseen.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel

from pair.sentinel import MASTER_NAME

ERRORS = (redis.ConnectionError, redis.TimeoutError, ConnectionError, MasterNotFoundError, OSError)


@dataclass(frozen=True)
class Ack:
    """One acknowledged write: which node answered, and when the request left and the answer came."""

    node: tuple[str, int]
    sent: float
    received: float


@dataclass(frozen=True)
class Era:
    """A node's time as the active node: from `start` (wall clock), under fencing token `token`."""

    node: str
    token: int
    start: float


def one_try(**kwargs) -> redis.Redis:
    """A client that sends each request once (redis-py retries by default: a retried INCR counts twice)."""
    return redis.Redis(protocol=2, retry=Retry(NoBackoff(), 0), **kwargs)


@dataclass
class Worker:
    """One client with its own keys, following the active node through the discovery endpoints."""

    index: int
    sentinels: Sequence[tuple[str, int]] = ()
    timeout_s: float = 5.0
    fixed: tuple[str, int] | None = None        # always this address (a single unfenced service)
    sent: dict[str, list[bytes]] = field(default_factory=dict)      # key -> values in send order
    acked: dict[str, int] = field(default_factory=dict)             # key -> index of last acked SET
    incr_sent: int = 0
    incr_acked: int = 0
    ops: int = 0
    errors: int = 0
    acks: list[Ack] = field(default_factory=list)
    error: str | None = None

    def active(self) -> tuple[str, int] | None:
        """The active node's service address, as the discovery endpoints say now (None: no answer)."""
        if self.fixed is not None:
            return self.fixed
        try:
            # (sentinel_kwargs: redis-py's retry for the endpoints themselves, else a silent one
            # is retried with backoff for tens of seconds)
            once = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0, "retry": Retry(NoBackoff(), 0)}
            return Sentinel(list(self.sentinels), sentinel_kwargs=once, **once).discover_master(MASTER_NAME)
        except ERRORS:
            return None

    def run(self, stop: threading.Event, seed: int) -> None:
        rng = random.Random(seed)
        counter = f"w{self.index}:counter"
        client, node = None, None
        while not stop.is_set():
            if client is None:
                node = self.active()
                if node is None:
                    stop.wait(0.05)                 # nobody serves right now: ask again shortly
                    continue
                client = one_try(host=node[0], port=node[1], socket_timeout=self.timeout_s,
                                 socket_connect_timeout=self.timeout_s)
            choice = rng.random()
            key = f"w{self.index}:k{rng.randrange(16)}"
            try:
                sent_at = time.time()
                if choice < 0.5:
                    values = self.sent.setdefault(key, [])
                    value = f"{self.index}:{len(values)}:{rng.getrandbits(32)}".encode()
                    values.append(value)
                    if client.set(key, value):
                        self.acked[key] = len(values) - 1
                        self.acks.append(Ack(node, sent_at, time.time()))
                elif choice < 0.8:
                    self.incr_sent += 1
                    self.incr_acked = client.incr(counter)
                    self.acks.append(Ack(node, sent_at, time.time()))
                else:
                    got = client.get(key)
                    if key in self.acked and got not in self.sent[key][self.acked[key]:]:
                        self.error = f"GET {key} from {node} returned {got!r}, older than an acknowledged SET"
                        return
                self.ops += 1
            except ERRORS:
                self.errors += 1
                client.close()
                client = None                       # that node is gone or fenced: ask who serves
        if client is not None:
            client.close()

    def verify(self, client: redis.Redis) -> tuple[int, int, list[str]]:
        """(acknowledged writes, lost writes, problems) against what `client`'s node serves."""
        problems = [self.error] if self.error else []
        lost = 0
        for key, values in self.sent.items():
            got = client.get(key)
            first_allowed = self.acked.get(key, 0)
            allowed = values[first_allowed:] + ([None] if key not in self.acked else [])
            if got not in allowed:
                lost += 1
                problems.append(f"{key}: the active node has {got!r}, last acknowledged "
                                f"{values[self.acked[key]] if key in self.acked else None!r}")
        counter = int(client.get(f"w{self.index}:counter") or 0)
        if counter < self.incr_acked:
            lost += 1
            problems.append(f"counter of worker {self.index} went back: {counter} < acknowledged {self.incr_acked}")
        if counter > self.incr_sent:
            problems.append(f"counter of worker {self.index} is {counter}, more than the {self.incr_sent} "
                            f"increments sent")
        return len(self.acked) + (1 if self.incr_acked else 0), lost, problems


class Eras:
    """The active eras of the pair's nodes, gathered from every status file read (a restarted node
    starts a new file, so what an earlier run of it said is kept here)."""

    def __init__(self) -> None:
        self._seen: set[Era] = set()

    def observe(self, status: dict) -> None:
        node = status.get("node")
        for change in status.get("role_changes", ()):
            if node and change.get("role") == "primary" and change.get("token"):
                self._seen.add(Era(node, int(change["token"]), float(change["at"])))

    @property
    def eras(self) -> list[Era]:
        return sorted(self._seen, key=lambda era: era.token)


def dual_active(acks: Iterable[Ack], eras: Sequence[Era], addresses: dict[tuple[str, int], str]) -> list[str]:
    """The acknowledgements that prove two nodes active at once (see the module's docstring)."""
    by_node: dict[str, list[Era]] = {}
    for era in eras:
        by_node.setdefault(era.node, []).append(era)
    def era_of(ack: Ack) -> Era | None:
        node = addresses.get(ack.node)
        started = [e for e in by_node.get(node, []) if e.start <= ack.received]
        return max(started, key=lambda e: e.start) if started else None
    acks_by_era: dict[Era, list[Ack]] = {}
    for ack in acks:
        era = era_of(ack)
        if era is not None:
            acks_by_era.setdefault(era, []).append(ack)
    problems = []
    ordered = [era for era in eras if era in acks_by_era]
    for i, older in enumerate(ordered):
        last_sent = max(a.sent for a in acks_by_era[older])
        for newer in ordered[i + 1:]:
            if newer.node == older.node:
                continue
            first_answer = min(a.received for a in acks_by_era[newer])
            if last_sent > first_answer:
                problems.append(f"dual active: node {older.node} (token {older.token}) acknowledged a request "
                                f"sent {last_sent - first_answer:.3f} s after node {newer.node} (token "
                                f"{newer.token}) had answered one")
    return problems


def save_workers(workers: Sequence[Worker], path: str) -> None:
    """What the workers sent and saw acknowledged, as JSON (bytes as latin-1 text)."""
    def plain(worker: Worker) -> dict:
        record = asdict(worker)
        record["sent"] = {k: [v.decode("latin-1") for v in vs] for k, vs in worker.sent.items()}
        return record
    with open(path, "w") as handle:
        json.dump([plain(w) for w in workers], handle)


def load_workers(path: str) -> list[Worker]:
    workers = []
    with open(path) as handle:
        for record in json.load(handle):
            record["sent"] = {k: [v.encode("latin-1") for v in vs] for k, vs in record["sent"].items()}
            record["acks"] = [Ack(tuple(a["node"]), a["sent"], a["received"]) for a in record["acks"]]
            record["sentinels"] = [tuple(s) for s in record["sentinels"]]
            record["fixed"] = tuple(record["fixed"]) if record["fixed"] else None
            workers.append(Worker(**record))
    return workers


def _address_list(text: str, parser: argparse.ArgumentParser, flag: str) -> list[tuple[str, int]]:
    addresses = []
    for item in text.split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            parser.error(f"{flag}: {item!r} is not HOST:PORT")
        addresses.append((host, int(port)))
    return addresses


def verify_records(workers: Sequence[Worker], sentinels: Sequence[tuple[str, int]], eras: Sequence[Era],
                   addresses: dict[tuple[str, int], str]) -> dict:
    """Both verdicts over the workers' records, read back from the node the endpoints name now."""
    report = {"acked_writes": 0, "lost_writes": 0, "problems": [], "dual_active": []}
    node = workers[0].active() if workers else None
    if node is None:
        report["problems"].append("no active node to verify against")
        return report
    client = one_try(host=node[0], port=node[1], socket_timeout=10)
    try:
        for worker in workers:
            acked, lost, problems = worker.verify(client)
            report["acked_writes"] += acked
            report["lost_writes"] += lost
            report["problems"] += problems
    finally:
        client.close()
    report["dual_active"] = dual_active([a for w in workers for a in w.acks], eras, addresses)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Clients on another host (a network namespace) than the one that checks them:
    `run` works a pair until SIGTERM or SIGINT and writes the records to --out; `verify` reads
    them back from the active node and prints both verdicts as JSON (exit status 1 if either fails)."""
    parser = argparse.ArgumentParser(prog="python -m scenarios.clients", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run")
    run.add_argument("--sentinels", required=True, help="HOST:PORT[,HOST:PORT...]: the pair's discovery endpoints")
    run.add_argument("--workers", type=int, default=4)
    run.add_argument("--seed", type=int, default=1)
    run.add_argument("--out", required=True, help="where the records go (JSON)")
    check = commands.add_parser("verify")
    check.add_argument("--records", required=True, help="what `run` wrote")
    check.add_argument("--eras", required=True, help="JSON list of [node, token, start] (from the nodes' status)")
    check.add_argument("--nodes", required=True, help="NAME=HOST:PORT[,...]: each node's service address")
    args = parser.parse_args(argv)
    if args.command == "verify":
        workers = load_workers(args.records)
        with open(args.eras) as handle:
            eras = [Era(node, int(token), float(start)) for node, token, start in json.load(handle)]
        addresses = {}
        for item in args.nodes.split(","):
            name, _, address = item.partition("=")
            addresses[_address_list(address, parser, "--nodes")[0]] = name
        report = verify_records(workers, workers[0].sentinels if workers else [], eras, addresses)
        print(json.dumps(report))
        return 1 if report["lost_writes"] or report["problems"] or report["dual_active"] else 0
    sentinels = _address_list(args.sentinels, parser, "--sentinels")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    workers = [Worker(i, sentinels) for i in range(args.workers)]
    rng = random.Random(args.seed)
    threads = [threading.Thread(target=w.run, args=(stop, rng.getrandbits(32)), daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    print("clients running", flush=True)
    stop.wait()
    for thread in threads:
        thread.join(30)
    save_workers(workers, args.out)
    return 0


__all__ = ["Ack", "Era", "Eras", "Worker", "dual_active", "one_try", "save_workers", "load_workers", "verify_records", "main"]

if __name__ == "__main__":
    sys.exit(main())
