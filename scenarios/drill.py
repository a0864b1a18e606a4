"""colo-drill: strike the active node of a protected Redis-protocol service and prove from the clients'
side that nothing acknowledged was lost and that no two nodes were ever active at once.

Each run starts a pair of colo-node processes (pair.node) on loopback, CURVE on, fenced by an etcd
(the drill's own, in a temporary folder, unless --etcd names one), with their replication link
through the drill's LinkProxy (scenarios/linkproxy.py). redis-py workers (scenarios/clients.py) find
the active node through the pair's Sentinel endpoints only, SET, INCR and GET their own keys, and
remember every reply and which node gave it. Then the drill strikes the primary with the fault,
waits for the pair to protect itself again (the struck node rejoins), and strikes the new primary,
`--cycles` times. At the end it reads every key back from the active node:

- a run passes when every key holds the value of its last acknowledged SET (or of a SET sent after
  it, whose reply was lost), every counter is at least its last acknowledged INCR and at most the
  increments sent, and no node acknowledged a request sent after a node of a newer fencing token
  had answered one (`dual_active`);
- faults: `kill` (SIGKILL at a kill point of the epoch protocol, or at random), `freeze` (SIGSTOP
  past the lease, then SIGCONT), `partition` (the link between the nodes cut past the lease: both
  still reach etcd), `slow` (the link limited to a trickle), `etcd-down` (etcd stopped past the
  lease, then started again); `all` takes them in turn.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from checkpointer.cluster import Cluster, ClusterError, LocalEtcd, free_port
from checkpointer.security import generate_keys

from pair.node import PairNode, pair_file

from .clients import Eras, Worker, dual_active, one_try
from .drill_node import died_file
from .linkproxy import LinkProxy

FAULTS = ("kill", "freeze", "partition", "slow", "etcd-down")
KILL_POINTS = ("random", "transfer", "after-end", "heavy-output", "between")
NODES = ("a", "b")
GUEST = {"workload": "kvstore", "vcpus": 1, "memory_mib": 64, "report_every": 50}   # the drills' guest
TTL_S = 1                        # the pair's lease (etcd grants whole seconds)
RENEW_MS = 100
HEARTBEAT_MS = 20
TIMEOUT_MS = 500                 # silence after which a peer is gone
SLOW_BYTES_PER_S = 256 << 10     # the `slow` fault's link
FAULT_HOLD_S = TTL_S + TIMEOUT_MS / 1000 + 1.0   # how long a freeze, a cut or etcd's absence lasts


class Pair:
    """Two drill nodes (colo-node with a kill switch) on loopback, their link proxies, one etcd key."""

    def __init__(self, folder: Path, logs: Path, etcd: str, key: str) -> None:
        self.cluster = Cluster(folder, logs=logs)
        keys = folder / "node-keys"
        for name in NODES:
            generate_keys(keys, name)
        self.eras = Eras()
        self.services = {name: free_port() for name in NODES}
        self.sentinels = {name: ("127.0.0.1", free_port()) for name in NODES}
        self.proxies: dict[str, LinkProxy] = {}
        nodes = []
        for name in NODES:
            listen, advertised = free_port(), free_port()
            self.proxies[name] = LinkProxy(("127.0.0.1", advertised), ("127.0.0.1", listen)).start()
            nodes.append(PairNode(name, f"tcp://127.0.0.1:{advertised}", "127.0.0.1", self.services[name],
                                  self.sentinels[name], listen=f"tcp://127.0.0.1:{listen}"))
        self.file = folder / "pair.toml"
        self.file.write_text(pair_file({
            "guest": GUEST, "replication": {"heartbeat_ms": HEARTBEAT_MS, "timeout_ms": TIMEOUT_MS},
            "security": {"keys_dir": str(keys)},
            "fencing": {"etcd": etcd, "key": key, "ttl_s": TTL_S, "renew_ms": RENEW_MS}}, nodes))

    @property
    def addresses(self) -> dict[tuple[str, int], str]:
        return {("127.0.0.1", port): name for name, port in self.services.items()}

    def kill_file(self, name: str) -> Path:
        """Where the drill writes POINT:N before it arms `name`'s kill switch."""
        return self.cluster.folder / f"{name}.kill"

    def start(self, name: str) -> None:
        self.cluster.start_process(name, "scenarios.drill_node", [
            "--config", str(self.file), "--name", name, "--status-json", str(self.cluster.status_path(name))],
            harness_args=["--kill-file", str(self.kill_file(name))])

    def running(self, name: str) -> bool:
        return self.cluster.agents[name].running()

    def status(self, name: str) -> dict:
        status = self.cluster.status(name) if self.running(name) else {}
        self.eras.observe(status)
        return status

    def primary(self) -> str | None:
        """The node whose status says it is the primary, protected or not."""
        roles = {name: self.status(name).get("node_role") for name in NODES if name in self.cluster.agents}
        primaries = [name for name, role in roles.items() if role == "primary"]
        return primaries[0] if len(primaries) == 1 else None

    def protected_by(self, name: str) -> bool:
        other = next(n for n in NODES if n != name)
        mine = self.status(name)
        return (mine.get("node_role") == "primary" and bool(mine.get("protected"))
                and self.status(other).get("node_role") == "replica")

    def wait(self, what: str, predicate: Callable[[], object], timeout: float = 90.0):
        return self.cluster.wait(what, predicate, timeout=timeout, may_exit=NODES)

    def cut(self, cut: bool) -> None:
        """Cut the link between the nodes (True) or heal it (False)."""
        for proxy in self.proxies.values():
            proxy.cut() if cut else proxy.heal()

    def slow(self, bytes_per_s: float | None) -> None:
        for proxy in self.proxies.values():
            proxy.slow(bytes_per_s)

    def close(self) -> None:
        self.cluster.stop(timeout=10)
        for proxy in self.proxies.values():
            proxy.close()


