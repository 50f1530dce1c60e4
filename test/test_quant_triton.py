"""The CUDA int4 kernels (gemma4_agent/quant/triton_q4.py) run here in Triton's CPU interpreter: the
same kernel source, on the portable q4_0 / awq-g128 layout, against the dequantized float32 matmul.
(The lent GPU runs them compiled: `python -m gemma4_agent.quant.gpu_check`.)"""
import textwrap

import pytest

pytest.importorskip("triton")

from conftest import run_in_triton_interpreter  # noqa: E402

# fp32 activations: the GEMM and dequantize paths are exact up to summation order; the GEMV adds the rounding of its
# offset form (each weight read as 1 + q 2^-12..2^-4 of the float, see triton_q4._dot_words): ~1e-4. A wrong
# nibble, scale or group costs > 1e-2.
GEMV_FP32_TOL, EXACT_TOL = 5e-4, 1e-5

SCRIPT = textwrap.dedent("""
    import json, torch, triton
    from torch import nn
    from gemma4_agent.quant import triton_q4 as T
    from gemma4_agent.quant.int4 import Int4Linear

    def launch(x, mod, gemv, cfg):
        m, k = x.shape
        n = mod.qweight.shape[0]
        y = torch.empty(m, n, dtype=x.dtype)
        s = mod.scales.view(torch.float16)
        z = mod.zeros if mod.zeros is not None else s
        common = dict(GROUP=mod.group_size, HAS_ZEROS=mod.zeros is not None, **cfg)
        if gemv == "gemv":  # autotuning needs a GPU: the interpreter runs one configuration directly
            T._gemv_kernel.fn[(triton.cdiv(n, cfg["BLOCK_N"]),)](x, mod.qweight.view(torch.int32), s, z, y, n, k,
                                                                 k // 8, k // mod.group_size, PDL=False, **common)
        elif gemv == "gemv_q8":
            split = cfg.get("SPLIT", 1)
            part = torch.full((split, n), float("nan"))
            counts = torch.zeros(triton.cdiv(n, cfg["BLOCK_N"]), dtype=torch.int32)
            T._gemv_q8_kernel.fn[(triton.cdiv(n, cfg["BLOCK_N"]), split)](
                x, mod.qweight.view(torch.int32), s, z, y, part, counts, n, k, k // 8, k // mod.group_size,
                ASM=False, PDL=False, **dict(common, SPLIT=split))
            assert not counts.any()  # the last split of each row block left its count at zero for the next call
        elif gemv == "dequant":
            w = torch.empty(n, k, dtype=x.dtype)
            T._dequant_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(k // 2, cfg["BLOCK_B"]))](
                mod.qweight, s, z, w, n, k, k // 2, k // mod.group_size, **common)
            y = x @ w.t()
        else:  # gemm; gemm_wide: one tile of every row (BLOCK_M + TAIL) per BLOCK_N weights, two counts a tile
            split = cfg.get("SPLIT", 1)
            tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]) if gemv == "gemm" \
                else triton.cdiv(n, cfg["BLOCK_N"])
            part = torch.full((split, m, n), float("nan"))
            counts = torch.zeros(2 * tiles, dtype=torch.int32)
            T._gemm_kernel.fn[(tiles, split)](x, mod.qweight.view(torch.int32), s, z, y, part, counts, m, n, k, k // 8,
                                              k // mod.group_size, 1, **common)
            assert not counts.any()  # as the GEMV's
        return y

    torch.manual_seed(0)
    rows = []
    for scheme in ("q4_0", "awq-g128"):
        for out, inp in ((48, 256), (40, 384)):  # 40 rows: a partial block; 384: K not a multiple of 256
            mod = Int4Linear.from_float(nn.Linear(inp, out, bias=False), scheme)
            ref_w = mod.dequantize(torch.float32)
            # the GEMV in bf16 (the decode step's dtype); the GEMM in fp32 (the interpreter has no bf16 dot)
            # K = 384 with 256-wide blocks: the GEMV's masked tail
            # 16 rows a block: the last block of 40 rows partial; 128-wide blocks: 2-3 per row, one group each
            for m, gemv, dtype, cfg in ((1, "gemv", torch.bfloat16, dict(BLOCK_N=8, BLOCK_K=256)),
                                        (1, "gemv", torch.bfloat16, dict(BLOCK_N=16, BLOCK_K=512)),
                                        (1, "gemv", torch.bfloat16, dict(BLOCK_N=4, BLOCK_K=128)),
                                        (1, "gemv", torch.float32, dict(BLOCK_N=4, BLOCK_K=256)),
                                        # x in int8: held to the product with x so rounded (a misplaced byte or a
                                        # wrong group scale costs > 1e-2); K = 384: a masked tail at 256
                                        (1, "gemv_q8", torch.bfloat16, dict(BLOCK_N=8, BLOCK_K=256)),
                                        (1, "gemv_q8", torch.float32, dict(BLOCK_N=16, BLOCK_K=128)),
                                        (1, "gemv_q8", torch.float32, dict(BLOCK_N=4, BLOCK_K=512)),
                                        # K in splits summed by the last to arrive; with K = 256 the third of
                                        # three splits is empty
                                        (1, "gemv_q8", torch.float32, dict(BLOCK_N=8, BLOCK_K=128, SPLIT=2)),
                                        (1, "gemv_q8", torch.float32, dict(BLOCK_N=16, BLOCK_K=128, SPLIT=3)),
                                        (3, "gemm", torch.float32, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32)),
                                        (5, "gemm", torch.float32, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64)),
                                        (20, "gemm", torch.float32, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128)),
                                        # the weight tile as the MMA's first operand, the result stored transposed
                                        (3, "gemm", torch.float32, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SWAP=True)),
                                        (20, "gemm", torch.float32, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128,
                                                                         SWAP=True)),
                                        # K in splits summed by the last to arrive, plain and swapped; with
                                        # K = 256 the third of three splits is empty
                                        (20, "gemm", torch.float32, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64,
                                                                         SPLIT=2)),
                                        (5, "gemm", torch.float32, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64,
                                                                        SWAP=True, SPLIT=3)),
                                        # a chunk's wide-K block: K = 384 ends in a half block
                                        (5, "gemm", torch.float32, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=256,
                                                                        SWAP=True)),
                                        # every row in one program: a 16-row tail after 16 and 32 rows, the
                                        # tail's partials counted apart from the main rows'
                                        (20, "gemm_wide", torch.float32, dict(BLOCK_M=16, TAIL=16, BLOCK_N=16,
                                                                              BLOCK_K=64, SWAP=True)),
                                        (40, "gemm_wide", torch.float32, dict(BLOCK_M=32, TAIL=16, BLOCK_N=32,
                                                                              BLOCK_K=128, SWAP=True, SPLIT=3)),
                                        (32, "gemm_wide", torch.float32, dict(BLOCK_M=32, TAIL=0, BLOCK_N=16,
                                                                              BLOCK_K=32, SWAP=True, SPLIT=2)),
                                        (70, "dequant", torch.float32, dict(BLOCK_N=8, BLOCK_B=256))):
                x = torch.randn(m, inp)
                xr = x.to(dtype).float()
                ref = (T.round_x_int8(xr) if gemv == "gemv_q8" else xr) @ ref_w.t()
                y = launch(x.to(dtype).contiguous(), mod, gemv, cfg).float()
                rows.append([scheme, out, inp, m, gemv, dtype == torch.float32,
                             float((y - ref).norm() / ref.norm())])
    print(json.dumps(rows))
""")


