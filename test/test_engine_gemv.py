"""The bf16 decode-step GEMV (engine/gemv.py): the Triton kernel in Triton's CPU interpreter against the float32
matmul, the one-row choice between it and cuBLAS (timed once per shape, rows > 1 never offered), and the model's
linear layers routed through it with the checkpoint layout and the outputs unchanged (on CPU the op is F.linear)."""
import textwrap

import pytest
import torch

from gemma4_agent.engine.fusion import join_projections, joined_modules
from gemma4_agent.engine.gemv import GemvLinear, use_triton_gemv
from gemma4_agent.model import load_model
from gemma4_agent.quant.int4 import quantize_model

SCRIPT = textwrap.dedent("""
    import json, torch, triton
    from gemma4_agent.engine import gemv as G

    torch.manual_seed(0)
    rows = []
    # N not a multiple of BLOCK_N, K not a multiple of BLOCK_K (masked tails), K shorter than one block
    for n, k, cfg in ((40, 384, dict(BLOCK_N=8, BLOCK_K=256)), (33, 512, dict(BLOCK_N=4, BLOCK_K=512)),
                      (16, 96, dict(BLOCK_N=2, BLOCK_K=256))):
        for dtype in (torch.float32, torch.bfloat16):
            w = torch.randn(n, k).to(dtype)
            x = torch.randn(1, k).to(dtype)
            y = torch.empty(1, n, dtype=dtype)
            G._gemv_kernel.fn[(triton.cdiv(n, cfg["BLOCK_N"]),)](x, w, y, n, k, PDL=False, **cfg)
            ref = x.float() @ w.float().t()
            rows.append([n, k, str(dtype), float((y.float() - ref).norm() / ref.norm())])

    # the choice: candidates timed by given times (the interpreter cannot time), recorded per call
    G._gemv_kernel.configs = [triton.Config({"BLOCK_N": 4, "BLOCK_K": 256}, num_warps=1)]
    timed = []
    def fake_kernel_ms(fn, **kwargs):
        name = fn.func.__name__
        timed.append(name)
        return TIMES[name]
    import gemma4_agent.fastest
    gemma4_agent.fastest.kernel_ms = fake_kernel_ms  # the interpreter cannot time
    w1, w2 = torch.randn(24, 256), torch.randn(48, 256)
    runs = []
    for w, m, TIMES in ((w1, 1, {"_cublas": 2.0, "_triton_gemv": 1.0}), (w1, 1, None),
                        (w2, 1, {"_cublas": 1.0, "_triton_gemv": 3.0}), (w2, 5, None)):
        timed.clear()
        x = torch.randn(m, 256)
        y = G._launch(x, w)
        runs.append([m, sorted(timed), float((y - x @ w.t()).norm() / (x @ w.t()).norm())])
    named = {p: float((G._launch(x[:1], w1, p) - x[:1] @ w1.t()).norm() / (x[:1] @ w1.t()).norm())
             for p in G._PATHS}
    print(json.dumps([rows, runs, sorted(G._ONE_ROW.picks.items()), named]))
""")


def test_gemv_kernel_and_choice_in_the_interpreter():
    pytest.importorskip("triton")
    from conftest import run_in_triton_interpreter

    rows, runs, picks, named = run_in_triton_interpreter(SCRIPT)
    assert len(rows) == 6
    for n, k, dtype, rel in rows:
        # float32: exact up to summation order; bf16: the output's rounding (inputs are bf16 in the reference too)
        assert rel < (1e-6 if dtype == "torch.float32" else 8e-3), (n, k, dtype, rel)
    # timed once per weight shape: the second call on w1 reuses the pick; more than one row is cuBLAS's, untimed
    both = sorted(["_cublas", "_triton_gemv"] * 2)  # each timed twice (fastest.py)
    assert [r[1] for r in runs] == [both, [], both, []]
    assert all(r[2] < 1e-6 for r in runs), runs
    assert picks == [[[24, 256, "torch.float32"], "triton"], [[48, 256, "torch.float32"], "cublas"]]
    assert sorted(named) == ["cublas", "triton"] and all(v < 1e-6 for v in named.values()), named


@pytest.mark.parametrize("scheme", [None, "q4_0"])
def test_linear_layers_routed_through_the_op_keep_layout_and_outputs(tiny_checkpoints, scheme):
    model = load_model(tiny_checkpoints["kv_separate"], dtype=torch.bfloat16)
    if scheme is not None:
        quantize_model(model, scheme, progress=False)
    ids = torch.randint(10, 290, (1, 12), generator=torch.Generator().manual_seed(0))
    before = model(ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    join_projections(model)
    count = use_triton_gemv(model)
    if scheme is not None:
        assert count == 0  # int4 layers keep their own kernels
        return
    # per layer: q, k, v, o, gate, up, down (q/k/v and gate/up stay in the tree as views of the joined
    # weights) and the two joined modules
    assert count == 9 * len(model.layers)
    swapped = [m for m in model.layers.modules() if isinstance(m, GemvLinear)]
    assert {type(m.self_attn.o_proj) for m in model.layers} == {GemvLinear}
    assert all(type(m) is GemvLinear for m in joined_modules(model))
    assert len(swapped) + len(joined_modules(model)) == count
    torch.testing.assert_close(model(ids), before, rtol=2e-2, atol=2e-2)  # joined matmuls sum in another order
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())
    assert type(model.vision.patch_dense) is torch.nn.Linear  # the vision tower is left alone


@torch.no_grad()  # inference only, as in the streaming session (the op has no backward)
def test_op_compiles_as_one_opaque_call():
    lin = torch.nn.Linear(64, 32, bias=False)
    lin.__class__ = GemvLinear
    x = torch.randn(1, 1, 64)
    compiled = torch.compile(lin, fullgraph=True)  # a graph break would fail here
    torch.testing.assert_close(compiled(x), x @ lin.weight.t())
    assert compiled(torch.randn(1, 7, 64)).shape == (1, 7, 32)
