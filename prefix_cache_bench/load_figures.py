"""A load run's figures: one condition's at one level (TTFT and TPOT with their intervals,
throughput, goodput, hit rates, by cache state and by where the prefix came from), and one
condition's over its passes. Statistics only: nothing here sends a request.
"""
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .intervals import batch_means_ci95, mean_ci95, quantile_ci95, throughput_ci95
from .prometheus import LOAD_COUNTERS, SERVER_TIMES, server_times


def cache_source(request: Mapping[str, Any]) -> str | None:
    """Where a request's prefix came from: "tier" if any of it came from the second tier, "hbm"
    if it was found in HBM alone, "computed" if nothing was cached; None where unknown."""
    hbm, tier = request.get("hbm_cached_tokens"), request.get("tier_cached_tokens")
    if hbm is None or tier is None:
        return None
    return "tier" if tier else "hbm" if hbm else "computed"


def condition_stats(requests: Sequence[Mapping[str, Any]], slo_ttft_ms: float | None) -> dict[str, Any]:
    """Figures of one condition at one load level, each with its interval or spread."""
    done = [r for r in requests if r["error"] is None]
    ttft = [r["ttft_ms"] for r in sorted(done, key=lambda r: r["start_s"])]
    tpot = [r["tpot_ms"] for r in done if r["tpot_ms"] is not None]
    span_s = (max(r["end_s"] for r in done) - min(r["start_s"] for r in done)) if done else 0.0
    stats: dict[str, Any] = {"num_requests": len(requests), "failed": len(requests) - len(done), "duration_s": span_s}
    if not done:
        return stats
    for name, values in (("ttft_ms", ttft), ("tpot_ms", tpot)):
        if values:
            stats[name] = {"mean": float(np.mean(values)), "mean_ci95": batch_means_ci95(values),
                           **{f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)},
                           **{f"p{q}_ci95": quantile_ci95(values, q / 100) for q in (50, 90, 99)}}
    output_tokens = sum(r["output_tokens"] for r in done)
    stats.update({
        "request_throughput": len(done) / span_s if span_s else None,
        "request_throughput_ci95": throughput_ci95([r["start_s"] for r in done], [r["end_s"] for r in done]),
        "output_throughput_tok_s": output_tokens / span_s if span_s else None,
        "goodput_req_s": (sum(t <= slo_ttft_ms for t in ttft) / span_s if span_s else None) if slo_ttft_ms else None,
    })
    audited = [r for r in done if r["cached_tokens"] is not None]
    if audited:
        full = sum(r["document_cached_tokens"] for r in audited)
        stats["hit_rate"] = {
            "requests": sum(r["cache_state"] == "hit" for r in audited) / len(audited),
            "tokens": sum(r["cached_tokens"] for r in audited) / full if full else None}
        stats["by_cache_state"] = ttft_by(audited, "cache_state", ("hit", "partial", "miss"))
        sourced = [r for r in audited if cache_source(r) is not None]
        if sourced and len(sourced) == len(audited):
            stats["hit_rate"].update({f"{source}_tokens": sum(r[f"{source}_cached_tokens"] for r in sourced) / full
                                      for source in ("hbm", "tier")} if full else {})
            stats["by_source"] = ttft_by([{**r, "source": cache_source(r)} for r in sourced], "source",
                                         ("hbm", "tier", "computed"))
    return stats


def ttft_by(requests: Sequence[Mapping[str, Any]], key: str, values: Iterable[str]) -> dict[str, dict[str, float]]:
    """{value: requests, TTFT mean, p50 and p99} of the requests grouped by request[key]."""
    groups = {}
    for value in values:
        found = [r["ttft_ms"] for r in requests if r[key] == value]
        if found:
            groups[value] = {"requests": len(found), "ttft_ms_mean": float(np.mean(found)),
                             "ttft_ms_p50": float(np.percentile(found, 50)), "ttft_ms_p99": float(np.percentile(found, 99))}
    return groups


SUMMARY_FIGURES = (("ttft_ms", "mean"), ("ttft_ms", "p50"), ("ttft_ms", "p90"), ("ttft_ms", "p99"),
                   ("tpot_ms", "mean"), ("tpot_ms", "p50"), ("tpot_ms", "p90"), ("tpot_ms", "p99"),
                   (None, "request_throughput"), (None, "output_throughput_tok_s"), (None, "goodput_req_s"),
                   ("hit_rate", "requests"), ("hit_rate", "tokens"), ("hit_rate", "hbm_tokens"), ("hit_rate", "tier_tokens"),
                   (None, "client_cpu_busy"))


def summarize_runs(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One condition's figures over its passes. With two or more, each figure is the mean of
    the passes' values and its interval a t-interval over them (each pass one value, as
    pyperf takes processes): it holds what differs from one pass to the next, such as the
    state a closed loop settles into, which one pass's intervals cannot see. With one pass,
    that pass's own intervals (order statistics, batch means)."""
    if len(runs) == 1:
        one = {key: value for key, value in runs[0].items() if key not in ("requests", "problems", "server_error")}
        return {**one, "interval": "one pass: percentiles by order statistics, means and throughput by batch means"}
    summary: dict[str, Any] = {"num_requests": sum(r["num_requests"] for r in runs), "failed": sum(r["failed"] for r in runs),
                               "passes": len(runs),
                               "interval": f"over {len(runs)} passes: the passes' mean and a t-interval over their values"}
    for group, key in SUMMARY_FIGURES:
        values = [(r.get(group) or {}).get(key) if group else r.get(key) for r in runs]
        if any(v is None for v in values):
            continue
        holder = summary.setdefault(group, {}) if group else summary
        holder.update({key: float(np.mean(values)), f"{key}_ci95": mean_ci95(values), f"{key}_per_pass": values})
    servers: list[Any] = [r.get("server") or {} for r in runs]
    histograms = [key for key in LOAD_COUNTERS if key.endswith(("_sum_s", "_count"))]
    totals = {key: sum(s[key] for s in servers) if all(s.get(key) is not None for s in servers) else None
              for key in ("requests", "prefix_cache_hits", "prefix_cache_queries", "external_prefix_cache_hits",
                          "prompt_tokens",
                          "prefill_tokens_computed", "preemptions", *histograms)}
    summary["server"] = {key: value for key, value in totals.items() if key not in histograms}
    # the passes' requests together: the histograms' sums over their counts; beside each, the
    # passes' own means, its spread
    summary["server"].update(server_times(totals))
    summary["server"].update({f"{key}_per_pass": [s.get(key) for s in servers] for key, _ in SERVER_TIMES})
    names = sorted({name for s in servers for name in (s.get("replicas") or {})})
    summary["server"]["replicas"] = {name: {key: sum((s.get("replicas") or {}).get(name, {}).get(key) or 0 for s in servers)
                                            for key in LOAD_COUNTERS} for name in names}
    busy = [s.get("api_server_cpu_busy_max") for s in servers]
    summary["server"]["api_server_cpu_busy_max"] = None if None in busy else float(np.mean(busy))
    summary["server"]["api_server_cpu_busy_max_per_pass"] = busy
    sourced = [{**r, "source": cache_source(r)} for run in runs for r in run["requests"]
               if r["error"] is None and cache_source(r) is not None]
    if sourced:                             # where each request's prefix came from: all passes' requests together
        summary["by_source"] = ttft_by(sourced, "source", ("hbm", "tier", "computed"))
    summary["server"]["kv_cache_usage_max"] = max((s.get("kv_cache_usage_max") for s in servers
                                                   if s.get("kv_cache_usage_max") is not None), default=None)
    return summary
