"""Markdown tables of load, working-set and fleet files, and --compare across reruns of a load
level. No vLLM, no torch.
"""
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .intervals import agree
from .results import FLEET_RE, discover_load_results
from .tables import audit_ok, bounded, ci_text


LOAD_FIGURES = (("TTFT p50 ms", "ttft_ms", "p50"), ("TTFT p99 ms", "ttft_ms", "p99"),
                ("TTFT mean ms", "ttft_ms", "mean"), ("requests/s", None, "request_throughput"),
                ("hit rate", "hit_rate", "requests"))


def level_key(level: Mapping[str, Any], working_set: bool) -> str:
    """A load level's name in a comparison: its load, or P in a working-set sweep."""
    if working_set:
        return f"P={level['num_prefixes']}"
    value, _ = load_value(level)
    return f"{value:g}"


def load_figure(stats: Mapping[str, Any], group: str | None, key: str) -> tuple[float, list[float | None]] | None:
    """(value, 95% interval) of one figure of a condition's stats, or None."""
    holder = stats.get(group) if group else stats
    if not holder or holder.get(key) is None:
        return None
    return holder[key], holder.get(f"{key}_ci95") or [None, None]


def compare_load_runs(run_dirs: Sequence[str]) -> str | None:
    """Markdown table: the load files that several runs share, each figure per level and
    condition in every run, and whether every pair of runs agrees within its intervals. A level
    is paired by what it is (the load, or P in a working-set sweep), so a rerun of one level
    compares with that level of a sweep; a figure that only one run measured is left out."""
    runs = [{os.path.basename(p).removesuffix(".gz"): d for p, d in discover_load_results(d)[0]} for d in run_dirs]
    names = sorted({name for r in runs for name in r})
    if not names:
        return None
    rows = ["| file | load | condition | figure | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) +
            " | pairs that agree |", "|---|---|---|---|" + "---|" * (len(runs) + 1)]
    agreed = total = 0
    for name in names:
        found = [r.get(name) for r in runs]
        working_set = next(d for d in found if d).get("experiment") == "working_set"
        keyed = [{level_key(lv, working_set): lv for lv in d["levels"]} if d else {} for d in found]
        values = list(dict.fromkeys(key for levels in keyed for key in levels))
        for value in sorted(values, key=lambda v: float(v.removeprefix("P="))):
            for c in ("cached", "cold"):
                for label, group, key in LOAD_FIGURES:
                    figures = [load_figure(levels[value][c], group, key)
                               if value in levels and levels[value].get(c) else None for levels in keyed]
                    present = [f for f in figures if f]
                    if len(present) < min(2, len(runs)):
                        continue
                    pairs = [agree(x[0], bounded(x[1]), y[0], bounded(y[1]))
                             for i, x in enumerate(present) for y in present[i + 1:]]
                    agreed, total = agreed + sum(pairs), total + len(pairs)
                    cells = [with_ci(f[0], f[1], 2 if key == "request_throughput" else 1) if f else "-" for f in figures]
                    rows.append(f"| {name} | {value} | {c} | {label} | " + " | ".join(cells) +
                                f" | {sum(pairs)} of {len(pairs)} |")
    if not total and len(runs) > 1:
        return None
    # a blank line, so that markdown does not take the sentence for a row of the table
    return "\n".join(rows) + f"\n\n{agreed} of {total} pairs of runs agree within their intervals."


def load_value(level: Mapping[str, Any]) -> tuple[float, str]:
    """The level's load and its axis label."""
    if level.get("concurrency") is not None:
        return level["concurrency"], "concurrency (clients sending back to back)"
    return level["request_rate"], "request rate (requests/s, Poisson)"


def number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def with_ci(value: float | None, ci: Sequence[float | None] | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f} {ci_text(ci, digits)}" if ci and ci != [None, None] else f"{value:.{digits}f}"


def cell(stats: Mapping[str, Any], group: str | None, key: str, digits: int = 1) -> str:
    """One figure of a condition's stats with its 95% interval, as table text."""
    found = load_figure(stats, group, key)
    return with_ci(found[0], found[1], digits) if found else "-"


