"""Phase 1: what vLLM's automatic prefix caching does to the TTFT a client of `vllm serve` sees.

The experiment of phase2_experiment.py (contexts A and B, warmup [A, B], then hit / miss /
cold in rounds with a fresh query Q per request, intervals over time blocks), sent as
streamed /v1/completions requests to vLLM's OpenAI-compatible server:

    python phase1_experiment.py --size-a 512 --size-b 256 --model /path/to/model [vllm serve flags]
    python phase1_experiment.py --base-url http://host:8000 --sizes 512x256,2048x256

The first starts its own `vllm serve` (with --enable-prompt-tokens-details) and stops it at
the end, on error and on Ctrl-C; the second measures a server that is already running. TTFT
is timed in the client: from just before the request is sent to the arrival of the first
streamed chunk that carries a token, on a keep-alive connection opened before the timed
requests. Every response's usage.prompt_tokens_details.cached_tokens is checked against its
condition (the cache audit), and the server's /metrics counters must agree.

Each run uses a cache namespace of its own (a cache_salt on its warmup and hits), so blocks
that other runs or clients left on the server cannot hit. Writes
results/results_phase1_a{A}_b{B}.json per config once the run ends.

Under load, P documents of A tokens shared by many clients, cached against cold (every
request salted) at the same load; a list of loads or of P is a sweep:

    python phase1_experiment.py --base-url URL --size-a 8192 --num-prefixes 8 --concurrency 1,4,16,64
    python phase1_experiment.py --base-url URL --size-a 8192 --request-rate 1,2,4
    python phase1_experiment.py --base-url URL --size-a 8192 --num-prefixes 1,2,4,8,16 --concurrency 4

Each request's cached tokens are recorded against its document; a hit is no longer promised
(documents may outgrow the KV cache), but a request that found more than it can have is an
audit failure. Writes results_load_a{A}_p{P}_{concurrency|rate}.json, or for a sweep of P
results_workingset_a{A}.json. Requests that fail end the sweep; the levels measured are kept.

A production trace (Mooncake format), replayed open loop at its own times: a cached arm (one
cache namespace a pass, warmed with the trace's earlier requests) against a cold one, each
request's cached tokens set against what an infinite cache and an LRU model of the server's
cache would find; or, with no server, the window's reusable share at several cache sizes:

    python phase1_experiment.py --model /path/to/model --trace conversation_trace.jsonl.gz \\
        --trace-start-s 600 --trace-duration-s 120
    python phase1_experiment.py --trace conversation_trace.jsonl.gz --simulate-capacities 0.5x,1x,2x,4x,16x \\
        --kv-capacity-tokens 400000

Writes results_trace_{trace}_s{start}_n{requests}.json (results_capacity_... for a curve).

Exit codes: 0 ok, 1 set-up or server problem (or, under load, failed requests), 2 bad
arguments, 3 a cache audit failed (the JSON is still written), 130/143 interrupted (no file
written).
"""
import argparse
import contextlib
import shlex
import sys

from prefix_cache_bench.cli import check_model_folder, checked, experiment_parser, number_list, positive_int
from prefix_cache_bench.defaults import (DETAILS_FLAG, IDEAL, LOAD_NUM_PREFIXES, LOAD_NUM_REQUESTS, LOAD_REPEATS,
                                         LOAD_REQUESTS_PER_CLIENT, MODEL_NAME, PREFIX_CACHING_OFF, REQUEST_TIMEOUT_S, SEED,
                                         SERVER_HOST,
                                         SERVER_MIN_BLOCK_SECONDS, SERVER_NUM_BLOCKS, SERVER_START_TIMEOUT_S)
from prefix_cache_bench.defaults import SERVER_PROG as PROG
from prefix_cache_bench.errors import ExperimentError, Interrupted, stop_on_signals, usage_error
from prefix_cache_bench.http_client import HttpClient
from prefix_cache_bench.load_run import finish_load, run_load
from prefix_cache_bench.trace_replay import finish_trace, run_trace
from prefix_cache_bench.console import write_results
from prefix_cache_bench.protocol import run_configs
from prefix_cache_bench.provenance import provenance
from prefix_cache_bench.results import check_results_dir
from prefix_cache_bench.server_engine import add_phase1_stats, prepare, server_environment
from prefix_cache_bench.settings import (FleetSettings, LoadSettings, Phase1Settings, RunSettings, ServerSettings,
                                         TraceSettings)
