"""Phase 1: what vLLM's automatic prefix caching does to the TTFT a client of `vllm serve` sees.

The experiment of phase2_experiment.py (contexts A and B, warmup [A, B], then hit / miss /
cold in rounds with a fresh query Q per request, intervals over time blocks), sent as
streamed /v1/completions requests to vLLM's OpenAI-compatible server:

    python phase1_experiment.py --size-a 512 --size-b 256 --model /path/to/model [vllm serve flags]
    python phase1_experiment.py --base-url http://host:8000 --sizes 512x256,2048x256

The first starts its own `vllm serve` (with --enable-prompt-tokens-details) and stops it at
the end, on error and on Ctrl-C; the second measures a server that is already running. TTFT
is timed in the client: from just before the request is sent to the arrival of the first
streamed chunk that carries a token, on a keep-alive connection opened before the timed
requests. Every response's usage.prompt_tokens_details.cached_tokens is checked against its
condition (the cache audit), and the server's /metrics counters must agree.

Each run uses a cache namespace of its own (a cache_salt on its warmup and hits), so blocks
that other runs or clients left on the server cannot hit. Writes
results/results_phase1_a{A}_b{B}.json per config once the run ends.

Under load, P documents of A tokens shared by many clients, cached against cold (every
request salted) at the same load; a list of loads or of P is a sweep:

    python phase1_experiment.py --base-url URL --size-a 8192 --num-prefixes 8 --concurrency 1,4,16,64
    python phase1_experiment.py --base-url URL --size-a 8192 --request-rate 1,2,4
    python phase1_experiment.py --base-url URL --size-a 8192 --num-prefixes 1,2,4,8,16 --concurrency 4

Each request's cached tokens are recorded against its document; a hit is no longer promised
(documents may outgrow the KV cache), but a request that found more than it can have is an
audit failure. Writes results_load_a{A}_p{P}_{concurrency|rate}.json, or for a sweep of P
results_workingset_a{A}.json. Requests that fail end the sweep; the levels measured are kept.

Exit codes: 0 ok, 1 set-up or server problem (or, under load, failed requests), 2 bad
arguments, 3 a cache audit failed (the JSON is still written), 130/143 interrupted (no file
written).
"""
import argparse
import asyncio
import datetime
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import numpy as np

import phase2_experiment as p2
from phase2_experiment import EXIT_AUDIT, EXIT_USAGE, ExperimentError, Interrupted

# -----------------------------------------------------------------------------
# config: command-line flags override these
SERVER_HOST = "127.0.0.1"
SERVER_START_TIMEOUT_S = 1200.0     # a first start on a GPU compiles: minutes
REQUEST_TIMEOUT_S = 600.0           # one request, from send to its last chunk
SERVER_STOP_GRACE_S = 30.0          # SIGTERM, then SIGKILL for whatever is left
# One server is one engine process: the interval is over its time blocks (12 of at least 20 s),
# not over several processes as phase 2's is.
NUM_BLOCKS = 12
MIN_BLOCK_SECONDS = 20.0
# vLLM closes a keep-alive connection after VLLM_HTTP_TIMEOUT_KEEP_ALIVE (5 s) idle. Building a
# run's prompts takes longer than that, so after an idle gap of IDLE_RECONNECT_S an untimed
# GET /health makes sure the next timed request finds its connection open. The embedded server
# also keeps idle connections longer.
IDLE_RECONNECT_S = 2.0
EMBEDDED_KEEP_ALIVE_S = 600
# Under load (--concurrency, --request-rate, a list of --num-prefixes):
# Requests per load level, condition and pass: at least this many, and at least
# LOAD_REQUESTS_PER_CLIENT per closed-loop client, so that the ramp-up of the first
# `concurrency` requests and the drain of the last are a small part of the level.
LOAD_NUM_REQUESTS = 100
LOAD_REQUESTS_PER_CLIENT = 10
# Passes over the whole sweep. One pass's intervals hold its own requests' spread, but a closed
# loop settles into a state of its own each time (on the 2-core CPU, concurrency 4: a cached
# TTFT p50 of 81.8 ms in one pass, 25.6 ms in the next, each interval a few ms wide): the
# interval is taken over passes.
LOAD_REPEATS = 3
ROUTER_POLICIES = ("random", "round_robin", "cache_aware", "kv_aware", "power_of_two", "consistent_hash",
                   "sticky_least_loaded")
# Not a router: the client sends document k's requests straight to replica k mod N. Every
# document stays where it was first sent and the documents are spread evenly: the placement a
# perfect cache-aware router reaches, against which a policy's hit rate and TTFT are read.
IDEAL = "ideal"
LOAD_NUM_PREFIXES = 8       # documents the requests share
# The intervals of a mean and of the throughput come from this many consecutive batches of a
# level's requests: requests sent close together share the server's state, batches nearly not.
LOAD_BATCHES = 10
METRICS_POLL_S = 0.5        # KV-cache usage and queue lengths are sampled from /metrics this often
# The untimed request after a condition that makes the server's counters catch up: this short
# (and salted), so that it barely moves the means of the server's histograms, which count it too
FLUSH_PROMPT_TOKENS = 16
# -----------------------------------------------------------------------------

PROG = "phase1_experiment.py"
PHASE = "phase1_server_api"
DETAILS_FLAG = "--enable-prompt-tokens-details"
CONNECTION = ("one keep-alive HTTP/1.1 connection, opened by an untimed request before the first timed one; "
              "TTFT runs from just before a request is sent to the first streamed chunk carrying a token")


# -----------------------------------------------------------------------------
# the server's /metrics (Prometheus text)

