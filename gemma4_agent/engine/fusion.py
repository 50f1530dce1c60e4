"""Joined projections for inference: each layer's q/k/v projections become one matrix, and gate/up another.

At batch 1 every linear layer is a GEMV whose cost is its weight bytes plus a fixed launch-and-ramp cost;
three GEMVs of 8192 rows in all cost more than one (fewer launches, fewer partial waves). The joined
weight is one new tensor; each original layer's weight becomes a view of its rows, so memory is not
doubled and the modules, their names and `state_dict` stay as the checkpoint has them. The joined
module is kept in the owner's `__dict__` (outside the module tree), where network.project finds it.

Views sharing one storage cannot be saved by safetensors as they are (copy to another device first, as
the savers do) and a later `.to(device)` leaves the joined weight behind: join once the model is where
it will run (the streaming session does this on CUDA).
"""
from __future__ import annotations

import torch
from torch import nn

from ..quant.int4 import Int4Linear, join_int4


def join_linears(mods: list[nn.Module]) -> nn.Module | None:
    """One module computing torch.cat([m(x) for m in mods], -1), or None where they cannot be joined
    (different input sizes, dtypes, devices or int4 schemes, biases, released int4 weights)."""
    if all(isinstance(m, Int4Linear) for m in mods):
        return join_int4(mods)
    if not all(type(m) is nn.Linear and m.bias is None for m in mods):
        return None
    w = [m.weight for m in mods]
    if len({(t.shape[1], t.dtype, t.device) for t in w}) != 1:
        return None
    joined = torch.cat([t.detach() for t in w])
    module = nn.Linear(joined.shape[1], joined.shape[0], bias=False, device="meta")
    module.weight = nn.Parameter(joined, requires_grad=False)
    start = 0
    for m in mods:  # the originals become views of the joined rows: one copy of the weights
        rows = m.out_features
        m.weight = nn.Parameter(joined[start:start + rows], requires_grad=False)
        start += rows
    return module


def _join(owner: nn.Module, names: list[str]) -> bool:
    if "joined" in owner.__dict__:
        return True
    mods = [getattr(owner, n) for n in names]
    joined = join_linears(mods)
    if joined is None:
        return False
    owner.__dict__["joined"] = joined
    owner.__dict__["joined_sizes"] = [m.out_features for m in mods]
    return True


def join_projections(model) -> int:
    """Join q/k(/v) and gate/up in every decoder layer; returns how many groups were joined."""
    count = 0
    for layer in model.layers:
        attn = layer.self_attn
        count += _join(attn, [n for n in ("q_proj", "k_proj", "v_proj") if getattr(attn, n) is not None])
        count += _join(layer.mlp, ["gate_proj", "up_proj"])
    return count


def joined_modules(model) -> list[nn.Module]:
    """The joined modules join_projections made (outside the module tree, so model.modules() misses them)."""
    return [m.__dict__["joined"] for m in model.modules() if "joined" in m.__dict__]
