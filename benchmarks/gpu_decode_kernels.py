"""Where a decode step's time goes at the 12B's widths, in pieces small enough to iterate on:

1. the int4 GEMV at each decoder shape (q/k/v joined, o, gate/up joined, down, the LM head), autotuned as
   the engine autotunes it, against bytes / copy bandwidth; the bf16 GEMV of cuBLAS and of engine/gemv.py. Each
   timing runs over distinct weight copies (> L2) inside one CUDA graph, as in the captured decode step.
2. chunk matmuls (286 and 76 rows: 280 and 70 image tokens; 8 and 4: jump-forward): dequantize + cuBLAS, the tl.dot
   GEMM on the int4 weights, the wide GEMM (every row in one program, up to 320 rows; the engine times these on
   first use, 17-512 rows) and one GEMV per row; ms a frame each way at the 12B's layer counts.
2a. the GEMM at chunk sizes (8 and 4 rows) autotuned without and with its wide-K configurations.
2b. a frame's prefill matmuls as the engine runs them (each weight dequantized, then cuBLAS), against the same with
   the next weight's dequantization on a second stream beside this one's matmul, in one CUDA graph: whether the
   memory-bound half can hide behind the compute-bound one, before the engine is built to do it.
2c. the GEMM's deep tile at a frame's prefill rows (76, 286) with and without a 128-register cap (two programs an
   SM instead of one), split two ways or not, beside the engine's pick and dequantize + cuBLAS.
2d. smaller swapped tiles at 76 rows, three or four programs an SM (`small_tiles`), likewise.
2e. dequantize + cuBLAS with the weight dequantized in row chunks that stay in L2, each multiplied as soon as it is
   written, on one stream or with the next chunk's dequantization beside it (`chunked_dequant`).
2f. the Gluon int4 GEMM (gemma4_agent/quant/gluon_q4.py: the weights dequantized into wgmma's register operand, each step waiting
   for its own wgmmas, or into a shared-memory operand, double-buffered, with each step's wgmmas left in flight) at a
   frame's prefill rows, several configurations, against the engine's pick and bf16 cuBLAS (`gluon_gemm`).
3. attention per layer type, one decode step (the Triton kernels against the matmul form) and a frame's prefill
   chunk (the kernels against PyTorch's SDPA).
3b. the residual add between two RMSNorms (twice a layer): the add_norms kernel against Inductor's fusion of the
   same modules, at one row and at a 286-row chunk.
3c. how the engine's per-shape choice times the two int4 GEMVs: the host's time to launch one, what
   triton.testing.do_bench reports (mean, median) and what fastest.kernel_ms reports (twice).
3d. the add_norms kernel between the o and gate/up GEMVs in a chain of the three, against a gate/up GEMV that takes
   the norms into its own programs (a what-if kernel here, not the engine's) and against no norm at all.
3e. the decode step of the 6-layer model below with each kind of small kernel left out (norms, the gate, attention):
   what each costs between the GEMVs.
3f. the same step launched with PDL and without: without, a kernel profile gives each kernel's own GPU time.
3g. the same step as the engine runs it, replayed twice in one process (`step`): run from two copies of the tree
   (the one changed, one with the old files), it is the A/B of a change to the step, each in its own process.
3h. what a grid-wide barrier costs in one persistent Triton kernel (one program an SM, an arrival count and a
   spin), alone and between the phases of a streamed "layer" of the 12B's int4 decode step: what a persistent
   decode kernel (one launch a step, a barrier where a kernel boundary is now) would pay per phase.
3i. whether one resident program an SM streams a step's bytes at the copy rate (`stream`: 6.4 GB of int32 tiles by
   plain loads, 8 or 16 warps, or by TMA descriptor loads into shared memory pipelined 2-6 deep, beside one tile a
   program), and whether the int8-x GEMV's tile loop so fed keeps up with the engine's GEMV at the 12B's one-row
   products (`persistent_gemv`: c6126e5's flat tile loop, and a row-block loop with K a constant): what a persistent
   decode kernel's GEMVs could stream (the one of commit c6126e5 held its loads in registers and streamed at 55% of
   the copy rate, BENCHMARKS.md, twenty-first session).
4. the streaming engine on a 6-layer model of the 12B's widths (5 sliding + 1 full: one of the 12B's
   eight repeating blocks), bf16 and int4, projections separate and joined, compiled: decode ms/token, how much of
   it the step waits on the host, and a kernel profile of each, to extrapolate to 48 layers without building them.

    python benchmarks/gpu_decode_kernels.py --out OUT [--parts gemv prefill chunk_gemm register_cap small_tiles
        chunked_dequant overlap attention norms timing norm_prologue ablation pdl step barrier stream persistent_gemv
        gluon_gemm engine]
        [--baseline OLD.py] [--slots N] [--prefill-rows ROWS...]

`--baseline` times a previous triton_q4.py's GEMV beside the current one, in the same run on the same weight copies
(`git show REV:gemma4_agent/quant/triton_q4.py > OLD.py`): our machines are shared, so compare within one run.
"""
import argparse
import functools
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gemma4_agent.engine import gemv  # noqa: E402
from gemma4_agent.engine.bench import measure_ceilings, run_bench  # noqa: E402
from gemma4_agent.model import ModelConfig, build_model  # noqa: E402
from gemma4_agent.quant import triton_q4  # noqa: E402
from gemma4_agent.quant.int4 import Int4Linear, quantize_model, to_device_kernel  # noqa: E402
from gemma4_agent.triton_env import tl, triton  # noqa: E402

PRESET = Path(__file__).resolve().parents[1] / "gemma4_agent/model/presets/gemma4-12b.json"
# (name, out, in) at the 12B's widths; qkv / gate_up as the engine joins them
SHAPES = [("qkv", 8192, 3840), ("o", 3840, 4096), ("gate_up", 30720, 3840), ("down", 3840, 15360),
          ("qk_full", 8704, 3840), ("o_full", 3840, 8192)]
HEAD = ("lm_head", 262144, 3840)


def graph_ms(fn, reps: int) -> float:
    import triton

    return triton.testing.do_bench_cudagraph(fn, rep=50) / reps


def int4_copies(out, inp, count):
    mods = []
    for i in range(count):
        lin = torch.nn.Linear(inp, out, bias=False, device="cuda", dtype=torch.bfloat16)
        torch.nn.init.normal_(lin.weight, 0, inp ** -0.5)
        mods.append(Int4Linear.from_float(lin, "q4_0"))
        del lin
    return mods


