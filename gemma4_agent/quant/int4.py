"""INT4 weight-only quantization of Gemma 4's decoder linears (and optionally the tied embedding).

Schemes
    q4_0      symmetric, groups of 32, GGUF Q4_0 bit for bit (ggml's quantize_row_q4_0_ref):
              d = max / -8 (max = the element of largest magnitude, sign kept), id = 1/d (0 if d == 0),
              q = min(15, trunc(x * id + 8.5)), d stored as fp16; dequant w = (q - 8) * d.
    awq-g128  asymmetric, groups of 128, integer zero-points: w = (q - z) * s, s fp16, z in 0..15, with
              activation-aware per-input-channel scales searched on calibration activations and folded
              into the preceding RMSNorm (q/k/v, gate/up), into up_proj's rows (down_proj) or kept as an
              input scaling of the layer (o_proj).

Portable checkpoint layout, per quantized module (names under the module's prefix):
    qweight      uint8 [out, in/2]     two nibbles per byte: element 2j in the low nibble, 2j+1 in the high one
    scales       int16 [out, in/group] the fp16 bit pattern of the scale (integers keep their dtype in the loader,
                                       so the fp16 value survives any load dtype exactly)
    zeros        uint8 [out, in/group] integer zero-points (awq only; q4_0's is 8)
    input_scale  float [in]            awq layers whose scale could not be folded: the input is multiplied by it
On CUDA the Triton kernels of `triton_q4` read this layout directly (the weights are in GPU memory once).
The other packed layouts (the CPU int4pack kernel; tinygemm on CUDA where Triton is missing) are
device-specific and built from this on first use (or by `to_device_kernel(model)`), then cached on the module.
"""
from __future__ import annotations

import json
import math
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import triton_q4

SCHEMES = {
    "q4_0": {"group_size": 32, "symmetric": True},
    "awq-g128": {"group_size": 128, "symmetric": False},
}
FORMAT = 1
METADATA_KEY = "gemma4_agent.quantization"
DECODER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
KERNEL_GROUP_SIZES = (32, 64, 128, 256)


# --------------------------------------------------------------------------------------------
# quantization math (portable layout)
# --------------------------------------------------------------------------------------------
def _groups(w: torch.Tensor, group: int) -> torch.Tensor:
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    out, inp = w.shape
    if inp % group:
        raise ValueError(f"in_features {inp} is not a multiple of the group size {group}")
    return w.detach().to(torch.float32).reshape(out, inp // group, group)


def quantize_q4_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF Q4_0 of a [out, in] weight -> (q uint8 [out, in] in 0..15, d float16 [out, in/32]).

    Exactly ggml's quantize_row_q4_0_ref in float32: first element of largest |x| gives max (an all-zero
    group keeps max = +0, so d = -0), d = max / -8, id = d ? 1/d : 0, q = min(15, (int8)(x*id + 8.5))."""
    x = _groups(w, 32)
    amax, idx = x.abs().max(dim=-1, keepdim=True)  # first index of the maximum, like ggml's strict '<'
    mx = torch.gather(x, -1, idx)
    mx = torch.where(amax == 0, torch.zeros_like(mx), mx)
    d = mx / -8.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    t = x * inv  # separate float32 roundings (no FMA), as the C reference
    t = t + 8.5
    q = torch.trunc(t).clamp(0, 15).to(torch.uint8)
    return q.reshape(w.shape), d[..., 0].to(torch.float16)


def quantize_asymmetric(w: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max int4 (range widened to include 0) -> (q uint8 [out, in], scale float16 [out, in/g],
    zero uint8 [out, in/g]); w ~ (q - zero) * scale. The scale is rounded to fp16 before q is computed."""
    x = _groups(w, group)
    mn = x.amin(-1).clamp(max=0)
    mx = x.amax(-1).clamp(min=0)
    s = (mx - mn) / 15.0
    s = torch.where(s > 0, s, torch.ones_like(s)).to(torch.float16)
    s = torch.where(s > 0, s, torch.full_like(s, 2.0 ** -24))  # fp16 underflow: smallest subnormal
    s32 = s.float()
    z = torch.round(-mn / s32).clamp(0, 15)
    q = (torch.round(x / s32[..., None]) + z[..., None]).clamp(0, 15).to(torch.uint8)
    return q.reshape(w.shape), s, z.to(torch.uint8)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in] values 0..15 -> uint8 [out, in/2] (even column in the low nibble)."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_nibbles: uint8 [out, in/2] -> uint8 [out, in]."""
    return torch.stack([p & 0xF, p >> 4], dim=-1).reshape(p.shape[0], -1)


