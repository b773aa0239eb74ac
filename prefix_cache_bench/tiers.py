"""A second cache tier behind the GPU's prefix cache (vLLM's native host-memory tier, LMCache, any
KV connector that serves prefixes): what the engine has, the refusal of a tier that cannot run
here, the connector's load counters, and the cache_tier condition's request: HBM's prefix cache
emptied, the request, the other configs' [A, B] loaded back. No vLLM import at module level.
"""
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .defaults import HBM_RESET_TIMEOUT_S, TIER_CONDITION
from .engine_api import Engine, RequestResult
from .errors import EXIT_USAGE, ExperimentError

# OffloadingConnectorStats' counters (vLLM 0.26): bytes and seconds of the tier -> HBM copies
LOAD_BYTES, LOAD_TIME_S = "vllm:kv_offload_load_bytes", "vllm:kv_offload_load_time"


# The host link's copy rate into GPU memory, measured in a process of its own before the engine
# starts (no CUDA context is left in this one): LINK_PROBE_BYTES from pinned and from pageable host
# memory, LINK_PROBE_REPEATS timed copies each after an untimed one; the median rate of each.
LINK_PROBE_BYTES = 1 << 30
LINK_PROBE_REPEATS = 5
LINK_PROBE_TIMEOUT_S = 180
LINK_PROBE = r"""
import json, statistics, sys, time
import torch
size, repeats = int(sys.argv[1]), int(sys.argv[2])
if not torch.cuda.is_available():
    print(json.dumps({"error": "torch sees no CUDA device"}))
    sys.exit()
target = torch.empty(size, dtype=torch.uint8, device="cuda")
found = {"bytes": size, "repeats": repeats, "device": torch.cuda.get_device_name(0)}
for kind, pinned in (("pinned", True), ("pageable", False)):
    source = torch.ones(size, dtype=torch.uint8, pin_memory=pinned)
    target.copy_(source, non_blocking=pinned)
    torch.cuda.synchronize()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source, non_blocking=pinned)
        torch.cuda.synchronize()
        rates.append(size / (time.perf_counter() - start) / 1e9)
    found[kind + "_gb_s"] = statistics.median(rates)
    found[kind + "_gb_s_per_copy"] = rates
    del source
print(json.dumps(found))
"""


def has_nvidia_gpu() -> bool:
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


