"""The router benchmark's pure parts: wrk's report and units, CPU ticks from /proc, the ratios."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from bench.router_load import KINDS, lua_script
from bench.router_stats import (
    Cell,
    Ttfb,
    WrkParseError,
    WrkResult,
    count,
    cpu_seconds,
    descendants,
    parse_wrk,
    per_1k,
    ratios,
    stat_ppid,
    stat_ticks,
    table,
    time_ms,
    ttfb_table,
)

# A real report: wrk 4.1.0 -t1 -c4 -d1s --latency against the benchmark's nginx.
WRK_OK = """Running 1s test @ http://127.0.0.1:18081/v1/chat/completions
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    52.16us  121.49us   2.83ms   96.11%
    Req/Sec    89.99k    12.54k  103.54k    70.00%
  Latency Distribution
     50%   29.00us
     75%   46.00us
     90%   58.00us
     99%  491.00us
  89087 requests in 1.00s, 20.73MB read
Requests/sec:  89057.61
Transfer/sec:     20.72MB
"""
# The lines wrk adds when something failed (its format strings), slower latencies.
WRK_ERRORS = """Running 5s test @ http://127.0.0.1:8080/v1/completions
  1 threads and 64 connections
  Latency Distribution
     50%    1.23ms
     75%   20.50ms
     90%  400.00ms
     99%    2.10s
  4321 requests in 5.01s, 1.20MB read
  Socket errors: connect 0, read 3, write 1, timeout 7
  Non-2xx or 3xx responses: 12
