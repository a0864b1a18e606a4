"""colo-drill: kill the primary of a protected Redis-protocol service and prove from the clients' side
that nothing acknowledged was lost.

Each run starts a replica and a primary as separate processes on loopback (CURVE on), the primary
running the kvstore guest; redis-py workers SET, INCR and GET their own keys against it and remember
every reply they got; the primary is SIGKILLed at a chosen point (at random, during an epoch's
transfer, right after an epoch's end before its ack, between epochs, or while replies are held for
their ack); the replica takes over and serves on its own port; the drill then reads every key back
from it. A run passes when every key holds the value of its last acknowledged SET or of a SET sent
after it, and every counter is at least its last acknowledged INCR (and no more than the increments
sent).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from checkpointer.cluster import Cluster, ClusterError, LocalEtcd, ensure_keys, free_port

KILL_POINTS = ("random", "transfer", "after-end", "heavy-output", "between")


@dataclass
class Worker:
    """One client: its own keys, what it sent, what was acknowledged."""

    index: int
    port: int
    sent: dict[str, list[bytes]] = field(default_factory=dict)      # key -> values in send order
    acked: dict[str, int] = field(default_factory=dict)             # key -> index of last acked SET
    incr_sent: int = 0
    incr_acked: int = 0
    ops: int = 0
    error: str | None = None

    def run(self, stop: threading.Event, seed: int) -> None:
        rng = random.Random(seed)
        # One try per request (redis-py retries by default): a retried INCR could count twice.
        client = redis.Redis(port=self.port, protocol=2, socket_timeout=10, socket_connect_timeout=5,
                             retry=Retry(NoBackoff(), 0))
        counter = f"w{self.index}:counter"
        try:
            while not stop.is_set():
                choice = rng.random()
                key = f"w{self.index}:k{rng.randrange(16)}"
                if choice < 0.5:
                    values = self.sent.setdefault(key, [])
                    value = f"{self.index}:{len(values)}:{rng.getrandbits(32)}".encode()
                    values.append(value)
                    if client.set(key, value):
                        self.acked[key] = len(values) - 1
                elif choice < 0.8:
                    self.incr_sent += 1
                    self.incr_acked = client.incr(counter)
                else:
                    got = client.get(key)
                    if key in self.acked and got not in self.sent[key][self.acked[key]:]:
                        self.error = f"GET {key} returned {got!r}, older than an acknowledged SET"
                        return
                self.ops += 1
        except (redis.ConnectionError, redis.TimeoutError, ConnectionError):
            pass                                   # the primary died under us: expected
        finally:
            client.close()

    def verify(self, replica: redis.Redis) -> tuple[int, int, list[str]]:
        """(acknowledged writes, lost writes, problems) against the replica's state."""
        problems = [self.error] if self.error else []
        lost = 0
        for key, values in self.sent.items():
            got = replica.get(key)
            first_allowed = self.acked.get(key, 0)
            allowed = values[first_allowed:] + ([None] if key not in self.acked else [])
            if got not in allowed:
                lost += 1
                problems.append(f"{key}: replica has {got!r}, last acknowledged "
                                f"{values[self.acked[key]] if key in self.acked else None!r}")
        counter = int(replica.get(f"w{self.index}:counter") or 0)
        if counter < self.incr_acked:
            lost += 1
            problems.append(f"counter of worker {self.index} went back: {counter} < acknowledged "
                            f"{self.incr_acked}")
        if counter > self.incr_sent:
            problems.append(f"counter of worker {self.index} is {counter}, more than the "
                            f"{self.incr_sent} increments sent")
        return len(self.acked) + (1 if self.incr_acked else 0), lost, problems


@dataclass
class Service:
    """The protected kvstore: a replica and a drill primary as processes, and where each serves."""

    cluster: Cluster
    primary_port: int          # the service on the primary (the clients' port)
    replica_port: int          # the service on the replica, after a takeover

    def primary_alive(self) -> bool:
        return self.cluster.agents["primary"].running()


def start_service(folder: Path, keys: Path, kill_at: str, logs: Path, primary_flags: Sequence[str] = (),
                  with_replica: bool = True, fencing: Sequence[str] = ()) -> Service:
    """A replica (unless `with_replica` is false: the primary then runs its guest alone) and a drill
    primary with its kill switch at `kill_at`, running the kvstore guest; `fencing`: both agents'
    fencing flags (an etcd and the pair's key)."""
    cluster = Cluster(folder, keys=keys, logs=logs,
                      common=["--heartbeat-ms", "50", "--timeout-ms", "500", *fencing])
    service = Service(cluster, free_port(), free_port())
    if with_replica:
        cluster.start_replica(["--service-port", str(service.replica_port)])
    cluster.start_primary(["--workload", "kvstore", "--service-port", str(service.primary_port), "--vcpus", "1",
                           "--memory-mib", "64", "--report-every", "50", *primary_flags],
                          harness="scenarios.drill_primary", harness_args=["--kill-at", kill_at])
    return service


