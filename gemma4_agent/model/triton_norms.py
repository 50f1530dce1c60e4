"""The residual add between two RMSNorms in one kernel on CUDA (Triton): h + post(y) [* scale], then pre() of it.

Every decoder layer does this twice: after attention (post_attention_layernorm, then pre_feedforward_layernorm) and
after the MLP (post_feedforward_layernorm and the layer scalar, then the next layer's input_layernorm). Inductor
fuses each pair into one reduction kernel, but at the decode step's single row of 3840 it loops over the row in
passes, one memory round trip each: 3.5-4.7 us a call on the H200 (profile of 2026-11-29), twice a layer. Here one
program holds its row in registers: the four inputs load at once, two reductions, two stores.

Rounds where network.RMSNorm and the eager residual add round (each norm's output, the sum and the scaled sum in
the activation dtype), so it computes what the eager layer computes. Exposed as the custom op
`gemma4_agent::add_norms` so torch.compile keeps it as one call and CUDA-graph capture records it.
"""
from __future__ import annotations

import torch

from ..pdl import pdl_args, wait_then_release
from ..triton_env import available, rounded, tl, triton  # available: this module's too


if triton is not None:

    @triton.jit
    def _add_norms_kernel(h_ptr, y_ptr, w_post_ptr, w_pre_ptr, scale_ptr, h_out_ptr, x_ptr, N, eps_post, eps_pre,
                          HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        wait_then_release(PDL)  # pdl.py
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < N
        dtype = h_out_ptr.dtype.element_ty
        y = tl.load(y_ptr + row * N + cols, mask=ok, other=0).to(tl.float32)
        h = tl.load(h_ptr + row * N + cols, mask=ok, other=0).to(tl.float32)
        w_post = tl.load(w_post_ptr + cols, mask=ok, other=0).to(tl.float32)
        w_pre = tl.load(w_pre_ptr + cols, mask=ok, other=0).to(tl.float32)
        post = rounded(y * tl.math.rsqrt(tl.sum(y * y, axis=0) / N + eps_post) * w_post, dtype)
        h_new = rounded(h + post, dtype)
        if HAS_SCALE:
            h_new = rounded(h_new * tl.load(scale_ptr).to(tl.float32), dtype)
        tl.store(h_out_ptr + row * N + cols, h_new.to(dtype), mask=ok)
        x = h_new * tl.math.rsqrt(tl.sum(h_new * h_new, axis=0) / N + eps_pre) * w_pre
        tl.store(x_ptr + row * N + cols, x.to(dtype), mask=ok)


def warps(block: int) -> int:
    """Warps for a row of `block` values: 16 values a thread where 1 to 8 warps allow."""
    return max(1, min(8, block // 512))


def _launch(h, y, w_post, w_pre, scale, eps_post: float, eps_pre: float):
    """h, y [rows, N] contiguous, same dtype; w_post, w_pre [N]; scale [1] or None -> (h_new, x)."""
    rows, n = h.shape
    h_out, x = torch.empty_like(h), torch.empty_like(h)
    if rows == 0:
        return h_out, x
    block = triton.next_power_of_2(n)
    _add_norms_kernel[(rows,)](h, y, w_post, w_pre, scale if scale is not None else w_post, h_out, x, n,
                               eps_post, eps_pre, HAS_SCALE=scale is not None, BLOCK=block,
                               num_warps=warps(block), **pdl_args(h))
    return h_out, x


@torch.library.custom_op("gemma4_agent::add_norms", mutates_args=())
def add_norms(h: torch.Tensor, y: torch.Tensor, w_post: torch.Tensor, w_pre: torch.Tensor,
              scale: torch.Tensor | None, eps_post: float, eps_pre: float) -> tuple[torch.Tensor, torch.Tensor]:
    """h_new = (h + rmsnorm(y) * w_post) [* scale]; x = rmsnorm(h_new) * w_pre; over the last dim of [..., N]."""
    shape = h.shape
    h_new, x = _launch(h.reshape(-1, shape[-1]).contiguous(), y.reshape(-1, shape[-1]).contiguous(),
                       w_post.contiguous(), w_pre.contiguous(), scale, eps_post, eps_pre)
    return h_new.view(shape), x.view(shape)


@add_norms.register_fake
def _(h, y, w_post, w_pre, scale, eps_post, eps_pre):
    return h.new_empty(h.shape), h.new_empty(h.shape)
