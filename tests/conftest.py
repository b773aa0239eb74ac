"""Shared, expensive state: one tiny OPT model folder and one real vLLM engine per session."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# vLLM's CPU engine fails to start unless told how much memory the KV cache may take (GiB).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# On CPU, --gpu-memory-utilization is the share of a NUMA node's *free* memory the engine
# insists on at start (default 0.92); page cache left by pip or earlier engines can push a
# node below that and the start fails ("Available memory on node 0 ... is less than desired").
# The KV cache is set by VLLM_CPU_KVCACHE_SPACE anyway, so ask for less.
CPU_MEMORY_UTILIZATION = 0.5
# Without compiling the model an engine starts about 5 s sooner on this CPU (22.6 s against 28.1 s
# for `vllm serve` of the tiny model), and the suite starts a dozen; what the tests check does
# not depend on it.
ENGINE_FLAGS = ["--gpu-memory-utilization", str(CPU_MEMORY_UTILIZATION), "--enforce-eager"]
# tests/run_tests.sh runs two pytest-xdist workers. vLLM's CPU engine binds its compute thread to
# core 0 unless told otherwise, so two workers' engines would share one core while the other
# idles: each worker's engines (and the servers and scripts it starts) get a core of their own.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(int(XDIST_WORKER.removeprefix("gw")) % (os.cpu_count() or 1)))

from make_model import build_model  # noqa: E402

# Work units for the two pytest-xdist workers (tests/run_tests.sh: --dist loadgroup): every test
# that uses the session's engine, or one of its servers, runs on the worker that already has it,
# so each starts once per run instead of once per worker; a test that uses a module fixture stays
# with its file (the fixture is made once); any other test is a unit of its own. Units go out
# heaviest first, so the workers end together: the order is from --durations on this 2-core
# machine (the session's servers ~300 s, the offline CLI runs ~330 s, the fleets ~150 s); the
# rest keep their file order.
# xdist's own loadgroup cannot be used: it renames tests with a suffix that pytest 9.2 no longer
# reads. So the workers write each test's unit to a file, and the controller schedules by it.
SHARED_FIXTURE_GROUPS = {"vllm_server": "server", "plain_server": "server", "llm": "engine", "tier_server": "tier"}
HEAVIEST_FIRST = ["server", "tests/test_experiment.py", "tests/test_fleet.py", "tests/test_phase1.py", "tier",
                  "tests/test_exit_codes.py", "engine"]
UNITS_FILE = "PREFIX_CACHE_BENCH_TEST_UNITS"


def work_unit(item):
    """A test's work unit: the session resource it uses (fixtures it needs, directly or through
    a module fixture), else its file where it uses a fixture of the file's (made once per
    worker), else the test alone, so that the heavy ones spread over the workers."""
    shared = sorted({SHARED_FIXTURE_GROUPS[f] for f in item.fixturenames if f in SHARED_FIXTURE_GROUPS})
    if shared:
        return shared[-1]                   # a test with both goes with the server
    fixtures = getattr(item, "_fixtureinfo", None)
    module_scoped = fixtures and any(d.scope == "module" for defs in fixtures.name2fixturedefs.values() for d in defs)
    return item.nodeid.split("::")[0] if module_scoped else item.nodeid


def unit_rank(item, rank):
    """Where a test's unit goes in the order: its unit's place, else its file's."""
    return rank.get(work_unit(item), rank.get(item.nodeid.split("::")[0], len(rank)))


def pytest_configure(config):
    if not XDIST_WORKER and config.getoption("dist", "no") == "loadgroup":
        import tempfile
        os.environ[UNITS_FILE] = os.path.join(tempfile.mkdtemp(prefix="test-units-"), "units.json")


def pytest_collection_modifyitems(config, items):
    rank = {unit: i for i, unit in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: unit_rank(item, rank))      # stable: file order within
    if XDIST_WORKER and os.environ.get(UNITS_FILE):
        from prefix_cache_bench.results import write_json_atomic
        write_json_atomic(os.environ[UNITS_FILE], {item.nodeid: work_unit(item) for item in items})


def pytest_xdist_make_scheduler(config, log):
    """--dist loadgroup: xdist's scope scheduler, its scopes being this file's work units."""
    if config.getoption("dist") != "loadgroup":
        return None
    import json
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnitScheduling(LoadScopeScheduling):
        units = None

        def _split_scope(self, nodeid):
            if self.units is None:              # read once every worker has collected
                with open(os.environ[UNITS_FILE]) as f:
                    self.units = json.load(f)
            return self.units.get(nodeid) or nodeid.split("::")[0]

    return WorkUnitScheduling(config, log)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("models") / "tiny-opt")
    build_model(path, preset="tiny")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def llm(tiny_model_dir):
    """The real engine: prefix caching on, engine stats on (RequestOutput.metrics)."""
    from vllm import LLM
    from prefix_cache_bench.gpu_busy import WORKER_EXTENSION
    engine = LLM(model=tiny_model_dir, enable_prefix_caching=True, disable_log_stats=False, seed=0,
                 max_model_len=2048, gpu_memory_utilization=CPU_MEMORY_UTILIZATION, enforce_eager=True,
                 worker_extension_cls=WORKER_EXTENSION)         # as phase2_experiment.py starts it
    yield engine
    engine.llm_engine.engine_core.shutdown()