METRIC_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text):
    """{name: [(labels, value)]} from Prometheus text exposition."""
    metrics = {}
    for line in text.splitlines():
        m = METRIC_LINE.match(line)
        if m:
            metrics.setdefault(m.group(1), []).append((dict(LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return metrics


def metric_total(metrics, name):
    """Sum of a metric over its label sets (engines, models); None if the server has no such metric."""
    samples = metrics.get(name)
    return sum(value for _, value in samples) if samples else None


def server_counters(metrics):
    """The prefix-cache counters for the audit, plus the server's own TTFT histogram totals."""
    hits, queries = metric_total(metrics, "vllm:prefix_cache_hits_total"), metric_total(metrics, "vllm:prefix_cache_queries_total")
    if hits is None or queries is None:
        return None
    return {"prefix_cache_queries": int(queries), "prefix_cache_hits": int(hits), "source": "/metrics",
            "server_ttft": {"count": int(metric_total(metrics, "vllm:time_to_first_token_seconds_count") or 0),
                            "sum_s": metric_total(metrics, "vllm:time_to_first_token_seconds_sum") or 0.0}}


def cache_config(metrics):
    """The labels of vllm:cache_config_info (block_size, num_gpu_blocks, ...) of the first engine, or {}."""
    samples = metrics.get("vllm:cache_config_info")
    return samples[0][0] if samples else {}


def split_engines(url, metrics):
    """[(name, metrics)]: the server's parsed /metrics as one engine, or one part per engine where
    its samples are labelled by engine (--data-parallel-size), each with the unlabelled samples."""
    engines = sorted({labels.get("engine") for labels, _ in metrics.get("vllm:prefix_cache_queries_total", [])
                      if labels.get("engine") is not None})
    if len(engines) <= 1:
        return [(url, metrics)]
    return [(f"{url} engine {e}", {name: [(labels, value) for labels, value in samples if labels.get("engine") in (None, e)]
                                   for name, samples in metrics.items()}) for e in engines]


def engine_cache_config(labels, engines_of_server):
    """One engine's cache_config_info labels. A data-parallel server publishes under every
    engine's label the sum of its engines' num_gpu_blocks (vLLM 0.26 and 0.32 add them up as the
    engines report ready), so each engine is given its num_gpu_blocks_override where one was set
    (every engine has exactly that many), else an even share of the sum (the engines' mean)."""
    blocks = label_int(labels, "num_gpu_blocks")
    if engines_of_server <= 1 or blocks is None:
        return labels
    per_engine = label_int(labels, "num_gpu_blocks_override") or blocks // engines_of_server
    return {**labels, "num_gpu_blocks": str(per_engine)}


def label_int(labels, key):
    try:
        return int(labels.get(key))
    except (TypeError, ValueError):
        return None


# -----------------------------------------------------------------------------
# HTTP

class HttpClient:
    """Streams requests to one server over one keep-alive connection (aiohttp, as vLLM's own
    benchmark client). Every failure becomes an ExperimentError of one line."""

    def __init__(self, base_url, request_timeout_s):
        import aiohttp

        self.base_url = base_url.rstrip("/")
        self.loop = asyncio.new_event_loop()
        self.connections_opened = 0
        self.load_connections = 0
        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(self._count_connection)

        async def session():
            return aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1, keepalive_timeout=300),
                timeout=aiohttp.ClientTimeout(total=request_timeout_s), trace_configs=[trace])
        self.session = self.loop.run_until_complete(session())
        self.request_timeout_s = request_timeout_s

    async def _count_connection(self, session, context, params):
        self.connections_opened += 1

    async def _count_load_connection(self, session, context, params):
        self.load_connections += 1

    def load_session(self):
        """A session of as many connections as a load level opens (counted in load_connections).
        Made inside the loop, as aiohttp wants."""
        import aiohttp

        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(self._count_load_connection)
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=300),
                                     timeout=aiohttp.ClientTimeout(total=self.request_timeout_s), trace_configs=[trace])

    def close(self):
        """Close the connection and the loop; a request a signal broke off is cancelled first."""
        pending = [task for task in asyncio.all_tasks(self.loop) if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        if not self.session.closed:
            self.loop.run_until_complete(self.session.close())
        self.loop.close()

    def run(self, what, coroutine):
        """Run one request to completion; network failures end the run with one line."""
        import aiohttp
        try:
            return self.loop.run_until_complete(coroutine)
        except asyncio.TimeoutError:
            raise ExperimentError(f"{what} took longer than --request-timeout {self.request_timeout_s:g} s")
        except aiohttp.ClientConnectorError as e:
            raise ExperimentError(f"cannot reach {self.base_url} ({what}): {e.strerror or e}")
        except (aiohttp.ClientError, ConnectionError) as e:
            raise ExperimentError(f"{self.base_url} broke off {what}: {type(e).__name__}: {p2.first_line(e)}")
        except ValueError as e:                 # a body or a chunk that is not the JSON it should be
            raise ExperimentError(f"{self.base_url} answered {what} with something that is not JSON: {p2.first_line(e)}")

    async def _check(self, response, what):
        if response.status >= 400:
            body = await response.text()
            try:
                error = json.loads(body)
                message = error.get("error", error).get("message") if isinstance(error, dict) else body
            except (ValueError, AttributeError):
                message = body
            raise ExperimentError(f"{self.base_url} answered {what} with HTTP {response.status}: "
                                  f"{p2.first_line(message or response.reason)}")

    def ensure_connection(self):
        """An untimed GET /health on the kept connection; if that fails (the server closed the
        connection meanwhile), once more on a fresh one, whose failure is the run's one line."""
        try:
            self.loop.run_until_complete(self._health())
            return
        except Exception:
            pass
        self.run("GET /health", self._health())

    async def _health(self):
        async with self.session.get(self.base_url + "/health") as response:
            await response.read()

    async def get_async(self, path, session=None):
        """GET path's text (a path on this server, or a whole URL), on the kept connection or on session's."""
        async with (session or self.session).get(path if path.startswith("http") else self.base_url + path) as response:
            await self._check(response, f"GET {path}")
            return await response.text()

    def get_url(self, url):
        """The text of a GET to a whole URL (another server's /metrics)."""
        return self.run(f"GET {url}", self.get_async(url))

    def get(self, path, as_json=True):
        async def get():
            async with self.session.get(self.base_url + path) as response:
                await self._check(response, f"GET {path}")
                return await (response.json() if as_json else response.text())
        return self.run(f"GET {path}", get())

    def post(self, path, body):
        async def post():
            async with self.session.post(self.base_url + path, json=body) as response:
                await self._check(response, f"POST {path}")
                return await response.json()
        return self.run(f"POST {path}", post())

    def stream(self, body):
        """POST /v1/completions with stream on. Returns the arrival times (perf_counter s) of
        the chunks that carry a token, the last chunk's usage, the send time and the end time.
        Nothing but the request and reading its chunks is inside the timed region."""
        data = json.dumps(body).encode()        # serialised before the clock starts: the client's cost, not the server's
        return self.run("a completion request", self.stream_on(self.session, data))

    async def stream_on(self, session, data, base_url=None):
        """stream() of a serialised body on session's connections (to base_url, default this
        client's server); raises what stream() turns into one line."""
        token_times, usage = [], None
        sent = time.perf_counter()
        async with session.post((base_url or self.base_url) + "/v1/completions", data=data,
                                headers={"Content-Type": "application/json"}) as response:
            await self._check(response, "POST /v1/completions")
            async for line in response.content:
                arrived = time.perf_counter()
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("error"):          # vLLM reports a failure mid-stream with HTTP 200
                    error = chunk["error"]
                    raise ExperimentError(f"{self.base_url} failed a completion request mid-stream: "
                                          f"{p2.first_line(error.get('message', error) if isinstance(error, dict) else error)}")
                if chunk.get("choices"):
                    token_times.append(arrived)
                if chunk.get("usage"):
                    usage = chunk["usage"]
        return sent, token_times, usage, time.perf_counter()


def no_usage(server_url):
    """The error of a server whose stream ended without the usage chunk the audit reads."""
    return ExperimentError(f"{server_url} sent no usage in its last chunk: it does not honour "
                           f"stream_options.include_usage")


class ServerEngine:
    """A vLLM server as phase2_experiment.run_configs drives an engine: request, counters,
    kv_capacity, reset_prefix_cache. shared: other clients may use the server too."""
    phase = PHASE
    shared = True

    def __init__(self, client, model, audited=True, metrics_urls=None):
        self.client, self.model, self.audited = client, model, audited
        # the servers whose /metrics count this run's requests: the front itself, or the replicas behind a router
        self.metrics_urls = metrics_urls or [client.base_url]
        # the fleet policy ideal: document k's requests go straight to route[k % N]; None: all to the client's server
        self.route = None
        self._cache_configs = None
        self.connections_before = client.connections_opened
        self.last_end = 0.0

    def server_engines(self):
        """[[(name, parsed /metrics)] of each engine of a server] for every server behind the
        front: one engine per server, or one per engine labelled apart (--data-parallel-size)."""
        return [split_engines(url, parse_metrics(self.client.get_url(url + "/metrics"))) for url in self.metrics_urls]

    def replica_metrics(self):
        """[(name, parsed /metrics)] of every engine behind the front."""
        return [engine for engines in self.server_engines() for engine in engines]

    def request(self, prompt_ids, max_tokens, cache_salt=None):
        body = {"model": self.model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0.0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        if cache_salt is not None:
            body["cache_salt"] = cache_salt
        if time.perf_counter() - self.last_end > IDLE_RECONNECT_S:
            self.client.ensure_connection()
        opened = self.client.connections_opened
        sent, token_times, usage, ended = self.client.stream(body)
        self.last_end = ended
        if usage is None:
            raise no_usage(self.client.base_url)
        details = usage.get("prompt_tokens_details") or {}
        first = token_times[0] if token_times else ended
        gaps = np.diff(token_times) * 1e3
        output_tokens = usage.get("completion_tokens", len(token_times))
        return {
            "wall_ms": (ended - sent) * 1e3,
            "ttft_ms": (first - sent) * 1e3,
            "prompt_tokens": usage.get("prompt_tokens"),
            "cached_tokens": details.get("cached_tokens") if self.audited else None,
            "output_tokens": output_tokens,
            # a server reports no per-request engine timings
            "engine_ttft_ms": None,
            "prefill_ms": None,
            "decode_ms": (token_times[-1] - first) * 1e3 if token_times else None,
            "tpot_ms": (token_times[-1] - first) * 1e3 / (output_tokens - 1) if output_tokens > 1 and token_times else None,
            "itl_ms": gaps.tolist() if max_tokens > 1 else None,
            "new_connection": self.client.connections_opened > opened,
        }

    def reset_prefix_cache(self):
        """Nothing to reset: every run hits in a cache namespace of its own (run_configs gives a
        shared engine's warmup and hits a run salt). A deployment's cache is left alone."""
        return True

    def counters(self):
        if not self.audited:
            return None
        return p2.sum_counters([server_counters(metrics) for _, metrics in self.replica_metrics()])

    def kv_capacity(self):
        """(KV blocks of the smallest engine, block size), or None: what any one request can
        count on, wherever it lands (phase 2's check_cache_holds)."""
        layouts = self.replica_layouts().values()
        if not layouts or None in layouts:
            return None
        return min(layouts)

    def total_kv_capacity_tokens(self):
        """KV capacity in tokens of all engines together, or None if one does not say."""
        capacities = self.replica_capacities().values()
        return None if not capacities or None in capacities else sum(capacities)

    def replica_capacities(self):
        """{engine name: KV capacity in tokens (None if not reported)}."""
        return {name: layout[0] * layout[1] if layout else None for name, layout in self.replica_layouts().items()}

    def replica_layouts(self):
        """{engine name: (KV blocks, block size), or None if not reported}."""
        layouts = {}
        for name, labels in self.cache_configs().items():
            blocks, size = label_int(labels, "num_gpu_blocks"), label_int(labels, "block_size")
            layouts[name] = (blocks, size) if blocks and size else None
        return layouts

    def cache_configs(self):
        """{engine name: its vllm:cache_config_info labels}, read from each /metrics once: an
        engine's cache layout does not change while it runs, and after a failure it may not answer."""
        if self._cache_configs is None:
            self._cache_configs = {name: engine_cache_config(cache_config(metrics), len(engines))
                                   for engines in self.server_engines() for name, metrics in engines}
        return self._cache_configs


# -----------------------------------------------------------------------------
# the embedded server

def free_port(host):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(host, port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ExperimentError(f"--port {port}: {host}:{port} is already in use ({e.strerror}); choose another "
                                  f"port, or leave --port out to take a free one")


# vLLM's prefix on a process's log lines ("(EngineCore pid=7) ", "(VllmWorker rank=0 pid=9) ") and
# on logged errors ("ERROR 11-29 18:21:19 [core.py:1330] ")
LOG_PREFIX = re.compile(r"^(?:\([^)]*pid=\d+\) )?(?:ERROR [\d-]+ [\d:]+ \[[^\]]*\] )?")
# an exception's own line after that prefix: "ValueError: To serve at least one request ...", or a bare "AssertionError"
EXCEPTION_LINE = re.compile(LOG_PREFIX.pattern + r"((?:[\w.]+\.)?\w*(?:Error|Exception)(?:: .*)?)$")
# what a process prints when another one failed first: the cause is elsewhere in the log
GENERIC_FAILURE = re.compile(r"root cause|Engine core initialization failed", re.IGNORECASE)


def error_line(path, last=False):
    """Why a server failed, in one line of its log: the first exception it names (the last,
    for a server that died after running a while), passing over a "see the root cause above"
    from a process that only saw another one fail; else such a line; else the first line that
    names an error; else the last line."""
    try:
        with open(path, "rb") as f:
            lines = [line.decode(errors="replace").strip() for line in f.read().splitlines()]
    except OSError:
        return "no log"
    found = [(i, m.group(1)) for i, m in ((i, EXCEPTION_LINE.match(line)) for i, line in enumerate(lines)) if m]
    causes = [(i, text) for i, text in found if not GENERIC_FAILURE.search(text)]
    if causes:
        i, text = causes[-1] if last else causes[0]
        # pydantic says what is wrong on the next line: "  Value error, User-specified ... [type=...]"
        if re.search(r"\d+ validation errors? for ", text) and i + 1 < len(lines):
            return f"{text}: {LOG_PREFIX.sub('', lines[i + 1]).strip().split(' [type=')[0]}"
        return text
    if found:
        return found[0][1]
    for line in lines:
        if p2.ERROR_LINE.search(line.encode()):
            return line
    return lines[-1] if lines else "the log is empty"


class ManagedProcess:
    """A server this tool starts (a `vllm serve`, a router) as a child process in a session of
    its own, so that stop() ends it and every process it started. Its output goes to a log
    file. Subclasses set command, base_url, environment and what (its name in messages)."""
    what = "the server"
    log_prefix = "phase1-server-"

    def __init__(self):
        fd, self.log_path = tempfile.mkstemp(prefix=self.log_prefix, suffix=".log")
        os.close(fd)
        self.proc, self.start_s, self.t0 = None, None, None

    def launch(self):
        """Start the process; wait_ready() then waits for it."""
        self.t0 = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env=self.environment)
        print(f"starting {self.what} (pid {self.proc.pid}): {shlex.join(self.command)}\nlog: {self.log_path}",
              flush=True)

    def wait_ready(self, timeout_s):
        """Wait until /health answers 200; raise if the process exits or the time runs out."""
        import urllib.error
        import urllib.request

        while time.perf_counter() - self.t0 < timeout_s:
            if self.proc.poll() is not None:
                raise ExperimentError(f"{self.what} exited with code {self.proc.returncode} during its start: "
                                      f"{error_line(self.log_path)} (log: {self.log_path})")
            try:
                # straight to the server: a proxy from the environment must not sit in between
                with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                        self.base_url + "/health", timeout=2) as response:
                    if response.status == 200:
                        self.start_s = time.perf_counter() - self.t0
                        print(f"{self.what} ready in {self.start_s:.1f} s", flush=True)
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise ExperimentError(f"{self.what} was not ready within --server-start-timeout {timeout_s:g} s "
                              f"(log: {self.log_path})")

    def start(self, timeout_s):
        self.launch()
        self.wait_ready(timeout_s)

    def death(self, wait_s=2):
        """One line if the process has exited (or does within wait_s: a broken connection can be
        seen before the process is gone), else None."""
        if self.proc is None:
            return None
        try:
            self.proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            return None
        return (f"{self.what} (pid {self.proc.pid}) exited with code {self.proc.returncode} during the run: "
                f"{error_line(self.log_path, last=True)} (log: {self.log_path})")

    def stop(self):
        """SIGTERM to the process's whole group, SIGKILL to whatever is left after the grace."""
        if self.proc is None:
            return
        for sig, grace in ((signal.SIGTERM, SERVER_STOP_GRACE_S), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                self.proc.poll()
                try:
                    os.killpg(self.proc.pid, 0)         # anyone left in the group?
                except ProcessLookupError:
                    break
                time.sleep(0.2)
            else:
                continue
            break
        self.proc.wait()


class EmbeddedServer(ManagedProcess):
    """`vllm serve` as a child process (ManagedProcess): its engine core and workers stop with it."""
    what = "the vLLM server"
    log_prefix = "phase1-vllm-serve-"

    def __init__(self, model, host, port, vllm_flags, extra_env=None, name=None):
        super().__init__()
        self.model = model
        if name:
            self.what = f"the vLLM server {name}"
        self.command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                        "--host", host, "--port", str(port), DETAILS_FLAG, "--enable-prefix-caching", *vllm_flags]
        self.base_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
        self.environment = {**os.environ, "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": str(EMBEDDED_KEEP_ALIVE_S),
                            **(extra_env or {})}


class RouterProcess(ManagedProcess):
    """vllm-router (the Rust router from the package index) in front of the replicas. Its
    Prometheus listener is set to a port of its own."""
    what = "vllm-router"
    log_prefix = "phase1-vllm-router-"

    def __init__(self, worker_urls, policy, host, port, router_args):
        super().__init__()
        binary = shutil.which("vllm-router") or os.path.join(os.path.dirname(sys.executable), "vllm-router")
        if not os.path.exists(binary):
            raise ExperimentError("vllm-router is not installed: `pip install vllm-router`, or use --router dp")
        self.policy = policy
        self.what = f"vllm-router ({policy})"
        self.prometheus_port = free_port(host)
        self.command = [binary, "--host", host, "--port", str(port), "--worker-urls", *worker_urls, "--policy", policy,
                        "--prometheus-host", host, "--prometheus-port", str(self.prometheus_port), *router_args]
        self.base_url = f"http://{host}:{port}"
        self.environment = dict(os.environ)


def replica_devices(index, vllm_flags):
    """CUDA_VISIBLE_DEVICES of replica `index`: the next tensor x pipeline parallel GPUs."""
    sizes = {"--tensor-parallel-size": 1, "--pipeline-parallel-size": 1, "-tp": 1, "-pp": 1}
    for k, flag in enumerate(vllm_flags):
        name, _, value = flag.partition("=")
        if name in sizes:
            sizes[name] = int(value or vllm_flags[k + 1])
    per = max(sizes["--tensor-parallel-size"], sizes["-tp"]) * max(sizes["--pipeline-parallel-size"], sizes["-pp"])
    return ",".join(str(d) for d in range(index * per, (index + 1) * per))


class Fleet:
    """--replicas N: N `vllm serve` processes (one per GPU, or per group of GPUs), and in front
    of them vllm-router with one policy at a time; or, with --router dp, one `vllm serve
    --data-parallel-size N`. The policy `ideal` has no front: the client sends each document
    to a replica of its own. Every part is stopped at the end, on error and on Ctrl-C."""

    def __init__(self, model, host, replicas, vllm_flags, router, router_args):
        self.host, self.router_kind, self.router_args = host, router, router_args
        if router == "dp":
            self.replicas = [EmbeddedServer(model, host, free_port(host), [*vllm_flags, "--data-parallel-size",
                                                                           str(replicas)], name="(data parallel)")]
        else:
            ports = set()
            while len(ports) < replicas:
                ports.add(free_port(host))
            self.replicas = [EmbeddedServer(model, host, port, vllm_flags, name=f"replica {k}",
                                            extra_env={"CUDA_VISIBLE_DEVICES": replica_devices(k, vllm_flags)})
                             for k, port in enumerate(sorted(ports))]
        self.router = None
        self.model = model

    def start(self, timeout_s):
        """All replicas at once (each start waits on its own compile and load), then each ready."""
        for replica in self.replicas:
            replica.launch()
        for replica in self.replicas:
            replica.wait_ready(timeout_s)

    def start_router(self, policy, timeout_s):
        """The front for one policy (none for --router dp, or for the policy ideal); its base URL."""
        if self.router_kind == "dp" or policy == IDEAL:
            return self.replicas[0].base_url
        self.router = RouterProcess([r.base_url for r in self.replicas], policy, self.host, free_port(self.host),
                                    self.router_args)
        self.router.start(timeout_s)
        return self.router.base_url

    def stop_router(self):
        if self.router:
            self.router.stop()
            self.router = None

    @property
    def metrics_urls(self):
        return [r.base_url for r in self.replicas]

    def death(self):
        """One line for every part that has exited, or None."""
        dead = [line for part in ([self.router] if self.router else []) + self.replicas
                for line in [part.death(wait_s=0.5)] if line]
        return "; ".join(dead) or None

    def stop(self):
        try:
            self.stop_router()
        finally:
            for replica in self.replicas:
                replica.stop()


# -----------------------------------------------------------------------------
# checks before the run

def served_model(client, wanted):
    """The id to send as "model": wanted if the server serves it, else its only model."""
    cards = client.get("/v1/models").get("data", [])
    ids = [card["id"] for card in cards]
    if wanted is None and len(ids) == 1:
        return cards[0]
    for card in cards:
        if card["id"] == wanted:
            return card
    raise ExperimentError(f"{client.base_url} serves {ids}, not {wanted!r}: pass --model with one of them")


def load_tokenizer(name, client, model):
    """The local tokenizer, checked against the server's own /tokenize on a sample text."""
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as e:
        raise ExperimentError(f"the tokenizer {name!r} cannot be loaded here ({p2.first_line(e)}): pass --tokenizer "
                              f"with the served model's folder or hub id")
    sample = "Prefix caching reuses the KV blocks of a shared prompt prefix, 1234 times."
    try:
        served = client.post("/tokenize", {"model": model, "prompt": sample})["tokens"]
    except ExperimentError:                     # a server without /tokenize: nothing to compare
        return tokenizer
    if served != tokenizer.encode(sample):
        raise ExperimentError(f"the tokenizer {name!r} does not match the server's (/tokenize differs): pass "
                              f"--tokenizer with the served model's")
    return tokenizer


def check_fits(configs, max_model_len, prefix_tokens, max_output_tokens):
    """Every [A, B, Q] plus its output must fit the server's context: exit 2 before any request."""
    fixed = prefix_tokens + p2.QUERY_TOKENS + max_output_tokens
    for a, b in configs:
        if max_model_len and fixed + a + b > max_model_len:
            raise ExperimentError(f"A={a} B={b} needs {fixed + a + b} tokens with its output, but the server's "
                                  f"max_model_len is {max_model_len}: A + B must be at most {max_model_len - fixed}",
                                  EXIT_USAGE)


def wait_until_counted(engine, before, prompt_tokens, timeout_s=5.0):
    """The server records a request's counters as its outputs are handled, which may be just
    after the response ends: wait (a few seconds at most) until /metrics holds the probe, so
    that the run's counters do not start with it."""
    deadline = time.monotonic() + timeout_s
    while before is not None and time.monotonic() < deadline:
        now = engine.counters()
        if now and now["prefix_cache_queries"] - before["prefix_cache_queries"] >= prompt_tokens:
            return
        time.sleep(0.05)


def check_audit_possible(engine, tokenizer, allow_unaudited):
    """One untimed request: does the server report cached tokens? Without them nothing can be
    audited; that is refused unless allow_unaudited. Returns the reason a run is unaudited, or None."""
    before = engine.counters()
    probe = engine.request(p2.special_prefix_ids(tokenizer) + tokenizer.encode("cache probe", add_special_tokens=False),
                           1, f"probe-{os.getpid()}-{time.time()}")
    if probe["cached_tokens"] is not None:
        wait_until_counted(engine, before, probe["prompt_tokens"])
        return None
    reason = (f"the server does not report cached tokens (usage.prompt_tokens_details): it runs without "
              f"{DETAILS_FLAG}")
    if not allow_unaudited:
        raise ExperimentError(f"{reason}; restart it with that flag, or pass --allow-unaudited to measure it unaudited")
    engine.audited = False
    return reason + "; nothing says which requests really hit the cache"


# -----------------------------------------------------------------------------
# results

def add_phase1_stats(result, unaudited):
    """What phase 1 adds to phase 2's result: per condition the warmup TTFT (its discarded
    rounds' mean), time per output token and inter-token latency of the throughput requests,
    the server's own TTFT beside the client's, and the unaudited mark."""
    for c in p2.CONDITIONS:
        discarded = [t["ttft_ms"] for t in result[c]["discarded_trials"]]
        throughput = [t["throughput_request"] for t in result[c]["trials"]]
        tpot = [r["tpot_ms"] for r in throughput if r["tpot_ms"] is not None]
        itl = [gap for r in throughput for gap in (r["itl_ms"] or [])]
        result[c]["stats"].update({
            "warmup_time_mean": float(np.mean(discarded)) if discarded else None,
            "tpot_mean": float(np.mean(tpot)) if tpot else None,
            "itl_median": float(np.median(itl)) if itl else None,
            "itl_p99": float(np.percentile(itl, 99)) if itl else None,
        })
    counters = result["cache_audit"]["engine_counters"]
    if counters:
        ttft = counters["server_ttft"]
        counters["server_ttft"]["mean_ms"] = ttft["sum_s"] / ttft["count"] * 1e3 if ttft["count"] else None
    if unaudited:
        result["cache_audit"].update({"ok": None, "unaudited": unaudited, "problems": []})


def installed_version(package):
    """A package's installed version, without importing it; None if it is not installed."""
    import importlib.metadata
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def server_environment(client, card, server, vllm_flags, engine):
    """What the JSON records of the server: its vLLM version, cache layout, how it was reached.
    Both are read from the first server behind the front (a router has no /metrics)."""
    labels = next(iter(engine.cache_configs().values()))
    block = label_int(labels, "block_size")
    try:
        version = json.loads(client.get_url(engine.metrics_urls[0] + "/version")).get("version")
    except (ExperimentError, ValueError, AttributeError):
        version = None
    return {
        "vllm_version": version,
        # the embedded server runs in this Python; a server reached by --base-url may not
        "torch_version": installed_version("torch") if server else None,
        "device": p2.device_name() if server else "unknown (a server reached by --base-url)",
        "block_size": block,
        # prefix-cache hits land on multiples of this (vLLM >= 0.30 can set it below block_size)
        "cache_block_size": label_int(labels, "prefix_match_unit") or block,
        "num_gpu_blocks": label_int(labels, "num_gpu_blocks"),
        "max_model_len": card.get("max_model_len"),
        "served_model": card["id"],
        "server": {"base_url": client.base_url, "embedded": server is not None,
                   "command": shlex.join(server.command) if server else None,
                   "start_s": server.start_s if server else None, "log": server.log_path if server else None,
                   "vllm_flags": vllm_flags,
                   "keep_alive_s": EMBEDDED_KEEP_ALIVE_S if server else None},
        "connection": CONNECTION,
        "python_version": sys.version.split()[0],
        "env_vars": p2.engine_environment(os.environ),
    }


# -----------------------------------------------------------------------------
# under load (--concurrency, --request-rate, a list of --num-prefixes)

def zipf_weights(num_prefixes, skew):
    """How often each document is drawn: uniform at skew 0, else proportional to 1/rank**skew."""
    weights = 1.0 / np.arange(1, num_prefixes + 1) ** skew
    return weights / weights.sum()


def quantile_ci95(values, q):
    """Distribution-free 95% interval of the q-quantile: the order statistics whose ranks a
    binomial(n, q) count falls between with at least 95% probability. A bound the sample is too
    small for is None (the 99th percentile of 50 requests has no upper bound)."""
    from scipy import stats
    x = np.sort(np.asarray(values, dtype=float))
    n = len(x)
    if n == 0:
        return [None, None]
    low_rank = int(stats.binom.ppf(0.025, n, q))           # 1-based ranks of the bounds
    high_rank = int(stats.binom.ppf(0.975, n, q)) + 1
    return [float(x[low_rank - 1]) if low_rank >= 1 else None,
            float(x[high_rank - 1]) if high_rank <= n else None]


def batch_means_ci95(values, num_batches=LOAD_BATCHES):
    """95% t-interval of a mean from the means of consecutive batches: requests sent close in
    time share the server's state, so single requests are not independent, batches nearly are."""
    values = np.asarray(values, dtype=float)
    k = min(num_batches, len(values) // 2)
    if k < 2:
        return [None, None]
    return p2.mean_ci95([batch.mean() for batch in np.array_split(values, k)])


def throughput_ci95(start_times_s, end_times_s, num_batches=LOAD_BATCHES):
    """95% t-interval of completions per second, over equal time slices of the span from the
    first send to the last completion: the span the throughput itself is taken over, so the
    slices' mean rate is that throughput."""
    ends = np.asarray(end_times_s, dtype=float)
    first = float(np.min(start_times_s)) if len(start_times_s) else 0.0
    k = min(num_batches, len(ends) // 2)
    if k < 2 or ends.max() <= first:
        return [None, None]
    edges = np.linspace(first, ends.max(), k + 1)
    counts = np.histogram(ends, bins=edges)[0]
    return p2.mean_ci95(counts / np.diff(edges))


def cache_state(cached_tokens, full_tokens):
    """What a request found: all of its document's full blocks, some, or none."""
    if not cached_tokens:
        return "miss"
    return "hit" if cached_tokens >= full_tokens else "partial"


def load_problems(requests, block):
    """Requests that found cached tokens they cannot have: a salted cold one any, a cached one
    more than its document's full blocks, or a count that is not whole blocks."""
    problems = []
    for r in requests:
        if r["error"] is not None or r["cached_tokens"] is None:
            continue
        allowed = 0 if r["condition"] == "cold" else r["document_cached_tokens"]
        if r["cached_tokens"] > allowed or r["cached_tokens"] % block:
            problems.append(f"{r['condition']} request {r['index']} (document {r['document']}): "
                            f"cached_tokens={r['cached_tokens']}, at most {allowed} in whole blocks of {block}")
    return problems


def condition_stats(requests, slo_ttft_ms):
    """Figures of one condition at one load level, each with its interval or spread."""
    done = [r for r in requests if r["error"] is None]
    ttft = [r["ttft_ms"] for r in sorted(done, key=lambda r: r["start_s"])]
    tpot = [r["tpot_ms"] for r in done if r["tpot_ms"] is not None]
    span_s = (max(r["end_s"] for r in done) - min(r["start_s"] for r in done)) if done else 0.0
    stats = {"num_requests": len(requests), "failed": len(requests) - len(done), "duration_s": span_s}
    if not done:
        return stats
    for name, values in (("ttft_ms", ttft), ("tpot_ms", tpot)):
        if values:
            stats[name] = {"mean": float(np.mean(values)), "mean_ci95": batch_means_ci95(values),
                           **{f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)},
                           **{f"p{q}_ci95": quantile_ci95(values, q / 100) for q in (50, 90, 99)}}
    output_tokens = sum(r["output_tokens"] for r in done)
    stats.update({
        "request_throughput": len(done) / span_s if span_s else None,
        "request_throughput_ci95": throughput_ci95([r["start_s"] for r in done], [r["end_s"] for r in done]),
        "output_throughput_tok_s": output_tokens / span_s if span_s else None,
        "goodput_req_s": (sum(t <= slo_ttft_ms for t in ttft) / span_s if span_s else None) if slo_ttft_ms else None,
    })
    audited = [r for r in done if r["cached_tokens"] is not None]
    if audited:
        full = sum(r["document_cached_tokens"] for r in audited)
        stats["hit_rate"] = {
            "requests": sum(r["cache_state"] == "hit" for r in audited) / len(audited),
            "tokens": sum(r["cached_tokens"] for r in audited) / full if full else None}
        stats["by_cache_state"] = {}
        for state in ("hit", "partial", "miss"):
            found = [r["ttft_ms"] for r in audited if r["cache_state"] == state]
            if found:
                stats["by_cache_state"][state] = {
                    "requests": len(found), "ttft_ms_mean": float(np.mean(found)),
                    "ttft_ms_p50": float(np.percentile(found, 50)), "ttft_ms_p99": float(np.percentile(found, 99))}
    return stats


class LoadWorkload:
    """P documents of A tokens. A request is [document, Q] with a fresh Q, its document drawn
    uniformly (or by Zipf, skew > 0); cached requests share their level's cache namespace, a
    cold request has a salt of its own."""

    def __init__(self, tokenizer, size_a, num_prefixes, skew, block, seed, run_id):
        self.tokenizer, self.block, self.run_id, self.skew = tokenizer, block, run_id, skew
        special = p2.special_prefix_ids(tokenizer)
        self.documents = [special + tokenizer.encode(p2.generate_context(size_a, f"Document {k} of {size_a}", tokenizer),
                                                     add_special_tokens=False) for k in range(num_prefixes)]
        self.full_tokens = len(self.documents[0]) // block * block      # what a hit finds: the document's full blocks
        shared_len = block - len(self.documents[0]) % block
        self.queries = p2.query_stream(tokenizer, shared_len, random.Random(f"load:{seed}:{size_a}"))
        self.rng = np.random.default_rng(seed)

    def draws(self, num_prefixes, count):
        return self.rng.choice(num_prefixes, size=count, p=zipf_weights(num_prefixes, self.skew)).tolist()

    def requests(self, documents, condition, namespace):
        """(token ids, cache salt, document) of every request, built before the clock starts."""
        made = []
        for k, doc in enumerate(documents):
            q = self.tokenizer.encode(next(self.queries), add_special_tokens=False)
            salt = namespace if condition == "cached" else f"{namespace}-cold-{k}"
            made.append((self.documents[doc] + q, salt, doc))
        return made


def requests_per_level(level, opts):
    """--num-requests if given, else LOAD_NUM_REQUESTS, or LOAD_REQUESTS_PER_CLIENT per client."""
    if opts.num_requests:
        return opts.num_requests
    return max(LOAD_NUM_REQUESTS, LOAD_REQUESTS_PER_CLIENT * (level["concurrency"] or 0))


def level_name(level):
    if level["concurrency"] is not None:
        return f"concurrency {level['concurrency']}"
    return f"{level['request_rate']:g} req/s"


async def send_all(client, session, model, prompts, level, max_tokens, seed, route=None):
    """Every prompt of one condition at one load level: a closed loop of `concurrency` clients
    sending back to back, or Poisson arrivals at `request_rate`. A failed request is recorded
    with its error, not raised, and no request is sent after it (a server that stopped
    answering must not hold the level for num_requests x --request-timeout). Returns (request
    records, None for those never sent; the level's start in perf_counter s). route: document
    k's requests go to route[k % len(route)] instead of the client's server."""
    # every body is serialised before the clock starts, as stream() does
    bodies = [json.dumps({"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0.0,
                          "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
                          "cache_salt": salt}).encode() for ids, salt, _ in prompts]
    urls = [route[doc % len(route)] if route else None for _, _, doc in prompts]
    records = [None] * len(prompts)
    failed = asyncio.Event()

    async def one(k):
        started = time.perf_counter()
        try:
            sent, token_times, usage, ended = await client.stream_on(session, bodies[k], urls[k])
            records[k] = (sent, token_times, usage, ended, None)
        except Exception as e:          # one request's failure is a fact of the level, not the end of the run
            records[k] = (started, [], None, time.perf_counter(), f"{type(e).__name__}: {p2.first_line(e)}")
            failed.set()

    t0 = time.perf_counter()
    if level["concurrency"] is not None:
        queue = iter(range(len(prompts)))

        async def client_loop():
            for k in queue:
                if failed.is_set():
                    break
                await one(k)
        await asyncio.gather(*[client_loop() for _ in range(level["concurrency"])])
    else:
        arrivals = np.cumsum(np.random.default_rng(seed).exponential(1.0 / level["request_rate"], len(prompts)))
        tasks = []
        for k, at in enumerate(arrivals):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if failed.is_set():
                break
            tasks.append(asyncio.create_task(one(k)))
        await asyncio.gather(*tasks)
    return records, t0


def request_record(k, prompt, record, t0, condition, full_tokens, audited):
    ids, salt, doc = prompt
    if record is None:
        record = (t0, [], None, t0, "not sent: an earlier request of the level failed")
    sent, token_times, usage, ended, error = record
    usage = usage or {}
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens") if audited and error is None else None
    output_tokens = usage.get("completion_tokens", len(token_times))
    first = token_times[0] if token_times else None
    if error is None and first is None:
        error = "the stream ended without a token"
    if error is None and not usage:
        error = "no usage in the last chunk (stream_options.include_usage)"
    return {
        "index": k, "condition": condition, "document": doc, "start_s": sent - t0, "end_s": ended - t0,
        "ttft_ms": (first - sent) * 1e3 if first is not None else None,
        "e2e_ms": (ended - sent) * 1e3,
        "tpot_ms": (token_times[-1] - first) * 1e3 / (output_tokens - 1) if first is not None and output_tokens > 1 else None,
        "prompt_tokens": usage.get("prompt_tokens", len(ids)), "output_tokens": output_tokens if error is None else 0,
        "cached_tokens": cached, "document_cached_tokens": full_tokens,
        "cache_state": cache_state(cached, full_tokens) if cached is not None else None,
        "error": error,
    }


LOAD_METRICS = {"kv_cache_usage": "vllm:kv_cache_usage_perc", "running": "vllm:num_requests_running",
                "waiting": "vllm:num_requests_waiting"}
LOAD_COUNTERS = {"requests": "vllm:request_success_total", "prompt_tokens": "vllm:prompt_tokens_total", "generation_tokens": "vllm:generation_tokens_total",
                 "prefix_cache_queries": "vllm:prefix_cache_queries_total",
                 "prefix_cache_hits": "vllm:prefix_cache_hits_total", "preemptions": "vllm:num_preemptions_total",
                 # the server's own histograms of where a request's TTFT goes: its sum (s) and count
                 **{f"{part}_{key}": f"vllm:{name}_seconds_{end}" for part, name in
                    (("ttft", "time_to_first_token"), ("queue_time", "request_queue_time"),
                     ("prefill_time", "request_prefill_time")) for key, end in (("sum_s", "sum"), ("count", "count"))}}
# (key, histogram) of server_times(): the server's TTFT counts from when its frontend took the
# request in to its first token; the engine's queue time from then until first scheduled, its
# prefill time from then to the first token (engine-core clock, apart from the frontend's)
SERVER_TIMES = (("server_ttft_mean_ms", "ttft"), ("queue_time_mean_ms", "queue_time"),
                ("prefill_time_mean_ms", "prefill_time"))


# prometheus_client's process collector on a server's /metrics: the CPU time of the process that
# answers it, the API server (HTTP, request parsing, detokenizing, streaming); the engine core
# runs in a process of its own. Absent where several API server processes share /metrics.
API_SERVER_CPU = "process_cpu_seconds_total"


async def api_server_cpu_s(client, urls, session):
    """{url: CPU seconds each server's API server process has used; None where it does not
    report them or did not answer}."""
    texts = await asyncio.gather(*[client.get_async(url + "/metrics", session) for url in urls], return_exceptions=True)
    return {url: None if isinstance(text, BaseException) else metric_total(parse_metrics(text), API_SERVER_CPU)
            for url, text in zip(urls, texts)}


def busy_shares(cpu_before, cpu_after, wall_s):
    """{url: CPU seconds used over wall_s, as a share of one core}; None where either reading is
    missing or the counter went back (a restarted server, or another process answering)."""
    shares = {}
    for url, after in cpu_after.items():
        before = cpu_before.get(url)
        grown = None if before is None or after is None or wall_s <= 0 else after - before
        shares[url] = grown / wall_s if grown is not None and grown >= 0 else None
    return shares


def server_times(counters):
    """Mean server TTFT, engine queue time and prefill time (ms) from the growth of the server's
    histograms over a condition, or None each where not reported."""
    times = {}
    for key, part in SERVER_TIMES:
        total, count = counters.get(f"{part}_sum_s"), counters.get(f"{part}_count")
        times[key] = total / count * 1e3 if total is not None and count else None
    return times


def load_counters(metrics):
    return {key: metric_total(metrics, name) for key, name in LOAD_COUNTERS.items()}


def replica_load_counters(engine):
    """{engine name: load_counters} of every engine behind the front."""
    return {name: load_counters(metrics) for name, metrics in engine.replica_metrics()}


def total_counters(per_replica):
    """The replicas' counters added up (None where any replica lacks one)."""
    values = list(per_replica.values())
    return {key: sum(v[key] for v in values) if all(v[key] is not None for v in values) else None
            for key in LOAD_COUNTERS}


async def sample_gauges(client, urls, samples, stop):
    """KV-cache usage (the fullest engine's) and queue lengths (all engines') from every
    server's /metrics, every METRICS_POLL_S until stop is set."""
    while not stop.is_set():
        try:
            found = [parse_metrics(await client.get_async(url + "/metrics")) for url in urls]
            usage = [value for metrics in found for _, value in metrics.get(LOAD_METRICS["kv_cache_usage"], [])]
            samples.append({"kv_cache_usage": max(usage) if usage else None,
                            **{key: sum(metric_total(metrics, LOAD_METRICS[key]) or 0 for metrics in found)
                               for key in ("running", "waiting")}})
        except Exception:           # a missed sample is no reason to stop the level
            pass
        try:
            await asyncio.wait_for(stop.wait(), METRICS_POLL_S)
        except asyncio.TimeoutError:
            pass


def gauge_summary(samples):
    summary = {"samples": len(samples)}
    for key in LOAD_METRICS:
        values = [s[key] for s in samples if s[key] is not None]
        summary[f"{key}_max"] = max(values) if values else None
        summary[f"{key}_mean"] = float(np.mean(values)) if values else None
    return summary


def warm_documents(engine, workload, docs, namespace, concurrency):
    """Each document sent once, untimed, in the cached condition's namespace: one at a time, or
    `concurrency` at a time as first requests that arrive together would (behind a router, where
    a document lands can depend on which others are in flight). Returns each one's cached
    tokens (None when unaudited); a warmup that fails ends the run."""
    if concurrency == 1 and not engine.route:
        return [engine.request(workload.documents[doc], p2.WARMUP_TOKENS, namespace)["cached_tokens"] for doc in docs]
    prompts = [(workload.documents[doc], namespace, doc) for doc in docs]

    async def send():
        session = engine.client.load_session()
        try:
            return await send_all(engine.client, session, engine.model, prompts,
                                  {"concurrency": concurrency, "request_rate": None}, p2.WARMUP_TOKENS, 0, engine.route)
        finally:
            await session.close()
    records, _ = engine.client.run("the documents' warmup", send())
    found = []
    for doc, record in zip(docs, records):
        if record is None or record[4]:
            error = record[4].removeprefix("ExperimentError: ") if record else "not sent"
            raise ExperimentError(f"the warmup of document {doc} failed: {error}")
        if record[2] is None:
            raise no_usage(engine.route[doc % len(engine.route)] if engine.route else engine.client.base_url)
        details = record[2].get("prompt_tokens_details") or {}
        found.append(details.get("cached_tokens") if engine.audited else None)
    return found


def run_condition(engine, workload, documents, condition, namespace, level, opts, seed):
    """One condition at one load level: the cached one warms its documents first (untimed,
    --warmup-concurrency at a time). Returns the condition's result with every request's record."""
    client = engine.client
    prompts = workload.requests(documents, condition, namespace)
    docs = sorted(set(documents))
    warms = warm_documents(engine, workload, docs, namespace, opts.warmup_concurrency) if condition == "cached" else []
    before = replica_load_counters(engine)
    samples, records = [], None

    async def measure():
        session = client.load_session()
        try:
            # the level's connections are opened before its first timed request (to each server it sends to)
            await asyncio.gather(*[client.get_async(url + "/health", session) for url in engine.route or [client.base_url]
                                   for _ in range(level["concurrency"] or 1)])
            # read before the connections are counted: a fleet's replicas get connections of their own
            cpu_before = await api_server_cpu_s(client, engine.metrics_urls, session)
            opened = client.load_connections
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample_gauges(client, engine.metrics_urls, samples, stop))
            # how busy the client and the servers' API processes were while the requests ran: near a
            # whole core, a request waits for that process, and the wait is in its TTFT
            wall_s, client_cpu_s = time.perf_counter(), time.process_time()
            try:
                result = await send_all(client, session, engine.model, prompts, level, opts.max_output_tokens, seed,
                                        engine.route)
            finally:
                wall_s, client_cpu_s = time.perf_counter() - wall_s, time.process_time() - client_cpu_s
                stop.set()
                await sampler
            opened_while_timed = client.load_connections - opened
            busy = busy_shares(cpu_before, await api_server_cpu_s(client, engine.metrics_urls, session), wall_s)
            return result, opened_while_timed, client_cpu_s / wall_s if wall_s > 0 else None, busy
        finally:
            await session.close()
    (records, t0), connections_during, client_cpu_busy, busy = client.run("a load level", measure())
    requests = [request_record(k, prompt, record, t0, condition, workload.full_tokens, engine.audited)
                for k, (prompt, record) in enumerate(zip(prompts, records))]
    problems = load_problems(requests, workload.block) if engine.audited else []
    problems += [f"warmup of document {doc}: cached_tokens={cached}, expected 0"
                 for doc, cached in zip(docs, warms) if engine.audited and cached != 0]
    # the counters' cross-check, once every request has ended well (a failed one may or may not have been counted)
    counters, replicas, server_error = None, None, None
    if not any(r["error"] for r in requests):
        try:
            # a short flush: it is counted with the condition's requests in the server's histograms
            flush = p2.flush_engine_stats(engine.request, workload.documents[0][:FLUSH_PROMPT_TOKENS])
            sent = requests + [flush]           # the warmups ran before the counters were read
            after = wait_for_counters(engine, before, sum(r["prompt_tokens"] for r in sent))
        except ExperimentError as e:        # the requests are measured; the server went away after them
            server_error = str(e)
        else:
            replicas = {name: counter_growth_or_none(before[name], after[name]) for name in after if name in before}
            counters = total_counters(replicas)
            counters["flush_prompt_tokens"] = flush["prompt_tokens"]
            # the server's histograms count the flush too: its client TTFT bounds what it added
            counters["flush_ttft_ms"] = flush["ttft_ms"]
            if engine.audited:
                problems += counter_problems(counters, sent)
                if flush["cached_tokens"] != 0:
                    problems.append(f"the counters' flush (salted): cached_tokens={flush['cached_tokens']}, expected 0")
    return {"server_error": server_error, **condition_stats(requests, opts.slo_ttft_ms),
            "client_cpu_busy": client_cpu_busy,
            "server": {**(counters or {}), **gauge_summary(samples), "replicas": replicas,
                       "api_server_cpu_busy": busy,
                       "api_server_cpu_busy_max": max((b for b in busy.values() if b is not None), default=None),
                       **server_times(counters or {}),
                       # the condition's own requests: the untimed flush (nothing cached) left out
                       "prefill_tokens_computed": (counters["prompt_tokens"] - counters["flush_prompt_tokens"]
                                                   - counters["prefix_cache_hits"])
                       if counters and counters["prompt_tokens"] is not None and counters["prefix_cache_hits"] is not None else None},
            "connections_opened_while_timed": connections_during,
            "problems": problems, "requests": requests}


def counter_problems(counters, sent):
    """/metrics' prefix-cache hits must have grown by the cached tokens the requests report (and
    by more only where another client's queries show in the counters too). Fills in the sums."""
    if counters["prefix_cache_hits"] is None:
        return []
    own = sum(r["cached_tokens"] or 0 for r in sent)
    counters["sum_cached_tokens"], counters["sum_prompt_tokens"] = own, sum(r["prompt_tokens"] for r in sent)
    counters["other_clients"] = (counters["prefix_cache_queries"] or 0) > counters["sum_prompt_tokens"]
    if counters["prefix_cache_hits"] < own or (counters["prefix_cache_hits"] != own and not counters["other_clients"]):
        return [f"/metrics vllm:prefix_cache_hits_total grew by {counters['prefix_cache_hits']:.0f}, but the "
                f"requests report {own} cached tokens"]
    return []


def wait_for_counters(engine, before, prompt_tokens, timeout_s=5.0):
    """Every engine's load counters once, together, they count every prompt token of the
    condition (/metrics may lag the responses a little)."""
    deadline = time.monotonic() + timeout_s
    while True:
        after = replica_load_counters(engine)
        grown = [after[name]["prompt_tokens"] - before[name]["prompt_tokens"] for name in after
                 if name in before and after[name]["prompt_tokens"] is not None
                 and before[name]["prompt_tokens"] is not None]
        if not grown or sum(grown) >= prompt_tokens or time.monotonic() > deadline:
            return after
        time.sleep(0.05)


def counter_growth_or_none(before, after):
    return {key: (after[key] - before[key]) if after[key] is not None and before[key] is not None else None
            for key in after}


def load_levels(opts):
    """The sweep's levels: one per concurrency or rate at P documents, or (a working-set sweep)
    one per P at one load."""
    if opts.concurrency:
        loads = [{"concurrency": c, "request_rate": None} for c in opts.concurrency]
    elif opts.request_rate:
        loads = [{"concurrency": None, "request_rate": r} for r in opts.request_rate]
    else:
        loads = [{"concurrency": 1, "request_rate": None}]
    if len(opts.num_prefixes) > 1:
        return [{**loads[0], "num_prefixes": p} for p in opts.num_prefixes]
    return [{**load, "num_prefixes": opts.num_prefixes[0]} for load in loads]


def sweep_schedule(num_levels, repeats):
    """(repeat, level index) in the order they run: every level once per pass, the passes
    alternating up and down, so that a drift over the sweep lands on every level alike."""
    return [(rep, i) for rep in range(repeats)
            for i in (range(num_levels) if rep % 2 == 0 else reversed(range(num_levels)))]


def run_level_once(engine, workload, level, i, rep, opts, namespace, working_set):
    """Both conditions (a working-set sweep's later levels: cached alone) at one level, once.
    Returns (the pass's record, the one line that ends the sweep or None)."""
    documents = workload.draws(level["num_prefixes"], level["num_requests"])
    # cached and cold alternate in which goes first, so that neither always follows the other
    order = ["cached"] if working_set and i else (["cached", "cold"] if (i + rep) % 2 == 0 else ["cold", "cached"])
    run = {"repeat": rep, "order": order}
    for condition in order:
        try:
            run[condition] = run_condition(engine, workload, documents, condition, namespace, level, opts,
                                           opts.seed + 1000 * rep + i)
        except ExperimentError as e:       # the server stopped answering between requests
            return run, f"{level_name(level)}, {condition}: {e}"
        failed = [r for r in run[condition]["requests"] if r["error"] and not r["error"].startswith("not sent")]
        unsent = sum(1 for r in run[condition]["requests"] if r["error"] and r["error"].startswith("not sent"))
        if run[condition]["server_error"]:
            return run, f"{level_name(level)}, {condition}, after its requests: {run[condition]['server_error']}"
        if failed:
            return run, (f"{len(failed)} of {len(run[condition]['requests'])} {condition} requests failed at "
                         f"{level_name(level)}{f' ({unsent} not sent after)' if unsent else ''} "
                         f"(first: {failed[0]['error']})")
    return run, None


SUMMARY_FIGURES = (("ttft_ms", "mean"), ("ttft_ms", "p50"), ("ttft_ms", "p90"), ("ttft_ms", "p99"),
                   ("tpot_ms", "mean"), ("tpot_ms", "p50"), ("tpot_ms", "p90"), ("tpot_ms", "p99"),
                   (None, "request_throughput"), (None, "output_throughput_tok_s"), (None, "goodput_req_s"),
                   ("hit_rate", "requests"), ("hit_rate", "tokens"), (None, "client_cpu_busy"))


def summarize_runs(runs):
    """One condition's figures over its passes. With two or more, each figure is the mean of
    the passes' values and its interval a t-interval over them (each pass one value, as
    pyperf takes processes): it holds what differs from one pass to the next, such as the
    state a closed loop settles into, which one pass's intervals cannot see. With one pass,
    that pass's own intervals (order statistics, batch means)."""
    if len(runs) == 1:
        one = {key: value for key, value in runs[0].items() if key not in ("requests", "problems", "server_error")}
        return {**one, "interval": "one pass: percentiles by order statistics, means and throughput by batch means"}
    summary = {"num_requests": sum(r["num_requests"] for r in runs), "failed": sum(r["failed"] for r in runs),
               "passes": len(runs),
               "interval": f"over {len(runs)} passes: the passes' mean and a t-interval over their values"}
    for group, key in SUMMARY_FIGURES:
        values = [(r.get(group) or {}).get(key) if group else r.get(key) for r in runs]
        if any(v is None for v in values):
            continue
        holder = summary.setdefault(group, {}) if group else summary
        holder.update({key: float(np.mean(values)), f"{key}_ci95": p2.mean_ci95(values), f"{key}_per_pass": values})
    servers = [r.get("server") or {} for r in runs]
    histograms = [key for key in LOAD_COUNTERS if key.endswith(("_sum_s", "_count"))]
    totals = {key: sum(s[key] for s in servers) if all(s.get(key) is not None for s in servers) else None
              for key in ("requests", "prefix_cache_hits", "prefix_cache_queries", "prompt_tokens",
                          "prefill_tokens_computed", "preemptions", *histograms)}
    summary["server"] = {key: value for key, value in totals.items() if key not in histograms}
    # the passes' requests together: the histograms' sums over their counts; beside each, the
    # passes' own means, its spread
    summary["server"].update(server_times(totals))
    summary["server"].update({f"{key}_per_pass": [s.get(key) for s in servers] for key, _ in SERVER_TIMES})
    names = sorted({name for s in servers for name in (s.get("replicas") or {})})
    summary["server"]["replicas"] = {name: {key: sum((s.get("replicas") or {}).get(name, {}).get(key) or 0 for s in servers)
                                            for key in LOAD_COUNTERS} for name in names}
    busy = [s.get("api_server_cpu_busy_max") for s in servers]
    summary["server"]["api_server_cpu_busy_max"] = None if None in busy else float(np.mean(busy))
    summary["server"]["api_server_cpu_busy_max_per_pass"] = busy
    summary["server"]["kv_cache_usage_max"] = max((s.get("kv_cache_usage_max") for s in servers
                                                   if s.get("kv_cache_usage_max") is not None), default=None)
    return summary


def run_load(engine, tokenizer, opts, env, unaudited):
    """Every level of the sweep, --repeats times, cached against cold at the same load (a
    working-set sweep measures cold at its first level only: nothing is cached there, so P
    does not matter). Each pass of a level warms its documents in a cache namespace of its own.
    Ends early, keeping what was measured, when requests fail. Returns the result dict."""
    block = env["cache_block_size"]
    # read now: after a failure the servers may not answer, and what was measured must still be written
    capacity_tokens = engine.total_kv_capacity_tokens()
    capacity_per_engine = engine.replica_capacities()
    run_id = uuid.uuid4().hex[:12]
    working_set = len(opts.num_prefixes) > 1
    workload = LoadWorkload(tokenizer, opts.size_a, max(opts.num_prefixes), opts.prefix_skew, block, opts.seed, run_id)
    levels = [{**level, "working_set_tokens": level["num_prefixes"] * workload.full_tokens,
               "num_requests": requests_per_level(level, opts), "runs": []} for level in load_levels(opts)]
    failure = None
    schedule = sweep_schedule(len(levels), opts.repeats)
    t0 = time.perf_counter()
    for step, (rep, i) in enumerate(schedule):
        level = levels[i]
        elapsed_s = time.perf_counter() - t0
        eta = f", about {elapsed_s / step * (len(schedule) - step) / 60:.1f} min left" if step else ""
        print(f"\n--- {step + 1} of {len(schedule)}: {level_name(level)}, pass {rep + 1} of {opts.repeats}: "
              f"{level['num_prefixes']} document(s) of {opts.size_a} tokens, {level['num_requests']} requests per "
              f"condition ({elapsed_s:.0f} s so far{eta}) ---", flush=True)
        run, failure = run_level_once(engine, workload, level, i, rep, opts, f"load-{run_id}-{i}-{rep}", working_set)
        if any(c in run for c in ("cached", "cold")):
            level["runs"].append(run)
            print_level(level, run, capacity_tokens, len(capacity_per_engine))
        if failure:
            break
    levels = [level for level in levels if level["runs"]]
    for level in levels:
        for condition in ("cached", "cold"):
            # a pass a failure cut short is kept in runs but left out of the summary
            done = [run[condition] for run in level["runs"] if condition in run and not run[condition]["failed"]]
            if done:
                level[condition] = summarize_runs(done)
    requests = [r for level in levels for run in level["runs"] for c in ("cached", "cold") if c in run
                for r in run[c]["requests"]]
    problems = [p for level in levels for run in level["runs"] for c in ("cached", "cold") if c in run
                for p in run[c]["problems"]]
    return {
        "phase": PHASE,
        "experiment": "working_set" if working_set else "load",
        "model": opts.model,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {"document_tokens": opts.size_a, "document_prompt_tokens": len(workload.documents[0]),
                   "document_cached_tokens": workload.full_tokens, "query_tokens": p2.QUERY_TOKENS,
                   "max_output_tokens": opts.max_output_tokens, "num_requests": opts.num_requests,
                   "repeats": opts.repeats, "num_prefixes": opts.num_prefixes, "prefix_skew": opts.prefix_skew,
                   "warmup_concurrency": opts.warmup_concurrency,
                   "load": "request_rate" if opts.request_rate else "concurrency",
                   "slo_ttft_ms": opts.slo_ttft_ms, "seed": opts.seed},
        "kv_capacity_tokens": capacity_tokens,
        "kv_capacity_tokens_per_engine": capacity_per_engine,
        "levels": levels,
        "complete": failure is None,
        "failure": failure,
        "cache_audit": {"ok": None if unaudited else not problems, "problems": problems,
                        "requests_checked": len(requests), **({"unaudited": unaudited} if unaudited else {})},
        "environment": env,
    }


def ci_span(ci):
    return "[" + ", ".join("-" if v is None else f"{v:.1f}" for v in ci) + "]"


def print_level(level, run, capacity_tokens, engines=1):
    """Console table of one pass of one load level."""
    cache = f"the KV cache of {capacity_tokens}" + (f", {engines} engines together" if engines > 1 else "")
    fits = "" if capacity_tokens is None else \
        f" ({'fits in' if level['working_set_tokens'] <= capacity_tokens else 'exceeds'} {cache})"
    print(f"working set {level['working_set_tokens']} tokens{fits}")
    print(f"{'condition':<9} {'TTFT p50 ms [95% CI]':>24} {'p90':>8} {'p99':>8} {'mean':>8} {'TPOT ms':>8} "
          f"{'req/s':>7} {'tok/s':>8} {'hit rate':>8} {'failed':>6}")
    for c in ("cached", "cold"):
        s = run.get(c)
        if s is None:
            continue
        t = s.get("ttft_ms")
        if not t:
            print(f"{c:<9} every request failed")
            continue
        hit = s.get("hit_rate", {}).get("requests")
        print(f"{c:<9} {t['p50']:>9.1f} {ci_span(t['p50_ci95']):>14} {t['p90']:>8.1f} {t['p99']:>8.1f} {t['mean']:>8.1f} "
              f"{s['tpot_ms']['mean'] if s.get('tpot_ms') else float('nan'):>8.2f} {s['request_throughput'] or 0:>7.2f} "
              f"{s['output_throughput_tok_s'] or 0:>8.1f} {'-' if hit is None else f'{hit:.0%}':>8} {s['failed']:>6}")
    for c in ("cached", "cold"):
        server = (run.get(c) or {}).get("server") or {}
        if all(server.get(key) is not None for key, _ in SERVER_TIMES):
            print(f"{c:<9} the server's own means: TTFT {server['server_ttft_mean_ms']:.1f} ms, of which the engine "
                  f"queued {server['queue_time_mean_ms']:.1f} ms and prefilled {server['prefill_time_mean_ms']:.1f} ms")
    for c in ("cached", "cold"):
        s = run.get(c) or {}
        api = (s.get("server") or {}).get("api_server_cpu_busy_max")
        if s.get("client_cpu_busy") is not None:
            print(f"{c:<9} CPU busy, as a share of one core: this client {s['client_cpu_busy']:.0%}"
                  + ("" if api is None else f", the busiest server's API process {api:.0%}"))


# -----------------------------------------------------------------------------
# command line

def number_list(cast, what):
    """An argparse type for '1,2,4': each item cast and positive, none twice."""
    def convert(text):
        try:
            values = [cast(part) for part in text.split(",")]
        except ValueError:
            values = None
        if not values or any(not 0 < v < float("inf") for v in values):
            raise argparse.ArgumentTypeError(f"must be {what}, comma-separated, got {text!r}")
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"a value is listed twice in {text!r}")
        return values
    return convert


