"""The 12B-shape GPU benchmark, in one process (one model build, one set of ceilings):
per-frame latency at 70 and 280 image tokens with 12 decoded tokens, prefix cache vs none, the floor
from the copy bandwidth and matmul rate measured in the same run, and the no-allocation check.

    python benchmarks/gpu_12b.py --out OUT_DIR [--compile | --compiled-only] [--image-tokens 280 70] [--frames N]
        [--triton-gemv on|off|both] [--compile-any-length on|off]

`--triton-gemv both` times each compiled row without, then with, the Triton GEMV candidate (engine/gemv.py) in
one process: an A/B on the same machine state.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gemma4_agent.engine.bench import (add_compile_any_length, floor_ms, measure_ceilings, run_bench,  # noqa: E402
                                       weight_bytes)
from gemma4_agent.model import ModelConfig, build_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd decode step")
    parser.add_argument("--compiled-only", action="store_true", help="only the compiled, prefix-cached runs")
    parser.add_argument("--image-tokens", type=int, nargs="+", default=[70, 280])
    add_compile_any_length(parser)
    parser.add_argument("--triton-gemv", choices=["on", "off", "both"], default="on",
                        help="the decode step's bf16 GEMVs may take Triton where it times faster than cuBLAS")
    args = parser.parse_args()
    out = Path(args.out)
    ceilings = measure_ceilings("cuda")
    model = build_model(ModelConfig.preset("gemma4-12b"), device="cuda", dtype=torch.bfloat16)
    wbytes = weight_bytes(model)
    # per decoded token every weight is read once, except the embedding table, of which only the
    # LM-head use (the whole table) counts: the gather of one row is negligible
    rows = []
    # "off" before "on": routing the layers through the Triton candidate changes the shared model for good
    gemv = {"on": [True], "off": [False], "both": [False, True]}[args.triton_gemv]
    variants = []
    for g in gemv:
        if not args.compiled_only:
            variants += [(t, c, False, g) for t in args.image_tokens for c in ("prefix", "none")]
        if args.compile or args.compiled_only:
            variants += [(t, "prefix", True, g) for t in args.image_tokens]
    for tokens, cache, compiled, triton_gemv in variants:
        frames = args.frames if cache == "prefix" else max(5, args.frames // 3)
        r = run_bench("gemma4-12b", "cuda", frames, tokens, 12, cache, 600, "bfloat16", warmup=3, model=model,
                      compile=compiled, triton_gemv=triton_gemv, compile_any_length=args.compile_any_length == "on")
        r["triton_gemv"] = triton_gemv
        r["floor_ms"] = floor_ms(model, tokens + 6 + (600 if cache == "none" else 0), 12, ceilings, wbytes)
        r["ratio_to_floor"] = r["per_frame_ms"]["p50"] / r["floor_ms"]
        rows.append(r)
        print(json.dumps({k: r.get(k) for k in ("cache", "compile", "triton_gemv", "image_tokens", "per_frame_ms",
                                                "prefill_ms_p50", "decode_ms_per_token_p50",
                                                "decode_host_wait_ms_per_token", "floor_ms", "ratio_to_floor",
                                                "no_hot_path_allocation")}), flush=True)
        # written after every run: a run cut off by a time limit keeps what finished
        report = {"ceilings": ceilings, "weights_gb": wbytes / 1e9, "gpu": torch.cuda.get_device_name(),
                  "torch": torch.__version__, "runs": rows}
        (out / "gpu_12b.json").write_text(json.dumps(report, indent=2))
    print(f"\n{'cache':8} {'compiled':>8} {'tokens':>6} {'p50 ms':>8} {'prefill':>8} {'ms/tok':>7} {'floor':>7} {'ratio':>6}  alloc-free")
    for r in rows:
        print(f"{r['cache']:8} {str(r['compile']):>8} {r['image_tokens']:6d} {r['per_frame_ms']['p50']:8.1f} {r['prefill_ms_p50']:8.1f} "
              f"{r['decode_ms_per_token_p50']:7.2f} {r['floor_ms']:7.1f} {r['ratio_to_floor']:6.2f}  "
              f"{r.get('no_hot_path_allocation')}")
    print(f"ceilings: {ceilings}, weights {wbytes / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
