"""Programmatic dependent launch (PDL) for the decode step's own Triton kernels, on sm_90 and later.

A decode step is ~600 short kernels, each paying a launch and a ramp-up after the one before it has drained
(profile: ~0.5 ms of a 4.9 ms int4 step between kernels). Launched with PDL, a kernel's programs are scheduled
while its predecessor finishes and wait (`griddepcontrol.wait`) before touching anything it wrote.

Our kernels wait first thing (`wait_then_release`), then let their successor be scheduled at once
(`griddepcontrol.launch_dependents`): the successor's programs take the SMs the last wave leaves idle and can
start on what no kernel writes (the GEMVs load their first block of weights), then wait in turn. Order still holds
along the whole stream: a kernel passes its wait only once its predecessor has completed, which that one did only
after passing its own wait. A kernel launched without PDL (Inductor's, cuBLAS) starts after its predecessor has
completed, whatever that one signalled.

What a kernel reads before its wait must not be written by the kernel just before it: only weights are read
there, written once when a model is loaded.
"""
from __future__ import annotations

import functools

import torch

from .triton_env import tl, triton


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


if triton is not None:

    @triton.jit
    def wait_then_release(PDL: tl.constexpr):
        """In a kernel launched with `pdl_args`: wait until the kernel before has completed, then let the one after
        be scheduled. Nothing before this call may read what an earlier kernel writes."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
