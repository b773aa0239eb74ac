"""The processes phase 1 starts: `vllm serve`, vllm-router, and a fleet of replicas. Each is a
context manager: stopped (SIGTERM to its process group, then SIGKILL) at the end, on error and on
Ctrl-C.
"""
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .defaults import DETAILS_FLAG, EMBEDDED_KEEP_ALIVE_S, IDEAL, SERVER_STOP_GRACE_S
from .engine_api import LoadServer
from .errors import ERROR_LINE, ExperimentError


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ExperimentError(f"--port {port}: {host}:{port} is already in use ({e.strerror}); choose another "
                                  f"port, or leave --port out to take a free one")


# vLLM's prefix on a process's log lines ("(EngineCore pid=7) ", "(VllmWorker rank=0 pid=9) ") and
# on logged errors ("ERROR 11-29 18:21:19 [core.py:1330] ")
LOG_PREFIX = re.compile(r"^(?:\([^)]*pid=\d+\) )?(?:ERROR [\d-]+ [\d:]+ \[[^\]]*\] )?")


# an exception's own line after that prefix: "ValueError: To serve at least one request ...", or a bare "AssertionError"
EXCEPTION_LINE = re.compile(LOG_PREFIX.pattern + r"((?:[\w.]+\.)?\w*(?:Error|Exception)(?:: .*)?)$")


# what a process prints when another one failed first: the cause is elsewhere in the log
GENERIC_FAILURE = re.compile(r"root cause|Engine core initialization failed", re.IGNORECASE)


def error_line(path: str, last: bool = False) -> str:
    """Why a server failed, in one line of its log: the first exception it names (the last,
    for a server that died after running a while), passing over a "see the root cause above"
    from a process that only saw another one fail; else such a line; else the first line that
    names an error; else the last line."""
    try:
        with open(path, "rb") as f:
            lines = [line.decode(errors="replace").strip() for line in f.read().splitlines()]
    except OSError:
        return "no log"
    found = [(i, m.group(1)) for i, m in ((i, EXCEPTION_LINE.match(line)) for i, line in enumerate(lines)) if m]
    causes = [(i, text) for i, text in found if not GENERIC_FAILURE.search(text)]
    if causes:
        i, text = causes[-1] if last else causes[0]
        # pydantic says what is wrong on the next line: "  Value error, User-specified ... [type=...]"
        if re.search(r"\d+ validation errors? for ", text) and i + 1 < len(lines):
            return f"{text}: {LOG_PREFIX.sub('', lines[i + 1]).strip().split(' [type=')[0]}"
        return text
    if found:
        return found[0][1]
    for line in lines:
        if ERROR_LINE.search(line.encode()):
            return line
    return lines[-1] if lines else "the log is empty"


class ManagedProcess:
    """A server this tool starts (a `vllm serve`, a router) as a child process in a session of
    its own, so that stop() ends it and every process it started. Its output goes to a log
    file. Subclasses set command, base_url, environment and what (its name in messages)."""
    what = "the server"
    log_prefix = "phase1-server-"
    command: list[str]                  # set by the subclass
    base_url: str
    environment: dict[str, str]
    proc: subprocess.Popen[bytes] | None
    start_s: float | None
    t0: float | None

    def __init__(self) -> None:
        fd, self.log_path = tempfile.mkstemp(prefix=self.log_prefix, suffix=".log")
        os.close(fd)
        self.proc, self.start_s, self.t0 = None, None, None

    def __enter__(self):
        """The process is started by start(); leaving the block stops it, however it is left."""
        return self

    def __exit__(self, *exc):
        self.stop()

    def launch(self) -> None:
        """Start the process; wait_ready() then waits for it."""
        self.t0 = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env=self.environment)
        print(f"starting {self.what} (pid {self.proc.pid}): {shlex.join(self.command)}\nlog: {self.log_path}",
              flush=True)

    def wait_ready(self, timeout_s: float) -> None:
        """Wait until /health answers 200; raise if the process exits or the time runs out."""
        import urllib.error
        import urllib.request

        if self.proc is None or self.t0 is None:
            raise RuntimeError(f"{self.what}: wait_ready() before launch()")
        while time.perf_counter() - self.t0 < timeout_s:
            if self.proc.poll() is not None:
                raise ExperimentError(f"{self.what} exited with code {self.proc.returncode} during its start: "
                                      f"{error_line(self.log_path)} (log: {self.log_path})")
            try:
                # straight to the server: a proxy from the environment must not sit in between
                with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                        self.base_url + "/health", timeout=2) as response:
                    if response.status == 200:
                        self.start_s = time.perf_counter() - self.t0
                        print(f"{self.what} ready in {self.start_s:.1f} s", flush=True)
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise ExperimentError(f"{self.what} was not ready within --server-start-timeout {timeout_s:g} s "
                              f"(log: {self.log_path})")

    def start(self, timeout_s: float) -> None:
        self.launch()
        self.wait_ready(timeout_s)

    def death(self, wait_s: float = 2) -> str | None:
        """One line if the process has exited (or does within wait_s: a broken connection can be
        seen before the process is gone), else None."""
        if self.proc is None:
            return None
        try:
            self.proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            return None
        return (f"{self.what} (pid {self.proc.pid}) exited with code {self.proc.returncode} during the run: "
                f"{error_line(self.log_path, last=True)} (log: {self.log_path})")

    def stop(self) -> None:
        """SIGTERM to the process's whole group, SIGKILL to whatever is left after the grace."""
        if self.proc is None:
            return
        for sig, grace in ((signal.SIGTERM, SERVER_STOP_GRACE_S), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                self.proc.poll()
                try:
                    os.killpg(self.proc.pid, 0)         # anyone left in the group?
                except ProcessLookupError:
                    break
                time.sleep(0.2)
            else:
                continue
            break
        self.proc.wait()


class EmbeddedServer(ManagedProcess):
    """`vllm serve` as a child process (ManagedProcess): its engine core and workers stop with it."""
    what = "the vLLM server"
    log_prefix = "phase1-vllm-serve-"

    def __init__(self, model: str, host: str, port: int, vllm_flags: Sequence[str],
                 extra_env: Mapping[str, str] | None = None, name: str | None = None):
        super().__init__()
        self.model = model
        if name:
            self.what = f"the vLLM server {name}"
        self.command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                        "--host", host, "--port", str(port), DETAILS_FLAG, "--enable-prefix-caching", *vllm_flags]
        self.base_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
        self.environment = {**os.environ, "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": str(EMBEDDED_KEEP_ALIVE_S),
                            **(extra_env or {})}


