"""The load workload: P documents shared by many requests, a fresh query each, drawn uniformly
or by Zipf; the closed-loop and Poisson senders; each request's record; one condition's figures
at one level.
"""
from __future__ import annotations
import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .audit import cache_state
from .defaults import LOAD_NUM_REQUESTS, LOAD_REQUESTS_PER_CLIENT
from .engine_api import StreamedResponse
from .errors import first_line
from .prompts import generate_context, query_stream, special_prefix_ids

if TYPE_CHECKING:
    import aiohttp

    from .http_client import HttpClient
    from .settings import LoadSettings

# a request as LoadWorkload.requests builds it: (token ids, cache salt, document)
Prompt = tuple[list[int], str, int]


def zipf_weights(num_prefixes: int, skew: float) -> np.ndarray:
    """How often each document is drawn: uniform at skew 0, else proportional to 1/rank**skew."""
    weights = 1.0 / np.arange(1, num_prefixes + 1) ** skew
    return weights / weights.sum()


class LoadWorkload:
    """P documents of A tokens. A request is [document, Q] with a fresh Q, its document drawn
    uniformly (or by Zipf, skew > 0); cached requests share their level's cache namespace, a
    cold request has a salt of its own."""

    def __init__(self, tokenizer: Any, size_a: int, num_prefixes: int, skew: float, block: int, seed: int, run_id: str):
        self.tokenizer, self.block, self.run_id, self.skew = tokenizer, block, run_id, skew
        special = special_prefix_ids(tokenizer)
        self.documents = [special + tokenizer.encode(generate_context(size_a, f"Document {k} of {size_a}", tokenizer),
                                                     add_special_tokens=False) for k in range(num_prefixes)]
        self.full_tokens = len(self.documents[0]) // block * block      # what a hit finds: the document's full blocks
        shared_len = block - len(self.documents[0]) % block
        self.queries = query_stream(tokenizer, shared_len, random.Random(f"load:{seed}:{size_a}"))
        self.rng = np.random.default_rng(seed)

    def draws(self, num_prefixes: int, count: int) -> list[int]:
        return self.rng.choice(num_prefixes, size=count, p=zipf_weights(num_prefixes, self.skew)).tolist()

    def requests(self, documents: Iterable[int], condition: str, namespace: str) -> list[Prompt]:
        """(token ids, cache salt, document) of every request, built before the clock starts."""
        made = []
        for k, doc in enumerate(documents):
            q = self.tokenizer.encode(next(self.queries), add_special_tokens=False)
            salt = namespace if condition == "cached" else f"{namespace}-cold-{k}"
            made.append((self.documents[doc] + q, salt, doc))
        return made


def requests_per_level(level: Mapping[str, Any], load: LoadSettings) -> int:
    """--num-requests if given, else LOAD_NUM_REQUESTS, or LOAD_REQUESTS_PER_CLIENT per client."""
    if load.num_requests:
        return load.num_requests
    return max(LOAD_NUM_REQUESTS, LOAD_REQUESTS_PER_CLIENT * (level["concurrency"] or 0))


def level_name(level: Mapping[str, Any]) -> str:
    if level["concurrency"] is not None:
        return f"concurrency {level['concurrency']}"
    return f"{level['request_rate']:g} req/s"


def load_levels(load: LoadSettings) -> list[dict[str, Any]]:
    """The sweep's levels: one per concurrency or rate at P documents, or (a working-set sweep)
    one per P at one load."""
    if load.concurrency:
        loads: list[dict[str, Any]] = [{"concurrency": c, "request_rate": None} for c in load.concurrency]
    elif load.request_rate:
        loads = [{"concurrency": None, "request_rate": r} for r in load.request_rate]
    else:
        loads = [{"concurrency": 1, "request_rate": None}]
    if len(load.num_prefixes) > 1:
        return [{**loads[0], "num_prefixes": p} for p in load.num_prefixes]
    return [{**kind, "num_prefixes": load.num_prefixes[0]} for kind in loads]


def sweep_schedule(num_levels: int, repeats: int) -> list[tuple[int, int]]:
    """(repeat, level index) in the order they run: every level once per pass, the passes
    alternating up and down, so that a drift over the sweep lands on every level alike."""
    return [(rep, i) for rep in range(repeats)
            for i in (range(num_levels) if rep % 2 == 0 else reversed(range(num_levels)))]


