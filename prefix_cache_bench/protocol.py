"""The trial protocol, against one engine interface (Engine below) that the offline engine
(offline.OfflineEngine) and a server (server_engine.ServerEngine) both implement: warm the cache,
run every config's conditions in rotated rounds, audit, summarize, print and write.
"""
from __future__ import annotations
import datetime
import math
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .analysis import summarize
from .audit import audit_counters, audit_report, audit_requests, requests_of
from .defaults import (CONDITIONS, MAX_OUTPUT_TOKENS, MIN_ROUNDS_PER_BLOCK, PAUSE_MS, QUERY_TOKENS,
                       ROUND_ORDERS, TIER_CONDITION, TIER_ROUND_ORDERS, WARMUP_TOKENS)
from .engine_api import Engine, RequestResult
from .errors import ExperimentError
from .gpu_busy import profiled_segment, segment_summary
from .prompts import ConfigPrompts, Prompt
from .result_schema import PhaseResult, build_phase_result
from .tiers import TierRequest, empty_hbm
from .settings import RunSettings

Request = Callable[[list[int], int, str | None], RequestResult]   # request(prompt_ids, max_tokens, cache_salt)
Scheduled = tuple[int, str, int]     # (config index, condition, round)


def run_trial(request: Request, ttft_prompt: Prompt, throughput_prompt: Prompt, pause_s: float = PAUSE_MS / 1e3,
              max_output_tokens: int = MAX_OUTPUT_TOKENS) -> dict[str, Any]:
    """Pure measurement: TTFT (1-token request), pause, throughput (max_output_tokens request), pause.

    request(prompt_ids, max_tokens, cache_salt) sends one request and returns its wall_ms and
    counts; a streamed request also returns ttft_ms, otherwise the 1-token request's wall time
    is the TTFT. Each prompt is (token ids, cache_salt), each with its own fresh query. The
    pause after each request gives every timed request the same idle gap before it."""
    first = request(ttft_prompt[0], 1, ttft_prompt[1])
    time.sleep(pause_s)
    full = request(throughput_prompt[0], max_output_tokens, throughput_prompt[1])
    time.sleep(pause_s)
    return {
        "ttft_ms": first.client_ttft_ms,
        "total_time_ms": full.wall_ms,
        "throughput_tok_s": full.output_tokens / (full.wall_ms / 1e3),
        "prompt_tokens": first.prompt_tokens,
        "cached_tokens": first.cached_tokens,
        "engine_ttft_ms": first.engine_ttft_ms,
        "prefill_ms": first.prefill_ms,
        "queue_ms": first.queue_ms,
        "hbm_cached_tokens": first.hbm_cached_tokens,
        "tier_cached_tokens": first.tier_cached_tokens,
        "tier_load_bytes": first.tier_load_bytes,
        "tier_load_ms": first.tier_load_ms,
        "throughput_request": full.as_json(),
        "ttft_breakdown_ms": first.ttft_breakdown(),
    }


def run_schedule(num_configs: int, rounds: Sequence[int], block_order: bool = False,
                 conditions: Sequence[str] = CONDITIONS) -> list[Scheduled]:
    """Order of (config index, condition, round) for the given rounds of every config.

    By default round r runs every config once, the configs' order rotated each round, and in
    each config one trial of each condition in ROUND_ORDERS' order. So every config and every
    condition is spread over the run's whole wall time, and a drift of the host lands on all
    of them alike. block_order: the design's literal order, config after config, all hits,
    then all misses, then all cold. conditions: CONDITIONS, or with the tier's (TIER_ROUND_ORDERS)."""
    if block_order:
        return [(k, c, r) for k in range(num_configs) for c in conditions for r in rounds]
    orders = TIER_ROUND_ORDERS if len(conditions) == len(TIER_ROUND_ORDERS[0]) else ROUND_ORDERS
    schedule = []
    for r in rounds:
        for j in range(num_configs):
            schedule += [((r + j) % num_configs, conditions[i], r) for i in orders[r % len(orders)]]
    return schedule


