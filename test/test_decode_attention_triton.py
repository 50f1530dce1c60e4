"""The CUDA decode-attention kernels (gemma4_agent/model/triton_attention.py) run here in Triton's CPU
interpreter, against network.sdpa's matmul form of the same arithmetic: grouped query rows, masked slots
(including splits where nothing is allowed), a slot count that is not a multiple of the tiles.
(The lent GPU runs them compiled: benchmarks/gpu_decode_kernels.py checks them at the 12B's shapes.)"""
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
    for h, r, d, s, programs in ((2, 2, 64, 100, 128), (1, 16, 128, 70, 128), (2, 3, 32, 200, 2)):
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
    print(json.dumps(rows))
''')


def test_decode_attention_kernels_match_the_matmul_form_in_the_interpreter():
    rows = run_in_triton_interpreter(SCRIPT)
    assert len(rows) == 6
    for *case, rel in rows:
        assert rel < 1e-5, (case, rel)  # float32 throughout: equal up to summation order