def strike(pair: Pair, fault: str, point: str, rng: random.Random, etcd: LocalEtcd | None,
           warmup: float) -> dict:
    """Strike the primary once; return what it cost: takeover_ms (None: no takeover), reprotect_s."""
    primary = pair.wait("a primary", pair.primary)
    other = next(n for n in NODES if n != primary)
    process = pair.cluster.agents[primary].process
    started = time.monotonic()
    struck = point if fault == "kill" else "-"
    takeover_ms = from_crash_ms = None
    if fault == "kill":
        death_note = died_file(pair.kill_file(primary))
        death_note.unlink(missing_ok=True)
        if point == "random":
            time.sleep(rng.random() * warmup)       # the fault's moment, at random
            died = time.time()
            pair.cluster.kill(primary)
        else:
            pair.kill_file(primary).write_text(f"{point}:{rng.randrange(20, 60)}")
            process.send_signal(signal.SIGUSR2)     # arm its kill switch (SIGUSR1 kicks vCPUs)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:       # the point was not reached: killed from outside
                struck = f"{point}*"
            died = float(death_note.read_text()) if death_note.exists() else time.time()
            pair.cluster.kill(primary)
        pair.wait(f"{other} to take over", lambda: pair.status(other).get("node_role") == "primary")
        status = pair.status(other)
        takeover_ms = status.get("takeover_ms")
        if status.get("took_over_at") is not None:
            from_crash_ms = (status["took_over_at"] - died) * 1000
        pair.start(primary)                         # the lost node rejoins
    elif fault == "freeze":
        process.send_signal(signal.SIGSTOP)
        try:
            pair.wait(f"{other} to take over from the frozen {primary}",
                      lambda: pair.status(other).get("node_role") == "primary")
        finally:
            process.send_signal(signal.SIGCONT)
        takeover_ms = pair.status(other).get("takeover_ms")
    elif fault == "partition":
        pair.cut(True)
        time.sleep(FAULT_HOLD_S)                    # the fault's length
        pair.cut(False)
    elif fault == "slow":
        pair.slow(SLOW_BYTES_PER_S)
        time.sleep(FAULT_HOLD_S)                    # the fault's length
        pair.slow(None)
    elif fault == "etcd-down":
        etcd.stop()
        time.sleep(FAULT_HOLD_S)                    # the fault's length
        etcd.start()
    pair.wait("the pair protected again", lambda: any(pair.protected_by(n) for n in NODES))
    return {"kill_point": struck, "takeover_ms": takeover_ms, "from_crash_ms": from_crash_ms,
            "reprotect_s": time.monotonic() - started}


