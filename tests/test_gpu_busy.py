"""The GPU-busy segment (prefix_cache_bench/gpu_busy.py): its arithmetic on known answers, its
requests on the real CPU engine and a real server with a tier. This machine has no CUDA device:
the worker extension is driven for real (it answers that there is nothing to trace), and only
the GPU's clock itself is faked, as a known activity per request."""
import dataclasses

import pytest

import phase1_experiment as p1
from test_experiment import run_many
from test_tiers import QUICK
from prefix_cache_bench import analysis, defaults, engine_api, gpu_busy, offline_engine, protocol, server_engine, tables
from prefix_cache_bench.defaults import TIER_CONDITION


def test_overlapping_device_activities_count_once_and_the_span_covers_the_gaps():
    ms = 1_000_000
    spans = [(20 * ms, 25 * ms), (0, 10 * ms), (5 * ms, 12 * ms), (6 * ms, 7 * ms), (12 * ms, 13 * ms)]
    # union: [0, 13] and [20, 25] = 18 ms busy; span 0..25
    assert gpu_busy.device_busy_ms(spans) == (18.0, 25.0)
    assert gpu_busy.device_busy_ms([]) == (0.0, 0.0)
    assert gpu_busy.device_busy_ms([(3 * ms, 3 * ms + 500_000)]) == (0.5, 0.5)


def test_the_tier_s_block_swapping_kernel_counts_as_a_copy():
    """vLLM's native tier moves small pinned pages with a Triton kernel (_swap_blocks_kernel): its
    time is a load, not the step's own work."""
    ms = 1_000_000
    activity = gpu_busy.busy_by_kind([("_swap_blocks_kernel", 0, 2 * ms), ("Memcpy HtoD (Pinned -> Device)", 2 * ms, 3 * ms),
                                      ("ampere_bf16_gemm", 5 * ms, 9 * ms)])
    assert activity["gpu_copy_ms"] == 3.0 and activity["gpu_kernel_busy_ms"] == 4.0 and activity["gpu_busy_ms"] == 7.0


def test_a_tier_hit_whose_copies_fall_in_the_queue_has_no_negative_part():
    """The H100 tier hit at 32k read queue 105.78 ms, prefill step 20.38 ms, GPU busy 108.65 ms and
    "step: the rest" -88.27 ms (issue 39's figures). Its window is rebuilt here with copies of
    91 ms (4.33 GB at the connector's 47.1 GB/s: 92 ms) in the queue and 18 ms of kernels in the
    step, durations chosen for the test, not measured. The copies are the tier's: a part of their
    own in the queue, apart from the step's kernels."""
    ms = 1_000_000
    # the profiled window: 1,032 block copies back to back over 0-91 ms, then the step's kernels over 106-124 ms
    copies = [("Memcpy HtoD (Pinned -> Device)", k * 88_178, (k + 1) * 88_178) for k in range(1032)]
    kernels = [("ampere_bf16_gemm", 106 * ms + k * ms, 106 * ms + (k + 1) * ms - 10) for k in range(18)]
    activity = gpu_busy.busy_by_kind(copies + [("Memset (Device)", 105 * ms, 105 * ms + 5_000)] + kernels)
    assert round(activity["gpu_copy_ms"], 1) == 91.0 and round(activity["gpu_kernel_busy_ms"], 3) == 18.005
    assert activity["gpu_busy_ms"] > 108 and activity["device_activities"] == 1032 + 1 + 18
    tier_hit = engine_api.RequestResult(wall_ms=148.9, prompt_tokens=33041, cached_tokens=33024, output_tokens=1,
                                        engine_ttft_ms=147.2, queue_ms=105.78, prefill_ms=20.38,
                                        hbm_cached_tokens=0, tier_cached_tokens=33024, tier_load_ms=91.0)
    parts = tier_hit.ttft_breakdown()
    assert parts == {"outside_engine_ms": pytest.approx(1.7), "frontend_ipc_ms": pytest.approx(21.04),
                     "queue_ms": pytest.approx(14.78), "tier_wait_ms": 91.0, "prefill_step_ms": 20.38}
    assert min(parts.values()) >= 0 and sum(parts.values()) == pytest.approx(148.9)
    # without the connector's copy time, the whole queue is the wait for the copies
    parts = dataclasses.replace(tier_hit, tier_load_ms=None).ttft_breakdown()
    assert (parts["queue_ms"], parts["tier_wait_ms"]) == (0.0, 105.78)
    # an HBM hit's breakdown has no tier part
    assert "tier_wait_ms" not in dataclasses.replace(tier_hit, tier_cached_tokens=0, hbm_cached_tokens=33024).ttft_breakdown()
    # the step split: the step's kernels, not the window's copies
    segment = gpu_busy.segment_summary([{**record(TIER_CONDITION, activity["gpu_busy_ms"], 33024, 33024), **activity}], 1)
    busy, rest = analysis.step_split({"ttft_breakdown_mean_ms": parts}, segment, TIER_CONDITION)
    assert (round(busy, 3), round(rest, 3)) == (18.005, 2.375)
    assert segment["by_condition"][TIER_CONDITION]["gpu_copy_mean_ms"] == pytest.approx(91.0, abs=0.01)
    # a file from before the kinds were told apart: every activity counts, as it did
    old = gpu_busy.segment_summary([record(TIER_CONDITION, 108.65, 33024, 33024)], 1)
    assert analysis.step_split({"ttft_breakdown_mean_ms": parts}, old, TIER_CONDITION)[1] == pytest.approx(-88.27)


