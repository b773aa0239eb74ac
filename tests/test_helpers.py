"""Fast unit tests of phase2_experiment's pure helpers (no engine)."""
import argparse
import itertools
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types

import pytest
from conftest import ROOT
from prefix_cache_bench import (analysis, audit, cli, defaults, engine_api, engine_output, errors, offline,
                                offline_engine, prometheus, prompts, protocol, provenance, results)



@pytest.mark.parametrize("target", [1, 2, 3, 7, 16, 100, 255, 256, 257, 1000, 1900])
def test_generate_context_is_exact_after_round_trip(tiny_tokenizer, target):
    text = prompts.generate_context(target, "Document A", tiny_tokenizer)
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == target
    assert len(tiny_tokenizer.encode(tiny_tokenizer.decode(ids), add_special_tokens=False)) == target


def test_generate_context_differs_per_label_and_repeats_per_label(tiny_tokenizer):
    a = prompts.generate_context(64, "Document A", tiny_tokenizer)
    assert a == prompts.generate_context(64, "Document A", tiny_tokenizer)
    assert a != prompts.generate_context(64, "Document B", tiny_tokenizer)


def test_hit_prompt_ids_start_with_warmup_ids(tiny_tokenizer):
    tok = tiny_tokenizer
    assert prompts.special_prefix_ids(tok) == [2]
    a, b, q = (prompts.generate_context(n, label, tok) for n, label in ((50, "A"), (30, "B"), (16, "Q")))
    warm = prompts.build_prompt_from_messages(prompts.build_warmup_messages(a, b), tok)
    hit = prompts.build_prompt_from_messages(prompts.build_hit_messages(a, b, q), tok)
    miss = prompts.build_prompt_from_messages(prompts.build_miss_messages(b, q), tok)
    assert len(warm) == 1 + 50 + 30 and hit[:len(warm)] == warm and len(hit) == len(warm) + 16
    assert len(miss) == 1 + 30 + 16 and miss[1:31] == warm[51:]


def first_queries(tokenizer, count, shared_len):
    """The first count queries of a run's stream (prompts.query_stream, as ConfigPrompts draws them)."""
    return list(itertools.islice(prompts.query_stream(tokenizer, shared_len, random.Random(0)), count))


@pytest.mark.parametrize("shared_len", [1, 5, 16])
def test_queries_are_exact_length_and_open_differently(tiny_tokenizer, shared_len):
    queries = first_queries(tiny_tokenizer, 60, shared_len)
    heads = set()
    for q in queries:
        ids = tiny_tokenizer.encode(q, add_special_tokens=False)
        assert len(ids) == defaults.QUERY_TOKENS
        heads.add(tuple(ids[:shared_len]))
    assert len(heads) == 60


def test_queries_outnumber_the_words_where_the_shared_part_allows(tiny_tokenizer):
    words = len(prompts.query_head_words(tiny_tokenizer))
    # a one-token shared part: one query per word, then the stream ends with a clear error
    with pytest.raises(errors.ExperimentError, match="too few one-token words"):
        first_queries(tiny_tokenizer, words + 1, 1)
    # five tokens shared: word and number open differently, past the number of words
    queries = first_queries(tiny_tokenizer, words + 50, 5)
    heads = {tuple(tiny_tokenizer.encode(q, add_special_tokens=False)[:5]) for q in queries}
    assert len(heads) == words + 50


def test_config_prompts_are_the_design_prompts_with_fresh_queries(tiny_tokenizer):
    tok = tiny_tokenizer
    c = prompts.ConfigPrompts(tok, 200, 100, 128, 0, "run")
    assert len(c.warmup_ids) == 301 and len(c.miss_ids) == 101 and c.miss_ids[1:] == c.warmup_ids[201:]
    (hit_ttft, hit_salt), (hit_tput, _) = c.trial_prompts("cache_hit", 3)
    (cold_ids, cold_salt), _ = c.trial_prompts("cache_cold", 3)
    (miss_ids, miss_salt), _ = c.trial_prompts("cache_miss", 3)
    assert hit_salt is None and cold_salt == "run-200x100-cache_cold-3-ttft" and miss_salt != cold_salt
    assert hit_ttft[:301] == c.warmup_ids == cold_ids[:301] and len(hit_ttft) == 301 + defaults.QUERY_TOKENS
    assert miss_ids[:101] == c.miss_ids and len(miss_ids) == 101 + defaults.QUERY_TOKENS
    # every request its own query, opening differently in the block shared with [A, B]
    tails = {tuple(ids[301:301 + 128 - 301 % 128]) for ids in (hit_ttft, hit_tput, cold_ids)}
    assert len(tails) == 3
    # the configs of one run share the cache: one config's A is no prefix of another's
    other = prompts.ConfigPrompts(tok, 400, 100, 128, 0, "run")
    assert other.warmup_ids[:150] != c.warmup_ids[:150]