def add_load_flags(parser):
    g = parser.add_argument_group("under load (any of these measures load instead of one request at a time)")
    g.add_argument("--concurrency", "--max-concurrency", dest="concurrency",
                   type=number_list(int, "positive integers"),
                   help="closed loop: N clients, each sending its next request when the last one ends; "
                        "a list (1,4,16) is a sweep")
    g.add_argument("--request-rate", type=number_list(float, "numbers > 0"),
                   help="open loop: Poisson arrivals at R requests/s; a list is a sweep")
    g.add_argument("--num-prefixes", type=number_list(int, "positive integers"),
                   help=f"documents of --size-a tokens that the requests share (default {LOAD_NUM_PREFIXES}); a "
                        f"list (1,4,16,64) is a working-set sweep at one load")
    g.add_argument("--prefix-skew", type=p2.checked(float, lambda v: 0 <= v < float("inf"), "a number >= 0"),
                   default=0.0, help="how requests pick documents: 0 uniformly (default), s > 0 by Zipf, "
                                     "rank k with weight 1/k**s")
    g.add_argument("--num-requests", type=p2.positive_int,
                   help=f"requests per load level, condition and pass (default {LOAD_NUM_REQUESTS}, or "
                        f"{LOAD_REQUESTS_PER_CLIENT} per client where that is more)")
    g.add_argument("--warmup-concurrency", type=p2.positive_int, default=1,
                   help="the cached condition sends each document once first (untimed), this many at a time "
                        "(default 1: one after another); behind a router, where documents land can depend on it")
    g.add_argument("--repeats", type=p2.positive_int, default=LOAD_REPEATS,
                   help="passes over the sweep; each figure's interval is taken over the passes (default "
                        "%(default)s; 1: one pass's own intervals)")
    g = parser.add_argument_group("several replicas (under load)")
    g.add_argument("--replicas", type=p2.positive_int,
                   help="start N `vllm serve` replicas (one per GPU, or per TP x PP group of GPUs) and measure "
                        "through a front in front of them")
    g.add_argument("--router", choices=("vllm-router", "dp"), default="vllm-router",
                   help="the front: vllm-router (pip install vllm-router), or dp: one `vllm serve "
                        "--data-parallel-size N` (default %(default)s)")
    g.add_argument("--router-policy", type=lambda text: [p.strip() for p in text.split(",") if p.strip()],
                   help="vllm-router policies, one sweep each: cache_aware, round_robin, power_of_two, "
                        "consistent_hash, ... (default cache_aware); ideal: no router, the client sends "
                        "document k to replica k mod N, the placement a perfect cache-aware router reaches")
    g.add_argument("--router-args", help="more vllm-router flags, quoted: '--balance-abs-threshold 8'")
    g.add_argument("--replica-urls", type=lambda text: [u.strip().rstrip("/") for u in text.split(",") if u.strip()],
                   help="with --base-url in front of a router: the servers behind it, whose /metrics count "
                        "the requests")
    g = parser.add_argument_group("under load, continued")
    g.add_argument("--slo-ttft-ms", type=p2.checked(float, lambda v: 0 < v < float("inf"), "a number > 0"),
                   help="goodput: completed requests per second whose TTFT is at most this")


