"""TensorRT 10.x backend (Jetson Orin, JetPack 6.1/6.2 ship TensorRT 10.3): builder and runtime.

TensorRT cannot be installed on the development machines, so nothing here has run there: the ONNX
graphs it consumes are the ones the onnxruntime backend is tested with (same export, same operators,
checked against TensorRT 10.3's parser list), and `gemma4-agent verify-engine` is how an engine is
checked on the device. Importing this module works without TensorRT; using it raises EngineError.

Build (`build_plan`): the ONNX parser on a STRONGLY_TYPED network (types come from the graph: bf16 /
fp16 activations, INT4 blocked DequantizeLinear weights), one engine `decoder.plan` from prefill.onnx
with two optimization profiles that share the weights -- profile 0 the decode step (T = 1), profile 1
prefill chunks (T from 1 to max(max_chunk, max_prefix)) -- and `vision.plan`; the KV capacity is
fixed at the built shape. A timing cache (timing.cache) makes rebuilds fast; a progress monitor
prints the builder's phases.

Runtime (`TrtModel`): the same interface as OrtModel (see ort_backend.py), on CUDA. Two execution
contexts (decode, prefill) on the one engine; every KV buffer of the session's StaticKVCache is bound
in place with set_tensor_address once (the cache never reallocates); outputs go to persistent buffers;
the chunk's K/V rows are scattered into the cache with index_copy_ on the same stream. Nothing in a
decode step allocates or synchronises, so the session's CUDA graph (session.py, `cuda_graph=True`)
captures the whole step -- embedding-free host work, mask build, execute_async_v3, KV scatter.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from ..model.config import ModelConfig
from ..model.network import attention_mask
from .manifest import EngineError
from .onnx_export import describe_layers

NOT_INSTALLED = ("TensorRT is not installed here: build the engine on the Jetson (JetPack 6, TensorRT 10.3): "
                 "see docs/JETSON.md")
DECODER_PLAN, VISION_PLAN, TIMING_CACHE = "decoder.plan", "vision.plan", "timing.cache"


def require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EngineError(NOT_INSTALLED) from exc
    major = int(trt.__version__.split(".")[0])
    if major < 10:
        raise EngineError(f"TensorRT {trt.__version__} found; this engine needs TensorRT 10.x (JetPack 6.1+)")
    return trt


def gpu_arch() -> str | None:
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


# --- build --------------------------------------------------------------------------------------
def _progress_monitor(trt, log):
    class Progress(trt.IProgressMonitor):
        """Prints each builder phase as it starts and finishes (tactic timing can take minutes on Orin)."""

        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self._start: dict[str, float] = {}
            self._steps: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self._start[phase_name], self._steps[phase_name] = time.perf_counter(), num_steps
            indent = "  " if parent_phase else ""
            log(f"  {indent}[trt] {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            n = self._steps.get(phase_name, 0)
            if n >= 20 and step % max(n // 10, 1) == 0:
                log(f"    [trt] {phase_name}: {step}/{n}")
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            log(f"  [trt] {phase_name} done in {time.perf_counter() - self._start.get(phase_name, time.perf_counter()):.1f} s")

    return Progress()


def _build(trt, onnx_path: Path, plan_path: Path, profiles: list[dict], cache_path: Path, workspace_gb: float, log):
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads weights.bin beside it
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT's ONNX parser rejected {onnx_path.name}:\n{errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    config.progress_monitor = _progress_monitor(trt, log)
    timing = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(timing, ignore_mismatch=False)
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT failed to build {plan_path.name} (see the builder log above)")
    plan_path.write_bytes(bytes(plan))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    log(f"  {plan_path.name}: {plan_path.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t0:.0f} s")


def decoder_profiles(config: ModelConfig, info: dict) -> list[dict]:
    """Profile 0: decode (T = 1); profile 1: prefill chunks. Cache capacity fixed at the built shape."""
    text = config.text_config
    types = sorted(set(text.layer_types))
    cap = info["capacity"]
    t_max = max(info["max_chunk"], info["max_prefix"])

    def shapes(lo, opt, hi):
        s = {"ids": ((1, lo), (1, opt), (1, hi)),
             "image_embeds": ((1, lo, text.hidden_size), (1, opt, text.hidden_size), (1, hi, text.hidden_size)),
             "positions": ((lo,), (opt,), (hi,))}
        for t in types:
            s[f"mask_{t}"] = tuple((1, 1, n, cap[t]) for n in (lo, opt, hi))
            s[f"slots_{t}"] = ((lo,), (opt,), (hi,))
        for i, t in enumerate(text.layer_types):
            spec = text.layer(i)
            kv = (1, spec.num_kv_heads, cap[t], spec.head_dim)
            s[f"k_{i}"] = s[f"v_{i}"] = (kv, kv, kv)
        return s

    return [shapes(1, 1, 1), shapes(1, info["max_chunk"], t_max)]


def build_plan(folder: Path, info: dict, workspace_gb: float = 2.0, log=print) -> str | None:
    """Build decoder.plan and vision.plan from the exported ONNX in `folder`; returns the GPU arch."""
    trt = require_tensorrt()
    folder = Path(folder)
    config = ModelConfig.from_json(folder) if (folder / "config.json").is_file() else None
    if config is None:
        raise EngineError(f"{folder}: config.json is needed next to the ONNX graphs to build the TensorRT plans")
    cache = folder / TIMING_CACHE
    log(f"building {DECODER_PLAN} (TensorRT {trt.__version__}, {gpu_arch()})")
    _build(trt, folder / "prefill.onnx", folder / DECODER_PLAN, decoder_profiles(config, info), cache, workspace_gb, log)
    patches = info["image_tokens"]
    dim = config.vision_config.patch_dim
    log(f"building {VISION_PLAN}")
    _build(trt, folder / "vision.onnx", folder / VISION_PLAN,
           [{"patches": ((1, dim), (patches, dim), (patches, dim)),
             "patch_positions": ((1, 2), (patches, 2), (patches, 2))}], cache, workspace_gb, log)
    info["tensorrt"] = trt.__version__
    return gpu_arch()


# --- runtime ------------------------------------------------------------------------------------
_TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
          "INT32": torch.int32, "BOOL": torch.bool}


class TrtModel:
    """The model interface the streaming session drives (see ort_backend.OrtModel), on TensorRT."""

    def __init__(self, folder: Path, config: ModelConfig, manifest, device: str = "cuda"):
        trt = require_tensorrt()
        if device != "cuda" or not torch.cuda.is_available():
            raise EngineError("the tensorrt backend needs a CUDA device (device 'cuda')")
        folder = Path(folder)
        here = gpu_arch()
        if manifest.gpu_arch and manifest.gpu_arch != here:
            raise EngineError(f"engine {folder} was built for GPU {manifest.gpu_arch}, this machine has {here}: "
                              f"build the engine on this device")
        if manifest.machine != platform.machine():
            raise EngineError(f"engine {folder} was built on {manifest.machine}, this machine is {platform.machine()}: "
                              f"build the engine on this device")
        built = manifest.library_versions.get("tensorrt")
        if built and built != trt.__version__:
            raise EngineError(f"engine {folder} was built with TensorRT {built}, this machine has {trt.__version__}: "
                              f"TensorRT plans are tied to the version that built them; rebuild the engine")
        self.info = json.loads((folder / "engine.json").read_text())
        self.config = config
        text = config.text_config
        describe_layers(self, config, "cuda")
        self.dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[self.info["dtype"]]
        self.embed_tokens = SimpleNamespace(weight=torch.empty(0, dtype=self.dtype, device="cuda"))
        self.hidden_size = text.hidden_size
        self.capacity = self.info["capacity"]
        self.max_t = max(self.info["max_chunk"], self.info["max_prefix"])
        logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(logger)
        self.engine = self._load(folder / DECODER_PLAN)
        self.vision_engine = self._load(folder / VISION_PLAN)
        stream = torch.cuda.current_stream().cuda_stream
        self.ctx = {}
        for profile, name in enumerate(("decode", "prefill")):
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(profile, stream)
            self.ctx[name] = ctx
        self.vision_ctx = self.vision_engine.create_execution_context()
        self._bound_cache = None
        dev = "cuda"
        self._logits = torch.empty(1, text.vocab_size, dtype=torch.float32, device=dev)
        self._new = []
        for i in range(self.num_layers):
            spec = text.layer(i)
            self._new += [torch.empty(spec.num_kv_heads * self.max_t * spec.head_dim, dtype=self.dtype, device=dev)
                          for _ in range(2)]
        self._zeros = torch.zeros(1, self.max_t, self.hidden_size, dtype=self.dtype, device=dev)

    def _load(self, path: Path):
        if not path.is_file():
            raise EngineError(f"engine {path.parent}: {path.name} is missing (rebuild the engine on this device)")
        engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise EngineError(f"engine {path.parent}: TensorRT could not deserialize {path.name} "
                              f"(built by another TensorRT version or GPU: rebuild it on this device)")
        return engine

    # --- pieces the session calls ------------------------------------------------------------
    @torch.no_grad()
    def vision(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        ctx, stream = self.vision_ctx, torch.cuda.current_stream().cuda_stream
        patches = patches.to("cuda", self.dtype).contiguous()
        positions = positions.to("cuda", torch.long).contiguous()
        out = torch.empty(patches.shape[0], self.hidden_size, dtype=self.dtype, device="cuda")
        for name, t in (("patches", patches), ("patch_positions", positions)):
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        ctx.set_tensor_address("image_embeds", out.data_ptr())
        if not ctx.execute_async_v3(stream):
            raise RuntimeError("TensorRT vision execution failed")
        return out

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None):
        from .ort_backend import Embedded

        ids = input_ids.reshape(1, -1)
        T = ids.shape[1]
        if image_embeds is None:
            dense = self._zeros[:, :T]  # persistent: a decode step allocates nothing
        else:
            dense = torch.zeros(1, T, self.hidden_size, dtype=self.dtype, device="cuda")
            dense[0, ids[0] == self.config.image_token_id] = image_embeds.to(self.dtype)
        return Embedded(ids, dense)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def masks(self, q_pos, k_pos, q_block, k_block) -> dict:
        return {t: attention_mask(q_pos, k_pos, q_block, k_block, self.windows[t]) for t in set(self.layer_types)}

    def check_cache(self, cache) -> None:
        """Refuse a session cache of another shape than the plans' (fixed when they were built)."""
        for t in self.types:
            if cache.capacity[t] != self.capacity[t]:
                raise EngineError(f"the TensorRT engine was built for {self.capacity[t]} {t} cache slots, the session "
                                  f"has {cache.capacity[t]}: use the engine's max_context / max_prefix / image_tokens "
                                  f"(agent.json) or rebuild")

    def _bind_cache(self, cache) -> None:
        """Bind the session's KV buffers (allocated once, never moved) into both contexts, once."""
        self.check_cache(cache)
        for ctx in self.ctx.values():
            for i in range(self.num_layers):
                for name, buf in ((f"k_{i}", cache.k[i]), (f"v_{i}", cache.v[i])):
                    if buf.dtype != self.dtype or not buf.is_cuda:
                        raise EngineError(f"the KV cache must be {self.dtype} on CUDA for this engine")
                    ctx.set_input_shape(name, tuple(buf.shape))
                    ctx.set_tensor_address(name, buf.data_ptr())
            ctx.set_tensor_address("logits", self._logits.data_ptr())
        self._bound_cache = cache

    @torch.no_grad()
    def decode(self, h, positions: torch.Tensor, masks: dict, cache, rope=None) -> torch.Tensor:
        # rope: the session's (cos, sin) for the torch model; the engine computes its own
        if cache is not self._bound_cache:
            self._bind_cache(cache)
        T = h.ids.shape[1]
        if T > self.max_t:
            raise EngineError(f"a {T}-token chunk exceeds the engine's largest prefill ({self.max_t}): rebuild with "
                              f"a larger --max-prefix / --image-tokens")
        ctx = self.ctx["decode" if T == 1 else "prefill"]
        inputs = {"ids": h.ids, "image_embeds": h.image_embeds, "positions": positions}
        for t in self.types:
            inputs[f"mask_{t}"] = masks[t]
            inputs[f"slots_{t}"] = cache.cur_slots[t]
        for name, t in inputs.items():
            t = t if t.is_contiguous() else t.contiguous()
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        new = []
        for i in range(self.num_layers):
            _, kv, _, hd = cache.k[i].shape
            for j, name in enumerate((f"k_new_{i}", f"v_new_{i}")):
                view = self._new[2 * i + j][: kv * T * hd].view(1, kv, T, hd)
                ctx.set_tensor_address(name, view.data_ptr())
                new.append(view)
        if not ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT decoder execution failed")
        for i in range(self.num_layers):
            slots = cache.cur_slots[self.layer_types[i]]
            cache.k[i].index_copy_(2, slots, new[2 * i])
            cache.v[i].index_copy_(2, slots, new[2 * i + 1])
        return self._logits[:, None]


def load_trt_model(folder: Path, config: ModelConfig, manifest, device: str = "cuda") -> TrtModel:
    require_tensorrt()
    return TrtModel(folder, config, manifest, device)