def test_query_head_words_are_single_tokens(tiny_tokenizer):
    words = prompts.query_head_words(tiny_tokenizer)
    assert len(words) > 200
    for w in words[:50]:
        assert len(tiny_tokenizer.encode(w, add_special_tokens=False)) == 1


@pytest.mark.parametrize("block,warm,want", [(16, 785, 784), (16, 784, 784), (128, 301, 256), (128, 100, 0)])
def test_expected_cached_tokens(block, warm, want):
    assert audit.expected_cached_tokens("cache_hit", warm, block) == want
    assert audit.expected_cached_tokens("cache_miss", warm, block) == 0
    assert audit.expected_cached_tokens("cache_cold", warm, block) == 0


def test_run_schedule_spreads_every_config_and_condition_over_the_run():
    assert protocol.run_schedule(2, range(2), block_order=True) == [
        (0, "cache_hit", 0), (0, "cache_hit", 1), (0, "cache_miss", 0), (0, "cache_miss", 1),
        (0, "cache_cold", 0), (0, "cache_cold", 1),
        (1, "cache_hit", 0), (1, "cache_hit", 1), (1, "cache_miss", 0), (1, "cache_miss", 1),
        (1, "cache_cold", 0), (1, "cache_cold", 1)]
    rounds = protocol.run_schedule(3, range(6))
    assert sorted(rounds) == sorted(protocol.run_schedule(3, range(6), block_order=True))
    # every round holds each condition of each config once, the configs' order rotated
    for r in range(6):
        this_round = [(k, c) for k, c, rr in rounds if rr == r]
        assert sorted(this_round) == sorted((k, c) for k in range(3) for c in defaults.CONDITIONS)
        assert this_round[0][0] == r % 3
    # inside each config's part of a round: over 6 rounds each condition comes first twice and
    # follows each other condition exactly twice (a Williams design)
    orders = [[c for k, c, rr in rounds if rr == r and k == 0] for r in range(6)]
    assert sorted(o[0] for o in orders) == sorted(defaults.CONDITIONS * 2)
    pairs = [(o[i - 1], o[i]) for o in orders for i in (1, 2)]
    assert len(set(pairs)) == 6 and all(pairs.count(pair) == 2 for pair in pairs)


@pytest.mark.parametrize("round_s,min_block_s,want", [(3.2, 15, 5), (9.6, 15, 2), (0.1, 15, 150), (1.0, 0, 2)])
def test_rounds_per_block_is_sized_by_time(round_s, min_block_s, want):
    assert protocol.rounds_per_block(round_s, min_block_s) == want


def test_blocks_are_even_contiguous_slices_of_the_rounds():
    assert [protocol.block_of(m, 40, 8) for m in range(40)] == [b for b in range(8) for _ in range(5)]
    assert [protocol.block_of(m, 10, 4) for m in range(10)] == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]


def test_interleaved_configs_must_fit_the_kv_cache_together():
    configs = [types.SimpleNamespace(warmup_ids=[0] * 8449, miss_ids=[0] * 257),
               types.SimpleNamespace(warmup_ids=[0] * 2305, miss_ids=[0] * 257)]
    protocol.check_cache_holds((10_000, 16), configs, 50)          # 160k tokens: plenty
    with pytest.raises(errors.ExperimentError, match="need about .* tokens of KV cache at once .* the engine has 16000"):
        protocol.check_cache_holds((1000, 16), configs, 50)


def _trial(ttft, total, cached=0, engine=None):
    return {"ttft_ms": ttft, "total_time_ms": total, "throughput_tok_s": 50 / (total / 1e3),
            "prompt_tokens": 40, "cached_tokens": cached, "engine_ttft_ms": engine or ttft - 0.5,
            "prefill_ms": ttft - 1, "throughput_request": {"cached_tokens": cached}}


