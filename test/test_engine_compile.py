"""The streaming session under torch.compile (SessionConfig.compile) on CPU, int4 weights: the same logits and
tokens as eager, and the decoder traced as whole graphs (an int4 layer used to break the graph at every call,
on a data-pointer check, which made the compiled session slower than the eager one)."""
import numpy as np
import pytest
import torch

from gemma4_agent.engine import SessionConfig, StreamingSession
from gemma4_agent.model import load_model
from gemma4_agent.model.tokenizer import PromptBuilder
from gemma4_agent.quant.int4 import quantize_model

from conftest import BOI, EOI, IMAGE, Replay, tiny_tokenizer

torch_dynamo = pytest.importorskip("torch._dynamo")


def test_compiled_int4_session_equals_eager_without_graph_breaks(tiny_checkpoints):
    model = quantize_model(load_model(tiny_checkpoints["kv_separate"]), "q4_0", progress=False)
    prompts = PromptBuilder(tiny_tokenizer(), IMAGE, BOI, EOI)
    cfg = dict(mode="prefix", image_tokens=70, max_new_tokens=3, max_prefix=32, max_context=200)
    eager = StreamingSession(model, prompts, SessionConfig(**cfg))
    torch_dynamo.reset()
    torch_dynamo.utils.counters.clear()
    compiled = StreamingSession(model, prompts, SessionConfig(**cfg, compile=True))
    rng = np.random.default_rng(0)
    for s in (eager, compiled):
        s.set_prefix("go to the red ball")
    for _ in range(2):
        frame = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
        a = eager.step(frame, keep_logits=True)
        b = compiled.step(frame, Replay(a.tokens), keep_logits=True)  # the same history, near-ties or not
        assert b.tokens == a.tokens and len(b.logits_log) == len(a.logits_log) == 3
        for la, lb in zip(a.logits_log, b.logits_log):
            # the int4 kernel takes bf16 activations: fused float32 arithmetic before the rounding moves a
            # logit by ~1e-3 relative; a wrong weight or cache would move it by ~1
            assert ((lb - la).norm() / la.norm()).item() < 1e-2
    assert sum(torch_dynamo.utils.counters["frames"].values()) > 0  # it did compile
    assert not torch_dynamo.utils.counters["graph_break"], dict(torch_dynamo.utils.counters["graph_break"])
