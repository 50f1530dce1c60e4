"""INT4 (q4_0) at the 12B shape on the GPU, in the streaming engine: weights resident in GPU memory and
per-frame latency (70 and 280 image tokens, 12 decoded tokens), eager and compiled, with the same
ceilings and floor as benchmarks/gpu_12b.py.

    python benchmarks/gpu_12b_int4.py --out OUT_DIR [--embedding] [--compiled-only] [--image-tokens 280 70]
        [--fused-qkv on|off] [--selector fixed|grammar] [--compile-any-length on|off] [--without-decode-ahead]
"""
import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gemma4_agent.engine.bench import add_compile_any_length, floor_ms, measure_ceilings, run_bench  # noqa: E402
from gemma4_agent.model import ModelConfig, build_model  # noqa: E402
from gemma4_agent.quant.int4 import quantize_model, to_device_kernel  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--embedding", action="store_true", help="quantize the tied embedding / LM head too")
    parser.add_argument("--compiled-only", action="store_true", help="skip the (slow) eager runs")
    parser.add_argument("--image-tokens", type=int, nargs="+", default=[70, 280])
    parser.add_argument("--selector", choices=["fixed", "grammar"], default="fixed",
                        help="12 greedy tokens a frame (against the floor), or an action of the action grammar with "
                             "jump-forward, capped at 32 tokens as the agent's (engine/bench.py grammar_selector)")
    add_compile_any_length(parser)
    parser.add_argument("--fused-qkv", choices=["on", "off"], default="on",
                        help="SessionConfig.fused_qkv (model/triton_qkv.py)")
    parser.add_argument("--without-decode-ahead", action="store_true",
                        help="also time as many frames with SessionConfig.decode_ahead off, in the same process")
    args = parser.parse_args()
    start = time.perf_counter()

    def stamp(what: str) -> None:  # where a run cut off by its time limit got to
        print(f"[{time.perf_counter() - start:6.1f} s] {what}", flush=True)

    ceilings = measure_ceilings("cuda")
    stamp("ceilings measured")
    model = build_model(ModelConfig.preset("gemma4-12b"), device="cuda", dtype=torch.bfloat16)
    stamp("12B built (random bf16)")
    quantize_model(model, "q4_0", include_embedding=args.embedding, progress=False)
    to_device_kernel(model, "cuda", release_portable=True)
    stamp("quantized and packed")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    resident = torch.cuda.memory_allocated()
    print(f"weights resident after packing: {resident / 1e9:.2f} GB", flush=True)
    rows = []
    profiles = []  # taken once every row is timed (run_bench's profile_later)
    for compiled in (True,) if args.compiled_only else (False, True):
        for tokens in args.image_tokens:
            tag = f"{'compiled' if compiled else 'eager'}_{tokens}" + ("_grammar" if args.selector == "grammar" else "")
            fixed = args.selector == "fixed"
            try:
                r = run_bench("gemma4-12b", "cuda", args.frames, tokens, 12 if fixed else 32, "prefix", 600,
                              "bfloat16", warmup=3, model=model, compile=compiled, fused_qkv=args.fused_qkv == "on",
                              profile_to=Path(args.out, f"profile_int4_{tag}.txt"), selector=args.selector,
                              compile_any_length=args.compile_any_length == "on", profile_later=profiles,
                              without_decode_ahead=args.without_decode_ahead)
            except Exception as exc:  # report and go on: one failing variant must not hide the others
                traceback.print_exc()
                rows.append({"compile": compiled, "image_tokens": tokens, "error": repr(exc)[:300]})
                continue
            stamp(f"{tag}: prefix {r['set_prefix_s']:.1f} s, warm-up frames "
                  f"{', '.join(f'{t:.1f}' for t in r['warmup_frames_s'])} s; timed")
            if fixed:  # an action's token count is the model's choice: no floor to hold it to
                r["floor_ms"] = floor_ms(model, tokens + 6, 12, ceilings, resident)
                r["ratio_to_floor"] = r["per_frame_ms"]["p50"] / r["floor_ms"]
            r["fused_qkv"] = args.fused_qkv == "on"
            rows.append(r)
            print(json.dumps({k: r.get(k) for k in ("compile", "image_tokens", "selector", "per_frame_ms",
                                                    "prefill_ms_p50", "decode_ms_p50", "tokens_mean",
                                                    "decode_steps_mean", "decode_ms_per_token_p50",
                                                    "decode_graph_ms_per_token", "decode_graph_synced_ms_per_token",
                                                    "decode_host_wait_ms_per_token", "floor_ms", "ratio_to_floor",
                                                    "no_hot_path_allocation", "without_decode_ahead")}), flush=True)
            write_report(args, ceilings, resident, rows)  # after every run: one cut off keeps what finished
    for take_profile in profiles:
        try:
            take_profile()
        except Exception:  # the timed rows are written already; a profile that fails loses only itself
            traceback.print_exc()
    seconds = [f"{r['profile_s']:.1f}" for r in rows if "profile_s" in r]
    stamp(f"profiled in {', '.join(seconds)} s")
    write_report(args, ceilings, resident, rows)
    return 0


def write_report(args, ceilings: dict, resident: int, rows: list) -> None:
    report = {"ceilings": ceilings, "weights_resident_gb": resident / 1e9, "embedding_int4": args.embedding,
              "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": rows}
    Path(args.out, "gpu_12b_int4.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.exit(main())
