"""phase2_experiment on the real CPU engine: cache states, statistics, the CLI, interruptions."""
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import types

import pytest
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

import phase2_experiment as p
from conftest import ENGINE_FLAGS, ROOT, run_script

SEED_TOP_KEYS = ("phase", "model", "timestamp", "config", "warmup_time_ms", "cache_hit", "cache_miss",
                 "ttft_degradation_pct")
SEED_CONFIG_KEYS = ("context_size_a", "context_size_b", "max_output_tokens", "num_trials", "warmup_trials")
SEED_STATS_KEYS = ("ttft_mean", "ttft_median", "ttft_stdev", "total_time_mean", "total_time_stdev",
                   "throughput_mean", "throughput_stdev", "prompt_tokens")


def make_opts(model, **overrides):
    opts = dict(seed=0, pause_ms=5.0, warmup_trials=1, num_trials=3, interleave=False,
                max_output_tokens=8, model=model, engine_start_s=0.0)
    opts.update(overrides)
    return types.SimpleNamespace(**opts)


def run_one(llm, size_a, size_b, **overrides):
    opts = make_opts("tiny", **overrides)
    env = p.environment_info(llm, types.SimpleNamespace(model="tiny"), opts)
    env.update(overrides.pop("env", {}))
    return p.run_config(llm, llm.get_tokenizer(), size_a, size_b, opts, env)


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
    audit = r["cache_audit"]
    assert audit["ok"] is True and audit["problems"] == []
    assert audit["expected_hit_cached_tokens"] == expected_hit
    assert audit["requests_checked"] == 1 + 2 * 3 * 4
    # vLLM's own counters agree: 4 hit trials x 2 requests found expected_hit tokens each
    counters = audit["engine_counters"]
    assert counters["prefix_cache_hits"] == counters["sum_cached_tokens"] == 8 * expected_hit
    assert counters["prefix_cache_queries"] == counters["sum_prompt_tokens"]
    for condition, want in (("cache_hit", expected_hit), ("cache_miss", 0), ("cache_cold", 0)):
        for t in r[condition]["trials"] + r[condition]["discarded_trials"]:
            assert t["cached_tokens"] == want, (condition, t)
            assert t["throughput_request"]["cached_tokens"] == want, (condition, t)
            assert t["throughput_request"]["output_tokens"] == 8
    assert r["cache_hit"]["stats"]["prompt_tokens"] == warm + p.QUERY_TOKENS
    assert r["cache_cold"]["stats"]["prompt_tokens"] == warm + p.QUERY_TOKENS
    assert r["cache_miss"]["stats"]["prompt_tokens"] == 1 + size_b + p.QUERY_TOKENS


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
        assert s["ttft_ci95"][0] <= s["ttft_mean"] <= s["ttft_ci95"][1]
        for t in r[c]["trials"]:
            assert 0 < t["prefill_ms"] <= t["engine_ttft_ms"] <= t["ttft_ms"]
            assert t["throughput_tok_s"] == pytest.approx(8 / (t["total_time_ms"] / 1e3), rel=1e-3)
    hit, miss, cold = (r[c]["stats"]["ttft_mean"] for c in ("cache_hit", "cache_miss", "cache_cold"))
    assert r["ttft_degradation_pct"] == pytest.approx((miss - hit) / hit * 100, abs=0.01)
    assert r["ttft_saving_pct"] == pytest.approx((cold - hit) / cold * 100, abs=0.01)
    env = r["environment"]
    assert env["vllm_version"] and env["torch_version"] and env["device"] and env["block_size"]
    assert env["trial_order"][0] == "cache_hit:0" and len(env["trial_order"]) == 18
    json.dumps(r)                                         # serialisable as is


def test_interleaved_order_is_used_and_recorded(llm):
    r = run_one(llm, 200, 100, interleave=True)
    assert r["config"]["interleave"] is True
    assert r["environment"]["trial_order"][:4] == ["cache_hit:0", "cache_miss:0", "cache_cold:0", "cache_miss:1"]
    assert r["cache_audit"]["ok"]
    orders = [t["order"] for c in ("cache_hit", "cache_miss", "cache_cold") for t in r[c]["trials"]]
    assert sorted(orders) == list(range(3, 12))


