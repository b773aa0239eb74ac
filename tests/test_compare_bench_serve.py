"""tools/compare_bench_serve.py's arithmetic, on known answers (no engine, no server)."""
import json

import numpy as np
import pytest

from conftest import load_tool, run_script

compare = load_tool("compare_bench_serve")


def test_a_request_finds_its_document_only_after_an_earlier_one_had_its_first_token():
    # document 0 is warmed by the bench's test request; document 1 is first sent at t=0 (first
    # token at 0.5), again at 0.2 (still prefilling: not found) and at 0.6 (found)
    documents = [0, 1, 1, 1, 0]
    start_s = np.array([0.0, 0.0, 0.2, 0.6, 0.7])
    ttft_s = np.array([0.1, 0.5, 0.5, 0.1, 0.1])
    assert compare.found_their_document(documents, start_s, ttft_s, warmed={0}) == [True, False, False, True, True]


def test_the_order_is_the_send_times_not_the_list():
    # request 1 was sent first; request 0, sent after request 1's first token, finds it
    assert compare.found_their_document([5, 5], np.array([1.0, 0.0]), np.array([0.1, 0.2]), warmed=set()) == [True, False]


def test_ttft_figures_are_numpys_linear_percentiles():
    figures = compare.ttft_figures(list(range(1, 101)))
    assert figures == {"ttft_p50_ms": 50.5, "ttft_p99_ms": pytest.approx(99.01), "ttft_mean_ms": 50.5, "requests": 100}


def test_the_server_figures_come_from_the_histograms_growth():
    grown = {"ttft_sum_s": 0.5, "ttft_count": 50, "queue_time_sum_s": 0.05, "queue_time_count": 50,
             "prefill_time_sum_s": 0.2, "prefill_time_count": 50, "requests": 50,
             "prefix_cache_hits": 900, "prefix_cache_queries": 1000}
    figures = compare.server_figures(grown)
    assert figures["server_ttft_mean_ms"] == pytest.approx(10.0)
    assert figures["queue_time_mean_ms"] == pytest.approx(1.0) and figures["prefill_time_mean_ms"] == pytest.approx(4.0)
    assert figures["cached_token_share"] == 0.9 and figures["server_requests"] == 50


def test_over_rounds_gives_the_mean_and_a_t_interval():
    summary = compare.over_rounds([10.0, 12.0, 14.0, None])
    assert summary["mean"] == 12.0 and summary["per_round"] == [10.0, 12.0, 14.0]
    low, high = summary["ci95"]
    # t(0.975, 2) = 4.303, standard error 2/sqrt(3)
    half_width = 4.303 * 2 / 3 ** 0.5
    assert low == pytest.approx(12 - half_width, abs=1e-3) and high == pytest.approx(12 + half_width, abs=1e-3)
    assert compare.over_rounds([None]) is None


def test_bench_serve_and_the_tool_on_the_session_server(vllm_server, tmp_path):
    """End to end on the real server: vllm bench serve's prefix_repetition run (through
    vllm.benchmarks.serve) and phase1_experiment.py, the server's histograms around each."""
    out = tmp_path / "comparison.json"
    proc = run_script(["tools/compare_bench_serve.py", "--model", vllm_server.model, "--base-url", vllm_server.base_url,
                       "--size-a", "256", "--num-prefixes", "4", "--concurrency", "4", "--max-output-tokens", "2",
                       "--num-requests", "8", "--rounds", "1", "--out", str(out)], timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    bench, tool = result["rounds"][0]["bench"], result["rounds"][0]["tool"]
    # the bench: its 8 requests, counted by the server (it sends no test request by default);
    # each of its 4 documents is computed by at least its first request
    assert bench["server_requests"] == 8 and bench["failed"] == 0 and not bench["test_request"]
    assert 4 <= bench["not_hits"] <= 8
    assert (bench["hits"] or {"requests": 0})["requests"] == 8 - bench["not_hits"]
    assert 256 + 16 <= bench["prompt_tokens_mean"] <= 256 + 16 + 2
    # the tool's pass: audited, every cached request found its document's full blocks
    assert tool["cache_audit_ok"] and tool["cached"]["failed"] == 0
    assert tool["cached"]["cached_token_share"] == pytest.approx(256 / (256 + 16 + 1), abs=0.01)
    assert tool["cold"]["cached_token_share"] == 0
    for figures in (bench, tool["cached"], tool["cold"]):
        assert 0 < figures["server_ttft_mean_ms"] and figures["prefill_time_mean_ms"] < figures["server_ttft_mean_ms"]
        # each rounded to 3 decimals
        assert figures["client_minus_server_ms"] == pytest.approx(figures["ttft_mean_ms"] - figures["server_ttft_mean_ms"],
                                                                  abs=0.002)
    assert set(result["summary"]) == {"bench", "bench_hits", "tool_cached", "tool_cold"}
    assert (tmp_path / "comparison-tool-round1").is_dir()
