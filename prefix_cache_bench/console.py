"""What a run prints on the console: a phase 1/2 config's summary and where its TTFT went (and
its file written beside it: write_results), a load level's pass, a trace replay's arm and
summary, a capacity curve. Printing only: the figures come computed.
"""
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from .analysis import breakdown_columns, step_split
from .defaults import CONDITIONS, OFFLINE_PHASE, TIER_CONDITION
from .errors import EXIT_AUDIT
from .prometheus import SERVER_TIMES
from .result_schema import CapacityCurve, PhaseResult, TraceResult
from .results import results_path, write_result


def print_summary(result: Mapping[str, Any]) -> None:
    """Console summary of one config (step 7)."""
    cfg, audit_ = result["config"], result["cache_audit"]
    print(f"\n=== A={cfg['context_size_a']} B={cfg['context_size_b']}  "
          f"([A, B] = {result['warmup_prompt_tokens']} tokens, block {result['environment']['cache_block_size']}, "
          f"hit expects {audit_['expected_hit_cached_tokens']} cached) ===")
    print(f"{'condition':<11} {'prompt':>6} {'cached':>6} {'TTFT ms mean +- sd':>20} {'engine TTFT':>11} "
          f"{'prefill':>8} {'tok/s':>8}")
    ms = lambda value, width: f"{value:>{width}.2f}" if value is not None else f"{'-':>{width}}"
    for c in result_conditions(result):
        s = result[c]["stats"]
        print(f"{c:<11} {s['prompt_tokens']:>6} {s['cached_tokens'] if s['cached_tokens'] is not None else '-':>6} "
              f"{s['ttft_mean']:>11.2f} +- {s['ttft_stdev']:<6.2f} {ms(s['engine_ttft_mean'], 11)} "
              f"{ms(s['prefill_mean'], 8)} {s['throughput_mean']:>8.1f}")
    lo, hi = result["ttft_degradation_ci95"]
    print(f"miss vs hit TTFT: {result['ttft_degradation_pct']:+.1f}% (95% CI {lo:+.1f} .. {hi:+.1f})")
    saving, (lo, hi) = result["ttft_saving_pct"], result["ttft_saving_ci95"]
    ms_lo, ms_hi = result["ttft_saving_ms_ci95"]
    print(f"hit saves vs cold: {saving:.1f}% of TTFT (95% CI {lo:.1f} .. {hi:.1f}), {result['ttft_saving_ms']:.2f} ms "
          f"(95% CI {ms_lo:.2f} .. {ms_hi:.2f})")
    if TIER_CONDITION in result:
        tier = result["environment"]["tier"]
        (lo, hi), (over_lo, over_hi) = result["tier_ttft_saving_ci95"], result["tier_over_hit_ci95"]
        load = result[TIER_CONDITION]["stats"].get("tier_load")
        print(f"a tier hit ({tier['connector']}) saves vs cold: {result['tier_ttft_saving_pct']:.1f}% (95% CI {lo:.1f} .. "
              f"{hi:.1f}); it takes {result['tier_over_hit_pct']:+.1f}% (95% CI {over_lo:+.1f} .. {over_hi:+.1f}) "
              f"against an HBM hit" + (f"; loaded at {load['gb_s']:.1f} GB/s" if load else ""))
    method = result["interval"]
    units = {"process": f"{method['processes']} engine processes' means ({method['num_blocks']} time blocks "
                        f"over {method['span_s']:.0f} s)",
             "block": f"{method['num_blocks']} time blocks over {method['span_s']:.0f} s",
             "round": f"{cfg['num_trials']} rounds", "trial": f"{cfg['num_trials']} trials a condition"}
    print(f"  the interval is +-{(hi - lo) / 2:.1f} points, from the spread of {units[method['unit']]}")
    stability = result["reproducibility"]
    if stability["stable"] is False:
        (h1, h2) = stability["halves"]
        print(f"!!! UNSTABLE: the first half of the run says {h1['ttft_saving_pct']:.1f}% "
              f"[{h1['ttft_saving_ci95'][0]:.1f}, {h1['ttft_saving_ci95'][1]:.1f}], the second "
              f"{h2['ttft_saving_pct']:.1f}% [{h2['ttft_saving_ci95'][0]:.1f}, {h2['ttft_saving_ci95'][1]:.1f}]: "
              f"the level moved during the run; a rerun may not land inside the interval", file=sys.stderr)
    if result["harness_overhead_ms"] is not None:
        what = "wall - engine TTFT" if result["phase"] == OFFLINE_PHASE else "client TTFT - the server's own TTFT"
        print(f"harness overhead ({what}, median): {result['harness_overhead_ms']:.2f} ms")
    print_breakdown(result)
    if audit_.get("unaudited"):
        print(f"!!! UNAUDITED: {audit_['unaudited']}", file=sys.stderr)
    elif audit_["ok"]:
        print(f"cache audit: OK, all {audit_['requests_checked']} requests as expected")
    else:
        print(f"\n!!! CACHE AUDIT FAILED: {len(audit_['problems'])} request(s) broke their condition; "
              f"these numbers do not measure what they claim:", file=sys.stderr)
        for p in audit_["problems"][:10]:
            print(f"!!!   {p}", file=sys.stderr)