def test_int4_kernels_match_dequantized_matmul_in_the_interpreter():
    rows = run_in_triton_interpreter(SCRIPT)
    assert len(rows) == 84
    for scheme, out, inp, m, kernel, fp32, rel in rows:
        # bf16 activations round x (rel. 4e-3); fp32 is exact up to summation order
        tol = (GEMV_FP32_TOL if kernel == "gemv" else EXACT_TOL) if fp32 else 1e-2
        assert rel < tol, (scheme, out, inp, m, kernel, rel)


def test_gemm_tries_its_deep_pipeline_up_to_a_70_token_frame_only():
    # the 4-stage configurations were measured faster at 76 rows (a 70-token frame) and not at 286: a 280-token
    # frame's prefill keeps the configurations it had
    import torch

    from gemma4_agent.quant import triton_q4 as T

    def stages(rows):
        args = {"M_BUCKET": 1 << (rows - 1).bit_length(), "N": 3840, "K": 15360, "x_ptr": torch.empty(1)}
        return {c.num_stages for c in T._prune_gemm(T._gemm_configs(), args)}

    assert stages(76) == {3, 4} and stages(8) == {3, 4}
    assert stages(286) == {3}


def test_gemm_tries_its_wide_k_blocks_on_chunks_only():
    # blocks of 256 along K for jump-forward chunks (up to 16 rows), whose few rows leave the walk along K exposed;
    # a frame's prefill (here 286 rows) keeps the configurations it had
    import torch

    from gemma4_agent.quant import triton_q4 as T

    def kept(rows):
        args = {"M_BUCKET": 1 << (rows - 1).bit_length(), "N": 3840, "K": 15360, "x_ptr": torch.empty(1)}
        return T._prune_gemm(T._gemm_configs(), args)

    assert any(c.kwargs["BLOCK_K"] == 256 for c in kept(6))
    assert not any(c.kwargs["BLOCK_K"] > 128 for c in kept(286)) and kept(286)


