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
results/results_phase1_a{A}_b{B}.json per config once the run ends. Exit codes: 0 ok,
1 set-up or server problem, 2 bad arguments, 3 a cache audit failed (the JSON is still
written), 130/143 interrupted (no file written).
"""
import argparse
import asyncio
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

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
        async def stream():
            token_times, usage = [], None
            sent = time.perf_counter()
            async with self.session.post(self.base_url + "/v1/completions", data=data,
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
        return self.run("a completion request", stream())


class ServerEngine:
    """A vLLM server as phase2_experiment.run_configs drives an engine: request, counters,
    kv_capacity, reset_prefix_cache. shared: other clients may use the server too."""
    phase = PHASE
    shared = True

    def __init__(self, client, model, audited=True):
        self.client, self.model, self.audited = client, model, audited
        self.connections_before = client.connections_opened
        self.last_end = 0.0

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
            raise ExperimentError(f"{self.client.base_url} sent no usage in its last chunk: it does not honour "
                                  f"stream_options.include_usage")
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
        return server_counters(parse_metrics(self.client.get("/metrics", as_json=False)))

    def kv_capacity(self):
        labels = cache_config(parse_metrics(self.client.get("/metrics", as_json=False)))
        blocks, size = label_int(labels, "num_gpu_blocks"), label_int(labels, "block_size")
        return (blocks, size) if blocks and size else None


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


def first_error_line(path):
    """The first line of a server log that names an error, or its last line."""
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return "no log"
    for line in lines:
        if p2.ERROR_LINE.search(line):
            return line.decode(errors="replace").strip()
    return lines[-1].decode(errors="replace").strip() if lines else "the log is empty"


class EmbeddedServer:
    """`vllm serve` as a child process in a session of its own, so that stop() ends it and every
    process it started (engine core, workers). Its output goes to a log file."""

    def __init__(self, model, host, port, vllm_flags):
        self.model = model
        self.command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                        "--host", host, "--port", str(port), DETAILS_FLAG, "--enable-prefix-caching", *vllm_flags]
        self.base_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
        self.environment = {**os.environ, "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": str(EMBEDDED_KEEP_ALIVE_S)}
        fd, self.log_path = tempfile.mkstemp(prefix="phase1-vllm-serve-", suffix=".log")
        os.close(fd)
        self.proc, self.start_s = None, None

    def start(self, timeout_s):
        """Start the server and wait until /health answers 200; raise if it exits or times out."""
        import urllib.error
        import urllib.request

        t0 = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env=self.environment)
        print(f"starting vLLM server (pid {self.proc.pid}): {shlex.join(self.command)}\nserver log: {self.log_path}",
              flush=True)
        while time.perf_counter() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise ExperimentError(f"the vLLM server exited with code {self.proc.returncode} during its start: "
                                      f"{first_error_line(self.log_path)} (log: {self.log_path})")
            try:
                # straight to the server: a proxy from the environment must not sit in between
                with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                        self.base_url + "/health", timeout=2) as response:
                    if response.status == 200:
                        self.start_s = time.perf_counter() - t0
                        print(f"server ready in {self.start_s:.1f} s", flush=True)
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise ExperimentError(f"the vLLM server was not ready within --server-start-timeout {timeout_s:g} s "
                              f"(log: {self.log_path})")

    def death(self):
        """One line if the server has exited (or does within 2 s: a broken connection can be
        seen before the process is gone), else None."""
        if self.proc is None:
            return None
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return None
        if self.proc.returncode is not None:
            return (f"the vLLM server (pid {self.proc.pid}) exited with code {self.proc.returncode} during the run: "
                    f"{first_error_line(self.log_path)} (log: {self.log_path})")
        return None

    def stop(self):
        """SIGTERM to the server's whole process group, SIGKILL to whatever is left after the grace."""
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


def server_environment(client, card, server, vllm_flags, opts):
    """What the JSON records of the server: its vLLM version, cache layout, how it was reached."""
    labels = cache_config(parse_metrics(client.get("/metrics", as_json=False)))
    block = label_int(labels, "block_size")
    try:
        version = client.get("/version").get("version")
    except ExperimentError:
        version = None
    return {
        "vllm_version": version,
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
# command line

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
    return parser


def parse_args(argv):
    """Returns (opts, vllm_flags): our flags, and the rest for the embedded `vllm serve`."""
    opts, vllm_flags = build_parser().parse_known_args(argv)
    p2.check_run_flags(opts)
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
    opts.seed = p2.SEED
    return opts, vllm_flags


def run(opts, vllm_flags, argv):
    """Start or reach the server, check it, run every config, write the results. Returns the exit code."""
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
            card = served_model(client, None if server else opts.model)
            opts.model = card["id"]
            tokenizer = load_tokenizer(opts.tokenizer or (server.model if server else card.get("root") or card["id"]),
                                       client, opts.model)
            check_fits(opts.configs, card.get("max_model_len"), len(p2.special_prefix_ids(tokenizer)),
                       opts.max_output_tokens)
            engine = ServerEngine(client, opts.model)
            unaudited = check_audit_possible(engine, tokenizer, opts.allow_unaudited)
            env = {**server_environment(client, card, server, vllm_flags, opts), **p2.provenance(argv, PROG, __file__)}
            results = p2.run_configs(engine, tokenizer, opts, env)
        except ExperimentError as e:
            death = server.death() if server else None
            raise ExperimentError(death) if death else e
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
