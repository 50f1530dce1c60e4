"""`gemma4-agent bench`: per-frame latency of the streaming engine at any config's shape.

Random weights when given a config (latency does not depend on their values), real ones when given a
checkpoint. `--cache none` recomputes the whole prompt every frame (what peers do), for comparison.
On CUDA it also measures the two ceilings in the same run (device copy bandwidth, bf16 matmul rate),
computes the per-frame floor from them, and asserts that 100 warm frames allocate nothing.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..actions.selectors import GreedySelector
from ..model.config import IMAGE_TOKEN_COUNTS, ModelConfig
from ..model.loader import DTYPES, load_model, resolve_dtype
from ..model.network import build_model
from ..quant.int4 import Int4Linear
from .session import SessionConfig, StreamingSession

GRIDS = {70: (10, 7), 140: (14, 10), 280: (20, 14), 560: (28, 20), 1120: (40, 28)}  # (cols, rows) of merged patches


class SyntheticPrompts:
    """Token ids of the right lengths for a model without a tokenizer (benchmarks only)."""

    def __init__(self, config: ModelConfig, prefix_tokens: int):
        self.image_id, self.boi_id, self.eoi_id = config.image_token_id, config.boi_token_id, config.eoi_token_id
        vocab = config.text_config.vocab_size
        rng = np.random.default_rng(0)
        self._prefix = [2] + [int(t) for t in rng.integers(10, min(vocab, 250_000), prefix_tokens - 1)]

    def prefix(self, instruction: str, system: str = "") -> list[int]:
        return list(self._prefix)

    def image(self, n: int) -> list[int]:
        return [self.boi_id] + [self.image_id] * n + [self.eoi_id]

    def suffix(self) -> list[int]:
        return [106, 107, 108, 109]

    def next_turn(self) -> list[int]:
        return [106, 107, 108, 109]


def grammar_selector(model):
    """What the agent decodes with, for timing an action rather than a fixed count of tokens: the action grammar
    (config/actions.yaml's default) over the demo tokenizer's vocabulary, jump-forward on. The model's logits may be
    wider than that vocabulary (the 12B's 262144): the rest is never allowed."""
    from ..actions.grammar import GrammarSelector
    from ..actions.spec import load_action_spec
    from ..demo.tokenizer import build_tokenizer

    return GrammarSelector(load_action_spec(), build_tokenizer(), vocab_size=model.config.text_config.vocab_size)


def load_for_bench(path: str, device: str, dtype: torch.dtype):
    p = Path(path)
    if p.is_dir() and any(p.glob("model*.safetensors*")):
        return load_model(p, dtype=dtype, device=device)
    return build_model(ModelConfig.resolve(path), device=device, dtype=dtype)


def frame_for(tokens: int, side: int) -> np.ndarray:
    cols, rows = GRIDS[tokens]
    return np.random.default_rng(tokens).integers(0, 256, (rows * side, cols * side, 3), dtype=np.uint8)


def percentiles(values) -> dict:
    a = np.asarray(values, dtype=float)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99))}


def measure_ceilings(device) -> dict:
    """Device-to-device copy bandwidth (bytes read + written) and bf16 matmul rate, measured here."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    reps = 20
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize()
    bandwidth = 2 * n * reps / (time.perf_counter() - t)
    del a, b
    m = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        m @ m
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        m @ m
    torch.cuda.synchronize()
    flops = 2 * 8192**3 * 20 / (time.perf_counter() - t)
    del m
    torch.cuda.empty_cache()
    return {"copy_bandwidth_gbs": bandwidth / 1e9, "matmul_tflops": flops / 1e12}


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def matmul_weights(module: torch.nn.Module) -> int:
    """Weights one token is multiplied through: in x out of every linear layer, dense or int4 (counted from the
    shapes: the packed int4 weights are buffers, not parameters, and were missed by a count of parameters)."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, (torch.nn.Linear, Int4Linear)))


def floor_ms(model, chunk_tokens: int, decode_tokens: int, ceilings: dict, bytes_per_token: int) -> float:
    """Prefill FLOPs over the matmul rate plus the weight bytes read per decoded token over bandwidth."""
    vocab, hidden = model.config.text_config.vocab_size, model.config.text_config.hidden_size
    prefill_flops = 2 * matmul_weights(model.layers) * chunk_tokens + 2 * vocab * hidden
    prefill = prefill_flops / (ceilings["matmul_tflops"] * 1e12)
    decode = (decode_tokens - 1) * bytes_per_token / (ceilings["copy_bandwidth_gbs"] * 1e9)
    return (prefill + decode) * 1e3


