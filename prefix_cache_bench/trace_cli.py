"""Phase 1's trace flags: reading and checking a trace before any server starts, and
--simulate-capacities, the capacity curve of a window without a server (no vLLM import).
"""
from __future__ import annotations
import argparse
import datetime
import time
from typing import Any

from .cli import checked, positive_int
from .defaults import GPU_BLOCK_TOKENS, MAX_IN_FLIGHT, SERVER_PHASE, TRACE_BLOCK_TOKENS, TRACE_DRAIN_S
from .errors import usage_error
from .console import print_curve
from .result_schema import build_capacity_curve
from .results import trace_results_path, write_result
from .settings import TraceSettings
from .tiers import flag_value
from .traces import (TraceRequest, TraceWindow, check_block_sizes, parse_capacities, read_trace, select_window,
                     simulate_capacities)



def add_trace_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("replaying a production trace (Mooncake format: timestamp, input_length, "
                                  "output_length, hash_ids)")
    seconds = checked(float, lambda v: 0 <= v < float("inf"), "a number >= 0")
    g.add_argument("--trace", help="replay this .jsonl or .jsonl.gz trace: a cached arm against a cold one at "
                                   "the trace's arrival times (docs/traces.md)")
    g.add_argument("--trace-block-size", type=positive_int, default=TRACE_BLOCK_TOKENS,
                   help="tokens per hash ID (default %(default)s); a multiple of the engine's KV block")
    g.add_argument("--trace-start-s", type=seconds, default=0.0, help="the window starts this far into the trace (s)")
    g.add_argument("--trace-duration-s", type=checked(float, lambda v: 0 < v < float("inf"), "a number > 0"),
                   help="the window's length in trace seconds (default: to the trace's end)")
    g.add_argument("--trace-num-requests", type=positive_int, help="the window's first N requests at most")
    g.add_argument("--time-scale", type=checked(float, lambda v: 0 < v < float("inf"), "a number > 0"), default=1.0,
                   help="arrival gaps times this (2: half the trace's rate; default %(default)s)")
    g.add_argument("--trace-max-output-tokens", type=positive_int,
                   help="cap each request's output tokens (default: the trace's output_length)")
    g.add_argument("--max-input-tokens", type=positive_int,
                   help="skip (and count) requests with more input tokens; the server's context caps it too")
    g.add_argument("--history-tokens", type=checked(int, lambda v: v >= 0, "an integer >= 0"),
                   help="warm start: the requests before the window, as many as hold this many distinct "
                        "prompt tokens, sent untimed first (default: the server's KV capacity; 0: none)")
    g.add_argument("--trace-drain-s", type=checked(float, lambda v: 0 < v < float("inf"), "a number > 0"),
                   default=TRACE_DRAIN_S, help="after an arm's last send, its requests get this long to end; "
                                               "those still running are cancelled, the arm overloaded (default %(default)s)")
    g.add_argument("--max-in-flight", type=positive_int, default=MAX_IN_FLIGHT,
                   help="an arm with this many requests in flight stops sending, overloaded (default %(default)s)")
    g.add_argument("--simulate-capacities", type=str,
                   help="no server: the window's reusable share at each KV capacity (0.5x,1x,4x of "
                        "--kv-capacity-tokens, or tokens: 200k,1M) against the ideal")
    g.add_argument("--kv-capacity-tokens", type=positive_int, help="1x of --simulate-capacities: a server's KV "
                                                                   "capacity (a trace result's kv_capacity_tokens)")
    g.add_argument("--engine-block-size", type=positive_int, default=GPU_BLOCK_TOKENS,
                   help="--simulate-capacities: the engine's KV block (default %(default)s, vLLM on a GPU)")


LOAD_FLAGS = ("concurrency", "request_rate", "num_prefixes", "sizes", "size_a", "size_b")


def check_trace_flags(flags: argparse.Namespace, vllm_flags: list[str]) -> list[TraceRequest] | None:
    """--trace's companions; the trace read and its window checked (exit 2 on bad input, before
    any server starts). Returns the trace's requests (None without --trace)."""
    if not flags.trace:
        if flags.simulate_capacities:
            usage_error("--simulate-capacities needs --trace")
        return None
    if flags.replicas:
        usage_error("--replicas: a fleet is not replayed yet (docs/traces.md, limits); replay through a router "
                    "that is already running with --base-url")
    given = [name for name in LOAD_FLAGS if getattr(flags, name)]
    if given:
        usage_error(f"--{given[0].replace('_', '-')}: a trace replay sends the trace's own requests at its own times")
    block = flag_value(vllm_flags, "--block-size")
    if block:
        if not block.isdigit():
            usage_error(f"--block-size {block!r}: expected an integer")
        check_block_sizes(flags.trace_block_size, int(block), flags.trace)
    requests = read_trace(flags.trace, flags.trace_block_size)
    trace = TraceSettings.from_flags(flags)
    if trace is None:
        raise ValueError("TraceSettings.from_flags gave no settings though --trace is given")
    window_of(trace, requests, flags.max_input_tokens, None)     # an empty window: exit 2 now
    return requests


def window_of(trace: TraceSettings, requests: list[TraceRequest], max_input_tokens: int | None,
              history_tokens: int | None) -> TraceWindow:
    """The window of requests that trace (TraceSettings) selects."""
    return select_window(requests, trace.path, trace.start_s, trace.duration_s, trace.num_requests,
                         max_input_tokens, history_tokens=history_tokens, trace_block_size=trace.trace_block_size)


def simulate(trace: TraceSettings, requests: list[TraceRequest], results_dir: str, provenance: dict[str, Any]) -> int:
    """--simulate-capacities: the window's simulated reusable share at each capacity, printed
    and written. The warm start holds as much history as the largest capacity (or --history-tokens)."""
    check_block_sizes(trace.trace_block_size, trace.engine_block_size, trace.path)
    if trace.simulate_capacities is None:
        raise ValueError("simulate needs settings with capacities (TraceSettings.simulate_capacities)")
    capacities = parse_capacities(trace.simulate_capacities, trace.kv_capacity_tokens)
    started = time.perf_counter()
    history = trace.history_tokens if trace.history_tokens is not None else max(tokens for _, tokens in capacities)
    window = window_of(trace, requests, trace.max_input_tokens, history)
    curve = simulate_capacities(window, capacities, trace.engine_block_size, trace.trace_block_size)
    elapsed_s = time.perf_counter() - started
    result = build_capacity_curve(
        phase=SERVER_PHASE, experiment="capacity_curve",
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        config={"trace": trace.path, "trace_block_size": trace.trace_block_size,
                "engine_block_size": trace.engine_block_size, "trace_start_s": trace.start_s,
                "trace_duration_s": trace.duration_s, "trace_num_requests": trace.num_requests,
                "max_input_tokens": trace.max_input_tokens, "history_tokens": history,
                "kv_capacity_tokens": trace.kv_capacity_tokens, "capacities": trace.simulate_capacities},
        window={"requests": len(window.measured), "skipped": len(window.skipped),
                "history_requests": len(window.history), "start_s": window.start_s,
                "trace_span_s": window.duration_s},
        curve=curve, simulation_s=elapsed_s,
        environment=provenance,
    )
    path = trace_results_path(results_dir, result)
    write_result(path, result)
    print_curve(result)
    print(f"wrote {path}", flush=True)
    return 0


