"""Chart the results of phase1_experiment.py (server) and phase2_experiment.py (offline):
cache hit vs miss (vs cold) per (A, B) config.

    python plot_results.py                       # results/ -> results/experiment1_all_configs_phase2.png
    python plot_results.py --results-dir results/h200-llama3.1-8b-shape-sweep --write-readme
    python plot_results.py --compare run1/ run2/ run3/   # the same command's runs: do they agree?

Reads every results_phase<N>_a<A>_b<B>.json (or .json.gz) in --results-dir (not its subfolders),
draws one PNG per phase (TTFT and throughput panels, plus a warmup panel when the
files carry per-condition warmup stats, as phase 1's do) and prints a Markdown summary
table. Where phase 1 and phase 2 measured the same model and configs, it prints and draws
what the server path adds to each condition's TTFT (phase1_vs_phase2.png). With 3
or more configs of one model it also fits TTFT = overhead + prefill work / rate,
prints the overhead, prefill rate, TFLOP/s and MFU, and draws TTFT against context
length (ttft_vs_context_<phase>.png). A file that is not JSON or lacks what a panel
needs is skipped with one line. --compare prints, besides the table, each run's command,
machine and code (the commit whose script has the hash the file records);
--write-readme writes the same facts into a README.md beside the files.

Phase 1's load runs (results_load_*.json) get a chart of TTFT p50/p99 and throughput against
load, cached against cold (load_<...>.png), and its working-set sweeps
(results_workingset_*.json) a chart of hit rate and TTFT against the working set with the KV
capacity marked (workingset_<...>.png), each with a Markdown table. --compare also lines up
the load files that several runs share, figure by figure.
"""
import argparse
import functools
import glob
import gzip
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

from phase2_experiment import agree, mean_ci95, unit_means     # the experiment's own (no vLLM import)

RESULTS_DIR = "results"
FILE_PATTERN = "results_phase*_a*_b*.json"
# Large runs may be stored gzipped beside the plain ones (results_phase2_a300_b200.json.gz).
FILE_RE = re.compile(r"^results_(phase\d+)_a(\d+)_b(\d+)\.json(\.gz)?$")
# condition key -> (short name, legend label, colour)
CONDITIONS = {
    "cache_hit": ("hit", "hit [A, B, Q], A+B cached", "#2a9d8f"),
    "cache_miss": ("miss", "miss [B, Q], nothing cached", "#e76f51"),
    "cache_cold": ("cold", "cold [A, B, Q], nothing cached", "#8d99ae"),
}
# panel -> (stats prefix, bar label format, y label, title, head room above the tallest bar)
PANELS = {
    "warmup": ("warmup_time", "%.1f", "warmup time (ms)", "Warmup", 1.2),
    "ttft": ("ttft", "%.1f", "time to first token (ms), mean", "TTFT (lower is better)", 1.35),
    "throughput": ("throughput", "%.0f", "generation throughput (tokens/s), mean", "Throughput (higher is better)", 1.2),
}
REQUIRED_STATS = ("ttft_mean", "throughput_mean")
SCRIPTS = {"phase1_server_api": "phase1_experiment.py", "phase2_python_api": "phase2_experiment.py"}
# Dense bf16/fp16 tensor peak (TFLOP/s, no sparsity), from the vendors' datasheets, for MFU.
# Matched against the recorded device name, in this order; other devices get no MFU.
PEAK_TFLOPS = (("H100 PCIe", 756), ("H200", 989), ("H100", 989), ("A100", 312), ("L40S", 362), ("L4", 121))


def load_result(path):
    """The parsed file, or raise ValueError saying what is wrong with it."""
    data = read_json(path)
    for cond in ("cache_hit", "cache_miss"):
        stats = data.get(cond, {}).get("stats") if isinstance(data.get(cond), dict) else None
        if not isinstance(stats, dict):
            raise ValueError(f"no {cond}.stats")
        missing = [k for k in REQUIRED_STATS if not isinstance(stats.get(k), (int, float))]
        if missing:
            raise ValueError(f"{cond}.stats lacks {', '.join(missing)}")
    return data


def read_json(path):
    """A JSON object from a file (or a .gz of one), or raise ValueError saying what is wrong."""
    try:
        with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at line {e.lineno})")
    except (OSError, EOFError) as e:             # EOFError, gzip.BadGzipFile (an OSError): a broken .gz
        raise ValueError(f"cannot be read ({getattr(e, 'strerror', None) or e})")
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def discover_results(results_dir=RESULTS_DIR):
    """{phase: {(A, B): data}} ordered numerically by (A, B), and [(path, why)] for skipped files."""
    phases, skipped = {}, []
    for path in sorted(glob.glob(os.path.join(results_dir, FILE_PATTERN)) +
                       glob.glob(os.path.join(results_dir, FILE_PATTERN + ".gz"))):
        m = FILE_RE.match(os.path.basename(path))
        if not m:
            skipped.append((path, "name is not results_phase<N>_a<A>_b<B>.json"))
            continue
        try:
            data = load_result(path)
        except ValueError as e:
            skipped.append((path, str(e)))
            continue
        phases.setdefault(m.group(1), {})[(int(m.group(2)), int(m.group(3)))] = data
    return {phase: dict(sorted(configs.items())) for phase, configs in sorted(phases.items())}, skipped


def by_model(configs):
    """{model: {(A, B): data}}: a fit only makes sense within one model."""
    groups = {}
    for key, data in configs.items():
        groups.setdefault(data.get("model"), {})[key] = data
    return groups


def conditions_present(configs):
    return [c for c in CONDITIONS if any(isinstance(d.get(c), dict) and "stats" in d[c] for d in configs.values())]


def error_bar(stats, prefix):
    """(below, above) the mean: the 95% CI where the file has one, else one stdev."""
    mean = stats[f"{prefix}_mean"]
    ci = stats.get(f"{prefix}_ci95")
    if isinstance(ci, list) and len(ci) == 2 and None not in ci:
        return max(mean - ci[0], 0.0), max(ci[1] - mean, 0.0)
    sd = stats.get(f"{prefix}_stdev") or 0.0
    return sd, sd


