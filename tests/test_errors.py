"""Bad input fails early (before any engine starts), in one line, with the right exit code.

What the command line prints is checked in a new process (check_one_line_error); checks that
need vLLM's own parser run main() in this process, where vLLM is imported once, and check the
error it ends with (the same one the command line prints)."""
import json
import os

import pytest

import phase2_experiment as p
from conftest import run_script
from prefix_cache_bench import errors



def check_one_line_error(proc, code, *needles):
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "starting vLLM engine" not in proc.stdout


def main_error(argv):
    """The error main(argv) ends with, before any engine starts: (exit code, its one line)."""
    with pytest.raises(errors.ExperimentError) as error:
        p.main(argv)
    message = str(error.value)
    assert "\n" not in message
    return error.value.exit_code, message


@pytest.mark.parametrize("args,flag", [
    (["--size-a", "0"], "--size-a"),
    (["--size-a", "-5"], "--size-a"),
    (["--size-b", "abc"], "--size-b"),
    (["--size-a", "1.5"], "--size-a"),
    (["--sizes", "512x"], "--sizes"),
    (["--sizes", "512x256,foo"], "--sizes"),
    (["--sizes", "512x256,512x256"], "--sizes"),
    (["--sizes", "512x256", "--size-a", "5"], "--sizes"),
    (["--num-trials", "0"], "--num-trials"),
    (["--pause-ms", "-1"], "--pause-ms"),
    (["--block-order", "--processes", "2"], "--block-order"),
])
def test_bad_flags_exit_2_in_one_line_before_any_import_of_vllm(tmp_path, args, flag):
    out = tmp_path / "results"
    proc = run_without_vllm(tmp_path, ["phase2_experiment.py", *args, "--results-dir", str(out)])
    check_one_line_error(proc, 2, flag)
    assert not out.exists()


def run_without_vllm(tmp_path, argv):
    """Run a script with a stand-in vllm package that fails the test if anything imports it:
    what needs no vLLM is checked before vLLM (seconds to import) and the engine (minutes)."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "vllm.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\n")
    proc = run_script(argv, timeout=60, env=dict(os.environ, PYTHONPATH=str(fake)))
    assert not (tmp_path / "imported").exists(), "vLLM was imported"
    return proc


@pytest.mark.parametrize("args,needle", [
    (["--no-enable-prefix-caching"], "prefix caching"),
    (["--disable-log-stats"], "engine stats"),
    (["--no-such-engine-flag", "3"], "--no-such-engine-flag"),
    (["--tensor-parallel-size", "two"], "--tensor-parallel-size"),
])
def test_bad_engine_flags_exit_2_in_one_line(tmp_path, args, needle):
    code, message = main_error([*args, "--results-dir", str(tmp_path / "r")])
    assert code == 2 and needle in message


def test_config_larger_than_the_model_context_exits_2_naming_the_limit(tiny_model_dir, tmp_path):
    code, message = main_error(["--model", tiny_model_dir, "--sizes", "256x256,1900x100", "--results-dir", str(tmp_path)])
    # 1 BOS + 1900 + 100 + 16 query + 50 output = 2067 > 2048
    assert code == 2 and all(s in message for s in ("A=1900 B=100", "2067", "2048", "at most 1981"))
    assert os.listdir(tmp_path) == []


def test_max_model_len_flag_lowers_the_limit(tiny_model_dir, tmp_path):
    code, message = main_error(["--model", tiny_model_dir, "--size-a", "256", "--size-b", "256",
                                "--max-model-len", "512", "--results-dir", str(tmp_path)])
    assert code == 2 and "512 (--max-model-len)" in message


@pytest.mark.parametrize("kind", ["folder", "hub_id"])
def test_missing_model_exits_1(tmp_path, kind):
    argv = ["phase2_experiment.py", "--results-dir", str(tmp_path / "r")]
    if kind == "folder":            # a path: checked before vLLM is imported, and no results folder made
        proc = run_without_vllm(tmp_path, [*argv, "--model", str(tmp_path / "no-such-model")])
        check_one_line_error(proc, 1, "--model", "no-such-model", "no such model folder")
    else:                           # a hub id: only vLLM can resolve it
        proc = run_script([*argv, "--model", "no-such-org/no-such-model"], timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
        check_one_line_error(proc, 1, "--model", "no-such-model", "cannot be loaded")
    assert not (tmp_path / "r").exists()        # the results folder is made only once all is checked


def test_remote_code_is_never_run_without_trust_remote_code(tmp_path):
    model = tmp_path / "custom-model"
    model.mkdir()
    marker = tmp_path / "remote-code-ran"
    (model / "config.json").write_text(json.dumps({
        "model_type": "my_custom_opt", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}))
    (model / "configuration_custom.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PretrainedConfig\nclass CustomConfig(PretrainedConfig):\n    model_type = 'my_custom_opt'\n")
    code, message = main_error(["--model", str(model), "--results-dir", str(tmp_path / "r")])
    assert code == 1 and "cannot be loaded" in message
    assert not marker.exists()


@pytest.mark.parametrize("make", ["file", "inside_a_file"])
def test_results_dir_that_cannot_be_written_exits_1(tmp_path, make):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    target = blocker if make == "file" else blocker / "results"
    proc = run_without_vllm(tmp_path, ["phase2_experiment.py", "--results-dir", str(target)])
    check_one_line_error(proc, 1, "--results-dir")
    assert blocker.read_text() == "not a folder"


def test_missing_vllm_says_what_to_install(tmp_path):
    # A Python where `import vllm` fails the way it does when vLLM is not installed.
    (tmp_path / "vllm.py").write_text("raise ModuleNotFoundError(\"No module named 'vllm'\", name='vllm')\n")
    proc = run_script(["phase2_experiment.py", "--results-dir", str(tmp_path / "r")], timeout=60,
                      env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    check_one_line_error(proc, 1, "vLLM cannot be imported", "pip install -r requirements.txt")


def test_help_lists_experiment_and_vllm_engine_flags():
    proc = run_script(["phase2_experiment.py", "--help"], timeout=120)
    assert proc.returncode == 0
    for flag in ("--size-a", "--sizes", "--block-order", "--pause-ms", "--tensor-parallel-size", "--enforce-eager",
                 "--gpu-memory-utilization", "--max-model-len", "--block-size", "--trust-remote-code"):
        assert flag in proc.stdout
