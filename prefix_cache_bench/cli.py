"""Command-line pieces both experiments share: argparse types that say in one line what they
expected, the experiment's own flags, and the checks on them. No vLLM import: a bad flag exits 2
within a second.
"""
import argparse
import os
from collections.abc import Callable
from typing import Any, TypeVar

from .defaults import (CONTEXT_SIZE_A, CONTEXT_SIZE_B, MAX_OUTPUT_TOKENS, MIN_BLOCK_SECONDS, NUM_BLOCKS,
                       NUM_TRIALS, OFFLINE_PROG, ONE_PROCESS_MIN_BLOCK_SECONDS, ONE_PROCESS_NUM_BLOCKS,
                       PAUSE_MS, PROCESSES, RESULTS_DIR, WARMUP_TRIALS)
from .errors import ExperimentError, usage_error

T = TypeVar("T")


def checked(cast: Callable[[str], T], ok: Callable[[T], bool], what: str) -> Callable[[str], T]:
    """An argparse type: cast the text, check it, or say in one line what was expected."""
    def convert(text):
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    return convert


positive_int = checked(int, lambda v: v > 0, "a positive integer")
non_negative_int = checked(int, lambda v: v >= 0, "an integer >= 0")


def size_list(text: str) -> list[tuple[int, int]]:
    """'512x256,1024x256' -> [(512, 256), (1024, 256)]"""
    sizes: list[Any] = []
    for part in text.split(","):
        a, sep, b = part.strip().lower().partition("x")
        try:
            sizes.append((positive_int(a), positive_int(b)) if sep else None)
        except argparse.ArgumentTypeError:
            sizes.append(None)
        if sizes[-1] is None:
            raise argparse.ArgumentTypeError(f"expected AxB pairs of positive integers like 512x256,1024x256, "
                                             f"got {part.strip()!r}")
    if len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(f"a config is listed twice in {text!r}")
    return sizes


def experiment_parser() -> argparse.ArgumentParser:
    """The experiment's own flags. No vLLM import: a bad value exits 2 within a second."""
    parser = argparse.ArgumentParser(prog=OFFLINE_PROG, add_help=False, allow_abbrev=False)
    parser.error = usage_error      # type: ignore[method-assign]  # one line, not argparse's usage + error
    g = parser.add_argument_group("experiment")
    g.add_argument("--size-a", type=positive_int, help=f"tokens in context A (default {CONTEXT_SIZE_A})")
    g.add_argument("--size-b", type=positive_int, help=f"tokens in context B (default {CONTEXT_SIZE_B})")
    g.add_argument("--sizes", type=size_list, help="several configs on one engine start, e.g. 512x256,1024x256")
    g.add_argument("--num-trials", type=positive_int, default=NUM_TRIALS,
                   help="measured rounds per process; default: sized by time, --num-blocks blocks of at least "
                        "--min-block-seconds")
    g.add_argument("--processes", type=positive_int,
                   help=f"engine processes, one after another; the interval is taken over their means "
                        f"(default {PROCESSES}; 1: over one process's time blocks)")
    g.add_argument("--num-blocks", type=positive_int,
                   help=f"time blocks per process (default {NUM_BLOCKS}; {ONE_PROCESS_NUM_BLOCKS} with one process)")
    g.add_argument("--min-block-seconds", type=checked(float, lambda v: 0 <= v < float("inf"), "a number >= 0"),
                   help=f"each block lasts at least this long (default {MIN_BLOCK_SECONDS:g}; "
                        f"{ONE_PROCESS_MIN_BLOCK_SECONDS:g} with one process)")
    g.add_argument("--warmup-trials", type=non_negative_int,
                   default=WARMUP_TRIALS, help="discarded rounds first (default %(default)s)")
    g.add_argument("--max-output-tokens", type=positive_int, default=MAX_OUTPUT_TOKENS)
    g.add_argument("--pause-ms", type=checked(float, lambda v: 0 <= v < float("inf"), "a number >= 0"),
                   default=PAUSE_MS, help="idle gap after every request (default %(default)s)")
    g.add_argument("--results-dir", default=RESULTS_DIR)
    g.add_argument("--worker-output", help=argparse.SUPPRESS)     # set by --processes for each engine process
    g.add_argument("--block-order", action="store_true",
                   help="the design's literal order (all hits, then misses, then cold) instead of rounds; "
                        "a level shift during the run then biases the comparison")
    return parser


def number_list(cast: Callable[[str], T], what: str) -> Callable[[str], list[T]]:
    """An argparse type for '1,2,4': each item cast and positive, none twice."""
    def convert(text):
        try:
            values = [cast(part) for part in text.split(",")]
        except ValueError:
            values = None
        if not values or any(not 0 < v < float("inf") for v in values):
            raise argparse.ArgumentTypeError(f"must be {what}, comma-separated, got {text!r}")
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"a value is listed twice in {text!r}")
        return values
    return convert


def take_flag(argv: list[str], name: str, default: T, kind: Callable[[str], T]) -> tuple[T, list[str]]:
    """(value, argv without it) of a tool's own flag, given as `name VALUE`; the rest of argv
    goes on to an experiment's parser (tools/bare_generate_check.py, tools/minimal_client_check.py)."""
    if name not in argv:
        return default, argv
    k = argv.index(name)
    if k + 1 >= len(argv):
        raise ExperimentError(f"{name} needs a value", 2)
    try:
        return kind(argv[k + 1]), argv[:k] + argv[k + 2:]
    except ValueError:
        raise ExperimentError(f"{name}: not a valid value: {argv[k + 1]!r}", 2)


def check_model_folder(model: str) -> str:
    """model, unless it names a local folder (a path) that is not there: then one line, exit 1,
    before anything starts."""
    if model.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(model)):
        raise ExperimentError(f"--model {model!r}: no such model folder")
    return model
