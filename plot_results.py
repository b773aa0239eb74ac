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

Trace replays (results_trace_*.json) get a chart of each arm's TTFT CDF and the hit share over
the window, and capacity curves (results_capacity_*.json) a chart of the reusable share
against capacity with the same trace's replays on it, each with a Markdown table.
"""
import argparse
import os
import sys

from prefix_cache_bench.charts import (SERVER_PATH_CHART, load_outputs, plot_anatomy, plot_context, plot_fleet, plot_phase,
                                       plot_server_path)
from prefix_cache_bench.defaults import RESULTS_DIR
from prefix_cache_bench.load_tables import compare_load_runs, fleet_groups, fleet_table
from prefix_cache_bench.prefill_fit import describe_fit, prefill_fit
from prefix_cache_bench.readmes import reruns_readme, results_readme, write_readme
from prefix_cache_bench.results import (FILE_PATTERN, LOAD_PATTERNS, TRACE_PATTERNS, check_out_dir, discover_load_results,
                                        discover_results, discover_trace_results, folders_with_results_hint)
from prefix_cache_bench.trace_charts import trace_outputs
from prefix_cache_bench.tables import (anatomy_table, by_model, compare_runs, server_path_cost, server_path_table,
                                       summary_table, tier_table)


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
    replays, curves, skipped_traces = discover_trace_results(args.results_dir)
    for path, why in skipped + skipped_loads + skipped_traces:
        print(f"skipped {path}: {why}", file=sys.stderr)
    if not phases and not loads and not replays and not curves:
        print(f"plot_results.py: error: no usable {FILE_PATTERN} (or {', '.join(LOAD_PATTERNS + TRACE_PATTERNS)}) in "
              f"{args.results_dir!r}{folders_with_results_hint(args.results_dir)}", file=sys.stderr)
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
        tiers = tier_table(configs)
        if tiers:
            print(f"\na hit from the second tier:\n\n{tiers}")
        anatomy_file = os.path.join(out_dir, f"ttft_anatomy_{phase}.png")
        if plot_anatomy(configs, label, anatomy_file):
            print(f"\nwhere the TTFT goes (ms, means):\n\n{anatomy_table(configs)}\n\nwrote {anatomy_file}")
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
    for text, chart in trace_outputs(replays, curves, out_dir):
        print(f"\n{text}\n\nwrote {chart}")
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




if __name__ == "__main__":
    sys.exit(main())
