"""A run's trials turned into its figures: per-condition stats (the design's keys), the hit-vs-cold
saving and miss-vs-hit degradation with their intervals over the unit the run treats as
independent, and whether the run's two halves agree. No engine: plot_results reads it too.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from .defaults import CONDITIONS, TIER_CONDITION
from .engine_api import BREAKDOWN_PARTS
from .intervals import agree, degradation_pct, mean_ci95, ratio_ci95, saving_pct
from .settings import RunSettings


def compute_stats(trials: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean/median/stdev for TTFT, total time and throughput, plus spread, engine-side
    timings and cached tokens. Keys are the design's, times in ms."""
    col = lambda key: np.array([t[key] for t in trials], dtype=float)
    ttft, total, tput = col("ttft_ms"), col("total_time_ms"), col("throughput_tok_s")
    sd = lambda xs: float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0
    # engine-side timings: None where the engine reported none (a server whose histograms could not be read)
    engine = lambda key, f: None if any(t[key] is None for t in trials) else float(f(col(key)))
    cached = [t["cached_tokens"] for t in trials] + [t["throughput_request"]["cached_tokens"] for t in trials]
    return {
        "ttft_mean": float(np.mean(ttft)),
        "ttft_median": float(np.median(ttft)),
        "ttft_stdev": sd(ttft),
        "total_time_mean": float(np.mean(total)),
        "total_time_stdev": sd(total),
        "throughput_mean": float(np.mean(tput)),
        "throughput_stdev": sd(tput),
        "prompt_tokens": trials[0]["prompt_tokens"],
        "ttft_p90": float(np.percentile(ttft, 90)),
        "ttft_min": float(np.min(ttft)),
        "ttft_max": float(np.max(ttft)),
        "ttft_ci95": mean_ci95(ttft),
        "engine_ttft_mean": engine("engine_ttft_ms", np.mean),
        "engine_ttft_median": engine("engine_ttft_ms", np.median),
        "prefill_mean": engine("prefill_ms", np.mean),
        "prefill_median": engine("prefill_ms", np.median),
        # min == max whenever the cache audit passed; None where the engine did not report them (unaudited)
        "cached_tokens": None if None in cached else min(cached),
        "cached_tokens_max": None if None in cached else max(cached),
        "num_trials": len(trials),
        "ttft_breakdown_mean_ms": breakdown_means(trials),
        **source_stats(trials),
    }


