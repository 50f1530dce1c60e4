"""The streaming engine's contract: logits with cache reuse equal a from-scratch recompute of the same
token history at the same positions, in prefix and window modes, through evictions and a position re-base.

In window mode an evicted frame block is invisible to every token written after its eviction, while the
cached states of older tokens keep what they computed while it was visible (that is what a cache is);
the recompute applies exactly that visibility rule to the whole history, so any error in the ring
buffers, the eviction, the masks or the key rotation of a re-base shows up."""
from pathlib import Path

import numpy as np
import pytest
import torch

from gemma4_agent.engine import SessionConfig, StaticKVCache, StreamingSession
from gemma4_agent.model import ModelConfig, build_model, load_model
from gemma4_agent.model.config import SLIDING
from gemma4_agent.model.tokenizer import PromptBuilder

from conftest import BOI, EOI, IMAGE, tiny_tokenizer


def _recompute(model, segments):
    ids = torch.tensor([i for seg in segments for i in seg["ids"]])
    positions = torch.cat([seg["positions"] for seg in segments])
    blocks = torch.cat([seg["blocks"] for seg in segments])
    written = torch.cat([torch.full((len(seg["ids"]),), seg["frame"]) for seg in segments])
    evicted = torch.cat([torch.full((len(seg["ids"]),), seg["evicted_at"] or 1 << 30) for seg in segments])
    visible = (evicted[None, :] > written[:, None])[None, None]
    embeds = [seg["image_embeds"] for seg in segments if seg["image_embeds"] is not None]
    h = model.embed(ids[None], torch.cat(embeds) if embeds else None)
    masks = {t: m & visible for t, m in model.masks(positions, positions, blocks[None], blocks[None]).items()}
    hidden = model.decode(h, positions, masks)
    return model.logits(hidden[:, -1]).float()[0]


def _frames(n, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(24, 32), (32, 24), (16, 40)]
    return [rng.integers(0, 256, (*shapes[i % 3], 3), dtype=np.uint8) for i in range(n)]


@pytest.mark.parametrize("name", ["kv_shared_window8", "gqa_window3", "kv_separate"])
@pytest.mark.parametrize("mode", ["prefix", "window"])
def test_reuse_equals_recompute(tiny_checkpoints, name, mode, THRESH=150):
    model = load_model(tiny_checkpoints[name])
    prompts = PromptBuilder(tiny_tokenizer(), IMAGE, BOI, EOI)
    cfg = SessionConfig(mode=mode, image_tokens=70, max_new_tokens=5, max_prefix=32, max_context=400,
                        window_frames=2, rebase_threshold=THRESH)
    session = StreamingSession(model, prompts, cfg)
    session.record = []
    session.set_prefix("go to the red ball", system="user model")
    greedy_mismatch = 0
    rebased = False
    for i, frame in enumerate(_frames(9)):
        before = session.next_pos
        result = session.step(frame, keep_logits=True)
        rebased |= session.next_pos < before
        assert len(result.logits_log) == 5  # prefill logits + 4 decode steps
        for logits, cached in zip(result.logits_log, result.cached_log):
            expected = _recompute(model, cached)
            rel = ((logits - expected).norm() / expected.norm()).item()
            assert rel < 1e-4, f"frame {i}: relative error {rel:.2e}"
            greedy_mismatch += int(logits.argmax() != expected.argmax())
    assert greedy_mismatch == 0
    if mode == "window":
        assert rebased, "the stream never crossed the re-base threshold"
        assert len(session.blocks) == 2  # 9 frames, 2 kept: 7 evictions
    else:
        assert session.prefix_len == session.record[0]["positions"].numel()
    if mode == "window":  # the re-base kept positions small however long the stream runs
        assert session.next_pos < 150 + 200


def test_prefix_is_computed_once(tiny_checkpoints):
    model = load_model(tiny_checkpoints["kv_shared_window8"])
    session = StreamingSession(model, PromptBuilder(tiny_tokenizer(), IMAGE, BOI, EOI),
                               SessionConfig(image_tokens=70, max_new_tokens=2, max_prefix=32, max_context=200))
    session.set_prefix("go to the red ball")
    k_before = session.cache.k[0][:, :, : session.prefix_len].clone()
    session.set_prefix("go to the red ball")  # same instruction: nothing recomputed
    for frame in _frames(3):
        session.step(frame)
    assert torch.equal(session.cache.k[0][:, :, : session.prefix_len], k_before)
    session.set_prefix("go to the blue cube")
    assert not torch.equal(session.cache.k[0][:, :, : session.prefix_len], k_before)