from prefix_cache_bench.servers import EmbeddedServer, Fleet, check_port_free, fleet_environment, free_port
from prefix_cache_bench.tiers import check_tier_can_start, flag_value, measure_link_for_tier, tier_from_flags
from prefix_cache_bench.trace_cli import add_trace_flags, check_trace_flags, simulate


def add_load_flags(parser):
    g = parser.add_argument_group("under load (any of these measures load instead of one request at a time)")
    g.add_argument("--concurrency", "--max-concurrency", dest="concurrency",
                   type=number_list(int, "positive integers"),
                   help="closed loop: N clients, each sending its next request when the last one ends; "
                        "a list (1,4,16) is a sweep")
    g.add_argument("--request-rate", type=number_list(float, "numbers > 0"),
                   help="open loop: Poisson arrivals at R requests/s; a list is a sweep")
    g.add_argument("--num-prefixes", type=number_list(int, "positive integers"),
                   help=f"documents of --size-a tokens that the requests share (default {LOAD_NUM_PREFIXES}); a "
                        f"list (1,4,16,64) is a working-set sweep at one load")
    g.add_argument("--prefix-skew", type=checked(float, lambda v: 0 <= v < float("inf"), "a number >= 0"),
                   default=0.0, help="how requests pick documents: 0 uniformly (default), s > 0 by Zipf, "
                                     "rank k with weight 1/k**s")
    g.add_argument("--num-requests", type=positive_int,
                   help=f"requests per load level, condition and pass (default {LOAD_NUM_REQUESTS}, or "
                        f"{LOAD_REQUESTS_PER_CLIENT} per client where that is more)")
    g.add_argument("--warmup-concurrency", type=positive_int, default=1,
                   help="the cached condition sends each document once first (untimed), this many at a time "
                        "(default 1: one after another); behind a router, where documents land can depend on it")
    g.add_argument("--repeats", type=positive_int, default=LOAD_REPEATS,
                   help="passes over the sweep; each figure's interval is taken over the passes (default "
                        "%(default)s; 1: one pass's own intervals)")
    g = parser.add_argument_group("several replicas (under load)")
    g.add_argument("--replicas", type=positive_int,
                   help="start N `vllm serve` replicas (one per GPU, or per TP x PP group of GPUs) and measure "
                        "through a front in front of them")
    g.add_argument("--router", choices=("vllm-router", "dp"), default="vllm-router",
                   help="the front: vllm-router (pip install vllm-router), or dp: one `vllm serve "
                        "--data-parallel-size N` (default %(default)s)")
    g.add_argument("--router-policy", type=lambda text: [p.strip() for p in text.split(",") if p.strip()],
                   help="vllm-router policies, one sweep each: cache_aware, round_robin, power_of_two, "
                        "consistent_hash, ... (default cache_aware); ideal: no router, the client sends "
                        "document k to replica k mod N, the placement a perfect cache-aware router reaches")
    g.add_argument("--router-args", help="more vllm-router flags, quoted: '--balance-abs-threshold 8'")
    g.add_argument("--replica-urls", type=lambda text: [u.strip().rstrip("/") for u in text.split(",") if u.strip()],
                   help="with --base-url in front of a router: the servers behind it, whose /metrics count "
                        "the requests")
    g = parser.add_argument_group("under load, continued")
    g.add_argument("--slo-ttft-ms", type=checked(float, lambda v: 0 < v < float("inf"), "a number > 0"),
                   help="goodput: completed requests per second whose TTFT is at most this")


