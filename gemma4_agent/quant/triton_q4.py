"""CUDA int4 matmul on the portable layout itself (Triton), so the weights sit in GPU memory once, at
4.5 bits a weight for q4_0 (tinygemm needs its own packing with bf16 scale *and* zero per group: 5 bits,
plus the portable copy until it is released).

Chosen by the number of rows of x:
    gemv     (one row: the decode step)  each program reduces BLOCK_N weight rows over all of K; weights stream
             once from memory, which is the whole cost at batch 1, if the arithmetic per weight keeps up.
    gemv_q8  the same with x rounded to int8 per 32 values in the kernel and integer dot products (dp4a): 1.5-2
             instructions a weight in the loop instead of ~3.5, 1.07-1.45x faster at the 12B's shapes (H200); x's
             rounding costs ~0.5% of the output. Its autotuner may also split K over 2-4 programs a row block for
             the 3840-row outputs, the last to finish summing the partials in order. Timed against gemv per shape
             on first use.
    gemm     x tiles times weight tiles dequantized in registers, on the tensor cores (tl.dot); where its tiles
             would leave SMs idle, its autotuner may also split K over 2-4 programs a tile, as the int8-x GEMV.
    dequant  the weight dequantized once into a transient bf16 buffer, then cuBLAS: compute-bound work goes to the
             best matmul there is.
    gemm_wide  the same GEMM with all the rows of x in each program (up to 256 + 64: a frame's prefill), so each
             weight tile is dequantized once, not once per 16-128-row tile of x.
    rows     one gemv per row: a few rows of a matrix that stays in L2 between them.
    gluon_*  on sm_90 for q4_0 and bf16 x (gluon_q4.py): the weight tile dequantized into shared memory for wgmma,
             whose MMAs run while the next tile is dequantized; the tilings measured on a GPU (gluon_q4.configs_for),
             among them one program for all of a 280-token frame's rows (256 and a tail).
Above MEASURED_MAX_ROWS: dequant. Otherwise the fastest candidate at that shape and power of two of rows, timed on
this GPU on first use: gemv and gemv_q8 at one row, rows, gemm and dequant at 2-16 rows (jump-forward chunks),
gemm, gemm_wide (up to 320 rows), gluon_* (sm_90, q4_0) and dequant at 17-512 (a frame's prefill at 70-280 image
tokens). The dequantization writes 4x the int4 bytes whatever the row count, which the GEMMs save and pay back in
slower arithmetic as rows grow; none wins everywhere (H100, BENCHMARKS.md: at 286 rows the wide GEMM is fastest on
down and the full layers' o, dequant + cuBLAS on o, Gluon on q/k/v, gate/up and the full layers' q/k).
w = (q - z) * s, z = 8 for q4_0, s fp16 per group; fp32 accumulation.

Exposed as the custom op `gemma4_agent::int4_matmul` so torch.compile treats it as one opaque call and
CUDA-graph capture records the launched kernels (autotuning happens on the first, uncaptured call).
"""
import functools
import inspect
from typing import Optional

import torch

from ..fastest import FastestOf
from ..pdl import pdl_args, wait_then_release
from ..triton_env import available, tl, triton  # available: this module's too

ROWS_MAX_ROWS = 16  # up to here, one GEMV per row is a candidate too
MEASURED_MAX_ROWS = 512  # up to here: the fastest candidate, timed; above: dequantize + cuBLAS
MAX_SPLIT = 4  # of K, in the int8-x GEMV and the GEMM (their SPLIT configurations)
SPLIT_MAX_BLOCKS = 1024  # row blocks (GEMV) or tiles (GEMM) up to which K may be split: an arrival count each
SPLIT_MAX_OUTPUTS = 1 << 21  # outputs up to which the GEMM may split K (partials: MAX_SPLIT x 8 MB at most)
WIDE_MAX_ROWS, WIDE_MAX_TAIL = 256, 64  # rows of x one wide GEMM program takes: wgmma's widest, and a tail
CHUNK_ROWS = 16  # rows up to which the GEMM also tries its wide-K configurations (jump-forward chunks)
PIPELINED_MAX_ROWS = 128  # rows up to which the GEMM also tries a 4-stage pipeline (a 70-token frame, chunks)


