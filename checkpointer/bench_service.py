"""The benchmark's service section: redis-benchmark against redis-server and the kvstore guest, in one run.

    python -m checkpointer.bench --sections service [--requests N] [--clients C] [--quick] [--json]

The same `redis-benchmark -t set,get,incr -c C -n N --csv` runs, one after the other, against

1. a real `redis-server` (the floor: what a Redis-protocol server costs on this machine), on a
   free loopback port with no persistence (`--save '' --appendonly no`); skipped, with the
   reason, where it is not installed;
2. the kvstore guest unprotected: `colo-primary --workload kvstore` in its own process with no
   replica listening at its endpoint. That is the deployed primary before a replica has synced:
   the same process, guest, stream device and event loop as the protected run, its replies
   released at once (no replica to wait for) and no checkpoint taken, so protected/unprotected
   is the cost of protection alone. (Its dirty rings are on, as for any primary, but nothing
   resets them, so a page is logged once; and it retries the empty replica endpoint now and then.)
   The guest with no agent at all (checkpointer.guest run in this process) would also leave out
   the agent's event loop, which the protected guest pays for too, so it is not used here;
3. the kvstore guest protected: a `colo-replica` and a `colo-primary` in separate processes over
   loopback, as deployed (CURVE, default settings), fenced through a local etcd
   (checkpointer.cluster.LocalEtcd) where etcd is installed, else with `--no-fencing` and a note;
   the benchmark starts once the primary's status says it is protected.

Both kvstore runs get the same fencing flags (each pair its own key), so the replica is the only
difference between them. Per server: ops/s (every request of the three tests over their total
time, from redis-benchmark's CSV), p50 (the median of the three tests' p50) and p99 (the highest
of their p99s); the ratios protected/unprotected and unprotected/redis-server; and, for the
protected primary, its output-commit latency p50/p99 (the status file's `output_latency_us_*`:
the last 4096 replies it released, read after the benchmark), its checkpoints/s over the
benchmark and its pause p50. One run of each on a shared, noisy machine: compare ratios.

A server that fails (an agent exits, redis-benchmark outlasts its timeout) gets the reason in its
row and as `error` in the JSON, the others are still measured, and the exit status is 1; a server
that is not installed is `skipped`, with the reason.

This module runs the agents through checkpointer.cluster (processes by module name), never
imports them, and nothing from scenarios/: the kvstore reaches the primary as a guest spec.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .cluster import Cluster, ClusterError, LocalEtcd, free_port, terminate
from .frames import EpochReason

TESTS = ("SET", "GET", "INCR")                       # redis-benchmark's names for -t set,get,incr
DEFAULT_REQUESTS = 20000
QUICK_REQUESTS = 3000
DEFAULT_CLIENTS = 50
HOST = "127.0.0.1"
PING = b"*1\r\n$4\r\nPING\r\n"
PROTECTION_TIMEOUT_S = 180.0                         # start, initial sync, the standby key in etcd
REDIS_SERVER = "/usr/bin/redis-server"               # Debian's redis-server package


class BenchmarkError(RuntimeError):
    """redis-benchmark failed, hung, or printed what this parser does not understand."""


@dataclass(frozen=True)
class BenchmarkLine:
    """One redis-benchmark test's line of --csv output."""

    test: str
    ops_per_s: float
    p50_ms: float | None                 # None: a redis-benchmark too old to print latencies in --csv
    p99_ms: float | None


