"""The engine interface the trial protocol drives (Engine), and the record of one request
(RequestResult), as vLLM's benchmarks/lib/endpoint_request_func.py has RequestFuncOutput. The
offline engine (offline.OfflineEngine) and a server (server_engine.ServerEngine) implement both.
"""
import dataclasses
from typing import Any, Optional, Protocol

# The fields only a streamed request (through a server) has: offline, the 1-token request's wall
# time is the TTFT, and there are no chunks to time.
STREAM_FIELDS = ("ttft_ms", "tpot_ms", "itl_ms", "new_connection")


# RequestResult.ttft_breakdown's parts, in the order they stack, with their labels. tier_wait_ms
# only in a request that loaded from a second tier: elsewhere (and in older files) it is absent.
BREAKDOWN_PARTS = (("outside_engine_ms", "outside the engine"), ("frontend_ipc_ms", "frontend + IPC"),
                   ("queue_ms", "queue"), ("tier_wait_ms", "queue: tier copies"), ("prefill_step_ms", "prefill step"))


@dataclasses.dataclass
class RequestResult:
    """One request as an engine's request() returns it. Times in ms: wall_ms and the streamed
    fields on this process's clock (perf_counter); engine_ttft_ms, queue_ms and prefill_ms are the
    engine's own durations (offline: RequestOutput.metrics; a server: the growth of its TTFT, queue
    and prefill histograms across this one request). Durations only: never mix the clocks' stamps."""
    wall_ms: float                          # from just before the request is sent to its last output
    prompt_tokens: Optional[int]
    cached_tokens: Optional[int]            # None where the engine does not say (an unaudited server)
    output_tokens: int
    engine_ttft_ms: Optional[float] = None
    prefill_ms: Optional[float] = None
    decode_ms: Optional[float] = None
    ttft_ms: Optional[float] = None         # streamed: to the first chunk that carries a token
    tpot_ms: Optional[float] = None
    itl_ms: Optional[list] = None
    new_connection: Optional[bool] = None   # streamed: did it open a connection of its own
    queue_ms: Optional[float] = None        # the engine core's queued to scheduled
    # where the cached tokens came from, where the engine says (None where it does not): its GPU
    # prefix cache (HBM) or a second tier (a KV connector); they add up to cached_tokens
    hbm_cached_tokens: Optional[int] = None
    tier_cached_tokens: Optional[int] = None
    tier_load_bytes: Optional[float] = None  # KV bytes the connector copied from the tier into HBM
    tier_load_ms: Optional[float] = None     # and how long its copies took

    def ttft_breakdown(self) -> dict[str, float] | None:
        """Where this request's TTFT went, in ms: parts that add up to client_ttft_ms. None where
        the engine did not report its times.
          outside_engine_ms  TTFT minus the engine's own TTFT: offline, LLM.generate's work around
                             the engine; through a server, the client and HTTP
          frontend_ipc_ms    the engine's TTFT minus queue and prefill step: its frontend (input and
                             output processing) and the IPC to the engine core and back
          queue_ms           queued to scheduled in the engine core, less tier_wait_ms
          tier_wait_ms       (a request that loaded KV from a second tier only) the queue time spent
                             waiting for the tier's copies: the request waits in the queue while
                             its KV comes in. The connector's copy time where it reports one (at
                             most the queue time), else the whole queue time
          prefill_step_ms    scheduled to first token: the step's forward pass and its host work"""
        if self.engine_ttft_ms is None or self.queue_ms is None or self.prefill_ms is None:
            return None
        parts = {"outside_engine_ms": self.client_ttft_ms - self.engine_ttft_ms,
                 "frontend_ipc_ms": self.engine_ttft_ms - self.queue_ms - self.prefill_ms}
        if not self.tier_cached_tokens:             # nothing loaded from a second tier
            return {**parts, "queue_ms": self.queue_ms, "prefill_step_ms": self.prefill_ms}
        tier_wait_ms = self.queue_ms if self.tier_load_ms is None else min(self.tier_load_ms, self.queue_ms)
        return {**parts, "queue_ms": self.queue_ms - tier_wait_ms, "tier_wait_ms": tier_wait_ms,
                "prefill_step_ms": self.prefill_ms}

    @property
    def streamed(self) -> bool:
        return self.ttft_ms is not None

    @property
    def client_ttft_ms(self) -> float:
        """The TTFT this client saw: a streamed request's first token, else the whole (1-token) request."""
        return self.ttft_ms if self.ttft_ms is not None else self.wall_ms      # ttft_ms is set: streamed

    def as_json(self) -> dict[str, Any]:
        """The request as the result files record it (a trial's throughput_request): every field
        but wall_ms, which the trial keeps as total_time_ms; the streamed fields where it streamed."""
        record = dataclasses.asdict(self)
        del record["wall_ms"]
        if not self.streamed:
            return {key: value for key, value in record.items() if key not in STREAM_FIELDS}
        return {"ttft_ms": record.pop("ttft_ms"), **record}


