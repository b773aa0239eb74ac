"""plot_results: discovery, the figure itself, bad files."""
import json
import os

import numpy as np
import pytest

from conftest import ROOT, run_script
from prefix_cache_bench import charts, intervals, load_tables, prefill_fit, provenance, readmes, tables
from prefix_cache_bench import results as results_module


def stats(ttft, tput, **extra):
    return {"ttft_mean": ttft, "ttft_median": ttft, "ttft_stdev": 1.0, "total_time_mean": 100.0,
            "total_time_stdev": 2.0, "throughput_mean": tput, "throughput_stdev": 5.0, "prompt_tokens": 100, **extra}


def design_result(a, b, hit=10.0, miss=12.0):
    """Exactly the design's schema, no extended keys."""
    return {"phase": "phase2_python_api", "model": "facebook/opt-125m", "timestamp": "2026-11-27T00:00:00",
            "config": {"context_size_a": a, "context_size_b": b, "max_output_tokens": 50, "num_trials": 10,
                       "warmup_trials": 1},
            "warmup_time_ms": 50.0,
            "cache_hit": {"trials": [], "stats": stats(hit, 400.0)},
            "cache_miss": {"trials": [], "stats": stats(miss, 390.0)},
            "ttft_degradation_pct": (miss - hit) / hit * 100}


def extended_result(a, b, hit=10.0, miss=12.0, cold=15.0, ok=True):
    r = design_result(a, b, hit, miss)
    r["cache_hit"]["stats"]["ttft_ci95"] = [hit - 0.5, hit + 1.0]
    r["cache_cold"] = {"trials": [], "stats": stats(cold, 380.0, ttft_ci95=[cold - 1, cold + 1])}
    r["ttft_saving_pct"], r["ttft_saving_ci95"] = (cold - hit) / cold * 100, [20.0, 40.0]
    r["cache_audit"] = {"ok": ok, "problems": [] if ok else ["cache_miss trial 1 ttft request: cached_tokens=16"]}
    r["environment"] = {"device": "NVIDIA H200", "vllm_version": "0.26.0"}
    return r


