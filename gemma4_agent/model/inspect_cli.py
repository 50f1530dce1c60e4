"""`gemma4-agent inspect CHECKPOINT_OR_CONFIG`: config summary, parameter count, weight bytes."""
from __future__ import annotations

import sys

from .config import FULL, ModelConfig
from .network import build_model

Q4_0_BITS = 4.5  # 4-bit values plus one fp16 scale per group of 32


def summary(cfg: ModelConfig) -> dict:
    model = build_model(cfg, device="meta")
    total = model.num_parameters()
    decoder_linear = sum(p.numel() for n, p in model.named_parameters()
                         if n.startswith("layers.") and p.dim() == 2)
    embedding = model.embed_tokens.weight.numel()
    text = cfg.text_config
    full = sum(t == FULL for t in text.layer_types)
    return {
        "parameters": total,
        "layers": f"{text.num_hidden_layers} ({text.num_hidden_layers - full} sliding, {full} full)",
        "hidden_size": text.hidden_size,
        "vocab_size": text.vocab_size,
        "sliding_window": text.sliding_window,
        "bytes_bf16": total * 2,
        "bytes_int4_decoder_linear": int(decoder_linear * Q4_0_BITS / 8 + (total - decoder_linear) * 2),
        "bytes_int4_with_embedding": int((decoder_linear + embedding) * Q4_0_BITS / 8
                                         + (total - decoder_linear - embedding) * 2),
    }


def add_arguments(parser) -> None:
    parser.add_argument("path", help="checkpoint folder, config.json, or a preset name (gemma4-12b)")


def run(args) -> int:
    try:
        cfg = ModelConfig.resolve(args.path)
    except (OSError, ValueError) as err:  # a wrong path or a malformed config: say so, no traceback
        print(f"gemma4-agent inspect: error: {err}", file=sys.stderr)
        return 2
    info = summary(cfg)
    width = max(map(len, info))
    for key, value in info.items():
        if key.startswith("bytes"):
            value = f"{value / 1e9:.2f} GB ({value:,} bytes)"
        elif isinstance(value, int):
            value = f"{value:,}"
        print(f"{key:<{width}}  {value}")
    return 0
