"""--processes N: the entry script run N times, one engine process after another, and their
results merged into one per config, the interval over the processes' means.
"""
from __future__ import annotations
import copy
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .analysis import compare, compute_stats, interval_method, reproducibility
from .audit import sum_counters
from .defaults import CONDITIONS, OFFLINE_PROG, TIER_CONDITION
from .errors import EXIT_AUDIT, EXIT_SETUP, Interrupted
from .gpu_busy import merge_segments
from .console import write_results
from .result_schema import PhaseResult, build_phase_result
from .results import note_existing_results
from .settings import RunSettings


def run_processes(settings: RunSettings, argv: list[str], script: str) -> int:
    """--processes N: the entry script (script) N times, one engine process after another, each measuring
    every config; then one result per config over all of them. A process that fails ends the
    run (it has printed its own one line); a signal to this one is passed on to the running one."""
    note_existing_results(settings)
    folder = tempfile.mkdtemp(prefix="phase2-processes-")
    try:
        t0 = time.perf_counter()
        per_process: list[list[Any]] = []      # each process's results, as its worker wrote them
        ends: list[float] = []
        same_rounds: list[str] = []           # --num-trials of the first process, for the rest
        for k in range(settings.processes):
            print(f"\n=== engine process {k + 1} of {settings.processes} ===", flush=True)
            out = os.path.join(folder, f"process{k}.json")
            code = run_worker(script, [*argv, "--processes", "1", "--num-blocks", str(settings.num_blocks), "--min-block-seconds",
                               str(settings.min_block_seconds), *same_rounds, "--worker-output", out])
            if code < 0:
                print(f"{OFFLINE_PROG}: error: engine process {k + 1} was killed by {signal.Signals(-code).name}; "
                      f"no results written", file=sys.stderr)
                return 128 - code
            if code not in (0, EXIT_AUDIT) or not os.path.exists(out):
                return code or EXIT_SETUP
            ends.append(time.perf_counter() - t0)
            with open(out) as f:
                per_process.append(json.load(f))
            # every process measures as many rounds as the first: the processes' means weigh alike
            same_rounds = ["--num-trials", str(per_process[0][0]["config"]["num_trials"])]
            left_s = ends[-1] / (k + 1) * (settings.processes - k - 1)
            print(f"engine process {k + 1} of {settings.processes} done after {ends[-1]:.0f} s; about "
                  f"{left_s / 60:.1f} min left", flush=True)
        run_wall_s = time.perf_counter() - t0
        # a process's trials are numbered across its configs: the next process's start after them all
        trials_per_process = [sum(len(r[c][kind]) for r in p for c in (*CONDITIONS, TIER_CONDITION) if c in r
                                  for kind in ("trials", "discarded_trials")) for p in per_process]
        order_offsets = [sum(trials_per_process[:k]) for k in range(len(per_process))]
        results = [merge_processes([p[i] for p in per_process], order_offsets, settings, run_wall_s)
                   for i in range(len(settings.configs))]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return write_results(results, settings.results_dir)


def run_worker(script: str, args: Sequence[str]) -> int:
    """One engine process: the entry script run again with args (never this module: the
    worker must be the script the user ran, with its __main__); its exit code. On a signal here, the same one there;
    if it has not ended 120 s later, SIGKILL to it and every process it started (errors' watchdog ends this
    process, and them, INTERRUPT_GRACE_S after the signal, 30 s unless set)."""
    import psutil

    proc = subprocess.Popen([sys.executable, os.path.abspath(script), *args])
    try:
        return proc.wait()
    except Interrupted as e:
        if proc.poll() is None:
            tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(e.exit_code - 128)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                pass
            for p in tree + psutil.Process().children(recursive=True):
                try:
                    p.kill()
                except psutil.Error:
                    pass
        raise