def check_fleet_flags(opts):
    """--replicas and its front: measured under load, started here (not --base-url)."""
    if opts.replica_urls and not opts.base_url:
        p2.usage_error("--replica-urls names the servers behind --base-url")
    if opts.replicas is None:
        if opts.router_policy or opts.router_args or opts.router != "vllm-router":
            p2.usage_error("--router, --router-policy and --router-args go with --replicas")
        return
    if opts.base_url:
        p2.usage_error("--replicas starts a fleet; to measure a running one, give its front as --base-url and its "
                       "servers as --replica-urls")
    if not opts.load:
        p2.usage_error("a fleet is measured under load: add --concurrency, --request-rate or --num-prefixes")
    if opts.router == "dp":
        if opts.router_policy or opts.router_args:
            p2.usage_error("--router dp balances inside vLLM: drop --router-policy/--router-args")
        opts.router_policy = ["dp"]
    else:
        opts.router_policy = opts.router_policy or ["cache_aware"]
        unknown = [p for p in opts.router_policy if p not in ROUTER_POLICIES + (IDEAL,)]
        if unknown:
            p2.usage_error(f"--router-policy {unknown[0]!r}: vllm-router knows {', '.join(ROUTER_POLICIES)} "
                           f"(and {IDEAL}: no router, each document straight to a replica of its own)")


