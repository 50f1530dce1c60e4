"""The residual add between two RMSNorms as one Triton kernel (gemma4_agent/model/triton_norms.py), in Triton's CPU
interpreter and on the GPU, against the layer's own modules (network.add_and_norm's eager form): the 12B's row of
3840 and a small one, one row (a decode step) and several (a chunk), with and without the layer scalar."""
import textwrap

import pytest
import torch

pytest.importorskip("triton")

from conftest import case_errors  # noqa: E402

CASES = textwrap.dedent('''
    import torch
    from gemma4_agent.model.network import RMSNorm

    def cases(device):
        """(name, dtype, (h, y, post, pre, scale)) with random norm weights and inputs of the layer's magnitudes."""
        g = torch.Generator().manual_seed(0)
        for dtype in (torch.float32, torch.bfloat16):
            for rows, n in ((1, 3840), (5, 3840), (3, 64)):
                for scaled in (False, True):
                    post, pre = RMSNorm(n), RMSNorm(n, eps=1e-5)
                    with torch.no_grad():
                        post.weight.copy_(torch.rand(n, generator=g) * 2)
                        pre.weight.copy_(torch.rand(n, generator=g) * 2)
                    post, pre = post.to(device, dtype), pre.to(device, dtype)
                    h = (torch.randn(rows, n, generator=g) * 20).to(device, dtype)
                    y = (torch.randn(rows, n, generator=g) * 3).to(device, dtype)
                    scale = torch.tensor([0.75], dtype=dtype, device=device) if scaled else None
                    yield f"{dtype} {rows}x{n} scaled={scaled}", dtype, (h, y, post, pre, scale)

    @torch.no_grad()
    def errors(device):
        """Per case: relative error of h_new and of x, kernel against the modules."""
        from gemma4_agent.model.network import add_and_norm_modules  # (importing network registers the op)
        out = []
        for name, dtype, (h, y, post, pre, scale) in cases(device):
            refs = add_and_norm_modules(h, y, post, pre, scale)
            got = torch.ops.gemma4_agent.add_norms(h, y, post.weight, pre.weight, scale, post.eps, pre.eps)
            out.append([name] + [float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(got, refs)])
        return out
''')

# fp32: equal up to summation order and rsqrt's last bit. bf16 on the GPU: the same roundings, so only the odd
# element whose float value sits at a rounding boundary flips by one bf16 step (~4e-3 of it). The interpreter
# converts float32 to bf16 by truncation (half the values one step low, ~4e-3 over the row: checked there to 1e-2).
# A missing weight or norm costs > 1e-1.
def check(rows, bf16_tolerance):
    assert len(rows) == 12
    for name, err_h, err_x in rows:
        tol = bf16_tolerance if "bfloat16" in name else 1e-6
        assert err_h < tol and err_x < tol, (name, err_h, err_x)


def test_add_norms_kernel_in_the_interpreter():
    check(case_errors(CASES, "cpu"), 1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_add_norms_kernel_on_the_gpu():
    check(case_errors(CASES, "cuda"), 1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_layers_train_on_the_gpu():
    # our kernels have no backward: where gradients are wanted (demo training with --device cuda) the modules run;
    # bf16 at one sequence is where attention would take the Triton kernels
    from gemma4_agent.model.network import RMSNorm, add_and_norm, sdpa

    post, pre = RMSNorm(64).cuda(), RMSNorm(64).cuda()
    h, y = (torch.randn(3, 64, device="cuda", requires_grad=True) for _ in range(2))
    h_new, x = add_and_norm(h, y, post, pre)
    (h_new.sum() + x.square().sum()).backward()
    assert all(t.grad is not None for t in (h, y, post.weight, pre.weight))
    q, k, v = (torch.randn(1, 4, 5, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    sdpa(q, k, v, torch.ones(1, 1, 5, 5, device="cuda", dtype=torch.bool)).float().sum().backward()
    assert all(t.grad is not None for t in (q, k, v))