if triton is not None:
    # autotuning picks kept on disk across processes (Triton >= 3.4): a restarted node does not time every
    # configuration again
    _AUTOTUNE_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters \
        else {}

    def _gemv_configs():
        # At one row the work is streaming bytes while keeping the arithmetic per weight small enough to keep
        # up (the SM issues ~4 instructions per weight at full HBM speed). 128-256 weights per thread per block:
        # enough 16-byte loads in flight per SM without running out of registers.
        return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
                for bn in (4, 8, 16, 32, 64) for bk in (256, 512, 1024, 2048, 4096) for w in (1, 2, 4, 8)
                if 128 <= bn * bk // (32 * w) <= 256]

    def _prune_gemv(configs, named_args, **kwargs):
        # whole groups per block; no block wider than K rounded up to a power of two (K may be small: tiny models)
        k = named_args["K"]
        ok = [c for c in configs if c.kwargs["BLOCK_K"] % kwargs["GROUP"] == 0 and c.kwargs["BLOCK_K"] // 2 < k]
        return ok or [triton.Config({"BLOCK_N": 4, "BLOCK_K": max(kwargs["GROUP"], 256)}, num_warps=1)]

    def _bench_in_graph(kernel_call, quantiles):
        # a GEMM over a few rows takes microseconds, less than a launch from Python: time it inside a CUDA
        # graph, or every configuration measures the same launch overhead
        return triton.testing.do_bench_cudagraph(kernel_call, rep=10, quantiles=quantiles)

    def _bench_from_hbm(kernel_call, quantiles):
        # The decode step streams every weight from HBM once, but a timing loop over one matrix of < 50 MB
        # reads it from L2 and picks the configuration best for L2 (measured on H200: 1.3x slower from HBM for
        # the 12B's down projection). So L2 is flushed before every run; the flush (a 256 MB write) outlasts
        # the launch from Python, which is thus hidden from the timing.
        return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)

    @triton.jit
    def _load_scales(s_ptr, z_ptr, rows, row_ok, g0, K_GROUPS, HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr,
                     G: tl.constexpr):
        # scales and zero-points [BLOCK_N, G] of groups g0..g0+G-1: one load per group, broadcast over it by the
        # caller (gathering one per element cost a load per weight and, in the GEMM, spilled registers)
        gc = g0 + tl.arange(0, G)
        g_ok = row_ok[:, None] & (gc < K_GROUPS)[None, :]
        g_off = rows[:, None] * K_GROUPS + gc[None, :]
        s = tl.load(s_ptr + g_off, mask=g_ok, other=0).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(z_ptr + g_off, mask=g_ok, other=0).to(tl.float32)
        else:
            z = tl.zeros((BLOCK_N, G), dtype=tl.float32) + 8.0
        return s, z

    @triton.jit
    def _weight_block(qw_ptr, s_ptr, z_ptr, rows, row_ok, k0, K_WORDS, K_GROUPS, HAS_ZEROS: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
        # the packed words [BLOCK_N, BLOCK_K / 8] of columns k0..k0+BLOCK_K-1 and their groups' scales and zeros
        wc = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        words = tl.load(qw_ptr + rows[:, None] * K_WORDS + wc[None, :],
                        mask=row_ok[:, None] & (wc < K_WORDS)[None, :], other=0)
        s, z = _load_scales(s_ptr, z_ptr, rows, row_ok, k0 // GROUP, K_GROUPS, HAS_ZEROS, BLOCK_N, BLOCK_K // GROUP)
        return words, s, z

    # A nibble q becomes a float without an int->float conversion (quarter rate on the SM): (copy & mask) | magic,
    # one LOP3, reads as v = 1 + q * 2^(p - 23), the nibble at bit p of the mantissa under the exponent bits of 1.0.
    # `magic` (0x3F800000) is passed in a register: with two immediates ptxas emits two instructions. Element i of a
    # word (bits 4i..4i+3) is read from a copy shifted to put it at p = 4 i + 11 - 12 (i // 3), in 11..19 (three
    # copies a word): high enough that the 1 in v costs little rounding where v is summed (see _dot_words).
    @triton.jit
    def _nibble(w, magic, i: tl.constexpr):
        if i < 3:
            copy = w << 11
        elif i < 6:
            copy = w >> 1
        else:
            copy = w >> 13
        return ((copy & (0xF << (4 * i + 11 - 12 * (i // 3)))) | magic).to(tl.float32, bitcast=True)

    @triton.jit
    def _unit(i: tl.constexpr):
        # 2^(23 - p) for element i: q = (v - 1) * _unit(i), exactly
        return 1.0 * (1 << (12 - 4 * i + 12 * (i // 3)))

    @triton.jit
    def _dot_words(words, x_ptr, k0, K, s, z, magic, HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
        # Rows of packed words [BLOCK_N, BLOCK_K / 8] (word c holds elements 8c..8c+7, element 8c+i in bits
        # 4i..4i+3) times x[k0:k0+BLOCK_K], scaled, per group: [BLOCK_N, groups]. Bound by instructions per weight
        # (the SM issues ~4 a weight at full HBM speed), so a weight costs one LOP3 (_nibble) and one FMA:
        # - x comes pre-multiplied by 2^(23 - p) (exact, a power of two), so v * x' = x' + q * x, and the x' terms
        #   (and the zero-point, 8 for q4_0) leave the sum once per group of columns, shared by every row:
        #   sum((q - z) x) = sum(v x') - sum(x') - z sum(x);
        # - an FMA per weight into a [BLOCK_N, words] accumulator, summed over a group's words only at the end.
        # The price is rounding: the accumulator carries the x' terms, 2^(23 - p) times the nibble's share; with
        # p >= 11 that is ~1e-4 relative to the result, 20x under the bf16 rounding of the output (two copies a word
        # would leave p = 7 and ~1e-3). SASS on sm_90: 9.5 instructions a weight with a 3-D nibble layout and
        # int->float conversions; 4.9-5.8 with an AND and an FADD of a 2^23 magic-number copy (2026-11-29); 4.1-4.9
        # now (test_kernels_compile.py).
        W: tl.constexpr = BLOCK_K // 8
        G: tl.constexpr = BLOCK_K // GROUP
        kx = k0 + 8 * tl.arange(0, W)
        w = words.to(tl.uint32, bitcast=True)
        acc = tl.zeros((BLOCK_N, W), dtype=tl.float32)
        xoff = tl.zeros((W,), dtype=tl.float32)  # sum(x') + z sum(x) where z is the constant 8
        xsum = tl.zeros((W,), dtype=tl.float32)
        for i in tl.static_range(8):
            xi = tl.load(x_ptr + kx + i, mask=kx + i < K, other=0).to(tl.float32)
            xs = xi * _unit(i)
            acc += _nibble(w, magic, i) * xs[None, :]
            if HAS_ZEROS:
                xoff += xs
                xsum += xi
            else:  # one FMA: (2^(23 - p) + 8) x, exact
                xoff += xi * (_unit(i) + 8.0)
        part = tl.sum(tl.reshape(acc, (BLOCK_N, G, GROUP // 8)), axis=2)
        part -= tl.sum(tl.reshape(xoff, (G, GROUP // 8)), axis=1)[None, :]
        if HAS_ZEROS:
            part -= z * tl.sum(tl.reshape(xsum, (G, GROUP // 8)), axis=1)[None, :]
        return part * s

    @triton.autotune(configs=_gemv_configs(), key=["N", "K"], prune_configs_by={"early_config_prune": _prune_gemv},
                     do_bench=_bench_from_hbm, **_AUTOTUNE_CACHE)
    @triton.jit
    def _gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, N, K, K_WORDS, K_GROUPS, GROUP: tl.constexpr,
                     HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        # one row of x times BLOCK_N weight rows per program. The row lengths come as arguments (K_WORDS = K / 8,
        # K_GROUPS = K / GROUP) so that Triton's divisibility specialisation sees them: 16-byte loads need a row
        # of words to start 16-byte aligned, which K's own divisibility by 16 does not show once divided by 8
        # (measured in the PTX: 8-byte loads).
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        # the first block of weights is asked for before the wait, while the kernel before still runs (pdl.py)
        words, s, z = _weight_block(qw_ptr, s_ptr, z_ptr, rows, row_ok, 0, K_WORDS, K_GROUPS, HAS_ZEROS, BLOCK_N,
                                    BLOCK_K, GROUP)
        wait_then_release(PDL)
        # the bits of 1.0, as a value the compiler cannot fold into an immediate (K_WORDS < 2^30): see _dot_words
        magic = ((K_WORDS >> 30) | 0x3F800000).to(tl.uint32)
        # per group until the end: one reduction across threads per program, not one per block of K
        acc = _dot_words(words, x_ptr, 0, K, s, z, magic, HAS_ZEROS, BLOCK_N, BLOCK_K, GROUP)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            words, s, z = _weight_block(qw_ptr, s_ptr, z_ptr, rows, row_ok, k0, K_WORDS, K_GROUPS, HAS_ZEROS,
                                        BLOCK_N, BLOCK_K, GROUP)
            acc += _dot_words(words, x_ptr, k0, K, s, z, magic, HAS_ZEROS, BLOCK_N, BLOCK_K, GROUP)
        tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=row_ok)

    # The GEMV with x in int8: x is quantized per 32 values (scale amax / 127) in the kernel, and eight weights
    # meet eight x values in two integer dot products (dp4a: four byte products and a sum, one instruction): the
    # loop spends 1.5-2 instructions a weight (SASS, sm_90) where the float form spends ~3.5 (a LOP3 and an FMA a
    # weight and their share of the rest), which kept the SM busier than HBM. The price is x's rounding to 8 bits
    # per group of 32: ~0.5% of the output (the scheme of llama.cpp's Q4_0 x Q8_1 on CUDA).

    def _gemv_q8_configs():
        # SPLIT > 1: each program takes 1/SPLIT of K and the last to finish sums the partials (in split order, so
        # the result does not depend on timing). For the 3840-row outputs (o, down), whose 240-480 programs of
        # whole rows leave SMs idle at the tail.
        whole = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": 1}, num_warps=w)
                 for bn in (8, 16, 32, 64) for bk in (256, 512, 1024, 2048) for w in (1, 2, 4, 8)
                 if 4 <= bn * bk // (8 * 32 * w) <= 16]
        split = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": sp}, num_warps=w)
                 for sp in (2, MAX_SPLIT) for bn in (8, 16) for bk in (1024, 2048) for w in (4, 8)
                 if 4 <= bn * bk // (8 * 32 * w) <= 16]
        return whole + split

    def _prune_gemv_q8(configs, named_args, **kwargs):
        # splitting only where whole rows give few programs, and into splits of at least one block each
        n, k = named_args["N"], named_args["K"]
        ok = [c for c in _prune_gemv(configs, named_args, **kwargs) if c.kwargs["SPLIT"] == 1
              or (triton.cdiv(n, c.kwargs["BLOCK_N"]) <= SPLIT_MAX_BLOCKS
                  and k >= c.kwargs["SPLIT"] * c.kwargs["BLOCK_K"])]
        return ok or [triton.Config({"BLOCK_N": 8, "BLOCK_K": max(kwargs["GROUP"], 128), "SPLIT": 1}, num_warps=1)]

    @triton.jit
    def _dp4a(a, b, c, ASM: tl.constexpr):
        # c + the sum over the four bytes of a times those of b, as signed 8-bit integers
        if ASM:
            return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                             is_pure=True, pack=1)
        else:  # the interpreter (no PTX): the same sum, byte by byte
            for k in tl.static_range(4):
                c += ((a << (24 - 8 * k)) >> 24) * ((b << (24 - 8 * k)) >> 24)
            return c

    @triton.jit
    def _quantize_x(x_ptr, k0, K, BLOCK_K: tl.constexpr, XG: tl.constexpr):
        # x[k0:k0+BLOCK_K] in int8 per group of XG (_quantize_values)
        kx = k0 + tl.arange(0, BLOCK_K)
        return _quantize_values(tl.load(x_ptr + kx, mask=kx < K, other=0).to(tl.float32), BLOCK_K, XG)

    @triton.jit
    def _quantize_values(x, BLOCK_K: tl.constexpr, XG: tl.constexpr):
        # float32 x [BLOCK_K] in int8 per group of XG: the bytes of elements (8c, 8c+2, 8c+4, 8c+6) of word c in
        # `even`, (8c+1, ..., 8c+7) in `odd` (the places the masked nibbles of a weight word take), the group's scale
        # and the sum of its int8 values (for the zero-point)
        W: tl.constexpr = BLOCK_K // 8
        J: tl.constexpr = BLOCK_K // XG
        x = tl.reshape(x, (J, XG))
        amax = tl.max(tl.abs(x), axis=1)
        inv = 127.0 / tl.maximum(amax, 1e-30)  # an all-zero group stays zero
        q = tl.floor(x * inv[:, None] + 0.5).to(tl.int32)
        qsum = tl.sum(q, axis=1)
        even, odd = tl.split(tl.reshape(q, (W, 4, 2)))
        place = 8 * tl.arange(0, 4)
        even = tl.sum((even & 0xFF) << place[None, :], axis=1)
        odd = tl.sum((odd & 0xFF) << place[None, :], axis=1)
        return even, odd, amax / 127.0, qsum

    @triton.jit
    def _q8_block(words, s, z, x_ptr, k0, K, HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP: tl.constexpr, ASM: tl.constexpr):
        # one block of weights (_weight_block) times x[k0:k0+BLOCK_K] rounded to int8 per group of 32: [BLOCK_N, J]
        even, odd, sx, qsum = _quantize_x(x_ptr, k0, K, BLOCK_K, 32)
        return _q8_dot(words, s, z, even, odd, sx, qsum, HAS_ZEROS, BLOCK_N, BLOCK_K, GROUP, ASM)

    @triton.jit
    def _q8_dot(words, s, z, even, odd, sx, qsum, HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, GROUP: tl.constexpr, ASM: tl.constexpr):
        # one block of weights times a block of x in int8 (_quantize_values, groups of XG): [BLOCK_N, J]
        XG: tl.constexpr = 32
        W: tl.constexpr = BLOCK_K // 8
        J: tl.constexpr = BLOCK_K // XG
        G: tl.constexpr = BLOCK_K // GROUP
        # nibbles 0, 2, 4, 6 of a word as bytes, and 1, 3, 5, 7: unsigned 0..15, so signed bytes as well
        d = _dp4a(words & 0x0F0F0F0F, tl.broadcast_to(even[None, :], (BLOCK_N, W)),
                  tl.zeros((BLOCK_N, W), dtype=tl.int32), ASM)
        d = _dp4a((words >> 4) & 0x0F0F0F0F, tl.broadcast_to(odd[None, :], (BLOCK_N, W)), d, ASM)
        dot = tl.sum(tl.reshape(d, (BLOCK_N, J, XG // 8)), axis=2)  # sum(q x) per x group, exact
        if GROUP > XG:  # each weight group's scale and zero-point over its x groups
            s = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, G, GROUP // XG)), (BLOCK_N, J))
            z = tl.reshape(tl.broadcast_to(z[:, :, None], (BLOCK_N, G, GROUP // XG)), (BLOCK_N, J))
        # sum((q - z) x) = sum(q x) - z sum(x), in x's int8 units, then scaled
        return (dot.to(tl.float32) - z * qsum.to(tl.float32)[None, :]) * (s * sx[None, :])

    @triton.jit
    def _sum_splits(out, offs, ok, y_ptr, part_ptr, count_ptr, counter, part_stride, SPLIT: tl.constexpr):
        # out: this program's float32 share of the outputs at offs, over its split of K (program_id(1)). SPLIT 1:
        # stored. Otherwise published in part_ptr [SPLIT, part_stride], and the last of the SPLIT programs of
        # `counter` to arrive sums the partials in split order (so the result does not depend on timing) and sets
        # the count back to zero for the next call
        if SPLIT == 1:
            tl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=ok)
        else:
            tl.store(part_ptr + tl.program_id(1) * part_stride + offs, out, mask=ok)
            tl.debug_barrier()  # every thread's partial stored before the count says so (release, GPU scope)
            arrived = tl.atomic_add(count_ptr + counter, 1, sem="acq_rel")
            if arrived == SPLIT - 1:  # the last split: the partials, in split order, past L1
                total = tl.zeros_like(out)
                for j in tl.static_range(SPLIT):
                    total += tl.load(part_ptr + j * part_stride + offs, mask=ok, other=0, cache_modifier=".cg")
                tl.store(y_ptr + offs, total.to(y_ptr.dtype.element_ty), mask=ok)
                tl.atomic_xchg(count_ptr + counter, 0)

    @triton.autotune(configs=_gemv_q8_configs(), key=["N", "K"],
                     prune_configs_by={"early_config_prune": _prune_gemv_q8}, do_bench=_bench_from_hbm,
                     **_AUTOTUNE_CACHE)
    @triton.jit
    def _gemv_q8_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, part_ptr, count_ptr, N, K, K_WORDS, K_GROUPS,
                        GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        SPLIT: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr):
        # BLOCK_N weight rows times one row of x per program over its split of K (all of it when SPLIT is 1), as
        # _gemv_kernel; x's groups (XG) divide GROUP. Splits: partials in part_ptr [SPLIT, N] (float32), arrivals
        # counted per row block in count_ptr (zero between calls: the last arrival resets it)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        k_len = tl.cdiv(K, SPLIT * BLOCK_K) * BLOCK_K  # whole blocks a split
        k_start = tl.program_id(1) * k_len
        k_end = tl.minimum(k_start + k_len, K)
        # the first block of weights is asked for before the wait, while the kernel before still runs (pdl.py);
        # a split past K (possible for some K) loads nothing and adds zero
        words, s, z = _weight_block(qw_ptr, s_ptr, z_ptr, rows, row_ok, k_start, K_WORDS, K_GROUPS, HAS_ZEROS,
                                    BLOCK_N, BLOCK_K, GROUP)
        wait_then_release(PDL)
        acc = _q8_block(words, s, z, x_ptr, k_start, K, HAS_ZEROS, BLOCK_N, BLOCK_K, GROUP, ASM)
        for k0 in range(k_start + BLOCK_K, k_end, BLOCK_K):
            words, s, z = _weight_block(qw_ptr, s_ptr, z_ptr, rows, row_ok, k0, K_WORDS, K_GROUPS, HAS_ZEROS,
                                        BLOCK_N, BLOCK_K, GROUP)
            acc += _q8_block(words, s, z, x_ptr, k0, K, HAS_ZEROS, BLOCK_N, BLOCK_K, GROUP, ASM)
        _sum_splits(tl.sum(acc, axis=1), rows, row_ok, y_ptr, part_ptr, count_ptr, tl.program_id(0), N, SPLIT)

    @triton.jit
    def _dequant_kernel(qw_ptr, s_ptr, z_ptr, w_ptr, N, K, K_BYTES, K_GROUPS, GROUP: tl.constexpr,
                        HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
                        PDL: tl.constexpr = False):
        # portable layout -> dense [N, K] in w's dtype; byte j of a row holds elements 2j (low) and 2j+1.
        # The two nibbles are interleaved back in registers so every store is one contiguous row segment. Row
        # lengths come as arguments for Triton's divisibility specialisation (16-byte loads, see _gemv_kernel).
        # PDL: the weights are loaded while the kernel before (the matmul of the previous weight, which may read
        # the buffer this one writes) finishes; the stores wait for it.
        G: tl.constexpr = 2 * BLOCK_B // GROUP
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        cols = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        p = tl.load(qw_ptr + rows[:, None] * K_BYTES + cols[None, :], mask=row_ok[:, None] & (cols < K_BYTES)[None, :],
                    other=0)
        q = tl.reshape(tl.join(p & 0xF, p >> 4), (BLOCK_N, G, GROUP)).to(tl.float32)
        s, z = _load_scales(s_ptr, z_ptr, rows, row_ok, tl.program_id(1) * G, K_GROUPS, HAS_ZEROS, BLOCK_N, G)
        wait_then_release(PDL)  # pdl.py
        w = tl.reshape((q - z[:, :, None]) * s[:, :, None], (BLOCK_N, 2 * BLOCK_B))
        kk = tl.program_id(1) * 2 * BLOCK_B + tl.arange(0, 2 * BLOCK_B)
        tl.store(w_ptr + rows[:, None] * K + kk[None, :], w.to(w_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (kk < K)[None, :])

    def _gemm_configs():
        # none spills registers on sm_90 (tested ahead of time: test_kernels_compile.py lists them). SWAP makes the
        # weight tile the MMA's first operand (y^T = W x^T): on sm_90 wgmma then reads it from the registers it was
        # dequantized in (no round trip through shared memory), and its 64-row minimum falls on the weights, so
        # chunks of under 64 rows get wgmma instead of Ampere's mma.sync (seen in the PTX, tested). SPLIT > 1: K in
        # splits summed by the last to finish (as the int8-x GEMV), for outputs whose tiles leave SMs idle: the
        # 3840-wide o and down projections of a 70-token frame or a jump-forward chunk (one or two row tiles by 30
        # column tiles, each walking all of K). Which is faster per shape and row count is the autotuner's timing,
        # on the GPU.
        plain = ((64, 64, 64, 4), (64, 128, 64, 8), (128, 128, 64, 8), (32, 128, 128, 8), (16, 64, 128, 4),
                 (16, 128, 64, 8), (16, 128, 128, 8))
        swapped = ((16, 64, 128, 4), (16, 128, 64, 4), (16, 128, 128, 4), (32, 128, 64, 4), (32, 128, 128, 8),
                   (64, 128, 64, 4), (128, 128, 64, 8))
        split_plain = ((64, 64, 64, 4), (64, 128, 64, 8), (16, 128, 128, 8))
        split_swapped = ((16, 128, 128, 4), (32, 128, 128, 8), (64, 128, 64, 8))  # 4 warps spill at SPLIT 4
        # jump-forward chunks (up to CHUNK_ROWS rows, _prune_gemm): each program's walk along K is a chain of
        # load-then-compute steps that few rows do not hide, so fewer, wider steps
        chunk = ((16, 64, 256, 4), (16, 128, 256, 8))  # (16, 64, 512, 8) spills on sm_90
        # up to PIPELINED_MAX_ROWS rows (_prune_gemm): a fourth stage of loads in flight. At a 70-token frame's 76 rows
        # each program waits on its loads more than it computes; with it the 12B's q/k/v took 27.7 us (32.7), o 18.8
        # (21.2), down 48.2 (60.3), gate/up 87.5 (88.2) (H200, one process, 2026-11-30)
        deep = ((128, 128, 64, 8),)
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SWAP": swap, "SPLIT": split},
                              num_warps=w, num_stages=stages)
                for split in (1, 2, MAX_SPLIT)
                for swap, shapes, stages in ((False, plain if split == 1 else split_plain, 3),
                                             (True, (swapped if split == 1 else split_swapped) + chunk, 3),
                                             (True, deep, 4))
                for bm, bn, bk, w in shapes]

    def _prune_gemm(configs, named_args, **kwargs):
        # splitting only where the tiles do not fill the GPU, and every split gets at least one block of K; for any
        # row count of the bucket (the pick is kept per bucket), the partials fit their buffer (see _gemm) and the
        # tiles their arrival counts
        m, n, k = named_args["M_BUCKET"], named_args["N"], named_args["K"]
        sms = torch.cuda.get_device_properties(named_args["x_ptr"].device).multi_processor_count \
            if named_args["x_ptr"].is_cuda else 1 << 30
        ok = []
        for c in configs:
            split, bm, bn, bk = (c.kwargs.get(key, 1) for key in ("SPLIT", "BLOCK_M", "BLOCK_N", "BLOCK_K"))
            if bk > 128 and m > CHUNK_ROWS:  # the chunks' configurations (_gemm_configs), not a frame's prefill
                continue
            if c.num_stages > 3 and m > PIPELINED_MAX_ROWS:  # the deep pipeline: not measured at 286 rows
                continue
            tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
            if split == 1 or (m * n <= SPLIT_MAX_OUTPUTS and tiles < sms and tiles <= SPLIT_MAX_BLOCKS
                              and k >= split * bk):
                ok.append(c)
        return ok

    def _gemm_wide_configs():
        # a warp group per 64 weight rows (the MMA's first operand, SWAP); 128-row tiles split four ways as _gemm's.
        # One program holds every row's accumulators (up to 256 + 64 of x, _gemm_wide): 128 registers a thread at 256
        return [triton.Config({"BLOCK_N": bn, "BLOCK_K": 64, "SWAP": True, "SPLIT": split}, num_warps=bn // 16,
                              num_stages=stages)
                for bn in (64, 128) for stages in (3, 4) for split in (1, 2, MAX_SPLIT)]

    def _prune_gemm_wide(configs, named_args, **kwargs):
        # as _prune_gemm, with one tile per BLOCK_N weight rows; a tile's two arrival counts (_gemm_tiles' TAIL)
        m, n, k = named_args["M_BUCKET"], named_args["N"], named_args["K"]
        sms = torch.cuda.get_device_properties(named_args["x_ptr"].device).multi_processor_count \
            if named_args["x_ptr"].is_cuda else 1 << 30
        return [c for c in configs
                if c.kwargs["SPLIT"] == 1 or (m * n <= SPLIT_MAX_OUTPUTS and triton.cdiv(n, c.kwargs["BLOCK_N"]) < sms
                                              and 2 * triton.cdiv(n, c.kwargs["BLOCK_N"]) <= SPLIT_MAX_BLOCKS
                                              and k >= c.kwargs["SPLIT"] * c.kwargs["BLOCK_K"])]

    @triton.jit
    def _weights_bf16(words, s, z, magic, i: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP: tl.constexpr, dtype: tl.constexpr):
        # element i of every word, dequantized: (q - z) s = v * S - C with S = s 2^(23 - p), C = S + z s, per group
        # and broadcast over its words; one FMA, exact in float32 (the rounding to x's dtype is the dequant
        # kernel's)
        S = s * _unit(i)
        C = S + z * s
        if BLOCK_K > GROUP:
            G: tl.constexpr = BLOCK_K // GROUP
            S = tl.reshape(tl.broadcast_to(S[:, :, None], (BLOCK_N, G, GROUP // 8)), (BLOCK_N, BLOCK_K // 8))
            C = tl.reshape(tl.broadcast_to(C[:, :, None], (BLOCK_N, G, GROUP // 8)), (BLOCK_N, BLOCK_K // 8))
        return tl.fma(_nibble(words, magic, i), S, -C).to(dtype)

    @triton.jit
    def _weight_tile(qw_ptr, s_ptr, z_ptr, rn, n_ok, k0, K_WORDS, K_GROUPS, magic, GROUP: tl.constexpr,
                     HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, dtype: tl.constexpr):
        # weight rows rn, columns k0..k0+BLOCK_K, dequantized in registers: [BLOCK_N, BLOCK_K] in dtype, joined so
        # that element 8c + i lands at column 8c + i (the innermost join pairs places 4 apart)
        G: tl.constexpr = BLOCK_K // GROUP if BLOCK_K >= GROUP else 1  # groups in a block, or one inside a group
        wc = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        words = tl.load(qw_ptr + rn[:, None] * K_WORDS + wc[None, :], mask=n_ok[:, None] & (wc < K_WORDS)[None, :],
                        other=0).to(tl.uint32, bitcast=True)
        s, z = _load_scales(s_ptr, z_ptr, rn, n_ok, k0 // GROUP, K_GROUPS, HAS_ZEROS, BLOCK_N, G)
        w = tl.join(tl.join(tl.join(_weights_bf16(words, s, z, magic, 0, BLOCK_N, BLOCK_K, GROUP, dtype),
                                    _weights_bf16(words, s, z, magic, 4, BLOCK_N, BLOCK_K, GROUP, dtype)),
                            tl.join(_weights_bf16(words, s, z, magic, 2, BLOCK_N, BLOCK_K, GROUP, dtype),
                                    _weights_bf16(words, s, z, magic, 6, BLOCK_N, BLOCK_K, GROUP, dtype))),
                    tl.join(tl.join(_weights_bf16(words, s, z, magic, 1, BLOCK_N, BLOCK_K, GROUP, dtype),
                                    _weights_bf16(words, s, z, magic, 5, BLOCK_N, BLOCK_K, GROUP, dtype)),
                            tl.join(_weights_bf16(words, s, z, magic, 3, BLOCK_N, BLOCK_K, GROUP, dtype),
                                    _weights_bf16(words, s, z, magic, 7, BLOCK_N, BLOCK_K, GROUP, dtype))))
        return tl.reshape(w, (BLOCK_N, BLOCK_K))

    @triton.jit
    def _gemm_tiles(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, part_ptr, count_ptr, M, N, K, K_WORDS, K_GROUPS, M_BUCKET,
                    GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, SWAP: tl.constexpr = False, SPLIT: tl.constexpr = 1,
                    TAIL: tl.constexpr = 0):
        # x tiles times weight tiles dequantized in registers, on the tensor cores. The dequantization is the
        # GEMV's (one LOP3 and one FMA a weight, no int->float conversion: 4.8-7.2 SASS instructions a weight in the
        # loop, and 7.3-8.9 plus a quarter-rate I2F before, sm_90), one tile per element place i of the words;
        # joined back in element order in registers, so x is loaded as it lies.
        # M tiles vary fastest, so the programs that share a weight tile run together and read it once from L2.
        # SWAP: the same product as y^T = W x^T, the weight tile first (see _gemm_configs), stored transposed.
        # SPLIT: this program's 1/SPLIT of K (program_id(1)); partials in part_ptr [SPLIT, M, N], arrivals counted
        # per tile in count_ptr (_sum_splits).
        # TAIL (SWAP only): one program takes every row of x, BLOCK_M of them and the TAIL after, each weight tile
        # dequantized once for all (_gemm_wide); a second arrival count for the tail's split partials.
        pid = tl.program_id(0)
        tiles_m = 1 if TAIL > 0 else tl.cdiv(M, BLOCK_M)
        pid_m, pid_n = pid % tiles_m, pid // tiles_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        rk = tl.arange(0, BLOCK_K)
        # the bits of 1.0, as a value the compiler cannot fold into an immediate (K_WORDS < 2^30): see _nibble
        magic = ((K_WORDS >> 30) | 0x3F800000).to(tl.uint32)
        acc = tl.zeros((BLOCK_N, BLOCK_M) if SWAP else (BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_len = tl.cdiv(K, SPLIT * BLOCK_K) * BLOCK_K  # whole blocks a split
        k_start = tl.program_id(1) * k_len
        if TAIL > 0:  # the TAIL rows after the BLOCK_M, in the same program (_gemm_wide)
            rt = BLOCK_M + tl.arange(0, TAIL)
            acc_t = tl.zeros((BLOCK_N, TAIL), dtype=tl.float32)
        for k0 in range(k_start, tl.minimum(k_start + k_len, K), BLOCK_K):
            x = tl.load(x_ptr + rm[:, None] * K + (k0 + rk)[None, :], mask=(rm < M)[:, None] & ((k0 + rk) < K)[None, :],
                        other=0)
            w = _weight_tile(qw_ptr, s_ptr, z_ptr, rn, n_ok, k0, K_WORDS, K_GROUPS, magic, GROUP, HAS_ZEROS, BLOCK_N,
                             BLOCK_K, x.dtype)
            if SWAP:
                acc = tl.dot(w, tl.trans(x), acc)
            else:
                acc = tl.dot(x, tl.trans(w), acc)
            if TAIL > 0:
                xt = tl.load(x_ptr + rt[:, None] * K + (k0 + rk)[None, :],
                             mask=(rt < M)[:, None] & ((k0 + rk) < K)[None, :], other=0)
                acc_t = tl.dot(w, tl.trans(xt), acc_t)
        if SWAP:
            acc = tl.trans(acc)
        _sum_splits(acc, rm[:, None] * N + rn[None, :], (rm < M)[:, None] & n_ok[None, :], y_ptr, part_ptr, count_ptr,
                    pid, M * N, SPLIT)
        if TAIL > 0:  # its own arrival count, past the tiles' (_gemm_wide's grid)
            _sum_splits(tl.trans(acc_t), rt[:, None] * N + rn[None, :], (rt < M)[:, None] & n_ok[None, :], y_ptr,
                        part_ptr, count_ptr, pid + tl.num_programs(0), M * N, SPLIT)

    _gemm_kernel = triton.autotune(configs=_gemm_configs(), key=["N", "K", "M_BUCKET"], do_bench=_bench_in_graph,
                                   prune_configs_by={"early_config_prune": _prune_gemm}, **_AUTOTUNE_CACHE)(_gemm_tiles)
    # BLOCK_M and TAIL follow from M (wide_rows), so the picks are kept per row count, not per power of two
    _gemm_wide_kernel = triton.autotune(configs=_gemm_wide_configs(), key=["N", "K", "M"], do_bench=_bench_in_graph,
                                        prune_configs_by={"early_config_prune": _prune_gemm_wide},
                                        **_AUTOTUNE_CACHE)(_gemm_tiles)


def _partials(m: int, n: int, device: torch.device) -> torch.Tensor:
    # the split configurations' partials, which the prunes allow only up to SPLIT_MAX_OUTPUTS outputs a bucket
    bucket = 1 << (m - 1).bit_length()
    return torch.empty((MAX_SPLIT, m, n) if bucket * n <= SPLIT_MAX_OUTPUTS else (1,), device=device,
                       dtype=torch.float32)


def _gemm(x, qweight, s, z, y, group: int, has_zeros: bool) -> None:
    m, k = x.shape
    n = qweight.shape[0]
    bucket = 1 << (m - 1).bit_length()  # autotune per power of two of the row count, not per length
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),  # noqa: E731
                         meta.get("SPLIT", 1))
    _gemm_kernel[grid](x, qweight.view(torch.int32), s, z, y, _partials(m, n, x.device), _split_counts(x.device, "gemm"),
                       m, n, k, k // 8, k // group, bucket, GROUP=group, HAS_ZEROS=has_zeros)


def wide_rows(m: int) -> Optional[tuple]:
    """(BLOCK_M, TAIL) for one program to take all m rows of x (_gemm_wide): the largest power of two up to 256, and
    the rest rounded up to one (16-64); None where the rest is more."""
    block_m = min(WIDE_MAX_ROWS, 1 << (m.bit_length() - 1))
    rest = m - block_m
    tail = 0 if rest == 0 else max(16, 1 << (rest - 1).bit_length())
    return (block_m, tail) if tail <= WIDE_MAX_TAIL else None


def _gemm_wide(x, qweight, s, z, y, group: int, has_zeros: bool) -> None:
    # the GEMM with every row of x in each program: at a frame's 286 rows the 128-row tiles dequantize each weight
    # tile three times (and pad the MMAs to 384 rows); here once, with 256 + 32 rows
    m, k = x.shape
    n = qweight.shape[0]
    block_m, tail = wide_rows(m)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT"])  # noqa: E731
    _gemm_wide_kernel[grid](x, qweight.view(torch.int32), s, z, y, _partials(m, n, x.device),
                            _split_counts(x.device, "gemm_wide"), m, n, k, k // 8, k // group, 1 << (m - 1).bit_length(),
                            GROUP=group, HAS_ZEROS=has_zeros, BLOCK_M=block_m, TAIL=tail)


def dequantize_into(qweight, s, z, w, group: int, has_zeros: bool) -> None:
    """The weight dequantized into w [N, K] (its dtype), by the kernel."""
    n, k = w.shape
    grid = (triton.cdiv(n, 8), triton.cdiv(k // 2, 256))
    _dequant_kernel[grid](qweight, s, z, w, n, k, k // 2, k // group, GROUP=group, HAS_ZEROS=has_zeros,
                          BLOCK_N=8, BLOCK_B=256, num_warps=4, **pdl_args(w))


def _dequant_matmul(x, qweight, s, z, y, group: int, has_zeros: bool) -> None:
    # dequantize once into a transient buffer (the caching allocator hands the same block back every frame) and
    # let cuBLAS do the arithmetic
    w = torch.empty(qweight.shape[0], x.shape[1], device=x.device, dtype=x.dtype)
    dequantize_into(qweight, s, z, w, group, has_zeros)
    torch.matmul(x, w.t(), out=y)


def _gemv(x, qweight, s, z, y, group: int, has_zeros: bool) -> None:
    n, k = qweight.shape[0], x.shape[1]
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _gemv_kernel[grid](x, qweight.view(torch.int32), s, z, y, n, k, k // 8, k // group, GROUP=group,
                       HAS_ZEROS=has_zeros, **pdl_args(x))


def round_x_int8(x: torch.Tensor) -> torch.Tensor:
    """x as the int8-x GEMV sees it, in torch: rounded to int8 per group of 32 along the last axis (scale amax / 127,
    floor(v + 0.5) as in the kernel). The reference for its tests and the accuracy benchmark."""
    g = x.float().reshape(*x.shape[:-1], -1, 32)
    amax = g.abs().amax(-1, keepdim=True)
    return (torch.floor(g * (127 / amax.clamp_min(1e-30)) + 0.5) * amax / 127).reshape(x.shape).to(x.dtype)


# Per device and kernel: the split kernels' arrival counts (zero between calls, reset by the kernel itself, so no
# memset a call), kept for the process as the autotuner keeps its picks. One buffer each, never replaced: CUDA
# graphs hold its address.
_SPLIT_COUNTS: dict = {}


def _split_counts(device: torch.device, kernel: str) -> torch.Tensor:
    if (device, kernel) not in _SPLIT_COUNTS:
        _SPLIT_COUNTS[device, kernel] = torch.zeros(SPLIT_MAX_BLOCKS, device=device, dtype=torch.int32)
    return _SPLIT_COUNTS[device, kernel]


def _gemv_q8(x, qweight, s, z, y, group: int, has_zeros: bool) -> None:
    n, k = qweight.shape[0], x.shape[1]
    part = torch.empty(MAX_SPLIT, n, device=x.device, dtype=torch.float32)
    counts = _split_counts(x.device, "gemv_q8")
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT"])  # noqa: E731
    # dp4a in PTX on the GPU; the interpreter (CPU tensors) sums the bytes itself
    _gemv_q8_kernel[grid](x, qweight.view(torch.int32), s, z, y, part, counts, n, k, k // 8, k // group,
                          GROUP=group, HAS_ZEROS=has_zeros, ASM=x.is_cuda, **pdl_args(x))


def _gemv_rows(x, qweight, s, z, y, group: int, has_zeros: bool) -> None:
    for i in range(x.shape[0]):
        _gemv(x[i:i + 1], qweight, s, z, y[i:i + 1], group, has_zeros)


# (N, K, rows rounded up to a power of two, zero-points?) -> the fastest path's name, timed in this process
_CHUNK = FastestOf()


@functools.lru_cache(maxsize=None)
def _gluon():
    """gluon_q4 where this Triton has Gluon, else None (imported on first use: it compiles nothing until called)."""
    try:
        from . import gluon_q4
    except ImportError:
        return None
    return gluon_q4


def gluon_usable(x: torch.Tensor, zeros: Optional[torch.Tensor], group: int) -> bool:
    """Whether the Gluon GEMM (gluon_q4.py) is a candidate for x against this weight."""
    return _gluon() is not None and _gluon().usable(x, zeros, group)


def _gluon_gemm(gemm, x, qweight, s, z, y, group: int, has_zeros: bool) -> None:
    if x.data_ptr() % 16:  # TMA reads x from a 16-byte aligned address: a view at an odd offset takes the general path
        return _dequant_matmul(x, qweight, s, z, y, group, has_zeros)
    gemm(x, qweight, s, out=y)  # one of gluon_q4.configs_for's


def _without_wrong_gluon(calls: dict, y: torch.Tensor) -> dict:
    # the first use of a shape: a Gluon configuration that fails to run or whose product strays from dequantize +
    # cuBLAS's (a Triton release it was not checked on) is not a candidate. Outside any CUDA graph: picks are made
    # before capture.
    if not any(name.startswith("gluon_") for name in calls):
        return calls
    calls["dequant"]()
    want = y.to(torch.float32, copy=True)  # y is written again by each candidate
    ok = {}
    for name, run in calls.items():
        if name.startswith("gluon_"):
            try:
                run()
                ok[name] = bool(((y.float() - want).norm() <= 1e-2 * want.norm()).item())
            except Exception:  # noqa: BLE001 (a compile or launch failure drops the candidate, not the matmul)
                ok[name] = False
    return {name: run for name, run in calls.items() if ok.get(name, True)}


def paths_for(rows: int, group: int = 32, gluon: bool = False) -> dict:
    """The interchangeable ways to multiply `rows` rows (name -> function), the untimed default first. `gluon`:
    the Gluon GEMM's configurations among them (gluon_usable)."""
    if rows == 1:
        return {"gemv": _gemv, "gemv_q8": _gemv_q8} if group % 32 == 0 else {"gemv": _gemv}
    if rows <= ROWS_MAX_ROWS:
        return {"gemm": _gemm, "dequant": _dequant_matmul, "rows": _gemv_rows}
    if rows <= MEASURED_MAX_ROWS:
        wide = {"gemm_wide": _gemm_wide} if wide_rows(rows) else {}
        glu = {name: functools.partial(_gluon_gemm, gemm)
               for name, gemm in _gluon().configs_for(rows).items()} if gluon else {}
        return {"gemm": _gemm, **wide, **glu, "dequant": _dequant_matmul}
    return {"dequant": _dequant_matmul}


def _launch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
            group: int, path: Optional[str] = None) -> torch.Tensor:
    """x @ dequant(W)^T by the fastest path for x's rows (timed on first use), or by the path named."""
    m, k = x.shape
    n = qweight.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return y
    s = scales.view(torch.float16)
    z = zeros if zeros is not None else s  # unused when HAS_ZEROS is False
    has_zeros = zeros is not None
    paths = paths_for(m, group, ROWS_MAX_ROWS < m <= MEASURED_MAX_ROWS and gluon_usable(x, zeros, group))
    calls = {p: functools.partial(f, x, qweight, s, z, y, group, has_zeros) for p, f in paths.items()}
    # rows of one power of two share a pick, but for the wide GEMM's tiles, which follow the row count itself (and
    # so do the Gluon forms' tails, gluon_q4.tail_for: the same 256 or 64 and tail wherever one is named)
    wide = (wide_rows(m),) if "gemm_wide" in calls else ()
    key = (n, k, 1 << (m - 1).bit_length(), has_zeros) + wide
    if path is None and key not in _CHUNK.picks:
        calls = _without_wrong_gluon(calls, y)
    _CHUNK.run(key, calls, path)
    return y


@torch.library.custom_op("gemma4_agent::int4_matmul", mutates_args=())
def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                group: int) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32, contiguous) @ dequant(qweight [N, K/2] uint8, scales [N, K/g] int16 fp16 bits,
    zeros [N, K/g] uint8 or None = 8)^T -> [M, N] in x's dtype."""
    return _launch(x.contiguous(), qweight, scales, zeros, group)


@int4_matmul.register_fake
def _(x, qweight, scales, zeros, group):
    return x.new_empty(x.shape[0], qweight.shape[0])