def audit_ok(data):
    return data.get("cache_audit", {}).get("ok", True) is not False


def unaudited(data):
    """A run whose cache state nobody checked (a server without --enable-prompt-tokens-details)."""
    return bool(data.get("cache_audit", {}).get("unaudited"))


def audit_word(data):
    if unaudited(data):
        return "UNAUDITED"
    return {True: "ok", False: "FAILED"}.get(data.get("cache_audit", {}).get("ok"), "-")


def bounded(ci):
    """An interval as numbers: a side stored as null (unbounded) as -inf / inf."""
    return [-np.inf if ci[0] is None else ci[0], np.inf if ci[1] is None else ci[1]]


def ci_text(ci, digits=1):
    """'[25.0, 35.0]'; an unbounded side (stored as null) as -inf / inf."""
    low, high = ci
    return (f"[{'-inf' if low is None else format(low, f'.{digits}f')}, "
            f"{'inf' if high is None else format(high, f'.{digits}f')}]")


def unstable(data):
    """The run's two halves disagreed beyond their intervals (files from before that check: no)."""
    return (data.get("reproducibility") or {}).get("stable") is False


def comparison_note(data):
    """'miss +5% vs hit / hit saves 30% [25, 35]' for the TTFT panel, where the file has them."""
    notes = []
    if isinstance(data.get("ttft_degradation_pct"), (int, float)):
        notes.append(f"miss {data['ttft_degradation_pct']:+.0f}% vs hit")
    if isinstance(data.get("ttft_saving_pct"), (int, float)):
        ci = data.get("ttft_saving_ci95")
        bounds = f" {ci_text(ci, 0)}" if isinstance(ci, list) and len(ci) == 2 else ""
        notes.append(f"hit saves {data['ttft_saving_pct']:.0f}%{bounds}")
    if unstable(data):
        notes.append("UNSTABLE: halves disagree")
    return "\n".join(notes)


def devices_label(environment):
    """'NVIDIA H200', or '2 x NVIDIA H200 (TP=2)' for an engine spread over several GPUs."""
    device = environment.get("device")
    sizes = parallel_sizes(environment)
    if device is None or gpus_used(environment) == 1:
        return device
    return f"{gpus_used(environment)} x {device} ({', '.join(f'{name}={n}' for name, n in sizes.items() if n > 1)})"


def describe_source(configs):
    """'model · device · vLLM x' from the files, where they say it (and all agree)."""
    parts = []
    for getter in (lambda d: d.get("model"),
                   lambda d: devices_label(d.get("environment", {})),
                   lambda d: d.get("environment", {}).get("vllm_version")):
        values = {getter(d) for d in configs.values()} - {None}
        if len(values) == 1:
            parts.append(values.pop())
    if len(parts) == 3:
        parts[2] = f"vLLM {parts[2]}"
    return " · ".join(os.path.basename(str(p).rstrip("/")) if i == 0 else str(p) for i, p in enumerate(parts))


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
        _, label, colour = CONDITIONS[cond]
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


def plot_phase(configs, phase_key, phase_label, outfile):
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


