"""The result files' schema in code: each kind the tool writes, its keys with their meaning and
unit (TypedDicts), one builder per kind (every result the tool writes is made by one), and the
check a file read back must pass (its kind, and the keys every file of that kind holds). Times
are in ms unless a key's name says otherwise; intervals are [low, high] at 95%. Imports nothing
of the package.

A key that is Required is in every file of its kind since schema 0 (the design's own keys for a
phase 1/2 result); NotRequired keys came later or belong to some runs only (a tier, a fleet).
"""
from collections.abc import Mapping
from typing import Any, Literal, NotRequired, TypedDict, Unpack, get_type_hints, is_typeddict

# 0: files without a "schema_version" key: the design's own schema and every kind this project
# wrote before the key; all are still read. 1: the same keys, plus "schema_version", and
# tool_version.code_sha256 (the hash of the entry script and the package).
SCHEMA_VERSION = 1

Interval = list[float]          # [low, high], a 95% interval


class ToolVersion(TypedDict, total=False):
    git_commit: str | None      # the commit checked out when the run started
    git_dirty: bool | None      # the code (entry script, package) differed from that commit
    script_sha256: str          # the entry script alone
    code_sha256: str            # the entry script and every module of prefix_cache_bench/


class Provenance(TypedDict, total=False):
    """What every result records of its code and machine (in "environment", beside the engine's)."""
    command: str                # the command line as typed
    tool_version: ToolVersion        # the code that ran
    machine: dict[str, Any]     # cpu_model, cpu_logical_cores, cpu_usable_cores, host_python_loop_ms, gpus


class CacheAudit(TypedDict):
    ok: bool | None             # every request found what it should; None: the server gives no counts
    problems: list[str]         # one line each (a process's prefixed "process K: ")
    requests_checked: NotRequired[int]
    expected_hit_cached_tokens: NotRequired[int]    # what a hit must find: [A, B]'s whole KV blocks
    engine_counters: NotRequired[dict[str, Any] | None]  # prefix_cache_hits/queries over the run, their source
    unaudited: NotRequired[str]  # why the requests could not be audited


# -- phase 1 and phase 2: one file per config, results_phase<N>_a<A>_b<B>.json -----------------

class PhaseConfig(TypedDict):
    context_size_a: int         # tokens of the shared document A
    context_size_b: int         # tokens of B (the conversation before the query)
    max_output_tokens: int      # of the throughput request
    num_trials: int             # measured rounds, all processes'
    warmup_trials: int          # discarded rounds (each process's)
    warmup_tokens: NotRequired[int]      # output tokens of the warmup request
    query_tokens: NotRequired[int]       # tokens of the query Q
    pause_ms: NotRequired[float]         # pause between requests
    interleave: NotRequired[bool]        # conditions interleaved within each round
    num_blocks: NotRequired[int]         # time blocks, all processes'
    min_block_seconds: NotRequired[float]
    processes: NotRequired[int]          # engine processes (--processes)
    seed: NotRequired[int]


class ConditionStats(TypedDict):
    ttft_mean: float            # ms, over the measured trials (the design's keys first)
    ttft_median: float
    ttft_stdev: float
    total_time_mean: float      # ms, of the throughput request
    total_time_stdev: float
    throughput_mean: float      # output tokens/s
    throughput_stdev: float
    prompt_tokens: int          # of the TTFT request
    ttft_p90: NotRequired[float]
    ttft_min: NotRequired[float]
    ttft_max: NotRequired[float]
    ttft_ci95: NotRequired[Interval]     # Student's t interval of the mean
    engine_ttft_mean: NotRequired[float | None]     # vLLM's first_token_latency
    engine_ttft_median: NotRequired[float | None]  # ... and their medians
    prefill_mean: NotRequired[float | None]          # the prefill step, engine-core clock
    prefill_median: NotRequired[float | None]  # ... and their medians
    cached_tokens: NotRequired[float | None]         # mean num_cached_tokens of the TTFT request
    cached_tokens_max: NotRequired[int | None]  # the most any trial found
    num_trials: NotRequired[int]
    ttft_breakdown_mean_ms: NotRequired[dict[str, float] | None]  # each part's mean; they add up to ttft_mean
    hbm_cached_tokens: NotRequired[float | None]     # of cached_tokens, found in GPU memory
    tier_cached_tokens: NotRequired[float | None]    # ... and loaded from the second tier
    tier_load: NotRequired[dict[str, Any] | None]    # the tier's bytes, copy time and rate
    warmup_time_mean: NotRequired[float]             # phase 1: the server's warmup request
    tpot_mean: NotRequired[float | None]             # phase 1: ms per output token after the first
    itl_median: NotRequired[float | None]            # phase 1: inter-token gaps
    itl_p99: NotRequired[float | None]