def hit_rate_text(stats: Mapping[str, Any]) -> str:
    rate = stats.get("hit_rate")
    if not rate:
        return "-"
    text = f"{rate['requests']:.0%}"
    ci = rate.get("requests_ci95")
    if ci and None not in ci:
        text += f" [{max(ci[0], 0):.0%}, {min(ci[1], 1):.0%}]"
    return text + (f" / {rate['tokens']:.0%}" if rate.get("tokens") is not None else "")


def load_table(data: Mapping[str, Any]) -> str:
    """Markdown: per load level and condition, TTFT percentiles and mean with their 95%
    intervals, throughput, and the hit rate the requests found."""
    rows = ["| load | condition | TTFT p50 ms | TTFT p99 ms | TTFT mean ms | requests/s | output tokens/s | "
            "hit rate (requests / tokens) | failed |", "|---|---|---|---|---|---|---|---|---|"]
    for level in data["levels"]:
        value, _ = load_value(level)
        for c in ("cached", "cold"):
            s = level.get(c)
            if not s:
                continue
            rows.append(f"| {value:g} | {c} | {cell(s, 'ttft_ms', 'p50')} | {cell(s, 'ttft_ms', 'p99')} | "
                        f"{cell(s, 'ttft_ms', 'mean')} | {cell(s, None, 'request_throughput', 2)} | "
                        f"{number(s.get('output_throughput_tok_s'), 0)} | {hit_rate_text(s)} | {s.get('failed', 0)} |")
    return "\n".join(rows) + interval_line(data)


def load_headline_table(data: Mapping[str, Any]) -> str:
    """Markdown, one row per load level: the cached and the cold condition side by side (TTFT
    p50 and p99, requests/s), each figure with its 95% interval."""
    rows = ["| load | cached TTFT p50 ms | cached p99 ms | cold TTFT p50 ms | cold p99 ms | cached requests/s | "
            "cold requests/s |", "|---|---|---|---|---|---|---|"]
    for level in data["levels"]:
        cached, cold = level.get("cached") or {}, level.get("cold") or {}
        rows.append(f"| {load_value(level)[0]:g} | {cell(cached, 'ttft_ms', 'p50')} | {cell(cached, 'ttft_ms', 'p99')} | "
                    f"{cell(cold, 'ttft_ms', 'p50')} | {cell(cold, 'ttft_ms', 'p99')} | "
                    f"{cell(cached, None, 'request_throughput', 2)} | {cell(cold, None, 'request_throughput', 2)} |")
    return "\n".join(rows)


def load_file_tables(data: Mapping[str, Any]) -> str:
    """The tables of one load file: a working-set sweep's, or a load sweep's (cached and cold side by
    side, then each condition's figures) and where its TTFT went."""
    if data["experiment"] == "working_set":
        return working_set_table(data)
    times = server_time_table(data)
    return (f"Cached against cold:\n\n{load_headline_table(data)}\n\nEach condition:\n\n{load_table(data)}" +
            (f"\n\nWhere the TTFT went:\n\n{times}" if times else ""))


def with_spread(value: float | None, per_pass: Sequence[float | None] | None, digits: int = 1) -> str:
    """A mean with the range of the passes' own values: "12.3 (11.9-12.8)"."""
    values = [v for v in per_pass or [] if v is not None]
    if value is None or len(values) < 2:
        return number(value, digits)
    return f"{number(value, digits)} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def percent_with_spread(value: float | None, per_pass: Sequence[float | None] | None) -> str:
    """A share as a percentage with the range of the passes' own values: "45% (41-48%)"."""
    values = [v for v in per_pass or [] if v is not None]
    if value is None:
        return "-"
    return f"{value:.0%}" + (f" ({min(values) * 100:.0f}-{max(values):.0%})" if len(values) >= 2 else "")


