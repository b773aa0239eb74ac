"""prefix_cache_bench.traces against answers worked out by hand: reading and checking Mooncake
traces, the window, prompts from hash IDs, the ideal ledger, the LRU model, capacities. No engine."""
import gzip
import json
import subprocess
import sys

import numpy
import pytest

from conftest import ROOT
from prefix_cache_bench import traces
from prefix_cache_bench.errors import EXIT_USAGE, ExperimentError
from prefix_cache_bench.traces import TraceRequest


def write_trace(path, records, blank_lines=()):
    """records (dicts or raw strings) as JSONL, gzip if the name ends .gz; blank lines before the
    given 0-based record indices."""
    lines = []
    for i, record in enumerate(records):
        lines += [""] * (i in blank_lines)
        lines.append(record if isinstance(record, str) else json.dumps(record))
    text = "\n".join(lines) + "\n"
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt") as f:
        f.write(text)
    return str(path)


def rec(timestamp, input_length, hash_ids, output_length=10):
    return {"timestamp": timestamp, "input_length": input_length, "output_length": output_length,
            "hash_ids": hash_ids}


def req(hash_ids, input_length, timestamp_ms=0.0, output_length=0, line=1):
    return TraceRequest(line, float(timestamp_ms), input_length, output_length, tuple(hash_ids))


def usage_error(call, *args, **kwargs):
    with pytest.raises(ExperimentError) as caught:
        call(*args, **kwargs)
    assert caught.value.exit_code == EXIT_USAGE
    message = str(caught.value)
    assert "\n" not in message
    return message


# ---- reading ----

@pytest.mark.parametrize("name", ["t.jsonl", "t.jsonl.gz"])
def test_read_trace_reads_plain_and_gzip_skipping_blank_lines(tmp_path, name):
    path = write_trace(tmp_path / name, [rec(0, 1000, [7, 8], 5), rec(12.5, 512, [7], 0),
                                         rec(12.5, 513, [-3, 2 ** 70], 1)], blank_lines=(1,))
    requests = traces.read_trace(path)
    assert requests == [TraceRequest(1, 0.0, 1000, 5, (7, 8)), TraceRequest(3, 12.5, 512, 0, (7,)),
                        TraceRequest(4, 12.5, 513, 1, (-3, 2 ** 70))]
    assert isinstance(requests[0].timestamp_ms, float)


def test_read_trace_takes_the_block_size(tmp_path):
    path = write_trace(tmp_path / "t.jsonl", [rec(0, 9, [1, 2, 3])])
    assert traces.read_trace(path, trace_block_size=4)[0].hash_ids == (1, 2, 3)


@pytest.mark.parametrize("bad_line, expected", [
    ('{"timestamp": 5, "input_length": 10, "output_length": 1}', "missing field 'hash_ids'"),
    ('{"input_length": 10, "output_length": 1, "hash_ids": [1]}', "missing field 'timestamp'"),
    ('{"timestamp": 5, "input_length": 10, "output_length": 1, "hash_ids": [1]', "not JSON"),
    ('[5, 10, 1, [1]]', "not a JSON object"),
    ('{"timestamp": 5, "input_length": 0, "output_length": 1, "hash_ids": []}', "input_length must be an integer >= 1"),
    ('{"timestamp": 5, "input_length": 10.0, "output_length": 1, "hash_ids": [1]}', "input_length must be"),
    ('{"timestamp": 5, "input_length": 10, "output_length": -1, "hash_ids": [1]}', "output_length must be"),
    ('{"timestamp": 5, "input_length": 10, "output_length": true, "hash_ids": [1]}', "output_length must be"),
    ('{"timestamp": "5", "input_length": 10, "output_length": 1, "hash_ids": [1]}', "timestamp must be"),
    ('{"timestamp": -1, "input_length": 10, "output_length": 1, "hash_ids": [1]}', "timestamp must be"),
    ('{"timestamp": 5, "input_length": 10, "output_length": 1, "hash_ids": [1, "2"]}', "hash_ids must be a list"),
    ('{"timestamp": 5, "input_length": 10, "output_length": 1, "hash_ids": 1}', "hash_ids must be a list"),
    ('{"timestamp": 5, "input_length": 1025, "output_length": 1, "hash_ids": [1, 2]}',
     "hash_ids has 2 blocks, input_length 1025 needs 3 at block size 512"),
    ('{"timestamp": 5, "input_length": 512, "output_length": 1, "hash_ids": [1, 2]}',
     "hash_ids has 2 blocks, input_length 512 needs 1 at block size 512"),
    ('{"timestamp": 9, "input_length": 10, "output_length": 1, "hash_ids": [1]}',
     "timestamp 9 ms goes backwards from 10 ms on line 1"),
])
def test_read_trace_names_file_line_and_problem(tmp_path, bad_line, expected):
    path = write_trace(tmp_path / "bad.jsonl", [rec(10, 10, [1]), "", bad_line, rec(20, 10, [1])])
    message = usage_error(traces.read_trace, path)
    assert message.startswith(f"{path}:3: ")
    assert expected in message