async def send_all(client: HttpClient, session: aiohttp.ClientSession, model: str, prompts: Sequence[Prompt],
                   level: Mapping[str, Any], max_tokens: int, seed: int, route: Sequence[str] | None = None,
                   after_each: Callable[[int, StreamedResponse], Awaitable[None]] | None = None
                   ) -> tuple[list[StreamedResponse | None], float]:
    """Every prompt of one condition at one load level: a closed loop of `concurrency` clients
    sending back to back, or Poisson arrivals at `request_rate`. A failed request is recorded
    with its error, not raised, and no request is sent after it (a server that stopped
    answering must not hold the level for num_requests x --request-timeout). Returns (each
    request's StreamedResponse, None for those never sent; the level's start in perf_counter
    s). route: document k's requests go to route[k % len(route)] instead of the client's server.
    after_each(k, record): awaited after each request of a closed loop, before its client's next."""
    # every body is serialised before the clock starts, as stream() does
    bodies = [json.dumps({"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0.0,
                          "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
                          "cache_salt": salt}).encode() for ids, salt, _ in prompts]
    urls = [route[doc % len(route)] if route else None for _, _, doc in prompts]
    records: list[StreamedResponse | None] = [None] * len(prompts)
    failed = asyncio.Event()

    async def one(k):
        started = time.perf_counter()
        try:
            records[k] = await client.stream_on(session, bodies[k], urls[k])
        except Exception as e:          # one request's failure is a fact of the level, not the end of the run
            records[k] = StreamedResponse(started, [], None, time.perf_counter(), f"{type(e).__name__}: {first_line(e)}")
            failed.set()

    t0 = time.perf_counter()
    if level["concurrency"] is not None:
        queue = iter(range(len(prompts)))

        async def client_loop():
            for k in queue:
                if failed.is_set():
                    break
                await one(k)
                if after_each is not None and records[k].error is None:
                    await after_each(k, records[k])
        await asyncio.gather(*[client_loop() for _ in range(level["concurrency"])])
    else:
        arrivals = np.cumsum(np.random.default_rng(seed).exponential(1.0 / level["request_rate"], len(prompts)))
        tasks = []
        for k, at in enumerate(arrivals):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if failed.is_set():
                break
            tasks.append(asyncio.create_task(one(k)))
        await asyncio.gather(*tasks)
    return records, t0


def request_record(k: int, prompt: Prompt, record: StreamedResponse | None, t0: float, condition: str, full_tokens: int,
                   audited: bool, sources: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The JSON record of load request k (prompt: its ids, salt and document) from its
    StreamedResponse (None: never sent), its times in s since the level began (t0); sources:
    where its cached tokens came from (prometheus.one_request_sources), where known."""
    ids, salt, doc = prompt
    if record is None:
        record = StreamedResponse(t0, [], None, t0, "not sent: an earlier request of the level failed")
    sent, token_times, usage, ended, error = (record.sent_s, record.token_times_s, record.usage, record.ended_s,
                                              record.error)
    usage = usage or {}
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens") if audited and error is None else None
    output_tokens = usage.get("completion_tokens", len(token_times))
    first = token_times[0] if token_times else None
    if error is None and first is None:
        error = "the stream ended without a token"
    if error is None and not usage:
        error = "no usage in the last chunk (stream_options.include_usage)"
    return {
        "index": k, "condition": condition, "document": doc, "start_s": sent - t0, "end_s": ended - t0,
        "ttft_ms": (first - sent) * 1e3 if first is not None else None,
        "e2e_ms": (ended - sent) * 1e3,
        "tpot_ms": (token_times[-1] - first) * 1e3 / (output_tokens - 1) if first is not None and output_tokens > 1 else None,
        "prompt_tokens": usage.get("prompt_tokens", len(ids)), "output_tokens": output_tokens if error is None else 0,
        "cached_tokens": cached, "document_cached_tokens": full_tokens,
        "cache_state": cache_state(cached, full_tokens) if cached is not None else None,
        "error": error,
        **({key: (sources or {}).get(key) for key in ("hbm_cached_tokens", "tier_cached_tokens")} if sources is not None
           else {}),
    }
