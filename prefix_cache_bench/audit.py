"""The cache audit: what each request must find cached, whether it did, and whether the engine's
own prefix-cache counters agree. One counter-growth helper and one wait-for-counters serve the
offline engine, the server and the load run alike.
"""
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from .defaults import TIER_CONDITION
from .engine_api import RequestResult
from .result_schema import CacheAudit

T = TypeVar("T")


def expected_cached_tokens(condition: str, warmup_prompt_tokens: int, cache_block_size: int) -> int:
    """What num_cached_tokens must be: the hit (from HBM or from the tier) reuses [A, B]'s full
    blocks, nothing else."""
    if condition in ("cache_hit", TIER_CONDITION):
        return warmup_prompt_tokens // cache_block_size * cache_block_size
    return 0


def source_problem(condition: str, request: Mapping[str, Any], tiered: bool = False) -> str | None:
    """Where a request's cached tokens came from, against its condition: an HBM hit must not come
    from the tier, a tier hit not from HBM. A line, or None. In a run with a tier (tiered), a hit
    whose sources the engine did not say cannot be told from the other kind: a problem too."""
    hbm, tier = request.get("hbm_cached_tokens"), request.get("tier_cached_tokens")
    if hbm is None or tier is None:
        unknown = tiered and condition in ("cache_hit", TIER_CONDITION) and request.get("cached_tokens")
        return "the engine did not say where its cached tokens came from" if unknown else None
    if condition == TIER_CONDITION and hbm:
        return f"{hbm} cached tokens came from HBM, which was emptied before it: expected all from the tier"
    if condition != TIER_CONDITION and tier:
        return f"{tier} cached tokens came from the tier, expected none"
    return None


def audit_requests(warm: RequestResult, trials: Sequence[Mapping[str, Any]], warmup_ids: Sequence[int],
                   block: int) -> list[str]:
    """Did every request of one config find exactly what its condition promises? Returns the
    problems, one line each: num_cached_tokens against expected_cached_tokens."""
    problems = []
    if warm.cached_tokens != 0:
        problems.append(f"warmup [A, B]: cached_tokens={warm.cached_tokens}, expected 0")
    tiered = any(t["condition"] == TIER_CONDITION for t in trials)
    for t in trials:
        want = expected_cached_tokens(t["condition"], len(warmup_ids), block)
        for kind, request in (("ttft", t), ("throughput", t["throughput_request"])):
            got = request["cached_tokens"]
            if got != want:
                recomputed = " (the tier's prefix was recomputed)" if t["condition"] == TIER_CONDITION and not got else ""
                problems.append(f"{t['condition']} trial {t['round']} {kind} request: cached_tokens={got}, "
                                f"expected {want}{recomputed}")
            elif (source := source_problem(t["condition"], request, tiered)) is not None:
                problems.append(f"{t['condition']} trial {t['round']} {kind} request: {source}")
        for k, restore in enumerate(t.get("restore_requests", ())):
            if restore["hbm_cached_tokens"] or not restore["tier_cached_tokens"] or \
                    restore["tier_cached_tokens"] != restore["cached_tokens"]:
                problems.append(f"{t['condition']} trial {t['round']} restore {k}: {restore['hbm_cached_tokens']} "
                                f"tokens from HBM, {restore['tier_cached_tokens']} from the tier, expected all of "
                                f"another config's [A, B] from the tier")
    return problems


def audit_counters(requests: Iterable[Mapping[str, Any]], flush: RequestResult,
                   counters_before: Mapping[str, Any] | None, counters_after: Mapping[str, Any] | None,
                   shared: bool = False) -> tuple[dict[str, Any] | None, list[str]]:
    """The engine's own prefix-cache hit counters (prefix_cache_counters: HBM's, plus the tier's
    external_prefix_cache_hits where there is one) must have grown by the sum of the requests'
    num_cached_tokens, the tier's alone by their tier_cached_tokens. Counters are engine-wide, so this covers every
    request of the run (all configs). shared: other clients may send the engine requests too
    (a server): growth beyond this run's own is then recorded as theirs (other_clients), not
    a problem; growth short of it still is. Returns (engine_counters or None, problems)."""
    problems = []
    if flush.cached_tokens != 0:
        problems.append(f"stats flush: cached_tokens={flush.cached_tokens}, expected 0")
    if counters_before is None or counters_after is None:
        return None, problems
    requests = list(requests) + [flush.as_json()]
    engine_counters = counter_growth(counters_before, counters_after)
    engine_counters["scope"] = "every request of the run, all configs"
    engine_counters["sum_prompt_tokens"] = sum(r["prompt_tokens"] for r in requests)
    engine_counters["sum_cached_tokens"] = sum(r["cached_tokens"] for r in requests)
    hits = engine_counters["prefix_cache_hits"] + (engine_counters.get("external_prefix_cache_hits") or 0)
    if shared:
        engine_counters["other_clients"] = (hits > engine_counters["sum_cached_tokens"]
                                            or engine_counters["prefix_cache_queries"] > engine_counters["sum_prompt_tokens"])
    short = hits < engine_counters["sum_cached_tokens"]
    if short or (hits != engine_counters["sum_cached_tokens"] and not shared):
        problems.append(f"the engine's prefix-cache hit counters ({engine_counters['source']}) grew by {hits}, "
                        f"but the requests report {engine_counters['sum_cached_tokens']} cached tokens")
    tiers: list[Any] = [r.get("tier_cached_tokens") for r in requests]
    if engine_counters.get("external_prefix_cache_hits") is not None and None not in tiers:
        engine_counters["sum_tier_cached_tokens"] = sum(tiers)
        if engine_counters["external_prefix_cache_hits"] != sum(tiers) and not engine_counters.get("other_clients"):
            problems.append(f"the tier's hit counter grew by {engine_counters['external_prefix_cache_hits']}, but the "
                            f"requests report {sum(tiers)} tokens from the tier")
    return engine_counters, problems


