"""Markdown tables of phase 1 and phase 2 results (the console's and the READMEs'), what the
server path adds, and --compare's lines across reruns. No vLLM, no torch.
"""
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .analysis import breakdown_columns, step_split, unit_means
from .defaults import REMOTE_DEVICE
from .intervals import agree, mean_ci95
from .prefill_fit import condition_floor
from .provenance import describe_provenance, devices_label
from .results import discover_results
from .settings import Config


# condition key -> its short name in tables, in the order tables and charts show them
CONDITION_NAMES = {"cache_hit": "hit", "cache_miss": "miss", "cache_cold": "cold", "cache_tier": "tier hit"}

# server_path_cost's figures of one condition: (phase 1 ms, phase 2 ms, added ms, [95% CI])
PathCost = tuple[float, float, float, list[float]]
# anatomy_rows' row: (config label, condition, stats, floor or None, (GPU busy, step's rest) or None)
AnatomyRow = tuple[str, str, Mapping[str, Any], dict[str, Any] | None, tuple[float, float] | None]


def by_model(configs: Mapping[Config, Mapping[str, Any]]) -> dict[str | None, dict[Config, Mapping[str, Any]]]:
    """{model: {(A, B): data}}: a fit only makes sense within one model."""
    groups: dict[str | None, dict[Config, Mapping[str, Any]]] = {}
    for key, data in configs.items():
        groups.setdefault(data.get("model"), {})[key] = data
    return groups


def conditions_present(configs: Mapping[Config, Mapping[str, Any]]) -> list[str]:
    return [c for c in CONDITION_NAMES if any(isinstance(d.get(c), dict) and "stats" in d[c] for d in configs.values())]


def audit_ok(data: Mapping[str, Any]) -> bool:
    return data.get("cache_audit", {}).get("ok", True) is not False


def unaudited(data: Mapping[str, Any]) -> bool:
    """A run whose cache state nobody checked (a server without --enable-prompt-tokens-details)."""
    return bool(data.get("cache_audit", {}).get("unaudited"))


def audit_word(data: Mapping[str, Any]) -> str:
    if unaudited(data):
        return "UNAUDITED"
    return {True: "ok", False: "FAILED"}.get(data.get("cache_audit", {}).get("ok"), "-")


def bounded(ci: Sequence[float | None]) -> list[float]:
    """An interval as numbers: a side stored as null (unbounded) as -inf / inf."""
    return [-np.inf if ci[0] is None else ci[0], np.inf if ci[1] is None else ci[1]]


def ci_text(ci: Sequence[float | None], digits: int = 1) -> str:
    """'[25.0, 35.0]'; an unbounded side (stored as null) as -inf / inf."""
    low, high = ci
    return (f"[{'-inf' if low is None else format(low, f'.{digits}f')}, "
            f"{'inf' if high is None else format(high, f'.{digits}f')}]")


def unstable(data: Mapping[str, Any]) -> bool:
    """The run's two halves disagreed beyond their intervals (files from before that check: no)."""
    return (data.get("reproducibility") or {}).get("stable") is False


def comparison_note(data: Mapping[str, Any]) -> str:
    """'miss +5% vs hit / hit saves 30% [25, 35]' for the TTFT panel, where the file has them."""
    notes = []
    if isinstance(data.get("ttft_degradation_pct"), (int, float)):
        notes.append(f"miss {data['ttft_degradation_pct']:+.0f}% vs hit")
    if isinstance(data.get("ttft_saving_pct"), (int, float)):
        ci = data.get("ttft_saving_ci95")
        bounds = f" {ci_text(ci, 0)}" if isinstance(ci, list) and len(ci) == 2 else ""
        notes.append(f"hit saves {data['ttft_saving_pct']:.0f}%{bounds}")
    if unstable(data):
        notes.append("UNSTABLE: halves disagree")
    return "\n".join(notes)


def describe_source(configs: Mapping[Config, Mapping[str, Any]]) -> str:
    """'model · device · vLLM x' from the files, where they say it (and all agree)."""
    parts = []
    for getter in (lambda d: d.get("model"),
                   lambda d: devices_label(d.get("environment", {})),
                   lambda d: d.get("environment", {}).get("vllm_version")):
        values = {getter(d) for d in configs.values()} - {None}
        if len(values) == 1:
            parts.append(values.pop())
    if len(parts) == 3:
        parts[2] = f"vLLM {parts[2]}"
    return " · ".join(os.path.basename(str(p).rstrip("/")) if i == 0 else str(p) for i, p in enumerate(parts))


