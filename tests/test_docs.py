"""The user documentation says what the code does: its commands parse, its links resolve, its
headline table is the shipped files' table, and it tells no development history."""
import glob
import json
import os
import re
import shlex

import numpy as np
import pytest

import make_model
import phase1_experiment as p1
import phase2_experiment as p
import plot_results
from conftest import ROOT, load_tool
from prefix_cache_bench import analysis, load_tables, prefill_fit, results, tables
from prefix_cache_bench.defaults import CONDITIONS

DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
SCRIPTS = ("phase1_experiment.py", "phase2_experiment.py", "plot_results.py", "tests/make_model.py", "tests/run_tests.sh",
           "tools/compare_bench_serve.py")


def commands(path):
    """Every command line in a Markdown file's code: fenced blocks and `inline code`."""
    text = open(path).read()
    found = []
    for code in re.findall(r"```\n(.*?)```", text, re.S) + re.findall(r"`([^`\n]+)`", text):
        for line in code.splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            words = shlex.split(line) if line.startswith(("python ", "bash ")) else []
            if len(words) > 1 and words[1] in SCRIPTS:
                found.append(words[1:])
    return found


ALL_COMMANDS = [(os.path.relpath(path, ROOT), words) for path in DOCS for words in commands(path)]


def test_the_docs_hold_the_commands_a_user_needs():
    readme = [words for path, words in ALL_COMMANDS if path == "README.md"]
    assert ["tests/run_tests.sh"] in readme
    assert any(w[0] == "phase2_experiment.py" for w in readme) and any(w[0] == "plot_results.py" for w in readme)
    assert any(w[0] == "phase1_experiment.py" and "--base-url" in w for w in readme)
    assert any(w[0] == "phase1_experiment.py" and "--base-url" not in w for w in readme)


@pytest.mark.parametrize("path,words", ALL_COMMANDS, ids=[f"{p}:{' '.join(w)[:60]}" for p, w in ALL_COMMANDS])
def test_every_documented_command_is_accepted_by_the_real_parser(path, words, tiny_model_dir):
    script, args = words[0], words[1:]
    if script == "phase2_experiment.py":
        # the documented model folders exist on the user's machine, not here: a local folder stands in
        if "--model" in args:
            args[args.index("--model") + 1] = tiny_model_dir
        else:
            args += ["--model", tiny_model_dir]
        settings, engine_args = p.parse_args(args)
        assert settings.configs and engine_args.enable_prefix_caching
    elif script == "phase1_experiment.py":
        settings, vllm_flags, _ = p1.parse_args(args)
        assert (settings.run.configs or settings.trace) and not (settings.server.base_url and vllm_flags)
    elif script == "plot_results.py":
        plot_results.build_parser().parse_args(args)
    elif script == "tests/make_model.py":
        make_model.build_parser().parse_args(args)
    elif script == "tools/compare_bench_serve.py":
        opts = load_tool("compare_bench_serve").parse_args(args)
        assert opts.model and opts.out
    else:
        assert os.path.exists(os.path.join(ROOT, script)) and args == []


def links(path):
    text = open(path).read()
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+://", target)]


RESULT_READMES = sorted(glob.glob(os.path.join(ROOT, "results", "**", "README.md"), recursive=True))


@pytest.mark.parametrize("path", DOCS + RESULT_READMES, ids=lambda path: os.path.relpath(path, ROOT))
def test_every_link_and_image_exists(path):
    for target in links(path):
        assert os.path.exists(os.path.join(os.path.dirname(path), target.split("#")[0])), target


def hit_anatomy_sentence(config: dict) -> str:
    """'At 8k its ... on the host': where a hit's TTFT goes, as the README and real-shapes.md say it."""
    hit = config["cache_hit"]["stats"]
    parts = hit["ttft_breakdown_mean_ms"]
    gpu_ms, host_ms = analysis.step_split(hit, config["gpu_busy"], "cache_hit")     # as plot_results splits it
    floor = prefill_fit.condition_floor(config, "cache_hit")
    outside = parts["outside_engine_ms"] + parts["frontend_ipc_ms"]
    return (f"At 8k its {hit['ttft_mean']:.1f} ms hold {gpu_ms:.1f} ms of GPU work (the GPU's own clock, "
            f"[profiled apart](" + "{method}" + f"#the-prefill-steps-gpu-busy-time-offline-cuda); the floor is "
            f"{floor['floor_ms']:.1f} ms), {outside:.1f} ms of `LLM.generate`, front end and IPC, and "
            f"{host_ms:.1f} ms of the prefill step spent on the host")


