"""engine/prefetch.py: each one-row int4 product of the decode step asks the weights read after it into L2, on a
second stream joined before the product that reads them (triton_q4.L2Prefetch). Which bytes each product asks for
is checked on CPU; on a CUDA device, that a session doing so, graphed and compiled, computes what one without it
does, and that the prefetches are launched and every one joined (prefetching changes no value, only where bytes
wait)."""
from pathlib import Path

import pytest
import torch

from gemma4_agent.engine import SessionConfig, StreamingSession
from gemma4_agent.engine.bench import SyntheticPrompts
from gemma4_agent.engine.fusion import join_projections
from gemma4_agent.engine.prefetch import prefetch_next_weights, step_order
from gemma4_agent.model import ModelConfig, build_model
from gemma4_agent.quant import triton_q4
from gemma4_agent.quant.int4 import quantize_model

TINY = Path(__file__).resolve().parents[1] / "benchmarks" / "tiny-config.json"


def int4_model(device="cpu", embedding=True):
    model = build_model(ModelConfig.from_json(TINY), device=device, dtype=torch.float32)
    quantize_model(model, "q4_0", include_embedding=embedding, progress=False)
    return model


def located(region, mods):
    """(module index, tensor name, first byte, end byte) of a region: which of the step's tensors it lies in."""
    for i, m in enumerate(mods):
        for name in ("qweight", "scales", "zeros"):
            t = getattr(m, name)
            if t is None:
                continue
            base, size = t.data_ptr(), t.numel() * t.element_size()
            if base <= region.data_ptr() < base + size:
                return i, name, region.data_ptr() - base, region.data_ptr() - base + region.numel()
    raise AssertionError("a region outside every weight of the step")


@pytest.mark.parametrize("joined", [False, True])
def test_each_product_asks_for_the_next_weights_of_the_step_in_order(joined):
    model = int4_model()
    if joined:
        assert join_projections(model) > 0
    mods = step_order(model)
    # per layer: q/k(/v) joined or apart, o, gate/up joined or apart, down; then the LM head
    assert len(mods) == (len(model.layers) * 4 if joined else 6 * 4 + sum(
        layer.self_attn.v_proj is not None for layer in model.layers) + 2 * 6) + 1
    assert mods[-1] is model.embed_tokens
    mb = 0.03
    n = len(mods)
    assert prefetch_next_weights(model, mb) == n - 1
    assert "l2_after" not in mods[-1].__dict__, "the LM head's would reach into the next step"

    def rows(j):
        return mods[j].qweight.shape[0]

    cursor = (1, 0)  # where the stream of weights not yet asked for starts: (matrix, row)
    for i, mod in enumerate(mods[:-1]):
        regions = mod.__dict__["l2_after"]
        assert 0 < len(regions) <= triton_q4.PREFETCH_REGIONS
        assert all(r.dtype == torch.uint8 and r.dim() == 1 and r.data_ptr() % 16 == 0 for r in regions)
        spans = {}
        for r in regions:
            j, name, first, end = located(r, mods)
            row = getattr(mods[j], name).shape[1] * getattr(mods[j], name).element_size()
            assert first % row == 0 and end % row == 0, "whole rows"
            spans.setdefault(j, set()).add((first // row, end // row))
        assert all(len(v) == 1 for v in spans.values()), "a matrix's words and scales over the same rows"
        windows = sorted((j, *v.pop()) for j, v in spans.items())
        # it starts where the stream not yet asked for starts, or at the matrix after its own product if further
        # on (never its own, which that product reads itself), and runs on through whole matrices, rows in order
        assert (windows[0][0], windows[0][1]) == max(cursor, (i + 1, 0))
        for (j0, _, e0), (j1, f1, _) in zip(windows, windows[1:]):
            assert e0 == rows(j0) and (j1, f1) == (j0 + 1, 0)
        assert all(i < j < n for j, _, _ in windows)
        j, _, end = windows[-1]
        cursor = (j + 1, 0) if end == rows(j) else (j, end)
        assert sum(r.numel() for r in regions) <= mb * 1e6
    assert cursor[0] == n - 1 or cursor == (n, 0), "the windows reach the LM head"
    assert prefetch_next_weights(model, 0) == 0
    assert not any("l2_after" in m.__dict__ for m in mods)


def test_no_prefetch_where_a_matrix_of_the_step_is_not_int4():
    model = int4_model(embedding=False)  # the LM head stays float: its bytes cannot be read this way
    assert prefetch_next_weights(model, 1.0) == 0
    assert not any("l2_after" in m.__dict__ for m in step_order(model)[:-1])


def test_the_product_with_regions_named_equals_the_one_without_on_cpu():
    # on CPU (and the Triton interpreter) there is nothing to prefetch into: the op runs its product alone
    model = int4_model()
    prefetch_next_weights(model, 0.03)
    mod = step_order(model)[0]
    x = torch.randn(1, mod.in_features)
    with_regions = mod(x)
    regions = mod.__dict__.pop("l2_after")
    assert regions and torch.equal(with_regions, mod(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the L2 prefetch needs a CUDA device")
@pytest.mark.parametrize("compiled", [False, True])
def test_session_prefetching_weights_computes_what_one_without_does(compiled):
    from conftest import stepped_alike

    cfg = dict(mode="window", image_tokens=70, max_new_tokens=4, max_prefix=48, max_context=600, window_frames=2,
               compile=compiled)
    sessions = []
    for mb in (0.0, 0.05):
        torch.manual_seed(0)
        model = int4_model("cuda")
        sessions.append(StreamingSession(model, SyntheticPrompts(model.config, 40),
                                         SessionConfig(**cfg, l2_prefetch_mb=mb)))
    plain, prefetching = sessions
    assert not any("l2_after" in m.__dict__ for m in step_order(plain.model))
    assert all(m.__dict__.get("l2_after") for m in step_order(prefetching.model)[:-1])  # the LM head has none
    forked, joined = [], []
    prefetcher = triton_q4._L2
    real_fork, real_join = prefetcher.fork, prefetcher.join
    with pytest.MonkeyPatch.context() as patch:
        if not compiled:  # counted where the op runs from Python (compiled, it runs inside Inductor's code)
            patch.setattr(prefetcher, "fork", lambda regions: forked.append(len(regions)) or real_fork(regions))
            patch.setattr(prefetcher, "join", lambda t: joined.append(1) or real_join(t))
        for a, b in stepped_alike(plain, prefetching, 4):
            assert b.tokens == a.tokens and len(b.logits_log) == len(a.logits_log) == 4
            assert all(torch.equal(la, lb) for la, lb in zip(a.logits_log, b.logits_log))
    assert compiled or forked and joined
    assert not prefetcher._pending, "every prefetch joined within its step"