def write(dirpath, name, obj):
    path = os.path.join(dirpath, name)
    with open(path, "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def bar_groups(ax):
    from matplotlib.container import BarContainer
    return [c for c in ax.containers if isinstance(c, BarContainer)]


def bar_heights(ax):
    return [[round(bar.get_height(), 6) for bar in c] for c in bar_groups(ax)]


def test_discovery_groups_by_phase_and_orders_numerically(tmp_path):
    for a, b in ((1024, 256), (256, 256), (512, 256), (256, 1536)):
        write(tmp_path, f"results_phase2_a{a}_b{b}.json", design_result(a, b))
    p1 = design_result(512, 256)
    p1["cache_hit"]["stats"]["warmup_time_mean"] = 40.0
    write(tmp_path, "results_phase1_a512_b256.json", p1)
    write(tmp_path, "unrelated.json", {"x": 1})
    phases, skipped = results_module.discover_results(str(tmp_path))
    assert list(phases) == ["phase1", "phase2"]
    assert list(phases["phase2"]) == [(256, 256), (256, 1536), (512, 256), (1024, 256)]
    assert skipped == []


def test_design_schema_file_plots_two_panels_hit_and_miss(tmp_path):
    configs = {(256, 256): design_result(256, 256, 10.0, 12.0), (512, 256): design_result(512, 256, 11.0, 13.5)}
    fig = charts.plot_phase(configs, "phase2", "phase2_python_api", str(tmp_path / "out.png"))
    assert len(fig.axes) == 2
    ttft_ax, tput_ax = fig.axes
    assert bar_heights(ttft_ax) == [[10.0, 11.0], [12.0, 13.5]]      # one container per condition, one bar per config
    assert bar_heights(tput_ax) == [[400.0, 400.0], [390.0, 390.0]]
    assert [t.get_text() for t in ttft_ax.get_xticklabels()] == ["A=256 / B=256", "A=512 / B=256"]
    assert "time to first token (ms)" in ttft_ax.get_ylabel()
    assert os.path.getsize(tmp_path / "out.png") > 10_000


def test_extended_file_adds_cold_bars_ci_error_bars_and_notes(tmp_path):
    configs = {(256, 256): extended_result(256, 256, 10.0, 12.0, 15.0)}
    fig = charts.plot_phase(configs, "phase2", "phase2_python_api", str(tmp_path / "out.png"))
    ttft_ax = fig.axes[0]
    assert bar_heights(ttft_ax) == [[10.0], [12.0], [15.0]]
    # the hit bar's error bar spans its 95% CI, not +-1 stdev
    hit_err = bar_groups(ttft_ax)[0].errorbar.lines[2][0].get_segments()[0]
    assert [round(y, 6) for _, y in hit_err] == [9.5, 11.0]
    texts = " ".join(t.get_text() for t in ttft_ax.texts)
    assert "miss +20% vs hit" in texts and "hit saves 33% [20, 40]" in texts
    assert "NVIDIA H200" in fig._suptitle.get_text() and "vLLM 0.26.0" in fig._suptitle.get_text()


def test_failed_audit_is_marked_on_the_chart(tmp_path):
    configs = {(256, 256): extended_result(256, 256), (512, 256): extended_result(512, 256, ok=False)}
    fig = charts.plot_phase(configs, "phase2", "x", str(tmp_path / "out.png"))
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["A=256 / B=256", "A=512 / B=256\nAUDIT FAILED"]
    hit_bars = bar_groups(fig.axes[0])[0]
    assert hit_bars[1].get_hatch() == "//" and not hit_bars[0].get_hatch()


def test_unstable_run_is_flagged_on_the_chart_and_in_the_table(tmp_path):
    steady, moved = extended_result(256, 256), extended_result(512, 256)
    steady["reproducibility"] = {"stable": True}
    moved["reproducibility"] = {"stable": False}
    configs = {(256, 256): steady, (512, 256): moved}
    fig = charts.plot_phase(configs, "phase2", "x", str(tmp_path / "out.png"))
    notes = [t for t in fig.axes[0].texts if "hit saves" in t.get_text()]
    assert ["UNSTABLE" in t.get_text() for t in notes] == [False, True]
    assert notes[1].get_color() == "red"
    rows = tables.summary_table(configs).splitlines()[2:]
    assert ["UNSTABLE" in row for row in rows] == [False, True]


def test_phase1_style_file_with_warmup_stats_gets_a_warmup_panel(tmp_path):
    r = design_result(512, 256)
    r["cache_hit"]["stats"]["warmup_time_mean"] = 40.0
    r["cache_miss"]["stats"]["warmup_time_mean"] = 55.0
    fig = charts.plot_phase({(512, 256): r}, "phase1", "phase1", str(tmp_path / "out.png"))
    assert len(fig.axes) == 3
    assert bar_heights(fig.axes[0]) == [[40.0], [55.0]]
    assert fig.axes[0].get_title() == "Warmup"


def test_summary_table_is_markdown_with_a_row_per_config():
    configs = {(256, 256): extended_result(256, 256), (512, 256): extended_result(512, 256, ok=False)}
    table = tables.summary_table(configs).splitlines()
    assert table[0].startswith("| config | hit TTFT ms | miss TTFT ms | cold TTFT ms |")
    assert len(table) == 4 and "| FAILED |" in table[3] and "| ok |" in table[2]


def test_cli_skips_bad_files_with_one_line_each_and_plots_the_rest(tmp_path):
    write(tmp_path, "results_phase2_a256_b256.json", extended_result(256, 256))
    write(tmp_path, "results_phase2_a512_b256.json", design_result(512, 256))
    write(tmp_path, "results_phase2_a1024_b256.json", '{"phase": "phase2", "cache_hit": ')
    broken = design_result(2048, 256)
    del broken["cache_miss"]["stats"]["throughput_mean"]
    write(tmp_path, "results_phase2_a2048_b256.json", broken)
    proc = run_script(["plot_results.py", "--results-dir", str(tmp_path), "--out-dir", str(tmp_path / "png")])
    assert proc.returncode == 0, proc.stderr
    skipped = [line for line in proc.stderr.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 2
    assert any("results_phase2_a1024_b256.json: not valid JSON" in line for line in skipped)
    assert any("a2048_b256.json: a phase 1/2 result without cache_miss.stats.throughput_mean" in line for line in skipped)
    assert os.path.exists(tmp_path / "png" / "experiment1_all_configs_phase2.png")
    assert "| A=256 / B=256 |" in proc.stdout and "| A=512 / B=256 |" in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("case", ["missing_dir", "empty_dir", "only_broken", "out_dir_is_file"])
def test_cli_exits_1_with_one_line(tmp_path, case):
    results = tmp_path / "results"
    args = ["plot_results.py", "--results-dir", str(results)]
    if case != "missing_dir":
        results.mkdir()
    if case == "only_broken":
        write(results, "results_phase2_a1_b1.json", "not json")
    if case == "out_dir_is_file":
        write(results, "results_phase2_a1_b1.json", design_result(1, 1))
        write(tmp_path, "blocker", "x")
        args += ["--out-dir", str(tmp_path / "blocker")]
    proc = run_script(args)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and str(tmp_path) in errors[0]
    assert "Traceback" not in proc.stderr


def test_compare_runs_tables_each_config_and_counts_agreeing_pairs(tmp_path):
    runs = []
    for k, (saving, ci) in enumerate([(40.0, [35.0, 45.0]), (33.0, [28.0, 38.0]), (20.0, [18.0, 22.0])]):
        run = tmp_path / f"run{k + 1}"
        run.mkdir()
        r = extended_result(512, 256)
        r["ttft_saving_pct"], r["ttft_saving_ci95"] = saving, ci
        r["environment"]["command"] = f"python phase2_experiment.py --size-a 512 --results-dir run{k + 1}"
        # the host-speed figure: run 1's one process, none in run 2 (a file from before it), run 3's
        # three processes (their median, 25.0 ms)
        if k == 0:
            r["environment"]["machine"] = {"host_python_loop_ms": 20.0}
        if k == 2:
            r["environment"]["host_python_loop_ms_per_process"] = [24.0, 30.0, 25.0]
        write(run, "results_phase2_a512_b256.json", r)
        runs.append(str(run))
    table = tables.compare_runs(runs).splitlines()
    assert table[0] == "| config | run 1 | run 2 | run 3 | pairs that agree | across runs (95% CI over runs) |"
    # 40 vs 33: 7 <= sqrt(5^2 + 5^2); 40 vs 20 and 33 vs 20 are far apart. Across runs: mean 31.0,
    # sd 10.149, t(0.975, 2) = 4.303: 31.0 +- 25.2
    assert table[2] == ("| A=512 / B=256 | 40.0% [35.0, 45.0] | 33.0% [28.0, 38.0] | 20.0% [18.0, 22.0] | 1 of 3 | "
                        "31.0% [5.8, 56.2] (n=3) |")
    assert table[3] == "1 of 3 pairs of runs agree within their intervals."
    # beside each pair that does not agree, how their hosts differ: 25.0 / 20.0 = 1.25
    assert table[4] == ("A=512 / B=256: runs 1 and 3 disagree; candidate causes: run 3's host ran the fixed Python "
                        "workload 25% slower than run 1's (25.0 ms against 20.0 ms)")
    assert table[5] == ("A=512 / B=256: runs 2 and 3 disagree; candidate causes: a run's files do not record its "
                        "host-speed figure")
    # where each run came from; the commands differ only in --results-dir, so no warning
    assert table[7].startswith(f"run 1: {runs[0]}: 2026-11-27T00:00:00, NVIDIA H200, vLLM 0.26.0, torch ?, host figure 20.0 ms, ")
    assert table[8] == "    python phase2_experiment.py --size-a 512 --results-dir run1"
    assert table[9].startswith(f"run 2: {runs[1]}: 2026-11-27T00:00:00, NVIDIA H200, vLLM 0.26.0, torch ?, tool")
    assert not any("differ" in line for line in table)
    proc = run_script(["plot_results.py", "--compare", *runs])
    assert proc.returncode == 0 and "1 of 3 pairs" in proc.stdout
    assert run_script(["plot_results.py", "--compare", str(tmp_path / "nope")]).returncode == 1


def test_compare_tells_machines_apart_and_names_what_differs_between_runs_that_disagree(tmp_path):
    """Runs on two GPU models and two vLLM versions, one of them with a process on a host twice
    as slow: the comparison says so, and names each difference as a candidate cause."""
    runs = []
    for k, (saving, device, vllm, per_process) in enumerate([(40.0, "NVIDIA H200", "0.26.0", [20.0, 21.0, 20.5]),
                                                            (20.0, "NVIDIA H100 80GB HBM3", "0.33.0", [20.0, 40.0]),
                                                            (20.5, "NVIDIA H100 80GB HBM3", "0.33.0", [20.0, 20.2])]):
        run = tmp_path / f"run{k + 1}"
        run.mkdir()
        r = extended_result(512, 256)
        r["ttft_saving_pct"], r["ttft_saving_ci95"] = saving, [saving - 1, saving + 1]
        r["environment"].update(device=device, vllm_version=vllm, host_python_loop_ms_per_process=per_process)
        write(run, "results_phase2_a512_b256.json", r)
        runs.append(str(run))
    lines = tables.compare_runs(runs).splitlines()
    assert lines[4] == ("note: the runs come from different GPUs: run 1 NVIDIA H200, run 2 NVIDIA H100 80GB HBM3, "
                        "run 3 NVIDIA H100 80GB HBM3")
    assert lines[5] == "note: the runs come from different vLLM versions: run 1 0.26.0, run 2 0.33.0, run 3 0.33.0"
    # hosts by their medians: 20.5, 30.0, 20.1 ms; runs 2 and 3 agree (20.0 and 20.5, +-1)
    assert lines[6] == ("A=512 / B=256: runs 1 and 2 disagree; candidate causes: GPU NVIDIA H200 against NVIDIA H100 "
                        "80GB HBM3; vLLM 0.26.0 against 0.33.0; run 2's processes' hosts differ 2.0-fold; run 2's host "
                        "ran the fixed Python workload 46% slower than run 1's (30.0 ms against 20.5 ms)")
    assert lines[7].startswith("A=512 / B=256: runs 1 and 3 disagree; candidate causes: GPU NVIDIA H200 against")
    assert "runs 2 and 3" not in "\n".join(lines)
    assert "host figure 30.0 ms (its processes 20.0-40.0 ms, 2.0-fold: repeat it)" in lines[11]
    assert "host figure 20.5 ms (its processes 20.0-21.0 ms)," in lines[9]


def test_a_pair_that_differs_in_nothing_recorded_says_so():
    origin = {"device": "NVIDIA H200", "vllm": "0.26.0", "code": "abc", "provenance": {"tool": "t"},
              "host_ms": 20.0, "host_spread": None}
    assert tables.candidate_causes([origin, dict(origin)], [20.0, 20.02], 0, 1) == \
        ["none that the files record (the same GPU, vLLM, tool code and host speed)"]


def test_gzipped_results_are_read_like_plain_ones(tmp_path):
    import gzip
    r = extended_result(1024, 256)
    with gzip.open(tmp_path / "results_phase2_a1024_b256.json.gz", "wt") as f:
        json.dump(r, f)
    write(tmp_path, "results_phase2_a512_b256.json", extended_result(512, 256))
    (tmp_path / "results_phase2_a2048_b256.json.gz").write_bytes(b"not gzip")
    phases, skipped = results_module.discover_results(str(tmp_path))
    assert list(phases["phase2"]) == [(512, 256), (1024, 256)]
    assert phases["phase2"][(1024, 256)] == r
    assert [os.path.basename(path) for path, _ in skipped] == ["results_phase2_a2048_b256.json.gz"]
    assert skipped[0][1].startswith("cannot be read")


def test_compare_warns_when_the_runs_ran_different_commands(tmp_path):
    runs = []
    for k, sizes in enumerate(["512x256", "512x256,1024x256"]):
        run = tmp_path / f"run{k}"
        run.mkdir()
        r = extended_result(512, 256)
        r["environment"]["command"] = f"python phase2_experiment.py --sizes {sizes}"
        write(run, "results_phase2_a512_b256.json", r)
        runs.append(str(run))
    assert "note: the runs' commands differ" in tables.compare_runs(runs)


def test_compare_names_the_phase_when_the_runs_hold_both(tmp_path):
    runs = []
    for k, phases in enumerate([("phase2",), ("phase1", "phase2")]):
        run = tmp_path / f"run{k}"
        run.mkdir()
        for phase in phases:
            r = extended_result(512, 256)
            r["ttft_saving_pct"] = 40.0 if phase == "phase1" else 50.0
            write(run, f"results_{phase}_a512_b256.json", r)
        runs.append(str(run))
    table = tables.compare_runs(runs).splitlines()
    assert table[2].startswith("| phase 1: A=512 / B=256 | - | 40.0% ")
    assert table[3].startswith("| phase 2: A=512 / B=256 | 50.0% ") and "| 1 of 1 |" in table[3]
    assert tables.compare_runs(runs[:1]).splitlines()[2].startswith("| A=512 / B=256 | 50.0% ")


def git(*args):
    import subprocess
    return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, check=True).stdout


def test_a_code_hash_names_the_commit_whose_entry_script_and_package_have_it():
    """A file made by the package carries code_sha256: the commit whose phase2_experiment.py
    and prefix_cache_bench/ have exactly that code, also when the file's git_commit is another."""
    head = git("log", "-1", "--format=%h", "--", "phase2_experiment.py", "prefix_cache_bench").decode().strip()
    names = git("ls-tree", "--name-only", f"{head}:prefix_cache_bench").decode().split()
    texts = [("phase2_experiment.py", git("show", f"{head}:phase2_experiment.py"))]
    texts += [(f"prefix_cache_bench/{n}", git("show", f"{head}:prefix_cache_bench/{n}")) for n in names if n.endswith(".py")]
    sha = provenance.code_sha256(texts)
    assert provenance.code_commits(sha, "phase2_experiment.py")[0] == head
    r = extended_result(512, 256)
    r["environment"]["tool_version"] = {"git_commit": "0" * 40, "git_dirty": True, "script_sha256": "0" * 64,
                                        "code_sha256": sha}
    assert provenance.describe_provenance(r)["tool"].startswith("phase2_experiment.py and prefix_cache_bench/ as of commit ")
    r["environment"]["tool_version"]["code_sha256"] = "f" * 64
    assert provenance.describe_provenance(r)["tool"] == ("phase2_experiment.py and prefix_cache_bench/, code sha256 "
                                                         "ffffffffffff (no commit here has it)")
    # the hash covers every module: one byte changed anywhere changes it
    changed = [(name, text + b" ") if name.endswith("audit.py") else (name, text) for name, text in texts]
    assert provenance.code_sha256(changed) != sha


def test_a_script_hash_names_the_commit_that_made_the_file():
    import hashlib
    last = git("log", "-1", "--format=%h", "--", "phase2_experiment.py").decode().strip()
    sha = hashlib.sha256(git("show", f"{last}:phase2_experiment.py")).hexdigest()
    assert last in provenance.script_commits(sha)
    r = extended_result(512, 256)
    r["environment"]["tool_version"] = {"git_commit": None, "git_dirty": None, "script_sha256": sha}
    assert provenance.describe_provenance(r)["tool"] == f"phase2_experiment.py as of commit {provenance.script_commits(sha)[-1]}"
    r["environment"]["tool_version"]["script_sha256"] = "0" * 64
    assert provenance.describe_provenance(r)["tool"] == "phase2_experiment.py sha256 000000000000 (no commit here has it)"
    assert provenance.script_commits("0" * 64) == ()


def test_write_readme_describes_the_folder_from_its_files(tmp_path):
    r = extended_result(512, 256)
    r["environment"]["command"] = "python phase2_experiment.py --size-a 512 --size-b 256"
    write(tmp_path, "results_phase2_a512_b256.json", r)
    proc = run_script(["plot_results.py", "--results-dir", str(tmp_path), "--write-readme"])
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "README.md").read_text()
    assert text.startswith(f"# Results: {tmp_path.name}\n")
    assert "- command: `python phase2_experiment.py --size-a 512 --size-b 256`" in text
    assert "- machine: NVIDIA H200, vLLM 0.26.0" in text
    assert tables.summary_table(results_module.discover_results(str(tmp_path))[0]["phase2"]) in text
    assert "![experiment1_all_configs_phase2.png](experiment1_all_configs_phase2.png)" in text


