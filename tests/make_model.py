"""Write model folders offline: a locally trained tokenizer plus random weights or no weights.

No model hub is reachable on the test machines (nor on the GPU box), so the
tests and the GPU runs build their own model. vLLM loads the folder by path like
any Hugging Face checkpoint. Random weights time exactly like trained ones as
long as the output length is fixed (the benchmark uses ignore_eos=True).

    python tests/make_model.py /tmp/tiny-opt                  # tiny, for CPU tests
    python tests/make_model.py /tmp/opt-125m --preset opt-125m  # OPT-125m-shaped (125.2 M params)
    python tests/make_model.py /tmp/llama-8b --shape llama-3.1-8b  # config + tokenizer only:
    python phase2_experiment.py --model /tmp/llama-8b --load-format dummy     # vLLM makes up the weights

A shape folder holds the real architecture's config.json (dimensions as published
for that model) and no weights; vLLM's --load-format dummy fills the weights with
random values at load time, so a 70B shape costs no download and no disk.

The tokenizer is a byte-level BPE trained with `tokenizers` on generated text;
like OPT's, it puts `</s>` (id 2) in front of every prompt as BOS.
"""
import argparse
import json
import os
import random

# Dimensions per preset. opt-125m is OPTConfig()'s defaults, i.e. facebook/opt-125m's shape.
PRESETS = {
    # head_dim = hidden_size / num_attention_heads must be >= 64 for vLLM's CPU attention.
    "tiny": dict(hidden_size=128, num_attention_heads=2, num_hidden_layers=2, ffn_dim=256,
                 word_embed_proj_dim=128, vocab_size=2048, max_position_embeddings=2048),
    "opt-125m": dict(),
}
# Real architectures, config only (for --load-format dummy): the published dimensions.
_LLAMA31 = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, num_key_value_heads=8,
                max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu",
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192},
                tie_word_embeddings=False, torch_dtype="bfloat16", bos_token_id=2, eos_token_id=2)
SHAPES = {
    "llama-3.1-8b": dict(_LLAMA31, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32),
    "llama-3.1-70b": dict(_LLAMA31, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64),
    "qwen2.5-7b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=131072, rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu",
                       use_sliding_window=False, tie_word_embeddings=False, torch_dtype="bfloat16",
                       bos_token_id=2, eos_token_id=2),
    "opt-125m": dict(model_type="opt", architectures=["OPTForCausalLM"], torch_dtype="float16"),
    # for the CPU tests of the --load-format dummy path (head_dim 64: CPU attention needs >= 64)
    "llama-tiny": dict(_LLAMA31, vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192),
}
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, as in OPT's vocabulary


def make_words(n_words, seed=0):
    """Pronounceable pseudo-words, deterministic for a seed."""
    rng = random.Random(seed)
    onsets = ["b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
              "br", "cl", "dr", "st", "tr", "sh", "ch", "pl"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
    words = set()
    while len(words) < n_words:
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.randint(1, 3))))
    return sorted(words)


def training_text(n_lines=3000, seed=0):
    """Generated text the tokenizer is trained on: pseudo-words, digits, punctuation."""
    rng = random.Random(seed)
    words = make_words(1500, seed)
    lines = []
    for i in range(n_lines):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(5, 20)))
        lines.append(f"Section {i}: {sentence.capitalize()}. Question {rng.randint(0, 999)}?")
    return lines


def build_tokenizer(out_dir, vocab_size, seed=0, max_length=2048):
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(training_text(seed=seed), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=SPECIAL_TOKENS, show_progress=False)
    bos_id = bpe.token_to_id("</s>")
    # Like OPT: every encoded prompt starts with </s>.
    bpe.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A $B", special_tokens=[("</s>", bos_id)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="</s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>", model_max_length=max_length)
    tok.save_pretrained(out_dir)
    return tok


def build_model(out_dir, preset="tiny", dtype="float32", seed=0):
    """Write tokenizer + randomly initialised OPTForCausalLM to out_dir; return the parameter count."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    dims = PRESETS[preset]
    config = OPTConfig(**dims)
    # The tokenizer may be smaller than the embedding table (OPT-125m pads its vocab the same way).
    tok = build_tokenizer(out_dir, vocab_size=min(config.vocab_size, 8000), seed=seed)
    assert len(tok) <= config.vocab_size, (len(tok), config.vocab_size)
    torch.manual_seed(seed)
    model = OPTForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    with open(os.path.join(out_dir, "MODEL_CARD.json"), "w") as f:
        json.dump({"preset": preset, "parameters": n_params, "dtype": dtype, "seed": seed,
                   "weights": "random (not trained)", "tokenizer": "byte-level BPE trained on generated text"},
                  f, indent=2)
    return n_params


def build_shape(out_dir, shape, seed=0):
    """Write a real architecture's config.json and the local tokenizer, no weights; return the
    parameter count (counted on PyTorch's meta device: nothing is allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    dims = dict(SHAPES[shape])
    config = AutoConfig.for_model(dims.pop("model_type"), **dims)
    config.save_pretrained(out_dir)
    build_tokenizer(out_dir, vocab_size=min(config.vocab_size, 8000), seed=seed, max_length=config.max_position_embeddings)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    with open(os.path.join(out_dir, "MODEL_CARD.json"), "w") as f:
        json.dump({"shape": shape, "parameters": n_params, "weights": "none: run with --load-format dummy",
                   "tokenizer": "byte-level BPE trained on generated text"}, f, indent=2)
    return n_params


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="a real architecture, config + tokenizer only")
    parser.add_argument("--dtype", default=None, help="default: float32 for tiny, float16 for opt-125m")
    parser.add_argument("--seed", type=int, default=0)
    return parser


if __name__ == "__main__":
    args = build_parser().parse_args()
    if args.shape:
        n = build_shape(args.out_dir, args.shape, args.seed)
        print(f"wrote the {args.shape} shape ({n / 1e9:.2f} B parameters, no weights) to {args.out_dir}")
        raise SystemExit(0)
    dtype = args.dtype or ("float32" if args.preset == "tiny" else "float16")
    n = build_model(args.out_dir, args.preset, dtype, args.seed)
    print(f"wrote {args.preset} OPT model ({n / 1e6:.1f} M parameters, {dtype}) to {args.out_dir}")
