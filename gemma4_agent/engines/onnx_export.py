"""Export the one PyTorch model (model/network.py) to ONNX graphs that the onnxruntime and TensorRT
backends run.

Graphs (all traced from `Gemma4`'s own pieces, nothing re-implemented):

    vision.onnx   patches [P, patch_dim], patch_positions [P, 2] -> image_embeds [P, hidden]
    prefill.onnx  one chunk of T tokens (T dynamic) over the static KV cache
    decode.onnx   the same graph at T = 1 (the decode step)

Decoder graph inputs (the KV cache layout of engine/kv_cache.py, per layer type t):
    ids [1, T] int64            token ids (image tokens take their row of `image_embeds`)
    image_embeds [1, T, hidden] vision output scattered to the image-token rows (zeros elsewhere)
    positions [T] int64         RoPE positions
    mask_<t> [1, 1, T, C_t] bool     attention masks built by the session from slot positions
    slots_<t> [T] int64         cache slots the chunk is written to
    k_<i>, v_<i> [1, kv_i, C_i, hd_i]  the cache before the chunk (bound in place, never copied)
Outputs:
    logits [1, vocab] float32   the last position's (soft-capped) logits
    k_new_<i>, v_new_<i> [1, kv_i, T, hd_i]  the chunk's K (normed, rotated) and V (v_normed);
                                the host writes them into the cache slots (T rows, not the cache)

All weights go to one external-data file (weights.bin) shared by prefill.onnx and decode.onnx.
`quantize_q4_0` rewrites the decoder's MatMul weights as blocked INT4 DequantizeLinear (opset 21,
block_size 32) -> MatMul: the form TensorRT 10 takes for weight-only INT4 and onnxruntime fuses into
MatMulNBits.
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..engine.kv_cache import ring_sizes
from ..model.config import FULL, SLIDING
from ..model.network import Gemma4, rope_inv_freq

OPSET = 21
WEIGHTS = "weights.bin"
GRAPHS = ("vision.onnx", "prefill.onnx", "decode.onnx")


def layer_type_names(model) -> list[str]:
    return sorted(set(model.layer_types))


def describe_layers(runner, config, device=None) -> None:
    """Give a compiled-graph runner the per-layer facts the streaming session reads off a model:
    layer types, sliding windows and the RoPE tables (used by a position re-base)."""
    text = config.text_config
    runner.layer_types = list(text.layer_types)
    runner.windows = {SLIDING: text.sliding_window, FULL: None}
    runner.types = layer_type_names(runner)
    runner.num_layers = len(runner.layer_types)
    for t in set(runner.layer_types):
        setattr(runner, f"inv_freq_{t}", rope_inv_freq(text.layer(runner.layer_types.index(t))).to(device))


class _GraphCache:
    """The cache protocol inside the traced graph: scatter the chunk into a copy of the past KV for
    attention, and keep the chunk's K/V to return as outputs."""

    def __init__(self, layer_types, slots: dict, past: list):
        self.layer_types, self.slots, self.past = layer_types, slots, past
        self.new: list = [None] * len(layer_types)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        k_past, v_past = self.past[layer]
        k, v = k.to(k_past.dtype), v.to(v_past.dtype)
        idx = self.slots[self.layer_types[layer]].view(1, 1, -1, 1).expand(k.shape)
        self.new[layer] = (k, v)
        return k_past.scatter(2, idx, k), v_past.scatter(2, idx, v)


class DecoderStep(nn.Module):
    """embed -> decode (over the cache) -> logits of the last position, plus the chunk's K/V."""

    def __init__(self, model: Gemma4):
        super().__init__()
        self.model = model
        self.types = layer_type_names(model)
        self.image_token_id = model.config.image_token_id

    def forward(self, ids, image_embeds, positions, *rest):
        n = len(self.types)
        masks = dict(zip(self.types, rest[:n]))
        slots = dict(zip(self.types, rest[n:2 * n]))
        kv = rest[2 * n:]
        past = [(kv[2 * i], kv[2 * i + 1]) for i in range(len(self.model.layers))]
        h = self.model.embed(ids)
        is_image = (ids == self.image_token_id)[..., None]
        h = torch.where(is_image, image_embeds.to(h.dtype), h)
        cache = _GraphCache(self.model.layer_types, slots, past)
        hidden = self.model.decode(h, positions, masks, cache)
        logits = self.model.logits(hidden[:, -1]).float()
        outs = [logits]
        for k, v in cache.new:
            outs += [k, v]
        return tuple(outs)