SHAPE = {"num_parameters": 1_100_000, "num_embedding_parameters": 100_000, "num_layers": 2,
         "num_attention_heads": 4, "head_dim": 8, "hidden_size": 32, "vocab_size": 1000}


def test_prefill_flops_counts_weights_attention_and_one_lm_head():
    # 2 x 1e6 weights x 10 tokens + 4 x 2 layers x 4 heads x 8 dims x (10 x 0 + 10 x 11 / 2 keys) + 2 x 32 x 1000
    assert prefill_fit.prefill_flops(SHAPE, 10) == 2e7 + 256 * 55 + 64_000
    # behind 100 cached tokens each new token also meets those 100 keys
    assert prefill_fit.prefill_flops(SHAPE, 10, 100) - prefill_fit.prefill_flops(SHAPE, 10) == 256 * 1000
    # the Llama-3.1-8B shape, 1k tokens: about 2 x 7 G weights x 1k = 14 TFLOP, attention ~0.5
    llama = {"num_parameters": 8_030_261_248, "num_embedding_parameters": 1_050_673_152, "num_layers": 32,
             "num_attention_heads": 32, "head_dim": 128, "hidden_size": 4096, "vocab_size": 128256}
    assert prefill_fit.prefill_flops(llama, 1000) / 1e12 == pytest.approx(13.96 + 0.26, abs=0.02)