def test_readme_headline_is_the_shipped_vllm_0_33_run():
    """The README's headline: the 3-config command with all defaults on vLLM 0.33.0, its table
    what plot_results.py prints for the folder, its sentences the files' figures."""
    phases, skipped = results.discover_results(os.path.join(ROOT, "results", "h100-llama3.1-8b-shape-vllm0.33"))
    assert not skipped
    configs = phases["phase2"]
    assert all(r["environment"]["vllm_version"] == "0.33.0" and r["cache_audit"]["ok"] for r in configs.values())
    first = configs[(512, 256)]
    assert first["interval"]["processes"] == 5 and first["interval"]["num_blocks"] == 15   # the defaults: 5 processes of 3 blocks
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert tables.summary_table(configs) in readme
    said = " ".join(readme.split())
    assert hit_anatomy_sentence(configs[(8192, 256)]).format(method="docs/method.md") in said
    assert (f"mean ± stdev of {first['config']['num_trials']} rounds in 5 engine processes" in said and
            f"{first['environment']['run_wall_s']:.0f} s from the first engine start to exit" in said)
    ms = lambda a, c: configs[(a, 256)][c]["stats"]["ttft_mean"]
    assert (f"A cached 8k-token prefix turns a {ms(8192, 'cache_cold'):.0f} ms TTFT into {ms(8192, 'cache_hit'):.1f} ms "
            f"({configs[(8192, 256)]['ttft_saving_pct']:.1f}% saved); at 2k, {ms(2048, 'cache_cold'):.0f} ms into "
            f"{ms(2048, 'cache_hit'):.0f} ms ({configs[(2048, 256)]['ttft_saving_pct']:.0f}%)") in said
    # against vLLM 0.26.0 on an H100 (the lease's run 2): a hit's GPU work, a cold prefill's at 8k
    v026 = lease_run("run2-vllm0.26")
    kernels = lambda r, c: r["gpu_busy"]["by_condition"][c]["gpu_kernel_busy_mean_ms"]
    hit_gap = max(abs(kernels(configs[(a, 256)], "cache_hit") - kernels(v026[a], "cache_hit")) for a in (512, 2048, 8192))
    cold_less = 1 - kernels(configs[(8192, 256)], "cache_cold") / kernels(v026[8192], "cache_cold")
    assert (f"a hit's GPU work differs by at most {hit_gap:.1f} ms; 0.33's cold prefill at 8k does "
            f"{100 * cold_less:.1f}% less" in said)
    agree = tables.compare_runs([os.path.join(LEASE, "run2-vllm0.26"),
                                 os.path.join(ROOT, "results", "h100-llama3.1-8b-shape-vllm0.33")])
    rows = agree.split("\n")[2:5]
    assert [row.split(" | ")[-2] for row in rows] == ["0 of 1", "1 of 1", "1 of 1"]     # 512 disagrees; 2k and 8k agree
    assert "the savings at 2k and 8k agree" in said
    page = open(os.path.join(ROOT, "docs", "reproducibility.md")).read()
    assert "\n".join(agree.split("\n")[:5]) in page
    overhead = [f"{configs[(a, 256)]['harness_overhead_ms']:.2f}" for a in (512, 2048, 8192)]
    assert f"by a median {overhead[0]}, {overhead[1]} and {overhead[2]} ms at 512, 2048 and 8192" in " ".join(page.split())