def record(condition, busy_ms, cached=0, expected=0):
    """A profiled request's record as profiled_segment writes it (broke_its_condition where it
    found other than its condition promises)."""
    return {"condition": condition, "round": 9, "prompt_tokens": 400, "cached_tokens": cached,
            "expected_cached_tokens": expected, "ttft_ms_profiled": 5.0, "prefill_step_ms_profiled": 3.0,
            "gpu_busy_ms": busy_ms, "gpu_span_ms": None if busy_ms is None else busy_ms + 1.0, "device_activities": 7,
            **({"broke_its_condition": True} if cached != expected else {})}


def test_the_summary_leaves_out_requests_that_broke_their_condition_or_were_not_traced():
    records = [record("cache_hit", 2.0, 384, 384), record("cache_hit", 4.0, 384, 384),
               record("cache_hit", 100.0, 0, 384),          # a hit that recomputed: not a hit's GPU time
               record("cache_cold", 30.0), record("cache_miss", None)]
    summary = gpu_busy.segment_summary(records, 3)
    assert summary["by_condition"] == {
        "cache_hit": {"requests": 2, "gpu_busy_mean_ms": 3.0, "gpu_busy_min_ms": 2.0, "gpu_busy_max_ms": 4.0,
                      "gpu_span_mean_ms": 4.0},
        "cache_cold": {"requests": 1, "gpu_busy_mean_ms": 30.0, "gpu_busy_min_ms": 30.0, "gpu_busy_max_ms": 30.0,
                       "gpu_span_mean_ms": 31.0}}
    assert summary["requests"] == records and summary["requests_per_condition"] == 3


def test_processes_segments_merge_into_one_over_all_their_requests():
    one = gpu_busy.segment_summary([record("cache_hit", 2.0, 384, 384)], 1)
    two = gpu_busy.segment_summary([record("cache_hit", 6.0, 384, 384)], 1)
    merged = gpu_busy.merge_segments([one, two])
    assert merged["by_condition"]["cache_hit"]["gpu_busy_mean_ms"] == 4.0
    assert [x["process"] for x in merged["requests"]] == [0, 1]
    not_measured = {"not_measured": gpu_busy.NOT_ON_THIS_ENGINE}
    assert gpu_busy.merge_segments([not_measured, not_measured]) == not_measured


def test_the_anatomy_table_splits_the_prefill_step_by_the_gpu_busy_time():
    stats = lambda ttft, step: {"ttft_mean": ttft, "ttft_breakdown_mean_ms": {
        "outside_engine_ms": 1.0, "frontend_ipc_ms": 2.0, "queue_ms": 1.0, "prefill_step_ms": step}}
    data = {"config": {}, "environment": {}, "cache_hit": {"stats": stats(20.0, 16.0)},
            "cache_miss": {"stats": stats(24.0, 20.0)}, "cache_cold": {"stats": stats(104.0, 100.0)},
            "gpu_busy": gpu_busy.segment_summary([record("cache_hit", 4.0, 384, 384), record("cache_cold", 90.0)], 1)}
    assert analysis.step_split(data["cache_hit"]["stats"], data["gpu_busy"], "cache_hit") == (4.0, 12.0)
    assert analysis.step_split(data["cache_miss"]["stats"], data["gpu_busy"], "cache_miss") is None
    table = tables.anatomy_table({(512, 256): data}).splitlines()
    assert table[0].endswith("| prefill step | step: GPU busy | not GPU work | GPU floor ms | TTFT / floor |")
    # hit: 4 of its 20 ms on the GPU, 80% of its TTFT not GPU work; cold: 90 of 104, 13%; miss: not profiled
    assert "| A=512 / B=256 | hit | 20.00 | 1.00 | 2.00 | 1.00 | 16.00 | 4.00 | 80% | - | - |" in table
    assert "| A=512 / B=256 | cold | 104.00 | 1.00 | 2.00 | 1.00 | 100.00 | 90.00 | 13% | - | - |" in table
    assert "| A=512 / B=256 | miss | 24.00 | 1.00 | 2.00 | 1.00 | 20.00 | - | - | - | - |" in table
    without = {(512, 256): {**data, "gpu_busy": {"not_measured": server_engine.GPU_BUSY_NOT_THROUGH_A_SERVER}}}
    assert "GPU busy" not in tables.anatomy_table(without)