def print_breakdown(result: Mapping[str, Any]) -> None:
    """Where each condition's mean TTFT went (engine_api.RequestResult.ttft_breakdown), if known."""
    means = {c: result[c]["stats"].get("ttft_breakdown_mean_ms") for c in result_conditions(result)}
    if None in means.values():
        return
    splits: dict[str, Any] = {c: step_split(result[c]["stats"], result.get("gpu_busy"), c) for c in means}   # or None each
    split_labels = ("step: GPU busy", "step: the rest") if any(splits.values()) else ()
    columns = breakdown_columns(means.values())
    print("where the TTFT goes (ms, means):  " + " ".join(f"{label:>18}" for label in
                                                          [label for _, label in columns] + list(split_labels)))
    for c in means:
        split_cells = [f"{ms:>18.2f}" for ms in splits[c]] if splits[c] else [f"{'-':>18}"] * len(split_labels)
        cells = [f"{means[c][key]:>18.2f}" if key in means[c] else f"{'-':>18}" for key, _ in columns]
        print(f"  {c:<30} " + " ".join(cells + split_cells))
    if split_labels:
        print("  (the prefill step split by the GPU-busy time of the profiled requests after the rounds, on the GPU's clock)")


def result_conditions(result: Mapping[str, Any]) -> list[str]:
    """The conditions one result holds: the design's three, and the tier's where it measured one."""
    return [c for c in (*CONDITIONS, TIER_CONDITION) if c in result]


def ci_span(ci: Sequence[float | None]) -> str:
    return "[" + ", ".join("-" if v is None else f"{v:.1f}" for v in ci) + "]"


def print_level(level: Mapping[str, Any], run: Mapping[str, Any], capacity_tokens: int | None, engines: int = 1) -> None:
    """Console table of one pass of one load level."""
    cache = f"the KV cache of {capacity_tokens}" + (f", {engines} engines together" if engines > 1 else "")
    fits = "" if capacity_tokens is None else \
        f" ({'fits in' if level['working_set_tokens'] <= capacity_tokens else 'exceeds'} {cache})"
    print(f"working set {level['working_set_tokens']} tokens{fits}")
    print(f"{'condition':<9} {'TTFT p50 ms [95% CI]':>24} {'p90':>8} {'p99':>8} {'mean':>8} {'TPOT ms':>8} "
          f"{'req/s':>7} {'tok/s':>8} {'hit rate':>8} {'failed':>6}")
    for c in ("cached", "cold"):
        s = run.get(c)
        if s is None:
            continue
        t = s.get("ttft_ms")
        if not t:
            print(f"{c:<9} every request failed")
            continue
        hit = s.get("hit_rate", {}).get("requests")
        print(f"{c:<9} {t['p50']:>9.1f} {ci_span(t['p50_ci95']):>14} {t['p90']:>8.1f} {t['p99']:>8.1f} {t['mean']:>8.1f} "
              f"{s['tpot_ms']['mean'] if s.get('tpot_ms') else float('nan'):>8.2f} {s['request_throughput'] or 0:>7.2f} "
              f"{s['output_throughput_tok_s'] or 0:>8.1f} {'-' if hit is None else f'{hit:.0%}':>8} {s['failed']:>6}")
    for c in ("cached", "cold"):
        by_source, rate = (run.get(c) or {}).get("by_source"), (run.get(c) or {}).get("hit_rate") or {}
        if by_source:
            print(f"{c:<9} by where the prefix came from: " + "; ".join(
                f"{source} {g['requests']} requests, TTFT p50 {g['ttft_ms_p50']:.1f} ms, p99 {g['ttft_ms_p99']:.1f} ms"
                for source, g in by_source.items())
                + (f" (tokens: {rate['hbm_tokens']:.0%} from HBM, {rate['tier_tokens']:.0%} from the tier)"
                   if "tier_tokens" in rate else ""))
    for c in ("cached", "cold"):
        server = (run.get(c) or {}).get("server") or {}
        if all(server.get(key) is not None for key, _ in SERVER_TIMES):
            print(f"{c:<9} the server's own means: TTFT {server['server_ttft_mean_ms']:.1f} ms, of which the engine "
                  f"queued {server['queue_time_mean_ms']:.1f} ms and prefilled {server['prefill_time_mean_ms']:.1f} ms")
    for c in ("cached", "cold"):
        s = run.get(c) or {}
        api = (s.get("server") or {}).get("api_server_cpu_busy_max")
        if s.get("client_cpu_busy") is not None:
            print(f"{c:<9} CPU busy, as a share of one core: this client {s['client_cpu_busy']:.0%}"
                  + ("" if api is None else f", the busiest server's API process {api:.0%}"))