def _fit_configs(overhead_ms, tflops, shape=SHAPE, device="NVIDIA H200"):
    """Configs whose cold and miss TTFTs lie exactly on overhead + FLOPs / rate."""
    configs = {}
    for a in (256, 1024, 4096):
        r = extended_result(a, 256)
        r["environment"] = {"device": device, "model_shape": shape}
        for cond, tokens in (("cache_cold", a + 256 + 17), ("cache_miss", 256 + 17)):
            r[cond]["stats"]["prompt_tokens"] = tokens
            work_s = prefill_fit.prefill_flops(shape, tokens) / (tflops * 1e12) if shape else tokens / 1e5
            r[cond]["stats"]["ttft_mean"] = overhead_ms + work_s * 1e3
        r["cache_hit"]["stats"]["cached_tokens"] = a + 256
        r["ttft_saving_ms"] = 0.02 * (a + 256)
        configs[(a, 256)] = r
    return configs


def test_prefill_fit_recovers_overhead_rate_and_mfu():
    fit = prefill_fit.prefill_fit(_fit_configs(overhead_ms=12.0, tflops=0.5))
    assert fit["work"] == "FLOPs" and fit["r2"] == pytest.approx(1.0)
    assert fit["overhead_ms"] == pytest.approx(12.0) and fit["tflops"] == pytest.approx(0.5)
    assert fit["mfu"] == pytest.approx(0.5 / 989) and fit["peak_tflops"] == 989
    assert fit["prefill_tokens_per_s"] == pytest.approx(0.5e12 / 2e6)        # 2 FLOPs per weight per token
    assert [ms for _, ms in fit["saved_ms_per_1k_cached"]] == pytest.approx([20.0] * 3)
    text = prefill_fit.describe_fit(fit, "NVIDIA H200")
    assert "12.0 ms" in text and "MFU" in text and "20.0 ms at 512" in text
    # no shape recorded: a straight line in tokens; an unknown device: no MFU
    fit = prefill_fit.prefill_fit(_fit_configs(overhead_ms=12.0, tflops=0.5, shape={}, device="Some GPU"))
    assert fit["work"] == "tokens" and fit["tflops"] is None and fit["mfu"] is None
    assert fit["overhead_ms"] == pytest.approx(12.0) and fit["prefill_tokens_per_s"] == pytest.approx(1e5)
    assert prefill_fit.prefill_fit({(256, 256): extended_result(256, 256)}) is None       # too few lengths to fit


