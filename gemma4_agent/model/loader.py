"""Checkpoint loading: a folder with config.json and model.safetensors (or a sharded
model.safetensors.index.json), tensor names exactly as transformers' save_pretrained writes them.

Tensors are read one at a time from memory-mapped safetensors files and placed straight into a model
built on the meta device, so a 24 GB checkpoint never sits whole in RAM twice.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from torch import nn

from ..errors import one_line
from .config import ModelConfig
from .network import Gemma4

# checkpoint prefix -> our module prefix
_PREFIXES = (
    ("model.language_model.", ""),
    ("model.vision_embedder.", "vision."),
    ("model.embed_vision.embedding_projection.", "vision.projection."),
)
# Present in real checkpoints, not used by an image+text agent.
_IGNORED_PREFIXES = ("model.embed_audio.", "model.audio_tower.", "lm_head.")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """A dtype setting ("auto", "float32" or "bfloat16") for a device. "auto": bf16 on CUDA, and on a CPU with AMX
    (Intel's matrix tiles, which oneDNN runs bf16 matmuls on); float32 on other CPUs, where bf16's element-wise work is
    emulated or slower (BENCHMARKS.md, per-frame latency on CPU: the demo engine 16.4 ms in fp32, 22.9 in bf16 on an
    AVX512-BF16 CPU without AMX)."""
    if name != "auto":
        return DTYPES[name]
    if device == "cuda":
        return torch.bfloat16
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, present since torch 2.3
    return torch.bfloat16 if amx is not None and amx() else torch.float32


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names the tensor and what is wrong."""


def to_module_name(checkpoint_name: str) -> str | None:
    """Our parameter name for a checkpoint tensor name; None for tensors we deliberately ignore."""
    for prefix, ours in _PREFIXES:
        if checkpoint_name.startswith(prefix):
            return ours + checkpoint_name[len(prefix):]
    if checkpoint_name.startswith(_IGNORED_PREFIXES):
        return None
    raise CheckpointError(f"unexpected tensor {checkpoint_name!r} in checkpoint")


def to_checkpoint_name(module_name: str) -> str:
    """Inverse of to_module_name (used when we write checkpoints)."""
    for prefix, ours in sorted(_PREFIXES, key=lambda p: -len(p[1])):
        if module_name.startswith(ours):
            return prefix + module_name[len(ours):]
    raise KeyError(module_name)


@contextmanager
def _open_weights(file: Path, device: str = "cpu") -> Iterator:
    """safe_open, with a truncated or corrupt file named as such (safetensors raises its own error type)."""
    try:
        handle = safe_open(str(file), "pt", device=device)
    except Exception as exc:  # SafetensorError (bad header), or OSError
        raise CheckpointError(f"{file} is not a readable safetensors file ({one_line(exc)}): "
                              "truncated or corrupt, copy or export it again") from exc
    with handle as f:
        yield f


def checkpoint_files(path: Path) -> dict[str, list[str]]:
    """safetensors file -> tensor names in it."""
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files: dict[str, list[str]] = {}
            for name, file in weight_map.items():
                files.setdefault(file, []).append(name)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # bad JSON, or no {name: file} weight_map
            raise CheckpointError(f"{index} is not a safetensors index (JSON with a weight_map of tensor name -> "
                                  f"file): {type(exc).__name__}: {exc}") from exc
        if not files:
            raise CheckpointError(f"{index}: its weight_map is empty")
        return files
    if single.is_file():
        with _open_weights(single) as f:
            return {"model.safetensors": list(f.keys())}
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def checkpoint_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata of the (first) weights file, e.g. a quantization block."""
    path = Path(path)
    first = sorted(checkpoint_files(path))[0]
    with _open_weights(path / first) as f:
        return dict(f.metadata() or {})


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Gemma4:
    """Load a gemma4_unified checkpoint folder into our model (eval mode, no grad).

    Quantized checkpoints written by `gemma4-agent quantize` load here too: their metadata names the scheme.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    cfg = ModelConfig.from_json(path)
    with torch.device("meta"):
        model = Gemma4(cfg)
    quant = checkpoint_metadata(path).get("gemma4_agent.quantization")
    if quant:
        from ..quant.int4 import prepare_quantized_model  # only quantized checkpoints need it

        prepare_quantized_model(model, json.loads(quant))
    expected = dict(model.named_parameters())
    expected.update((n, b) for n, b in model.named_buffers() if n.split(".")[-1] in _persistent_buffers(model, n))
    seen: set[str] = set()
    for file, names in checkpoint_files(path).items():
        file_path = path / file
        if not file_path.is_file():
            raise FileNotFoundError(f"{path}: shard {file} listed in the index is missing")
        with _open_weights(file_path) as f:
            for ckpt_name in names:
                name = to_module_name(ckpt_name)
                if name is None:
                    continue
                if name not in expected:
                    raise CheckpointError(f"unexpected tensor {ckpt_name!r} in checkpoint (no such parameter)")
                tensor = f.get_tensor(ckpt_name)
                target = expected[name]
                if tuple(tensor.shape) != tuple(target.shape):
                    raise CheckpointError(
                        f"tensor {ckpt_name!r} has shape {tuple(tensor.shape)}, the config expects {tuple(target.shape)}"
                    )
                keep_dtype = not tensor.is_floating_point()  # packed int4 weights stay integers
                _assign(model, name, tensor.to(device=device, dtype=None if keep_dtype else dtype))
                seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing tensor(s): {', '.join(to_checkpoint_name(m) for m in missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    model._init_rope(device)
    return model.eval().requires_grad_(False)


def _persistent_buffers(model: nn.Module, full_name: str) -> set[str]:
    module = model.get_submodule(full_name.rsplit(".", 1)[0]) if "." in full_name else model
    return set(module._buffers) - set(module._non_persistent_buffers_set)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attr] = tensor