def check_load_flags(opts):
    """Sets opts.load (a load run or not) and the default number of documents."""
    opts.load = bool(opts.concurrency or opts.request_rate or opts.num_prefixes)
    if not opts.load:
        return
    if opts.concurrency and opts.request_rate:
        p2.usage_error("either --concurrency or --request-rate: one kind of load per run")
    if opts.sizes or opts.size_b:
        p2.usage_error("under load a request is [document, Q]: --size-a sets the document's tokens; drop "
                       "--size-b/--sizes")
    opts.num_prefixes = opts.num_prefixes or [LOAD_NUM_PREFIXES]
    if len(opts.num_prefixes) > 1 and len(opts.concurrency or opts.request_rate or [1]) > 1:
        p2.usage_error("a working-set sweep (several --num-prefixes) runs at one load level: give one "
                       "--concurrency or --request-rate")
    opts.size_a = opts.size_a or p2.CONTEXT_SIZE_A


def load_results_path(results_dir, result):
    cfg = result["config"]
    if result.get("front"):
        load = "rate" if cfg["load"] == "request_rate" else "concurrency"
        sweep = f"p{'-'.join(map(str, cfg['num_prefixes']))}" if result["experiment"] == "working_set" else \
            f"p{cfg['num_prefixes'][0]}"
        return os.path.join(results_dir, f"results_fleet_{result['front']}_a{cfg['document_tokens']}_{sweep}_{load}.json")
    if result["experiment"] == "working_set":
        return os.path.join(results_dir, f"results_workingset_a{cfg['document_tokens']}.json")
    return os.path.join(results_dir, f"results_load_a{cfg['document_tokens']}_p{cfg['num_prefixes'][0]}_{cfg['load'].replace('request_', '')}.json")