def print_pass(arm: str, run: Mapping[str, Any]) -> None:
    s = run["stats"]
    t, lag, share = s.get("ttft_ms") or {}, s["send_lag_ms"], s.get("hit_share") or {}
    line = (f"{arm:<6} {s['num_requests']} requests, {s['failed']} failed: TTFT p50 {t.get('p50', float('nan')):.1f} "
            f"p90 {t.get('p90', float('nan')):.1f} p99 {t.get('p99', float('nan')):.1f} ms; "
            f"send lag p50 {lag.get('p50', float('nan')):.2f} p99 {lag.get('p99', float('nan')):.2f} ms")
    if share.get("measured") is not None:
        line += (f"; hit share measured {share['measured']:.1%}, simulated {share['simulated']:.1%}, "
                 f"ideal {share['ideal']:.1%}; fidelity {s['fidelity']:.1%}")
    print(line, flush=True)
    if run["overloaded"]:
        print(f"{arm:<6} OVERLOADED: {run['overloaded']}; achieved {s.get('request_throughput') or 0:.2f} req/s, "
              f"at most {run['max_in_flight']} in flight", flush=True)


def print_trace_summary(result: TraceResult) -> None:
    arms, bought = result["arms"], result["cache_buys"]
    print(f"\n{'arm':<7} {'passes':>6} {'TTFT p50 ms':>12} {'p90':>8} {'p99':>8} {'req/s':>7} {'hit share':>9} "
          f"{'simulated':>9} {'ideal':>6} {'fidelity':>8}")
    for arm, s in arms.items():
        t, share = s.get("ttft_ms") or {}, s.get("hit_share") or {}
        fmt = lambda v, spec: "-" if v is None else format(v, spec)     # noqa: E731
        print(f"{arm:<7} {s['passes']:>6} {fmt(t.get('p50'), '.1f'):>12} {fmt(t.get('p90'), '.1f'):>8} "
              f"{fmt(t.get('p99'), '.1f'):>8} {fmt(s.get('request_throughput'), '.2f'):>7} "
              f"{fmt(share.get('measured'), '.1%'):>9} {fmt(share.get('simulated'), '.1%'):>9} "
              f"{fmt(share.get('ideal'), '.1%'):>6} {fmt(s.get('fidelity'), '.1%'):>8}")
    for key, b in bought.items():
        ci = b["saving_pct_ci95"]
        print(f"the cache saves {b['saving_pct']:.1f}%" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")
              + f" of the {key.replace('_', ' ')} ({b['saved_ms']:.1f} ms)")


def print_curve(result: CapacityCurve) -> None:
    curve, window = result["curve"], result["window"]
    print(f"{window['requests']} requests ({window['skipped']} skipped, {window['history_requests']} of history "
          f"first), {curve['input_tokens']} input tokens; an infinite cache reuses {curve['ideal_share']:.1%} of them")
    print(f"{'capacity':>10} {'tokens':>12} {'reused':>8} {'of ideal':>9}")
    for point in curve["capacities"]:
        print(f"{point['label']:>10} {point['capacity_tokens']:>12} {point['share']:>8.1%} {point['share_of_ideal']:>9.1%}")
    print(f"simulated in {result['simulation_s']:.1f} s")


def write_results(results: Sequence[PhaseResult], results_dir: str, phase: int = 2, note: str | None = None) -> int:
    """Steps 7-8: print and write every config's result (results_phase<phase>_a<A>_b<B>.json),
    then the note (stderr), if any; the exit code: EXIT_AUDIT where a config's cache audit
    failed (an unaudited one, ok None, did not fail)."""
    for result in results:
        print_summary(result)                                                        # 7
        path = results_path(results_dir, result["config"]["context_size_a"], result["config"]["context_size_b"], phase)
        write_result(path, result)                                                   # 8
        print(f"wrote {path}", flush=True)
    if note:
        print(note, file=sys.stderr)
    if any(result["cache_audit"]["ok"] is False for result in results):
        print("exit 3: a cache audit failed (see above); the JSON records which requests", file=sys.stderr)
        return EXIT_AUDIT
    return 0
