"""The charts (matplotlib, imported when drawing): grouped bars per config, TTFT against context
with the fit, what the server path adds, load, working-set and fleet charts.
"""
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .engine_api import BREAKDOWN_PARTS
from .load_tables import interval_words, load_file_tables, load_title, load_value
from .prefill_fit import predicted_ttft_ms
from .settings import Config
from .tables import (CONDITION_NAMES, anatomy_rows, audit_ok, comparison_note,
                     conditions_present, describe_source, unaudited, unstable, PathCost)

# condition key -> (legend label, colour)
CONDITION_STYLES = {
    "cache_hit": ("hit [A, B, Q], A+B cached", "#2a9d8f"),
    "cache_miss": ("miss [B, Q], nothing cached", "#e76f51"),
    "cache_cold": ("cold [A, B, Q], nothing cached", "#8d99ae"),
    "cache_tier": ("tier hit [A, B, Q], A+B from the second tier", "#e9c46a"),
}


# panel -> (stats prefix, bar label format, y label, title, head room above the tallest bar)
PANELS = {
    "warmup": ("warmup_time", "%.1f", "warmup time (ms)", "Warmup", 1.2),
    "ttft": ("ttft", "%.1f", "time to first token (ms), mean", "TTFT (lower is better)", 1.35),
    "throughput": ("throughput", "%.0f", "generation throughput (tokens/s), mean", "Throughput (higher is better)", 1.2),
}


def error_bar(stats: Mapping[str, Any], prefix: str) -> tuple[float, float]:
    """(below, above) the mean: the 95% CI where the file has one, else one stdev."""
    mean = stats[f"{prefix}_mean"]
    ci = stats.get(f"{prefix}_ci95")
    if isinstance(ci, list) and len(ci) == 2 and None not in ci:
        return max(mean - ci[0], 0.0), max(ci[1] - mean, 0.0)
    sd = stats.get(f"{prefix}_stdev") or 0.0
    return sd, sd


def _bars(ax, configs, conds, stat_prefix, fmt):
    """Grouped bars: one group per config, one bar per condition (matplotlib's grouped-bar recipe)."""
    width = 0.8 / len(conds)
    tops = [0.0] * len(configs)
    used_ci = False
    for i, cond in enumerate(conds):
        xs, heights, errs, drawn = [], [], [[], []], []
        for j, data in enumerate(configs.values()):
            stats = data.get(cond, {}).get("stats")
            if not stats or stats.get(f"{stat_prefix}_mean") is None:
                continue
            lo, hi = error_bar(stats, stat_prefix)
            used_ci |= isinstance(stats.get(f"{stat_prefix}_ci95"), list)
            xs.append(j + (i - (len(conds) - 1) / 2) * width)
            heights.append(stats[f"{stat_prefix}_mean"])
            errs[0].append(lo)
            errs[1].append(hi)
            tops[j] = max(tops[j], stats[f"{stat_prefix}_mean"] + hi)
            drawn.append(data)
        label, colour = CONDITION_STYLES[cond]
        bars = ax.bar(xs, heights, width, yerr=errs, capsize=3, label=label, color=colour)
        for bar, data in zip(bars, drawn):
            if not audit_ok(data) or unaudited(data):
                bar.set_hatch("//")
                bar.set_edgecolor("red" if not audit_ok(data) else "black")
        ax.bar_label(bars, fmt=fmt, label_type="center", fontsize=7, color="white", fontweight="bold")
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels([f"A={a} / B={b}" + ("\nAUDIT FAILED" if not audit_ok(d) else "\nUNAUDITED" if unaudited(d) else "")
                        for (a, b), d in configs.items()], fontsize=8)
    for label, data in zip(ax.get_xticklabels(), configs.values()):
        if not audit_ok(data) or unaudited(data):
            label.set_color("red")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.text(0.99, 0.99, "error bars: 95% CI of the mean" if used_ci else "error bars: ±1 stdev",
            transform=ax.transAxes, ha="right", va="top", fontsize=7, color="#555555")
    return tops