def one_run(number: int, fault: str, points: list[str], cycles: int, rng: random.Random, workers: int,
            warmup: float, log_dir: Path, live: bool, etcd_url: str, etcd: LocalEtcd | None) -> dict:
    """One drill run: a fresh pair, the load, `cycles` strikes (a kill takes `points` in turn), the verdicts."""
    run_logs = log_dir / f"run{number}"
    run_logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="colo-drill-") as tmp:
        pair = Pair(Path(tmp), run_logs, etcd_url, f"/colo-drill/{os.getpid()}/run{number}")
        stop = threading.Event()
        clients: list[Worker] = []
        threads: list[threading.Thread] = []
        try:
            pair.start("a")
            pair.wait("a to boot the fresh pair", lambda: pair.status("a").get("node_role") == "primary")
            pair.start("b")
            pair.wait("protection", lambda: pair.protected_by("a"))
            clients = [Worker(i, list(pair.sentinels.values())) for i in range(workers)]
            threads = [threading.Thread(target=w.run, args=(stop, rng.getrandbits(32)), daemon=True) for w in clients]
            for thread in threads:
                thread.start()
            strikes = []
            for cycle in range(cycles):
                _live_view(pair, clients, warmup, live, f"run {number} {fault} {cycle + 1}/{cycles}")
                before = pair.status(pair.primary() or "a")
                point = points[cycle % len(points)]
                strikes.append(strike(pair, fault, point, rng, etcd, warmup) | {"before": before})
            _live_view(pair, clients, min(warmup, 1.0), live, f"run {number} after")
            stop.set()
            for thread in threads:
                thread.join(30)
            active = pair.wait("the active node", pair.primary)
            reader = one_try(host="127.0.0.1", port=pair.services[active], socket_timeout=10)
            acked = lost = 0
            problems: list[str] = []
            for worker in clients:
                a, missing, issues = worker.verify(reader)
                acked, lost, problems = acked + a, lost + missing, problems + issues
            reader.close()
            for name in NODES:
                pair.status(name)
            dual = dual_active([a for w in clients for a in w.acks], pair.eras.eras, pair.addresses)
            before = strikes[0]["before"] if strikes else {}
            takeovers = [s["takeover_ms"] for s in strikes if s["takeover_ms"] is not None]
            return {"run": number, "fault": fault, "kill_point": ",".join(sorted({s["kill_point"] for s in strikes})),
                    "cycles": cycles, "takeover_ms": statistics.median(takeovers) if takeovers else None,
                    "takeovers_ms": takeovers,
                    "from_crash_ms": [round(s["from_crash_ms"], 1) for s in strikes
                                      if s.get("from_crash_ms") is not None],
                    "reprotect_s": [round(s["reprotect_s"], 3) for s in strikes],
                    "pause_us_p50": before.get("pause_us_p50"), "pause_us_p99": before.get("pause_us_p99"),
                    "output_latency_us_p50": before.get("output_latency_us_p50"),
                    "output_latency_us_p99": before.get("output_latency_us_p99"),
                    "requests_acknowledged": sum(w.ops for w in clients), "acked_writes": acked,
                    "lost_writes": lost, "dual_active": bool(dual), "verified": not problems and not dual,
                    "problems": (dual + problems)[:10]}
        finally:
            stop.set()
            pair.close()


