"""Write a torch engine folder: the checkpoint (config.json + model.safetensors), the tokenizer, the
agent defaults (agent.json) and a manifest that pins them together."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..model.config import ModelConfig
from ..model.loader import to_checkpoint_name
from ..model.network import Gemma4
from .manifest import Manifest, write_manifest


def save_checkpoint(model: Gemma4, config_json: dict, folder: Path, dtype=None) -> None:
    """Save in transformers' save_pretrained layout, so load_model (and transformers) read it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    tensors = {}
    persistent = {n for n, _ in model.named_parameters()}
    persistent |= {n for n, _ in model.state_dict().items()}
    for name, tensor in model.state_dict().items():
        if name not in persistent:
            continue
        t = tensor.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[to_checkpoint_name(name)] = t.contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def write_torch_engine(out: Path, checkpoint: Path | None = None, model: Gemma4 | None = None,
                       config_json: dict | None = None, tokenizer=None, agent_defaults: dict | None = None,
                       name: str | None = None, max_context: int = 1024) -> Path:
    """From a checkpoint folder (copied) or an in-memory model (saved), plus a tokenizer."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        for item in checkpoint.iterdir():
            if item.name.startswith("model") or item.name in ("config.json", "tokenizer.json"):
                shutil.copy2(item, out / item.name)
    else:
        save_checkpoint(model, config_json, out)
    if tokenizer is not None:
        tokenizer.save(str(out / "tokenizer.json"))
    if agent_defaults is not None:
        (out / "agent.json").write_text(json.dumps(agent_defaults, indent=2) + "\n")
    cfg = ModelConfig.from_json(out)
    files = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != "manifest.json")
    manifest = Manifest(name=name or out.name, backend="torch", config_hash=cfg.fingerprint(), max_context=max_context,
                        image_tokens=(agent_defaults or {}).get("image_tokens", 280),
                        library_versions={"torch": torch.__version__.split("+")[0]})
    write_manifest(out, manifest, files)
    return out