DISPATCH = textwrap.dedent("""
    import json, torch, triton
    from torch import nn
    from gemma4_agent.quant import triton_q4 as T
    from gemma4_agent.quant.int4 import Int4Linear

    # one configuration per autotuned kernel (the interpreter cannot time them); the timing that picks the path for
    # 2-512 rows replaced by given times, recorded per call
    T._gemv_kernel.configs = [triton.Config({"BLOCK_N": 4, "BLOCK_K": 256}, num_warps=1)]
    T._gemv_q8_kernel.configs = [triton.Config({"BLOCK_N": 8, "BLOCK_K": 128, "SPLIT": 2}, num_warps=1)]
    T._gemm_kernel.configs = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64}, num_warps=1)]
    T._gemm_wide_kernel.configs = [triton.Config({"BLOCK_N": 16, "BLOCK_K": 64, "SWAP": True, "SPLIT": 1}, num_warps=1)]
    timed = []
    def fake_kernel_ms(fn, **kwargs):
        timed.append(fn.func.__name__)
        return TIMES[fn.func.__name__]
    import gemma4_agent.fastest
    gemma4_agent.fastest.kernel_ms = fake_kernel_ms  # the interpreter cannot time

    torch.manual_seed(0)
    mod = Int4Linear.from_float(nn.Linear(256, 48, bias=False), "q4_0")
    ref_w = mod.dequantize(torch.float32)
    rows = []
    for m, TIMES in ((1, {"_gemv": 2.0, "_gemv_q8": 1.0}), (3, {"_gemm": 2.0, "_dequant_matmul": 3.0, "_gemv_rows": 1.0}), (4, None),
                     (5, {"_gemm": 1.0, "_dequant_matmul": 3.0, "_gemv_rows": 2.0}),
                     (20, {"_gemm": 2.0, "_gemm_wide": 1.5, "_dequant_matmul": 1.0}), (30, None),
                     (40, {"_gemm": 1.0, "_gemm_wide": 0.5, "_dequant_matmul": 3.0}), (600, None)):
        timed.clear()
        x = torch.randn(m, 256)
        y = T._launch(x, mod.qweight, mod.scales, None, 32)
        ref = x @ ref_w.t()
        rows.append([m, sorted(timed), float((y - ref).norm() / ref.norm())])
    rows.append(sorted(T._CHUNK.picks.items()))
    x = torch.randn(3, 256)
    ref = x @ ref_w.t()
    timed.clear()
    named = {p: float((T._launch(x, mod.qweight, mod.scales, None, 32, p) - ref).norm() / ref.norm())
             for p in T.paths_for(3)}  # each path by name (gpu_check), none timed
    rows.append([named, timed])
    print(json.dumps(rows))
""")