def test_read_trace_refuses_an_empty_file(tmp_path):
    for name, content in (("empty.jsonl", []), ("blank.jsonl.gz", ["", " "])):
        path = write_trace(tmp_path / name, content)
        message = usage_error(traces.read_trace, path)
        assert message.startswith(f"{path}:") and message.endswith("no requests")


def test_read_trace_names_a_missing_file(tmp_path):
    path = str(tmp_path / "absent.jsonl")
    assert usage_error(traces.read_trace, path).startswith(f"{path}:1: cannot read the trace")


def test_check_block_sizes(tmp_path):
    traces.check_block_sizes(512, 16, "t.jsonl")
    traces.check_block_sizes(512, 512, "t.jsonl")
    for trace_block, engine_block in ((512, 48), (16, 32), (0, 16), (512, 0)):
        message = usage_error(traces.check_block_sizes, trace_block, engine_block, "t.jsonl")
        assert message.startswith("t.jsonl:1: ")
        assert f"trace block size {trace_block} tokens" in message and f"block size {engine_block} tokens" in message


# ---- blocks and prefixes ----

def test_prefix_keys_stand_for_the_whole_prefix():
    a, b, c = traces.prefix_keys([1, 2, 3]), traces.prefix_keys([1, 2, 4]), traces.prefix_keys([9, 2, 3])
    assert a[:2] == b[:2] and a[2] != b[2]
    assert len(set(a) | set(c)) == 6           # same later IDs after another first ID: other keys
    assert a == traces.prefix_keys((1, 2, 3)) and traces.prefix_keys([]) == []


def test_block_tokens_and_unique_tokens():
    assert traces.block_tokens(req([1, 2], 12), 8) == [8, 4]
    assert traces.block_tokens(req([1, 2], 16), 8) == [8, 8]
    assert traces.block_tokens(req([1], 1), 512) == [1]
    # keys: (1) 8 tokens, (1,2) max(4, 8) = 8, (1,2,3) 4, (9) 8  ->  28
    requests = [req([1, 2], 12), req([1, 2, 3], 20), req([1], 8), req([9], 8)]
    assert traces.unique_tokens(requests, 8) == 28
    assert traces.unique_tokens([], 8) == 0


# ---- the window ----

def window_trace():
    """Trace block 4 tokens. c (12 tokens) and e (12) are over a 10-token limit."""
    return {name: req(ids, length, t, line=n + 1) for n, (name, ids, length, t) in enumerate([
        ("a", [1, 2], 8, 0), ("b", [1, 2], 8, 500), ("c", [1, 3, 11], 12, 1000), ("d", [4], 3, 2000),
        ("e", [5, 6, 7], 12, 3000), ("f", [1, 2], 8, 4000), ("g", [8, 9], 8, 5000), ("h", [10], 4, 6000)])}


def names(requests):
    return "".join(chr(ord("a") + r.line - 1) for r in requests)