def test_compute_stats_has_design_keys_and_right_values():
    trials = [_trial(10.0, 100.0), _trial(12.0, 110.0), _trial(14.0, 90.0)]
    s = analysis.compute_stats(trials)
    for key in ("ttft_mean", "ttft_median", "ttft_stdev", "total_time_mean", "total_time_stdev",
                "throughput_mean", "throughput_stdev", "prompt_tokens"):
        assert key in s
    assert s["ttft_mean"] == 12.0 and s["ttft_median"] == 12.0 and s["ttft_stdev"] == 2.0
    assert s["ttft_ci95"][0] < 12.0 < s["ttft_ci95"][1]
    assert s["ttft_min"] == 10.0 and s["ttft_max"] == 14.0 and s["ttft_p90"] == pytest.approx(13.6)
    assert s["total_time_mean"] == 100.0 and s["prompt_tokens"] == 40
    assert s["engine_ttft_mean"] == 11.5 and s["prefill_median"] == 11.0


@pytest.mark.parametrize("text,want", [("512x256", [(512, 256)]), ("1x2, 3X4", [(1, 2), (3, 4)])])
def test_size_list_ok(text, want):
    assert cli.size_list(text) == want


@pytest.mark.parametrize("text", ["512", "512x", "x256", "0x5", "5x-1", "axb", "1.5x2", "5x5,5x5", ""])
def test_size_list_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        cli.size_list(text)


def test_write_json_atomic_replaces_whole_or_not_at_all(tmp_path):
    path = str(tmp_path / "r.json")
    results.write_json_atomic(path, {"a": 1})
    assert json.load(open(path)) == {"a": 1}

    class Boom:
        def __str__(self):
            raise RuntimeError("serialisation failed half-way")
    with pytest.raises(RuntimeError):
        results.write_json_atomic(path, {"a": 2, "b": Boom()})
    assert json.load(open(path)) == {"a": 1}           # old file intact
    assert os.listdir(tmp_path) == ["r.json"]           # no temp file left


def test_rounded_rounds_floats_only_and_everywhere():
    obj = {"a": 1.23456, "b": [2.00049, {"c": 3}], "d": "x", "e": True, "f": (1.11111,)}
    assert results.rounded(obj) == {"a": 1.235, "b": [2.0, {"c": 3}], "d": "x", "e": True, "f": [1.111]}


MULTICAST_OFF_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def test_multicast_off_host_keeps_flashinfer_allreduce_off_multicast():
    environ = dict(MULTICAST_OFF_ENV)
    note = offline.keep_multicast_off(environ, tensor_parallel_size=2)
    assert environ["VLLM_FLASHINFER_ALLREDUCE_BACKEND"] == "trtllm"
    assert "NCCL_NVLS_ENABLE" in note and "trtllm" in note


@pytest.mark.parametrize("environ, tp", [
    (dict(MULTICAST_OFF_ENV), 1),                                                    # no TP: no fused all-reduce
    ({"NCCL_NVLS_ENABLE": "1"}, 2),                                                  # multicast allowed
    ({}, 2),
    ({**MULTICAST_OFF_ENV, "VLLM_FLASHINFER_ALLREDUCE_BACKEND": "mnnvl"}, 2),       # the user's choice stands
])
def test_multicast_guard_leaves_other_setups_alone(environ, tp):
    before = dict(environ)
    assert offline.keep_multicast_off(environ, tp) is None
    assert environ == before


def test_an_engine_failure_is_one_line_naming_the_vllm_process_s_error_or_what_the_tool_did_not_find():
    dead = offline.engine_failure(RuntimeError("Engine core initialization failed.\nSee above"),
                                  ["(EngineCore pid=7) ERROR ... CUDA out of memory"], "start", "0.33.0")
    assert dead == "the vLLM engine failed during its start: (EngineCore pid=7) ERROR ... CUDA out of memory"
    missing = offline.engine_failure(AttributeError("'LLM' object has no attribute 'collective_rpc'"), [], "run", "0.20.0")
    assert missing.startswith("vLLM 0.20.0 lacks what this tool drives (AttributeError: 'LLM' object has no attribute "
                              "'collective_rpc'); it has run on vLLM ")
    assert offline.engine_failure(ImportError("cannot import name 'TokensPrompt'"), [], "run", None).startswith("vLLM ? lacks")
    assert offline.engine_failure(ValueError("bad\nsecond line"), [], "run", "0.33.0") == (
        "the vLLM engine failed during its run: ValueError: bad")
    assert all("\n" not in line for line in (dead, missing))