def dequantize(qweight: torch.Tensor, scales_fp16: torch.Tensor, zeros: torch.Tensor | None, group: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Portable layout -> dense weight: (q - z) * s computed in float32 (exact for q4_0), then cast."""
    q = unpack_nibbles(qweight).to(torch.float32)
    out, inp = q.shape
    z = 8.0 if zeros is None else zeros.to(torch.float32)[..., None]
    s = scales_fp16.to(torch.float32)[..., None]
    w = (q.reshape(out, inp // group, group) - z) * s
    return w.reshape(out, inp).to(dtype)


def fake_quantize(w: torch.Tensor, scheme: str) -> torch.Tensor:
    """Quantize then dequantize (float32), the reference a quantized layer must reproduce."""
    group = SCHEMES[scheme]["group_size"]
    if SCHEMES[scheme]["symmetric"]:
        q, d = quantize_q4_0(w)
        return dequantize(pack_nibbles(q), d, None, 32)
    q, s, z = quantize_asymmetric(w, group)
    return dequantize(pack_nibbles(q), s, z, group)


def to_gguf_q4_0(qweight: torch.Tensor, scales_fp16: torch.Tensor) -> bytes:
    """Our q4_0 layout -> GGUF block_q4_0 bytes (row-major blocks of fp16 d + 16 bytes: q[j] | q[j+16] << 4)."""
    q = unpack_nibbles(qweight).reshape(-1, 32)
    qs = (q[:, :16] | (q[:, 16:] << 4)).to(torch.uint8)
    d = scales_fp16.reshape(-1, 1).contiguous().view(torch.uint8)  # little-endian fp16 bytes
    return torch.cat([d.reshape(-1, 2), qs], dim=1).contiguous().numpy().tobytes()


def _f16_bits(s: torch.Tensor) -> torch.Tensor:
    return s.to(torch.float16).contiguous().view(torch.int16)


def _bits_f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16)


# --------------------------------------------------------------------------------------------
# kernel selection
# --------------------------------------------------------------------------------------------
_BACKEND = ["auto"]


@contextmanager
def int4_backend(name: str):
    """'auto' (packed kernel on CPU/CUDA where the shape allows, else dequantize), 'kernel' (error where
    the kernel cannot run), 'dequant' (dense dequantized matmul in the activation dtype: fp32-exact)."""
    if name not in ("auto", "kernel", "dequant"):
        raise ValueError(f"unknown int4 backend {name!r}")
    old = _BACKEND[0]
    _BACKEND[0] = name
    try:
        yield
    finally:
        _BACKEND[0] = old


def _triton_ok(device: torch.device) -> bool:
    return device.type == "cuda" and triton_q4.available()


def _inner_k_tiles(k: int) -> int | None:
    for tiles in (8, 4, 2):
        if k % (tiles * 16) == 0:
            return tiles
    return None


class _Int4Weights(nn.Module):
    """Shared storage and matmul of Int4Linear / Int4Embedding: out_features rows of in_features."""

    def __init__(self, in_features: int, out_features: int, scheme: str, input_scale: bool = False, device=None):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"unknown int4 scheme {scheme!r}; known: {', '.join(SCHEMES)}")
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.group_size = SCHEMES[scheme]["group_size"]
        if in_features % self.group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of {scheme}'s group size {self.group_size}")
        groups = in_features // self.group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.int16, device=device))
        if SCHEMES[scheme]["symmetric"]:
            self.zeros = None
        else:
            self.register_buffer("zeros", torch.empty(out_features, groups, dtype=torch.uint8, device=device))
        if input_scale:
            self.register_buffer("input_scale", torch.ones(in_features, device=device))
        else:
            self.input_scale = None
        self._kernel = None  # (key, packed weight, scales_and_zeros); device-specific, rebuilt when stale

    def set_quantized(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                      input_scale: torch.Tensor | None = None) -> "_Int4Weights":
        device = self.qweight.device
        self.qweight = pack_nibbles(q).to(device)
        self.scales = _f16_bits(scales).to(device)
        if self.zeros is not None:
            self.zeros = zeros.to(torch.uint8).to(device)
        if input_scale is not None:
            self.input_scale = input_scale.to(device=device, dtype=torch.float32)
        self._kernel = None
        return self

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense [out, in] weight (the input scaling not applied)."""
        if self.__dict__.get("_released"):
            raise RuntimeError("the portable int4 weights were released after packing (to_device_kernel)")
        return dequantize(self.qweight, _bits_f16(self.scales), self.zeros, self.group_size, dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"
                + (", input_scale" if self.input_scale is not None else ""))

    # --- packed kernels ------------------------------------------------------------------------
    def _kernel_ok(self, device: torch.device) -> bool:
        if device.type not in ("cpu", "cuda") or self.group_size not in KERNEL_GROUP_SIZES:
            return False
        if device.type == "cuda" and not _triton_ok(device) and _inner_k_tiles(self.in_features) is None:
            return False
        return True

    def _packed(self, device: torch.device):
        if self._kernel is not None and torch.compiler.is_compiling():
            # under torch.compile the pack built before compiling is used as it is (a data-pointer check would
            # break the graph at every layer); the session packs before it compiles (to_device_kernel)
            return self._kernel[1], self._kernel[2]
        key = (str(device), self.qweight.data_ptr(), self.scales.data_ptr())
        if self._kernel is not None and (self._kernel[0] == key or self.__dict__.get("_released")):
            return self._kernel[1], self._kernel[2]
        n, k, g = self.out_features, self.in_features, self.group_size
        n_pad = -n % 16  # CPU needs N % 16, tinygemm N % 8: pad rows with zero weights, slice the output
        q = unpack_nibbles(self.qweight).to(torch.int32)
        s = _bits_f16(self.scales).to(torch.float32)
        zero = torch.zeros_like(s) if self.zeros is None else (8.0 - self.zeros.to(torch.float32)) * s
        if n_pad:
            q = torch.cat([q, torch.full((n_pad, k), 8, dtype=torch.int32, device=q.device)])
            s = torch.cat([s, torch.zeros(n_pad, s.shape[1], device=s.device)])
            zero = torch.cat([zero, torch.zeros(n_pad, zero.shape[1], device=zero.device)])
        # kernel: w = (q - 8) * scale + zero, scales_and_zeros [K/g, N, 2]
        sz = torch.stack([s, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16).to(device)
        if device.type == "cuda":
            q = q.to(device)
            packed = torch.ops.aten._convert_weight_to_int4pack(
                (q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8).contiguous(), _inner_k_tiles(k))
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
        self._kernel = (key, packed, sz)
        return packed, sz

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> x @ W^T [..., out] in x's dtype."""
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        mode = _BACKEND[0]
        use_kernel = mode != "dequant" and self._kernel_ok(x.device)
        if mode == "kernel" and not use_kernel:
            raise RuntimeError(f"no int4 kernel for {self.extra_repr()} on {x.device}")
        if not use_kernel or x.numel() == 0:
            return F.linear(x, self.dequantize(x.dtype))
        shape = x.shape
        if _triton_ok(x.device):  # the portable layout as it is: no second copy of the weights
            y = torch.ops.gemma4_agent.int4_matmul(x.reshape(-1, self.in_features).contiguous(), self.qweight,
                                                   self.scales, self.zeros, self.group_size)
            return y.reshape(*shape[:-1], self.out_features)
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        packed, sz = self._packed(x.device)
        if x.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2, packed, self.group_size, sz)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, self.group_size, sz)
        return y[:, : self.out_features].to(x.dtype).reshape(*shape[:-1], self.out_features)


