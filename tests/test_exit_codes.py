"""Every exit code the docs list, through each script's command line, on the real engine or
server wherever one can produce the case: 0 with its own `vllm serve`, 3 (a failed audit: the
JSON is still written, with ok false, and one line says so), 128+N (an engine process killed by
signal N), 143 (SIGTERM) and 130 (Ctrl-C) during a load run. Exit 1 and 2 are tested beside the
faults that cause them (test_errors.py, test_phase1.py, test_load.py, test_fleet.py)."""
import json
import os
import re
import signal
import time

import psutil
import pytest

from conftest import ENGINE_FLAGS, SERVER_KV_BLOCKS, run_script, session_processes, start_script, wait_for_line

AUDIT_FAILED = "exit 3: a cache audit failed (see above); the JSON records which requests"


def finish(proc, timeout=120):
    """The rest of the output once the process has ended; SIGKILL to its group if it has not."""
    try:
        return proc.communicate(timeout=timeout)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


# -----------------------------------------------------------------------------
# exit 3: a real engine made to break the audit
#
# Two configs' [A, B] are warmed one after the other into a KV cache too small for both, so
# the second warmup evicts the first one's last blocks (vLLM frees a request's blocks tail
# first, and evicts the least recently freed). --block-order skips the check that refuses such
# a cache, so the first config's hits find fewer tokens than [A, B]'s full blocks: the audit
# fails on what the engine really did.

def test_phase2_a_failed_audit_exits_3_with_one_line_and_still_writes_the_file(tiny_model_dir, tmp_path):
    out = tmp_path / "results"
    # [A, B] = 1 + 500 + 100 = 601 tokens: 4 full CPU blocks of 128 (512 cached) and a partial one;
    # both warmups need 10 blocks, the cache has 8
    proc = run_script(["phase2_experiment.py", "--model", tiny_model_dir, "--sizes", "500x100,501x100",
                       "--block-order", "--num-trials", "1", "--warmup-trials", "0", "--max-output-tokens", "2",
                       "--results-dir", str(out), "--num-gpu-blocks-override", "8", "--max-model-len", "800",
                       *ENGINE_FLAGS])
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == AUDIT_FAILED
    assert "!!! CACHE AUDIT FAILED" in proc.stderr and "Traceback" not in proc.stderr
    first = json.load(open(out / "results_phase2_a500_b100.json"))
    assert first["cache_audit"]["ok"] is False and first["cache_audit"]["expected_hit_cached_tokens"] == 512
    short = [p for p in first["cache_audit"]["problems"] if p.startswith("cache_hit trial 0 ttft request")]
    assert len(short) == 1 and re.search(r"cached_tokens=(0|128|256|384), expected 512", short[0]), short
    assert os.path.exists(out / "results_phase2_a501_b100.json")       # every config's file is written


def test_phase1_a_failed_audit_exits_3_with_one_line_and_still_writes_the_file(vllm_server, tmp_path):
    """The same through the session's server: its KV cache holds SERVER_KV_BLOCKS blocks of 128,
    three configs' warmups of 15 blocks each do not fit together."""
    assert SERVER_KV_BLOCKS == 40
    sizes = "1500x400,1501x400,1502x400"          # [A, B] = 1901 tokens: 14 full blocks (1792), 15 in all
    proc = run_script(["phase1_experiment.py", "--base-url", vllm_server.base_url, "--sizes", sizes, "--block-order",
                       "--num-trials", "1", "--warmup-trials", "0", "--max-output-tokens", "2",
                       "--results-dir", str(tmp_path)])
    assert proc.returncode == 3, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "trial/s]" not in line]
    assert lines[-1] == AUDIT_FAILED, lines[-5:]
    first = json.load(open(tmp_path / "results_phase1_a1500_b400.json"))
    assert first["cache_audit"]["ok"] is False and first["schema_version"] == 1
    assert any(re.search(r"cache_hit trial 0 ttft request: cached_tokens=\d+, expected 1792", p)
               for p in first["cache_audit"]["problems"]), first["cache_audit"]["problems"]
    assert os.path.exists(tmp_path / "results_phase1_a1502_b400.json")