def build_parser():
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, parents=[p2.experiment_parser()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.error = p2.usage_error
    parser.set_defaults(processes=1, num_blocks=NUM_BLOCKS, min_block_seconds=MIN_BLOCK_SECONDS)
    g = parser.add_argument_group("server (any other flag goes to the embedded `vllm serve`)")
    g.add_argument("--model", help=f"model folder or hub id to serve (default {p2.MODEL_NAME}); with --base-url, "
                                   f"the served model's name (default: its only one)")
    g.add_argument("--base-url", help="measure this running server (http://host:port) instead of starting one")
    g.add_argument("--tokenizer", help="tokenizer to build prompts with (default: the model's)")
    g.add_argument("--host", default=SERVER_HOST, help="the embedded server's address (default %(default)s)")
    g.add_argument("--port", type=p2.positive_int, help="the embedded server's port (default: a free one)")
    seconds = p2.checked(float, lambda v: 0 < v < float("inf"), "a number > 0")
    g.add_argument("--server-start-timeout", type=seconds, default=SERVER_START_TIMEOUT_S, help="(s, default %(default)s)")
    g.add_argument("--request-timeout", type=seconds, default=REQUEST_TIMEOUT_S, help="(s, default %(default)s)")
    g.add_argument("--allow-unaudited", action="store_true",
                   help=f"measure a server without {DETAILS_FLAG}: no request's cache state is checked, and the "
                        f"JSON, table and chart say so")
    add_load_flags(parser)
    return parser


def api_server_count(vllm_flags):
    """The value of vLLM's --api-server-count (or -asc) among the flags, as given; None if absent."""
    for k, flag in enumerate(vllm_flags):
        name, _, value = flag.partition("=")
        if name.replace("_", "-") in ("--api-server-count", "-asc"):
            return value or (vllm_flags[k + 1] if k + 1 < len(vllm_flags) else "")
    return None


def parse_args(argv):
    """Returns (opts, vllm_flags): our flags, and the rest for the embedded `vllm serve`."""
    opts, vllm_flags = build_parser().parse_known_args(argv)
    p2.check_run_flags(opts)
    check_load_flags(opts)
    check_fleet_flags(opts)
    if opts.processes != 1 or opts.worker_output:
        p2.usage_error("--processes: phase 1 measures one server; its interval is over the server's time blocks")
    if opts.base_url:
        if not re.match(r"^https?://[^/\s]+", opts.base_url):
            p2.usage_error(f"--base-url must look like http://host:port, got {opts.base_url!r}")
        if vllm_flags:
            p2.usage_error(f"unknown flags {vllm_flags}: vLLM flags go to an embedded server, and --base-url "
                           f"measures one that is already running")
    refused = [f for f in vllm_flags if f in ("--no-enable-prefix-caching", "--disable-log-stats")]
    if refused:
        p2.usage_error(f"{refused[0]}: the prefix cache and its /metrics are what this tool measures")
    if api_server_count(vllm_flags) not in (None, "1"):
        # the embedded server is vLLM's API server module, which would ignore it and run one API server
        p2.usage_error("--api-server-count: the embedded server runs one API server process; start "
                       "`vllm serve --api-server-count N --enable-prompt-tokens-details` yourself and pass --base-url")
    opts.seed = p2.SEED
    return opts, vllm_flags


def prepare(client, opts, model_dir, metrics_urls=None):
    """The checks before a run, on the server (or front) client talks to: the served model, the
    tokenizer, the prompts' fit, the audit probe. Returns (engine, tokenizer, card, unaudited)."""
    card = served_model(client, None if model_dir else opts.model)
    opts.model = card["id"]
    tokenizer = load_tokenizer(opts.tokenizer or model_dir or card.get("root") or card["id"], client, opts.model)
    check_fits([(opts.size_a, 0)] if opts.load else opts.configs, card.get("max_model_len"),
               len(p2.special_prefix_ids(tokenizer)), opts.max_output_tokens)
    engine = ServerEngine(client, opts.model, metrics_urls=metrics_urls)
    unaudited = check_audit_possible(engine, tokenizer, opts.allow_unaudited)
    return engine, tokenizer, card, unaudited


def run(opts, vllm_flags, argv):
    """Start or reach the server, check it, run every config, write the results. Returns the exit code."""
    if opts.replicas:
        return run_fleet(opts, vllm_flags, argv)
    server = None
    if not opts.base_url:
        model = opts.model or p2.MODEL_NAME
        if model.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(model)):
            raise ExperimentError(f"--model {model!r}: no such model folder")
        if opts.port:
            check_port_free(opts.host, opts.port)
        server = EmbeddedServer(model, opts.host, opts.port or free_port(opts.host), vllm_flags)
    client = None
    try:
        if server:
            server.start(opts.server_start_timeout)
        client = HttpClient(server.base_url if server else opts.base_url, opts.request_timeout)
        try:
            engine, tokenizer, card, unaudited = prepare(client, opts, server.model if server else None,
                                                         opts.replica_urls)
            env = {**server_environment(client, card, server, vllm_flags, engine),
                   **p2.provenance(argv, PROG, __file__)}
            if opts.load:
                result = run_load(engine, tokenizer, opts, env, unaudited)
                death = server.death() if server and result["failure"] else None
                if death:
                    result["failure"] = f"{result['failure']}; {death}"
            else:
                results = p2.run_configs(engine, tokenizer, opts, env)
        except ExperimentError as e:
            death = server.death() if server else None
            raise ExperimentError(death) if death else e
        if not opts.load:
            for result in results:
                add_phase1_stats(result, unaudited)
                result["environment"]["connections_opened"] = client.connections_opened - engine.connections_before
    finally:
        try:
            if client:
                client.close()
        finally:
            if server:
                server.stop()
    if opts.load:
        return finish_load(result, opts)
    for result in results:
        p2.print_summary(result)
        path = p2.results_path(opts.results_dir, result["config"]["context_size_a"], result["config"]["context_size_b"], 1)
        p2.write_json_atomic(path, p2.rounded(result))
        print(f"wrote {path}", flush=True)
    counters = results[0]["cache_audit"]["engine_counters"]
    if counters and counters.get("other_clients"):
        print(f"note: the server's prefix-cache counters grew by more than this run's requests "
              f"({counters['prefix_cache_queries']} tokens queried, {counters['sum_prompt_tokens']} sent by this run): "
              f"another client used the server during the run. Each request's own audit still holds; its "
              f"timings shared the server with that traffic.", file=sys.stderr)
    if any(result["cache_audit"]["ok"] is False for result in results):
        print("exit 3: a cache audit failed (see above); the JSON records which requests", file=sys.stderr)
        return EXIT_AUDIT
    return 0


