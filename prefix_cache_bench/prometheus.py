"""A vLLM server's /metrics (Prometheus text): the parser, the counters the audit and the load
run read, the server's own TTFT / queue / prefill histograms, the API server's CPU time.
"""
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


METRIC_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')


LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
LABEL_ESCAPE = re.compile(r'\\(.)')
ESCAPED = {"n": "\n", "\\": "\\", '"': '"'}


# parse_metrics' result: {metric name: [(labels, value)]}
Metrics = dict[str, list[tuple[dict[str, str], float]]]


def parse_metrics(text: str) -> Metrics:
    """{name: [(labels, value)]} from Prometheus text exposition: each sample (a histogram's
    _bucket, _count and _sum under those names), label values unescaped. The same as
    prometheus_client.parser gives (tests/test_helpers.py checks it), which vLLM installs; not
    that parser itself, because it is 6 times slower (18 ms against 3.0 ms for a page of 1,210
    lines shaped as vLLM's, on an idle 2-core CPU), and the load run parses /metrics inside the
    event loop that reads the timed requests' chunks."""
    metrics: Metrics = {}
    for line in text.splitlines():
        m = METRIC_LINE.match(line)
        if m:
            labels = {key: LABEL_ESCAPE.sub(lambda e: ESCAPED.get(e.group(1), e.group(0)), value) if "\\" in value
                      else value for key, value in LABEL.findall(m.group(2) or "")}
            metrics.setdefault(m.group(1), []).append((labels, float(m.group(3))))
    return metrics


def metric_total(metrics: Metrics, name: str) -> float | None:
    """Sum of a metric over its label sets (engines, models); None if the server has no such metric."""
    samples = metrics.get(name)
    return sum(value for _, value in samples) if samples else None


def server_counters(metrics: Metrics) -> dict[str, Any] | None:
    """The prefix-cache counters for the audit, plus the server's own TTFT histogram totals."""
    hits = metric_total(metrics, "vllm:prefix_cache_hits_total")
    queries = metric_total(metrics, "vllm:prefix_cache_queries_total")
    if hits is None or queries is None:
        return None
    external = {key: metric_total(metrics, f"vllm:{key}_total")
                for key in ("external_prefix_cache_queries", "external_prefix_cache_hits")}
    return {"prefix_cache_queries": int(queries), "prefix_cache_hits": int(hits), "source": "/metrics",
            # a second tier's (a KV connector's) lookups; None where the server has no connector
            **{key: int(value) if value is not None else None for key, value in external.items()},
            "server_ttft": {"count": int(metric_total(metrics, "vllm:time_to_first_token_seconds_count") or 0),
                            "sum_s": metric_total(metrics, "vllm:time_to_first_token_seconds_sum") or 0.0}}


# The server's own times of each request, as histograms: RequestResult field -> histogram name.
REQUEST_TIME_HISTOGRAMS = {"engine_ttft_ms": "vllm:time_to_first_token_seconds",
                           "queue_ms": "vllm:request_queue_time_seconds",
                           "prefill_ms": "vllm:request_prefill_time_seconds"}
# and its token counts, which tell whose request a reading holds
REQUEST_TOKEN_HISTOGRAMS = {"prompt_tokens": "vllm:request_prompt_tokens", "output_tokens": "vllm:request_generation_tokens"}


def request_time_totals(metrics_of_engines: Sequence[Metrics]) -> dict[str, tuple[int, float]]:
    """{field: (observations, sum in s)} of the server's TTFT, queue and prefill histograms,
    summed over its engines; a field is missing where no engine has that histogram."""
    totals: dict[str, tuple[int, float]] = {}
    for field, name in {**REQUEST_TIME_HISTOGRAMS, **REQUEST_TOKEN_HISTOGRAMS}.items():
        # floats, or None where an engine lacks the histogram: summed only where none is None
        counts: list[Any] = [metric_total(m, name + "_count") for m in metrics_of_engines]
        sums: list[Any] = [metric_total(m, name + "_sum") for m in metrics_of_engines]
        if None not in counts and None not in sums and counts:
            totals[field] = (int(sum(counts)), sum(sums))
    return totals


