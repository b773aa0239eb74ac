"""phase1_experiment.py --trace against the session's real `vllm serve`: a hand-made trace whose
ideal ledger is known, the audit, the cold arm, fidelity, the file and its charts; bad traces
refused before any server starts; --simulate-capacities without vLLM; the open-loop sender on
a fake clock-free server."""
import gzip
import json
import os
import subprocess
import sys

import pytest

import phase1_experiment
import plot_results as pr
from conftest import ROOT, load_tool, run_script
from prefix_cache_bench import open_loop, raw_stream, trace_figures, trace_replay
from prefix_cache_bench.settings import TraceSettings
from prefix_cache_bench.traces import TraceRequest, TraceWindow
from prefix_cache_bench.errors import EXIT_USAGE, ExperimentError

# Trace blocks of 512 tokens, four KV blocks of 128 on this CPU. Lines 1-2 are the window's
# history (--trace-start-s 0.15); lines 3-7 are measured, and what each can reuse is known:
#   3: [4]      300 tokens, nothing sent before                         -> 0
#   4: [1, 5]   700, block 1 sent whole by line 1                       -> 512
#   5: [1,2,3] 1500, blocks 1-2 whole (line 2), block 3's 276 tokens of line 2 -> 1024 + 256 (whole KV blocks)
#   6: [6, 7]   900, nothing                                            -> 0
#   7: [4, 8]   600, block 4's 300 tokens of line 3                     -> 256
HAND_TRACE = [(0, 1000, [1, 2]), (100, 1300, [1, 2, 3]), (200, 300, [4]), (300, 700, [1, 5]),
              (400, 1500, [1, 2, 3]), (500, 900, [6, 7]), (600, 600, [4, 8])]
IDEAL = [0, 512, 1280, 0, 256]


def write_trace(path, rows, output_tokens=3):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt") as f:
        for t, n, hashes in rows:
            f.write(json.dumps({"timestamp": t, "input_length": n, "output_length": output_tokens,
                                "hash_ids": hashes}) + "\n")
    return str(path)


def phase1(*args, timeout=600):
    return run_script(["phase1_experiment.py", *args], timeout=timeout)


