"""The load run: each level, cached against cold at the same load, over several passes; the
server's counters and gauges read around each condition; the figures over passes; the console
table; the file.
"""
from __future__ import annotations
import asyncio
import datetime
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast


from .audit import counter_growth, counter_problems, load_problems, wait_for_counters
from .defaults import (FLUSH_PROMPT_TOKENS, METRICS_POLL_S, QUERY_TOKENS, SERVER_PHASE, SERVER_PROG,
                       WARMUP_TOKENS)
from .errors import EXIT_AUDIT, EXIT_SETUP, ExperimentError
from .http_client import no_usage
from .load_figures import condition_stats, summarize_runs
from .load_workload import (LoadWorkload, level_name, load_levels, request_record, requests_per_level, send_all,
                            sweep_schedule)
from .prometheus import (API_SERVER_CPU, LOAD_METRICS, busy_shares,
                         gauge_summary, load_counters, metric_total, one_request_sources, parse_metrics, server_times,
                         source_totals, total_counters)
from .console import print_level
from .protocol import flush_engine_stats
from .result_schema import LoadLevel, LoadResult, build_load_result, build_request_audit
from .results import load_results_path, write_result
from .engine_api import LoadServer, StreamedResponse
from .settings import Phase1Settings

if TYPE_CHECKING:
    import aiohttp

    from .http_client import HttpClient
    from .result_schema import TraceResult


async def api_server_cpu_s(client: HttpClient, urls: Sequence[str],
                           session: aiohttp.ClientSession) -> dict[str, float | None]:
    """{url: CPU seconds each server's API server process has used; None where it does not
    report them or did not answer}."""
    texts = await asyncio.gather(*[client.get_async(url + "/metrics", session) for url in urls], return_exceptions=True)
    return {url: None if isinstance(text, BaseException) else metric_total(parse_metrics(text), API_SERVER_CPU)
            for url, text in zip(urls, texts)}


def replica_load_counters(engine: LoadServer) -> dict[str, dict[str, float | None]]:
    """{engine name: load_counters} of every engine behind the front."""
    return {name: load_counters(metrics) for name, metrics in engine.replica_metrics()}


def prompt_tokens_growth(before: Mapping[str, Mapping[str, Any]], after: Mapping[str, Mapping[str, Any]]) -> float | None:
    """Prompt tokens the engines behind the front counted since before, together; None where
    none of them says."""
    grown = [after[name]["prompt_tokens"] - before[name]["prompt_tokens"] for name in after
             if name in before and after[name]["prompt_tokens"] is not None
             and before[name]["prompt_tokens"] is not None]
    return sum(grown) if grown else None


async def sample_gauges(client: HttpClient, urls: Sequence[str], samples: list[dict[str, float | None]],
                        stop: asyncio.Event) -> None:
    """KV-cache usage (the fullest engine's) and queue lengths (all engines') from every
    server's /metrics, every METRICS_POLL_S until stop is set."""
    while not stop.is_set():
        try:
            found = [parse_metrics(await client.get_async(url + "/metrics")) for url in urls]
            usage = [value for metrics in found for _, value in metrics.get(LOAD_METRICS["kv_cache_usage"], [])]
            samples.append({"kv_cache_usage": max(usage) if usage else None,
                            **{key: sum(metric_total(metrics, LOAD_METRICS[key]) or 0 for metrics in found)
                               for key in ("running", "waiting")}})
        except Exception:           # a missed sample is no reason to stop the level
            pass
        try:
            await asyncio.wait_for(stop.wait(), METRICS_POLL_S)
        except asyncio.TimeoutError:
            pass


def tracks_sources(engine: LoadServer, level: Mapping[str, Any]) -> bool:
    """Can each request's sources (HBM, the tier, computed) be told apart? Only where the server
    has a tier, one client sends one request at a time, and one /metrics counts them all."""
    return bool(engine.audited and engine.tier() and level["concurrency"] == 1 and not engine.route
                and engine.metrics_urls == [engine.client.base_url])


def source_tracker(client: HttpClient, session: aiohttp.ClientSession, start: dict[str, float], wait_s: float = 2.0
                   ) -> tuple[Callable[[int, StreamedResponse], Awaitable[None]], dict[int, dict[str, float]]]:
    """send_all's after_each for a closed loop of one client: after each request, /metrics'
    prompt tokens by source, read until they have grown by that request's prompt (the server
    counts a request as it ends). Returns (after_each, {request index: its sources})."""
    sources: dict[int, dict[str, float]]
    sources, state = {}, {"last": start}

    async def after_each(k, record):
        prompt_tokens = (record.usage or {}).get("prompt_tokens")
        deadline = time.perf_counter() + wait_s
        while True:
            now = source_totals([parse_metrics(await client.get_async(client.base_url + "/metrics", session))])
            found = one_request_sources(state["last"], now, prompt_tokens)
            if found or not now or time.perf_counter() > deadline:    # not now: the server publishes none
                break
            await asyncio.sleep(0.005)
        sources[k], state["last"] = found, now
    return after_each, sources