def one_request_times(before: Mapping[str, tuple[int, float]], after: Mapping[str, tuple[int, float]],
                      prompt_tokens: int | None, output_tokens: int) -> dict[str, float] | None:
    """{field: ms} that exactly one request added to each histogram between two
    request_time_totals: that request's own times as the server measured them. None unless
    every histogram is there and grew by exactly one observation, whose prompt and output
    token counts are this request's (else it may be another client's request)."""
    fields = {**REQUEST_TIME_HISTOGRAMS, **REQUEST_TOKEN_HISTOGRAMS}
    if not set(fields) <= set(before) or not set(fields) <= set(after):
        return None
    if any(after[field][0] - before[field][0] != 1 for field in fields):
        return None
    tokens = {"prompt_tokens": prompt_tokens, "output_tokens": output_tokens}
    if any(after[field][1] - before[field][1] != tokens[field] for field in REQUEST_TOKEN_HISTOGRAMS):
        return None
    return {field: (after[field][1] - before[field][1]) * 1e3 for field in REQUEST_TIME_HISTOGRAMS}


# Where a server's prompt tokens came from (vLLM >= 0.26): its own prefix cache, a KV connector
# (the second tier), or computed; and what the native tier's connector copied into HBM.
PROMPT_SOURCES = "vllm:prompt_tokens_by_source_total"
SOURCES = {"hbm_cached_tokens": "local_cache_hit", "tier_cached_tokens": "external_kv_transfer",
           "computed_tokens": "local_compute"}
TIER_LOADS = {"tier_load_bytes": "vllm:kv_offload_load_bytes_total", "tier_load_s": "vllm:kv_offload_load_time_total"}


def source_totals(metrics_of_engines: Sequence[Metrics]) -> dict[str, float]:
    """{RequestResult field: tokens} of the server's prompt tokens by source, and the tier's load
    counters ({} each where not published), summed over engines."""
    totals: dict[str, float] = {}
    for field, source in SOURCES.items():
        values: list[Any] = [value for m in metrics_of_engines for labels, value in m.get(PROMPT_SOURCES, [])
                             if labels.get("source") == source]
        if values:
            totals[field] = int(sum(values))
    for field, name in TIER_LOADS.items():
        values = [metric_total(m, name) for m in metrics_of_engines]
        if values and None not in values:
            totals[field] = sum(values)
    return totals


def one_request_sources(before: Mapping[str, float], after: Mapping[str, float],
                        prompt_tokens: int | None) -> dict[str, float]:
    """{hbm_cached_tokens, tier_cached_tokens, tier_load_bytes, tier_load_ms} that one request added
    between two source_totals, or {} where the server does not publish them or the sources do
    not add up to this request's prompt tokens (another request's counts are in the reading)."""
    if not set(SOURCES) <= set(before) or not set(SOURCES) <= set(after):
        return {}
    grown = {field: after[field] - before[field] for field in SOURCES}
    if sum(grown.values()) != prompt_tokens:
        return {}
    sources = {"hbm_cached_tokens": grown["hbm_cached_tokens"], "tier_cached_tokens": grown["tier_cached_tokens"]}
    if set(TIER_LOADS) <= set(before) and set(TIER_LOADS) <= set(after):
        sources.update(tier_load_bytes=after["tier_load_bytes"] - before["tier_load_bytes"],
                       tier_load_ms=(after["tier_load_s"] - before["tier_load_s"]) * 1e3)
    return sources


def cache_config(metrics: Metrics) -> dict[str, str]:
    """The labels of vllm:cache_config_info (block_size, num_gpu_blocks, ...) of the first engine, or {}."""
    samples = metrics.get("vllm:cache_config_info")
    return samples[0][0] if samples else {}


def split_engines(url: str, metrics: Metrics) -> list[tuple[str, Metrics]]:
    """[(name, metrics)]: the server's parsed /metrics as one engine, or one part per engine where
    its samples are labelled by engine (--data-parallel-size), each with the unlabelled samples."""
    engines: list[Any] = sorted({labels.get("engine") for labels, _ in metrics.get("vllm:prefix_cache_queries_total", [])
                                 if labels.get("engine") is not None})
    if len(engines) <= 1:
        return [(url, metrics)]
    return [(f"{url} engine {e}", {name: [(labels, value) for labels, value in samples if labels.get("engine") in (None, e)]
                                   for name, samples in metrics.items()}) for e in engines]


