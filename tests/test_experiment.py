"""phase2_experiment on the real CPU engine: cache states, statistics, the CLI, interruptions."""
import hashlib
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
import types

import pytest

from conftest import (ENGINE_FLAGS, ROOT, kv_transfer_config, run_script, session_processes, start_script, wait_for_line,
                      with_tier_connector)
from test_known_answers import T3, fieller
from prefix_cache_bench import audit, defaults, gpu_busy, offline_engine, offline_environment, protocol, provenance
from prefix_cache_bench.settings import RunSettings


SEED_TOP_KEYS = ("phase", "model", "timestamp", "config", "warmup_time_ms", "cache_hit", "cache_miss",
                 "ttft_degradation_pct")
SEED_CONFIG_KEYS = ("context_size_a", "context_size_b", "max_output_tokens", "num_trials", "warmup_trials")
SEED_STATS_KEYS = ("ttft_mean", "ttft_median", "ttft_stdev", "total_time_mean", "total_time_stdev",
                   "throughput_mean", "throughput_stdev", "prompt_tokens")


def run_many(llm, configs, env=None, engine=None, **overrides):
    """run_configs on the session's engine (or on engine, one that wraps it), with the CLI's
    defaults but short and quick."""
    run = RunSettings(**{**dict(configs=tuple(configs), seed=0, pause_ms=5.0, warmup_trials=1, num_trials=4,
                                num_blocks=4, min_block_seconds=0.0, max_output_tokens=8, model="tiny"), **overrides})
    environment = {**offline_environment.environment_info(llm, types.SimpleNamespace(model="tiny", seed=0), 0.0),
                   **provenance.provenance(["--test"], defaults.OFFLINE_PROG, os.path.join(ROOT, "phase2_experiment.py")),
                   **(env or {})}
    return protocol.run_configs(engine or offline_engine.OfflineEngine(llm, run.model), llm.get_tokenizer(), run, environment)


def run_one(llm, size_a, size_b, env=None, **overrides):
    return run_many(llm, [(size_a, size_b)], env, **overrides)[0]


def git_head():
    proc = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def llm_parameters_from_config():
    """The tiny model's parameters, built by transformers from its config (no engine involved)."""
    from transformers import OPTConfig, OPTForCausalLM
    from make_model import PRESETS
    return OPTForCausalLM(OPTConfig(**PRESETS["tiny"])).parameters()


@pytest.fixture(scope="module")
def block(llm):
    return llm.llm_engine.vllm_config.cache_config.block_size


# 1 + A + B tokens in [A, B]: 301 is not a multiple of the CPU block (128), 384 is, 97 is under one block.
@pytest.mark.parametrize("size_a,size_b", [(200, 100), (255, 128), (64, 32)])
def test_every_request_finds_exactly_what_its_condition_promises(llm, block, size_a, size_b):
    r = run_one(llm, size_a, size_b)
    warm = 1 + size_a + size_b
    assert r["warmup_prompt_tokens"] == warm
    expected_hit = warm // block * block
    cache_audit = r["cache_audit"]
    assert cache_audit["ok"] is True and cache_audit["problems"] == []
    assert cache_audit["expected_hit_cached_tokens"] == expected_hit
    assert cache_audit["requests_checked"] == 2 + 2 * 3 * 5          # warmup, stats flush, 3 conditions x 5 rounds x 2
    # vLLM's own counters agree: 5 hit trials x 2 requests found expected_hit tokens each
    counters = cache_audit["engine_counters"]
    assert counters["prefix_cache_hits"] == counters["sum_cached_tokens"] == 10 * expected_hit
    assert counters["prefix_cache_queries"] == counters["sum_prompt_tokens"]
    # counted from the engine's stats messages; this vLLM's get_metrics() (0.32) drops none of them
    assert counters["source"] == "scheduler stats messages"
    assert counters["vllm_metrics"] == {k: counters[k] for k in ("prefix_cache_queries", "prefix_cache_hits")}
    for condition, want in (("cache_hit", expected_hit), ("cache_miss", 0), ("cache_cold", 0)):
        for t in r[condition]["trials"] + r[condition]["discarded_trials"]:
            assert t["cached_tokens"] == want, (condition, t)
            assert t["throughput_request"]["cached_tokens"] == want, (condition, t)
            assert t["throughput_request"]["output_tokens"] == 8
    assert r["cache_hit"]["stats"]["prompt_tokens"] == warm + defaults.QUERY_TOKENS
    assert r["cache_cold"]["stats"]["prompt_tokens"] == warm + defaults.QUERY_TOKENS
    assert r["cache_miss"]["stats"]["prompt_tokens"] == 1 + size_b + defaults.QUERY_TOKENS


