"""Gemma 4 Unified in plain PyTorch: the one model definition every backend is exported from.

    patches -> VisionEmbedder ----------------------\
    token ids -> embed_tokens * sqrt(hidden) --------+-> decoder layers -> norm -> tied head -> softcap

Decoder layers alternate sliding-window and full attention, each type with its own head_dim,
KV-head count and RoPE. Attention runs over an optional KV cache (see engine/kv_cache.py) through a
small protocol: `cache.update(layer, k, v) -> (k_all, v_all)`; masks come from token positions, so
one mask rule serves the uncached reference forward and the streaming engine alike.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import triton_attention, triton_gelu, triton_norms, triton_qkv
from .config import FULL, SLIDING, LayerSpec, ModelConfig


class RMSNorm(nn.Module):
    """Gemma 4 RMSNorm: computed in float32, multiplied by `weight` (not 1 + weight); optionally scale-free."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    y = x.float()
    y = y * torch.pow(y.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        y = y * weight.float()
    return y.type_as(x)


def no_gradient(*tensors: torch.Tensor) -> bool:
    """Whether no gradient is wanted through these: our CUDA kernels (custom ops) have no backward, so training
    (demo/train.py --device cuda) takes the modules' own form."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def add_and_norm(h: torch.Tensor, y: torch.Tensor, post: RMSNorm, pre: RMSNorm, scale: torch.Tensor | None = None):
    """A sub-block's output y joins the residual stream h: returns (h + post(y)) [* scale] and pre() of it,
    the next sub-block's input. On CUDA one kernel (triton_norms.py), rounding where these modules round."""
    weights = (post.weight, pre.weight)
    if h.is_cuda and triton_norms.available() and y.dtype == h.dtype and all(w is not None for w in weights) \
            and no_gradient(h, y, *weights):
        return torch.ops.gemma4_agent.add_norms(h, y, *weights, scale, post.eps, pre.eps)
    return add_and_norm_modules(h, y, post, pre, scale)


def add_and_norm_modules(h, y, post: RMSNorm, pre: RMSNorm, scale=None):
    """add_and_norm by the modules themselves (CPU, exporters; the kernel's reference)."""
    h = h + post(y)
    if scale is not None:
        h = h * scale
    return h, pre(h)


def rope_inv_freq(spec: LayerSpec) -> torch.Tensor:
    """Inverse frequencies, head_dim // 2 of them. 'proportional' rotates only the first
    partial_rotary_factor of the pairs; the rest get frequency 0 (cos 1, sin 0: passed through)."""
    dim, theta = spec.head_dim, spec.rope.rope_theta
    if spec.rope.rope_type == "default":
        return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rotated = int(spec.rope.partial_rotary_factor * dim // 2)
    inv = 1.0 / (theta ** (torch.arange(0, 2 * rotated, 2, dtype=torch.float32) / dim))
    return torch.cat([inv, torch.zeros(dim // 2 - rotated)])


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, seq, heads, head_dim]; cos/sin: [seq, head_dim]."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


EMPTY = -(1 << 62)  # position of an empty cache slot (real positions may go negative after a re-base)


def attention_mask(q_pos, k_pos, q_block, k_block, window: int | None) -> torch.Tensor:
    """Boolean mask [batch, 1, q, k] (True = attend), as transformers' generate path builds it.

    Full layers: causal. Sliding layers: (causal OR same image block) AND within `window`.
    Key position EMPTY marks an empty cache slot; block id -1 means "not an image token".
    """
    causal = k_pos[None, :] <= q_pos[:, None]
    if window is None:
        allowed = causal[None]
    else:
        same_block = (q_block[:, :, None] == k_block[:, None, :]) & (q_block[:, :, None] >= 0)
        in_window = (q_pos[:, None] - k_pos[None, :]) < window
        allowed = (causal[None] | same_block) & in_window[None]
    return (allowed & (k_pos > EMPTY)[None, None, :])[:, None]


def image_block_ids(mm_token_type_ids: torch.Tensor) -> torch.Tensor:
    """Each contiguous run of image tokens (type 1 or 2) gets its own id; other tokens get -1."""
    is_vision = (mm_token_type_ids == 1) | (mm_token_type_ids == 2)
    prev = torch.zeros_like(is_vision)
    prev[:, 1:] = is_vision[:, :-1]
    starts = is_vision & ~prev
    return torch.where(is_vision, torch.cumsum(starts.long(), dim=1) - 1, torch.full_like(mm_token_type_ids, -1))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        text = cfg.text_config
        self.num_heads, self.num_kv_heads, self.head_dim = text.num_attention_heads, spec.num_kv_heads, spec.head_dim
        self.q_proj = nn.Linear(text.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(text.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        # K = V layers have no v_proj: V is v_norm(k_proj(x)), taken before k_norm and RoPE.
        self.v_proj = None if spec.k_eq_v else nn.Linear(text.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, text.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, text.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, text.rms_norm_eps)
        self.v_norm = RMSNorm(self.head_dim, text.rms_norm_eps, with_scale=False)

    def forward(self, x, cos, sin, mask, cache=None, layer_idx: int = 0):
        batch, seq, _ = x.shape
        names = ("q_proj", "k_proj") if self.v_proj is None else ("q_proj", "k_proj", "v_proj")
        q, k_raw, *v_raw = project(self, x, names)
        v_raw = v_raw[0] if v_raw else k_raw
        if cache is not None and batch == 1 and getattr(cache, "fused_writes", False) and self._fusable(x):
            # on CUDA one kernel: norms, RoPE and the cache write (triton_qkv.py)
            k, v, slots = cache.buffers(layer_idx)
            q = torch.ops.gemma4_agent.qkv_to_cache(q[0], k_raw[0], v_raw[0], cos, sin, self.q_norm.weight,
                                                    self.k_norm.weight, self.q_norm.eps, k, v, slots)[None]
        else:
            q = apply_rope(self.q_norm(q.view(batch, seq, self.num_heads, self.head_dim)), cos, sin)
            k_raw = k_raw.view(batch, seq, self.num_kv_heads, self.head_dim)
            v_raw = v_raw.view(batch, seq, self.num_kv_heads, self.head_dim)
            k = apply_rope(self.k_norm(k_raw), cos, sin).transpose(1, 2)
            v = self.v_norm(v_raw).transpose(1, 2)
            if cache is not None:
                k, v = cache.update(layer_idx, k, v)
        out = sdpa(q.transpose(1, 2), k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))

    def _fusable(self, x: torch.Tensor) -> bool:
        # the three norms share rms_norm_eps (see __init__), which the op takes once
        return x.is_cuda and triton_qkv.available() and no_gradient(x, self.q_norm.weight, self.k_norm.weight)


def sdpa(q, k, v, mask):
    """Scaled dot-product attention with scale 1.0 (q/k norms do the scaling) and grouped KV heads.

    The query heads sharing a KV head are folded into the query axis instead of repeating K and V:
    the same arithmetic without copying the cache (a 16x copy on the 12B's one-KV-head full layers)."""
    batch, heads, seq, dim = q.shape
    groups = heads // k.shape[1]
    if groups > 1:
        q = q.reshape(batch, k.shape[1], groups * seq, dim)
    if batch == 1 and q.is_cuda and q.dtype != torch.float32 and triton_attention.available() and no_gradient(q, k, v):
        # Triton's split-K flash attention over the masked cache (fp32 stays below: tl.dot would use tf32);
        # for long chunks it, PyTorch's fused SDPA or two cuBLAS matmuls around a masked softmax, whichever is
        # fastest at the shape (triton_attention.py). It takes the mask once for every group of query rows, so no
        # layer repeats it
        return torch.ops.gemma4_agent.cache_attention(q[0], k[0], v[0], mask[0, 0])[None].reshape(
            batch, heads, seq, v.shape[-1])
    if groups > 1:
        mask = mask.repeat(1, 1, groups, 1)
    if q.shape[2] <= 32:
        # Decode-sized queries: two small matmuls beat a fused kernel's fixed cost over a masked cache
        # (measured on H200: 61 us per layer for cuDNN flash at one query). Softmax in float32.
        scores = torch.matmul(q, k.transpose(-1, -2)).float().masked_fill(~mask, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    return out.reshape(batch, heads, seq, v.shape[-1])


def gelu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up; on CUDA one kernel (triton_gelu.py) that rounds where this eager form rounds."""
    if gate.is_cuda and triton_gelu.available() and gate.dtype == up.dtype and gate.shape == up.shape \
            and no_gradient(gate, up):
        return torch.ops.gemma4_agent.gelu_mul(gate, up)
    return F.gelu(gate, approximate="tanh") * up


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        gate, up = project(self, x, ("gate_proj", "up_proj"))
        return self.down_proj(gelu_mul(gate, up))


def project(owner: nn.Module, x: torch.Tensor, names: tuple) -> list:
    """The outputs of `owner`'s linear layers `names` on the same input: one matmul where the engine has
    joined them (engine/fusion.py keeps the joined weight outside the module tree, so checkpoints are unchanged)."""
    joined = owner.__dict__.get("joined")
    if joined is not None:
        return list(joined(x).split(owner.__dict__["joined_sizes"], dim=-1))
    return [getattr(owner, name)(x) for name in names]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        text = cfg.text_config
        self.layer_type = spec.layer_type
        self.self_attn = Attention(cfg, spec)
        self.mlp = MLP(text.hidden_size, text.intermediate_size)
        eps = text.rms_norm_eps
        self.input_layernorm = RMSNorm(text.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(text.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(text.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(text.hidden_size, eps)
        self.register_buffer("layer_scalar", torch.ones(1))

    def forward(self, h, x, cos, sin, mask, next_norm: RMSNorm, cache=None, layer_idx: int = 0):
        """h: the residual stream; x: input_layernorm(h) (the previous layer computed it with its own residual
        add). Returns the new residual stream and next_norm of it (the next layer's input norm, or the final one)."""
        h, x = add_and_norm(h, self.self_attn(x, cos, sin, mask, cache, layer_idx), self.post_attention_layernorm,
                            self.pre_feedforward_layernorm)
        return add_and_norm(h, self.mlp(x), self.post_feedforward_layernorm, next_norm, self.layer_scalar)


class VisionEmbedder(nn.Module):
    """Raw 48x48x3 patches -> LN -> Linear -> LN -> + factorized (x, y) position table -> LN
    -> scale-free RMSNorm -> Linear into the decoder's hidden size. No vision tower."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        vision, hidden = cfg.vision_config, cfg.text_config.hidden_size
        self.patch_ln1 = nn.LayerNorm(vision.patch_dim)
        self.patch_dense = nn.Linear(vision.patch_dim, vision.mm_embed_dim)
        self.patch_ln2 = nn.LayerNorm(vision.mm_embed_dim)
        self.pos_embedding = nn.Parameter(torch.zeros(vision.mm_posemb_size, 2, vision.mm_embed_dim))
        self.pos_norm = nn.LayerNorm(vision.mm_embed_dim)
        self.pre_projection_norm = RMSNorm(vision.output_proj_dims, vision.rms_norm_eps, with_scale=False)
        self.projection = nn.Linear(vision.output_proj_dims, hidden, bias=False)

    def forward(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """patches [..., P, patch_dim], positions [..., P, 2] (x, y; -1 marks padding) -> [..., P, hidden]."""
        x = self.patch_ln2(self.patch_dense(self.patch_ln1(patches.to(self.patch_dense.weight.dtype))))
        valid = (positions != -1).to(x.dtype).unsqueeze(-1)
        axes = torch.arange(2, device=positions.device)
        x = self.pos_norm(x + (self.pos_embedding[positions.clamp(min=0).long(), axes] * valid).sum(-2))
        return self.projection(self.pre_projection_norm(x))


class Gemma4(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        text = cfg.text_config
        self.vision = VisionEmbedder(cfg)
        self.embed_tokens = nn.Embedding(text.vocab_size, text.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, spec) for spec in text.layers)
        self.norm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        self.layer_types = list(text.layer_types)
        self.windows = {SLIDING: text.sliding_window, FULL: None}
        self._init_rope()

    def _init_rope(self, device=None) -> None:
        """Non-persistent RoPE tables, one per layer type (every layer of a type shares head_dim and theta)."""
        for layer_type in set(self.layer_types):
            specs = {self.config.text_config.layer(i).model_dump_json() for i, t in enumerate(self.layer_types) if t == layer_type}
            spec = self.config.text_config.layer(self.layer_types.index(layer_type))
            if len({LayerSpec.model_validate_json(s).head_dim for s in specs}) != 1:
                raise ValueError(f"layers of type {layer_type} must share one head_dim")
            self.register_buffer(f"inv_freq_{layer_type}", rope_inv_freq(spec).to(device), persistent=False)

    # --- pieces the engine and exporters call ------------------------------------------------
    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings scaled by sqrt(hidden) (cast to the weight dtype, as transformers does);
        image tokens are replaced, unscaled, by `image_embeds` ([num_image_tokens, hidden], in order)."""
        image_mask = input_ids == self.config.image_token_id
        ids = torch.where(image_mask, self.config.text_config.pad_token_id, input_ids)
        h = self.embed_tokens(ids)  # nn.Embedding, or the int4 one (gathers and dequantizes rows)
        h = h * torch.tensor(self.config.text_config.hidden_size**0.5, dtype=torch.float32).to(h.dtype)
        if image_embeds is not None:
            h = h.masked_scatter(image_mask[..., None], image_embeds.to(h.dtype))
        return h

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> dict:
        return {t: rope_cos_sin(positions, getattr(self, f"inv_freq_{t}"), dtype) for t in set(self.layer_types)}

    def decode(self, h: torch.Tensor, positions: torch.Tensor, masks: dict, cache=None,
               rope: dict | None = None) -> torch.Tensor:
        """Run the decoder layers over embeddings h [batch, seq, hidden] at `positions` [seq];
        `masks` maps layer type -> boolean mask (see attention_mask), `rope` layer type -> (cos, sin) where the
        caller has them (self.rope). Returns final-normed hidden states."""
        rope = rope if rope is not None else self.rope(positions, h.dtype)
        x = self.layers[0].input_layernorm(h)
        next_norms = [layer.input_layernorm for layer in self.layers[1:]] + [self.norm]
        for i, (layer, next_norm) in enumerate(zip(self.layers, next_norms)):
            cos, sin = rope[layer.layer_type]
            h, x = layer(h, x, cos, sin, masks[layer.layer_type], next_norm, cache, i)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        int4_head = getattr(self.embed_tokens, "matmul", None)  # a quantized tied embedding runs its own kernel
        logits = int4_head(hidden) if int4_head is not None else F.linear(hidden, self.embed_tokens.weight)
        cap = self.config.text_config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def masks(self, q_pos, k_pos, q_block, k_block) -> dict:
        return {t: attention_mask(q_pos, k_pos, q_block, k_block, self.windows[t]) for t in set(self.layer_types)}

    # --- the reference forward (transformers' layout) ----------------------------------------
    def forward(self, input_ids, pixel_values=None, image_position_ids=None, mm_token_type_ids=None):
        """Logits [batch, seq, vocab] for whole sequences, positions 0..seq-1.

        pixel_values [num_images, max_patches, patch_dim] and image_position_ids [num_images, max_patches, 2]
        follow the transformers processor's layout (padding rows at position (-1, -1)). Like transformers'
        generate, image tokens attend bidirectionally (sliding layers only) when mm_token_type_ids is given.
        """
        image_embeds = None
        if pixel_values is not None:
            embeds = self.vision(pixel_values, image_position_ids)
            image_embeds = embeds[(image_position_ids != -1).all(dim=-1)]
        h = self.embed(input_ids, image_embeds)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        if mm_token_type_ids is None:
            blocks = torch.full_like(input_ids, -1)
        else:
            blocks = image_block_ids(mm_token_type_ids.to(input_ids.device))
        return self.logits(self.decode(h, positions, self.masks(positions, positions, blocks, blocks)))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(cfg: ModelConfig, device="cpu", dtype=torch.float32, seed: int = 0) -> Gemma4:
    """A randomly initialised model (tests, benchmarks at a config's shape). Built on the meta device
    and materialised in place on `device`, so a 12B model never passes through host memory."""
    with torch.device("meta"):
        model = Gemma4(cfg)
    if str(device) == "meta":
        return model.eval()
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=gen)
            elif name.endswith("pos_embedding"):
                p.normal_(0.0, 0.02, generator=gen)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
        for layer in model.layers:
            layer.layer_scalar.fill_(1.0)
    model._init_rope(device)
    return model.eval().requires_grad_(False)