def summary_table(configs: Mapping[Config, Mapping[str, Any]]) -> str:
    """Markdown table of every config, for the console and READMEs."""
    conds = conditions_present(configs)
    head = ["config"] + [f"{CONDITION_NAMES[c]} TTFT ms" for c in conds] + ["miss vs hit"]
    if "cache_cold" in conds:
        head += ["hit saves vs cold (95% CI)"]
    head += ["hit cached / prompt tokens", "audit"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (a, b), d in configs.items():
        cells = [f"A={a} / B={b}"]
        for c in conds:
            s = d.get(c, {}).get("stats", {})
            cells.append(f"{s['ttft_mean']:.2f} ± {s.get('ttft_stdev', 0):.2f}" if "ttft_mean" in s else "-")
        deg = d.get("ttft_degradation_pct")
        cells.append(f"{deg:+.1f}%" if isinstance(deg, (int, float)) else "-")
        if "cache_cold" in conds:
            sav, ci = d.get("ttft_saving_pct"), d.get("ttft_saving_ci95")
            cells.append((f"{sav:.1f}% {ci_text(ci)}" if isinstance(sav, (int, float)) and ci else "-")
                         + (" UNSTABLE" if unstable(d) else ""))
        hs = d["cache_hit"]["stats"]
        cached = hs.get("cached_tokens", "?")
        cells.append(f"{'-' if cached is None else cached} / {hs.get('prompt_tokens', '?')}")
        cells.append(audit_word(d))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def tier_floor_ms(hbm_hit_ms: float, bytes_per_request: float, link: Mapping[str, Any] | None) -> float | None:
    """The least a tier hit can take on the machine that ran: an HBM hit's TTFT plus its KV's
    bytes at the pinned copy rate measured there (environment.host_link). None without one."""
    rate = (link or {}).get("pinned_gb_s")
    return hbm_hit_ms + bytes_per_request / (rate * 1e9) * 1e3 if rate else None


def tier_table(configs: Mapping[Config, Mapping[str, Any]]) -> str | None:
    """Markdown: per config with a tier condition, a hit from the tier against an HBM hit and
    cold, and what was loaded; where the run measured its host link, the tier hit against its
    floor there. None where no config measured one."""
    tiered = {key: d for key, d in configs.items() if isinstance(d.get("cache_tier"), dict)}
    if not tiered:
        return None
    links = {key: d["environment"].get("host_link") for key, d in tiered.items()}
    measured = any((link or {}).get("pinned_gb_s") for link in links.values())
    rows = ["| config | tier hit TTFT ms | HBM hit TTFT ms | cold TTFT ms | tier hit saves vs cold (95% CI) | "
            "tier hit vs HBM hit (95% CI) | tokens from the tier | KV loaded per request | load rate |" +
            (" floor ms | tier hit / floor |" if measured else ""),
            "|" + "---|" * (11 if measured else 9)]
    for (a, b), d in tiered.items():
        stats = d["cache_tier"]["stats"]
        load = stats.get("tier_load")
        cells = [f"A={a} / B={b}", *(f"{d[c]['stats']['ttft_mean']:.2f}" for c in ("cache_tier", "cache_hit", "cache_cold")),
                 f"{d['tier_ttft_saving_pct']:.1f}% {ci_text(d['tier_ttft_saving_ci95'])}",
                 f"{d['tier_over_hit_pct']:+.1f}% {ci_text(d['tier_over_hit_ci95'])}",
                 str(stats.get("tier_cached_tokens", "-")),
                 f"{load['bytes_per_request'] / 1e9:.2f} GB" if load else "-",
                 f"{load['gb_s']:.1f} GB/s" if load else "-"]
        if measured:
            floor = tier_floor_ms(d["cache_hit"]["stats"]["ttft_mean"], load["bytes_per_request"], links[(a, b)]) \
                if load else None
            cells += [f"{floor:.2f}", f"{stats['ttft_mean'] / floor:.2f}x"] if floor else ["-", "-"]
        rows.append("| " + " | ".join(cells) + " |")
    tier = next(iter(tiered.values()))["environment"].get("tier") or {}
    size = f", {tier['size_gib']:g} GiB" if tier.get("size_gib") else ""
    rows.append(f"\nThe tier: {tier.get('connector', '?')} ({tier.get('backend')}{size}). The load rate: the "
                f"connector's own copy time (vllm:kv_offload_load_time), all requests together." +
                (" The floor: the HBM hit plus the KV loaded at the host link's pinned copy rate measured on "
                 "the machine before the engine started (" + ", ".join(sorted(
                     {f"{link['pinned_gb_s']:.1f} GB/s pinned, {link['pageable_gb_s']:.1f} pageable"
                      for link in links.values() if (link or {}).get("pinned_gb_s")})) + ")." if measured else ""))
    return "\n".join(rows)


def independent_means(data: Mapping[str, Any], condition: str) -> np.ndarray | None:
    """One condition's TTFT per unit its run's interval treats as independent: engine processes
    where there are several, else time blocks; per trial where there are fewer than 2 of either.
    None where no trial of the file has a TTFT (the design's schema names no trial keys; its
    trials carry no condition of their own: they are the condition's)."""
    trials = [{**t, "condition": condition} for t in data[condition].get("trials") or []
              if isinstance(t, dict) and isinstance(t.get("ttft_ms"), (int, float))]
    if not trials:
        return None
    for unit in ("process", "block"):
        if all(unit in t for t in trials) and len({t[unit] for t in trials}) >= 2:
            return unit_means(trials, condition, unit)
    return unit_means(trials, condition, "trial")


def server_path_cost(phases: Mapping[str, Mapping[Config, Mapping[str, Any]]]) -> dict[Config, dict[str, PathCost]]:
    """{(A, B): {condition: (phase 1 ms, phase 2 ms, added ms, [95% CI])}} for every config
    that phase 1 (the server) and phase 2 (the offline engine) measured on the same model:
    what the HTTP and streaming path adds to TTFT. Welch's interval over the units each run's
    own interval treats as independent (processes, else time blocks), so each run's drift is in it."""
    from scipy import stats
    server, offline = phases.get("phase1", {}), phases.get("phase2", {})
    name = lambda d: os.path.basename(str(d.get("model")).rstrip("/"))
    costs: dict[Config, dict[str, PathCost]] = {}
    for ab in sorted(set(server) & set(offline)):
        d1, d2 = server[ab], offline[ab]
        devices = {d.get("environment", {}).get("device") for d in (d1, d2)} - {None, REMOTE_DEVICE}
        if name(d1) != name(d2) or len(devices) > 1:      # another model, or another machine
            continue
        row: dict[str, PathCost] = {}
        for c in CONDITION_NAMES:
            x, y = (independent_means(d, c) if isinstance(d.get(c), dict) else None for d in (d1, d2))
            if x is not None and y is not None:
                ci = stats.ttest_ind(x, y, equal_var=False).confidence_interval()
                row[c] = (float(x.mean()), float(y.mean()), float(x.mean() - y.mean()), [float(ci.low), float(ci.high)])
        if row:
            costs[ab] = row
    return costs


def server_path_table(costs: Mapping[Config, Mapping[str, PathCost]]) -> str:
    """Markdown: per config and condition, phase 2's TTFT, phase 1's, and what the server path adds."""
    conds = [c for c in CONDITION_NAMES if any(c in row for row in costs.values())]
    rows = ["| config | " + " | ".join(f"{CONDITION_NAMES[c]}: offline → server ms (added, 95% CI)" for c in conds) + " |",
            "|---|" + "---|" * len(conds)]
    for (a, b), row in costs.items():
        cells = [f"{row[c][1]:.2f} → {row[c][0]:.2f} ({row[c][2]:+.2f} {ci_text(row[c][3], 2)})" if c in row else "-"
                 for c in conds]
        rows.append(f"| A={a} / B={b} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def interval_note(configs: Mapping[Config, Mapping[str, Any]]) -> str:
    """One line on what the intervals of these files are taken over."""
    intervals: list[Any] = [d.get("interval") for d in configs.values()]      # None where a file has none
    if not all(intervals):
        return "95% intervals: paired over rounds (files made before intervals were taken over time blocks)."
    if len({m["unit"] for m in intervals}) != 1:
        return "95% intervals: taken over different units in different files (see each file's interval.unit)."
    m = intervals[0]
    if m["unit"] == "process":
        return (f"95% intervals: {m['statistic']}; {m['processes']} processes of {m['num_blocks'] // m['processes']} "
                f"time blocks, configs {', '.join(m['interleaved_configs'])} interleaved.")
    if m["unit"] == "block":
        return (f"95% intervals: {m['statistic']}; {m['num_blocks']} blocks of {m['rounds_per_block']:g} rounds "
                f"over about {max(i['span_s'] for i in intervals):.0f} s, "
                f"configs {', '.join(m['interleaved_configs'])} interleaved.")
    return f"95% intervals: {m['statistic']}."


def compare_runs(run_dirs: Sequence[str]) -> str:
    """Markdown table: each config's saving in every run, and whether every pair of runs agrees;
    then where each run came from, so that a reader can see the runs are comparable."""
    runs = [discover_results(d)[0] for d in run_dirs]
    keys = sorted({(phase, ab) for r in runs for phase, configs in r.items() for ab in configs})
    rows = ["| config | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) +
            " | pairs that agree | across runs (95% CI over runs) |",
            "|---|" + "---|" * (len(runs) + 2)]
    agreed = total = 0
    several_phases = len({phase for phase, _ in keys}) > 1
    origins = [run_origin(r) for r in runs]
    hosts = [o["host_ms"] for o in origins]
    host_notes = []
    for phase, (a, b) in keys:
        found: list[Any] = [r.get(phase, {}).get((a, b)) for r in runs]       # None where a run lacks the config
        cells = [f"{d['ttft_saving_pct']:.1f}% {ci_text(d['ttft_saving_ci95'])}"
                 + (" UNSTABLE" if unstable(d) else "") if d else "-" for d in found]
        present = [i for i, d in enumerate(found) if d]
        pairs = {(i, j): agree(found[i]["ttft_saving_pct"], bounded(found[i]["ttft_saving_ci95"]),
                               found[j]["ttft_saving_pct"], bounded(found[j]["ttft_saving_ci95"]))
                 for k, i in enumerate(present) for j in present[k + 1:]}
        agreed, total = agreed + sum(pairs.values()), total + len(pairs)
        label = f"{phase.replace('phase', 'phase ')}: A={a} / B={b}" if several_phases else f"A={a} / B={b}"
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {sum(pairs.values())} of {len(pairs)} | "
                    f"{across_runs([found[i]['ttft_saving_pct'] for i in present])} |")
        host_notes += [f"{label}: runs {i + 1} and {j + 1} disagree; candidate causes: "
                       f"{'; '.join(candidate_causes(origins, hosts, i, j))}"
                       for (i, j), agreeing in pairs.items() if not agreeing]
    lines = ["\n".join(rows), f"{agreed} of {total} pairs of runs agree within their intervals.",
             *machine_notes(origins), *host_notes, ""]
    commands = set()
    for i, run_dir in enumerate(run_dirs):
        origin = origins[i]["provenance"]
        host = f", host figure {hosts[i]:.1f} ms" if hosts[i] else ""
        spread = origins[i]["host_spread"]
        if spread:
            low, high = spread
            host += f" (its processes {low:.1f}-{high:.1f} ms" + (
                f", {high / low:.1f}-fold: repeat it)" if high / low >= HOST_SPREAD_FLAG else ")")
        lines.append(f"run {i + 1}: {run_dir}: {origin['when']}, {origin['machine']}{host}, {origin['tool']}")
        lines.append(f"    {origin['command']}")
        commands.add(re.sub(r" --results-dir \S+", "", origin["command"]))
    if len(commands) > 1:
        lines.append("note: the runs' commands differ (beyond --results-dir): compare with care")
    return "\n".join(lines)


HOST_SPREAD_FLAG = 1.5      # a run whose processes' host figures differ this many times is flagged


def run_origin(run: Mapping[str, Mapping[Config, Mapping[str, Any]]]) -> dict[str, Any]:
    """What a run's files record of where it ran: its GPU (or CPU), vLLM version, the tool's code,
    describe_provenance's text, its host-speed figure (host.python_loop_ms; the median over its
    engine processes, None where its files predate it) and the spread of its processes' figures
    (min, max; None with fewer than two)."""
    first = next((d for configs in run.values() for d in configs.values()), {})
    env = first.get("environment", {})
    version = env.get("tool_version") or {}
    provenance = describe_provenance(first)
    per_process = [ms for ms in env.get("host_python_loop_ms_per_process") or [] if ms]
    return {"device": devices_label(env), "vllm": env.get("vllm_version"),
            "code": version.get("code_sha256") or version.get("script_sha256"),
            "provenance": provenance,
            "host_ms": float(np.median(per_process)) if per_process else (env.get("machine") or {}).get("host_python_loop_ms"),
            "host_spread": (min(per_process), max(per_process)) if len(per_process) > 1 else None}


def machine_notes(origins: Sequence[Mapping[str, Any]]) -> list[str]:
    """A line for each of GPU model and vLLM version on which the runs differ."""
    notes = []
    for key, what in (("device", "GPUs"), ("vllm", "vLLM versions")):
        values = [o[key] for o in origins]
        if len({v for v in values if v}) > 1:
            notes.append(f"note: the runs come from different {what}: "
                         + ", ".join(f"run {k + 1} {v or '?'}" for k, v in enumerate(values)))
    return notes


def candidate_causes(origins: Sequence[Mapping[str, Any]], hosts: Sequence[float | None], i: int, j: int) -> list[str]:
    """What differs between runs i and j in what their files record, in words: the GPU, vLLM,
    the tool's code, a run whose processes' hosts differ, how fast their hosts were."""
    a, b = origins[i], origins[j]
    causes = []
    if a["device"] != b["device"]:
        causes.append(f"GPU {a['device'] or '?'} against {b['device'] or '?'}")
    if a["vllm"] != b["vllm"]:
        causes.append(f"vLLM {a['vllm'] or '?'} against {b['vllm'] or '?'}")
    if a["code"] != b["code"]:
        causes.append(f"the tool's code: {a['provenance']['tool']} against {b['provenance']['tool']}")
    for k, origin in ((i, a), (j, b)):
        spread = origin["host_spread"]
        if spread and spread[1] / spread[0] >= HOST_SPREAD_FLAG:
            causes.append(f"run {k + 1}'s processes' hosts differ {spread[1] / spread[0]:.1f}-fold")
    hosts_differ = host_difference(hosts[i], hosts[j], i, j)
    if hosts_differ:
        causes.append(hosts_differ)
    return causes or ["none that the files record (the same GPU, vLLM, tool code and host speed)"]


def host_difference(ms_i: float | None, ms_j: float | None, i: int, j: int) -> str | None:
    """How two runs' hosts differ, in words, for a pair of runs that disagree; None where they
    ran the fixed Python workload equally fast."""
    if not ms_i or not ms_j:
        return "a run's files do not record its host-speed figure"
    slower, faster = (i, j) if ms_i > ms_j else (j, i)
    ratio = max(ms_i, ms_j) / min(ms_i, ms_j)
    if ratio < 1.005:
        return None
    return (f"run {slower + 1}'s host ran the fixed Python workload {100 * (ratio - 1):.0f}% slower than run "
            f"{faster + 1}'s ({max(ms_i, ms_j):.1f} ms against {min(ms_i, ms_j):.1f} ms)")


def across_runs(savings: Sequence[float]) -> str:
    """The runs' mean saving with a Student's t interval over runs: each process one value, as
    pyperf takes it. It holds what differs between processes, which one run cannot see."""
    if len(savings) < 2:
        return "-"
    low, high = mean_ci95(savings)
    return f"{np.mean(savings):.1f}% [{low:.1f}, {high:.1f}] (n={len(savings)})"


def anatomy_rows(configs: Mapping[Config, Mapping[str, Any]]) -> list[AnatomyRow]:
    """[(config label, condition, stats, floor or None, (GPU busy, step's rest) or None)] of every
    condition whose file carries the TTFT breakdown, in config order."""
    return [(f"A={a} / B={b}", c, data[c]["stats"], condition_floor(data, c),
             step_split(data[c]["stats"], data.get("gpu_busy"), c))
            for (a, b), data in sorted(configs.items()) for c in conditions_present({(a, b): data})
            if data[c]["stats"].get("ttft_breakdown_mean_ms")]


def anatomy_table(configs: Mapping[Config, Mapping[str, Any]]) -> str | None:
    """Markdown: where each condition's mean TTFT goes, and the GPU's floor for that prefill
    (prefill_fit.gpu_floor), with the TTFT as a multiple of it. Where the file has the GPU-busy
    segment (gpu_busy), the prefill step's GPU-busy part and the share of the TTFT that is not
    GPU work. None where no file has the breakdown."""
    rows = anatomy_rows(configs)
    if not rows:
        return None
    busy_columns = any(split for *_, split in rows)
    extra = ["step: GPU busy", "not GPU work"] if busy_columns else []
    columns = breakdown_columns([stats["ttft_breakdown_mean_ms"] for _, _, stats, _, _ in rows])
    lines = ["| config | condition | TTFT ms | " + " | ".join([label for _, label in columns] + extra) +
             " | GPU floor ms | TTFT / floor |", "|---|---|" + "---:|" * (len(columns) + len(extra) + 3)]
    for label, condition, stats, floor, split in rows:
        parts = stats["ttft_breakdown_mean_ms"]
        floor_cells = (f"{floor['floor_ms']:.2f} ({floor['bound']}) | {stats['ttft_mean'] / floor['floor_ms']:.1f}x"
                       if floor else "- | -")
        busy_cells = ([f"{split[0]:.2f}", f"{100 * (1 - split[0] / stats['ttft_mean']):.0f}%"] if split else ["-", "-"]) \
            if busy_columns else []
        lines.append(f"| {label} | {condition.removeprefix('cache_')} | {stats['ttft_mean']:.2f} | " +
                     " | ".join([f"{parts[key]:.2f}" if key in parts else "-" for key, _ in columns] + busy_cells) +
                     f" | {floor_cells} |")
    return "\n".join(lines)