def test_engine_environment_keeps_engine_switches_not_secrets():
    environ = {"VLLM_USE_V1": "1", "NCCL_NVLS_ENABLE": "0", "CUDA_VISIBLE_DEVICES": "0,1", "HOME": "/root",
               "VLLM_API_KEY": "s3cret", "HF_TOKEN": "hf_x", "PATH": "/usr/bin"}
    assert provenance.engine_environment(environ) == {"CUDA_VISIBLE_DEVICES": "0,1", "NCCL_NVLS_ENABLE": "0", "VLLM_USE_V1": "1"}


def test_an_errors_line_is_its_cause_also_for_a_pydantic_validation_error():
    import pydantic
    from prefix_cache_bench.errors import first_line

    class Config(pydantic.BaseModel):
        model: str

        @pydantic.field_validator("model")
        @classmethod
        def known(cls, value):
            raise ValueError(f"Invalid repository ID or local directory specified: {value!r}.\nPlease verify ...")
    with pytest.raises(pydantic.ValidationError) as caught:
        Config(model="no/such")
    assert str(caught.value).startswith("1 validation error for Config")
    assert first_line(caught.value) == "Invalid repository ID or local directory specified: 'no/such'."
    assert first_line(ValueError("bad\nsecond line")) == "bad" and first_line(KeyError()) == "KeyError"


def test_only_the_code_makes_a_result_dirty(tmp_path, monkeypatch):
    import subprocess
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "results").mkdir()
    for name in ("run.py", "pkg/mod.py", "results/a.json"):
        (tmp_path / name).write_text("0")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    monkeypatch.setattr(provenance, "REPO_DIR", str(tmp_path))
    code = [str(tmp_path / "run.py"), str(tmp_path / "pkg")]
    (tmp_path / "results" / "a.json").write_text("1")          # a result written by an earlier run
    (tmp_path / "notes.md").write_text("new")
    assert provenance.code_differs(code) is False
    (tmp_path / "pkg" / "new.py").write_text("0")              # a module not committed yet
    assert provenance.code_differs(code) is True
    (tmp_path / "pkg" / "new.py").unlink()
    (tmp_path / "pkg" / "mod.py").write_text("1")
    assert provenance.code_differs(code) is True
    version = provenance.provenance([], "run.py", str(tmp_path / "run.py"))["tool_version"]
    assert version["git_commit"] and version["git_dirty"] is None    # the package lies outside this checkout