def summary_table(configs):
    """Markdown table of every config, for the console and READMEs."""
    conds = conditions_present(configs)
    head = ["config"] + [f"{CONDITIONS[c][0]} TTFT ms" for c in conds] + ["miss vs hit"]
    if "cache_cold" in conds:
        head += ["hit saves vs cold (95% CI)"]
    head += ["hit cached / prompt tokens", "audit"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (a, b), d in configs.items():
        cells = [f"A={a} / B={b}"]
        for c in conds:
            s = d.get(c, {}).get("stats", {})
            cells.append(f"{s['ttft_mean']:.2f} ± {s.get('ttft_stdev', 0):.2f}" if "ttft_mean" in s else "-")
        deg = d.get("ttft_degradation_pct")
        cells.append(f"{deg:+.1f}%" if isinstance(deg, (int, float)) else "-")
        if "cache_cold" in conds:
            sav, ci = d.get("ttft_saving_pct"), d.get("ttft_saving_ci95")
            cells.append((f"{sav:.1f}% {ci_text(ci)}" if isinstance(sav, (int, float)) and ci else "-")
                         + (" UNSTABLE" if unstable(d) else ""))
        hs = d["cache_hit"]["stats"]
        cached = hs.get("cached_tokens", "?")
        cells.append(f"{'-' if cached is None else cached} / {hs.get('prompt_tokens', '?')}")
        cells.append(audit_word(d))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def independent_means(data, condition):
    """One condition's TTFT per unit its run's interval treats as independent: engine processes
    where there are several, else time blocks; per trial where there are fewer than 2 of either."""
    trials = data[condition]["trials"]
    for unit in ("process", "block"):
        if all(unit in t for t in trials) and len({t[unit] for t in trials}) >= 2:
            return unit_means(trials, condition, unit)
    return unit_means(trials, condition, "trial")


def server_path_cost(phases):
    """{(A, B): {condition: (phase 1 ms, phase 2 ms, added ms, [95% CI])}} for every config
    that phase 1 (the server) and phase 2 (the offline engine) measured on the same model:
    what the HTTP and streaming path adds to TTFT. Welch's interval over the units each run's
    own interval treats as independent (processes, else time blocks), so each run's drift is in it."""
    from scipy import stats
    server, offline = phases.get("phase1", {}), phases.get("phase2", {})
    name = lambda d: os.path.basename(str(d.get("model")).rstrip("/"))
    costs = {}
    for ab in sorted(set(server) & set(offline)):
        d1, d2 = server[ab], offline[ab]
        devices = {d.get("environment", {}).get("device") for d in (d1, d2)} - {None, REMOTE_DEVICE}
        if name(d1) != name(d2) or len(devices) > 1:      # another model, or another machine
            continue
        costs[ab] = {}
        for c in CONDITIONS:
            if c in d1 and c in d2:
                x, y = independent_means(d1, c), independent_means(d2, c)
                ci = stats.ttest_ind(x, y, equal_var=False).confidence_interval()
                costs[ab][c] = (float(x.mean()), float(y.mean()), float(x.mean() - y.mean()), [float(ci.low), float(ci.high)])
    return costs


def server_path_table(costs):
    """Markdown: per config and condition, phase 2's TTFT, phase 1's, and what the server path adds."""
    conds = [c for c in CONDITIONS if any(c in row for row in costs.values())]
    rows = ["| config | " + " | ".join(f"{CONDITIONS[c][0]}: offline → server ms (added, 95% CI)" for c in conds) + " |",
            "|---|" + "---|" * len(conds)]
    for (a, b), row in costs.items():
        cells = [f"{row[c][1]:.2f} → {row[c][0]:.2f} ({row[c][2]:+.2f} {ci_text(row[c][3], 2)})" if c in row else "-"
                 for c in conds]
        rows.append(f"| A={a} / B={b} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_server_path(costs, title, outfile):
    """Grouped bars: the ms the server path adds to each condition's TTFT, per config, with 95% CIs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = [c for c in CONDITIONS if any(c in row for row in costs.values())]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.7 * len(costs)), 4.6))
    width = 0.8 / len(conds)
    for i, c in enumerate(conds):
        xs = [j + (i - (len(conds) - 1) / 2) * width for j, row in enumerate(costs.values()) if c in row]
        added = [row[c][2] for row in costs.values() if c in row]
        errs = [[max(row[c][2] - row[c][3][0], 0) for row in costs.values() if c in row],
                [max(row[c][3][1] - row[c][2], 0) for row in costs.values() if c in row]]
        bars = ax.bar(xs, added, width, yerr=errs, capsize=3, label=CONDITIONS[c][1], color=CONDITIONS[c][2])
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
REMOTE_DEVICE = "unknown (a server reached by --base-url)"       # phase1_experiment's word for it


def prefill_flops(shape, new_tokens, cached_tokens=0):
    """Forward FLOPs to prefill new_tokens behind cached_tokens already in the KV cache.

    2 per weight per new token (less the embedding, a lookup, and the LM head, which
    runs for the last token only: 2 x hidden x vocab once), plus attention: each new
    token's query meets every key before it, 2 x 2 x head_dim FLOPs (QK^T and AV) per
    key, per head, per layer."""
    weights = shape["num_parameters"] - shape["num_embedding_parameters"]
    keys = new_tokens * cached_tokens + new_tokens * (new_tokens + 1) / 2
    attention = 4 * shape["num_layers"] * shape["num_attention_heads"] * shape["head_dim"] * keys
    return 2 * weights * new_tokens + attention + 2 * shape["hidden_size"] * shape["vocab_size"]


def peak_tflops(device):
    return next((peak for name, peak in PEAK_TFLOPS if name in (device or "")), None)


def parallel_sizes(environment):
    """{'TP': n, 'PP': m} from the recorded engine flags (1 where a file does not say)."""
    engine = environment.get("engine_args") or {}
    return {"TP": engine.get("tensor_parallel_size") or 1, "PP": engine.get("pipeline_parallel_size") or 1}


def gpus_used(environment):
    """GPUs one engine runs on: tensor x pipeline parallel size."""
    return math.prod(parallel_sizes(environment).values())


def prefill_fit(configs):
    """Fit TTFT = overhead + work / rate over the configs' uncached requests (cold and miss
    means). work is the prefill's FLOPs where the files record the model's shape (attention
    makes long prompts cost more than their token count says), else its token count.
    None for fewer than 3 configs: too few lengths to tell overhead from rate."""
    points = []                                           # (prompt tokens, TTFT ms)
    for data in configs.values():
        for cond in ("cache_cold", "cache_miss"):
            stats = data.get(cond, {}).get("stats", {})
            if "ttft_mean" in stats and "prompt_tokens" in stats:
                points.append((stats["prompt_tokens"], stats["ttft_mean"]))
    if len(configs) < 3 or len({tokens for tokens, _ in points}) < 3:
        return None
    first = next(iter(configs.values())).get("environment", {})
    shape = first.get("model_shape") or {}
    if not (shape.get("num_parameters") and shape.get("num_embedding_parameters") is not None):
        shape = None
    ttft = np.array([t for _, t in points])
    work = np.array([prefill_flops(shape, n) if shape else n for n, _ in points], float)
    ms_per_work, overhead_ms = np.polyfit(work, ttft, 1)
    if not shape and overhead_ms < 0:
        # a line in tokens that needs a negative fixed cost: attention makes long prompts dearer
        # than their token count says, and without the model's shape the FLOPs are not known
        return None
    fit = {"points": len(points), "configs": len(configs), "shape": shape, "overhead_ms": overhead_ms,
           "ms_per_work": ms_per_work, "work": "FLOPs" if shape else "tokens",
           "r2": 1 - np.sum((ttft - overhead_ms - ms_per_work * work) ** 2) / np.sum((ttft - ttft.mean()) ** 2),
           "tflops": None, "mfu": None, "gpus": gpus_used(first), "peak_tflops": None}
    if peak_tflops(first.get("device")):                  # tensor/pipeline parallel: the peak of all GPUs used
        fit["peak_tflops"] = peak_tflops(first.get("device")) * fit["gpus"]
    if shape:
        fit["tflops"] = 1e3 / ms_per_work / 1e12
        fit["mfu"] = fit["tflops"] / fit["peak_tflops"] if fit["peak_tflops"] else None
        # on short prompts attention is negligible: 2 FLOPs per weight per token
        fit["prefill_tokens_per_s"] = fit["tflops"] * 1e12 / (2 * (shape["num_parameters"] - shape["num_embedding_parameters"]))
    else:
        fit["prefill_tokens_per_s"] = 1e3 / ms_per_work
    # what each config's hit saves, per 1k cached tokens (it grows with the context: attention)
    fit["saved_ms_per_1k_cached"] = [(d["cache_hit"]["stats"]["cached_tokens"], 1e3 * d["ttft_saving_ms"] / d["cache_hit"]["stats"]["cached_tokens"])
                                     for d in configs.values()
                                     if isinstance(d.get("ttft_saving_ms"), (int, float)) and d["cache_hit"]["stats"].get("cached_tokens")]
    return fit


def predicted_ttft_ms(fit, new_tokens, cached_tokens=0):
    work = prefill_flops(fit["shape"], new_tokens, cached_tokens) if fit["shape"] else new_tokens
    return fit["overhead_ms"] + fit["ms_per_work"] * work


def describe_fit(fit, device):
    """The fit in words, for the console."""
    text = (f"TTFT = {fit['overhead_ms']:.1f} ms + prefill {fit['work']} / rate, fitted to {fit['points']} cold/miss "
            f"means of {fit['configs']} configs (R^2 {fit['r2']:.3f}): prefill {fit['prefill_tokens_per_s']:,.0f} tokens/s")
    if fit["tflops"]:
        gpus = fit.get("gpus", 1)
        devices = f"the {device}'s" if gpus == 1 else f"{gpus} x {device}: together"
        text += (f" on short prompts, {fit['tflops']:.0f} TFLOP/s achieved" +
                 (f" = {100 * fit['mfu']:.0f}% MFU of {devices} {fit['peak_tflops']} dense bf16/fp16 TFLOP/s"
                  if fit["mfu"] else ""))
    if fit["saved_ms_per_1k_cached"]:
        text += "\na hit saves, per 1k cached tokens: " + ", ".join(
            f"{ms:.1f} ms at {cached:,}" for cached, ms in sorted(fit["saved_ms_per_1k_cached"]))
    return text


def plot_context(configs, fit, phase_label, outfile):
    """TTFT against prompt length for hit, miss and cold, with the fitted prefill line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.4))
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
        _, label, colour = CONDITIONS[cond]
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
                 for h in hits], "x", color=CONDITIONS["cache_hit"][2], markersize=9,
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


