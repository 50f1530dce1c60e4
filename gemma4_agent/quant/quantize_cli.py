"""`gemma4-agent quantize SRC_CHECKPOINT DST --scheme q4_0|awq-g128 [--calib BAG_OR_DIR] [--embedding]`

Loads the checkpoint (in its own float dtype: a bf16 checkpoint upcasts exactly, so quantizing it is the same
as quantizing the float32 values), quantizes the decoder linears (and the tied embedding with --embedding),
and writes a checkpoint folder that `load_model` reads directly. awq-g128 needs calibration frames: a ROS 2
bag or a folder of images, run through the agent's prompt (the source folder's tokenizer.json + agent.json
when present, else a plain token prompt around the image)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_arguments(parser) -> None:
    from ..cli import positive
    from ..model.config import IMAGE_TOKEN_COUNTS

    parser.add_argument("src", help="source checkpoint (or torch engine) folder")
    parser.add_argument("dst", help="output folder (new or empty)")
    parser.add_argument("--scheme", required=True, choices=["q4_0", "awq-g128"])
    parser.add_argument("--calib", help="ROS 2 bag or image folder with calibration frames (required for awq-g128)")
    parser.add_argument("--embedding", action="store_true", help="also quantize the tied embedding / LM head")
    parser.add_argument("--frames", type=positive(int), default=16, help="calibration frames to use (evenly spaced)")
    parser.add_argument("--image-tokens", type=int, default=None, choices=IMAGE_TOKEN_COUNTS,
                        help="soft tokens per frame (default: agent.json or 70)")
    parser.add_argument("--instruction", default=None, help="calibration instruction (default: agent.json's)")
    parser.add_argument("--max-tokens", type=positive(int), default=512, help="activation rows kept per layer for AWQ")
    parser.add_argument("--dtype", choices=["source", *_DTYPES], default="source",
                        help="float dtype to load and save the unquantized tensors in")


def source_dtype(path: Path) -> torch.dtype:
    """The float dtype of the checkpoint's tensors (the first floating tensor found)."""
    from safetensors import safe_open

    from ..model.loader import checkpoint_files

    for file, names in checkpoint_files(path).items():
        with safe_open(str(path / file), "pt") as f:
            for name in names:
                t = f.get_slice(name)
                dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(t.get_dtype())
                if dtype is not None:
                    return dtype
    return torch.float32


def load_frames(path: str | Path, max_frames: int = 16) -> list[tuple[np.ndarray, str | None]]:
    """(RGB uint8 frame, instruction) pairs, evenly spaced: from an image folder (no instruction), a ROS 2 bag or a
    folder of bags (each frame with the bag's /instruction in force at its time: a policy's answer depends on it)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"calibration source not found: {path}")
    images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else []
    if images:
        import cv2

        frames = []
        for p in (images[i] for i in _spaced(len(images), max_frames)):
            bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
            if bgr is None:
                raise ValueError(f"cannot read image {p}")
            frames.append((cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), None))
        return frames
    from ..bagio import BagError, find_bags, pair_frames_with_commands, read_episode

    try:
        bags = find_bags(path)
    except BagError as err:
        raise ValueError(f"{err}; and no images ({' '.join(IMAGE_SUFFIXES)}) either") from None
    labelled = []
    for bag in bags:
        episode = read_episode(bag)
        labelled += [lf for lf in pair_frames_with_commands(episode.frames, episode.commands, episode.instructions)
                     if lf.frame.rgb is not None]  # an undecodable image calibrates nothing
    if not labelled:
        raise ValueError(f"{path}: no image frames (none that can be decoded)")
    return [(labelled[i].frame.rgb, labelled[i].instruction) for i in _spaced(len(labelled), max_frames)]


def _spaced(n: int, k: int) -> list[int]:
    if n <= k:
        return list(range(n))
    return sorted({int(round(i * (n - 1) / (k - 1))) for i in range(k)}) if k > 1 else [0]


def calibration_batches(model, frames: list, folder: str | Path | None = None, image_tokens: int | None = None,
                        instruction: str | None = None) -> list[dict]:
    """model.forward kwargs, one per frame (an RGB array or an (RGB, instruction) pair from `load_frames`).

    With a tokenizer.json in `folder` the prompt is exactly what the agent's streaming session prefills:
    prefix(instruction) + image + suffix. The instruction: `instruction` if given, else the frame's own, else
    agent.json's. Without a tokenizer, a plain token prompt around the image."""
    from ..model.preprocess import preprocess_frame

    cfg = model.config
    folder = Path(folder) if folder is not None else None
    defaults = {}
    if folder is not None:
        from ..engines.backends import read_agent_defaults

        defaults = read_agent_defaults(folder)
    image_tokens = image_tokens or defaults.get("image_tokens", 70)
    prompts = None
    if folder is not None and (folder / "tokenizer.json").is_file():
        from ..model.tokenizer import PromptBuilder, load_tokenizer

        prompts = PromptBuilder(load_tokenizer(folder), cfg.image_token_id, cfg.boi_token_id, cfg.eoi_token_id)
    vision = cfg.vision_config
    vocab = cfg.text_config.vocab_size
    special = {cfg.image_token_id, cfg.boi_token_id, cfg.eoi_token_id}
    plain = [t for t in range(10, vocab) if t not in special][:16]
    device = next(model.parameters()).device
    batches = []
    for frame in frames:
        rgb, own = frame if isinstance(frame, tuple) else (frame, None)
        patches, positions = preprocess_frame(rgb, image_tokens, vision.patch_size, vision.pooling_kernel_size)
        n = patches.shape[0]
        if prompts is not None:
            text = instruction or own or defaults.get("instruction", "go to the red ball")
            ids = prompts.prefix(text, defaults.get("system", "")) + prompts.image(n) + prompts.suffix()
        else:
            ids = [cfg.text_config.bos_token_id] + plain[:8] + [cfg.boi_token_id] + [cfg.image_token_id] * n \
                + [cfg.eoi_token_id] + plain[8:]
        mm = [int(t == cfg.image_token_id) for t in ids]
        batches.append({"input_ids": torch.tensor([ids], device=device),
                        "pixel_values": patches[None].to(device),
                        "image_position_ids": positions[None].to(device),
                        "mm_token_type_ids": torch.tensor([mm], device=device)})
    return batches