class Trial(TypedDict, total=False):
    """One trial (the design leaves a trial's keys open: a file of its own may hold others)."""
    condition: str              # cache_hit, cache_miss, cache_cold or cache_tier
    round: int                  # counted across the run's processes
    ttft_ms: float              # wall time to the first token of the TTFT request
    total_time_ms: float        # wall time of the throughput request
    throughput_tok_s: float     # output tokens / total_time_ms
    prompt_tokens: int
    cached_tokens: int | None   # num_cached_tokens (offline), usage's cached_tokens (server)
    engine_ttft_ms: float | None     # the engine's own TTFT (front-end clock)
    prefill_ms: float | None    # first_token_ts - scheduled_ts, engine-core clock
    throughput_request: dict[str, Any]   # the throughput request's figures, decode_ms, output_tokens
    order: int                  # its place in the run
    start_s: float          # s since the run began (the first process's clock)
    block: int              # its time block
    process: int            # its engine process, 0 to processes - 1
    queue_ms: float | None  # scheduled_ts - queued_ts, engine-core clock
    hbm_cached_tokens: int | None
    tier_cached_tokens: int | None
    tier_load_bytes: int | None
    tier_load_ms: float | None
    ttft_breakdown_ms: dict[str, float] | None  # where the TTFT went; adds up to ttft_ms


class Condition(TypedDict):
    trials: list[Trial]         # the measured rounds' trials
    stats: ConditionStats
    discarded_trials: NotRequired[list[Trial]]       # the discarded rounds'


class PhaseResult(TypedDict):
    """A phase 1 (`vllm serve`) or phase 2 (offline LLM) result: one config, its conditions."""
    phase: str                  # phase2_python_api or phase1_server_api
    model: str
    config: PhaseConfig
    cache_hit: Condition
    cache_miss: Condition
    ttft_degradation_pct: float  # (miss - hit) / hit x 100, of the means
    timestamp: NotRequired[str]  # UTC, ISO 8601
    warmup_time_ms: NotRequired[float]   # the [A, B] warmup request (the mean over processes)
    schema_version: NotRequired[int]
    ttft_degradation_ci95: NotRequired[Interval]
    cache_cold: NotRequired[Condition]   # the like-for-like control: the same prompt, nothing cached
    ttft_saving_pct: NotRequired[float]  # (cold - hit) / cold x 100
    ttft_saving_ci95: NotRequired[Interval]
    ttft_saving_ms: NotRequired[float]   # cold - hit
    ttft_saving_ms_ci95: NotRequired[Interval]
    interval: NotRequired[dict[str, Any]]        # what the intervals cover: unit, processes, blocks, span_s
    reproducibility: NotRequired[dict[str, Any]]  # per-round, per-block, per-process savings; halves; stable
    harness_overhead_ms: NotRequired[float | None]  # median of wall TTFT - engine TTFT
    warmup_time_ms_per_process: NotRequired[list[float]]  # each process's warmup request
    cache_tier: NotRequired[Condition]   # [A, B] loaded from the second tier
    tier_ttft_saving_pct: NotRequired[float]
    tier_ttft_saving_ci95: NotRequired[Interval]
    tier_ttft_saving_ms: NotRequired[float]
    tier_ttft_saving_ms_ci95: NotRequired[Interval]
    tier_over_hit_pct: NotRequired[float]        # (tier - hit) / hit x 100
    tier_over_hit_ci95: NotRequired[Interval]
    gpu_busy: NotRequired[dict[str, Any] | None]  # the prefill step's GPU-busy time per condition (CUDA)
    cache_audit: NotRequired[CacheAudit]
    warmup_prompt_tokens: NotRequired[int]       # tokens in [A, B]
    environment: NotRequired[dict[str, Any]]     # engine, versions, machine, provenance, trial_order, wall times


