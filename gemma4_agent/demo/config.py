"""The demo model's shape: Gemma 4 Unified, tiny.

Same architecture as the 12B checkpoint (model_type gemma4_unified, the one network in
gemma4_agent/model): sliding and full attention layers, full layers with their own (larger)
head_dim, one KV head and K = V, proportional RoPE on full layers, final logit soft-capping,
encoder-free vision (raw patches -> LN -> Linear -> position table -> projection). Only the sizes
differ, and the patch: 16 px pooled 2x2, so a merged patch is 32 px (3072 values) and a 320x240
frame at the 70-token budget (resized to 288x224) is 9 x 7 = 63 image tokens.
"""
from __future__ import annotations

from .data import PATCH_SIZE, POOLING
from .tokenizer import SPECIAL_TOKENS

HIDDEN = 128
LAYERS = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def demo_config_json(vocab_size: int, hidden: int = HIDDEN, layer_types: list[str] | None = None,
                     intermediate: int | None = None, mm_embed: int = 128) -> dict:
    """config.json of the demo model, in transformers' layout (what load_model reads)."""
    layer_types = list(layer_types or LAYERS)
    ids = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    return {
        "architectures": ["Gemma4UnifiedForConditionalGeneration"],
        "model_type": "gemma4_unified",
        "boi_token_id": ids["<|image>"],
        "eoi_token_id": ids["<image|>"],
        "image_token_id": ids["<|image|>"],
        "tie_word_embeddings": True,
        "text_config": {
            "model_type": "gemma4_unified_text",
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": intermediate or 3 * hidden,
            "num_hidden_layers": len(layer_types),
            "layer_types": layer_types,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "global_head_dim": 64,
            "num_global_key_value_heads": 1,
            "attention_k_eq_v": True,
            "num_kv_shared_layers": 0,
            "hidden_activation": "gelu_pytorch_tanh",
            "rms_norm_eps": 1e-06,
            "sliding_window": 64,
            "final_logit_softcapping": 30.0,
            "max_position_embeddings": 1024,
            "use_bidirectional_attention": "vision",
            "tie_word_embeddings": True,
            "pad_token_id": ids["<pad>"],
            "eos_token_id": ids["<eos>"],
            "bos_token_id": ids["<bos>"],
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
            },
        },
        "vision_config": {
            "model_type": "gemma4_unified_vision",
            "patch_size": PATCH_SIZE,
            "pooling_kernel_size": POOLING,
            "mm_embed_dim": mm_embed,
            "mm_posemb_size": 128,
            "output_proj_dims": mm_embed,
            "rms_norm_eps": 1e-06,
        },
    }
