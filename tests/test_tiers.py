"""A second cache tier: the cache_tier condition's schedule, audit by tier and figures on known
answers; phase 1 against a real `vllm serve` whose tier is vLLM's ExampleConnector (a store on
disk, tests/tier_connector.py), including a tier that lost the prefix; the native tier refused on
this CPU in one line. Phase 2 with the tier: tests/test_experiment.py's CLI run."""
import json
import os
import shutil

import numpy as np
import pytest

import phase1_experiment as p1
from conftest import ENGINE_FLAGS, kv_transfer_config, run_script
from prefix_cache_bench import analysis, audit, errors, prometheus, protocol, tiers
from prefix_cache_bench.defaults import CONDITIONS, TIER_CONDITION
from prefix_cache_bench.engine_api import RequestResult

FOUR = CONDITIONS + (TIER_CONDITION,)


# ----------------------------------------------------------------------------- the schedule

def test_with_a_tier_each_condition_opens_a_round_once_and_follows_each_other_once_in_four_rounds():
    schedule = protocol.run_schedule(1, range(4), conditions=FOUR)
    rounds = [[c for _, c, r in schedule if r == k] for k in range(4)]
    assert all(sorted(order) == sorted(FOUR) for order in rounds)
    assert sorted(order[0] for order in rounds) == sorted(FOUR)
    pairs = [(a, b) for order in rounds for a, b in zip(order, order[1:])]
    assert len(pairs) == len(set(pairs)) == 12                     # every ordered pair of 4, once
    assert protocol.run_schedule(1, range(6)) == protocol.run_schedule(1, range(6), conditions=CONDITIONS)


# ----------------------------------------------------------------------------- the audit by tier

WARMUP_IDS, BLOCK = list(range(301)), 128                          # a hit finds 256 tokens


def trial(condition, cached, hbm, tier, r=0):
    request = {"cached_tokens": cached, "hbm_cached_tokens": hbm, "tier_cached_tokens": tier, "prompt_tokens": 317}
    return {"condition": condition, "round": r, **request, "throughput_request": dict(request)}


WARM = RequestResult(wall_ms=1.0, prompt_tokens=301, cached_tokens=0, output_tokens=6, hbm_cached_tokens=0,
                     tier_cached_tokens=0)


def test_requests_that_found_what_their_condition_promises_pass():
    trials = [trial("cache_hit", 256, 256, 0), trial("cache_tier", 256, 0, 256), trial("cache_cold", 0, 0, 0),
              trial("cache_miss", 0, 0, 0)]
    assert audit.audit_requests(WARM, trials, WARMUP_IDS, BLOCK) == []


@pytest.mark.parametrize("t,problem", [
    (trial("cache_tier", 0, 0, 0), "cached_tokens=0, expected 256 (the tier's prefix was recomputed)"),
    (trial("cache_tier", 256, 256, 0), "256 cached tokens came from HBM, which was emptied before it"),
    (trial("cache_tier", 256, None, None), "the engine did not say where its cached tokens came from"),
    (trial("cache_hit", 256, 0, 256), "256 cached tokens came from the tier, expected none"),
    (trial("cache_cold", 128, 0, 128), "cached_tokens=128, expected 0"),
], ids=["tier-recomputed", "tier-from-hbm", "tier-unknown", "hbm-hit-from-tier", "cold-found-the-tier"])
def test_a_request_that_broke_its_tier_is_a_problem(t, problem):
    problems = audit.audit_requests(WARM, [t], WARMUP_IDS, BLOCK)
    assert len(problems) == 2 and all(problem in p for p in problems), problems     # its ttft and throughput requests


def test_a_hit_whose_sources_the_engine_did_not_say_is_audited_by_its_count_alone_without_a_tier():
    assert audit.audit_requests(WARM, [trial("cache_hit", 256, None, None)], WARMUP_IDS, BLOCK) == []
    # with a tier it cannot be told from a tier hit
    problems = audit.audit_requests(WARM, [trial("cache_hit", 256, None, None), trial("cache_tier", 256, 0, 256)],
                                    WARMUP_IDS, BLOCK)
    assert problems == [f"cache_hit trial 0 {kind} request: the engine did not say where its cached tokens came from"
                        for kind in ("ttft", "throughput")]