def test_prefill_fit_counts_every_gpu_of_a_parallel_engine():
    configs = _fit_configs(overhead_ms=12.0, tflops=0.5)
    for r in configs.values():
        r["environment"]["engine_args"] = {"tensor_parallel_size": 2, "pipeline_parallel_size": 1}
    fit = prefill_fit.prefill_fit(configs)
    assert fit["gpus"] == 2 and fit["peak_tflops"] == 2 * 989 and fit["mfu"] == pytest.approx(0.5 / (2 * 989))
    assert "MFU of 2 x NVIDIA H200: together 1978 dense" in prefill_fit.describe_fit(fit, "NVIDIA H200")


def test_context_chart_and_log_scale_for_long_contexts(tmp_path):
    configs = _fit_configs(overhead_ms=12.0, tflops=0.05)
    fit = prefill_fit.prefill_fit(configs)
    fig = charts.plot_context(configs, fit, "x", str(tmp_path / "context.png"))
    assert fig.axes[0].get_xscale() == "log" and os.path.getsize(tmp_path / "context.png") > 10_000
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(line.startswith("fit, nothing cached: 12.0 ms") for line in labels)
    fig = charts.plot_phase(configs, "phase2", "x", str(tmp_path / "bars.png"))
    assert fig.axes[0].get_yscale() == "log"          # cold TTFTs span more than 20x
    short = {k: extended_result(*k) for k in ((256, 256), (512, 256))}
    assert charts.plot_phase(short, "phase2", "x", str(tmp_path / "b2.png")).axes[0].get_yscale() == "linear"


def test_many_configs_stack_the_panels(tmp_path):
    configs = {(256 * k, 256): extended_result(256 * k, 256) for k in range(1, 9)}
    fig = charts.plot_phase(configs, "phase2", "x", str(tmp_path / "eight.png"))
    ttft, tput = fig.axes[:2]
    assert ttft.get_position().y0 > tput.get_position().y1          # one above the other
    assert len(ttft.get_xticklabels()) == 8
    few = charts.plot_phase({k: configs[k] for k in list(configs)[:3]}, "phase2", "x", str(tmp_path / "three.png"))
    assert few.axes[0].get_position().x1 < few.axes[1].get_position().x0   # side by side


