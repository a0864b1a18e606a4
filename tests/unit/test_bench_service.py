"""The benchmark's service section, without a server: redis-benchmark's CSV read as it prints it, the
figures each server gets from it, the table with rows skipped or failed, and the section flag."""

from __future__ import annotations

import argparse

import pytest

from checkpointer import bench
from checkpointer.bench_service import TESTS, BenchmarkError, format_service, parse_csv

# redis-benchmark 7.0.15 -t set,get,incr -c 50 -n 20000 --csv against redis-server here
REDIS_7_CSV = '''"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
"SET","69686.41","0.396","0.040","0.351","0.623","1.447","4.687"
"GET","74906.37","0.369","0.088","0.311","0.527","1.615","6.999"
"INCR","79051.38","0.330","0.096","0.311","0.439","0.615","1.767"
'''
# redis-benchmark 6 prints no header and no latencies
REDIS_6_CSV = '''"SET","69686.41"
"GET","74906.37"
"INCR","79051.38"
'''


def test_each_test_gets_its_throughput_and_latencies_from_redis_benchmark_7() -> None:
    run = parse_csv(REDIS_7_CSV)
    assert list(run.tests) == list(TESTS)
    assert run.tests["SET"].ops_per_s == 69686.41
    assert (run.tests["GET"].p50_ms, run.tests["GET"].p99_ms) == (0.311, 1.615)
    assert (run.tests["INCR"].p50_ms, run.tests["INCR"].p99_ms) == (0.311, 0.615)


def test_the_servers_figures_are_every_request_over_the_total_time_the_median_p50_and_the_worst_p99() -> None:
    run = parse_csv(REDIS_7_CSV)
    total_seconds = sum(20000 / rps for rps in (69686.41, 74906.37, 79051.38))
    assert run.ops_per_s == pytest.approx(3 * 20000 / total_seconds)
    assert run.p50_ms == 0.311 and run.p99_ms == 1.615
    figures = run.as_dict()
    assert figures["ops_per_s"] == run.ops_per_s and figures["tests"]["SET"]["p99_ms"] == 1.447


def test_an_older_redis_benchmark_gives_throughput_without_latencies() -> None:
    run = parse_csv(REDIS_6_CSV)
    assert run.tests["INCR"].ops_per_s == 79051.38
    assert run.p50_ms is None and run.p99_ms is None


def test_warnings_and_blank_lines_around_the_csv_are_ignored() -> None:
    run = parse_csv("\n" + REDIS_7_CSV + "\n\n")
    assert run.tests["GET"].ops_per_s == 74906.37


@pytest.mark.parametrize("text, message", [
    (REDIS_7_CSV.replace('"INCR"', '"LPUSH"'), "no line for INCR"),
    ("", "no line for SET, GET, INCR"),
    (REDIS_7_CSV.replace('"0.311","0.527"', '"fast","0.527"'), "p50_latency_ms = 'fast'"),
    (REDIS_7_CSV.replace('"69686.41"', '"0"'), "SET line has no throughput"),
])
def test_output_that_is_not_a_full_benchmark_is_refused_naming_what_is_missing(text: str, message: str) -> None:
    with pytest.raises(BenchmarkError, match=message):
        parse_csv(text)


def _row(ops: float) -> dict:
    return {"ops_per_s": ops, "p50_ms": 1.0, "p99_ms": 2.0,
            "tests": {t: {"ops_per_s": ops, "p50_ms": 1.0, "p99_ms": 2.0} for t in TESTS}}


def test_the_table_names_a_skipped_or_failed_server_and_prints_the_others() -> None:
    protected = {**_row(500.0), "output_latency_p50_ms": 4.0, "output_latency_p99_ms": 9.0,
                 "checkpoints_per_s": 200.0, "pause_us_p50": 574.0}
    result = {"requests": 100, "clients": 10, "notes": ["etcd is not installed"],
              "protected_over_unprotected": 0.5, "unprotected_over_redis": None,
              "output_latency_p50_ms": 4.0, "output_latency_p99_ms": 9.0,
              "servers": {"redis": {"skipped": "redis-server is not installed"},
                          "unprotected": _row(1000.0), "protected": protected}}
    table = format_service(result)
    assert "redis-server           skipped: redis-server is not installed" in table
    assert "protected / unprotected 0.50" in table and "unprotected / redis-server -" in table
    assert "output-commit latency p50 4.000 ms, p99 9.000 ms" in table and "200 checkpoints/s" in table
    result["servers"]["protected"] = {"error": "timed out waiting for the primary protected"}
    assert "kvstore, protected     failed: timed out waiting for the primary protected" in format_service(result)


def test_sections_are_chosen_by_name() -> None:
    assert bench.parse_sections("service") == ("service",)
    assert bench.parse_sections("points, rate") == ("points", "rate")
    assert bench.parse_sections("scale") == ("scale",)
    with pytest.raises(argparse.ArgumentTypeError, match="choose from points,rate,service,scale"):
        bench.parse_sections("points,sacle")