def warm_documents(engine: LoadServer, workload: LoadWorkload, docs: Sequence[int], namespace: str,
                   concurrency: int) -> list[int | None]:
    """Each document sent once, untimed, in the cached condition's namespace: one at a time, or
    `concurrency` at a time as first requests that arrive together would (behind a router, where
    a document lands can depend on which others are in flight). Returns each one's cached
    tokens (None when unaudited); a warmup that fails ends the run."""
    if concurrency == 1 and not engine.route:
        return [engine.request(workload.documents[doc], WARMUP_TOKENS, namespace).cached_tokens for doc in docs]
    prompts = [(workload.documents[doc], namespace, doc) for doc in docs]

    async def send():
        session = engine.client.load_session()
        try:
            return await send_all(engine.client, session, engine.model, prompts,
                                  {"concurrency": concurrency, "request_rate": None}, WARMUP_TOKENS, 0, engine.route)
        finally:
            await session.close()
    records, _ = engine.client.run("the documents' warmup", send())
    found = []
    for doc, record in zip(docs, records):
        if record is None or record.error:
            error = record.error.removeprefix("ExperimentError: ") if record else "not sent"
            raise ExperimentError(f"the warmup of document {doc} failed: {error}")
        if record.usage is None:
            raise no_usage(engine.route[doc % len(engine.route)] if engine.route else engine.client.base_url)
        details = record.usage.get("prompt_tokens_details") or {}
        found.append(details.get("cached_tokens") if engine.audited else None)
    return found


def run_condition(engine: LoadServer, workload: LoadWorkload, documents: Sequence[int], condition: str, namespace: str,
                  level: Mapping[str, Any], settings: Phase1Settings, seed: int) -> dict[str, Any]:
    """One condition at one load level: the cached one warms its documents first (untimed,
    --warmup-concurrency at a time). Returns the condition's result with every request's record."""
    if settings.load is None:
        raise ValueError("run_condition needs settings with a load (Phase1Settings.load)")
    client = engine.client
    prompts = workload.requests(documents, condition, namespace)
    docs = sorted(set(documents))
    warms = (warm_documents(engine, workload, docs, namespace, settings.load.warmup_concurrency)
             if condition == "cached" else [])
    before = replica_load_counters(engine)
    samples: list[dict[str, float | None]]
    sources: dict[int, dict[str, float]] | None
    samples, records, sources = [], None, None
    track = tracks_sources(engine, level)

    async def measure():
        nonlocal sources
        session = client.load_session()
        try:
            # the level's connections are opened before its first timed request (to each server it sends to)
            await asyncio.gather(*[client.get_async(url + "/health", session) for url in engine.route or [client.base_url]
                                   for _ in range(level["concurrency"] or 1)])
            # read before the connections are counted: a fleet's replicas get connections of their own
            cpu_before = await api_server_cpu_s(client, engine.metrics_urls, session)
            after_each = None
            if track:
                start = source_totals([parse_metrics(await client.get_async(client.base_url + "/metrics", session))])
                after_each, sources = source_tracker(client, session, start)
            opened = client.load_connections
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample_gauges(client, engine.metrics_urls, samples, stop))
            # how busy the client and the servers' API processes were while the requests ran: near a
            # whole core, a request waits for that process, and the wait is in its TTFT
            wall_s, client_cpu_s = time.perf_counter(), time.process_time()
            try:
                result = await send_all(client, session, engine.model, prompts, level,
                                        settings.run.max_output_tokens, seed, engine.route, after_each)
            finally:
                wall_s, client_cpu_s = time.perf_counter() - wall_s, time.process_time() - client_cpu_s
                stop.set()
                await sampler
            opened_while_timed = client.load_connections - opened
            busy = busy_shares(cpu_before, await api_server_cpu_s(client, engine.metrics_urls, session), wall_s)
            return result, opened_while_timed, client_cpu_s / wall_s if wall_s > 0 else None, busy
        finally:
            await session.close()
    (records, t0), connections_during, client_cpu_busy, busy = client.run("a load level", measure())
    requests = [request_record(k, prompt, record, t0, condition, workload.full_tokens, engine.audited,
                               sources.get(k, {}) if sources is not None else None)
                for k, (prompt, record) in enumerate(zip(prompts, records))]
    problems = load_problems(requests, workload.block) if engine.audited else []
    problems += [f"warmup of document {doc}: cached_tokens={cached}, expected 0"
                 for doc, cached in zip(docs, warms) if engine.audited and cached != 0]
    # the counters' cross-check, once every request has ended well (a failed one may or may not have been counted)
    counters, replicas, server_error = None, None, None
    if not any(r["error"] for r in requests):
        try:
            # a short flush: it is counted with the condition's requests in the server's histograms
            flush = flush_engine_stats(engine.request, workload.documents[0][:FLUSH_PROMPT_TOKENS])
            sent = requests + [flush.as_json()]           # the warmups ran before the counters were read
            after = wait_for_counters(lambda: replica_load_counters(engine), prompt_tokens_growth, before,
                                      sum(r["prompt_tokens"] for r in sent))
        except ExperimentError as e:        # the requests are measured; the server went away after them
            server_error = str(e)
        else:
            replicas = {name: counter_growth(before[name], after[name]) for name in after if name in before}
            counters = total_counters(replicas)
            counters["flush_prompt_tokens"] = flush.prompt_tokens
            # the server's histograms count the flush too: its client TTFT bounds what it added
            counters["flush_ttft_ms"] = flush.ttft_ms
            if engine.audited:
                problems += counter_problems(counters, sent)
                if flush.cached_tokens != 0:
                    problems.append(f"the counters' flush (salted): cached_tokens={flush.cached_tokens}, expected 0")
    return {"server_error": server_error, **condition_stats(requests, settings.load.slo_ttft_ms),
            "client_cpu_busy": client_cpu_busy,
            "server": {**(counters or {}), **gauge_summary(samples), "replicas": replicas,
                       "api_server_cpu_busy": busy,
                       "api_server_cpu_busy_max": max((b for b in busy.values() if b is not None), default=None),
                       **server_times(counters or {}),
                       # the condition's own requests: the untimed flush (nothing cached) left out
                       "prefill_tokens_computed": (counters["prompt_tokens"] - counters["flush_prompt_tokens"]
                                                   - counters["prefix_cache_hits"]
                                                   - (counters.get("external_prefix_cache_hits") or 0))
                       if counters and counters["prompt_tokens"] is not None
                       and counters["prefix_cache_hits"] is not None else None},
            "connections_opened_while_timed": connections_during,
            "problems": problems, "requests": requests}


