"""Can one resident Triton program an SM stream a 12B decode step's bytes at the copy bandwidth?

A persistent decode kernel (one program an SM, all layers' phases in turn, results handed on through counters) was
correct but slower than the engine on an H100, and left without its waits or attention it still streamed the weights
at only 1.66 TB/s of the 3.0 a copy reaches (BENCHMARKS.md, twenty-first session): its programs hold their loads in
registers, and the kernel's other phases cap those at one program an SM. This times the streaming alone, 6.4 GB of
int32 tiles XOR-reduced, by
    - one tile a program (the engine's GEMVs: many short programs, each SM holding several),
    - one program an SM with plain loads (8 or 16 warps; Triton's pipelining off or 3 stages),
    - one program an SM with TMA descriptor loads (bulk copies into shared memory, pipelined 2-6 deep), 4 or 8 warps,
against a device copy in the same run. If the TMA rows reach the copy's rate, a persistent decode kernel can stream
its GEMVs' weights through shared memory instead of registers.

    python3 benchmarks/gpu_stream_probe.py --out OUT     (a CUDA GPU; writes OUT/gpu_stream_probe.json)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

BR, BC = 32, 256  # a tile: 32 rows of 256 int32 words (32 KB), TMA's largest box side


@triton.jit
def _plain(ptr, res, ROWS, COLS, G, BR: tl.constexpr, BC: tl.constexpr, STAGES: tl.constexpr):
    p = tl.program_id(0)
    n_c = COLS // BC
    acc = tl.zeros((BR, BC), tl.int32)
    for t in tl.range(p, (ROWS // BR) * n_c, G, num_stages=STAGES):
        r = (t // n_c) * BR + tl.arange(0, BR)
        c = (t % n_c) * BC + tl.arange(0, BC)
        acc ^= tl.load(ptr + r[:, None] * COLS + c[None, :])
    tl.store(res + p, tl.sum(acc))


@triton.jit
def _tma(desc, res, ROWS, COLS, G, BR: tl.constexpr, BC: tl.constexpr, STAGES: tl.constexpr):
    p = tl.program_id(0)
    n_c = COLS // BC
    acc = tl.zeros((BR, BC), tl.int32)
    for t in tl.range(p, (ROWS // BR) * n_c, G, num_stages=STAGES):
        acc ^= desc.load([(t // n_c) * BR, (t % n_c) * BC])
    tl.store(res + p, tl.sum(acc))


def median_ms(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[reps // 2]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    rows_n, cols = 786_432, 2048  # int32 words: 6.4 GB, about a 12B int4 step's weights
    buf = torch.randint(0, 1 << 30, (rows_n, cols), device="cuda", dtype=torch.int32)
    res = torch.zeros(4096, device="cuda", dtype=torch.int32)
    nbytes = buf.numel() * 4
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    half = buf[: rows_n // 2]
    dst = torch.empty_like(half)
    report = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "bytes": nbytes,
              "copy_tb_s": 2 * half.numel() * 4 / median_ms(lambda: dst.copy_(half)) / 1e9, "rows": []}
    tiles = (rows_n // BR) * (cols // BC)
    variants = {"plain, one tile a program, 4 warps":
                lambda: _plain[(tiles,)](buf, res, rows_n, cols, tiles, BR=BR, BC=BC, STAGES=1, num_warps=4)}
    for warps in (8, 16):
        for stages in (1, 3):
            variants[f"plain, {sms} programs x {warps} warps, {stages} stages"] = (
                lambda w=warps, s=stages: _plain[(sms,)](buf, res, rows_n, cols, sms, BR=BR, BC=BC, STAGES=s,
                                                         num_warps=w))
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor

        desc = TensorDescriptor.from_tensor(buf, [BR, BC])
        for warps in (4, 8):
            for stages in (2, 4, 6):
                variants[f"TMA, {sms} programs x {warps} warps, {stages} stages"] = (
                    lambda w=warps, s=stages: _tma[(sms,)](desc, res, rows_n, cols, sms, BR=BR, BC=BC, STAGES=s,
                                                           num_warps=w))
    except Exception as exc:  # a Triton without host-side descriptors: the plain rows still tell
        report["tma_error"] = repr(exc)[:300]
    for name, fn in variants.items():
        try:
            ms = median_ms(fn)
            row = {"variant": name, "ms": ms, "tb_s": nbytes / ms / 1e9}
        except Exception as exc:  # one variant that does not compile must not hide the others
            row = {"variant": name, "error": repr(exc)[:300]}
        print(json.dumps(row), flush=True)
        report["rows"].append(row)
        Path(args.out, "gpu_stream_probe.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
