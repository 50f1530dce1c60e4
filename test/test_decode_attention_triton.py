"""The CUDA cache-attention kernels (gemma4_agent/model/triton_attention.py) run here in Triton's CPU
interpreter, against network.sdpa's matmul form of the same arithmetic: grouped query rows, masked slots
(including splits where nothing is allowed), a slot count that is not a multiple of the tiles, prefill-sized
chunks cut into row blocks (the last one partial), and the custom op's choice between these kernels and
PyTorch's SDPA for long chunks. (The lent GPU runs them compiled: benchmarks/gpu_decode_kernels.py checks
them at the 12B's shapes, test_engine_cuda_graph.py through the session.)"""
import textwrap

import pytest

pytest.importorskip("triton")

from conftest import run_in_triton_interpreter  # noqa: E402

SCRIPT = textwrap.dedent('''
    import json, torch
    from gemma4_agent.model import triton_attention as A

    def reference(q, k, v, mask):
        scores = torch.matmul(q, k.transpose(-1, -2)).float().masked_fill(~mask, float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)

    g = torch.Generator().manual_seed(0)
    rows = []
    # (kv heads, query rows, head dim, slots, programs): 2 rows = a sliding layer's two query heads per KV
    # head; 16 = a full layer's; few programs: one split per head; many: splits of one tile
    # 150 rows at dim 128: two 128-row blocks, the second partial
    for h, r, d, s, programs in ((2, 2, 64, 100, 128), (1, 16, 128, 70, 128), (2, 3, 32, 200, 2),
                                 (2, 150, 128, 100, 8), (1, 70, 64, 90, 4)):
        q = torch.randn(h, r, d, generator=g)
        k = torch.randn(h, s, d, generator=g)
        v = torch.randn(h, s, d, generator=g)
        for kind in ("random", "first_slots_only"):
            if kind == "random":
                mask = torch.rand(r, s, generator=g) > 0.4
                mask[:, 0] = True
            else:  # every later split sees nothing: the merge must ignore it
                mask = torch.zeros(r, s, dtype=torch.bool)
                mask[:, :5] = True
            out = A._launch(q, k, v, mask, block_s=16, programs=programs)
            ref = reference(q, k, v, mask)
            rows.append([h, r, d, s, programs, kind, float((out - ref).norm() / ref.norm())])
    # the mask given once for the groups of query rows a KV head takes (the model's way: not repeated per layer);
    # row r of q uses mask row r % seq, as network.sdpa folds the heads into the rows; PyTorch's SDPA path and the
    # matmul form (its masked-softmax kernel), including a row with nothing allowed (zeros, as the kernels give)
    for h, groups, seq, d, s in ((2, 2, 1, 64, 100), (1, 16, 1, 128, 70), (2, 3, 5, 32, 90)):
        q = torch.randn(h, groups * seq, d, generator=g)
        k = torch.randn(h, s, d, generator=g)
        v = torch.randn(h, s, d, generator=g)
        mask = torch.rand(seq, s, generator=g) > 0.4
        mask[:, 0] = True
        ref = reference(q, k, v, mask.repeat(groups, 1))
        for name, out in (("kernels", A._launch(q, k, v, mask, block_s=16, programs=8)),
                          ("sdpa", A._sdpa(q, k, v, mask)), ("matmul", A._matmul_form(q, k, v, mask))):
            rows.append([h, groups * seq, d, s, name, "one mask row a query", float((out - ref).norm() / ref.norm())])
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[1] = True
    q, k, v = torch.randn(1, 4, 8), torch.randn(1, 4, 8), torch.ones(1, 4, 4)
    rows.append(A._matmul_form(q, k, v, mask)[0].tolist())
    print(json.dumps(rows))
''')


def test_decode_attention_kernels_match_the_matmul_form_in_the_interpreter():
    rows = run_in_triton_interpreter(SCRIPT)
    *rows, empty_row = rows
    assert len(rows) == 19
    for *case, rel in rows:
        assert rel < 1e-5, (case, rel)  # float32 throughout: equal up to summation order
    assert empty_row == [[0.0] * 4, pytest.approx([1.0] * 4), [0.0] * 4, pytest.approx([1.0] * 4)]


