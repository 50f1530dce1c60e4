"""`gemma4-agent build-engine`: export a checkpoint to an engine folder for onnxruntime or TensorRT.

    gemma4-agent build-engine --checkpoint DIR --backend onnxruntime --quant none|q4_0 --out engines/NAME
    gemma4-agent build-engine --checkpoint DIR --backend tensorrt --quant q4_0 --out engines/NAME   (on the Jetson)

The folder holds the ONNX graphs (vision / prefill / decode, one shared weights.bin), for TensorRT
the serialized plan, config.json and tokenizer.json from the checkpoint, agent.json (the checkpoint's agent
defaults with the image budget and lengths the engine was built for), engine.json (the shapes it was built
for) and manifest.json (config hash, quant, backend, library versions, max lengths, GPU arch; every file with
size and sha256).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from ..engine.session import max_chunk
from ..model.config import IMAGE_TOKEN_COUNTS, ModelConfig
from .manifest import EngineError, Manifest, write_manifest
from .onnx_export import export_graphs, fake_quantize_model  # noqa: F401  (re-exported for tests)
from .ort_backend import ENGINE_INFO

COPIED = ("config.json", "tokenizer.json")


def library_versions(backend: str) -> dict[str, str]:
    import onnx

    versions = {"torch": torch.__version__.split("+")[0], "onnx": onnx.__version__}
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if backend == "tensorrt":
        try:
            import tensorrt

            versions["tensorrt"] = tensorrt.__version__
        except ImportError:
            pass
    return versions


def build_engine(checkpoint: str | Path, out: str | Path, backend: str = "onnxruntime", quant: str = "none",
                 max_context: int | None = None, max_prefix: int | None = None, image_tokens: int | None = None,
                 name: str | None = None, tokenizer=None, agent_defaults: dict | None = None,
                 model=None, dtype: str | None = None, export_only: bool = False, log=print) -> Path:
    """Export (and for TensorRT, build) an engine folder from a checkpoint folder (or an in-memory
    model whose config.json is in `checkpoint`)."""
    from ..model.loader import load_model

    checkpoint, out = Path(checkpoint), Path(out)
    if backend not in ("onnxruntime", "tensorrt"):
        raise EngineError(f"build-engine makes onnxruntime or tensorrt engines, not {backend!r} "
                          f"(a torch engine is the checkpoint folder itself)")
    if backend == "tensorrt" and not export_only:
        from .tensorrt_backend import require_tensorrt

        require_tensorrt()
    # onnxruntime (CPU) runs float32; TensorRT gets bfloat16 (Gemma's activations overflow float16)
    dtype = getattr(torch, dtype or ("float32" if backend == "onnxruntime" else "bfloat16"))
    if backend == "onnxruntime" and dtype != torch.float32:
        raise EngineError("the onnxruntime backend runs float32 graphs: leave --dtype out")
    config = ModelConfig.from_json(checkpoint)
    if backend == "tensorrt" and (checkpoint / "prefill.onnx").is_file() and (checkpoint / ENGINE_INFO).is_file():
        return _plans_from_export(checkpoint, out, config, name, log)
    defaults = dict(agent_defaults or {})
    if not defaults:
        from .backends import read_agent_defaults

        defaults = read_agent_defaults(checkpoint)
    image_tokens = image_tokens or defaults.get("image_tokens", 280)
    max_prefix = max_prefix or defaults.get("max_prefix", 256)
    max_context = max_context or defaults.get("max_context", 1024)
    chunk = max_chunk(image_tokens)
    out.mkdir(parents=True, exist_ok=True)
    for item in out.iterdir():  # a rebuild never mixes old and new files
        if item.is_file():
            item.unlink()
    t0 = time.perf_counter()
    if model is None:
        model = load_model(checkpoint, dtype=torch.float32)
    log(f"exporting {checkpoint} ({backend}, quant {quant}, {str(dtype)[6:]}) -> {out}")
    info = export_graphs(model, out, max_context=max_context, max_prefix=max_prefix, max_chunk=chunk,
                         quant=quant, dtype=dtype)
    info.update(image_tokens=image_tokens, backend=backend, plans_built=backend == "tensorrt" and not export_only)
    log(f"  ONNX export: {time.perf_counter() - t0:.1f} s")
    gpu_arch = None
    if backend == "tensorrt" and not export_only:
        from .tensorrt_backend import build_plan

        gpu_arch = build_plan(out, info, log=log)
    (out / ENGINE_INFO).write_text(json.dumps(info, indent=2) + "\n")
    for file in COPIED:
        if (checkpoint / file).is_file() and not (out / file).exists():
            shutil.copy2(checkpoint / file, out / file)
    if tokenizer is not None:
        tokenizer.save(str(out / "tokenizer.json"))
    # the checkpoint's agent defaults with what this engine was built for: the agent sizes its cache from them
    built = {**defaults, "image_tokens": image_tokens, "max_prefix": max_prefix, "max_context": max_context}
    (out / "agent.json").write_text(json.dumps(built, indent=2) + "\n")
    if not (out / "tokenizer.json").is_file():
        raise EngineError(f"{checkpoint} has no tokenizer.json: an engine folder needs one")
    files = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != "manifest.json")
    manifest = Manifest(name=name or out.name, backend=backend, config_hash=config.fingerprint(), quant=quant,
                        max_context=max_context, image_tokens=image_tokens, library_versions=library_versions(backend),
                        gpu_arch=gpu_arch, machine=platform.machine(),
                        notes=f"max_prefix={max_prefix} max_chunk={chunk} opset={info['opset']}")
    write_manifest(out, manifest, files)
    log(f"  engine written: {out} ({sum((out / f).stat().st_size for f in files) / 1e6:.1f} MB, "
        f"{time.perf_counter() - t0:.1f} s)")
    return out


def _plans_from_export(src: Path, out: Path, config: ModelConfig, name: str | None, log) -> Path:
    """On the Jetson: build the TensorRT plans from a folder written with `--export-only` elsewhere
    (no torch weights needed here, only the ONNX graphs)."""
    from .manifest import read_manifest
    from .tensorrt_backend import build_plan

    exported = read_manifest(src)  # sizes + hashes: a damaged copy is refused before a long build
    if src.resolve() != out.resolve():
        out.mkdir(parents=True, exist_ok=True)
        for item in src.iterdir():
            if item.is_file() and item.name != "manifest.json":
                shutil.copy2(item, out / item.name)
    info = json.loads((out / ENGINE_INFO).read_text())
    gpu = build_plan(out, info, log=log)
    info["plans_built"] = True
    (out / ENGINE_INFO).write_text(json.dumps(info, indent=2) + "\n")
    files = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != "manifest.json")
    manifest = exported.model_copy(update={"name": name or out.name, "gpu_arch": gpu, "machine": platform.machine(),
                                           "library_versions": library_versions("tensorrt")})
    write_manifest(out, manifest, files)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import positive

    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint (or torch engine) folder")
    parser.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime")
    parser.add_argument("--quant", choices=["none", "q4_0"], default="none")
    parser.add_argument("--out", required=True, type=Path, help="engine folder to write (e.g. engines/NAME)")
    parser.add_argument("--max-context", type=positive(int), default=None, help="default: agent.json's, else 1024")
    parser.add_argument("--max-prefix", type=positive(int), default=None, help="default: agent.json's, else 256")
    parser.add_argument("--image-tokens", type=int, default=None, choices=IMAGE_TOKEN_COUNTS)
    parser.add_argument("--name", default=None)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="activation/weight type of the graphs (default: float32 for onnxruntime, bfloat16 for tensorrt)")
    parser.add_argument("--export-only", action="store_true",
                        help="tensorrt: write the ONNX graphs without building the plans (to build on the Jetson)")


def run(args) -> int:
    try:
        build_engine(args.checkpoint, args.out, args.backend, args.quant, args.max_context, args.max_prefix,
                     args.image_tokens, args.name, dtype=args.dtype, export_only=args.export_only)
    except (EngineError, OSError, ValueError) as exc:  # also a malformed config.json or checkpoint
        print(f"error: {exc}")
        return 1
    return 0