@pytest.mark.parametrize("engine_args, label", [
    ({}, "NVIDIA H200"),
    ({"tensor_parallel_size": 1, "pipeline_parallel_size": 1}, "NVIDIA H200"),
    ({"tensor_parallel_size": 2, "pipeline_parallel_size": 1}, "2 x NVIDIA H200 (TP=2)"),
    ({"tensor_parallel_size": 2, "pipeline_parallel_size": 2}, "4 x NVIDIA H200 (TP=2, PP=2)"),
])
def test_chart_titles_name_every_gpu_of_the_engine(engine_args, label):
    r = extended_result(512, 256)
    r["environment"] = {"device": "NVIDIA H200", "vllm_version": "0.26.0", "engine_args": engine_args}
    assert tables.describe_source({(512, 256): r}) == f"{os.path.basename(r['model'])} · {label} · vLLM 0.26.0"


def test_unbounded_intervals_are_shown_and_compared_as_infinite():
    assert tables.ci_text([None, 5.0]) == "[-inf, 5.0]" and tables.ci_text([1.0, None], 0) == "[1, inf]"
    assert tables.bounded([None, None]) == [-np.inf, np.inf]
    assert intervals.agree(50.0, tables.bounded([None, None]), 10.0, [9.0, 11.0])


def load_file(levels):
    """A phase 1 load result: {concurrency: {condition: (TTFT p50 ms, its interval)}}."""
    return {"phase": "phase1_server_api", "experiment": "load", "model": "m", "timestamp": "2026-12-07T00:00:00",
            "config": {"document_tokens": 8192, "query_tokens": 16, "max_output_tokens": 4, "num_requests": 64,
                       "repeats": 3, "num_prefixes": [8], "load": "concurrency"},
            "kv_capacity_tokens": 100_000, "complete": True, "failure": None, "cache_audit": {"ok": True, "problems": []},
            "environment": {},
            "levels": [{"concurrency": c, "request_rate": None, "num_prefixes": 8, "runs": [],
                        **{cond: {"ttft_ms": {"p50": p50, "p50_ci95": ci}} for cond, (p50, ci) in conds.items()}}
                       for c, conds in levels.items()]}


def test_a_rerun_of_one_load_level_is_compared_with_that_level_of_the_sweep(tmp_path):
    sweep = {1: {"cached": (20.0, [18.0, 22.0]), "cold": (250.0, [240.0, 260.0])},
             16: {"cached": (100.0, [90.0, 110.0]), "cold": (300.0, [290.0, 310.0])}}
    rerun = {16: {"cached": (105.0, [95.0, 115.0]), "cold": (400.0, [390.0, 410.0])}}
    runs = []
    for name, levels in (("sweep", sweep), ("rerun", rerun)):
        (tmp_path / name).mkdir()
        write(tmp_path / name, "results_load_a8192_p8_concurrency.json", load_file(levels))
        runs.append(str(tmp_path / name))
    table = load_tables.compare_load_runs(runs).splitlines()
    # concurrency 1 was measured by the sweep alone: nothing to pair, so no row
    assert table[2:] == [
        "| results_load_a8192_p8_concurrency.json | 16 | cached | TTFT p50 ms | 100.0 [90.0, 110.0] | "
        "105.0 [95.0, 115.0] | 1 of 1 |",
        "| results_load_a8192_p8_concurrency.json | 16 | cold | TTFT p50 ms | 300.0 [290.0, 310.0] | "
        "400.0 [390.0, 410.0] | 0 of 1 |",
        "", "1 of 2 pairs of runs agree within their intervals."]
    proc = run_script(["plot_results.py", "--compare", *runs])
    assert proc.returncode == 0 and proc.stdout.strip().endswith("1 of 2 pairs of runs agree within their intervals.")


def test_a_fleet_file_names_its_engines_and_the_device_of_each():
    r = extended_result(512, 256)
    r["environment"]["fleet"] = {"kv_capacity_tokens_per_engine": {"http://a": 41600, "http://b": 41600}}
    assert provenance.describe_provenance(r)["machine"].startswith("2 engines, each on NVIDIA H200, vLLM 0.26.0")
    r["environment"]["fleet"]["kv_capacity_tokens_per_engine"] = {"http://a": 41600}
    assert provenance.describe_provenance(r)["machine"].startswith("NVIDIA H200, vLLM 0.26.0")


def test_a_version_a_file_could_not_know_is_shown_as_unknown():
    r = extended_result(512, 256)
    r["environment"].update(vllm_version="0.32.0", torch_version=None)     # a server reached by --base-url
    assert provenance.describe_provenance(r)["machine"].endswith("vLLM 0.32.0, torch ?")