def engine_cache_config(labels: dict[str, str], engines_of_server: int) -> dict[str, str]:
    """One engine's cache_config_info labels. A data-parallel server publishes under every
    engine's label the sum of its engines' num_gpu_blocks (vLLM 0.26 and 0.32 add them up as the
    engines report ready), so each engine is given its num_gpu_blocks_override where one was set
    (every engine has exactly that many), else an even share of the sum (the engines' mean)."""
    blocks = label_int(labels, "num_gpu_blocks")
    if engines_of_server <= 1 or blocks is None:
        return labels
    per_engine = label_int(labels, "num_gpu_blocks_override") or blocks // engines_of_server
    return {**labels, "num_gpu_blocks": str(per_engine)}


def label_int(labels: Mapping[str, str], key: str) -> int | None:
    try:
        return int(labels.get(key))         # type: ignore[arg-type]  # a missing label (None) raises TypeError, caught below
    except (TypeError, ValueError):
        return None


LOAD_METRICS = {"kv_cache_usage": "vllm:kv_cache_usage_perc", "running": "vllm:num_requests_running",
                "waiting": "vllm:num_requests_waiting"}


LOAD_COUNTERS = {"requests": "vllm:request_success_total", "prompt_tokens": "vllm:prompt_tokens_total",
                 "generation_tokens": "vllm:generation_tokens_total",
                 "prefix_cache_queries": "vllm:prefix_cache_queries_total",
                 "prefix_cache_hits": "vllm:prefix_cache_hits_total", "preemptions": "vllm:num_preemptions_total",
                 # a second tier's lookups and what it served (0 without a KV connector)
                 "external_prefix_cache_queries": "vllm:external_prefix_cache_queries_total",
                 "external_prefix_cache_hits": "vllm:external_prefix_cache_hits_total",
                 # the server's own histograms of where a request's TTFT goes: its sum (s) and count
                 **{f"{part}_{key}": f"vllm:{name}_seconds_{end}" for part, name in
                    (("ttft", "time_to_first_token"), ("queue_time", "request_queue_time"),
                     ("prefill_time", "request_prefill_time")) for key, end in (("sum_s", "sum"), ("count", "count"))}}


# (key, histogram) of server_times(): the server's TTFT counts from when its frontend took the
# request in to its first token; the engine's queue time from then until first scheduled, its
# prefill time from then to the first token (engine-core clock, apart from the frontend's)
SERVER_TIMES = (("server_ttft_mean_ms", "ttft"), ("queue_time_mean_ms", "queue_time"),
                ("prefill_time_mean_ms", "prefill_time"))


# prometheus_client's process collector on a server's /metrics: the CPU time of the process that
# answers it, the API server (HTTP, request parsing, detokenizing, streaming); the engine core
# runs in a process of its own. Absent where several API server processes share /metrics.
API_SERVER_CPU = "process_cpu_seconds_total"


def busy_shares(cpu_before: Mapping[str, float | None], cpu_after: Mapping[str, float | None],
                wall_s: float) -> dict[str, float | None]:
    """{url: CPU seconds used over wall_s, as a share of one core}; None where either reading is
    missing or the counter went back (a restarted server, or another process answering)."""
    shares = {}
    for url, after in cpu_after.items():
        before = cpu_before.get(url)
        grown = None if before is None or after is None or wall_s <= 0 else after - before
        shares[url] = grown / wall_s if grown is not None and grown >= 0 else None
    return shares


def server_times(counters: Mapping[str, Any]) -> dict[str, float | None]:
    """Mean server TTFT, engine queue time and prefill time (ms) from the growth of the server's
    histograms over a condition, or None each where not reported."""
    times = {}
    for key, part in SERVER_TIMES:
        total, count = counters.get(f"{part}_sum_s"), counters.get(f"{part}_count")
        times[key] = total / count * 1e3 if total is not None and count else None
    return times


def load_counters(metrics: Metrics) -> dict[str, float | None]:
    return {key: metric_total(metrics, name) for key, name in LOAD_COUNTERS.items()}


def total_counters(per_replica: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The replicas' counters added up (None where any replica lacks one)."""
    values = list(per_replica.values())
    return {key: sum(v[key] for v in values) if all(v[key] is not None for v in values) else None
            for key in LOAD_COUNTERS}


def gauge_summary(samples: Sequence[Mapping[str, float | None]]) -> dict[str, float | None]:
    summary: dict[str, float | None] = {"samples": len(samples)}
    for key in LOAD_METRICS:
        values: list[Any] = [s[key] for s in samples if s[key] is not None]
        summary[f"{key}_max"] = max(values) if values else None
        summary[f"{key}_mean"] = float(np.mean(values)) if values else None
    return summary