# -- load, working set and fleet: results_load_..., results_workingset_..., results_fleet_... --

class LoadConfig(TypedDict):
    document_tokens: int        # tokens of each shared document
    query_tokens: int
    max_output_tokens: int
    num_requests: int | None    # per condition at each level (None: each level's own default)
    repeats: int                # passes of every level
    num_prefixes: list[int]     # documents in play (a working-set sweep: several)
    load: Literal["concurrency", "request_rate"]   # closed or open loop
    document_prompt_tokens: NotRequired[int]
    document_cached_tokens: NotRequired[int]    # the document's whole KV blocks
    prefix_skew: NotRequired[float]
    warmup_concurrency: NotRequired[int]
    slo_ttft_ms: NotRequired[float | None]
    seed: NotRequired[int]


class LoadLevel(TypedDict):
    concurrency: int | None     # closed-loop clients
    request_rate: float | None  # open-loop requests/s
    num_prefixes: int
    runs: list[dict[str, Any]]  # each pass: its cached and cold conditions, every request's record
    num_requests: NotRequired[int]      # per condition
    working_set_tokens: NotRequired[int]
    cached: NotRequired[dict[str, Any]]     # the figures over passes: ttft_ms percentiles, throughput, hit_rate
    cold: NotRequired[dict[str, Any]]


class LoadResult(TypedDict):
    phase: str                  # phase1_server_api
    experiment: Literal["load", "working_set"]
    model: str
    timestamp: str
    config: LoadConfig
    kv_capacity_tokens: int | None      # the server's (a fleet's: all replicas')
    levels: list[LoadLevel]          # each load level: its passes and the figures over them
    complete: bool              # every level ran; else failure says why
    failure: str | None
    cache_audit: CacheAudit
    environment: dict[str, Any]
    schema_version: NotRequired[int]
    kv_capacity_tokens_per_engine: NotRequired[dict[str, int | None]]   # {server URL: its KV capacity in tokens}
    front: NotRequired[str]     # a fleet's front: the router policy, dp or ideal
    corrections: NotRequired[list[dict[str, Any]]]  # edits made to a shipped file after its run: the keys, and why


# -- a trace replay and a capacity curve: results_trace_..., results_capacity_... --------------

class TraceResult(TypedDict):
    phase: str
    experiment: Literal["trace"]
    model: str
    timestamp: str
    config: dict[str, Any]      # the trace, its block size, window, time scale, caps, seed
    window: dict[str, Any]      # requests, skipped, history, spans (s), input/unique/reusable tokens
    kv_capacity_tokens: int
    tier_capacity_tokens: int | None  # the second tier's (--kv-offloading-size), or None
    simulated_capacity_tokens: int     # what the LRU model was given: GPU + tier
    engine_block_size: int           # tokens per KV block on the server
    arms: dict[str, Any]        # cached and cold over passes: TTFT percentiles, hit share, fidelity, send lag
    cache_buys: dict[str, Any]  # cold - cached, per pass pair: ttft_mean, ttft_p50/p90/p99 with intervals
    client: dict[str, Any]      # max_rss_mb, send_lag_p99_ms_max, sender_kept_up, send_lag_limit_ms
    passes: list[dict[str, Any]]  # each pass: each arm's stats, problems, every request's ledger row
    complete: bool
    failure: str | None
    cache_audit: CacheAudit
    environment: dict[str, Any]
    schema_version: NotRequired[int]


class CapacityCurve(TypedDict):
    phase: str
    experiment: Literal["capacity_curve"]
    timestamp: str
    config: dict[str, Any]      # the trace, block sizes, window, kv_capacity_tokens, capacities
    window: dict[str, Any]      # requests, skipped, history_requests, start_s, trace_span_s
    curve: dict[str, Any]       # the ideal share and each capacity's simulated reusable share
    simulation_s: float         # how long the simulation took
    environment: dict[str, Any]     # as Provenance: command, tool_version, machine
    schema_version: NotRequired[int]


