"""The package's shape (docs/architecture.md): layers that import only downward, rooms of a few
hundred lines, thin entry scripts, and the plotting and statistics that import no vLLM or torch."""
import glob
import os
import types
import re
import subprocess
import sys

import pytest

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "prefix_cache_bench")
# docs/architecture.md's layer table: a module imports only modules of a lower layer
LAYERS = {
    0: ("errors", "defaults", "engine_api", "prometheus", "result_schema", "host"),
    1: ("intervals", "results", "provenance", "prompts", "cli", "audit", "http_client", "servers", "tiers",
        "traces", "settings", "engine_output"),
    2: ("offline_environment", "load_figures", "analysis", "gpu_busy", "load_workload", "server_engine", "prefill_fit",
        "trace_figures", "trace_tables", "raw_stream"),
    3: ("protocol", "tables", "open_loop", "offline_engine", "console"),
    4: ("offline", "processes", "load_run", "load_tables", "trace_cli"),
    5: ("charts", "trace_replay", "trace_charts"),
    6: ("readmes",),
}
LAYER_OF = {module: layer for layer, modules in LAYERS.items() for module in modules}
ENTRY_SCRIPT_LINES = {"phase2_experiment.py": 250, "phase1_experiment.py": 400, "plot_results.py": 200}


def package_imports(module):
    with open(os.path.join(PACKAGE, module + ".py")) as f:
        text = f.read()
    return set(re.findall(r"^\s*from \.(\w+) import", text, re.M)) | set(re.findall(r"^\s*from \. import (\w+)", text, re.M))


def modules():
    return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(PACKAGE, "*.py"))
                  if not p.endswith("__init__.py"))


def test_every_module_has_a_layer_and_imports_only_lower_layers():
    assert sorted(LAYER_OF) == modules(), "docs/architecture.md and LAYERS must list every module"
    upward = [(m, d) for m in modules() for d in package_imports(m) if LAYER_OF[d] >= LAYER_OF[m]]
    assert upward == []


# Statistics and reporting read results; they never measure. None of them may import a module
# that measures (engines, servers, clients, senders, the protocol), directly or through another.
MEASURING = {"offline", "offline_engine", "engine_output", "processes", "protocol", "server_engine", "http_client",
             "servers", "gpu_busy", "tiers", "load_run", "load_workload", "open_loop", "raw_stream", "trace_replay",
             "audit", "trace_cli"}
REPORTING = {"intervals", "analysis", "load_figures", "prefill_fit", "console", "tables", "load_tables",
             "trace_figures", "trace_tables", "charts", "trace_charts", "readmes"}


def imported_through(module):
    """Every package module that importing module imports, directly or through another."""
    seen, todo = set(), [module]
    while todo:
        for dependency in package_imports(todo.pop()) - seen:
            seen.add(dependency)
            todo.append(dependency)
    return seen


def test_statistics_and_reporting_import_no_module_that_measures():
    assert REPORTING | MEASURING <= set(modules())
    assert {m: sorted(imported_through(m) & MEASURING) for m in sorted(REPORTING)} == {m: [] for m in sorted(REPORTING)}


def test_no_module_passes_450_lines_and_the_entry_scripts_stay_thin():
    for path in glob.glob(os.path.join(PACKAGE, "*.py")):
        with open(path) as f:
            assert len(f.readlines()) <= 450, path
    page = open(os.path.join(ROOT, "docs", "architecture.md")).read()
    for script, limit in ENTRY_SCRIPT_LINES.items():
        with open(os.path.join(ROOT, script)) as f:
            lines = len(f.readlines())
        assert lines <= limit, script
        assert f"| `{script}` | {lines} |" in page, f"docs/architecture.md gives {script} another line count"


def test_the_entry_scripts_are_the_only_callers_of_their_own_names():
    """The package never imports an entry script: phase2_experiment.py is nobody's library."""
    for path in glob.glob(os.path.join(PACKAGE, "*.py")):
        with open(path) as f:
            text = f.read()
        assert not re.search(r"^\s*(import|from) (phase1_experiment|phase2_experiment|plot_results)\b", text, re.M), path


@pytest.mark.parametrize("modules_imported", [
    "plot_results",
    "prefix_cache_bench.intervals, prefix_cache_bench.analysis, prefix_cache_bench.tables, prefix_cache_bench.load_tables, "
    "prefix_cache_bench.load_figures",
    "prefix_cache_bench.results, prefix_cache_bench.readmes, prefix_cache_bench.charts",
    "prefix_cache_bench.traces, prefix_cache_bench.trace_figures, prefix_cache_bench.trace_tables, "
    "prefix_cache_bench.trace_charts, prefix_cache_bench.trace_cli",
])
def test_plotting_and_statistics_import_neither_vllm_nor_torch(modules_imported):
    code = (f"import sys; import {modules_imported}; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {{'vllm', 'torch', 'transformers'}}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_the_load_run_and_the_trace_replay_use_a_server_only_through_its_interface():
    """engine_api.LoadServer lists what they read of the server they drive; they read nothing
    else of it, set nothing on it, and server_engine.ServerEngine has all of it."""
    from prefix_cache_bench import engine_api, server_engine
    interface = {name for name in vars(engine_api.LoadServer) if not name.startswith("_")} | \
        set(engine_api.LoadServer.__annotations__)
    for module in ("load_run", "trace_replay"):
        with open(os.path.join(PACKAGE, module + ".py")) as f:
            text = f.read()
        assert set(re.findall(r"\bengine\.(\w+)", text)) <= interface, module
        assert not re.search(r"\bengine\.\w+\s*=[^=]", text), module
    engine = server_engine.ServerEngine(types.SimpleNamespace(base_url="http://h:1", connections_opened=0), "m")
    assert all(hasattr(engine, name) for name in interface)


def unannotated_public_functions(path):
    """'module.function' (or 'module.Class.method') for each public function of a module whose
    parameters or return are not all annotated (self and cls aside; __init__ returns nothing)."""
    import ast
    name = os.path.basename(path)[:-3]
    tree = ast.parse(open(path).read())
    found = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            scope, functions = f"{name}.{node.name}", node.body
        else:
            scope, functions = name, [node]
        for f in functions:
            if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) or (f.name.startswith("_") and f.name != "__init__"):
                continue
            params = [a for a in (*f.args.posonlyargs, *f.args.args, *f.args.kwonlyargs, f.args.vararg, f.args.kwarg)
                      if a is not None and a.arg not in ("self", "cls")]
            if any(a.annotation is None for a in params) or (f.returns is None and f.name != "__init__"):
                found.append(f"{scope}.{f.name}")
    return found


def test_every_public_function_of_the_package_has_type_hints():
    """mypy (tests/run_tests.sh) checks what the hints say; this checks that they are there."""
    missing = [f for path in sorted(glob.glob(os.path.join(PACKAGE, "*.py"))) for f in unannotated_public_functions(path)]
    assert missing == []


def test_the_hint_check_finds_a_function_without_hints(tmp_path):
    path = tmp_path / "module.py"
    path.write_text("def f(x: int) -> int:\n    return x\n\n\ndef g(x):\n    return x\n\n\nclass C:\n"
                    "    def __init__(self, y: int):\n        pass\n\n    def m(self, z: int):\n        pass\n")
    assert unannotated_public_functions(str(path)) == ["module.g", "module.C.m"]
