"""How much of phase 1's TTFT is the tool's client: its streamed request against a minimal one.

    python tools/minimal_client_check.py --base-url http://127.0.0.1:8000 --sizes 512x256,8192x256 --rounds 30
    python tools/minimal_client_check.py --model /tmp/llama-3.1-8b --sizes 8192x256 --rounds 30 [vLLM flags]

One server: the one at --base-url, or one started as phase1_experiment.py starts it (the same
flags, the same parser), checked as phase 1 checks it. Each config's [A, B] is warmed once in a
cache namespace of this run's; then, round after round, every config's hit, miss and cold
condition sends two requests with fresh queries, in an order that alternates from round to
round: phase 1's (server_engine.ServerEngine.request, the path its measured rounds time) and a
minimal client's, as a user writes one:

    conn = http.client.HTTPConnection(host, port)        # one kept connection, one request at a time
    t0 = time.perf_counter(); conn.request("POST", "/v1/completions", body, headers)
    the first `data:` line of the streamed answer: TTFT; the rest read to its end

with the same JSON body (one output token, usage in the last chunk). Per config and condition:
both means, the mean of the paired differences tool - minimal with its 95% t interval over the
rounds and their median, and whether the tool's mean is within BUDGET_MS of the minimal client's. Every request's cached
tokens (usage.prompt_tokens_details.cached_tokens) are audited as phase 1 audits them. Writes
--out (minimal_client_check.json).
"""
import contextlib
import http.client
import json
import os
import sys
import time
import urllib.parse

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import phase1_experiment  # noqa: E402
from prefix_cache_bench.audit import expected_cached_tokens  # noqa: E402
from prefix_cache_bench.cli import check_model_folder, take_flag  # noqa: E402
from prefix_cache_bench.defaults import CONDITIONS, IDLE_RECONNECT_S, MODEL_NAME  # noqa: E402
from prefix_cache_bench.errors import ExperimentError, Interrupted, stop_on_signals  # noqa: E402
from prefix_cache_bench.host import machine_info  # noqa: E402
from prefix_cache_bench.http_client import HttpClient  # noqa: E402
from prefix_cache_bench.intervals import mean_ci95  # noqa: E402
from prefix_cache_bench.prompts import ConfigPrompts  # noqa: E402
from prefix_cache_bench.protocol import warm_cache  # noqa: E402
from prefix_cache_bench.provenance import provenance  # noqa: E402
from prefix_cache_bench.result_schema import build_minimal_client_check  # noqa: E402
from prefix_cache_bench.results import check_writable_dir, write_result  # noqa: E402
from prefix_cache_bench.server_engine import prepare, server_environment  # noqa: E402
from prefix_cache_bench.servers import EmbeddedServer, free_port  # noqa: E402

BUDGET_MS = 0.5         # phase 1's TTFT within this of the minimal client's, at every size
PROG = "minimal_client_check.py"
ARMS = ("tool", "minimal")


