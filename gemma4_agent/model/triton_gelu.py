"""The MLP's gate: gelu_tanh(gate) * up in one Triton kernel on CUDA, launched with PDL (pdl.py).

Between the gate/up GEMV and the down GEMV of a decode step this is a few microseconds of work, but Inductor's
kernel for it launches without PDL, so the down GEMV could only start once it had drained. Ours waits for the
gate/up GEMV, lets the down GEMV be scheduled at once, and the down GEMV's first weights load meanwhile.

Rounds where the eager MLP rounds (gelu's output, then the product, in the activation dtype), so it computes what
`F.gelu(gate, approximate="tanh") * up` does. Exposed as the custom op `gemma4_agent::gelu_mul` so torch.compile
keeps it as one call and CUDA-graph capture records it.
"""
from __future__ import annotations

import math

import torch

from ..pdl import pdl_args, wait_then_release
from ..triton_env import available, rounded, tl, triton  # available: this module's too

BLOCK = 1024  # values a program: 8 a thread in 16-byte loads at 4 warps; a decode step's 15360 in 15 programs


if triton is not None:

    @triton.jit
    def _gelu_mul_kernel(gate_ptr, up_ptr, out_ptr, N, s_gate, s_up, TWO_BETA: tl.constexpr,
                         BLOCK: tl.constexpr, PDL: tl.constexpr):
        wait_then_release(PDL)  # pdl.py
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < N
        dtype = out_ptr.dtype.element_ty
        g = tl.load(gate_ptr + row * s_gate + cols, mask=ok, other=0).to(tl.float32)
        u = tl.load(up_ptr + row * s_up + cols, mask=ok, other=0).to(tl.float32)
        # 0.5 g (1 + tanh(b (g + 0.044715 g^3))) = g sigmoid(2 b (g + 0.044715 g^3)), b = sqrt(2 / pi)
        gelu = rounded(g * tl.sigmoid(TWO_BETA * (g + 0.044715 * g * g * g)), dtype)
        tl.store(out_ptr + row * N + cols, (gelu * u).to(dtype), mask=ok)


@torch.library.custom_op("gemma4_agent::gelu_mul", mutates_args=())
def gelu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up over [..., N] (same shape and dtype; rows may be strided, as the halves of a joined
    gate/up projection are) -> a new contiguous tensor."""
    n = gate.shape[-1]
    g, u = gate.reshape(-1, n), up.reshape(-1, n)
    g, u = (t if t.stride(-1) == 1 else t.contiguous() for t in (g, u))
    out = torch.empty(g.shape, device=g.device, dtype=g.dtype)
    if g.shape[0]:
        _gelu_mul_kernel[(g.shape[0], triton.cdiv(n, BLOCK))](g, u, out, n, g.stride(0), u.stride(0),
                                                              TWO_BETA=2 * math.sqrt(2 / math.pi), BLOCK=BLOCK,
                                                              num_warps=4, **pdl_args(g))
    return out.view(gate.shape)


@gelu_mul.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)