def server_time_table(data: Mapping[str, Any]) -> str | None:
    """Markdown: per level and condition, the client's mean TTFT beside the server's own means
    (its TTFT, the engine's queue and prefill time) from its histograms; None for files without them."""
    rows = []
    for level in data["levels"]:
        value = level_key(level, data["experiment"] == "working_set")
        for c in ("cached", "cold"):
            s = level.get(c)
            server = (s or {}).get("server") or {}
            if not s or server.get("server_ttft_mean_ms") is None:
                continue
            cells = [with_spread(server.get(key), server.get(f"{key}_per_pass"))
                     for key in ("server_ttft_mean_ms", "queue_time_mean_ms", "prefill_time_mean_ms")]
            cells += [percent_with_spread(s.get("client_cpu_busy"), s.get("client_cpu_busy_per_pass")),
                      percent_with_spread(server.get("api_server_cpu_busy_max"), server.get("api_server_cpu_busy_max_per_pass"))]
            rows.append(f"| {value} | {c} | {number((s.get('ttft_ms') or {}).get('mean'))} | " + " | ".join(cells) + " |")
    if not rows:
        return None
    return "\n".join(["| load | condition | TTFT mean ms (client) | server's TTFT mean ms | engine queue mean ms | "
                      "engine prefill mean ms | client CPU busy | API server CPU busy |", "|---|---|---|---|---|---|---|---|",
                      *rows]) + (
        "\n\nThe server's means come from its histograms (`vllm:time_to_first_token_seconds`, "
        "`vllm:request_queue_time_seconds`, `vllm:request_prefill_time_seconds`) over each condition's requests "
        "of every pass, the counters' short flush request included; in parentheses, the range of the passes' "
        "means. The client's TTFT minus the server's is what lies outside the server's clock: the HTTP path, and "
        "the API server's work before it starts that clock and after it stops it. The server's minus queue and "
        "prefill is the hand-over to the engine and back. CPU busy: CPU time over the requests' wall time, as "
        "a share of one core, of this client's process and of the API server process (the busiest one's; "
        "`process_cpu_seconds_total` on its /metrics); near 100%, requests wait for that process.")


def interval_words(data: Mapping[str, Any]) -> str:
    """What the intervals of a load file are, in its own words."""
    kinds = sorted({lv[c]["interval"] for lv in data["levels"] for c in ("cached", "cold") if lv.get(c, {}).get("interval")})
    return "; ".join(kinds) or "as the file records them"


def interval_line(data: Mapping[str, Any]) -> str:
    return f"\n\n95% intervals: {interval_words(data)}."


def working_set_table(data: Mapping[str, Any]) -> str:
    """Markdown: per number of documents, the working set against the KV cache, the hit rate
    found and the cached requests' TTFT."""
    capacity = data.get("kv_capacity_tokens")
    rows = ["| documents | working set (tokens) | of the KV cache | hit rate (requests / tokens) | TTFT p50 ms | "
            "TTFT p99 ms | TTFT mean ms |", "|---|---|---|---|---|---|---|"]
    for level in data["levels"]:
        s = level.get("cached")
        if not s:
            continue
        t = s.get("ttft_ms") or {}
        share = f"{level['working_set_tokens'] / capacity:.0%}" if capacity else "-"
        rows.append(f"| {level['num_prefixes']} | {level['working_set_tokens']} | {share} | {hit_rate_text(s)} | "
                    f"{with_ci(t.get('p50'), t.get('p50_ci95'))} | {with_ci(t.get('p99'), t.get('p99_ci95'))} | "
                    f"{with_ci(t.get('mean'), t.get('mean_ci95'))} |")
    rows[-1] += interval_line(data)
    rows += tier_rows(data)
    cold = data["levels"][0].get("cold")
    if cold and cold.get("ttft_ms"):
        rows.append(f"\nCold (every request salted, nothing cached): TTFT p50 "
                    f"{with_ci(cold['ttft_ms']['p50'], cold['ttft_ms']['p50_ci95'])} ms, "
                    f"p99 {with_ci(cold['ttft_ms']['p99'], cold['ttft_ms']['p99_ci95'])} ms.")
    return "\n".join(rows)


