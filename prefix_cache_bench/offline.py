"""The offline engine (vLLM's LLM): one timed generate call per request, the tap that counts
the engine's prefix-cache stats from every message, the relay of vLLM's output and the watchdog
that ends a run whose engine died, what the JSON records of the machine, and phase 2's driver.
"""
import json
import os
import platform
import sys
import threading
import time

from .engine_api import RequestResult
from .gpu_busy import NOT_ON_THIS_ENGINE, WORKER_EXTENSION
from .host import machine_info
from .defaults import OFFLINE_PHASE, OFFLINE_PROG, QUERY_TOKENS
from .errors import (ERROR_LINE, EXIT_AUDIT, EXIT_SETUP, EXIT_USAGE, ExperimentError, first_line, interruption,
                     raise_if_interrupted)
from .prompts import special_prefix_ids
from .protocol import run_configs, write_results
from .provenance import device_name, engine_environment
from .results import note_existing_results, write_json_atomic
from .tiers import check_tier_can_start, connector_load, describe_tier


def timed_request(llm, prompt_ids, max_tokens, cache_salt=None):
    """One generate call; nothing but the call itself is inside the timed region."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompt = TokensPrompt(prompt_token_ids=prompt_ids)
    if cache_salt is not None:
        prompt["cache_salt"] = cache_salt
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    tap = scheduler_stats_tap(llm)
    if tap is not None:
        tap["prefills"].clear()
        loaded_before = (tap["tier_load_bytes"], tap["tier_load_s"])
    t0 = time.perf_counter()
    out = llm.generate(prompt, params, use_tqdm=False)[0]
    wall_ms = (time.perf_counter() - t0) * 1e3
    m = out.metrics  # RequestStateStats: engine-core timestamps (s), present with log stats on
    # where its cached tokens came from: the one prefill this request's call saw (the engine
    # handles one request at a time here), as the scheduler counted it
    hbm, tier = tap["prefills"][0] if tap is not None and len(tap["prefills"]) == 1 else (None, None)
    return RequestResult(
        wall_ms=wall_ms,
        prompt_tokens=len(out.prompt_token_ids),
        cached_tokens=out.num_cached_tokens,
        output_tokens=len(out.outputs[0].token_ids),
        engine_ttft_ms=m.first_token_latency * 1e3,
        prefill_ms=(m.first_token_ts - m.scheduled_ts) * 1e3,
        decode_ms=(m.last_token_ts - m.first_token_ts) * 1e3,
        queue_ms=(m.scheduled_ts - m.queued_ts) * 1e3,
        hbm_cached_tokens=hbm,
        tier_cached_tokens=tier,
        tier_load_bytes=tap["tier_load_bytes"] - loaded_before[0] if tap is not None else None,
        tier_load_ms=(tap["tier_load_s"] - loaded_before[1]) * 1e3 if tap is not None else None,
    )


class OfflineEngine:
    """The offline LLM as run_configs drives it. Phase 1 drives a server through the same
    four calls (server_engine.ServerEngine)."""
    phase = OFFLINE_PHASE
    shared = False                  # nothing but this run sends it requests

    def __init__(self, llm, model):
        self.llm = llm
        self.model = model              # as the run names it (RunSettings.model)

    def request(self, prompt_ids, max_tokens, cache_salt=None):
        raise_if_interrupted()
        return timed_request(self.llm, prompt_ids, max_tokens, cache_salt)

    def reset_prefix_cache(self):
        return self.llm.reset_prefix_cache()

    def empty_hbm_prefix_cache(self):
        return self.llm.reset_prefix_cache()         # reset_connector=False: the tier keeps its blocks

    def tier(self):
        return describe_tier(self.llm.llm_engine.vllm_config)

    def counters(self):
        return prefix_cache_counters(self.llm)

    def kv_capacity(self):
        """(KV blocks, tokens a block), or None if the engine does not say."""
        cc = self.llm.llm_engine.vllm_config.cache_config
        return (cc.num_gpu_blocks, cc.block_size) if cc.num_gpu_blocks else None

    def gpu_busy_unavailable(self):
        """Why this engine cannot time a request's GPU work (gpu_busy.GpuBusyWorker on a CUDA
        worker), or None where it can. Opens and closes one empty window to find out, so that the
        profiler's start-up is in no request's window."""
        if self.llm.llm_engine.vllm_config.parallel_config.worker_extension_cls != WORKER_EXTENSION:
            return NOT_ON_THIS_ENGINE
        opened = self.llm.collective_rpc("pcb_gpu_busy_start")
        self.llm.collective_rpc("pcb_gpu_busy_stop")
        if all(answer is True for answer in opened):
            return None
        why = [answer for answer in opened if isinstance(answer, str)]
        return f"the profiler did not start: {why[0]}" if why else NOT_ON_THIS_ENGINE

    def gpu_busy_request(self, prompt_ids, max_tokens, cache_salt=None):
        """One request inside a GPU-busy window on every worker; the first worker's (rank 0) activity."""
        self.llm.collective_rpc("pcb_gpu_busy_start")
        try:
            result = self.request(prompt_ids, max_tokens, cache_salt)
        finally:
            activity = self.llm.collective_rpc("pcb_gpu_busy_stop")
        return result, activity[0]


