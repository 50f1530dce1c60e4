"""Programmatic dependent launch (PDL) for the decode step's own Triton kernels, on sm_90 and later.

A decode step is ~600 short kernels, each paying a launch and a ramp-up after the one before it has drained
(profile: ~0.5 ms of a 4.9 ms int4 step between kernels). Launched with PDL, a kernel's programs are scheduled
while its predecessor finishes and wait (`griddepcontrol.wait`) before touching anything it wrote. Our kernels
wait first thing and never let their successors start early, so every kernel still completes after the one
before it: order is kept along the whole stream whatever the neighbours do.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _sm90_or_later(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9  # asked once per device, not per launch


def pdl(t: torch.Tensor) -> bool:
    """Whether a kernel working on `t` launches with PDL: CUDA devices of compute capability 9.0 or later (the
    wait instruction does not exist before; the Triton interpreter works on CPU tensors)."""
    return t.is_cuda and _sm90_or_later(t.device.index if t.device.index is not None else torch.cuda.current_device())


def pdl_args(t: torch.Tensor) -> dict:
    """Launch keywords for a kernel with a `PDL` constexpr: its wait compiled in and the PDL launch, or neither."""
    return {"PDL": True, "launch_pdl": True} if pdl(t) else {"PDL": False}
