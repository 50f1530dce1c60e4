"""What the streaming session does around its CUDA graphs, on CPU: the inputs of the decode step, of jump-forward
chunks and of the frame chunk (its patches among them) staged into the graphs' static tensors, the graphs keyed and
reused, the session's positions and slots advanced. The graph alone is a stand-in here (a replay runs the captured
function again on the static tensors, as a CUDA graph replays its kernels); test_engine_cuda_graph.py runs the real
ones on a GPU."""
from pathlib import Path

import numpy as np
import pytest
import torch

from gemma4_agent.engine import SessionConfig, StreamingSession
from gemma4_agent.engine.bench import SyntheticPrompts
from gemma4_agent.model import ModelConfig, build_model
from gemma4_agent.quant.int4 import quantize_model

from conftest import Runs, decoding_ahead_agrees, stepped_alike

TINY = Path(__file__).resolve().parents[1] / "benchmarks" / "tiny-config.json"


class StandInGraph:
    """Captures `run` by running it once; a replay runs it again and writes what it returns where the capture's
    output lies, as a CUDA graph's replay rewrites its static output."""

    def __init__(self, run):
        self.run = run
        self.out = run()

    def replay(self):
        self.out.copy_(self.run())


class StandInEvent:
    def record(self):
        pass

    def synchronize(self):
        pass


class StagedSession(StreamingSession):
    """The session with its graph path on, on CPU."""

    def _graphs_on(self) -> bool:
        return self.config.cuda_graph and self.record is None

    def _record(self, run):
        graph = StandInGraph(run)
        return graph, graph.out


@pytest.fixture(autouse=True)
def _no_cuda_events(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", StandInEvent)


def sessions(model, **cfg):
    prompts = lambda: SyntheticPrompts(model.config, 40)  # noqa: E731
    return (StreamingSession(model, prompts(), SessionConfig(**cfg, cuda_graph=False)),
            StagedSession(model, prompts(), SessionConfig(**cfg, cuda_graph=True)))


@pytest.mark.parametrize("scheme", [None, "q4_0"])
@pytest.mark.parametrize("mode", ["prefix", "window"])
def test_staged_graph_inputs_give_the_eager_session(mode, scheme):
    model = build_model(ModelConfig.from_json(TINY), dtype=torch.float32)
    if scheme:
        quantize_model(model, scheme, progress=False)
    eager, staged = sessions(model, mode=mode, image_tokens=70, max_new_tokens=4, max_prefix=48, max_context=600,
                             window_frames=2)
    # window mode: evictions from the third frame on, the frame chunk at new positions
    for a, b in stepped_alike(eager, staged, 5):
        assert b.tokens == a.tokens and len(b.logits_log) == len(a.logits_log) == 4
        for la, lb in zip(a.logits_log, b.logits_log):
            torch.testing.assert_close(lb, la, rtol=0, atol=0)
        assert staged.next_pos == eager.next_pos and staged.cache.ring_written == eager.cache.ring_written
    patches = staged.encode_frame(np.zeros((48, 64, 3), np.uint8))[0]
    frame_len = patches.shape[0] + 2 + 4  # <|image> patches <image|> + the suffix
    assert set(staged._graphs) == {("frame", frame_len), ("ids", 1)} and not eager._graphs


def test_jump_forward_chunks_staged_like_the_decode_step():
    model = build_model(ModelConfig.from_json(TINY), dtype=torch.float32)
    eager, staged = sessions(model, image_tokens=70, max_new_tokens=16, max_prefix=48, max_context=600,
                             graph_chunks=True)
    runs = [(5, [7, 9]), (11, []), (13, [2, 4, 6, 8]), (3, [1, 12])]
    for a, b in stepped_alike(eager, staged, 3, lambda: Runs(runs)):
        assert a.tokens == b.tokens == [5, 7, 9, 11, 13, 2, 4, 6, 8, 3, 1, 12]
        for la, lb in zip(a.logits_log, b.logits_log):
            torch.testing.assert_close(lb, la, rtol=0, atol=0)
    assert {("ids", 1), ("ids", 3), ("ids", 5)} <= set(staged._graphs)


@pytest.mark.parametrize("mode", ["prefix", "window"])
def test_decoding_ahead_leaves_what_decoding_step_by_step_leaves(mode):
    decoding_ahead_agrees(StagedSession, mode)
