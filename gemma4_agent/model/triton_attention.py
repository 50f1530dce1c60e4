"""Decode-sized attention on CUDA (Triton): a few query rows against a whole, masked KV cache.

cuBLAS runs q k^T and p v for one decode step as batched GEMMs with 2-16 rows, ~18 us per sliding layer
of the 12B on H200 for ~8 MB of cache (measured, benchmarks/gpu_decode_kernels.py): most of a step's
non-GEMV time. This is split-K flash decoding: the cache's slots are cut into splits, each program
takes one (KV head, split), computes scores on the tensor cores, a masked online softmax and its share of
p v in float32; a second kernel merges the splits. Same arithmetic as network.sdpa's decode branch, with
scores kept in float32 instead of rounded to the activation dtype.

Exposed as the custom op `gemma4_agent::decode_attention` so torch.compile keeps it as one opaque call and
CUDA-graph capture records its two kernels.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MAX_ROWS = 32  # query rows (query heads per KV head x tokens) one program holds


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _split_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, acc_ptr, ml_ptr, R, S, SPLITS,
                      sq_h, sq_r, sk_h, sk_s, sv_h, sv_s, sm_r,
                      D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, SPLIT_LEN: tl.constexpr):
        h = tl.program_id(0)
        split = tl.program_id(1)
        r = tl.arange(0, BLOCK_R)
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
            k = tl.load(k_ptr + h * sk_h + s[:, None] * sk_s + d[None, :], mask=s_ok[:, None], other=0)
            scores = tl.dot(q, tl.trans(k))
            allowed = tl.load(mask_ptr + r[:, None] * sm_r + s[None, :], mask=r_ok[:, None] & s_ok[None, :], other=0)
            scores = tl.where(allowed != 0, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing allowed yet: keep zeros, not NaN
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(scores - m_safe[:, None])
            v = tl.load(v_ptr + h * sv_h + s[:, None] * sv_s + d[None, :], mask=s_ok[:, None], other=0)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        base = (h * SPLITS + split) * BLOCK_R
        tl.store(acc_ptr + (base + r[:, None]) * D + d[None, :], acc)
        tl.store(ml_ptr + (base + r) * 2, m_i)
        tl.store(ml_ptr + (base + r) * 2 + 1, l_i)

    @triton.jit
    def _merge_kernel(acc_ptr, ml_ptr, o_ptr, R, SPLITS, so_h, so_r,
                      D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_SPLITS: tl.constexpr):
        # one (KV head, row): the splits' partial sums rescaled to the common maximum
        h = tl.program_id(0)
        r = tl.program_id(1)
        sp = tl.arange(0, BLOCK_SPLITS)
        sp_ok = sp < SPLITS
        d = tl.arange(0, D)
        rows = (h * SPLITS + sp) * BLOCK_R + r
        m = tl.load(ml_ptr + rows * 2, mask=sp_ok, other=float("-inf"))
        lsum = tl.load(ml_ptr + rows * 2 + 1, mask=sp_ok, other=0)
        m_max = tl.max(m, axis=0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))
        acc = tl.load(acc_ptr + rows[:, None] * D + d[None, :], mask=sp_ok[:, None], other=0)
        out = tl.sum(acc * w[:, None], axis=0) / tl.sum(lsum * w, axis=0)
        tl.store(o_ptr + h * so_h + r * so_r + d, out.to(o_ptr.dtype.element_ty))


def _launch(q, k, v, mask, block_s: int = 32, programs: int = 128):
    """q [H, R, D], k/v [H, S, D] (last dim contiguous), mask [R, S] bool -> [H, R, D] in q's dtype."""
    h, rows, dim = q.shape
    slots = k.shape[1]
    block_r = max(16, triton.next_power_of_2(rows))
    # enough splits to give every SM work, each a whole number of BLOCK_S tiles
    per_split = max(block_s, triton.next_power_of_2(triton.cdiv(slots * h, programs)))
    splits = triton.cdiv(slots, per_split)
    acc = torch.empty(h, splits, block_r, dim, device=q.device, dtype=torch.float32)
    ml = torch.empty(h, splits, block_r, 2, device=q.device, dtype=torch.float32)
    mask8 = mask.view(torch.uint8)
    _split_kernel[(h, splits)](q, k, v, mask8, acc, ml, rows, slots, splits,
                               q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                               mask8.stride(0), D=dim, BLOCK_R=block_r, BLOCK_S=block_s, SPLIT_LEN=per_split,
                               num_warps=4)
    out = torch.empty(h, rows, dim, device=q.device, dtype=q.dtype)
    _merge_kernel[(h, rows)](acc, ml, out, rows, splits, out.stride(0), out.stride(1), D=dim, BLOCK_R=block_r,
                             BLOCK_SPLITS=max(2, triton.next_power_of_2(splits)), num_warps=4)
    return out


@torch.library.custom_op("gemma4_agent::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T masked) v, scale 1, softmax in float32. q [H, R, D] (R <= MAX_ROWS), k/v [H, S, D],
    mask [R, S] bool (True = attend), shared by every head."""
    return _launch(q.contiguous(), k, v, mask.contiguous())


@decode_attention.register_fake
def _(q, k, v, mask):
    return torch.empty_like(q)
