"""Attention over the masked KV cache on CUDA (Triton): query rows against a whole cache with an arbitrary mask.

Decode steps: cuBLAS runs q k^T and p v for one step as batched GEMMs with 2-16 rows, ~30 us per layer of the
12B on H200 (measured, benchmarks/gpu_decode_kernels.py); these kernels take ~11 us. A frame's prefill: cuDNN's
fused attention with the arbitrary (image-block, window, ring) mask took 82 us per sliding layer and the
memory-efficient kernel 129 us per full layer (profile of 2026-11-29), each with too few programs (a few query rows
a program) to fill the GPU. There these kernels, SDPA and the matmul form (q k^T and p v on cuBLAS around a
masked-softmax kernel, every SM busy) are timed against each other on first use per shape (fastest.FastestOf)
and the fastest runs.

Split-K flash attention: the cache's slots are cut into splits and the query rows into blocks; each program
takes one (KV head, split, row block), computes scores on the tensor cores, a masked online softmax and its
share of p v in float32; a second kernel merges the splits. Same arithmetic as network.sdpa's matmul form, with
scores kept in float32 instead of rounded to the activation dtype.

Exposed as the custom op `gemma4_agent::cache_attention` so torch.compile keeps it as one opaque call and
CUDA-graph capture records its kernels.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..fastest import FastestOf
from ..pdl import pdl_args, wait_then_release
from ..triton_env import available, tl, triton  # available: this module's too

DECODE_ROWS = 32  # up to here (query heads per KV head x tokens) always these kernels; above, the faster
# How finely to split the cache. Few programs read long splits one tile after another (latency); many leave more
# partial results to merge. Timed on first use per (KV heads, rows, slots, dim): decode steps choose among these,
# a frame's prefill among these and PyTorch's SDPA (at 286 rows the 128-program split left 72 programs, each
# walking the whole cache: slower than SDPA, 88 vs 78 us a sliding layer on H200).
SPLITS = {"128x32": dict(programs=128, block_s=32), "256x32": dict(programs=256, block_s=32),
          "512x16": dict(programs=512, block_s=16)}
_DECODE = FastestOf()  # -> a key of SPLITS
_PREFILL = FastestOf()  # -> a key of SPLITS, "sdpa" or "matmul"
# Scores up to which a prefill chunk may take the matmul form (float32: 128 MB, transient). At a 286-row chunk of
# the 12B, 4.5M a layer: there neither these kernels nor SDPA (with a mask: not its flash kernel) have enough
# programs to fill the GPU, where cuBLAS does.
MATMUL_MAX_SCORES = 1 << 25
MATMUL_MAX_SLOTS = 16384  # a row of scores held in registers by its softmax program


if triton is not None:

    @triton.jit
    def _split_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, acc_ptr, ml_ptr, R, R_PAD, S, SPLITS, MASK_ROWS,
                      sq_h, sq_r, sk_h, sk_s, sv_h, sv_s, sm_r,
                      D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, SPLIT_LEN: tl.constexpr,
                      PDL: tl.constexpr):
        wait_then_release(PDL)  # pdl.py
        h = tl.program_id(0)
        split = tl.program_id(1)
        r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
        d = tl.arange(0, D)
        r_ok = r < R
        q = tl.load(q_ptr + h * sq_h + r[:, None] * sq_r + d[None, :], mask=r_ok[:, None], other=0)
        m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_R,), tl.float32)
        acc = tl.zeros((BLOCK_R, D), tl.float32)
        start = split * SPLIT_LEN
        for s0 in range(start, start + SPLIT_LEN, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            s_ok = s < S
            # row r is query r % MASK_ROWS of its group (the heads sharing a KV head are folded into the rows);
            # asked for before k, so that it is not a second trip to memory after the scores' wait (sm_90 SASS)
            allowed = tl.load(mask_ptr + (r % MASK_ROWS)[:, None] * sm_r + s[None, :],
                              mask=r_ok[:, None] & s_ok[None, :], other=0)
            k = tl.load(k_ptr + h * sk_h + s[:, None] * sk_s + d[None, :], mask=s_ok[:, None], other=0)
            scores = tl.dot(q, tl.trans(k))
            scores = tl.where(allowed != 0, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing allowed yet: keep zeros, not NaN
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(scores - m_safe[:, None])
            v = tl.load(v_ptr + h * sv_h + s[:, None] * sv_s + d[None, :], mask=s_ok[:, None], other=0)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        # only the real rows: a decode step's 2 query rows a KV head fill 2 of the 16 the MMA needs, and the
        # padding's partials, never merged, were 8x the bytes the merge reads
        base = (h * SPLITS + split) * R_PAD
        tl.store(acc_ptr + (base + r[:, None]) * D + d[None, :], acc, mask=r_ok[:, None])
        tl.store(ml_ptr + (base + r) * 2, m_i, mask=r_ok)
        tl.store(ml_ptr + (base + r) * 2 + 1, l_i, mask=r_ok)

    @triton.jit
    def _merge_kernel(acc_ptr, ml_ptr, o_ptr, R_PAD, SPLITS, so_h, so_r,
                      D: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
        # one (KV head, row, BLOCK_D of the head's dims): the splits' partial sums rescaled to the common maximum
        wait_then_release(PDL)  # pdl.py
        h = tl.program_id(0)
        r = tl.program_id(1)
        sp = tl.arange(0, BLOCK_SPLITS)
        sp_ok = sp < SPLITS
        d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        rows = (h * SPLITS + sp) * R_PAD + r
        m = tl.load(ml_ptr + rows * 2, mask=sp_ok, other=float("-inf"))
        lsum = tl.load(ml_ptr + rows * 2 + 1, mask=sp_ok, other=0)
        m_max = tl.max(m, axis=0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))
        acc = tl.load(acc_ptr + rows[:, None] * D + d[None, :], mask=sp_ok[:, None], other=0)
        out = tl.sum(acc * w[:, None], axis=0) / tl.sum(lsum * w, axis=0)
        tl.store(o_ptr + h * so_h + r * so_r + d, out.to(o_ptr.dtype.element_ty))


    @triton.jit
    def _masked_softmax_kernel(s_ptr, mask_ptr, p_ptr, S, R, MASK_ROWS, sm_r, BLOCK: tl.constexpr):
        # one row of float32 scores [S] (rows of all heads in turn, R a head): masked softmax, in p's dtype; row r
        # of a head takes mask row r % MASK_ROWS; a row with nothing allowed gives zeros, as the kernels above
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < S
        allowed = tl.load(mask_ptr + (row % R % MASK_ROWS) * sm_r + cols, mask=ok, other=0)
        x = tl.load(s_ptr + row * S + cols, mask=ok, other=0)
        x = tl.where(allowed != 0, x, float("-inf"))
        m = tl.max(x, axis=0)
        e = tl.exp(x - tl.where(m == float("-inf"), 0.0, m))
        total = tl.sum(e, axis=0)
        p = e / tl.where(total == 0, 1.0, total)
        tl.store(p_ptr + row * S + cols, p.to(p_ptr.dtype.element_ty), mask=ok)


def block_shape(rows: int, dim: int) -> tuple[int, int]:
    """Query rows per program and warps. A block's float32 accumulator (rows x dim) stays in registers: at most
    16K values, and 8 warps past 32 rows or 8K values (fewer spilled on sm_90: test_kernels_compile.py)."""
    block_r = max(16, min(triton.next_power_of_2(rows), 16384 // dim, 128))
    return block_r, 4 if block_r <= 32 and block_r * dim <= 8192 else 8


def merge_block_d(dim: int) -> int:
    """Dims a merging program takes: a decode step has only 16 (KV head, row) pairs on the 12B's sliding layers,
    each with 16-64 splits of the whole head to read, so the head's dims are shared out among programs too."""
    return min(dim, 64)


