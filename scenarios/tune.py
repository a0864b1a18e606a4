"""colo-tune: choose the checkpoint threshold from measurements of your own workload.

It runs the protected service (a replica and a primary as processes, the drill's redis-py load) and
sweeps the settings that close an epoch: the dirty ring's size (a new primary per size), the
VM-wide dirty-page threshold and the longest interval (changed at run time through the primary's
control interface, without a restart). For each setting it measures pause p50/p99, checkpoints/s,
output-commit latency p50/p99, raw and encoded bandwidth, the replica's apply time, and the clients'
throughput against the same load unprotected (the slowdown). It recommends the setting that meets
the latency objective with the least overhead, prints why and the TOML to paste, and writes a
table, a JSON file and a PNG plot. A model fitted from the sweep (scenarios/tune_model.py) predicts
pause and bandwidth for thresholds and dirty rates not measured (`--predict`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import zmq

from checkpointer.cluster import Cluster, ClusterError, endpoint, ensure_keys, free_port

from .clients import Worker
from .tune_model import PRIOR_PER_PAGE_US, model_report, parse_predict, recommend, toml_snippet

QUICK = {"rings": [1024], "dirty_pages": [64, 256, 768], "intervals_ms": [5.0, 20.0],
         "output_delays_ms": [0.5, 4.0, 16.0]}
FULL = {"rings": [256, 1024, 4096, 16384, 65536], "dirty_pages": [32, 64, 128, 256, 512, 1024, 2048],
        "intervals_ms": [2.0, 5.0, 10.0, 20.0, 50.0], "output_delays_ms": [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]}


class Control:
    """The primary's control interface (JSON over REQ/REP)."""

    def __init__(self, endpoint: str) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.REQ)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVTIMEO, 10000)
        self.socket.connect(endpoint)

    def ask(self, request: dict) -> dict:
        self.socket.send(json.dumps(request).encode())
        reply = json.loads(self.socket.recv())
        if not reply.get("ok"):
            raise RuntimeError(f"the primary refused {request}: {reply.get('error')}")
        return reply

    def close(self) -> None:
        self.socket.close()
        self.context.term()


@dataclass
class Service:
    """The kvstore under measurement: a replica and a primary as processes (manual: no fencing,
    no failover), and where the primary serves."""

    cluster: Cluster
    primary_port: int


def start_service(folder: Path, keys: Path, logs: Path, primary_flags: Sequence[str] = (),
                  with_replica: bool = True) -> Service:
    """A replica (unless `with_replica` is false: the primary then runs its guest alone) and a
    primary running the kvstore guest."""
    cluster = Cluster(folder, keys=keys, logs=logs, common=["--heartbeat-ms", "50", "--timeout-ms", "500"])
    service = Service(cluster, free_port())
    if with_replica:
        cluster.start_replica()
    cluster.start_primary(["--workload", "kvstore", "--service-port", str(service.primary_port), "--vcpus", "1",
                           "--memory-mib", "64", "--report-every", "50", *primary_flags])
    return service


def _load(service: Service, workers: int, stop: threading.Event) -> list[Worker]:
    clients = [Worker(i, fixed=("127.0.0.1", service.primary_port)) for i in range(workers)]
    for number, client in enumerate(clients):
        threading.Thread(target=client.run, args=(stop, number), daemon=True).start()
    return clients


def _work_done(control: Control | None, service: Service, clients: list[Worker]) -> float:
    """Client operations (the service), or the guest's own progress counter (a dirtying workload)."""
    if clients:
        return float(sum(c.ops for c in clients))
    if control is not None:
        return float(control.ask({"get": "status"})["status"]["guest_progress"])
    return float(service.cluster.status("primary").get("guest_progress", 0))


def _measure(control: Control, service: Service, clients: list[Worker], seconds: float) -> dict:
    control.ask({"reset": "stats"})
    ops0, t0 = _work_done(control, service, clients), time.monotonic()
    time.sleep(seconds)                                   # the measurement window itself
    ops1, t1 = _work_done(control, service, clients), time.monotonic()
    status = control.ask({"get": "status"})["status"]
    replica = service.cluster.status("replica")
    return {"pause_us_p50": status["pause_us_p50"], "pause_us_p99": status["pause_us_p99"],
            "checkpoints_per_s": status["checkpoints_per_s"], "dirty_pages": status["dirty_pages_p50"],
            "raw_mb_per_s": status["raw_mb_per_s"], "encoded_mb_per_s": status["encoded_mb_per_s"],
            "output_latency_us_p50": status["output_latency_us_p50"],
            "output_latency_us_p99": status["output_latency_us_p99"],
            "apply_us_p50": replica.get("apply_us_p50", 0.0), "ops_per_s": (ops1 - ops0) / (t1 - t0),
            "overhead": status["checkpoints_per_s"] * status["pause_us_p50"] / 1e6,
            "reasons": status.get("reasons", {})}