def test_real_shapes_h200_section_is_the_shipped_anatomy_run():
    """docs/real-shapes.md's six sizes on vLLM 0.26.0 and an H200: the table and the figures."""
    folder = os.path.join(ROOT, "results", "h200-llama3.1-8b-shape-anatomy")
    phases, skipped = results.discover_results(folder)
    assert not skipped
    page = open(os.path.join(ROOT, "docs", "real-shapes.md")).read()
    assert tables.summary_table(phases["phase2"]) in page
    hit_32k = phases["phase2"][(32768, 256)]
    not_gpu_32k = (1 - hit_32k["gpu_busy"]["by_condition"]["cache_hit"]["gpu_busy_mean_ms"]
                   / hit_32k["cache_hit"]["stats"]["ttft_mean"])
    said = " ".join(page.split())
    hit_32k_ms = hit_32k["cache_hit"]["stats"]["ttft_mean"]
    assert (hit_anatomy_sentence(phases["phase2"][(8192, 256)]).format(method="method.md") +
            f"; at 32k, {100 * not_gpu_32k:.0f}% of the hit's {hit_32k_ms:.1f} ms is not GPU work") in said
    # the anatomy table, GPU-busy columns and all, is what plot_results.py prints for the folder
    assert "| step: GPU busy | not GPU work |" in tables.anatomy_table(phases["phase2"])


THREE_CONFIG_RUNS = ("lease1-run1", "lease2-run1", "lease2-run2", "lease3-run1", "lease4-run1", "lease5-run1")


def test_reproducibility_tables_are_what_compare_prints_over_the_shipped_runs():
    page = open(os.path.join(ROOT, "docs", "reproducibility.md")).read()
    runs = os.path.join(ROOT, "results", "h200-llama3.1-8b-shape-processes")
    all_runs = tables.compare_runs([os.path.join(runs, run) for run in THREE_CONFIG_RUNS])
    six = tables.compare_runs([os.path.join(ROOT, "results", folder) for folder in
                               ("h200-llama3.1-8b-shape-sweep", "h200-llama3.1-8b-shape-sweep-rerun",
                                "h200-llama3.1-8b-shape-anatomy")])
    assert all_runs.split("\n")[0] in page and all(row in page for row in all_runs.split("\n")[2:5])
    assert "36 of 45 pairs of runs agree" in all_runs and "36 of 45 pairs" in page
    # what the page says --compare names for them: the tool's code for run 5 against runs 1-4, run 6 flagged
    code = [line for line in all_runs.split("\n") if re.search(r"runs [1-4] and 5 disagree; candidate causes: the "
                                                               r"tool's code: \S+ as of commit c978ad4 against .* 0cf565a", line)]
    assert len(code) == 8 and "names the tool's code (c978ad4 against 0cf565a) for all 8 pairs" in " ".join(page.split())
    assert "(its processes 20.1-51.2 ms, 2.5-fold: repeat it)" in all_runs
    assert "flags run 6 (processes 20.1-51.2 ms, 2.5-fold)" in " ".join(page.split())
    assert all(row in page for row in six.split("\n") if row.startswith("| phase 2:"))
    assert "16 of 18 pairs of runs agree" in six


def three_config_runs():
    """{run folder: {A: its phase 2 result}} of the 3-config command's shipped runs."""
    runs = os.path.join(ROOT, "results", "h200-llama3.1-8b-shape-processes")
    return {run: {a: json.load(open(os.path.join(runs, run, f"results_phase2_a{a}_b256.json"))) for a in (512, 2048, 8192)}
            for run in THREE_CONFIG_RUNS}


