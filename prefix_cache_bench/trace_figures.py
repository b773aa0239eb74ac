"""A trace replay's figures: each arm pass's TTFT percentiles (overall, by the share of its prompt
found cached, by input length), send lag, hit shares (measured, simulated, ideal) over the window,
the ledger's audit and fidelity; the figures over passes; what the cache buys (cached against
cold, pass by pass). Imports no measurement module: it runs on a result's records anywhere.
"""
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .intervals import batch_means_ci95, mean_ci95, quantile_ci95, throughput_ci95

# a request's measured cached tokens over its input tokens, in these bins (label, low, high):
# a share s falls in the bin with low <= s < high; "none" is exactly 0
CACHED_SHARE_BINS = (("none", 0.0, 0.0), ("under 50%", 0.0, 0.5), ("50-90%", 0.5, 0.9), ("90% and over", 0.9, 1.01))
# input lengths in tokens: a request of n tokens falls in the first bin whose upper edge is above n
INPUT_LENGTH_EDGES_TOKENS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
HIT_SHARE_BUCKETS = 20          # the window cut into this many equal spans for the hit share over time
PASS_FIGURES = (("ttft_ms", "mean"), ("ttft_ms", "p50"), ("ttft_ms", "p90"), ("ttft_ms", "p99"),
                (None, "request_throughput"), (None, "goodput_req_s"),
                ("hit_share", "measured"), ("hit_share", "simulated"), ("hit_share", "ideal"), (None, "fidelity"),
                ("send_lag_ms", "p50"), ("send_lag_ms", "p99"))
SAVING_FIGURES = ("mean", "p50", "p90", "p99")
# a request's ledger: the record's key of each figure
LEDGER_FIELDS = {"measured": "cached_tokens", "simulated": "simulated_tokens", "ideal": "ideal_tokens"}


def cached_share_bin(cached_tokens: int, input_tokens: int) -> str:
    share = cached_tokens / input_tokens
    if share == 0:
        return "none"
    return next(label for label, low, high in CACHED_SHARE_BINS[1:] if low <= share < high)


def input_length_bin(input_tokens: int) -> str:
    """'1k-2k' style label of the length bin of a request of input_tokens."""
    low = 0
    for edge in INPUT_LENGTH_EDGES_TOKENS:
        if input_tokens < edge:
            return f"{low // 1024}k-{edge // 1024}k"
        low = edge
    return f"{low // 1024}k and over"


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """{count, mean, p50, p90, p99} of values (ms), or {count: 0}."""
    if not values:
        return {"count": 0}
    return {"count": len(values), "mean": float(np.mean(values)),
            **{f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)}}


def grouped_ttft(requests: Iterable[Mapping[str, Any]], label_of: Callable[[Mapping[str, Any]], str],
                 order: Iterable[str]) -> dict[str, dict[str, float]]:
    """{label: percentiles of the TTFTs of the requests label_of puts there}, in order."""
    groups: dict[str, list[float]] = {}
    for r in requests:
        groups.setdefault(label_of(r), []).append(r["ttft_ms"])
    return {label: percentiles(groups[label]) for label in order if label in groups}


def length_labels() -> list[str]:
    return [input_length_bin(edge - 1) for edge in INPUT_LENGTH_EDGES_TOKENS] + [input_length_bin(10 ** 9)]


def hit_share(requests: Sequence[Mapping[str, Any]], key: str) -> float | None:
    """Cached (or reusable) tokens over input tokens of the requests."""
    total = sum(r["input_tokens"] for r in requests)
    found = [r[key] for r in requests if r[key] is not None]
    return sum(found) / total if total and len(found) == len(requests) else None


def hit_share_over_time(requests: Iterable[Mapping[str, Any]], window_s: float,
                        buckets: int = HIT_SHARE_BUCKETS) -> list[dict[str, Any]]:
    """The window cut into equal spans of scheduled time: each span's requests and their
    measured, simulated and ideal hit shares."""
    span_s = max(window_s, 1e-9) / buckets
    spans: list[list[Mapping[str, Any]]] = [[] for _ in range(buckets)]
    for r in requests:
        spans[min(int(r["scheduled_s"] / span_s), buckets - 1)].append(r)
    return [{"start_s": k * span_s, "end_s": (k + 1) * span_s, "requests": len(found),
             **{key: hit_share(found, field) if found else None for key, field in LEDGER_FIELDS.items()}}
            for k, found in enumerate(spans)]


def fidelity(requests: Iterable[Mapping[str, Any]], trace_block_size: int) -> float | None:
    """The share of requests whose measured cached tokens are within one trace block of the
    simulated ones: how closely the LRU model followed the server. None without measurements."""
    judged = [r for r in requests if r["cached_tokens"] is not None]
    if not judged:
        return None
    return sum(abs(r["cached_tokens"] - r["simulated_tokens"]) <= trace_block_size for r in judged) / len(judged)


def ledger_problems(requests: Iterable[Mapping[str, Any]], arm: str) -> list[str]:
    """The audit of each request: the cached arm never finds more than an infinite cache could
    hold (the ideal ledger); the cold arm (a salt per request) finds nothing."""
    problems = []
    for r in requests:
        if r["cached_tokens"] is None:
            continue
        if arm == "cold" and r["cached_tokens"]:
            problems.append(f"cold request {r['index']} (trace line {r['line']}): {r['cached_tokens']} cached tokens, "
                            f"expected 0 (its salt is its own)")
        elif arm == "cached" and r["cached_tokens"] > r["ideal_tokens"]:
            problems.append(f"cached request {r['index']} (trace line {r['line']}): {r['cached_tokens']} cached tokens, "
                            f"more than the {r['ideal_tokens']} that earlier requests of its pass sent")
    return problems