def _live_view(pair: Pair, clients: list[Worker], seconds: float, live: bool, label: str) -> None:
    """Run the load for `seconds`, with a live line on a terminal."""
    from tqdm import tqdm
    bar = tqdm(total=None, desc=label, file=sys.stderr, disable=not live, bar_format="{desc}: {postfix}")
    deadline, last_ops = time.monotonic() + seconds, sum(w.ops for w in clients)
    try:
        while time.monotonic() < deadline:
            time.sleep(0.2)                          # the load runs meanwhile: this is its length
            primary = pair.primary()
            status = pair.status(primary) if primary else {}
            ops = sum(w.ops for w in clients)
            bar.set_postfix_str(f"primary {primary} ({status.get('protection', '?')}), "
                                f"{status.get('checkpoints_per_s', 0):.0f} epochs/s, pause p50 "
                                f"{status.get('pause_us_p50', 0):.0f} us, {(ops - last_ops) * 5:.0f} ops/s")
            last_ops = ops
    finally:
        bar.close()


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summarize(per_run: list[dict]) -> dict:
    takeovers = [t for r in per_run for t in r.get("takeovers_ms", [])]
    reprotects = [t for r in per_run for t in r.get("reprotect_s", [])]
    from_crash = [t for r in per_run for t in r.get("from_crash_ms", [])]
    return {"runs": len(per_run), "verified": sum(r["verified"] for r in per_run),
            "lost_writes": sum(r["lost_writes"] for r in per_run),
            "dual_active": sum(r["dual_active"] for r in per_run),
            "takeover_ms_p50": _percentile(takeovers, 50), "takeover_ms_p99": _percentile(takeovers, 99),
            "from_crash_ms_p50": _percentile(from_crash, 50), "from_crash_ms_p99": _percentile(from_crash, 99),
            "reprotect_s_p50": _percentile(reprotects, 50), "reprotect_s_p99": _percentile(reprotects, 99),
            "takeover_ms_by_fault": {fault: {"p50": _percentile(times, 50), "p99": _percentile(times, 99),
                                             "strikes": len(times)}
                                     for fault in FAULTS
                                     if (times := [t for r in per_run if r["fault"] == fault
                                                   for t in r.get("takeovers_ms", [])])}}


def summary_line(summary: dict) -> str:
    def figure(value, unit: str, digits: int = 0) -> str:
        return "-" if value is None else f"{value:.{digits}f} {unit}"
    return (f"{summary['verified']} of {summary['runs']} runs verified, {summary['lost_writes']} lost writes, "
            f"{summary['dual_active']} dual-active; takeover p50 {figure(summary['takeover_ms_p50'], 'ms')} "
            f"p99 {figure(summary['takeover_ms_p99'], 'ms')}"
            + (f" (from the crash: p50 {figure(summary['from_crash_ms_p50'], 'ms')} p99 "
               f"{figure(summary['from_crash_ms_p99'], 'ms')})" if summary.get("from_crash_ms_p50") is not None else "")
            + "; re-protection p50 "
            f"{figure(summary['reprotect_s_p50'], 's', 2)} p99 {figure(summary['reprotect_s_p99'], 's', 2)}")