def sweep(grid: dict, seconds: float, workers: int, log_dir: Path, progress=print,
          workload: str = "kvstore") -> dict:
    """Measure every setting of `grid`; returns {"baseline_ops_per_s", "settings"}.

    The service is measured by its clients' operations/s; a dirtying workload by its own progress
    counter (writes/s), with no clients and no output trigger to speak of.
    """
    service_workload = workload == "kvstore"
    guest_flags = [] if service_workload else ["--workload", workload, "--report-every", "0"]
    if not service_workload:
        workers = 0
        grid = {**grid, "output_delays_ms": []}
    keys = ensure_keys(log_dir / "keys")
    settings = []
    with tempfile.TemporaryDirectory(prefix="colo-tune-") as tmp:
        # the same load, unprotected (no replica: the primary runs its guest alone)
        service = start_service(Path(tmp), keys, log_dir, primary_flags=guest_flags, with_replica=False)
        cluster = service.cluster
        stop = threading.Event()
        try:
            cluster.wait("the unprotected guest", lambda: cluster.status("primary").get("mode"))
            clients = _load(service, workers, stop)
            time.sleep(1.0)
            ops0, t0 = _work_done(None, service, clients), time.monotonic()
            time.sleep(max(seconds, 2.0))                # the status file is rewritten every second
            baseline = (_work_done(None, service, clients) - ops0) / (time.monotonic() - t0)
        finally:
            stop.set()
            cluster.stop(timeout=10)
        progress(f"unprotected: {baseline:.0f} {'ops' if service_workload else 'writes'}/s")
        for ring in grid["rings"]:
            control_endpoint = endpoint()
            service = start_service(Path(tmp), keys, log_dir,
                                    primary_flags=[*guest_flags, "--ring-entries", str(ring), "--control",
                                                   control_endpoint])
            cluster = service.cluster
            stop = threading.Event()
            control = None
            try:
                cluster.wait("protection", lambda: cluster.status("primary").get("protected"))
                control = Control(control_endpoint)
                clients = _load(service, workers, stop)
                candidates = [("ring", {"dirty_pages": 0, "max_interval_ms": 0.0, "ring_full": True})]
                candidates += [("dirty", {"dirty_pages": d, "max_interval_ms": 0.0}) for d in grid["dirty_pages"]
                               if d + 64 < ring]
                candidates += [("interval", {"dirty_pages": 0, "max_interval_ms": i}) for i in grid["intervals_ms"]]
                # A service closes most epochs because a reply waits for its ack: how long the output
                # trigger lets replies gather is the knob between latency and overhead there.
                candidates += [("output", {"dirty_pages": 0, "max_interval_ms": 0.0, "output_delay_ms": o})
                               for o in grid["output_delays_ms"]]
                for kind, triggers in candidates:
                    control.ask({"set": {"output_delay_ms": 1.0, **triggers}})
                    measured = _measure(control, service, clients, seconds)
                    name = {"ring": f"ring {ring}", "dirty": f"ring {ring}, {triggers['dirty_pages']} pages",
                            "interval": f"ring {ring}, {triggers['max_interval_ms']:g} ms",
                            "output": f"ring {ring}, output +{triggers.get('output_delay_ms', 1.0):g} ms"}[kind]
                    setting = {"name": name, "kind": kind, "ring_entries": ring,
                               "dirty_pages_trigger": triggers["dirty_pages"],
                               "max_interval_ms": triggers["max_interval_ms"],
                               "output_delay_ms": triggers.get("output_delay_ms", 1.0), **measured,
                               "slowdown": baseline / measured["ops_per_s"] if measured["ops_per_s"] else None}
                    settings.append(setting)
                    progress(f"{name}: pause p50 {setting['pause_us_p50']:.0f} us, output p99 "
                             f"{setting['output_latency_us_p99'] / 1000:.1f} ms, {setting['ops_per_s']:.0f} ops/s")
            finally:
                stop.set()
                if control is not None:
                    control.close()
                cluster.stop(timeout=10)
    return {"baseline_ops_per_s": baseline, "settings": settings}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    settings = [s for s in result["settings"] if s["dirty_pages"] and s["kind"] != "output"]
    delays = sorted((s for s in result["settings"] if s["kind"] == "output"), key=lambda s: s["output_delay_ms"])
    best = result.get("recommended")
    fig, (left, right, third) = plt.subplots(1, 3, figsize=(15, 4.2))
    if delays:
        x = [s["output_delay_ms"] for s in delays]
        third.plot(x, [s["output_latency_us_p99"] / 1000 for s in delays], marker="o", label="output p99 (ms)")
        third.plot(x, [s["overhead"] * 100 for s in delays], marker="s", label="overhead %")
        third.plot(x, [s["checkpoints_per_s"] / 10 for s in delays], marker="^", label="checkpoints/s / 10")
        if best and best["kind"] == "output":
            third.axvline(best["output_delay_ms"], color="red", alpha=0.4, label=f"recommended: {best['name']}")
        third.set_xscale("log")
        third.set_xlabel("output trigger delay (ms)")
        third.set_title("the service's knob: how long replies gather", fontsize=10)
        third.legend(fontsize=7)
        third.grid(alpha=0.3)
    for kind, marker in (("ring", "s"), ("dirty", "o"), ("interval", "^")):
        chosen = sorted((s for s in settings if s["kind"] == kind), key=lambda s: s["dirty_pages"])
        if not chosen:
            continue
        x = [s["dirty_pages"] for s in chosen]
        left.plot(x, [s["pause_us_p99"] / 1000 for s in chosen], marker=marker, label=f"pause p99 ({kind})")
        left.plot(x, [s["output_latency_us_p99"] / 1000 for s in chosen], marker=marker, linestyle="--",
                  label=f"output p99 ({kind})")
        right.plot(x, [s["overhead"] * 100 for s in chosen], marker=marker, label=f"overhead % ({kind})")
        right.plot(x, [s["encoded_mb_per_s"] for s in chosen], marker=marker, linestyle="--",
                   label=f"encoded MB/s ({kind})")
    if best:
        left.axvline(best["dirty_pages"], color="red", alpha=0.4)
        right.axvline(best["dirty_pages"], color="red", alpha=0.4, label=f"recommended: {best['name']}")
    for axis, title in ((left, "latency (ms) against dirty pages per epoch"),
                        (right, "overhead and bandwidth against dirty pages per epoch")):
        axis.set_xscale("log")
        axis.set_xlabel("dirty pages per epoch (measured p50)")
        axis.set_title(title, fontsize=10)
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(result: dict) -> str:
    lines = [f"{'setting':<24} {'dirty':>6} {'ckpt/s':>7} {'pause p50/p99 us':>17} {'output p50/p99 ms':>18} "
             f"{'raw/enc MB/s':>13} {'apply us':>8} {'ops/s':>7} {'slowdown':>8}"]
    for s in result["settings"]:
        lines.append(f"{s['name']:<24} {s['dirty_pages']:>6.0f} {s['checkpoints_per_s']:>7.0f} "
                     f"{s['pause_us_p50']:>8.0f}/{s['pause_us_p99']:<8.0f} "
                     f"{s['output_latency_us_p50'] / 1000:>8.1f}/{s['output_latency_us_p99'] / 1000:<9.1f} "
                     f"{s['raw_mb_per_s']:>6.1f}/{s['encoded_mb_per_s']:<6.2f} {s['apply_us_p50']:>8.0f} "
                     f"{s['ops_per_s']:>7.0f} {s['slowdown'] or 0:>7.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="colo-tune", description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=("kvstore", "uniform", "hotcold", "sequential"),
                        default="kvstore", help="the guest: the drill's service under client load (default) "
                                                "or a dirtying workload")
    parser.add_argument("--slo-latency-ms", type=float, default=10.0, help="output latency p99 objective")
    parser.add_argument("--max-overhead", type=float, default=20.0, help="largest share of time paused, %%")
    parser.add_argument("--quick", action="store_true", help="a small sweep (under a minute)")
    parser.add_argument("--seconds", type=float, default=None, help="measurement per setting")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--out", default="colo-tune-report", help="folder for tune.json and tune.png")
    parser.add_argument("--json", action="store_true", help="print the JSON report to standard output")
    parser.add_argument("--predict", default=None, metavar="PAGES[,PAGES...][@RATE]",
                        help="also predict settings not measured (dirty pages, optional dirty rate pages/s)")
    parser.add_argument("--from-status", default=None, metavar="FILE",
                        help="read a running primary's status file and suggest a change (no sweep)")
    parser.add_argument("--prior-per-page-us", type=float, default=PRIOR_PER_PAGE_US, metavar="US",
                        help="the per-page pause cost to assume when the sweep cannot fit it (its epochs "
                             f"all about the same size; default {PRIOR_PER_PAGE_US})")
    args = parser.parse_args(argv)
    try:
        predict = parse_predict(args.predict) if args.predict is not None else None
    except ValueError as exc:
        parser.error(f"--predict {exc}")
    if args.prior_per_page_us <= 0:
        parser.error("--prior-per-page-us must be above zero")
    if args.from_status:
        status = json.loads(Path(args.from_status).read_text())
        print(suggest_from_status(status, args.slo_latency_ms, args.max_overhead))
        return 0
    grid = QUICK if args.quick else FULL
    seconds = args.seconds or (1.5 if args.quick else 4.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quiet = args.json
    try:
        result = sweep(grid, seconds, args.workers, out, progress=(lambda _: None) if quiet else
                       (lambda line: print(line, file=sys.stderr)), workload=args.workload)
    except ClusterError as exc:
        print(f"colo-tune: the sweep stopped: {exc.reason} (the agents' logs are in {out})", file=sys.stderr)
        return 1
    result["workload"] = args.workload
    best, why = recommend(result["settings"], args.slo_latency_ms, args.max_overhead)
    result.update({"recommended": best, "why": why, "snippet": toml_snippet(best) if best else "",
                   "slo_latency_ms": args.slo_latency_ms, "max_overhead_pct": args.max_overhead})
    result.update(model_report(result["settings"], predict, args.prior_per_page_us))
    (out / "tune.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "tune.png")
    status = 0
    if predict is not None and "error" in result["model"]:
        print(f"colo-tune: no predictions: {result['model']['error']}", file=sys.stderr)
        status = 1
    if args.json:
        print(json.dumps(result, indent=1))
        return status
    print(format_table(result))
    print(f"\nrecommended: {why}\n\npaste into the primary's TOML:\n{result['snippet']}")
    print(format_model(result["model"]))
    for p in result.get("predictions", []):
        print(f"predicted at {p['dirty_pages']:.0f} pages: pause {p['pause_us']:.0f} us, "
              f"{p['checkpoints_per_s']:.0f} ckpt/s, {p['encoded_mb_per_s']:.2f} MB/s encoded")
    print(f"report: {out / 'tune.json'}, plot: {out / 'tune.png'}")
    return status


def format_model(model: dict) -> str:
    """The fitted model in one line (or why there is none, or why its per-page cost is a prior)."""
    if "error" in model:
        return f"model: none: {model['error']}"
    line = (f"model: pause = {model['fixed_us']:.0f} us + {model['per_page_us']:.2f} us per dirty page, "
            f"dirty rate {model['dirty_rate']:.0f} pages/s, compression {model['compression']:.1f}x")
    return f"{line}\n  {model['note']}" if model["note"] else line


def suggest_from_status(status: dict, slo_latency_ms: float, max_overhead_pct: float) -> str:
    """One running primary's figures against the objectives: what to change, through --control."""
    latency = (status.get("output_latency_us_p99") or 0) / 1000
    overhead = (status.get("checkpoints_per_s") or 0) * (status.get("pause_us_p50") or 0) / 1e6 * 100
    if latency > slo_latency_ms:
        return (f"output latency p99 {latency:.1f} ms is above the {slo_latency_ms} ms objective: close epochs "
                f"sooner, e.g. {{\"set\": {{\"max_interval_ms\": {max(1.0, slo_latency_ms / 4):g}}}}} "
                f"through the primary's --control interface")
    if overhead > max_overhead_pct:
        return (f"the guest is paused {overhead:.1f}% of the time, above {max_overhead_pct}%: let epochs "
                f"grow, e.g. a larger triggers.dirty_pages or max_interval_ms")
    return (f"within the objectives: output p99 {latency:.1f} ms, paused {overhead:.1f}% of the time; "
            f"nothing to change")


if __name__ == "__main__":
    sys.exit(main())