def compare_runs(run_dirs):
    """Markdown table: each config's saving in every run, and whether every pair of runs agrees;
    then where each run came from, so that a reader can see the runs are comparable."""
    runs = [discover_results(d)[0] for d in run_dirs]
    keys = sorted({(phase, ab) for r in runs for phase, configs in r.items() for ab in configs})
    rows = ["| config | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) +
            " | pairs that agree | across runs (95% CI over runs) |",
            "|---|" + "---|" * (len(runs) + 2)]
    agreed = total = 0
    several_phases = len({phase for phase, _ in keys}) > 1
    for phase, (a, b) in keys:
        found = [r.get(phase, {}).get((a, b)) for r in runs]
        cells = [f"{d['ttft_saving_pct']:.1f}% {ci_text(d['ttft_saving_ci95'])}"
                 + (" UNSTABLE" if unstable(d) else "") if d else "-" for d in found]
        present = [d for d in found if d]
        pairs = [agree(x["ttft_saving_pct"], bounded(x["ttft_saving_ci95"]), y["ttft_saving_pct"], bounded(y["ttft_saving_ci95"]))
                 for i, x in enumerate(present) for y in present[i + 1:]]
        agreed, total = agreed + sum(pairs), total + len(pairs)
        label = f"{phase.replace('phase', 'phase ')}: A={a} / B={b}" if several_phases else f"A={a} / B={b}"
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {sum(pairs)} of {len(pairs)} | "
                    f"{across_runs([d['ttft_saving_pct'] for d in present])} |")
    lines = ["\n".join(rows), f"{agreed} of {total} pairs of runs agree within their intervals.", ""]
    commands = set()
    for i, (run_dir, r) in enumerate(zip(run_dirs, runs)):
        first = next((d for configs in r.values() for d in configs.values()), {})
        origin = provenance(first)
        lines.append(f"run {i + 1}: {run_dir}: {origin['when']}, {origin['machine']}, {origin['tool']}")
        lines.append(f"    {origin['command']}")
        commands.add(re.sub(r" --results-dir \S+", "", origin["command"]))
    if len(commands) > 1:
        lines.append("note: the runs' commands differ (beyond --results-dir): compare with care")
    return "\n".join(lines)


LOAD_FIGURES = (("TTFT p50 ms", "ttft_ms", "p50"), ("TTFT p99 ms", "ttft_ms", "p99"),
                ("TTFT mean ms", "ttft_ms", "mean"), ("requests/s", None, "request_throughput"),
                ("hit rate", "hit_rate", "requests"))


def level_key(level, working_set):
    """A load level's name in a comparison: its load, or P in a working-set sweep."""
    if working_set:
        return f"P={level['num_prefixes']}"
    value, _ = load_value(level)
    return f"{value:g}"


def load_figure(stats, group, key):
    """(value, 95% interval) of one figure of a condition's stats, or None."""
    holder = stats.get(group) if group else stats
    if not holder or holder.get(key) is None:
        return None
    return holder[key], holder.get(f"{key}_ci95") or [None, None]


def compare_load_runs(run_dirs):
    """Markdown table: the load files that several runs share, each figure per level and
    condition in every run, and whether every pair of runs agrees within its intervals. A level
    is paired by what it is (the load, or P in a working-set sweep), so a rerun of one level
    compares with that level of a sweep; a figure that only one run measured is left out."""
    runs = [{os.path.basename(p).removesuffix(".gz"): d for p, d in discover_load_results(d)[0]} for d in run_dirs]
    names = sorted({name for r in runs for name in r})
    if not names:
        return None
    rows = ["| file | load | condition | figure | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) +
            " | pairs that agree |", "|---|---|---|---|" + "---|" * (len(runs) + 1)]
    agreed = total = 0
    for name in names:
        found = [r.get(name) for r in runs]
        working_set = next(d for d in found if d).get("experiment") == "working_set"
        keyed = [{level_key(lv, working_set): lv for lv in d["levels"]} if d else {} for d in found]
        values = list(dict.fromkeys(key for levels in keyed for key in levels))
        for value in sorted(values, key=lambda v: float(v.removeprefix("P="))):
            for c in ("cached", "cold"):
                for label, group, key in LOAD_FIGURES:
                    figures = [load_figure(levels[value][c], group, key)
                               if value in levels and levels[value].get(c) else None for levels in keyed]
                    present = [f for f in figures if f]
                    if len(present) < min(2, len(runs)):
                        continue
                    pairs = [agree(x[0], bounded(x[1]), y[0], bounded(y[1]))
                             for i, x in enumerate(present) for y in present[i + 1:]]
                    agreed, total = agreed + sum(pairs), total + len(pairs)
                    cells = [with_ci(f[0], f[1], 2 if key == "request_throughput" else 1) if f else "-" for f in figures]
                    rows.append(f"| {name} | {value} | {c} | {label} | " + " | ".join(cells) +
                                f" | {sum(pairs)} of {len(pairs)} |")
    if not total and len(runs) > 1:
        return None
    # a blank line, so that markdown does not take the sentence for a row of the table
    return "\n".join(rows) + f"\n\n{agreed} of {total} pairs of runs agree within their intervals."