def select(**kwargs):
    return traces.select_window(list(window_trace().values()), "w.jsonl", trace_block_size=4, **kwargs)


def test_window_counts_requests_after_skips():
    w = select(start_s=3, num_requests=2, max_input_tokens=10)
    assert (names(w.measured), names(w.skipped), names(w.history)) == ("fg", "e", "")
    assert (w.start_s, w.duration_s) == (3.0, 2.0)
    w = select(start_s=3, duration_s=2, max_input_tokens=10)        # [3000, 5000) ms
    assert (names(w.measured), names(w.skipped), w.duration_s) == ("f", "e", 1.0)
    w = select(start_s=3)                                             # no limit: nothing skipped
    assert (names(w.measured), names(w.skipped), w.duration_s) == ("efgh", "", 3.0)
    w = select(num_requests=1)
    assert (names(w.measured), w.duration_s) == ("a", 0.0)


def test_window_history_by_count_skips_long_requests_there_too():
    assert names(select(start_s=3, max_input_tokens=10, history_requests=1).history) == "d"
    assert names(select(start_s=3, max_input_tokens=10, history_requests=2).history) == "bd"
    assert names(select(start_s=3, max_input_tokens=10, history_requests=9).history) == "abd"
    assert names(select(start_s=3, history_requests=2).history) == "cd"
    assert names(select(start_s=3, max_input_tokens=10, history_requests=0).history) == ""


@pytest.mark.parametrize("history_tokens, expected", [
    (1, "d"), (3, "d"), (4, "bd"), (11, "bd"), (12, "abd"), (10 ** 9, "abd"), (None, "")])
def test_window_history_by_new_unique_tokens(history_tokens, expected):
    # tail d: 3 new tokens; + b: 8 more (11); + a: a repeats b, 0 more: 12 is never reached
    assert names(select(start_s=3, max_input_tokens=10, history_tokens=history_tokens).history) == expected


@pytest.mark.parametrize("history_tokens, expected", [(4, "s"), (5, "rs"), (12, "rs"), (13, "pqrs"), (16, "pqrs")])
def test_window_history_counts_only_new_tokens(history_tokens, expected):
    # tail s: 4 new tokens; + r: 8 (12); + q repeats r: 0 (12); + p: 4 (16)
    requests = [req(ids, length, t, line=n + 16) for n, (ids, length, t) in enumerate(
        [([30], 4, 0), ([1, 2], 8, 1), ([1, 2], 8, 2), ([40], 4, 3), ([50], 4, 10_000)])]
    window = traces.select_window(requests, "h.jsonl", start_s=10, history_tokens=history_tokens, trace_block_size=4)
    assert names(window.history) == expected and names(window.measured) == "t"


def test_window_history_requests_wins_over_tokens():
    assert names(select(start_s=3, max_input_tokens=10, history_tokens=1, history_requests=2).history) == "bd"


def test_an_empty_window_is_refused_naming_the_file():
    message = usage_error(select, start_s=7)
    assert message.startswith("w.jsonl:8: no request in the window")
    message = usage_error(select, start_s=3, duration_s=0.5, max_input_tokens=10)
    assert message.startswith("w.jsonl:") and "no request in the window" in message and "1 skipped" in message
    assert usage_error(select, duration_s=0).startswith("w.jsonl:1: ")
    assert usage_error(select, num_requests=0).startswith("w.jsonl:1: ")


# ---- prompts ----

class FakeTokenizer:
    all_special_ids = [0, 2]

    def __len__(self):
        return 10

    def get_added_vocab(self):
        return {"<x>": 9, "<y>": 8}


def test_ordinary_token_ids_leave_out_special_and_added_tokens():
    ids = traces.ordinary_token_ids(FakeTokenizer())
    assert ids.dtype == numpy.int32 and ids.tolist() == [1, 3, 4, 5, 6, 7]


VOCAB = numpy.arange(100, 2100, dtype=numpy.int32)       # 2000 ordinary ids; 0-99 stand for special ones


