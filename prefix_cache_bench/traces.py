"""A production request trace (Mooncake format): reading and checking it, the window to replay,
prompts made from hash IDs, the ideal ledger (an infinite cache), an LRU model of vLLM's prefix
cache, and the reuse it would find at several capacities.

A trace is JSONL (optionally .gz), one request a line: `timestamp` (ms from the trace's start),
`input_length` and `output_length` (tokens), `hash_ids` (one per block of `trace_block_size`
tokens, the last block possibly partial). Two requests sharing their first k hash IDs share their
first k * trace_block_size prompt tokens. Pure Python and numpy: no vLLM, torch or tokenizer
library is imported here.
"""
import collections
import decimal
import functools
import gzip
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy

from .defaults import TRACE_BLOCK_TOKENS
from .errors import ExperimentError, EXIT_USAGE


BLOCK_CACHE_SIZE = 4096           # PromptMaker's LRU of drawn blocks: 4096 * 512 * 4 B = 8 MiB
SEED_MODULUS = 2 ** 63            # hash IDs and seeds are mapped below this before seeding numpy
FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")


@dataclass(frozen=True, slots=True)
class TraceRequest:
    line: int                       # 1-based line number in the file
    timestamp_ms: float             # arrival, ms from the trace's start
    input_length: int               # prompt tokens
    output_length: int              # generated tokens
    hash_ids: tuple[int, ...]       # one per trace block of the prompt


@dataclass(frozen=True)
class TraceWindow:
    history: list[TraceRequest]     # requests before the window (for the warm start), in trace order
    measured: list[TraceRequest]    # the window's requests, in trace order, skipped ones excluded
    skipped: list[TraceRequest]     # in-window requests over max_input_tokens
    start_s: float                  # the window's start, trace seconds
    duration_s: float               # last measured timestamp - start, trace seconds


def _usage_error(path, line, what):
    return ExperimentError(f"{path}:{line}: {what}", EXIT_USAGE)   # one line: file:line: the problem


# ---- reading and checking ----------------------------------------------------------------------

def _is_int(value):
    return type(value) is int       # bool is an int subclass: not a token count