class FakeGpuClock:
    """An engine as it is, but for the GPU's clock, which this machine has not: each request's
    activity is a known one (its prompt length in ms)."""

    def __init__(self, engine, break_hits=False):
        self.engine, self.break_hits = engine, break_hits

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def gpu_busy_unavailable(self):
        assert self.engine.gpu_busy_unavailable() is not None    # the real answer here: no CUDA device, or a server
        return None

    def gpu_busy_request(self, prompt_ids, max_tokens, cache_salt=None):
        if self.break_hits:
            self.engine.reset_prefix_cache()
        result = self.engine.request(prompt_ids, max_tokens, cache_salt)
        return result, {"gpu_busy_ms": float(len(prompt_ids)), "gpu_span_ms": len(prompt_ids) + 0.5,
                        "device_activities": 3}


def test_the_worker_extension_answers_through_the_real_engine(llm):
    assert llm.llm_engine.vllm_config.parallel_config.worker_extension_cls == gpu_busy.WORKER_EXTENSION
    assert llm.collective_rpc("pcb_gpu_busy_start") == [False]         # no CUDA device on this machine
    assert llm.collective_rpc("pcb_gpu_busy_stop") == [None]
    assert offline_engine.OfflineEngine(llm, "tiny").gpu_busy_unavailable() == gpu_busy.NOT_ON_THIS_ENGINE


def run_profiled(llm, engine, **overrides):
    return run_many(llm, [(200, 100)], engine=engine, num_trials=2, max_output_tokens=4, **overrides)[0]


def test_after_the_rounds_each_condition_is_profiled_in_the_cache_state_it_promises(llm):
    r = run_profiled(llm, FakeGpuClock(offline_engine.OfflineEngine(llm, "tiny")), profiled_requests=2)
    assert r["cache_audit"]["ok"] is True, r["cache_audit"]["problems"]
    hit_tokens = r["cache_audit"]["expected_hit_cached_tokens"]
    segment = r["gpu_busy"]
    assert [(x["condition"], x["round"]) for x in segment["requests"]] == \
        [(c, k) for k in (3, 4) for c in defaults.CONDITIONS]        # after rounds 0 (discarded), 1 and 2
    for x in segment["requests"]:
        assert x["cached_tokens"] == x["expected_cached_tokens"] == (hit_tokens if x["condition"] == "cache_hit" else 0)
        assert x["gpu_busy_ms"] == x["prompt_tokens"] and x["prefill_step_ms_profiled"] > 0
    assert {c: s["requests"] for c, s in segment["by_condition"].items()} == {c: 2 for c in defaults.CONDITIONS}
    assert segment["by_condition"]["cache_miss"]["gpu_busy_mean_ms"] == r["cache_miss"]["stats"]["prompt_tokens"]
    # the measured rounds are as without a segment: its requests are in no trial and no statistic
    assert r["cache_hit"]["stats"]["num_trials"] == 2 and len(r["cache_hit"]["trials"]) == 2


def test_a_profiled_hit_that_found_nothing_fails_the_audit_and_is_left_out(llm):
    r = run_profiled(llm, FakeGpuClock(offline_engine.OfflineEngine(llm, "tiny"), break_hits=True), profiled_requests=1)
    hit_tokens = r["cache_audit"]["expected_hit_cached_tokens"]
    assert r["cache_audit"]["ok"] is False
    assert r["cache_audit"]["problems"] == [f"cache_hit profiled request 3: cached_tokens=0, expected {hit_tokens}"]
    assert "cache_hit" not in r["gpu_busy"]["by_condition"] and "cache_cold" in r["gpu_busy"]["by_condition"]


def test_without_profiled_requests_the_result_says_so(llm):
    r = run_profiled(llm, FakeGpuClock(offline_engine.OfflineEngine(llm, "tiny")), profiled_requests=0)
    assert r["gpu_busy"] == {"not_measured": "--profiled-requests 0"}


def test_a_profiled_tier_hit_is_loaded_from_the_tier_and_the_other_configs_restored(tier_server):
    """Through the server with a tier, taken as an engine of this run alone with a GPU clock (the
    segment itself runs offline only): the tier request finds [A, B] in the tier, not in HBM."""
    from prefix_cache_bench.http_client import HttpClient
    from prefix_cache_bench.server_engine import prepare, server_environment
    settings, _, _ = p1.parse_args(["--base-url", tier_server.base_url, "--sizes", "300x100,200x150", *QUICK,
                                    "--num-trials", "2"])
    run = dataclasses.replace(settings.run, profiled_requests=1)
    with HttpClient(tier_server.base_url, 60) as client:
        engine, tokenizer, card, _ = prepare(client, settings, None)
        env = server_environment(client, card, None, [], engine)
        engine.shared = False
        results = protocol.run_configs(FakeGpuClock(engine), tokenizer, run, env)
    for r, hit_tokens in zip(results, (384, 256)):
        assert r["cache_audit"]["ok"] is True, r["cache_audit"]["problems"]
        tier_request, = [x for x in r["gpu_busy"]["requests"] if x["condition"] == TIER_CONDITION]
        assert tier_request["cached_tokens"] == tier_request["expected_cached_tokens"] == hit_tokens
        assert (tier_request["hbm_cached_tokens"], tier_request["tier_cached_tokens"]) == (0, hit_tokens)
        assert set(r["gpu_busy"]["by_condition"]) == {*defaults.CONDITIONS, TIER_CONDITION}