def plot_phase(configs: Mapping[Config, Mapping[str, Any]], phase_key: str, phase_label: str, outfile: str) -> Any:
    """Draw one phase's chart to outfile; return the Figure (for tests and notebooks)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = conditions_present(configs)
    has_warmup = any(d.get(c, {}).get("stats", {}).get("warmup_time_mean") is not None
                     for d in configs.values() for c in conds)
    panels = (["warmup"] if has_warmup else []) + ["ttft", "throughput"]
    panel_width = max(4.5, 1.7 * len(configs))        # room for "A=1024 / B=256" under each group
    # up to 6 configs the panels stand side by side; beyond that, one above the other
    rows, cols = (len(panels), 1) if len(configs) > 6 else (1, len(panels))
    fig, axes = plt.subplots(rows, cols, figsize=(panel_width * cols, 5.4 * rows), squeeze=False)
    axes = dict(zip(panels, axes.flat))
    for name, ax in axes.items():
        prefix, fmt, ylabel, title, headroom = PANELS[name]
        tops = _bars(ax, configs, conds, prefix, fmt)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if name == "ttft":
            for j, data in enumerate(configs.values()):
                ax.annotate(comparison_note(data), (j, tops[j]), xytext=(0, 14), textcoords="offset points",
                            ha="center", va="bottom", fontsize=7, color="red" if unstable(data) else "black")
        lows = [d[c]["stats"][f"{prefix}_mean"] for d in configs.values() for c in conds
                if d.get(c, {}).get("stats", {}).get(f"{prefix}_mean") is not None]
        if name == "ttft" and min(lows) > 0 and max(tops) / min(lows) > 20:
            # 512 to 32k tokens of context: on a linear axis the short configs' bars vanish
            ax.set_yscale("log")
            ax.set_ylim(min(lows) / 2, max(tops) * headroom ** 4)
            ax.set_ylabel(ylabel + " (log scale)")
        else:
            ax.set_ylim(0, max(tops) * headroom if max(tops) > 0 else 1)

    handles, labels = axes["ttft"].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(conds), fontsize=8, frameon=False)
    source = describe_source(configs)
    fig.suptitle(f"Prefix caching: {phase_label}" + (f"\n{source}" if source else ""), fontsize=11)
    fig.tight_layout(rect=(0, 0.06 / rows, 1, 1))
    fig.savefig(outfile, dpi=130)
    return fig


def plot_server_path(costs: Mapping[Config, Mapping[str, PathCost]], title: str, outfile: str) -> Any:
    """Grouped bars: the ms the server path adds to each condition's TTFT, per config, with 95% CIs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = [c for c in CONDITION_NAMES if any(c in row for row in costs.values())]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.7 * len(costs)), 4.6))
    width = 0.8 / len(conds)
    for i, c in enumerate(conds):
        xs = [j + (i - (len(conds) - 1) / 2) * width for j, row in enumerate(costs.values()) if c in row]
        added = [row[c][2] for row in costs.values() if c in row]
        errs = [[max(row[c][2] - row[c][3][0], 0) for row in costs.values() if c in row],
                [max(row[c][3][1] - row[c][2], 0) for row in costs.values() if c in row]]
        bars = ax.bar(xs, added, width, yerr=errs, capsize=3, label=CONDITION_STYLES[c][0], color=CONDITION_STYLES[c][1])
        ax.bar_label(bars, fmt="%+.1f", fontsize=7, padding=2)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(costs)))
    ax.set_xticklabels([f"A={a} / B={b}" for a, b in costs], fontsize=8)
    ax.set_ylabel("TTFT added by the server path (ms)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=7, frameon=False)
    ax.text(0.99, 0.01, "server (phase 1) minus offline (phase 2); error bars: 95% CI over time blocks",
            transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color="#555555")
    fig.tight_layout()
    fig.savefig(outfile, dpi=130)
    return fig


SERVER_PATH_CHART = "phase1_vs_phase2.png"


def plot_context(configs: Mapping[Config, Mapping[str, Any]], fit: Mapping[str, Any] | None, phase_label: str,
                 outfile: str) -> Any:
    """TTFT against prompt length for hit, miss and cold, with the fitted prefill line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.4))
    errs: list[list[float]]                 # each point's error bar below, above
    for cond in conditions_present(configs):
        xs, ys, errs = [], [], [[], []]
        for data in configs.values():
            stats = data.get(cond, {}).get("stats", {})
            if "prompt_tokens" not in stats:
                continue
            lo, hi = error_bar(stats, "ttft")
            xs.append(stats["prompt_tokens"])
            ys.append(stats["ttft_mean"])
            errs[0].append(lo)
            errs[1].append(hi)
        label, colour = CONDITION_STYLES[cond]
        ax.errorbar(xs, ys, yerr=errs, fmt="o", color=colour, label=label, capsize=3, markersize=5)
    if fit:
        xs = np.geomspace(min(x for line in ax.lines for x in line.get_xdata()) / 2,
                          max(x for line in ax.lines for x in line.get_xdata()) * 1.5, 200)
        rate = (f"{fit['tflops']:.0f} TFLOP/s" if fit["tflops"] else f"{fit['prefill_tokens_per_s']:,.0f} tokens/s")
        ax.plot(xs, [predicted_ttft_ms(fit, x) for x in xs], "--", color="#555555",
                label=f"fit, nothing cached: {fit['overhead_ms']:.1f} ms + {fit['work']} at {rate}")
        hits = [d["cache_hit"]["stats"] for d in configs.values()]
        ax.plot([h["prompt_tokens"] for h in hits],
                [predicted_ttft_ms(fit, h["prompt_tokens"] - (h.get("cached_tokens") or 0), h.get("cached_tokens") or 0)
                 for h in hits], "x", color=CONDITION_STYLES["cache_hit"][1], markersize=9,
                label="fit, the hit's uncached tokens behind its cached ones")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens (A + B + Q; miss: B + Q)")
    ax.set_ylabel("time to first token (ms), mean, 95% CI")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    source = describe_source(configs)
    ax.set_title(f"TTFT vs context: {phase_label}" + (f"\n{source}" if source else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(outfile, dpi=130)
    return fig


FRONT_COLOURS = ("#2a9d8f", "#e76f51", "#264653", "#e9c46a", "#8d99ae", "#f4a261", "#6d597a")


LOAD_COLOURS = {"cached": "#2a9d8f", "cold": "#8d99ae"}


def hit_rate_series(levels: Sequence[Mapping[str, Any]], key: str = "requests") -> tuple[list[float], list[list[float]]] | None:
    """(hit rates in %, their error bars) of the levels' cached condition, by requests or by
    tokens; None where a level has no hit rate (an unaudited run)."""
    rates = [(lv["cached"].get("hit_rate") or {}) for lv in levels]
    if any(rate.get(key) is None for rate in rates):
        return None
    values = [rate[key] * 100 for rate in rates]
    cis = [[bound * 100 for bound in rate[f"{key}_ci95"]] if rate.get(f"{key}_ci95") else None for rate in rates]
    return values, _errors(values, cis)


def _errors(values, cis):
    """Error bar lengths below and above; a side without a bound gets none."""
    below = [0 if v is None or ci is None or ci[0] is None else max(v - ci[0], 0) for v, ci in zip(values, cis)]
    above = [0 if v is None or ci is None or ci[1] is None else max(ci[1] - v, 0) for v, ci in zip(values, cis)]
    return [below, above]


def label_load_axes(xlabel: str, axes: Iterable[tuple[Any, str, str]], legend_title: str | None = None) -> None:
    """Load on a log2 x axis; each (axis, y label, title) labelled, gridded, with its legend."""
    for ax, ylabel, title in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(title=legend_title)


def plot_load(data: Mapping[str, Any], outfile: str) -> None:
    """TTFT p50 and p99 against load, cached against cold; and the request throughput."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ttft, ax_tput) = plt.subplots(1, 2, figsize=(13, 5))
    for c in ("cached", "cold"):
        levels = [lv for lv in data["levels"] if lv.get(c) and lv[c].get("ttft_ms")]
        if not levels:
            continue
        x = [load_value(lv)[0] for lv in levels]
        for q, style in (("p50", "-o"), ("p99", "--s")):
            values = [lv[c]["ttft_ms"][q] for lv in levels]
            ax_ttft.errorbar(x, values, yerr=_errors(values, [lv[c]["ttft_ms"][f"{q}_ci95"] for lv in levels]),
                             fmt=style, color=LOAD_COLOURS[c], capsize=3, label=f"{c}, {q}")
        values = [lv[c]["request_throughput"] for lv in levels]
        ax_tput.errorbar(x, values, yerr=_errors(values, [lv[c]["request_throughput_ci95"] for lv in levels]),
                         fmt="-o", color=LOAD_COLOURS[c], capsize=3, label=c)
    label_load_axes(load_value(data["levels"][0])[1],
                    ((ax_ttft, "time to first token (ms)", "TTFT percentiles (lower is better)"),
                     (ax_tput, "completed requests/s", "Throughput (higher is better)")))
    ax_ttft.set_yscale("log")
    fig.suptitle(load_title(data) + f"\nerror bars: 95% intervals, {interval_words(data)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(outfile, dpi=120)
    plt.close(fig)


def plot_working_set(data: Mapping[str, Any], outfile: str) -> None:
    """Hit rate and TTFT against the working set (documents x their tokens), with the KV capacity."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [lv for lv in data["levels"] if lv.get("cached") and lv["cached"].get("ttft_ms")]
    x = [lv["working_set_tokens"] for lv in levels]
    capacity = data.get("kv_capacity_tokens")
    fig, (ax_hit, ax_ttft) = plt.subplots(1, 2, figsize=(13, 5))
    for key, style, label in (("requests", "-o", "requests that found their whole document"),
                              ("tokens", "--s", "document tokens found cached")):
        series = hit_rate_series(levels, key)
        if series:
            ax_hit.errorbar(x, series[0], yerr=series[1], fmt=style, color=LOAD_COLOURS["cached"], capsize=3,
                            label=label)
    for q, style in (("p50", "-o"), ("p99", "--s")):
        values = [lv["cached"]["ttft_ms"][q] for lv in levels]
        ax_ttft.errorbar(x, values, yerr=_errors(values, [lv["cached"]["ttft_ms"][f"{q}_ci95"] for lv in levels]),
                         fmt=style, color=LOAD_COLOURS["cached"], capsize=3, label=f"cached, {q}")
    plot_tier_split(ax_hit, ax_ttft, levels, x)
    cold = data["levels"][0].get("cold")
    if cold and cold.get("ttft_ms"):
        ax_ttft.axhline(cold["ttft_ms"]["p50"], color=LOAD_COLOURS["cold"], linestyle=":", label="cold, p50")
    for ax in (ax_hit, ax_ttft):
        if capacity:
            ax.axvline(capacity, color="#e76f51", linestyle="-.", label=f"KV cache: {capacity} tokens")
        ax.set_xlabel("working set: documents x their cached tokens")
        ax.grid(alpha=0.3)
        ax.legend()
    ax_hit.set_ylabel("hit rate (%)")
    ax_hit.set_ylim(0, 105)
    ax_hit.set_title("Hit rate (higher is better)")
    ax_ttft.set_ylabel("time to first token (ms)")
    ax_ttft.set_title("TTFT of the cached condition (lower is better)")
    load, label = load_value(data["levels"][0])
    fig.suptitle(load_title(data) + f"\n{label.split(' (')[0]} {load:g}; error bars: 95% intervals, "
                 f"{interval_words(data)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(outfile, dpi=120)
    plt.close(fig)


TIER_COLOURS = {"hbm": "#264653", "tier": "#e9c46a"}


def plot_tier_split(ax_hit: Any, ax_ttft: Any, levels: Sequence[Mapping[str, Any]], x: Sequence[float]) -> None:
    """With a second tier: the document tokens found in each, and the p50 TTFT of the requests
    whose prefix came from each (where every level says)."""
    for source, label in (("hbm", "HBM"), ("tier", "the tier")):
        series = hit_rate_series(levels, f"{source}_tokens")
        if series:
            ax_hit.errorbar(x, series[0], yerr=series[1], fmt=":^", color=TIER_COLOURS[source], capsize=3,
                            label=f"tokens found in {label}")
        groups = [(xs, (lv["cached"].get("by_source") or {}).get(source)) for xs, lv in zip(x, levels)]
        points = [(xs, g["ttft_ms_p50"]) for xs, g in groups if g]
        if points:
            ax_ttft.plot(*zip(*points), ":^", color=TIER_COLOURS[source], label=f"hits from {label}, p50")


def plot_fleet(fronts: Sequence[tuple[str, Mapping[str, Any]]], outfile: str) -> None:
    """Hit rate and p99 TTFT of the cached condition per front, against load."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_hit, ax_p99) = plt.subplots(1, 2, figsize=(13, 5))
    for k, (front, data) in enumerate(fronts):
        levels = [lv for lv in data["levels"] if lv.get("cached") and lv["cached"].get("ttft_ms")]
        x = [load_value(lv)[0] for lv in levels]
        colour = FRONT_COLOURS[k % len(FRONT_COLOURS)]
        series = hit_rate_series(levels)
        if series:
            ax_hit.errorbar(x, series[0], yerr=series[1], fmt="-o", color=colour, capsize=3, label=front)
        values = [lv["cached"]["ttft_ms"]["p99"] for lv in levels]
        ax_p99.errorbar(x, values, yerr=_errors(values, [lv["cached"]["ttft_ms"]["p99_ci95"] for lv in levels]),
                        fmt="-o", color=colour, capsize=3, label=front)
    label_load_axes(load_value(fronts[0][1]["levels"][0])[1],
                    ((ax_hit, "requests that found their whole document (%)", "Hit rate (higher is better)"),
                     (ax_p99, "time to first token, p99 (ms)", "p99 TTFT (lower is better)")), legend_title="front")
    ax_hit.set_ylim(0, 105)
    replicas = len(fronts[0][1].get("kv_capacity_tokens_per_engine") or {})
    fig.suptitle(f"{load_title(fronts[0][1])}, {replicas} replicas\nerror bars: 95% intervals, "
                 f"{interval_words(fronts[0][1])}", fontsize=10)
    fig.tight_layout()
    fig.savefig(outfile, dpi=120)
    plt.close(fig)


def load_outputs(path: str, data: Mapping[str, Any], out_dir: str) -> tuple[str, str]:
    """Chart and table of one load or working-set file: (chart path, Markdown heading and table)."""
    stem = os.path.basename(path).rsplit(".json", 1)[0].replace("results_", "")
    chart = os.path.join(out_dir, f"{stem}.png")
    (plot_working_set if data["experiment"] == "working_set" else plot_load)(data, chart)
    table = load_file_tables(data)
    note = "" if data.get("complete", True) else f"\n\n**Incomplete:** {data.get('failure')}"
    return chart, f"## {stem}: {load_title(data)}\n\n{table}{note}"


ANATOMY_COLORS = ("#999999", "#f0a030", "#d04040", "#8a50b0", "#3070c0")     # one per BREAKDOWN_PARTS entry
GPU_BUSY_COLOR = "#103070"


def plot_anatomy(configs: Mapping[Config, Mapping[str, Any]], phase_label: str, outfile: str) -> Any | None:
    """Stacked bars: each config's conditions, their mean TTFT split into the breakdown's parts
    (the prefill step's GPU-busy part darker, where the file has it), the GPU's floor for that
    prefill marked on the bar. Returns the Figure, or None where no file carries the breakdown."""
    rows = anatomy_rows(configs)
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(rows) + 2), 5.4))
    x = np.arange(len(rows))
    bottom = np.zeros(len(rows))
    present = {key for _, _, stats, _, _ in rows for key in stats["ttft_breakdown_mean_ms"]}
    for (key, label), color in zip(BREAKDOWN_PARTS, ANATOMY_COLORS):
        if key not in present:
            continue
        heights = np.array([stats["ttft_breakdown_mean_ms"].get(key, 0.0) for _, _, stats, _, _ in rows])
        ax.bar(x, heights, 0.7, bottom=bottom, color=color, label=label)
        bottom += heights
    busy = np.array([split[0] if split else 0.0 for *_, split in rows])
    if busy.any():                          # drawn over the prefill step, from its bottom
        step_bottom = bottom - np.array([stats["ttft_breakdown_mean_ms"]["prefill_step_ms"] for _, _, stats, _, _ in rows])
        ax.bar(x, busy, 0.4, bottom=step_bottom, color=GPU_BUSY_COLOR,
               label="of the prefill step: GPU busy (profiled)")
    floors = [(i, floor["floor_ms"]) for i, (_, _, _, floor, _) in enumerate(rows) if floor]
    if floors:
        ax.scatter([i for i, _ in floors], [ms for _, ms in floors], marker="_", s=900, color="black", zorder=3,
                   label="GPU floor (bytes at HBM bandwidth, or FLOPs at peak)")
    ax.set_xticks(x, [f"{label}\n{condition.removeprefix('cache_')}" for label, condition, *_ in rows],
                  fontsize=7, rotation=0)
    ax.set_ylabel("mean TTFT (ms), split where it goes")
    if bottom.max() / max(bottom.min(), 1e-9) > 20:
        ax.set_yscale("log")
    ax.legend(fontsize=8, frameon=False)
    source = describe_source(configs)
    ax.set_title(f"Where the TTFT goes: {phase_label}" + (f"\n{source}" if source else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(outfile, dpi=130)
    return fig