def prefix_cache_counters(llm):
    """The engine's prefix-cache counters (tokens queried / found), a second witness for the
    audit besides each request's num_cached_tokens. Counted by scheduler_stats_tap from every
    stats message the engine core sends (summed over engines); vLLM's own LLM.get_metrics()
    numbers ride along under "vllm_metrics". None where neither is available."""
    tap = scheduler_stats_tap(llm)
    metrics = vllm_metrics_counters(llm)
    if tap is None and metrics is None:
        return None
    counters = {key: value for key, value in (tap or metrics).items() if key != "prefills"}
    counters["source"] = "scheduler stats messages" if tap is not None else "LLM.get_metrics()"
    if metrics is not None:
        counters["vllm_metrics"] = metrics
    return counters


def vllm_metrics_counters(llm):
    try:
        metrics = llm.get_metrics()
    except Exception:                       # a vLLM without LLM.get_metrics()
        return None
    totals = {"prefix_cache_queries": 0, "prefix_cache_hits": 0}
    for m in metrics:
        key = m.name.removeprefix("vllm:")
        if key in totals:
            totals[key] += int(getattr(m, "value", 0))
    return totals


def scheduler_stats_tap(llm):
    """Count the prefix-cache stats in every message the engine core sends the front end, from
    the first call on (the tap is installed then). Why not LLM.get_metrics() alone: vLLM's
    offline LLMEngine.step() before vllm-project/vllm#48668 (0.26 included) records a step's
    stats only if the step also carried a request output, so with async scheduling a hit's
    stats can be dropped (seen on two H200s: 2 hit requests' 4,608 tokens missing in 128).
    It runs inside the timed generate call: 0.4 us per engine step (measured on a CPU), noise.
    Returns the running totals (a dict updated in place), or None if this vLLM's engine has
    no such message stream."""
    core = getattr(llm.llm_engine, "engine_core", None)
    if core is None or not callable(getattr(core, "get_output", None)):
        return None
    if not hasattr(core, "prefix_cache_tap"):
        totals = {"prefix_cache_queries": 0, "prefix_cache_hits": 0, "hits_in_messages_without_outputs": 0,
                  # a second tier's: what the connector was asked for and found, what it copied into HBM
                  "external_prefix_cache_queries": 0, "external_prefix_cache_hits": 0,
                  "tier_load_bytes": 0, "tier_load_s": 0.0}
        prefills = []                       # (HBM, tier) cached tokens of each prefill, in order
        get_output = core.get_output

        def get_output_counted():
            out = get_output()
            scheduler_stats = getattr(out, "scheduler_stats", None)
            stats = getattr(scheduler_stats, "prefix_cache_stats", None)
            if stats is not None:
                totals["prefix_cache_queries"] += stats.queries
                totals["prefix_cache_hits"] += stats.hits
                if not out.outputs:
                    totals["hits_in_messages_without_outputs"] += stats.hits
            external = getattr(scheduler_stats, "connector_prefix_cache_stats", None)
            if external is not None:
                totals["external_prefix_cache_queries"] += external.queries
                totals["external_prefix_cache_hits"] += external.hits
            loaded_bytes, loaded_s = connector_load(getattr(scheduler_stats, "kv_connector_stats", None))
            totals["tier_load_bytes"] += loaded_bytes
            totals["tier_load_s"] += loaded_s
            for output in getattr(out, "outputs", None) or ():
                prefill = getattr(output, "prefill_stats", None)
                if prefill is not None:
                    prefills.append((prefill.num_local_cached_tokens, prefill.num_external_cached_tokens))
            return out

        core.get_output = get_output_counted
        totals["prefills"] = prefills
        core.prefix_cache_tap = totals
    return core.prefix_cache_tap


