"""phase1_experiment under load (--concurrency, --request-rate, a working-set sweep of
--num-prefixes) against the session's real `vllm serve`: every request's cache state, the
figures with their intervals, the cliff where the documents outgrow the KV cache, the charts,
and faults. The statistics' helpers on data with known answers."""
import json
import os

import numpy as np
import pytest
from scipy import stats

import plot_results as pr
from conftest import SERVER_KV_BLOCKS, run_script, session_processes
from prefix_cache_bench import (audit, charts, defaults, http_client, intervals, load_figures, load_tables, load_workload,
                                prometheus, servers)
from prefix_cache_bench import load_run as load_run_module


# 355 tokens and the special prefix are 2 KV blocks of 128 and 100 tokens: with its query and
# output a request stays inside the third block, which is never full, so a request leaves no
# block of its own in the cache to compete with the documents.
LOAD_QUICK = ["--size-a", "355", "--max-output-tokens", "4"]


def phase1(*args, timeout=600):
    return run_script(["phase1_experiment.py", *args], timeout=timeout)


# -----------------------------------------------------------------------------
# statistics on data with known answers

def test_the_median_interval_of_100_values_is_their_40th_to_61st():
    values = np.random.default_rng(0).permutation(np.arange(1, 101))
    assert intervals.quantile_ci95(values, 0.5) == [40.0, 61.0]


def test_a_percentile_the_sample_cannot_bound_has_no_upper_bound():
    low, high = intervals.quantile_ci95(np.arange(50), 0.99)
    assert high is None and low is not None


def test_quantile_intervals_hold_the_true_quantile_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    true_p90 = -np.log(0.1)                 # of an exponential with mean 1
    held = [low <= true_p90 <= high for low, high in
            (intervals.quantile_ci95(rng.exponential(1.0, 300), 0.9) for _ in range(2000))]
    assert 0.94 <= np.mean(held) <= 0.985


def test_batch_means_of_a_drifting_series_are_wider_than_its_naive_interval():
    rng = np.random.default_rng(2)
    drift = np.repeat(rng.normal(0, 5, 10), 30) + rng.normal(100, 1, 300)  # ten level shifts
    low, high = intervals.batch_means_ci95(drift)
    naive = 1.96 * drift.std(ddof=1) / np.sqrt(len(drift))
    assert (high - low) / 2 > 2 * naive
    assert intervals.batch_means_ci95(np.full(40, 7.0)) == [7.0, 7.0]


def test_throughput_of_evenly_spaced_completions_is_their_rate():
    ends = (np.arange(100) + 0.5) / 10                                  # 10 per second
    low, high = intervals.throughput_ci95([0.0], ends)
    assert (low + high) / 2 == pytest.approx(100 / ends[-1]) and (high - low) / 2 < 0.5


def test_the_throughput_interval_is_centred_on_the_throughput_of_a_burst():
    starts, ends = np.zeros(100), np.r_[np.full(64, 1.0), np.full(36, 2.0)]      # 100 requests in 2 s
    low, high = intervals.throughput_ci95(starts, ends)
    assert (low + high) / 2 == pytest.approx(50.0)


def test_zipf_weights():
    assert np.allclose(load_workload.zipf_weights(4, 0), 0.25)
    assert np.allclose(load_workload.zipf_weights(3, 1), np.array([1, 1 / 2, 1 / 3]) / (11 / 6))


def record(condition, cached, full=256, ttft=10.0, start=0.0, end=1.0, error=None, output=4):
    return {"index": 0, "condition": condition, "document": 0, "start_s": start, "end_s": end, "ttft_ms": ttft,
            "tpot_ms": 1.0, "output_tokens": output, "prompt_tokens": 300, "cached_tokens": cached,
            "document_cached_tokens": full,
            "cache_state": audit.cache_state(cached, full), "error": error}