class VisionGraph(nn.Module):
    def __init__(self, model: Gemma4):
        super().__init__()
        self.vision = model.vision

    def forward(self, patches, patch_positions):
        return self.vision(patches, patch_positions)


def decoder_io_names(model) -> tuple[list[str], list[str]]:
    types = layer_type_names(model)
    inputs = ["ids", "image_embeds", "positions"] + [f"mask_{t}" for t in types] + [f"slots_{t}" for t in types]
    outputs = ["logits"]
    for i in range(len(model.layers)):
        inputs += [f"k_{i}", f"v_{i}"]
        outputs += [f"k_new_{i}", f"v_new_{i}"]
    return inputs, outputs


def cache_capacity(model, max_context: int, max_prefix: int, max_chunk: int) -> dict[str, int]:
    """Slots per layer type, exactly as StaticKVCache lays them out."""
    return {t: max_prefix + r for t, r in ring_sizes(model, max_context, max_prefix, max_chunk).items()}


def _example_inputs(model, T: int, capacity: dict[str, int], dtype):
    text = model.config.text_config
    types = layer_type_names(model)
    hidden = text.hidden_size
    ids = torch.zeros(1, T, dtype=torch.long)
    ids[0, 0] = model.config.image_token_id
    args = [ids, torch.zeros(1, T, hidden, dtype=dtype), torch.arange(T)]
    args += [torch.ones(1, 1, T, capacity[t], dtype=torch.bool) for t in types]
    args += [torch.arange(T) for _ in types]
    for i, t in enumerate(model.layer_types):
        spec = text.layer(i)
        shape = (1, spec.num_kv_heads, capacity[t], spec.head_dim)
        args += [torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)]
    return tuple(args)


def _export(module, args, path: Path, input_names, output_names, dynamic_axes) -> None:
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on shape-dependent Python branches (checked by the tests)
        torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=OPSET, do_constant_folding=True, dynamo=False)


def export_graphs(model: Gemma4, out: Path, max_context: int, max_prefix: int, max_chunk: int,
                  quant: str = "none", dtype=torch.float32) -> dict:
    """Write vision.onnx, prefill.onnx, decode.onnx and weights.bin into `out`; returns the shapes
    the graphs were built for (recorded in engine.json)."""
    import onnx

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(dtype).eval()
    capacity = cache_capacity(model, max_context, max_prefix, max_chunk)
    tmp = out / "_export"
    tmp.mkdir(exist_ok=True)
    try:
        patch_dim = model.config.vision_config.patch_dim
        _export(VisionGraph(model), (torch.zeros(4, patch_dim, dtype=dtype), torch.zeros(4, 2, dtype=torch.long)),
                tmp / "vision.onnx", ["patches", "patch_positions"], ["image_embeds"],
                {"patches": {0: "P"}, "patch_positions": {0: "P"}, "image_embeds": {0: "P"}})
        ins, outs = decoder_io_names(model)
        dyn = {"ids": {1: "T"}, "image_embeds": {1: "T"}, "positions": {0: "T"}}
        for name in ins:
            if name.startswith("mask_"):
                dyn[name] = {2: "T", 3: f"C_{name[5:]}"}
            elif name.startswith("slots_"):
                dyn[name] = {0: "T"}
        for i, t in enumerate(model.layer_types):  # cache capacity: any session config fits
            dyn[f"k_{i}"] = dyn[f"v_{i}"] = {2: f"C_{t}"}
        for name in outs[1:]:
            dyn[name] = {2: "T"}
        step = DecoderStep(model)
        _export(step, _example_inputs(model, 3, capacity, dtype), tmp / "prefill.onnx", ins, outs, dyn)
        dyn_decode = {k: {a: n for a, n in v.items() if n != "T"} for k, v in dyn.items()}
        _export(step, _example_inputs(model, 1, capacity, dtype), tmp / "decode.onnx", ins, outs,
                {k: v for k, v in dyn_decode.items() if v})
        graphs = {name: onnx.load(str(tmp / name)) for name in GRAPHS}
        elem = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16}[dtype]
        for g in graphs.values():
            decompose_gelu(g, elem)
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    if quant == "q4_0":
        for name in ("prefill.onnx", "decode.onnx"):
            quantize_q4_0(graphs[name])
    elif quant != "none":
        raise ValueError(f"quant {quant!r} is not supported by the ONNX export (none | q4_0)")
    save_with_shared_weights(graphs, out)
    return {"capacity": capacity, "max_chunk": max_chunk, "max_prefix": max_prefix, "max_context": max_context,
            "opset": OPSET, "quant": quant, "dtype": str(dtype).replace("torch.", "")}