def test_readme_and_reproducibility_say_what_the_runs_of_one_code_on_two_leases_measured():
    runs = three_config_runs()
    readme = " ".join(open(os.path.join(ROOT, "README.md")).read().split())
    page = " ".join(open(os.path.join(ROOT, "docs", "reproducibility.md")).read().split())
    savings = {a: [r[a]["ttft_saving_pct"] for r in runs.values()] for a in (512, 2048, 8192)}
    low_mid_high = [f"{min(v):.1f}-{max(v):.1f}%" for v in savings.values()]
    said = f"gave {low_mid_high[0]}, {low_mid_high[1]} and {low_mid_high[2]}"
    assert said in readme and said.replace("%,", "% at 512/256,").replace("% and", "% at 2048/256 and") in page
    # runs 5 and 6 share the code (one code_sha256); run 6's hits were slower by this much
    fifth, sixth = runs["lease4-run1"], runs["lease5-run1"]
    assert {r[512]["environment"]["tool_version"]["code_sha256"] for r in (fifth, sixth)} == {
        fifth[512]["environment"]["tool_version"]["code_sha256"]}
    slower = [sixth[a]["cache_hit"]["stats"]["ttft_mean"] - fifth[a]["cache_hit"]["stats"]["ttft_mean"]
              for a in (512, 2048, 8192)]
    assert f"{min(slower):.1f}-{max(slower):.1f} ms slower" in readme and f"{min(slower):.1f}-{max(slower):.1f} ms slower" in page
    # the runs of the older code (another hash): their hits at 2048 against the newer code's on a normal host (run 5)
    older = [r for r in runs.values() if r[2048]["environment"]["tool_version"].get("code_sha256") !=
             fifth[2048]["environment"]["tool_version"]["code_sha256"]]
    gaps = [r[2048]["cache_hit"]["stats"]["ttft_mean"] - fifth[2048]["cache_hit"]["stats"]["ttft_mean"] for r in older]
    assert len(older) == 4 and f"were {min(gaps):.1f}-{max(gaps):.1f} ms slower than the newer code's on four H200 runs" in page
    hosts = sixth[512]["environment"]["host_python_loop_ms_per_process"]
    assert f"up to {max(hosts) / min(fifth[512]['environment']['host_python_loop_ms_per_process']):.1f} times slower" in readme
    assert "were " + ", ".join(f"{ms:.1f}" for ms in hosts[:-1]) + f" and {hosts[-1]:.1f} ms" in page
    # the two slow-host processes had the run's slowest hits, at every size
    for a in (512, 2048, 8192):
        trials = sixth[a]["cache_hit"]["trials"]
        hit_ms = [np.mean([t["ttft_ms"] for t in trials if t["process"] == p]) for p in range(5)]
        slow = sorted(sorted(range(5), key=lambda p: -hosts[p])[:2])
        assert sorted(range(5), key=lambda p: -hit_ms[p])[:2] == sorted(slow, key=lambda p: -hit_ms[p])
        assert f"{hit_ms[slow[0]]:.1f} and {hit_ms[slow[1]]:.1f} ms at {a}" in page


LEASE = os.path.join(ROOT, "results", "h100-llama3.1-8b-shape-lease-20261207")


def lease_run(name: str) -> dict:
    """{A: result} of one run of the H100 lease that ran both codes and both vLLM versions."""
    return {a: results.read_result(os.path.join(LEASE, name, f"results_phase2_a{a}_b256.json")) for a in (512, 2048, 8192)}


def test_reproducibility_tables_of_the_old_and_new_code_and_of_two_vllm_versions_are_the_shipped_files():
    old, new, v033 = (lease_run(n) for n in ("run1-old-code-vllm0.26", "run2-vllm0.26", "run3-vllm0.33-one-process"))
    assert {old[512]["environment"]["vllm_version"], new[512]["environment"]["vllm_version"]} == {"0.26.0"}
    assert v033[512]["environment"]["vllm_version"] == "0.33.0"
    assert all(run[a]["cache_audit"]["ok"] for run in (old, new, v033) for a in run)
    page = open(os.path.join(ROOT, "docs", "reproducibility.md")).read()
    readme = " ".join(open(os.path.join(ROOT, "README.md")).read().split())

    def stats(run, a, c):
        return run[a][c]["stats"]
    for a in (512, 2048, 8192):
        for c in CONDITIONS:
            o, n = stats(old, a, c), stats(new, a, c)
            row = (f"| A={a} / B=256 | {c[6:]} | {o['ttft_mean']:.2f} | {n['ttft_mean']:.2f} | "
                   f"{o['ttft_mean'] - o['engine_ttft_mean']:.2f} | {n['ttft_mean'] - n['engine_ttft_mean']:.2f} | "
                   f"{o['prefill_mean']:.2f} | {n['prefill_mean']:.2f} |")
            assert row in page, row
            for version, run in (("0.26.0", new), ("0.33.0", v033)):
                s, parts = stats(run, a, c), stats(run, a, c)["ttft_breakdown_mean_ms"]
                busy = run[a]["gpu_busy"]["by_condition"][c]["gpu_kernel_busy_mean_ms"]
                saving = (f"{run[a]['ttft_saving_pct']:.1f}% [{run[a]['ttft_saving_ci95'][0]:.1f}, "
                          f"{run[a]['ttft_saving_ci95'][1]:.1f}]" if c == "cache_hit" else "")
                row = (f"| A={a} / B=256 | {version} | {c[6:]} | {s['ttft_mean']:.2f} | "
                       f"{parts['outside_engine_ms']:.2f} | {parts['frontend_ipc_ms']:.2f} | {parts['queue_ms']:.2f} | "
                       f"{parts['prefill_step_ms']:.2f} | {busy:.2f} |")
                assert row + (f" {saving} |" if saving else " |") in page, row
    gaps = [stats(old, a, "cache_hit")["ttft_mean"] - stats(new, a, "cache_hit")["ttft_mean"] for a in (512, 2048, 8192)]
    assert f"Older code's hits were {min(gaps):.1f}-{max(gaps):.1f} ms slower on an H100" in readme


