"""The result schema in code: every shipped file reads back through read_result in its kind's
typed form; what a file lacks is named; the builders refuse keys the schema does not declare."""
import collections
import copy
import glob
import os
import re

import pytest

from conftest import ROOT
from prefix_cache_bench import result_schema, results
from test_plot import design_result, extended_result


def shipped_files():
    return sorted(glob.glob(os.path.join(ROOT, "results", "**", "*.json*"), recursive=True))


def test_every_shipped_file_reads_back_through_read_result_as_its_kind():
    kinds = collections.Counter()
    for path in shipped_files():
        data = results.read_result(path)            # raises, naming what is missing, where a file fails
        kinds[result_schema.kind_of(data)] += 1
    assert sum(kinds.values()) == len(shipped_files()) >= 160
    assert set(kinds) == set(result_schema.KINDS), kinds        # every kind the tool writes has shipped
    assert kinds["phase"] >= 100


def test_a_file_without_a_key_its_kind_always_holds_is_refused_naming_where():
    data = extended_result(512, 256)
    del data["cache_cold"]["stats"]["ttft_mean"]
    with pytest.raises(ValueError, match=r"a phase 1/2 result without cache_cold\.stats\.ttft_mean$"):
        result_schema.check_result(data)
    load = results.read_result(glob.glob(os.path.join(ROOT, "results", "cpu-tiny-load", "run1", "*.json.gz"))[0])
    broken = copy.deepcopy(load)
    del broken["levels"][0]["runs"]
    with pytest.raises(ValueError, match=r"a load result without levels\[0\]\.runs$"):
        result_schema.check_result(broken)


def test_the_design_s_own_schema_reads_and_an_unknown_experiment_is_refused():
    assert result_schema.kind_of(result_schema.check_result(design_result(512, 256))) == "phase"
    with pytest.raises(ValueError, match="experiment 'sweep': not a kind of result this tool writes"):
        result_schema.check_result({"experiment": "sweep"})


def test_a_builder_refuses_an_undeclared_key_and_a_missing_one():
    data = design_result(512, 256)
    assert result_schema.build_phase_result(**data) == data
    with pytest.raises(TypeError, match=r"undeclared key\(s\) \['ttft_saving'\]"):
        result_schema.build_phase_result(**data, ttft_saving=1.0)
    del data["model"]
    with pytest.raises(TypeError, match=r"missing \['model'\]"):
        result_schema.build_phase_result(**data)


def test_the_writer_refuses_what_no_builder_made(tmp_path):
    with pytest.raises(ValueError, match="without"):
        results.write_result(str(tmp_path / "results_phase2_a1_b1.json"), {"phase": "phase2_python_api"})
    assert os.listdir(tmp_path) == []


def test_every_key_of_the_schema_has_its_meaning_beside_it_or_in_the_docs():
    """A TypedDict key's line carries its meaning as a comment, or the docs name the key (the
    design's and the self-explaining ones are in docs/method.md's table): a key added without
    either fails here."""
    source = open(os.path.join(ROOT, "prefix_cache_bench", "result_schema.py")).read().splitlines()
    docs = "".join(open(path).read() for path in glob.glob(os.path.join(ROOT, "docs", "*.md")))
    keys = [re.match(r"^    ([a-z_0-9]+): ", line) for line in source]
    unsaid = [m.group(1) for m, line in zip(keys, source) if m and "#" not in line and f"`{m.group(1)}`" not in docs]
    assert len([m for m in keys if m]) >= 150
    assert unsaid == []
