"""The prefill fit: TTFT = overhead + prefill FLOPs / rate over a model's configs, the TFLOP/s
and MFU it implies, and the FLOPs of a prefill from the model's recorded shape.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from .provenance import gpus_used, parallel_sizes
from .settings import Config


# Dense bf16/fp16 tensor peak (TFLOP/s, no sparsity), from the vendors' datasheets, for MFU.
# Matched against the recorded device name, in this order; other devices get no MFU.
PEAK_TFLOPS = (("H100 PCIe", 756), ("H200", 989), ("H100", 989), ("A100", 312), ("L40S", 362), ("L4", 121))


# HBM bandwidth (TB/s) from the same datasheets (H200 SXM 4.8, H100 SXM 3.35, H100 PCIe 2.0,
# A100 80GB SXM 2.039, L40S 0.864, L4 0.3), matched like PEAK_TFLOPS.
MEMORY_TB_S = (("H100 PCIe", 2.0), ("H200", 4.8), ("H100", 3.35), ("A100", 2.039), ("L40S", 0.864), ("L4", 0.3))
DTYPE_BYTES: dict[str | None, int] = {"bfloat16": 2, "float16": 2, "float32": 4}


def memory_tb_s(device: str | None) -> float | None:
    return next((tb_s for name, tb_s in MEMORY_TB_S if name in (device or "")), None)


def gpu_floor(shape: Mapping[str, Any] | None, device: str | None, new_tokens: float, cached_tokens: float = 0,
              gpus: int = 1) -> dict[str, Any] | None:
    """The least time the GPU(s) need for one prefill step of new_tokens behind cached_tokens:
    the bytes it must read at the memory bandwidth, or its FLOPs at the dense peak, whichever is
    longer. The bytes: every weight once (of the token embedding only a few rows: the non-
    embedding weights plus the LM head, hidden x vocab) and the K and V of every token the
    attention reads (cached and new). gpus: tensor parallel GPUs, which share both. None where
    the device is not in the tables or the file records no model shape."""
    bandwidth, peak = memory_tb_s(device), peak_tflops(device)
    needed = ("num_parameters", "num_embedding_parameters", "hidden_size", "vocab_size", "num_layers",
              "num_attention_heads", "num_kv_heads", "head_dim")
    if not bandwidth or not peak or not shape or any(shape.get(key) is None for key in needed):
        return None
    width = DTYPE_BYTES.get(shape.get("dtype"), 2)
    weights = shape["num_parameters"] - shape["num_embedding_parameters"] + shape["hidden_size"] * shape["vocab_size"]
    kv_per_token = 2 * shape["num_layers"] * shape["num_kv_heads"] * shape["head_dim"]
    bytes_read = width * (weights + kv_per_token * (cached_tokens + new_tokens))
    flops = prefill_flops(shape, new_tokens, cached_tokens)
    memory_ms = bytes_read / (bandwidth * 1e12 * gpus) * 1e3
    compute_ms = flops / (peak * 1e12 * gpus) * 1e3
    return {"floor_ms": max(memory_ms, compute_ms), "memory_ms": memory_ms, "compute_ms": compute_ms,
            "bytes_read": bytes_read, "flops": flops, "bound": "memory" if memory_ms >= compute_ms else "compute",
            "memory_tb_s": bandwidth * gpus, "peak_tflops": peak * gpus}


def condition_floor(data: Mapping[str, Any], condition: str) -> dict[str, Any] | None:
    """gpu_floor of one condition of a result file: its prompt and cached tokens, the file's
    device, model shape and tensor parallel size; None where any is not known."""
    env, stats = data.get("environment", {}), data.get(condition, {}).get("stats", {})
    prompt, cached = stats.get("prompt_tokens"), stats.get("cached_tokens")
    if prompt is None or cached is None:
        return None
    return gpu_floor(env.get("model_shape"), env.get("device"), prompt - cached, cached,
                     parallel_sizes(env)["TP"])


def prefill_flops(shape: Mapping[str, Any], new_tokens: float, cached_tokens: float = 0) -> float:
    """Forward FLOPs to prefill new_tokens behind cached_tokens already in the KV cache.

    2 per weight per new token (less the embedding, a lookup, and the LM head, which
    runs for the last token only: 2 x hidden x vocab once), plus attention: each new
    token's query meets every key before it, 2 x 2 x head_dim FLOPs (QK^T and AV) per
    key, per head, per layer."""
    weights = shape["num_parameters"] - shape["num_embedding_parameters"]
    keys = new_tokens * cached_tokens + new_tokens * (new_tokens + 1) / 2
    attention = 4 * shape["num_layers"] * shape["num_attention_heads"] * shape["head_dim"] * keys
    return 2 * weights * new_tokens + attention + 2 * shape["hidden_size"] * shape["vocab_size"]


def peak_tflops(device: str | None) -> float | None:
    return next((peak for name, peak in PEAK_TFLOPS if name in (device or "")), None)


def prefill_fit(configs: Mapping[Config, Mapping[str, Any]]) -> dict[str, Any] | None:
    """Fit TTFT = overhead + work / rate over the configs' uncached requests (cold and miss
    means). work is the prefill's FLOPs where the files record the model's shape (attention
    makes long prompts cost more than their token count says), else its token count.
    None for fewer than 3 configs: too few lengths to tell overhead from rate."""
    points = []                                           # (prompt tokens, TTFT ms)
    for data in configs.values():
        for cond in ("cache_cold", "cache_miss"):
            stats = data.get(cond, {}).get("stats", {})
            if "ttft_mean" in stats and "prompt_tokens" in stats:
                points.append((stats["prompt_tokens"], stats["ttft_mean"]))
    if len(configs) < 3 or len({tokens for tokens, _ in points}) < 3:
        return None
    first = next(iter(configs.values())).get("environment", {})
    shape = first.get("model_shape") or {}
    if not (shape.get("num_parameters") and shape.get("num_embedding_parameters") is not None):
        shape = None
    ttft = np.array([t for _, t in points])
    work = np.array([prefill_flops(shape, n) if shape else n for n, _ in points], float)
    ms_per_work, overhead_ms = np.polyfit(work, ttft, 1)
    if not shape and overhead_ms < 0:
        # a line in tokens that needs a negative fixed cost: attention makes long prompts dearer
        # than their token count says, and without the model's shape the FLOPs are not known
        return None
    fit = {"points": len(points), "configs": len(configs), "shape": shape, "overhead_ms": overhead_ms,
           "ms_per_work": ms_per_work, "work": "FLOPs" if shape else "tokens",
           "r2": 1 - np.sum((ttft - overhead_ms - ms_per_work * work) ** 2) / np.sum((ttft - ttft.mean()) ** 2),
           "tflops": None, "mfu": None, "gpus": gpus_used(first), "peak_tflops": None}
    if peak_tflops(first.get("device")):                  # tensor/pipeline parallel: the peak of all GPUs used
        fit["peak_tflops"] = peak_tflops(first.get("device")) * fit["gpus"]
    if shape:
        fit["tflops"] = 1e3 / ms_per_work / 1e12
        fit["mfu"] = fit["tflops"] / fit["peak_tflops"] if fit["peak_tflops"] else None
        # on short prompts attention is negligible: 2 FLOPs per weight per token
        fit["prefill_tokens_per_s"] = fit["tflops"] * 1e12 / (2 * (shape["num_parameters"] - shape["num_embedding_parameters"]))
    else:
        fit["prefill_tokens_per_s"] = 1e3 / ms_per_work
    # what each config's hit saves, per 1k cached tokens (it grows with the context: attention)
    fit["saved_ms_per_1k_cached"] = [(d["cache_hit"]["stats"]["cached_tokens"],
                                      1e3 * d["ttft_saving_ms"] / d["cache_hit"]["stats"]["cached_tokens"])
                                     for d in configs.values()
                                     if isinstance(d.get("ttft_saving_ms"), (int, float))
                                     and d["cache_hit"]["stats"].get("cached_tokens")]
    return fit


def predicted_ttft_ms(fit: Mapping[str, Any], new_tokens: float, cached_tokens: float = 0) -> float:
    work = prefill_flops(fit["shape"], new_tokens, cached_tokens) if fit["shape"] else new_tokens
    return fit["overhead_ms"] + fit["ms_per_work"] * work


def describe_fit(fit: Mapping[str, Any], device: str | None) -> str:
    """The fit in words, for the console."""
    text = (f"TTFT = {fit['overhead_ms']:.1f} ms + prefill {fit['work']} / rate, fitted to {fit['points']} cold/miss "
            f"means of {fit['configs']} configs (R^2 {fit['r2']:.3f}): prefill {fit['prefill_tokens_per_s']:,.0f} tokens/s")
    if fit["tflops"]:
        gpus = fit.get("gpus", 1)
        devices = f"the {device}'s" if gpus == 1 else f"{gpus} x {device}: together"
        text += (f" on short prompts, {fit['tflops']:.0f} TFLOP/s achieved" +
                 (f" = {100 * fit['mfu']:.0f}% MFU of {devices} {fit['peak_tflops']} dense bf16/fp16 TFLOP/s"
                  if fit["mfu"] else ""))
    if fit["saved_ms_per_1k_cached"]:
        text += "\na hit saves, per 1k cached tokens: " + ", ".join(
            f"{ms:.1f} ms at {cached:,}" for cached, ms in sorted(fit["saved_ms_per_1k_cached"]))
    return text