def test_server_page_table_is_the_shipped_files_table():
    folder = os.path.join(ROOT, "results", "h200-llama3.1-8b-shape-sweep")
    phases, _ = results.discover_results(folder)
    costs = tables.server_path_cost(phases)
    assert costs and tables.server_path_table(costs) in open(os.path.join(ROOT, "docs", "server.md")).read()


def test_tiers_page_table_and_readme_figures_are_the_shipped_files():
    phases, skipped = results.discover_results(os.path.join(ROOT, "results", "h200-llama3.1-8b-shape-tier"))
    assert not skipped
    configs = phases["phase2"]
    table = tables.tier_table(configs).split("\n\n")[0]
    page = open(os.path.join(ROOT, "docs", "tiers.md")).read()
    assert table in page
    h100, skipped = results.discover_results(os.path.join(ROOT, "results", "h100-llama3.1-8b-shape-tier-32k"))
    assert not skipped and tables.tier_table(h100["phase2"]).split("\n\n")[0] in page
    assert tables.anatomy_table(h100["phase2"]) in page
    for _, _, stats, _, split in tables.anatomy_rows(h100["phase2"]):       # no negative part
        assert min(stats["ttft_breakdown_mean_ms"].values()) >= 0 and split is not None and min(split) >= 0
    ms = lambda a, c: configs[(a, 256)][c]["stats"]["ttft_mean"]
    readme = " ".join(open(os.path.join(ROOT, "README.md")).read().split())
    assert (f"{ms(8192, 'cache_tier'):.1f} ms at 8k and {ms(65536, 'cache_tier'):.0f} ms at 64k, against "
            f"{ms(8192, 'cache_hit'):.1f} and {ms(65536, 'cache_hit'):.1f} ms from HBM, {ms(8192, 'cache_cold'):.0f} ms and "
            f"{ms(65536, 'cache_cold') / 1e3:.2f} s cold") in readme


@pytest.mark.parametrize("path", DOCS, ids=lambda path: os.path.relpath(path, ROOT))
def test_docs_state_facts_not_development_history(path):
    text = open(path).read()
    assert not re.search(r"issue [0-9]|earlier code|old code|\bthe old\b|\bsession\b|used to", text, re.I)


def test_readme_is_short():
    assert os.path.getsize(os.path.join(ROOT, "README.md")) <= 8500