def test_prompts_share_exactly_their_shared_blocks():
    maker = traces.PromptMaker(VOCAB, seed=7)
    a = maker.prompt_ids(req([10, 20, 30], 1500))
    b = maker.prompt_ids(req([10, 20, 40, 50], 1800))
    assert (len(a), len(b)) == (1500, 1800)
    assert a[:1024] == b[:1024]
    assert a[1024] != b[1024]
    assert sum(x == y for x, y in zip(a[1024:], b[1024:])) < 10        # ~476/2000 by chance
    assert all(type(t) is int for t in a)
    assert set(a) | set(b) <= set(VOCAB.tolist())
    assert len(set(a)) > 400                                            # drawn, not constant


def test_prompts_are_deterministic_and_seeded():
    request = req([1, -5, 2 ** 70], 1100)
    first = traces.PromptMaker(VOCAB, seed=3).prompt_ids(request)
    assert first == traces.PromptMaker(VOCAB, seed=3).prompt_ids(request)
    assert first != traces.PromptMaker(VOCAB, seed=4).prompt_ids(request)
    maker = traces.PromptMaker(VOCAB, seed=3, trace_block_size=16)
    assert len(maker.block(-5)) == 16 and maker.block(-5).tolist() == maker.block(-5).tolist()
    assert maker.block(1).tolist() != maker.block(2).tolist()


def test_prompt_maker_keeps_a_bounded_cache():
    maker = traces.PromptMaker(VOCAB, seed=1, trace_block_size=4)
    for hash_id in range(5000):
        maker.block(hash_id)
    assert maker._cached_block.cache_info().currsize <= 4096


# ---- the ideal ledger ----

def test_ideal_ledger_on_a_hand_built_sequence():
    ledger = traces.IdealLedger(engine_block_size=4, trace_block_size=8)
    assert ledger.observe(req([1, 2], 12)) == 0                # sends (1) 8 tokens, (1,2) 4 tokens
    assert ledger.reusable_tokens(req([1, 2, 3], 20)) == 12    # 8, then (1,2) sent shorter: 4, stop
    assert ledger.observe(req([1, 2, 3], 20)) == 12            # now (1,2) 8 tokens, (1,2,3) 4
    assert ledger.observe(req([1, 2, 3], 17)) == 16            # 8 + 8 + 1 = 17, capped at 16
    assert ledger.observe(req([1, 2], 14)) == 12               # 8 + 6 = 14, capped at 13, rounded to 12
    assert ledger.observe(req([9, 2], 16)) == 0                # same second ID, other prefix
    assert ledger.observe(req([7], 6)) == 0
    assert ledger.observe(req([7, 8], 16)) == 4                # (7) sent 6 tokens: 6, rounded to 4
    assert ledger.reusable_tokens(req([1, 2, 3], 24)) == 20    # 8 + 8 + 4, then stop


def test_ideal_ledger_record_without_counting():
    ledger = traces.IdealLedger(engine_block_size=16)
    ledger.record(req([5], 512))
    assert ledger.reusable_tokens(req([5, 6], 1024)) == 512
    assert ledger.reusable_tokens(req([5], 512)) == 496        # input - 1 = 511, rounded to 496


# ---- the LRU model (engine block 4 tokens, trace block 8 = 2 engine blocks) ----

def simulator(capacity_tokens):
    return traces.PrefixCacheSimulator(capacity_tokens, engine_block_size=4, trace_block_size=8)


X, Y = req([1, 2], 16), req([3, 4], 16)        # 4 engine blocks each, no output


def test_a_capacity_of_one_request():
    one, two = simulator(16), simulator(32)
    assert [one.observe(r) for r in (X, X, Y, X)] == [0, 12, 0, 0]      # Y evicts all of X
    assert [two.observe(r) for r in (X, X, Y, X)] == [0, 12, 0, 12]
    assert one.observe(req([1, 2], 16, output_length=3)) == 12          # 3 tokens: no whole output block