def load_baseline(path: str):
    """A previous version of triton_q4.py as a module of its own; its custom op renamed so that both register."""
    src = Path(path).read_text().replace("gemma4_agent::", "gemma4_agent_baseline::")
    src = src.replace("from ..fastest import", "from gemma4_agent.fastest import").replace(
        "from ..pdl import", "from gemma4_agent.pdl import")
    copy = Path(tempfile.mkdtemp()) / "triton_q4_baseline.py"  # a file: Triton reads its kernels' source
    copy.write_text(src)
    spec = importlib.util.spec_from_file_location("triton_q4_baseline", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_gemv(ceilings: dict, baseline=None) -> list:
    rows = []
    bw = ceilings["copy_bandwidth_gbs"] * 1e9
    # each GEMV by name: the float one, the int8-x one (dp4a), and a previous version's
    kernels = {"int4_gemv": (triton_q4, "gemv", "_gemv_kernel"), "int4_gemv_q8": (triton_q4, "gemv_q8", "_gemv_q8_kernel")}
    if baseline:
        kernels["baseline_gemv"] = (baseline, "gemv", "_gemv_kernel")
        if hasattr(baseline, "_gemv_q8_kernel"):
            kernels["baseline_gemv_q8"] = (baseline, "gemv_q8", "_gemv_q8_kernel")
    for name, out, inp in SHAPES + [HEAD]:
        nbytes = out * inp // 2 + out * inp // 32 * 2
        copies = max(1, min(16, (400 << 20) // nbytes))  # > L2 in all, so weights come from HBM
        mods = int4_copies(out, inp, copies)
        x = torch.randn(1, inp, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ mods[0].dequantize(torch.float32).t()
        row = {"shape": name, "out": out, "in": inp, "int4_bytes": nbytes, "ideal_us": nbytes / bw * 1e6}
        for label, (module, path, kernel) in kernels.items():
            y = module._launch(x, mods[0].qweight, mods[0].scales, None, 32, path)  # autotunes
            row[label + "_config"] = str(getattr(module, kernel).best_config)
            row[label + "_rel_err"] = float((y.float() - ref).norm() / ref.norm())  # the compiled kernel's arithmetic
        for _ in range(2):  # alternated, twice: each kernel's time the mean of its two
            for label, (module, path, _) in kernels.items():
                us = graph_ms(lambda: [module._launch(x, m.qweight, m.scales, None, 32, path) for m in mods],
                              len(mods)) * 1e3
                row[label + "_us"] = row.get(label + "_us", 0.0) + us / 2
        # one weight set again and again: its bytes from L2 where they fit (50 MB on an H100), what a GEMV would take
        # with its weights asked into L2 ahead, e.g. beside the latency-bound kernels before it
        row["int4_gemv_q8_l2_us"] = graph_ms(lambda: [triton_q4._launch(x, mods[0].qweight, mods[0].scales, None, 32,
                                                                        "gemv_q8") for _ in range(8)], 8) * 1e3
        del mods
        dense = [torch.randn(out, inp, device="cuda", dtype=torch.bfloat16)
                 for _ in range(max(1, min(8, (400 << 20) // (out * inp * 2))))]
        row["bf16_cublas_us"] = graph_ms(lambda: [torch.nn.functional.linear(x, w) for w in dense], len(dense)) * 1e3
        gemv._launch(x, dense[0], "triton")  # autotunes
        row["bf16_triton_us"] = graph_ms(lambda: [gemv._launch(x, w, "triton") for w in dense], len(dense)) * 1e3
        row["bf16_ideal_us"] = out * inp * 2 / bw * 1e6
        del dense
        torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def bench_prefill(ceilings: dict, row_counts=(286, 76, 8, 4)) -> list:
    """Chunk matmuls: a frame's prefill (280 and 70 image tokens + 6 rows), where int4_matmul times dequantize +
    cuBLAS against the tl.dot GEMM on first use and takes the faster, and jump-forward chunks (4-8 rows), which
    take the GEMM; against them, one GEMV per row (at a few rows the GEMM's dequantization, paid once per weight
    tile whatever the rows, may cost more than rows of GEMVs)."""
    rows = []
    for m in row_counts:
        for name, out, inp in SHAPES:
            mod = int4_copies(out, inp, 1)[0]
            x = torch.randn(m, inp, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(m, out, device="cuda", dtype=torch.bfloat16)
            s = mod.scales.view(torch.float16)
            args = (x, mod.qweight, s, s, y, 32, False)
            row = {"shape": name, "rows": m,
                   "ideal_matmul_us": 2 * m * out * inp / (ceilings["matmul_tflops"] * 1e12) * 1e6}
            triton_q4._gemm(*args)  # autotunes
            row["dequant_cublas_us"] = graph_ms(lambda: triton_q4._dequant_matmul(*args), 1) * 1e3
            row["int4_gemm_us"] = graph_ms(lambda: triton_q4._gemm(*args), 1) * 1e3
            row["int4_gemm_config"] = str(triton_q4._gemm_kernel.best_config)
            if triton_q4.wide_rows(m) and m > 16:  # every row in one program (a frame's prefill)
                triton_q4._gemm_wide(*args)  # autotunes
                row["int4_gemm_wide_us"] = graph_ms(lambda: triton_q4._gemm_wide(*args), 1) * 1e3
                row["int4_gemm_wide_config"] = str(triton_q4._gemm_wide_kernel.best_config)
                want = torch.empty_like(y)
                triton_q4._dequant_matmul(x, mod.qweight, s, s, want, 32, False)
                row["int4_gemm_wide_rel_err"] = ((y.float() - want.float()).norm() / want.float().norm()).item()
            if m <= 16:
                def gemv():
                    return [torch.ops.gemma4_agent.int4_matmul(x[i:i + 1], mod.qweight, mod.scales, None, 32)
                            for i in range(m)]
                gemv()  # autotunes
                row["int4_gemv_per_row_us"] = graph_ms(gemv, 1) * 1e3
            w = torch.randn(out, inp, device="cuda", dtype=torch.bfloat16)
            row["bf16_cublas_us"] = graph_ms(lambda: x @ w.t(), 1) * 1e3
            print(json.dumps(row), flush=True)
            rows.append(row)
            del mod, w
        of_m = [r for r in rows if r["rows"] == m]  # a frame's prefill matmuls each way (the 12B's layer counts)
        ways = [k for k in of_m[0] if k.endswith("_us") and all(k in r for r in of_m)]
        print(json.dumps({"rows": m, "ms_a_frame": {w: sum(r[w] * LAYERS_OF[r["shape"]] for r in of_m) / 1e3
                                                    for w in ways}}), flush=True)
    return rows


def gemm_calls(mods: list, rows: int) -> list:
    """_gemm's arguments for `rows` random rows times each of the int4 modules (one x and one output for all)."""
    inp, out = mods[0].in_features, mods[0].out_features
    x = torch.randn(rows, inp, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(rows, out, device="cuda", dtype=torch.bfloat16)
    return [(x, mod.qweight, mod.scales.view(torch.float16), mod.scales.view(torch.float16), y, 32, False)
            for mod in mods]


def gemm_us_over(configs: list, calls: list, copies: int) -> tuple[float, str]:
    """The GEMM autotuned afresh over `configs` (one configuration: compiled, not timed against others), then us a
    matmul over the weight sets of `calls` in a CUDA graph, and the configuration it ran."""
    triton_q4._gemm_kernel.configs = configs
    triton_q4._gemm_kernel.cache.clear()
    triton_q4._gemm(*calls[0])
    return graph_ms(lambda: [triton_q4._gemm(*c) for c in calls], copies) * 1e3, str(triton_q4._gemm_kernel.best_config)


def bench_chunk_gemm(row_counts=(8, 4), copies: int = 4) -> list:
    """The int4 GEMM at jump-forward chunk sizes, autotuned over its configurations without the wide-K ones (BLOCK_K
    > 128, which _prune_gemm keeps for chunks only) and with them, in one process: us a matmul in a CUDA graph over
    `copies` distinct weight sets, and the configuration each list's autotuning picked."""
    every = list(triton_q4._gemm_kernel.configs)
    lists = {"before": [c for c in every if c.kwargs["BLOCK_K"] <= 128], "wide_k": every}
    rows = []
    for m in row_counts:
        for name, out, inp in SHAPES[:4]:
            mods = int4_copies(out, inp, copies)
            calls = gemm_calls(mods, m)
            row = {"shape": name, "rows": m}
            for label, configs in lists.items():
                row[f"{label}_us"], row[f"{label}_config"] = gemm_us_over(configs, calls, copies)
            print(json.dumps(row), flush=True)
            rows.append(row)
            del mods
    triton_q4._gemm_kernel.configs = every
    return rows


# layers of each joined shape in the 12B (40 sliding, 8 full): a frame's prefill runs each once a layer
LAYERS_OF = {"qkv": 40, "o": 40, "gate_up": 48, "down": 48, "qk_full": 8, "o_full": 8}


def bench_forced_tiles(ceilings: dict, tiles: dict, row_counts, copies: int) -> list:
    """Each of `tiles` (label -> triton.Config of _gemm_kernel) forced at a frame's prefill rows of every 12B
    projection (a one-configuration autotuner), beside the engine's own pick and dequantize + cuBLAS: us a matmul in
    a CUDA graph over `copies` weight sets, each forced tile's relative error against dequantize + cuBLAS, and ms a
    frame each way that ran every shape, and with the fastest way per shape ("best")."""
    every = list(triton_q4._gemm_kernel.configs)
    pipelined = triton_q4.PIPELINED_MAX_ROWS  # the engine's; raised for the forced tiles (pruned per row bucket)
    raised = 1 << (max(row_counts) - 1).bit_length()
    rows = []
    try:
        for m in row_counts:
            for name, out, inp in SHAPES:
                mods = int4_copies(out, inp, copies)
                calls = gemm_calls(mods, m)
                row = {"shape": name, "rows": m,
                       "ideal_matmul_us": 2 * m * out * inp / (ceilings["matmul_tflops"] * 1e12) * 1e6,
                       "dequant_cublas_us": graph_ms(lambda: [triton_q4._dequant_matmul(*c) for c in calls],
                                                     copies) * 1e3}
                # a one-configuration autotuner skips the pruning, which also keeps a split's partials inside
                # their buffer: ask it here, and leave out a tile it would not run
                shape_args = {"M_BUCKET": 1 << (m - 1).bit_length(), "N": out, "K": inp, "x_ptr": calls[0][0]}
                # the last weight set's product, for each forced tile's output (the graph's last call writes y)
                want = torch.empty_like(calls[-1][4])
                triton_q4._dequant_matmul(*calls[-1][:4], want, *calls[-1][5:])
                row["engine_us"], row["engine_config"] = gemm_us_over(every, calls, copies)
                triton_q4.PIPELINED_MAX_ROWS = raised
                for label, tile in tiles.items():
                    if triton_q4._prune_gemm([tile], shape_args):
                        row[f"{label}_us"] = gemm_us_over([tile], calls, copies)[0]
                        got = calls[-1][4].float()
                        row[f"{label}_rel_err"] = ((got - want.float()).norm() / want.float().norm()).item()
                triton_q4.PIPELINED_MAX_ROWS = pipelined
                row["best_us"] = min(v for k, v in row.items() if k.endswith("_us") and k != "ideal_matmul_us")
                print(json.dumps(row), flush=True)
                rows.append(row)
                del mods
    finally:
        triton_q4._gemm_kernel.configs = every
        triton_q4._gemm_kernel.cache.clear()
        triton_q4.PIPELINED_MAX_ROWS = pipelined
    for m in row_counts:  # a frame's prefill matmuls, each way that ran every shape (the splits run on a few)
        of_m = [r for r in rows if r["rows"] == m]
        ways = [k[:-3] for k in of_m[0] if k.endswith("_us") and k != "ideal_matmul_us"
                and all(k in r for r in of_m)]
        per_frame = {w: sum(r[f"{w}_us"] * LAYERS_OF[r["shape"]] for r in of_m) / 1e3 for w in ways}
        print(json.dumps({"rows": m, "ms_a_frame": per_frame}), flush=True)
    return rows


def bench_register_cap(ceilings: dict, row_counts=(76, 286), copies: int = 2) -> list:
    """The GEMM's deep tile (128 x 128 x 64, 8 warps, 4 stages, SWAP: a 70-token frame's pick) holds ~155 registers
    a thread on sm_90, so one program runs an SM and its dequantization and its MMAs take turns. The same tile
    capped at 128 registers (no spill in its loop: test_kernels_compile.py) lets two programs share an SM; split two
    ways or not; the deep tile at 286 rows too (the engine prunes it there). Measured on an H100 (2026-12-07,
    BENCHMARKS.md): no faster capped, and its split-two products wrong at 286 rows, so the engine does not use it."""
    base = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "SWAP": True}
    tiles = {f"deep{'_split2' if split > 1 else ''}{'_cap128' if cap else ''}":
             triton.Config(dict(base, SPLIT=split), num_warps=8, num_stages=4, maxnreg=cap)
             for split in (1, 2) for cap in (None, 128)}
    return bench_forced_tiles(ceilings, tiles, row_counts, copies)


def bench_small_tiles(ceilings: dict, row_counts=(76, 286), copies: int = 2) -> list:
    """More programs an SM at a 70-token frame's 76 rows. Nsight Compute on an H100 (2026-12-07, BENCHMARKS.md) has
    the engine's 76-row GEMMs latency-bound: one program of 8 warps an SM (124-198 registers a thread, the splits'
    epilogue adding the most), under one eligible warp a scheduler. Swapped tiles whose registers (Triton 3.6, sm_90,
    compiled on the CPU) let 3-4 programs share an SM: 128 x 64 (4 warps) with 64 and 32 wide steps of K, and
    128 x 128 with 32-wide steps, each deeper pipelined; split two ways too. Measured on an H100 (2026-12-07,
    BENCHMARKS.md): none faster than the engine's pick at 76 rows (a frame's matmuls 18.8 ms at best, against 9.3)."""
    shapes = {"n64_k64": (64, 64, 4, 4), "n64_k32": (64, 32, 4, 6), "n128_k32": (128, 32, 8, 6)}
    tiles = {f"{label}{'_split2' if split > 1 else ''}":
             triton.Config({"BLOCK_M": 128, "BLOCK_N": bn, "BLOCK_K": bk, "SWAP": True, "SPLIT": split},
                           num_warps=w, num_stages=stages)
             for label, (bn, bk, w, stages) in shapes.items() for split in (1, 2)}
    return bench_forced_tiles(ceilings, tiles, row_counts, copies)


def bench_overlap(ceilings: dict, row_counts=(286, 76), layers: int = 4) -> list:
    """The four matmuls of `layers` sliding decoder layers (distinct weights, > L2), each weight dequantized into one
    of two buffers: one after the other (the engine today), or weight i + 1's dequantization on a side stream while
    weight i's matmul runs (it overwrites the buffer matmul i - 1 read, so it waits for that one). Beside them, the
    dequantizations alone and the matmuls alone (on bf16 weights): an overlapped time near the larger of the two
    would say the prefill can save most of the smaller."""
    shapes = [s for s in SHAPES if s[0] in ("qkv", "o", "gate_up", "down")] * layers
    mods = [int4_copies(out, inp, 1)[0] for _, out, inp in shapes]
    biggest = max(out * inp for _, out, inp in shapes)
    bufs = [torch.empty(biggest, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    side = torch.cuda.Stream()

    def dequant(i, buf):
        _, out, inp = shapes[i]
        w = buf[:out * inp].view(out, inp)
        s = mods[i].scales.view(torch.float16)
        triton_q4.dequantize_into(mods[i].qweight, s, s, w, 32, False)
        return w

    rows = []
    for m in row_counts:
        xs = [torch.randn(m, inp, device="cuda", dtype=torch.bfloat16) for _, _, inp in shapes]
        ys = [torch.empty(m, out, device="cuda", dtype=torch.bfloat16) for _, out, _ in shapes]

        def sequential():
            for i, (x, y) in enumerate(zip(xs, ys)):
                torch.matmul(x, dequant(i, bufs[i % 2]).t(), out=y)

        def overlapped():
            main = torch.cuda.current_stream()
            w = dequant(0, bufs[0])
            for i, (x, y) in enumerate(zip(xs, ys)):
                if i + 1 < len(shapes):
                    side.wait_stream(main)
                    with torch.cuda.stream(side):
                        following = dequant(i + 1, bufs[(i + 1) % 2])
                torch.matmul(x, w.t(), out=y)
                if i + 1 < len(shapes):
                    main.wait_stream(side)
                    w = following

        def dequant_only():
            for i in range(len(shapes)):
                dequant(i, bufs[i % 2])

        ws = [dequant(i, torch.empty(out * inp, device="cuda", dtype=torch.bfloat16))
              for i, (_, out, inp) in enumerate(shapes)]

        def matmul_only():
            for i, (x, y) in enumerate(zip(xs, ys)):
                torch.matmul(x, ws[i].t(), out=y)

        sequential()
        reference = [y.clone() for y in ys]
        overlapped()
        torch.cuda.synchronize()
        row = {"rows": m, "layers": layers, "same_result": all(torch.equal(a, b) for a, b in zip(reference, ys)),
               "ideal_matmul_us": sum(2 * m * out * inp for _, out, inp in shapes) / (ceilings["matmul_tflops"] * 1e6)}
        for name, fn in (("sequential", sequential), ("overlapped", overlapped), ("dequant_only", dequant_only),
                         ("matmul_only", matmul_only)):
            row[f"{name}_us"] = graph_ms(fn, 1) * 1e3
        print(json.dumps(row), flush=True)
        rows.append(row)
        del ws
    return rows


def bench_chunked_dequant(row_counts=(286, 76), chunks=(512, 1024, 2048, 4096), copies: int = 2) -> list:
    """Dequantize + cuBLAS with each weight dequantized `chunk` rows at a time into a buffer small enough to stay in
    L2 (4-31 MB of bf16 at these widths), each chunk multiplied into its columns of y as soon as it is written: on one
    stream ("chunk"), or with the next chunk's dequantization on a side stream into a second buffer ("overlap").
    Beside the whole weight at once (the engine's dequant path) and bf16 cuBLAS; us a matmul in a CUDA graph over
    `copies` weight sets, relative error against the whole-weight product. Measured on an H100 (2026-12-07,
    BENCHMARKS.md): slower than the whole weight at 286 rows, and far behind the GEMM at 76."""
    side = torch.cuda.Stream()

    def whole(x, mod, y):
        s = mod.scales.view(torch.float16)
        triton_q4._dequant_matmul(x, mod.qweight, s, s, y, 32, False)

    def chunked(x, mod, y, bufs, c, overlap):
        qw, s = mod.qweight, mod.scales.view(torch.float16)
        main = torch.cuda.current_stream()
        side.wait_stream(main)  # the buffers' last readers, the previous call's matmuls
        read = [None, None]  # the matmul that last read each buffer
        for i, a in enumerate(range(0, qw.shape[0], c)):
            b = min(qw.shape[0], a + c)
            w = bufs[i % 2 if overlap else 0][:b - a]
            with torch.cuda.stream(side if overlap else main):
                if overlap and read[i % 2] is not None:
                    side.wait_event(read[i % 2])
                triton_q4.dequantize_into(qw[a:b], s[a:b], s[a:b], w, 32, False)
            if overlap:
                main.wait_stream(side)
            torch.matmul(x, w.t(), out=y[:, a:b])
            read[i % 2] = torch.cuda.Event()
            read[i % 2].record(main)
        main.wait_stream(side)

    rows = []
    for m in row_counts:
        for name, out, inp in SHAPES:
            mods = int4_copies(out, inp, copies)
            x = torch.randn(m, inp, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(m, out, device="cuda", dtype=torch.bfloat16)
            want = torch.empty_like(y)
            whole(x, mods[-1], want)
            row = {"shape": name, "rows": m,
                   "whole_us": graph_ms(lambda: [whole(x, md, y) for md in mods], copies) * 1e3}
            dense = [torch.randn(out, inp, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
            row["bf16_cublas_us"] = graph_ms(lambda: [torch.matmul(x, w.t(), out=y) for w in dense], copies) * 1e3
            del dense
            for c in (c for c in chunks if c < out):
                bufs = [torch.empty(c, inp, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
                for label, overlap in (("chunk", False), ("overlap", True)):
                    row[f"{label}{c}_us"] = graph_ms(lambda: [chunked(x, md, y, bufs, c, overlap) for md in mods],
                                                     copies) * 1e3
                    row[f"{label}{c}_rel_err"] = ((y.float() - want.float()).norm() / want.float().norm()).item()
                del bufs
            print(json.dumps(row), flush=True)
            rows.append(row)
            del mods
    for m in row_counts:
        of_m = [r for r in rows if r["rows"] == m]
        best = {r["shape"]: min(v for k, v in r.items() if k.endswith("_us") and k != "bf16_cublas_us") for r in of_m}
        print(json.dumps({"rows": m, "ms_a_frame": {
            "whole": sum(r["whole_us"] * LAYERS_OF[r["shape"]] for r in of_m) / 1e3,
            "best_chunked_or_whole": sum(best[r["shape"]] * LAYERS_OF[r["shape"]] for r in of_m) / 1e3,
            "bf16_cublas": sum(r["bf16_cublas_us"] * LAYERS_OF[r["shape"]] for r in of_m) / 1e3}}), flush=True)
    return rows


def bench_attention(slots: int = 982) -> list:
    """Attention over a bench-sized cache at the 12B's shapes, per layer type: one decode step (the Triton kernels,
    at each split of the cache the custom op chooses between, against the matmul form, what cuBLAS runs) and a
    frame's 286-row prefill chunk (the kernels against PyTorch's fused SDPA, the two it chooses between); accuracy
    and time."""
    from gemma4_agent.fastest import kernel_ms
    from gemma4_agent.model import triton_attention as A
    from gemma4_agent.model.network import attention_mask

    rows = []
    for name, kv_heads, heads, dim in (("sliding", 8, 16, 256), ("full", 1, 16, 512)):
        for seq in (1, 286):
            groups = heads // kv_heads
            q = torch.randn(kv_heads, groups * seq, dim, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(kv_heads, slots, dim, device="cuda", dtype=torch.bfloat16) / dim ** 0.5
            v = torch.randn(kv_heads, slots, dim, device="cuda", dtype=torch.bfloat16)
            k_pos = torch.arange(slots, device="cuda")
            k_pos[slots // 2:] = -(1 << 62)  # half the slots empty, as in a ring not yet full
            q_pos = torch.arange(slots // 2 - seq, slots // 2, device="cuda")  # the chunk's own rows are cached last
            mask = attention_mask(q_pos, k_pos, torch.full((1, seq), -1, device="cuda"),
                                  torch.full((1, slots), -1, device="cuda"), 1024 if name == "sliding" else None)
            mask = mask[0, 0].repeat(groups, 1).contiguous()
            other, other_name = (A._sdpa, "sdpa") if seq > 1 else (None, "matmul")
            if other is None:
                def other(q, k, v, mask):
                    scores = torch.matmul(q, k.transpose(-1, -2)).float().masked_fill(~mask, float("-inf"))
                    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)
            fused = A._launch(q, k, v, mask)
            ref = other(q, k, v, mask)
            row = {"layer": name, "seq": seq, "query_rows": groups * seq, "slots": slots,
                   "rel_err": float((fused.float() - ref.float()).norm() / ref.float().norm()),
                   f"{other_name}_us": graph_ms(lambda: other(q, k, v, mask), 1) * 1e3}
            for split, kw in A.SPLITS.items():  # each way of splitting the cache the op chooses between
                row[f"triton_{split}_us"] = graph_ms(lambda: A._launch(q, k, v, mask, **kw), 1) * 1e3
                if seq == 1:  # as the op's choice times them: the GPU alone, cache from HBM
                    row[f"triton_{split}_gpu_alone_us"] = kernel_ms(lambda: A._launch(q, k, v, mask, **kw)) * 1e3
            if seq > 1:  # the op's third candidate for a frame's prefill
                out = A._matmul_form(q, k, v, mask)
                row["matmul_form_rel_err"] = float((out.float() - ref.float()).norm() / ref.float().norm())
                row["matmul_form_us"] = graph_ms(lambda: A._matmul_form(q, k, v, mask), 1) * 1e3
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def bench_norms() -> list:
    """add_and_norm at the 12B's width, bf16: the Triton kernel (what the engine runs on CUDA) against torch.compile
    of the modules' own form (what Inductor made of it before), 96 calls a CUDA graph (a decode step's count)."""
    from gemma4_agent.model.network import RMSNorm, add_and_norm_modules

    post, pre = (RMSNorm(3840).cuda().to(torch.bfloat16) for _ in range(2))
    scale = torch.ones(1, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(add_and_norm_modules)
    rows = []
    for seq in (1, 286):
        h = torch.randn(seq, 3840, device="cuda", dtype=torch.bfloat16) * 20
        y = torch.randn(seq, 3840, device="cuda", dtype=torch.bfloat16)
        kernel = lambda: torch.ops.gemma4_agent.add_norms(h, y, post.weight, pre.weight, scale, 1e-6, 1e-6)  # noqa
        inductor = lambda: compiled(h, y, post, pre, scale)  # noqa: E731
        a, b = kernel(), inductor()
        row = {"rows": seq, "rel_err_x": float((a[1].float() - b[1].float()).norm() / b[1].float().norm())}
        for name, fn in (("kernel", kernel), ("inductor", inductor)):
            row[f"{name}_us"] = graph_ms(lambda: [fn() for _ in range(96)], 96) * 1e3
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


if triton_q4.triton is not None:
    import triton
    import triton.language as tl

    from gemma4_agent.pdl import wait_then_release
    from gemma4_agent.quant.triton_q4 import (_bench_from_hbm, _gemv_q8_configs, _prune_gemv_q8, _q8_dot,
                                              _quantize_values, _weight_block)
    from gemma4_agent.triton_env import rounded

    @triton.autotune(configs=[c for c in _gemv_q8_configs() if c.kwargs["SPLIT"] == 1], key=["N", "K"],
                     prune_configs_by={"early_config_prune": _prune_gemv_q8}, do_bench=_bench_from_hbm)
    @triton.jit
    def _norm_prologue_kernel(y_ptr, h_ptr, w_post_ptr, w_pre_ptr, h_out_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, N, K,
                              K_WORDS, K_GROUPS, eps_post, eps_pre, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
                              ROW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
                              ASM: tl.constexpr, PDL: tl.constexpr):
        """A what-if kernel, not the engine's: the int8-x GEMV of a sub-block's input projection taking the residual
        add and both norms before it into its own programs, so that no add_norms kernel sits between two GEMVs.

        Each program reduces y (the GEMV before's output, L2-resident) over the whole row for the first norm, forms
        h1 = h + post(y) block by block with add_norms' roundings, and scales its sums by the second norm's factor r2
        at the end: x = h1 * w_pre * r2, and rounding x to int8 per 32 values does not depend on the positive factor,
        so the dots need only h1 * w_pre (not rounded to bf16 in between, as the engine's x is). Program 0 stores h1,
        the residual stream. SPLIT 1: each program sees all of K, so the second norm's sum too."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        words, s, z = _weight_block(qw_ptr, s_ptr, z_ptr, rows, row_ok, 0, K_WORDS, K_GROUPS, HAS_ZEROS, BLOCK_N,
                                    BLOCK_K, GROUP)
        wait_then_release(PDL)
        dtype = out_ptr.dtype.element_ty
        cols = tl.arange(0, ROW)
        y_row = tl.load(y_ptr + cols, mask=cols < K, other=0).to(tl.float32)
        r1 = tl.math.rsqrt(tl.sum(y_row * y_row, axis=0) / K + eps_post)
        acc = tl.zeros((BLOCK_N, BLOCK_K // 32), dtype=tl.float32)
        sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if k0 > 0:
                words, s, z = _weight_block(qw_ptr, s_ptr, z_ptr, rows, row_ok, k0, K_WORDS, K_GROUPS, HAS_ZEROS,
                                            BLOCK_N, BLOCK_K, GROUP)
            kx = k0 + tl.arange(0, BLOCK_K)
            ok = kx < K
            y = tl.load(y_ptr + kx, mask=ok, other=0).to(tl.float32)
            h = tl.load(h_ptr + kx, mask=ok, other=0).to(tl.float32)
            w_post = tl.load(w_post_ptr + kx, mask=ok, other=0).to(tl.float32)
            w_pre = tl.load(w_pre_ptr + kx, mask=ok, other=0).to(tl.float32)
            h1 = rounded(h + rounded(y * r1 * w_post, dtype), dtype)
            sq += h1 * h1
            if tl.program_id(0) == 0:
                tl.store(h_out_ptr + kx, h1.to(dtype), mask=ok)
            even, odd, sx, qsum = _quantize_values(h1 * w_pre, BLOCK_K, 32)
            acc += _q8_dot(words, s, z, even, odd, sx, qsum, HAS_ZEROS, BLOCK_N, BLOCK_K, GROUP, ASM)
        r2 = tl.math.rsqrt(tl.sum(sq, axis=0) / K + eps_pre)
        tl.store(out_ptr + rows, (tl.sum(acc, axis=1) * r2).to(dtype), mask=row_ok)


def bench_norm_prologue(copies: int = 8) -> list:
    """What the add_norms kernel between a decode step's o and gate/up GEMVs costs in a chain of the three, and what
    a GEMV taking the norms into its own programs (_norm_prologue_kernel) would save, before the engine is built to
    do it: in one CUDA graph over `copies` distinct weight sets (> L2, as a decode step meets them), us a link:
    - apart: o GEMV, add_norms, gate/up GEMV (the engine's decode step);
    - prologue: o GEMV, the gate/up GEMV with the norms in its programs;
    - no norm: o GEMV, gate/up GEMV on o's output (what no norm at all would cost: the bound for any fusion).
    Also the prologue's gate/up output and residual against the engine's (relative error)."""
    from gemma4_agent.model.network import RMSNorm
    from gemma4_agent.pdl import pdl_args

    o_mods, gu_mods = int4_copies(3840, 4096, copies), int4_copies(30720, 3840, copies)
    post, pre = (RMSNorm(3840).cuda().to(torch.bfloat16) for _ in range(2))
    with torch.no_grad():
        post.weight.uniform_(0.5, 1.5)
        pre.weight.uniform_(0.5, 1.5)
    attn = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(1, 3840, device="cuda", dtype=torch.bfloat16) * 20
    eps = 1e-6

    def int4(x, mod):
        return torch.ops.gemma4_agent.int4_matmul(x, mod.qweight, mod.scales, None, 32)

    def prologue(y, mod):
        out, h1 = torch.empty(1, 30720, device="cuda", dtype=y.dtype), torch.empty_like(h)
        s = mod.scales.view(torch.float16)
        _norm_prologue_kernel[lambda meta: (triton.cdiv(30720, meta["BLOCK_N"]),)](
            y, h, post.weight, pre.weight, h1, mod.qweight.view(torch.int32), s, s, out, 30720, 3840, 3840 // 8,
            3840 // 32, eps, eps, GROUP=32, HAS_ZEROS=False, ROW=4096, ASM=True, **pdl_args(y))
        return out, h1

    def apart(i):
        h1, x = torch.ops.gemma4_agent.add_norms(h, int4(attn, o_mods[i]), post.weight, pre.weight, None, eps, eps)
        return int4(x, gu_mods[i]), h1

    variants = {"apart": apart, "prologue": lambda i: prologue(int4(attn, o_mods[i]), gu_mods[i]),
                "no norm": lambda i: (int4(int4(attn, o_mods[i]), gu_mods[i]), h)}
    (ref, ref_h), (got, got_h) = apart(0), variants["prologue"](0)
    row = {"rel_err_gate_up": float((got.float() - ref.float()).norm() / ref.float().norm()),
           "rel_err_residual": float((got_h.float() - ref_h.float()).norm() / ref_h.float().norm())}
    for name, fn in variants.items():
        fn(0)  # autotuned and compiled before the capture
        row[f"{name}_us"] = graph_ms(lambda: [fn(i) for i in range(copies)], copies) * 1e3
    print(json.dumps(row), flush=True)
    return [row]


def bench_timing() -> list:
    import triton.testing

    from gemma4_agent import fastest

    rows = []
    for name, out, inp in SHAPES[:4]:
        mod = int4_copies(out, inp, 1)[0]
        x = torch.randn(1, inp, device="cuda", dtype=torch.bfloat16)
        row = {"shape": name}
        for path in ("gemv", "gemv_q8"):
            def run():
                triton_q4._launch(x, mod.qweight, mod.scales, None, 32, path)
            run()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(200):
                run()
            row[path + "_host_us"] = (time.perf_counter() - start) / 200 * 1e6
            torch.cuda.synchronize()
            row[path + "_do_bench_us"] = [triton.testing.do_bench(run, warmup=5, rep=20, return_mode=m) * 1e3
                                          for m in ("mean", "median")]
            row[path + "_kernel_us"] = [fastest.kernel_ms(run) * 1e3 for _ in range(2)]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def six_layer_config() -> ModelConfig:
    d = json.loads(PRESET.read_text())
    d["text_config"]["num_hidden_layers"] = 6
    d["text_config"].pop("layer_types", None)
    path = Path(tempfile.mkdtemp()) / "config.json"
    path.write_text(json.dumps(d))
    return ModelConfig.from_json(path)


def six_layer_model(scheme):
    """The 6-layer model on the GPU in bf16, its decoder and tied embedding in `scheme` (packed, portable weights
    released) or left in bf16 (None)."""
    model = build_model(six_layer_config(), device="cuda", dtype=torch.bfloat16)
    if scheme:
        quantize_model(model, scheme, include_embedding=True, progress=False)
        to_device_kernel(model, "cuda", release_portable=True)
    return model


# (scheme, joined projections)
VARIANTS = [(None, False), (None, True), ("q4_0", False), ("q4_0", True)]


def bench_engine(out_dir: Path, frames: int, tokens: int) -> list:
    # every session compiles its own chunk lengths into the one code object: room for all of them
    torch._dynamo.config.recompile_limit = 64
    rows = []
    profiles = []  # taken once every variant is timed (run_bench's profile_later)
    model, built = None, "nothing"
    for scheme, join in VARIANTS:
        if built != scheme or not join:  # joining mutates the model: a separate-projection run needs a fresh one
            del model
            torch.cuda.empty_cache()
            model = six_layer_model(scheme)
            built = scheme if join else "nothing"
        tag = f"{scheme or 'bf16'}_{'joined' if join else 'separate'}"
        t0 = time.time()
        r = run_bench("six-layer", "cuda", frames, tokens, 12, "prefix", 600, "bfloat16", warmup=3, model=model,
                      compile=True, join_projections=join, profile_to=out_dir / f"profile_6layer_{tag}.txt",
                      profile_later=profiles)
        row = {"variant": tag, "layers": 6, "image_tokens": tokens, "per_frame_ms_p50": r["per_frame_ms"]["p50"],
               "prefill_ms_p50": r["prefill_ms_p50"], "decode_ms_per_token_p50": r["decode_ms_per_token_p50"],
               **{k: r.get(k) for k in ("decode_graph_ms_per_token", "decode_graph_synced_ms_per_token",
                                        "decode_host_wait_ms_per_token")},
               "no_hot_path_allocation": r.get("no_hot_path_allocation"), "wall_s": time.time() - t0}
        print(json.dumps(row), flush=True)
        rows.append(row)
    for take_profile in profiles:
        take_profile()
    return rows


# what each ablation replaces in the model (gemma4_agent.model.network), by name: the small kernels between a decode
# step's GEMVs left out, their outputs wrong but every GEMV, and so the weight traffic, unchanged
ABLATIONS = {
    "none": {},
    "norms": {"add_and_norm": lambda h, y, post, pre, scale=None: (h, y)},
    "gate": {"gelu_mul": lambda gate, up: gate},
    "attention": {"sdpa": lambda q, k, v, mask: q},
}
ABLATIONS["all three"] = {k: v for d in list(ABLATIONS.values()) for k, v in d.items()}


def six_layer_decode(model, frames: int, tokens: int, switch, **kwargs) -> dict:
    """run_bench on the 6-layer model, compiled afresh with `switch` (a context manager: patches, or nothing) in force
    while it compiles and runs."""
    torch._dynamo.reset()
    with switch:
        return run_bench("six-layer", "cuda", frames, tokens, 12, "prefix", 600, "bfloat16", warmup=3, model=model,
                         compile=True, **kwargs)


def bench_ablation(frames: int, tokens: int) -> list:
    """The decode step of the 6-layer int4 model (joined projections, compiled, graphed) with each kind of small
    kernel left out (ABLATIONS), decode ms a token as the GPU alone runs it (the step's graph replayed back to back):
    what each kind costs where it sits, between the GEMVs, which no kernel timed alone shows. With attention left
    out, o's input is q as it comes (the cache is still written)."""
    from contextlib import nullcontext
    from unittest import mock

    from gemma4_agent.model import network

    torch._dynamo.config.recompile_limit = 64
    model = six_layer_model("q4_0")
    rows = []
    for name, replaced in ABLATIONS.items():
        r = six_layer_decode(model, frames, tokens, mock.patch.multiple(network, **replaced) if replaced
                             else nullcontext())
        row = {"left out": name, "layers": 6, "decode_graph_ms_per_token": r.get("decode_graph_ms_per_token"),
               "decode_ms_per_token_p50": r["decode_ms_per_token_p50"]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def bench_step(frames: int, tokens: int, reps: int = 2) -> list:
    """The 6-layer int4 step as the engine runs it (compiled, graphed), replayed ms a token, `reps` times."""
    from contextlib import nullcontext

    import gemma4_agent

    torch._dynamo.config.recompile_limit = 64
    model = six_layer_model("q4_0")
    rows = []
    for rep in range(reps):
        r = six_layer_decode(model, frames, tokens, nullcontext())
        row = {"rep": rep, "package": gemma4_agent.__file__,
               **{k: r.get(k) for k in ("decode_graph_ms_per_token", "decode_ms_per_token_p50", "prefill_ms_p50",
                                        "no_hot_path_allocation")}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def bench_pdl(out_dir: Path, frames: int, tokens: int) -> list:
    """The 6-layer int4 model's decode step launched with PDL (as the engine runs) and without (every kernel waits
    for the one before to complete, gemma4_agent.pdl switched off): replayed ms a token, and a frame's kernel
    profile each. Without PDL a kernel's profiled duration is its own GPU time; with PDL it also counts the time
    its programs spend waiting for the kernel before. The second variant is timed after the first one's profile
    (each profile must run under its own switch), which leaves CUPTI attached (run_bench): compare the replayed
    GPU times, not the host's."""
    from contextlib import nullcontext
    from unittest import mock

    from gemma4_agent import pdl

    torch._dynamo.config.recompile_limit = 64
    model = six_layer_model("q4_0")
    rows = []
    for name, switch in (("pdl", nullcontext()), ("no_pdl", mock.patch.object(pdl, "_sm90_or_later", lambda i: False))):
        r = six_layer_decode(model, frames, tokens, switch, profile_to=out_dir / f"profile_6layer_int4_{name}.txt")
        row = {"variant": name, **{k: r.get(k) for k in ("decode_graph_ms_per_token", "decode_ms_per_token_p50",
                                                          "prefill_ms_p50")}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


@triton.jit
def _grid_barrier(count_ptr, target):
    # every program's stores issued, one arrival each, then spin until all have arrived (count reaches target)
    tl.debug_barrier()
    tl.atomic_add(count_ptr, 1, sem="release", scope="gpu")
    seen = tl.load(count_ptr, volatile=True)
    while seen < target:
        seen = tl.load(count_ptr, volatile=True)
    tl.debug_barrier()


@triton.jit
def _phases_kernel(count_ptr, data_ptr, phase_ptr, out_ptr, PHASES, REPS, BLOCK: tl.constexpr, BARRIER: tl.constexpr):
    # REPS times over PHASES phases: each program streams its share of the phase's data (phase_ptr: int32 elements a
    # program, a multiple of BLOCK), then, with BARRIER, waits for every program at a grid-wide barrier
    pid = tl.program_id(0)
    n = tl.num_programs(0)
    acc = tl.zeros((BLOCK,), tl.int32)
    base = 0
    done = 0
    for rep in range(REPS):
        for p in range(PHASES):
            elems = tl.load(phase_ptr + p)
            for off in range(0, elems, BLOCK):
                acc += tl.load(data_ptr + base + pid * elems + off + tl.arange(0, BLOCK))
            base += n * elems
            done += 1
            if BARRIER:
                _grid_barrier(count_ptr, done * n)
    tl.store(out_ptr + pid * BLOCK + tl.arange(0, BLOCK), acc)


def persistent_phases_us(phases_mb: list, reps: int, barrier: bool, block: int = 2048) -> tuple[float, float]:
    """One program an SM (all resident, or the barrier would never open) through `reps` x the phases: us a rep and
    the bytes a rep streams. Checked: every element read once."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    per_program = [int(mb * 1e6 / 4 / sms) // block * block for mb in phases_mb]
    total = sum(per_program) * sms * reps
    data = torch.ones(max(total, 1), dtype=torch.int32, device="cuda")
    phases = torch.tensor(per_program, dtype=torch.int32, device="cuda")
    count = torch.zeros(1, dtype=torch.int32, device="cuda")
    out = torch.empty(sms * block, dtype=torch.int32, device="cuda")

    def run():
        count.zero_()
        _phases_kernel[(sms,)](count, data, phases, out, len(per_program), reps, BLOCK=block, BARRIER=barrier,
                               num_warps=8)

    run()
    torch.cuda.synchronize()
    assert int(out.sum()) == total, (int(out.sum()), total)
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return sorted(times)[2], total * 4 / reps


# a layer of the 12B's int4 decode step as phases (MB of weights streamed): q/k/v, q/k norms, attention, o, gate/up,
# down, the residual norms; a kernel boundary now between each
LAYER_PHASES_MB = [17.7, 0, 0, 8.8, 66.4, 33.2, 0]


def bench_barrier(ceilings: dict) -> list:
    rows = []
    us, _ = persistent_phases_us([0.0], 2000, True)
    rows.append({"what": "grid barrier alone (2000 empty phases)", "us_per_barrier": us})
    print(json.dumps(rows[-1]), flush=True)
    for barrier in (False, True):
        us, nbytes = persistent_phases_us(LAYER_PHASES_MB, 16, barrier)
        rows.append({"what": "layer phases streamed", "barriers": len(LAYER_PHASES_MB) if barrier else 0,
                     "us_per_layer": us, "mb_per_layer": nbytes / 1e6,
                     "copy_bandwidth_us": nbytes / (ceilings["copy_bandwidth_gbs"] * 1e9) * 1e6})
        print(json.dumps(rows[-1]), flush=True)
    return rows


STREAM_TILE = (32, 256)  # int32 words a tile (32 KB): TMA's largest box side


@triton.jit
def _stream_kernel(ptr, desc, res, ROWS, COLS, G, BR: tl.constexpr, BC: tl.constexpr, TMA: tl.constexpr,
                   STAGES: tl.constexpr):
    # tiles t = p, p + G, ... of the int32 [ROWS, COLS] at ptr (or through desc: TMA) XOR-reduced, a result a program
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


def bench_stream(ceilings: dict) -> list:
    from triton.tools.tensor_descriptor import TensorDescriptor

    rows_n, cols = 786_432, 2048  # 6.4 GB, about a 12B int4 step's weights
    br, bc = STREAM_TILE
    buf = torch.randint(0, 1 << 30, (rows_n, cols), device="cuda", dtype=torch.int32)
    res = torch.zeros(4096, device="cuda", dtype=torch.int32)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tiles = (rows_n // br) * (cols // bc)
    desc = TensorDescriptor.from_tensor(buf, [br, bc])
    # (label, programs, warps, TMA, stages)
    variants = [("plain, one tile a program", tiles, 4, False, 1)]
    variants += [(f"plain, {sms} programs", sms, w, False, st) for w in (8, 16) for st in (1, 3)]
    variants += [(f"TMA, {sms} programs", sms, w, True, st) for w in (4, 8) for st in (2, 4, 6)]
    rows = []
    for label, programs, warps, tma, stages in variants:
        row = {"variant": label, "warps": warps, "stages": stages}
        try:
            ms = graph_ms(lambda: _stream_kernel[(programs,)](buf, desc, res, rows_n, cols, programs, BR=br, BC=bc,
                                                              TMA=tma, STAGES=stages, num_warps=warps), 1)
            row.update(ms=ms, of_copy_bandwidth=buf.numel() * 4 / (ms * 1e-3) / (ceilings["copy_bandwidth_gbs"] * 1e9))
        except Exception as exc:  # one variant that does not compile must not hide the others
            row["error"] = repr(exc)[:300]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


@triton.jit
def _stream_tile(qw_ptr, s_ptr, w_desc, s_desc, rb, rows, ok, k0, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 TMA: tl.constexpr):
    # weight rows rb.. (rows, ok), columns k0..k0+BLOCK_K: words, scales and zero-points as triton_q4._weight_block
    # gives them, by plain loads or by TMA (w_desc over the int32 words [N, K / 8], s_desc over the fp16 scales)
    if TMA:
        words = w_desc.load([rb, k0 // 8])
        sc = s_desc.load([rb, k0 // 32]).to(tl.float32)
        z = tl.zeros((BLOCK_N, BLOCK_K // 32), tl.float32) + 8.0
    else:
        words, sc, z = triton_q4._weight_block(qw_ptr, s_ptr, s_ptr, rows, ok, k0, K // 8, K // 32, False, BLOCK_N,
                                               BLOCK_K, 32)
    return words, sc, z


@triton.jit
def _program_rows(N, G, BLOCK_N: tl.constexpr):
    # this program's rows [r0, r_end): whole row blocks, as even as G programs allow (TMA boxes do not mask rows)
    per = tl.cdiv(tl.cdiv(N, G), BLOCK_N) * BLOCK_N
    r0 = tl.program_id(0) * per
    return r0, tl.minimum(r0 + per, N)


@triton.jit
def _persistent_gemv_kernel(x_ptr, qw_ptr, s_ptr, w_desc, s_desc, y_ptr, N, K, G, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, TMA: tl.constexpr, STAGES: tl.constexpr, ASM: tl.constexpr):
    # the int8-x GEMV's arithmetic (triton_q4._q8_block) over this program's rows, tile by tile (row block, K block)
    # in one flat loop, as the persistent decode kernel of c6126e5 walks them
    r0, r_end = _program_rows(N, G, BLOCK_N)
    n_k = tl.cdiv(K, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K // 32), tl.float32)
    for t in tl.range(0, tl.cdiv(r_end - r0, BLOCK_N) * n_k, num_stages=STAGES):
        rb = r0 + (t // n_k) * BLOCK_N
        rows = rb + tl.arange(0, BLOCK_N)
        k0 = (t % n_k) * BLOCK_K
        words, sc, z = _stream_tile(qw_ptr, s_ptr, w_desc, s_desc, rb, rows, rows < r_end, k0, K, BLOCK_N, BLOCK_K,
                                    TMA)
        acc += triton_q4._q8_block(words, sc, z, x_ptr, k0, K, False, BLOCK_N, BLOCK_K, 32, ASM)
        if t % n_k == n_k - 1:
            tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=rows < r_end)
            acc = tl.zeros((BLOCK_N, BLOCK_K // 32), tl.float32)


@triton.jit
def _persistent_rows_kernel(x_ptr, qw_ptr, s_ptr, w_desc, s_desc, y_ptr, N, G, K: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TMA: tl.constexpr, STAGES: tl.constexpr,
                            ASM: tl.constexpr):
    # as _persistent_gemv_kernel with K a constant (a decode kernel knows each phase's): a row block's K blocks
    # unrolled and its row sums once after them, so no division, remainder or cross-lane sum a tile (the flat
    # loop's 3.4-3.6 SASS instructions a weight against the engine GEMV's 1.6-2.0, sm_90), row blocks pipelined
    r0, r_end = _program_rows(N, G, BLOCK_N)
    for rb in tl.range(r0, r_end, BLOCK_N, num_stages=STAGES):
        rows = rb + tl.arange(0, BLOCK_N)
        ok = rows < r_end
        acc = tl.zeros((BLOCK_N, BLOCK_K // 32), tl.float32)
        for k0 in tl.static_range(0, K, BLOCK_K):
            words, sc, z = _stream_tile(qw_ptr, s_ptr, w_desc, s_desc, rb, rows, ok, k0, K, BLOCK_N, BLOCK_K, TMA)
            acc += triton_q4._q8_block(words, sc, z, x_ptr, k0, K, False, BLOCK_N, BLOCK_K, 32, ASM)
        tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=ok)


def persistent_gemv(x, qweight, scales, programs: int, block_n: int, block_k: int, tma: bool, stages: int,
                    num_warps: int = 8, rows_loop: bool = False):
    """x [1, K] @ the q4_0 weight [N, K/2] (uint8) with its scales (int16 fp16 bits), by _persistent_gemv_kernel
    (rows_loop: _persistent_rows_kernel): y [1, N] (on CPU tensors in Triton's interpreter)"""
    n, k = qweight.shape[0], x.shape[1]
    words, s = qweight.view(torch.int32), scales.view(torch.float16)
    y = torch.empty(1, n, device=x.device, dtype=x.dtype)
    w_desc = s_desc = None
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        w_desc = TensorDescriptor.from_tensor(words, [block_n, block_k // 8])
        s_desc = TensorDescriptor.from_tensor(s, [block_n, block_k // 32])
    meta = dict(BLOCK_N=block_n, BLOCK_K=block_k, TMA=tma, STAGES=stages, ASM=x.is_cuda, num_warps=num_warps)
    if rows_loop:
        _persistent_rows_kernel[(programs,)](x, words, s, w_desc, s_desc, y, n, programs, K=k, **meta)
    else:
        _persistent_gemv_kernel[(programs,)](x, words, s, w_desc, s_desc, y, n, k, programs, **meta)
    return y


def bench_persistent_gemv(ceilings: dict) -> list:
    """The 12B's one-row products: the engine's int8-x GEMV against its tile loop in one program an SM (the flat loop
    of _persistent_gemv_kernel and the row-block loop of _persistent_rows_kernel), plain or TMA-fed, us a call over
    weight sets past L2, each's relative error against the int8-x product's reference."""
    bw = ceilings["copy_bandwidth_gbs"] * 1e9
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    variants = {"engine gemv_q8": None}
    for block_n, block_k in ((16, 2048), (32, 1024)):
        variants[f"plain {block_n}x{block_k}"] = dict(block_n=block_n, block_k=block_k, tma=False, stages=1)
        variants.update({f"TMA {block_n}x{block_k} stages {st}": dict(block_n=block_n, block_k=block_k, tma=True,
                                                                       stages=st) for st in (2, 3, 4)})
    # the row-block loop (K unrolled), fed either way
    for block_n, block_k, warps in ((16, 1024, 4), (32, 1024, 8), (64, 512, 4)):
        variants.update({f"rows {'TMA' if tma else 'plain'} {block_n}x{block_k} {warps} warps":
                         dict(block_n=block_n, block_k=block_k, tma=tma, stages=3, num_warps=warps, rows_loop=True)
                         for tma in (False, True)})
        if warps == 4:  # and two programs an SM (a decode kernel's programs must all be resident: 2 x 4 warps fit)
            variants[f"rows TMA {block_n}x{block_k} 4 warps, 2 programs an SM"] = dict(
                block_n=block_n, block_k=block_k, tma=True, stages=3, num_warps=4, rows_loop=True, per_sm=2)
    rows = []
    for name, out, inp in SHAPES:
        nbytes = out * inp // 2 + out * inp // 32 * 2
        mods = int4_copies(out, inp, max(1, min(16, (400 << 20) // nbytes)))
        x = torch.randn(1, inp, device="cuda", dtype=torch.bfloat16)
        ref = triton_q4.round_x_int8(x).float() @ mods[0].dequantize(torch.float32).t()
        for label, cfg in variants.items():
            def run(m, cfg=cfg):
                if cfg is None:
                    return triton_q4._launch(x, m.qweight, m.scales, None, 32, "gemv_q8")
                cfg = dict(cfg)
                return persistent_gemv(x, m.qweight, m.scales, sms * cfg.pop("per_sm", 1), **cfg)
            row = {"shape": name, "variant": label}
            try:
                row["rel_err"] = float((run(mods[0]).float() - ref).norm() / ref.norm())  # (autotunes the engine's)
                row["us"] = graph_ms(lambda: [run(m) for m in mods], len(mods)) * 1e3
                row["of_copy_bandwidth"] = nbytes / (row["us"] * 1e-6) / bw
            except Exception as exc:  # one variant that does not compile must not hide the others
                row["error"] = repr(exc)[:300]
            print(json.dumps(row), flush=True)
            rows.append(row)
        del mods
    return rows


def bench_gluon_gemm(ceilings: dict, row_counts=(286, 76)) -> list:
    """The Gluon int4 GEMM (gemma4_agent/quant/gluon_q4.py) per 12B shape at a frame's prefill rows, each
    configuration of gluon_q4.configs_for (those not yet in the engine too) and the register operand waiting for each
    step's wgmmas (the twenty-third session's form, for comparison), against what the engine's int4_matmul picks
    (engine_pick, among its other paths and its configurations) and bf16 cuBLAS: us a matmul in a CUDA graph, the
    kernel alone (x permuted before, for the register operand) and with x's permutation, its relative error against
    dequantize + matmul; then ms a frame summed over the layers, the best right configuration per shape."""
    from gemma4_agent.quant import gluon_q4 as gq

    rows = []
    for m in row_counts:
        for name, out, inp in SHAPES:
            mod = int4_copies(out, inp, 1)[0]
            x = torch.randn(m, inp, device="cuda", dtype=torch.bfloat16)
            xp = gq.permuted(x)
            want = x.float() @ mod.dequantize(torch.float32).t()
            row = {"shape": name, "rows": m,
                   "ideal_matmul_us": 2 * m * out * inp / (ceilings["matmul_tflops"] * 1e12) * 1e6}
            torch.ops.gemma4_agent.int4_matmul(x, mod.qweight, mod.scales, None, 32)  # picks its path
            row["engine_pick"] = [pick for key, pick in triton_q4._CHUNK.picks.items()
                                  if key[:3] == (out, inp, 1 << (m - 1).bit_length())]
            row["engine_us"] = graph_ms(lambda: torch.ops.gemma4_agent.int4_matmul(x, mod.qweight, mod.scales, None,
                                                                                   32), 1) * 1e3
            w = torch.randn(out, inp, device="cuda", dtype=torch.bfloat16)
            row["bf16_cublas_us"] = graph_ms(lambda: x @ w.t(), 1) * 1e3
            row["gluon"] = {}
            # each: (key, the call, the call permuting x first where its form reads x permuted, else None)
            t = gq.tail_for(m)
            regs = (256, 64, 2, 2, t) if t else (64, 64, 3, 2, 0)
            ways = [(config, gemm, None) for config, gemm in gq.configs_for(m, unmeasured=True).items()] + [
                ("regs " + "x".join(map(str, regs)), functools.partial(gq.q4_gemm, *regs, x_permuted=xp),
                 functools.partial(gq.q4_gemm, *regs))]
            for key, gemm, gemm_permuting in ways:
                try:
                    y = gemm(x, mod.qweight, mod.scales)
                    torch.cuda.synchronize()
                    err = ((y.float() - want).norm() / want.norm()).item()
                    alone = graph_ms(lambda: gemm(x, mod.qweight, mod.scales), 1)
                    permuted = alone if gemm_permuting is None else graph_ms(
                        lambda: gemm_permuting(x, mod.qweight, mod.scales), 1)
                    row["gluon"][key] = {"us": alone * 1e3, "with_permutation_us": permuted * 1e3, "rel_err": err}
                except Exception as exc:  # one configuration failing (compile, launch) must not hide the others
                    row["gluon"][key] = {"error": repr(exc)[:300]}
            ok = {k: v for k, v in row["gluon"].items() if "us" in v and v["rel_err"] < 1e-2}
            if ok:
                best = min(ok, key=lambda k: ok[k]["us"])
                row.update(gluon_best=best, gluon_us=ok[best]["us"],
                           gluon_with_permutation_us=ok[best]["with_permutation_us"])
            print(json.dumps(row), flush=True)
            rows.append(row)
            del mod, w
        of_m = [r for r in rows if r["rows"] == m]
        ways = [k for k in ("ideal_matmul_us", "engine_us", "bf16_cublas_us", "gluon_us", "gluon_with_permutation_us")
                if all(k in r for r in of_m)]
        print(json.dumps({"rows": m, "ms_a_frame": {w: sum(r[w] * LAYERS_OF[r["shape"]] for r in of_m) / 1e3
                                                    for w in ways}}), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--parts", nargs="+", default=["gemv", "prefill", "engine"])
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--image-tokens", type=int, default=280)
    parser.add_argument("--slots", type=int, default=982, help="--parts attention: the cache's slots")
    parser.add_argument("--prefill-rows", type=int, nargs="+", default=[286, 76, 8, 4], help="--parts prefill: rows")
    parser.add_argument("--baseline", help="a previous triton_q4.py whose GEMV is timed beside the current one")
    args = parser.parse_args()
    out = Path(args.out)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "ceilings": measure_ceilings("cuda")}
    print(json.dumps(report), flush=True)
    for part in args.parts:
        if part == "gemv":
            report["gemv"] = bench_gemv(report["ceilings"], load_baseline(args.baseline) if args.baseline else None)
        elif part == "prefill":
            report["prefill"] = bench_prefill(report["ceilings"], args.prefill_rows)
        elif part == "chunk_gemm":
            report["chunk_gemm"] = bench_chunk_gemm()
        elif part == "register_cap":
            report["register_cap"] = bench_register_cap(report["ceilings"])
        elif part == "small_tiles":
            report["small_tiles"] = bench_small_tiles(report["ceilings"])
        elif part == "chunked_dequant":
            report["chunked_dequant"] = bench_chunked_dequant()
        elif part == "overlap":
            report["overlap"] = bench_overlap(report["ceilings"])
        elif part == "attention":
            report["attention"] = bench_attention(args.slots)
        elif part == "norms":
            report["norms"] = bench_norms()
        elif part == "timing":
            report["timing"] = bench_timing()
        elif part == "norm_prologue":
            report["norm_prologue"] = bench_norm_prologue()
        elif part == "ablation":
            report["ablation"] = bench_ablation(args.frames, args.image_tokens)
        elif part == "engine":
            report["engine"] = bench_engine(out, args.frames, args.image_tokens)
        elif part == "pdl":
            report["pdl"] = bench_pdl(out, args.frames, args.image_tokens)
        elif part == "step":
            report["step"] = bench_step(args.frames, args.image_tokens)
        elif part == "barrier":
            report["barrier"] = bench_barrier(report["ceilings"])
        elif part == "stream":
            report["stream"] = bench_stream(report["ceilings"])
        elif part == "persistent_gemv":
            report["persistent_gemv"] = bench_persistent_gemv(report["ceilings"])
        elif part == "gluon_gemm":
            report["gluon_gemm"] = bench_gluon_gemm(report["ceilings"], args.prefill_rows)
        (out / "gpu_decode_kernels.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