def test_readme_and_traces_page_figures_are_the_shipped_h100_replays_and_curve():
    from prefix_cache_bench.results import discover_trace_results
    from prefix_cache_bench.trace_charts import replayed_points
    from prefix_cache_bench.trace_tables import curve_table
    folder = os.path.join(ROOT, "results", "h100-llama3.1-8b-shape-trace")
    replay_list, [(_, curve)], _ = discover_trace_results(folder)
    replays = dict(replay_list)
    raw_page = open(os.path.join(ROOT, "docs", "traces.md")).read()
    assert curve_table(curve["curve"], replayed_points(replay_list)) in raw_page
    hbm = replays[os.path.join(folder, "results_trace_conversation_trace_s1800_n75.json")]
    tier = replays[os.path.join(folder, "results_trace_conversation_trace_s1800_n75_tier.json")]
    cached, bought, p50 = hbm["arms"]["cached"], hbm["cache_buys"]["ttft_mean"], hbm["cache_buys"]["ttft_p50"]
    readme, page = (" ".join(text.split()) for text in (open(os.path.join(ROOT, "README.md")).read(), raw_page))
    assert hbm["cache_audit"]["ok"] and tier["cache_audit"]["ok"] and hbm["arms"]["cold"]["passes"] == 3
    share, ideal = f"{cached['hit_share']['measured']:.1%}", f"{curve['curve']['ideal_share']:.1%}"
    ci, p50_ci = bought["saving_pct_ci95"], p50["saving_pct_ci95"]
    version = hbm["environment"]["vllm_version"]
    assert (f"One H100 (vLLM {version}), {hbm['window']['requests']} requests of the conversation trace: "
            f"{share} of the input tokens cached (model {cached['hit_share']['simulated']:.1%}, infinite cache {ideal}), "
            f"mean TTFT {bought['saving_pct']:.1f}% [{ci[0]:.1f}, {ci[1]:.1f}] lower.") in readme
    assert (f"The cached arm found {share} of its input tokens, in every pass, the LRU model predicted each request "
            f"within a block (fidelity {cached['fidelity']:.0%})") in page
    assert f"An infinite cache would find {ideal} of this window" in page
    assert (f"mean TTFT {bought['saving_pct']:.1f}% [{ci[0]:.1f}, {ci[1]:.1f}] lower than cold, p50 "
            f"{p50['saving_pct']:.1f}% [{p50_ci[0]:.1f}, {p50_ci[1]:.1f}]") in page
    assert (f"host tier ({tier['tier_capacity_tokens']:,} tokens more), the hits stayed at "
            f"{tier['arms']['cached']['hit_share']['measured']:.1%}") in page


def test_every_shipped_results_folder_has_a_generated_readme():
    folders = {os.path.dirname(f) for f in glob.glob(os.path.join(ROOT, "results", "**", "results_phase*.json*"),
                                                      recursive=True)}
    for folder in folders:
        readme = os.path.join(folder, "README.md")
        assert os.path.exists(readme), folder
        assert "Generated by `plot_results.py --write-readme`" in open(readme).read()


def h200_fleet_fronts():
    """The two-H200 fleet runs, as docs/fleet.md and the README line them up: the fronts of the
    one-at-a-time folder, with cache_aware's run from the folder where first requests came together."""
    folder = os.path.join(ROOT, "results", "h200x2-llama3.1-8b-shape-fleet")
    apart, _ = results.discover_load_results(os.path.join(folder, "one-at-a-time"))
    together, _ = results.discover_load_results(os.path.join(folder, "together"))
    fronts = list(load_tables.fleet_groups(apart)["fleet_a8192_p8_concurrency"])
    assert [front for front, _ in fronts] == ["cache_aware", "dp", "ideal", "round_robin"] and len(together) == 1
    return fronts[:1] + [("cache_aware, first requests together", together[0][1])] + fronts[1:]


def test_fleet_tables_are_the_shipped_files_tables():
    fronts = h200_fleet_fronts()
    assert load_tables.fleet_table(fronts).split("\n\n")[0] in open(os.path.join(ROOT, "docs", "fleet.md")).read()
    # the README's sentence: each front's hit rate and TTFT p50 at 8 clients
    readme = " ".join(open(os.path.join(ROOT, "README.md")).read().split())
    at_8 = {front: next(level["cached"] for level in data["levels"] if level["concurrency"] == 8) for front, data in fronts}
    p50 = lambda front: at_8[front]["ttft_ms"]["p50"]
    rate = lambda front: f"{at_8[front]['hit_rate']['requests']:.0%}"
    assert f"`ideal` hit {rate('ideal')} (TTFT p50 {p50('ideal'):.1f} ms)" in readme
    together = "cache_aware, first requests together"
    assert (f"`cache_aware` {rate(together)} ({p50(together):.1f} ms) "
            f"when the documents' first requests arrived together, {rate('cache_aware')} ({p50('cache_aware'):.0f} ms, all on "
            f"one replica)") in readme
    assert (f"`round_robin` and `dp` {rate('dp')[:-1]}-{rate('round_robin')} ({p50('round_robin'):.0f}-{p50('dp'):.0f} ms)"
            in readme)


