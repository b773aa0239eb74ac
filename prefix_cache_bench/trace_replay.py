"""A production trace replayed against a server: the window's requests sent open loop at the
trace's times (never waiting for an earlier response), a cached arm (one cache namespace a pass,
warmed with the trace's preceding requests) against a cold arm (a salt per request) at the same
times, over several passes; each request's ledger (ideal, simulated, measured cached tokens) and
its audit; the figures, the console table, the file.
"""
from __future__ import annotations
import dataclasses
import datetime
import json
import os
import resource
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .audit import counter_growth, counter_problems, wait_for_counters
from .defaults import FLUSH_PROMPT_TOKENS, SERVER_PHASE
from .engine_api import LoadServer, StreamedResponse
from .console import print_pass, print_trace_summary
from .errors import ExperimentError
from .load_run import failure_exit, prompt_tokens_growth, replica_load_counters
from .load_workload import send_all
from .prometheus import server_times, total_counters
from .protocol import flush_engine_stats
from .open_loop import OpenLoopSender
from .raw_stream import request_bytes
from .result_schema import TraceResult, build_request_audit, build_trace_result
from .results import trace_results_path, write_result
from .trace_cli import window_of
from .trace_figures import (arm_stats, cache_buys, complete_pairs, finished_passes, ledger_problems,
                            summarize_passes)
from .traces import (IdealLedger, PrefixCacheSimulator, PromptMaker, TraceRequest, TraceWindow, check_block_sizes,
                     ordinary_token_ids, prefix_keys, unique_tokens)
from .settings import TraceSettings

if TYPE_CHECKING:
    import numpy

SEND_LAG_LIMIT_MS = 5.0         # a sender whose p99 send lag passes this did not keep to the trace's times
FIDELITY_WARNING = 0.9          # under this share of requests within a trace block of the model: a warning
WARM_START_TOKENS = 1           # tokens the untimed warm-start requests generate