def across_runs(savings):
    """The runs' mean saving with a Student's t interval over runs: each process one value, as
    pyperf takes it. It holds what differs between processes, which one run cannot see."""
    if len(savings) < 2:
        return "-"
    low, high = mean_ci95(savings)
    return f"{np.mean(savings):.1f}% [{low:.1f}, {high:.1f}] (n={len(savings)})"


@functools.lru_cache(maxsize=None)
def script_commits(sha256, path="phase2_experiment.py"):
    """The commits of this repository whose script at path has this sha256, newest first
    (the last is the commit that made the file so): a result's script hash names the code that
    made it, also where its git_commit could not."""
    here = os.path.dirname(os.path.abspath(__file__))
    git = lambda *args: subprocess.run(["git", "-C", here, *args], capture_output=True, timeout=30)
    try:
        log = git("log", "--format=%h", "--", path)
        found = []
        for commit in log.stdout.decode().split():
            blob = git("show", f"{commit}:{path}")
            if blob.returncode == 0 and hashlib.sha256(blob.stdout).hexdigest() == sha256:
                found.append(commit)
        return tuple(found)
    except (OSError, subprocess.SubprocessError):
        return ()


def provenance(data):
    """Where one result came from, as short text: the command, the tool's version, machine, time."""
    env = data.get("environment", {})
    version = env.get("tool_version") or {}
    sha = version.get("script_sha256")
    script = SCRIPTS.get(data.get("phase"), "phase2_experiment.py")
    if sha:
        commits = script_commits(sha, script)
        tool = (f"{script} as of commit {commits[-1]}" if commits else
                f"{script} sha256 {sha[:12]} (no commit here has it)")
    else:
        tool = "tool version not recorded (file made before provenance was recorded)"
    machine = devices_label(env) or "device not recorded"
    engines = len((env.get("fleet") or {}).get("kv_capacity_tokens_per_engine") or {})
    if engines > 1:
        machine = f"{engines} engines, each on {machine}"
    return {"command": env.get("command") or "command not recorded",
            "tool": tool,
            # a server reached by --base-url has no torch version the client can know
            "machine": f"{machine}, vLLM {env.get('vllm_version') or '?'}, torch {env.get('torch_version') or '?'}",
            "when": data.get("timestamp") or "time not recorded"}


def interval_note(configs):
    """One line on what the intervals of these files are taken over."""
    intervals = [d.get("interval") for d in configs.values()]
    if not all(intervals):
        return "95% intervals: paired over rounds (files made before intervals were taken over time blocks)."
    if len({m["unit"] for m in intervals}) != 1:
        return "95% intervals: taken over different units in different files (see each file's interval.unit)."
    m = intervals[0]
    if m["unit"] == "process":
        return (f"95% intervals: {m['statistic']}; {m['processes']} processes of {m['num_blocks'] // m['processes']} "
                f"time blocks, configs {', '.join(m['interleaved_configs'])} interleaved.")
    if m["unit"] == "block":
        return (f"95% intervals: {m['statistic']}; {m['num_blocks']} blocks of {m['rounds_per_block']:g} rounds "
                f"over about {max(i['span_s'] for i in intervals):.0f} s, configs {', '.join(m['interleaved_configs'])} interleaved.")
    return f"95% intervals: {m['statistic']}."


README_HEAD = "Generated by `plot_results.py --write-readme` from the JSON files here; do not edit by hand."


