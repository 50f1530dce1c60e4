"""A Triton GEMV for the bf16/fp16 linear layers of the decode step, where it beats cuBLAS.

At one row a linear layer is a read of its weight. cuBLAS's GEMV reaches ~1.04x of that read on the 12B's wide
matrices (gate/up) but 1.2-1.85x on the 3840-row outputs (o, down; H200, BENCHMARKS.md "INT4 on the GPU"), where
its few, long programs leave HBM idle during ramp and tail. This kernel gives each program BLOCK_N rows over the whole
of K (autotuned per shape with L2 flushed, as the int4 GEMV), so thousands of short programs keep loads in flight.

Neither wins everywhere, so `gemma4_agent::linear` times both once per weight shape on first use and keeps the
faster (`fastest.py`), on this GPU; rows > 1 (prefill chunks) stay with cuBLAS. `use_triton_gemv(model)` makes the
decoder's plain linear layers (and the joined projections) call it: the streaming session does this on CUDA. The
modules keep their class's state (weights, names), so checkpoints and exports are unchanged.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..fastest import FastestOf
from ..pdl import pdl_args, wait_then_release
from ..quant import triton_q4
from ..triton_env import tl, triton


if triton is not None:
    def _configs():
        # 16-byte loads (8 values); 64-128 values a thread per block: enough loads in flight without spilling
        return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
                for bn in (1, 2, 4, 8, 16) for bk in (256, 512, 1024, 2048) for w in (1, 2, 4, 8)
                if 64 <= bn * bk // (32 * w) <= 128]

    def _prune(configs, named_args, **kwargs):
        ok = [c for c in configs if c.kwargs["BLOCK_K"] // 2 < named_args["K"]]  # no block wider than K needs
        return ok or [triton.Config({"BLOCK_N": 1, "BLOCK_K": 256}, num_warps=1)]

    @triton.jit
    def _weight_block(w_ptr, rows, row_ok, k0, K, BLOCK_K: tl.constexpr):
        cols = k0 + tl.arange(0, BLOCK_K)
        return tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & (cols < K)[None, :], other=0)

    @triton.jit
    def _times_x(w, x_ptr, k0, K, BLOCK_K: tl.constexpr):
        cols = k0 + tl.arange(0, BLOCK_K)
        return w.to(tl.float32) * tl.load(x_ptr + cols, mask=cols < K, other=0).to(tl.float32)[None, :]

    @triton.autotune(configs=_configs(), key=["N", "K"], prune_configs_by={"early_config_prune": _prune},
                     do_bench=triton_q4._bench_from_hbm, **triton_q4._AUTOTUNE_CACHE)
    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        # the first block of weights is asked for before the wait, while the kernel before still runs (pdl.py)
        w = _weight_block(w_ptr, rows, row_ok, 0, K, BLOCK_K)
        wait_then_release(PDL)
        acc = _times_x(w, x_ptr, 0, K, BLOCK_K)  # [BLOCK_N, BLOCK_K], reduced across threads once, at the end
        for k0 in range(BLOCK_K, K, BLOCK_K):
            acc += _times_x(_weight_block(w_ptr, rows, row_ok, k0, K, BLOCK_K), x_ptr, k0, K, BLOCK_K)
        tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=row_ok)


def _triton_gemv(x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> None:
    n, k = weight.shape
    _gemv_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](x, weight, y, n, k, **pdl_args(x))


def _cublas(x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> None:
    torch.mm(x, weight.t(), out=y)


# (N, K, dtype) -> "cublas" | "triton", timed in this process
_ONE_ROW = FastestOf()
_PATHS = {"cublas": _cublas, "triton": _triton_gemv}


def _launch(x: torch.Tensor, weight: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T with Triton available: one row by the path named, or by the faster one timed on
    first use; more rows by cuBLAS."""
    if x.shape[0] != 1:
        return F.linear(x, weight)
    y = torch.empty(1, weight.shape[0], device=x.device, dtype=x.dtype)
    calls = {p: functools.partial(f, x, weight, y) for p, f in _PATHS.items()}
    _ONE_ROW.run((*weight.shape, str(weight.dtype)), calls, path)
    return y


@torch.library.custom_op("gemma4_agent::linear", mutates_args=())
def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T without bias: at one row on CUDA the faster of cuBLAS and the Triton GEMV."""
    if not (x.is_cuda and triton is not None):
        return F.linear(x, weight)
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    return _launch(flat, weight.contiguous()).reshape(*x.shape[:-1], weight.shape[0])


@linear.register_fake
def _(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class GemvLinear(nn.Linear):
    """nn.Linear (no bias) through gemma4_agent::linear; set on existing modules by use_triton_gemv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


def use_triton_gemv(model: nn.Module) -> int:
    """Route the decoder's bias-free bf16/fp16 linear layers and joined projections through gemma4_agent::linear
    (their class swapped in place: weights, names and state_dict unchanged); returns how many. Int4 layers and the
    vision tower are left as they are."""
    from .fusion import joined_modules

    count = 0
    for mod in [*model.layers.modules(), *joined_modules(model)]:
        if type(mod) is nn.Linear and mod.bias is None and mod.weight.dtype in (torch.bfloat16, torch.float16):
            mod.__class__ = GemvLinear
            count += 1
    return count
