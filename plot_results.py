"""Chart the results of phase2_experiment.py: cache hit vs miss (vs cold) per (A, B) config.

    python plot_results.py                       # results/ -> results/experiment1_all_configs_phase2.png
    python plot_results.py --results-dir results/h100-vllm0.26

Reads every results_phase<N>_a<A>_b<B>.json in --results-dir (not its subfolders),
draws one PNG per phase (TTFT and throughput panels, plus a warmup panel when the
files carry per-condition warmup stats) and prints a Markdown summary table.
A file that is not JSON or lacks what a panel needs is skipped with one line.
"""
import argparse
import glob
import json
import os
import re
import sys
import tempfile

RESULTS_DIR = "results"
FILE_PATTERN = "results_phase*_a*_b*.json"
FILE_RE = re.compile(r"^results_(phase\d+)_a(\d+)_b(\d+)\.json$")
# condition key -> (legend label, colour)
CONDITIONS = {
    "cache_hit": ("hit [A, B, Q], A+B cached", "#2a9d8f"),
    "cache_miss": ("miss [B, Q], nothing cached", "#e76f51"),
    "cache_cold": ("cold [A, B, Q], nothing cached", "#8d99ae"),
}
REQUIRED_STATS = ("ttft_mean", "throughput_mean")


def load_result(path):
    """The parsed file, or raise ValueError saying what is wrong with it."""
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at line {e.lineno})")
    except OSError as e:
        raise ValueError(f"cannot be read ({e.strerror})")
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    for cond in ("cache_hit", "cache_miss"):
        stats = data.get(cond, {}).get("stats") if isinstance(data.get(cond), dict) else None
        if not isinstance(stats, dict):
            raise ValueError(f"no {cond}.stats")
        missing = [k for k in REQUIRED_STATS if not isinstance(stats.get(k), (int, float))]
        if missing:
            raise ValueError(f"{cond}.stats lacks {', '.join(missing)}")
    return data


def discover_results(results_dir=RESULTS_DIR):
    """{phase: {(A, B): data}} ordered numerically by (A, B), and [(path, why)] for skipped files."""
    phases, skipped = {}, []
    for path in sorted(glob.glob(os.path.join(results_dir, FILE_PATTERN))):
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


def conditions_present(configs):
    return [c for c in CONDITIONS if any(isinstance(d.get(c), dict) and "stats" in d[c] for d in configs.values())]


def error_bar(stats, prefix):
    """(below, above) the mean: the 95% CI where the file has one, else one stdev."""
    mean = stats[f"{prefix}_mean"]
    ci = stats.get(f"{prefix}_ci95")
    if isinstance(ci, list) and len(ci) == 2:
        return max(mean - ci[0], 0.0), max(ci[1] - mean, 0.0)
    sd = stats.get(f"{prefix}_stdev") or 0.0
    return sd, sd


def audit_ok(data):
    return data.get("cache_audit", {}).get("ok", True) is not False