# A dead engine process normally surfaces in the main thread as an exception within seconds;
# one that leaves the rest hanging (a tensor-parallel peer waiting in NCCL) is ended after this.
ENGINE_DEATH_GRACE_S = 15


_original_fds = {}                          # fd -> a copy of where it went before relay_output


_relays = []


def relay_output():
    """Route fds 1 and 2, which every vLLM process inherits, through pipes: everything is
    passed on as it comes, and the first error line any vLLM process prints is kept (returned
    list) to name the cause if the engine dies. restore_output() undoes it."""
    first_error = []
    for fd in (1, 2):
        _original_fds[fd] = os.dup(fd)
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        _relays.append(threading.Thread(target=_relay, args=(read_end, _original_fds[fd], first_error), daemon=True))
        _relays[-1].start()
    return first_error


def _relay(read_end, original, first_error):
    pending, passing_on = b"", True
    while chunk := os.read(read_end, 65536):
        if passing_on:
            try:
                os.write(original, chunk)
            except OSError:                 # the reader went away (`| head`): keep draining, or vLLM blocks
                passing_on = False
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if not first_error and ERROR_LINE.search(line):
                first_error.append(line.decode(errors="replace").strip())


def restore_output():
    """Point fds 1 and 2 back at where they went before relay_output: our last lines must
    not wait in a pipe when the process exits."""
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, original in _original_fds.items():
        os.dup2(original, fd)
    for relay in _relays:                   # drains what is still in the pipe, unless a stray process holds it
        relay.join(timeout=1)


def watch_engine(first_error):
    """Check every second that vLLM's processes (VLLM::EngineCore, VLLM::Worker...) are alive.
    If one dies and the run has not ended ENGINE_DEATH_GRACE_S later, end it: kill what is
    left of the engine and exit 1 with one line. Returns the function that stops the watch."""
    import psutil

    stop = threading.Event()

    def watch():
        me, seen, death = psutil.Process(), {}, None
        while not stop.wait(1.0):
            alive = {}
            for proc in me.children(recursive=True):
                try:
                    name = " ".join(proc.cmdline())
                    if name.startswith("VLLM::") and proc.status() != psutil.STATUS_ZOMBIE:
                        alive[proc.pid] = name
                except psutil.Error:
                    pass
            gone = sorted(set(seen) - set(alive))
            if gone and death is None:
                death = (time.monotonic(), f"{seen[gone[0]]} (pid {gone[0]}) exited")
            seen.update(alive)
            if death and time.monotonic() - death[0] > ENGINE_DEATH_GRACE_S and not stop.is_set():
                cause = first_error[0] if first_error else death[1]
                os.write(_original_fds[2], f"\n{OFFLINE_PROG}: error: the vLLM engine died ({death[1]}) and the run "
                                           f"did not end by itself: {cause}\n".encode())
                for proc in me.children(recursive=True):
                    proc.kill()
                os._exit(EXIT_SETUP)

    threading.Thread(target=watch, daemon=True).start()
    return stop.set