def test_result_keeps_the_design_schema_and_stats_match_trials(llm):
    r = run_one(llm, 200, 100, num_trials=4, warmup_trials=2)
    assert all(k in r for k in SEED_TOP_KEYS)
    assert r["phase"] == "phase2_python_api"
    assert all(k in r["config"] for k in SEED_CONFIG_KEYS)
    for c in ("cache_hit", "cache_miss", "cache_cold"):
        assert len(r[c]["trials"]) == 4 and len(r[c]["discarded_trials"]) == 2
        s = r[c]["stats"]
        assert all(k in s for k in SEED_STATS_KEYS)
        ttft = [t["ttft_ms"] for t in r[c]["trials"]]
        assert s["ttft_mean"] == pytest.approx(statistics.mean(ttft), abs=1e-3)
        assert s["ttft_median"] == pytest.approx(statistics.median(ttft), abs=1e-3)
        assert s["ttft_stdev"] == pytest.approx(statistics.stdev(ttft), abs=1e-3)
        assert s["total_time_mean"] == pytest.approx(statistics.mean(t["total_time_ms"] for t in r[c]["trials"]), abs=1e-3)
        assert s["throughput_mean"] == pytest.approx(statistics.mean(t["throughput_tok_s"] for t in r[c]["trials"]), abs=1e-3)
        assert s["engine_ttft_mean"] == pytest.approx(statistics.mean(t["engine_ttft_ms"] for t in r[c]["trials"]), abs=1e-3)
        # Student's t interval of the mean: t(0.975, 3) for 4 trials (tests/test_known_answers.py)
        ttft = [t["ttft_ms"] for t in r[c]["trials"]]
        half = T3 * statistics.stdev(ttft) / math.sqrt(len(ttft))
        assert s["ttft_ci95"] == pytest.approx([statistics.mean(ttft) - half, statistics.mean(ttft) + half], abs=2e-3)
        for t in r[c]["trials"]:
            assert 0 < t["prefill_ms"] <= t["engine_ttft_ms"] <= t["ttft_ms"]
            # where the TTFT went (RequestOutput.metrics): four parts that add up to it
            parts = t["ttft_breakdown_ms"]
            assert sum(parts.values()) == pytest.approx(t["ttft_ms"], abs=1e-6)
            assert parts["prefill_step_ms"] == t["prefill_ms"] and parts["queue_ms"] == t["queue_ms"] >= 0
            assert parts["frontend_ipc_ms"] >= 0 and parts["outside_engine_ms"] >= 0    # clocks not mixed
            assert parts["outside_engine_ms"] == pytest.approx(t["ttft_ms"] - t["engine_ttft_ms"], abs=1e-6)
            assert t["throughput_tok_s"] == pytest.approx(8 / (t["total_time_ms"] / 1e3), rel=1e-3)
        assert sum(s["ttft_breakdown_mean_ms"].values()) == pytest.approx(s["ttft_mean"], abs=1e-6)
    hit, miss, cold = (r[c]["stats"]["ttft_mean"] for c in ("cache_hit", "cache_miss", "cache_cold"))
    assert r["ttft_degradation_pct"] == pytest.approx((miss - hit) / hit * 100, abs=0.01)
    assert r["ttft_saving_pct"] == pytest.approx((cold - hit) / cold * 100, abs=0.01)
    # the intervals are Fieller's, paired over the 4 blocks of one round each (3 degrees of freedom)
    per_round = {c: [t["ttft_ms"] for t in sorted(r[c]["trials"], key=lambda t: t["round"])]
                 for c in ("cache_hit", "cache_miss", "cache_cold")}
    for key, (num, den), to_pct in (("ttft_saving", ("cache_hit", "cache_cold"), lambda q: (1 - q) * 100),
                                    ("ttft_degradation", ("cache_miss", "cache_hit"), lambda q: (q - 1) * 100)):
        x, y = per_round[num], per_round[den]
        cov = sum((a - statistics.mean(x)) * (b - statistics.mean(y)) for a, b in zip(x, y)) / 3 / 4
        bounds = fieller(statistics.mean(x), statistics.mean(y), statistics.variance(x) / 4, statistics.variance(y) / 4,
                         cov, T3, finite=False)      # a noisy engine round may leave the cold mean unclear
        assert r[f"{key}_ci95"] == pytest.approx(sorted(to_pct(q) for q in bounds), abs=2e-3)
    repro = r["reproducibility"]
    assert repro["unit"] == "block" and len(repro["per_round_saving_pct"]) == 4
    assert len(repro["per_block_saving_pct"]) == 4
    # the interval is over the 4 time blocks (one round each here), and the file says so
    method = r["interval"]
    assert method["unit"] == "block" and method["num_blocks"] == 4 and method["rounds_per_block"] == 1
    assert method["interleaved_configs"] == ["200x100"] and method["processes"] == 1
    assert len(method["block_span_s"]) == 4 and method["span_s"] > 0
    blocks = [t["block"] for t in sorted(r["cache_hit"]["trials"], key=lambda t: t["order"])]
    assert blocks == [0, 1, 2, 3]
    starts = [t["start_s"] for c in defaults.CONDITIONS for t in sorted(r[c]["trials"], key=lambda t: t["order"])]
    assert all(s >= 0 for s in starts)
    hit_by_round = sorted(r["cache_hit"]["trials"], key=lambda t: t["round"])
    cold_by_round = sorted(r["cache_cold"]["trials"], key=lambda t: t["round"])
    assert repro["per_round_saving_pct"][0] == pytest.approx(
        (cold_by_round[0]["ttft_ms"] - hit_by_round[0]["ttft_ms"]) / cold_by_round[0]["ttft_ms"] * 100)
    env = r["environment"]
    assert env["vllm_version"] and env["torch_version"] and env["device"] and env["block_size"]
    # the model's shape, as the engine sees it: tests/make_model.py's "tiny" preset
    shape = env["model_shape"]
    assert (shape["num_layers"], shape["hidden_size"], shape["num_attention_heads"], shape["head_dim"]) == (2, 128, 2, 64)
    assert shape["vocab_size"] == 2048 and shape["architecture"] == "OPTForCausalLM"
    assert shape["num_embedding_parameters"] == 2048 * 128          # OPT ties its LM head to the embedding
    assert shape["num_parameters"] == sum(w.numel() for w in llm_parameters_from_config())
    assert len(env["trial_order"]) == 18
    # provenance: the command as typed, the tool's commit and the script's hash, a UTC time
    assert env["command"].endswith("phase2_experiment.py --test")
    assert len(env["tool_version"]["script_sha256"]) == 64
    assert r["timestamp"].endswith("+00:00")
    json.dumps(r)                                         # serialisable as is