def _parse_record(text, path, line, trace_block_size):
    """One line's JSON object as a TraceRequest, every field checked (lengths in tokens)."""
    try:
        record = json.loads(text)
    except ValueError as e:
        raise _usage_error(path, line, f"not JSON ({e})") from None
    if not isinstance(record, dict):
        raise _usage_error(path, line, f"not a JSON object but {type(record).__name__}")
    missing = [name for name in FIELDS if name not in record]
    if missing:
        raise _usage_error(path, line, f"missing field {missing[0]!r}")
    timestamp_ms, input_length, output_length, hash_ids = (record[name] for name in FIELDS)
    if not (_is_int(timestamp_ms) or type(timestamp_ms) is float) or not math.isfinite(timestamp_ms) \
            or timestamp_ms < 0:
        raise _usage_error(path, line, f"timestamp must be a non-negative number of ms, got {timestamp_ms!r}")
    if not _is_int(input_length) or input_length < 1:
        raise _usage_error(path, line, f"input_length must be an integer >= 1, got {input_length!r}")
    if not _is_int(output_length) or output_length < 0:
        raise _usage_error(path, line, f"output_length must be an integer >= 0, got {output_length!r}")
    if not isinstance(hash_ids, list) or not all(_is_int(h) for h in hash_ids):
        raise _usage_error(path, line, "hash_ids must be a list of integers")
    needed = -(-input_length // trace_block_size)
    if len(hash_ids) != needed:
        raise _usage_error(path, line, f"hash_ids has {len(hash_ids)} blocks, input_length {input_length} "
                                       f"needs {needed} at block size {trace_block_size}")
    return TraceRequest(line, float(timestamp_ms), input_length, output_length, tuple(hash_ids))


def read_trace(path: str | os.PathLike[str], trace_block_size: int = TRACE_BLOCK_TOKENS) -> list[TraceRequest]:
    """Every request of a Mooncake-format trace, in file order; blank lines skipped.

    Read line by line. Raises ExperimentError (exit 2) naming file:line for any bad line, a
    timestamp earlier than the line before it, or a file with no request."""
    if not _is_int(trace_block_size) or trace_block_size < 1:
        raise _usage_error(path, 1, f"trace block size must be a positive integer, got {trace_block_size!r}")
    requests: list[TraceRequest]
    requests, line = [], 0
    opener = gzip.open if str(path).endswith(".gz") else open        # text lines either way
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                request = _parse_record(text, path, line, trace_block_size)
                if requests and request.timestamp_ms < requests[-1].timestamp_ms:
                    raise _usage_error(path, line, f"timestamp {request.timestamp_ms:g} ms goes backwards from "
                                                   f"{requests[-1].timestamp_ms:g} ms on line {requests[-1].line}")
                requests.append(request)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise _usage_error(path, line + 1, f"cannot read the trace ({e})") from None
    if not requests:
        raise _usage_error(path, max(line, 1), "no requests")
    return requests


def check_block_sizes(trace_block_size: int, engine_block_size: int, path: str | os.PathLike[str]) -> None:
    """Exit 2 unless the trace's block size (tokens) is a positive multiple of the engine's."""
    if not (_is_int(trace_block_size) and _is_int(engine_block_size) and engine_block_size > 0
            and trace_block_size > 0 and trace_block_size % engine_block_size == 0):
        raise _usage_error(path, 1, f"trace block size {trace_block_size} tokens is not a positive multiple "
                                    f"of the engine's block size {engine_block_size} tokens")


# ---- blocks and prefixes -----------------------------------------------------------------------

def prefix_keys(hash_ids: Iterable[int]) -> list[int]:
    """One key per block that stands for the whole prefix of hash IDs up to it: equal keys, equal
    prefixes. key_0 = hash((0, h_0)), key_k = hash((key_{k-1}, h_k))."""
    keys, key = [], 0
    for hash_id in hash_ids:
        key = hash((key, hash_id))
        keys.append(key)
    return keys


def block_tokens(request: TraceRequest, trace_block_size: int = TRACE_BLOCK_TOKENS) -> list[int]:
    """Tokens of each trace block of the prompt: trace_block_size but the last, which holds the rest."""
    n = len(request.hash_ids)
    return [trace_block_size] * (n - 1) + [request.input_length - (n - 1) * trace_block_size]


def _add_unique(seen_tokens, request, trace_block_size, keys=None):
    """Record the request's blocks in seen_tokens (prefix key -> max tokens); the tokens added."""
    added = 0
    keys = prefix_keys(request.hash_ids) if keys is None else keys
    for key, tokens in zip(keys, block_tokens(request, trace_block_size)):
        old = seen_tokens.get(key, 0)
        if tokens > old:
            seen_tokens[key] = tokens
            added += tokens - old
    return added


def unique_tokens(requests: Iterable[TraceRequest], trace_block_size: int = TRACE_BLOCK_TOKENS) -> int:
    """Tokens of the distinct prefix blocks (max tokens seen per key): what an infinite cache
    would hold of these prompts."""
    seen_tokens: dict[int, int] = {}
    return sum(_add_unique(seen_tokens, r, trace_block_size) for r in requests)


def _round_reusable(tokens, input_length, engine_block_size):
    """At most input_length - 1 tokens (the engine computes the last one), whole engine blocks."""
    return min(tokens, input_length - 1) // engine_block_size * engine_block_size


# ---- the window --------------------------------------------------------------------------------

def _check_window_arguments(path, start_s, duration_s, num_requests):
    for bad, what in ((start_s < 0, f"start must be >= 0 s, got {start_s}"),
                      (duration_s is not None and duration_s <= 0, f"duration must be > 0 s, got {duration_s}"),
                      (num_requests is not None and num_requests < 1, f"request count must be >= 1: {num_requests}")):
        if bad:
            raise _usage_error(path, 1, f"the window's {what}")


def _in_window(requests, start_ms, end_ms, num_requests, max_input_tokens):
    """(measured, skipped): the requests from start_ms to before end_ms, at most num_requests measured."""
    measured, skipped = [], []
    for r in requests:
        if r.timestamp_ms < start_ms:
            continue
        if (end_ms is not None and r.timestamp_ms >= end_ms) or \
                (num_requests is not None and len(measured) >= num_requests):
            break
        (skipped if max_input_tokens is not None and r.input_length > max_input_tokens else measured).append(r)
    return measured, skipped


def _history(preceding, trace_block_size, history_tokens, history_requests):
    """The last requests before the window: history_requests of them, or the shortest tail whose
    unique prefix tokens reach history_tokens (all if never), or none."""
    if history_requests is not None:
        return preceding[max(0, len(preceding) - history_requests):] if history_requests > 0 else []
    if history_tokens is None or history_tokens <= 0:
        return []
    seen_tokens, total, first = {}, 0, len(preceding)
    while first > 0 and total < history_tokens:
        first -= 1
        total += _add_unique(seen_tokens, preceding[first], trace_block_size)
    return preceding[first:]


def select_window(requests: Sequence[TraceRequest], path: str | os.PathLike[str], start_s: float = 0.0,
                  duration_s: float | None = None, num_requests: int | None = None, max_input_tokens: int | None = None,
                  history_tokens: int | None = None, history_requests: int | None = None,
                  trace_block_size: int = TRACE_BLOCK_TOKENS) -> TraceWindow:
    """The requests to replay (times in trace seconds, lengths in tokens) and the history before
    them. Requests over max_input_tokens are skipped and listed, in the window and in the history."""
    _check_window_arguments(path, start_s, duration_s, num_requests)
    start_ms = start_s * 1000.0
    end_ms = None if duration_s is None else (start_s + duration_s) * 1000.0
    measured, skipped = _in_window(requests, start_ms, end_ms, num_requests, max_input_tokens)
    if not measured:
        span = f"{requests[0].timestamp_ms / 1000:g}-{requests[-1].timestamp_ms / 1000:g} s" if requests else "empty"
        raise _usage_error(path, requests[-1].line if requests else 1,
                           f"no request in the window (start {start_s:g} s, duration {duration_s} s, "
                           f"max input {max_input_tokens} tokens; {len(skipped)} skipped; the trace spans {span})")
    preceding = [r for r in requests if r.timestamp_ms < start_ms
                 and (max_input_tokens is None or r.input_length <= max_input_tokens)]
    history = _history(preceding, trace_block_size, history_tokens, history_requests)
    duration = max(0.0, measured[-1].timestamp_ms / 1000.0 - start_s)
    return TraceWindow(history, measured, skipped, float(start_s), duration)


# ---- prompts -----------------------------------------------------------------------------------

def ordinary_token_ids(tokenizer: Any) -> numpy.ndarray:
    """The tokenizer's vocabulary without special or added tokens: sorted int32 ids."""
    excluded = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    ids = numpy.array([i for i in range(len(tokenizer)) if i not in excluded], dtype=numpy.int32)
    if ids.size == 0:
        raise ExperimentError("the tokenizer has no ordinary token to make prompts of", EXIT_USAGE)
    return ids


class PromptMaker:
    """Prompt token ids from hash IDs: each hash ID's block is trace_block_size ids drawn from
    vocab_ids, seeded by (seed, hash ID), so equal hash-ID prefixes give equal token prefixes."""

    def __init__(self, vocab_ids: numpy.ndarray, seed: int, trace_block_size: int = TRACE_BLOCK_TOKENS):
        self.vocab_ids = numpy.asarray(vocab_ids, dtype=numpy.int32)
        self.seed = int(seed) % SEED_MODULUS
        self.trace_block_size = trace_block_size
        self._cached_block = functools.lru_cache(maxsize=BLOCK_CACHE_SIZE)(self._draw_block)
        self._cached_json = functools.lru_cache(maxsize=BLOCK_CACHE_SIZE)(self._block_text)

    def _draw_block(self, hash_id):
        rng = numpy.random.default_rng([self.seed, hash_id % SEED_MODULUS])
        ids = self.vocab_ids[rng.integers(0, self.vocab_ids.size, size=self.trace_block_size)]
        ids.flags.writeable = False     # shared through the cache
        return ids

    def block(self, hash_id: int) -> numpy.ndarray:
        """The trace_block_size token ids (int32, read-only) of one hash ID."""
        return self._cached_block(int(hash_id))

    def prompt_ids(self, request: TraceRequest) -> list[int]:
        """The request's prompt: its blocks joined, cut to input_length tokens; plain ints."""
        ids = numpy.concatenate([self.block(h) for h in request.hash_ids])
        return ids[:request.input_length].tolist()

    def prompt_json(self, request: TraceRequest) -> bytes:
        """prompt_ids as a JSON array, bytes: each whole block's text is made once and cached, so
        that a prompt of tens of thousands of ids costs tens of microseconds, not milliseconds."""
        *whole, last = request.hash_ids
        cut = request.input_length - len(whole) * self.trace_block_size
        tail = self.block_json(last) if cut == self.trace_block_size else \
            ",".join(map(str, self.block(last)[:cut].tolist())).encode()
        return b"[" + b",".join([*(self.block_json(h) for h in whole), tail]) + b"]"

    def block_json(self, hash_id: int) -> bytes:
        """One block's ids as comma-separated text, bytes (cached beside the block)."""
        return self._cached_json(int(hash_id))

    def _block_text(self, hash_id):
        return ",".join(map(str, self.block(hash_id).tolist())).encode()


# ---- the ideal ledger and the LRU model --------------------------------------------------------

class IdealLedger:
    """Infinite cache, no eviction: what earlier requests of one cache namespace sent."""

    def __init__(self, engine_block_size: int, trace_block_size: int = TRACE_BLOCK_TOKENS):
        self.engine_block_size, self.trace_block_size = engine_block_size, trace_block_size
        self._sent_tokens: dict[int, int] = {}          # prefix key -> the most tokens of that block any request sent

    def reusable_tokens(self, request: TraceRequest, keys: Sequence[int] | None = None) -> int:
        """Tokens of the longest prefix earlier requests sent, at most input_length - 1, whole engine blocks."""
        keys = prefix_keys(request.hash_ids) if keys is None else keys
        found = 0
        for key, tokens in zip(keys, block_tokens(request, self.trace_block_size)):
            sent = self._sent_tokens.get(key)
            if sent is None:
                break
            found += min(sent, tokens)
            if sent < tokens:
                break
        return _round_reusable(found, request.input_length, self.engine_block_size)

    def record(self, request: TraceRequest, keys: Sequence[int] | None = None) -> None:
        """Remember, per prefix key, the most tokens of that block any request sent."""
        _add_unique(self._sent_tokens, request, self.trace_block_size, keys)

    def observe(self, request: TraceRequest, keys: Sequence[int] | None = None) -> int:
        """reusable_tokens, then record the request: the tokens it could reuse."""
        keys = prefix_keys(request.hash_ids) if keys is None else keys
        reusable = self.reusable_tokens(request, keys)
        self.record(request, keys)
        return reusable


class PrefixCacheSimulator:
    """vLLM's prefix cache as an LRU of trace blocks weighted in full engine blocks.

    A request's blocks go back to the free queue tail first, so after a request its output blocks
    are the least recent of its blocks and its first prompt block the most recent."""

    def __init__(self, capacity_tokens: int, engine_block_size: int, trace_block_size: int = TRACE_BLOCK_TOKENS):
        self.capacity_tokens, self.engine_block_size, self.trace_block_size = \
            capacity_tokens, engine_block_size, trace_block_size
        self.capacity_blocks = capacity_tokens // engine_block_size
        self._full_blocks = trace_block_size // engine_block_size    # engine blocks of a whole trace block
        self._nodes: collections.OrderedDict[int | tuple[str, int], int]
        self._nodes = collections.OrderedDict()     # prefix key -> cached engine blocks; last = most recent
        self._cached_blocks = 0
        self._outputs = 0                           # anonymous output nodes made so far

    def _last_blocks(self, request, n):
        return (request.input_length - (n - 1) * self.trace_block_size) // self.engine_block_size

    def _output_blocks(self, request):
        """Full engine blocks past the prompt's: KV of the prompt and all but the last output token."""
        computed_tokens = request.input_length + max(0, request.output_length - 1)
        return computed_tokens // self.engine_block_size - request.input_length // self.engine_block_size

    def lookup(self, request: TraceRequest, keys: Sequence[int]) -> int:
        """Tokens of the request's prompt the cache holds now, capped and in whole engine blocks."""
        nodes, n, found = self._nodes, len(keys), 0
        full, last = self._full_blocks, self._last_blocks(request, n)
        for i, key in enumerate(keys):
            held = nodes.get(key)
            if held is None:
                break
            wanted = full if i < n - 1 else last
            found += held if held < wanted else wanted
            if held < wanted:
                break
        return _round_reusable(found * self.engine_block_size, request.input_length, self.engine_block_size)

    def store(self, request: TraceRequest, keys: Sequence[int]) -> None:
        """The request's blocks back in the cache: output least recent, first prompt block most
        recent; then evict least-recent nodes down to capacity."""
        nodes, n, added = self._nodes, len(keys), 0
        output_blocks = self._output_blocks(request)
        if output_blocks:
            self._outputs += 1
            nodes[("output", self._outputs)] = output_blocks
            added += output_blocks
        full, last = self._full_blocks, self._last_blocks(request, n)
        for i in range(n - 1, -1, -1):
            key, wanted = keys[i], (full if i < n - 1 else last)
            held = nodes.get(key)
            if held is None:
                if wanted:
                    nodes[key] = wanted
                    added += wanted
            else:
                nodes.move_to_end(key)
                if wanted > held:
                    nodes[key] = wanted
                    added += wanted - held
        self._cached_blocks += added
        self._evict()

    def _evict(self):
        nodes, cached = self._nodes, self._cached_blocks
        while cached > self.capacity_blocks:
            cached -= nodes.popitem(last=False)[1]
        self._cached_blocks = cached

    def observe(self, request: TraceRequest, keys: Sequence[int] | None = None) -> int:
        """The tokens this request finds cached; then the cache as vLLM leaves it after the request."""
        if self.capacity_blocks <= 0:
            return 0
        keys = prefix_keys(request.hash_ids) if keys is None else keys
        reusable = self.lookup(request, keys)
        self.store(request, keys)
        return reusable


# ---- capacities --------------------------------------------------------------------------------

CAPACITY_PATTERN = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)([xkKM]?)$")
SUFFIX_TOKENS = {"": 1, "k": 1000, "K": 1000, "M": 1000000}


