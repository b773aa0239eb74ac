"""vLLM's own client against this tool, on one server and one workload.

    python tools/compare_bench_serve.py --model MODEL --size-a 512 --num-prefixes 4 --concurrency 4 \
        --max-output-tokens 16 --num-requests 256 --rounds 3 --out comparison.json [-- VLLM FLAGS]

Each round runs `vllm bench serve` (`vllm.benchmarks.serve`, its prefix_repetition dataset:
documents of --size-a tokens, a 16-token suffix, --num-prefixes documents, --max-concurrency)
and `phase1_experiment.py` at the same load level, one after the other, in an order that
alternates from round to round. Around each, the server's own histograms (/metrics) give its
TTFT, queue and prefill means. The bench's prompts are text and its documents are first seen
during its run (it sends no untimed test request unless --ready-check-timeout-sec is above 0);
each of its requests is classed as a hit (an earlier request of the same document had its first
token before this one was sent) or not, so that its hits can be set against the tool's cached
condition. Every percentile here is numpy's (linear), as the bench
computes them, over each round's requests; the figures over rounds are means with a t-interval.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import time
import urllib.request

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from prefix_cache_bench.audit import counter_growth, wait_for_counters  # noqa: E402
from prefix_cache_bench.defaults import QUERY_TOKENS  # noqa: E402
from prefix_cache_bench.errors import ExperimentError, Interrupted, stop_on_signals  # noqa: E402
from prefix_cache_bench.intervals import mean_ci95  # noqa: E402
from prefix_cache_bench.prometheus import API_SERVER_CPU, load_counters, metric_total, parse_metrics, server_times  # noqa: E402
from prefix_cache_bench.host import machine_info  # noqa: E402
from prefix_cache_bench.provenance import device_name, provenance  # noqa: E402
from prefix_cache_bench.result_schema import BENCH_SERVE_SCHEMA, build_bench_serve_comparison  # noqa: E402
from prefix_cache_bench.results import rounded, write_json_atomic  # noqa: E402
from prefix_cache_bench.servers import EmbeddedServer, free_port  # noqa: E402

FIGURES = ("ttft_p50_ms", "ttft_p99_ms", "ttft_mean_ms", "request_throughput", "server_ttft_mean_ms",
           "queue_time_mean_ms", "prefill_time_mean_ms", "client_minus_server_ms", "prompt_tokens_mean",
           "cached_token_share")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the model folder the server loads (and the tokenizer)")
    parser.add_argument("--base-url", help="a running server to use instead of starting one")
    parser.add_argument("--size-a", type=int, default=512, help="document tokens (the bench's prefix length)")
    parser.add_argument("--num-prefixes", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=4, help="clients (the bench's --max-concurrency)")
    parser.add_argument("--max-output-tokens", type=int, default=16)
    parser.add_argument("--num-requests", type=int, default=256, help="requests a round, each tool")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--server-start-timeout", type=float, default=600)
    parser.add_argument("--out", required=True, help="the JSON file written")
    parser.add_argument("vllm_flags", nargs="*", help="after --: flags for the server this starts")
    return parser.parse_args(argv)


def read_counters(base_url):
    """The server's load counters and histograms, and the CPU seconds its API server process has used."""
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(base_url + "/metrics", timeout=30) as r:
        metrics = parse_metrics(r.read().decode())
    return {**load_counters(metrics), "api_server_cpu_s": metric_total(metrics, API_SERVER_CPU)}


def counters_after(base_url, before, requests, wait_s=10.0):
    """The counters' growth once the server has counted `requests` more (it counts a request as it ends)."""
    after = wait_for_counters(lambda: read_counters(base_url), lambda b, a: counter_growth(b, a)["requests"], before,
                              requests, timeout_s=wait_s)
    return counter_growth(before, after)


def server_figures(grown):
    """The server's side of one run: its histograms' means and the share of prompt tokens it found cached."""
    share = (grown["prefix_cache_hits"] / grown["prefix_cache_queries"]
             if grown.get("prefix_cache_queries") else None)
    # the bench sees no request's cached tokens: its share is the server's counters'
    return {**server_times(grown), "server_requests": grown["requests"], "cached_token_share": share}


def ttft_figures(ttfts_ms):
    values = np.asarray(ttfts_ms, dtype=float)
    return {"ttft_p50_ms": float(np.percentile(values, 50)), "ttft_p99_ms": float(np.percentile(values, 99)),
            "ttft_mean_ms": float(values.mean()), "requests": int(values.size)}