def tier_rows(data: Mapping[str, Any]) -> list[str]:
    """Markdown rows, where the server had a second tier and each request's source is known: per
    number of documents, the document tokens found in HBM and in the tier, and the TTFT of the
    requests whose prefix came from each (all passes' requests together)."""
    levels = [lv for lv in data["levels"] if (lv.get("cached") or {}).get("by_source")]
    if not levels:
        return []
    tier = (data["environment"].get("tier") or {})
    size = f", {tier['size_gib']:g} GiB" if tier.get("size_gib") else ""
    rows = [f"\nWhere each cached request's prefix came from (the tier: {tier.get('connector', '?')}{size}):\n",
            "| documents | tokens from HBM | tokens from the tier | HBM hits: TTFT p50 / p99 ms | "
            "tier hits: TTFT p50 / p99 ms | recomputed: TTFT p50 / p99 ms |", "|---|---|---|---|---|---|"]
    for level in levels:
        s, rate = level["cached"], level["cached"].get("hit_rate") or {}
        by = s["by_source"]
        group = {source: f"{by[source]['ttft_ms_p50']:.1f} / {by[source]['ttft_ms_p99']:.1f} ({by[source]['requests']})"
                 if source in by else "-" for source in ("hbm", "tier", "computed")}
        rows.append(f"| {level['num_prefixes']} | {percent(rate.get('hbm_tokens'))} | {percent(rate.get('tier_tokens'))} | "
                    f"{group['hbm']} | {group['tier']} | {group['computed']} |")
    rows.append("\n(requests) beside each TTFT: how many requests it is over.")
    return rows


def percent(share: float | None) -> str:
    return "-" if share is None else f"{share:.0%}"


def fleet_groups(loads: Iterable[tuple[str, Mapping[str, Any]]]) -> dict[str, list[tuple[str, Mapping[str, Any]]]]:
    """{sweep name: [(front, data)]}: the fleet files of one workload, one per front."""
    groups: dict[str, list[tuple[str, Mapping[str, Any]]]] = {}
    for path, data in loads:
        m = FLEET_RE.match(os.path.basename(path))
        if m:
            groups.setdefault(f"fleet_a{m.group(2)}_{m.group(3)}_{m.group(4)}", []).append((data.get("front") or m.group(1),
                                                                                           data))
    return groups


def replica_split(stats: Mapping[str, Any]) -> str:
    """'12 / 13': the requests each replica (engine) counted, from its own /metrics."""
    replicas = (stats.get("server") or {}).get("replicas") or {}
    return " / ".join(f"{v['requests']:.0f}" for _, v in sorted(replicas.items())) or "-"


def fleet_table(fronts: Sequence[tuple[str, Mapping[str, Any]]], load: float | None = None) -> str:
    """Markdown: per front and load level (or only at `load`), the cached condition's hit rate,
    TTFT, throughput and how the requests spread over the replicas."""
    rows = ["| front | load | hit rate (requests / tokens) | TTFT p50 ms | TTFT p99 ms | requests/s | "
            "requests per replica |", "|---|---|---|---|---|---|---|"]
    for front, data in fronts:
        for level in data["levels"]:
            s = level.get("cached")
            if not s or load is not None and load_value(level)[0] != load:
                continue
            rows.append(f"| {front} | {load_value(level)[0]:g} | {hit_rate_text(s)} | {cell(s, 'ttft_ms', 'p50')} | "
                        f"{cell(s, 'ttft_ms', 'p99')} | {cell(s, None, 'request_throughput', 2)} | {replica_split(s)} |")
    return "\n".join(rows) + interval_line(fronts[0][1])


def load_title(data: Mapping[str, Any]) -> str:
    cfg = data["config"]
    model = os.path.basename(str(data.get("model")).rstrip("/"))
    device = data.get("environment", {}).get("device") or "unknown device"
    return (f"{model} on {device}: {cfg['num_prefixes'][0] if data['experiment'] == 'load' else 'P'} document(s) of "
            f"{cfg['document_tokens']} tokens, fresh {cfg['query_tokens']}-token query, {cfg['max_output_tokens']} "
            f"output tokens{'' if audit_ok(data) else '  (CACHE AUDIT FAILED)'}")