def decompose_gelu(graph_model, elem_type: int = 1) -> int:
    """Gelu (opset 20) -> 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (or the erf form): the
    elementwise ops every TensorRT 10.x parser takes (and fuses back)."""
    from onnx import helper

    graph = graph_model.graph
    nodes, n = [], 0
    for node in graph.node:
        if node.op_type != "Gelu":
            nodes.append(node)
            continue
        approx = next((a.s.decode() for a in node.attribute if a.name == "approximate"), "none")
        x, y, p = node.input[0], node.output[0], f"{node.name or 'gelu'}_{n}"
        n += 1
        consts = {"half": 0.5, "one": 1.0}
        consts.update({"c": 0.044715, "s": math.sqrt(2 / math.pi), "three": 3.0} if approx == "tanh"
                      else {"r2": 1 / math.sqrt(2)})
        for k, v in consts.items():  # constants in the activation type (elem_type: onnx TensorProto type)
            graph.initializer.append(helper.make_tensor(f"{p}_{k}_t", elem_type, [], [v]))
        if approx == "tanh":
            nodes += [helper.make_node("Pow", [x, f"{p}_three_t"], [f"{p}_x3"]),
                      helper.make_node("Mul", [f"{p}_x3", f"{p}_c_t"], [f"{p}_cx3"]),
                      helper.make_node("Add", [x, f"{p}_cx3"], [f"{p}_inner"]),
                      helper.make_node("Mul", [f"{p}_inner", f"{p}_s_t"], [f"{p}_arg"]),
                      helper.make_node("Tanh", [f"{p}_arg"], [f"{p}_t"])]
        else:
            nodes += [helper.make_node("Mul", [x, f"{p}_r2_t"], [f"{p}_arg"]),
                      helper.make_node("Erf", [f"{p}_arg"], [f"{p}_t"])]
        nodes += [helper.make_node("Add", [f"{p}_t", f"{p}_one_t"], [f"{p}_1t"]),
                  helper.make_node("Mul", [x, f"{p}_1t"], [f"{p}_x1t"]),
                  helper.make_node("Mul", [f"{p}_x1t", f"{p}_half_t"], [y])]
    del graph.node[:]
    graph.node.extend(nodes)
    return n


# --- weights: one external-data file shared by all graphs ---------------------------------------
def save_with_shared_weights(graphs: dict, out: Path, min_bytes: int = 1024) -> None:
    """Move every initializer of >= min_bytes into weights.bin, each distinct tensor stored once
    (prefill and decode graphs trace the same weights)."""
    import onnx
    from onnx import numpy_helper

    stored: dict[str, tuple[int, int]] = {}
    with open(out / WEIGHTS, "wb") as f:
        for name in GRAPHS:
            for init in graphs[name].graph.initializer:
                raw = init.raw_data if init.HasField("raw_data") else numpy_helper.to_array(init).tobytes()
                if len(raw) < min_bytes:
                    continue
                key = hashlib.sha256(raw + str(init.data_type).encode() + str(list(init.dims)).encode()).hexdigest()
                if key not in stored:
                    pad = (-f.tell()) % 64
                    f.write(b"\0" * pad)
                    stored[key] = (f.tell(), len(raw))
                    f.write(raw)
                offset, length = stored[key]
                init.ClearField("raw_data")
                for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                    init.ClearField(field)
                del init.external_data[:]
                for k, v in (("location", WEIGHTS), ("offset", str(offset)), ("length", str(length))):
                    entry = init.external_data.add()
                    entry.key, entry.value = k, v
                init.data_location = onnx.TensorProto.EXTERNAL
    for name in GRAPHS:
        with open(out / name, "wb") as f:
            f.write(graphs[name].SerializeToString())


# --- INT4 (q4_0) as blocked DequantizeLinear -----------------------------------------------------
Q4_BLOCK = 32


