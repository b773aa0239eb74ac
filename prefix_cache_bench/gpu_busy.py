"""How much of a prefill step the GPU is busy, on the GPU's own clock: a profiled segment of its
own after the measured rounds (profiling perturbs a request's timing, so it never runs inside
them). A vLLM worker extension (GpuBusyWorker, --worker-extension-cls) opens a torch profiler
window on the worker around one request, tracing only the device's activities (CUPTI: kernels,
copies, memsets, each as the GPU timed it); their union is the request's GPU-busy time, and
the union of its kernels and memsets alone the step's own GPU work. The copies are apart: a
tier hit's copies from host memory run while the request waits in the queue, not in its step.
The measured rounds' prefill step (scheduled to first token) minus the kernels' busy time is
what the step spent waiting on the host. Imports neither vLLM nor torch at module level: the worker imports torch.
"""
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .audit import expected_cached_tokens, source_problem
from .defaults import TIER_CONDITION
from .engine_api import Engine, RequestResult
from .prompts import ConfigPrompts
from .tiers import TierRequest

# The qualified name vLLM resolves in its worker processes (ParallelConfig.worker_extension_cls)
WORKER_EXTENSION = "prefix_cache_bench.gpu_busy.GpuBusyWorker"

# What a result says of a segment it did not measure, by reason
NOT_ON_THIS_ENGINE = "the engine runs on no CUDA device, or without this tool's worker extension"

METHOD = ("after the measured rounds, each request alone inside a torch profiler window on the worker that "
          "traces only the GPU's activities (CUPTI); GPU busy = the union of their [start, end] on the GPU's "
          "clock, kernel busy = the union of its kernels and memsets (the step's own work), copy time = the "
          "union of its memory copies (a tier's loads among them), span = first start to last end; requests "
          "whose cached tokens broke their condition are left out")
COPY_PREFIX = "Memcpy"          # CUPTI names a copy "Memcpy HtoD (Pinned -> Device)", "Memcpy DtoH ...", ...
# vLLM's native tier moves small pinned pages (under 28 KiB) with a Triton kernel of this name, not a copy
COPY_KERNEL_NAME = "swap_blocks"


def is_copy(name: str) -> bool:
    """Whether a device activity moves memory: a copy, or the tier's block-swapping kernel."""
    return name.startswith(COPY_PREFIX) or COPY_KERNEL_NAME in name


def device_busy_ms(spans_ns: Sequence[tuple[int, int]]) -> tuple[float, float]:
    """(busy ms, span ms) of device activities [(start_ns, end_ns)]: busy is the length of their
    union (activities on streams that overlap count once), span from the first start to the
    last end. (0.0, 0.0) where there are none."""
    busy_ns, current = 0, None
    for start, end in sorted(spans_ns):
        if current is None or start > current[1]:
            if current is not None:
                busy_ns += current[1] - current[0]
            current = [start, end]
        else:
            current[1] = max(current[1], end)
    if current is None:
        return 0.0, 0.0
    busy_ns += current[1] - current[0]
    return busy_ns / 1e6, (max(end for _, end in spans_ns) - min(start for start, _ in spans_ns)) / 1e6


def busy_by_kind(activities: Sequence[tuple[str, int, int]]) -> dict[str, float]:
    """A profiled window's figures from its device activities [(name, start_ns, end_ns)]:
    gpu_busy_ms and gpu_span_ms over them all, gpu_kernel_busy_ms over the kernels and memsets,
    gpu_copy_ms over the memory copies (the tier's swap kernel among them), and their count."""
    spans = [(start, end) for _, start, end in activities]
    kernels = [(start, end) for name, start, end in activities if not is_copy(name)]
    copies = [(start, end) for name, start, end in activities if is_copy(name)]
    busy_ms, span_ms = device_busy_ms(spans)
    return {"gpu_busy_ms": busy_ms, "gpu_span_ms": span_ms, "gpu_kernel_busy_ms": device_busy_ms(kernels)[0],
            "gpu_copy_ms": device_busy_ms(copies)[0], "device_activities": len(spans)}