def measure_host_link(python: str = sys.executable) -> dict[str, Any] | None:
    """The host -> GPU copy rates (GB/s, 1e9 bytes) from pinned and from pageable memory, measured
    by LINK_PROBE in a process of its own: what a host-memory tier's copies are set against. None
    on a machine without an NVIDIA GPU; {"error": why} where the probe failed."""
    if not has_nvidia_gpu():
        return None
    try:
        proc = subprocess.run([python, "-c", LINK_PROBE, str(LINK_PROBE_BYTES), str(LINK_PROBE_REPEATS)],
                              capture_output=True, text=True, timeout=LINK_PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"the copy probe took longer than {LINK_PROBE_TIMEOUT_S} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {"error": f"the copy probe failed: {last}"}
    return json.loads(lines[-1])


def measure_link_for_tier(has_tier: bool) -> dict[str, Any]:
    """{"host_link": rates} for a result's environment where the engine has a tier and the rates
    could be measured here (a line printed either way), else {}."""
    link = measure_host_link() if has_tier else None
    if link is None:
        return {}
    if "error" in link:
        print(f"note: the host link's copy rate was not measured: {link['error']}", flush=True)
    else:
        print(f"host link into the GPU: {link['pinned_gb_s']:.1f} GB/s from pinned memory, "
              f"{link['pageable_gb_s']:.1f} GB/s from pageable ({link['bytes'] / 2 ** 30:g} GiB copies)", flush=True)
    return {"host_link": link}


def describe_tier(vllm_config: Any) -> dict[str, Any] | None:
    """What a result records of the engine's tier, or None where it has no KV connector."""
    transfer = vllm_config.kv_transfer_config
    if transfer is None or not transfer.kv_connector:
        return None
    cache = vllm_config.cache_config
    size_gib = getattr(cache, "kv_offloading_size", None)
    return {"connector": transfer.kv_connector,
            "backend": getattr(cache, "kv_offloading_backend", None) if size_gib else "--kv-transfer-config",
            "size_gib": size_gib,
            "extra_config": json.loads(json.dumps(transfer.kv_connector_extra_config or {}, default=str))}


def flag_value(flags: Sequence[str], *names: str) -> str | None:
    """The value of a vLLM flag in a flag list, under any of its names (--name VALUE or
    --name=VALUE; vLLM takes _ for -): as given, "" where the flag ends the list, None if absent."""
    for k, flag in enumerate(flags):
        name, _, value = flag.partition("=")
        if name.replace("_", "-") in names:
            return value or (flags[k + 1] if k + 1 < len(flags) else "")
    return None


def offloading_connector(backend: str | None, environ: Mapping[str, str]) -> str | None:
    """The KV connector vLLM builds for --kv-offloading-backend (vllm/config/vllm.py), None for none."""
    if backend == "native":
        simple = environ.get("VLLM_USE_SIMPLE_KV_OFFLOAD", "0").strip().lower() in ("1", "true")
        return "SimpleCPUOffloadConnector" if simple else "OffloadingConnector"
    return {"lmcache": "LMCacheMPConnector"}.get(backend or "")


def tier_from_flags(vllm_flags: Sequence[str]) -> dict[str, Any] | None:
    """What a result records of an embedded server's tier, from its vLLM flags; None without one."""
    size, config = flag_value(vllm_flags, "--kv-offloading-size"), flag_value(vllm_flags, "--kv-transfer-config")
    if size is None and config is None:
        return None
    try:
        extra = json.loads(config) if config else {}
        size_gib = float(size) if size else None
    except ValueError as e:
        raise ExperimentError(f"--kv-offloading-size must be a number of GiB and --kv-transfer-config JSON: {e}",
                              EXIT_USAGE)
    if not isinstance(extra, dict):
        raise ExperimentError(f"--kv-transfer-config must be a JSON object, got {config!r}", EXIT_USAGE)
    backend = (flag_value(vllm_flags, "--kv-offloading-backend") or "native") if size else None
    return {"connector": extra.get("kv_connector") or offloading_connector(backend, os.environ),
            "backend": backend or "--kv-transfer-config",
            "size_gib": size_gib, "extra_config": extra.get("kv_connector_extra_config", {})}


def check_tier_can_start(kv_offloading_size: float | str | None, kv_offloading_backend: str | None) -> None:
    """One line, before any engine starts, for a tier that cannot run on this machine (vLLM
    itself fails only once its workers start, after a minute of setup)."""
    if kv_offloading_size is None:
        return
    from vllm.platforms import current_platform
    if (kv_offloading_backend or "native") == "native" and current_platform.is_cpu():
        raise ExperimentError("--kv-offloading-size: vLLM's native host-memory tier runs on CUDA and XPU GPUs only, "
                              "not on this CPU engine; on a CPU give a tier with --kv-transfer-config (docs/tiers.md)")
    if kv_offloading_backend == "lmcache":
        import importlib.util
        if importlib.util.find_spec("lmcache") is None:
            raise ExperimentError("--kv-offloading-backend lmcache: LMCache is not installed here (pip install lmcache)")


def connector_load(payload: object) -> tuple[float, float]:
    """(bytes, seconds) that one kv_connector_stats payload of the engine's stats messages says
    were loaded from the tier into HBM; (0, 0) where the connector reports no such counters."""
    data = (payload or {}).get("data") if isinstance(payload, dict) else None
    if not isinstance(data, dict):
        return 0, 0.0
    total = lambda name: sum(v for v in (data.get(name) or {}).values() if isinstance(v, (int, float)))
    return total(LOAD_BYTES), float(total(LOAD_TIME_S))


def empty_hbm(engine: Engine, timeout_s: float = HBM_RESET_TIMEOUT_S) -> None:
    """Empty the GPU prefix cache and keep the tier's (engine.empty_hbm_prefix_cache). vLLM
    refuses while blocks are held, as by an offload to the tier still in flight: retried."""
    deadline = time.monotonic() + timeout_s
    while not engine.empty_hbm_prefix_cache():
        if time.monotonic() > deadline:
            raise ExperimentError(f"the GPU prefix cache could not be emptied for the {TIER_CONDITION} condition "
                                  f"within {timeout_s:.0f} s (blocks still held)")
        time.sleep(0.01)


class TierRequest:
    """The cache_tier condition's request for config k: HBM's prefix cache is emptied (untimed),
    so the request must find [A, B] in the tier; then every other config's [A, B] is requested
    once more (untimed, each a tier hit), so that HBM holds what the other conditions expect.
    Config k's own [A, B] is back in HBM by the request itself. The untimed requests are kept
    (restores) for the audit. send: what sends the request itself (default engine.request)."""

    # configs: prompts.ConfigPrompts, a module of this layer (not imported); send: a request function
    def __init__(self, engine: Engine, configs: Sequence[Any], k: int, hit_salt: str | None,
                 send: Callable[[list[int], int, str | None], RequestResult] | None = None):
        self.engine, self.others, self.hit_salt = engine, [c for j, c in enumerate(configs) if j != k], hit_salt
        self.send = send or engine.request
        self.restores: list[dict[str, Any]] = []

    def __call__(self, prompt_ids: list[int], max_tokens: int, cache_salt: str | None = None) -> RequestResult:
        empty_hbm(self.engine)
        result = self.send(prompt_ids, max_tokens, cache_salt)
        for c in self.others:
            self.restores.append(self.engine.request(c.warmup_ids, 1, self.hit_salt).as_json())
        return result