def test_tiers_working_set_table_is_the_shipped_file_s():
    loads, skipped = results.discover_load_results(os.path.join(ROOT, "results", "h200-llama3.1-8b-shape-tier-working-set"))
    (_, data), = loads
    assert not skipped and data["cache_audit"]["ok"] is True and data["environment"]["tier"]["size_gib"] == 32
    assert load_tables.working_set_table(data) in open(os.path.join(ROOT, "docs", "tiers.md")).read()
    rates = [level["cached"]["hit_rate"]["requests"] for level in data["levels"]]
    assert rates[:2] == [1.0, 1.0] and rates[2] < 0.6     # high past HBM (8.2 documents), falling past HBM + tier


H200_LOAD = os.path.join(ROOT, "results", "h200-llama3.1-8b-shape-load")


def test_load_tables_are_the_shipped_files_tables():
    [(_, sweep)], skipped = results.discover_load_results(os.path.join(H200_LOAD, "sweep"))
    assert not skipped and [level["concurrency"] for level in sweep["levels"]] == [1, 4, 16, 64]
    # the README says every cached request hit, and that the three runs at 16 clients agree in all 24 pairs
    assert all(level["cached"]["hit_rate"]["requests"] == 1.0 for level in sweep["levels"])
    readme, load_page = (open(os.path.join(ROOT, path)).read() for path in ("README.md", "docs/load.md"))
    assert load_tables.load_headline_table(sweep) in readme and load_tables.load_table(sweep) in load_page
    runs = [os.path.join(H200_LOAD, run) for run in ("sweep", "rerun-c16-same-lease", "rerun-c16")]
    comparison = load_tables.compare_load_runs(runs)
    assert comparison in load_page
    ttft_and_throughput = [row for row in comparison.splitlines() if row.startswith("| results_") and "hit rate" not in row]
    assert len(ttft_and_throughput) == 8 and all(row.endswith("| 3 of 3 |") for row in ttft_and_throughput)


def test_the_busy_shares_the_docs_state_are_the_shipped_file_s():
    [(_, busy)], _ = results.discover_load_results(os.path.join(H200_LOAD, "busy"))

    def span(condition, get):
        shares = [round(v * 100) for level in busy["levels"] for v in get(level[condition])]
        return f"{min(shares)}-{max(shares)}%"
    api = lambda s: s["server"]["api_server_cpu_busy_max_per_pass"]
    client = lambda s: s["client_cpu_busy_per_pass"]
    load_page = " ".join(open(os.path.join(ROOT, "docs", "load.md")).read().split())
    assert (f"cached, the API server used {span('cached', api)} of one core and this client {span('cached', client)}; "
            f"cold, {span('cold', api)} and {span('cold', client)}.") in load_page