def run_bench(config: str, device: str = "cpu", frames: int = 50, image_tokens: int = 280, decode_tokens: int = 12,
              cache: str = "prefix", prefix_tokens: int = 600, dtype: str = "auto", warmup: int = 3,
              window_frames: int = 4, model=None, compile: bool = False, profile_to: str | Path | None = None,
              join_projections: bool = True, triton_gemv: bool = True, fused_qkv: bool = True,
              selector: str = "fixed", compile_any_length: bool = True, profile_later: list | None = None,
              without_decode_ahead: bool = False) -> dict:
    """selector "fixed": greedy for exactly `decode_tokens` tokens a frame; "grammar": an action a frame
    (grammar_selector), `decode_tokens` its cap.

    `profile_to`: a kernel profile of a few more frames, after the timed ones. With `profile_later` (a list) it is
    not taken now: a function taking it is appended, to be called once every run of the process is timed.
    `without_decode_ahead`: as many frames again with SessionConfig.decode_ahead off, reported apart (the host's
    wait between decode steps, in the same process), with the share of frames whose tokens are the same. The
    profiler leaves CUPTI attached to the process (pytorch/pytorch#144455), which slows every later launch and
    synchronisation: a second run timed after a first one's profile paid 0.1-0.2 ms more a decoded token at the 12B
    (BENCHMARKS.md, sixteenth session). The session stays alive until then."""
    torch_dtype = resolve_dtype(dtype, device)
    model = model if model is not None else load_for_bench(config, device, torch_dtype)
    vision = model.config.vision_config
    side = vision.patch_size * vision.pooling_kernel_size
    chunk = image_tokens + 6
    per_frame = chunk + 2 * decode_tokens + 8
    max_context = prefix_tokens + per_frame * (window_frames + 1 if cache == "window" else 1) + 64
    session = StreamingSession(model, SyntheticPrompts(model.config, prefix_tokens),
                               SessionConfig(mode=cache, image_tokens=image_tokens, max_new_tokens=decode_tokens,
                                             max_prefix=prefix_tokens + 8, max_context=max_context,
                                             window_frames=window_frames, compile=compile,
                                             join_projections=join_projections, triton_gemv=triton_gemv,
                                             fused_qkv=fused_qkv, compile_any_length=compile_any_length))
    t0 = time.perf_counter()
    session.set_prefix("bench")  # with compile, the any-length code compiles here
    prefix_s = time.perf_counter() - t0
    frame = frame_for(image_tokens, side)
    chooser = GreedySelector(max_tokens=decode_tokens) if selector == "fixed" else grammar_selector(model)
    warmup_frames_s = []
    for _ in range(warmup):  # the first frame compiles, autotunes and captures: the wait before a first action
        t0 = time.perf_counter()
        session.step(frame, chooser)
        warmup_frames_s.append(time.perf_counter() - t0)
    mem_before = torch.cuda.memory_allocated(device) if device == "cuda" else None
    results = [session.step(frame, chooser) for _ in tqdm(range(frames), desc=f"bench {cache}", leave=False)]
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "dtype": str(torch_dtype).replace("torch.", ""),
        "cache": cache, "compile": compile, "frames": frames, "image_tokens": image_tokens, "decode_tokens": decode_tokens,
        "prefix_tokens": prefix_tokens, "selector": selector,
        "per_frame_ms": percentiles([r.timings_ms["total"] for r in results]),
        "prefill_ms_p50": float(np.median([r.timings_ms["prefill"] for r in results])),
        "preprocess_ms_p50": float(np.median([r.timings_ms["preprocess"] for r in results])),
        "decode_ms_p50": float(np.median([r.timings_ms["decode"] for r in results])),
        "decode_ms_per_token_p50": float(np.median([r.timings_ms["decode"] / max(1, r.decode_steps) for r in results])),
        # a frame's tokens, and the forward passes after the prefill that produced them (a jump-forward chunk of
        # forced tokens is one): fewer steps than tokens is what the grammar's jump-forward saves
        "tokens_mean": float(np.mean([len(r.tokens) for r in results])),
        "decode_steps_mean": float(np.mean([r.decode_steps for r in results])),
        "warmup_s": sum(warmup_frames_s), "warmup_frames_s": warmup_frames_s, "set_prefix_s": prefix_s,
    }
    if without_decode_ahead:
        session.config.decode_ahead = False
        apart = [session.step(frame, chooser) for _ in range(frames)]
        session.config.decode_ahead = True
        report["without_decode_ahead"] = {
            "per_frame_ms": percentiles([r.timings_ms["total"] for r in apart]),
            "decode_ms_per_token_p50": float(np.median([r.timings_ms["decode"] / max(1, r.decode_steps)
                                                        for r in apart])),
            # the same frame from the same prefix each time (prefix mode): its tokens must not depend on decoding ahead
            "same_tokens_as_decode_ahead": float(np.mean([list(r.tokens) == list(a.tokens)
                                                          for r, a in zip(results, apart)]))}
    decile = max(1, frames // 10)
    report["first_decile_p50_ms"] = float(np.median([r.timings_ms["total"] for r in results[:decile]]))
    report["last_decile_p50_ms"] = float(np.median([r.timings_ms["total"] for r in results[-decile:]]))
    if device == "cuda":
        torch.cuda.synchronize()
        report["memory_allocated_before"] = mem_before
        report["memory_allocated_after"] = torch.cuda.memory_allocated(device)
        report["no_hot_path_allocation"] = mem_before == report["memory_allocated_after"]
        report["weights_gb"] = weight_bytes(model) / 1e9
        report["choices"] = timed_choices()
        graph = session.decode_step_graph()
        if graph is not None:  # the host's share of a decode step, in two parts (see replay_ms)
            report["decode_graph_ms_per_token"] = replay_ms(graph)
            report["decode_graph_synced_ms_per_token"] = replay_ms(graph, synced=True)
            report["decode_host_wait_ms_per_token"] = report["decode_ms_per_token_p50"] - report[
                "decode_graph_ms_per_token"]
    if profile_to is not None:
        def take_profile():
            t0 = time.perf_counter()
            write_profile(lambda: session.step(frame, chooser), profile_to)
            report["profile_s"] = time.perf_counter() - t0

        if profile_later is None:
            take_profile()
        else:
            profile_later.append(take_profile)
    return report


def replay_ms(graph, reps: int = 50, synced: bool = False) -> float:
    """Time of one replay of a CUDA graph. Replayed back to back (the host queues them faster than the GPU runs
    them): the GPU's time alone, a decode step without the wait between steps for the host to read the token back
    and launch the next (decode_ms_per_token less this is that wait). `synced`: each replay launched only once the
    one before has finished, timed on the host: the GPU's time plus the launch and the synchronisation alone, so
    that what the decode loop waits beyond it is its Python (the selector, staging the next step's inputs)."""
    graph.replay()
    torch.cuda.synchronize()
    if synced:
        t0 = time.perf_counter()
        for _ in range(reps):
            graph.replay()
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def timed_choices() -> dict:
    """What the engine's per-shape timed choices (fastest.FastestOf) picked in this process: kind -> {shape: pick}."""
    from ..model import triton_attention
    from ..quant import triton_q4
    from . import gemv

    kinds = {"int4_matmul (N, K, rows, zero-points)": triton_q4._CHUNK, "bf16_gemv (N, K, dtype)": gemv._ONE_ROW,
             "attention_decode (KV heads, rows, slots, dim)": triton_attention._DECODE,
             "attention_prefill (KV heads, rows, slots, dim)": triton_attention._PREFILL}
    return {kind: {str(key): pick for key, pick in chooser.picks.items()} for kind, chooser in kinds.items()}


def write_profile(step, path: str | Path, frames: int = 3) -> None:
    """Kernel time table (torch.profiler) of a few warm frames: where a frame's time goes. On CUDA a second table
    splits the GPU's busy time among kernels without counting overlap twice (`exclusive_times`): with our kernels
    scheduled while the one before still runs (pdl.py), the first table counts each one's wait as its own time;
    a third lists where the GPU sat idle, waiting on the host."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        for _ in range(frames):
            step()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    text = prof.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=160) + "\n"
    if torch.cuda.is_available():
        from torch.autograd import DeviceType

        kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA]
        busy, idle = exclusive_times(kernels)
        text += "\n" + exclusive_table(busy, frames) + "\n" + idle_table(idle, frames)
    Path(path).write_text(text)


def exclusive_times(kernels: list[tuple[str, float, float]]):
    """(name, start, end) of GPU work -> (busy, idle). busy: name -> (time, count), where each piece is charged only
    for the part of the timeline it extends past everything that started before it: the busy time of the GPU, split
    without double counting (a kernel scheduled early that waits for the one before is charged from that one's
    end). idle: "before -> after" -> (time, count) of the gaps where the GPU ran nothing, named by the kernels on
    either side: the host's share of a frame (a decode step's token read back, launches from Python)."""
    busy: dict[str, tuple[float, int]] = {}
    idle: dict[str, tuple[float, int]] = {}
    reached, last = float("-inf"), ""
    for name, start, end in sorted(kernels, key=lambda k: (k[1], k[2])):
        if start > reached > float("-inf"):
            _add(idle, f"{last[:50]} -> {name[:50]}", start - reached)
        _add(busy, name, max(0.0, end - max(start, reached)))
        if end > reached:
            reached, last = end, name
    return busy, idle


def _add(totals: dict[str, tuple[float, int]], key: str, time: float) -> None:
    total, count = totals.get(key, (0.0, 0))
    totals[key] = (total + time, count + 1)


def exclusive_table(times: dict[str, tuple[float, int]], frames: int, rows: int = 40) -> str:
    """exclusive_times' busy part (us) as a Markdown table per frame, the largest first."""
    return _table("GPU busy time without overlap: {:.2f} ms a frame", "kernel", times, frames, rows)