def arm_stats(requests: Sequence[Mapping[str, Any]], window_s: float, slo_ttft_ms: float | None,
              trace_block_size: int) -> dict[str, Any]:
    """One arm pass's figures from its request records."""
    done = [r for r in requests if r["error"] is None]
    stats: dict[str, Any] = {"num_requests": len(requests), "failed": len(requests) - len(done),
             "unfinished": sum(1 for r in requests if r["error"] and r["error"].startswith("unfinished"))}
    lags = [r["send_lag_ms"] for r in requests if r["send_lag_ms"] is not None]
    stats["send_lag_ms"] = {**percentiles(lags), "max": max(lags) if lags else None}
    if not done:
        return stats
    ttft = [r["ttft_ms"] for r in sorted(done, key=lambda r: r["start_s"])]
    span_s = max(r["end_s"] for r in done) - min(r["start_s"] for r in done)
    stats["ttft_ms"] = {**percentiles(ttft), "mean_ci95": batch_means_ci95(ttft),
                        **{f"p{q}_ci95": quantile_ci95(ttft, q / 100) for q in (50, 90, 99)}}
    tpot = [r["tpot_ms"] for r in done if r["tpot_ms"] is not None]
    stats["tpot_ms"] = percentiles(tpot)
    stats.update({
        "duration_s": span_s,
        "request_throughput": len(done) / span_s if span_s else None,
        "request_throughput_ci95": throughput_ci95([r["start_s"] for r in done], [r["end_s"] for r in done]),
        "goodput_req_s": (sum(t <= slo_ttft_ms for t in ttft) / span_s if span_s else None) if slo_ttft_ms else None,
        "hit_share": {key: hit_share(done, field) for key, field in LEDGER_FIELDS.items()},
        "fidelity": fidelity(done, trace_block_size),
        "by_input_tokens": grouped_ttft(done, lambda r: input_length_bin(r["input_tokens"]), length_labels()),
        "hit_share_over_time": hit_share_over_time(done, window_s),
    })
    measured = [r for r in done if r["cached_tokens"] is not None]
    if measured:
        stats["by_cached_share"] = grouped_ttft(measured, lambda r: cached_share_bin(r["cached_tokens"], r["input_tokens"]),
                                                [label for label, _, _ in CACHED_SHARE_BINS])
    return stats


def figure(stats: Mapping[str, Any], group: str | None, key: str) -> Any:
    return (stats.get(group) or {}).get(key) if group else stats.get(key)


def summarize_passes(passes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One arm's figures over its passes: each the passes' mean, a t-interval over their values
    (each pass one value) and the values themselves. One pass: its values, no interval."""
    summary: dict[str, Any] = {"passes": len(passes), "num_requests": sum(p["num_requests"] for p in passes),
               "failed": sum(p["failed"] for p in passes)}
    for group, key in PASS_FIGURES:
        values = [figure(p, group, key) for p in passes]
        if any(v is None for v in values):
            continue
        holder = summary.setdefault(group, {}) if group else summary
        holder.update({key: float(np.mean(values)), f"{key}_per_pass": values,
                       f"{key}_ci95": mean_ci95(values) if len(values) > 1 else None})
    return summary


def finished_passes(passes: Sequence[Mapping[str, Any]], arm: str) -> list[Mapping[str, Any]]:
    """The arm of every pass that ran it and finished every request (none failed, unfinished or
    unsent): the passes its figures and charts are taken over. A pass with failed or unfinished
    requests would give its fastest requests alone."""
    return [run[arm] for run in passes if arm in run and not run[arm]["stats"]["failed"]]


def complete_pairs(passes: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The passes whose cached and cold arms both finished every request: the pairs cache_buys
    sets side by side."""
    return [run for run in passes if all(arm in run and not run[arm]["stats"]["failed"] for arm in ("cached", "cold"))]


def cache_buys(cached_passes: Iterable[Mapping[str, Any]], cold_passes: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """What the cache buys on this traffic: for each TTFT figure, the saving 1 - cached / cold
    in % and the difference cold - cached in ms, pass by pass (the k-th cached pass against the
    k-th cold one), with their mean and a t-interval over the pairs."""
    bought = {}
    for key in SAVING_FIGURES:
        pairs = [(figure(c, "ttft_ms", key), figure(k, "ttft_ms", key)) for c, k in zip(cached_passes, cold_passes)]
        pairs = [(c, k) for c, k in pairs if c is not None and k]
        if not pairs:
            continue
        saving = [100.0 * (1 - c / k) for c, k in pairs]
        saved_ms = [k - c for c, k in pairs]
        bought[f"ttft_{key}"] = {
            "saving_pct": float(np.mean(saving)), "saving_pct_ci95": mean_ci95(saving) if len(saving) > 1 else None,
            "saving_pct_per_pass": saving,
            "saved_ms": float(np.mean(saved_ms)), "saved_ms_ci95": mean_ci95(saved_ms) if len(saved_ms) > 1 else None}
    return bought