def start_script(script, args):
    """A script as a job in a terminal: its own session (so a signal can reach the whole group),
    output unbuffered, stderr into stdout."""
    import subprocess
    return subprocess.Popen([sys.executable, script, *args], cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_line(proc, needle):
    """start_script's output up to the first line holding needle (the test's time limit bounds
    the wait: a read that blocks cannot be timed out from here)."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            return "".join(seen)
    pytest.fail(f"never saw {needle!r}; exit {proc.wait()}; last output:\n{''.join(seen[-30:])}")


def load_tool(name):
    """A script of tools/ as a module (tools/ is no package: its scripts are run by path)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(args, timeout=600, **kwargs):
    """Run a project script as a user would: a new Python process, from the repo root."""
    import subprocess
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


# The session's server has a small KV cache (blocks of 128 tokens on CPU), so that a working-set
# sweep outgrows it within seconds.
SERVER_KV_BLOCKS = 40


@pytest.fixture(scope="session")
def vllm_server(tiny_model_dir):
    """A real `vllm serve` of the tiny model, started and stopped the way phase 1 does it
    (prefix_cache_bench.servers.EmbeddedServer): its base URL."""
    from prefix_cache_bench.servers import EmbeddedServer, free_port
    server = EmbeddedServer(tiny_model_dir, "127.0.0.1", free_port("127.0.0.1"),
                               ENGINE_FLAGS + ["--max-model-len", "2048",
                                               "--num-gpu-blocks-override", str(SERVER_KV_BLOCKS)])
    try:
        server.start(timeout_s=600)
        yield server
    finally:
        server.stop()
        assert not session_processes(server.proc.pid), "the server left processes behind"


@pytest.fixture(scope="session")
def plain_server(tiny_model_dir):
    """A real `vllm serve` as a user may have started it: without --enable-prompt-tokens-details,
    and with vLLM's own keep-alive (VLLM_HTTP_TIMEOUT_KEEP_ALIVE, 5 s). Started on first use."""
    from prefix_cache_bench.defaults import DETAILS_FLAG
    from prefix_cache_bench.servers import EmbeddedServer, free_port
    server = EmbeddedServer(tiny_model_dir, "127.0.0.1", free_port("127.0.0.1"), ENGINE_FLAGS + ["--max-model-len", "2048"])
    server.command.remove(DETAILS_FLAG)
    server.environment.pop("VLLM_HTTP_TIMEOUT_KEEP_ALIVE")
    with server:
        server.start(timeout_s=600)
        yield server
    assert not session_processes(server.proc.pid), "the server left processes behind"


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def kv_transfer_config(store_dir):
    """The --kv-transfer-config of tests/tier_connector.py's tier, a store in store_dir."""
    import json
    return json.dumps({"kv_connector": "SaltedExampleConnector", "kv_role": "kv_both",
                       "kv_connector_module_path": "tier_connector",
                       "kv_connector_extra_config": {"shared_storage_path": str(store_dir)}})


def with_tier_connector(environ):
    """An environment in which vLLM finds tests/tier_connector.py (kv_connector_module_path)."""
    return {**environ, "PYTHONPATH": os.pathsep.join(p for p in (TESTS_DIR, environ.get("PYTHONPATH")) if p)}


# The tier server's HBM: 48 blocks of 128 tokens, enough for two configs' rounds of 300-400 token
# prompts (phase 1), and for 24 documents of 300 tokens (2 full blocks each).
TIER_SERVER_KV_BLOCKS = 48


@pytest.fixture(scope="session")
def tier_server(tiny_model_dir, tmp_path_factory):
    """A real `vllm serve` of the tiny model with a second cache tier (tests/tier_connector.py: vLLM's
    ExampleConnector, a store on disk) and the dev-mode reset the tier condition needs, as phase 1
    starts one given --kv-transfer-config: the server, with its store folder as .tier_store."""
    from prefix_cache_bench.servers import EmbeddedServer, free_port
    store = tmp_path_factory.mktemp("tier-store")
    server = EmbeddedServer(tiny_model_dir, "127.0.0.1", free_port("127.0.0.1"),
                            ENGINE_FLAGS + ["--max-model-len", "2048", "--num-gpu-blocks-override", str(TIER_SERVER_KV_BLOCKS),
                                            "--kv-transfer-config", kv_transfer_config(store)],
                            extra_env={"VLLM_SERVER_DEV_MODE": "1"})
    server.environment = with_tier_connector(server.environment)
    server.tier_store = store
    with server:
        server.start(timeout_s=600)
        yield server
    assert not session_processes(server.proc.pid), "the server left processes behind"


def session_processes(session_id):
    """The live processes of a session (a server started with start_new_session: its pid)."""
    import psutil
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == session_id and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):
            pass
    return found


@pytest.fixture
def fake_server(request, tiny_model_dir):
    """A stand-in server (tests/fake_server.py) in the mode the test's parameter names."""
    from fake_server import FakeServer
    server = FakeServer(tiny_model_dir, mode=request.param)
    yield server
    server.close()