def one_run(number: int, point: str, rng: random.Random, keys: Path, workers: int, warmup: float,
            log_dir: Path, live: bool, etcd: str) -> dict:
    """One drill run, its pair fenced in `etcd` under a key of its own; returns its report."""
    with tempfile.TemporaryDirectory(prefix="colo-drill-") as tmp:
        run_logs = log_dir / f"run{number}"
        run_logs.mkdir(parents=True, exist_ok=True)
        nth = rng.randrange(20, 60)
        kill_at = "none:0" if point == "random" else f"{point}:{nth}"
        fencing = ["--etcd", etcd, "--etcd-key", f"/colo-drill/{os.getpid()}/run{number}"]
        service = start_service(Path(tmp), keys, kill_at, run_logs, fencing=fencing)
        cluster = service.cluster
        try:
            cluster.wait("protection", lambda: cluster.status("primary").get("protected"))
            stop = threading.Event()
            clients = [Worker(i, service.primary_port) for i in range(workers)]
            threads = [threading.Thread(target=w.run, args=(stop, rng.getrandbits(32)), daemon=True)
                       for w in clients]
            for thread in threads:
                thread.start()
            _live_view(service, clients, warmup + (rng.random() if point == "random" else 0), live,
                       until_dead=point != "random")
            before = cluster.status("primary")
            if service.primary_alive():
                if point != "random":
                    point = f"{point}*"          # the point was not reached: killed from outside
            cluster.kill("primary")               # random point (or it never fired); else reaps it
            stop.set()
            for thread in threads:
                thread.join(15)
            cluster.wait("the replica's takeover", lambda: cluster.status("replica").get("role") == "active",
                         may_exit=("primary",))
            replica = redis.Redis(port=service.replica_port, protocol=2, socket_timeout=10)
            cluster.wait("the service on the replica", lambda: _ping(replica), may_exit=("primary",))
            acked = lost = 0
            problems: list[str] = []
            for worker in clients:
                a, missing, issues = worker.verify(replica)
                acked, lost, problems = acked + a, lost + missing, problems + issues
            try:                                   # the standby guest's first progress report
                after = cluster.wait("the takeover time", lambda: _ping(replica) and (
                    s := cluster.status("replica")).get("takeover_ms") is not None and s,
                    timeout=30, may_exit=("primary",))
            except ClusterError:
                after = cluster.status("replica")     # reported without it
            replica.close()
            return {"run": number, "kill_point": point, "takeover_ms": after.get("takeover_ms"),
                    "epochs_committed": after.get("committed_epoch"),
                    "pause_us_p50": before.get("pause_us_p50"), "pause_us_p99": before.get("pause_us_p99"),
                    "output_latency_us_p50": before.get("output_latency_us_p50"),
                    "output_latency_us_p99": before.get("output_latency_us_p99"),
                    "requests_acknowledged": sum(w.ops for w in clients), "acked_writes": acked,
                    "lost_writes": lost, "verified": not problems, "problems": problems[:10]}
        finally:
            cluster.stop(timeout=10)


def _ping(client: redis.Redis) -> bool:
    try:
        return client.ping()
    except (redis.ConnectionError, redis.TimeoutError):
        return False


def _live_view(service: Service, clients: list[Worker], seconds: float, live: bool, until_dead: bool) -> None:
    """Run the load for `seconds` (or until the primary dies), with a live line on a terminal."""
    from tqdm import tqdm
    bar = tqdm(total=None, desc="drill", file=sys.stderr, disable=not live, bar_format="{desc}: {postfix}")
    started, last_ops = time.monotonic(), 0
    deadline = started + seconds + (30 if until_dead else 0)
    try:
        while time.monotonic() < deadline:
            if not service.primary_alive():
                return
            if not until_dead and time.monotonic() - started >= seconds:
                return
            time.sleep(0.2)
            status = service.cluster.status("primary")
            ops = sum(w.ops for w in clients)
            bar.set_postfix_str(f"{status.get('checkpoints_per_s', 0):.0f} epochs/s, pause p50 "
                                f"{status.get('pause_us_p50', 0):.0f} us, {status.get('encoded_mb_per_s', 0):.2f} "
                                f"MB/s, {(ops - last_ops) * 5:.0f} ops/s")
            last_ops = ops
    finally:
        bar.close()


