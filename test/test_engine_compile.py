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


def pass_through_compile(monkeypatch) -> tuple[dict[str, list], list[str]]:
    """torch.compile with a backend that runs each graph as traced, recording per compiled function its graphs
    (name -> GraphModules) and each run of one (the function's name, in order)."""
    graphs: dict[str, list] = {}
    runs: list[str] = []
    real_compile = torch.compile

    def compile_(fn, **kwargs):
        def backend(gm, example_inputs):
            graphs.setdefault(fn.__name__, []).append(gm)

            def run(*args):
                runs.append(fn.__name__)
                return gm.forward(*args)
            return run

        return real_compile(fn, backend=backend, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_)
    return graphs, runs


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


@pytest.mark.parametrize("scheme", [None, "q4_0"])
def test_chunk_lengths_first_seen_mid_stream_run_compiled_without_recompiling(tiny_checkpoints, scheme):
    # jump-forward runs have lengths the warm-up may not have seen; each new one used to compile the decoder
    # again mid-stream (~10 s for the demo engine) and, past dynamo's cache limit, run eager
    model = load_model(tiny_checkpoints["kv_separate"])
    if scheme:
        model = quantize_model(model, scheme, progress=False)
    prompts = PromptBuilder(tiny_tokenizer(), IMAGE, BOI, EOI)
    cfg = dict(mode="prefix", image_tokens=70, max_new_tokens=3, max_prefix=32, max_context=200)
    eager = StreamingSession(model, prompts, SessionConfig(**cfg))
    torch_dynamo.reset()
    compiled = StreamingSession(model, prompts, SessionConfig(**cfg, compile=True))
    frame = np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    for s in (eager, compiled):
        s.set_prefix("go to the red ball")
        s.warm_up(Replay([5, 6, 7]))  # as the agent does at start-up: compiles what the stream will run
        s.step(frame, Replay([5, 6, 7]))
    graphs = torch_dynamo.utils.counters["stats"]["unique_graphs"]
    for n in (3, 5, 2, 9, 4):
        outs = []
        for s in (eager, compiled):
            s.cache.rewind()
            s.next_pos = s.prefix_len
            outs.append(s._chunk(list(range(10, 10 + n))))
        # int4: bf16 activations into the kernel, fused differently when compiled (see above)
        assert ((outs[1] - outs[0]).norm() / outs[0].norm()).item() < (1e-2 if scheme else 1e-4), n
    assert torch_dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # nothing compiled after the first frame
    assert not torch_dynamo.utils.counters["graph_break"], dict(torch_dynamo.utils.counters["graph_break"])


def test_without_the_any_length_function_the_prefix_runs_uncompiled(tiny_checkpoints):
    # compile_any_length=False: only the lengths that repeat are compiled (the frame chunk, the one-token step), the
    # prefix and a jump-forward length the warm-up did not show run uncompiled; the same tokens either way
    model = load_model(tiny_checkpoints["kv_separate"])
    prompts = PromptBuilder(tiny_tokenizer(), IMAGE, BOI, EOI)
    cfg = dict(mode="prefix", image_tokens=70, max_new_tokens=3, max_prefix=32, max_context=200)
    eager = StreamingSession(model, prompts, SessionConfig(**cfg))
    torch_dynamo.reset()
    torch_dynamo.utils.counters.clear()
    compiled = StreamingSession(model, prompts, SessionConfig(**cfg, compile=True, compile_any_length=False))
    for s in (eager, compiled):
        s.set_prefix("go to the red ball")
    assert torch_dynamo.utils.counters["stats"]["unique_graphs"] == 0  # the prefix compiled nothing
    torch.testing.assert_close(compiled.cache.k[0], eager.cache.k[0], rtol=0, atol=0)
    frame = np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    for _ in range(2):
        a, b = eager.step(frame, Replay([5, 6, 7])), compiled.step(frame, Replay([5, 6, 7]), keep_logits=True)
        assert a.tokens == b.tokens
    graphs = torch_dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs > 0  # the frame chunk and the one-token step, compiled
    for s in (eager, compiled):
        s.cache.rewind()
        s.next_pos = s.prefix_len
    outs = [s._chunk(list(range(10, 15))) for s in (eager, compiled)]  # a length no frame ran: uncompiled
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    assert torch_dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_the_layers_graph_takes_what_every_layer_shares_as_inputs(tiny_checkpoints, monkeypatch):
    # Embedding, masks and RoPE are computed once a step in a graph of their own, which the layers' graph only
    # reads: compiled together, Inductor recomputed masks and RoPE every few layers (48 small kernels a decode step
    # of the 12B on CUDA). Each compiled function's graphs recorded by a pass-through backend.
    graphs, _ = pass_through_compile(monkeypatch)
    model = load_model(tiny_checkpoints["kv_separate"])
    prompts = PromptBuilder(tiny_tokenizer(), IMAGE, BOI, EOI)
    torch_dynamo.reset()
    session = StreamingSession(model, prompts, SessionConfig(mode="prefix", image_tokens=70, max_new_tokens=3,
                                                             max_prefix=32, max_context=200, compile=True))
    session.set_prefix("go to the red ball")
    session.step(np.zeros((32, 40, 3), dtype=np.uint8), Replay([5, 6, 7]))

    def calls(name):  # functions and tensor methods a function's graphs call, by name
        return {getattr(node.target, "__name__", str(node.target)) for gm in graphs[name] for node in gm.graph.nodes
                if node.op in ("call_function", "call_method")}

    shared, layers = calls("_shared"), calls("_layers_and_head")
    # RoPE's cos and sin, the embedding, the masks' causal comparison: computed once, in the shared graph
    assert {"cos", "sin", "embedding", "le"} <= shared, shared
    assert not {"cos", "sin", "embedding", "le"} & layers, layers
    assert {"linear", "scaled_dot_product_attention"} <= layers, layers  # the layers are there


def test_a_new_session_runs_compiled_however_many_came_before_it(tiny_checkpoints, monkeypatch):
    # The node's cleanup + configure builds a new session in the same process. Dynamo keeps what it compiles per
    # code object, by default 8 graphs across every caller: the sessions before took them, and a new one with
    # lengths of its own (another camera's aspect ratio, another image budget) ran uncompiled, several times
    # slower, saying so in one log line. Each compiled graph counts its runs here (a pass-through backend).
    _, runs = pass_through_compile(monkeypatch)
    model = load_model(tiny_checkpoints["kv_separate"])
    prompts = PromptBuilder(tiny_tokenizer(), IMAGE, BOI, EOI)
    torch_dynamo.reset()
    lengths = set()
    for width in (16, 32, 48, 64, 80, 96, 112, 128, 144, 160):
        session = StreamingSession(model, prompts, SessionConfig(mode="prefix", image_tokens=70, max_new_tokens=3,
                                                                 max_prefix=32, max_context=200, compile=True))
        del runs[:]
        session.set_prefix("go to the red ball")
        assert runs == ["_shared_any_length", "_layers_and_head_any_length"], (width, runs)
        frame = np.zeros((16, width, 3), dtype=np.uint8)
        lengths.add(session.encode_frame(frame)[0].shape[0])
        session.step(frame, Replay([5, 6, 7]))
        del runs[:]
        assert session.step(frame, Replay([5, 6, 7])).tokens == [5, 6, 7]
        assert runs == ["_shared", "_layers_and_head"] * 3, (width, runs)  # the frame chunk and two decode steps
    assert len(lengths) > 4  # frame chunks of lengths the sessions before had not compiled