@pytest.fixture(scope="module")
def replay(vllm_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("trace")
    trace = write_trace(folder / "hand.jsonl.gz", HAND_TRACE)
    proc = phase1("--base-url", vllm_server.base_url, "--trace", trace, "--trace-start-s", "0.15",
                  "--time-scale", "2", "--repeats", "3", "--slo-ttft-ms", "1000", "--results-dir", str(folder))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [name] = [n for n in os.listdir(folder) if n.startswith("results_trace_")]
    with open(folder / name) as f:
        return folder, name, json.load(f), proc


def test_a_replay_finds_exactly_what_its_trace_shares_and_the_cold_arm_nothing(replay):
    _, name, result, _ = replay
    assert name == "results_trace_hand_s0.15_n5.json"
    assert result["cache_audit"]["ok"] is True and result["cache_audit"]["requests_checked"] == 30
    assert result["window"]["history_requests"] == 2 and result["window"]["requests"] == 5
    for run in result["passes"]:
        cached, cold = run["cached"]["requests"], run["cold"]["requests"]
        assert [r["ideal_tokens"] for r in cached] == IDEAL
        assert [r["cached_tokens"] for r in cached] == IDEAL
        assert [r["simulated_tokens"] for r in cached] == IDEAL      # nothing is evicted from 40 blocks
        assert [r["cached_tokens"] for r in cold] == [0] * 5
        assert [r["line"] for r in cached] == [3, 4, 5, 6, 7]
        # the server's counters grew by exactly the cached tokens the requests report
        assert run["cached"]["server"]["prefix_cache_hits"] == sum(IDEAL)
    assert [run["order"] for run in result["passes"]] == [["cached", "cold"], ["cold", "cached"], ["cached", "cold"]]


def test_a_replay_reports_fidelity_send_lag_and_what_the_cache_buys(replay):
    _, _, result, proc = replay
    cached = result["arms"]["cached"]
    assert cached["fidelity"] == 1.0 and cached["passes"] == 3
    assert cached["hit_share"]["measured"] == pytest.approx(sum(IDEAL) / (300 + 700 + 1500 + 900 + 600), abs=1e-3)
    assert result["arms"]["cold"]["hit_share"]["measured"] == 0
    for run in result["passes"]:
        for arm in ("cached", "cold"):
            # scheduled at twice the trace's gaps (200 ms apart); each send's lag is how late it left
            # (how small it is on a quiet machine is tools/trace_sender_bench.py's to measure, not a test's)
            scheduled = [r["scheduled_s"] for r in run[arm]["requests"]]
            assert [round(b - a, 6) for a, b in zip(scheduled, scheduled[1:])] == [0.2, 0.2, 0.2, 0.2]
            for r in run[arm]["requests"]:
                assert r["send_lag_ms"] >= 0
                assert r["send_lag_ms"] == pytest.approx((r["start_s"] - r["scheduled_s"]) * 1e3, abs=1.0)   # JSON: 3 decimals
            lags = [r["send_lag_ms"] for r in run[arm]["requests"]]
            assert run[arm]["stats"]["send_lag_ms"]["max"] == pytest.approx(max(lags), abs=0.01)
    assert set(result["cache_buys"]) == {"ttft_mean", "ttft_p50", "ttft_p90", "ttft_p99"}
    assert len(result["cache_buys"]["ttft_p50"]["saving_pct_per_pass"]) == 3
    assert result["client"]["max_rss_mb"] > 0 and result["client"]["sender_kept_up"] is not None
    assert "fidelity 100.0%" in proc.stdout and "the cache saves" in proc.stdout


def test_plot_results_draws_a_replay_and_prints_its_tables(replay, tmp_path):
    folder, name, _, _ = replay
    assert pr.main(["--results-dir", str(folder), "--out-dir", str(tmp_path)]) == 0
    assert os.path.getsize(tmp_path / name.removeprefix("results_").replace(".json", ".png")) > 10_000


def test_bad_traces_end_in_one_line_naming_the_file_and_line_before_any_server(tmp_path):
    backwards = write_trace(tmp_path / "back.jsonl", [(100, 600, [1, 2]), (50, 600, [1, 3])])
    proc = phase1("--model", "/nonexistent", "--trace", backwards, timeout=60)
    assert proc.returncode == 2, proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if line.strip()]
    assert f"{backwards}:2:" in line and "backwards" in line
    # the rest through the same parser, in this process
    good = write_trace(tmp_path / "good.jsonl", HAND_TRACE)
    for flags, needle in ((["--block-size", "48"], "48"), (["--trace-start-s", "100"], "no request in the window"),
                          (["--concurrency", "4"], "--concurrency"), (["--replicas", "2"], "--replicas")):
        with pytest.raises(ExperimentError) as refused:
            phase1_experiment.parse_args(["--model", "/nonexistent", "--trace", good, *flags])
        assert refused.value.exit_code == EXIT_USAGE and needle in str(refused.value)
        assert good in str(refused.value) or needle.startswith("--")


def test_capacities_are_simulated_without_vllm_torch_or_transformers(tmp_path):
    trace = write_trace(tmp_path / "hand.jsonl", HAND_TRACE)
    blocker = ("import sys, runpy; [sys.modules.__setitem__(m, None) for m in ('vllm', 'torch', 'transformers')];"
               f"sys.argv = ['phase1_experiment.py', '--trace', {trace!r}, '--simulate-capacities', '0.5x,1x,100x',"
               f"'--kv-capacity-tokens', '1024', '--engine-block-size', '128', '--results-dir', {str(tmp_path)!r}];"
               "runpy.run_path('phase1_experiment.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", blocker], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [name] = [n for n in os.listdir(tmp_path) if n.startswith("results_capacity_")]
    with open(tmp_path / name) as f:
        curve = json.load(f)["curve"]
    shares = [p["share"] for p in curve["capacities"]]
    assert shares == sorted(shares) and shares[-1] == pytest.approx(curve["ideal_share"])
    assert "100x" in proc.stdout


def test_the_audit_names_a_request_that_found_more_than_was_ever_sent():
    base = {"line": 9, "input_tokens": 1000, "error": None}
    cached = [{**base, "index": 0, "cached_tokens": 512, "ideal_tokens": 256},
              {**base, "index": 1, "cached_tokens": 256, "ideal_tokens": 256}]
    [problem] = trace_figures.ledger_problems(cached, "cached")
    assert "request 0 (trace line 9)" in problem and "512" in problem
    [problem] = trace_figures.ledger_problems([{**base, "index": 3, "cached_tokens": 128, "ideal_tokens": 0}], "cold")
    assert "cold request 3" in problem


