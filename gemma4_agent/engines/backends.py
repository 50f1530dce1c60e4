"""Load an engine folder for a backend: torch (checkpoint folder), onnxruntime, TensorRT.

Every backend returns the same `Engine`: a model object the streaming session drives (the torch
module, or an exported-graph runner with the same `vision / embed / decode / logits` pieces), the
tokenizer and prompt builder, and the agent defaults stored beside the weights (agent.json)."""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import one_line
from ..model.config import ImageTokens, ModelConfig
from ..model.tokenizer import PromptBuilder, load_tokenizer
from .manifest import EngineError, check_manifest, read_manifest


@dataclass
class Engine:
    model: Any
    tokenizer: Any
    prompts: PromptBuilder
    config: ModelConfig
    agent_defaults: dict = field(default_factory=dict)


class AgentDefaults(BaseModel):
    """agent.json: what the agent uses where its config leaves a value open. Other keys (e.g. training
    notes) are allowed and kept."""
    model_config = ConfigDict(extra="allow")
    # defaults as the agent's when a key is absent (only the file's own values are kept); null is refused
    image_tokens: ImageTokens = 280
    instruction: str = "go to the red ball"
    system: str = ""
    max_prefix: int = Field(256, ge=1)
    max_context: int = Field(1024, ge=1)


def read_agent_defaults(folder: Path) -> dict:
    """agent.json as a dict ({} when absent); EngineError, naming the file and field, when malformed."""
    path = folder / "agent.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        AgentDefaults.model_validate(data)
    except (ValueError, ValidationError) as exc:  # bad JSON, or a value the agent cannot use
        raise EngineError(f"{path}: {one_line(exc)} (fix it or rebuild the engine)") from exc
    return data


@contextmanager
def _rebuild_on(folder: Path, *errors: type):
    """An engine file that is missing or malformed (one of `errors`) as an EngineError saying to rebuild."""
    try:
        yield
    except errors as exc:
        raise EngineError(f"engine {folder}: {exc} (rebuild the engine)") from exc


def load_engine(folder: str | Path, backend: str = "torch", device: str = "cpu", dtype=torch.float32) -> Engine:
    folder = Path(folder)
    manifest = read_manifest(folder)
    check_manifest(manifest, folder, backend=backend)
    with _rebuild_on(folder, OSError, ValueError):  # missing or malformed config.json
        config = ModelConfig.from_json(folder)
    check_manifest(manifest, folder, config=config)
    defaults = read_agent_defaults(folder)  # before the weights load: a bad file fails in a second
    if device == "cuda" and not torch.cuda.is_available():
        raise EngineError("device 'cuda' asked for, but torch sees no CUDA device on this machine")
    if backend == "torch":
        from ..model.loader import CheckpointError, load_model

        with _rebuild_on(folder, OSError, CheckpointError):  # weights that do not fit the config, or unreadable
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
    with _rebuild_on(folder, OSError, ValueError):
        tokenizer = load_tokenizer(folder)
    prompts = PromptBuilder(tokenizer, config.image_token_id, config.boi_token_id, config.eoi_token_id)
    return Engine(model, tokenizer, prompts, config, defaults)