class MinimalClient:
    """A streamed /v1/completions over http.client, one request at a time on one kept connection."""

    def __init__(self, base_url: str, timeout_s: float):
        url = urllib.parse.urlsplit(base_url)
        self.conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout_s)
        self.path = url.path.rstrip("/") + "/v1/completions"
        self.last_end = 0.0

    def keep_open(self) -> None:
        """After an idle gap, an untimed GET /health: the server may have closed the idle connection."""
        if time.perf_counter() - self.last_end > IDLE_RECONNECT_S:
            try:
                self.conn.request("GET", "/health")
                self.conn.getresponse().read()
            except (OSError, http.client.HTTPException):
                self.conn.close()           # http.client reconnects on the next request

    def request(self, body: bytes) -> tuple[float, dict]:
        """(ms from the request's send to its first `data:` line, the last chunk's usage)."""
        self.keep_open()
        t0 = time.perf_counter()
        self.conn.request("POST", self.path, body=body, headers={"Content-Type": "application/json"})
        response = self.conn.getresponse()
        first, lines = None, []
        while line := response.readline():
            if first is None and line.startswith(b"data: "):
                first = time.perf_counter()
            lines.append(line)
        self.last_end = time.perf_counter()
        if response.status != 200 or first is None:
            raise ExperimentError(f"the minimal client's request failed: HTTP {response.status} {b''.join(lines)[:200]!r}")
        usage = {}
        for line in lines:                  # parsed after the clock: only the first line's arrival is timed
            if line.startswith(b"data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
        return (first - t0) * 1e3, usage

    def close(self) -> None:
        self.conn.close()


def completion_body(model: str, prompt_ids: list[int], cache_salt: str | None) -> bytes:
    """The JSON body phase 1 sends for a one-token TTFT request (server_engine.ServerEngine.request)."""
    body = {"model": model, "prompt": prompt_ids, "max_tokens": 1, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    if cache_salt is not None:
        body["cache_salt"] = cache_salt
    return json.dumps(body).encode()


def compare(engine, minimal, tokenizer, sizes, rounds, seed, block, run_id):
    """Every config's conditions, phase 1's request against the minimal client's, `rounds` pairs
    each. Returns (rows, problems): a row per config and condition; problems lists every request
    whose cached tokens broke its condition."""
    hit_salt = f"run-{run_id}"              # a server keeps other runs' blocks: this run's namespace
    configs = [ConfigPrompts(tokenizer, a, b, block, seed, run_id, hit_salt) for a, b in sizes]
    for c in configs:
        warm_cache(engine.request, c.warmup_ids, 0.0, hit_salt)
    pairs = {(k, condition): [] for k in range(len(configs)) for condition in CONDITIONS}
    problems = []
    for r in range(rounds):
        for k, c in enumerate(configs):
            for condition in CONDITIONS:
                prompts = dict(zip(ARMS, c.trial_prompts(condition, r)))
                want = expected_cached_tokens(condition, len(c.warmup_ids), block)
                timed = {}
                for arm in (ARMS if r % 2 == 0 else ARMS[::-1]):        # each arm first in half the rounds
                    ids, salt = prompts[arm]
                    if arm == "tool":
                        result = engine.request(ids, 1, salt)
                        timed[arm] = (result.ttft_ms, result.cached_tokens)
                    else:
                        ttft_ms, usage = minimal.request(completion_body(engine.model, ids, salt))
                        timed[arm] = (ttft_ms, (usage.get("prompt_tokens_details") or {}).get("cached_tokens"))
                problems += [f"A={c.size_a} B={c.size_b} {condition} round {r} {arm}: cached_tokens={cached}, "
                             f"expected {want}" for arm, (_, cached) in timed.items() if cached != want]
                pairs[(k, condition)].append([timed[arm][0] for arm in ARMS])
    return [row(configs[k], condition, values) for (k, condition), values in pairs.items()], problems


def row(config, condition, values):
    """One config and condition's figures from its rounds' (tool, minimal) TTFTs in ms."""
    tool_ms, minimal_ms = np.array(values).T
    diff = tool_ms - minimal_ms
    ci = list(mean_ci95(diff)) if len(diff) > 1 else [None, None]
    return {"context_size_a": config.size_a, "context_size_b": config.size_b, "condition": condition,
            "rounds": len(tool_ms), "tool_ttft_mean_ms": float(tool_ms.mean()), "minimal_ttft_mean_ms": float(minimal_ms.mean()),
            "difference_mean_ms": float(diff.mean()), "difference_ci95": ci,
            # one slow request moves a mean of 30 by a millisecond or more on a shared host; the median does not
            "difference_median_ms": float(np.median(diff)),
            "within_budget": bool(abs(diff.mean()) <= BUDGET_MS),
            "tool_ttft_ms": tool_ms.tolist(), "minimal_ttft_ms": minimal_ms.tolist()}


def table(rows):
    """Markdown: per config and condition, both means and the tool's difference."""
    cell = lambda mean, ci: f"{mean:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci[0] is not None else "")
    lines = ["| config | condition | phase 1 TTFT ms | minimal client ms | phase 1 - minimal ms (95% CI) | "
             f"median of phase 1 - minimal ms | within {BUDGET_MS:g} ms |", "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| A={r['context_size_a']} / B={r['context_size_b']} | {r['condition'].removeprefix('cache_')} | "
                     f"{r['tool_ttft_mean_ms']:.2f} | {r['minimal_ttft_mean_ms']:.2f} | "
                     f"{cell(r['difference_mean_ms'], r['difference_ci95'])} | {r['difference_median_ms']:+.2f} | "
                     f"{'yes' if r['within_budget'] else 'no'} |")
    return "\n".join(lines)


def main(argv):
    rounds, argv = take_flag(argv, "--rounds", 20, int)
    out, argv = take_flag(argv, "--out", "minimal_client_check.json", str)
    if rounds < 2:
        raise ExperimentError("--rounds must be at least 2 (an interval needs two pairs)", 2)
    settings, vllm_flags, _ = phase1_experiment.parse_args(argv)
    if settings.load or settings.trace or settings.fleet:
        raise ExperimentError("one server, one request at a time: no load, trace or fleet flags", 2)
    # its folder made and written to now, before a server starts: not after the measured minutes
    check_writable_dir(os.path.dirname(out) or ".", "--out's folder")
    cfg = settings.server
    machine = machine_info()                    # the host's speed while no engine runs beside it
    server = None
    if not cfg.base_url:
        model = check_model_folder(cfg.model or MODEL_NAME)
        server = EmbeddedServer(model, cfg.host, cfg.port or free_port(cfg.host), vllm_flags)
    # stopped at the end, on error and on Ctrl-C: the clients first, then the server
    with server or contextlib.nullcontext():
        if server:
            server.start(cfg.start_timeout_s)
        base_url = server.base_url if server else cfg.base_url
        with HttpClient(base_url, cfg.request_timeout_s) as client:
            engine, tokenizer, card, unaudited = prepare(client, settings, server.model if server else None)
            if unaudited:
                raise ExperimentError(f"the server cannot be audited: {unaudited}")
            env = server_environment(client, card, server, vllm_flags, engine)
            minimal = MinimalClient(base_url, cfg.request_timeout_s)
            try:
                rows, problems = compare(engine, minimal, tokenizer, settings.run.configs, rounds, settings.run.seed,
                                         env["cache_block_size"], os.urandom(6).hex())
            finally:
                minimal.close()
    result = build_minimal_client_check(
        experiment="minimal_client_check", model=engine.model, vllm_version=env.get("vllm_version"), rounds=rounds,
        budget_ms=BUDGET_MS, rows=rows, cache_audit={"ok": not problems, "problems": problems},
        environment={"machine": machine, "server": env, **provenance(sys.argv[1:], "tools/minimal_client_check.py", __file__)})
    print(table(rows))
    write_result(out, result)
    print(f"wrote {out}")
    for problem in problems[:10]:
        print(f"!!! {problem}", file=sys.stderr)
    return 3 if problems else 0


if __name__ == "__main__":
    stop_on_signals()
    try:
        sys.exit(main(sys.argv[1:]))
    except (ExperimentError, Interrupted) as e:
        print(f"{PROG}: {'error: ' if isinstance(e, ExperimentError) else ''}{e}", file=sys.stderr)
        sys.exit(e.exit_code)
