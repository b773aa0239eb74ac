"""The offline engine (vLLM's LLM) as the protocol drives it: one timed generate call per
request, and the tap that counts the engine's prefix-cache stats from every message.
"""
import time
from typing import Any

from .engine_api import RequestResult
from .errors import raise_if_interrupted
from .defaults import OFFLINE_PHASE
from .gpu_busy import NOT_ON_THIS_ENGINE, WORKER_EXTENSION
from .tiers import connector_load, describe_tier


def timed_request(llm: Any, prompt_ids: list[int], max_tokens: int, cache_salt: str | None = None) -> RequestResult:
    """One generate call; nothing but the call itself is inside the timed region."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompt = TokensPrompt(prompt_token_ids=prompt_ids)
    if cache_salt is not None:
        prompt["cache_salt"] = cache_salt
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    tap = scheduler_stats_tap(llm)
    if tap is not None:
        tap["prefills"].clear()
        loaded_before = (tap["tier_load_bytes"], tap["tier_load_s"])
    t0 = time.perf_counter()
    out = llm.generate(prompt, params, use_tqdm=False)[0]
    wall_ms = (time.perf_counter() - t0) * 1e3
    m = out.metrics  # RequestStateStats: engine-core timestamps (s), present with log stats on
    # where its cached tokens came from: the one prefill this request's call saw (the engine
    # handles one request at a time here), as the scheduler counted it
    hbm, tier = tap["prefills"][0] if tap is not None and len(tap["prefills"]) == 1 else (None, None)
    return RequestResult(
        wall_ms=wall_ms,
        prompt_tokens=len(out.prompt_token_ids),
        cached_tokens=out.num_cached_tokens,
        output_tokens=len(out.outputs[0].token_ids),
        engine_ttft_ms=m.first_token_latency * 1e3,
        prefill_ms=(m.first_token_ts - m.scheduled_ts) * 1e3,
        decode_ms=(m.last_token_ts - m.first_token_ts) * 1e3,
        queue_ms=(m.scheduled_ts - m.queued_ts) * 1e3,
        hbm_cached_tokens=hbm,
        tier_cached_tokens=tier,
        tier_load_bytes=tap["tier_load_bytes"] - loaded_before[0] if tap is not None else None,
        tier_load_ms=(tap["tier_load_s"] - loaded_before[1]) * 1e3 if tap is not None else None,
    )


class OfflineEngine:
    """The offline LLM as run_configs drives it. Phase 1 drives a server through the same
    four calls (server_engine.ServerEngine)."""
    phase = OFFLINE_PHASE
    shared = False                  # nothing but this run sends it requests

    def __init__(self, llm: Any, model: str):
        self.llm = llm
        self.model = model              # as the run names it (RunSettings.model)

    def request(self, prompt_ids: list[int], max_tokens: int, cache_salt: str | None = None) -> RequestResult:
        raise_if_interrupted()
        return timed_request(self.llm, prompt_ids, max_tokens, cache_salt)

    def reset_prefix_cache(self) -> bool:
        return self.llm.reset_prefix_cache()

    def empty_hbm_prefix_cache(self) -> bool:
        return self.llm.reset_prefix_cache()         # reset_connector=False: the tier keeps its blocks

    def tier(self) -> dict[str, Any] | None:
        return describe_tier(self.llm.llm_engine.vllm_config)

    def counters(self) -> dict[str, Any] | None:
        return prefix_cache_counters(self.llm)

    def kv_capacity(self) -> tuple[int, int] | None:
        """(KV blocks, tokens a block), or None if the engine does not say."""
        cc = self.llm.llm_engine.vllm_config.cache_config
        return (cc.num_gpu_blocks, cc.block_size) if cc.num_gpu_blocks else None

    def gpu_busy_unavailable(self) -> str | None:
        """Why this engine cannot time a request's GPU work (gpu_busy.GpuBusyWorker on a CUDA
        worker), or None where it can. Opens and closes one empty window to find out, so that the
        profiler's start-up is in no request's window."""
        if self.llm.llm_engine.vllm_config.parallel_config.worker_extension_cls != WORKER_EXTENSION:
            return NOT_ON_THIS_ENGINE
        opened = self.llm.collective_rpc("pcb_gpu_busy_start")
        self.llm.collective_rpc("pcb_gpu_busy_stop")
        if all(answer is True for answer in opened):
            return None
        why = [answer for answer in opened if isinstance(answer, str)]
        return f"the profiler did not start: {why[0]}" if why else NOT_ON_THIS_ENGINE

    def gpu_busy_request(self, prompt_ids: list[int], max_tokens: int,
                         cache_salt: str | None = None) -> tuple[RequestResult, dict[str, Any] | None]:
        """One request inside a GPU-busy window on every worker; the first worker's (rank 0) activity."""
        self.llm.collective_rpc("pcb_gpu_busy_start")
        try:
            result = self.request(prompt_ids, max_tokens, cache_salt)
        finally:
            activity = self.llm.collective_rpc("pcb_gpu_busy_stop")
        return result, activity[0]


