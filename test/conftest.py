"""Shared fixtures: tiny Gemma 4 Unified checkpoints built with transformers (the oracle) and saved
with save_pretrained, exactly as a real checkpoint folder is laid out."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("AMENT_PREFIX_PATH", sys.prefix)

# Token ids of the tiny vocabularies (the real model uses 255999 / 258882 / 258880).
BOI, EOI, IMAGE = 290, 291, 292

TINY_CONFIGS = {
    # both layer types, K=V on full layers, window (8) shorter than the prompts, head_dim 16 vs 32
    "kv_shared_window8": dict(layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                              attention_k_eq_v=True, sliding_window=8, head_dim=16, global_head_dim=32,
                              num_global_key_value_heads=1),
    # K=V off: full layers get their own v_proj
    "kv_separate": dict(layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                        attention_k_eq_v=False, sliding_window=6, head_dim=16, global_head_dim=32),
    # same head_dim for both types, window longer than the prompts
    "same_head_dim": dict(layer_types=["sliding_attention", "full_attention"], attention_k_eq_v=True,
                          sliding_window=512, head_dim=16, global_head_dim=16, num_global_key_value_heads=2),
    # transformers' default 5:1 layer pattern, no softcap
    "default_pattern": dict(num_hidden_layers=6, attention_k_eq_v=True, sliding_window=16, head_dim=8,
                            global_head_dim=16, num_global_key_value_heads=1, final_logit_softcapping=None),
    # GQA with 4 query heads per KV head, window of 3
    "gqa_window3": dict(layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                        num_key_value_heads=1, attention_k_eq_v=True, sliding_window=3, head_dim=16, global_head_dim=24,
                        num_global_key_value_heads=1),
}


def tiny_hf_config(**text_overrides):
    from transformers import Gemma4UnifiedConfig

    text = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=len(
        text_overrides.get("layer_types", [0] * text_overrides.get("num_hidden_layers", 4))),
        num_attention_heads=4, num_key_value_heads=2, final_logit_softcapping=30.0)
    text.update(text_overrides)
    return Gemma4UnifiedConfig(
        text_config=text,
        vision_config=dict(patch_size=4, pooling_kernel_size=2, mm_embed_dim=48, mm_posemb_size=64, output_proj_dims=48),
        audio_config=dict(audio_embed_dim=16),
        boi_token_id=BOI, eoi_token_id=EOI, image_token_id=IMAGE, video_token_id=293, boa_token_id=294,
        eoa_token_index=295, audio_token_id=296,
    )


def save_tiny_checkpoint(path: Path, name: str, seed: int = 0, **save_kwargs) -> Path:
    import torch
    from transformers import Gemma4UnifiedForConditionalGeneration

    torch.manual_seed(seed)
    model = Gemma4UnifiedForConditionalGeneration(tiny_hf_config(**TINY_CONFIGS[name])).eval()
    with torch.no_grad():  # transformers initialises norms to ones and scalars to 1: randomise them so they matter
        for pname, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            elif "embed_tokens" in pname:
                p.normal_(0, 0.5)
        for layer in model.model.language_model.layers:
            layer.layer_scalar.fill_(float(torch.rand(1)) + 0.5)
    model.save_pretrained(path, **save_kwargs)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """name -> checkpoint folder, for every tiny config."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("tiny_ckpts")
    return {name: save_tiny_checkpoint(root / name, name) for name in TINY_CONFIGS}


