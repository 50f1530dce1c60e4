"""Joined projections (engine/fusion.py): q/k/v and gate/up as one matmul each give the same logits as the
separate layers, for float and int4 models loaded from transformers checkpoints, and leave the checkpoint
layout (state_dict names and values) as it was."""
import copy

import pytest
import torch

from gemma4_agent.engine.fusion import join_linears, join_projections, joined_modules
from gemma4_agent.model import load_model
from gemma4_agent.quant.int4 import Int4Linear, quantize_model
from gemma4_agent.quant.quality import random_frames, tiny_random_model
from gemma4_agent.quant.quantize_cli import calibration_batches


def _ids(model, n=24, seed=0):
    vocab = model.config.text_config.vocab_size
    return torch.randint(10, vocab - 10, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["kv_separate", "default_pattern"])  # v_proj present / K = V layers
@pytest.mark.parametrize("scheme", [None, "q4_0"])
def test_joined_projections_give_the_same_logits(tiny_checkpoints, name, scheme):
    model = load_model(tiny_checkpoints[name], dtype=torch.float32)
    if scheme is not None:
        quantize_model(model, scheme, progress=False)
    _check_joined(model)


def test_joined_awq_projections_give_the_same_logits():
    model, _ = tiny_random_model(0)
    quantize_model(model, "awq-g128", calib=calibration_batches(model, random_frames(2, seed=5)), progress=False)
    _check_joined(model)


def _check_joined(model):
    ids = _ids(model)
    before = model(ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    joined = join_projections(model)
    assert joined == 2 * len(model.layers)
    after = model(ids)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert after.abs().max() > 0
    # the checkpoint layout is untouched: same names, same values
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k
    assert join_projections(model) == joined  # idempotent: nothing joined twice
    assert len(joined_modules(model)) == joined


def test_joined_weights_are_views_not_copies(tiny_checkpoints):
    model = load_model(tiny_checkpoints["kv_separate"], dtype=torch.float32)
    attn = model.layers[0].self_attn
    join_projections(model)
    joined = attn.__dict__["joined"].weight
    assert attn.q_proj.weight.data_ptr() == joined.data_ptr()
    assert attn.k_proj.weight.data_ptr() == joined.data_ptr() + attn.q_proj.weight.numel() * joined.element_size()


def test_layers_that_cannot_be_joined_are_left_alone():
    lin = [torch.nn.Linear(32, 8, bias=False), torch.nn.Linear(64, 8, bias=False)]
    assert join_linears(lin) is None  # different input sizes
    assert join_linears([torch.nn.Linear(32, 8), torch.nn.Linear(32, 8)]) is None  # biases
    q = [Int4Linear.from_float(torch.nn.Linear(128, 16, bias=False), "q4_0"),
         Int4Linear.from_float(torch.nn.Linear(128, 16, bias=False), "awq-g128")]
    assert join_linears(q) is None  # different schemes
    scaled = Int4Linear.from_float(torch.nn.Linear(128, 16, bias=False), "q4_0", input_scale=torch.ones(128))
    assert join_linears([copy.deepcopy(q[0]), scaled]) is None  # per-layer input scaling