def source_stats(trials: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Where the cached tokens came from (HBM, the tier; the least over every request: the audit
    checks each), and the tier's load rate, where the engine said. Empty where it never did."""
    requests = [r for t in trials for r in (t, t["throughput_request"])]
    hbm: list[Any]                  # ints, or None where the engine did not say: the least taken only where none is None
    tier: list[Any]
    hbm, tier = ([r.get(key) for r in requests] for key in ("hbm_cached_tokens", "tier_cached_tokens"))
    if not requests or None in hbm or None in tier:
        return {}
    return {"hbm_cached_tokens": min(hbm), "tier_cached_tokens": min(tier), "tier_load": load_rate(trials)}


def load_rate(trials: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
    """The tier's load rate over a condition's requests: {bytes, seconds, gb_s}, or None where the
    connector reports no loads."""
    requests = [r for t in trials for r in (t, t["throughput_request"])]
    loaded: list[tuple[Any, Any]] = [(r.get("tier_load_bytes"), r.get("tier_load_ms")) for r in requests]   # None: not said
    if not loaded or any(b is None or ms is None for b, ms in loaded):
        return None
    total_bytes, total_s = sum(b for b, _ in loaded), sum(ms for _, ms in loaded) / 1e3
    if not total_bytes or not total_s:
        return None
    return {"bytes": total_bytes, "seconds": total_s, "gb_s": total_bytes / total_s / 1e9,
            "bytes_per_request": total_bytes / len(requests)}


def conditions_in(trials: Sequence[Mapping[str, Any]]) -> list[str]:
    """The conditions a run measured, in the result's order: the design's three, and the tier's."""
    present = {t["condition"] for t in trials}
    return [c for c in (*CONDITIONS, TIER_CONDITION) if c in present]


def breakdown_means(trials: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
    """Each part of the TTFT breakdown (engine_api.RequestResult.ttft_breakdown), averaged over
    the trials (a part a trial lacks, tier_wait_ms, counts as 0 there): the parts' means add up
    to ttft_mean. None unless every trial has one."""
    parts: list[Any] = [t.get("ttft_breakdown_ms") for t in trials]      # dicts, or None where a trial has none
    if not parts or None in parts:
        return None
    keys = dict.fromkeys(key for p in parts for key in p)
    return {key: float(np.mean([p.get(key, 0.0) for p in parts])) for key in keys}


def breakdown_columns(breakdowns: Collection[Mapping[str, float] | None]) -> tuple[tuple[str, str], ...]:
    """The (key, label) of BREAKDOWN_PARTS that any of these breakdowns has, in stacking order."""
    return tuple((key, label) for key, label in BREAKDOWN_PARTS if any(key in b for b in breakdowns if b))


def unit_means(trials: Sequence[Mapping[str, Any]], condition: str, unit: str) -> np.ndarray:
    """Mean TTFT of one condition per unit ("round" or "block"), in unit order; for unit
    "trial", every TTFT in run order."""
    if unit == "trial":
        return np.array([t["ttft_ms"] for t in trials if t["condition"] == condition])
    groups: dict[int, list[float]] = {}
    for t in trials:
        if t["condition"] == condition:
            groups.setdefault(t[unit], []).append(t["ttft_ms"])
    return np.array([np.mean(groups[key]) for key in sorted(groups)])


def compare(trials: Sequence[Mapping[str, Any]], unit: str) -> dict[str, Any]:
    """Saving (hit vs cold) and degradation (miss vs hit) with their 95% intervals; the saving
    also in ms, which an overhead common to both requests leaves unchanged. unit: what the
    interval treats as one independent observation. "block" (the default protocol): a time
    block's mean, so a drift that outlasts a round but not a block is in the spread; "round":
    one round, paired; "trial": every request on its own, unpaired (the design's block order)."""
    from scipy import stats
    paired = unit != "trial"
    hit, miss, cold = (unit_means(trials, c, unit) for c in CONDITIONS)
    hit_to_cold, hit_to_cold_ci = ratio_ci95(hit, cold, paired)
    miss_to_hit, miss_to_hit_ci = ratio_ci95(miss, hit, paired)
    saved_ms = stats.ttest_rel(cold, hit) if paired else stats.ttest_ind(cold, hit, equal_var=False)
    return {
        **(compare_tier(trials, unit, hit, cold) if any(t["condition"] == TIER_CONDITION for t in trials) else {}),
        "ttft_saving_ms": float(np.mean(cold) - np.mean(hit)),
        "ttft_saving_ms_ci95": [float(x) for x in saved_ms.confidence_interval()],
        "ttft_saving_pct": float(saving_pct(hit_to_cold)),
        "ttft_saving_ci95": sorted(float(saving_pct(r)) for r in hit_to_cold_ci),
        "ttft_degradation_pct": float(degradation_pct(miss_to_hit)),
        "ttft_degradation_ci95": sorted(float(degradation_pct(r)) for r in miss_to_hit_ci),
    }


def compare_tier(trials: Sequence[Mapping[str, Any]], unit: str, hit: np.ndarray, cold: np.ndarray) -> dict[str, Any]:
    """A tier hit against cold (its saving, as the HBM hit's) and against an HBM hit (how much
    longer it takes: ttft_degradation_pct's measure, tier over hit), each with its interval."""
    from scipy import stats
    paired = unit != "trial"
    tier = unit_means(trials, TIER_CONDITION, unit)
    tier_to_cold, tier_to_cold_ci = ratio_ci95(tier, cold, paired)
    tier_to_hit, tier_to_hit_ci = ratio_ci95(tier, hit, paired)
    saved_ms = stats.ttest_rel(cold, tier) if paired else stats.ttest_ind(cold, tier, equal_var=False)
    return {
        "tier_ttft_saving_pct": float(saving_pct(tier_to_cold)),
        "tier_ttft_saving_ci95": sorted(float(saving_pct(r)) for r in tier_to_cold_ci),
        "tier_ttft_saving_ms": float(np.mean(cold) - np.mean(tier)),
        "tier_ttft_saving_ms_ci95": [float(x) for x in saved_ms.confidence_interval()],
        "tier_over_hit_pct": float(degradation_pct(tier_to_hit)),
        "tier_over_hit_ci95": sorted(float(degradation_pct(r)) for r in tier_to_hit_ci),
    }


def reproducibility(measured: Sequence[Mapping[str, Any]], unit: str) -> dict[str, Any]:
    """What a reader needs to judge whether a rerun would land inside the interval.

    The per-round and per-block savings show any drift. The run is also cut into its first
    and second half (of processes, blocks or rounds), each with its own saving and interval: if the
    halves disagree beyond their intervals (the same test as for two runs), the level moved
    more than the run's own spread allows, and the result is flagged as unstable."""
    report: dict[str, Any] = {"unit": unit, "per_round_saving_pct": None, "per_block_saving_pct": None,
                              "halves": None, "stable": None}
    if unit != "trial":
        report["per_round_saving_pct"] = saving_pct(unit_means(measured, "cache_hit", "round") /
                                                    unit_means(measured, "cache_cold", "round")).tolist()
    if unit in ("block", "process"):
        report["per_block_saving_pct"] = saving_pct(unit_means(measured, "cache_hit", "block") /
                                                    unit_means(measured, "cache_cold", "block")).tolist()
    if unit == "process":
        report["per_process_saving_pct"] = saving_pct(unit_means(measured, "cache_hit", "process") /
                                                      unit_means(measured, "cache_cold", "process")).tolist()
    key = "round" if unit == "trial" else unit
    units = sorted({t[key] for t in measured})
    if len(units) >= 8:                      # 4 units a half at least
        halves = [units[:len(units) // 2], units[len(units) // 2:]]
        parts = [compare([t for t in measured if t[key] in half], unit) for half in halves]
        report["halves"] = [{{"process": "processes"}.get(key, key + "s"): [half[0], half[-1]],
                             "ttft_saving_pct": part["ttft_saving_pct"],
                             "ttft_saving_ci95": part["ttft_saving_ci95"]} for half, part in zip(halves, parts)]
        report["stable"] = agree(parts[0]["ttft_saving_pct"], parts[0]["ttft_saving_ci95"],
                                 parts[1]["ttft_saving_pct"], parts[1]["ttft_saving_ci95"])
    return report


def interval_method(measured: Sequence[Mapping[str, Any]], unit: str, plan: Mapping[str, Any]) -> dict[str, Any]:
    """What the interval covers, for a reader of one JSON: the unit, how many, over how long."""
    method: dict[str, Any] = {
        "unit": unit,
        "statistic": {"process": "paired Fieller ratio over the engine processes' means, t with processes - 1 df",
                      "block": "paired Fieller ratio over time-block means (batch means), t with blocks - 1 df",
                      "round": "paired Fieller ratio over rounds, t with rounds - 1 df",
                      "trial": "unpaired Fieller ratio over trials"}[unit],
        "processes": plan.get("processes", 1),
        "num_blocks": plan["num_blocks"] if unit in ("block", "process") else None,
        "rounds_per_block": plan["rounds_per_block"] if unit in ("block", "process") else None,
        "min_block_s": plan["min_block_s"],
        "interleaved_configs": plan["configs"],
        "span_s": None, "block_span_s": None, "round_paired_ttft_saving_ci95": None,
        "block_paired_ttft_saving_ci95": None,
    }
    starts = [t["start_s"] for t in measured]
    method["span_s"] = max(starts) - min(starts) if starts else None
    if unit in ("block", "process"):
        spans: dict[int, list[float]] = {}
        for t in measured:
            spans.setdefault(t["block"], []).append(t["start_s"])
        method["block_span_s"] = [[min(s), max(s)] for _, s in sorted(spans.items())]
        # the intervals narrower units would give, for comparison: narrower where the host
        # drifts over longer than a round, or differs from one process to the next
        method["round_paired_ttft_saving_ci95"] = compare(measured, "round")["ttft_saving_ci95"]
    if unit == "process":
        method["block_paired_ttft_saving_ci95"] = compare(measured, "block")["ttft_saving_ci95"]
    return method


def summarize(trials: list[dict], settings: RunSettings,
              plan: dict) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Step 6: stats per condition over the measured rounds, the comparisons, the run's stability."""
    measured = [t for t in trials if t["round"] >= settings.warmup_trials]
    conditions = {}
    for c in conditions_in(trials):
        kept = [t for t in measured if t["condition"] == c]
        conditions[c] = {
            "trials": kept,
            "discarded_trials": [t for t in trials if t["condition"] == c and t["round"] < settings.warmup_trials],
            "stats": compute_stats(kept),
        }
    unit = ("trial" if settings.block_order else "process" if plan.get("processes", 1) > 1
            else "block" if plan["num_blocks"] > 1 else "round")
    return (conditions, compare(measured, unit), reproducibility(measured, unit),
            interval_method(measured, unit, plan))


def step_split(stats: Mapping[str, Any], segment: Mapping[str, Any] | None, condition: str) -> tuple[float, float] | None:
    """The measured prefill step's mean split into (GPU busy, the rest): the profiled requests'
    mean GPU-busy time of their kernels (gpu_busy.GpuBusyWorker; the copies from a tier are the
    tier's, in tier_wait_ms), and the step's mean minus it. Files from before the kernels were
    told apart give the busy time of every activity. None where the segment did not measure the
    condition."""
    busy = ((segment or {}).get("by_condition") or {}).get(condition)
    parts = stats.get("ttft_breakdown_mean_ms")
    if not busy or not parts:
        return None
    kernels_ms = busy.get("gpu_kernel_busy_mean_ms", busy["gpu_busy_mean_ms"])
    return kernels_ms, parts["prefill_step_ms"] - kernels_ms