def audit(warm: RequestResult, trials: Sequence[Mapping[str, Any]], flush: RequestResult, warmup_ids: Sequence[int],
          block: int, counters_before: Mapping[str, Any] | None, counters_after: Mapping[str, Any] | None) -> CacheAudit:
    """The cache_audit of one config run alone: its requests, and the engine's counter."""
    engine_counters, counter_problems = audit_counters(requests_of(warm, trials), flush,
                                                       counters_before, counters_after)
    return audit_report(audit_requests(warm, trials, warmup_ids, block) + counter_problems,
                        warm, trials, warmup_ids, block, engine_counters)


def audit_report(problems: list[str], warm: RequestResult, trials: Sequence[Mapping[str, Any]], warmup_ids: Sequence[int],
                 block: int, engine_counters: dict[str, Any] | None) -> CacheAudit:
    return {
        "ok": not problems,
        "expected_hit_cached_tokens": expected_cached_tokens("cache_hit", len(warmup_ids), block),
        "requests_checked": len(requests_of(warm, trials)) + 1,      # and the stats flush
        "problems": problems,
        "engine_counters": engine_counters,
    }


def requests_of(warm: RequestResult, trials: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Every request of one config, as the files record them: the warmup, then each trial's two
    (and a tier trial's untimed ones, tiers.TierRequest)."""
    return [warm.as_json()] + [req for t in trials for req in (t, t["throughput_request"], *t.get("restore_requests", ()))]


def counter_growth(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """after - before for every number, also in nested dicts; None where either is None (a
    counter a server does not publish); other values as they are after."""
    return {key: counter_growth(before[key], value) if isinstance(value, dict)
            else None if value is None or before[key] is None
            else value - before[key] if isinstance(value, (int, float)) else value
            for key, value in after.items()}


def sum_counters(counters: Sequence[Any]) -> dict[str, Any] | None:
    """Engine counters of several processes, added up (numbers, also nested); other values the first's."""
    if any(c is None for c in counters):
        return None
    first = counters[0]
    return {key: sum_counters([c[key] for c in counters]) if isinstance(value, dict)
            else any(c[key] for c in counters) if isinstance(value, bool)
            else sum(c[key] for c in counters) if isinstance(value, (int, float))
            else value for key, value in first.items()}


def cache_state(cached_tokens: int, full_tokens: int) -> str:
    """What a request found: all of its document's full blocks, some, or none."""
    if not cached_tokens:
        return "miss"
    return "hit" if cached_tokens >= full_tokens else "partial"


def load_problems(requests: Iterable[Mapping[str, Any]], block: int) -> list[str]:
    """Requests that found cached tokens they cannot have: a salted cold one any, a cached one
    more than its document's full blocks, or a count that is not whole blocks."""
    problems = []
    for r in requests:
        if r["error"] is not None or r["cached_tokens"] is None:
            continue
        allowed = 0 if r["condition"] == "cold" else r["document_cached_tokens"]
        if r["cached_tokens"] > allowed or r["cached_tokens"] % block:
            problems.append(f"{r['condition']} request {r['index']} (document {r['document']}): "
                            f"cached_tokens={r['cached_tokens']}, at most {allowed} in whole blocks of {block}")
    return problems


def counter_problems(counters: dict[str, Any], sent: Sequence[Mapping[str, Any]]) -> list[str]:
    """/metrics' prefix-cache hits (HBM's, plus a second tier's) must have grown by the cached
    tokens the requests report (and by more only where another client's queries show in the
    counters too). Fills in the sums."""
    if counters["prefix_cache_hits"] is None:
        return []
    own = sum(r["cached_tokens"] or 0 for r in sent)
    counters["sum_cached_tokens"], counters["sum_prompt_tokens"] = own, sum(r["prompt_tokens"] for r in sent)
    counters["other_clients"] = (counters["prefix_cache_queries"] or 0) > counters["sum_prompt_tokens"]
    hits = counters["prefix_cache_hits"] + (counters.get("external_prefix_cache_hits") or 0)
    if hits < own or (hits != own and not counters["other_clients"]):
        return [f"/metrics vllm:prefix_cache_hits_total (and the tier's external_prefix_cache_hits_total) grew by "
                f"{hits:.0f}, but the requests report {own} cached tokens"]
    return []


def wait_for_counters(read: Callable[[], T], counted: Callable[[T, T], float | None], before: T, tokens: float,
                      timeout_s: float = 5.0) -> T:
    """read() the engine's counters until counted(before, reading) says they hold `tokens` more
    tokens than `before` (None: nothing to wait for), or timeout_s has passed; the last reading.
    An engine counts a request as its outputs are handled, which may be just after the response
    ends (/metrics lags a little): the audit must not read the counters before they hold it."""
    deadline = time.monotonic() + timeout_s
    while True:
        reading = read()
        grown = counted(before, reading)
        if grown is None or grown >= tokens or time.monotonic() > deadline:
            return reading
        time.sleep(0.05)