def idle_table(gaps: dict[str, tuple[float, int]], frames: int, rows: int = 20) -> str:
    """exclusive_times' idle part (us) as a Markdown table per frame, the largest first."""
    return _table("GPU idle between kernels: {:.2f} ms a frame", "gap (kernel before -> after)", gaps, frames, rows)


def _table(title: str, what: str, times: dict[str, tuple[float, int]], frames: int, rows: int) -> str:
    # title: formatted with the total in ms a frame
    total = sum(t for t, _ in times.values())
    lines = [title.format(total / frames / 1e3), "", f"| {what} | ms a frame | share | count a frame | us each |",
             "|---|---:|---:|---:|---:|"]
    for name, (t, n) in sorted(times.items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f"| {name[:104]} | {t / frames / 1e3:.3f} | {t / (total or 1.0):.1%} | {n / frames:g} | "
                     f"{t / n:.2f} |")
    return "\n".join(lines) + "\n"


def add_compile_any_length(parser) -> None:
    """--compile-any-length on|off (SessionConfig.compile_any_length), for the scripts that time compiled rows."""
    parser.add_argument("--compile-any-length", choices=["on", "off"], default="on",
                        help="SessionConfig.compile_any_length: off, the prefix (and jump-forward runs of the "
                             "grammar) run uncompiled, which 12 fixed tokens a frame never use; minutes less compiling")