@pytest.mark.parametrize("req,problem", [
    (record("cold", 128), "cold request 0 (document 0): cached_tokens=128, at most 0"),
    (record("cached", 384), "cached request 0 (document 0): cached_tokens=384, at most 256"),
    (record("cached", 100), "cached_tokens=100, at most 256 in whole blocks of 128"),
])
def test_a_request_that_found_what_it_cannot_have_is_a_problem(req, problem):
    assert problem in audit.load_problems([req], 128)[0]


def test_a_partial_hit_or_a_miss_under_cache_pressure_is_recorded_not_failed():
    assert audit.load_problems([record("cached", 128), record("cached", 0), record("cold", 0)], 128) == []


def test_condition_stats_split_by_cache_state_and_count_goodput():
    reqs = [record("cached", 256, ttft=5.0, start=k, end=k + 1) for k in range(6)] + \
           [record("cached", 128, ttft=20.0, start=6, end=7), record("cached", 0, ttft=40.0, start=7, end=8)]
    s = load_figures.condition_stats(reqs, slo_ttft_ms=10.0)
    assert s["hit_rate"] == {"requests": 6 / 8, "tokens": (6 * 256 + 128) / (8 * 256)}
    assert s["by_cache_state"]["hit"]["requests"] == 6 and s["by_cache_state"]["miss"]["ttft_ms_mean"] == 40.0
    assert s["goodput_req_s"] == pytest.approx(6 / 8) and s["request_throughput"] == pytest.approx(1.0)
    assert s["ttft_ms"]["p50"] == 5.0 and s["output_throughput_tok_s"] == pytest.approx(4.0)


# -----------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("args,message", [
    (["--concurrency", "1,4", "--request-rate", "2"], "either --concurrency or --request-rate"),
    (["--concurrency", "0"], "must be positive integers"),
    (["--request-rate", "1,,2"], "must be numbers > 0"),
    (["--num-prefixes", "1,4", "--concurrency", "1,2"], "one load level"),
    (["--concurrency", "2", "--size-b", "100"], "a request is [document, Q]"),
    (["--concurrency", "2", "--prefix-skew", "-1"], "a number >= 0"),
])
def test_bad_load_arguments_exit_2_in_one_line(args, message, tmp_path):
    proc = phase1("--base-url", "http://127.0.0.1:9", *args, "--results-dir", str(tmp_path), timeout=60)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr[-1000:]


# -----------------------------------------------------------------------------
# a real server