Requests/sec:    862.47
Transfer/sec:    245.10KB
"""


@pytest.mark.parametrize(
    ("text", "ms"),
    [("850.00us", 0.85), ("1.23ms", 1.23), ("2.1s", 2100.0), ("1.50m", 90_000.0), ("3ms", 3.0)],
)
def test_wrk_times_in_milliseconds(text: str, ms: float) -> None:
    assert time_ms(text) == pytest.approx(ms)


@pytest.mark.parametrize(
    ("text", "n"), [("89.99k", 89_990.0), ("1.5M", 1_500_000.0), ("812", 812.0), ("2G", 2e9)]
)
def test_wrk_counts_with_suffixes(text: str, n: float) -> None:
    assert count(text) == pytest.approx(n)


@pytest.mark.parametrize("text", ["", "1.2", "ms", "1.2 parsecs", "12.3x"])
def test_what_is_not_a_wrk_number_is_refused(text: str) -> None:
    with pytest.raises(WrkParseError):
        time_ms(text)
    with pytest.raises(WrkParseError):
        count(text + "q")


def test_parses_a_real_wrk_report() -> None:
    assert parse_wrk(WRK_OK) == WrkResult(
        requests=89087, duration_s=1.0, rps=89057.61, p50_ms=0.029, p99_ms=0.491, thread_rps=89990.0
    )


def test_parses_errors_and_slow_latencies() -> None:
    r = parse_wrk(WRK_ERRORS)
    assert (r.requests, r.rps) == (4321, 862.47)
    assert [r.duration_s, r.p50_ms, r.p99_ms] == pytest.approx([5.01, 1.23, 2100.0])
    assert (r.non_2xx, r.socket_errors, r.errors, r.thread_rps) == (12, 11, 23, None)


@pytest.mark.parametrize(
    "text",
    [
        "unable to connect to 127.0.0.1:1 Connection refused\n",
        WRK_OK.replace("     99%  491.00us\n", ""),  # no --latency block
        WRK_OK.replace("Requests/sec:", "Req/s:"),
    ],
)
def test_a_report_without_results_is_an_error(text: str) -> None:
    with pytest.raises(WrkParseError):
        parse_wrk(text)


def test_lua_script_posts_the_json_body() -> None:
    _, body = KINDS["sse"]
    script = lua_script(body)
    literal = re.search(r"^wrk\.body = (.*)$", script, re.M)
    assert literal is not None
    assert json.loads(json.loads(literal[1])) == body  # a JSON string literal reads as Lua's
    assert 'wrk.method = "POST"' in script


# proc(5): pid (comm) state ppid ... utime(14) stime(15) cutime(16) cstime(17) ...
STAT = "4242 (a) b) c) S 17 4242 4242 0 -1 4194560 100 0 0 0 150 30 7 9 20 0 5 0 1000 0 0"


def test_cpu_ticks_are_utime_plus_stime_even_with_a_strange_name() -> None:
    assert stat_ticks(STAT) == 180  # not the children's cutime/cstime
    assert stat_ppid(STAT) == 17


def test_reads_this_process_stat() -> None:
    stat = Path("/proc/self/stat").read_text()
    assert stat_ppid(stat) == os.getppid()
    assert stat_ticks(stat) >= 0


def test_descendants_walk_the_whole_tree_from_the_roots() -> None:
    parents = {1: 0, 10: 1, 11: 10, 12: 11, 20: 1, 30: 2, 31: 30}
    assert sorted(descendants([10, 30], parents)) == [10, 11, 12, 30, 31]
    assert descendants([99], parents) == [99]


def test_cpu_seconds_sum_the_deltas_and_count_a_gone_process_as_it_was() -> None:
    before = {1: 100, 2: 50, 3: 10}
    after = {1: 350, 2: 75}  # 3 exited between the samples
    assert cpu_seconds(before, after, hz=100) == pytest.approx(2.75)
    assert cpu_seconds(before, before, hz=100) == 0


def test_cpu_per_thousand_requests() -> None:
    assert per_1k(2.0, 4000) == pytest.approx(0.5)
    assert per_1k(2.0, 0) is None


def result(rps: float, requests: int) -> WrkResult:
    return WrkResult(requests=requests, duration_s=1.0, rps=rps, p50_ms=1.0, p99_ms=2.0)


CELLS = [
    Cell("direct", "json", 16, result(100_000, 100_000)),
    Cell("vllm-router", "json", 16, result(20_000, 20_000), cpu_s=1.0),  # 0.05 s / 1k
    Cell("Switchboard", "json", 16, result(5_000, 5_000), cpu_s=2.0),  # 0.4 s / 1k
    Cell("Switchboard", "json", 64, result(6_000, 6_000), cpu_s=3.0),  # no reference at 64
    Cell("sglang-router", "json", 16, None, note="failed: wrk"),
]


def test_ratios_are_to_the_reference_in_the_same_cell() -> None:
    assert list(ratios(CELLS[2], CELLS)) == pytest.approx([0.25, 8.0])
    assert ratios(CELLS[1], CELLS) == (1.0, 1.0)
    assert ratios(CELLS[0], CELLS) == (5.0, None)  # direct: no router CPU
    assert ratios(CELLS[3], CELLS) == (None, None)
    assert ratios(CELLS[4], CELLS) == (None, None)


def test_table_rows() -> None:
    rows = table(CELLS).splitlines()
    assert rows[0].startswith("| target | body | conc | rps |")
    assert rows[4] == "| Switchboard | json | 16 | 5000 | 1.00 | 2.00 | 0 | 0.400 | 0.25x | 8.00x |"
    assert rows[3].endswith("| 0.050 | 1.00x | 1.00x |")
    assert rows[2].endswith("| n/a | 5.00x | n/a |")
    assert rows[5].endswith("| 0.500 | n/a | n/a |")
    assert rows[6] == "| sglang-router | json | 16 | failed: wrk |"


def test_added_first_byte_is_the_difference_to_direct_at_the_same_concurrency() -> None:
    rows = [
        Ttfb("direct", 1, 0.2, 1.0, 100),
        Ttfb("direct", 16, 2.0, 4.0, 100),
        Ttfb("Switchboard", 1, 0.7, 3.0, 100),
        Ttfb("Switchboard", 16, 4.5, 9.0, 100, errors=2),
        Ttfb("vllm-router", 64, 9.0, 9.0, 100),
    ]
    lines = ttfb_table(rows).splitlines()
    assert lines[4] == "| Switchboard | 1 | 0.70 | 3.00 | 0.50 | 2.00 | 0 |"
    assert lines[5] == "| Switchboard | 16 | 4.50 | 9.00 | 2.50 | 5.00 | 2 |"
    assert lines[6] == "| vllm-router | 64 | 9.00 | 9.00 | n/a | n/a | 0 |"
