"""Result files: one writer (write_result: atomic, floats rounded, schema version stamped), the
readers next to it (read_result: the typed form of result_schema; load_result, discover_results,
discover_load_results), and the path rules (results_phase<N>_a<A>_b<B>.json, results_load_...,
results_fleet_...).
"""
import fnmatch
import glob
import gzip
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from typing import Any, cast

import numpy as np

from .defaults import RESULTS_DIR
from .errors import ExperimentError
from .result_schema import (SCHEMA_VERSION, CapacityCurve, LoadResult, PhaseResult, Result, TraceResult, check_result,
                            kind_of)

Skipped = list[tuple[str, str]]        # [(path, why it was skipped)]


def rounded(obj: object, digits: int = 3) -> object:
    """obj with every float rounded: for the JSON only (in memory everything keeps full precision)."""
    if isinstance(obj, float):
        return round(obj, digits) if np.isfinite(obj) else None     # JSON has no infinity
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj


def write_json_atomic(path: str, obj: object) -> None:
    """Temp file in the same folder + rename: readers see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_result(path: str, result: Result) -> None:
    """A result file: the result (made by one of result_schema's builders; checked again here),
    its floats rounded, stamped with the schema version."""
    check_result(result)
    write_json_atomic(path, rounded({"schema_version": SCHEMA_VERSION, **result}))


def results_path(results_dir: str, size_a: int, size_b: int, phase: int = 2) -> str:
    return os.path.join(results_dir, f"results_phase{phase}_a{size_a}_b{size_b}.json")


def check_writable_dir(path: str, flag: str, error: type[Exception] = ExperimentError) -> None:
    """Make the folder if it is not there and write a file in it; else raise error, one line
    naming the flag that gave the folder. Checked before the run, not after its minutes."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise error(f"{flag} {path!r} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise error(f"{flag} {path!r} cannot be written: {e.strerror or e}")


def check_results_dir(path: str, make: bool = True) -> None:
    """check_writable_dir of --results-dir; make=False: only what can be told without making the
    folder (a file in its place, or its nearest existing folder not writable)."""
    if make:
        return check_writable_dir(path, "--results-dir")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ExperimentError(f"--results-dir {path!r} is a file, not a folder")
    nearest = os.path.abspath(path)
    while not os.path.exists(nearest):
        nearest = os.path.dirname(nearest)
    if not os.path.isdir(nearest) or not os.access(nearest, os.W_OK):
        raise ExperimentError(f"--results-dir {path!r} cannot be written: {nearest!r} is "
                              f"{'not a folder' if not os.path.isdir(nearest) else 'not writable'}")


def note_existing_results(settings: Any) -> None:       # a settings.RunSettings: a module of this layer, not imported
    if settings.worker_output:
        return
    for a, b in settings.configs:
        path = results_path(settings.results_dir, a, b)
        if os.path.exists(path):
            print(f"note: {path} exists; it is replaced only once the run completes")


def load_results_path(results_dir: str, result: LoadResult) -> str:
    cfg = result["config"]
    if result.get("front"):
        load = "rate" if cfg["load"] == "request_rate" else "concurrency"
        sweep = f"p{'-'.join(map(str, cfg['num_prefixes']))}" if result["experiment"] == "working_set" else \
            f"p{cfg['num_prefixes'][0]}"
        return os.path.join(results_dir, f"results_fleet_{result['front']}_a{cfg['document_tokens']}_{sweep}_{load}.json")
    if result["experiment"] == "working_set":
        return os.path.join(results_dir, f"results_workingset_a{cfg['document_tokens']}.json")
    name = f"results_load_a{cfg['document_tokens']}_p{cfg['num_prefixes'][0]}_{cfg['load'].replace('request_', '')}.json"
    return os.path.join(results_dir, name)


def trace_stem(trace_path: str) -> str:
    """A trace file's name without its folder and .jsonl(.gz)."""
    name = os.path.basename(trace_path)
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name


def trace_results_path(results_dir: str, result: TraceResult | CapacityCurve) -> str:
    """results_trace_{trace}_s{start}_n{requests}.json of a replay (..._tier.json with a second
    tier), results_capacity_{trace}_s{start}_n{requests}.json of a --simulate-capacities curve."""
    kind = "capacity" if result["experiment"] == "capacity_curve" else "trace"
    window = result["window"]
    tier = "_tier" if result.get("tier_capacity_tokens") else ""
    return os.path.join(results_dir, f"results_{kind}_{trace_stem(result['config']['trace'])}"
                                     f"_s{window['start_s']:g}_n{window['requests']}{tier}.json")


FILE_PATTERN = "results_phase*_a*_b*.json"


# Large runs may be stored gzipped beside the plain ones (results_phase2_a300_b200.json.gz).
FILE_RE = re.compile(r"^results_(phase\d+)_a(\d+)_b(\d+)\.json(\.gz)?$")


REQUIRED_STATS = ("ttft_mean", "throughput_mean")


def read_result(path: str) -> Result:
    """A result file of any kind the tool writes, in its typed form (result_schema), or raise
    ValueError saying what is wrong with it: not JSON, cut short, written in a schema newer than
    this reader's, of no kind this tool writes, or without a key every file of its kind holds."""
    data = read_json(path)
    version = data.get("schema_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= SCHEMA_VERSION:
        raise ValueError(f"schema_version {version!r}: this tool reads 0 to {SCHEMA_VERSION} "
                         f"(a newer version of it wrote the file?)")
    return check_result(data)


def load_result(path: str) -> PhaseResult:
    """A phase 1 or phase 2 result with what a chart needs (the design's cache_hit and cache_miss
    stats, as numbers), or raise ValueError saying what is wrong with it."""
    data = read_result(path)
    if kind_of(data) != "phase":
        raise ValueError(f"not a phase 1/2 result (experiment {data.get('experiment')!r})")
    result = cast(PhaseResult, data)
    for cond, stats in (("cache_hit", result["cache_hit"]["stats"]), ("cache_miss", result["cache_miss"]["stats"])):
        missing = [k for k in REQUIRED_STATS if not isinstance(stats.get(k), (int, float))]
        if missing:
            raise ValueError(f"{cond}.stats lacks {', '.join(missing)}")
    return result


def read_json(path: str) -> dict[str, Any]:
    """A JSON object from a file (or a .gz of one), or raise ValueError saying what is wrong."""
    try:
        with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at line {e.lineno})")
    except (OSError, EOFError) as e:             # EOFError, gzip.BadGzipFile (an OSError): a broken .gz
        raise ValueError(f"cannot be read ({getattr(e, 'strerror', None) or e})")
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def discover_results(results_dir: str = RESULTS_DIR) -> tuple[dict[str, dict[tuple[int, int], PhaseResult]], Skipped]:
    """{phase: {(A, B): data}} ordered numerically by (A, B), and [(path, why)] for skipped files."""
    phases: dict[str, dict[tuple[int, int], PhaseResult]]
    phases, skipped = {}, []
    for path in sorted(glob.glob(os.path.join(results_dir, FILE_PATTERN)) +
                       glob.glob(os.path.join(results_dir, FILE_PATTERN + ".gz"))):
        m = FILE_RE.match(os.path.basename(path))
        if not m:
            skipped.append((path, "name is not results_phase<N>_a<A>_b<B>.json"))
            continue
        try:
            data = load_result(path)
        except ValueError as e:
            skipped.append((path, str(e)))
            continue
        phases.setdefault(m.group(1), {})[(int(m.group(2)), int(m.group(3)))] = data
    return {phase: dict(sorted(configs.items())) for phase, configs in sorted(phases.items())}, skipped


LOAD_PATTERNS = ("results_load_*.json", "results_workingset_*.json", "results_fleet_*.json")
TRACE_PATTERNS = ("results_trace_*.json", "results_capacity_*.json")


FLEET_RE = re.compile(r"^results_fleet_(.+)_a(\d+)_(p[\d-]+)_(concurrency|rate)\.json(\.gz)?$")


def discover_files(results_dir: str, patterns: Iterable[str],
                   why_not: Callable[[Result], str | None]) -> tuple[list[tuple[str, Any]], Skipped]:
    """[(path, data)] of the files in results_dir matching patterns (or gzipped), and [(path, why)]
    for those skipped: unreadable, or refused by why_not(data) (a reason, or None to keep)."""
    found, skipped = [], []
    for path in sorted(p for pattern in patterns for suffix in ("", ".gz")
                       for p in glob.glob(os.path.join(results_dir, pattern + suffix))):
        try:
            data = read_result(path)
        except ValueError as e:
            skipped.append((path, str(e)))
            continue
        why = why_not(data)
        if why:
            skipped.append((path, why))
            continue
        found.append((path, data))
    return found, skipped


def discover_load_results(results_dir: str = RESULTS_DIR) -> tuple[list[tuple[str, LoadResult]], Skipped]:
    """[(path, data)] of the load and working-set files, and [(path, why)] for skipped ones."""
    return discover_files(results_dir, LOAD_PATTERNS, lambda data: None if data.get("experiment") in (
        "load", "working_set") and data.get("levels") else "no load levels in it")


def discover_trace_results(results_dir: str = RESULTS_DIR) -> tuple[list[tuple[str, TraceResult]],
                                                                     list[tuple[str, CapacityCurve]], Skipped]:
    """([(path, replay)], [(path, capacity curve)], [(path, why)] for skipped files)."""
    found, skipped = discover_files(results_dir, TRACE_PATTERNS, lambda data: None if data.get("experiment") in (
        "trace", "capacity_curve") else "neither a trace replay nor a capacity curve")
    return ([(p, d) for p, d in found if d["experiment"] == "trace"],
            [(p, d) for p, d in found if d["experiment"] == "capacity_curve"], skipped)


def check_out_dir(path: str) -> None:
    check_writable_dir(path, "--out-dir", OSError)


def folders_with_results(results_dir: str) -> list[str]:
    """The folders under results_dir (at any depth) that hold result files: those with the most
    phase 1/2 result files first (what the grouped-bar charts draw), then by name."""
    found = {}
    for folder, _, names in os.walk(results_dir):
        names = [name.removesuffix(".gz") for name in names]
        if folder != results_dir and any(fnmatch.fnmatch(name, pattern) for name in names
                                         for pattern in (FILE_PATTERN, *LOAD_PATTERNS)):
            found[folder] = sum(fnmatch.fnmatch(name, FILE_PATTERN) for name in names)
    return sorted(found, key=lambda folder: (-found[folder], folder))


def folders_with_results_hint(results_dir: str) -> str:
    """For a folder with no result files of its own: where under it some are, as the end of an
    error line ('' where none are)."""
    folders = folders_with_results(results_dir)
    if not folders:
        return ""
    return (f"; {len(folders)} of its subfolders hold results (docs/results.md says what each is): plot one "
            f"with --results-dir, e.g. --results-dir {folders[0]}")