@dataclasses.dataclass
class StreamedResponse:
    """One streamed completion as the HTTP client saw it, on this process's clock
    (perf_counter seconds): what a server's RequestResult and a load request's record are made of."""
    sent_s: float                           # just before the request was sent
    token_times_s: list                     # the arrival of each chunk that carried a token
    usage: Optional[dict]                   # the last chunk's usage (stream_options.include_usage); None if none came
    ended_s: float                          # the end of the stream, or of the failure
    error: Optional[str] = None             # why the request failed, in one line; None if it did not


class Engine(Protocol):
    """What the trial protocol (protocol.run_configs) needs of an engine."""
    phase: str          # the result's "phase": phase2_python_api (offline) or phase1_server_api
    model: str          # the result's "model": the model as the engine names it (a server: its served id)
    shared: bool        # may other clients send it requests (a server)? Then each run hits in a cache namespace of its own

    def request(self, prompt_ids: list[int], max_tokens: int, cache_salt: Optional[str] = None) -> RequestResult:
        """One request, timed; nothing else inside the timed region."""

    def reset_prefix_cache(self) -> bool:
        """Empty the prefix cache (a server: nothing to do, the run's namespace is new); False if it failed."""

    def empty_hbm_prefix_cache(self) -> bool:
        """Empty the GPU prefix cache and keep the tier's (the cache_tier condition); False if refused."""

    def tier(self) -> Optional[dict]:
        """The engine's second cache tier as a result records it (tiers.describe_tier), or None."""

    def counters(self) -> Optional[dict]:
        """The engine's prefix-cache counters (prefix_cache_queries, prefix_cache_hits, source), or None."""

    def kv_capacity(self) -> Optional[tuple]:
        """(KV blocks, tokens a block) that any one request can count on, or None."""

    def gpu_busy_unavailable(self) -> Optional[str]:
        """Why this engine cannot time a request's GPU work on the GPU's clock (gpu_busy), or None where it can."""

    def gpu_busy_request(self, prompt_ids: list[int], max_tokens: int,
                         cache_salt: Optional[str] = None) -> tuple[RequestResult, Optional[dict[str, Any]]]:
        """request() inside a GPU-busy window: (RequestResult, {gpu_busy_ms, gpu_span_ms, device_activities})."""


class LoadServer(Protocol):
    """What a load run (load_run.run_load) and a trace replay (trace_replay.run_trace) need of the
    server they drive: server_engine.ServerEngine, built by server_engine.prepare. They read these
    and nothing else of it, and set nothing on it."""
    client: Any             # http_client.HttpClient on the front (a server, or a router before replicas)
    model: str              # the served model's id, as requests name it
    audited: bool           # does every response say its cached tokens (--enable-prompt-tokens-details)?
    route: Optional[list]   # the fleet policy ideal: document k's requests to route[k % N]; None: all to the front
    metrics_urls: list      # the servers whose /metrics count the requests (the front, or the replicas)

    def request(self, prompt_ids: list[int], max_tokens: int, cache_salt: Optional[str] = None) -> RequestResult:
        """One streamed request to the front, timed (the counters' flush, the warmups one at a time)."""

    def tier(self) -> Optional[dict]:
        """The server's second cache tier as a result records it, or None."""

    def total_kv_capacity_tokens(self) -> Optional[int]:
        """KV-cache tokens over every engine behind the front, or None where none says."""

    def replica_capacities(self) -> dict:
        """{engine name: its KV-cache tokens} of every engine behind the front."""

    def replica_metrics(self) -> list:
        """[(engine name, its parsed /metrics)] of every engine behind the front."""
