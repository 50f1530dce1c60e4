"""A random-weight tiny engine (demo tokenizer, grammar-valid actions, meaningless steering) for
tests and development before a trained engine exists. Not a policy: do not read its agreement numbers."""
from __future__ import annotations

from pathlib import Path


def tiny_config(tokenizer) -> dict:
    ids = {t: tokenizer.token_to_id(t) for t in ("<|image>", "<image|>", "<|image|>")}
    return {
        "model_type": "gemma4_unified",
        "boi_token_id": ids["<|image>"], "eoi_token_id": ids["<image|>"], "image_token_id": ids["<|image|>"],
        "text_config": {"vocab_size": tokenizer.get_vocab_size(), "hidden_size": 64, "intermediate_size": 128,
                        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                        "global_head_dim": 32, "num_global_key_value_heads": 1, "attention_k_eq_v": True,
                        "sliding_window": 32, "final_logit_softcapping": 30.0,
                        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]},
        "vision_config": {"patch_size": 8, "pooling_kernel_size": 2, "mm_embed_dim": 32, "mm_posemb_size": 64,
                          "output_proj_dims": 32},
    }


def write_random_engine(out: str | Path, seed: int = 0) -> Path:
    """Write a random-weight tiny torch engine folder at `out` (a few hundred KB, ~1 s)."""
    import torch

    from ..demo.tokenizer import build_tokenizer
    from ..engines.torch_engine import write_torch_engine
    from ..model import ModelConfig, build_model

    tokenizer = build_tokenizer()
    cfg_json = tiny_config(tokenizer)
    torch.manual_seed(seed)
    model = build_model(ModelConfig.model_validate(cfg_json))
    return write_torch_engine(Path(out), model=model, config_json=cfg_json, tokenizer=tokenizer,
                              agent_defaults={"image_tokens": 70, "instruction": "go to the red ball",
                                              "max_prefix": 64, "max_context": 256})
