"""Triton for our CUDA kernels, where it is installed: `triton` and `tl` are None on CPU-only installs, where every
caller takes its torch path (cuBLAS, tinygemm, the modules' own form)."""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None


def available() -> bool:
    """Whether our Triton kernels can run here: Triton installed and a CUDA device."""
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def rounded(x, dtype):
        """float32 x rounded to `dtype` (to nearest even) and back, where the modules round an intermediate.
        x.to(dtype).to(tl.float32) is not enough: Triton folds that pair away (measured on the H200, 2026-11-29:
        the q/k/v kernel then matched no rounding of the modules), so for bf16 the rounding is done on the bits."""
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        else:
            return x.to(dtype).to(tl.float32)