def test_int4_matmul_dispatch_by_rows_in_the_interpreter():
    *runs, picks, (named, named_timed) = run_in_triton_interpreter(DISPATCH)
    assert [r[0] for r in runs] == [1, 3, 4, 5, 20, 30, 40, 600]
    assert sorted(named) == ["dequant", "gemm", "rows"] and named_timed == []
    assert all(rel < (GEMV_FP32_TOL if p == "rows" else EXACT_TOL) for p, rel in named.items()), named
    # 17-320 rows: the wide GEMM's tiles (wide_rows) in the key, 30 rows the same as 20 (16 + a 16-row tail)
    assert picks == [[[48, 256, 1, False], "gemv_q8"], [[48, 256, 4, False], "rows"], [[48, 256, 8, False], "gemm"],
                     [[48, 256, 32, False, [16, 16]], "dequant"], [[48, 256, 64, False, [32, 16]], "gemm_wide"]]
    for m, timed, rel in runs:
        # float32 activations: the paths of one GEMV per row (3 and 4 rows) round as the GEMV does; one row took
        # the int8-x GEMV (x rounded to 8 bits: ~5e-3)
        assert rel < (1e-2 if m == 1 else GEMV_FP32_TOL if m <= 4 else EXACT_TOL), (m, rel)
        # the candidates timed (twice each, fastest.py) once per (shape, rows rounded up to a power of two): 4 rows
        # reuses 3's pick, 30 rows 20's; > 512 rows have one path
        expected = {1: ["_gemv", "_gemv_q8"], 3: ["_dequant_matmul", "_gemm", "_gemv_rows"], 5: ["_dequant_matmul", "_gemm", "_gemv_rows"],
                    20: ["_dequant_matmul", "_gemm", "_gemm_wide"], 40: ["_dequant_matmul", "_gemm", "_gemm_wide"]}.get(m, [])
        assert timed == sorted(expected * 2), (m, timed)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="the compiled kernels need a CUDA device")
def test_every_int4_path_on_the_gpu_matches_the_dequantized_matmul():
    import torch
    from torch import nn

    from gemma4_agent.quant import triton_q4 as T
    from gemma4_agent.quant.int4 import Int4Linear

    torch.manual_seed(0)
    for scheme in ("q4_0", "awq-g128"):
        mod = Int4Linear.from_float(nn.Linear(512, 200, bias=False), scheme).cuda()
        ref_w = mod.dequantize(torch.float32)
        for m in (1, 3, 16, 40, 76, 286):  # and a frame's prefill rows (the wide GEMM's 64 + 16 and 256 + 32)
            x = torch.randn(m, 512, device="cuda").to(torch.bfloat16)
            ref = x.float() @ ref_w.t()
            paths = T.paths_for(m, mod.group_size, T.gluon_usable(x, mod.zeros, mod.group_size))
            if scheme == "q4_0" and 16 < m and torch.cuda.get_device_capability()[0] == 9:
                assert any(p.startswith("gluon_") for p in paths), (m, list(paths))  # sm_90: the Gluon GEMM too
            for path in paths:
                y = T._launch(x, mod.qweight, mod.scales, mod.zeros, mod.group_size, path).float()
                assert ((y - ref).norm() / ref.norm()).item() < 1e-2, (scheme, m, path)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="the compiled kernels need a CUDA device")
@pytest.mark.parametrize("split", [1, 2, 4])
def test_int8_x_gemv_on_the_gpu_in_splits_of_k(split):
    # compiled: dp4a in PTX, and with splits the partials published across SMs (atomics, L2) and summed by the
    # last to arrive; twice in a row, as graph replays run it, so a count left non-zero would show
    import torch
    import triton
    from torch import nn

    from gemma4_agent.quant import triton_q4 as T
    from gemma4_agent.quant.int4 import Int4Linear

    torch.manual_seed(0)
    n, k = 3840, 4096
    mod = Int4Linear.from_float(nn.Linear(k, n, bias=False), "q4_0").cuda()
    x = torch.randn(1, k, device="cuda").to(torch.bfloat16)
    ref = T.round_x_int8(x.float()) @ mod.dequantize(torch.float32).t()
    part = torch.empty(split, n, device="cuda")
    counts = torch.zeros(triton.cdiv(n, 16), device="cuda", dtype=torch.int32)
    for _ in range(2):
        y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
        T._gemv_q8_kernel.fn[(triton.cdiv(n, 16), split)](
            x, mod.qweight.view(torch.int32), mod.scales.view(torch.float16), mod.scales.view(torch.float16), y,
            part, counts, n, k, k // 8, k // 32, GROUP=32, HAS_ZEROS=False, BLOCK_N=16, BLOCK_K=1024, SPLIT=split,
            ASM=True, num_warps=4, **T.pdl_args(x))
        # the kernel's arithmetic is exact but for float32 summation order and the bf16 output
        assert ((y.float() - ref).norm() / ref.norm()).item() < 5e-3, split
        assert not counts.any().item()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="the compiled kernels need a CUDA device")