def test_relay_keeps_draining_when_the_reader_is_gone():
    """`phase2_experiment.py | head`: once head exits, writes fail; the relay must keep reading
    (a full pipe would block every vLLM process writing to it) and still catch the first error."""
    gone_read, gone_write = os.pipe()
    os.close(gone_read)                                 # writes to gone_write now fail with EPIPE
    read_end, write_end = os.pipe()
    first_error = []

    def vllm_process():                                 # far more than a pipe buffer (64 KiB), then an error
        for i in range(2000):
            os.write(write_end, f"INFO line {i:04d} {'x' * 60}\n".encode())
        os.write(write_end, b"ERROR worker died\n")
        os.close(write_end)

    threads = [threading.Thread(target=engine_output._relay, args=(read_end, gone_write, first_error), daemon=True),
               threading.Thread(target=vllm_process, daemon=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads), "the writer blocked: the relay stopped reading"
    assert first_error == ["ERROR worker died"]


def test_restore_output_does_not_wait_for_the_resource_tracker_vllm_starts():
    """vLLM starts multiprocessing's resource tracker after relay_output, and it lives until the
    process exits: had it inherited the pipes, no relay would reach the pipe's end and
    restore_output would wait its timeout (1 s) for each. A fresh interpreter, where no tracker
    runs yet; the relayed line still comes out, and the tracker's fds 1 and 2 are /dev/null."""
    code = (
        "import os, sys, time\n"
        "from multiprocessing import resource_tracker\n"
        "from prefix_cache_bench import engine_output\n"
        "engine_output.relay_output()\n"
        "resource_tracker.ensure_running()\n"          # as vLLM does once its engine starts
        "print('relayed line', flush=True)\n"
        "start = time.monotonic()\n"
        "engine_output.restore_output()\n"
        "print(f'restored in {time.monotonic() - start:.3f} s')\n"
        "tracker = resource_tracker._resource_tracker._pid\n"
        "print('tracker fds', os.readlink(f'/proc/{tracker}/fd/1'), os.readlink(f'/proc/{tracker}/fd/2'))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "relayed line" in proc.stdout
    restored_s = float(re.search(r"restored in ([0-9.]+) s", proc.stdout).group(1))
    assert restored_s < 0.5, proc.stdout
    # its output (warnings of objects vLLM leaked, after the run's last line) goes nowhere
    assert f"tracker fds {os.devnull} {os.devnull}" in proc.stdout


# ----------------------------------------------------------------------------- the engine-counter witness

def stats_message(hits, queries, with_output=True):
    """One message from the engine core, as LLMEngine.step() receives it."""
    stats = types.SimpleNamespace(prefix_cache_stats=types.SimpleNamespace(queries=queries, hits=hits))
    return types.SimpleNamespace(outputs=["a request output"] if with_output else [], scheduler_stats=stats)


class Vllm026LikeLLM:
    """LLM with vLLM 0.26's offline step(): it records a message's stats in get_metrics() only if
    the message carries a request output (vllm-project/vllm#48668 removed that condition)."""

    def __init__(self, messages):
        queue = iter(messages)
        self.llm_engine = types.SimpleNamespace(engine_core=types.SimpleNamespace(get_output=lambda: next(queue)))
        self.recorded = {"prefix_cache_queries": 0, "prefix_cache_hits": 0}

    def step(self):
        out = self.llm_engine.engine_core.get_output()
        if out.outputs:
            self.recorded["prefix_cache_queries"] += out.scheduler_stats.prefix_cache_stats.queries
            self.recorded["prefix_cache_hits"] += out.scheduler_stats.prefix_cache_stats.hits

    def get_metrics(self):
        return [types.SimpleNamespace(name=f"vllm:{k}", value=v) for k, v in self.recorded.items()]


def request(cached, prompt=300):
    """A request as the files record it (a trial, a throughput_request)."""
    return {"cached_tokens": cached, "prompt_tokens": prompt}


def engine_request(cached, prompt=300):
    """A request as an engine's request() returns it (the warmup, the stats flush)."""
    return engine_api.RequestResult(wall_ms=1.0, prompt_tokens=prompt, cached_tokens=cached, output_tokens=1)


def test_counters_count_stats_that_vllm_026_drops_and_the_audit_passes():
    # warmup (0 hits), one hit whose stats ride on a message without output, one hit as usual, flush
    messages = [stats_message(0, 301), stats_message(288, 317, with_output=False), stats_message(0, 0),
                stats_message(288, 317), stats_message(0, 301)]
    llm = Vllm026LikeLLM(messages)
    before = offline_engine.prefix_cache_counters(llm)
    for _ in messages:
        llm.step()
    growth = audit.counter_growth(before, offline_engine.prefix_cache_counters(llm))
    assert growth["source"] == "scheduler stats messages"
    assert (growth["prefix_cache_hits"], growth["prefix_cache_queries"]) == (576, 1236)
    assert growth["vllm_metrics"] == {"prefix_cache_queries": 919, "prefix_cache_hits": 288}    # 0.26 lost one hit
    assert growth["hits_in_messages_without_outputs"] == 288

    trials = [{"condition": "cache_hit", "round": 0, **request(288), "throughput_request": request(288)}]
    warm, flush = engine_request(0, 301), engine_request(0, 301)
    ok = audit.audit(warm, trials, flush, list(range(301)), 16, before, offline_engine.prefix_cache_counters(llm))
    assert ok["ok"] is True and ok["engine_counters"]["prefix_cache_hits"] == ok["engine_counters"]["sum_cached_tokens"]


def test_audit_fails_when_the_engine_counter_disagrees_with_the_requests():
    llm = Vllm026LikeLLM([stats_message(288, 317)])         # the engine saw one hit of 288 tokens ...
    before = offline_engine.prefix_cache_counters(llm)
    llm.step()
    trials = [{"condition": "cache_hit", "round": 0, **request(288), "throughput_request": request(288)}]
    result = audit.audit(engine_request(0), trials, engine_request(0), list(range(301)), 16, before,
                         offline_engine.prefix_cache_counters(llm))
    assert result["ok"] is False                             # ... the requests claim two
    assert result["problems"] == ["the engine's prefix-cache hit counters (scheduler stats messages) grew by 288, "
                                  "but the requests report 576 cached tokens"]


def test_counters_fall_back_to_vllm_metrics_without_a_message_stream():
    llm = types.SimpleNamespace(llm_engine=types.SimpleNamespace(),
                                get_metrics=lambda: [types.SimpleNamespace(name="vllm:prefix_cache_hits", value=5)])
    assert offline_engine.prefix_cache_counters(llm) == {"prefix_cache_queries": 0, "prefix_cache_hits": 5,
                                            "source": "LLM.get_metrics()",
                                            "vllm_metrics": {"prefix_cache_queries": 0, "prefix_cache_hits": 5}}


def counters(hits, queries):
    return {"prefix_cache_hits": hits, "prefix_cache_queries": queries, "source": "/metrics"}


@pytest.mark.parametrize("hits,queries,other_clients,problem", [
    (288, 919, False, False),       # exactly this run's requests
    (576, 919, True, False),        # someone else's hit: theirs, not a failure
    (288, 2000, True, False),       # someone else's cold request
    (100, 2000, True, True),        # fewer hits than the requests claim: a failure, shared or not
])
def test_a_shared_engine_records_other_clients_and_fails_only_on_missing_hits(hits, queries, other_clients, problem):
    requests = [request(0, 301), request(288, 317)]
    engine_counters, problems = audit.audit_counters(requests, engine_request(0, 301), counters(0, 0),
                                                 counters(hits, queries), shared=True)
    assert engine_counters["other_clients"] is other_clients
    assert (engine_counters["sum_cached_tokens"], engine_counters["sum_prompt_tokens"]) == (288, 919)
    assert bool(problems) is problem


def test_an_unshared_engine_fails_on_any_counter_mismatch():
    _, problems = audit.audit_counters([request(288, 317)], engine_request(0, 301), counters(0, 0), counters(576, 618))
    assert problems and "grew by 576" in problems[0]


def test_counters_are_read_until_they_hold_the_requests_or_the_time_is_up():
    """audit.wait_for_counters: counters that hold the requests' tokens end the wait at once; counters
    that never grow are read until timeout_s has passed, and their last reading is returned."""
    grown = lambda before, now: now["prompt_tokens"] - before["prompt_tokens"]
    readings = []

    def never_grows():
        readings.append(1)
        return {"prompt_tokens": 5}
    start = time.monotonic()
    assert audit.wait_for_counters(never_grows, grown, {"prompt_tokens": 5}, 10, timeout_s=0.3) == {"prompt_tokens": 5}
    assert time.monotonic() - start >= 0.3 and len(readings) >= 2
    assert audit.wait_for_counters(lambda: {"prompt_tokens": 15}, grown, {"prompt_tokens": 5}, 10) == {"prompt_tokens": 15}
    assert audit.wait_for_counters(lambda: None, lambda before, now: None, None, 10) is None    # nothing to wait for


def test_compute_stats_leaves_engine_timings_empty_where_the_engine_gives_none():
    trials = [{**_trial(10.0 + i, 100.0), "engine_ttft_ms": None, "prefill_ms": None} for i in range(3)]
    s = analysis.compute_stats(trials)
    assert (s["engine_ttft_mean"], s["prefill_median"]) == (None, None)
    assert s["ttft_mean"] == 11.0


def test_compute_stats_leaves_cached_tokens_empty_where_the_engine_reports_none():
    trials = [{**_trial(10.0, 100.0), "cached_tokens": None, "throughput_request": {"cached_tokens": None}}]
    s = analysis.compute_stats(trials)
    assert (s["cached_tokens"], s["cached_tokens_max"]) == (None, None)


SIGNAL_IN_A_DESTRUCTOR = """
    import signal, time
    from prefix_cache_bench import errors
    errors.stop_on_signals()
    class Request:
        def __del__(self):
            errors.stop_on_signal(signal.SIGINT, None)     # the signal, arriving here
    """


def run_after_a_signal_in_a_destructor(code):
    """What a Python process printed (stdout, stderr) that ran code after SIGNAL_IN_A_DESTRUCTOR."""
    import subprocess
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(SIGNAL_IN_A_DESTRUCTOR) + textwrap.dedent(code)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    return proc.stdout, proc.stderr


def test_a_signal_that_lands_in_a_destructor_still_ends_the_run():
    """A signal handler raises wherever the main thread is; inside a destructor or a weakref
    callback Python prints "Exception ignored" and goes on. stop_on_signals' unraisablehook
    raises it again at the next ordinary line, so the run ends as the signal says."""
    out, err = run_after_a_signal_in_a_destructor("""
        try:
            Request()
            for _ in range(10 ** 7):                       # ordinary code after it: the run's work
                pass
            print("not interrupted")
        except errors.Interrupted as e:
            print(e.exit_code)
        """)
    assert out.strip() == "130", out + err
    assert "Exception ignored" not in err


def test_a_redelivered_signal_leaves_alone_a_run_that_is_already_cleaning_up():
    """The destructor swallows the signal, then the next request's check raises one of its own:
    the run is unwinding, and the redelivery 10 ms later must not cut its clean-up short (it
    did: an aiohttp session stayed open and its warning became the run's last line)."""
    out, err = run_after_a_signal_in_a_destructor("""
        try:
            try:
                Request()
                errors.raise_if_interrupted()                  # the next request's check
                print("not interrupted")
            finally:
                time.sleep(20 * errors.REDELIVER_AFTER_S)      # a clean-up longer than the redelivery's delay
                print("cleaned up")
        except errors.Interrupted as e:
            print(e.exit_code)
        """)
    assert out.split() == ["cleaned", "up", "130"], out + err


def test_closing_the_client_closes_a_load_session_a_signal_left_open():
    """A task that a signal broke off may not reach its `finally: await session.close()`; an
    open session's connector would print "Unclosed connector" after the run's last line."""
    from prefix_cache_bench.http_client import HttpClient

    client = HttpClient("http://127.0.0.1:9", 5)

    async def open_one():
        return client.load_session()
    session = client.loop.run_until_complete(open_one())
    client.close()
    assert session.closed and client.session.closed and client.loop.is_closed()


def test_a_signal_during_the_client_s_close_still_closes_every_session_then_ends_the_run(monkeypatch):
    """A signal (or a swallowed one's redelivery) that lands in close() must not leave a session
    open: every step runs again, the loop is closed, and then the signal's Interrupted is raised."""
    from prefix_cache_bench.http_client import HttpClient

    client = HttpClient("http://127.0.0.1:9", 5)

    async def open_one():
        return client.load_session()
    session = client.loop.run_until_complete(open_one())
    calls, close_sessions = [], client._close_sessions

    def interrupted_once():
        calls.append(1)
        if len(calls) == 1:
            raise errors.Interrupted(signal.SIGINT)
        close_sessions()
    monkeypatch.setattr(client, "_close_sessions", interrupted_once)
    with pytest.raises(errors.Interrupted):
        client.close()
    assert len(calls) == 2 and session.closed and client.session.closed and client.loop.is_closed()


def test_a_failure_that_replaced_a_signal_s_exception_is_told_as_the_signal(monkeypatch):
    """vLLM 0.32's tokenizer pool puts back a tokenizer in a `finally`; a signal that lands
    before it has one turns our Interrupted into UnboundLocalError on its way out."""
    import signal as signals
    monkeypatch.setattr(errors, "_received", [])
    monkeypatch.setattr(signals, "signal", lambda *args: None)          # stop_on_signal ignores further signals
    assert errors.interruption() is None

    def borrow():
        try:
            errors.stop_on_signal(signals.SIGINT, None)
            tok = "a tokenizer"
        finally:
            print(tok)                                                  # noqa: F821 (unbound: the point)

    with pytest.raises(UnboundLocalError):
        borrow()
    stopped = errors.interruption()
    assert isinstance(stopped, errors.Interrupted) and stopped.exit_code == 130


def test_metrics_parse_as_prometheus_client_parses_them():
    """prometheus.parse_metrics against the Prometheus library's own parser (which vLLM installs) on
    a page with what vLLM's holds and what the format allows: histograms, counters with _created,
    an untyped sample, escaped label values, a timestamp, NaN and +Inf."""
    from prometheus_client.parser import text_string_to_metric_families
    page = "\n".join([
        "# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.",
        "# TYPE vllm:time_to_first_token_seconds histogram",
        'vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="/tmp/m"} 0.0',
        'vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="/tmp/m"} 7.0',
        'vllm:time_to_first_token_seconds_count{engine="0",model_name="/tmp/m"} 7.0',
        'vllm:time_to_first_token_seconds_sum{engine="0",model_name="/tmp/m"} 0.25',
        "# HELP vllm:prefix_cache_hits Prefix cache hits, in terms of number of cached tokens.",
        "# TYPE vllm:prefix_cache_hits counter",
        'vllm:prefix_cache_hits_total{engine="0",model_name="a \\"quoted\\" C:\\\\path\\nnext"} 384.0',
        'vllm:prefix_cache_hits_created{engine="0",model_name="m"} 1.7e+09',
        "vllm:num_requests_running 0.0 1700000000000",
        'vllm:odd{kind="nan"} NaN',
        'vllm:odd{kind="inf"} +Inf',
        "process_cpu_seconds_total 12.5",
    ]) + "\n"
    expected = {}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            expected.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    ours = prometheus.parse_metrics(page)
    nan = [("vllm:odd", 0)]
    assert all(math.isnan(ours[name][k][1]) and math.isnan(expected[name][k][1]) for name, k in nan)
    for name, k in nan:
        ours[name][k] = expected[name][k] = (ours[name][k][0], 0.0)
    assert ours == expected
    assert ours["vllm:prefix_cache_hits_total"][0][0]["model_name"] == 'a "quoted" C:\\path\nnext'


def test_one_context_fit_check_serves_both_phases():
    # 1 prefix + 1900 + 100 + 16 query + 50 output = 2067 > 2048; room 2048 - 67 = 1981
    with pytest.raises(errors.ExperimentError) as too_long:
        prompts.check_context_fits([(256, 256), (1900, 100)], 2048, 1, 50, "the server's max_model_len is 2048")
    assert too_long.value.exit_code == errors.EXIT_USAGE
    assert str(too_long.value) == ("A=1900 B=100 needs 2067 tokens (prompt 2017 + 50 output) but the server's "
                                   "max_model_len is 2048: A + B must be at most 1981, e.g. --size-a 1881 --size-b 100")
    prompts.check_context_fits([(1900, 100)], 2067, 1, 50, "fits exactly")
    prompts.check_context_fits([(1900, 100)], None, 1, 50, "a server that does not say")


def test_a_run_whose_main_thread_does_not_end_after_a_signal_is_ended_with_its_processes():
    """vLLM's engine start waits in one C call that runs no signal handler until it returns (up to
    600 s); a library may also swallow the signal's exception and wait on. The watchdog thread
    hears the signal as it arrives and ends the run INTERRUPT_GRACE_S later: its line, exit 143,
    the processes it started killed."""
    import signal as signals
    import subprocess
    code = textwrap.dedent("""
        import subprocess, sys, time
        from prefix_cache_bench import errors
        errors.INTERRUPT_GRACE_S = 0.5
        errors.stop_on_signals()
        child = subprocess.Popen(["sleep", "60"])
        try:
            print(child.pid, flush=True)     # the test's signal may land here already
            time.sleep(60)
        except BaseException:            # a library that swallows the signal's exception, and waits on
            time.sleep(60)
        """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    proc.send_signal(signals.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "-c: interrupted (SIGTERM): no partial results written (ended 0.5 s after the signal)"
    import psutil

    def killed():                       # gone, or a zombie until it is reaped
        try:
            return psutil.Process(child).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    deadline = time.monotonic() + 5     # a loaded host delivers the kill a moment later
    while not killed() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert killed()


def test_a_tool_s_own_flag_is_taken_out_and_the_rest_passed_on():
    assert cli.take_flag(["--rounds", "5", "--size-a", "9"], "--rounds", 20, int) == (5, ["--size-a", "9"])
    assert cli.take_flag(["--size-a", "9"], "--rounds", 20, int) == (20, ["--size-a", "9"])
    for argv, message in ((["--rounds"], "--rounds needs a value"), (["--rounds", "x"], "not a valid value: 'x'")):
        with pytest.raises(errors.ExperimentError) as e:
            cli.take_flag(argv, "--rounds", 20, int)
        assert message in str(e.value) and e.value.exit_code == 2