def merge_warps(block_splits: int, block_d: int) -> int:
    """Warps for merging: the splits' partial sums (block_splits x block_d floats) in registers without spilling."""
    return 8 if block_splits * block_d > 16384 else 4


def _launch(q, k, v, mask, block_s: int = 32, programs: int = 128):
    """q [H, R, D], k/v [H, S, D] (last dim contiguous), mask [R / G, S] bool for G query groups a KV head, row r
    of q taking mask row r % (R / G) -> [H, R, D] in q's dtype."""
    h, rows, dim = q.shape
    slots = k.shape[1]
    block_r, warps = block_shape(rows, dim)
    row_blocks = triton.cdiv(rows, block_r)
    r_pad = row_blocks * block_r
    # enough splits to give every SM work, each a whole number of BLOCK_S tiles
    per_split = max(block_s, triton.next_power_of_2(triton.cdiv(slots * h * row_blocks, programs)))
    splits = triton.cdiv(slots, per_split)
    acc = torch.empty(h, splits, r_pad, dim, device=q.device, dtype=torch.float32)
    ml = torch.empty(h, splits, r_pad, 2, device=q.device, dtype=torch.float32)
    mask8 = mask.view(torch.uint8)
    launch = pdl_args(q)
    _split_kernel[(h, splits, row_blocks)](q, k, v, mask8, acc, ml, rows, r_pad, slots, splits, mask8.shape[0],
                                           q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
                                           v.stride(1), mask8.stride(0), D=dim, BLOCK_R=block_r, BLOCK_S=block_s,
                                           SPLIT_LEN=per_split, num_warps=warps, **launch)
    out = torch.empty(h, rows, dim, device=q.device, dtype=q.dtype)
    block_splits = max(2, triton.next_power_of_2(splits))
    block_d = merge_block_d(dim)
    _merge_kernel[(h, rows, dim // block_d)](acc, ml, out, r_pad, splits, out.stride(0), out.stride(1), D=dim,
                                             BLOCK_SPLITS=block_splits, BLOCK_D=block_d,
                                             num_warps=merge_warps(block_splits, block_d), **launch)
    return out


def softmax_warps(block: int) -> int:
    """Warps for a row of `block` scores in registers (up to MATMUL_MAX_SLOTS): 8-64 values a thread."""
    return 4 if block <= 2048 else 8


def _matmul_form(q, k, v, mask):
    """The same attention as two batched cuBLAS matmuls around a masked softmax: scores in float32 (as the kernels
    keep them), probabilities rounded to v's dtype for p v."""
    h, rows, _ = q.shape
    slots = k.shape[1]
    # cuBLAS takes its Hopper kernels for these only where the slot count is a multiple of 8 (H200: at 982 slots
    # Ampere's, 2.3-2.6x slower than at 1024, even with the scores' rows padded): the session pads the cache
    if q.dtype == torch.float32:
        scores = torch.bmm(q, k.transpose(1, 2))
    else:
        scores = torch.bmm(q, k.transpose(1, 2), out_dtype=torch.float32)  # fp32 accumulators, not rounded
    p = torch.empty(h, rows, slots, device=q.device, dtype=v.dtype)
    mask8 = mask.view(torch.uint8)
    block = triton.next_power_of_2(slots)
    _masked_softmax_kernel[(h * rows,)](scores, mask8, p, slots, rows, mask8.shape[0], mask8.stride(0), BLOCK=block,
                                        num_warps=softmax_warps(block))
    return torch.bmm(p, v)


def _sdpa(q, k, v, mask):
    mask = mask.repeat(q.shape[1] // mask.shape[0], 1)  # one row a query row (see _launch)
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask[None, None], scale=1.0)[0]


@torch.library.custom_op("gemma4_agent::cache_attention", mutates_args=())
def cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T masked) v, scale 1, softmax in float32. q [H, R, D], k/v [H, S, D], mask [R / G, S] bool
    (True = attend), shared by every head and by each of the G groups of query rows a KV head takes (row r of q
    uses mask row r % (R / G): not repeated per layer). Up to DECODE_ROWS rows on these kernels, split as finely
    as was fastest at this shape on first use; more (a frame's prefill) on these kernels so split, PyTorch's
    fused SDPA or the matmul form, whichever was faster."""
    q, mask = q.contiguous(), mask.contiguous()
    shape = (k.shape[0], q.shape[1], k.shape[1], q.shape[2])
    calls = {name: functools.partial(_launch, q, k, v, mask, **c) for name, c in SPLITS.items()}
    if q.shape[1] <= DECODE_ROWS:
        return _DECODE.run(shape, calls)
    calls["sdpa"] = functools.partial(_sdpa, q, k, v, mask)
    if q.shape[0] * q.shape[1] * k.shape[1] <= MATMUL_MAX_SCORES and k.shape[1] <= MATMUL_MAX_SLOTS:
        calls["matmul"] = functools.partial(_matmul_form, q, k, v, mask)
    return _PREFILL.run(shape, calls)


@cache_attention.register_fake
def _(q, k, v, mask):
    return torch.empty_like(q)