@pytest.mark.parametrize("block_order", [False, True])
def test_trial_order_is_used_and_recorded(llm, block_order):
    r = run_one(llm, 200, 100, block_order=block_order)
    assert r["config"]["interleave"] is not block_order
    # block order: the discarded round first, then all measured hits, misses and cold trials
    want = (["cache_hit:0", "cache_miss:0", "cache_cold:0", "cache_hit:1", "cache_hit:2"] if block_order else
            ["cache_hit:0", "cache_miss:0", "cache_cold:0", "cache_miss:1"])
    assert r["environment"]["trial_order"][:len(want)] == want
    assert r["cache_audit"]["ok"]
    trials = sorted((t for c in defaults.CONDITIONS for t in r[c]["trials"] + r[c]["discarded_trials"]), key=lambda t: t["order"])
    assert [f"{t['condition']}:{t['round']}" for t in trials] == r["environment"]["trial_order"]
    assert all(t["round"] == 0 for c in defaults.CONDITIONS for t in r[c]["discarded_trials"])
    assert r["reproducibility"]["unit"] == ("trial" if block_order else "block")


def test_configs_are_interleaved_and_audited_together(llm, block):
    """Two configs in one run: every round runs both, so both span the whole run; the engine's
    counter covers the requests of both; each file audits its own requests."""
    first, second = run_many(llm, [(200, 100), (255, 128)])
    for r, warm in ((first, 301), (second, 384)):
        assert r["cache_audit"]["ok"] is True, r["cache_audit"]["problems"]
        assert r["cache_audit"]["expected_hit_cached_tokens"] == warm // block * block
        assert r["interval"]["interleaved_configs"] == ["200x100", "255x128"]
    counters = first["cache_audit"]["engine_counters"]
    assert counters == second["cache_audit"]["engine_counters"] and counters["scope"].startswith("every request")
    assert counters["prefix_cache_hits"] == counters["sum_cached_tokens"] == 10 * (256 + 384)
    orders = lambda r: sorted(t["order"] for c in defaults.CONDITIONS for t in r[c]["trials"] + r[c]["discarded_trials"])
    a, b = orders(first), orders(second)
    assert not set(a) & set(b) and sorted(a + b) == list(range(30))
    # round by round, three trials of one config then three of the other, the first config rotating
    assert a[:3] == [0, 1, 2] and b[:3] == [3, 4, 5] and b[3:6] == [6, 7, 8] and a[3:6] == [9, 10, 11]