def test_the_headline_load_table_puts_cached_and_cold_side_by_side():
    stats = lambda p50, p99, rps: {"ttft_ms": {"p50": p50, "p50_ci95": [p50 - 1, p50 + 1], "p99": p99, "p99_ci95": None},
                                   "request_throughput": rps, "request_throughput_ci95": [rps - 0.5, rps + 0.5]}
    data = {"levels": [{"concurrency": 4, "cached": stats(20.0, 30.0, 9.0), "cold": stats(200.0, 300.0, 2.0)},
                       {"concurrency": 16, "cached": stats(50.0, 70.0, 12.5)}]}
    rows = load_tables.load_headline_table(data).splitlines()
    assert rows[2:] == [
        "| 4 | 20.0 [19.0, 21.0] | 30.0 | 200.0 [199.0, 201.0] | 300.0 | 9.00 [8.50, 9.50] | 2.00 [1.50, 2.50] |",
        "| 16 | 50.0 [49.0, 51.0] | 70.0 | - | - | 12.50 [12.00, 13.00] | - |"]
    # plot_results prints it first for a load sweep (the README's load table is this table of a shipped file)
    shipped = results_module.read_result(os.path.join(ROOT, "results", "cpu-tiny-load", "run1",
                                                      "results_load_a1500_p4_concurrency.json.gz"))
    assert load_tables.load_file_tables(shipped).startswith(f"Cached against cold:\n\n{load_tables.load_headline_table(shipped)}")


def test_a_correction_made_after_the_run_is_stated_in_the_folder_s_readme(tmp_path):
    data = load_file({16: {"cached": (100.0, [90.0, 110.0])}})
    data["config"].update(num_prefixes=[8], query_tokens=16, max_output_tokens=16)
    path = str(tmp_path / "results_load_a8192_p8_concurrency.json")
    assert "corrected after the run" not in readmes.results_readme("t", {}, str(tmp_path), [(path, data)])
    data["corrections"] = [{"keys": "kv_capacity_tokens", "why": "the server's log says 41,600 tokens an engine"}]
    text = readmes.results_readme("t", {}, str(tmp_path), [(path, data)])
    assert "- corrected after the run: kv_capacity_tokens: the server's log says 41,600 tokens an engine\n" in text


def design_trials(ttft_ms):
    """Trials as the design's script wrote them: per-trial raw measurements, no condition key."""
    return [{"ttft_ms": t, "total_time_ms": 100.0 + t, "throughput_tok_s": 400.0} for t in ttft_ms]


def test_design_schema_phase1_and_phase2_files_plot_both_charts_without_a_traceback(tmp_path):
    """The design's schema in both phases, with trials that carry no condition key, for the same
    model and configs: both charts and the server-path comparison, no traceback."""
    for phase, offset in (("phase1", 3.0), ("phase2", 0.0)):
        for a in (512, 1024):
            r = design_result(a, 256, 10.0 + offset, 12.0 + offset)
            r["phase"] = {"phase1": "phase1_server_api", "phase2": "phase2_python_api"}[phase]
            r["cache_hit"]["trials"] = design_trials([9.0 + offset, 10.0 + offset, 11.0 + offset])
            r["cache_miss"]["trials"] = design_trials([11.0 + offset, 12.0 + offset, 13.0 + offset])
            if phase == "phase1":
                r["cache_hit"]["stats"]["warmup_time_mean"] = 40.0
            write(tmp_path, f"results_{phase}_a{a}_b256.json", r)
    proc = run_script(["plot_results.py", "--results-dir", str(tmp_path)])
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not [line for line in proc.stderr.splitlines() if line.startswith("skipped")]
    for chart in ("experiment1_all_configs_phase1.png", "experiment1_all_configs_phase2.png", "phase1_vs_phase2.png"):
        assert os.path.exists(tmp_path / chart), chart
    # the server path adds 3 ms to every trial: phase 1's mean minus phase 2's, per condition
    costs = tables.server_path_cost(results_module.discover_results(str(tmp_path))[0])
    assert costs[(512, 256)]["cache_hit"][:3] == (13.0, 10.0, 3.0)


