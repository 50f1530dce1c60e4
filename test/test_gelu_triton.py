"""The MLP's gate as one Triton kernel (gemma4_agent/model/triton_gelu.py), in Triton's CPU interpreter and on the
GPU, against the eager form: the 12B's 15360 wide halves of a joined gate/up output (strided views, as the MLP
passes them) and a small contiguous pair, one row (a decode step) and several (a chunk)."""
import textwrap

import pytest
import torch

pytest.importorskip("triton")

from conftest import case_errors  # noqa: E402

CASES = textwrap.dedent('''
    import torch
    import torch.nn.functional as F

    @torch.no_grad()
    def errors(device):
        """Per case: relative error of the kernel against F.gelu(gate, approximate="tanh") * up."""
        import gemma4_agent.model.network  # noqa: F401  (registers the op)
        g = torch.Generator().manual_seed(0)
        out = []
        for dtype in (torch.float32, torch.bfloat16):
            for rows, n in ((1, 15360), (4, 15360), (3, 100)):
                joined = (torch.randn(1, rows, 2 * n, generator=g) * 3).to(device, dtype)
                gate, up = joined.split([n, n], dim=-1)  # strided rows, as network.project returns them
                if n == 100:
                    gate, up = gate.contiguous(), up.contiguous()
                got = torch.ops.gemma4_agent.gelu_mul(gate, up)
                ref = F.gelu(gate, approximate="tanh") * up
                assert got.shape == ref.shape and got.dtype == dtype
                out.append([f"{dtype} {rows}x{n}", float((got.float() - ref.float()).norm() / ref.float().norm())])
        return out
''')


# fp32: the sigmoid form of tanh's gelu, equal to float rounding. bf16 on the GPU: the same two roundings, so only
# values at a rounding boundary flip by one step. The interpreter converts to bf16 by truncation (checked to 1e-2).
# A gelu without the tanh approximation, or a missing rounding, costs more than 1e-3; a wrong half, ~1.
def check(rows, bf16_tolerance):
    assert len(rows) == 6
    for name, err in rows:
        assert err < (bf16_tolerance if "bfloat16" in name else 1e-6), (name, err)


def test_gelu_mul_kernel_in_the_interpreter():
    check(case_errors(CASES, "cpu"), 1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gelu_mul_kernel_on_the_gpu():
    check(case_errors(CASES, "cuda"), 1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mlp_trains_on_the_gpu():
    # the kernel has no backward: where gradients are wanted the eager form runs
    from gemma4_agent.model.network import MLP

    mlp = MLP(32, 64).cuda()
    x = torch.randn(1, 3, 32, device="cuda", requires_grad=True)
    mlp(x).square().sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in mlp.parameters())