def run_level_once(engine: LoadServer, workload: LoadWorkload, level: Mapping[str, Any], i: int, rep: int,
                   settings: Phase1Settings, namespace: str) -> tuple[dict[str, Any], str | None]:
    """Both conditions (a working-set sweep's later levels: cached alone) at one level, once.
    Returns (the pass's record, the one line that ends the sweep or None)."""
    if settings.load is None:
        raise ValueError("run_level_once needs settings with a load (Phase1Settings.load)")
    documents = workload.draws(level["num_prefixes"], level["num_requests"])
    # cached and cold alternate in which goes first, so that neither always follows the other
    order = ["cached"] if settings.load.working_set and i else (["cached", "cold"] if (i + rep) % 2 == 0 else ["cold", "cached"])
    run: dict[str, Any] = {"repeat": rep, "order": order}
    for condition in order:
        try:
            run[condition] = run_condition(engine, workload, documents, condition, namespace, level, settings,
                                           settings.run.seed + 1000 * rep + i)
        except ExperimentError as e:       # the server stopped answering between requests
            return run, f"{level_name(level)}, {condition}: {e}"
        failed = [r for r in run[condition]["requests"] if r["error"] and not r["error"].startswith("not sent")]
        unsent = sum(1 for r in run[condition]["requests"] if r["error"] and r["error"].startswith("not sent"))
        if run[condition]["server_error"]:
            return run, f"{level_name(level)}, {condition}, after its requests: {run[condition]['server_error']}"
        if failed:
            return run, (f"{len(failed)} of {len(run[condition]['requests'])} {condition} requests failed at "
                         f"{level_name(level)}{f' ({unsent} not sent after)' if unsent else ''} "
                         f"(first: {failed[0]['error']})")
    return run, None


