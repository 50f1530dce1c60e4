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

`--parts gemv`: the same question with the arithmetic, at the 12B's four one-row products (q4_0, weight sets cycled
past L2): the engine's int8-x GEMV (many programs, autotuned) against its tile loop in one program an SM, fed by
plain loads (as the persistent kernel of commit c6126e5) or by TMA descriptor loads pipelined 2-4 deep, each
checked against the dequantized product.

    python3 benchmarks/gpu_stream_probe.py --out OUT [--parts stream gemv]   (a CUDA GPU; OUT/gpu_stream_probe.json;
    the package importable, as for the other GPU scripts: README.md here)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

from gemma4_agent.quant import triton_q4

BR, BC = 32, 256  # a tile: 32 rows of 256 int32 words (32 KB), TMA's largest box side


@triton.jit
def _stream(ptr, desc, res, ROWS, COLS, G, BR: tl.constexpr, BC: tl.constexpr, TMA: tl.constexpr,
            STAGES: tl.constexpr):
    # every tile t = p, p + G, ... of the int32 [ROWS, COLS] at ptr (or desc: TMA) XOR-reduced, one result a program
    p = tl.program_id(0)
    n_c = COLS // BC
    acc = tl.zeros((BR, BC), tl.int32)
    for t in tl.range(p, (ROWS // BR) * n_c, G, num_stages=STAGES):
        if TMA:
            acc ^= desc.load([(t // n_c) * BR, (t % n_c) * BC])
        else:
            r = (t // n_c) * BR + tl.arange(0, BR)
            c = (t % n_c) * BC + tl.arange(0, BC)
            acc ^= tl.load(ptr + r[:, None] * COLS + c[None, :])
    tl.store(res + p, tl.xor_sum(tl.xor_sum(acc, axis=1), axis=0))


@triton.jit
def _persistent_gemv(x_ptr, qw_ptr, s_ptr, w_desc, s_desc, y_ptr, N, K, G, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, TMA: tl.constexpr, STAGES: tl.constexpr, ASM: tl.constexpr):
    # the int8-x GEMV's arithmetic (triton_q4._q8_block) over this program's rows, tile by tile (row block, K block):
    # weights by plain loads or by TMA (w_desc over the int32 words [N, K / 8], s_desc over the fp16 scales)
    p = tl.program_id(0)
    per = tl.cdiv(tl.cdiv(N, G), BLOCK_N) * BLOCK_N  # whole row blocks a program (TMA boxes do not mask rows)
    r0 = p * per
    r_end = tl.minimum(r0 + per, N)
    n_k = tl.cdiv(K, BLOCK_K)
    n_tiles = tl.cdiv(r_end - r0, BLOCK_N) * n_k
    acc = tl.zeros((BLOCK_N, BLOCK_K // 32), tl.float32)
    for t in tl.range(0, n_tiles, num_stages=STAGES):
        rb = r0 + (t // n_k) * BLOCK_N
        k0 = (t % n_k) * BLOCK_K
        rows = rb + tl.arange(0, BLOCK_N)
        if TMA:
            words = w_desc.load([rb, k0 // 8])
            sc = s_desc.load([rb, k0 // 32]).to(tl.float32)
            z = tl.zeros((BLOCK_N, BLOCK_K // 32), tl.float32) + 8.0
        else:
            words, sc, z = triton_q4._weight_block(qw_ptr, s_ptr, s_ptr, rows, rows < r_end, k0, K // 8, K // 32,
                                                   False, BLOCK_N, BLOCK_K, 32)
        acc += triton_q4._q8_block(words, sc, z, x_ptr, k0, K, False, BLOCK_N, BLOCK_K, 32, ASM)
        if t % n_k == n_k - 1:
            tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=rows < r_end)
            acc = tl.zeros((BLOCK_N, BLOCK_K // 32), tl.float32)


def persistent_gemv(x, qweight, scales, programs: int, block_n: int, block_k: int, tma: bool, stages: int,
                    num_warps: int = 8):
    """x [1, K] @ the q4_0 weight [N, K/2] (uint8) with its fp16 scales, by _persistent_gemv: y [1, N]"""
    n, k = qweight.shape[0], x.shape[1]
    words = qweight.view(torch.int32)
    s = scales.view(torch.float16)
    y = torch.empty(1, n, device=x.device, dtype=x.dtype)
    w_desc = s_desc = None
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        w_desc = TensorDescriptor.from_tensor(words, [block_n, block_k // 8])
        s_desc = TensorDescriptor.from_tensor(s, [block_n, block_k // 32])
    _persistent_gemv[(programs,)](x, words, s, w_desc, s_desc, y, n, k, programs, BLOCK_N=block_n, BLOCK_K=block_k,
                                  TMA=tma, STAGES=stages, ASM=x.is_cuda, num_warps=num_warps)
    return y


# the 12B's one-row products: name -> (N, K)
SHAPES = {"qkv": (8192, 3840), "o": (3840, 4096), "gate_up": (30720, 3840), "down": (3840, 15360)}


def gemv_rows(device: str = "cuda", shapes: dict = SHAPES, sets: int = 8) -> list:
    """Each product, us a call over `sets` weight sets (past L2), by the engine's int8-x GEMV and the persistent
    loops, with each one's relative error against the dequantized product."""
    from torch import nn

    from gemma4_agent.quant.int4 import Int4Linear

    programs = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 1
    variants = {"engine int8-x GEMV": None} if device == "cuda" else {}
    for block_n, block_k in ((16, 2048), (32, 1024)):
        variants[f"persistent plain {block_n}x{block_k}"] = dict(block_n=block_n, block_k=block_k, tma=False,
                                                                 stages=1)
        for stages in (2, 3, 4):
            variants[f"persistent TMA {block_n}x{block_k} stages {stages}"] = dict(block_n=block_n, block_k=block_k,
                                                                                  tma=True, stages=stages)
    rows = []
    for name, (n, k) in shapes.items():
        mods = [Int4Linear.from_float(nn.Linear(k, n, bias=False, device=device), "q4_0")
                for _ in range(sets if device == "cuda" else 1)]
        x = torch.randn(1, k, device=device).to(torch.bfloat16)
        ref = triton_q4.round_x_int8(x).float() @ mods[0].dequantize(torch.float32).t()
        for vname, cfg in variants.items():
            def run(mod, cfg=cfg):
                if cfg is None:
                    y = torch.empty(1, n, device=device, dtype=x.dtype)
                    s = mod.scales.view(torch.float16)
                    triton_q4._gemv_q8(x, mod.qweight, s, s, y, 32, False)
                    return y
                return persistent_gemv(x, mod.qweight, mod.scales, programs, **cfg)
            row = {"product": name, "variant": vname}
            try:
                row["rel_err"] = float((run(mods[0]).float() - ref).norm() / ref.norm())
                if device == "cuda":  # one call a weight set, replayed from a graph: the GPU's time, not the host's
                    for mod in mods:
                        run(mod)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        for mod in mods:
                            run(mod)
                    row["us"] = median_ms(graph.replay) / len(mods) * 1e3
                    row["tb_s"] = n * k * (0.5 + 2 / 32) / (row["us"] * 1e-6) / 1e12
            except Exception as exc:  # one variant that does not compile must not hide the others
                row["error"] = repr(exc)[:300]
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def stream_rows(out: str, report: dict) -> list:
    rows_n, cols = 786_432, 2048  # int32 words: 6.4 GB, about a 12B int4 step's weights
    buf = torch.randint(0, 1 << 30, (rows_n, cols), device="cuda", dtype=torch.int32)
    res = torch.zeros(4096, device="cuda", dtype=torch.int32)
    nbytes = buf.numel() * 4
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    half = buf[: rows_n // 2]
    dst = torch.empty_like(half)
    report.update(bytes=nbytes, copy_tb_s=2 * half.numel() * 4 / median_ms(lambda: dst.copy_(half)) / 1e9)
    rows = []
    tiles = (rows_n // BR) * (cols // BC)
    variants = {"plain, one tile a program, 4 warps":
                lambda: _stream[(tiles,)](buf, None, res, rows_n, cols, tiles, BR=BR, BC=BC, TMA=False, STAGES=1,
                                          num_warps=4)}
    for warps in (8, 16):
        for stages in (1, 3):
            variants[f"plain, {sms} programs x {warps} warps, {stages} stages"] = (
                lambda w=warps, s=stages: _stream[(sms,)](buf, None, res, rows_n, cols, sms, BR=BR, BC=BC, TMA=False,
                                                          STAGES=s, num_warps=w))
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor

        desc = TensorDescriptor.from_tensor(buf, [BR, BC])
        for warps in (4, 8):
            for stages in (2, 4, 6):
                variants[f"TMA, {sms} programs x {warps} warps, {stages} stages"] = (
                    lambda w=warps, s=stages: _stream[(sms,)](buf, desc, res, rows_n, cols, sms, BR=BR, BC=BC,
                                                              TMA=True, STAGES=s, num_warps=w))
    except Exception as exc:  # a Triton without host-side descriptors: the plain rows still tell
        rows.append({"variant": "TMA", "error": repr(exc)[:300]})
    for name, fn in variants.items():
        try:
            ms = median_ms(fn)
            row = {"variant": name, "ms": ms, "tb_s": nbytes / ms / 1e9}
        except Exception as exc:  # one variant that does not compile must not hide the others
            row = {"variant": name, "error": repr(exc)[:300]}
        print(json.dumps(row), flush=True)
        rows.append(row)
        Path(out, "gpu_stream_probe.json").write_text(json.dumps({**report, "stream": rows}, indent=1))
    del buf, dst
    torch.cuda.empty_cache()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--parts", nargs="+", choices=["stream", "gemv"], default=["stream", "gemv"])
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name(), "triton": triton.__version__}
    if "stream" in args.parts:
        report["stream"] = stream_rows(args.out, report)
    if "gemv" in args.parts:
        report["gemv"] = gemv_rows()
        Path(args.out, "gpu_stream_probe.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
