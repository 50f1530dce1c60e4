"""q/k/v from the projections to the cache as one Triton kernel (gemma4_agent/model/triton_qkv.py), in Triton's CPU
interpreter and on the GPU, against the modules (RMSNorm, apply_rope, StaticKVCache.update's index_copy): strided
parts of a joined projection, a K = V layer (v is k's projection), one token (a decode step) and a chunk, float32
and bf16; the op's CPU kernel against the same; torch.compile writing into the cache buffers themselves."""
import textwrap

import pytest
import torch

pytest.importorskip("triton")

from conftest import case_errors  # noqa: E402

CASES = textwrap.dedent('''
    import torch

    @torch.no_grad()
    def errors(device):
        """Per case: relative errors of the kernel's q, cache K and cache V against the modules, and whether every
        slot but the written ones is untouched."""
        from gemma4_agent.model import triton_qkv
        from gemma4_agent.model.network import apply_rope, rms_norm, rope_cos_sin
        g = torch.Generator().manual_seed(0)
        out = []
        for dtype in (torch.float32, torch.bfloat16):
            for heads, kv, d, n, k_eq_v in ((4, 2, 64, 1, False), (4, 2, 64, 3, False), (16, 8, 256, 1, False),
                                            (16, 1, 512, 1, True), (2, 1, 32, 5, True)):
                width = (heads + kv + (0 if k_eq_v else kv)) * d
                joined = (torch.randn(n, width, generator=g) * 2).to(device, dtype)
                parts = joined.split([heads * d, kv * d] + ([] if k_eq_v else [kv * d]), dim=-1)
                q, k = parts[0], parts[1]
                v = k if k_eq_v else parts[2]
                positions = torch.arange(40, 40 + n)
                cos, sin = (t.to(device) for t in rope_cos_sin(positions, 1.0 / (1e4 ** (torch.arange(0, d, 2) / d)),
                                                                 dtype))
                qw = (1 + 0.1 * torch.randn(d, generator=g)).to(device, dtype)
                kw = (1 + 0.1 * torch.randn(d, generator=g)).to(device, dtype)
                slots = torch.tensor([7, 2, 9, 0, 4][:n]).to(device)
                k_cache = torch.randn(1, kv, 10, d, generator=g).to(device, dtype)
                v_cache = torch.randn(1, kv, 10, d, generator=g).to(device, dtype)
                k_ref, v_ref = k_cache.clone(), v_cache.clone()
                heads_of = lambda x: x.reshape(1, n, -1, d)  # noqa: E731
                q_ref = apply_rope(rms_norm(heads_of(q), qw, 1e-6), cos, sin)[0]
                k_ref.index_copy_(2, slots, apply_rope(rms_norm(heads_of(k), kw, 1e-6), cos, sin).transpose(1, 2))
                v_ref.index_copy_(2, slots, rms_norm(heads_of(v), None, 1e-6).transpose(1, 2))
                got = triton_qkv._launch(q, k, v, cos, sin, qw, kw, 1e-6, k_cache, v_cache, slots)
                rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
                rest = torch.ones(10, dtype=torch.bool)
                rest[slots.cpu()] = False
                untouched = bool(torch.equal(k_cache[:, :, rest.to(device)], k_ref[:, :, rest.to(device)])
                                 and torch.equal(v_cache[:, :, rest.to(device)], v_ref[:, :, rest.to(device)]))
                written = lambda c, ref: rel(c[:, :, slots], ref[:, :, slots])  # noqa: E731
                out.append([f"{dtype} h{heads} kv{kv} d{d} n{n} k=v {k_eq_v}", rel(got, q_ref),
                            written(k_cache, k_ref), written(v_cache, v_ref), untouched])
        return out
''')


# float32: the same arithmetic (rsqrt against pow(-0.5), summation order): ~1e-7. bf16 on the GPU: the same
# roundings, so only values at a rounding boundary flip by one step; the interpreter converts to bf16 by truncation.
# A missing rounding or a wrong half of the rotation costs far more than 1e-3.
def check(rows, bf16_tolerance):
    assert len(rows) == 10
    for name, *errs, untouched in rows:
        assert untouched, name
        for err in errs:
            assert err < (bf16_tolerance if "bfloat16" in name else 1e-5), (name, errs)