class SenderBench(TypedDict):
    """tools/trace_sender_bench.py: the open-loop sender against a stub server, no engine."""
    experiment: Literal["trace_sender_bench"]
    trace: str                  # the trace file
    time_scale: float                # trace time / replay time
    requests: int               # requests replayed
    replay_span_s: float        # the schedule's span, s
    wall_s: float               # the whole run, s
    send_lag_ms: dict[str, Any]     # percentiles of how late each request was sent
    send_lag_limit_ms: float         # the p99 send lag a sender must keep under
    ttft_ms: float              # the stand-in server's TTFT
    itl_ms: float               # ... and its gap between tokens
    client_max_rss_mb: float    # the client's peak resident memory
    max_in_flight: int          # the most requests in flight at once
    max_output_tokens: int | None        # None: each request's own output length from the trace
    failed: int                 # requests that failed
    overloaded: str | None      # why the sender was overloaded (in flight past its cap), or None
    environment: NotRequired[dict[str, Any]]     # as Provenance: command, tool_version
    schema_version: NotRequired[int]


BENCH_SERVE_SCHEMA = "bench_serve_comparison/1"


class BenchServeComparison(TypedDict):
    """tools/compare_bench_serve.py's comparison.json: `vllm bench serve` and phase 1 on one
    server, round by round. Versioned by its own "schema" key."""
    schema: Literal["bench_serve_comparison/1"]  # this file's own schema and version
    config: dict[str, Any]      # model, size_a, num_prefixes, concurrency, max_output_tokens, num_requests, rounds, flags
    vllm_version: str                # the server's vLLM
    device: str                      # the server's device
    machine: dict[str, Any]          # as environment.machine of a phase result
    server_start_s: float | None     # how long the server took to start (None: --base-url)
    command: str                     # the command line as typed
    tool_version: ToolVersion        # the code that ran
    rounds: list[dict[str, Any]]   # each round: its seed, order, and each tool's TTFT p50/p99/mean (ms)
    summary: dict[str, Any]     # each tool's figures over rounds: mean, ci95, per_round


class BareGenerateCheck(TypedDict):
    """tools/bare_generate_check.py: phase 2's request against a bare LLM.generate, interleaved."""
    experiment: Literal["bare_generate_check"]
    model: str
    vllm_version: str           # the engine's vLLM
    rounds: int                 # per config and condition: one request of each arm a round
    budget_ms: float            # the tool's TTFT must be within this of the quiet bare call's
    rows: list[dict[str, Any]]  # per config and condition: the arms' means, tool - bare, tool - quiet bare, within_budget
    cache_audit: CacheAudit
    environment: dict[str, Any]     # as Provenance: command, tool_version, machine
    schema_version: NotRequired[int]


class MinimalClientCheck(TypedDict):
    """tools/minimal_client_check.py: phase 1's streamed request against a minimal http.client one,
    interleaved on one server."""
    experiment: Literal["minimal_client_check"]
    model: str
    vllm_version: str | None    # the server's vLLM (its /version)
    rounds: int                 # per config and condition: one request of each arm a round
    budget_ms: float            # phase 1's TTFT must be within this of the minimal client's
    rows: list[dict[str, Any]]  # per config and condition: both arms' means, tool - minimal, within_budget
    cache_audit: CacheAudit
    environment: dict[str, Any]     # as Provenance: command, tool_version, machine, the server's
    schema_version: NotRequired[int]


Result = (PhaseResult | LoadResult | TraceResult | CapacityCurve | SenderBench | BenchServeComparison | BareGenerateCheck
          | MinimalClientCheck)
KINDS: dict[str, type] = {"phase": PhaseResult, "load": LoadResult, "working_set": LoadResult, "trace": TraceResult,
                          "capacity_curve": CapacityCurve, "trace_sender_bench": SenderBench,
                          "bench_serve_comparison": BenchServeComparison, "bare_generate_check": BareGenerateCheck,
                          "minimal_client_check": MinimalClientCheck}
KIND_NAMES = {"phase": "phase 1/2 result", "load": "load result", "working_set": "working-set result",
              "trace": "trace replay", "capacity_curve": "capacity curve", "trace_sender_bench": "sender benchmark",
              "bench_serve_comparison": "bench-serve comparison", "bare_generate_check": "bare-generate check",
              "minimal_client_check": "minimal-client check"}