def test_the_ledger_models_the_outputs_the_replay_generates_not_the_traces():
    # engine block 4, trace block 8, a cache of 8 engine blocks; every trace output is 100 tokens
    # (25 blocks, more than the cache): the warm start generates 1 token, the window max_tokens
    def request(hash_ids, input_length):
        return TraceRequest(1, 0.0, input_length, 100, tuple(hash_ids))
    window = TraceWindow(history=[request([1, 2], 16), request([5], 8)], measured=[request([6], 8), request([1, 2], 16)],
                         skipped=[], start_s=0.0, duration_s=0.0)
    assert trace_replay.ledger(window, [1, 1], 4, 32, 8) == [(0, 0), (12, 12)]
    assert trace_replay.ledger(window, [100, 1], 4, 32, 8) == [(0, 0), (12, 0)]   # request 0's output evicts


def test_fidelity_counts_requests_within_one_trace_block_of_the_model():
    rows = [{"cached_tokens": m, "simulated_tokens": s} for m, s in ((0, 0), (512, 0), (513, 0), (1024, 2048))]
    assert trace_figures.fidelity(rows, 512) == 0.5


def test_savings_pair_each_cached_pass_with_its_cold_pass():
    cached = [{"ttft_ms": {"p50": 10.0}}, {"ttft_ms": {"p50": 30.0}}]
    cold = [{"ttft_ms": {"p50": 40.0}}, {"ttft_ms": {"p50": 60.0}}]
    bought = trace_figures.cache_buys(cached, cold)["ttft_p50"]
    assert bought["saving_pct_per_pass"] == [75.0, 50.0] and bought["saving_pct"] == 62.5
    assert bought["saved_ms"] == 30.0 and bought["saved_ms_ci95"] == [30.0, 30.0]


def test_savings_take_only_passes_whose_arms_both_finished_every_request():
    def arm(failed):
        return {"stats": {"failed": failed}}
    passes = [{"cached": arm(0), "cold": arm(0)}, {"cached": arm(3), "cold": arm(0)},
              {"cached": arm(0), "cold": arm(1)}, {"cached": arm(0)}, {"cold": arm(0), "cached": arm(0)}]
    assert trace_figures.complete_pairs(passes) == [passes[0], passes[4]]


def test_the_charts_draw_the_passes_the_figures_take():
    from prefix_cache_bench import trace_charts
    def arm(ttfts, failed=0, share=0.5):
        requests = [{"ttft_ms": t, "error": None} for t in ttfts] + [{"ttft_ms": None, "error": "unfinished"}] * failed
        spans = [{"start_s": 0.0, "end_s": 1.0, "measured": share}]
        return {"requests": requests, "stats": {"failed": failed, "hit_share_over_time": spans}}
    result = {"passes": [{"cached": arm([3.0, 1.0]), "cold": arm([9.0])},
                         {"cached": arm([2.0], failed=1, share=0.9), "cold": arm([8.0])}]}
    assert trace_charts.arm_ttfts(result, "cached") == [1.0, 3.0]
    assert trace_charts.arm_ttfts(result, "cold") == [8.0, 9.0]
    assert trace_charts.share_over_time(result, "measured") == ([0.5], [0.5])


def test_the_input_cap_leaves_room_for_the_longest_output_the_replay_asks_for():
    def request(output_length):
        return TraceRequest(1, 0.0, 100, output_length, (1,))
    def cap(outputs, max_output_tokens=None, max_input_tokens=None, max_model_len=1000):
        settings = TraceSettings(path="t.jsonl", max_output_tokens=max_output_tokens, max_input_tokens=max_input_tokens)
        return trace_replay.input_cap_tokens(settings, [request(n) for n in outputs], max_model_len)
    assert cap([10, 300]) == 700
    assert cap([10, 300], max_output_tokens=128) == 872
    assert cap([10, 20], max_output_tokens=128) == 980         # the flag caps outputs; it does not lengthen them
    assert cap([0, 0]) == 999                                   # an output of 0 still generates 1 token
    assert cap([10, 20], max_input_tokens=500) == 500
    assert cap([10], max_model_len=None) is None


def test_cached_share_and_length_bins():
    assert [trace_figures.cached_share_bin(c, 100) for c in (0, 1, 49, 50, 89, 90, 100)] == \
        ["none", "under 50%", "under 50%", "50-90%", "50-90%", "90% and over", "90% and over"]
    assert [trace_figures.input_length_bin(n) for n in (1, 1023, 1024, 20000, 200000)] == \
        ["0k-1k", "0k-1k", "1k-2k", "16k-32k", "128k and over"]