def found_their_document(documents, start_s, ttft_s, warmed):
    """Per request (in the bench's order): did an earlier request of the same document have its
    first token before this one was sent? (Its prefill was then done, its blocks cached.)
    warmed: documents cached before the run (the bench's own test request)."""
    first_token = {doc: -np.inf for doc in warmed}
    order = np.argsort(start_s, kind="stable")
    found = [False] * len(documents)
    for i in order:
        found[i] = start_s[i] >= first_token.get(documents[i], np.inf)
        first_token[documents[i]] = min(first_token.get(documents[i], np.inf), start_s[i] + ttft_s[i])
    return found


def bench_args(opts, base_url, seed):
    from vllm.benchmarks import serve

    parser = argparse.ArgumentParser()
    serve.add_cli_args(parser)
    return parser.parse_args([
        "--backend", "vllm", "--base-url", base_url, "--model", opts.model, "--tokenizer", opts.model,
        "--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", str(opts.size_a),
        "--prefix-repetition-suffix-len", str(QUERY_TOKENS),
        "--prefix-repetition-num-prefixes", str(opts.num_prefixes),
        "--prefix-repetition-output-len", str(opts.max_output_tokens), "--num-prompts", str(opts.num_requests),
        "--max-concurrency", str(opts.concurrency), "--ignore-eos", "--seed", str(seed),
        "--percentile-metrics", "ttft", "--metric-percentiles", "50,99",
        "--save-detailed"])  # the per-request times stay in main()'s result (nothing is written without --save-result)


def bench_documents(args):
    """The document of each of the bench's prompts, in its order: its dataset drawn again as its
    main() draws it (same seed), each prompt's document told by its first characters."""
    import random

    from vllm.benchmarks.datasets import get_samples
    from vllm.tokenizers import get_tokenizer

    random.seed(args.seed)
    np.random.seed(args.seed)
    samples = get_samples(args, get_tokenizer(args.tokenizer))
    keys = {}
    documents = [keys.setdefault(s.prompt[:48], len(keys)) for s in samples]
    if len(keys) != args.prefix_repetition_num_prefixes:
        raise SystemExit(f"the bench's prompts begin in {len(keys)} ways, not its "
                         f"{args.prefix_repetition_num_prefixes} documents'")
    return documents


def run_bench(opts, base_url, seed):
    from vllm.benchmarks import serve

    args = bench_args(opts, base_url, seed)
    documents = bench_documents(args)
    before, wall_s = read_counters(base_url), time.perf_counter()
    result = serve.main(args)
    wall_s = time.perf_counter() - wall_s
    # only with --ready-check-timeout-sec above 0 (off by default) does the bench send its first
    # prompt once, untimed, before the run: then the server counts it, and its document is cached
    test_request = args.ready_check_timeout_sec > 0
    grown = counters_after(base_url, before, result["completed"] + test_request)
    ttft_s = np.asarray(result["ttfts"], dtype=float)
    found = found_their_document(documents, np.asarray(result["start_times"], dtype=float), ttft_s,
                                 warmed={documents[0]} if test_request else set())
    hits = [t * 1e3 for t, f in zip(ttft_s, found) if f]
    figures = {**ttft_figures(ttft_s * 1e3), "request_throughput": result["request_throughput"],
               "prompt_tokens_mean": float(np.mean(result["input_lens"])), **server_figures(grown),
               "hits": ttft_figures(hits) if hits else None,
               "not_hits": len(found) - len(hits), "failed": result["failed"], "test_request": test_request,
               # over the whole of main(): its dataset, test request and run
               "api_server_cpu_busy": grown["api_server_cpu_s"] / wall_s if grown["api_server_cpu_s"] is not None else None}
    figures["client_minus_server_ms"] = figures["ttft_mean_ms"] - figures["server_ttft_mean_ms"]
    return figures


