"""A stand-in for `vllm serve`, for the faults a real server will not show on demand: HTTP
errors, an error inside a stream, a connection dropped mid-run, a /metrics without a process
collector, requests held until several are in flight.
It answers what phase1_experiment.py asks (/v1/models, /metrics, /version, streamed
/v1/completions) and behaves as `mode` says. Its /metrics counts the prompt tokens of the
completions it answers as vLLM's prefix-cache queries, before the answer, as vLLM does: phase 1's
probe finds them there at once instead of waiting 5 s for them (audit.wait_for_counters)."""
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeServer:
    """mode: "ok" (cached tokens reported), "http-500" (completions fail), "error-chunk" (an error inside a 200 stream),
    "drop-after-N" (the connection drops on the N-th completion)."""

    def __init__(self, tokenizer_dir, mode="ok", max_model_len=2048):
        self.mode, self.completions = mode, 0
        self.queries = 0                        # prompt tokens of the completions answered (vllm:prefix_cache_queries_total)
        # completions in flight at once, at most. Each one of delay_max_tokens output tokens (all, if
        # None) is held before its reply until hold_until_in_flight completions have been in flight
        # together, or delay_s has passed: a count, not a race against this machine's speed.
        self.in_flight = self.max_in_flight = 0
        self.delay_s, self.delay_max_tokens, self.hold_until_in_flight = 0.0, None, None
        self.lock = threading.Lock()           # requests arrive on several threads at once
        self.arrived = threading.Condition(self.lock)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # TCP_NODELAY, as uvicorn sets it for vllm serve: the headers and the body of a reply
            # go out as separate writes, and without it every reply waited for the client's
            # delayed ACK (about 40 ms on Linux)
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def reply(self, status, body, content_type="application/json"):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    self.reply(200, {"data": [{"id": "fake", "root": tokenizer_dir, "max_model_len": max_model_len}]})
                elif self.path == "/metrics":
                    self.reply(200, b'vllm:cache_config_info{block_size="16",num_gpu_blocks="1000"} 1.0\n'
                                    b'vllm:prefix_cache_hits_total{engine="0"} 0.0\n'
                                    b'vllm:prefix_cache_queries_total{engine="0"} %d.0\n' % fake.queries, "text/plain")
                elif self.path == "/health":
                    self.reply(200, b"", "text/plain")
                elif self.path == "/version":
                    self.reply(200, {"version": "fake"})
                else:
                    self.reply(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/completions":
                    return self.reply(404, {"error": {"message": "not found"}})
                with fake.lock:
                    fake.completions += 1
                    number = fake.completions
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    fake.arrived.notify_all()
                try:
                    if fake.delay_max_tokens in (None, body["max_tokens"]):
                        with fake.lock:
                            # once as many were in flight together, all of them go on (the peak, not
                            # the count now: the first to go on lowers the count before the others wake)
                            fake.arrived.wait_for(lambda: fake.hold_until_in_flight is not None
                                                  and fake.max_in_flight >= fake.hold_until_in_flight, fake.delay_s)
                    self.complete(body, number)
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

            def complete(self, body, number):
                if fake.mode == "http-500":
                    return self.reply(500, {"error": {"message": "the engine is sad"}})
                if fake.mode == "error-chunk":          # vLLM's way to fail a request mid-stream
                    return self.reply(200, b'data: {"error": {"message": "engine overloaded", "code": 500}}\n\n',
                                      "text/event-stream")
                if fake.mode.startswith("drop-after-") and number >= int(fake.mode.split("-")[-1]):
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)      # no reply at all: the peer sees the socket close
                    return
                with fake.lock:
                    fake.queries += len(body["prompt"])
                usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"],
                         "total_tokens": len(body["prompt"]) + body["max_tokens"],
                         "prompt_tokens_details": {"cached_tokens": 0}}
                chunks = [{"choices": [{"index": 0, "text": "x"}]} for _ in range(body["max_tokens"])]
                chunks.append({"choices": [], "usage": usage})
                self.reply(200, "".join(f"data: {json.dumps(c)}\n\n" for c in chunks).encode() + b"data: [DONE]\n\n",
                           "text/event-stream")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
