"""Charts of trace replays: the TTFT CDF of each arm, the hit share over the window (measured,
simulated, ideal), and the capacity curve with the replayed points on it (matplotlib, imported
when drawing).
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .trace_figures import finished_passes
from .trace_tables import curve_table, trace_summary

if TYPE_CHECKING:
    from .result_schema import CapacityCurve, TraceResult

ARM_COLOURS = {"cached": "#2a9d8f", "cold": "#8d99ae"}
SHARE_STYLES = {"measured": ("#2a9d8f", "-"), "simulated": ("#e76f51", "--"), "ideal": ("#264653", ":")}


def pyplot() -> Any:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def arm_ttfts(result: TraceResult, arm: str) -> list[float]:
    return sorted(r["ttft_ms"] for one in finished_passes(result["passes"], arm) for r in one["requests"])


def share_over_time(result: TraceResult, key: str) -> tuple[list[float], list[float]]:
    """The cached arm's hit share in each span of the window, the mean of its finished passes."""
    series = [one["stats"].get("hit_share_over_time") or [] for one in finished_passes(result["passes"], "cached")]
    series = [s for s in series if s]
    if not series:
        return [], []
    mids = [(span["start_s"] + span["end_s"]) / 2 for span in series[0]]
    values = [np.mean([s[k][key] for s in series if s[k][key] is not None] or [np.nan]) for k in range(len(mids))]
    return mids, values


def plot_trace(result: TraceResult, outfile: str) -> None:
    """TTFT CDF per arm (every pass's requests) and the cached arm's hit share over the window."""
    plt = pyplot()
    fig, (ax_cdf, ax_share) = plt.subplots(1, 2, figsize=(12, 4.5))
    for arm, colour in ARM_COLOURS.items():
        ttft = arm_ttfts(result, arm)
        if ttft:
            ax_cdf.plot(ttft, np.arange(1, len(ttft) + 1) / len(ttft), color=colour, label=f"{arm} ({len(ttft)} requests)")
    ax_cdf.set_xscale("log")
    ax_cdf.set_xlabel("TTFT (ms, log scale)")
    ax_cdf.set_ylabel("share of requests")
    ax_cdf.set_title("TTFT, cached against cold at the trace's times")
    ax_cdf.legend()
    for key, (colour, style) in SHARE_STYLES.items():
        x, y = share_over_time(result, key)
        ax_share.plot(x, [100 * v for v in y], color=colour, linestyle=style, marker="o", markersize=3, label=key)
    ax_share.set_xlabel("replay time (s)")
    ax_share.set_ylabel("input tokens found cached (%)")
    ax_share.set_ylim(0, 100)
    ax_share.set_title("cached arm: hit share over the window")
    ax_share.legend()
    fig.suptitle(f"{os.path.basename(result['config']['trace'])}: {result['window']['requests']} requests, "
                 f"{result['environment'].get('device')}")
    fig.tight_layout()
    fig.savefig(outfile, dpi=110)
    plt.close(fig)


def replayed_points(replays: Iterable[tuple[str, TraceResult]]) -> list[tuple[int, float, str]]:
    """[(simulated capacity tokens, measured hit share, label)] of replays' cached arms."""
    points = []
    for _, result in replays:
        share = ((result["arms"].get("cached") or {}).get("hit_share") or {}).get("measured")
        if share is not None:
            where = "HBM + tier" if result.get("tier_capacity_tokens") else "HBM"
            points.append((result["simulated_capacity_tokens"], share, f"{result['environment'].get('device')}, {where}"))
    return points


def plot_curve(curve_result: CapacityCurve, points: Iterable[tuple[int, float, str]], outfile: str) -> None:
    """The simulated reusable share against capacity (log x), the ideal as a line, replayed points on it."""
    plt = pyplot()
    curve = curve_result["curve"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = [p["capacity_tokens"] for p in curve["capacities"]]
    ax.plot(x, [100 * p["share"] for p in curve["capacities"]], marker="o", color="#e76f51", label="LRU model")
    ax.axhline(100 * curve["ideal_share"], color="#264653", linestyle=":", label="infinite cache (ideal)")
    for tokens, share, label in points:
        ax.plot([tokens], [100 * share], marker="*", markersize=14, linestyle="none", color="#2a9d8f",
                label=f"replayed: {label}")
    ax.set_xscale("log")
    ax.set_xlabel("prefix-cache capacity (tokens, log scale)")
    ax.set_ylabel("input tokens reusable (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{os.path.basename(curve_result['config']['trace'])}: {curve_result['window']['requests']} requests")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(outfile, dpi=110)
    plt.close(fig)


def chart_name(path: str) -> str:
    """The chart of a result file: results_trace_X.json -> trace_X.png."""
    return os.path.basename(path).removeprefix("results_").removesuffix(".json") + ".png"


def trace_outputs(replays: Sequence[tuple[str, TraceResult]], curves: Iterable[tuple[str, CapacityCurve]],
                  out_dir: str) -> list[tuple[str, str]]:
    """Charts and Markdown of replays and capacity curves ([(path, result)]): [(text, chart path)].
    A curve's chart carries the replays of its trace."""
    outputs = []
    for path, result in replays:
        chart = os.path.join(out_dir, chart_name(path))
        plot_trace(result, chart)
        outputs.append((f"## {os.path.basename(path)}\n\n{trace_summary(result)}", chart))
    for path, curve_result in curves:
        points = replayed_points(same_trace(replays, curve_result))
        chart = os.path.join(out_dir, chart_name(path))
        plot_curve(curve_result, points, chart)
        outputs.append((f"## {os.path.basename(path)}\n\n{curve_table(curve_result['curve'], points)}", chart))
    return outputs


def same_trace(replays: Iterable[tuple[str, TraceResult]], curve_result: CapacityCurve) -> list[tuple[str, TraceResult]]:
    """The replays of the trace a capacity curve was drawn from."""
    return [(p, r) for p, r in replays if r["config"]["trace"] == curve_result["config"]["trace"]]