# -----------------------------------------------------------------------------
# the open-loop sender and its request path, on the stand-in server of tools/trace_sender_bench.py

@pytest.fixture(scope="module")
def slow_stand_in():
    """A stand-in server whose first token comes 800 ms after a request (tools/trace_sender_bench.py --serve)."""
    import signal
    import time
    import urllib.request
    bench = load_tool("trace_sender_bench")
    port = bench.free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "trace_sender_bench.py"), "x", "--serve",
                             str(port), "--ttft-ms", "800", "--itl-ms", "10"], start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/health", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def run_sender(url, scheduled_s, max_tokens=3, drain_s=30.0, max_in_flight=1000):
    import asyncio
    bodies = [raw_stream.request_bytes(url, "/v1/completions", json.dumps(
        {"prompt": list(range(5, 5 + 100 + k)), "max_tokens": max_tokens}).encode()) for k in range(len(scheduled_s))]
    sender = open_loop.OpenLoopSender(url, scheduled_s, bodies.__getitem__, [100] * len(scheduled_s), max_in_flight)
    return asyncio.run(sender.run(drain_s))


def test_the_sender_never_waits_for_an_earlier_response(slow_stand_in):
    # answers take 0.8 s; requests are due every 0.1 s and in a burst of three: each leaves on time
    scheduled = [0.0, 0.1, 0.2, 0.3, 0.3, 0.3, 0.5]
    records, t0, overload, most = run_sender(slow_stand_in, scheduled)
    assert overload is None and most == 7
    lags_ms = [(r.sent_s - t0 - s) * 1e3 for r, s in zip(records, scheduled)]
    assert all(0 <= lag < 50 for lag in lags_ms), lags_ms
    assert all(0.75 < r.token_times_s[0] - r.sent_s < 2.0 for r in records)
    assert [len(r.token_times_s) for r in records] == [3] * 7
    assert [r.usage["prompt_tokens"] for r in records] == [100 + k for k in range(7)]


def test_requests_still_running_after_the_drain_are_cancelled_and_the_arm_overloaded(slow_stand_in):
    records, _, overload, _ = run_sender(slow_stand_in, [0.0, 0.05], drain_s=0.3)
    assert "2 requests still running 0.3 s after the last send" == overload
    assert all(r.error.startswith("unfinished") for r in records)


def test_an_arm_with_too_many_in_flight_stops_sending(slow_stand_in):
    records, _, overload, most = run_sender(slow_stand_in, [0.0, 0.01, 0.02, 0.03], max_in_flight=2)
    assert "2 requests in flight at request 2 of 4" in overload and most == 2
    assert records[2] is None and records[3] is None and records[0].error is None


def test_a_burst_is_counted_in_flight_as_it_is_sent(slow_stand_in):
    # five requests due at once leave before any of their tasks runs: the limit still holds
    records, _, overload, most = run_sender(slow_stand_in, [0.0] * 5, max_in_flight=2)
    assert "2 requests in flight at request 2 of 5" in overload and most == 2
    assert records[2:] == [None] * 3 and all(r.error is None for r in records[:2])


def test_the_sender_bench_replays_a_trace_and_names_its_code(tmp_path):
    trace, out = write_trace(tmp_path / "hand.jsonl", HAND_TRACE), tmp_path / "bench.json"
    proc = run_script(["tools/trace_sender_bench.py", trace, "--max-output-tokens", "2", "--out", str(out)], timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(out) as f:
        bench = json.load(f)
    assert (bench["requests"], bench["failed"], bench["overloaded"], bench["replay_span_s"]) == (7, 0, None, 0.6)
    assert 1 <= bench["max_in_flight"] <= 7 and bench["send_lag_ms"]["p99"] >= 0
    assert bench["environment"]["command"].endswith(f"tools/trace_sender_bench.py {trace} --max-output-tokens 2 "
                                                    f"--out {out}")
    assert len(bench["environment"]["tool_version"]["code_sha256"]) == 64


def test_bursts_are_the_requests_scheduled_within_10_ms_of_the_first():
    assert open_loop.burst_sizes([0.0, 0.0, 0.005, 0.02, 3.0, 3.0]) == [3, 0, 0, 1, 2, 0]


def test_a_request_is_one_write_of_a_whole_http_post():
    data = raw_stream.request_bytes("http://127.0.0.1:8000", "/v1/completions", b'{"a": 1}')
    head, body = data.split(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n")
    assert b"Content-Length: 8" in head and body == b'{"a": 1}'