def q4_0_quantize(w: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """GGUF q4_0 along `axis` in blocks of 32: d = amax / -8 (amax: the element of largest |x|,
    signed), q = min(15, int(x / d + 8.5)), d stored rounded to fp16. Returns (q - 8 as int8 in
    [-8, 7], d as float32 with the blocked axis shrunk 32x). Dequantized: (q - 8) * d."""
    w = np.moveaxis(np.asarray(w, dtype=np.float32), axis, 0)
    k = w.shape[0]
    if k % Q4_BLOCK:
        raise ValueError(f"q4_0 needs the blocked axis divisible by {Q4_BLOCK}, got {k}")
    blocks = w.reshape(k // Q4_BLOCK, Q4_BLOCK, *w.shape[1:])
    idx = np.abs(blocks).argmax(axis=1)[:, None]
    amax = np.take_along_axis(blocks, idx, axis=1)[:, 0]
    d32 = (amax / -8.0).astype(np.float32)
    inv = np.where(d32 != 0, 1.0 / np.where(d32 != 0, d32, 1.0), 0.0).astype(np.float32)  # GGUF: id from fp32 d
    q = np.clip(np.trunc(blocks * inv[:, None] + np.float32(8.5)), 0, 15).astype(np.int8) - 8
    q = q.reshape(w.shape)
    d = d32.astype(np.float16).astype(np.float32)  # stored as fp16, as GGUF does
    return np.moveaxis(q, 0, axis), np.moveaxis(d, 0, axis)


def q4_0_fake_quant(w: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """The dequantized q4_0 weight (the torch reference for a q4_0 engine); nn.Linear weights
    [out, in] are blocked along `in` (axis 1)."""
    q, d = q4_0_quantize(w.detach().float().cpu().numpy(), axis=axis)
    deq = q.astype(np.float32) * np.repeat(d, Q4_BLOCK, axis=axis)
    return torch.from_numpy(deq).to(w.dtype)


DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def fake_quantize_model(model: Gemma4) -> Gemma4:
    """In place: every decoder linear weight replaced by its q4_0 dequantized value."""
    with torch.no_grad():
        for name, module in model.layers.named_modules():
            if isinstance(module, nn.Linear) and name.split(".")[-1] in DECODER_LINEARS:
                module.weight.copy_(q4_0_fake_quant(module.weight))
    return model


def _is_decoder_linear(node_name: str) -> bool:
    """TorchScript export names nodes by module path: /layers.3/self_attn/q_proj/MatMul. The tied
    embedding / head and the vision projection stay float (as fake_quantize_model leaves them)."""
    parts = node_name.strip("/").split("/")
    return len(parts) >= 3 and parts[0].startswith("layers.") and parts[-2] in DECODER_LINEARS


def pack_int4(q: np.ndarray) -> bytes:
    """int8 values in [-8, 7] -> ONNX INT4 raw data: two per byte, the first in the low nibble."""
    flat = (q.reshape(-1).astype(np.int16) & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def quantize_q4_0(graph_model) -> int:
    """Rewrite each decoder-linear MatMul(x, W), W a float initializer [K, N] (K divisible by 32), as MatMul(x, DequantizeLinear(W_int4, scale, axis=0, block_size=32)). Returns the
    number of weights rewritten."""
    import onnx
    from onnx import helper, numpy_helper

    graph = graph_model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    done = 0
    new_nodes = []
    replaced: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and _is_decoder_linear(node.name):
            init = inits[node.input[1]]
            floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
            w = numpy_helper.to_array(init) if init.data_type in floats else None
            if w is not None and w.ndim == 2 and w.shape[0] % Q4_BLOCK == 0 and consumers.get(init.name, 0) == 1:
                if init.name not in replaced:
                    q, d = q4_0_quantize(w.astype(np.float32), axis=0)
                    qname, sname, dqname = init.name + "_q4", init.name + "_q4_scale", init.name + "_dq"
                    q_init = helper.make_tensor(qname, onnx.TensorProto.INT4, q.shape, pack_int4(q), raw=True)
                    s_init = numpy_helper.from_array(d.astype(w.dtype), sname)  # scale in the activation type
                    graph.initializer.extend([q_init, s_init])
                    new_nodes.append(helper.make_node("DequantizeLinear", [qname, sname], [dqname], axis=0,
                                                      block_size=Q4_BLOCK, name=dqname))
                    replaced[init.name] = dqname
                    done += 1
                node.input[1] = replaced[init.name]
    if replaced:
        keep = [i for i in graph.initializer if i.name not in replaced]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        nodes = new_nodes + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
    return done


def graph_ops(path_or_model) -> set[str]:
    """Every (domain-qualified) operator a graph uses, subgraphs included."""
    import onnx

    model = onnx.load(str(path_or_model), load_external_data=False) if isinstance(path_or_model, (str, os.PathLike)) \
        else path_or_model
    ops: set[str] = set()

    def walk(graph):
        for node in graph.node:
            ops.add(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}")
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    return ops