def format_report(report: dict) -> str:
    lines = [f"{'run':>3} {'fault':<9} {'kill point':<14} {'takeover':>9} {'re-protect s':>13} "
             f"{'pause p50/p99 us':>17} {'requests':>9} {'acked':>6} {'lost':>5} {'dual':>5}  verified"]
    for r in report["per_run"]:
        takeover = f"{r['takeover_ms']:.0f} ms" if r.get("takeover_ms") is not None else "-"
        reprotect = "/".join(f"{s:.1f}" for s in r.get("reprotect_s", [])) or "-"
        lines.append(
            f"{r['run']:>3} {r['fault']:<9} {r['kill_point'][:14]:<14} {takeover:>9} {reprotect[:13]:>13} "
            f"{r['pause_us_p50'] or 0:>8.0f}/{r['pause_us_p99'] or 0:<8.0f} {r['requests_acknowledged']:>9} "
            f"{r['acked_writes']:>6} {r['lost_writes']:>5} {'YES' if r['dual_active'] else 'no':>5}  "
            f"{'yes' if r['verified'] else 'NO'}")
        lines += [f"      {problem}" for problem in r["problems"]]
    if any("*" in r["kill_point"] for r in report["per_run"]):
        lines.append("* the chosen point was not reached within 30 s: the node was killed from outside")
    for fault, figures in report["summary"]["takeover_ms_by_fault"].items():
        lines.append(f"takeover after {fault}: p50 {figures['p50']:.0f} ms, p99 {figures['p99']:.0f} ms "
                     f"({figures['strikes']} strikes)")
    lines.append(summary_line(report["summary"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="colo-drill", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=None,
                        help="runs, each with a fresh pair (default 1; with --fault all, one per fault)")
    parser.add_argument("--fault", choices=(*FAULTS, "all"), default="kill",
                        help="what strikes the primary (all: each in turn, run by run)")
    parser.add_argument("--cycles", type=int, default=1,
                        help="strikes per run: after each, the pair protects itself again and the new primary is struck")
    parser.add_argument("--seed", type=int, default=None, help="make the runs reproducible")
    parser.add_argument("--workers", type=int, default=4, help="redis-py client threads")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each strike")
    parser.add_argument("--kill-point", choices=KILL_POINTS, default=None,
                        help="kill: always this point (default: random first, then every kind in turn)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--logs", default=None, help="keep the nodes' logs in this folder")
    parser.add_argument("--etcd", default=None, metavar="URL[,URL...]",
                        help="the etcd that fences the pair (default: a local one the drill starts)")
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = len(FAULTS) if args.fault == "all" else 1
    if args.runs < 1 or args.workers < 1 or args.cycles < 1 or args.warmup < 0:
        parser.error("--runs, --cycles and --workers must be at least 1, --warmup not negative")
    if args.etcd is not None and args.fault in ("etcd-down", "all"):
        parser.error(f"--fault {args.fault} stops etcd: it needs the drill's own (leave out --etcd)")
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    log_dir = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="colo-drill-logs-"))
    etcd = None
    if args.etcd is None:
        etcd = LocalEtcd(log_dir / "etcd")
        try:
            args.etcd = etcd.start()
        except ClusterError as exc:
            print(f"colo-drill: {exc} (or give --etcd URL)", file=sys.stderr)
            return 2
    try:
        return _runs(args, rng, seed, log_dir, etcd)
    finally:
        if etcd is not None:
            etcd.stop()


def _runs(args: argparse.Namespace, rng: random.Random, seed: int, log_dir: Path, etcd: LocalEtcd | None) -> int:
    from tqdm import tqdm
    live = not args.json and sys.stderr.isatty()
    per_run = []
    bar = tqdm(total=args.runs, desc="drill", file=sys.stderr, disable=args.runs < 2 or not live)
    for number in range(1, args.runs + 1):
        fault = FAULTS[(number - 1) % len(FAULTS)] if args.fault == "all" else args.fault
        # kill points: random first, then every kind in turn, strike after strike, kill run after kill run
        kill_runs_before = (number - 1) // len(FAULTS) if args.fault == "all" else number - 1
        start = kill_runs_before * args.cycles
        points = [args.kill_point] if args.kill_point else \
            [KILL_POINTS[(start + i) % len(KILL_POINTS)] for i in range(args.cycles)]
        point = ",".join(points)
        if not args.json and not live:
            print(f"run {number}/{args.runs}: {fault}" + (f" at {point}" if fault == "kill" else ""),
                  file=sys.stderr)
        try:
            per_run.append(one_run(number, fault, points, args.cycles, rng, args.workers, args.warmup, log_dir,
                                   live and args.runs < 2, args.etcd, etcd))
        except RuntimeError as exc:               # a ClusterError, with its one-line reason
            per_run.append({"run": number, "fault": fault, "kill_point": point, "cycles": args.cycles,
                            "takeover_ms": None, "takeovers_ms": [], "reprotect_s": [],
                            "pause_us_p50": None, "pause_us_p99": None, "output_latency_us_p50": None,
                            "output_latency_us_p99": None, "requests_acknowledged": 0, "acked_writes": 0,
                            "lost_writes": 0, "dual_active": False, "verified": False,
                            "problems": [f"the run failed: {getattr(exc, 'reason', exc)} (logs in {log_dir})"]})
        bar.update(1)
        bar.set_postfix_str(summary_line(summarize(per_run)))
    bar.close()
    summary = summarize(per_run)
    report = {"runs": len(per_run), "passed": summary["verified"], "failed": len(per_run) - summary["verified"],
              "seed": seed, "logs": str(log_dir), "summary": summary, "per_run": per_run}
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    if not args.json:
        print(f"seed {seed}; the nodes' logs in {log_dir}", file=sys.stderr)
    return 0 if report["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
