"""A streaming session: [cached prefix][frame][suffix] -> prefill -> decode, frame after frame.

Modes
    prefix  the prefix (system + instruction) is prefilled once; each frame rewinds the cache to
            it and prefills only the frame block and the suffix.
    window  the last `window_frames` frames, each followed by the action it produced, stay in the
            cache as temporal context; the oldest block is evicted. Positions only grow; past
            `rebase_threshold` they are shifted back by rotating cached keys (exact for RoPE).
    none    recompute the whole prompt every frame (what peers do), for comparison.

Decoding uses a pluggable next-token selector (greedy by default, the action grammar in the agent);
tokens the selector forces are fed in one chunk with the chosen token (jump-forward).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, Field

from ..actions.selectors import GreedySelector
from ..model.config import SLIDING, ImageTokens
from ..model.network import Gemma4, attention_mask
from ..model.preprocess import frame_patches, scale_patches
from ..model.tokenizer import PromptBuilder
from ..quant.int4 import to_device_kernel
from .fusion import join_projections, joined_modules
from .gemv import use_triton_gemv
from .kv_cache import CacheFull, StaticKVCache


GRAPHED_CHUNK_MAX = 16  # the longest jump-forward chunk replayed from a graph (SessionConfig.graph_chunks)
# Graphs one session's compiled function may add. Dynamo keeps compiled graphs per code object, by default 8 across
# every caller: a node reconfigured (cleanup, configure: a new session in the same process) with lengths the sessions
# before it had not run (another camera's aspect ratio, another image budget) ran them uncompiled, several times slower.
# With a budget of its own a session compiles what it needs and still reuses what the ones before it compiled.
COMPILE_BUDGET = 64
PROMPT_AROUND_FRAME = 64  # room in a frame's chunk for the tokens around its image tokens (<|image>, <image|>, suffix)
CUDA_SLOT_ALIGN = 64  # the KV cache's slots, a multiple of this on CUDA (kv_cache.StaticKVCache's slot_align)


class SessionConfig(BaseModel):
    mode: Literal["prefix", "window", "none"] = "prefix"
    image_tokens: ImageTokens = 280
    max_new_tokens: int = Field(32, ge=1, le=512)
    max_prefix: int = Field(1024, ge=8)
    max_context: int = Field(4096, ge=64)
    window_frames: int = Field(4, ge=1)
    rebase_threshold: int = Field(1 << 16, ge=64)
    cuda_graph: bool = True  # CUDA: the decode step and the frame chunk each replay a captured graph
    compile: bool = False  # torch.compile the decoder (fuses the element-wise work); on CUDA the decode step is
    # then graph-captured as compiled
    join_projections: bool = True  # CUDA: q/k/v and gate/up run as one matmul each (engine/fusion.py)
    triton_gemv: bool = True  # CUDA: bf16 decode-step GEMVs by Triton where timed faster than cuBLAS (engine/gemv.py)
    # CUDA: jump-forward chunks (2 to GRAPHED_CHUNK_MAX tokens) replayed from a graph per length, as the decode step
    # is, instead of launched from Python (~200 int4 calls at ~50-100 us each at the 12B)
    graph_chunks: bool = True
    # CUDA: each attention layer's q/k norms, RoPE, v norm and cache write as one PDL kernel (model/triton_qkv.py)
    # instead of Inductor's three a layer: 12B int4 decode 3.13 vs 3.26 ms/token on the H200 (BENCHMARKS.md)
    fused_qkv: bool = True
    # CUDA graphs, a selector that can choose on the device (greedy): each decode step is launched with the token
    # before it still on the GPU, before the host has read that token back, so the GPU does not wait on the host
    # between steps (~0.09 ms a step at the 12B). Where the token read back ends the action, that step was for
    # nothing: its position is taken back, and the next token written there overwrites it
    decode_ahead: bool = True
    # With compile, also a function compiled for any length (see StreamingSession.__init__), for the chunks whose
    # length does not repeat: the prefix, jump-forward runs of a length the warm-up did not see. Off, those run
    # uncompiled: a slower prefix and first-seen jump-forward run, a start-up minutes shorter at the 12B (the
    # prefix's compile took 188 of a 12B int4 row's 390 s of compiling on the H200); the bench's frames never use it
    compile_any_length: bool = True


@dataclass
class StepResult:
    tokens: list[int]
    timings_ms: dict[str, float]
    decode_steps: int
    free_tokens: int
    deadline_hit: bool = False
    logits_log: list[torch.Tensor] = field(default_factory=list)
    cached_log: list[list[dict]] = field(default_factory=list)  # what the cache held for each logits (tests)


def max_chunk(image_tokens: int) -> int:
    """The longest chunk a frame prefills: its image tokens and the prompt around them."""
    return image_tokens + PROMPT_AROUND_FRAME


def _compile(fn, dynamic: bool):
    return torch.compile(fn, dynamic=dynamic, recompile_limit=COMPILE_BUDGET)


class StreamingSession:
    def __init__(self, model: Gemma4, prompts: PromptBuilder, config: SessionConfig | None = None,
                 patch_size: int | None = None, pooling: int | None = None):
        self.model = model
        self.prompts = prompts
        self.config = config or SessionConfig()
        vision = model.config.vision_config
        self.patch_size = patch_size or vision.patch_size
        self.pooling = pooling or vision.pooling_kernel_size
        param = model.embed_tokens.weight
        self.device = param.device
        self.dtype = param.dtype if param.is_floating_point() else torch.bfloat16
        self.max_chunk = max_chunk(self.config.image_tokens)
        if self.device.type == "cuda" and self.config.join_projections:
            join_projections(model)
        if self.device.type == "cuda" and self.config.triton_gemv:
            use_triton_gemv(model)
        # the torch model, or a compiled engine (engines/: onnxruntime, TensorRT)
        self._torch_model = isinstance(model, torch.nn.Module)
        # compiled engines fix the cache's shape at their build: padding only for the torch model on CUDA
        align = CUDA_SLOT_ALIGN if self.device.type == "cuda" and self._torch_model else 1
        self.cache = StaticKVCache(model, self.config.max_context, self.config.max_prefix, self.max_chunk,
                                   device=self.device, dtype=self.dtype, fused_writes=self.config.fused_qkv,
                                   slot_align=align)
        if hasattr(model, "check_cache"):  # an engine whose cache shape was fixed at its build: refused now, not
            model.check_cache(self.cache)  # at the first frame
        self.windows = {t: model.windows[t] for t in set(model.layer_types)}
        self.prefix_ids: list[int] = []
        self.prefix_len = 0
        self.next_pos = 0
        self.next_block = 0
        self.blocks: list[tuple[int, int]] = []  # window mode: (start, end) positions of retained frame blocks
        self.pending: list[int] = []  # window mode: tokens chosen last frame, not yet in the cache
        self.record: list[dict] | None = None  # set to [] to log every chunk written (tests)
        self.frame_index = 0
        self._graphs: dict[tuple[str, int], dict] = {}  # ("ids", 1): the decode step; ("frame", n): a frame chunk
        # Frame chunks are graphed on the torch model only, where that is tested on a GPU; the compiled engines
        # (TensorRT's prefill context) document and were checked for the decode step's capture only.
        # Compiled twice (each time the pair of _forward): specialised per length, for the lengths that repeat (the
        # frame chunk, the one-token step, and what the warm-up saw: jump-forward runs), and for any length, once, for
        # the rest (the prefix; a jump-forward length first seen mid-stream, which would otherwise stop the robot
        # for a recompile, ~10 s for the demo engine on CPU, minutes at the 12B, and past dynamo's cache limit run
        # eager). Specialised code may be faster; the any-length code serves only what the warm-up did not show.
        self._eager = (self._shared, self._layers_and_head)
        self._compiled = self._compiled_any = None  # (shared inputs, layers and head) compiled, see _forward
        self._static_lengths: set[int] = set()  # the chunk lengths the warm-up ran
        self._warming = False
        if self.config.compile:
            for mod in (model, *joined_modules(model)):
                to_device_kernel(mod)  # int4 packs built now, outside the compiled code
            self._compiled = (_compile(self._shared, dynamic=False), _compile(self._layers_and_head, dynamic=False))
            if self.config.compile_any_length:
                self._compiled_any = (_compile(self._shared_any_length, dynamic=True),
                                      _compile(self._layers_and_head_any_length, dynamic=True))

    # --- low level -------------------------------------------------------------------------
    @torch.no_grad()
    def _forward(self, x: torch.Tensor, positions: torch.Tensor, blocks: torch.Tensor, slots: dict,
                 repeats: bool = True) -> torch.Tensor:
        """x: token ids [1, n] or embeddings (model.embed). `repeats`: a length seen every frame (compiled for
        that length), not one that varies."""
        shared, layers = (self._eager if self._compiled is None else
                          self._compiled if repeats else self._compiled_any or self._eager)
        h, masks, rope = shared(x, positions, blocks, slots)
        return layers(h, positions, masks, rope)

    # Two functions, compiled apart. The first computes what every layer shares: the embeddings (token ids are
    # embedded here: a decode step's int4 row lookup was ~10 eager kernels), the cache's new slots, each layer
    # type's mask and RoPE; the layers' graph takes them as inputs. Compiled as one graph, Inductor computed masks
    # and RoPE again for every few layers (its fusion groups end at each cache-writing op): 48 small kernels a
    # decode step of the 12B, launched without PDL, each waiting for the one before to drain.
    def _shared(self, x, positions, blocks, slots):
        # x: token ids, or what the model's embed returned (a tensor; the compiled engines' own type)
        h = self.model.embed(x) if isinstance(x, torch.Tensor) and not x.is_floating_point() else x
        self.cache.place(slots, positions, blocks)
        masks = {t: attention_mask(positions, self.cache.slot_pos[t], blocks[None], self.cache.slot_block[t][None], w)
                 for t, w in self.windows.items()}
        # the compiled engines (engines/) rotate inside
        rope = self.model.rope(positions, h.dtype) if self._torch_model else None
        return h, masks, rope

    def _layers_and_head(self, h, positions, masks, rope):
        hidden = self.model.decode(h, positions, masks, self.cache, rope)
        return self.model.logits(hidden[:, -1]).float()[0]

    # their own code objects, so that dynamo keeps the (dynamic) any-length graphs apart from the per-length ones
    def _shared_any_length(self, x, positions, blocks, slots):
        return self._shared(x, positions, blocks, slots)

    def _layers_and_head_any_length(self, h, positions, masks, rope):
        return self._layers_and_head(h, positions, masks, rope)

    def _chunk(self, ids: list[int], frame: tuple[torch.Tensor, torch.Tensor] | None = None, prefix: bool = False,
               graph: bool = False) -> torch.Tensor:
        """Prefill a run of tokens at the next positions; returns the last position's logits. `frame`: the image its
        image tokens stand for, as encode_frame gives it (uint8 patches, positions), embedded here. `graph`: a frame
        chunk, whose length repeats every frame, replayed from a CUDA graph where graphs are on."""
        n = len(ids)
        start = self.next_pos
        # image-block ids worked out on the host: asking the GPU would wait for the vision embedder to finish
        image = [i == self.prompts.image_id for i in ids]
        blocks = [self.next_block if m else -1 for m in image]
        if prefix:
            slots = {t: self.cache.prefix_slots(start, n) for t in self.cache.capacity}
        else:
            if n > self.max_chunk:
                raise CacheFull(f"a chunk of {n} tokens exceeds the engine's max chunk {self.max_chunk}")
            self._check_room(n)
            slots = self.cache.ring_slot_numbers(n)
        if any(image):
            self.next_block += 1
        if graph and frame is not None and self._torch_model and self._graphs_on():  # frame chunks: see __init__
            return self._replay_ids(("frame", n), ids, slots, blocks, frame)
        self.next_pos += n
        positions = torch.arange(start, start + n, device=self.device)
        id_tensor = torch.tensor(ids, device=self.device)
        block_tensor = torch.tensor(blocks, dtype=torch.long, device=self.device)
        if not prefix:
            slots = {t: torch.tensor(s, dtype=torch.long, device=self.device) for t, s in slots.items()}
        image_embeds = self._image_embeds(*frame) if frame is not None else None
        # token ids alone are embedded inside the forward (compiled with it); a frame's image embeddings, and what
        # a frame chunk takes, here
        embed = image_embeds is not None or graph
        x = self.model.embed(id_tensor[None], image_embeds) if embed else id_tensor[None]
        if self.record is not None:
            self.record.append({"ids": ids, "positions": positions.cpu(), "blocks": block_tensor.cpu(),
                                "image_embeds": None if image_embeds is None else image_embeds.cpu(),
                                "frame": self.frame_index, "evicted_at": None})
        if self._warming:
            self._static_lengths.add(n)
        # the prefix repeats every frame where nothing is cached (the peers' way, timed as such by the bench)
        repeats = graph or n == 1 or n in self._static_lengths or (prefix and self.config.mode == "none")
        return self._forward(x, positions, block_tensor, slots, repeats=repeats)

    def _image_embeds(self, patches: torch.Tensor, patch_positions: torch.Tensor) -> torch.Tensor:
        """A frame's uint8 patches and their positions (encode_frame) through the vision embedder, on the device."""
        return self.model.vision(scale_patches(patches, self.device, self.dtype), patch_positions.to(self.device))

    def _check_room(self, n: int) -> None:
        for t, r in self.cache.ring_size.items():
            if t == SLIDING:
                continue  # sliding rings overwrite only tokens that left the window
            live = self.cache.ring_written if self.config.mode != "window" else self._live_ring_tokens()
            if live + n > r:
                raise CacheFull(f"context full: {live + n} tokens after the prefix, max_context allows {r}; "
                                f"raise max_context or lower window_frames / image_tokens")

    def _live_ring_tokens(self) -> int:
        return sum(e - s for s, e in self.blocks) + (self.next_pos - (self.blocks[-1][1] if self.blocks else self.next_pos))

    # --- public API --------------------------------------------------------------------------
    def set_prefix(self, instruction: str, system: str = "") -> None:
        """Prefill the prefix once (again only when the instruction changes). One too long for the cache is refused
        before anything changes: the prefix before it stays."""
        ids = self.prefix_ids_for(instruction, system)
        if ids == self.prefix_ids and self.config.mode != "none":
            return
        if self.config.mode != "none":
            self.prefix_ids = []  # until loaded: a failure part-way must not leave frames running on a cleared cache
            self._load_prefix(ids)
        self.prefix_ids = ids

    def prefix_ids_for(self, instruction: str, system: str = "") -> list[int]:
        """The prefix's token ids; CacheFull where they would not fit the cache. Changes nothing."""
        ids = self.prompts.prefix(instruction, system)
        if len(ids) > self.cache.prefix_capacity:
            raise CacheFull(f"the prompt before the frame would be {len(ids)} tokens, the engine's max_prefix is "
                            f"{self.cache.prefix_capacity}: shorten the instruction")
        return ids

    def warm_up(self, selector=None) -> None:
        """One throw-away frame (640x480, black), so that what the first real frame would compile, autotune
        and graph-capture happens now; then the cache holds the prefix alone again, as if it never came."""
        self._warming = True  # the chunk lengths this frame runs are compiled specialised (see __init__)
        try:
            self.step(np.zeros((480, 640, 3), np.uint8), selector)
        finally:
            self._warming = False
        if self._compiled_any is not None:  # and a short run of a length it did not see, by the any-length code
            self.cache.rewind()
            self.next_pos = self.prefix_len
            self._chunk(self.prefix_ids[:1] * min(n for n in range(2, 64) if n not in self._static_lengths))
        if self._graphs_on() and self._graph_chunks_on():  # the jump-forward lengths it ran, graphed now
            for n in sorted(self._static_lengths):
                if 1 < n <= GRAPHED_CHUNK_MAX and ("ids", n) not in self._graphs:
                    self._capture("ids", n)
        if self.config.mode != "none":
            self._load_prefix(self.prefix_ids)
        self.frame_index = 0

    def _load_prefix(self, ids: list[int]) -> None:
        self.cache.clear()
        self.next_pos, self.next_block, self.blocks, self.pending = 0, 0, [], []
        if self.record is not None:
            self.record.clear()
        self._chunk(ids, prefix=True)
        self.prefix_len = self.next_pos

    def encode_frame(self, rgb) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 patches, positions) on the host; step() scales them on the session's device."""
        return frame_patches(rgb, self.config.image_tokens, self.patch_size, self.pooling)

    @torch.no_grad()
    def step(self, rgb, selector=None, deadline: float | None = None, keep_logits: bool = False) -> StepResult:
        """One frame: preprocess, prefill frame + suffix from the cached prefix, decode an action."""
        if not self.prefix_ids:
            raise RuntimeError("call set_prefix(instruction) before step()")
        selector = selector or GreedySelector(max_tokens=self.config.max_new_tokens)
        self.frame_index += 1
        t0 = time.perf_counter()
        frame = self.encode_frame(rgb)
        t1 = time.perf_counter()
        frame_ids = self.prompts.image(frame[0].shape[0]) + self.prompts.suffix()
        mode = self.config.mode
        if mode == "none":
            self.cache.clear()
            self.next_pos, self.next_block = 0, 0
            if self.record is not None:
                self.record.clear()
            self._chunk(self.prefix_ids, prefix=True)  # the whole prompt again, every frame
            logits = self._chunk(frame_ids, frame, graph=True)
        elif mode == "prefix":
            self.cache.rewind()
            self.next_pos = self.prefix_len
            if self.record is not None:
                del self.record[1:]
            logits = self._chunk(frame_ids, frame, graph=True)
        else:
            self._make_room()
            tail = self.pending + (self.prompts.next_turn() if self.blocks else [])
            if tail:
                self._chunk(tail)
                self.blocks[-1] = (self.blocks[-1][0], self.next_pos)
            self.pending = []
            start = self.next_pos
            logits = self._chunk(frame_ids, frame, graph=True)
            self.blocks.append((start, self.next_pos))
        self._sync()
        t2 = time.perf_counter()
        result = self._decode(logits, selector, deadline, keep_logits)
        self._sync()
        t3 = time.perf_counter()
        if mode == "window":
            self.blocks[-1] = (self.blocks[-1][0], self.next_pos)
        result.timings_ms = {"preprocess": (t1 - t0) * 1e3, "prefill": (t2 - t1) * 1e3,
                             "decode": (t3 - t2) * 1e3, "total": (t3 - t0) * 1e3}
        return result

    def _decode(self, logits, selector, deadline, keep_logits) -> StepResult:
        if (self.config.decode_ahead and not keep_logits and self._graphs_on()
                and hasattr(selector, "choose_on_device")):
            return self._decode_ahead(logits, selector, deadline)
        selector.reset()
        tokens: list[int] = []
        steps = free = 0
        deadline_hit = False
        log = [logits.clone()] if keep_logits else []
        cached = [self._snapshot()] if keep_logits else []
        while True:
            token = selector.select(logits)
            selector.accept(token)
            tokens.append(token)
            free += 1
            pending = [token]
            if selector.done() or len(tokens) >= self.config.max_new_tokens:
                break
            forced = selector.forced()
            tokens += forced
            pending += forced
            if selector.done():
                break
            if deadline is not None and time.monotonic() > deadline:
                deadline_hit = True
                break
            logits = self._decode_chunk(pending)
            pending = []
            steps += 1
            if keep_logits:
                log.append(logits.clone())
                cached.append(self._snapshot())
        if self.config.mode == "window":
            self.pending = pending
        return StepResult(tokens, {}, steps, free, deadline_hit, log, cached)

    def _decode_ahead(self, logits, selector, deadline) -> StepResult:
        """_decode for a selector that chooses on the device (SessionConfig.decode_ahead): step k + 1 is staged and
        launched with token k written into its input by the GPU, then the host reads token k back (queued before the
        step, so it arrives while the step runs) and decides whether the action goes on. A step launched for a token
        that ends the action is taken back: the state is then what _decode leaves."""
        selector.reset()
        if not hasattr(self, "_token_host"):
            self._token_host = torch.zeros(1, dtype=torch.long, pin_memory=self.device.type == "cuda")
            self._token_read = torch.cuda.Event()
        tokens: list[int] = []
        steps = 0
        deadline_hit = False
        while True:
            ahead = len(tokens) + 1 < self.config.max_new_tokens and (deadline is None or time.monotonic() <= deadline)
            if ahead:
                g = self._stage_ids(("ids", 1), [0], self.cache.ring_slot_numbers(1))  # the token: filled in below
                chosen = g["ids"].view(-1)
                selector.choose_on_device(logits, chosen)
                self._token_host.copy_(chosen, non_blocking=True)
                self._token_read.record()
                logits = self._replay(g, 1)
                self._token_read.synchronize()
                token = int(self._token_host[0])
            else:
                token = selector.select(logits)
            selector.accept(token)
            tokens.append(token)
            if selector.done() or len(tokens) >= self.config.max_new_tokens:
                if ahead:  # the step just launched was not needed
                    self.next_pos -= 1
                    self.cache.ring_written -= 1
                break
            if selector.forced():
                raise RuntimeError("a selector that chooses on the device must not force tokens")
            if not ahead:
                deadline_hit = True
                break
            steps += 1
        if self.config.mode == "window":
            self.pending = tokens[-1:]
        return StepResult(tokens, {}, steps, len(tokens), deadline_hit)

    def _snapshot(self) -> list[dict]:
        return [dict(seg) for seg in self.record] if self.record is not None else []

    def _decode_chunk(self, ids: list[int]) -> torch.Tensor:
        n = len(ids)
        if self._graphs_on() and (n == 1 or self._graph_chunks_on() and n <= GRAPHED_CHUNK_MAX):
            if n > 1:
                self._check_room(n)
            return self._replay_ids(("ids", n), ids, self.cache.ring_slot_numbers(n))
        return self._chunk(ids)

    def _make_room(self) -> None:
        """Window mode: evict the oldest frame block(s) and re-base positions when they grow large."""
        while len(self.blocks) >= self.config.window_frames:
            start, end = self.blocks.pop(0)
            self.cache.evict(start, end)
            if self.record is not None:
                for seg in self.record:
                    if start <= int(seg["positions"][0]) < end and seg["evicted_at"] is None:
                        seg["evicted_at"] = self.frame_index
        if self.next_pos + self.max_chunk + self.config.max_new_tokens * 2 > self.config.rebase_threshold:
            self._rebase()

    def _rebase(self) -> None:
        """Shift every position so that the oldest retained frame block starts right after the prefix.
        The prefix moves too (its positions go negative): relative distances, hence attention, are
        unchanged, and position values stay small however long the stream runs."""
        first = self.blocks[0][0] if self.blocks else self.next_pos
        delta = first - self.prefix_len
        if delta <= 0:
            return
        inv = {t: getattr(self.model, f"inv_freq_{t}") for t in set(self.model.layer_types)}
        self.cache.rebase(delta, inv)
        self.blocks = [(s - delta, e - delta) for s, e in self.blocks]
        self.next_pos -= delta
        if self.record is not None:
            for seg in self.record:
                seg["positions"] = seg["positions"] - delta
        self._graphs.clear()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # --- CUDA graphs: the decode step and the frame chunk ----------------------------------------
    # Each replays the whole decoder as launched once, so a step costs the GPU's time and not the launches from
    # Python (~190 kernels a frame, most of a prefill's time at the 12B's int4 shape). Inputs are written on the host
    # into pinned buffers and copied into the graph's static tensors asynchronously: nothing between the host and the
    # replay waits for the GPU. The session's state (positions, cache slots) stays on the Python side.
    def _graphs_on(self) -> bool:
        return self.device.type == "cuda" and self.config.cuda_graph and self.record is None

    def _graph_chunks_on(self) -> bool:
        # the warm-up runs its chunks eagerly, so that their lengths compile specialised (see __init__)
        return self.config.graph_chunks and self._torch_model and not self._warming

    def _replay_ids(self, key: tuple[str, int], ids: list[int], slots: dict[str, list[int]],
                    blocks: list[int] | None = None, frame: tuple[torch.Tensor, torch.Tensor] | None = None
                    ) -> torch.Tensor:
        """The tokens `ids` at the next positions, written at `slots` (host numbers per layer type), replayed from
        the graph of `key`: ("ids", n) a decode step or jump-forward chunk, ("frame", n) a frame chunk, with its
        `frame` (uint8 patches, positions) and image-block ids `blocks`. The numbers go over in one asynchronous copy
        from a pinned buffer (the GPU waits on the host between decode steps: one copy instead of ~9 tiny launches),
        a frame's patches in another: the frame's vision embedding runs inside the graph."""
        return self._replay(self._stage_ids(key, ids, slots, blocks, frame), len(ids))

    def _stage_ids(self, key: tuple[str, int], ids: list[int], slots: dict[str, list[int]],
                   blocks: list[int] | None = None, frame: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
        """_replay_ids's inputs copied into the graph of `key` (captured now if new), which is returned unreplayed."""
        n = len(ids)
        g = self._graphs.get(key) or self._capture(key[0], n, frame)
        g["staged"].synchronize()  # the last copies out of the staging buffers are done (a selector need not sync)
        g["host"][:, :n] = [ids, list(range(self.next_pos, self.next_pos + n)), blocks or [-1] * n,
                            *(slots[t] for t in g["order"])]
        g["packed"].copy_(g["staging"], non_blocking=True)
        if frame is not None:
            for name, value in zip(("patches", "patch_pos"), frame):
                g[name + "_staging"].copy_(value)
                g[name].copy_(g[name + "_staging"], non_blocking=True)
        g["staged"].record()
        return g

    def _replay(self, g: dict, n: int) -> torch.Tensor:
        g["graph"].replay()
        self.next_pos += n
        return g["logits"]

    def decode_step_graph(self):
        """The captured one-token decode step (a torch.cuda.CUDAGraph), None before the first: replayed, it repeats the
        last step (the same inputs, the same K/V written to the same slot), which times a step's GPU work alone."""
        g = self._graphs.get(("ids", 1))
        return g["graph"] if g else None

    def _capture(self, kind: str, n: int, frame: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
        """Capture the forward over n tokens given as ids: "ids", embedded inside the graph; "frame", a frame chunk,
        with the vision embedding of `frame`'s patches (their count and size fixed from then on) inside too."""
        dev = self.device
        # ids, positions, image-block ids and each layer type's slots: rows of one buffer, filled by one copy from a
        # pinned twin (_replay_ids). Rows padded to 32 numbers start 256-byte aligned, what TensorRT requires of the
        # addresses it binds (inductor assumes 16).
        order = sorted(self.cache.capacity)
        packed = torch.zeros(3 + len(order), -(-n // 32) * 32, dtype=torch.long, device=dev)
        packed[2] = -1
        packed[3:] = self.cache.prefix_capacity
        pinned = dev.type == "cuda"  # (the staging runs on CPU in test_engine_graph_staging.py)
        staging = torch.zeros(packed.shape, dtype=torch.long, pin_memory=pinned)
        static = dict(ids=packed[0, :n].view(1, n), pos=packed[1, :n], blocks=packed[2, :n],
                      slots={t: packed[3 + i, :n] for i, t in enumerate(order)},
                      packed=packed, staging=staging, host=staging.numpy(), order=order, staged=torch.cuda.Event())
        if kind == "frame":
            for name, value in zip(("patches", "patch_pos"), frame):
                static[name] = torch.zeros(value.shape, dtype=value.dtype, device=dev)
                static[name + "_staging"] = torch.zeros(value.shape, dtype=value.dtype, pin_memory=pinned)
        saved = {t: (self.cache.slot_pos[t].clone(), self.cache.slot_block[t].clone()) for t in self.cache.capacity}
        k_saved = [(k.clone(), v.clone()) for k, v in zip(self.cache.k, self.cache.v)]

        repeats = kind == "frame" or n == 1 or n in self._static_lengths  # a jump-forward length the warm-up did
        # not run is captured from the any-length code: capturing compiles nothing new

        def run():
            x = static["ids"]
            if kind == "frame":
                x = self.model.embed(x, self._image_embeds(static["patches"], static["patch_pos"]))
            return self._forward(x, static["pos"], static["blocks"], static["slots"], repeats=repeats)

        graph, logits = self._record(run)
        # warm-up and capture wrote into the cache: put it back as it was
        for t, (p, b) in saved.items():
            self.cache.slot_pos[t].copy_(p)
            self.cache.slot_block[t].copy_(b)
        for (k, v), (ks, vs) in zip(zip(self.cache.k, self.cache.v), k_saved):
            k.copy_(ks)
            v.copy_(vs)
        del k_saved
        self._graphs[(kind, n)] = {**static, "graph": graph, "logits": logits}
        return self._graphs[(kind, n)]

    def _record(self, run) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """`run` warmed up on a side stream (twice), then captured: (the graph, the tensor its replays write)."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                run()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        return graph, out