def kind_of(data: Mapping[str, object]) -> str | None:
    """The kind of a parsed result (a key of KINDS), or None for an experiment this tool does
    not write. A phase 1/2 result has no "experiment" key (the design's schema has none); a
    bench-serve comparison has its own "schema"."""
    if data.get("schema") == BENCH_SERVE_SCHEMA:
        return "bench_serve_comparison"
    experiment = data.get("experiment")
    if experiment is None:
        return "phase"
    return experiment if experiment in KINDS else None


def missing_keys(data: Any, schema: type, where: str = "") -> list[str]:
    """The Required keys of schema (a TypedDict) that data lacks, at any depth where a key's type
    is a TypedDict or a list of one, each as a dotted path (cache_hit.stats.ttft_mean)."""
    if not isinstance(data, dict):
        return [where or "(the file)"]
    hints = get_type_hints(schema)
    missing = []
    for key in sorted(schema.__required_keys__):        # type: ignore[attr-defined]
        path = f"{where}.{key}" if where else key
        if key not in data:
            missing.append(path)
    for key, hint in hints.items():
        if key not in data or data[key] is None:
            continue
        path = f"{where}.{key}" if where else key
        if is_typeddict(hint):
            missing += missing_keys(data[key], hint, path)
        elif getattr(hint, "__origin__", None) is list and is_typeddict(hint.__args__[0]) and data[key]:
            missing += missing_keys(data[key][0], hint.__args__[0], f"{path}[0]")   # one element stands for all
    return missing


def check_result(data: Mapping[str, object]) -> Result:
    """data as its kind's typed form, or raise ValueError naming what it lacks."""
    kind = kind_of(data)
    if kind is None:
        raise ValueError(f"experiment {data.get('experiment')!r}: not a kind of result this tool writes")
    missing = missing_keys(data, KINDS[kind])
    if missing:
        raise ValueError(f"a {KIND_NAMES[kind]} without {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    # checked: the keys every file of its kind holds
    return data        # type: ignore[return-value]


def built(schema: type, keys: Mapping[str, object]) -> Any:
    """keys as a result of schema, or raise TypeError: a key the schema does not declare, or a
    Required one missing (a mistake in the code that builds it, not in a file)."""
    unknown = sorted(set(keys) - set(get_type_hints(schema)))
    missing = missing_keys(keys, schema)
    if unknown or missing:
        raise TypeError(f"{schema.__name__}: undeclared key(s) {unknown}, missing {missing}")
    return keys


def build_request_audit(problems: list[str], requests_checked: int, unaudited: str | None) -> CacheAudit:
    """The cache_audit of a load run or a replay: every request's problems; ok is None where the
    server could not be audited (unaudited says why)."""
    audit: CacheAudit = {"ok": None if unaudited else not problems, "problems": problems,
                         "requests_checked": requests_checked}
    if unaudited:
        audit["unaudited"] = unaudited
    return audit


def build_phase_result(**keys: Unpack[PhaseResult]) -> PhaseResult:
    """A phase 1 or phase 2 result: one engine process's, and the merge of several."""
    return built(PhaseResult, keys)


def build_load_result(**keys: Unpack[LoadResult]) -> LoadResult:
    """A load, working-set or fleet result."""
    return built(LoadResult, keys)


def build_trace_result(**keys: Unpack[TraceResult]) -> TraceResult:
    """A trace replay."""
    return built(TraceResult, keys)


def build_capacity_curve(**keys: Unpack[CapacityCurve]) -> CapacityCurve:
    """A --simulate-capacities curve."""
    return built(CapacityCurve, keys)


def build_sender_bench(**keys: Unpack[SenderBench]) -> SenderBench:
    """tools/trace_sender_bench.py's result."""
    return built(SenderBench, keys)


def build_bare_generate_check(**keys: Unpack[BareGenerateCheck]) -> BareGenerateCheck:
    """tools/bare_generate_check.py's result."""
    return built(BareGenerateCheck, keys)


def build_minimal_client_check(**keys: Unpack[MinimalClientCheck]) -> MinimalClientCheck:
    """tools/minimal_client_check.py's result."""
    return built(MinimalClientCheck, keys)


def build_bench_serve_comparison(**keys: Unpack[BenchServeComparison]) -> BenchServeComparison:
    """tools/compare_bench_serve.py's comparison."""
    return built(BenchServeComparison, keys)