def test_qkv_kernel_in_the_interpreter():
    check(case_errors(CASES, "cpu"), 1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qkv_kernel_on_the_gpu():
    check(case_errors(CASES, "cuda"), 1e-3)


def _op_inputs(device="cpu", n=2, heads=4, kv=2, d=32):
    from gemma4_agent.model.network import rope_cos_sin

    g = torch.Generator().manual_seed(1)
    joined = torch.randn(n, (heads + 2 * kv) * d, generator=g).to(device)
    q, k, v = joined.split([heads * d, kv * d, kv * d], dim=-1)
    cos, sin = (t.to(device) for t in rope_cos_sin(torch.arange(n), 1.0 / (1e4 ** (torch.arange(0, d, 2) / d)),
                                                   torch.float32))
    weights = [torch.rand(d, generator=g).to(device) + 0.5 for _ in range(2)]
    caches = [torch.zeros(1, kv, 8, d, device=device) for _ in range(2)]
    return q, k, v, cos, sin, *weights, 1e-6, *caches, torch.tensor([5, 1][:n], device=device)


def test_the_op_on_cpu_is_the_modules_arithmetic():
    from gemma4_agent.model.network import apply_rope, rms_norm

    q, k, v, cos, sin, qw, kw, eps, k_cache, v_cache, slots = _op_inputs()
    got = torch.ops.gemma4_agent.qkv_to_cache(q, k, v, cos, sin, qw, kw, eps, k_cache, v_cache, slots)
    heads_of = lambda x: x.reshape(1, 2, -1, 32)  # noqa: E731
    assert torch.equal(got, apply_rope(rms_norm(heads_of(q), qw, eps), cos, sin)[0])
    assert torch.equal(k_cache[0, :, 5], apply_rope(rms_norm(heads_of(k), kw, eps), cos, sin)[0, 0])
    assert torch.equal(v_cache[0, :, 1], rms_norm(heads_of(v), None, eps)[0, 1])
    assert not k_cache[0, :, [0, 2, 3, 4, 6, 7]].any() and not v_cache[0, :, [0, 2, 3, 4, 6, 7]].any()


def test_compiled_code_writes_into_the_cache_buffers_themselves():
    # the op mutates its cache arguments: torch.compile must call it on the buffers, not on copies it then copies
    # back (a whole layer's cache copied twice a step on the GPU)
    from torch._inductor.utils import run_and_get_code

    args = _op_inputs()
    expected_caches = [t.clone() for t in args[8:10]]
    expected = torch.ops.gemma4_agent.qkv_to_cache(*args[:8], *expected_caches, args[10])

    def step(q, k, v, cos, sin, qw, kw, k_cache, v_cache, slots):
        return torch.ops.gemma4_agent.qkv_to_cache(q, k, v, cos, sin, qw, kw, 1e-6, k_cache, v_cache, slots) * 2

    torch._dynamo.reset()
    got, codes = run_and_get_code(torch.compile(step), *args[:7], *args[8:])
    assert torch.equal(got, expected * 2)
    assert all(torch.equal(a, b) for a, b in zip(args[8:10], expected_caches))
    code = "\n".join(codes)
    assert "qkv_to_cache" in code
    assert "copy_" not in code and "clone" not in code, code


def test_a_session_writing_through_the_op_equals_the_modules_session(monkeypatch):
    # the plumbing on CPU (the op's CPU kernel is the modules' arithmetic, so equal to the bit): Attention hands the
    # op its projections' parts (K = V on the tiny model's full layers) and the cache's buffers and slots, in both
    # cache modes with evictions; the kernel itself is checked above and on the GPU (test_engine_cuda_graph.py)
    from pathlib import Path

    import numpy as np

    from gemma4_agent.engine import SessionConfig, StreamingSession
    from gemma4_agent.engine.bench import SyntheticPrompts
    from gemma4_agent.model import ModelConfig, build_model
    from gemma4_agent.model.network import Attention

    tiny = Path(__file__).resolve().parents[1] / "benchmarks" / "tiny-config.json"
    model = build_model(ModelConfig.from_json(tiny))
    calls = []
    real = torch.ops.gemma4_agent.qkv_to_cache
    monkeypatch.setattr(Attention, "_fusable", lambda self, x: True)  # as on CUDA
    monkeypatch.setattr(torch.ops.gemma4_agent, "qkv_to_cache", lambda *a: calls.append(1) or real(*a))
    for mode in ("prefix", "window"):
        cfg = dict(mode=mode, image_tokens=70, max_new_tokens=3, max_prefix=48, max_context=600, window_frames=2)
        sessions = [StreamingSession(model, SyntheticPrompts(model.config, 40), SessionConfig(**cfg, fused_qkv=f))
                    for f in (False, True)]
        for s in sessions:
            s.set_prefix("go")
        rng = np.random.default_rng(0)
        for _ in range(4):
            frame = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            a, b = (s.step(frame, keep_logits=True) for s in sessions)
            assert a.tokens == b.tokens
            assert all(torch.equal(x, y) for x, y in zip(a.logits_log, b.logits_log))
        assert all(torch.equal(x, y) for x, y in zip(sessions[0].cache.k, sessions[1].cache.k))
        assert all(torch.equal(x, y) for x, y in zip(sessions[0].cache.v, sessions[1].cache.v))
    assert calls