def test_load_page_bench_serve_comparison_is_the_shipped_files():
    table = load_tool("bench_serve_table")
    page = open(os.path.join(ROOT, "docs", "load.md")).read()
    flat = " ".join(page.split())
    folder = os.path.join(ROOT, "results", "h200-llama3.1-8b-shape-bench-serve")
    compared = {c: json.load(open(os.path.join(folder, f"concurrency{c}", "comparison.json"))) for c in (1, 4)}
    for c, comparison in compared.items():
        assert table.table(comparison) in page
        assert open(os.path.join(folder, f"concurrency{c}", "README.md")).read() == table.readme(comparison, f"concurrency{c}")

    def before_engine(comparison, view):
        s = comparison["summary"][view]
        return [a - b for a, b in zip(s["server_ttft_mean_ms"]["per_round"], s["prefill_time_mean_ms"]["per_round"])]

    def span(values, digits=1):
        return f"{min(values):.{digits}f}-{max(values):.{digits}f}"
    one, four = compared[1], compared[4]
    assert (f"was {span(before_engine(one, 'bench'))} ms a request for the bench against "
            f"{span(before_engine(one, 'tool_cached'))} ms for the tool at 1 client, and "
            f"{span(before_engine(four, 'bench'))} against {span(before_engine(four, 'tool_cached'))} ms at 4") in flat
    busy = [100 * r["bench"]["api_server_cpu_busy"] for r in four["rounds"]]
    tool_busy = [100 * r["tool"]["cached"]["api_server_cpu_busy"] for r in four["rounds"]]
    assert (f"busy {span(busy, 0)}% of the time against {span(tool_busy, 0)}% for the tool's "
            f"(the bench's share is taken over its whole `main()`") in flat
    assert all(r["tool"]["cache_audit_ok"] for c in compared.values() for r in c["rounds"])
    cpu = json.load(open(os.path.join(ROOT, "results", "cpu-tiny-bench-serve", "concurrency1", "comparison.json")))
    assert (f"{span(before_engine(cpu, 'bench'))} ms before the engine for the bench, "
            f"{span(before_engine(cpu, 'tool_cached'))} ms for the tool") in flat
    tool_p50 = [r["tool"]["cached"]["ttft_p50_ms"] for r in cpu["rounds"]]
    server = [r["tool"]["cached"]["server_ttft_mean_ms"] for r in cpu["rounds"]]
    assert (f"{tool_p50[0]:.1f} ms in the first round but {tool_p50[1]:.1f} and {tool_p50[2]:.1f} ms in the other "
            f"two, while the server's own TTFT mean stayed at {span(server)} ms") in flat
    assert f"The bench's hits had a p50 of {cpu['summary']['bench_hits']['ttft_p50_ms']['mean']:.1f} ms" in flat


def shipped_check(tool: str, folder: str) -> tuple[dict, str]:
    """(the shipped result of tools/<tool>.py in results/<folder>, docs/reproducibility.md); the
    tool's table() of it stands in both the page and the folder's README."""
    from conftest import load_tool
    check = load_tool(tool)
    data = results.read_result(os.path.join(ROOT, "results", folder, f"{tool}.json"))
    table = check.table(data["rows"])
    page = open(os.path.join(ROOT, "docs", "reproducibility.md")).read()
    assert table in page and table in open(os.path.join(ROOT, "results", folder, "README.md")).read()
    return data, page


def test_phase1_s_client_cost_the_docs_state_is_the_shipped_minimal_client_check():
    data, page = shipped_check("minimal_client_check", "cpu-tiny-minimal-client")
    rows = data["rows"]
    assert data["cache_audit"]["ok"] is True and data["environment"]["tool_version"]["git_commit"].startswith("784a30b")
    medians = [r["difference_median_ms"] for r in rows]
    flat = " ".join(page.split())
    assert f"the medians of the paired differences were {min(medians):+.2f} to {max(medians):+.2f} ms" in flat
    within = [r for r in rows if r["within_budget"]]
    assert len(within) == 4 and all(r["difference_ci95"][0] <= 0 <= r["difference_ci95"][1] for r in within)
    assert "four of six means were within 0.5 ms" in flat and max(medians) <= 0.6


def test_the_tool_s_own_cost_the_docs_state_is_the_shipped_bare_generate_check():
    data, page = shipped_check("bare_generate_check", "cpu-tiny-bare-generate")
    rows = data["rows"]
    assert data["cache_audit"]["ok"] is True and all(r["within_budget"] for r in rows)
    quiet = max(abs(r["quiet_difference_mean_ms"]) for r in rows)
    assert quiet <= 0.15 and all(r["quiet_difference_ci95"][0] <= 0 <= r["quiet_difference_ci95"][1] for r in rows)
    bar = [-r["difference_mean_ms"] for r in rows]
    flat = " ".join(page.split())
    assert "within 0.15 ms at both sizes and all three conditions, every interval holding 0" in flat
    assert f"A default `llm.generate` call is {min(bar):.1f}-{max(bar):.1f} ms slower than both" in flat
