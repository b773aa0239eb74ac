"""Markdown tables of trace replays and capacity curves: each arm's figures over passes, what
the cache buys, the capacity curve with the replayed points beside it.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .result_schema import TraceResult


def fmt(value: float | None, spec: str = ".1f", ci: Sequence[float] | None = None) -> str:
    """value formatted, with its interval in brackets where one is given; '-' for None."""
    if value is None:
        return "-"
    text = format(value, spec)
    return f"{text} [{format(ci[0], spec)}, {format(ci[1], spec)}]" if ci else text


def pct(value: float | None, ci: Sequence[float] | None = None) -> str:
    return fmt(None if value is None else 100 * value, ".1f", ci and [100 * c for c in ci]) + ("" if value is None else "%")


def arms_table(result: TraceResult) -> str:
    """One row per arm: TTFT percentiles and throughput (passes' mean [t-interval over passes]),
    hit shares, fidelity and the send lag."""
    rows = ["| arm | passes | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | requests/s | hit share measured | simulated "
            "| ideal | fidelity | send lag p99 ms |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, s in result["arms"].items():
        t, share, lag = s.get("ttft_ms") or {}, s.get("hit_share") or {}, s.get("send_lag_ms") or {}
        rows.append(f"| {arm} | {s['passes']} | {fmt(t.get('p50'), ci=t.get('p50_ci95'))} | "
                    f"{fmt(t.get('p90'), ci=t.get('p90_ci95'))} | {fmt(t.get('p99'), ci=t.get('p99_ci95'))} | "
                    f"{fmt(s.get('request_throughput'), '.2f')} | {pct(share.get('measured'))} | "
                    f"{pct(share.get('simulated'))} | {pct(share.get('ideal'))} | {pct(s.get('fidelity'))} | "
                    f"{fmt(lag.get('p99'), '.2f')} |")
    return "\n".join(rows)


def cache_buys_table(result: TraceResult) -> str:
    """What the cache buys: the saving of each TTFT figure, cached against cold, pass by pass."""
    rows = ["| TTFT | cached vs cold: saving (95% CI over passes) | saved ms |", "|---|---|---|"]
    for key, b in result["cache_buys"].items():
        rows.append(f"| {key.removeprefix('ttft_')} | {fmt(b['saving_pct'], '.1f', b['saving_pct_ci95'])}% | "
                    f"{fmt(b['saved_ms'], '.1f', b['saved_ms_ci95'])} |")
    return "\n".join(rows)


def trace_summary(result: TraceResult) -> str:
    """The replay's Markdown: what was replayed, the arms, what the cache buys, the audit."""
    w, cfg, client = result["window"], result["config"], result["client"]
    audit = result["cache_audit"]
    head = (f"{w['requests']} requests of `{cfg['trace']}` from {w['start_s']:g} s ({w['trace_span_s']:.0f} s of "
            f"trace, replayed over {w['replay_span_s']:.0f} s at time scale {cfg['time_scale']:g}), "
            f"{w['skipped']} skipped over {cfg.get('input_cap_tokens')} input tokens, {w['history_requests']} "
            f"requests of history as the warm start; KV capacity {result['kv_capacity_tokens']} tokens"
            + (f" + a tier of {result['tier_capacity_tokens']}" if result.get("tier_capacity_tokens") else "")
            + f"; audit {'ok' if audit['ok'] else 'FAILED' if audit['ok'] is False else 'not done'} over "
              f"{audit['requests_checked']} requests; the client's peak memory {client['max_rss_mb']:.0f} MB.")
    return "\n\n".join([head, arms_table(result), cache_buys_table(result)])


def curve_table(curve: Mapping[str, Any], replayed: Iterable[tuple[int, float, str]] = ()) -> str:
    """The capacity curve: the simulated reusable share at each capacity against the ideal;
    replayed: [(capacity tokens, measured share, label)] of replays to set beside it."""
    rows = ["| capacity | tokens | simulated reusable share | of the ideal |", "|---|---|---|---|"]
    for point in curve["capacities"]:
        rows.append(f"| {point['label']} | {point['capacity_tokens']} | {pct(point['share'])} | "
                    f"{pct(point['share_of_ideal'])} |")
    rows.append(f"| infinite (ideal) | - | {pct(curve['ideal_share'])} | 100.0% |")
    for tokens, share, label in replayed:
        rows.append(f"| replayed: {label} | {tokens} | measured {pct(share)} | - |")
    return "\n".join(rows)