@dataclass(frozen=True)
class BenchmarkRun:
    """The three tests against one server, and the figures this section reports for it."""

    tests: dict[str, BenchmarkLine]

    @property
    def ops_per_s(self) -> float:
        """Every request over the tests' total time (each test sends the same -n requests)."""
        return len(self.tests) / sum(1.0 / t.ops_per_s for t in self.tests.values())

    @property
    def p50_ms(self) -> float | None:
        values = sorted(t.p50_ms for t in self.tests.values() if t.p50_ms is not None)
        return values[len(values) // 2] if values else None

    @property
    def p99_ms(self) -> float | None:
        values = [t.p99_ms for t in self.tests.values() if t.p99_ms is not None]
        return max(values) if values else None

    def as_dict(self) -> dict:
        return {"ops_per_s": self.ops_per_s, "p50_ms": self.p50_ms, "p99_ms": self.p99_ms,
                "tests": {name: {"ops_per_s": t.ops_per_s, "p50_ms": t.p50_ms, "p99_ms": t.p99_ms}
                          for name, t in self.tests.items()}}


def _number(row: dict, column: str, test: str) -> float | None:
    value = row.get(column)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        raise BenchmarkError(f"redis-benchmark's {test} line has {column} = {value!r}, not a number") from None


def parse_csv(text: str, tests: Sequence[str] = TESTS) -> BenchmarkRun:
    """redis-benchmark --csv output: a header ("test","rps",...,"p50_latency_ms",...,"p99_latency_ms",...)
    then a line per test (redis-benchmark 7). Without the header (redis-benchmark 6 prints only
    "TEST","RPS" lines) the latencies are None. Every test of `tests` must be there."""
    rows = [row for row in csv.reader(io.StringIO(text)) if row and any(cell.strip() for cell in row)]
    if rows and rows[0][0].strip().lower() == "test":
        header, rows = [cell.strip().lower() for cell in rows[0]], rows[1:]
    else:
        header = ["test", "rps"]
    found: dict[str, BenchmarkLine] = {}
    for cells in rows:
        row = dict(zip(header, (cell.strip() for cell in cells)))
        name = row.get("test", "").upper()
        if name not in tests:
            continue
        rps = _number(row, "rps", name)
        if not rps or rps <= 0:
            raise BenchmarkError(f"redis-benchmark's {name} line has no throughput: {cells}")
        found[name] = BenchmarkLine(name, rps, _number(row, "p50_latency_ms", name),
                                  _number(row, "p99_latency_ms", name))
    missing = [t for t in tests if t not in found]
    if missing:
        raise BenchmarkError(f"redis-benchmark printed no line for {', '.join(missing)}: {text.strip()[-500:]!r}")
    return BenchmarkRun({t: found[t] for t in tests})


def benchmark_timeout(requests: int) -> float:
    """Long enough for the three tests at 500 requests/s (the kvstore protected does about 1000 here)."""
    return 60.0 + len(TESTS) * requests / 500


def redis_benchmark(port: int, requests: int, clients: int, host: str = HOST) -> BenchmarkRun:
    """Run `redis-benchmark -t set,get,incr -c clients -n requests --csv` against host:port."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        raise BenchmarkError("redis-benchmark is not installed (Debian: apt-get install redis-tools)")
    timeout = benchmark_timeout(requests)
    command = [binary, "-h", host, "-p", str(port), "-t", ",".join(TESTS).lower(), "-c", str(clients),
               "-n", str(requests), "--csv"]
    try:
        done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"redis-benchmark -c {clients} -n {requests} did not finish within {timeout:.0f} s "
                             f"(a server that never answers some of its connections?)") from None
    if done.returncode != 0:
        raise BenchmarkError(f"redis-benchmark exited with status {done.returncode}: {done.stderr.strip()[-500:]}")
    return parse_csv(done.stdout)


def answers_ping(port: int, host: str = HOST) -> bool:
    """Whether host:port answers a RESP PING with +PONG (the connection is closed again)."""
    try:
        with socket.create_connection((host, port), timeout=1.0) as connection:
            connection.sendall(PING)
            return connection.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def redis_server_binary() -> str | None:
    """Debian's /usr/bin/redis-server, else one on PATH, else None."""
    return REDIS_SERVER if os.access(REDIS_SERVER, os.X_OK) else shutil.which("redis-server")


class RedisServer:
    """A real redis-server on a free loopback port, no persistence, in `folder`; stopped on exit."""

    def __init__(self, folder: Path, binary: str | None = None) -> None:
        self.folder = Path(folder)
        self.binary = binary or redis_server_binary()
        self.port = free_port(HOST)
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> int:
        if self.binary is None:
            raise BenchmarkError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.folder.mkdir(parents=True, exist_ok=True)
        log_path = self.folder / "redis-server.log"
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no",
                 "--daemonize", "no", "--dir", str(self.folder)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not answers_ping(self.port):
            if self.process.poll() is not None:
                raise BenchmarkError(f"redis-server exited with status {self.process.returncode}: "
                                     f"{log_path.read_text(errors='replace')[-1000:]}")
            if time.monotonic() > deadline:
                raise BenchmarkError(f"redis-server did not answer on port {self.port} within {timeout} s")
            time.sleep(0.02)
        return self.port

    def stop(self) -> None:
        terminate(self.process)
        self.process = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _status_with_time(cluster: Cluster, name: str) -> tuple[dict, float]:
    """The agent's status file and when it was written (the same file: it is replaced by rename)."""
    with open(cluster.status_path(name)) as handle:
        written = os.fstat(handle.fileno()).st_mtime
        return json.load(handle), written


def _kvstore_flags(port: int) -> list[str]:
    """The deployed primary's flags for the kvstore, nothing else changed from the defaults."""
    return ["--workload", "kvstore", "--service-port", str(port)]


def _run_unprotected(folder: Path, fencing: list[str], requests: int, clients: int) -> dict:
    with Cluster(folder, common=fencing) as cluster:
        port = free_port(HOST)
        cluster.start_primary(_kvstore_flags(port))       # nothing listens at the replica's endpoint
        cluster.wait("the unprotected kvstore's first status", lambda: cluster.status("primary"))
        cluster.wait("the unprotected kvstore's answer to PING", lambda: answers_ping(port))
        run = redis_benchmark(port, requests, clients)
        status = cluster.next_status("primary")
        if status.get("protected") or status.get("epochs"):
            raise BenchmarkError(f"the unprotected primary took checkpoints ({status.get('epochs')} epochs)")
        return run.as_dict()


def _run_protected(folder: Path, fencing: list[str], requests: int, clients: int) -> dict:
    with Cluster(folder, common=fencing) as cluster:
        port = free_port(HOST)
        cluster.start_replica()
        cluster.start_primary(_kvstore_flags(port))
        cluster.wait("the primary protected", lambda: cluster.status("primary").get("protected"),
                     timeout=PROTECTION_TIMEOUT_S)
        cluster.wait("the protected kvstore's answer to PING", lambda: answers_ping(port))
        cluster.next_status("primary")
        before, written_before = _status_with_time(cluster, "primary")
        run = redis_benchmark(port, requests, clients)
        cluster.next_status("primary")
        after, written_after = _status_with_time(cluster, "primary")
        if not after.get("protected"):
            raise BenchmarkError(f"the primary was not protected at the end: {after.get('protection')}")
        elapsed = written_after - written_before
        # A replica dropped and synced again within the run leaves a second sync epoch: the
        # figures then include time the guest ran unprotected, and the table says so.
        sync = str(EpochReason.SYNC)
        resyncs = after.get("reasons", {}).get(sync, 0) - before.get("reasons", {}).get(sync, 0)
        figures = run.as_dict()
        figures.update({
            "output_latency_p50_ms": after["output_latency_us_p50"] / 1000,
            "output_latency_p99_ms": after["output_latency_us_p99"] / 1000,
            "checkpoints_per_s": (after["epochs"] - before["epochs"]) / elapsed if elapsed > 0 else None,
            "pause_us_p50": after.get("pause_us_p50"), "pause_us_p99": after.get("pause_us_p99"),
            "pause_parts_us_p50": after.get("pause_parts_us_p50", {}),
            "reasons": after.get("reasons", {}), "resyncs": resyncs,
        })
        return figures


def _row(name: str, measure: Callable[[], dict], progress: Callable[[str], None]) -> dict:
    """One server's figures, or {"error": reason} (printed, the section goes on with the next)."""
    progress(f"  service: {name}...")
    try:
        return measure()
    except (BenchmarkError, ClusterError) as exc:
        reason = exc.reason if isinstance(exc, ClusterError) else str(exc)
        progress(f"  service: {name}: {exc}")
        return {"error": reason.splitlines()[0]}


def _fencing(folder: Path, notes: list[str], progress: Callable[[str], None]
             ) -> tuple[LocalEtcd | None, dict[str, list[str]] | None]:
    """A local etcd (if installed) and each kvstore run's fencing flags, a key per run; without
    etcd, --no-fencing. (None for the flags: etcd is installed but did not start; notes says why.)"""
    if shutil.which("etcd") is None:
        notes.append("etcd is not installed: both kvstore runs with --no-fencing (Debian: apt-get install "
                     "etcd-server)")
        progress(f"  service: note: {notes[-1]}")
        return None, {name: ["--no-fencing"] for name in ("unprotected", "protected")}
    etcd = LocalEtcd(folder / "etcd")
    try:
        url = etcd.start()
    except ClusterError as exc:
        etcd.stop()
        notes.append(f"the local etcd did not start: {exc.reason}")
        progress(f"  service: {notes[-1]}")
        return None, None
    notes.append(f"fenced by a local etcd ({url})")
    return etcd, {name: ["--etcd", url, "--etcd-key", f"/colo-ring/bench/{name}"]
                  for name in ("unprotected", "protected")}


def _ratio(top: float | None, bottom: float | None) -> float | None:
    return top / bottom if top and bottom else None


def run_service(requests: int = DEFAULT_REQUESTS, clients: int = DEFAULT_CLIENTS, logs: Path | None = None,
                progress: Callable[[str], None] | None = None) -> dict:
    """The section: every server measured in this run; the figures as `service` in the JSON.

    The agents' logs (and etcd's, redis-server's) go to `logs` if given, else to a temporary
    folder removed afterwards."""
    progress = progress or (lambda line: print(line, file=sys.stderr))
    folder = Path(logs) if logs is not None else Path(tempfile.mkdtemp(prefix="colo-bench-service-"))
    folder.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    rows: dict[str, dict] = {}
    etcd: LocalEtcd | None = None
    try:
        if shutil.which("redis-benchmark") is None:
            reason = "redis-benchmark is not installed (Debian: apt-get install redis-tools)"
            rows = {name: {"skipped": reason} for name in ("redis", "unprotected", "protected")}
        else:
            def redis() -> dict:
                with RedisServer(folder / "redis") as server:
                    return redis_benchmark(server.port, requests, clients).as_dict()
            if redis_server_binary() is None:
                rows["redis"] = {"skipped": "redis-server is not installed (Debian: apt-get install redis-server)"}
                progress(f"  service: redis-server skipped: {rows['redis']['skipped']}")
            else:
                rows["redis"] = _row("redis-server", redis, progress)
            etcd, fencing = _fencing(folder, notes, progress)
            if fencing is None:
                rows.update({name: {"error": notes[-1]} for name in ("unprotected", "protected")})
            else:
                rows["unprotected"] = _row("kvstore, unprotected", lambda: _run_unprotected(
                    folder / "unprotected", fencing["unprotected"], requests, clients), progress)
                rows["protected"] = _row("kvstore, protected", lambda: _run_protected(
                    folder / "protected", fencing["protected"], requests, clients), progress)
    finally:
        if etcd is not None:
            etcd.stop()
        if logs is None:
            shutil.rmtree(folder, ignore_errors=True)
    redis, unprotected, protected = rows["redis"], rows["unprotected"], rows["protected"]
    return {
        "redis_ops_per_s": redis.get("ops_per_s"),
        "unprotected_ops_per_s": unprotected.get("ops_per_s"),
        "protected_ops_per_s": protected.get("ops_per_s"),
        "protected_p50_ms": protected.get("p50_ms"),
        "protected_p99_ms": protected.get("p99_ms"),
        "output_latency_p50_ms": protected.get("output_latency_p50_ms"),
        "output_latency_p99_ms": protected.get("output_latency_p99_ms"),
        "protected_over_unprotected": _ratio(protected.get("ops_per_s"), unprotected.get("ops_per_s")),
        "unprotected_over_redis": _ratio(unprotected.get("ops_per_s"), redis.get("ops_per_s")),
        "requests": requests, "clients": clients, "notes": notes, "servers": rows,
    }


def _ms(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


def _times(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def format_service(result: dict) -> str:
    """The section's table, its ratios and the protected primary's own figures."""
    names = {"redis": "redis-server", "unprotected": "kvstore, unprotected", "protected": "kvstore, protected"}
    lines = [f"service: redis-benchmark -t set,get,incr -c {result['clients']} -n {result['requests']} "
             "against each, one run each, in this run",
             f"{'server':<22} {'ops/s':>8} " + " ".join(f"{t:>8}" for t in TESTS) + f" {'p50 ms':>8} {'p99 ms':>8}"]
    for key, name in names.items():
        row = result["servers"][key]
        if "ops_per_s" not in row:
            why = f"skipped: {row['skipped']}" if "skipped" in row else f"failed: {row['error']}"
            lines.append(f"{name:<22} {why}")
            continue
        tests = " ".join(f"{row['tests'][t]['ops_per_s']:>8.0f}" for t in TESTS)
        lines.append(f"{name:<22} {row['ops_per_s']:>8.0f} {tests} {_ms(row['p50_ms']):>8} {_ms(row['p99_ms']):>8}")
    lines.append(f"protected / unprotected {_times(result['protected_over_unprotected'])} (target >= 0.5); "
                 f"unprotected / redis-server {_times(result['unprotected_over_redis'])} (target >= 0.5)")
    protected = result["servers"]["protected"]
    if "ops_per_s" in protected:
        rate = protected.get("checkpoints_per_s")
        pause = protected.get("pause_us_p50")
        lines.append(f"protected primary: output-commit latency p50 {_ms(result['output_latency_p50_ms'])} ms, "
                     f"p99 {_ms(result['output_latency_p99_ms'])} ms (target 1 / 3 ms; its last 4096 replies); "
                     f"{rate or 0:.0f} checkpoints/s over the benchmark, pause p50 {pause or 0:.0f} us")
        if protected.get("resyncs"):
            lines.append(f"WARNING: the primary lost its replica and synced again {protected['resyncs']} time(s) "
                         "during the benchmark: the protected figures include unprotected time")
    lines += [f"note: {note}" for note in result["notes"]]
    lines.append("ops/s: every request of the three tests over their total time; p50: the median of the "
                 "tests' p50s; p99: the highest test's p99")
    return "\n".join(lines)


__all__ = ["BenchmarkError", "BenchmarkRun", "BenchmarkLine", "parse_csv", "redis_benchmark", "RedisServer",
           "redis_server_binary", "answers_ping", "run_service", "format_service", "DEFAULT_REQUESTS", "QUICK_REQUESTS",
           "DEFAULT_CLIENTS", "TESTS"]