def prefix_cache_counters(llm: Any) -> dict[str, Any] | None:
    """The engine's prefix-cache counters (tokens queried / found), a second witness for the
    audit besides each request's num_cached_tokens. Counted by scheduler_stats_tap from every
    stats message the engine core sends (summed over engines); vLLM's own LLM.get_metrics()
    numbers ride along under "vllm_metrics". None where neither is available."""
    tap = scheduler_stats_tap(llm)
    metrics = vllm_metrics_counters(llm)
    if tap is None and metrics is None:
        return None
    found = tap or metrics
    if found is None:                       # impossible: one of them is there (checked just above)
        raise RuntimeError("internal error: neither the tap nor LLM.get_metrics() gave the counters")
    counters: dict[str, Any] = {key: value for key, value in found.items() if key != "prefills"}
    counters["source"] = "scheduler stats messages" if tap is not None else "LLM.get_metrics()"
    if metrics is not None:
        counters["vllm_metrics"] = metrics
    return counters


def vllm_metrics_counters(llm: Any) -> dict[str, int] | None:
    try:
        metrics = llm.get_metrics()
    except Exception:                       # a vLLM without LLM.get_metrics()
        return None
    totals = {"prefix_cache_queries": 0, "prefix_cache_hits": 0}
    for m in metrics:
        key = m.name.removeprefix("vllm:")
        if key in totals:
            totals[key] += int(getattr(m, "value", 0))
    return totals


def scheduler_stats_tap(llm: Any) -> dict[str, Any] | None:
    """Count the prefix-cache stats in every message the engine core sends the front end, from
    the first call on (the tap is installed then). Why not LLM.get_metrics() alone: vLLM's
    offline LLMEngine.step() before vllm-project/vllm#48668 (0.26 included) records a step's
    stats only if the step also carried a request output, so with async scheduling a hit's
    stats can be dropped (seen on two H200s: 2 hit requests' 4,608 tokens missing in 128).
    It runs inside the timed generate call: 0.4 us per engine step (measured on a CPU), noise.
    Returns the running totals (a dict updated in place), or None if this vLLM's engine has
    no such message stream."""
    core = getattr(llm.llm_engine, "engine_core", None)
    if core is None or not callable(getattr(core, "get_output", None)):
        return None
    if not hasattr(core, "prefix_cache_tap"):
        totals: dict[str, Any] = {"prefix_cache_queries": 0, "prefix_cache_hits": 0, "hits_in_messages_without_outputs": 0,
                                  # a second tier's: what the connector was asked for and found, what it copied into HBM
                                  "external_prefix_cache_queries": 0, "external_prefix_cache_hits": 0,
                                  "tier_load_bytes": 0, "tier_load_s": 0.0}
        prefills: list[tuple[int, int]] = []     # (HBM, tier) cached tokens of each prefill, in order
        get_output = core.get_output

        def get_output_counted():
            out = get_output()
            scheduler_stats = getattr(out, "scheduler_stats", None)
            stats = getattr(scheduler_stats, "prefix_cache_stats", None)
            if stats is not None:
                totals["prefix_cache_queries"] += stats.queries
                totals["prefix_cache_hits"] += stats.hits
                if not out.outputs:
                    totals["hits_in_messages_without_outputs"] += stats.hits
            external = getattr(scheduler_stats, "connector_prefix_cache_stats", None)
            if external is not None:
                totals["external_prefix_cache_queries"] += external.queries
                totals["external_prefix_cache_hits"] += external.hits
            loaded_bytes, loaded_s = connector_load(getattr(scheduler_stats, "kv_connector_stats", None))
            totals["tier_load_bytes"] += loaded_bytes
            totals["tier_load_s"] += loaded_s
            for output in getattr(out, "outputs", None) or ():
                prefill = getattr(output, "prefill_stats", None)
                if prefill is not None:
                    prefills.append((prefill.num_local_cached_tokens, prefill.num_external_cached_tokens))
            return out

        core.get_output = get_output_counted
        totals["prefills"] = prefills
        core.prefix_cache_tap = totals
    return core.prefix_cache_tap
