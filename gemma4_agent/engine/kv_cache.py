"""A static KV cache: every buffer allocated once, nothing allocated per frame.

Layout, per layer type (sliding / full):
    slots [0, prefix_capacity)                       the prefix, pinned: slot = position
    slots [prefix_capacity, prefix_capacity + ring)  a ring, written in order
    slots up to capacity                             padding to a multiple of `slot_align`, never written

Each slot remembers its token's position (EMPTY when free) and image-block id (-1: not an image token);
attention masks are computed from those, so rewinding to the prefix is a pointer move and evicting
a frame block is marking its slots empty. Sliding rings hold window + max_chunk slots: a token is
only overwritten once it has left every future query's window. Full rings hold the whole context.
K is cached normed and rotated, V v_normed, separately even on K = V layers.
"""
from __future__ import annotations

import torch

from ..model.config import SLIDING
from ..model.network import EMPTY, Gemma4


class CacheFull(RuntimeError):
    pass


def ring_sizes(model: Gemma4, max_context: int, max_prefix: int, max_chunk: int) -> dict[str, int]:
    """Ring slots per layer type after the prefix's: the whole context on full layers, on sliding ones no more
    than a window and a chunk (what the compiled engines' caches are built with too)."""
    ring = {t: max_context - max_prefix for t in set(model.layer_types)}
    if SLIDING in ring:
        ring[SLIDING] = min(ring[SLIDING], model.config.text_config.sliding_window + max_chunk)
    return ring


class StaticKVCache:
    def __init__(self, model: Gemma4, max_context: int, max_prefix: int, max_chunk: int,
                 device=None, dtype=None, fused_writes: bool = False, slot_align: int = 1):
        text = model.config.text_config
        param = model.embed_tokens.weight
        device = device or param.device
        dtype = dtype or (param.dtype if param.is_floating_point() else torch.bfloat16)
        self.layer_types = list(model.layer_types)
        self.prefix_capacity = max_prefix
        ring = ring_sizes(model, max_context, max_prefix, max_chunk)
        if min(ring.values()) < max_chunk:
            raise ValueError(f"max_context {max_context} leaves no room for a {max_chunk}-token chunk after "
                             f"a {max_prefix}-token prefix")
        self.ring_size = ring
        # slot_align: the session's CUDA torch path asks for 64, so that a prefill's attention over the whole cache
        # (triton_attention's matmul form) has rows cuBLAS takes its Hopper kernels for: at 982 slots it fell back
        # to Ampere's, 2.3-2.6x slower than at 1024 (H200). The padding stays empty, hence masked.
        self.capacity = {t: -(-(max_prefix + r) // slot_align) * slot_align for t, r in ring.items()}
        self.k, self.v = [], []
        for i, t in enumerate(self.layer_types):
            spec = text.layer(i)
            shape = (1, spec.num_kv_heads, self.capacity[t], spec.head_dim)
            self.k.append(torch.zeros(shape, device=device, dtype=dtype))
            self.v.append(torch.zeros(shape, device=device, dtype=dtype))
        self.slot_pos = {t: torch.full((c,), EMPTY, device=device, dtype=torch.long) for t, c in self.capacity.items()}
        self.slot_block = {t: torch.full((c,), -1, device=device, dtype=torch.long) for t, c in self.capacity.items()}
        # slots the current chunk writes to, per layer type (set by `place`, read by `update`)
        self.cur_slots: dict[str, torch.Tensor] = {}
        self.ring_written = 0  # tokens written to the rings since the last rewind (host-side counter)
        self.device = device
        self.fused_writes = fused_writes  # attention layers write their K/V through `buffers` (SessionConfig.fused_qkv)

    # --- writing ---------------------------------------------------------------------------
    def prefix_slots(self, start: int, length: int) -> torch.Tensor:
        if start + length > self.prefix_capacity:
            raise CacheFull(f"prefix of {start + length} tokens exceeds max_prefix {self.prefix_capacity}")
        return torch.arange(start, start + length, device=self.device)

    def ring_slot_numbers(self, length: int) -> dict[str, list[int]]:
        """Claim the ring slots of the next `length` tokens, per layer type, as host numbers (no GPU launch: the
        decode step's CUDA graph stages them with its other inputs in one copy)."""
        start = self.ring_written
        self.ring_written += length
        return {t: [self.prefix_capacity + (start + i) % r for i in range(length)] for t, r in self.ring_size.items()}

    def place(self, slots: dict[str, torch.Tensor], positions: torch.Tensor, blocks: torch.Tensor) -> None:
        """Claim `slots` for a chunk of tokens at `positions` with image-block ids `blocks`."""
        for t, s in slots.items():
            self.slot_pos[t].index_copy_(0, s, positions)
            self.slot_block[t].index_copy_(0, s, blocks)
        self.cur_slots = slots

    def buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer's whole K and V buffers and the slots the current chunk writes to, for an attention layer that
        writes them itself (`fused_writes`: network.Attention through triton_qkv.py)."""
        return self.k[layer], self.v[layer], self.cur_slots[self.layer_types[layer]]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Called by each attention layer: store this chunk's K/V, return the layer's whole buffers."""
        slots = self.cur_slots[self.layer_types[layer]]
        self.k[layer].index_copy_(2, slots, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, slots, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]

    # --- housekeeping ------------------------------------------------------------------------
    def rewind(self) -> None:
        """Back to the prefix: a pointer move. Stale ring slots are excluded from every later mask
        because the next frame rewrites the same slots with the same positions, in order, and
        whatever lies beyond sits at later positions (causal) in older image blocks."""
        self.ring_written = 0

    def clear(self) -> None:
        for t in self.capacity:
            self.slot_pos[t].fill_(EMPTY)
            self.slot_block[t].fill_(-1)
        self.ring_written = 0

    def clear_ring(self) -> None:
        for t in self.capacity:
            self.slot_pos[t][self.prefix_capacity:] = EMPTY
            self.slot_block[t][self.prefix_capacity:] = -1
        self.ring_written = 0

    def evict(self, start: int, end: int) -> None:
        """Forget the tokens at positions [start, end) (an evicted frame block)."""
        for t in self.capacity:
            pos = self.slot_pos[t]
            gone = (pos >= start) & (pos < end)
            pos.masked_fill_(gone, EMPTY)
            self.slot_block[t].masked_fill_(gone, -1)

    def live_ring_positions(self, t: str) -> torch.Tensor:
        ring = self.slot_pos[t][self.prefix_capacity:]
        return ring[ring > EMPTY]

    def rebase(self, delta: int, rope_inv_freq: dict[str, torch.Tensor]) -> None:
        """Shift every cached token down by `delta` positions: rotate its K by -delta (exact for RoPE:
        R(p - d) = R(-d) R(p), the angle taken in float64) and relabel its position. Every relative
        distance is unchanged, so attention is unchanged; positions just stay small."""
        for t in self.capacity:
            pos = self.slot_pos[t]
            live = pos > EMPTY
            angle = -float(delta) * rope_inv_freq[t].double().to(self.device)
            cos = torch.cat([angle.cos(), angle.cos()])
            sin = torch.cat([angle.sin(), angle.sin()])
            for i, lt in enumerate(self.layer_types):
                if lt != t:
                    continue
                k = self.k[i]
                sel = k[:, :, live].double()
                half = sel.shape[-1] // 2
                rotated = sel * cos + torch.cat([-sel[..., half:], sel[..., :half]], dim=-1) * sin
                k[:, :, live] = rotated.to(k.dtype)
            pos[live] -= delta
