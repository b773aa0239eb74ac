"""Phase 2: what vLLM's automatic prefix caching does to time-to-first-token.

One engine (prefix caching on), one or more (A, B) context-size configs. Per config:

  warmup  [A, B]        generated once: puts A+B's full KV blocks in the prefix cache
  hit     [A, B, Q]     must find exactly those blocks cached
  miss    [B, Q]        must find nothing cached (a per-request cache_salt sees to it)
  cold    [A, B, Q]     the hit prompt with nothing cached: same prompt, cache on vs off

Every request gets a fresh query Q of the same length, so no request can reuse the
blocks of an earlier one, and every request's RequestOutput.num_cached_tokens is
checked against what its condition promises (the "cache audit"). Prompts are sent
as token ids, so [A, B, Q] begins with exactly [A, B]'s ids.

Trials run in rounds: a round holds one trial of each condition of every config, in a
rotated order, back to back. A run is 5 engine processes, one after another (--processes),
each measuring 3 time blocks of at least 15 s; the 95% intervals of the saving and the
degradation come from the spread between the processes' means (paired Fieller ratio, t with
processes - 1 df), as pyperf takes its spread from several processes. So both a drift of the
host during a process and a level that differs from one process to the next are inside the
interval (--processes 1: the interval over one process's time blocks; --block-order: the
design's literal all-hits-then-all-misses order, config after config).

    python phase2_experiment.py --size-a 512 --size-b 256
    python phase2_experiment.py --sizes 256x256,512x256,1024x256 --model /path/to/model

writes results/results_phase2_a{A}_b{B}.json per config once the run ends. Every vLLM
engine flag (--tensor-parallel-size, --enforce-eager, --block-size, ...) is accepted under
vLLM's own name. Exit codes: 0 ok, 1 setup problem or the engine died, 2 bad arguments,
3 a cache audit failed (the JSON is still written), 130/143 interrupted (no file written).
"""
import argparse
import os
import sys

# The design's globals (MODEL_NAME, CONTEXT_SIZE_A, ..., WARMUP_TOKENS) and the run's shape: the
# values, with why, are in prefix_cache_bench/defaults.py; command-line flags override them.
from prefix_cache_bench.defaults import (CONTEXT_SIZE_A, CONTEXT_SIZE_B, MAX_OUTPUT_TOKENS, MODEL_NAME,  # noqa: F401
                                         NUM_TRIALS, SEED, WARMUP_TOKENS, WARMUP_TRIALS)
from prefix_cache_bench.defaults import OFFLINE_PROG as PROG, PROFILED_REQUESTS
from prefix_cache_bench.cli import check_model_folder, experiment_parser, non_negative_int
from prefix_cache_bench.errors import ExperimentError, Interrupted, first_line, stop_on_signals, usage_error
from prefix_cache_bench.engine_output import restore_output
from prefix_cache_bench.offline import check_model_fits, keep_multicast_off, run_experiment
from prefix_cache_bench.processes import run_processes
from prefix_cache_bench.provenance import provenance
from prefix_cache_bench.results import check_results_dir
from prefix_cache_bench.settings import RunSettings


def parse_args(argv):
    """Our flags first (checked before vLLM is imported), then the rest through vLLM's own
    parser into EngineArgs. Returns (RunSettings, engine_args)."""
    ours = experiment_parser()
    ours.add_argument("--profiled-requests", type=non_negative_int, default=PROFILED_REQUESTS,
                      help="after the measured rounds, this many requests of each condition and config, each "
                           "timed on the GPU's own clock (a profiler window: never inside the measured rounds; "
                           "CUDA only; 0: none; default %(default)s)")
    flags, engine_argv = ours.parse_known_args(argv)
    # vLLM's --model and --seed, read before its import too: the seed is the run's as well
    engine_flags = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    engine_flags.error = usage_error
    engine_flags.add_argument("--model", default=MODEL_NAME)
    engine_flags.add_argument("--seed", type=int, default=SEED)
    given = engine_flags.parse_known_args(engine_argv)[0]
    settings = RunSettings.from_flags(flags, model=given.model, seed=given.seed, profiled_requests=flags.profiled_requests,
                                      provenance=provenance(argv, PROG, __file__))
    if not {"-h", "--help"} & set(engine_argv):
        # What needs no vLLM is checked before its import (seconds): a model folder, the results folder.
        check_model_folder(settings.model)
        check_results_dir(settings.results_dir, make=False)
    try:
        from vllm.engine.arg_utils import EngineArgs
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError as e:
        raise ExperimentError(f"vLLM cannot be imported ({e}): on a CUDA box run `pip install -r requirements.txt`; "
                              f"for CPU tests see README.md")
    parser = FlexibleArgumentParser(prog=PROG, description=__doc__, parents=[ours],
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = usage_error
    EngineArgs.add_cli_args(parser)
    # What this tool measures needs both: the prefix cache, and RequestOutput.metrics.
    parser.set_defaults(model=MODEL_NAME, seed=SEED, enable_prefix_caching=True, disable_log_stats=False)
    engine_ns = parser.parse_args(engine_argv)           # --help prints both groups and exits here
    if not engine_ns.enable_prefix_caching or engine_ns.disable_log_stats:
        usage_error("prefix caching and engine stats are what this tool measures: they are always on "
                    "(drop --no-enable-prefix-caching / --disable-prefix-caching / --disable-log-stats)")
    if (engine_ns.model, engine_ns.seed) != (settings.model, settings.seed):
        usage_error("--model and --seed: give them on the command line (the seed makes the prompts too)")
    try:
        return settings, EngineArgs.from_cli_args(engine_ns)    # resolves the model: may look it up on the hub
    except Exception as e:
        raise ExperimentError(f"--model {engine_ns.model!r} cannot be loaded: {first_line(e)}")


def main(argv):
    settings, engine_args = parse_args(argv)    # exit 2 on a bad flag, before the engine starts
    check_results_dir(settings.results_dir)
    check_model_fits(settings, engine_args)     # exit 1/2 in seconds, not after the engine's minutes
    if settings.processes > 1:
        return run_processes(settings, argv, __file__)     # each engine process runs this script again
    note = keep_multicast_off(os.environ, engine_args.tensor_parallel_size)
    if note:
        print(note, flush=True)
    return run_experiment(settings, engine_args)


if __name__ == "__main__":
    stop_on_signals()
    try:
        exit_code = main(sys.argv[1:])
    except (ExperimentError, Interrupted) as e:
        restore_output()
        print(f"\n{PROG}: {'error: ' if isinstance(e, ExperimentError) else ''}{e}", file=sys.stderr)
        sys.exit(e.exit_code)
    restore_output()
    sys.exit(exit_code)
