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
