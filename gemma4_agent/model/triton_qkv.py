"""An attention layer's q/k/v from its projections to the cache in one Triton kernel on CUDA, launched with PDL.

Per token of a chunk: q and k RMS-normed and rotated (RoPE), v RMS-normed without a scale; q returned, k and v
written into the layer's cache at the token's slot. Between the q/k/v GEMV and the attention of a decode step this
is ~1 us of work, which Inductor made three kernels a layer (~7 us of a step's time on the 12B at int4, profile of
2026-11-29), launched without PDL, so each waited for the one before to drain. Ours waits for the GEMV, lets the
attention be scheduled at once, and replaces all three.

Rounds where the modules round (the norm's output, then each product of the rotation and their sum, in the
activation dtype), so it computes what `RMSNorm` + `apply_rope` + `StaticKVCache.update` do. Exposed as the custom
op `gemma4_agent::qkv_to_cache`, which mutates the two cache buffers: torch.compile keeps it as one call and
writes into the buffers themselves (test_qkv_triton.py checks the compiled code copies nothing), and CUDA-graph
capture records it. The CPU kernel of the op is the modules' arithmetic in torch.
"""
from __future__ import annotations

import torch

from ..pdl import pdl_args, wait_then_release
from ..triton_env import available, rounded, tl, triton  # available: this module's too


if triton is not None:

    @triton.jit
    def _normed(x_ptr, w_ptr, eps, HAS_WEIGHT: tl.constexpr, D: tl.constexpr):
        # one head's halves [D / 2] each, RMS-normed in float32 (times the weight) and rounded to the dtype
        half = tl.arange(0, D // 2)
        x1 = tl.load(x_ptr + half).to(tl.float32)
        x2 = tl.load(x_ptr + D // 2 + half).to(tl.float32)
        inv = tl.math.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / D + eps)
        y1, y2 = x1 * inv, x2 * inv
        if HAS_WEIGHT:
            y1 = y1 * tl.load(w_ptr + half).to(tl.float32)
            y2 = y2 * tl.load(w_ptr + D // 2 + half).to(tl.float32)
        return y1, y2

    @triton.jit
    def _rotated(y1, y2, cos_ptr, sin_ptr, dtype, D: tl.constexpr):
        # x cos + rotate_half(x) sin, rotate_half(x) = (-x2, x1), each product and the sum rounded to the dtype
        half = tl.arange(0, D // 2)
        y1 = rounded(y1, dtype)
        y2 = rounded(y2, dtype)
        c1 = tl.load(cos_ptr + half).to(tl.float32)
        c2 = tl.load(cos_ptr + D // 2 + half).to(tl.float32)
        s1 = tl.load(sin_ptr + half).to(tl.float32)
        s2 = tl.load(sin_ptr + D // 2 + half).to(tl.float32)
        o1 = rounded(y1 * c1, dtype) + rounded(-y2 * s1, dtype)
        o2 = rounded(y2 * c2, dtype) + rounded(y1 * s2, dtype)
        return o1.to(dtype), o2.to(dtype)

    @triton.jit
    def _qkv_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, q_out_ptr, kc_ptr, vc_ptr, slots_ptr,
                    H, KV, s_q, s_k, s_v, s_cs, sc_h, sc_s, eps, D: tl.constexpr, PDL: tl.constexpr):
        # program (token t, head p): p < H a query head, then KV key heads, then KV value heads
        wait_then_release(PDL)  # pdl.py
        t = tl.program_id(0)
        p = tl.program_id(1)
        half = tl.arange(0, D // 2)
        dtype = q_out_ptr.dtype.element_ty
        if p < H + KV:
            if p < H:
                y1, y2 = _normed(q_ptr + t * s_q + p * D, qw_ptr, eps, True, D)
                o1, o2 = _rotated(y1, y2, cos_ptr + t * s_cs, sin_ptr + t * s_cs, dtype, D)
                out = q_out_ptr + (t * H + p) * D
            else:
                y1, y2 = _normed(k_ptr + t * s_k + (p - H) * D, kw_ptr, eps, True, D)
                o1, o2 = _rotated(y1, y2, cos_ptr + t * s_cs, sin_ptr + t * s_cs, dtype, D)
                out = kc_ptr + (p - H) * sc_h + tl.load(slots_ptr + t) * sc_s
            tl.store(out + half, o1.to(out.dtype.element_ty))
            tl.store(out + D // 2 + half, o2.to(out.dtype.element_ty))
        else:
            y1, y2 = _normed(v_ptr + t * s_v + (p - H - KV) * D, kw_ptr, eps, False, D)
            out = vc_ptr + (p - H - KV) * sc_h + tl.load(slots_ptr + t) * sc_s
            tl.store(out + half, y1.to(dtype).to(out.dtype.element_ty))
            tl.store(out + D // 2 + half, y2.to(dtype).to(out.dtype.element_ty))


def warps(dim: int) -> int:
    """Warps for one head of `dim` values: one warp up to 256, two at 512."""
    return max(1, min(4, dim // 256))


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(q, k, v, cos, sin, q_weight, k_weight, eps: float, k_cache, v_cache, slots) -> torch.Tensor:
    """The op by the kernel (on CUDA; on CPU tensors in Triton's interpreter, for its tests)."""
    n, d = cos.shape
    heads, kv_heads = q.shape[1] // d, k.shape[1] // d
    q, k, v, cos, sin = (_rows(t) for t in (q, k, v, cos, sin))
    q_out = torch.empty(n, heads, d, device=q.device, dtype=q.dtype)
    if n:
        _qkv_kernel[(n, heads + 2 * kv_heads)](
            q, k, v, cos, sin, q_weight, k_weight, q_out, k_cache, v_cache, slots, heads, kv_heads,
            q.stride(0), k.stride(0), v.stride(0), cos.stride(0), k_cache.stride(1), k_cache.stride(2), eps, D=d,
            num_warps=warps(d), **pdl_args(q))
    return q_out


@torch.library.custom_op("gemma4_agent::qkv_to_cache", mutates_args=("k_cache", "v_cache"))
def qkv_to_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """q [n, H*D], k and v [n, KV*D] (rows may be strided: the parts of a joined projection; v may be k, on K = V
    layers), cos and sin [n, D], caches [1, KV, S, D] (last dim contiguous), slots [n] -> q normed and rotated
    [n, H, D]; k normed and rotated and v normed (no scale) written into the caches at `slots`. One eps for the
    three norms."""
    return _launch(q, k, v, cos, sin, q_weight, k_weight, eps, k_cache, v_cache, slots)


@qkv_to_cache.register_fake
def _(q, k, v, cos, sin, q_weight, k_weight, eps, k_cache, v_cache, slots):
    n, d = cos.shape
    return q.new_empty(n, q.shape[1] // d, d)


@qkv_to_cache.register_kernel("cpu")
def _(q, k, v, cos, sin, q_weight, k_weight, eps, k_cache, v_cache, slots):
    # the modules' arithmetic (what the kernel is tested against), so that CPU tensors run the op too
    from .network import apply_rope, rms_norm

    n, d = cos.shape
    heads = lambda x: x.reshape(1, n, -1, d)  # noqa: E731
    q_out = apply_rope(rms_norm(heads(q), q_weight, eps), cos, sin)
    k_new = apply_rope(rms_norm(heads(k), k_weight, eps), cos, sin).transpose(1, 2)
    v_new = rms_norm(heads(v), None, eps).transpose(1, 2)
    k_cache.index_copy_(2, slots, k_new.to(k_cache.dtype))
    v_cache.index_copy_(2, slots, v_new.to(v_cache.dtype))
    return q_out[0]