def results_readme(title, phases, folder=".", loads=()):
    """README.md text for a results folder, made from its JSONs (and the charts found beside them)."""
    lines = [f"# {title}", "", README_HEAD, ""]
    for name, fronts in fleet_groups(loads).items():
        lines += [f"## {name}: one workload through each front", "", fleet_table(fronts), ""]
        if os.path.exists(os.path.join(folder, f"{name}.png")):
            lines += [f"![{name}.png]({name}.png)", ""]
    for path, data in loads:
        stem = os.path.basename(path).rsplit(".json", 1)[0].replace("results_", "")
        origin = provenance(data)
        table = load_file_tables(data)
        lines += [f"## {stem}", "", load_title(data), "", f"- command: `{origin['command']}`",
                  f"- code: {origin['tool']}", f"- machine: {origin['machine']}", f"- finished: {origin['when']}"]
        lines += [f"- corrected after the run: {fix['keys']}: {fix['why']}" for fix in data.get("corrections", [])]
        lines += ["", table, ""]
        if not data.get("complete", True):
            lines += [f"**Incomplete:** {data.get('failure')}", ""]
        if os.path.exists(os.path.join(folder, f"{stem}.png")):
            lines += [f"![{stem}.png]({stem}.png)", ""]
    for phase, configs in phases.items():
        commands = sorted({provenance(d)["command"] for d in configs.values()})
        origin = provenance(next(iter(configs.values())))
        lines += [f"- command: `{'`, `'.join(commands)}`", f"- code: {origin['tool']}",
                  f"- machine: {origin['machine']}", f"- finished: {origin['when']}", "",
                  summary_table(configs), "", interval_note(configs), ""]
        for model, group in by_model(configs).items():
            fit = prefill_fit(group)
            if fit:
                device = next(iter(group.values())).get("environment", {}).get("device")
                lines += ["```", f"{os.path.basename(str(model).rstrip('/'))}: {describe_fit(fit, device)}", "```", ""]
        charts = (f"experiment1_all_configs_{phase}.png", f"ttft_vs_context_{phase}.png")
        lines += [f"![{c}]({c})" for c in charts if os.path.exists(os.path.join(folder, c))] + [""]
    costs = server_path_cost(phases)
    if costs:
        lines += ["## What the server path adds", "",
                  "Phase 1 (streamed through `vllm serve`, timed in the client) against phase 2 (the offline engine), "
                  "same model and configs:", "", server_path_table(costs), ""]
        if os.path.exists(os.path.join(folder, SERVER_PATH_CHART)):
            lines += [f"![{SERVER_PATH_CHART}]({SERVER_PATH_CHART})", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def reruns_readme(title, comparison):
    """README.md text for a folder of reruns: compare_runs' text."""
    return "\n".join([f"# {title}", "", README_HEAD, "",
                      "Runs of the same command, compared (`plot_results.py --compare`):", "", "```",
                      comparison, "```"]) + "\n"


# -----------------------------------------------------------------------------
# under load: phase 1's --concurrency / --request-rate sweeps and working-set sweeps

LOAD_PATTERNS = ("results_load_*.json", "results_workingset_*.json", "results_fleet_*.json")
FLEET_RE = re.compile(r"^results_fleet_(.+)_a(\d+)_(p[\d-]+)_(concurrency|rate)\.json(\.gz)?$")
FRONT_COLOURS = ("#2a9d8f", "#e76f51", "#264653", "#e9c46a", "#8d99ae", "#f4a261", "#6d597a")
LOAD_COLOURS = {"cached": "#2a9d8f", "cold": "#8d99ae"}


def discover_load_results(results_dir=RESULTS_DIR):
    """[(path, data)] of the load and working-set files, and [(path, why)] for skipped ones."""
    found, skipped = [], []
    for path in sorted(p for pattern in LOAD_PATTERNS for suffix in ("", ".gz")
                       for p in glob.glob(os.path.join(results_dir, pattern + suffix))):
        try:
            data = read_json(path)
        except ValueError as e:
            skipped.append((path, str(e)))
            continue
        if data.get("experiment") not in ("load", "working_set") or not data.get("levels"):
            skipped.append((path, "no load levels in it"))
            continue
        found.append((path, data))
    return found, skipped


def load_value(level):
    """The level's load and its axis label."""
    if level.get("concurrency") is not None:
        return level["concurrency"], "concurrency (clients sending back to back)"
    return level["request_rate"], "request rate (requests/s, Poisson)"


def number(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def with_ci(value, ci, digits=1):
    if value is None:
        return "-"
    return f"{value:.{digits}f} {ci_text(ci, digits)}" if ci and ci != [None, None] else f"{value:.{digits}f}"


def cell(stats, group, key, digits=1):
    """One figure of a condition's stats with its 95% interval, as table text."""
    found = load_figure(stats, group, key)
    return with_ci(found[0], found[1], digits) if found else "-"


def hit_rate_text(stats):
    rate = stats.get("hit_rate")
    if not rate:
        return "-"
    text = f"{rate['requests']:.0%}"
    ci = rate.get("requests_ci95")
    if ci and None not in ci:
        text += f" [{max(ci[0], 0):.0%}, {min(ci[1], 1):.0%}]"
    return text + (f" / {rate['tokens']:.0%}" if rate.get("tokens") is not None else "")


def load_table(data):
    """Markdown: per load level and condition, TTFT percentiles and mean with their 95%
    intervals, throughput, and the hit rate the requests found."""
    rows = ["| load | condition | TTFT p50 ms | TTFT p99 ms | TTFT mean ms | requests/s | output tokens/s | "
            "hit rate (requests / tokens) | failed |", "|---|---|---|---|---|---|---|---|---|"]
    for level in data["levels"]:
        value, _ = load_value(level)
        for c in ("cached", "cold"):
            s = level.get(c)
            if not s:
                continue
            rows.append(f"| {value:g} | {c} | {cell(s, 'ttft_ms', 'p50')} | {cell(s, 'ttft_ms', 'p99')} | "
                        f"{cell(s, 'ttft_ms', 'mean')} | {cell(s, None, 'request_throughput', 2)} | "
                        f"{number(s.get('output_throughput_tok_s'), 0)} | {hit_rate_text(s)} | {s.get('failed', 0)} |")
    return "\n".join(rows) + interval_line(data)


def load_headline_table(data):
    """Markdown, one row per load level: the cached and the cold condition side by side (TTFT
    p50 and p99, requests/s), each figure with its 95% interval."""
    rows = ["| load | cached TTFT p50 ms | cached p99 ms | cold TTFT p50 ms | cold p99 ms | cached requests/s | "
            "cold requests/s |", "|---|---|---|---|---|---|---|"]
    for level in data["levels"]:
        cached, cold = level.get("cached") or {}, level.get("cold") or {}
        rows.append(f"| {load_value(level)[0]:g} | {cell(cached, 'ttft_ms', 'p50')} | {cell(cached, 'ttft_ms', 'p99')} | "
                    f"{cell(cold, 'ttft_ms', 'p50')} | {cell(cold, 'ttft_ms', 'p99')} | "
                    f"{cell(cached, None, 'request_throughput', 2)} | {cell(cold, None, 'request_throughput', 2)} |")
    return "\n".join(rows)


def load_file_tables(data):
    """The tables of one load file: a working-set sweep's, or a load sweep's and where its TTFT went."""
    if data["experiment"] == "working_set":
        return working_set_table(data)
    times = server_time_table(data)
    return load_table(data) + (f"\n\nWhere the TTFT went:\n\n{times}" if times else "")


def with_spread(value, per_pass, digits=1):
    """A mean with the range of the passes' own values: "12.3 (11.9-12.8)"."""
    values = [v for v in per_pass or [] if v is not None]
    if value is None or len(values) < 2:
        return number(value, digits)
    return f"{number(value, digits)} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def percent_with_spread(value, per_pass):
    """A share as a percentage with the range of the passes' own values: "45% (41-48%)"."""
    values = [v for v in per_pass or [] if v is not None]
    if value is None:
        return "-"
    return f"{value:.0%}" + (f" ({min(values) * 100:.0f}-{max(values):.0%})" if len(values) >= 2 else "")


def server_time_table(data):
    """Markdown: per level and condition, the client's mean TTFT beside the server's own means
    (its TTFT, the engine's queue and prefill time) from its histograms; None for files without them."""
    rows = []
    for level in data["levels"]:
        value = level_key(level, data["experiment"] == "working_set")
        for c in ("cached", "cold"):
            s = level.get(c)
            server = (s or {}).get("server") or {}
            if not s or server.get("server_ttft_mean_ms") is None:
                continue
            cells = [with_spread(server.get(key), server.get(f"{key}_per_pass"))
                     for key in ("server_ttft_mean_ms", "queue_time_mean_ms", "prefill_time_mean_ms")]
            cells += [percent_with_spread(s.get("client_cpu_busy"), s.get("client_cpu_busy_per_pass")),
                      percent_with_spread(server.get("api_server_cpu_busy_max"), server.get("api_server_cpu_busy_max_per_pass"))]
            rows.append(f"| {value} | {c} | {number((s.get('ttft_ms') or {}).get('mean'))} | " + " | ".join(cells) + " |")
    if not rows:
        return None
    return "\n".join(["| load | condition | TTFT mean ms (client) | server's TTFT mean ms | engine queue mean ms | "
                      "engine prefill mean ms | client CPU busy | API server CPU busy |", "|---|---|---|---|---|---|---|---|",
                      *rows]) + (
        "\n\nThe server's means come from its histograms (`vllm:time_to_first_token_seconds`, "
        "`vllm:request_queue_time_seconds`, `vllm:request_prefill_time_seconds`) over each condition's requests "
        "of every pass, the counters' short flush request included; in parentheses, the range of the passes' "
        "means. The client's TTFT minus the server's is what lies outside the server's clock: the HTTP path, and "
        "the API server's work before it starts that clock and after it stops it. The server's minus queue and "
        "prefill is the hand-over to the engine and back. CPU busy: CPU time over the requests' wall time, as "
        "a share of one core, of this client's process and of the API server process (the busiest one's; "
        "`process_cpu_seconds_total` on its /metrics); near 100%, requests wait for that process.")


def interval_words(data):
    """What the intervals of a load file are, in its own words."""
    kinds = sorted({lv[c]["interval"] for lv in data["levels"] for c in ("cached", "cold") if lv.get(c, {}).get("interval")})
    return "; ".join(kinds) or "as the file records them"


def interval_line(data):
    return f"\n\n95% intervals: {interval_words(data)}."


def working_set_table(data):
    """Markdown: per number of documents, the working set against the KV cache, the hit rate
    found and the cached requests' TTFT."""
    capacity = data.get("kv_capacity_tokens")
    rows = ["| documents | working set (tokens) | of the KV cache | hit rate (requests / tokens) | TTFT p50 ms | "
            "TTFT p99 ms | TTFT mean ms |", "|---|---|---|---|---|---|---|"]
    for level in data["levels"]:
        s = level.get("cached")
        if not s:
            continue
        t = s.get("ttft_ms") or {}
        share = f"{level['working_set_tokens'] / capacity:.0%}" if capacity else "-"
        rows.append(f"| {level['num_prefixes']} | {level['working_set_tokens']} | {share} | {hit_rate_text(s)} | "
                    f"{with_ci(t.get('p50'), t.get('p50_ci95'))} | {with_ci(t.get('p99'), t.get('p99_ci95'))} | "
                    f"{with_ci(t.get('mean'), t.get('mean_ci95'))} |")
    rows[-1] += interval_line(data)
    cold = data["levels"][0].get("cold")
    if cold and cold.get("ttft_ms"):
        rows.append(f"\nCold (every request salted, nothing cached): TTFT p50 "
                    f"{with_ci(cold['ttft_ms']['p50'], cold['ttft_ms']['p50_ci95'])} ms, "
                    f"p99 {with_ci(cold['ttft_ms']['p99'], cold['ttft_ms']['p99_ci95'])} ms.")
    return "\n".join(rows)


def hit_rate_series(levels, key="requests"):
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


def load_title(data):
    cfg = data["config"]
    model = os.path.basename(str(data.get("model")).rstrip("/"))
    device = data.get("environment", {}).get("device") or "unknown device"
    return (f"{model} on {device}: {cfg['num_prefixes'][0] if data['experiment'] == 'load' else 'P'} document(s) of "
            f"{cfg['document_tokens']} tokens, fresh {cfg['query_tokens']}-token query, {cfg['max_output_tokens']} "
            f"output tokens{'' if audit_ok(data) else '  (CACHE AUDIT FAILED)'}")


def label_load_axes(xlabel, axes, legend_title=None):
    """Load on a log2 x axis; each (axis, y label, title) labelled, gridded, with its legend."""
    for ax, ylabel, title in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(title=legend_title)


def plot_load(data, outfile):
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


def plot_working_set(data, outfile):
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


def fleet_groups(loads):
    """{sweep name: [(front, data)]}: the fleet files of one workload, one per front."""
    groups = {}
    for path, data in loads:
        m = FLEET_RE.match(os.path.basename(path))
        if m:
            groups.setdefault(f"fleet_a{m.group(2)}_{m.group(3)}_{m.group(4)}", []).append((data.get("front") or m.group(1),
                                                                                           data))
    return groups


def replica_split(stats):
    """'12 / 13': the requests each replica (engine) counted, from its own /metrics."""
    replicas = (stats.get("server") or {}).get("replicas") or {}
    return " / ".join(f"{v['requests']:.0f}" for _, v in sorted(replicas.items())) or "-"


def fleet_table(fronts, load=None):
    """Markdown: per front and load level (or only at `load`), the cached condition's hit rate,
    TTFT, throughput and how the requests spread over the replicas."""
    rows = ["| front | load | hit rate (requests / tokens) | TTFT p50 ms | TTFT p99 ms | requests/s | "
            "requests per replica |", "|---|---|---|---|---|---|---|"]
    for front, data in fronts:
        for level in data["levels"]:
            s = level.get("cached")
            if not s or load is not None and load_value(level)[0] != load:
                continue
            rows.append(f"| {front} | {load_value(level)[0]:g} | {hit_rate_text(s)} | {cell(s, 'ttft_ms', 'p50')} | "
                        f"{cell(s, 'ttft_ms', 'p99')} | {cell(s, None, 'request_throughput', 2)} | {replica_split(s)} |")
    return "\n".join(rows) + interval_line(fronts[0][1])


def plot_fleet(fronts, outfile):
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


def load_outputs(path, data, out_dir):
    """Chart and table of one load or working-set file: (chart path, Markdown heading and table)."""
    stem = os.path.basename(path).rsplit(".json", 1)[0].replace("results_", "")
    chart = os.path.join(out_dir, f"{stem}.png")
    (plot_working_set if data["experiment"] == "working_set" else plot_load)(data, chart)
    table = load_file_tables(data)
    note = "" if data.get("complete", True) else f"\n\n**Incomplete:** {data.get('failure')}"
    return chart, f"## {stem}: {load_title(data)}\n\n{table}{note}"


def check_out_dir(path):
    if os.path.exists(path) and not os.path.isdir(path):
        raise OSError(f"--out-dir {path!r} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise OSError(f"--out-dir {path!r} cannot be written: {e.strerror or e}")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", default=RESULTS_DIR)
    parser.add_argument("--out-dir", default=None, help="where the PNGs go (default: the results dir)")
    parser.add_argument("--compare", nargs="+", metavar="DIR",
                        help="instead of charts: the hit-vs-cold saving of the same configs in several runs' "
                             "folders, whether each pair of runs agrees within their intervals, and where "
                             "each run came from")
    parser.add_argument("--write-readme", action="store_true",
                        help="also write README.md (command, machine, versions, table) into the results dir, "
                             "or with --compare into the folders' common parent")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.compare:
        missing = [d for d in args.compare if not os.path.isdir(d)]
        if missing:
            print(f"plot_results.py: error: no such folder: {', '.join(missing)}", file=sys.stderr)
            return 1
        comparison = "\n\n".join(part for part in (compare_runs(args.compare) if any(
            discover_results(d)[0] for d in args.compare) else None, compare_load_runs(args.compare)) if part)
        if not comparison:
            print(f"plot_results.py: error: no results to compare in {', '.join(args.compare)}", file=sys.stderr)
            return 1
        print(comparison)
        if args.write_readme:
            parent = os.path.commonpath([os.path.abspath(d) for d in args.compare])
            write_readme(os.path.join(parent, "README.md"),
                         reruns_readme(f"Reruns: {os.path.basename(parent)}", comparison))
        return 0
    out_dir = args.out_dir or args.results_dir

    if not os.path.isdir(args.results_dir):
        print(f"plot_results.py: error: results dir {args.results_dir!r} does not exist", file=sys.stderr)
        return 1
    phases, skipped = discover_results(args.results_dir)
    loads, skipped_loads = discover_load_results(args.results_dir)
    for path, why in skipped + skipped_loads:
        print(f"skipped {path}: {why}", file=sys.stderr)
    if not phases and not loads:
        print(f"plot_results.py: error: no usable {FILE_PATTERN} (or {', '.join(LOAD_PATTERNS)}) in "
              f"{args.results_dir!r}", file=sys.stderr)
        return 1
    try:
        check_out_dir(out_dir)
    except OSError as e:
        print(f"plot_results.py: error: {e}", file=sys.stderr)
        return 1
    for phase, configs in phases.items():
        labels = {d.get("phase") for d in configs.values()} - {None}
        label = labels.pop() if len(labels) == 1 else phase
        outfile = os.path.join(out_dir, f"experiment1_all_configs_{phase}.png")
        plot_phase(configs, phase, label, outfile)
        print(f"\n## {label} ({len(configs)} configs)\n\n{summary_table(configs)}\n\nwrote {outfile}")
        models = by_model(configs)
        for model, group in models.items():
            fit = prefill_fit(group)
            if fit:
                device = next(iter(group.values())).get("environment", {}).get("device")
                print(f"\n{os.path.basename(str(model).rstrip('/'))}: {describe_fit(fit, device)}")
            if fit and len(models) == 1:
                context_file = os.path.join(out_dir, f"ttft_vs_context_{phase}.png")
                plot_context(group, fit, label, context_file)
                print(f"wrote {context_file}")
    for path, data in loads:
        chart, text = load_outputs(path, data, out_dir)
        print(f"\n{text}\n\nwrote {chart}")
    for name, fronts in fleet_groups(loads).items():
        chart = os.path.join(out_dir, f"{name}.png")
        plot_fleet(fronts, chart)
        print(f"\n## {name}: one workload through each front\n\n{fleet_table(fronts)}\n\nwrote {chart}")
    costs = server_path_cost(phases)
    if costs:
        chart = os.path.join(out_dir, SERVER_PATH_CHART)
        plot_server_path(costs, "What the server path adds to TTFT", chart)
        print(f"\n## phase 1 (server) against phase 2 (offline): what the HTTP and streaming path adds\n\n"
              f"{server_path_table(costs)}\n\nwrote {chart}")
    if args.write_readme:
        write_readme(os.path.join(args.results_dir, "README.md"),
                     results_readme(f"Results: {os.path.basename(os.path.abspath(args.results_dir))}", phases,
                                    folder=args.results_dir, loads=loads))
    return 0


def write_readme(path, text):
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
