"""A vLLM server as the trial protocol drives an engine (ServerEngine), and the checks before
a run through it: the served model, the tokenizer, the prompts' fit, the audit probe; what the
JSON records of the server.
"""
from __future__ import annotations
import json
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from .audit import sum_counters, wait_for_counters
from .defaults import (CONDITIONS, CONNECTION, DETAILS_FLAG, EMBEDDED_KEEP_ALIVE_S, IDLE_RECONNECT_S,
                       REMOTE_DEVICE, SERVER_PHASE, TIER_CONDITION)
from .engine_api import RequestResult
from .errors import ExperimentError, first_line
from .http_client import HttpClient, no_usage
from .host import machine_info
from .prometheus import (REQUEST_TIME_HISTOGRAMS, REQUEST_TOKEN_HISTOGRAMS, cache_config, engine_cache_config, label_int,
                         one_request_sources, one_request_times, parse_metrics, request_time_totals, server_counters,
                         source_totals, split_engines, Metrics)
from .prompts import check_context_fits, special_prefix_ids
from .provenance import device_name, engine_environment, installed_version
from .servers import EmbeddedServer
from .tiers import offloading_connector
from .settings import Phase1Settings

# Why a server's run has no GPU-busy segment (gpu_busy.py): vLLM's profiler writes its traces on the
# server's own disk, which a client may not reach
GPU_BUSY_NOT_THROUGH_A_SERVER = "not measured through a server (the GPU's clock is read offline only: phase 2)"