def run_tool(opts, base_url, results_dir):
    """phase1_experiment.py at the same level, one pass (its documents are the same every round,
    in a cache namespace of the run's own); its cached and cold conditions' figures from its
    per-request records and server counters."""
    command = [sys.executable, os.path.join(ROOT, "phase1_experiment.py"), "--base-url", base_url,
               "--size-a", str(opts.size_a), "--num-prefixes", str(opts.num_prefixes),
               "--concurrency", str(opts.concurrency), "--max-output-tokens", str(opts.max_output_tokens),
               "--num-requests", str(opts.num_requests), "--repeats", "1", "--results-dir", results_dir]
    print("running:", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    with open(glob.glob(os.path.join(results_dir, "results_load_*.json"))[0]) as f:
        result = json.load(f)
    figures = {}
    for condition in ("cached", "cold"):
        run = result["levels"][0]["runs"][0][condition]
        requests = run["requests"]
        server = run["server"]
        figures[condition] = {
            **ttft_figures([r["ttft_ms"] for r in requests]), "request_throughput": run["request_throughput"],
            "prompt_tokens_mean": float(np.mean([r["prompt_tokens"] for r in requests])),
            "server_ttft_mean_ms": server["server_ttft_mean_ms"], "queue_time_mean_ms": server["queue_time_mean_ms"],
            "prefill_time_mean_ms": server["prefill_time_mean_ms"],
            "cached_token_share": sum(r["cached_tokens"] for r in requests) / sum(r["prompt_tokens"] for r in requests),
            "failed": run["failed"], "client_cpu_busy": run["client_cpu_busy"],
            "api_server_cpu_busy": server["api_server_cpu_busy_max"]}
        figures[condition]["client_minus_server_ms"] = (figures[condition]["ttft_mean_ms"]
                                                        - figures[condition]["server_ttft_mean_ms"])
    figures["cache_audit_ok"] = result["cache_audit"]["ok"]
    return figures


def over_rounds(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": float(np.mean(values)), "ci95": mean_ci95(values) if len(values) > 1 else None,
            "per_round": values}


def summarize(rounds):
    """Each figure over the rounds: the bench (all its requests, and its hits), the tool's cached and cold."""
    views = {"bench": lambda r: r["bench"], "bench_hits": lambda r: r["bench"]["hits"] or {},
             "tool_cached": lambda r: r["tool"]["cached"], "tool_cold": lambda r: r["tool"]["cold"]}
    return {name: {key: over_rounds([view(r).get(key) for r in rounds]) for key in FIGURES
                   if any(view(r).get(key) is not None for r in rounds)}
            for name, view in views.items()}


def print_table(summary):
    print(f"{'':<14}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}{'req/s':>9}{'server ms':>11}{'client-server':>15}")
    for name, figures in summary.items():
        cells = [figures.get(k) for k in ("ttft_p50_ms", "ttft_p99_ms", "ttft_mean_ms", "request_throughput",
                                          "server_ttft_mean_ms", "client_minus_server_ms")]
        print(f"{name:<14}" + "".join(f"{c['mean']:>{w}.1f}" if c else f"{'-':>{w}}"
                                      for c, w in zip(cells, (10, 10, 10, 9, 11, 15))))


def compare(opts, base_url):
    rounds = []
    for k in range(opts.rounds):
        seed = k + 1
        order = ["bench", "tool"] if k % 2 == 0 else ["tool", "bench"]
        record = {"round": k + 1, "seed": seed, "order": order}
        for which in order:
            if which == "bench":
                record["bench"] = run_bench(opts, base_url, seed)
            else:
                # the tool's own result file of each round is kept beside the comparison's
                results_dir = f"{os.path.splitext(opts.out)[0]}-tool-round{k + 1}"
                record["tool"] = run_tool(opts, base_url, results_dir)
                record["tool"]["results_dir"] = os.path.basename(results_dir)
        rounds.append(record)
    return rounds


def main(argv=None):
    opts = parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
    config = {key: getattr(opts, key) for key in ("model", "size_a", "num_prefixes", "concurrency",
                                                   "max_output_tokens", "num_requests", "rounds", "vllm_flags")}
    config["query_tokens"] = QUERY_TOKENS
    # the bench's hits are classed knowing whether it sent a test request first (tools/bench_serve_table.py reads this)
    config["bench_hits_classed"] = "by send and first-token times, test request known"
    if opts.base_url:
        rounds = compare(opts, opts.base_url.rstrip("/"))
        start_s = None
    else:
        with EmbeddedServer(opts.model, "127.0.0.1", free_port("127.0.0.1"), opts.vllm_flags) as server:
            server.start(opts.server_start_timeout)
            start_s = server.start_s
            rounds = compare(opts, server.base_url)
    import vllm

    summary = summarize(rounds)
    print_table(summary)
    comparison = build_bench_serve_comparison(**{
        "schema": BENCH_SERVE_SCHEMA, "config": config, "vllm_version": vllm.__version__,
        "device": device_name(), "machine": machine_info(), "server_start_s": start_s,
        **provenance(sys.argv[1:] if argv is None else argv, "tools/compare_bench_serve.py", __file__),
        "rounds": rounds, "summary": summary})
    write_json_atomic(opts.out, rounded(comparison))
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    stop_on_signals()
    try:
        main()
    except (ExperimentError, Interrupted) as e:        # a server that did not start, a Ctrl-C: one line
        print(f"compare_bench_serve.py: {'error: ' if isinstance(e, ExperimentError) else ''}{e}", file=sys.stderr)
        sys.exit(e.exit_code)