def _capacity_tokens(item, reference_tokens, text):
    """One capacity: 'Nx' (N * reference_tokens), a token count, or one with a k/K/M suffix."""
    match = CAPACITY_PATTERN.match(item)
    if not match:
        raise ExperimentError(f"capacity {item!r} in {text!r} is not Nx, a token count, or a count "
                              f"with k or M (200k, 1.5M)", EXIT_USAGE)
    number, suffix = decimal.Decimal(match.group(1)), match.group(2)
    if suffix == "x":
        if reference_tokens is None:
            raise ExperimentError(f"capacity {item!r} is a multiple of the KV cache: give its size in tokens "
                                  f"with --kv-capacity-tokens, or capacities in tokens", EXIT_USAGE)
        return int(number * reference_tokens)
    return int(number * SUFFIX_TOKENS[suffix])


def parse_capacities(text: str, reference_tokens: int | None) -> list[tuple[str, int]]:
    """'0.5x,1x,200k,1000000' -> [(label, tokens)], in the given order; duplicates refused."""
    labels_by_tokens: dict[int, str]
    capacities, labels_by_tokens = [], {}
    for item in (part.strip() for part in text.split(",")):
        tokens = _capacity_tokens(item, reference_tokens, text)
        if tokens in labels_by_tokens:
            raise ExperimentError(f"capacities {labels_by_tokens[tokens]!r} and {item!r} in {text!r} are both "
                                  f"{tokens} tokens", EXIT_USAGE)
        labels_by_tokens[tokens] = item
        capacities.append((item, tokens))
    return capacities