def model_shape(model_config):
    """The model's dimensions as the engine sees them, and its parameter count (counted on
    PyTorch's meta device: nothing is allocated, no weights are read). plot_results.py
    turns these into FLOPs per prefill."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = model_config.hf_text_config
    shape = {
        "architecture": (model_config.architectures or [None])[0],
        "num_parameters": None,
        "num_embedding_parameters": None,      # token embedding + LM head: no per-token matmul in prefill
        "num_layers": getattr(hf, "num_hidden_layers", None),
        "hidden_size": model_config.get_hidden_size(),
        "num_attention_heads": getattr(hf, "num_attention_heads", None),
        "num_kv_heads": model_config.get_total_num_kv_heads(),
        "head_dim": model_config.get_head_size(),
        "vocab_size": model_config.get_vocab_size(),
        "dtype": str(model_config.dtype).replace("torch.", ""),
    }
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config.hf_config,
                                                     trust_remote_code=model_config.trust_remote_code)
        # a tied LM head shares the embedding's tensor: count each tensor once
        embedding = {id(p): p for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
                     for p in m.parameters()}
        shape["num_parameters"] = sum(p.numel() for p in model.parameters())
        shape["num_embedding_parameters"] = sum(p.numel() for p in embedding.values())
    except Exception as e:     # an architecture transformers cannot build: the dimensions still stand
        print(f"note: parameters not counted ({type(e).__name__}: {e})", file=sys.stderr)
    return shape


def environment_info(llm, engine_args, engine_start_s):
    import torch
    import vllm

    cc = llm.llm_engine.vllm_config.cache_config
    device = device_name()
    engine = {k: v for k, v in vars(engine_args).items() if not k.startswith("_")}
    return {
        "vllm_version": vllm.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": device,
        "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "block_size": cc.block_size,
        # prefix-cache hits land on multiples of this (vLLM >= 0.30 can set it below block_size)
        "cache_block_size": getattr(cc, "prefix_match_unit", None) or cc.block_size,
        "dtype": str(llm.llm_engine.model_config.dtype).replace("torch.", ""),
        "seed": engine_args.seed,
        "model_shape": model_shape(llm.llm_engine.model_config),
        "max_model_len": llm.llm_engine.model_config.max_model_len,
        "engine_args": json.loads(json.dumps(engine, default=str)),
        "env_vars": engine_environment(os.environ),
        "engine_start_s": engine_start_s,
    }


# Hosts that share NVLink switches may forbid NVLink multicast; these variables turn it off in
# NCCL, PyTorch and NVSHMEM. vLLM (0.26 at least) does not look at them: under tensor
# parallelism on Hopper/Blackwell it fuses all-reduce + RMSNorm with FlashInfer, whose default
# "mnnvl" workspace creates a multicast object (cuMulticastCreate) wherever the GPU supports one.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


FLASHINFER_ALLREDUCE_BACKEND = "VLLM_FLASHINFER_ALLREDUCE_BACKEND"


def keep_multicast_off(environ, tensor_parallel_size):
    """Where the environment turns NVLink multicast off, turn it off in FlashInfer's all-reduce
    too (its IPC-based "trtllm" workspace), unless the user chose a backend. Returns the note
    to print, or None."""
    off = sorted(k for k, v in MULTICAST_OFF.items() if environ.get(k) == v)
    if tensor_parallel_size < 2 or not off or FLASHINFER_ALLREDUCE_BACKEND in environ:
        return None
    environ[FLASHINFER_ALLREDUCE_BACKEND] = "trtllm"
    return (f"note: NVLink multicast is off here ({', '.join(off)}); {FLASHINFER_ALLREDUCE_BACKEND}=trtllm "
            f"keeps vLLM's fused all-reduce off it too (set the variable yourself to choose)")


def check_model_fits(settings, engine_args):
    """Build vLLM's model config (config and tokenizer only, no weights) and check that every
    (A, B) config fits the context the engine will allow."""
    from transformers import AutoTokenizer
    from vllm.platforms import current_platform

    if current_platform.is_unspecified():
        raise ExperimentError("vLLM found no device to run on (no CUDA GPU visible?): check `nvidia-smi` and "
                              "CUDA_VISIBLE_DEVICES, or install the vLLM build for your hardware")
    check_tier_can_start(getattr(engine_args, "kv_offloading_size", None),
                         getattr(engine_args, "kv_offloading_backend", None))
    try:
        model_config = engine_args.create_model_config()
        tokenizer = AutoTokenizer.from_pretrained(model_config.tokenizer, trust_remote_code=engine_args.trust_remote_code)
    except Exception as e:  # unknown hub id, no network, remote code refused, bad --max-model-len
        raise ExperimentError(f"--model {engine_args.model!r} cannot be loaded: {first_line(e)}")
    limit = model_config.max_model_len
    source = "--max-model-len" if engine_args.max_model_len else "the model's config"
    fixed = len(special_prefix_ids(tokenizer)) + QUERY_TOKENS + settings.max_output_tokens
    for a, b in settings.configs:
        need = fixed + a + b
        if need > limit:
            room = limit - fixed
            raise ExperimentError(
                f"A={a} B={b} needs {need} tokens (prompt {need - settings.max_output_tokens} + "
                f"{settings.max_output_tokens} output) but the engine's context is {limit} ({source}): "
                f"A + B must be at most {room}, e.g. --size-a {max(room - b, 1)} --size-b {min(b, room - 1)}",
                EXIT_USAGE)
    return model_config


def run_experiment(settings, engine_args):
    """The whole experiment: 1. load the model once, then steps 2-8, every (A, B) config in one
    interleaved run. Returns the exit code (EXIT_AUDIT if any config's cache audit failed)."""
    from vllm import LLM

    note_existing_results(settings)
    machine = machine_info()                # the host's speed while no engine runs beside it

    # 1. load the model (prefix caching and engine stats on)
    print(f"starting vLLM engine for {engine_args.model} ...", flush=True)
    first_error = relay_output()            # what vLLM's processes print passes through us from here on
    stop_watch = watch_engine(first_error)
    llm, phase = None, "start"
    try:
        if settings.profiled_requests and not engine_args.worker_extension_cls:
            engine_args.worker_extension_cls = WORKER_EXTENSION     # the GPU-busy segment's window
        t0 = time.perf_counter()
        llm = LLM.from_engine_args(engine_args)
        engine_start_s = time.perf_counter() - t0
        print(f"engine ready in {engine_start_s:.1f} s", flush=True)
        env = {**environment_info(llm, engine_args, engine_start_s), "machine": machine, **settings.provenance}
        phase = "run"
        results = run_configs(OfflineEngine(llm, settings.model), llm.get_tokenizer(), settings, env)    # steps 2-6
    except ExperimentError:
        raise
    except Exception as e:                  # the engine or one of its processes failed
        if (stopped := interruption()) is not None:
            raise stopped from e            # ... or a signal's exception was replaced on its way out
        cause = first_error[0] if first_error else f"{type(e).__name__}: {first_line(e)}"
        raise ExperimentError(f"the vLLM engine failed during its {phase}: {cause}")
    finally:
        stop_watch()
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:               # already dead: nothing left to shut down
                pass
    if settings.worker_output:                  # one of several processes: the first one merges
        write_json_atomic(settings.worker_output, results)
        return 0 if all(result["cache_audit"]["ok"] for result in results) else EXIT_AUDIT
    return write_results(results, settings.results_dir)