@pytest.mark.parametrize("split, swap, stages", [(1, False, 3), (2, False, 3), (4, True, 3), (1, True, 4), (4, True, 4)])
def test_gemm_on_the_gpu_in_splits_of_k(split, swap, stages):
    # a 70-token frame's down projection (76 rows, 3840 x 15360), compiled, with the partials of each tile
    # published across SMs and summed by the last to arrive; twice in a row, so a count left non-zero would show
    import torch
    import triton
    from torch import nn

    from gemma4_agent.quant import triton_q4 as T
    from gemma4_agent.quant.int4 import Int4Linear

    torch.manual_seed(0)
    m, n, k = 76, 3840, 15360
    mod = Int4Linear.from_float(nn.Linear(k, n, bias=False), "q4_0").cuda()
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    ref = x.float() @ mod.dequantize(torch.float32).t()
    block_m = 128 if stages == 4 else 64  # the deep pipeline's configurations take all 76 rows in one tile
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, 128)
    part = torch.empty(split, m, n, device="cuda")
    counts = torch.zeros(tiles, device="cuda", dtype=torch.int32)
    for _ in range(2):
        y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        s = mod.scales.view(torch.float16)
        T._gemm_kernel.fn[(tiles, split)](x, mod.qweight.view(torch.int32), s, s, y, part, counts, m, n, k, k // 8,
                                          k // 32, 128, GROUP=32, HAS_ZEROS=False, BLOCK_M=block_m, BLOCK_N=128,
                                          BLOCK_K=64, SWAP=swap, SPLIT=split, num_warps=8, num_stages=stages)
        assert ((y.float() - ref).norm() / ref.norm()).item() < 5e-3, split
        assert not counts.any().item()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="the compiled kernels need a CUDA device")
@pytest.mark.parametrize("m, split", [(76, 1), (76, 4), (286, 1), (286, 4)])
def test_wide_gemm_on_the_gpu_in_splits_of_k(m, split):
    # every row of a frame's prefill in one program (main rows and a tail, wide_rows), the down projection's shape,
    # each half's partials summed by the last split to arrive under its own count; twice, as graph replays run it
    import torch
    import triton
    from torch import nn

    from gemma4_agent.quant import triton_q4 as T
    from gemma4_agent.quant.int4 import Int4Linear

    torch.manual_seed(0)
    n, k = 3840, 15360
    mod = Int4Linear.from_float(nn.Linear(k, n, bias=False), "q4_0").cuda()
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    ref = x.float() @ mod.dequantize(torch.float32).t()
    block_m, tail = T.wide_rows(m)
    tiles = triton.cdiv(n, 128)
    part = torch.empty(split, m, n, device="cuda")
    counts = torch.zeros(2 * tiles, device="cuda", dtype=torch.int32)
    for _ in range(2):
        y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        s = mod.scales.view(torch.float16)
        T._gemm_wide_kernel.fn[(tiles, split)](x, mod.qweight.view(torch.int32), s, s, y, part, counts, m, n, k,
                                               k // 8, k // 32, 512, GROUP=32, HAS_ZEROS=False, BLOCK_M=block_m,
                                               TAIL=tail, BLOCK_N=128, BLOCK_K=64, SWAP=True, SPLIT=split,
                                               num_warps=8, num_stages=3)
        assert ((y.float() - ref).norm() / ref.norm()).item() < 5e-3, split
        assert not counts.any().item()


def test_a_gluon_configuration_whose_product_strays_is_not_a_candidate():
    # the check the first use of a shape makes before timing (the kernels themselves need an sm_90 GPU): each call
    # writes its product into the one output, as _launch's candidates do
    import torch

    from gemma4_agent.quant import triton_q4 as T

    y = torch.zeros(4, 8)
    want = torch.randn(4, 8)

    def fails():
        raise RuntimeError("no kernel image for this GPU")

    calls = {"gemm": lambda: y.copy_(want), "dequant": lambda: y.copy_(want),
             "gluon_64": lambda: y.copy_(want * (1 + 1e-4)), "gluon_128": lambda: y.copy_(want.flip(0)),
             "gluon_256_32": fails}
    assert list(T._without_wrong_gluon(calls, y)) == ["gemm", "dequant", "gluon_64"]
    assert T._without_wrong_gluon({"gemm": calls["gemm"], "dequant": calls["dequant"]}, y).keys() == {"gemm", "dequant"}
