"""GPU check of the int4 path at Gemma 4 12B's shapes (torch + CUDA only, no other package):

    python -m gemma4_agent.quant.gpu_check --json OUT.json            # on the GPU machine
    python -m gemma4_agent.quant.gpu_check --reduced --device cpu     # small shapes, CPU (what the tests run)

1. kernel accuracy: Int4Linear on its kernel (Triton on the portable layout on CUDA, tinygemm without Triton)
   vs the dequantized-weight float32 matmul, q4_0 and awq-g128, batch 1, 3, 16, 76, 286 -> relative error
   (acceptance: < 1e-2).
2. weight bytes: random weights of ONE sliding and ONE full decoder layer quantized on the device (q4_0),
   as the kernel keeps them, measured with torch.cuda.memory_allocated;
   the tied embedding quantized at full size; extrapolated to all layers (+ the bf16 rest).
3. decode ms/token: a GEMV chain (batch 1) over every decoder linear + the LM head, int4 vs bf16, eager
   and CUDA graph, measured on distinct layer copies (so nothing is served from L2) and extrapolated
   over 48 layers; compared with weight bytes / measured copy bandwidth.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from . import triton_q4
from .int4 import Int4Embedding, Int4Linear, int4_backend, to_device_kernel

# Gemma 4 12B (gemma4_agent/model/presets/gemma4-12b.json): 48 layers, 5 sliding : 1 full
FULL_SHAPE = dict(hidden=3840, inter=15360, heads=16, kv=8, head_dim=256, global_head_dim=512, global_kv=1,
                  vocab=262144, layers=48, full_every=6, other_bf16_params=50_000_000)
REDUCED_SHAPE = dict(hidden=256, inter=1024, heads=16, kv=8, head_dim=16, global_head_dim=32, global_kv=1,
                     vocab=4096, layers=6, full_every=6, other_bf16_params=100_000)


def layer_linears(shape: dict, full: bool) -> dict[str, tuple[int, int]]:
    """name -> (out, in) of one decoder layer's linears (full layers: K = V, no v_proj)."""
    h, hd = shape["hidden"], shape["global_head_dim"] if full else shape["head_dim"]
    kv = shape["global_kv"] if full else shape["kv"]
    lin = {"q_proj": (shape["heads"] * hd, h), "k_proj": (kv * hd, h)}
    if not full:
        lin["v_proj"] = (kv * hd, h)
    lin.update({"o_proj": (h, shape["heads"] * hd), "gate_proj": (shape["inter"], h), "up_proj": (shape["inter"], h),
                "down_proj": (h, shape["inter"])})
    return lin


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mem(device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _timeit(fn, device, iters: int, warmup: int = 3) -> float:
    """Median ms per call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def _quantized_layer(shape, full, scheme, device, release=True) -> list[Int4Linear]:
    mods = []
    for out, inp in layer_linears(shape, full).values():
        lin = nn.Linear(inp, out, bias=False, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.normal_(0, inp ** -0.5)
        mods.append(Int4Linear.from_float(lin, scheme))
        del lin
    for m in mods:
        to_device_kernel(m, device, release_portable=release)
    return mods


def _float_layer(shape, full, device) -> list[nn.Linear]:
    mods = []
    for out, inp in layer_linears(shape, full).values():
        lin = nn.Linear(inp, out, bias=False, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.normal_(0, inp ** -0.5)
        mods.append(lin.requires_grad_(False))
    return mods


@torch.no_grad()
def check_accuracy(device, reduced: bool) -> list[dict]:
    """The int4 linear at the 12B's shapes as the model runs it ("auto": batch 1 the GEMV; 3 and 16, jump-forward
    chunks, and 76 and 286, a frame's prefill at 70 and 280 image tokens, the path timed fastest) and, on CUDA with
    Triton, every path that batch can take, each run by name."""
    rows = []
    shapes = [(512, 256), (256, 1024)] if reduced else [(4096, 3840), (3840, 15360), (3840, 8192)]
    for scheme in ("q4_0", "awq-g128"):
        for out, inp in shapes:
            torch.manual_seed(0)
            lin = nn.Linear(inp, out, bias=False, device=device)
            mod = Int4Linear.from_float(lin, scheme)
            w = mod.dequantize(torch.float32)
            for m in (1, 3, 16, 76, 286):
                x = torch.randn(m, inp, device=device)
                ref = x @ w.t()
                with int4_backend("kernel"):
                    outputs = {"auto": mod(x.to(torch.bfloat16)).float()}
                if device.type == "cuda" and triton_q4.available():
                    xb = x.to(torch.bfloat16)
                    gluon = triton_q4.gluon_usable(xb, mod.zeros, mod.group_size)
                    for path in triton_q4.paths_for(m, mod.group_size, gluon):
                        outputs[path] = triton_q4._launch(xb, mod.qweight, mod.scales, mod.zeros, mod.group_size,
                                                          path).float()
                for path, y in outputs.items():
                    rel = float((y - ref).norm() / ref.norm())
                    rows.append({"scheme": scheme, "shape": f"{out}x{inp}", "batch": m, "path": path, "rel_err": rel,
                                 "ok": rel < 1e-2})
    return rows


def resident_bytes(mods) -> int:
    """Bytes the modules keep: their buffers plus any kernel-specific packing cached on them."""
    total = 0
    for m in mods:
        if not m.__dict__.get("_released"):  # released: only the packed copy is left
            total += sum(t.numel() * t.element_size() for t in m.state_dict().values())
        if m._kernel is not None:
            total += sum(t.numel() * t.element_size() for t in m._kernel[1:])
    return total


@torch.no_grad()
def check_bytes(device, shape: dict, scheme: str = "q4_0") -> dict:
    """Kernel-resident bytes of one layer of each type (+ embedding), extrapolated to the whole model."""
    res = {}
    n_full = shape["layers"] // shape["full_every"]
    n_sliding = shape["layers"] - n_full
    for full in (False, True):
        base = _mem(device)
        mods = _quantized_layer(shape, full, scheme, device)
        _sync(device)
        measured = _mem(device) - base
        kernel_bytes = resident_bytes(mods)
        params = sum(o * i for o, i in layer_linears(shape, full).values())
        res["full" if full else "sliding"] = {"params": params, "kernel_bytes": kernel_bytes,
                                              "measured_bytes": measured if device.type == "cuda" else None,
                                              "portable_bytes": int(params * (0.5 + 2 / 32))}
        del mods
    base = _mem(device)
    emb = nn.Embedding(shape["vocab"], shape["hidden"], device=device, dtype=torch.bfloat16)
    qemb = Int4Embedding.from_float(emb, scheme)
    del emb
    to_device_kernel(qemb, device)
    _sync(device)
    emb_measured = _mem(device) - base
    emb_portable = sum(t.numel() * t.element_size() for t in qemb.state_dict().values())
    emb_kernel = resident_bytes([qemb]) - emb_portable
    del qemb
    per = {k: (v["measured_bytes"] if v["measured_bytes"] is not None else v["kernel_bytes"]) for k, v in res.items()}
    decoder = n_sliding * per["sliding"] + n_full * per["full"]
    other = shape["other_bf16_params"] * 2
    emb_total = emb_measured if device.type == "cuda" else emb_portable + emb_kernel
    params = n_sliding * res["sliding"]["params"] + n_full * res["full"]["params"]
    return {"scheme": scheme, "layers": res, "decoder_bytes": decoder, "embedding_bytes": emb_total,
            "embedding_portable_bytes": emb_portable, "embedding_kernel_bytes": emb_kernel, "other_bf16_bytes": other,
            "total_bytes": decoder + emb_total + other,
            "total_portable_bytes": n_sliding * res["sliding"]["portable_bytes"] + n_full * res["full"]["portable_bytes"]
            + emb_portable + other,
            "bf16_bytes": (params + shape["vocab"] * shape["hidden"]) * 2 + other, "limit_bytes": 7.0e9}


@torch.no_grad()
def copy_bandwidth(device, nbytes: int) -> float:
    """Bytes/s moved by a device-to-device copy (read + write counted)."""
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    ms = _timeit(lambda: b.copy_(a), device, iters=10)
    return 2 * nbytes / (ms / 1e3)


@torch.no_grad()
def check_decode(device, shape: dict, copies: int, iters: int) -> dict:
    """ms/token of the GEMV chain, extrapolated from `copies` distinct layers of each type."""
    n_full = shape["layers"] // shape["full_every"]
    n_sliding = shape["layers"] - n_full
    x = torch.randn(1, shape["hidden"], device=device, dtype=torch.bfloat16)
    xi = torch.randn(1, shape["inter"], device=device, dtype=torch.bfloat16)
    out = {}
    for kind in ("int4", "bf16"):
        per_layer = {}
        for full in (False, True):
            layers = [(_quantized_layer(shape, full, "q4_0", device) if kind == "int4" else _float_layer(shape, full, device))
                      for _ in range(copies)]
            names = list(layer_linears(shape, full))
            xo = torch.randn(1, layer_linears(shape, full)["o_proj"][1], device=device, dtype=torch.bfloat16)

            def chain():
                for mods in layers:
                    for name, m in zip(names, mods):
                        m(xo if name == "o_proj" else xi if name == "down_proj" else x)

            eager = _timeit(chain, device, iters) / copies
            graph = None
            if device.type == "cuda":
                s = torch.cuda.Stream(device)
                s.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(s):
                    chain()
                torch.cuda.current_stream(device).wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    chain()
                graph = _timeit(g.replay, device, iters) / copies
                del g
            per_layer["full" if full else "sliding"] = {"eager_ms": eager, "graph_ms": graph}
            del layers
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # LM head: vocab x hidden GEMV
        if kind == "int4":
            emb = nn.Embedding(shape["vocab"], shape["hidden"], device=device, dtype=torch.bfloat16)
            head = Int4Embedding.from_float(emb, "q4_0")
            del emb
            to_device_kernel(head, device)
            head_fn = lambda: head.matmul(x)  # noqa: E731
        else:
            w = torch.randn(shape["vocab"], shape["hidden"], device=device, dtype=torch.bfloat16)
            head_fn = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
        head_ms = _timeit(head_fn, device, iters)
        best = {k: (v["graph_ms"] if v["graph_ms"] is not None else v["eager_ms"]) for k, v in per_layer.items()}
        out[kind] = {"per_layer": per_layer, "head_ms": head_ms,
                     "ms_per_token": n_sliding * best["sliding"] + n_full * best["full"] + head_ms,
                     "ms_per_token_eager": n_sliding * per_layer["sliding"]["eager_ms"]
                     + n_full * per_layer["full"]["eager_ms"] + head_ms}
        if kind == "int4":
            del head
        else:
            del w
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gemma4_agent.quant.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reduced", action="store_true", help="small shapes (CPU smoke test)")
    parser.add_argument("--copies", type=int, default=None, help="distinct layers per type timed (default 4 / 1)")
    parser.add_argument("--iters", type=int, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shape = REDUCED_SHAPE if args.reduced else FULL_SHAPE
    copies = args.copies or (1 if args.reduced else 4)
    iters = args.iters or (3 if args.reduced else 20)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "shape": "reduced" if args.reduced else "gemma4-12b"}
    result["accuracy"] = check_accuracy(device, args.reduced)
    print("| scheme | shape | batch | path | rel. error vs dequant fp32 | < 1e-2 |\n|---|---|---:|---|---:|---|")
    for r in result["accuracy"]:
        print(f"| {r['scheme']} | {r['shape']} | {r['batch']} | {r['path']} | {r['rel_err']:.2e} | "
              f"{'yes' if r['ok'] else 'NO'} |")
    b = check_bytes(device, shape)
    result["bytes"] = b
    print(f"\n| weights ({b['scheme']}, {result['shape']}) | GB |\n|---|---:|")
    for key in ("decoder_bytes", "embedding_bytes", "other_bf16_bytes", "total_bytes", "total_portable_bytes",
                "bf16_bytes", "limit_bytes"):
        print(f"| {key.replace('_bytes', '')} | {b[key] / 1e9:.3f} |")
    bw = copy_bandwidth(device, (1 << 30) if device.type == "cuda" and not args.reduced else (64 << 20))
    d = check_decode(device, shape, copies, iters)
    result["copy_bandwidth_Bps"] = bw
    result["decode"] = d
    bound_int4 = b["total_bytes"] / bw * 1e3
    bound_bf16 = b["bf16_bytes"] / bw * 1e3
    result["decode"]["int4"]["bound_ms"] = bound_int4
    result["decode"]["bf16"]["bound_ms"] = bound_bf16
    print(f"\ncopy bandwidth {bw / 1e9:.0f} GB/s\n\n| decode chain | ms/token (graph) | ms/token (eager) | "
          f"bytes/bandwidth ms | ratio |\n|---|---:|---:|---:|---:|")
    for kind, bound in (("int4", bound_int4), ("bf16", bound_bf16)):
        r = d[kind]
        print(f"| {kind} | {r['ms_per_token']:.2f} | {r['ms_per_token_eager']:.2f} | {bound:.2f} | "
              f"{r['ms_per_token'] / bound:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
