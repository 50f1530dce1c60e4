"""onnxruntime backend: the exported graphs (onnx_export.py) behind the model interface the streaming
session drives, so StreamingSession (prefix reuse, window mode, re-base) runs on it unchanged.

What the session touches on `model`, and what OrtModel gives it:
    config, layer_types, windows, inv_freq_<type>   the same values as Gemma4 (from config.json)
    embed_tokens.weight                             a 0-element float32 tensor: the cache's dtype/device
    vision(patches, positions)                      vision.onnx
    embed(ids, image_embeds)                        an `Embedded` (ids + image rows): the graph embeds
    decode(h, positions, masks, cache)              prefill.onnx (T > 1) or decode.onnx (T = 1); the
                                                    cache's K/V buffers are bound in place (no copy), the
                                                    chunk's new K/V rows come back and are written into
                                                    the cache slots; returns logits [1, 1, vocab]
    logits(x)                                       identity (the graph already applied the tied head)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ..model.config import ModelConfig
from .manifest import EngineError
from .onnx_export import describe_layers

ENGINE_INFO = "engine.json"

_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.bool: np.bool_,
       torch.int32: np.int32}


@dataclass
class Embedded:
    """What OrtModel.embed hands to decode: token ids and the image rows scattered to their positions."""
    ids: torch.Tensor           # [1, T] int64
    image_embeds: torch.Tensor  # [1, T, hidden] (zeros on text tokens)

    @property
    def shape(self):
        return self.image_embeds.shape


def session_options(threads: int | None = None, accuracy_level: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # no busy-waiting worker threads between runs: the agent shares the CPU with torch, ROS and preprocessing
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    # INT4 DequantizeLinear -> MatMul is fused into MatMulNBits; level 0 keeps float activations
    # (exact against the fake-quantized torch model), 4 quantizes activations to int8 (faster).
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    return opts


class OrtModel:
    def __init__(self, folder: str | Path, config: ModelConfig, threads: int | None = None,
                 accuracy_level: int = 0):
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover
            raise EngineError("onnxruntime is not installed: pip install onnxruntime") from exc
        folder = Path(folder)
        self.folder = folder
        self.config = config
        info_path = folder / ENGINE_INFO
        self.info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        if self.info.get("dtype", "float32") != "float32":
            raise EngineError(f"engine {folder} was exported in {self.info['dtype']}; the onnxruntime backend runs "
                              f"float32 graphs (build with --backend onnxruntime)")
        text = config.text_config
        describe_layers(self, config)
        self.embed_tokens = SimpleNamespace(weight=torch.empty(0, dtype=torch.float32))
        self.hidden_size = text.hidden_size
        self.vocab_size = text.vocab_size
        opts = session_options(threads, accuracy_level)
        providers = ["CPUExecutionProvider"]
        self.sessions = {}
        for name in ("vision", "prefill", "decode"):
            path = folder / f"{name}.onnx"
            if not path.is_file():
                raise EngineError(f"engine {folder}: {path.name} is missing (rebuild the engine)")
            try:
                self.sessions[name] = ort.InferenceSession(str(path), opts, providers=providers)
            except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
                raise EngineError(f"engine {folder}: onnxruntime cannot load {path.name}: {exc}") from exc
        # output buffers, reused call after call (grown only when a longer chunk comes)
        self._logits = torch.empty(1, self.vocab_size, dtype=torch.float32)
        self._kv_flat: list[torch.Tensor] = []
        self._kv_rows = 0
        self._zeros = torch.zeros(1, 1, self.hidden_size)

    # --- the pieces the session calls --------------------------------------------------------
    @torch.no_grad()
    def vision(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        sess = self.sessions["vision"]
        out = sess.run(None, {"patches": patches.detach().float().contiguous().numpy(),
                              "patch_positions": positions.detach().long().contiguous().numpy()})[0]
        return torch.from_numpy(out)

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None) -> Embedded:
        ids = input_ids.long().reshape(1, -1)
        T = ids.shape[1]
        if image_embeds is None:
            dense = self._zeros if T == 1 else torch.zeros(1, T, self.hidden_size)
        else:
            dense = torch.zeros(1, T, self.hidden_size)
            dense[0, ids[0] == self.config.image_token_id] = image_embeds.float()
        return Embedded(ids, dense)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def masks(self, q_pos, k_pos, q_block, k_block) -> dict:
        from ..model.network import attention_mask

        return {t: attention_mask(q_pos, k_pos, q_block, k_block, self.windows[t]) for t in set(self.layer_types)}

    def _kv_buffers(self, rows: int, cache) -> None:
        if rows <= self._kv_rows and self._kv_flat:
            return
        rows = max(rows, 2 * self._kv_rows)
        self._kv_flat = []
        for i in range(self.num_layers):
            _, kv, _, hd = cache.k[i].shape
            self._kv_flat += [torch.empty(kv * rows * hd), torch.empty(kv * rows * hd)]
        self._kv_rows = rows

    @torch.no_grad()
    def decode(self, h: Embedded, positions: torch.Tensor, masks: dict, cache, rope=None) -> torch.Tensor:
        # rope: the session's (cos, sin) for the torch model; the exported graph computes its own
        if not isinstance(h, Embedded):
            raise TypeError("OrtModel.decode takes the output of OrtModel.embed")
        if cache is None:
            raise ValueError("the onnxruntime engine runs over a StaticKVCache (the streaming session's)")
        T = h.ids.shape[1]
        sess = self.sessions["decode" if T == 1 else "prefill"]
        self._kv_buffers(T, cache)
        binding = sess.io_binding()
        keep = []  # tensors bound by pointer stay alive until run_with_iobinding returns

        def bind_in(name, t):
            t = t.contiguous()
            keep.append(t)
            binding.bind_input(name, "cpu", 0, _NP[t.dtype], list(t.shape), t.data_ptr())

        bind_in("ids", h.ids)
        bind_in("image_embeds", h.image_embeds)
        bind_in("positions", positions.long())
        for t in self.types:
            bind_in(f"mask_{t}", masks[t])
            bind_in(f"slots_{t}", cache.cur_slots[t].long())
        for i in range(self.num_layers):
            bind_in(f"k_{i}", cache.k[i])  # the cache's own buffers: nothing copied
            bind_in(f"v_{i}", cache.v[i])
        binding.bind_output("logits", "cpu", 0, np.float32, [1, self.vocab_size], self._logits.data_ptr())
        new = []
        for i in range(self.num_layers):
            _, kv, _, hd = cache.k[i].shape
            for j, name in enumerate((f"k_new_{i}", f"v_new_{i}")):
                view = self._kv_flat[2 * i + j][: kv * T * hd].view(1, kv, T, hd)
                binding.bind_output(name, "cpu", 0, np.float32, [1, kv, T, hd], view.data_ptr())
                new.append(view)
        sess.run_with_iobinding(binding)
        for i in range(self.num_layers):
            slots = cache.cur_slots[self.layer_types[i]]
            cache.k[i].index_copy_(2, slots, new[2 * i])
            cache.v[i].index_copy_(2, slots, new[2 * i + 1])
        return self._logits.clone()[:, None]


def load_ort_model(folder: Path, config: ModelConfig, dtype=torch.float32, threads: int | None = None,
                   accuracy_level: int = 0) -> OrtModel:
    if dtype not in (torch.float32, None):
        raise EngineError(f"the onnxruntime backend runs float32 graphs, not {dtype}")
    return OrtModel(folder, config, threads=threads, accuracy_level=accuracy_level)