def build_parser():
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, parents=[experiment_parser()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.error = usage_error
    parser.set_defaults(processes=1, num_blocks=SERVER_NUM_BLOCKS, min_block_seconds=SERVER_MIN_BLOCK_SECONDS)
    g = parser.add_argument_group("server (any other flag goes to the embedded `vllm serve`)")
    g.add_argument("--model", help=f"model folder or hub id to serve (default {MODEL_NAME}); with --base-url, "
                                   f"the served model's name (default: its only one)")
    g.add_argument("--base-url", help="measure this running server (http://host:port) instead of starting one")
    g.add_argument("--tokenizer", help="tokenizer to build prompts with (default: the model's)")
    g.add_argument("--host", default=SERVER_HOST, help="the embedded server's address (default %(default)s)")
    g.add_argument("--port", type=positive_int, help="the embedded server's port (default: a free one)")
    seconds = checked(float, lambda v: 0 < v < float("inf"), "a number > 0")
    g.add_argument("--server-start-timeout", type=seconds, default=SERVER_START_TIMEOUT_S, help="(s, default %(default)s)")
    g.add_argument("--request-timeout", type=seconds, default=REQUEST_TIMEOUT_S, help="(s, default %(default)s)")
    g.add_argument("--allow-unaudited", action="store_true",
                   help=f"measure a server without {DETAILS_FLAG}: no request's cache state is checked, and the "
                        f"JSON, table and chart say so")
    add_load_flags(parser)
    add_trace_flags(parser)
    return parser


def api_server_count(vllm_flags):
    """The value of vLLM's --api-server-count (or -asc) among the flags, as given; None if absent."""
    return flag_value(vllm_flags, "--api-server-count", "-asc")


def parse_args(argv):
    """Returns (Phase1Settings, vllm_flags, the trace's requests or None): our flags, checked
    and frozen, and the rest for the embedded `vllm serve`."""
    flags, vllm_flags = build_parser().parse_known_args(argv)
    run = RunSettings.from_flags(flags, seed=SEED, **({"configs": ()} if flags.trace else {}))
    load = LoadSettings.from_flags(flags)
    trace_requests = check_trace_flags(flags, vllm_flags)
    fleet = FleetSettings.from_flags(flags)
    if run.processes != 1 or run.worker_output:
        usage_error("--processes: phase 1 measures one server; its interval is over the server's time blocks")
    if flags.base_url and vllm_flags:
        usage_error(f"unknown flags {vllm_flags}: vLLM flags go to an embedded server, and --base-url "
                    f"measures one that is already running")
    refused = [f for f in vllm_flags if f.partition("=")[0] in PREFIX_CACHING_OFF + ("--disable-log-stats",)]
    if refused:
        usage_error(f"{refused[0]}: the prefix cache and its /metrics are what this tool measures")
    if api_server_count(vllm_flags) not in (None, "1"):
        # the embedded server is vLLM's API server module, which would ignore it and run one API server
        usage_error("--api-server-count: the embedded server runs one API server process; start "
                    "`vllm serve --api-server-count N --enable-prompt-tokens-details` yourself and pass --base-url")
    settings = Phase1Settings(run=run, server=ServerSettings.from_flags(flags), load=load, fleet=fleet,
                              trace=TraceSettings.from_flags(flags))
    return settings, vllm_flags, trace_requests


def run(settings, vllm_flags, argv, trace_requests):
    """Start or reach the server, check it, run every config, write the results. Returns the exit code."""
    if settings.fleet:
        return run_fleet(settings, vllm_flags, argv)
    server, tier, link, cfg = None, None, {}, settings.server
    if not cfg.base_url:
        model = check_model_folder(cfg.model or MODEL_NAME)
        if cfg.port:
            check_port_free(cfg.host, cfg.port)
        tier = tier_from_flags(vllm_flags)
        if tier:                            # one line now, not a failed start a minute later
            check_tier_can_start(flag_value(vllm_flags, "--kv-offloading-size"),
                                 flag_value(vllm_flags, "--kv-offloading-backend"))
            link = measure_link_for_tier(True)     # the host link, before the server holds the GPU
        # the tier condition empties the GPU prefix cache through vLLM's dev-mode endpoint
        server = EmbeddedServer(model, cfg.host, cfg.port or free_port(cfg.host), vllm_flags,
                                extra_env={"VLLM_SERVER_DEV_MODE": "1"} if tier else None)
    # stopped at the end, on error and on Ctrl-C: the client first, then the server
    with server or contextlib.nullcontext():
        if server:
            server.start(cfg.start_timeout_s)
        with HttpClient(server.base_url if server else cfg.base_url, cfg.request_timeout_s) as client:
            try:
                engine, tokenizer, card, unaudited = prepare(
                    client, settings, server.model if server else None, cfg.replica_urls and list(cfg.replica_urls),
                    tier_description=(tier or False) if server else None)
                env = {**server_environment(client, card, server, vllm_flags, engine), **link,
                       **provenance(argv, PROG, __file__)}
                if settings.trace:
                    result = run_trace(engine, tokenizer, settings.trace, settings.run.seed, env, unaudited,
                                       trace_requests, server.model if server else None)
                    death = server.death() if server and result["failure"] else None
                    if death:
                        result["failure"] = f"{result['failure']}; {death}"
                elif settings.load:
                    result = run_load(engine, tokenizer, settings, env, unaudited)
                    death = server.death() if server and result["failure"] else None
                    if death:
                        result["failure"] = f"{result['failure']}; {death}"
                else:
                    results = run_configs(engine, tokenizer, settings.run, env)
            except ExperimentError as e:
                death = server.death() if server else None
                raise ExperimentError(death) if death else e
            if not settings.load and not settings.trace:
                for result in results:
                    add_phase1_stats(result, unaudited)
                    result["environment"]["connections_opened"] = client.connections_opened - engine.connections_before
    if settings.trace:
        return finish_trace(result, settings.run.results_dir)
    if settings.load:
        return finish_load(result, settings.run.results_dir)
    counters = results[0]["cache_audit"]["engine_counters"]
    note = None
    if counters and counters.get("other_clients"):
        note = (f"note: the server's prefix-cache counters grew by more than this run's requests "
                f"({counters['prefix_cache_queries']} tokens queried, {counters['sum_prompt_tokens']} sent by this run): "
                f"another client used the server during the run. Each request's own audit still holds; its "
                f"timings shared the server with that traffic.")
    return write_results(results, settings.run.results_dir, phase=1, note=note)


def run_fleet(settings, vllm_flags, argv):
    """--replicas N: start the fleet, then for each front (a vllm-router policy, or dp) the load
    sweep through it, one JSON each. A failure ends the run after writing what was measured."""
    cfg, fleet_settings = settings.server, settings.fleet
    model = check_model_folder(cfg.model or MODEL_NAME)
    # every replica and router is stopped at the end, on error and on Ctrl-C
    with Fleet(model, cfg.host, fleet_settings.replicas, vllm_flags, fleet_settings.router,
               shlex.split(fleet_settings.router_args)) as fleet:
        fleet.start(cfg.start_timeout_s)
        for policy in fleet_settings.router_policies:
            front = fleet.start_router(policy, cfg.start_timeout_s)
            try:
                with HttpClient(front, cfg.request_timeout_s) as client:
                    try:
                        engine, tokenizer, card, unaudited = prepare(
                            client, settings, model, fleet.metrics_urls,
                            route=fleet.metrics_urls if policy == IDEAL else None)
                        env = {**server_environment(client, card, fleet.replicas[0], vllm_flags, engine),
                               **provenance(argv, PROG, __file__),
                               "fleet": fleet_environment(fleet, policy, engine)}
                        result = run_load(engine, tokenizer, settings, env, unaudited)
                    except ExperimentError as e:
                        dead = fleet.death()
                        raise ExperimentError(f"{e}; {dead}" if dead else str(e))
                result["front"] = policy
                if result["failure"]:
                    dead = fleet.death()
                    if dead:
                        result["failure"] = f"{result['failure']}; {dead}"
            finally:
                fleet.stop_router()
            code = finish_load(result, settings.run.results_dir)
            if code:
                return code
    return 0


def main(argv):
    settings, vllm_flags, trace_requests = parse_args(argv)     # exit 2 on a bad flag, before anything starts
    check_results_dir(settings.run.results_dir)
    if settings.trace and settings.trace.simulate_capacities:       # no server: the model of its cache alone
        return simulate(settings.trace, trace_requests, settings.run.results_dir, provenance(argv, PROG, __file__))
    return run(settings, vllm_flags, argv, trace_requests)


if __name__ == "__main__":
    stop_on_signals()
    try:
        exit_code = main(sys.argv[1:])
    except (ExperimentError, Interrupted) as e:
        print(f"\n{PROG}: {'error: ' if isinstance(e, ExperimentError) else ''}{e}", file=sys.stderr)
        sys.exit(e.exit_code)
    sys.exit(exit_code)