def test_a_truncated_file_and_one_missing_keys_are_each_named_in_one_line_and_skipped(tmp_path):
    text = json.dumps(extended_result(512, 256))
    write(tmp_path, "results_phase2_a512_b256.json", text[:len(text) // 2])          # cut short mid-write
    missing = design_result(1024, 256)
    del missing["cache_hit"]
    write(tmp_path, "results_phase2_a1024_b256.json", missing)
    write(tmp_path, "results_phase2_a2048_b256.json", design_result(2048, 256))
    proc = run_script(["plot_results.py", "--results-dir", str(tmp_path)])
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    skipped = sorted(line for line in proc.stderr.splitlines() if line.startswith("skipped"))
    assert len(skipped) == 2
    assert "a1024_b256.json: a phase 1/2 result without cache_hit" in skipped[0]
    assert "a512_b256.json: not valid JSON" in skipped[1]


def test_a_written_result_carries_the_schema_version_and_reads_back(tmp_path):
    path = str(tmp_path / "results_phase2_a512_b256.json")
    results_module.write_result(path, extended_result(512, 256))
    data = results_module.load_result(path)
    assert data["schema_version"] == results_module.SCHEMA_VERSION == 1
    assert data["cache_hit"]["stats"]["ttft_mean"] == 10.0


@pytest.mark.parametrize("version", [2, "1", -1, True])
def test_a_file_of_an_unknown_schema_version_is_skipped_with_one_line(tmp_path, version):
    write(tmp_path, "results_phase2_a512_b256.json", {**design_result(512, 256), "schema_version": version})
    with pytest.raises(ValueError, match="schema_version"):
        results_module.load_result(str(tmp_path / "results_phase2_a512_b256.json"))
    phases, skipped = results_module.discover_results(str(tmp_path))
    assert phases == {} and len(skipped) == 1


def test_every_shipped_result_file_reads(tmp_path):
    """The reader accepts every schema the project has shipped (each file in results/)."""
    folders = results_module.folders_with_results(os.path.join(ROOT, "results"))
    assert len(folders) >= 20
    read = 0
    for folder in folders:
        phases, skipped = results_module.discover_results(folder)
        loads, skipped_loads = results_module.discover_load_results(folder)
        assert skipped == [] and skipped_loads == [], folder
        read += sum(len(configs) for configs in phases.values()) + len(loads)
    assert read >= 100


def test_plotting_the_results_folder_itself_names_the_subfolders_that_hold_results():
    """A newcomer's first `python plot_results.py`: results/ holds only subfolders."""
    proc = run_script(["plot_results.py"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and "--results-dir results/h200" in error[0], proc.stderr


def test_the_anatomy_chart_stacks_the_breakdown_and_marks_the_floor(tmp_path):
    from prefix_cache_bench import charts
    shape = {"num_parameters": 8_030_261_248, "num_embedding_parameters": 1_050_673_152, "hidden_size": 4096,
             "vocab_size": 128256, "num_layers": 32, "num_attention_heads": 32, "num_kv_heads": 8, "head_dim": 128,
             "dtype": "bfloat16"}
    r = extended_result(8192, 256)
    r["environment"]["model_shape"] = shape
    for c, cached in (("cache_hit", 8448), ("cache_miss", 0), ("cache_cold", 0)):
        r[c]["stats"].update(prompt_tokens=8465 if c != "cache_miss" else 273, cached_tokens=cached,
                             ttft_breakdown_mean_ms={"outside_engine_ms": 0.5, "frontend_ipc_ms": 1.0, "queue_ms": 0.1,
                                                     "prefill_step_ms": r[c]["stats"]["ttft_mean"] - 1.6})
    fig = charts.plot_anatomy({(8192, 256): r}, "phase 2", str(tmp_path / "anatomy.png"))
    ax = fig.axes[0]
    # four stacked parts, three bars each; the bars' tops are the conditions' mean TTFTs (10, 12, 15 ms)
    assert bar_heights(ax) == [[0.5] * 3, [1.0] * 3, [0.1] * 3, [8.4, 10.4, 13.4]]
    tops = [sum(bars[i].get_height() for bars in bar_groups(ax)) for i in range(3)]
    assert tops == [pytest.approx(10.0), pytest.approx(12.0), pytest.approx(15.0)]
    # the floor marks: a hit reads the 16.1 GB of weights and KV at 4.8 TB/s: about 3.36 ms
    floors = ax.collections[0].get_offsets()[:, 1]
    assert floors[0] == pytest.approx(3.358, abs=1e-3)
    write(tmp_path, "results_phase2_a8192_b256.json", r)
    proc = run_script(["plot_results.py", "--results-dir", str(tmp_path), "--out-dir", str(tmp_path / "out")])
    assert proc.returncode == 0 and (tmp_path / "out" / "ttft_anatomy_phase2.png").exists()
    assert "| A=8192 / B=256 | hit | 10.00 | 0.50 | 1.00 | 0.10 | 8.40 | 3.36 (memory) | 3.0x |" in proc.stdout


def test_a_tier_hit_is_set_against_its_floor_at_the_link_rate_measured_on_its_machine():
    """HBM hit 45.1 ms + 4.33 GB of KV at 55.0 GB/s (78.7 ms) = 123.8 ms; the tier hit's 148.9 ms is
    1.20 times it. A run that measured no link gets no floor columns."""
    r = extended_result(32768, 256, hit=45.1, cold=1269.0)
    r["cache_tier"] = {"trials": [], "stats": stats(148.9, 300.0, tier_cached_tokens=33024,
                                                    tier_load={"bytes_per_request": 4.33e9, "gb_s": 47.1})}
    r.update(tier_ttft_saving_pct=88.3, tier_ttft_saving_ci95=[87.0, 89.0], tier_over_hit_pct=230.2,
             tier_over_hit_ci95=[200.0, 260.0])
    r["environment"]["tier"] = {"connector": "OffloadingConnector", "backend": "native", "size_gib": 48.0}
    assert "floor" not in tables.tier_table({(32768, 256): r})
    r["environment"]["host_link"] = {"pinned_gb_s": 55.0, "pageable_gb_s": 5.1, "bytes": 1 << 30}
    row = tables.tier_table({(32768, 256): r}).splitlines()[2]
    assert row.endswith("| 4.33 GB | 47.1 GB/s | 123.83 | 1.20x |")
    assert "55.0 GB/s pinned, 5.1 pageable" in tables.tier_table({(32768, 256): r})


def test_the_link_probe_runs_only_beside_an_nvidia_gpu_and_tells_its_failure_in_one_line(monkeypatch):
    from prefix_cache_bench import tiers
    monkeypatch.setattr(tiers, "has_nvidia_gpu", lambda: False)
    assert tiers.measure_host_link() is None and tiers.measure_link_for_tier(True) == {}
    monkeypatch.setattr(tiers, "has_nvidia_gpu", lambda: True)
    assert tiers.measure_host_link(python="/bin/false") == {"error": "the copy probe failed: exit 1"}
    assert tiers.measure_link_for_tier(False) == {}