def simulate_capacities(window: TraceWindow, capacities: Sequence[tuple[str, int]], engine_block_size: int,
                        trace_block_size: int = TRACE_BLOCK_TOKENS) -> dict[str, Any]:
    """History then measured requests through the ideal ledger and one LRU model per capacity;
    the measured requests' reusable tokens and shares of their input tokens, as a JSON-able dict."""
    ledger = IdealLedger(engine_block_size, trace_block_size)
    simulators = [PrefixCacheSimulator(tokens, engine_block_size, trace_block_size) for _, tokens in capacities]
    ideal, reusable, first_measured = 0, [0] * len(simulators), len(window.history)
    for n, request in enumerate(window.history + window.measured):
        keys = prefix_keys(request.hash_ids)                  # once for the ledger and every model
        counted = n >= first_measured                         # the history only warms the caches
        ideal += ledger.observe(request, keys) * counted
        for i, simulator in enumerate(simulators):
            reusable[i] += simulator.observe(request, keys) * counted
    input_tokens = sum(r.input_length for r in window.measured)
    return {
        "input_tokens": input_tokens, "ideal_reusable_tokens": ideal, "ideal_share": ideal / input_tokens,
        "engine_block_size": engine_block_size, "trace_block_size": trace_block_size,
        "requests": len(window.measured), "history_requests": len(window.history),
        "capacities": [{"label": label, "capacity_tokens": tokens, "reusable_tokens": found,
                        "share": found / input_tokens, "share_of_ideal": found / ideal if ideal else None}
                       for (label, tokens), found in zip(capacities, reusable)],
    }
