"""CPU, tiny model: the prefix cache vs recomputing the whole prompt (600-token prefix), frames
interleaved between the two sessions so both see the same machine load; then a long prefix-mode
stream to show the per-frame cost stays flat. Its last decile is also interleaved with the first decile of a
second, new stream (`interleaved_last_over_first`): the same comparison under the same load, where the
sequential one (`last_over_first`) compares two stretches of time minutes apart on a shared machine.

    python benchmarks/cpu_cache.py --frames 40 --stream 1000 [--decode-tokens D] [--quant q4_0] [--compile]
        [--dtype bfloat16] --json OUT.json
"""
import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gemma4_agent.actions.selectors import GreedySelector  # noqa: E402
from gemma4_agent.engine.bench import SyntheticPrompts, frame_for  # noqa: E402
from gemma4_agent.engine.session import SessionConfig, StreamingSession  # noqa: E402
from gemma4_agent.model import ModelConfig, build_model  # noqa: E402
from gemma4_agent.quant.int4 import quantize_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(Path(__file__).with_name("tiny-config.json")))
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--stream", type=int, default=1000)
    parser.add_argument("--image-tokens", type=int, default=70)
    parser.add_argument("--decode-tokens", type=int, default=12)
    parser.add_argument("--prefix-tokens", type=int, default=600)
    parser.add_argument("--quant", choices=["q4_0"], help="int4 decoder linears (the CPU int4pack kernel)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="bfloat16 halves the bytes each decode step reads (native on CPUs with AVX512-BF16 / AMX)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decoder (SessionConfig.compile)")
    parser.add_argument("--json")
    args = parser.parse_args()
    model = build_model(ModelConfig.from_json(args.config), dtype=getattr(torch, args.dtype))
    if args.quant:
        model = quantize_model(model, args.quant, progress=False)
    side = model.config.vision_config.patch_size * model.config.vision_config.pooling_kernel_size
    frame = frame_for(args.image_tokens, side)
    def step_ms(session) -> float:
        return session.step(frame, GreedySelector(max_tokens=args.decode_tokens)).timings_ms["total"]

    def new_session(mode: str) -> StreamingSession:
        s = StreamingSession(model, SyntheticPrompts(model.config, args.prefix_tokens),
                             SessionConfig(mode=mode, image_tokens=args.image_tokens, max_new_tokens=args.decode_tokens,
                                           max_prefix=args.prefix_tokens + 8,
                                           max_context=args.prefix_tokens + args.image_tokens + 128,
                                           compile=args.compile))
        s.set_prefix("bench")
        step_ms(s)  # warm-up
        return s

    sessions = {mode: new_session(mode) for mode in ("prefix", "none")}
    times = {"prefix": [], "none": []}
    for _ in tqdm(range(args.frames), desc="interleaved"):
        for mode, s in sessions.items():
            times[mode].append(step_ms(s))
    decile = max(1, args.stream // 10)
    stream = [step_ms(sessions["prefix"]) for _ in tqdm(range(args.stream - decile), desc="prefix stream")]
    # a second stream started as the first was (a warm-up and as many frames before it), its first decile taken
    # frame by frame in turn with the first stream's last
    fresh = new_session("prefix")
    for _ in range(args.frames):
        step_ms(fresh)
    fresh_first = []
    for _ in tqdm(range(decile), desc="last decile, interleaved with a new stream's first"):
        stream.append(step_ms(sessions["prefix"]))
        fresh_first.append(step_ms(fresh))
    report = {
        "machine": f"{platform.machine()} {platform.processor()}, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "quant": args.quant, "dtype": args.dtype, "compile": args.compile, "prefix_tokens": args.prefix_tokens,
        "image_tokens": args.image_tokens, "decode_tokens": args.decode_tokens,
        "prefix_p50_ms": float(np.median(times["prefix"])), "none_p50_ms": float(np.median(times["none"])),
        "speedup": float(np.median(times["none"]) / np.median(times["prefix"])),
        "stream_frames": args.stream,
        "first_decile_p50_ms": float(np.median(stream[:decile])), "last_decile_p50_ms": float(np.median(stream[-decile:])),
    }
    report["last_over_first"] = report["last_decile_p50_ms"] / report["first_decile_p50_ms"]
    report["new_stream_first_decile_p50_ms"] = float(np.median(fresh_first))
    report["interleaved_last_over_first"] = report["last_decile_p50_ms"] / report["new_stream_first_decile_p50_ms"]
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
