"""What an offline run's JSON records of its engine and model: vLLM's and torch's versions, the
device, the KV block, the model's shape and parameter count, the engine's arguments.
"""
import json
import os
import platform
import sys
from typing import Any

from .provenance import device_name, engine_environment


def model_shape(model_config: Any) -> dict[str, Any]:
    """The model's dimensions as the engine sees them, and its parameter count (counted on
    PyTorch's meta device: nothing is allocated, no weights are read). plot_results.py
    turns these into FLOPs per prefill."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = model_config.hf_text_config
    shape = {
        "architecture": (model_config.architectures or [None])[0],
        "num_parameters": None,
        "num_embedding_parameters": None,      # token embedding + LM head: no per-token matmul in prefill
        "num_layers": getattr(hf, "num_hidden_layers", None),
        "hidden_size": model_config.get_hidden_size(),
        "num_attention_heads": getattr(hf, "num_attention_heads", None),
        "num_kv_heads": model_config.get_total_num_kv_heads(),
        "head_dim": model_config.get_head_size(),
        "vocab_size": model_config.get_vocab_size(),
        "dtype": str(model_config.dtype).replace("torch.", ""),
    }
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config.hf_config,
                                                     trust_remote_code=model_config.trust_remote_code)
        # a tied LM head shares the embedding's tensor: count each tensor once
        embedding = {id(p): p for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
                     for p in m.parameters()}
        shape["num_parameters"] = sum(p.numel() for p in model.parameters())
        shape["num_embedding_parameters"] = sum(p.numel() for p in embedding.values())
    except Exception as e:     # an architecture transformers cannot build: the dimensions still stand
        print(f"note: parameters not counted ({type(e).__name__}: {e})", file=sys.stderr)
    return shape


def environment_info(llm: Any, engine_args: Any, engine_start_s: float) -> dict[str, Any]:
    import torch
    import vllm

    cc = llm.llm_engine.vllm_config.cache_config
    device = device_name()
    engine = {k: v for k, v in vars(engine_args).items() if not k.startswith("_")}
    return {
        "vllm_version": vllm.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": device,
        "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "block_size": cc.block_size,
        # prefix-cache hits land on multiples of this (vLLM >= 0.30 can set it below block_size)
        "cache_block_size": getattr(cc, "prefix_match_unit", None) or cc.block_size,
        "dtype": str(llm.llm_engine.model_config.dtype).replace("torch.", ""),
        "seed": engine_args.seed,
        "model_shape": model_shape(llm.llm_engine.model_config),
        "max_model_len": llm.llm_engine.model_config.max_model_len,
        "engine_args": json.loads(json.dumps(engine, default=str)),
        "env_vars": engine_environment(os.environ),
        "engine_start_s": engine_start_s,
    }
