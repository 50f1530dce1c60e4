"""Int4Linear / Int4Embedding on the CPU packed kernel vs the dequantized-weight float32 matmul, and AWQ's
activation-aware scales vs plain group-128 asymmetric quantization on inputs with outlier channels."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gemma4_agent.quant.int4 import (Int4Embedding, Int4Linear, awq_search_scale, fake_quantize, int4_backend,
                                     quantize_asymmetric, to_device_kernel)


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("scheme", ["q4_0", "awq-g128"])
@pytest.mark.parametrize("out_features,in_features,rows", [(64, 128, 1), (40, 256, 7), (300, 512, 3), (16, 384, 130)])
def test_cpu_kernel_matches_dequantized_matmul(scheme, out_features, in_features, rows):
    torch.manual_seed(0)
    lin = nn.Linear(in_features, out_features, bias=False)
    mod = Int4Linear.from_float(lin, scheme, input_scale=torch.rand(in_features) + 0.5 if scheme != "q4_0" else None)
    x = torch.randn(2, rows, in_features)
    xs = x if mod.input_scale is None else x * mod.input_scale
    ref = xs @ mod.dequantize(torch.float32).t()
    with int4_backend("kernel"):
        y = mod(x)
    assert y.dtype == torch.float32 and y.shape == (2, rows, out_features)
    assert _rel(y, ref) < 1e-2
    with int4_backend("dequant"):  # the fallback is the float32 reference itself
        assert torch.allclose(mod(x), ref, atol=1e-5, rtol=1e-5)
    assert _rel(mod(x.to(torch.bfloat16)), ref) < 1e-2
    # the dequantized weight is the fake-quantized float weight
    if mod.input_scale is None:
        assert torch.equal(mod.dequantize(), fake_quantize(lin.weight, scheme))


def test_kernel_cache_follows_new_weights():
    torch.manual_seed(1)
    a, b = nn.Linear(64, 32, bias=False), nn.Linear(64, 32, bias=False)
    mod = Int4Linear.from_float(a, "q4_0")
    to_device_kernel(mod)
    x = torch.randn(3, 64)
    mod.set_quantized(*__import__("gemma4_agent.quant.int4", fromlist=["_quantize"])._quantize(b.weight, "q4_0"))
    assert _rel(mod(x), x @ fake_quantize(b.weight, "q4_0").t()) < 1e-2


@pytest.mark.parametrize("scheme", ["q4_0", "awq-g128"])
def test_embedding_lookup_and_tied_head(scheme):
    torch.manual_seed(0)
    emb = nn.Embedding(300, 128)
    q = Int4Embedding.from_float(emb, scheme)
    ref_w = fake_quantize(emb.weight, scheme)
    ids = torch.tensor([[0, 5, 299, 5]])
    assert torch.equal(F.embedding(ids, q.weight), ref_w[ids])
    h = torch.randn(1, 4, 128)
    assert _rel(F.linear(h, q.weight), h @ ref_w.t()) < 1e-2
    w = q.weight
    assert w.shape == (300, 128) and w.dtype == torch.float32 and w.is_floating_point() and w.numel() == 300 * 128
    assert torch.equal(w * 1, ref_w)  # any other op sees the dequantized tensor


def test_awq_beats_plain_g128_on_outlier_channels():
    gen = torch.Generator().manual_seed(0)
    n, k, m = 1024, 256, 192
    w = torch.randn(m, k, generator=gen) / k ** 0.5
    gain = torch.ones(k)
    gain[torch.randperm(k, generator=gen)[:6]] = 30.0  # a few outlier input channels, as in real LLM activations
    x_cal = torch.randn(n, k, generator=gen) * gain
    x_test = torch.randn(n, k, generator=gen) * gain
    s, errs = awq_search_scale(x_cal, [w], group=128)
    assert errs[0.0] == max(errs.values()) or min(errs.values()) < errs[0.0]

    def out_err(x, scale):
        q, sc, z = quantize_asymmetric(w * scale, 128)
        wq = (q.float().reshape(m, -1, 128) - z.float()[..., None]) * sc.float()[..., None]
        return float(((x / scale) @ wq.reshape(m, k).t() - x @ w.t()).pow(2).mean())

    plain_cal, awq_cal = out_err(x_cal, torch.ones(k)), out_err(x_cal, s)
    plain_test, awq_test = out_err(x_test, torch.ones(k)), out_err(x_test, s)
    assert awq_cal < 0.8 * plain_cal, (awq_cal, plain_cal)
    assert awq_test < 0.8 * plain_test, (awq_test, plain_test)  # holds out of sample too
    # the same through an Int4Linear with the kept input scale
    lin = nn.Linear(k, m, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w * s)
    mod = Int4Linear.from_float(lin, "awq-g128", input_scale=1.0 / s)
    with int4_backend("dequant"):
        assert abs(float((mod(x_test) - x_test @ w.t()).pow(2).mean()) - awq_test) < 1e-3 * awq_test + 1e-9