class Int4Linear(_Int4Weights):
    """Bias-free linear layer over packed int4 weights (drop-in for the decoder's nn.Linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)

    @classmethod
    def from_float(cls, linear: nn.Linear, scheme: str, input_scale: torch.Tensor | None = None) -> "Int4Linear":
        """Quantize `linear.weight` (already multiplied by 1/input_scale's inverse where AWQ scaled it)."""
        if linear.bias is not None:
            raise ValueError("Int4Linear has no bias")
        w = linear.weight
        mod = cls(linear.in_features, linear.out_features, scheme, input_scale is not None, device=w.device)
        return mod.set_quantized(*_quantize(w, scheme), input_scale=input_scale)


def join_int4(mods: list[Int4Linear]) -> Int4Linear | None:
    """One Int4Linear over the rows of `mods` (same input size, scheme and device, no input scaling, portable
    weights still held); each original's buffers become views of its rows. None where that cannot be."""
    first = mods[0]
    same = {(m.in_features, m.scheme, m.qweight.device) for m in mods}
    if len(same) != 1 or any(m.input_scale is not None or m.__dict__.get("_released") for m in mods):
        return None
    joined = Int4Linear(first.in_features, sum(m.out_features for m in mods), first.scheme, device="meta")
    for name in ("qweight", "scales", "zeros"):
        if getattr(first, name) is None:
            continue
        whole = torch.cat([getattr(m, name) for m in mods])
        setattr(joined, name, whole)
        start = 0
        for m in mods:
            setattr(m, name, whole[start:start + m.out_features])
            start += m.out_features
    for m in mods:
        m._kernel = None
    return joined


def _quantize(w: torch.Tensor, scheme: str):
    if SCHEMES[scheme]["symmetric"]:
        q, d = quantize_q4_0(w)
        return q, d, None
    return quantize_asymmetric(w, SCHEMES[scheme]["group_size"])


# --------------------------------------------------------------------------------------------
# the tied embedding / LM head
# --------------------------------------------------------------------------------------------
class Int4Weight(torch.Tensor):
    """Stand-in for `embed_tokens.weight` of a quantized embedding: F.embedding gathers and dequantizes
    rows, F.linear (the tied LM head) runs the int4 matmul, metadata (dtype, device, shape) reads as the
    float weight's; any other use gets the dequantized tensor."""

    @staticmethod
    def __new__(cls, owner: "Int4Embedding", dtype: torch.dtype):
        t = torch.Tensor._make_wrapper_subclass(cls, (owner.out_features, owner.in_features), dtype=dtype,
                                                device=owner.qweight.device, requires_grad=False)
        t._owner = owner
        return t

    def __repr__(self):  # noqa: D105
        return f"Int4Weight({self._owner.extra_repr()}, dtype={self.dtype})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding:
            ids, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            return weight._owner.lookup(ids, weight.dtype)
        if func is F.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            y = weight._owner.matmul(x)
            return y if bias is None else y + bias
        with torch._C.DisableTorchFunctionSubclass():  # metadata reads stay here; real ops reach __torch_dispatch__
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        deq = lambda a: a._owner.dequantize(a.dtype) if isinstance(a, Int4Weight) else a  # noqa: E731
        return func(*(deq(a) for a in args), **{k: deq(v) for k, v in (kwargs or {}).items()})


class Int4Embedding(_Int4Weights):
    """Quantized tied embedding: rows are token embeddings, `weight` is an Int4Weight (see above), so
    Gemma4.embed (F.embedding) and Gemma4.logits (F.linear) run unchanged."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: str, device=None):
        super().__init__(embedding_dim, num_embeddings, scheme, input_scale=False, device=device)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.__dict__["_dtype_from"] = None  # a module whose .weight carries the compute dtype (not a submodule)

    def compute_dtype(self) -> torch.dtype:
        ref = self.__dict__.get("_dtype_from")
        w = getattr(ref, "weight", None) if ref is not None else None
        return w.dtype if w is not None and w.is_floating_point() and w.device.type != "meta" else torch.float32

    @property
    def weight(self) -> Int4Weight:
        return Int4Weight(self, self.compute_dtype())

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = dequantize(self.qweight[flat], _bits_f16(self.scales[flat]),
                          None if self.zeros is None else self.zeros[flat], self.group_size, dtype)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lookup(ids, self.compute_dtype())

    @classmethod
    def from_float(cls, emb: nn.Embedding, scheme: str) -> "Int4Embedding":
        mod = cls(emb.num_embeddings, emb.embedding_dim, scheme, device=emb.weight.device)
        return mod.set_quantized(*_quantize(emb.weight, scheme))


# --------------------------------------------------------------------------------------------
# model-level: prepare (loader), quantize, save
# --------------------------------------------------------------------------------------------
def decoder_linears(model) -> list[tuple[str, nn.Module]]:
    """(module name, module) of every decoder linear, in layer order."""
    found = []
    for i, layer in enumerate(model.layers):
        for attr in DECODER_LINEARS:
            parent, _, leaf = attr.rpartition(".")
            mod = getattr(layer.get_submodule(parent), leaf)
            if mod is not None:
                found.append((f"layers.{i}.{attr}", mod))
    return found


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _metadata(scheme: str, include_embedding: bool, input_scaled: list[str]) -> dict:
    return {"scheme": scheme, "group_size": SCHEMES[scheme]["group_size"],
            "layers": "decoder_linear+embedding" if include_embedding else "decoder_linear",
            "format": FORMAT, "input_scale": sorted(set(input_scaled))}


def prepare_quantized_model(model, meta: dict) -> None:
    """Swap the (meta-device) model's decoder linears (and the embedding, if quantized) for int4 modules whose
    buffers have the checkpoint's names and shapes; called by load_model for quantized checkpoints."""
    if int(meta.get("format", 0)) != FORMAT:
        raise ValueError(f"quantized checkpoint format {meta.get('format')!r} is not supported (expected {FORMAT})")
    scheme = meta.get("scheme")
    if scheme not in SCHEMES:
        raise ValueError(f"quantized checkpoint has unknown scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    if int(meta.get("group_size", SCHEMES[scheme]["group_size"])) != SCHEMES[scheme]["group_size"]:
        raise ValueError(f"scheme {scheme} uses group size {SCHEMES[scheme]['group_size']}, "
                         f"the checkpoint says {meta['group_size']}")
    scaled = set(meta.get("input_scale", []))
    for name, lin in decoder_linears(model):
        suffix = name.split(".", 2)[2]
        mod = Int4Linear(lin.in_features, lin.out_features, scheme, input_scale=suffix in scaled,
                         device=lin.weight.device)
        _set(model, name, mod)
    if "embedding" in str(meta.get("layers", "")):
        emb = model.embed_tokens
        new = Int4Embedding(emb.num_embeddings, emb.embedding_dim, scheme, device=emb.weight.device)
        new.__dict__["_dtype_from"] = model.norm
        model.embed_tokens = new
    model.int4_metadata = dict(meta)


def to_device_kernel(model: nn.Module, device: str | torch.device | None = None,
                     release_portable: bool = False) -> nn.Module:
    """Build (and cache) the packed kernel layout of every int4 module now, e.g. before CUDA-graph capture.

    release_portable: free the portable buffers of Int4Linear modules once packed (deployment: the weights
    then sit in device memory once, in the kernel's layout; the model can no longer be saved or moved)."""
    for mod in model.modules():
        if isinstance(mod, _Int4Weights):
            dev = torch.device(device) if device is not None else mod.qweight.device
            if mod._kernel_ok(dev) and not _triton_ok(dev):  # Triton reads the portable layout itself
                mod._packed(dev)
                if release_portable and isinstance(mod, Int4Linear):
                    for name in ("qweight", "scales", "zeros"):
                        t = getattr(mod, name)
                        if t is not None:
                            setattr(mod, name, t.new_empty(0))
                    mod.__dict__["_released"] = True
    return model


# --- calibration + AWQ -------------------------------------------------------------------------
@torch.no_grad()
def collect_activations(model, batches: Iterable[dict], names: list[str] | None = None, max_tokens: int = 512,
                        seed: int = 0) -> dict[str, torch.Tensor]:
    """Run model(**batch) for each batch and keep up to max_tokens input rows (float32, CPU) per decoder linear."""
    mods = dict(decoder_linears(model))
    names = names or list(mods)
    store: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [mods[n].register_forward_hook(lambda m, inp, out, n=n: store[n].append(
        inp[0].detach().reshape(-1, inp[0].shape[-1]).float().cpu())) for n in names]
    try:
        for batch in batches:
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    gen = torch.Generator().manual_seed(seed)
    acts = {}
    for n, rows in store.items():
        if not rows:
            raise ValueError("calibration produced no activations (empty calibration set)")
        x = torch.cat(rows)
        if x.shape[0] > max_tokens:
            x = x[torch.randperm(x.shape[0], generator=gen)[:max_tokens]]
        acts[n] = x
    return acts


@torch.no_grad()
def awq_search_scale(x: torch.Tensor, weights: list[torch.Tensor], group: int = 128, grid: int = 20
                     ) -> tuple[torch.Tensor, dict[float, float]]:
    """AWQ's scale search for linears sharing the input x [n, in]: s = mean|x|^alpha (normalised), alpha on
    a grid in [0, 1); the one minimising sum_i ||x W_i^T - (x / s) Q(W_i * s)^T||^2. Returns (s, {alpha: err});
    alpha 0 is plain asymmetric quantization, so the chosen s never does worse on x."""
    dev = weights[0].device
    x = x.to(dev, torch.float32)
    ws = [w.detach().float() for w in weights]
    refs = [x @ w.t() for w in ws]
    x_mean = x.abs().mean(0)
    errs: dict[float, float] = {}
    best, best_s = math.inf, torch.ones_like(x_mean)
    for i in range(grid):
        alpha = i / grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, ref in zip(ws, refs):
            wq = fake_quantize(w * s, "awq-g128" if group == 128 else _scheme_for(group))
            err += float(((x / s) @ wq.t() - ref).pow(2).mean())
        errs[alpha] = err
        if err < best:
            best, best_s = err, s
    return best_s, errs


def _scheme_for(group: int) -> str:
    for name, spec in SCHEMES.items():
        if spec["group_size"] == group and not spec["symmetric"]:
            return name
    raise ValueError(f"no asymmetric scheme with group {group}")


@torch.no_grad()
def _fold_norm(norm: nn.Module, s: torch.Tensor) -> None:
    norm.weight.copy_((norm.weight.float() / s.to(norm.weight.device)).to(norm.weight.dtype))


@torch.no_grad()
def _scale_in(linear: nn.Linear, s: torch.Tensor) -> None:
    linear.weight.copy_((linear.weight.float() * s.to(linear.weight.device)).to(linear.weight.dtype))


@torch.no_grad()
def _awq_layer(layer, prefix: str, acts: dict, group: int) -> dict[str, torch.Tensor]:
    """Search and apply the AWQ scales of one decoder layer (float weights); returns name -> input_scale for
    layers that keep one (o_proj). Folds are exact in float: the layer computes the same function."""
    attn, mlp = layer.self_attn, layer.mlp
    keep = {}
    # down_proj: h = gelu(gate) * up, so h / s = gelu(gate) * (up / s): fold into up_proj's rows (before gate/up).
    s, _ = awq_search_scale(acts[f"{prefix}.mlp.down_proj"], [mlp.down_proj.weight], group)
    mlp.up_proj.weight.copy_((mlp.up_proj.weight.float() / s[:, None].to(mlp.up_proj.weight.device))
                             .to(mlp.up_proj.weight.dtype))
    _scale_in(mlp.down_proj, s)
    # gate/up share pre_feedforward_layernorm's output
    s, _ = awq_search_scale(acts[f"{prefix}.mlp.gate_proj"], [mlp.gate_proj.weight, mlp.up_proj.weight], group)
    _fold_norm(layer.pre_feedforward_layernorm, s)
    _scale_in(mlp.gate_proj, s)
    _scale_in(mlp.up_proj, s)
    # q/k/v share input_layernorm's output
    qkv = [m for m in (attn.q_proj, attn.k_proj, attn.v_proj) if m is not None]
    s, _ = awq_search_scale(acts[f"{prefix}.self_attn.q_proj"], [m.weight for m in qkv], group)
    _fold_norm(layer.input_layernorm, s)
    for m in qkv:
        _scale_in(m, s)
    # o_proj: its input (attention output after v_norm) cannot absorb a per-channel scale: keep it in the layer
    s, _ = awq_search_scale(acts[f"{prefix}.self_attn.o_proj"], [attn.o_proj.weight], group)
    _scale_in(attn.o_proj, s)
    keep[f"{prefix}.self_attn.o_proj"] = 1.0 / s
    return keep


def _progress(items, desc: str, enabled: bool):
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return items
    return tqdm(items, desc=desc, unit="layer")


@torch.no_grad()
def quantize_model(model, scheme: str, calib=None, include_embedding: bool = False, progress: bool = True,
                   max_tokens: int = 512):
    """Quantize the model's decoder linears (and the tied embedding if asked) in place.

    calib (awq-g128 only, required there): a dict {linear name: activations [n, in]} or an iterable of
    model-forward kwargs dicts (input_ids, pixel_values, image_position_ids, mm_token_type_ids)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    group = SCHEMES[scheme]["group_size"]
    acts = None
    if not SCHEMES[scheme]["symmetric"]:
        if calib is None:
            raise ValueError(f"{scheme} needs calibration data (frames from a bag or an image folder)")
        acts = calib if isinstance(calib, dict) else collect_activations(model, calib, max_tokens=max_tokens)
    input_scales: dict[str, torch.Tensor] = {}
    for i in _progress(range(len(model.layers)), f"quantize {scheme}", progress):
        layer = model.layers[i]
        if acts is not None:
            input_scales.update(_awq_layer(layer, f"layers.{i}", acts, group))
        for attr in DECODER_LINEARS:
            parent, _, leaf = attr.rpartition(".")
            lin = getattr(layer.get_submodule(parent), leaf)
            if lin is None:
                continue
            name = f"layers.{i}.{attr}"
            setattr(layer.get_submodule(parent), leaf, Int4Linear.from_float(lin, scheme, input_scales.get(name)))
    if include_embedding:
        emb = Int4Embedding.from_float(model.embed_tokens, scheme)
        emb.__dict__["_dtype_from"] = model.norm
        model.embed_tokens = emb
    model.int4_metadata = _metadata(scheme, include_embedding, [n.split(".", 2)[2] for n in input_scales])
    return model


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of persistent tensors, split into int4 modules and the rest."""
    q = sum(t.numel() * t.element_size() for m in model.modules() if isinstance(m, _Int4Weights)
            for t in m.state_dict().values())
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"int4_modules": q, "other": total - q, "total": total}


def save_quantized(model, config_json: dict, out_dir: str | Path, source: str | Path | None = None,
                   float_dtype: torch.dtype | None = None) -> Path:
    """Write a quantized checkpoint folder that load_model reads: config.json + model.safetensors with the
    quantization metadata; tokenizer.json / agent.json copied from `source` if there (and a manifest written
    when the source is an engine folder)."""
    from safetensors.torch import save_file

    from ..model.loader import to_checkpoint_name

    meta = getattr(model, "int4_metadata", None)
    if not meta:
        raise ValueError("model is not quantized (run quantize_model first)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    tensors = {}
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu")
        if float_dtype is not None and t.is_floating_point() and not name.endswith("input_scale"):
            t = t.to(float_dtype)
        tensors[to_checkpoint_name(name)] = t.contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", METADATA_KEY: json.dumps(meta)})
    if source is not None:
        source = Path(source)
        for extra in ("tokenizer.json", "agent.json"):
            if (source / extra).is_file():
                shutil.copy2(source / extra, out / extra)
        if (source / "manifest.json").is_file():
            _write_manifest(source, out, meta["scheme"])
    return out


def _write_manifest(source: Path, out: Path, scheme: str) -> None:
    from ..engines.manifest import read_manifest, write_manifest
    from ..model.config import ModelConfig

    try:
        manifest = read_manifest(source, verify_files=False)
    except ValueError as exc:  # not a usable engine folder: leave the output a plain checkpoint
        warnings.warn(f"source manifest not copied: {exc}")
        return
    # the weights were written by this torch, not the source's
    versions = {**manifest.library_versions, "torch": torch.__version__.split("+")[0]}
    manifest = manifest.model_copy(update={"quant": scheme, "name": out.name, "library_versions": versions,
                                           "config_hash": ModelConfig.from_json(out).fingerprint()})
    files = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != "manifest.json")
    write_manifest(out, manifest, files)


def quantized_scheme(model) -> str | None:
    meta = getattr(model, "int4_metadata", None)
    return meta.get("scheme") if meta else None


__all__ = ["SCHEMES", "Int4Linear", "Int4Embedding", "Int4Weight", "quantize_q4_0", "quantize_asymmetric", "dequantize",
           "fake_quantize", "pack_nibbles", "unpack_nibbles", "to_gguf_q4_0", "int4_backend", "prepare_quantized_model",
           "quantize_model", "save_quantized", "collect_activations", "awq_search_scale", "to_device_kernel",
           "decoder_linears", "weight_bytes"]
