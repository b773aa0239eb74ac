"""plot_results: discovery, the figure itself, bad files."""
import json
import os

import pytest

import plot_results as pr
from conftest import run_script


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
    phases, skipped = pr.discover_results(str(tmp_path))
    assert list(phases) == ["phase1", "phase2"]
    assert list(phases["phase2"]) == [(256, 256), (256, 1536), (512, 256), (1024, 256)]
    assert skipped == []


def test_design_schema_file_plots_two_panels_hit_and_miss(tmp_path):
    configs = {(256, 256): design_result(256, 256, 10.0, 12.0), (512, 256): design_result(512, 256, 11.0, 13.5)}
    fig = pr.plot_phase(configs, "phase2", "phase2_python_api", str(tmp_path / "out.png"))
    assert len(fig.axes) == 2
    ttft_ax, tput_ax = fig.axes
    assert bar_heights(ttft_ax) == [[10.0, 11.0], [12.0, 13.5]]      # one container per condition, one bar per config
    assert bar_heights(tput_ax) == [[400.0, 400.0], [390.0, 390.0]]
    assert [t.get_text() for t in ttft_ax.get_xticklabels()] == ["A=256 / B=256", "A=512 / B=256"]
    assert "time to first token (ms)" in ttft_ax.get_ylabel()
    assert os.path.getsize(tmp_path / "out.png") > 10_000


def test_extended_file_adds_cold_bars_ci_error_bars_and_notes(tmp_path):
    configs = {(256, 256): extended_result(256, 256, 10.0, 12.0, 15.0)}
    fig = pr.plot_phase(configs, "phase2", "phase2_python_api", str(tmp_path / "out.png"))
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
    fig = pr.plot_phase(configs, "phase2", "x", str(tmp_path / "out.png"))
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["A=256 / B=256", "A=512 / B=256\nAUDIT FAILED"]
    hit_bars = bar_groups(fig.axes[0])[0]
    assert hit_bars[1].get_hatch() == "//" and not hit_bars[0].get_hatch()


def test_unstable_run_is_flagged_on_the_chart_and_in_the_table(tmp_path):
    steady, moved = extended_result(256, 256), extended_result(512, 256)
    steady["reproducibility"] = {"stable": True}
    moved["reproducibility"] = {"stable": False}
    configs = {(256, 256): steady, (512, 256): moved}
    fig = pr.plot_phase(configs, "phase2", "x", str(tmp_path / "out.png"))
    notes = [t for t in fig.axes[0].texts if "hit saves" in t.get_text()]
    assert ["UNSTABLE" in t.get_text() for t in notes] == [False, True]
    assert notes[1].get_color() == "red"
    rows = pr.summary_table(configs).splitlines()[2:]
    assert ["UNSTABLE" in row for row in rows] == [False, True]


def test_phase1_style_file_with_warmup_stats_gets_a_warmup_panel(tmp_path):
    r = design_result(512, 256)
    r["cache_hit"]["stats"]["warmup_time_mean"] = 40.0
    r["cache_miss"]["stats"]["warmup_time_mean"] = 55.0
    fig = pr.plot_phase({(512, 256): r}, "phase1", "phase1", str(tmp_path / "out.png"))
    assert len(fig.axes) == 3
    assert bar_heights(fig.axes[0]) == [[40.0], [55.0]]
    assert fig.axes[0].get_title() == "Warmup"


def test_summary_table_is_markdown_with_a_row_per_config():
    configs = {(256, 256): extended_result(256, 256), (512, 256): extended_result(512, 256, ok=False)}
    table = pr.summary_table(configs).splitlines()
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
    skipped = [l for l in proc.stderr.splitlines() if l.startswith("skipped")]
    assert len(skipped) == 2
    assert any("results_phase2_a1024_b256.json: not valid JSON" in l for l in skipped)
    assert any("a2048_b256.json: cache_miss.stats lacks throughput_mean" in l for l in skipped)
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
    errors = [l for l in proc.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1 and str(tmp_path) in errors[0]
    assert "Traceback" not in proc.stderr