def client_rss_mb() -> float:
    """This process's peak resident memory, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def replayed_output_tokens(request: TraceRequest, max_output_tokens: int | None) -> int:
    """The tokens a replay asks the request to generate: its output_length, capped by
    --trace-max-output-tokens, at least 1."""
    return max(1, min(request.output_length, max_output_tokens or request.output_length))


class TracePlan:
    """What one replay sends: the window, its warm-start history, each request's scheduled time
    (trace seconds from the window's start, times --time-scale) and output tokens, and the
    prompts, built from hash IDs when they are sent."""

    def __init__(self, window: TraceWindow, time_scale: float, max_output_tokens: int | None, vocab_ids: numpy.ndarray,
                 seed: int, trace_block_size: int):
        self.window, self.trace_block_size = window, trace_block_size
        start_ms = window.measured[0].timestamp_ms
        self.scheduled_s = [(r.timestamp_ms - start_ms) / 1e3 * time_scale for r in window.measured]
        self.max_tokens = [replayed_output_tokens(r, max_output_tokens) for r in window.measured]
        self.maker = PromptMaker(vocab_ids, seed, trace_block_size)

    def body(self, model: str, request: TraceRequest, max_tokens: int, salt: str) -> bytes:
        """The serialised /v1/completions body of one request (its prompt's JSON from the blocks'
        cached JSON: PromptMaker.prompt_json)."""
        rest = json.dumps({"model": model, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                           "stream": True, "stream_options": {"include_usage": True}, "cache_salt": salt})
        return b'{"prompt": ' + self.maker.prompt_json(request) + b", " + rest[1:].encode()


def ledger(window: TraceWindow, max_tokens: Sequence[int], engine_block_size: int, capacity_tokens: int,
           trace_block_size: int) -> list[tuple[int, int]]:
    """[(ideal, simulated) reusable tokens] of each measured request of a cached pass: the warm
    start's history first, then the window in trace order, through an infinite cache and
    through the LRU model of the server's cache at its capacity. Each request's output is what
    the replay generates: WARM_START_TOKENS for the history, max_tokens[k] for window request k."""
    ideal = IdealLedger(engine_block_size, trace_block_size)
    model = PrefixCacheSimulator(capacity_tokens, engine_block_size, trace_block_size)
    def both(r, output_tokens):
        keys = prefix_keys(r.hash_ids)
        sent = dataclasses.replace(r, output_length=output_tokens)
        return ideal.observe(sent, keys), model.observe(sent, keys)
    for r in window.history:
        both(r, WARM_START_TOKENS)
    return [both(r, n) for r, n in zip(window.measured, max_tokens, strict=True)]


async def send_open_loop(base_url: str, plan: TracePlan, model: str, salts: Callable[[int], str], drain_s: float,
                         max_in_flight: int) -> tuple[list[StreamedResponse | None], float, str | None, int]:
    """The window's requests, open loop at their scheduled times (open_loop.OpenLoopSender),
    each with its cache salt (salts(k)). Returns (records, the arm's start in perf_counter s,
    the overload or None, the most requests in flight)."""
    def build(k):
        return request_bytes(base_url, "/v1/completions",
                             plan.body(model, plan.window.measured[k], plan.max_tokens[k], salts(k)))
    sender = OpenLoopSender(base_url, plan.scheduled_s, build, [r.input_length for r in plan.window.measured],
                            max_in_flight)
    return await sender.run(drain_s)


def request_record(k: int, request: TraceRequest, record: StreamedResponse | None, scheduled_s: float, t0: float,
                   max_tokens: int, audited: bool, ideal: int, simulated: int) -> dict[str, Any]:
    """The JSON record of window request k: its times (s since the arm's clock began), send lag,
    TTFT, and its ledger (ideal, simulated and measured cached tokens)."""
    if record is None:
        record = StreamedResponse(None, [], None, None,  # type: ignore[arg-type]  # never sent: no send or end time
                                  "not sent: an earlier request failed or the arm was overloaded")
    usage = record.usage or {}
    error = record.error
    first = record.token_times_s[0] if record.token_times_s else None
    if error is None and first is None:
        error = "the stream ended without a token"
    if error is None and not usage:
        error = "no usage in the last chunk (stream_options.include_usage)"
    output_tokens = usage.get("completion_tokens", len(record.token_times_s))
    sent = record.sent_s
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") if audited and error is None else None
    return {
        "index": k, "line": request.line, "scheduled_s": scheduled_s,
        "start_s": sent - t0 if sent is not None else None,
        "send_lag_ms": (sent - t0 - scheduled_s) * 1e3 if sent is not None else None,
        "end_s": record.ended_s - t0 if record.ended_s is not None else None,
        "ttft_ms": (first - sent) * 1e3 if first is not None else None,
        "e2e_ms": (record.ended_s - sent) * 1e3 if sent is not None else None,
        "tpot_ms": (record.token_times_s[-1] - first) * 1e3 / (output_tokens - 1)
        if first is not None and output_tokens > 1 else None,
        "input_tokens": request.input_length, "prompt_tokens": usage.get("prompt_tokens", request.input_length),
        "max_tokens": max_tokens, "output_tokens": output_tokens if error is None else 0,
        "cached_tokens": cached, "ideal_tokens": ideal, "simulated_tokens": simulated, "error": error,
    }


def warm_start(engine: LoadServer, plan: TracePlan, namespace: str, concurrency: int) -> None:
    """The window's history, sent untimed in the pass's namespace (WARM_START_TOKENS each,
    `concurrency` at a time, in trace order), so that the window starts on a full cache."""
    history = plan.window.history
    if not history:
        return
    prompts = [(plan.maker.prompt_ids(r), namespace, k) for k, r in enumerate(history)]

    async def send():
        session = engine.client.load_session()
        try:
            return await send_all(engine.client, session, engine.model, prompts,
                                  {"concurrency": concurrency, "request_rate": None}, WARM_START_TOKENS, 0)
        finally:
            await session.close()
    records, _ = engine.client.run("the warm start", send())
    for r, record in zip(history, records):
        if record is None or record.error:
            raise ExperimentError(f"the warm start's request of trace line {r.line} failed: "
                                  f"{record.error if record else 'not sent'}")


def server_counters_around(engine: LoadServer, sent_records: list[dict[str, Any]], before: Mapping[str, Any],
                           flush_ids: list[int]) -> tuple[dict[str, Any], list[str]]:
    """The servers' counters grown over an arm's requests (and a salted flush after them, so
    that every count has arrived): (counters, problems)."""
    flush = flush_engine_stats(engine.request, flush_ids)
    sent = sent_records + [flush.as_json()]
    after = wait_for_counters(lambda: replica_load_counters(engine), prompt_tokens_growth, before,
                              sum(r["prompt_tokens"] for r in sent))
    counters = total_counters({name: counter_growth(before[name], after[name]) for name in after if name in before})
    problems = counter_problems(counters, sent) if engine.audited else []
    if engine.audited and flush.cached_tokens != 0:
        problems.append(f"the counters' flush (salted): cached_tokens={flush.cached_tokens}, expected 0")
    counters["flush_prompt_tokens"] = flush.prompt_tokens
    return counters, problems


def run_arm(engine: LoadServer, plan: TracePlan, arm: str, namespace: str, ledger_rows: Sequence[tuple[int, int]],
            trace: TraceSettings) -> dict[str, Any]:
    """One arm, one pass: the cached arm's warm start, then the window open loop. Returns the
    pass's record: its figures, server counters and gauges, problems and every request."""
    client = engine.client
    if arm == "cached":
        warm_start(engine, plan, namespace, trace.warmup_concurrency)
        salts = lambda k: namespace                                 # noqa: E731
    else:
        salts = lambda k: f"{namespace}-cold-{k}"                  # noqa: E731
    before = replica_load_counters(engine)
    # no /metrics is read while the arm runs: parsing it would hold the event loop that stamps
    # each response's first token (the queue and prefill come from the histograms around the arm)
    records, t0, overload, max_in_flight = client.run(
        f"the {arm} arm", send_open_loop(client.base_url, plan, engine.model, salts, trace.drain_s,
                                         trace.max_in_flight))
    rows = ledger_rows if arm == "cached" else [(0, 0)] * len(records)
    requests = [request_record(k, r, record, plan.scheduled_s[k], t0, plan.max_tokens[k], engine.audited, *rows[k])
                for k, (r, record) in enumerate(zip(plan.window.measured, records))]
    problems = ledger_problems(requests, arm) if engine.audited else []
    counters, server_error = None, None
    if overload is None and not any(r["error"] for r in requests):
        try:
            flush_ids = plan.maker.prompt_ids(plan.window.measured[0])[:FLUSH_PROMPT_TOKENS]
            counters, found = server_counters_around(engine, requests, before, flush_ids)
            problems += found
        except ExperimentError as e:
            server_error = str(e)
    stats = arm_stats(requests, plan.scheduled_s[-1], trace.slo_ttft_ms, plan.trace_block_size)
    if counters and counters.get("prompt_tokens"):
        stats["hit_share"].update({"hbm_by_counters": (counters["prefix_cache_hits"] or 0) / counters["prompt_tokens"],
                                   "tier_by_counters": (counters.get("external_prefix_cache_hits") or 0)
                                   / counters["prompt_tokens"]})
    return {"stats": stats, "overloaded": overload, "max_in_flight": max_in_flight, "server_error": server_error,
            "server": {**(counters or {}), **server_times(counters or {})},
            "problems": problems, "requests": requests}


def pass_failure(arm: str, rep: int, run: Mapping[str, Any]) -> str | None:
    """The one line that ends the replay after this pass, or None."""
    failed = [r for r in run["requests"] if r["error"] and not r["error"].startswith(("not sent", "unfinished"))]
    if run["server_error"]:
        return f"pass {rep + 1}, {arm} arm, after its requests: {run['server_error']}"
    if failed:
        return f"{len(failed)} {arm} requests failed in pass {rep + 1} (first, trace line {failed[0]['line']}: " \
               f"{failed[0]['error']})"
    return None


def kv_bytes_per_token(model_dir: str) -> int | None:
    """Bytes of KV cache one token takes, from the model folder's config.json (K and V of every
    layer, in the model's dtype); None where the folder or a field is missing."""
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            config = json.load(f)
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        kv_heads = config.get("num_key_value_heads") or heads
        dtype_bytes = {"float32": 4, "float16": 2, "bfloat16": 2}[config.get("torch_dtype") or config.get("dtype")]
        return 2 * config["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes
    except (OSError, TypeError, ValueError, KeyError):
        return None


def tier_capacity_tokens(tier: Mapping[str, Any] | None, model_dir: str | None) -> int | None:
    """Tokens the server's native tier holds (its size over the model's KV bytes per token);
    0 without a tier, None where its size or the model's layout is unknown."""
    if not tier:
        return 0
    per_token = kv_bytes_per_token(model_dir) if model_dir else None
    if not tier.get("size_gib") or not per_token:
        return None
    return int(tier["size_gib"] * 2 ** 30 / per_token)


def check_server(trace: TraceSettings, env: Mapping[str, Any]) -> None:
    """The checks that need the server, before any request: its cache block against the trace's
    block, and a published cache size for the ledger's model."""
    check_block_sizes(trace.trace_block_size, env["cache_block_size"], trace.path)
    if not env.get("num_gpu_blocks"):
        raise ExperimentError("the server does not publish vllm:cache_config_info's num_gpu_blocks: the ledger's "
                              "model of its cache needs it")


def input_cap_tokens(trace: TraceSettings, requests: Iterable[TraceRequest], max_model_len: int | None) -> int | None:
    """The longest input replayed: --max-input-tokens, and no more than the server's context
    leaves beside the longest output the replay would ask of any of the trace's requests."""
    longest_output = max(replayed_output_tokens(r, trace.max_output_tokens) for r in requests)
    caps = [cap for cap in (trace.max_input_tokens, max_model_len and max_model_len - longest_output) if cap]
    return min(caps) if caps else None


def run_trace(engine: LoadServer, tokenizer: Any, trace: TraceSettings, seed: int, env: dict[str, Any],
              unaudited: str | None, requests: list[TraceRequest], model_dir: str | None = None) -> TraceResult:
    """The replay: --repeats passes, each a cached and a cold arm in alternating order, at the
    window's times. Returns the result dict (also after a failure: what was measured)."""
    rss_before_mb = client_rss_mb()
    check_server(trace, env)
    gpu_tokens = engine.total_kv_capacity_tokens()
    if gpu_tokens is None:
        raise ExperimentError("the server does not publish its KV cache's size (vllm:cache_config_info): the ledger's "
                              "model of its cache needs it")
    tier_tokens = tier_capacity_tokens(engine.tier(), model_dir)
    if tier_tokens is None:
        print("note: the tier's size in tokens is unknown (no native tier size, or no model folder to read its KV "
              "layout from): the ledger's model holds HBM alone", flush=True)
        tier_tokens = 0
    capacity = gpu_tokens + tier_tokens
    history_tokens = trace.history_tokens if trace.history_tokens is not None else capacity
    input_cap = input_cap_tokens(trace, requests, env.get("max_model_len"))
    window = window_of(trace, requests, input_cap, history_tokens)
    plan = TracePlan(window, trace.time_scale, trace.max_output_tokens, ordinary_token_ids(tokenizer), seed,
                     trace.trace_block_size)
    block = env["cache_block_size"]
    rows = ledger(window, plan.max_tokens, block, capacity, trace.trace_block_size)
    run_id = uuid.uuid4().hex[:12]
    passes, failure = [], None
    started = time.perf_counter()
    print(f"trace {trace.path}: {len(window.measured)} requests over {window.duration_s:.1f} s of trace "
          f"({plan.scheduled_s[-1]:.1f} s replayed), {len(window.skipped)} skipped over the input cap, "
          f"{len(window.history)} requests of history as the warm start; the server's cache {gpu_tokens} tokens"
          + (f" + a tier of {tier_tokens}" if tier_tokens else ""), flush=True)
    for rep in range(trace.repeats):
        order = ("cached", "cold") if rep % 2 == 0 else ("cold", "cached")
        run: dict[str, Any] = {"repeat": rep, "order": list(order)}
        for arm in order:
            print(f"\n--- pass {rep + 1} of {trace.repeats}, {arm} arm ({time.perf_counter() - started:.0f} s so far) ---",
                  flush=True)
            run[arm] = run_arm(engine, plan, arm, f"trace-{run_id}-{rep}", rows, trace)
            print_pass(arm, run[arm])
            failure = pass_failure(arm, rep, run[arm])
            if failure:
                break
        passes.append(run)
        if failure:
            break
    result = trace_result(trace, seed, engine.model, env, window, plan, passes, failure, unaudited, gpu_tokens,
                          tier_tokens, rows, input_cap)
    # the peak before the replay: the libraries (transformers; torch where the server is embedded) and the tokenizer
    result["client"]["max_rss_mb_before_replay"] = rss_before_mb
    return result


def trace_result(trace: TraceSettings, seed: int, model: str, env: dict[str, Any], window: TraceWindow, plan: TracePlan,
                 passes: list[dict[str, Any]], failure: str | None, unaudited: str | None, gpu_tokens: int,
                 tier_tokens: int, rows: Sequence[tuple[int, int]], input_cap: int | None) -> TraceResult:
    """The result dict of a replay."""
    arms = {}
    for arm in ("cached", "cold"):
        done = [one["stats"] for one in finished_passes(passes, arm)]
        if done:
            arms[arm] = summarize_passes(done)
    pairs = complete_pairs(passes)
    problems = [p for run in passes for arm in ("cached", "cold") if arm in run for p in run[arm]["problems"]]
    checked = sum(len(run[arm]["requests"]) for run in passes for arm in ("cached", "cold") if arm in run)
    lags = [run[arm]["stats"]["send_lag_ms"].get("p99") for run in passes for arm in ("cached", "cold") if arm in run]
    lags = [lag for lag in lags if lag is not None]
    measured_input = sum(r.input_length for r in window.measured)
    return build_trace_result(
        phase=SERVER_PHASE, experiment="trace", model=model,
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        config={"trace": trace.path, "trace_block_size": trace.trace_block_size, "trace_start_s": trace.start_s,
                "trace_duration_s": trace.duration_s, "trace_num_requests": trace.num_requests,
                "time_scale": trace.time_scale, "max_input_tokens": trace.max_input_tokens, "input_cap_tokens": input_cap,
                "max_output_tokens": trace.max_output_tokens, "repeats": trace.repeats,
                "history_tokens": trace.history_tokens, "warmup_concurrency": trace.warmup_concurrency,
                "drain_s": trace.drain_s, "max_in_flight": trace.max_in_flight, "slo_ttft_ms": trace.slo_ttft_ms,
                "seed": seed},
        window={"requests": len(window.measured), "skipped": len(window.skipped),
                "skipped_lines": [r.line for r in window.skipped][:100],
                "history_requests": len(window.history), "start_s": window.start_s,
                "trace_span_s": window.duration_s, "replay_span_s": plan.scheduled_s[-1],
                "input_tokens": measured_input, "unique_tokens": unique_tokens(window.measured, trace.trace_block_size),
                "ideal_reusable_tokens": sum(i for i, _ in rows),
                "simulated_reusable_tokens": sum(s for _, s in rows)},
        kv_capacity_tokens=gpu_tokens, tier_capacity_tokens=tier_tokens,
        simulated_capacity_tokens=gpu_tokens + tier_tokens, engine_block_size=env["cache_block_size"],
        arms=arms,
        cache_buys=cache_buys([run["cached"]["stats"] for run in pairs],
                              [run["cold"]["stats"] for run in pairs]) if pairs else {},
        client={"max_rss_mb": client_rss_mb(), "send_lag_p99_ms_max": max(lags) if lags else None,
                "sender_kept_up": all(lag <= SEND_LAG_LIMIT_MS for lag in lags) if lags else None,
                "send_lag_limit_ms": SEND_LAG_LIMIT_MS},
        passes=passes,
        complete=failure is None, failure=failure,
        cache_audit=build_request_audit(problems, checked, unaudited),
        environment=env,
    )


def finish_trace(result: TraceResult, results_dir: str) -> int:
    """Write the replay's JSON, say how it ended and warn where its figures are weak. Returns the exit code."""
    path = trace_results_path(results_dir, result)
    write_result(path, result)
    print_trace_summary(result)
    print(f"wrote {path}", flush=True)
    client = result["client"]
    if client["sender_kept_up"] is False:
        print(f"!!! the sender did not keep to the trace's times: send lag p99 up to {client['send_lag_p99_ms_max']:.1f} ms "
              f"(limit {SEND_LAG_LIMIT_MS:g} ms)", file=sys.stderr)
    fidelity = (result["arms"].get("cached") or {}).get("fidelity")
    if fidelity is not None and fidelity < FIDELITY_WARNING:
        print(f"!!! fidelity {fidelity:.1%}: under {FIDELITY_WARNING:.0%} of the cached requests found what the LRU "
              f"model of the server's cache predicts (within one trace block)", file=sys.stderr)
    return failure_exit(result, path, "passes", most_problems=20)