def test_a_restore_that_did_not_come_from_the_tier_is_a_problem():
    good = {"cached_tokens": 128, "hbm_cached_tokens": 0, "tier_cached_tokens": 128}
    for restore, ok in ((good, True), ({**good, "cached_tokens": 0, "tier_cached_tokens": 0}, False),
                        ({**good, "hbm_cached_tokens": 128, "tier_cached_tokens": 0}, False),
                        ({**good, "hbm_cached_tokens": None, "tier_cached_tokens": None}, False)):
        t = {**trial("cache_tier", 256, 0, 256), "restore_requests": [restore]}
        problems = audit.audit_requests(WARM, [t], WARMUP_IDS, BLOCK)
        assert (problems == []) == ok, problems
        assert ok or problems[0].startswith("cache_tier trial 0 restore 0: ")


def test_the_tier_counter_must_grow_by_the_tokens_the_requests_took_from_the_tier():
    requests = [trial("cache_hit", 256, 256, 0), trial("cache_tier", 256, 0, 256)]
    before = {"prefix_cache_queries": 0, "prefix_cache_hits": 0, "external_prefix_cache_queries": 0,
              "external_prefix_cache_hits": 0, "source": "test"}
    flush = RequestResult(wall_ms=1.0, prompt_tokens=2, cached_tokens=0, output_tokens=2, hbm_cached_tokens=0,
                          tier_cached_tokens=0)
    good = {**before, "prefix_cache_queries": 636, "prefix_cache_hits": 256, "external_prefix_cache_hits": 256}
    counters, problems = audit.audit_counters(requests, flush, before, good)
    assert problems == [] and counters["sum_tier_cached_tokens"] == 256 and counters["sum_cached_tokens"] == 512
    # the same 512 cached tokens, but the engine counted them all in HBM: the tier served none
    wrong = {**good, "prefix_cache_hits": 512, "external_prefix_cache_hits": 0}
    _, problems = audit.audit_counters(requests, flush, before, wrong)
    assert problems == ["the tier's hit counter grew by 0, but the requests report 256 tokens from the tier"]


def test_the_restore_requests_of_a_tier_trial_are_among_the_requests_audited_by_counter():
    t = {**trial("cache_tier", 256, 0, 256), "restore_requests": [{"cached_tokens": 128, "tier_cached_tokens": 128}]}
    assert len(audit.requests_of(WARM, [t])) == 4
    assert audit.audit_report([], WARM, [t], WARMUP_IDS, BLOCK, None)["requests_checked"] == 5   # and the flush


# ----------------------------------------------------------------------------- the server's readings

SOURCES_TEXT = """vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_compute"} 100.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_cache_hit"} 256.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="external_kv_transfer"} 384.0
vllm:kv_offload_load_bytes_total{engine="0",model_name="m"} 2.5e9
vllm:kv_offload_load_time_total{engine="0",model_name="m"} 0.1
vllm:external_prefix_cache_hits_total{engine="0",model_name="m"} 384.0
vllm:external_prefix_cache_queries_total{engine="0",model_name="m"} 900.0
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 256.0
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
"""


def test_prompt_tokens_by_source_and_the_tier_s_loads_are_read_from_metrics():
    metrics = prometheus.parse_metrics(SOURCES_TEXT)
    assert prometheus.source_totals([metrics, metrics]) == {
        "hbm_cached_tokens": 512, "tier_cached_tokens": 768, "computed_tokens": 200, "tier_load_bytes": 5e9,
        "tier_load_s": 0.2}
    counters = prometheus.server_counters(metrics)
    assert counters["external_prefix_cache_hits"] == 384 and counters["external_prefix_cache_queries"] == 900
    assert prometheus.source_totals([{}]) == {}


def test_one_request_s_sources_are_what_it_added_if_they_add_up_to_its_prompt():
    before = {"hbm_cached_tokens": 100, "tier_cached_tokens": 0, "computed_tokens": 50, "tier_load_bytes": 0.0,
              "tier_load_s": 1.0}
    after = {"hbm_cached_tokens": 100, "tier_cached_tokens": 384, "computed_tokens": 83, "tier_load_bytes": 5e7,
             "tier_load_s": 1.004}
    sources = prometheus.one_request_sources(before, after, prompt_tokens=417)
    assert sources["hbm_cached_tokens"] == 0 and sources["tier_cached_tokens"] == 384
    assert sources["tier_load_bytes"] == 5e7 and sources["tier_load_ms"] == pytest.approx(4.0)
    assert prometheus.one_request_sources(before, after, prompt_tokens=418) == {}     # another request's too
    assert prometheus.one_request_sources({}, after, prompt_tokens=417) == {}


