"""The decode step's next int4 weights asked into L2 while its latency-bound kernels run.

Between a decode step's GEMVs run small kernels (q/k/v preparation, attention, norms, the gate), each waiting on
the one before; they leave HBM mostly idle, ~20 us a 12B layer (BENCHMARKS.md). So after each one-row int4
product, the weights read after it are asked into L2 on a second stream (`triton_q4.L2Prefetch`: TMA bulk
prefetches, joined before the product that reads them), and the next GEMVs find part of their bytes there.

The step's int4 weights are taken end to end in the order it reads them (each layer's q/k/v, o, gate/up, down,
then the LM head). After each product come the next `mb` megabytes of that stream not yet asked for, from the
start of the matrix after it: whole rows of words and their scales (and zero-points), the rows the GEMV's first
programs take. A plan never reaches past the LM head: each prefetch is joined within the step's own graph.

Not measured yet (BENCHMARKS.md, nineteenth session: the same plan launched in the chain itself was slower).
"""
from __future__ import annotations

import torch
from torch import nn

from ..quant.int4 import _Int4Weights
from ..quant.triton_q4 import PREFETCH_REGIONS


def step_order(model) -> list[nn.Module]:
    """The matrices of a decode step in the order it multiplies them (joined projections as one)."""
    mods: list[nn.Module] = []
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for owner, inputs, output in ((attn, ("q_proj", "k_proj", "v_proj"), attn.o_proj),
                                      (mlp, ("gate_proj", "up_proj"), mlp.down_proj)):
            joined = owner.__dict__.get("joined")
            apart = [getattr(owner, name) for name in inputs]
            mods += [joined] if joined is not None else [m for m in apart if m is not None]
            mods.append(output)
    mods.append(model.embed_tokens)  # the tied LM head
    return mods


def _row_parts(mod: _Int4Weights) -> list:
    return [t for t in (mod.qweight, mod.scales, mod.zeros) if t is not None]


def _row_bytes(mod: _Int4Weights) -> int:
    return sum(t.shape[1] * t.element_size() for t in _row_parts(mod))


def _regions(mod: _Int4Weights, first: int, last: int) -> list:
    # rows first..last-1 of each of the module's tensors, as flat bytes (rows are contiguous)
    return [t[first:last].reshape(-1).view(torch.uint8) for t in _row_parts(mod)]


def prefetch_next_weights(model, mb: float) -> int:
    """Give each int4 matrix of the decode step but the last the next `mb` MB of the step's weights to ask into L2
    after its one-row product (set as `l2_after`; mb 0 clears). Only where every matrix of the step is int4 with
    its portable weights held (the layout the Triton kernels read); returns how many were given some."""
    mods = step_order(model)
    for m in mods:
        m.__dict__.pop("l2_after", None)
    if mb <= 0 or not all(isinstance(m, _Int4Weights) and m.qweight.numel() for m in mods):
        return 0
    budget = int(mb * 1e6)
    n = len(mods)
    cursor = (1, 0)  # (index into the step's matrices, row): where the bytes not yet asked for start
    given = 0
    for i, mod in enumerate(mods):
        j, row = max(cursor, (i + 1, 0))
        left, regions = budget, []
        while left > 0 and j < n and len(regions) + len(_row_parts(mods[j])) <= PREFETCH_REGIONS:
            nxt = mods[j]
            rows = min(nxt.qweight.shape[0] - row, left // _row_bytes(nxt))
            if rows == 0:
                break
            regions += _regions(nxt, row, row + rows)
            left -= rows * _row_bytes(nxt)
            j, row = (j + 1, 0) if row + rows == nxt.qweight.shape[0] else (j, row + rows)
        cursor = (j, row)
        if regions:
            mod.__dict__["l2_after"] = regions
            given += 1
    return given