@pytest.fixture(scope="module")
def load_run(vllm_server, tmp_path_factory):
    """A concurrency sweep (1, 4) over 4 documents, two passes, against the session's server."""
    out = tmp_path_factory.mktemp("load")
    proc = phase1("--base-url", vllm_server.base_url, "--concurrency", "1,4", "--num-prefixes", "4",
                  "--num-requests", "16", "--repeats", "2", "--slo-ttft-ms", "1000", *LOAD_QUICK,
                  "--results-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.load(open(out / "results_load_a355_p4_concurrency.json")), proc


def test_under_load_every_request_found_what_its_condition_allows(load_run):
    _, r, _ = load_run
    full = r["config"]["document_cached_tokens"]
    assert r["cache_audit"]["ok"] is True and r["complete"] is True and full == 256
    assert r["cache_audit"]["requests_checked"] == 2 * 2 * 2 * 16
    assert [lv["concurrency"] for lv in r["levels"]] == [1, 4]
    for level in r["levels"]:
        assert [run["repeat"] for run in level["runs"]] == [0, 1]
        for run in level["runs"]:
            cached, cold = run["cached"], run["cold"]
            assert len(cached["requests"]) == len(cold["requests"]) == 16
            # 4 documents of 2 blocks fit the cache many times over: every cached request hits
            assert all(q["cached_tokens"] == full for q in cached["requests"])
            assert all(q["cached_tokens"] == 0 for q in cold["requests"])
            assert cached["hit_rate"] == {"requests": 1.0, "tokens": 1.0} and cold["hit_rate"]["tokens"] == 0
            # the server's own counters saw exactly what the responses said
            assert cached["server"]["prefix_cache_hits"] == 16 * full and cold["server"]["prefix_cache_hits"] == 0
            assert cold["server"]["prefill_tokens_computed"] >= 16 * (356 + 16)
            # the same documents, drawn once for both conditions of a pass
            assert [q["document"] for q in cached["requests"]] == [q["document"] for q in cold["requests"]]
        assert level["cached"]["server"]["prefix_cache_hits"] == 2 * 16 * full


def test_the_server_s_histograms_say_where_each_condition_s_ttft_went(load_run):
    _, r, proc = load_run
    for level in r["levels"]:
        for run in level["runs"]:
            for c in ("cached", "cold"):
                server = run[c]["server"]
                # the condition's 16 requests and the counters' flush, each counted once by each histogram
                assert server["ttft_count"] == server["queue_time_count"] == server["prefill_time_count"] == 17
                # the server's clock starts after the client's and stops before it, request by request
                # (the flush's too); the JSON keeps sums in s to 3 decimals
                client_sum_ms = sum(q["ttft_ms"] for q in run[c]["requests"]) + server["flush_ttft_ms"]
                assert 0 < server["ttft_sum_s"] * 1e3 <= client_sum_ms + 0.5
                assert 0 < server["queue_time_mean_ms"] + server["prefill_time_mean_ms"] < server["server_ttft_mean_ms"]
        for c in ("cached", "cold"):
            runs = [run[c]["server"] for run in level["runs"]]
            count = sum(s["prefill_time_count"] for s in runs)
            pooled = sum(s["prefill_time_sum_s"] for s in runs) / count * 1e3
            # each pass's sum is known to 0.5 ms, the pooled mean to 0.0005 ms
            assert level[c]["server"]["prefill_time_mean_ms"] == pytest.approx(pooled, abs=0.5 * len(runs) / count + 5e-4)
    assert "the server's own means: TTFT" in proc.stdout


def test_the_client_and_the_api_server_say_how_busy_they_were(load_run):
    _, r, proc = load_run
    url = r["environment"]["server"]["base_url"]
    for level in r["levels"]:
        for run in level["runs"]:
            for c in ("cached", "cold"):
                # CPU seconds over wall seconds: each process used some CPU, and no more than the machine has
                assert 0 < run[c]["client_cpu_busy"] <= os.cpu_count()
                busy = run[c]["server"]["api_server_cpu_busy"]
                assert list(busy) == [url] and 0 < busy[url] <= os.cpu_count()
                assert run[c]["server"]["api_server_cpu_busy_max"] == busy[url]
        for c in ("cached", "cold"):
            values = [run[c]["client_cpu_busy"] for run in level["runs"]]
            assert level[c]["client_cpu_busy"] == pytest.approx(np.mean(values), abs=6e-4)
            assert level[c]["client_cpu_busy_per_pass"] == values
            per_pass = [run[c]["server"]["api_server_cpu_busy_max"] for run in level["runs"]]
            # the JSON keeps 3 decimals
            assert level[c]["server"]["api_server_cpu_busy_max"] == pytest.approx(np.mean(per_pass), abs=6e-4)
    assert "CPU busy, as a share of one core: this client " in proc.stdout


def test_a_share_is_a_percentage_with_the_passes_range():
    assert load_tables.percent_with_spread(0.45, [0.41, 0.48, 0.46]) == "45% (41-48%)"
    assert load_tables.percent_with_spread(0.5, [0.5]) == "50%" and load_tables.percent_with_spread(None, [0.2, 0.3]) == "-"


def test_busy_shares_are_cpu_seconds_over_wall_seconds():
    before = {"http://a": 10.0, "http://b": None, "http://c": 7.0}
    after = {"http://a": 13.0, "http://b": 5.0, "http://c": 2.0}
    # b: not reported before; c: the counter went back (a restarted server)
    assert prometheus.busy_shares(before, after, 2.0) == {"http://a": 1.5, "http://b": None, "http://c": None}
    assert prometheus.busy_shares(before, after, 0.0) == {"http://a": None, "http://b": None, "http://c": None}


def test_the_api_server_s_cpu_seconds_are_the_server_process_s_own(vllm_server):
    import psutil
    client = http_client.HttpClient(vllm_server.base_url, 30)
    try:
        async def read():
            session = client.load_session()
            try:
                return await load_run_module.api_server_cpu_s(client, [vllm_server.base_url], session)
            finally:
                await session.close()
        reported = client.run("reading /metrics", read())[vllm_server.base_url]
    finally:
        client.close()
    # the process started as the server answers /metrics; its children (the engine core) are apart
    times = psutil.Process(vllm_server.proc.pid).cpu_times()
    assert reported == pytest.approx(times.user + times.system, abs=0.3)


def test_server_times_are_the_histograms_sums_over_their_counts():
    counters = {"ttft_sum_s": 2.0, "ttft_count": 40, "queue_time_sum_s": 0.1, "queue_time_count": 40,
                "prefill_time_sum_s": None, "prefill_time_count": None}
    assert prometheus.server_times(counters) == {"server_ttft_mean_ms": pytest.approx(50.0),
                                         "queue_time_mean_ms": pytest.approx(2.5), "prefill_time_mean_ms": None}
    assert prometheus.server_times({"ttft_sum_s": 0.0, "ttft_count": 0})["server_ttft_mean_ms"] is None


def test_passes_run_the_levels_up_and_down_and_alternate_which_condition_goes_first(load_run):
    out, r, proc = load_run
    starts = [line for line in proc.stdout.splitlines() if line.startswith("--- ")]
    assert [s.split(":")[1].split(",")[0].strip() for s in starts] == ["concurrency 1", "concurrency 4",
                                                                       "concurrency 4", "concurrency 1"]
    first = {(lv["concurrency"], run["repeat"]): run["order"][0] for lv in r["levels"] for run in lv["runs"]}
    assert first == {(1, 0): "cached", (4, 0): "cold", (4, 1): "cached", (1, 1): "cold"}


def test_load_figures_carry_intervals_over_the_passes(load_run):
    _, r, _ = load_run
    for level in r["levels"]:
        for c in ("cached", "cold"):
            s = level[c]
            assert s["passes"] == 2 and s["interval"].startswith("over 2 passes")
            for key in ("p50", "p99", "mean"):
                values = s["ttft_ms"][f"{key}_per_pass"]
                half = stats.t.ppf(0.975, 1) * np.std(values, ddof=1) / np.sqrt(2)
                assert s["ttft_ms"][key] == pytest.approx(np.mean(values), abs=1e-3)
                assert s["ttft_ms"][f"{key}_ci95"] == pytest.approx([np.mean(values) - half, np.mean(values) + half],
                                                                      abs=0.01)
            assert s["request_throughput"] > 0 and s["output_throughput_tok_s"] == pytest.approx(
                4 * s["request_throughput"], rel=1e-3)
            assert s["goodput_req_s"] <= s["request_throughput"] * 1.001 and s["server"]["kv_cache_usage_max"] is not None
        for run in level["runs"]:          # each pass keeps its own intervals: the median's by order statistics
            for c in ("cached", "cold"):
                ttft = sorted(q["ttft_ms"] for q in run[c]["requests"])
                n = len(ttft)
                low_rank, high_rank = int(stats.binom.ppf(0.025, n, 0.5)), int(stats.binom.ppf(0.975, n, 0.5)) + 1
                assert run[c]["ttft_ms"]["p50_ci95"] == pytest.approx([ttft[low_rank - 1], ttft[high_rank - 1]], abs=1e-3)
    # what the cache saved the server, by its own counters (the tiny model's TTFT barely shows it)
    one = r["levels"][0]
    assert one["cached"]["server"]["prefill_tokens_computed"] < one["cold"]["server"]["prefill_tokens_computed"] / 2


def test_a_working_set_larger_than_the_kv_cache_loses_its_hits_where_the_capacity_says(vllm_server, tmp_path):
    proc = phase1("--base-url", vllm_server.base_url, "--num-prefixes", "2,8,64", "--num-requests", "32", "--repeats", "1",
                  *LOAD_QUICK, "--results-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.load(open(tmp_path / "results_workingset_a355.json"))
    capacity = r["kv_capacity_tokens"]
    assert capacity == SERVER_KV_BLOCKS * 128 and r["cache_audit"]["ok"] is True
    rates = {lv["num_prefixes"]: lv["cached"]["hit_rate"]["requests"] for lv in r["levels"]}
    sets = {lv["num_prefixes"]: lv["working_set_tokens"] for lv in r["levels"]}
    assert sets[8] <= capacity / 2 < 3 * capacity < sets[64]
    assert rates[2] == rates[8] == 1.0          # fits: every request hits
    assert rates[64] < 0.6                      # outgrows the cache: LRU evicts documents before they return
    assert "cold" in r["levels"][0] and "cold" not in r["levels"][1]
    assert r["levels"][0]["cached"]["interval"].startswith("one pass")
    # the charts and the tables
    assert pr.main(["--results-dir", str(tmp_path)]) == 0
    assert os.path.exists(tmp_path / "workingset_a355.png")


def test_load_charts_and_tables(load_run, tmp_path, capsys):
    out, r, _ = load_run
    assert pr.main(["--results-dir", str(out), "--out-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert os.path.exists(tmp_path / "load_a355_p4_concurrency.png")
    assert "| 4 | cached |" in printed and "| 1 | cold |" in printed
    rows = [row for row in load_tables.load_table(r).splitlines() if row.startswith("|")]
    assert len(rows) == 2 + 4 and "over 2 passes" in printed
    times = [row for row in load_tables.server_time_table(r).splitlines() if row.startswith("| ")]
    assert "Where the TTFT went" in printed and len(times) == 1 + 4
    level = r["levels"][1]["cold"]
    low, high = min(level["server"]["server_ttft_mean_ms_per_pass"]), max(level["server"]["server_ttft_mean_ms_per_pass"])
    assert times[-1].startswith(f"| 4 | cold | {level['ttft_ms']['mean']:.1f} | "
                                f"{level['server']['server_ttft_mean_ms']:.1f} ({low:.1f}-{high:.1f}) | ")
    # the passes' requests together: the histogram sums over the counts, not a mean of the passes' means
    passes = [run["cold"]["server"] for run in r["levels"][1]["runs"]]
    pooled = sum(p["ttft_sum_s"] for p in passes) / sum(p["ttft_count"] for p in passes) * 1e3
    assert level["server"]["server_ttft_mean_ms"] == pytest.approx(pooled, abs=0.05)     # the file rounds the sums
    busy = load_tables.percent_with_spread(level["server"]["api_server_cpu_busy_max"],
                                           level["server"]["api_server_cpu_busy_max_per_pass"])
    assert busy.endswith("%)") and times[-1].endswith(f" | {busy} |")
    # a file made before the server's histograms were read has no such table
    older = {**r, "levels": [{**lv, **{c: {**lv[c], "server": {}} for c in ("cached", "cold")}} for lv in r["levels"]]}
    assert load_tables.server_time_table(older) is None


def test_a_rate_sweep_sends_poisson_arrivals(vllm_server, tmp_path):
    proc = phase1("--base-url", vllm_server.base_url, "--request-rate", "10", "--num-prefixes", "2",
                  "--num-requests", "12", "--repeats", "1", *LOAD_QUICK, "--results-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.load(open(tmp_path / "results_load_a355_p2_rate.json"))
    level = r["levels"][0]
    assert level["request_rate"] == 10 and level["concurrency"] is None
    # sent on the seeded Poisson schedule of the level's pass (seed + 1000 x pass + level)
    run = level["runs"][0]
    starts = np.array([q["start_s"] for q in run["cached"]["requests"]])
    schedule = np.cumsum(np.random.default_rng(r["config"]["seed"]).exponential(1 / 10, 12))
    # never before its time; late by little (headroom for a busy 2-core machine that runs the
    # server too: a sender that waited for each response instead would fall ever further behind)
    assert np.all(starts >= schedule - 1e-3) and np.median(starts - schedule) < 0.25
    assert r["cache_audit"]["ok"] is True


# the probe, 2 warmups, 8 cached requests and the counters' flush go through; every cold one fails
@pytest.mark.parametrize("fake_server", ["drop-after-13"], indirect=True)
def test_requests_that_fail_under_load_end_the_sweep_in_one_line_and_keep_what_was_measured(fake_server, tmp_path):
    proc = phase1("--base-url", fake_server.base_url, "--concurrency", "2,4", "--num-prefixes", "2",
                  "--num-requests", "8", "--repeats", "1", *LOAD_QUICK, "--results-dir", str(tmp_path), timeout=120)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("phase1_experiment.py: error: ") and "requests failed" in last
    r = json.load(open(tmp_path / "results_load_a355_p2_concurrency.json"))
    # both clients' first cold requests fail together; none is sent after them
    assert r["complete"] is False and r["failure"].startswith("2 of 8 cold requests failed at concurrency 2 (6 not sent after)")
    assert len(r["levels"]) == 1 and len(r["levels"][0]["runs"][0]["cached"]["requests"]) == 8
    assert r["levels"][0]["cached"]["num_requests"] == 8 and "cold" not in r["levels"][0]


@pytest.mark.parametrize("fake_server", ["ok"], indirect=True)
@pytest.mark.parametrize("warmup_concurrency,in_flight", [(1, 1), (4, 4)])
def test_documents_are_warmed_as_many_at_a_time_as_asked(fake_server, warmup_concurrency, in_flight, tmp_path):
    # the level itself runs one request at a time, so only the warmups can overlap; they alone are
    # held, until as many are in flight as should be (at most 10 s: a client sending fewer at a
    # time shows fewer in flight, however fast or slow this machine is)
    fake_server.delay_s, fake_server.delay_max_tokens = 10.0, defaults.WARMUP_TOKENS
    fake_server.hold_until_in_flight = in_flight
    proc = phase1("--base-url", fake_server.base_url, "--concurrency", "1", "--num-prefixes", "4",
                  "--warmup-concurrency", str(warmup_concurrency), "--num-requests", "16", "--repeats", "1",
                  *LOAD_QUICK, "--results-dir", str(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.load(open(tmp_path / "results_load_a355_p4_concurrency.json"))
    assert r["config"]["warmup_concurrency"] == warmup_concurrency
    assert len({q["document"] for q in r["levels"][0]["runs"][0]["cached"]["requests"]}) == 4
    assert fake_server.max_in_flight == in_flight
    # a server whose /metrics has no process collector (this stand-in): its share is unknown, not 0
    server = r["levels"][0]["runs"][0]["cached"]["server"]
    assert server["api_server_cpu_busy"] == {fake_server.base_url: None} and server["api_server_cpu_busy_max"] is None
    assert r["levels"][0]["cached"]["server"]["api_server_cpu_busy_max"] is None


# the probe goes through, then the third completion, a warmup sent beside another, is dropped
@pytest.mark.parametrize("fake_server", ["drop-after-3"], indirect=True)
def test_a_failed_concurrent_warmup_ends_the_run_in_one_line(fake_server, tmp_path):
    proc = phase1("--base-url", fake_server.base_url, "--concurrency", "1", "--num-prefixes", "4",
                  "--warmup-concurrency", "2", "--num-requests", "16", "--repeats", "1", *LOAD_QUICK,
                  "--results-dir", str(tmp_path), timeout=120)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("phase1_experiment.py: error: "), proc.stderr[-2000:]
    assert "the warmup of document" in last and "Traceback" not in proc.stderr


def test_an_unaudited_load_run_says_so_and_reports_no_hit_rate(plain_server, tmp_path):
    proc = phase1("--base-url", plain_server.base_url, "--allow-unaudited", "--concurrency", "2", "--num-prefixes", "2",
                  "--num-requests", "6", "--repeats", "1", *LOAD_QUICK, "--results-dir", str(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "!!! UNAUDITED" in proc.stderr
    r = json.load(open(tmp_path / "results_load_a355_p2_concurrency.json"))
    assert r["cache_audit"]["ok"] is None and "--enable-prompt-tokens-details" in r["cache_audit"]["unaudited"]
    assert "hit_rate" not in r["levels"][0]["cached"] and load_tables.hit_rate_text(r["levels"][0]["cached"]) == "-"


def test_hit_rates_are_drawn_with_their_intervals():
    import gzip
    with gzip.open(os.path.join(os.path.dirname(__file__), "..", "results", "cpu-tiny-fleet-overflow", "one-at-a-time",
                                "results_fleet_cache_aware_a355_p24_concurrency.json.gz"), "rt") as f:
        levels = json.load(f)["levels"]
    values, (below, above) = charts.hit_rate_series(levels)
    # concurrency 1: 74% [60.9%, 87.1%] over 3 passes
    assert values[0] == pytest.approx(74.0) and below[0] == pytest.approx(13.1) and above[0] == pytest.approx(13.1)
    del levels[0]["cached"]["hit_rate"]                  # an unaudited level: no series
    assert charts.hit_rate_series(levels) is None


def test_tables_and_charts_of_incomplete_or_unaudited_working_set_files(tmp_path):
    import gzip
    with gzip.open(os.path.join(os.path.dirname(__file__), "..", "results", "cpu-tiny-working-set",
                                "results_workingset_a355.json.gz"), "rt") as f:
        r = json.load(f)
    del r["levels"][-1]["cached"]                       # a level whose only pass failed
    for level in r["levels"]:
        level.get("cached", {}).pop("hit_rate", None)   # measured with --allow-unaudited
    table = load_tables.working_set_table(r)
    assert len([row for row in table.splitlines() if row.startswith("| ")]) == 1 + len(r["levels"]) - 1
    charts.plot_working_set(r, str(tmp_path / "ws.png"))
    assert os.path.exists(tmp_path / "ws.png")


def test_replica_urls_behind_a_running_router_count_each_request_where_it_ran(vllm_server, tmp_path):
    """--base-url a router someone else runs, --replica-urls the servers behind it: the counters,
    the audit's cross-check and the per-replica split come from the servers, not the router."""
    router = servers.RouterProcess([vllm_server.base_url], "round_robin", "127.0.0.1", servers.free_port("127.0.0.1"), [])
    with router:
        router.start(timeout_s=120)
        proc = phase1("--base-url", router.base_url, "--replica-urls", vllm_server.base_url, "--concurrency", "2",
                      "--num-prefixes", "2", "--num-requests", "8", "--repeats", "1", *LOAD_QUICK,
                      "--results-dir", str(tmp_path))
    assert not session_processes(router.proc.pid), "the router left processes behind"
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.load(open(tmp_path / "results_load_a355_p2_concurrency.json"))
    assert r["cache_audit"]["ok"] is True and r["environment"]["server"]["base_url"] == router.base_url
    for c in ("cached", "cold"):
        run = r["levels"][0]["runs"][0][c]
        assert list(run["server"]["replicas"]) == [vllm_server.base_url]
        # every request (and the counters' flush) went through the router to that one server
        assert run["server"]["replicas"][vllm_server.base_url]["requests"] == len(run["requests"]) + 1
        assert run["server"]["prefix_cache_hits"] == sum(q["cached_tokens"] for q in run["requests"])