def run_fleet(opts, vllm_flags, argv):
    """--replicas N: start the fleet, then for each front (a vllm-router policy, or dp) the load
    sweep through it, one JSON each. A failure ends the run after writing what was measured."""
    model = opts.model or p2.MODEL_NAME
    if model.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(model)):
        raise ExperimentError(f"--model {model!r}: no such model folder")
    fleet = Fleet(model, opts.host, opts.replicas, vllm_flags, opts.router, shlex.split(opts.router_args or ""))
    try:
        fleet.start(opts.server_start_timeout)
        for policy in opts.router_policy:
            front = fleet.start_router(policy, opts.server_start_timeout)
            client = HttpClient(front, opts.request_timeout)
            try:
                try:
                    engine, tokenizer, card, unaudited = prepare(client, opts, model, fleet.metrics_urls)
                    if policy == IDEAL:
                        engine.route = fleet.metrics_urls
                    env = {**server_environment(client, card, fleet.replicas[0], vllm_flags, engine),
                           **p2.provenance(argv, PROG, __file__),
                           "fleet": fleet_environment(fleet, policy, engine)}
                    result = run_load(engine, tokenizer, opts, env, unaudited)
                except ExperimentError as e:
                    dead = fleet.death()
                    raise ExperimentError(f"{e}; {dead}" if dead else str(e))
                result["front"] = policy
                if result["failure"]:
                    dead = fleet.death()
                    if dead:
                        result["failure"] = f"{result['failure']}; {dead}"
            finally:
                client.close()
                fleet.stop_router()
            code = finish_load(result, opts)
            if code:
                return code
    finally:
        fleet.stop()
    return 0


