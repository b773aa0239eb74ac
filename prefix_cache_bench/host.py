"""The machine a result came from, and how fast its host runs Python.

Much of a cache hit's TTFT is host work, not GPU work: the frontend, the scheduler, the IPC
between them. So two machines with the same GPU give different hit TTFTs when their hosts
differ. host_speed() is a fixed pure-Python workload, the same instructions on every machine,
whose time says how fast this host runs code of that kind. Imports neither vLLM nor torch.
"""
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from typing import Any

# The workload: integer arithmetic and dict updates, as a scheduler's bookkeeping does. Fixed,
# so that its time is comparable across machines and runs (21.8 ms on the 2-core AMD EPYC test machine, idle).
HOST_LOOP_ITERATIONS = 200_000
HOST_LOOP_REPEATS = 7


def python_loop_ms(iterations: int = HOST_LOOP_ITERATIONS, repeats: int = HOST_LOOP_REPEATS) -> float:
    """The fixed workload's best time of `repeats`, in ms. The best, not the mean: it is the
    host's speed with the least interference from whatever else ran at that moment."""
    best_s = float("inf")
    for _ in range(repeats):
        counts: dict[int, int] = {}
        start = time.perf_counter()
        for i in range(iterations):
            key = i & 1023
            counts[key] = counts.get(key, 0) + i * i
        best_s = min(best_s, time.perf_counter() - start)
    return best_s * 1e3


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo, or None where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def nvidia_smi(fields: Sequence[str], keys: Sequence[str]) -> list[dict[str, str]] | None:
    """[{key: value} per GPU] of an nvidia-smi query; None where there is no nvidia-smi, or it
    fails (a field this driver does not know fails the whole query)."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [dict(zip(keys, (value.strip() for value in line.split(",")))) for line in out.strip().splitlines()]


def gpu_clocks() -> list[dict[str, str]] | None:
    """Each GPU's name, driver and clocks (MHz, now and at most), and its host link (PCIe
    generation and width, now and at most: what bounds a copy from a host-memory tier; an idle
    GPU may show a lower generation now), as nvidia-smi reports them; None where it cannot."""
    gpus = nvidia_smi(["name", "driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem"],
                      ["name", "driver_version", "sm_clock_mhz", "max_sm_clock_mhz", "memory_clock_mhz",
                       "max_memory_clock_mhz"])
    links = nvidia_smi(["pcie.link.gen.current", "pcie.link.gen.max", "pcie.link.width.current", "pcie.link.width.max"],
                       ["pcie_gen", "max_pcie_gen", "pcie_width", "max_pcie_width"])
    if gpus and links and len(links) == len(gpus):
        gpus = [{**gpu, **link} for gpu, link in zip(gpus, links)]
    return gpus


def machine_info() -> dict[str, Any]:
    """What a result records of its machine: the CPU, the cores this process may use, the
    host-speed figure, and the GPUs' driver and clocks where readable."""
    return {
        "cpu_model": cpu_model(),
        "cpu_logical_cores": os.cpu_count(),
        "cpu_usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "host_python_loop_ms": round(python_loop_ms(), 3),
        "host_python_loop_iterations": HOST_LOOP_ITERATIONS,
        "gpus": gpu_clocks(),
    }