def add_arguments(parser) -> None:
    from ..cli import positive

    parser.add_argument("--config", required=True, help="config.json, checkpoint folder, or preset name (gemma4-12b)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--frames", type=positive(int), default=50)
    parser.add_argument("--image-tokens", type=int, choices=IMAGE_TOKEN_COUNTS, default=280)
    parser.add_argument("--decode-tokens", type=positive(int), default=12,
                        help="tokens a frame (--selector fixed) or an action's cap (--selector grammar)")
    parser.add_argument("--selector", choices=["fixed", "grammar"], default="fixed",
                        help="greedy for a fixed count of tokens, or an action of the action grammar (jump-forward)")
    parser.add_argument("--cache", choices=["prefix", "window", "none"], default="prefix")
    parser.add_argument("--prefix-tokens", type=positive(int), default=600)
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="auto: bf16 on CUDA and on CPUs with AMX, float32 on other CPUs")
    parser.add_argument("--ceilings", action="store_true", help="CUDA: measure bandwidth/matmul rate and the floor")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decoder (on CUDA: prefill chunks and the graph-captured decode step)")
    parser.add_argument("--quant", choices=["q4_0"], help="int4 decoder linears (quantized here, from the weights given)")
    parser.add_argument("--json", help="write the report here")


def run(args) -> int:
    import sys

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gemma4-agent bench: error: --device cuda: no CUDA device here (use --device cpu)", file=sys.stderr)
        return 2
    try:
        model = load_for_bench(args.config, args.device, resolve_dtype(args.dtype, args.device))
    except (OSError, ValueError) as err:  # a wrong path or a malformed config: say so, no traceback
        print(f"gemma4-agent bench: error: --config {err}", file=sys.stderr)
        return 2
    if args.quant:
        from ..quant.int4 import quantize_model

        model = quantize_model(model, args.quant, progress=False)
    report = run_bench(args.config, args.device, args.frames, args.image_tokens, args.decode_tokens, args.cache,
                       args.prefix_tokens, args.dtype, compile=args.compile, model=model, selector=args.selector)
    report["quant"] = args.quant
    if args.device == "cuda" and args.ceilings:
        report["ceilings"] = measure_ceilings(args.device)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0