def fleet_environment(fleet, policy, engine):
    """What the JSON records of a fleet: the front, the replicas, their KV capacities."""
    return {"front": policy, "router": fleet.router_kind,
            "router_command": shlex.join(fleet.router.command) if fleet.router else None,
            "replicas": [{"base_url": r.base_url, "command": shlex.join(r.command), "start_s": r.start_s,
                          "cuda_visible_devices": r.environment.get("CUDA_VISIBLE_DEVICES"), "log": r.log_path}
                         for r in fleet.replicas],
            "kv_capacity_tokens_per_engine": engine.replica_capacities()}


def finish_load(result, opts):
    """Write a load run's JSON (also a sweep that requests' failures ended early: what was
    measured is kept) and say how it ended. Returns the exit code."""
    path = load_results_path(opts.results_dir, result)
    p2.write_json_atomic(path, p2.rounded(result))
    print(f"wrote {path}", flush=True)
    for problem in result["cache_audit"]["problems"]:
        print(f"!!!   {problem}", file=sys.stderr)
    if result["failure"]:
        print(f"{PROG}: error: {result['failure']}; the levels measured before are in {path}", file=sys.stderr)
        return p2.EXIT_SETUP
    if result["cache_audit"]["ok"] is False:
        print("exit 3: a cache audit failed (see above); the JSON records which requests", file=sys.stderr)
        return EXIT_AUDIT
    if result["cache_audit"].get("unaudited"):
        print(f"!!! UNAUDITED: {result['cache_audit']['unaudited']}", file=sys.stderr)
    return 0


def main(argv):
    opts, vllm_flags = parse_args(argv)         # exit 2 on a bad flag, before anything starts
    p2.check_results_dir(opts.results_dir)
    return run(opts, vllm_flags, argv)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, p2.stop_on_signal)
    signal.signal(signal.SIGTERM, p2.stop_on_signal)
    try:
        exit_code = main(sys.argv[1:])
    except (ExperimentError, Interrupted) as e:
        print(f"\n{PROG}: {'error: ' if isinstance(e, ExperimentError) else ''}{e}", file=sys.stderr)
        sys.exit(e.exit_code)
    sys.exit(exit_code)