def test_audit_reports_requests_that_break_their_condition(llm, block):
    # Claim a finer cache granularity than the engine has: hits then find fewer tokens than
    # "expected", and the audit must say so instead of reporting the numbers as clean.
    r = run_one(llm, 200, 100, env={"cache_block_size": 32})
    assert r["cache_audit"]["ok"] is False
    assert r["cache_audit"]["expected_hit_cached_tokens"] == 288
    assert any(pr.startswith("cache_hit trial 0 ttft request: cached_tokens=256") for pr in r["cache_audit"]["problems"])
    assert not any("cache_miss" in pr or "cache_cold" in pr for pr in r["cache_audit"]["problems"])


def test_the_design_taken_literally_is_not_a_miss(llm, block):
    """Why misses are salted: an unsalted [B, Q] hits its own blocks the second time."""
    ids = [2] + [20 + i % 300 for i in range(block + 20)]
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    assert llm.reset_prefix_cache()
    llm.generate(TokensPrompt(prompt_token_ids=ids), params, use_tqdm=False)
    second = llm.generate(TokensPrompt(prompt_token_ids=ids), params, use_tqdm=False)[0]
    assert second.num_cached_tokens == block


# ----------------------------------------------------------------------------- the CLI

def test_cli_writes_one_audited_json_per_config(tiny_model_dir, tmp_path):
    out = tmp_path / "results"
    proc = run_script(["phase2_experiment.py", "--model", tiny_model_dir, "--sizes", "200x100,255x128",
                       "--num-trials", "2", "--pause-ms", "5", "--max-output-tokens", "5",
                       "--results-dir", str(out), "--seed", "7", *ENGINE_FLAGS])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["results_phase2_a200_b100.json", "results_phase2_a255_b128.json"]
    for name, a, b in (("results_phase2_a200_b100.json", 200, 100), ("results_phase2_a255_b128.json", 255, 128)):
        r = json.load(open(out / name))
        assert all(k in r for k in SEED_TOP_KEYS)
        assert r["config"]["context_size_a"] == a and r["config"]["context_size_b"] == b
        assert r["config"]["max_output_tokens"] == 5 and r["config"]["seed"] == 7
        assert r["cache_audit"]["ok"] is True
        assert r["model"] == tiny_model_dir
        assert r["environment"]["engine_args"]["enable_prefix_caching"] is True
        assert r["environment"]["engine_args"]["disable_log_stats"] is False
        assert r["environment"]["engine_args"]["gpu_memory_utilization"] == 0.5    # vLLM flags pass through
    assert "A=200 B=100" in proc.stdout and "cache audit: OK" in proc.stdout
    assert "hit saves vs cold" in proc.stdout


def _start(args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # its own process group, like a job in a terminal, so Ctrl-C can be sent to the whole group
    return subprocess.Popen([sys.executable, "phase2_experiment.py", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for(proc, needle, timeout=300):
    deadline, seen = time.time() + timeout, []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    proc.kill()
    pytest.fail(f"never saw {needle!r}; last output:\n{''.join(seen[-30:])}")


@pytest.mark.parametrize("sig,code,whole_group", [
    (signal.SIGINT, 130, False),     # kill -INT <pid>
    (signal.SIGTERM, 143, False),    # kill <pid>, a batch scheduler's stop
    (signal.SIGINT, 130, True),      # Ctrl-C in a terminal: vLLM's engine processes get it too
], ids=["sigint", "sigterm", "ctrl-c-group"])
def test_interrupt_leaves_finished_configs_and_old_files_intact(tiny_model_dir, tmp_path, sig, code, whole_group):
    out = tmp_path / "results"
    out.mkdir()
    old = out / "results_phase2_a255_b128.json"
    old.write_text('{"earlier": "run"}\n')
    proc = _start(["--model", tiny_model_dir, "--sizes", "200x100,255x128", "--num-trials", "12",
                   "--pause-ms", "100", "--max-output-tokens", "5", "--results-dir", str(out), *ENGINE_FLAGS])
    try:
        before = _wait_for(proc, "wrote " + str(out / "results_phase2_a200_b100.json"))
        assert f"note: {old} exists; it is replaced only once this config completes" in before
        _wait_for(proc, "A=255 B=128")        # the second config's trials are under way
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
    assert sorted(os.listdir(out)) == ["results_phase2_a200_b100.json", "results_phase2_a255_b128.json"]
    assert json.load(open(out / "results_phase2_a200_b100.json"))["cache_audit"]["ok"] is True
    assert old.read_text() == '{"earlier": "run"}\n'