def tiny_tokenizer(vocab_size: int = 300):
    """A word-level tokenizer with Gemma 4's special tokens at the tiny configs' ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    special = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<|turn>": 3, "<turn|>": 4, "[UNK]": 5,
               "<|image>": BOI, "<image|>": EOI, "<|image|>": IMAGE}
    words = ["system", "user", "model", "go", "to", "the", "red", "green", "blue", "ball", "cube", "stop", "move"]
    vocab = dict(special)
    for w in words:
        vocab[w] = len(vocab) - 3 if len(vocab) - 3 not in special.values() else None
    vocab = {k: v for k, v in vocab.items() if v is not None}
    used = set(vocab.values())
    filler = (i for i in range(vocab_size) if i not in used)
    for w in words:
        if w not in vocab:
            vocab[w] = next(filler)
    used = set(vocab.values())
    for i in range(vocab_size):
        if i not in used:
            vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(special))
    return tok


class Replay:
    """A next-token selector that picks given tokens (the engine's selector protocol): two sessions compared
    with it see the same history whatever their near-ties."""

    def __init__(self, tokens):
        self.tokens, self.i = list(tokens), 0

    def reset(self):
        self.i = 0

    def select(self, logits):
        return self.tokens[self.i]

    def accept(self, token):
        self.i += 1

    def forced(self):
        return []

    def done(self):
        return self.i >= len(self.tokens)


class Runs:
    """A selector that picks given free tokens, each followed by a given forced run, already accepted: the
    chunking of the action grammar's jump-forward ([(free, [forced, ...]), ...]; the engine feeds each free token
    and its run as one chunk)."""

    def __init__(self, runs):
        self.runs, self.i, self._forced = list(runs), 0, []

    def reset(self):
        self.i, self._forced = 0, []

    def select(self, logits):
        return self.runs[self.i][0]

    def accept(self, token):
        self._forced = list(self.runs[self.i][1])
        self.i += 1

    def forced(self):
        forced, self._forced = self._forced, []
        return forced

    def done(self):
        return self.i >= len(self.runs) and not self._forced


def stepped_alike(reference, other, frames: int, selector=None):
    """Two streaming sessions prefixed alike and stepped over the same random frames: yields (reference's result,
    other's result) a frame, logits kept. `selector`: makes the selector each step takes (a fresh one a step);
    by default reference decodes greedily and `other` replays its tokens (Replay), whatever its near-ties."""
    import numpy as np

    for s in (reference, other):
        s.set_prefix("go")
    rng = np.random.default_rng(0)
    for _ in range(frames):
        frame = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        a = reference.step(frame, selector() if selector else None, keep_logits=True)
        yield a, other.step(frame, selector() if selector else Replay(a.tokens), keep_logits=True)


def run_in_triton_interpreter(script: str) -> list:
    """Run `script` in a fresh Python with TRITON_INTERPRET=1 (kernels on the CPU, the same source the GPU
    compiles; the flag is read at import, hence the subprocess) and return the JSON list it prints last."""
    import json
    import subprocess

    import numpy
    import triton

    # Triton 3.6's interpreter turns a loop's runtime bound into int() of a 1-element array, which NumPy 2 refuses
    # (seen on the lent GPU's Triton 3.6.0 + NumPy 2.x); fixed by 3.8, which CI installs. Compiled kernels unaffected.
    old_triton = tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 8)
    if old_triton and int(numpy.__version__.split(".")[0]) >= 2:
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run loops with runtime bounds under NumPy 2")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def case_errors(cases: str, device: str) -> list:
    """What `errors(device)`, defined in the source text `cases`, returns: on "cpu" in Triton's interpreter (a fresh
    process, see run_in_triton_interpreter), on "cuda" in this process with the kernels compiled."""
    if device == "cpu":
        return run_in_triton_interpreter(cases + "\nimport json\nprint(json.dumps(errors('cpu')))\n")
    scope = {}
    exec(cases, scope)
    return scope["errors"](device)


def decoding_ahead_agrees(session_class, mode: str, device: str = "cpu") -> None:
    """SessionConfig.decode_ahead: each decode step launched with its token chosen on the device, read back
    afterwards. A step launched for a token that ends the action (a stop token) is taken back: the tokens, the steps
    counted and the session's positions, ring slots and pending tokens (window mode) are as without, frame after
    frame, through the window's evictions. `session_class`: a StreamingSession whose graph path is on."""
    import numpy as np
    import torch

    from gemma4_agent.engine import SessionConfig, StreamingSession
    from gemma4_agent.engine.bench import SyntheticPrompts
    from gemma4_agent.actions.selectors import GreedySelector
    from gemma4_agent.model import ModelConfig, build_model

    model = build_model(ModelConfig.from_json(ROOT / "benchmarks" / "tiny-config.json"), device=device,
                        dtype=torch.float32)
    cfg = dict(mode=mode, image_tokens=70, max_new_tokens=6, max_prefix=48, max_context=600, window_frames=2)
    prompts = lambda: SyntheticPrompts(model.config, 40)  # noqa: E731
    by_step = session_class(model, prompts(), SessionConfig(**cfg, decode_ahead=False))
    ahead = session_class(model, prompts(), SessionConfig(**cfg))
    probe = StreamingSession(model, prompts(), SessionConfig(**cfg, cuda_graph=False))
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(6)]
    for s in (by_step, ahead, probe):
        s.set_prefix("go")
    stop = {probe.step(frames[0], GreedySelector()).tokens[2]}  # a token greedy picks: some actions end on it early
    lengths = []
    for frame in frames:
        a = by_step.step(frame, GreedySelector(stop))
        b = ahead.step(frame, GreedySelector(stop))
        assert b.tokens == a.tokens and b.decode_steps == a.decode_steps == len(a.tokens) - 1
        assert (ahead.next_pos, ahead.cache.ring_written, ahead.pending) == (
            by_step.next_pos, by_step.cache.ring_written, by_step.pending)
        lengths.append(len(a.tokens))
    assert min(lengths) < 6 and hasattr(ahead, "_token_host") and not hasattr(by_step, "_token_host")
    # past its deadline an action is its first token, ahead or not
    a = by_step.step(frames[0], GreedySelector(), deadline=0.0)
    b = ahead.step(frames[0], GreedySelector(), deadline=0.0)
    assert b.tokens == a.tokens and len(a.tokens) == 1 and a.deadline_hit and b.deadline_hit