class GpuBusyWorker:
    """Mixed into vLLM's worker (worker_extension_cls); called through LLM.collective_rpc. The
    profiler traces the device only (no CPU ops recorded): the host work it adds is CUPTI's
    callbacks, and it never runs inside a measured round."""

    def pcb_gpu_busy_start(self) -> bool | str:
        """Open the window: True, False where the worker has no CUDA device (nothing to trace),
        or why the profiler could not start (a line)."""
        import torch

        self.pcb_profiler = None
        if not torch.cuda.is_available():
            return False
        try:
            from torch.profiler import ProfilerActivity, profile
            torch.cuda.synchronize()
            self.pcb_profiler = profile(activities=[ProfilerActivity.CUDA])
            self.pcb_profiler.start()
        except Exception as e:              # no CUPTI, a profiler already running: the run goes on without
            self.pcb_profiler = None
            return f"{type(e).__name__}: {e}".splitlines()[0]
        return True

    def pcb_gpu_busy_stop(self) -> dict[str, Any] | None:
        """Close the window: busy_by_kind's figures, {"error": why}, or None where none was open."""
        import torch

        profiler, self.pcb_profiler = getattr(self, "pcb_profiler", None), None
        if profiler is None:
            return None
        try:
            from torch.autograd import DeviceType
            torch.cuda.synchronize()
            profiler.stop()
            activities = [(e.name(), e.start_ns(), e.end_ns()) for e in profiler.profiler.kineto_results.events()
                          if e.device_type() == DeviceType.CUDA]
        except Exception as e:
            return {"gpu_busy_ms": None, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
        return busy_by_kind(activities)


class ProfiledRequest:
    """engine.gpu_busy_request as a request function (what TierRequest and run_trial call); keeps
    the last request's device activity."""
    activity: dict[str, Any] | None

    def __init__(self, engine: Engine):
        self.engine, self.activity = engine, None

    def __call__(self, prompt_ids: list[int], max_tokens: int, cache_salt: str | None = None) -> RequestResult:
        result, self.activity = self.engine.gpu_busy_request(prompt_ids, max_tokens, cache_salt)
        return result


def profiled_segment(engine: Engine, configs: Sequence[ConfigPrompts], conditions: Sequence[str], count: int, first_round: int,
                     block: int, hit_salt: str | None, pause_s: float) -> list[tuple[list[dict[str, Any]], list[str]]]:
    """count TTFT requests of every config's every condition, each alone in a GPU-busy window,
    in rounds after the measured ones (first_round on: fresh queries). The cache holds what the
    rounds left, so each condition's request finds what it promises; the audit's expectation is
    checked on each. Returns, per config, (records, problems)."""
    out: list[tuple[list[dict[str, Any]], list[str]]] = [([], []) for _ in configs]
    for r in range(first_round, first_round + count):
        for k, c in enumerate(configs):
            for condition in conditions:
                (prompt_ids, salt), _ = c.trial_prompts(condition, r)
                profiled = ProfiledRequest(engine)
                request = TierRequest(engine, configs, k, hit_salt, send=profiled) if condition == TIER_CONDITION \
                    else profiled
                result = request(prompt_ids, 1, salt)
                time.sleep(pause_s)
                want = expected_cached_tokens(condition, len(c.warmup_ids), block)
                records, problems = out[k]
                records.append({"condition": condition, "round": r, "prompt_tokens": result.prompt_tokens,
                                "cached_tokens": result.cached_tokens, "expected_cached_tokens": want,
                                "hbm_cached_tokens": result.hbm_cached_tokens,
                                "tier_cached_tokens": result.tier_cached_tokens,
                                "ttft_ms_profiled": result.client_ttft_ms, "prefill_step_ms_profiled": result.prefill_ms,
                                **(profiled.activity or {"gpu_busy_ms": None})})
                if result.cached_tokens != want:
                    problems.append(f"{condition} profiled request {r}: cached_tokens={result.cached_tokens}, "
                                    f"expected {want}")
                    records[-1]["broke_its_condition"] = True
                elif (source := source_problem(condition, records[-1], TIER_CONDITION in conditions)) is not None:
                    problems.append(f"{condition} profiled request {r}: {source}")
                    records[-1]["broke_its_condition"] = True
    return out


def segment_summary(records: Sequence[Mapping[str, Any]], requests_per_condition: int) -> dict[str, Any]:
    """A result's "gpu_busy": the method, every profiled request, and per condition the GPU-busy
    mean (min, max) and span mean over the requests that found what they promised."""
    by_condition: dict[str, dict[str, Any]] = {}
    for condition in dict.fromkeys(x["condition"] for x in records):
        # profiled_segment marks a request that found other than it promised (broke_its_condition)
        good = [x for x in records if x["condition"] == condition and x["gpu_busy_ms"] is not None
                and not x.get("broke_its_condition")]
        if good:
            busy = [x["gpu_busy_ms"] for x in good]
            by_condition[condition] = {"requests": len(good), "gpu_busy_mean_ms": float(np.mean(busy)),
                                       "gpu_busy_min_ms": min(busy), "gpu_busy_max_ms": max(busy),
                                       "gpu_span_mean_ms": float(np.mean([x["gpu_span_ms"] for x in good]))}
            if all("gpu_kernel_busy_ms" in x for x in good):       # records from before the kinds were told apart lack it
                by_condition[condition].update(
                    gpu_kernel_busy_mean_ms=float(np.mean([x["gpu_kernel_busy_ms"] for x in good])),
                    gpu_copy_mean_ms=float(np.mean([x["gpu_copy_ms"] for x in good])))
    return {"method": METHOD, "requests_per_condition": requests_per_condition, "by_condition": by_condition,
            "requests": records}


def merge_segments(segments: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """One config's segments from several engine processes as one: every request tagged with its process."""
    measured = [s for s in segments if s and "requests" in s]
    if not measured:
        return segments[0]
    records = [{**x, "process": k} for k, s in enumerate(segments) if s and "requests" in s for x in s["requests"]]
    return segment_summary(records, measured[0]["requests_per_condition"])
