"""`manifest.json` of an engine folder: what the engine was built from and for.

An engine loads only where its manifest matches: the model config it was built from, the backend
asked for, and (for compiled backends) the machine. Every file it lists is checked by size and hash.
"""
from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from ..errors import one_line
from ..model.config import ModelConfig

MANIFEST = "manifest.json"
Backend = Literal["torch", "onnxruntime", "tensorrt"]


class EngineError(ValueError):
    """An engine folder that cannot be used here; the message says why and what to do."""


class FileEntry(BaseModel):
    size: int
    sha256: str


class Manifest(BaseModel):
    format_version: int = 1
    name: str
    backend: Backend
    config_hash: str
    quant: Literal["none", "q4_0", "awq-g128"] = "none"
    max_context: int = 2048
    image_tokens: int = 280
    library_versions: dict[str, str] = Field(default_factory=dict)
    gpu_arch: str | None = None  # e.g. "sm_87" for Orin; None where the engine is portable
    machine: str = Field(default_factory=platform.machine)
    files: dict[str, FileEntry] = Field(default_factory=dict)
    notes: str = ""


def file_entry(path: Path) -> FileEntry:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return FileEntry(size=path.stat().st_size, sha256=digest.hexdigest())


def write_manifest(folder: Path, manifest: Manifest, files: list[str]) -> Manifest:
    """Record `files` (relative to folder) with size and hash, then write manifest.json."""
    folder = Path(folder)
    manifest.files = {name: file_entry(folder / name) for name in sorted(files)}
    (folder / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
    return manifest


def read_manifest(folder: Path, verify_files: bool = True) -> Manifest:
    folder = Path(folder)
    path = folder / MANIFEST
    if folder.is_file():  # often the manifest itself, or a weights file, where its folder was meant
        raise EngineError(f"engine {folder} is a file: give the engine's folder ({folder.parent} holds it), "
                          f"with {MANIFEST} and the weights")
    if not folder.is_dir():
        raise EngineError(f"engine folder not found: {folder}")
    if not path.is_file():
        raise EngineError(f"{folder} is not an engine folder: no {MANIFEST} (build one with `gemma4-agent build-engine`)")
    try:
        manifest = Manifest.model_validate_json(path.read_text())
    except (ValidationError, json.JSONDecodeError) as exc:
        raise EngineError(f"{path} is not a valid engine manifest: {one_line(exc)} (rebuild the engine)") from exc
    if verify_files:
        for name, entry in manifest.files.items():
            file = folder / name
            if not file.is_file():
                raise EngineError(f"engine {folder}: file {name} listed in the manifest is missing")
            if file.stat().st_size != entry.size:
                raise EngineError(f"engine {folder}: {name} is {file.stat().st_size} bytes, the manifest says "
                                  f"{entry.size} (truncated or replaced: rebuild the engine)")
            if file_entry(file).sha256 != entry.sha256:
                raise EngineError(f"engine {folder}: {name} does not match its manifest hash (corrupt: rebuild the engine)")
    return manifest


def check_manifest(manifest: Manifest, folder: Path, backend: str | None = None,
                   config: ModelConfig | None = None, gpu_arch: str | None = None) -> None:
    """Refuse an engine built for another backend, model config or machine."""
    if backend is not None and manifest.backend != backend:
        raise EngineError(f"engine {folder} was built for backend {manifest.backend!r}, not {backend!r}")
    if config is not None and manifest.config_hash != config.fingerprint():
        raise EngineError(f"engine {folder} was built from a different model config "
                          f"({manifest.config_hash} != {config.fingerprint()}): rebuild it from this checkpoint")
    if manifest.gpu_arch is not None and gpu_arch is not None and manifest.gpu_arch != gpu_arch:
        raise EngineError(f"engine {folder} was built for GPU {manifest.gpu_arch}, this machine has {gpu_arch}: "
                          f"build the engine on this device")