def test_the_offloading_connector_s_stats_payload_gives_bytes_and_seconds_loaded():
    payload = {"types": {tiers.LOAD_BYTES: "counter", tiers.LOAD_TIME_S: "counter", "vllm:kv_offload_load_size": "histogram"},
               "data": {tiers.LOAD_BYTES: {(): 4096, ("x",): 1024}, tiers.LOAD_TIME_S: {(): 0.5},
                        "vllm:kv_offload_load_size": {(): [4096]}}}
    assert tiers.connector_load(payload) == (5120, 0.5)
    assert tiers.connector_load(None) == (0, 0.0) and tiers.connector_load({"x": 1}) == (0, 0.0)


def test_the_connector_named_is_the_one_vllm_builds_for_the_backend():
    assert tiers.offloading_connector("native", {}) == "OffloadingConnector"
    assert tiers.offloading_connector("native", {"VLLM_USE_SIMPLE_KV_OFFLOAD": "1"}) == "SimpleCPUOffloadConnector"
    assert tiers.offloading_connector("native", {"VLLM_USE_SIMPLE_KV_OFFLOAD": "0"}) == "OffloadingConnector"
    assert tiers.offloading_connector("lmcache", {}) == "LMCacheMPConnector"
    assert tiers.offloading_connector(None, {}) is None


def test_the_tier_of_a_server_is_read_from_its_flags():
    assert tiers.tier_from_flags(["--enforce-eager"]) is None
    assert tiers.tier_from_flags(["--kv-offloading-size", "64"]) == {
        "connector": "OffloadingConnector", "backend": "native", "size_gib": 64.0, "extra_config": {}}
    lmcache = tiers.tier_from_flags(["--kv-offloading-size=8", "--kv-offloading-backend", "lmcache"])
    assert (lmcache["backend"], lmcache["connector"]) == ("lmcache", "LMCacheMPConnector")
    tier = tiers.tier_from_flags(["--kv-transfer-config", kv_transfer_config("/s")])
    assert tier["connector"] == "SaltedExampleConnector" and tier["extra_config"] == {"shared_storage_path": "/s"}
    for flags in (["--kv-transfer-config", "{not json"], ["--kv-transfer-config", "[1]"], ["--kv-offloading-size", "many"]):
        with pytest.raises(errors.ExperimentError) as e:
            tiers.tier_from_flags(flags)
        assert e.value.exit_code == errors.EXIT_USAGE


# ----------------------------------------------------------------------------- figures

def test_the_load_rate_is_all_bytes_over_all_copy_time():
    def loaded(b, ms):
        return {"tier_load_bytes": b, "tier_load_ms": ms}
    trials = [{**loaded(1e9, 10.0), "throughput_request": loaded(1e9, 10.0)},
              {**loaded(2e9, 30.0), "throughput_request": loaded(0.0, 0.0)}]
    rate = analysis.load_rate(trials)
    assert rate["gb_s"] == pytest.approx(4e9 / 0.05 / 1e9) and rate["bytes_per_request"] == 1e9
    assert analysis.load_rate([{**loaded(None, None), "throughput_request": loaded(1.0, 1.0)}]) is None


def test_a_tier_hit_is_compared_with_cold_and_with_an_hbm_hit_as_the_hit_is_with_cold():
    rng = np.random.default_rng(0)
    trials = [{"condition": c, "round": r, "ttft_ms": level * (1 + 0.01 * rng.standard_normal())}
              for r in range(8) for c, level in (("cache_hit", 10.0), ("cache_miss", 12.0), ("cache_cold", 40.0),
                                                 (TIER_CONDITION, 20.0))]
    compared = analysis.compare(trials, "round")
    mean = lambda c: np.mean([t["ttft_ms"] for t in trials if t["condition"] == c])
    assert compared["tier_ttft_saving_pct"] == pytest.approx(100 * (1 - mean(TIER_CONDITION) / mean("cache_cold")))
    assert compared["tier_over_hit_pct"] == pytest.approx(100 * (mean(TIER_CONDITION) / mean("cache_hit") - 1))
    assert compared["tier_ttft_saving_ms"] == pytest.approx(mean("cache_cold") - mean(TIER_CONDITION))
    for key, truth in (("tier_ttft_saving_ci95", 50.0), ("tier_over_hit_ci95", 100.0)):
        lo, hi = compared[key]
        assert lo < truth < hi and hi - lo < 5
    assert "tier_ttft_saving_pct" not in analysis.compare([t for t in trials if t["condition"] != TIER_CONDITION], "round")


# ----------------------------------------------------------------------------- phase 1 with a tier

QUICK = ["--num-trials", "3", "--num-blocks", "1", "--max-output-tokens", "3"]