def test_audit_reports_requests_that_break_their_condition(llm, block):
    # Claim a finer cache granularity than the engine has: hits then find fewer tokens than
    # "expected", and the audit must say so instead of reporting the numbers as clean.
    r = run_one(llm, 200, 100, env={"cache_block_size": 32})
    assert r["cache_audit"]["ok"] is False
    assert r["cache_audit"]["expected_hit_cached_tokens"] == 288
    assert any(pr.startswith("cache_hit trial 0 ttft request: cached_tokens=256") for pr in r["cache_audit"]["problems"])
    assert not any("cache_miss" in pr or "cache_cold" in pr for pr in r["cache_audit"]["problems"])


# ----------------------------------------------------------------------------- the CLI

def test_cli_writes_one_audited_json_per_config_over_several_processes_with_a_tier(tmp_path):
    """Two engine processes of a config-only folder (tests/make_model.py --shape), run with
    vLLM's --load-format dummy: a real architecture's shape without its weights. The engine has a
    second cache tier (tests/tier_connector.py, one store on disk for both processes), so a fourth
    condition, cache_tier, is measured and audited by tier."""
    from make_model import build_shape
    model, out, store = str(tmp_path / "llama-tiny"), tmp_path / "results", tmp_path / "store"
    build_shape(model, "llama-tiny")
    store.mkdir()
    args = ["--model", model, "--load-format", "dummy", "--sizes", "200x100,255x128", "--processes", "2",
            "--num-blocks", "2", "--min-block-seconds", "0.2", "--pause-ms", "5", "--max-output-tokens", "5",
            "--results-dir", str(out), "--seed", "7", *ENGINE_FLAGS, "--kv-transfer-config", kv_transfer_config(store)]
    proc = run_script(["phase2_experiment.py", *args], env=with_tier_connector(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "=== engine process 2 of 2 ===" in proc.stdout and "engine process 1 of 2 done after" in proc.stdout
    # each process sizes its measured rounds from its discarded round's time: 2 blocks of >= 0.2 s, >= 2 rounds each
    sized = re.findall(r"a round of 2 config\(s\) took ([0-9.]+) s: (\d+) measured rounds in 2 time block", proc.stdout)
    assert len(sized) == 2, proc.stdout[-2000:]
    for round_s, rounds in ((float(s), int(r)) for s, r in sized):
        assert rounds == 2 * max(2, math.ceil(0.2 / round_s)) or abs(round_s - 0.2 / (rounds // 2)) < 0.01
    rounds = sum(int(r) for _, r in sized)
    assert sorted(os.listdir(out)) == ["results_phase2_a200_b100.json", "results_phase2_a255_b128.json"]
    for name, a, b in (("results_phase2_a200_b100.json", 200, 100), ("results_phase2_a255_b128.json", 255, 128)):
        r = json.load(open(out / name))
        assert all(k in r for k in SEED_TOP_KEYS)
        assert r["config"]["context_size_a"] == a and r["config"]["context_size_b"] == b
        assert r["config"]["max_output_tokens"] == 5 and r["config"]["seed"] == 7
        assert r["cache_audit"]["ok"] is True
        assert r["model"] == model and r["environment"]["engine_args"]["load_format"] == "dummy"
        shape = r["environment"]["model_shape"]
        assert shape["architecture"] == "LlamaForCausalLM" and shape["num_kv_heads"] == 1 and shape["num_layers"] == 2
        assert shape["num_embedding_parameters"] == 2 * 2048 * 128           # untied LM head: counted twice
        assert r["environment"]["engine_args"]["enable_prefix_caching"] is True
        assert r["environment"]["engine_args"]["disable_log_stats"] is False
        assert r["environment"]["engine_args"]["gpu_memory_utilization"] == 0.5    # vLLM flags pass through
        # the GPU-busy segment's worker extension ran in both engines, and said there is no CUDA device here
        assert r["environment"]["engine_args"]["worker_extension_cls"] == gpu_busy.WORKER_EXTENSION
        assert r["gpu_busy"] == {"not_measured": gpu_busy.NOT_ON_THIS_ENGINE}
        assert r["config"]["num_trials"] == rounds and r["interval"]["num_blocks"] == 4
        # one interval over the two processes' means; every trial says which process ran it
        assert r["interval"]["unit"] == "process" and r["interval"]["processes"] == 2
        assert {t["process"] for t in r["cache_hit"]["trials"]} == {0, 1}
        assert len(r["reproducibility"]["per_process_saving_pct"]) == 2
        assert len(r["environment"]["engine_start_s_per_process"]) == 2
        # each process measured its host; the file keeps the first's machine and every process's figure
        assert len(r["environment"]["host_python_loop_ms_per_process"]) == 2
        assert all(ms > 0 for ms in r["environment"]["host_python_loop_ms_per_process"])
        assert r["environment"]["machine"]["cpu_logical_cores"] == os.cpu_count()
        counters = r["cache_audit"]["engine_counters"]
        assert counters["prefix_cache_hits"] + counters["external_prefix_cache_hits"] == counters["sum_cached_tokens"]
        assert counters["external_prefix_cache_hits"] == counters["sum_tier_cached_tokens"] > 0
        assert "2 processes" in counters["scope"]
        # the tier condition: every request found [A, B] in the tier and none of it in HBM, each
        # process in a namespace of its own (the store outlives the first process)
        hit_tokens = r["cache_audit"]["expected_hit_cached_tokens"]
        assert r["environment"]["tier"]["connector"] == "SaltedExampleConnector"
        assert {t["process"] for t in r["cache_tier"]["trials"]} == {0, 1}
        for t in r["cache_tier"]["trials"] + r["cache_tier"]["discarded_trials"]:
            for request in (t, t["throughput_request"]):
                assert (request["cached_tokens"], request["hbm_cached_tokens"], request["tier_cached_tokens"]) == \
                    (hit_tokens, 0, hit_tokens)
            assert len(t["restore_requests"]) == 2          # the other config's [A, B], after each request
        for t in r["cache_hit"]["trials"]:
            assert (t["hbm_cached_tokens"], t["tier_cached_tokens"]) == (hit_tokens, 0)
        lo, hi = r["tier_ttft_saving_ci95"]         # None: unbounded (Fieller over 2 processes)
        assert (lo is None or lo <= r["tier_ttft_saving_pct"]) and (hi is None or r["tier_ttft_saving_pct"] <= hi)
        assert r["environment"]["command"] == shlex.join([os.path.basename(sys.executable), "phase2_experiment.py",
                                                          *args])
        version = r["environment"]["tool_version"]
        assert git_head() is not None and version["git_commit"] == git_head()      # tests run in a git checkout
        script = os.path.join(ROOT, "phase2_experiment.py")
        assert version["code_sha256"] == provenance.code_sha256(provenance.code_files(script))
        assert version["script_sha256"] == hashlib.sha256(open(script, "rb").read()).hexdigest()
        assert r["schema_version"] == 1
    assert "A=200 B=100" in proc.stdout and "cache audit: OK" in proc.stdout
    assert "hit saves vs cold" in proc.stdout and "rounds" in proc.stdout
    assert proc.stdout.count("a tier hit (SaltedExampleConnector) saves vs cold") == 2


# SIGINT and SIGTERM take the same handler: SIGINT is tried as a terminal sends it, to the group.
@pytest.mark.parametrize("sig,code,whole_group,processes,when", [
    # kill <pid>, a batch scheduler's stop: passed on to the running engine process (of several),
    # while its engine starts
    (signal.SIGTERM, 143, False, [], "starting vLLM engine"),
    # Ctrl-C in a terminal: vLLM's engine processes get it too; the engine in this process itself
    # (--processes 1), mid-run, so that both ways a run holds its engine are stopped by a signal
    (signal.SIGINT, 130, True, ["--processes", "1"], "measured rounds in"),
], ids=["sigterm", "ctrl-c-group"])
def test_interrupt_writes_nothing_and_leaves_old_files_intact(tiny_model_dir, tmp_path, monkeypatch, sig, code, whole_group,
                                                              processes, when):
    monkeypatch.setenv("PREFIX_CACHE_BENCH_INTERRUPT_GRACE_S", "5")    # an engine start does not end by itself
    out = tmp_path / "results"
    out.mkdir()
    old = out / "results_phase2_a255_b128.json"
    old.write_text('{"earlier": "run"}\n')
    proc = start_script("phase2_experiment.py", [
        "--model", tiny_model_dir, "--sizes", "200x100,255x128", "--num-trials", "400", "--pause-ms", "5",
        "--max-output-tokens", "5", *processes, "--results-dir", str(out), *ENGINE_FLAGS])
    try:
        before = wait_for_line(proc, when)          # the engine is starting, or the measured rounds are under way
        assert f"note: {old} exists; it is replaced only once the run completes" in before
        time.sleep(1.5)
        if whole_group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code, rest[-3000:]
    assert "no partial results written" in rest
    # our own process ends without a traceback (vLLM's engine processes may log their own
    # shutdown when they get the terminal's SIGINT themselves)
    assert 'phase2_experiment.py", line' not in rest
    if not whole_group:
        assert "Traceback" not in rest
    assert sorted(os.listdir(out)) == ["results_phase2_a255_b128.json"]
    assert old.read_text() == '{"earlier": "run"}\n'
    # the signal reached the running engine process (passed on, or sent to the group), and nothing
    # of the run is left. Python's multiprocessing resource tracker ends by itself once its parent
    # is gone (within a second here): it is given 10 s; an engine process would stay
    deadline = time.time() + 10
    while session_processes(proc.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not session_processes(proc.pid)


def _kill_vllm_process(pid, name="VLLM::Worker", timeout=300):
    """SIGKILL every process of ours whose title starts with name, once there is one."""
    import psutil
    deadline = time.time() + timeout
    while time.time() < deadline:
        killed = []
        for proc in psutil.Process(pid).children(recursive=True):
            try:
                if " ".join(proc.cmdline()).startswith(name):
                    proc.kill()
                    killed.append(proc)
            except psutil.Error:
                pass
        if killed:
            psutil.wait_procs(killed, timeout=10)
            return time.time()
        time.sleep(0.2)
    pytest.fail(f"no {name} process appeared")


# mid-run: the engine in this process itself (--processes 1); at start: in one of several engine
# processes, whose exit 1 ends the whole run (so that each way a run holds its engine is tested
# once, and the engine starts once in each)
@pytest.mark.parametrize("when,processes", [("mid_run", ["--processes", "1"]), ("at_start", [])], ids=["mid_run", "at_start"])
def test_dead_engine_ends_the_run_with_one_line(tiny_model_dir, tmp_path, when, processes):
    out = tmp_path / "results"
    proc = start_script("phase2_experiment.py", [
        "--model", tiny_model_dir, "--sizes", "200x100,255x128", "--num-trials", "400", "--max-output-tokens", "5",
        *processes, "--results-dir", str(out), *ENGINE_FLAGS])
    try:
        if when == "mid_run":
            wait_for_line(proc, "measured rounds in")
            time.sleep(1.0)
        else:
            wait_for_line(proc, "starting vLLM engine")
        killed_at = _kill_vllm_process(proc.pid)
        rest, _ = proc.communicate(timeout=120)
        ended_after_s = time.time() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, rest[-3000:]
    assert ended_after_s < 30
    last_lines = [line for line in rest.splitlines() if line.strip()][-5:]
    errors = [line for line in last_lines if line.startswith("phase2_experiment.py: error: the vLLM engine")]
    assert len(errors) == 1, last_lines
    assert f"failed during its {'run' if when == 'mid_run' else 'start'}: " in errors[0]
    # nothing partial, no temp file: the configs of a run finish together
    assert (sorted(os.listdir(out)) if out.exists() else []) == []


def test_engine_counters_of_processes_add_up():
    a = {"prefix_cache_hits": 5, "source": "x", "vllm_metrics": {"prefix_cache_hits": 4}, "other_clients": False}
    b = {"prefix_cache_hits": 7, "source": "x", "vllm_metrics": {"prefix_cache_hits": 6}, "other_clients": False}
    assert audit.sum_counters([a, b]) == {"prefix_cache_hits": 12, "source": "x", "vllm_metrics": {"prefix_cache_hits": 10},
                                      "other_clients": False}
    assert audit.sum_counters([a, None]) is None
