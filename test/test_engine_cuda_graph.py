"""The streaming session's CUDA graphs (the decode step and the frame chunk, SessionConfig.cuda_graph) give the
logits the session computes without them, frame after frame, in both cache modes, on float and int4 weights.
Needs a CUDA device (the lent GPU runs it); skipped elsewhere."""
from pathlib import Path

import numpy as np
import pytest
import torch

from gemma4_agent.engine import SessionConfig, StreamingSession
from gemma4_agent.engine.bench import SyntheticPrompts
from gemma4_agent.model import ModelConfig, build_model
from gemma4_agent.quant.int4 import quantize_model

from conftest import Runs, decoding_ahead_agrees, stepped_alike

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
TINY = Path(__file__).resolve().parents[1] / "benchmarks" / "tiny-config.json"


def replayed(reference, other, frames: int) -> list:
    """stepped_alike, with the relative logit error of each step: per frame (reference's result, other's result,
    errors)."""
    return [(a, b, [((lb.float() - la.float()).norm() / la.float().norm()).item()
                    for la, lb in zip(a.logits_log, b.logits_log)])
            for a, b in stepped_alike(reference, other, frames)]


@pytest.mark.parametrize("scheme", [None, "q4_0"])
@pytest.mark.parametrize("mode", ["prefix", "window"])
def test_graphed_session_equals_the_eager_one(mode, scheme):
    model = build_model(ModelConfig.from_json(TINY), device="cuda", dtype=torch.float32)
    if scheme:
        quantize_model(model, scheme, progress=False)
    cfg = dict(mode=mode, image_tokens=70, max_new_tokens=4, max_prefix=48, max_context=600, window_frames=2)
    eager = StreamingSession(model, SyntheticPrompts(model.config, 40), SessionConfig(**cfg, cuda_graph=False))
    graphed = StreamingSession(model, SyntheticPrompts(model.config, 40), SessionConfig(**cfg, cuda_graph=True))
    # window mode: evictions from the third frame on, the frame chunk at new positions
    for a, b, errors in replayed(eager, graphed, 5):
        assert b.tokens == a.tokens and len(b.logits_log) == len(a.logits_log) == 4
        assert max(errors) < 1e-5, errors
    frame = np.zeros((48, 64, 3), dtype=np.uint8)
    frame_len = graphed.encode_frame(frame)[0].shape[0] + 2 + 4  # <|image> patches <image|> + the suffix
    assert set(graphed._graphs) == {("frame", frame_len), ("ids", 1)} and not eager._graphs