@pytest.fixture(scope="module")
def tier_run(tier_server, tmp_path_factory):
    """One phase-1 run of two configs against the server with a tier: (folder, proc)."""
    out = tmp_path_factory.mktemp("tier-phase1")
    proc = run_script(["phase1_experiment.py", "--base-url", tier_server.base_url, "--sizes", "300x100,200x150",
                       *QUICK, "--results-dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_phase1_measures_a_hit_from_the_tier_beside_the_hbm_hit_and_cold(tier_run):
    out, proc = tier_run
    for name, hit_tokens in (("results_phase1_a300_b100.json", 384), ("results_phase1_a200_b150.json", 256)):
        r = json.load(open(out / name))
        assert r["cache_audit"]["ok"] is True, r["cache_audit"]["problems"]
        assert r["environment"]["tier"]["connector"] == "a KV connector"        # a server reached by --base-url
        for c in FOUR:
            assert r[c]["stats"]["num_trials"] == 3
        for t in r[TIER_CONDITION]["trials"]:
            for request in (t, t["throughput_request"]):
                assert (request["cached_tokens"], request["hbm_cached_tokens"], request["tier_cached_tokens"]) == \
                    (hit_tokens, 0, hit_tokens)
            # the other config's [A, B] went back into HBM, from the tier, after each of the two requests
            assert len(t["restore_requests"]) == 2 and all(q["tier_cached_tokens"] > 0 for q in t["restore_requests"])
        for t in r["cache_hit"]["trials"]:
            assert (t["hbm_cached_tokens"], t["tier_cached_tokens"]) == (hit_tokens, 0)
        assert r[TIER_CONDITION]["stats"]["tier_cached_tokens"] == hit_tokens
        counters = r["cache_audit"]["engine_counters"]
        assert counters["external_prefix_cache_hits"] == counters["sum_tier_cached_tokens"] > 0
        assert counters["prefix_cache_hits"] + counters["external_prefix_cache_hits"] == counters["sum_cached_tokens"]
        lo, hi = r["tier_ttft_saving_ci95"]         # None: unbounded (Fieller, 2 blocks of a noisy CPU)
        assert (lo is None or lo <= r["tier_ttft_saving_pct"]) and (hi is None or r["tier_ttft_saving_pct"] <= hi)
        # from the JSON's means, each rounded to 3 decimals: the ratio is known to within their rounding
        tier_ms, hit_ms = r[TIER_CONDITION]["stats"]["ttft_mean"], r["cache_hit"]["stats"]["ttft_mean"]
        rounding = 100 * tier_ms / hit_ms * (0.0005 / tier_ms + 0.0005 / hit_ms) + 0.0005
        assert r["tier_over_hit_pct"] == pytest.approx(100 * (tier_ms / hit_ms - 1), abs=rounding)
    assert proc.stdout.count("a tier hit (a KV connector) saves vs cold") == 2


def test_a_tier_that_lost_the_prefix_is_caught_by_the_audit(tier_server):
    """The store is emptied with HBM before every tier request: the tier requests recompute [A, B]."""
    from prefix_cache_bench.http_client import HttpClient
    from prefix_cache_bench.server_engine import prepare, server_environment
    settings, _, _ = p1.parse_args(["--base-url", tier_server.base_url, "--size-a", "300", "--size-b", "100", *QUICK])
    with HttpClient(tier_server.base_url, 60) as client:
        engine, tokenizer, card, _ = prepare(client, settings, None)
        empty_hbm = engine.empty_hbm_prefix_cache

        def empty_hbm_and_the_store():
            for entry in os.listdir(tier_server.tier_store):
                shutil.rmtree(tier_server.tier_store / entry)
            return empty_hbm()

        engine.empty_hbm_prefix_cache = empty_hbm_and_the_store
        env = server_environment(client, card, None, [], engine)
        result, = protocol.run_configs(engine, tokenizer, settings.run, env)
    problems = result["cache_audit"]["problems"]
    assert result["cache_audit"]["ok"] is False
    recomputed = [p for p in problems if p.startswith(TIER_CONDITION)]
    assert len(recomputed) == 2 * 4 and all(p.endswith("expected 384 (the tier's prefix was recomputed)") for p in recomputed)
    assert not [p for p in problems if not p.startswith(TIER_CONDITION)], problems


# ----------------------------------------------------------------------------- under load, with a tier

def load_request(k, cached, hbm, tier, ttft_ms):
    return {"index": k, "condition": "cached", "start_s": k * 0.1, "end_s": k * 0.1 + 0.05, "ttft_ms": ttft_ms,
            "tpot_ms": None, "prompt_tokens": 317, "output_tokens": 4, "cached_tokens": cached,
            "document_cached_tokens": 256, "cache_state": "hit" if cached else "miss", "error": None,
            "hbm_cached_tokens": hbm, "tier_cached_tokens": tier}


def test_load_requests_are_split_by_where_their_prefix_came_from():
    from prefix_cache_bench.load_figures import cache_source, condition_stats
    requests = ([load_request(k, 256, 256, 0, 10.0 + k) for k in range(4)] +
                [load_request(4 + k, 256, 0, 256, 30.0 + k) for k in range(2)] + [load_request(6, 0, 0, 0, 90.0)])
    assert [cache_source(r) for r in requests] == ["hbm"] * 4 + ["tier"] * 2 + ["computed"]
    assert cache_source({**requests[0], "tier_cached_tokens": None}) is None
    stats = condition_stats(requests, None)
    assert stats["hit_rate"]["hbm_tokens"] == pytest.approx(4 / 7) and stats["hit_rate"]["tier_tokens"] == pytest.approx(2 / 7)
    by = stats["by_source"]
    assert by["hbm"]["requests"] == 4 and by["hbm"]["ttft_ms_p50"] == 11.5 and by["hbm"]["ttft_ms_p99"] == pytest.approx(12.97)
    assert by["tier"] == {"requests": 2, "ttft_ms_mean": 30.5, "ttft_ms_p50": 30.5, "ttft_ms_p99": pytest.approx(30.99)}
    assert by["computed"]["requests"] == 1
    # one request whose sources are unknown: no split at all, rather than a split of some
    requests[0] = {key: value for key, value in requests[0].items() if key not in ("hbm_cached_tokens", "tier_cached_tokens")}
    assert "by_source" not in condition_stats(requests, None)


def test_past_hbm_a_working_set_is_served_from_the_tier_and_each_request_says_from_where(tier_server, tmp_path):
    """Documents of 300 tokens (2 full blocks of 128 cached) against 48 blocks of HBM: 2 fit; 40
    requests drawn from 64 (each level warms the documents its requests draw, about 30) do not.
    One client, so each request's sources are read from /metrics after it."""
    out = tmp_path / "out"
    proc = run_script(["phase1_experiment.py", "--base-url", tier_server.base_url, "--size-a", "300",
                       "--num-prefixes", "2,64", "--concurrency", "1", "--num-requests", "40", "--repeats", "1",
                       "--max-output-tokens", "4", "--results-dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.load(open(out / "results_workingset_a300.json"))
    assert r["cache_audit"]["ok"] is True and r["environment"]["tier"]["connector"] == "a KV connector"
    small, large = (level["cached"] for level in r["levels"])
    assert small["hit_rate"]["requests"] == 1 and small["hit_rate"]["tier_tokens"] == 0
    assert set(small["by_source"]) == {"hbm"}
    # past HBM the tier serves what HBM no longer holds: still every request a hit, some from the tier
    assert large["hit_rate"]["requests"] == 1 and large["hit_rate"]["tier_tokens"] > 0
    assert large["by_source"]["tier"]["requests"] > 0
    for level in r["levels"]:
        for run in level["runs"]:
            for request in run["cached"]["requests"]:
                assert request["hbm_cached_tokens"] + request["tier_cached_tokens"] == request["cached_tokens"]
            server = run["cached"]["server"]
            assert server["prefix_cache_hits"] + server["external_prefix_cache_hits"] == server["sum_cached_tokens"]
    assert "by where the prefix came from" in proc.stdout


# ----------------------------------------------------------------------------- a tier that cannot start

@pytest.mark.parametrize("script", ["phase2_experiment.py", "phase1_experiment.py"])
def test_the_native_tier_on_this_cpu_is_refused_in_one_line_before_any_engine_starts(script, tiny_model_dir, tmp_path):
    proc = run_script([script, "--model", tiny_model_dir, "--kv-offloading-size", "1", *ENGINE_FLAGS,
                       "--results-dir", str(tmp_path / "out")], timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Triton" not in line]
    assert proc.returncode == 1 and lines == [
        f"{script}: error: --kv-offloading-size: vLLM's native host-memory tier runs on CUDA and XPU GPUs only, not "
        f"on this CPU engine; on a CPU give a tier with --kv-transfer-config (docs/tiers.md)"], proc.stderr[-2000:]
    assert not os.path.exists(tmp_path / "out") or not os.listdir(tmp_path / "out")