def quantize_checkpoint(src: str | Path, dst: str | Path, scheme: str, calib: str | Path | None = None,
                        include_embedding: bool = False, frames: int = 16, image_tokens: int | None = None,
                        instruction: str | None = None, max_tokens: int = 512, dtype: torch.dtype | None = None,
                        progress: bool = True) -> dict:
    from ..model.loader import checkpoint_metadata, load_model
    from .int4 import METADATA_KEY, SCHEMES, quantize_model, save_quantized, weight_bytes

    src, dst = Path(src), Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):  # never overwrite (or write into) what is there
        raise ValueError(f"{dst} exists and is {'not empty' if dst.is_dir() else 'not a folder'}: quantize into a "
                         "new or empty folder")
    if METADATA_KEY in checkpoint_metadata(src):
        raise ValueError(f"{src} is already quantized")
    if not SCHEMES[scheme]["symmetric"] and calib is None:
        raise ValueError(f"--scheme {scheme} needs --calib (a ROS 2 bag or an image folder)")
    dtype = dtype or source_dtype(src)
    t0 = time.perf_counter()
    model = load_model(src, dtype=dtype)
    before = weight_bytes(model)["total"]
    batches = None
    if calib is not None and not SCHEMES[scheme]["symmetric"]:
        batches = calibration_batches(model, load_frames(calib, frames), src, image_tokens, instruction)
    quantize_model(model, scheme, calib=batches, include_embedding=include_embedding, progress=progress,
                   max_tokens=max_tokens)
    after = weight_bytes(model)
    config_json = json.loads((src / "config.json").read_text())
    save_quantized(model, config_json, dst, source=src)
    return {"scheme": scheme, "embedding": include_embedding, "dtype": str(dtype).replace("torch.", ""),
            "bytes_before": before, "bytes_after": after["total"], "bytes_int4_modules": after["int4_modules"],
            "calibration_frames": 0 if batches is None else len(batches), "seconds": time.perf_counter() - t0,
            "out": str(dst)}


def run(args) -> int:
    try:
        info = quantize_checkpoint(args.src, args.dst, args.scheme, args.calib, args.embedding, args.frames,
                                   args.image_tokens, args.instruction, args.max_tokens,
                                   None if args.dtype == "source" else _DTYPES[args.dtype])
    except (ValueError, FileNotFoundError) as exc:
        print(f"gemma4-agent quantize: error: {exc}", file=sys.stderr)
        return 2
    print(f"{info['scheme']}{' +embedding' if info['embedding'] else ''}: {info['bytes_before'] / 1e6:.1f} MB -> "
          f"{info['bytes_after'] / 1e6:.1f} MB ({info['calibration_frames']} calibration frames, "
          f"{info['seconds']:.1f} s) -> {info['out']}")
    return 0