def test_output_blocks_go_before_the_prompt_and_the_tail_before_the_head():
    cache = simulator(24)                                     # 6 blocks
    x_out = req([1, 2], 16, output_length=9)                  # 4 prompt + 2 output blocks: full
    assert cache.observe(x_out) == 0
    assert cache.observe(req([5], 8)) == 0                    # +2 blocks: X's output evicted, not its prompt
    assert cache.observe(x_out) == 12                         # order now: (5), out, (1,2), (1); (5) evicted
    assert cache.observe(req([7], 8)) == 0                    # evicts X's second output
    assert cache.observe(req([8], 8)) == 0                    # evicts (1,2): the tail before the head
    assert cache.observe(X) == 8                              # (1) is left
    assert cache._cached_blocks <= cache.capacity_blocks


def test_output_blocks_take_room():
    cache = simulator(32)                                     # 8 blocks
    x_out, y_out = req([1, 2], 16, output_length=9), req([3, 4], 16, output_length=11)
    assert [cache.observe(r) for r in (x_out, y_out, X)] == [0, 0, 8]    # 12 blocks: X's output, then (1,2) go
    cache = simulator(32)
    assert [cache.observe(r) for r in (X, Y, X)] == [0, 0, 12]            # without outputs both fit


def test_output_blocks_are_the_full_blocks_the_engine_computed_past_the_prompt():
    # KV for the prompt and all but the last generated token: 6 + 3 - 1 = 8 tokens, 2 full blocks,
    # one of them the prompt's tail with the output's first tokens
    def blocks(input_length, output_length):
        return simulator(1000)._output_blocks(req([1, 2], input_length, output_length=output_length))
    assert [blocks(6, 3), blocks(6, 2), blocks(16, 4), blocks(16, 5), blocks(16, 9), blocks(16, 0)] == [1, 0, 0, 1, 2, 0]
    cache = simulator(12)                                     # 3 blocks
    a, c = req([1], 8), req([2], 6, output_length=3)          # A: 2 blocks; C: 1 prompt block + 1 of tail and output
    assert [cache.observe(r) for r in (a, c, a)] == [0, 0, 0]  # C's 2 blocks push A's out


def test_a_request_longer_than_the_capacity():
    cache = simulator(12)                                     # 3 blocks: X's tail block never fits
    assert [cache.observe(X) for _ in range(3)] == [0, 8, 8]
    tiny = simulator(4)                                       # 1 block: even X's first trace block goes
    assert [tiny.observe(X) for _ in range(3)] == [0, 0, 0]
    assert tiny._cached_blocks == 0


def test_capacity_zero_finds_nothing():
    for capacity_tokens in (0, 3):                            # 3 tokens: no whole engine block
        cache = simulator(capacity_tokens)
        assert [cache.observe(X) for _ in range(3)] == [0, 0, 0]


def test_partial_blocks_in_the_cache():
    cache = simulator(10 ** 6)
    assert cache.observe(req([1, 2], 14)) == 0                # caches (1) 2 blocks, (1,2) 1 block
    assert cache.observe(req([1, 2, 3], 20)) == 12            # 2 + 1 (short node, stop) = 3 blocks
    assert cache.observe(req([1, 2], 14)) == 12               # (1,2) now 2 blocks; 13 -> 12
    assert cache.observe(req([1, 2, 3], 24), traces.prefix_keys([1, 2, 3])) == 20   # 8 + 8 + 1 block


# ---- capacities ----

def test_parse_capacities():
    assert traces.parse_capacities("0.5x,1x,2x,4x,16x", 1000) == [
        ("0.5x", 500), ("1x", 1000), ("2x", 2000), ("4x", 4000), ("16x", 16000)]
    assert traces.parse_capacities("0.5x, 0.1x", 999) == [("0.5x", 499), ("0.1x", 99)]   # rounded down
    assert traces.parse_capacities("200k,2K,1.5M,0.1M,300,0", None) == [
        ("200k", 200000), ("2K", 2000), ("1.5M", 1500000), ("0.1M", 100000), ("300", 300), ("0", 0)]
    assert traces.parse_capacities("2x,1x", 10) == [("2x", 20), ("1x", 10)]


