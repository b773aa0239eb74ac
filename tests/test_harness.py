"""The test harness itself: the offline model builder and the real engine on it."""
import json
import os

import pytest

from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from make_model import PRESETS, build_shape
from prefix_cache_bench.errors import ExperimentError



def test_model_folder_is_a_normal_checkpoint(tiny_model_dir, tiny_tokenizer):
    names = set(os.listdir(tiny_model_dir))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    config = json.load(open(os.path.join(tiny_model_dir, "config.json")))
    assert config["model_type"] == "opt"
    assert config["hidden_size"] // config["num_attention_heads"] >= 64   # CPU attention needs it
    ids = tiny_tokenizer.encode("Section 3: hello")
    assert ids[0] == 2 and len(ids) > 2        # OPT-style BOS </s> first


def test_opt_125m_preset_has_opt_125m_shape():
    import torch
    from transformers import OPTConfig, OPTForCausalLM
    with torch.device("meta"):
        model = OPTForCausalLM(OPTConfig(**PRESETS["opt-125m"]))
    n_params = sum(p.numel() for p in model.parameters())
    assert round(n_params / 1e6, 1) == 125.2


def test_real_engine_hits_on_repeat_and_misses_when_salted(llm):
    """What the tool relies on, and why misses are salted: a prompt seen before hits its own
    full blocks the second time (the design's unsalted [B, Q] "miss" is a hit from its second
    trial on), and a cache_salt makes it find nothing."""
    block = llm.llm_engine.vllm_config.cache_config.block_size
    ids = [2] + [10 + i % 500 for i in range(block * 2 + 5)]     # two full blocks and a bit
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    assert llm.reset_prefix_cache() is True
    first = llm.generate(TokensPrompt(prompt_token_ids=ids), params, use_tqdm=False)[0]
    again = llm.generate(TokensPrompt(prompt_token_ids=ids), params, use_tqdm=False)[0]
    salted = llm.generate(TokensPrompt(prompt_token_ids=ids, cache_salt="fresh"), params, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    assert again.num_cached_tokens == 2 * block           # only full blocks are cached
    assert salted.num_cached_tokens == 0
    assert again.metrics.first_token_latency > 0          # engine stats are on


@pytest.mark.parametrize("shape,billions", [("llama-3.1-8b", 8.03), ("qwen2.5-7b", 7.62), ("llama-3.1-70b", 70.55)])
def test_shape_folders_hold_the_published_architecture_and_no_weights(tmp_path, shape, billions):
    n_params = build_shape(str(tmp_path), shape)
    assert round(n_params / 1e9, 2) == billions
    names = set(os.listdir(tmp_path))
    assert {"config.json", "tokenizer.json"} <= names
    assert not any(n.endswith((".safetensors", ".bin")) for n in names)     # --load-format dummy makes them up


def test_the_bare_generate_check_pairs_the_tool_s_request_with_a_bare_generate_on_one_engine(llm, tiny_tokenizer):
    """tools/bare_generate_check.py on the real engine: per condition, both requests found what
    their condition promises (the audit), each pair timed, the difference their means' difference."""
    from conftest import load_tool
    check = load_tool("bare_generate_check")
    block = llm.llm_engine.vllm_config.cache_config.block_size
    rows, problems = check.compare(llm, "tiny", tiny_tokenizer, [(300, 100)], 3, 0, 0.0, block)
    assert problems == []
    assert [row["condition"] for row in rows] == ["cache_hit", "cache_miss", "cache_cold"]
    for row in rows:
        assert row["rounds"] == 3 and len(row["tool_ttft_ms"]) == len(row["bare_ttft_ms"]) == len(row["quiet_bare_ttft_ms"]) == 3
        assert row["difference_mean_ms"] == pytest.approx(row["tool_ttft_mean_ms"] - row["bare_ttft_mean_ms"])
        assert row["quiet_difference_mean_ms"] == pytest.approx(row["tool_ttft_mean_ms"] - row["quiet_bare_ttft_mean_ms"])
        low, high = row["difference_ci95"]
        assert low <= row["difference_mean_ms"] <= high
        assert row["within_budget"] == (abs(row["quiet_difference_mean_ms"]) <= check.BUDGET_MS)
    assert "| A=300 / B=100 | hit |" in check.table(rows)


def test_the_bare_generate_check_refuses_an_out_it_cannot_write_before_its_engine_starts(tiny_model_dir, tmp_path):
    """--out under a file: one line naming the flag, raised before machine_info or the engine (the
    measurement is never made only to be lost at its end)."""
    from conftest import load_tool
    check = load_tool("bare_generate_check")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ExperimentError, match="--out's folder .* is a file, not a folder"):
        check.main(["--model", tiny_model_dir, "--sizes", "300x100", "--out", str(blocker / "bare_generate_check.json")])