def describe_source(configs):
    """'model · device · vLLM x' from the files, where they say it (and all agree)."""
    parts = []
    for getter in (lambda d: d.get("model"),
                   lambda d: d.get("environment", {}).get("device"),
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
            if not stats or f"{stat_prefix}_mean" not in stats:
                continue
            lo, hi = error_bar(stats, stat_prefix)
            used_ci |= isinstance(stats.get(f"{stat_prefix}_ci95"), list)
            xs.append(j + (i - (len(conds) - 1) / 2) * width)
            heights.append(stats[f"{stat_prefix}_mean"])
            errs[0].append(lo)
            errs[1].append(hi)
            tops[j] = max(tops[j], stats[f"{stat_prefix}_mean"] + hi)
            drawn.append(data)
        label, colour = CONDITIONS[cond]
        bars = ax.bar(xs, heights, width, yerr=errs, capsize=3, label=label, color=colour)
        for bar, data in zip(bars, drawn):
            if not audit_ok(data):
                bar.set_hatch("//")
                bar.set_edgecolor("red")
        ax.bar_label(bars, fmt=fmt, label_type="center", fontsize=7, color="white", fontweight="bold")
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels([f"A={a} / B={b}" + ("" if audit_ok(d) else "\nAUDIT FAILED")
                        for (a, b), d in configs.items()], fontsize=8)
    for label, data in zip(ax.get_xticklabels(), configs.values()):
        if not audit_ok(data):
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
    has_warmup = any("warmup_time_mean" in d.get(c, {}).get("stats", {}) for d in configs.values() for c in conds)
    panels = (["warmup"] if has_warmup else []) + ["ttft", "throughput"]
    panel_width = max(4.5, 1.7 * len(configs))        # room for "A=1024 / B=256" under each group
    fig, axes = plt.subplots(1, len(panels), figsize=(panel_width * len(panels), 5.4), squeeze=False)
    axes = dict(zip(panels, axes[0]))

    if has_warmup:
        ax = axes["warmup"]
        _bars(ax, configs, conds, "warmup_time", "%.1f")
        ax.set_ylabel("warmup time (ms)")
        ax.set_title("Warmup")

    ax = axes["ttft"]
    tops = _bars(ax, configs, conds, "ttft", "%.1f")
    ax.set_ylabel("time to first token (ms), mean")
    ax.set_title("TTFT (lower is better)")
    for j, data in enumerate(configs.values()):
        notes = []
        if isinstance(data.get("ttft_degradation_pct"), (int, float)):
            notes.append(f"miss {data['ttft_degradation_pct']:+.0f}% vs hit")
        if isinstance(data.get("ttft_saving_pct"), (int, float)):
            ci = data.get("ttft_saving_ci95")
            ci_text = f" [{ci[0]:.0f}, {ci[1]:.0f}]" if isinstance(ci, list) and len(ci) == 2 else ""
            notes.append(f"hit saves {data['ttft_saving_pct']:.0f}%{ci_text}")
        if notes:
            ax.annotate("\n".join(notes), (j, tops[j]), xytext=(0, 14), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, max(tops) * 1.35 if max(tops) > 0 else 1)

    ax = axes["throughput"]
    tops = _bars(ax, configs, conds, "throughput", "%.0f")
    ax.set_ylabel("generation throughput (tokens/s), mean")
    ax.set_title("Throughput (higher is better)")
    ax.set_ylim(0, max(tops) * 1.2 if max(tops) > 0 else 1)

    handles, labels = axes["ttft"].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(conds), fontsize=8, frameon=False)
    source = describe_source(configs)
    fig.suptitle(f"Prefix caching: {phase_label}" + (f"\n{source}" if source else ""), fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(outfile, dpi=130)
    return fig


def summary_table(configs):
    """Markdown table of every config, for the console and READMEs."""
    conds = conditions_present(configs)
    head = ["config"] + [f"{c.split('_')[1]} TTFT ms" for c in conds] + ["miss vs hit"]
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
            cells.append(f"{sav:.1f}% [{ci[0]:.1f}, {ci[1]:.1f}]" if isinstance(sav, (int, float)) and ci else "-")
        hs = d["cache_hit"]["stats"]
        cells.append(f"{hs.get('cached_tokens', '?')} / {hs.get('prompt_tokens', '?')}")
        cells.append({True: "ok", False: "FAILED"}.get(d.get("cache_audit", {}).get("ok"), "-"))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def check_out_dir(path):
    if os.path.exists(path) and not os.path.isdir(path):
        raise OSError(f"--out-dir {path!r} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise OSError(f"--out-dir {path!r} cannot be written: {e.strerror or e}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", default=RESULTS_DIR)
    parser.add_argument("--out-dir", default=None, help="where the PNGs go (default: the results dir)")
    args = parser.parse_args(argv)
    out_dir = args.out_dir or args.results_dir

    if not os.path.isdir(args.results_dir):
        print(f"plot_results.py: error: results dir {args.results_dir!r} does not exist", file=sys.stderr)
        return 1
    phases, skipped = discover_results(args.results_dir)
    for path, why in skipped:
        print(f"skipped {path}: {why}", file=sys.stderr)
    if not phases:
        print(f"plot_results.py: error: no usable {FILE_PATTERN} in {args.results_dir!r}", file=sys.stderr)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