def test_bf16_session_with_the_triton_gemv_equals_the_one_without():
    # engine/gemv.py on the GPU: the bf16 layers routed through gemma4_agent::linear (Triton or cuBLAS per shape,
    # as timed) give the logits of plain cuBLAS, graphed, up to bf16 summation order
    from gemma4_agent.engine import gemv

    torch.manual_seed(0)
    base = build_model(ModelConfig.from_json(TINY), device="cuda", dtype=torch.bfloat16)
    torch.manual_seed(0)
    routed = build_model(ModelConfig.from_json(TINY), device="cuda", dtype=torch.bfloat16)
    cfg = dict(image_tokens=70, max_new_tokens=4, max_prefix=48, max_context=600)
    plain = StreamingSession(base, SyntheticPrompts(base.config, 40), SessionConfig(**cfg, triton_gemv=False))
    tried = StreamingSession(routed, SyntheticPrompts(routed.config, 40), SessionConfig(**cfg, triton_gemv=True))
    assert any(isinstance(m, gemv.GemvLinear) for m in routed.modules())
    assert not any(isinstance(m, gemv.GemvLinear) for m in base.modules())
    # Both sum in float32 and round to bf16, so most steps agree exactly; where one sum lands on the other side of
    # a bf16 rounding boundary, this random tiny model carries the one-step difference on to 2-2.5% of the logits
    # (seen on the H200: [0, 0, 0.025, 0.009] and [0, 0, 0, 0.022] over a frame's four steps). A wrong kernel is
    # off at every step it runs in, by far more.
    errors = [e for _, _, frame in replayed(plain, tried, 3) for e in frame]
    assert sorted(errors)[len(errors) // 2] < 1e-2 and max(errors) < 0.1, errors
    assert gemv._ONE_ROW.picks  # the decode step's shapes were timed


@pytest.mark.parametrize("compiled", [False, True])
def test_jump_forward_chunks_replayed_from_graphs_equal_the_eager_session(compiled):
    # SessionConfig.graph_chunks: chunks of a free token and its forced run replayed from a graph per length; one
    # length the warm-up ran (3: graphed at its end, from the specialised code where compiled) and one it did not
    # (5: graphed on first use, from the any-length code)
    model = build_model(ModelConfig.from_json(TINY), device="cuda", dtype=torch.float32)
    cfg = dict(image_tokens=70, max_new_tokens=16, max_prefix=48, max_context=600, compile=compiled)
    eager = StreamingSession(model, SyntheticPrompts(model.config, 40), SessionConfig(**cfg, cuda_graph=False))
    graphed = StreamingSession(model, SyntheticPrompts(model.config, 40), SessionConfig(**cfg, graph_chunks=True))
    runs = [(5, [7, 9]), (11, []), (13, [2, 4, 6, 8]), (3, [1, 12])]
    graphed.set_prefix("go")
    graphed.warm_up(Runs(runs[:2]))  # feeds [5, 7, 9]; the last run is never fed
    assert ("ids", 3) in graphed._graphs and ("ids", 5) not in graphed._graphs
    for a, b in stepped_alike(eager, graphed, 3, lambda: Runs(runs)):
        assert a.tokens == b.tokens == [5, 7, 9, 11, 13, 2, 4, 6, 8, 3, 1, 12]
        assert b.decode_steps == 3 and len(a.logits_log) == len(b.logits_log) == 4
        errors = [((lb.float() - la.float()).norm() / la.float().norm()).item()
                  for la, lb in zip(a.logits_log, b.logits_log)]
        assert max(errors) < 1e-5, errors
    assert {("ids", 1), ("ids", 3), ("ids", 5)} <= set(graphed._graphs) and not eager._graphs


@pytest.mark.parametrize("compiled", [False, True])
def test_fused_qkv_session_equals_the_modules(compiled):
    # SessionConfig.fused_qkv: each attention layer's norms, RoPE and cache write by one kernel (triton_qkv.py),
    # graphed (and compiled: the op writes into the cache buffers), against the modules' eager session; window mode
    # with evictions, float32 (the two differ by float rounding only)
    model = build_model(ModelConfig.from_json(TINY), device="cuda", dtype=torch.float32)
    cfg = dict(mode="window", image_tokens=70, max_new_tokens=4, max_prefix=48, max_context=600, window_frames=2)
    modules = StreamingSession(model, SyntheticPrompts(model.config, 40), SessionConfig(**cfg, cuda_graph=False))
    fused = StreamingSession(model, SyntheticPrompts(model.config, 40),
                             SessionConfig(**cfg, fused_qkv=True, compile=compiled))
    calls = []
    real = torch.ops.gemma4_agent.qkv_to_cache
    with pytest.MonkeyPatch.context() as patch:
        if not compiled:  # the op's calls counted (compiled, it runs inside Inductor's code)
            patch.setattr(torch.ops.gemma4_agent, "qkv_to_cache", lambda *a: calls.append(1) or real(*a))
        for a, b, errors in replayed(modules, fused, 4):
            assert b.tokens == a.tokens and len(b.logits_log) == len(a.logits_log) == 4
            assert max(errors) < 1e-4, errors
    assert compiled or len(calls) % len(model.layers) == 0 and calls


def test_replaying_the_decode_step_graph_repeats_the_last_step():
    # what the benchmark's replay_ms relies on to time a step's GPU work alone: replays rewrite the same K/V to the
    # same slot, so later frames are those of a session that never replayed (window mode: the decoded tokens stay)
    from gemma4_agent.engine.bench import replay_ms

    model = build_model(ModelConfig.from_json(TINY), device="cuda", dtype=torch.float32)
    cfg = SessionConfig(mode="window", image_tokens=70, max_new_tokens=4, max_prefix=48, max_context=600,
                        window_frames=3, cuda_graph=True)
    plain, replaying = (StreamingSession(model, SyntheticPrompts(model.config, 40), cfg) for _ in range(2))
    assert replaying.decode_step_graph() is None
    for s in (plain, replaying):
        s.set_prefix("go")
    rng = np.random.default_rng(0)
    for i in range(3):
        frame = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        a, b = plain.step(frame, keep_logits=True), replaying.step(frame, keep_logits=True)
        assert a.tokens == b.tokens
        for la, lb in zip(a.logits_log, b.logits_log):
            torch.testing.assert_close(lb, la, rtol=0, atol=0)
        assert replay_ms(replaying.decode_step_graph(), reps=5) > 0
        assert replay_ms(replaying.decode_step_graph(), reps=5, synced=True) > 0


@pytest.mark.parametrize("mode", ["prefix", "window"])
def test_decoding_ahead_leaves_what_decoding_step_by_step_leaves(mode):
    # the real graphs and streams: the token read back while the next step runs (test_engine_graph_staging.py has
    # the same on CPU)
    decoding_ahead_agrees(StreamingSession, mode, device="cuda")
