"""`gemma4-agent verify-engine ENGINE_DIR --checkpoint DIR [--frames N] [--json OUT]`: run the same
streaming session of N frames on a compiled engine and on the torch model (greedy) and compare.

Reported (and written as JSON): `max_abs_logit_diff`, `max_rel_logit_diff` (over every logits vector
whose context is identical on both sides: up to and including each frame's first disagreement),
`token_agreement` (fraction of decoded positions with the same greedy token), `frames`, and the
per-frame latency of both sides. This is also how a TensorRT engine is checked on the Jetson. For a
q4_0 engine the torch reference gets the same q4_0 weights (dequantized), so the comparison measures
the engine, not the quantization; `--float-reference` compares against the unquantized model instead.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from ..actions.selectors import GreedySelector
from ..engine.session import SessionConfig, StreamingSession
from ..model.config import ModelConfig
from .backends import load_engine
from .manifest import EngineError, check_manifest, read_manifest


def synthetic_frames(n: int, seed: int = 0, shape=(240, 320)) -> list[np.ndarray]:
    """Smooth random scenes (a gradient plus blobs): deterministic and image-like."""
    rng = np.random.default_rng(seed)
    h, w = shape
    ys, xs = np.mgrid[0:h, 0:w]
    frames = []
    for _ in range(n):
        img = np.zeros((h, w, 3), np.float32)
        img += rng.uniform(0, 120, 3) * (xs / w)[..., None] + rng.uniform(0, 80, 3)
        for _ in range(3):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(10, 60)
            img[(ys - cy) ** 2 + (xs - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
        frames.append(np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8))
    return frames


def _session(model, prompts, defaults: dict, mode: str, max_new_tokens: int) -> StreamingSession:
    max_context = defaults.get("max_context", 1024)
    cfg = SessionConfig(mode=mode, image_tokens=defaults.get("image_tokens", 280), max_new_tokens=max_new_tokens,
                        max_prefix=defaults.get("max_prefix", 256),
                        max_context=max_context if mode == "prefix" else max_context * defaults.get("window_frames", 4),
                        window_frames=defaults.get("window_frames", 4), cuda_graph=False)
    return StreamingSession(model, prompts, cfg)


def compare(engine_dir: str | Path, checkpoint: str | Path, frames: int = 8, mode: str = "prefix",
            max_new_tokens: int = 8, device: str = "cpu", dtype=torch.float32, float_reference: bool = False,
            instruction: str | None = None, seed: int = 0, frame_list=None) -> dict:
    from ..model.loader import load_model

    engine_dir, checkpoint = Path(engine_dir), Path(checkpoint)
    manifest = read_manifest(engine_dir)
    config = ModelConfig.from_json(checkpoint)
    check_manifest(manifest, engine_dir, config=config)
    engine = load_engine(engine_dir, manifest.backend, "cpu" if manifest.backend == "onnxruntime" else device,
                         torch.float32 if manifest.backend == "onnxruntime" else dtype)
    reference = load_model(checkpoint, dtype=torch.float32)
    if manifest.quant == "q4_0" and not float_reference:
        from .onnx_export import fake_quantize_model

        fake_quantize_model(reference)
    elif manifest.quant not in ("none", "q4_0"):
        raise EngineError(f"verify-engine has no torch reference for quant {manifest.quant!r}")
    reference = reference.to(device=device, dtype=dtype)
    defaults = dict(engine.agent_defaults)
    instruction = instruction or defaults.get("instruction", "go to the red ball")
    sessions = {"engine": _session(engine.model, engine.prompts, defaults, mode, max_new_tokens),
                "torch": _session(reference, engine.prompts, defaults, mode, max_new_tokens)}
    for s in sessions.values():
        s.set_prefix(instruction, defaults.get("system", ""))
    frame_list = frame_list if frame_list is not None else synthetic_frames(frames, seed)
    max_abs = max_rel = 0.0
    agree = total = 0
    times = {"engine": [], "torch": []}
    for rgb in frame_list:
        res = {}
        for side, s in sessions.items():
            t0 = time.perf_counter()
            res[side] = s.step(rgb, GreedySelector(max_tokens=max_new_tokens), keep_logits=True)
            times[side].append((time.perf_counter() - t0) * 1e3)
        a, b = res["engine"], res["torch"]
        for i, (la, lb) in enumerate(zip(a.logits_log, b.logits_log)):
            la, lb = la.float().cpu(), lb.float().cpu()
            max_abs = max(max_abs, (la - lb).abs().max().item())
            max_rel = max(max_rel, ((la - lb).norm() / lb.norm().clamp_min(1e-12)).item())
            if i >= len(a.tokens) or i >= len(b.tokens) or a.tokens[i] != b.tokens[i]:
                break  # contexts differ from here on
        n = max(len(a.tokens), len(b.tokens))
        agree += sum(x == y for x, y in zip(a.tokens, b.tokens))
        total += n
    return {"engine": str(engine_dir), "backend": manifest.backend, "quant": manifest.quant, "mode": mode,
            "frames": len(frame_list), "max_abs_logit_diff": max_abs, "max_rel_logit_diff": max_rel,
            "token_agreement": agree / max(total, 1),
            "frame_ms": {side: {"median": statistics.median(t), "mean": statistics.fmean(t)} for side, t in times.items()}}


def benchmark(engine_dir: str | Path, checkpoint: str | Path, frames: int = 20, warmup: int = 3, mode: str = "prefix",
              max_new_tokens: int = 8, threads: int | None = None, log=print) -> dict:
    """Per-frame latency (preprocess + prefill + decode) of the engine vs the torch model, same frames,
    same session, greedy; prints a table and returns it."""
    from ..model.loader import load_model

    backend = read_manifest(engine_dir).backend
    if threads:
        torch.set_num_threads(threads)
    if backend == "onnxruntime":  # the same thread count on both sides
        from .ort_backend import OrtModel

        engine = load_engine(engine_dir, backend)
        engine.model = OrtModel(engine_dir, engine.config, threads=threads or torch.get_num_threads())
    else:
        engine = load_engine(engine_dir, backend, "cuda", torch.bfloat16)
    reference = load_model(checkpoint, dtype=torch.float32)
    if read_manifest(engine_dir, verify_files=False).quant == "q4_0":
        from .onnx_export import fake_quantize_model

        fake_quantize_model(reference)
    defaults = dict(engine.agent_defaults)
    frame_list = synthetic_frames(frames + warmup, seed=1)
    table = {}
    for side, model in (("torch", reference), (backend, engine.model)):
        s = _session(model, engine.prompts, defaults, mode, max_new_tokens)
        s.set_prefix(defaults.get("instruction", "go to the red ball"))
        rows = []
        for i, rgb in enumerate(frame_list):
            r = s.step(rgb)
            if i >= warmup:
                rows.append(r.timings_ms | {"steps": r.decode_steps})
        table[side] = {k: statistics.median(row[k] for row in rows) for k in ("preprocess", "prefill", "decode", "total")}
        table[side]["decode_ms_per_step"] = statistics.median(row["decode"] / max(row["steps"], 1) for row in rows)
    log(f"{'backend':<12} {'preprocess':>10} {'prefill':>9} {'decode':>8} {'ms/step':>8} {'total':>8}   (median ms, "
        f"{frames} frames, {mode} mode, {defaults.get('image_tokens', 280)} image tokens, {torch.get_num_threads()} threads)")
    for side, row in table.items():
        log(f"{side:<12} {row['preprocess']:>10.2f} {row['prefill']:>9.2f} {row['decode']:>8.2f} "
            f"{row['decode_ms_per_step']:>8.2f} {row['total']:>8.2f}")
    return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import positive

    parser.add_argument("engine", type=Path, help="engine folder (manifest.json inside)")
    parser.add_argument("--checkpoint", required=True, type=Path, help="the checkpoint the engine was built from")
    parser.add_argument("--frames", type=positive(int), default=8)
    parser.add_argument("--mode", choices=["prefix", "window"], default="prefix")
    parser.add_argument("--max-new-tokens", type=positive(int), default=8)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device of the torch reference")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="torch reference dtype")
    parser.add_argument("--float-reference", action="store_true", help="q4_0 engine vs the unquantized model")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("--bench", action="store_true", help="also time both sides (median per-frame latency)")


def run(args) -> int:
    try:
        report = compare(args.engine, args.checkpoint, args.frames, args.mode, args.max_new_tokens, args.device,
                         getattr(torch, args.dtype), args.float_reference)
        if args.bench:
            report["benchmark"] = benchmark(args.engine, args.checkpoint, frames=args.frames, mode=args.mode,
                                            max_new_tokens=args.max_new_tokens)
    except (EngineError, OSError, ValueError) as exc:  # also a malformed config.json or checkpoint
        print(f"error: {exc}")
        return 1
    print(json.dumps({k: v for k, v in report.items() if k != "benchmark"}, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0