@pytest.mark.parametrize("text, expected", [
    ("1x", "--kv-capacity-tokens"), ("abc", "'abc'"), ("1G", "'1G'"), ("-5", "'-5'"), ("1x,,2x", "''"),
    ("1x,1x", "both 1000 tokens"), ("1000,1k", "both 1000 tokens"), ("", "''")])
def test_parse_capacities_refuses(text, expected):
    reference = None if expected == "--kv-capacity-tokens" else 1000
    assert expected in usage_error(traces.parse_capacities, text, reference)


def test_simulate_capacities_by_hand():
    window = traces.TraceWindow(history=[X, X], measured=[X, Y, X], skipped=[], start_s=0.0, duration_s=1.0)
    result = traces.simulate_capacities(window, [("none", 0), ("one", 16), ("two", 32), ("all", 10 ** 9)],
                                        engine_block_size=4, trace_block_size=8)
    assert {k: v for k, v in result.items() if k != "capacities"} == {
        "input_tokens": 48, "ideal_reusable_tokens": 24, "ideal_share": 0.5, "engine_block_size": 4,
        "trace_block_size": 8, "requests": 3, "history_requests": 2}
    assert [(c["label"], c["capacity_tokens"], c["reusable_tokens"], c["share"], c["share_of_ideal"])
            for c in result["capacities"]] == [
        ("none", 0, 0, 0.0, 0.0), ("one", 16, 12, 0.25, 0.5), ("two", 32, 24, 0.5, 1.0), ("all", 10 ** 9, 24, 0.5, 1.0)]
    json.dumps(result)


def conversations(seed=0, sessions=40, turns=6):
    """Multi-turn sessions: each turn's prompt extends the last (whole 16-token trace blocks, so a
    larger LRU holds a superset), sessions interleaved at random."""
    rng = numpy.random.default_rng(seed)
    next_id, order, prefixes, requests = 1000, [], {}, []
    for s in range(sessions):
        order += [s] * turns
    for n, s in enumerate(rng.permutation(order)):
        prefix = prefixes.setdefault(s, [s])
        prefix += list(range(next_id, next_id + int(rng.integers(1, 4))))
        next_id += 4
        requests.append(req(prefix, 16 * len(prefix), 1000 * n, int(rng.integers(0, 40)), line=n + 1))
    return requests


def test_simulate_capacities_grows_with_the_capacity_up_to_the_ideal():
    requests = conversations()
    window = traces.select_window(requests, "c.jsonl", start_s=50, history_requests=50, trace_block_size=16)
    capacities = [(f"{c}", c) for c in (0, 64, 256, 1024, 4096, 10 ** 7)]
    result = traces.simulate_capacities(window, capacities, engine_block_size=8, trace_block_size=16)
    shares = [c["share"] for c in result["capacities"]]
    assert shares == sorted(shares)
    assert shares[0] == 0 and 0 < shares[2] < shares[-1]
    assert result["capacities"][-1]["reusable_tokens"] == result["ideal_reusable_tokens"] > 0
    assert result["capacities"][-1]["share_of_ideal"] == 1.0
    assert (result["requests"], result["history_requests"]) == (len(requests) - 50, 50)


def test_traces_imports_neither_vllm_nor_torch():
    code = ("import sys; import prefix_cache_bench.traces; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'vllm', 'torch', 'transformers', 'aiohttp'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_a_prompts_json_is_its_ids_whole_blocks_and_a_cut_last_one():
    maker = traces.PromptMaker(numpy.arange(10, 2000), seed=3, trace_block_size=16)
    for length in (1, 15, 16, 17, 40, 48):
        request = traces.TraceRequest(1, 0.0, length, 1, tuple(range(7, 7 + -(-length // 16))))
        assert json.loads(maker.prompt_json(request)) == maker.prompt_ids(request)