class ServerEngine:
    """A vLLM server as protocol.run_configs drives an engine: request, counters,
    kv_capacity, reset_prefix_cache. shared: other clients may use the server too."""
    phase = SERVER_PHASE
    shared = True

    def __init__(self, client: HttpClient, model: str, audited: bool = True, metrics_urls: list[str] | None = None,
                 route: list[str] | None = None, tier_description: dict[str, Any] | Literal[False] | None = None):
        self.client, self.model, self.audited = client, model, audited
        # the servers whose /metrics count this run's requests: the front itself, or the replicas behind a router
        self.metrics_urls = metrics_urls or [client.base_url]
        # the fleet policy ideal: document k's requests go straight to route[k % N]; None: all to the client's server
        self.route = route
        self._cache_configs: dict[str, dict[str, str]] | None = None
        self.connections_before = client.connections_opened
        self.last_end = 0.0
        # the server's TTFT / queue / prefill histograms as they stood after the last request
        # (read outside the timed region; the next request's own times are what it adds); False
        # once a request's reading never came: the rest of the run reads none. Read only where the
        # front publishes them itself, over the one kept connection (behind a router the replicas'
        # /metrics would need connections of their own between timed requests)
        self.times_after_last: dict[str, Any] | None = None
        self.request_times_readable = self.metrics_urls == [client.base_url]
        # the server's second cache tier (tier()), where its flags say (an embedded server); False: it has
        # none; None: asked of the server when first needed
        self.tier_description = tier_description

    def server_engines(self) -> list[list[tuple[str, Metrics]]]:
        """[[(name, parsed /metrics)] of each engine of a server] for every server behind the
        front: one engine per server, or one per engine labelled apart (--data-parallel-size)."""
        return [split_engines(url, parse_metrics(self.client.get_url(url + "/metrics"))) for url in self.metrics_urls]

    def replica_metrics(self) -> list[tuple[str, Metrics]]:
        """[(name, parsed /metrics)] of every engine behind the front."""
        return [engine for engines in self.server_engines() for engine in engines]

    def request(self, prompt_ids: list[int], max_tokens: int, cache_salt: str | None = None) -> RequestResult:
        body = {"model": self.model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0.0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        if cache_salt is not None:
            body["cache_salt"] = cache_salt
        times_before = (self.times_after_last or self.request_times()) if self.request_times_readable else {}
        if time.perf_counter() - self.last_end > IDLE_RECONNECT_S:
            self.client.ensure_connection()
        opened = self.client.connections_opened
        response = self.client.stream(body)
        sent, token_times, usage, ended = response.sent_s, response.token_times_s, response.usage, response.ended_s
        if usage is None:
            raise no_usage(self.client.base_url)
        details = usage.get("prompt_tokens_details") or {}
        first = token_times[0] if token_times else ended
        gaps = np.diff(token_times) * 1e3
        output_tokens = usage.get("completion_tokens", len(token_times))
        own_times = self.own_request_times(times_before, usage.get("prompt_tokens"), output_tokens)
        if own_times and own_times["engine_ttft_ms"] > (first - sent) * 1e3:
            own_times = None                # the server's TTFT cannot exceed the client's: not this request's
        # where its cached tokens came from, read from the same /metrics as its times
        sources: dict[str, Any] = one_request_sources(times_before.get("sources", {}), self.times_after_last.get("sources", {}),
                                                      usage.get("prompt_tokens")) if own_times and self.times_after_last else {}
        self.last_end = time.perf_counter()
        return RequestResult(
            wall_ms=(ended - sent) * 1e3,
            ttft_ms=(first - sent) * 1e3,
            prompt_tokens=usage.get("prompt_tokens"),
            cached_tokens=details.get("cached_tokens") if self.audited else None,
            output_tokens=output_tokens,
            # the server's own TTFT, queue and prefill time of this request (None: not readable)
            engine_ttft_ms=own_times["engine_ttft_ms"] if own_times else None,
            prefill_ms=own_times["prefill_ms"] if own_times else None,
            queue_ms=own_times["queue_ms"] if own_times else None,
            decode_ms=(token_times[-1] - first) * 1e3 if token_times else None,
            tpot_ms=(token_times[-1] - first) * 1e3 / (output_tokens - 1) if output_tokens > 1 and token_times else None,
            itl_ms=gaps.tolist() if max_tokens > 1 else None,
            new_connection=self.client.connections_opened > opened,
            **(sources if self.audited else {}),
        )

    def request_times(self) -> dict[str, Any]:
        """The server's TTFT / queue / prefill histogram totals over every engine behind the front;
        {} where /metrics cannot be read (the breakdown is optional: a run goes on without it)."""
        try:
            engines = [metrics for _, metrics in self.replica_metrics()]
        except ExperimentError:
            return {}
        return {**request_time_totals(engines), "sources": source_totals(engines)}

    def own_request_times(self, before: Mapping[str, Any], prompt_tokens: int | None, output_tokens: int,
                          wait_s: float = 2.0) -> dict[str, float] | None:
        """What the request just ended added to the server's histograms (prometheus.one_request_times),
        read once the server has recorded it (it records a request as the request finishes, at
        about the time its last chunk is sent); None where no single request's times can be read.
        A reading that never comes (an engine this run cannot see served it) ends the readings."""
        if not before:
            self.times_after_last = None
            return None
        deadline = time.perf_counter() + wait_s
        while True:
            after = self.request_times()
            fields = [f for f in (*REQUEST_TIME_HISTOGRAMS, *REQUEST_TOKEN_HISTOGRAMS) if f in before]
            grown = set(after) == set(before) and all(after[f][0] > before[f][0] for f in fields)
            if grown or time.perf_counter() > deadline:
                break
            time.sleep(0.005)
        self.request_times_readable = grown
        self.times_after_last = after if grown else None
        return one_request_times(before, after, prompt_tokens, output_tokens)

    def reset_prefix_cache(self) -> bool:
        """Nothing to reset: every run hits in a cache namespace of its own (run_configs gives a
        shared engine's warmup and hits a run salt). A deployment's cache is left alone."""
        return True

    def empty_hbm_prefix_cache(self) -> bool:
        """The cache_tier condition: POST /reset_prefix_cache, which empties the GPU prefix cache
        and keeps the tier's (reset_external defaults to false). vLLM serves it only with
        VLLM_SERVER_DEV_MODE=1, which phase 1 sets on a server it starts with a tier."""
        try:
            return bool(self.client.post("/reset_prefix_cache", {}).get("success", True))
        except ExperimentError as e:
            raise ExperimentError(f"the {TIER_CONDITION} condition empties the server's GPU prefix cache before each "
                                  f"of its requests, and POST /reset_prefix_cache failed ({first_line(e)}): start "
                                  f"the server with VLLM_SERVER_DEV_MODE=1")

    def tier(self) -> dict[str, Any] | None:
        """The server's second cache tier, or None: tier_description, set from its flags where phase 1
        starts it; for a server reached by --base-url, a KV connector that has been asked for prefixes
        (vllm:external_prefix_cache_queries grew: the audit probe asks it), with
        vllm:cache_config_info's kv_offloading_size where that is the native tier."""
        if self.tier_description is None:           # asked once: a server that died later is not asked again
            self.tier_description = False
            counters = (self.counters() or {}) if len(self.metrics_urls) == 1 else {}
            if counters.get("external_prefix_cache_queries"):
                labels = next(iter(self.cache_configs().values()), {})
                size = labels.get("kv_offloading_size")
                offloading = size not in (None, "", "None")
                backend = labels.get("kv_offloading_backend") if offloading else None
                # the server's environment is not known here: VLLM_USE_SIMPLE_KV_OFFLOAD is taken as unset
                self.tier_description = {"connector": offloading_connector(backend, {}) or "a KV connector",
                                         "backend": backend,
                                         "size_gib": float(size) if offloading and size is not None else None, "extra_config": {}}
        return self.tier_description or None

    def counters(self) -> dict[str, Any] | None:
        if not self.audited:
            return None
        return sum_counters([server_counters(metrics) for _, metrics in self.replica_metrics()])

    def kv_capacity(self) -> tuple[int, int] | None:
        """(KV blocks of the smallest engine, block size), or None: what any one request can
        count on, wherever it lands (phase 2's check_cache_holds)."""
        layouts = self.replica_layouts().values()
        if not layouts or None in layouts:
            return None
        return min(layout for layout in layouts if layout is not None)     # none is None (checked above)

    def gpu_busy_unavailable(self) -> str | None:
        return GPU_BUSY_NOT_THROUGH_A_SERVER

    def total_kv_capacity_tokens(self) -> int | None:
        """KV capacity in tokens of all engines together, or None if one does not say."""
        capacities = self.replica_capacities().values()
        return None if not capacities or None in capacities else sum(c for c in capacities if c is not None)

    def replica_capacities(self) -> dict[str, int | None]:
        """{engine name: KV capacity in tokens (None if not reported)}."""
        return {name: layout[0] * layout[1] if layout else None for name, layout in self.replica_layouts().items()}

    def replica_layouts(self) -> dict[str, tuple[int, int] | None]:
        """{engine name: (KV blocks, block size), or None if not reported}."""
        layouts = {}
        for name, labels in self.cache_configs().items():
            blocks, size = label_int(labels, "num_gpu_blocks"), label_int(labels, "block_size")
            layouts[name] = (blocks, size) if blocks and size else None
        return layouts

    def cache_configs(self) -> dict[str, dict[str, str]]:
        """{engine name: its vllm:cache_config_info labels}, read from each /metrics once: an
        engine's cache layout does not change while it runs, and after a failure it may not answer."""
        if self._cache_configs is None:
            self._cache_configs = {name: engine_cache_config(cache_config(metrics), len(engines))
                                   for engines in self.server_engines() for name, metrics in engines}
        return self._cache_configs


def served_model(client: HttpClient, wanted: str | None) -> dict[str, Any]:
    """The id to send as "model": wanted if the server serves it, else its only model."""
    cards = client.get("/v1/models").get("data", [])
    ids = [card["id"] for card in cards]
    if wanted is None and len(ids) == 1:
        return cards[0]
    for card in cards:
        if card["id"] == wanted:
            return card
    raise ExperimentError(f"{client.base_url} serves {ids}, not {wanted!r}: pass --model with one of them")


def load_tokenizer(name: str, client: HttpClient, model: str) -> Any:
    """The local tokenizer, checked against the server's own /tokenize on a sample text. First
    the fast tokenizer's generic class (transformers' PreTrainedTokenizerFast, from the model's
    tokenizer.json; it imports no torch, where AutoTokenizer does: seconds of every run), kept
    where it encodes the sample as the server does; else the model's own class (AutoTokenizer),
    which must."""
    sample = "Prefix caching reuses the KV blocks of a shared prompt prefix, 1234 times."
    try:
        served = client.post("/tokenize", {"model": model, "prompt": sample})["tokens"]
    except ExperimentError:                     # a server without /tokenize: nothing to compare
        served = None
    if served is not None:
        from transformers import PreTrainedTokenizerFast
        try:
            generic = PreTrainedTokenizerFast.from_pretrained(name)
        except Exception:                       # no tokenizer.json (a slow tokenizer only): the model's own class
            generic = None
        if generic is not None and generic.encode(sample) == served:
            return generic
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as e:
        raise ExperimentError(f"the tokenizer {name!r} cannot be loaded here ({first_line(e)}): pass --tokenizer "
                              f"with the served model's folder or hub id")
    if served is not None and served != tokenizer.encode(sample):
        raise ExperimentError(f"the tokenizer {name!r} does not match the server's (/tokenize differs): pass "
                              f"--tokenizer with the served model's")
    return tokenizer


def prefix_cache_queries_growth(before: Mapping[str, Any], now: Mapping[str, Any] | None) -> float:
    """Tokens the prefix cache was queried for since before (0 while the server gives no reading)."""
    return now["prefix_cache_queries"] - before["prefix_cache_queries"] if now else 0


def check_audit_possible(engine: ServerEngine, tokenizer: Any, allow_unaudited: bool) -> str | None:
    """One untimed request: does the server report cached tokens? Without them nothing can be
    audited; that is refused unless allow_unaudited. Returns the reason a run is unaudited, or None."""
    before = engine.counters()
    probe = engine.request(special_prefix_ids(tokenizer) + tokenizer.encode("cache probe", add_special_tokens=False),
                           1, f"probe-{os.getpid()}-{time.time()}")
    if probe.cached_tokens is not None:
        if before is not None:          # a server without prefix-cache counters: nothing to wait for
            if probe.prompt_tokens is None:     # a server that says its cached tokens says its prompt tokens
                raise ExperimentError(f"{engine.client.base_url} did not say the probe's prompt tokens (usage)")
            # arg-type: mypy takes the counters' type from before, narrowed to not None, and then refuses counters()
            wait_for_counters(engine.counters, prefix_cache_queries_growth, before,  # type: ignore[arg-type]
                              probe.prompt_tokens)
        return None
    reason = (f"the server does not report cached tokens (usage.prompt_tokens_details): it runs without "
              f"{DETAILS_FLAG}")
    if not allow_unaudited:
        raise ExperimentError(f"{reason}; restart it with that flag, or pass --allow-unaudited to measure it unaudited")
    engine.audited = False
    return reason + "; nothing says which requests really hit the cache"


def prepare(client: HttpClient, settings: Phase1Settings, model_dir: str | None, metrics_urls: list[str] | None = None,
            route: list[str] | None = None, tier_description: dict[str, Any] | Literal[False] | None = None
            ) -> tuple[ServerEngine, Any, dict[str, Any], str | None]:
    """The checks before a run (settings: Phase1Settings), on the server (or front) client talks
    to: the served model, the tokenizer, the prompts' fit, the audit probe. Returns (engine,
    tokenizer, card, unaudited); the engine names the served model's id."""
    card = served_model(client, None if model_dir else settings.server.model)
    model = card["id"]
    tokenizer = load_tokenizer(settings.server.tokenizer or model_dir or card.get("root") or model, client, model)
    limit = card.get("max_model_len")
    check_context_fits([(settings.load.document_tokens, 0)] if settings.load else settings.run.configs, limit,
                       len(special_prefix_ids(tokenizer)), settings.run.max_output_tokens,
                       f"the server's max_model_len is {limit}")
    engine = ServerEngine(client, model, metrics_urls=metrics_urls, route=route, tier_description=tier_description)
    unaudited = check_audit_possible(engine, tokenizer, settings.server.allow_unaudited)
    return engine, tokenizer, card, unaudited


def add_phase1_stats(result: Mapping[str, Any], unaudited: str | None) -> None:
    """What phase 1 adds to phase 2's result: per condition the warmup TTFT (its discarded
    rounds' mean), time per output token and inter-token latency of the throughput requests,
    the server's own TTFT beside the client's, and the unaudited mark."""
    for c in (*CONDITIONS, TIER_CONDITION):
        if c not in result:
            continue
        discarded = [t["ttft_ms"] for t in result[c]["discarded_trials"]]
        throughput = [t["throughput_request"] for t in result[c]["trials"]]
        tpot = [r["tpot_ms"] for r in throughput if r["tpot_ms"] is not None]
        itl = [gap for r in throughput for gap in (r["itl_ms"] or [])]
        result[c]["stats"].update({
            "warmup_time_mean": float(np.mean(discarded)) if discarded else None,
            "tpot_mean": float(np.mean(tpot)) if tpot else None,
            "itl_median": float(np.median(itl)) if itl else None,
            "itl_p99": float(np.percentile(itl, 99)) if itl else None,
        })
    counters = result["cache_audit"]["engine_counters"]
    if counters:
        ttft = counters["server_ttft"]
        counters["server_ttft"]["mean_ms"] = ttft["sum_s"] / ttft["count"] * 1e3 if ttft["count"] else None
    if unaudited:
        result["cache_audit"].update({"ok": None, "unaudited": unaudited, "problems": []})


def server_environment(client: HttpClient, card: Mapping[str, Any], server: EmbeddedServer | None, vllm_flags: Sequence[str],
                       engine: ServerEngine) -> dict[str, Any]:
    """What the JSON records of the server: its vLLM version, cache layout, how it was reached.
    Both are read from the first server behind the front (a router has no /metrics)."""
    labels = next(iter(engine.cache_configs().values()))
    block = label_int(labels, "block_size")
    try:
        version = json.loads(client.get_url(engine.metrics_urls[0] + "/version")).get("version")
    except (ExperimentError, ValueError, AttributeError):
        version = None
    return {
        "vllm_version": version,
        # the embedded server runs in this Python; a server reached by --base-url may not
        "torch_version": installed_version("torch") if server else None,
        "device": device_name() if server else REMOTE_DEVICE,
        "block_size": block,
        # prefix-cache hits land on multiples of this (vLLM >= 0.30 can set it below block_size)
        "cache_block_size": label_int(labels, "prefix_match_unit") or block,
        "num_gpu_blocks": label_int(labels, "num_gpu_blocks"),
        "max_model_len": card.get("max_model_len"),
        "served_model": card["id"],
        "server": {"base_url": client.base_url, "embedded": server is not None,
                   "command": shlex.join(server.command) if server else None,
                   "start_s": server.start_s if server else None, "log": server.log_path if server else None,
                   "vllm_flags": vllm_flags,
                   "keep_alive_s": EMBEDDED_KEEP_ALIVE_S if server else None},
        "connection": CONNECTION,
        "python_version": sys.version.split()[0],
        "env_vars": engine_environment(os.environ),
        # the host this process ran on: the server's too where it is embedded
        "machine": machine_info(),
    }
