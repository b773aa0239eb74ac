"""Where a result came from, written and read back: the command, the git commit, the hash of the
entry script and of all the code (entry script plus this package), the machine; and, for a file
read later, the commit whose code has that hash.
"""
import functools
import hashlib
import math
import os
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from .result_schema import Provenance


ENV_PREFIXES = ("VLLM_", "NCCL_", "NVSHMEM_", "TORCH_SYMM_MEM_", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")


def engine_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment variables that change what vLLM and its libraries do, for the JSON
    (not keys or tokens)."""
    return {k: v for k, v in sorted(environ.items())
            if k.startswith(ENV_PREFIXES) and not re.search("KEY|TOKEN|SECRET|PASSWORD", k)}


PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(PACKAGE_DIR)          # where the entry scripts and the package sit
PACKAGE = os.path.basename(PACKAGE_DIR)


def code_sha256(named_texts: Iterable[tuple[str, bytes]]) -> str:
    """One hash of the tool's code: [(path relative to the repository, bytes)] of the entry
    script and every module of the package. Names are hashed with the texts, so a module
    renamed or added changes it too."""
    return code_sha256_of((name, hashlib.sha256(text).hexdigest()) for name, text in named_texts)


def code_sha256_of(named_sha256s: Iterable[tuple[str, str]]) -> str:
    """code_sha256 from [(path, sha256 of its bytes)]."""
    digest = hashlib.sha256()
    for name, text_sha256 in sorted(named_sha256s):
        digest.update(f"{name}\0{text_sha256}\n".encode())
    return digest.hexdigest()


def code_files(script: str) -> list[tuple[str, bytes]]:
    """[(name, bytes)] of the entry script and the package's modules, as they are on disk."""
    paths = [(os.path.basename(script), os.path.abspath(script))]
    paths += [(f"{PACKAGE}/{name}", os.path.join(PACKAGE_DIR, name))
              for name in sorted(os.listdir(PACKAGE_DIR)) if name.endswith(".py")]
    texts = []
    for name, path in paths:
        with open(path, "rb") as f:
            texts.append((name, f.read()))
    return texts


def provenance(argv: Sequence[str], prog: str, script: str) -> Provenance:
    """Where a result came from: the command as typed, and the tool's version: the git commit,
    whether the code differed from it (None where git cannot tell: no git, no checkout, a script
    outside it), the entry script's own hash and the hash of all the code (the entry script and
    the package), which name the code without git too."""
    try:
        commit: str | None = git_bytes("rev-parse", "HEAD").decode().strip()
    except (OSError, subprocess.SubprocessError):           # no git here, or not a checkout
        commit = None
    try:
        dirty = code_differs([os.path.realpath(script), PACKAGE_DIR]) if commit else None
    except (OSError, subprocess.SubprocessError):           # the script lies outside the checkout
        dirty = None
    texts = code_files(script)
    return {"command": shlex.join([os.path.basename(sys.executable), prog, *argv]),
            "tool_version": {"git_commit": commit, "git_dirty": dirty,
                             "script_sha256": hashlib.sha256(texts[0][1]).hexdigest(),
                             "code_sha256": code_sha256(texts)}}


def device_name() -> str:
    """The GPU as torch names it, or the CPU's model name."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        model = None
    return (model or platform.processor() or "cpu") + " (CPU)"


def installed_version(package: str) -> str | None:
    """A package's installed version, without importing it; None if it is not installed."""
    import importlib.metadata
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


SCRIPTS: dict[str | None, str] = {"phase1_server_api": "phase1_experiment.py", "phase2_python_api": "phase2_experiment.py"}


def git_bytes(*args: str) -> bytes:
    """What a git command in this repository printed, as bytes; raises OSError/SubprocessError."""
    return subprocess.run(["git", "-C", REPO_DIR, *args], capture_output=True, timeout=30, check=True).stdout


def code_differs(paths: Sequence[str]) -> bool:
    """Do these files (and those under these folders) differ from HEAD, a new file among them
    too? A result written into the checkout earlier does not make the code differ."""
    return bool(git_bytes("status", "--porcelain", "--untracked-files=all", "--", *paths).strip())


def tree_blobs(commit: str, paths: Iterable[str]) -> dict[str, str]:
    """{path: git blob id} of the files at these paths (and under them) in commit."""
    blobs = {}
    for line in git_bytes("ls-tree", "-r", commit, "--", *paths).decode().splitlines():
        meta, path = line.split("\t", 1)
        blobs[path] = meta.split()[2]
    return blobs


def blob_sha256s(blob_ids: Iterable[str]) -> dict[str, str]:
    """{git blob id: sha256 of its bytes}, every blob read by one `git cat-file --batch`."""
    ids = sorted(set(blob_ids))
    out = subprocess.run(["git", "-C", REPO_DIR, "cat-file", "--batch"], input="".join(f"{i}\n" for i in ids).encode(),
                         capture_output=True, timeout=60, check=True).stdout
    sha256s, pos = {}, 0
    for blob_id in ids:                     # each: "<id> blob <size>\n", the bytes, "\n"
        header_end = out.index(b"\n", pos)
        size = int(out[pos:header_end].split()[2])
        sha256s[blob_id] = hashlib.sha256(out[header_end + 1:header_end + 1 + size]).hexdigest()
        pos = header_end + 1 + size + 1
    return sha256s


def commit_trees(paths: list[str]) -> Iterator[tuple[str, dict[str, str]]]:
    """(commit, {path: blob id}) of the commits that changed any of paths, newest first; each
    tree read as it is reached (code_commits stops at the first commit before the package)."""
    for commit in git_bytes("log", "--format=%h", "--", *paths).decode().split():
        yield commit, tree_blobs(commit, paths)


@functools.lru_cache(maxsize=None)
def script_commits(sha256: str, path: str = "phase2_experiment.py") -> tuple[str, ...]:
    """The commits of this repository whose script at path has this sha256, newest first
    (the last is the commit that made the file so): a result's script hash names the code that
    made it, also where its git_commit could not. For files made before the package existed,
    when the entry script was all the code."""
    try:
        trees = [(commit, blobs[path]) for commit, blobs in commit_trees([path]) if path in blobs]
        sha256s = blob_sha256s(blob for _, blob in trees)
        return tuple(commit for commit, blob in trees if sha256s[blob] == sha256)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return ()


@functools.lru_cache(maxsize=None)
def code_commits(sha256: str, script: str) -> tuple[str, ...]:
    """The commits whose entry script and package have this code_sha256 (the script and the
    package's own modules, as code_files reads them), newest first."""
    try:
        trees = []
        for commit, blobs in commit_trees([script, PACKAGE]):
            modules = {path: blob for path, blob in blobs.items()
                       if path.startswith(f"{PACKAGE}/") and path.count("/") == 1 and path.endswith(".py")}
            if not modules or script not in blobs:      # a commit from before the package: older ones too
                break
            trees.append((commit, {script: blobs[script], **modules}))
        sha256s = blob_sha256s(blob for _, files in trees for blob in files.values())
        return tuple(commit for commit, files in trees
                     if code_sha256_of((name, sha256s[blob]) for name, blob in files.items()) == sha256)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return ()


def parallel_sizes(environment: Mapping[str, Any]) -> dict[str, int]:
    """{'TP': n, 'PP': m} from the recorded engine flags (1 where a file does not say)."""
    engine = environment.get("engine_args") or {}
    return {"TP": engine.get("tensor_parallel_size") or 1, "PP": engine.get("pipeline_parallel_size") or 1}


def gpus_used(environment: Mapping[str, Any]) -> int:
    """GPUs one engine runs on: tensor x pipeline parallel size."""
    return math.prod(parallel_sizes(environment).values())


def devices_label(environment: Mapping[str, Any]) -> str | None:
    """'NVIDIA H200', or '2 x NVIDIA H200 (TP=2)' for an engine spread over several GPUs."""
    device = environment.get("device")
    sizes = parallel_sizes(environment)
    if device is None or gpus_used(environment) == 1:
        return device
    return f"{gpus_used(environment)} x {device} ({', '.join(f'{name}={n}' for name, n in sizes.items() if n > 1)})"


def describe_provenance(data: Mapping[str, Any]) -> dict[str, str]:
    """Where one result came from, as short text: the command, the tool's version, machine, time."""
    env = data.get("environment", {})
    version = env.get("tool_version") or {}
    sha = version.get("script_sha256")
    script = SCRIPTS.get(data.get("phase"), "phase2_experiment.py")
    if version.get("code_sha256"):
        commits = code_commits(version["code_sha256"], script)
        tool = (f"{script} and {PACKAGE}/ as of commit {commits[-1]}" if commits else
                f"{script} and {PACKAGE}/, code sha256 {version['code_sha256'][:12]} (no commit here has it)")
    elif sha:
        commits = script_commits(sha, script)
        tool = (f"{script} as of commit {commits[-1]}" if commits else
                f"{script} sha256 {sha[:12]} (no commit here has it)")
    else:
        tool = "tool version not recorded (file made before provenance was recorded)"
    machine = devices_label(env) or "device not recorded"
    engines = len((env.get("fleet") or {}).get("kv_capacity_tokens_per_engine") or {})
    if engines > 1:
        machine = f"{engines} engines, each on {machine}"
    return {"command": env.get("command") or "command not recorded",
            "tool": tool,
            # a server reached by --base-url has no torch version the client can know
            "machine": f"{machine}, vLLM {env.get('vllm_version') or '?'}, torch {env.get('torch_version') or '?'}",
            "when": data.get("timestamp") or "time not recorded"}