class RouterProcess(ManagedProcess):
    """vllm-router (the Rust router from the package index) in front of the replicas. Its
    Prometheus listener is set to a port of its own."""
    what = "vllm-router"
    log_prefix = "phase1-vllm-router-"

    def __init__(self, worker_urls: Sequence[str], policy: str, host: str, port: int, router_args: Sequence[str]):
        super().__init__()
        binary = shutil.which("vllm-router") or os.path.join(os.path.dirname(sys.executable), "vllm-router")
        if not os.path.exists(binary):
            raise ExperimentError("vllm-router is not installed: `pip install vllm-router`, or use --router dp")
        self.policy = policy
        self.what = f"vllm-router ({policy})"
        self.prometheus_port = free_port(host)
        self.command = [binary, "--host", host, "--port", str(port), "--worker-urls", *worker_urls, "--policy", policy,
                        "--prometheus-host", host, "--prometheus-port", str(self.prometheus_port), *router_args]
        self.base_url = f"http://{host}:{port}"
        self.environment = dict(os.environ)


def replica_devices(index: int, vllm_flags: Sequence[str]) -> str:
    """CUDA_VISIBLE_DEVICES of replica `index`: the next tensor x pipeline parallel GPUs."""
    sizes = {"--tensor-parallel-size": 1, "--pipeline-parallel-size": 1, "-tp": 1, "-pp": 1}
    for k, flag in enumerate(vllm_flags):
        name, _, value = flag.partition("=")
        if name in sizes:
            sizes[name] = int(value or vllm_flags[k + 1])
    per = max(sizes["--tensor-parallel-size"], sizes["-tp"]) * max(sizes["--pipeline-parallel-size"], sizes["-pp"])
    return ",".join(str(d) for d in range(index * per, (index + 1) * per))


class Fleet:
    """--replicas N: N `vllm serve` processes (one per GPU, or per group of GPUs), and in front
    of them vllm-router with one policy at a time; or, with --router dp, one `vllm serve
    --data-parallel-size N`. The policy `ideal` has no front: the client sends each document
    to a replica of its own. Every part is stopped at the end, on error and on Ctrl-C."""

    def __init__(self, model: str, host: str, replicas: int, vllm_flags: Sequence[str], router: str,
                 router_args: Sequence[str]):
        self.host, self.router_kind, self.router_args = host, router, router_args
        if router == "dp":
            self.replicas = [EmbeddedServer(model, host, free_port(host), [*vllm_flags, "--data-parallel-size",
                                                                           str(replicas)], name="(data parallel)")]
        else:
            ports: set[int] = set()
            while len(ports) < replicas:
                ports.add(free_port(host))
            self.replicas = [EmbeddedServer(model, host, port, vllm_flags, name=f"replica {k}",
                                            extra_env={"CUDA_VISIBLE_DEVICES": replica_devices(k, vllm_flags)})
                             for k, port in enumerate(sorted(ports))]
        self.router: RouterProcess | None = None
        self.model = model

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self, timeout_s: float) -> None:
        """All replicas at once (each start waits on its own compile and load), then each ready."""
        for replica in self.replicas:
            replica.launch()
        for replica in self.replicas:
            replica.wait_ready(timeout_s)

    def start_router(self, policy: str, timeout_s: float) -> str:
        """The front for one policy (none for --router dp, or for the policy ideal); its base URL."""
        if self.router_kind == "dp" or policy == IDEAL:
            return self.replicas[0].base_url
        self.router = RouterProcess([r.base_url for r in self.replicas], policy, self.host, free_port(self.host),
                                    self.router_args)
        self.router.start(timeout_s)
        return self.router.base_url

    def stop_router(self) -> None:
        if self.router:
            self.router.stop()
            self.router = None

    @property
    def metrics_urls(self) -> list[str]:
        return [r.base_url for r in self.replicas]

    def death(self) -> str | None:
        """One line for every part that has exited, or None."""
        dead = [line for part in ([self.router] if self.router else []) + self.replicas
                for line in [part.death(wait_s=0.5)] if line]
        return "; ".join(dead) or None

    def stop(self) -> None:
        try:
            self.stop_router()
        finally:
            for replica in self.replicas:
                replica.stop()


def fleet_environment(fleet: Fleet, policy: str, engine: LoadServer) -> dict[str, Any]:
    """What the JSON records of a fleet: the front, the replicas, their KV capacities."""
    return {"front": policy, "router": fleet.router_kind,
            "router_command": shlex.join(fleet.router.command) if fleet.router else None,
            "replicas": [{"base_url": r.base_url, "command": shlex.join(r.command), "start_s": r.start_s,
                          "cuda_visible_devices": r.environment.get("CUDA_VISIBLE_DEVICES"), "log": r.log_path}
                         for r in fleet.replicas],
            "kv_capacity_tokens_per_engine": engine.replica_capacities()}
