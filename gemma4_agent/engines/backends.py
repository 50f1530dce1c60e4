"""Load an engine folder for a backend: torch (checkpoint folder), onnxruntime, TensorRT.

Every backend returns the same `Engine`: a model object the streaming session drives (the torch
module, or an exported-graph runner with the same `vision / embed / decode / logits` pieces), the
tokenizer and prompt builder, and the agent defaults stored beside the weights (agent.json)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..model.config import ModelConfig
from ..model.tokenizer import PromptBuilder, load_tokenizer
from .manifest import EngineError, check_manifest, read_manifest


@dataclass
class Engine:
    model: Any
    tokenizer: Any
    prompts: PromptBuilder
    config: ModelConfig
    agent_defaults: dict = field(default_factory=dict)


def load_engine(folder: str | Path, backend: str = "torch", device: str = "cpu", dtype=torch.float32) -> Engine:
    folder = Path(folder)
    manifest = read_manifest(folder)
    check_manifest(manifest, folder, backend=backend)
    config = ModelConfig.from_json(folder)
    check_manifest(manifest, folder, config=config)
    if device == "cuda" and not torch.cuda.is_available():
        raise EngineError("device 'cuda' asked for, but torch sees no CUDA device on this machine")
    if backend == "torch":
        from ..model.loader import load_model

        model = load_model(folder, dtype=dtype, device=device)
    elif backend == "onnxruntime":
        if device != "cpu":
            raise EngineError("the onnxruntime backend runs on the CPU here (device 'cpu'); use tensorrt on the Jetson")
        from .ort_backend import load_ort_model

        model = load_ort_model(folder, config, dtype=dtype)
    elif backend == "tensorrt":
        from .tensorrt_backend import load_trt_model

        model = load_trt_model(folder, config, manifest, device=device)
    else:
        raise EngineError(f"backend {backend!r} is not available for {folder}")
    tokenizer = load_tokenizer(folder)
    prompts = PromptBuilder(tokenizer, config.image_token_id, config.boi_token_id, config.eoi_token_id)
    defaults_path = folder / "agent.json"
    defaults = json.loads(defaults_path.read_text()) if defaults_path.is_file() else {}
    return Engine(model, tokenizer, prompts, config, defaults)