def rounds_per_block(round_s: float, min_block_s: float) -> int:
    """How many measured rounds each time block holds, when the run is sized by time: a block
    lasts at least min_block_s, so that the blocks span drift that comes and goes over tens
    of seconds; at least MIN_ROUNDS_PER_BLOCK."""
    return max(MIN_ROUNDS_PER_BLOCK, math.ceil(min_block_s / max(round_s, 1e-9)))


def block_of(measured_round: int, num_rounds: int, num_blocks: int) -> int:
    """Time block of the measured_round-th measured round (0-based): even contiguous slices."""
    return measured_round * num_blocks // num_rounds


def check_cache_holds(kv_capacity: tuple[int, int] | None, configs: Sequence[ConfigPrompts], max_output_tokens: int) -> None:
    """The configs of one run share the engine's KV cache, kv_capacity = (blocks, block size)
    or None: every warmed [A, B] must stay cached while a whole round of every config's
    requests comes and goes (LRU evicts the blocks used longest ago). Raises if the cache is
    too small to promise that."""
    if not kv_capacity:
        return
    num_blocks, block_size = kv_capacity
    capacity = num_blocks * block_size
    blocks = lambda tokens: -(-tokens // block_size) * block_size
    warm = sum(blocks(len(c.warmup_ids) + WARMUP_TOKENS) for c in configs)
    one_round = sum(2 * (blocks(len(c.warmup_ids) + QUERY_TOKENS + max_output_tokens) * 2 +
                         blocks(len(c.miss_ids) + QUERY_TOKENS + max_output_tokens)) for c in configs)
    if warm + one_round > capacity:
        raise ExperimentError(
            f"these configs need about {warm + one_round} tokens of KV cache at once ({warm} for the warmed "
            f"[A, B] prompts, {one_round} for one round of requests) but the engine has {capacity}: "
            f"run fewer configs per invocation, or give the cache more memory (--gpu-memory-utilization)")


def warm_cache(request: Request, warmup_ids: list[int], pause_s: float, cache_salt: str | None = None) -> RequestResult:
    """Step 3: the one-time [A, B] generation that fills the prefix cache; returns its request."""
    warm = request(warmup_ids, WARMUP_TOKENS, cache_salt)
    time.sleep(pause_s)
    return warm


def run_trials(engine: Engine, schedule: Sequence[Scheduled], configs: Sequence[ConfigPrompts], settings: RunSettings,
               clock: float, desc: str, hit_salt: str | None = None) -> list[dict[str, Any]]:
    """Steps 4-5: every scheduled (config, condition, round) in order, all prompts built first
    (between requests, nothing of this tool runs but a server engine's one /metrics read, and a
    tier condition's untimed steps: tiers.TierRequest). Each trial records its place in the run
    and its start in seconds since the run began (clock)."""
    from tqdm import tqdm

    prompts = [configs[k].trial_prompts(condition, r) for k, condition, r in schedule]
    trials = []
    bar = tqdm(list(zip(schedule, prompts)), desc=desc, unit="trial", file=sys.stderr, dynamic_ncols=True,
               mininterval=1.0)
    for (k, condition, r), (ttft_prompt, throughput_prompt) in bar:
        request = TierRequest(engine, configs, k, hit_salt) if condition == TIER_CONDITION else engine.request
        start_s = time.perf_counter() - clock
        trial = run_trial(request, ttft_prompt, throughput_prompt, settings.pause_ms / 1e3, settings.max_output_tokens)
        if condition == TIER_CONDITION:
            if not isinstance(request, TierRequest):            # made for this condition just above
                raise RuntimeError("internal error: the tier condition's request is not a TierRequest")
            trial["restore_requests"] = request.restores
        trials.append({"config": k, "condition": condition, "round": r, "start_s": start_s, **trial})
    return trials


def flush_engine_stats(request: Request, prompt_ids: list[int]) -> RequestResult:
    """A salted 2-token request, untimed. vLLM's counters for a request travel with the
    engine's next outputs (on a GPU with async scheduling, a step late): without a request
    after the last trial, vllm:prefix_cache_hits was seen one hit short. This one must find
    nothing cached, so it adds nothing to that counter (audit checks it)."""
    return request(prompt_ids, 2, f"flush-{uuid.uuid4().hex}")


def gpu_busy_segments(engine: Engine, configs: Sequence[ConfigPrompts], conditions: Sequence[str], settings: RunSettings,
                      first_round: int, block: int, hit_salt: str | None) -> list[tuple[dict[str, Any], list[str]]]:
    """The GPU-busy segment after the measured rounds (gpu_busy.profiled_segment), where asked
    for (--profiled-requests) and the engine can: per config, (its "gpu_busy", its problems)."""
    count = settings.profiled_requests
    why = engine.gpu_busy_unavailable() if count or engine.shared else "--profiled-requests 0"
    if why:
        return [({"not_measured": why}, []) for _ in configs]
    out = profiled_segment(engine, configs, conditions, count, first_round, block, hit_salt, settings.pause_ms / 1e3)
    return [(segment_summary(records, count), problems) for records, problems in out]


def run_configs(engine: Engine, tokenizer: Any, settings: RunSettings, env: dict) -> list[PhaseResult]:
    """Steps 2-6 for every (A, B) config on a loaded engine (OfflineEngine, or phase 1's
    server), all configs interleaved in one run. Returns the result dicts, in the order of
    settings.configs."""
    block = env["cache_block_size"]
    run_id = uuid.uuid4().hex[:12]
    tier = engine.tier()
    conditions = CONDITIONS + ((TIER_CONDITION,) if tier else ())
    # A server, or a tier that may outlive the engine (a store on disk), keeps other runs' blocks:
    # the warmup and the hits (and tier hits) then get a cache namespace of the run's own.
    hit_salt = f"run-{run_id}" if engine.shared or tier else None
    configs = [ConfigPrompts(tokenizer, a, b, block, settings.seed, run_id, hit_salt) for a, b in settings.configs]  # 2
    for c in configs:
        if len(c.warmup_ids) < block:
            print(f"WARNING: [A, B] of A={c.size_a} B={c.size_b} is {len(c.warmup_ids)} tokens, shorter than one "
                  f"KV block ({block} tokens): nothing can be cached, every 'hit' is a miss.", file=sys.stderr)
    if not settings.block_order:
        check_cache_holds(engine.kv_capacity(), configs, settings.max_output_tokens)
    # The run starts from an empty cache (or, on a server, a namespace of its own): nothing from before can hit.
    if not engine.reset_prefix_cache():
        raise ExperimentError("resetting the prefix cache failed: the cache could not be emptied")
    if tier:                                # the tier condition's reset, tried before any warmup: fails now or never
        empty_hbm(engine)
    counters_before = engine.counters()
    clock, run_started_unix_s = time.perf_counter(), time.time()
    warms = [warm_cache(engine.request, c.warmup_ids, settings.pause_ms / 1e3, hit_salt) for c in configs]   # 3
    n = len(configs)
    trials = []
    if settings.warmup_trials:
        t0 = time.perf_counter()
        trials += run_trials(engine, run_schedule(n, range(settings.warmup_trials), settings.block_order, conditions), configs,
                             settings, clock, "discarded rounds", hit_salt)
        round_s = (time.perf_counter() - t0) / settings.warmup_trials
    if settings.num_trials is not None:
        num_rounds = settings.num_trials
    else:
        num_rounds = settings.num_blocks * rounds_per_block(round_s, settings.min_block_seconds)
    # block order runs one config and condition at a time: there are no blocks that hold them all
    num_blocks = 1 if settings.block_order else min(settings.num_blocks, num_rounds)
    plan = {"configs": [f"{a}x{b}" for a, b in settings.configs], "min_block_s": settings.min_block_seconds,
            "num_blocks": num_blocks, "rounds_per_block": num_rounds / num_blocks}
    if settings.warmup_trials:
        print(f"a round of {n} config(s) took {round_s:.2f} s: {num_rounds} measured rounds in {num_blocks} "
              f"time block(s), about {num_rounds * round_s / 60:.1f} min", flush=True)
    rounds = range(settings.warmup_trials, settings.warmup_trials + num_rounds)
    trials += run_trials(engine, run_schedule(n, rounds, settings.block_order, conditions), configs, settings, clock,
                         f"{num_rounds} rounds x {n} config(s)", hit_salt)                         # 4-5
    run_wall_s = time.perf_counter() - clock
    for order, t in enumerate(trials):
        t["order"] = order
        if t["round"] >= settings.warmup_trials:
            t["block"] = block_of(t["round"] - settings.warmup_trials, num_rounds, num_blocks)
    flush = flush_engine_stats(engine.request, configs[0].warmup_ids)
    per_config = [[t for t in trials if t["config"] == k] for k in range(n)]
    engine_counters, run_problems = audit_counters(
        [req for warm, own in zip(warms, per_config) for req in requests_of(warm, own)],
        flush, counters_before, engine.counters(), engine.shared)
    segments = gpu_busy_segments(engine, configs, conditions, settings, settings.warmup_trials + num_rounds, block,
                                 hit_salt)

    results = []
    for c, warm, own, (segment, segment_problems) in zip(configs, warms, per_config, segments):
        for t in own:
            del t["config"]                 # one file per config
        cache_audit = audit_report(audit_requests(warm, own, c.warmup_ids, block) + run_problems + segment_problems,
                                   warm, own, c.warmup_ids, block, engine_counters)
        stats, comparison, stability, method = summarize(own, settings, plan)                         # 6
        overheads = [t["ttft_ms"] - t["engine_ttft_ms"] for t in own if t["round"] >= settings.warmup_trials
                     and t["engine_ttft_ms"] is not None]
        # a tier's condition and its figures (tier_ttft_saving_pct, tier_over_hit_pct, ...), only in a run with one
        tier_keys: dict[str, Any] = ({TIER_CONDITION: stats[TIER_CONDITION],
                                      **{key: comparison[key] for key in comparison if key.startswith("tier_")}}
                                     if tier else {})
        results.append(build_phase_result(
            phase=engine.phase,
            model=engine.model,
            timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            config={
                "context_size_a": c.size_a,
                "context_size_b": c.size_b,
                "max_output_tokens": settings.max_output_tokens,
                "num_trials": num_rounds,
                "warmup_trials": settings.warmup_trials,
                "warmup_tokens": WARMUP_TOKENS,
                "query_tokens": QUERY_TOKENS,
                "pause_ms": settings.pause_ms,
                "interleave": not settings.block_order,
                "num_blocks": num_blocks,
                "min_block_seconds": settings.min_block_seconds,
                "seed": settings.seed,
            },
            warmup_time_ms=warm.wall_ms,
            cache_hit=stats["cache_hit"],
            cache_miss=stats["cache_miss"],
            ttft_degradation_pct=comparison["ttft_degradation_pct"],
            ttft_degradation_ci95=comparison["ttft_degradation_ci95"],
            cache_cold=stats["cache_cold"],
            ttft_saving_pct=comparison["ttft_saving_pct"],
            ttft_saving_ci95=comparison["ttft_saving_ci95"],
            ttft_saving_ms=comparison["ttft_saving_ms"],
            ttft_saving_ms_ci95=comparison["ttft_saving_ms_ci95"],
            interval=method,
            reproducibility=stability,
            harness_overhead_ms=float(np.median(overheads)) if overheads else None,
            **tier_keys,
            gpu_busy=segment,
            cache_audit=cache_audit,
            warmup_prompt_tokens=len(c.warmup_ids),
            environment={**env, "tier": tier,
                         "trial_order": [f"{cond}:{r}" for t in own for cond, r in [(t["condition"], t["round"])]],
                         "config_wall_s": sum(t["ttft_ms"] + t["total_time_ms"] for t in own) / 1e3,
                         "run_wall_s": run_wall_s,
                         "run_started_unix_s": run_started_unix_s},
        ))
    return results
