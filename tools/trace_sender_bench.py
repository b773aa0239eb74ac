"""The trace replay's sender on its own: how late it sends (send lag) and how much memory the
client holds, against a stand-in server that streams at a set pace, so that the figures are the
client's and not a real engine's.

    python tools/trace_sender_bench.py ../shared/traces/conversation_trace.jsonl.gz --duration-s 300
    python tools/trace_sender_bench.py TRACE --time-scale 0.1 --max-output-tokens 32    # the whole trace, 10x its rate

The stand-in (this script with --serve, a child process stopped at the end, on error and on
Ctrl-C) answers each /v1/completions with its first token after --ttft-ms, then one chunk every
--itl-ms up to max_tokens, and the usage. The replay is phase1_experiment.py --trace's own code
(trace_replay.TracePlan, send_open_loop, request_record, trace_figures.arm_stats) on a cached
arm's bodies. Prints the send lag's p50/p99/max and the client's peak RSS, and writes them as JSON.
"""
import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prefix_cache_bench.http_client import HttpClient  # noqa: E402
from prefix_cache_bench.provenance import provenance  # noqa: E402
from prefix_cache_bench.result_schema import build_sender_bench  # noqa: E402
from prefix_cache_bench.results import write_result  # noqa: E402
from prefix_cache_bench.trace_figures import arm_stats  # noqa: E402
from prefix_cache_bench.trace_replay import (SEND_LAG_LIMIT_MS, TracePlan, client_rss_mb, request_record,  # noqa: E402
                                             send_open_loop)
from prefix_cache_bench.traces import read_trace, select_window  # noqa: E402

VOCAB_IDS = np.arange(4, 32000, dtype=np.int32)      # a 32k vocabulary's ordinary ids


def serve(port, ttft_ms, itl_ms):
    """The stand-in server: /health, and /v1/completions streamed at the set pace."""
    from aiohttp import web

    async def completions(request):
        body = json.loads(await request.read())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await asyncio.sleep(ttft_ms / 1e3)
        for k in range(body["max_tokens"]):
            if k:
                await asyncio.sleep(itl_ms / 1e3)
            await response.write(b'data: {"choices": [{"text": "x"}]}\n\n')
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"],
                 "prompt_tokens_details": {"cached_tokens": 0}}
        await response.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())
        return response

    async def health(request):
        return web.Response(text="ok")

    app = web.Application(client_max_size=2 ** 28)
    app.add_routes([web.post("/v1/completions", completions), web.get("/health", health)])
    web.run_app(app, host="127.0.0.1", port=port, print=None)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(client, deadline_s=30):
    start = time.perf_counter()
    while True:
        try:
            return client.get("/health", as_json=False)
        except Exception:
            if time.perf_counter() - start > deadline_s:
                raise
            time.sleep(0.2)


def replay(url, plan, drain_s):
    with HttpClient(url, 600) as client:
        wait_ready(client)

        return client.run("the replay", send_open_loop(url, plan, "stand-in", lambda k: "bench", drain_s, 100000))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace")
    parser.add_argument("--start-s", type=float, default=0.0)
    parser.add_argument("--duration-s", type=float)
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument("--max-output-tokens", type=int)
    parser.add_argument("--ttft-ms", type=float, default=50.0)
    parser.add_argument("--itl-ms", type=float, default=20.0)
    parser.add_argument("--out", default="trace_sender_bench.json")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.serve, args.ttft_ms, args.itl_ms)
    started = time.perf_counter()
    window = select_window(read_trace(args.trace), args.trace, args.start_s, args.duration_s)
    plan = TracePlan(window, args.time_scale, args.max_output_tokens, VOCAB_IDS, 0, 512)
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, args.trace, "--serve", str(port), "--ttft-ms", str(args.ttft_ms),
                               "--itl-ms", str(args.itl_ms)], start_new_session=True)
    try:
        records, t0, overload, in_flight = replay(f"http://127.0.0.1:{port}", plan, 60.0)
    finally:                                    # the stand-in is stopped at the end, on error and on Ctrl-C
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(10)
    requests = [request_record(k, r, record, plan.scheduled_s[k], t0, plan.max_tokens[k], True, 0, 0)
                for k, (r, record) in enumerate(zip(window.measured, records))]
    stats = arm_stats(requests, plan.scheduled_s[-1], None, 512)
    result = build_sender_bench(**{"experiment": "trace_sender_bench", "trace": args.trace, "requests": len(requests),
              "replay_span_s": plan.scheduled_s[-1], "time_scale": args.time_scale,
              "max_output_tokens": args.max_output_tokens, "ttft_ms": args.ttft_ms, "itl_ms": args.itl_ms,
              "failed": stats["failed"], "overloaded": overload, "max_in_flight": in_flight,
              "send_lag_ms": stats["send_lag_ms"], "send_lag_limit_ms": SEND_LAG_LIMIT_MS,
              "client_max_rss_mb": client_rss_mb(), "wall_s": time.perf_counter() - started,
              "environment": provenance(sys.argv[1:] if argv is None else list(argv), "tools/trace_sender_bench.py",
                                        __file__)})
    write_result(args.out, result)
    lag = stats["send_lag_ms"]
    print(f"{len(requests)} requests over {plan.scheduled_s[-1]:.0f} s ({stats['failed']} failed, at most {in_flight} "
          f"in flight): send lag p50 {lag['p50']:.3f} ms, p99 {lag['p99']:.3f} ms, max {lag['max']:.1f} ms; "
          f"client peak RSS {result['client_max_rss_mb']:.0f} MB; wrote {args.out}")
    return 0 if not stats["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