def test_none_mode_matches_prefix_mode(tiny_checkpoints):
    model = load_model(tiny_checkpoints["gqa_window3"])
    prompts = PromptBuilder(tiny_tokenizer(), IMAGE, BOI, EOI)
    results = {}
    for mode in ("prefix", "none"):
        session = StreamingSession(model, prompts, SessionConfig(mode=mode, image_tokens=70, max_new_tokens=4,
                                                                 max_prefix=32, max_context=200))
        session.set_prefix("go to the green cube")
        results[mode] = [session.step(f, keep_logits=True) for f in _frames(3, seed=3)]
    for a, b in zip(results["prefix"], results["none"]):
        assert a.tokens == b.tokens
        for la, lb in zip(a.logits_log, b.logits_log):
            assert ((la - lb).norm() / lb.norm()).item() < 1e-4


@pytest.mark.parametrize("mode", ["prefix", "window"])
def test_warm_up_frame_leaves_no_trace(tiny_checkpoints, mode):
    """A session warmed up with a throw-away frame (what the agent does before compiled runs) then gives
    the same logits, frame after frame, as one that never saw it."""
    model = load_model(tiny_checkpoints["gqa_window3"])
    prompts = PromptBuilder(tiny_tokenizer(), IMAGE, BOI, EOI)
    cfg = SessionConfig(mode=mode, image_tokens=70, max_new_tokens=4, max_prefix=32, max_context=400,
                        window_frames=2)
    plain, warmed = StreamingSession(model, prompts, cfg), StreamingSession(model, prompts, cfg)
    for s in (plain, warmed):
        s.set_prefix("go to the red ball")
    warmed.warm_up()
    assert warmed.next_pos == plain.next_pos and warmed.frame_index == 0
    for frame in _frames(4, seed=3):
        a, b = plain.step(frame, keep_logits=True), warmed.step(frame, keep_logits=True)
        assert a.tokens == b.tokens
        for la, lb in zip(a.logits_log, b.logits_log):
            torch.testing.assert_close(lb, la, rtol=0, atol=0)


def test_ring_slot_numbers_wrap_per_layer_type():
    """The host-side slot claim (what a CUDA-graphed chunk stages in one copy, and an eager one turns into tensors)
    wraps each layer type's ring on its own and advances ring_written."""
    model = build_model(ModelConfig.from_json(Path(__file__).resolve().parents[1] / "benchmarks" / "tiny-config.json"))
    # sliding ring: window 256 + max_chunk 4 = 260 slots; full ring: 300 - 8 = 292
    numbers = StaticKVCache(model, max_context=300, max_prefix=8, max_chunk=4)
    assert numbers.ring_size[SLIDING] == 260 and len(set(numbers.ring_size.values())) == 2
    written = 0
    for length in [1, 3, 4, 2] * 40 + [0, 1]:  # 401 tokens: past both rings' ends
        claimed = numbers.ring_slot_numbers(length)
        assert claimed == {t: [8 + (written + i) % r for i in range(length)] for t, r in numbers.ring_size.items()}
        written += length
        assert numbers.ring_written == written
    assert claimed[SLIDING] == [8 + 400 % 260] and max(max(c) for c in claimed.values()) < 300
    numbers.rewind()
    assert numbers.ring_slot_numbers(2) == {t: [8, 9] for t in numbers.ring_size}


@pytest.mark.parametrize("mode", ["prefix", "window"])
def test_a_cache_padded_to_aligned_slots_changes_nothing(tiny_checkpoints, mode):
    """On CUDA the session pads each layer type's cache to a multiple of 64 slots (aligned rows for cuBLAS): the
    padding is never written, so every mask leaves it out. Here on CPU, a padded cache against the plain one, through
    window evictions: the same tokens and logits."""
    model = load_model(tiny_checkpoints["gqa_window3"])
    prompts = PromptBuilder(tiny_tokenizer(), IMAGE, BOI, EOI)
    cfg = SessionConfig(mode=mode, image_tokens=70, max_new_tokens=5, max_prefix=32, max_context=400,
                        window_frames=2)
    plain, padded = StreamingSession(model, prompts, cfg), StreamingSession(model, prompts, cfg)
    padded.cache = StaticKVCache(model, cfg.max_context, cfg.max_prefix, padded.max_chunk, slot_align=64)
    assert all(c % 64 == 0 and c > plain.cache.capacity[t] for t, c in padded.cache.capacity.items())
    assert padded.cache.ring_size == plain.cache.ring_size
    for session in (plain, padded):
        session.set_prefix("go to the red ball", system="user model")
    for frame in _frames(5, seed=4):
        a, b = plain.step(frame, keep_logits=True), padded.step(frame, keep_logits=True)
        assert a.tokens == b.tokens
        for la, lb in zip(a.logits_log, b.logits_log):
            torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