# -----------------------------------------------------------------------------
# 128+N, 143, 130

def test_phase2_an_engine_process_killed_by_a_signal_exits_128_plus_n(tiny_model_dir, tmp_path):
    """--processes runs the script again per engine process; one killed by SIGKILL (9) ends the
    run with 137 and one line, and no file."""
    out = tmp_path / "results"
    proc = start_script("phase2_experiment.py", ["--model", tiny_model_dir, "--processes", "2", "--num-trials", "2",
                                                 "--results-dir", str(out), *ENGINE_FLAGS])
    try:
        wait_for_line(proc, "=== engine process 1 of 2 ===")
        worker = None
        while worker is None and proc.poll() is None:
            worker = next((p for p in psutil.Process(proc.pid).children()
                           if "--worker-output" in " ".join(p.cmdline())), None)
            time.sleep(0.05)
        worker.send_signal(signal.SIGKILL)
        rest = finish(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGKILL, rest[-3000:]
    assert rest.strip().splitlines()[-1] == ("phase2_experiment.py: error: engine process 1 was killed by SIGKILL; "
                                            "no results written")
    assert (sorted(os.listdir(out)) if out.exists() else []) == []
    assert not session_processes(proc.pid)


def test_phase1_sigterm_mid_run_exits_143_and_writes_nothing(vllm_server, tmp_path):
    proc = start_script("phase1_experiment.py", ["--base-url", vllm_server.base_url, "--size-a", "200", "--size-b", "100",
                                                 "--num-trials", "400", "--max-output-tokens", "4", "--results-dir",
                                                 str(tmp_path)])
    wait_for_line(proc, "measured rounds in")
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    rest = finish(proc)
    assert proc.returncode == 143, rest[-3000:]
    assert rest.strip().splitlines()[-1] == "phase1_experiment.py: interrupted (SIGTERM): no partial results written"
    assert "Traceback" not in rest and os.listdir(tmp_path) == []


def test_phase1_ctrl_c_during_a_load_run_exits_130_and_writes_nothing(vllm_server, tmp_path):
    proc = start_script("phase1_experiment.py", ["--base-url", vllm_server.base_url, "--size-a", "300", "--num-prefixes", "2",
                                                 "--concurrency", "2", "--num-requests", "2000", "--max-output-tokens", "4",
                                                 "--repeats", "1", "--results-dir", str(tmp_path)])
    wait_for_line(proc, "--- 1 of 1:")
    time.sleep(2.0)
    os.killpg(proc.pid, signal.SIGINT)              # a terminal's Ctrl-C reaches the whole group
    rest = finish(proc)
    assert proc.returncode == 130, rest[-3000:]
    assert rest.strip().splitlines()[-1] == "phase1_experiment.py: interrupted (SIGINT): no partial results written"
    assert os.listdir(tmp_path) == []


# -----------------------------------------------------------------------------
# 0: phase 1 with its own `vllm serve`, started, measured, stopped

@pytest.mark.timeout(600)
def test_phase1_with_its_own_server_runs_to_the_end_exits_0_and_leaves_nothing(tiny_model_dir, tmp_path):
    proc = start_script("phase1_experiment.py", ["--model", tiny_model_dir, "--size-a", "200", "--size-b", "100",
                                                 "--num-trials", "2", "--num-blocks", "1", "--max-output-tokens", "4",
                                                 "--results-dir", str(tmp_path), *ENGINE_FLAGS, "--max-model-len", "1024"])
    output = finish(proc, timeout=540)
    assert proc.returncode == 0, output[-3000:]
    server_pid = int(re.search(r"starting the vLLM server \(pid (\d+)\)", output).group(1))
    assert not session_processes(server_pid), "the server left processes behind"
    assert not session_processes(proc.pid)
    r = json.load(open(tmp_path / "results_phase1_a200_b100.json"))
    assert r["cache_audit"]["ok"] is True and r["schema_version"] == 1
    server = r["environment"]["server"]
    assert server["embedded"] is True and server["start_s"] > 0 and "--enable-prompt-tokens-details" in server["command"]
    assert "cache audit: OK" in output and output.rstrip().endswith("results_phase1_a200_b100.json")