def merge_processes(results: list[PhaseResult], order_offsets: list[int], settings: RunSettings,
                    run_wall_s: float) -> PhaseResult:
    """One config's results from several engine processes, as one result: every trial tagged
    with its process, rounds, blocks and order (order_offsets: where each process's trials
    begin in the run) numbered across the run, start_s on the first process's clock; the
    statistics over all measured trials, the interval over the processes' means (unit
    "process"). discarded_trials holds every process's discarded rounds. Built by the builder
    of one process's result."""
    merged: dict[str, Any] = copy.deepcopy(dict(results[0]))     # filled in below, then built
    measured_conditions = [c for c in (*CONDITIONS, TIER_CONDITION) if c in results[0]]
    conditions: dict[str, dict[str, Any]] = {c: {"trials": [], "discarded_trials": []} for c in measured_conditions}
    round_offset = block_offset = 0
    for k, (r, order_offset) in enumerate(zip(results, order_offsets)):
        clock_s = r["environment"]["run_started_unix_s"] - results[0]["environment"]["run_started_unix_s"]
        for c in measured_conditions:
            for kind in ("discarded_trials", "trials"):
                for t in r[c][kind]:                                    # type: ignore[literal-required]
                    t = {**t, "process": k, "round": t["round"] + round_offset, "order": t["order"] + order_offset,
                         "start_s": t["start_s"] + clock_s}
                    if "block" in t:
                        t["block"] += block_offset
                    conditions[c][kind].append(t)
        round_offset += r["config"]["warmup_trials"] + r["config"]["num_trials"]
        block_offset += r["config"]["num_blocks"]
    measured = [t for c in measured_conditions for t in conditions[c]["trials"]]
    for c in measured_conditions:
        conditions[c]["trials"].sort(key=lambda t: t["order"])
        conditions[c]["stats"] = compute_stats(conditions[c]["trials"])
        merged[c] = conditions[c]
    num_blocks = sum(r["config"]["num_blocks"] for r in results)
    num_rounds = sum(r["config"]["num_trials"] for r in results)
    plan = {"configs": results[0]["interval"]["interleaved_configs"], "min_block_s": settings.min_block_seconds,
            "num_blocks": num_blocks, "rounds_per_block": num_rounds / num_blocks, "processes": len(results)}
    unit = "process"
    comparison = compare(measured, unit)
    merged.update({key: comparison[key] for key in comparison})
    merged["interval"] = interval_method(measured, unit, plan)
    merged["reproducibility"] = reproducibility(measured, unit)
    merged["config"].update({"num_trials": num_rounds, "num_blocks": num_blocks, "processes": len(results)})
    merged["warmup_time_ms"] = float(np.mean([r["warmup_time_ms"] for r in results]))      # one warmup a process
    merged["warmup_time_ms_per_process"] = [r["warmup_time_ms"] for r in results]
    overheads = [t["ttft_ms"] - t["engine_ttft_ms"] for t in measured if t["engine_ttft_ms"] is not None]
    merged["harness_overhead_ms"] = float(np.median(overheads)) if overheads else None
    merged["gpu_busy"] = merge_segments([r.get("gpu_busy") for r in results])
    audits = [r["cache_audit"] for r in results]
    merged["cache_audit"] = {
        "ok": all(a["ok"] for a in audits),
        "expected_hit_cached_tokens": audits[0]["expected_hit_cached_tokens"],
        "requests_checked": sum(a["requests_checked"] for a in audits),
        "problems": [f"process {k + 1}: {problem}" for k, a in enumerate(audits) for problem in a["problems"]],
        "engine_counters": sum_counters([a["engine_counters"] for a in audits]),
    }
    if merged["cache_audit"]["engine_counters"]:
        merged["cache_audit"]["engine_counters"]["scope"] = f"every request of the run's {len(results)} processes, all configs"
    merged["timestamp"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    merged["environment"].update({
        **settings.provenance,
        "engine_start_s_per_process": [r["environment"]["engine_start_s"] for r in results],
        "host_python_loop_ms_per_process": [r["environment"].get("machine", {}).get("host_python_loop_ms")
                                            for r in results],
        "trial_order": [f"{t['condition']}:{t['round']}" for t in sorted(
            (t for c in measured_conditions for kind in ("discarded_trials", "trials") for t in conditions[c][kind]),
            key=lambda t: t["order"])],
        "config_wall_s": sum(r["environment"]["config_wall_s"] for r in results),
        "run_wall_s": run_wall_s,
    })
    return build_phase_result(**merged)