DISPATCH = textwrap.dedent('''
    import json, torch, triton
    from gemma4_agent.model import triton_attention as A

    # the timing that picks between the kernels and SDPA for long chunks replaced by given times
    TIMES = {}
    timed = []
    def fake_kernel_ms(fn, **kwargs):
        name = fn.func.__name__ + str(fn.keywords.get("programs", ""))  # the kernels differ by their split
        timed.append(name)
        return TIMES[name]
    import gemma4_agent.fastest
    gemma4_agent.fastest.kernel_ms = fake_kernel_ms  # the interpreter cannot time

    g = torch.Generator().manual_seed(0)
    out = []
    decode = {"_launch128": 2.0, "_launch256": 1.0, "_launch512": 3.0}
    for r, times in ((8, decode), (8, {}), (40, {**decode, "_launch512": 0.5, "_sdpa": 2.0, "_matmul_form": 0.7}),
                     (40, {}), (70, {**decode, "_sdpa": 0.5, "_matmul_form": 0.6}),
                     (90, {**decode, "_sdpa": 0.5, "_matmul_form": 0.4})):
        TIMES.clear(); TIMES.update(times); timed.clear()
        q = torch.randn(2, r, 32, generator=g)
        k = torch.randn(2, 50, 32, generator=g)
        v = torch.randn(2, 50, 32, generator=g)
        mask = torch.rand(r, 50, generator=g) > 0.3
        mask[:, 0] = True
        y = torch.ops.gemma4_agent.cache_attention(q, k, v, mask)
        scores = torch.matmul(q, k.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
        ref = torch.matmul(torch.softmax(scores, dim=-1), v)
        out.append([r, sorted(timed), float((y - ref).norm() / ref.norm())])
    out.append(sorted(A._PREFILL.picks.items()))
    out.append(sorted(A._DECODE.picks.items()))
    print(json.dumps(out))
''')


def test_cache_attention_takes_the_fastest_of_kernels_sdpa_and_matmul_form_for_long_chunks():
    *runs, picks, decode_picks = run_in_triton_interpreter(DISPATCH)
    for r, timed, rel in runs:
        assert rel < 1e-5, (r, rel)
    # decode-sized: the three splits timed once, then the pick reused; 40 rows: the splits, SDPA and the matmul form
    # timed once (the second call reuses the pick); 70 and 90 rows timed
    splits = ["_launch128", "_launch256", "_launch512"]
    twice = sorted(splits * 2), sorted((splits + ["_sdpa", "_matmul_form"]) * 2)  # each timed twice (fastest.py)
    assert [t for _, t, _ in runs] == [twice[0], [], twice[1], [], twice[1], twice[1]]
    assert picks == [[[2, 40, 50, 32], "512x16"], [[2, 70, 50, 32], "sdpa"], [[2, 90, 50, 32], "matmul"]]
    assert decode_picks == [[[2, 8, 50, 32], "256x32"]]


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_every_decode_split_on_the_gpu_at_the_12b_shapes():
    # compiled, where programs run concurrently: each split of the cache the op chooses between, against the
    # float32 matmul form, and the same output on every call
    import torch

    from gemma4_agent.model import triton_attention as A

    g = torch.Generator(device="cuda").manual_seed(0)
    for kv_heads, rows, dim in ((8, 2, 256), (1, 16, 512)):
        q = torch.randn(kv_heads, rows, dim, device="cuda", generator=g).bfloat16()
        k = (torch.randn(kv_heads, 982, dim, device="cuda", generator=g) / dim ** 0.5).bfloat16()
        v = torch.randn(kv_heads, 982, dim, device="cuda", generator=g).bfloat16()
        mask = torch.rand(rows, 982, device="cuda", generator=g) > 0.5
        mask[:, 0] = True
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)).masked_fill(~mask, float("-inf"))
        ref = torch.matmul(torch.softmax(scores, dim=-1), v.float())
        for name, kw in A.SPLITS.items():
            outs = [A._launch(q, k, v, mask, **kw) for _ in range(3)]
            rel = float((outs[0].float() - ref).norm() / ref.norm())
            assert rel < 1e-2, (kv_heads, name, rel)
            assert all(torch.equal(o, outs[0]) for o in outs), (kv_heads, name)
            # the mask given once for the KV head's groups of query rows (one token: one row), as the model passes it
            assert torch.equal(A._launch(q, k, v, mask[:1].expand(rows, -1).contiguous(), **kw),
                               A._launch(q, k, v, mask[:1], **kw)), (kv_heads, name)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_every_prefill_candidate_on_the_gpu_at_the_12b_shapes():
    # a 286-row frame chunk (the mask given once per KV head's groups of rows): the kernels, SDPA and the matmul
    # form (bf16 matmul with float32 scores) against the float32 form, and the op's pick agreeing with them
    import torch

    from gemma4_agent.model import triton_attention as A

    g = torch.Generator(device="cuda").manual_seed(0)
    for kv_heads, groups, dim in ((8, 2, 256), (1, 16, 512)):
        q = torch.randn(kv_heads, groups * 286, dim, device="cuda", generator=g).bfloat16()
        k = (torch.randn(kv_heads, 982, dim, device="cuda", generator=g) / dim ** 0.5).bfloat16()
        v = torch.randn(kv_heads, 982, dim, device="cuda", generator=g).bfloat16()
        mask = torch.rand(286, 982, device="cuda", generator=g) > 0.5
        mask[:, 0] = True
        full = mask.repeat(groups, 1)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)).masked_fill(~full, float("-inf"))
        ref = torch.matmul(torch.softmax(scores, dim=-1), v.float())
        outs = {"matmul": A._matmul_form(q, k, v, mask), "sdpa": A._sdpa(q, k, v, mask),
                "kernels": A._launch(q, k, v, mask), "op": torch.ops.gemma4_agent.cache_attention(q, k, v, mask)}
        for name, out in outs.items():
            rel = float((out.float() - ref).norm() / ref.norm())
            assert rel < 1e-2, (kv_heads, name, rel)