def run_load(engine: LoadServer, tokenizer: Any, settings: Phase1Settings, env: dict, unaudited: str | None) -> LoadResult:
    """Every level of the sweep, --repeats times, cached against cold at the same load (a
    working-set sweep measures cold at its first level only: nothing is cached there, so P
    does not matter). Each pass of a level warms its documents in a cache namespace of its own.
    Ends early, keeping what was measured, when requests fail. Returns the result dict."""
    block = env["cache_block_size"]
    # read now: after a failure the servers may not answer, and what was measured must still be written
    capacity_tokens = engine.total_kv_capacity_tokens()
    tier = engine.tier()
    capacity_per_engine = engine.replica_capacities()
    run_id = uuid.uuid4().hex[:12]
    load = settings.load
    if load is None:
        raise ValueError("run_load needs settings with a load (Phase1Settings.load)")
    workload = LoadWorkload(tokenizer, load.document_tokens, max(load.num_prefixes), load.prefix_skew, block,
                            settings.run.seed, run_id)
    levels = [{**level, "working_set_tokens": level["num_prefixes"] * workload.full_tokens,
               "num_requests": requests_per_level(level, load), "runs": []} for level in load_levels(load)]
    failure = None
    schedule = sweep_schedule(len(levels), load.repeats)
    t0 = time.perf_counter()
    for step, (rep, i) in enumerate(schedule):
        level = levels[i]
        elapsed_s = time.perf_counter() - t0
        eta = f", about {elapsed_s / step * (len(schedule) - step) / 60:.1f} min left" if step else ""
        print(f"\n--- {step + 1} of {len(schedule)}: {level_name(level)}, pass {rep + 1} of {load.repeats}: "
              f"{level['num_prefixes']} document(s) of {load.document_tokens} tokens, {level['num_requests']} requests per "
              f"condition ({elapsed_s:.0f} s so far{eta}) ---", flush=True)
        run, failure = run_level_once(engine, workload, level, i, rep, settings, f"load-{run_id}-{i}-{rep}")
        if any(c in run for c in ("cached", "cold")):
            level["runs"].append(run)
            print_level(level, run, capacity_tokens, len(capacity_per_engine))
        if failure:
            break
    levels = [level for level in levels if level["runs"]]
    for level in levels:
        for condition in ("cached", "cold"):
            # a pass a failure cut short is kept in runs but left out of the summary
            done = [run[condition] for run in level["runs"] if condition in run and not run[condition]["failed"]]
            if done:
                level[condition] = summarize_runs(done)
    requests = [r for level in levels for run in level["runs"] for c in ("cached", "cold") if c in run
                for r in run[c]["requests"]]
    problems = [p for level in levels for run in level["runs"] for c in ("cached", "cold") if c in run
                for p in run[c]["problems"]]
    return build_load_result(
        phase=SERVER_PHASE,
        experiment="working_set" if load.working_set else "load",
        model=engine.model,
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        config={"document_tokens": load.document_tokens, "document_prompt_tokens": len(workload.documents[0]),
                "document_cached_tokens": workload.full_tokens, "query_tokens": QUERY_TOKENS,
                "max_output_tokens": settings.run.max_output_tokens, "num_requests": load.num_requests,
                "repeats": load.repeats, "num_prefixes": list(load.num_prefixes), "prefix_skew": load.prefix_skew,
                "warmup_concurrency": load.warmup_concurrency,
                "load": "request_rate" if load.request_rate else "concurrency",
                "slo_ttft_ms": load.slo_ttft_ms, "seed": settings.run.seed},
        kv_capacity_tokens=capacity_tokens,
        kv_capacity_tokens_per_engine=capacity_per_engine,
        levels=cast(list[LoadLevel], levels),
        complete=failure is None,
        failure=failure,
        cache_audit=build_request_audit(problems, len(requests), unaudited),
        environment={**env, "tier": tier},
    )


def failure_exit(result: LoadResult | TraceResult, path: str, kept: str, most_problems: int | None = None) -> int:
    """Print a written run's audit problems and failure; its exit code (1 a failure, 3 a failed
    audit), or 0. kept: what of the run the file holds after a failure ("levels", "passes")."""
    for problem in result["cache_audit"]["problems"][:most_problems]:
        print(f"!!!   {problem}", file=sys.stderr)
    if result["failure"]:
        print(f"{SERVER_PROG}: error: {result['failure']}; the {kept} measured before are in {path}", file=sys.stderr)
        return EXIT_SETUP
    if result["cache_audit"]["ok"] is False:
        print("exit 3: a cache audit failed (see above); the JSON records which requests", file=sys.stderr)
        return EXIT_AUDIT
    return 0


def finish_load(result: LoadResult, results_dir: str) -> int:
    """Write a load run's JSON (also a sweep that requests' failures ended early: what was
    measured is kept) and say how it ended. Returns the exit code."""
    path = load_results_path(results_dir, result)
    write_result(path, result)
    print(f"wrote {path}", flush=True)
    code = failure_exit(result, path, "levels")
    if code:
        return code
    if result["cache_audit"].get("unaudited"):
        print(f"!!! UNAUDITED: {result['cache_audit']['unaudited']}", file=sys.stderr)
    return 0