def format_report(report: dict) -> str:
    lines = [f"{'run':>3} {'kill point':<16} {'takeover':>9} {'epochs':>7} {'pause p50/p99 us':>17} "
             f"{'output p50/p99 ms':>18} {'requests':>9} {'acked':>6} {'lost':>5}  verified"]
    for r in report["per_run"]:
        takeover = f"{r['takeover_ms']:.0f} ms" if r["takeover_ms"] is not None else "-"
        lines.append(
            f"{r['run']:>3} {r['kill_point'][:16]:<16} {takeover:>9} {r['epochs_committed'] or 0:>7} "
            f"{r['pause_us_p50'] or 0:>8.0f}/{r['pause_us_p99'] or 0:<8.0f} "
            f"{(r['output_latency_us_p50'] or 0) / 1000:>8.1f}/{(r['output_latency_us_p99'] or 0) / 1000:<9.1f} "
            f"{r['requests_acknowledged']:>9} {r['acked_writes']:>6} {r['lost_writes']:>5}  "
            f"{'yes' if r['verified'] else 'NO'}")
        lines += [f"      {problem}" for problem in r["problems"]]
    if any(r["kill_point"].endswith("*") for r in report["per_run"]):
        lines.append("* the chosen point was not reached within the load: the primary was killed from outside")
    lines.append(f"{report['passed']} of {report['runs']} runs verified: "
                 + ("nothing acknowledged was lost" if not report["failed"] else "ACKNOWLEDGED WRITES WERE LOST"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="colo-drill", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="runs, each with another kill point")
    parser.add_argument("--seed", type=int, default=None, help="make the runs reproducible")
    parser.add_argument("--workers", type=int, default=4, help="redis-py client threads")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before a random kill")
    parser.add_argument("--kill-point", choices=KILL_POINTS, default=None,
                        help="always this kill point (default: random first, then every kind in turn)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--logs", default=None, help="keep the agents' logs in this folder")
    parser.add_argument("--etcd", default=None, metavar="URL[,URL...]",
                        help="the etcd that fences the pair (default: a local one the drill starts)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.workers < 1 or args.warmup < 0:
        parser.error("--runs and --workers must be at least 1, --warmup not negative")
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    log_dir = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="colo-drill-logs-"))
    keys = ensure_keys(log_dir / "keys")
    local_etcd = None
    if args.etcd is None:
        local_etcd = LocalEtcd(log_dir / "etcd")
        try:
            args.etcd = local_etcd.start()
        except ClusterError as exc:
            print(f"colo-drill: {exc} (or give --etcd URL)", file=sys.stderr)
            return 2
    try:
        return _runs(args, rng, seed, keys, log_dir)
    finally:
        if local_etcd is not None:
            local_etcd.stop()


def _runs(args: argparse.Namespace, rng: random.Random, seed: int, keys: Path, log_dir: Path) -> int:
    per_run = []
    for number in range(args.runs):
        point = args.kill_point or KILL_POINTS[number % len(KILL_POINTS)]
        if not args.json:
            print(f"run {number + 1}/{args.runs}: kill point {point}", file=sys.stderr)
        try:
            per_run.append(one_run(number + 1, point, rng, keys, args.workers, args.warmup, log_dir,
                                   live=not args.json and sys.stderr.isatty(), etcd=args.etcd))
        except RuntimeError as exc:               # a ClusterError, with its one-line reason
            per_run.append({"run": number + 1, "kill_point": point, "takeover_ms": None,
                            "epochs_committed": None, "pause_us_p50": None, "pause_us_p99": None,
                            "output_latency_us_p50": None, "output_latency_us_p99": None,
                            "requests_acknowledged": 0, "acked_writes": 0, "lost_writes": 0,
                            "verified": False, "problems": [f"the run failed: {getattr(exc, 'reason', exc)} (logs in {log_dir})"]})
    passed = sum(r["verified"] for r in per_run)
    report = {"runs": len(per_run), "passed": passed, "failed": len(per_run) - passed, "seed": seed,
              "logs": str(log_dir), "per_run": per_run}
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    if not args.json:
        print(f"seed {seed}; agents' logs in {log_dir}", file=sys.stderr)
    return 0 if report["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
