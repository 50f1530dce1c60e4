"""The CUDA kernels compiled ahead of time for an H100/H200 (sm_90) with Triton's bundled ptxas: no GPU needed.

The interpreter tests (test_quant_triton.py, test_decode_attention_triton.py) check the arithmetic; this checks
what only the compiler sees: every kernel and autotuning configuration compiles (a config that does not would
fail the engine's first decode step on the GPU), and the weight loads are 16-byte vectors, which the decode
step's bandwidth depends on (they silently became 8-byte loads when a row's length reached the kernel only as
K / 8). Arguments are specialised as the JIT specialises them at the 12B's shapes (pointers and integers
divisible by 16 marked so, K / GROUP = 120 not)."""
import inspect
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from gemma4_agent.engine import gemv as B  # noqa: E402
from gemma4_agent.model import triton_attention as A  # noqa: E402
from gemma4_agent.quant import triton_q4 as T  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)


def compile_kernel(fn, signature: dict, constexprs: dict, divisible: tuple, num_warps: int = 4, num_stages: int = 3):
    # constexprs left out take their defaults, as a launch does
    defaults = {p.name: p.default for p in fn.params if p.is_constexpr and p.default is not inspect.Parameter.empty}
    constexprs = {**{k: v for k, v in defaults.items() if k not in constexprs}, **constexprs}
    signature = {**signature, **{k: "constexpr" for k in constexprs if k not in signature}}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(signature)
             if name.endswith("_ptr") or name in divisible}
    src = ASTSource(fn=fn, signature=dict(signature), constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=SM90, options={"num_warps": num_warps, "num_stages": num_stages})


def compile_ptx(fn, signature: dict, constexprs: dict, divisible: tuple, num_warps: int = 4) -> str:
    return compile_kernel(fn, signature, constexprs, divisible, num_warps).asm["ptx"]


def _cuobjdump(kernel, flag: str) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        pytest.skip("no cuobjdump in this Triton")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True, check=True).stdout


def stack_bytes(kernel) -> int:
    """Local memory per thread (register spills), from the cubin, by the cuobjdump that ships with Triton."""
    return int(re.search(r"STACK:(\d+)", _cuobjdump(kernel, "-res-usage")).group(1))


def loads(ptx: str) -> Counter:
    return Counter(re.findall(r"ld\.global[\.\w]*", ptx))


GEMV_SIG = {"x_ptr": "*bf16", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "y_ptr": "*bf16", "N": "i32",
            "K": "i32", "K_WORDS": "i32", "K_GROUPS": "i32", "GROUP": "constexpr", "HAS_ZEROS": "constexpr",
            "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "PDL": "constexpr"}


def sass_instructions(kernel) -> int:
    """Instructions in the compiled kernel, by the cuobjdump that ships with Triton."""
    sass = _cuobjdump(kernel, "-sass")
    return len(re.findall(r"/\*[0-9a-f]{4}\*/\s+\S", sass))


def loop_opcodes(kernel) -> list:
    """Opcodes of the kernel's longest loop (a backward branch and what it jumps over), in SASS."""
    lines = [(int(a, 16), op, rest) for a, op, rest in re.findall(
        r"/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", _cuobjdump(kernel, "-sass"))]
    loops = [(int(m.group(1), 16), addr) for addr, op, rest in lines if op.startswith("BRA")
             for m in [re.search(r"0x([0-9a-f]+)", rest)] if m and int(m.group(1), 16) < addr]
    start, end = max(loops, key=lambda se: se[1] - se[0])
    return [op.split(".")[0] for addr, op, _ in lines if start <= addr <= end]


def assert_pdl_order(kernel, prefetch: str = "") -> None:
    """The PDL wait (ACQBULK in SASS) comes before the successor's release (PREEXIT), and, where `prefetch` names
    a load opcode, the first such load before the wait: the weights are on their way while the kernel before
    finishes (pdl.py)."""
    ops = [op for _, op in re.findall(r"/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)",
                                      _cuobjdump(kernel, "-sass"))]
    assert ops.count("ACQBULK") == 1 and ops.count("PREEXIT") == 1, ops
    assert ops.index("ACQBULK") < ops.index("PREEXIT")
    if prefetch:
        assert ops.index(prefetch) < ops.index("ACQBULK"), "the first weights load after the wait"


def every_gemv_configuration(kernel, sig: dict, configs: list, has_zeros: bool, **constexprs):
    """(config, compiled kernel) for each of an int4 GEMV's configurations that fit the scheme's group (q4_0: 32
    without zero-points, awq-g128: 128 with), compiled as launched on sm_90 (PDL on)."""
    sig = dict(sig, z_ptr="*u8" if has_zeros else "*fp16")
    group = 128 if has_zeros else 32
    configs = [c for c in configs if c.kwargs["BLOCK_K"] % group == 0]
    assert len(configs) >= 20
    for c in configs:
        yield c, compile_kernel(kernel.fn, sig, {"GROUP": group, "HAS_ZEROS": has_zeros, "PDL": True, **constexprs,
                                                 **c.kwargs}, ("N", "K", "K_WORDS"), c.num_warps)


@pytest.mark.parametrize("has_zeros", [False, True])
def test_every_gemv_configuration_compiles_with_16_byte_weight_loads_and_no_spills(has_zeros):
    for c, kernel in every_gemv_configuration(T._gemv_kernel, GEMV_SIG, T._gemv_configs(), has_zeros):
        assert_pdl_order(kernel, "LDG.E.128")  # launched early on sm_90: waits, weights requested first (pdl.py)
        n = loads(kernel.asm["ptx"])
        assert n["ld.global.v4.b32"] > 0 and n["ld.global.v2.b32"] == 0 and n["ld.global.b32"] == 0, (c, n)
        assert stack_bytes(kernel) == 0, c


def test_gemv_spends_few_instructions_per_weight():
    # At one row the GEMV is bound by the SM's instruction issue before HBM: at full bandwidth an H200 SM must
    # retire ~32 weights a cycle, 4 warp-instructions a cycle, so ~4 instructions a weight is the budget. The loop
    # over blocks of K per weight of a thread's block, averaged over three configurations the autotuner picks at
    # the 12B's shapes (the whole kernel with one block, before the first block moved ahead of the PDL wait: 9.5
    # before the nibble-to-float rework (2026-11-29), 5.25 with an AND + FADD per weight, 4.5 with one AND-OR
    # (LOP3); the loop alone since: 3.3-4.0).
    per_weight = []
    for bn, bk, w in ((8, 4096, 4), (16, 1024, 2), (32, 1024, 4)):
        kernel = compile_kernel(T._gemv_kernel.fn, GEMV_SIG, {"GROUP": 32, "HAS_ZEROS": False, "BLOCK_N": bn,
                                                              "BLOCK_K": bk, "PDL": True}, ("N", "K", "K_WORDS"), w)
        per_weight.append(len(loop_opcodes(kernel)) / (bn * bk / (32 * w)))
    assert sum(per_weight) / len(per_weight) < 4.0, per_weight


Q8_SIG = {"x_ptr": "*bf16", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "y_ptr": "*bf16", "part_ptr": "*fp32",
          "count_ptr": "*i32", "N": "i32", "K": "i32", "K_WORDS": "i32", "K_GROUPS": "i32", "GROUP": "constexpr",
          "HAS_ZEROS": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "SPLIT": "constexpr",
          "ASM": "constexpr", "PDL": "constexpr"}


@pytest.mark.parametrize("has_zeros", [False, True])
def test_every_int8_x_gemv_configuration_compiles_with_16_byte_weight_loads_and_no_spills(has_zeros):
    for c, kernel in every_gemv_configuration(T._gemv_q8_kernel, Q8_SIG, T._gemv_q8_configs(), has_zeros, ASM=True):
        words_per_thread = c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] // (8 * 32 * c.num_warps)
        # every weight word in a 16-byte load (x, a few values a thread, may come in smaller ones)
        ptx = kernel.asm["ptx"]
        assert loads(ptx)["ld.global.v4.b32"] >= words_per_thread // 4, c
        assert stack_bytes(kernel) == 0, c
        assert_pdl_order(kernel, "LDG.E.128")
        if c.kwargs["SPLIT"] > 1:  # partials published and read at GPU scope, past the SM's own L1
            assert re.search(r"atom\.global\.gpu\.acq_rel\.add", ptx) and "ld.global.cg" in ptx, c


def test_int8_x_gemv_multiplies_four_weights_an_instruction():
    # dp4a: eight weights of a word in two IDP instructions; with x's quantization (shared by the rows) the loop
    # spends ~1.5-2 instructions a weight where the float GEMV spends ~3.5 (sm_90, 2026-11-29)
    per_weight = []
    for bn, bk, w in ((16, 1024, 4), (32, 1024, 4), (64, 512, 4)):
        kernel = compile_kernel(T._gemv_q8_kernel.fn, Q8_SIG, {"GROUP": 32, "HAS_ZEROS": False, "ASM": True,
                                                               "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": 1, "PDL": True},
                                ("N", "K", "K_WORDS"), w)
        ops = loop_opcodes(kernel)
        weights = bn * bk / (32 * w)
        assert ops.count("IDP") == weights / 4, (bn, bk, w)
        per_weight.append(len(ops) / weights)
    assert sum(per_weight) / len(per_weight) < 2.0, per_weight


def test_every_bf16_gemv_configuration_compiles_with_16_byte_loads_and_no_spills():
    sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "N": "i32", "K": "i32", "BLOCK_N": "constexpr",
           "BLOCK_K": "constexpr", "PDL": "constexpr"}
    configs = B._configs()
    assert len(configs) >= 15
    for c in configs:
        kernel = compile_kernel(B._gemv_kernel.fn, sig, dict(c.kwargs, PDL=True), ("N", "K"), c.num_warps)
        weights_per_thread = c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] // (32 * c.num_warps)
        # every weight in a 16-byte load (8 values); x, shared by the rows, may come in smaller ones
        assert loads(kernel.asm["ptx"])["ld.global.v4.b32"] >= weights_per_thread // 8, c
        assert stack_bytes(kernel) == 0, c
        assert_pdl_order(kernel, "LDG.E.128")


def test_dequant_kernel_loads_whole_vectors_and_one_scale_per_group():
    sig = {"qw_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*fp16", "w_ptr": "*bf16", "N": "i32", "K": "i32",
           "K_BYTES": "i32", "K_GROUPS": "i32", "GROUP": "constexpr", "HAS_ZEROS": "constexpr",
           "BLOCK_N": "constexpr", "BLOCK_B": "constexpr"}
    kernel = compile_kernel(T._dequant_kernel, sig, {"GROUP": 32, "HAS_ZEROS": False, "BLOCK_N": 8, "BLOCK_B": 256,
                                                     "PDL": True}, ("N", "K", "K_BYTES"))
    n = loads(kernel.asm["ptx"])
    assert n["ld.global.v4.b32"] > 0 and n["ld.global.b16"] <= 2, n  # (it gathered 32 scales per thread)
    assert_pdl_order(kernel, "LDG.E.128")  # the weights on their way before the wait


GEMM_SIG = {"x_ptr": "*bf16", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "y_ptr": "*bf16",
            "part_ptr": "*fp32", "count_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "K_WORDS": "i32",
            "K_GROUPS": "i32", "M_BUCKET": "i32", "GROUP": "constexpr", "HAS_ZEROS": "constexpr",
            "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}


def test_gemm_configurations_compile_without_spilling_in_the_tile_loop():
    for c in T._gemm_configs():
        for group, has_zeros in ((32, False), (128, True)):  # blocks of whole groups, and blocks inside a group
            s = dict(GEMM_SIG, z_ptr="*u8" if has_zeros else "*fp16")
            kernel = compile_kernel(T._gemm_kernel.fn, s, {"GROUP": group, "HAS_ZEROS": has_zeros, **c.kwargs},
                                    ("N", "K", "K_WORDS"), c.num_warps, c.num_stages)
            # spilled registers cost the tile loop its speed; the deep pipeline split four ways spills 8 bytes
            # after its loop (two stores and loads a program, measured faster than without it: _gemm_configs)
            loop = set(loop_opcodes(kernel))
            assert not loop & {"STL", "LDL"}, (c, group)
            assert stack_bytes(kernel) == (8 if c.num_stages == 4 and c.kwargs["SPLIT"] == 4 else 0), (c, group)
            if c.kwargs["SPLIT"] > 1:  # partials published and read at GPU scope, past the SM's own L1
                ptx = kernel.asm["ptx"]
                assert re.search(r"atom\.global\.gpu\.acq_rel\.add", ptx) and "ld.global.cg" in ptx, c


@pytest.mark.parametrize("rows", [76, 286])
def test_wide_gemm_configurations_compile_without_spilling_in_the_tile_loop(rows):
    # one program's accumulators for every row (256 + 32 at 286: ~240-250 registers a thread); the splits' epilogue
    # may spill after the loop (a few hundred bytes stored and loaded once a program), never inside it
    block_m, tail = T.wide_rows(rows)
    sig = dict(GEMM_SIG, SWAP="constexpr", SPLIT="constexpr", TAIL="constexpr")
    for c in T._gemm_wide_configs():
        kernel = compile_kernel(T._gemm_wide_kernel.fn, sig, {"GROUP": 32, "HAS_ZEROS": False, "BLOCK_M": block_m,
                                                              "TAIL": tail, **c.kwargs},
                                ("N", "K", "K_WORDS"), c.num_warps, c.num_stages)
        loop = loop_opcodes(kernel)
        assert not set(loop) & {"STL", "LDL"}, c
        assert c.kwargs["SPLIT"] > 1 or stack_bytes(kernel) == 0, c
        # both halves on the tensor cores from one dequantized tile: 4 k-steps of 16 each
        assert sum(op.startswith("HGMMA") for op in loop) == 8, c


def test_swapped_gemm_feeds_the_weights_to_wgmma_from_registers():
    # SWAP puts the dequantized weight tile first in the MMA: on sm_90 a 16-row chunk then runs wgmma (64 weight rows
    # by 16) with the weights as register operands, where the plain form falls back to Ampere's mma.sync
    sig = dict(GEMM_SIG, SWAP="constexpr")
    mmas = {}
    for swap in (False, True):
        ptx = compile_ptx(T._gemm_kernel.fn, sig, {"GROUP": 32, "HAS_ZEROS": False, "BLOCK_M": 16, "BLOCK_N": 128,
                                                   "BLOCK_K": 64, "SWAP": swap, "SPLIT": 1}, ("N", "K", "K_WORDS"))
        mmas[swap] = (len(re.findall(r"mma\.sync", ptx)),
                      len(re.findall(r"wgmma\.mma_async[^;]*\{[^}]*\}\s*,\s*\{", ptx)))  # A given as registers
    assert mmas[False][0] > 0 and mmas[False][1] == 0, mmas
    assert mmas[True][0] == 0 and mmas[True][1] > 0, mmas


def test_gemm_dequantizes_without_int_to_float_conversions():
    # The GEMM's loop dequantizes a weight tile per block of K; an I2F (quarter rate) per weight made it 7.3-8.9
    # instructions a weight plus the I2F; the GEMV's LOP3 + FMA form leaves 4.8-7.2 (2026-11-29).
    per_weight = []
    for c in T._gemm_configs():
        kernel = compile_kernel(T._gemm_kernel.fn, GEMM_SIG, {"GROUP": 32, "HAS_ZEROS": False, **c.kwargs},
                                ("N", "K", "K_WORDS"), c.num_warps, c.num_stages)
        ops = loop_opcodes(kernel)
        assert "I2F" not in ops, c
        per_weight.append(len(ops) / (c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] / (32 * c.num_warps)))
    assert sum(per_weight) / len(per_weight) < 6.5, per_weight


@pytest.mark.parametrize("dim, block", sorted({(d, A.block_shape(r, d)) for d in (32, 64, 128, 256, 512)
                                                for r in (2, 16, 32, 300, 5000)}))
def test_cache_attention_kernels_compile_without_spilling(dim, block):
    # every block shape _launch picks: decode steps (2-32 query rows) and prefill chunks (row blocks), at head
    # dims from the tiny models' to the 12B's sliding (256) and full (512) layers
    rows, warps = block
    split = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "mask_ptr": "*u8", "acc_ptr": "*fp32",
             "ml_ptr": "*fp32", "R": "i32", "R_PAD": "i32", "S": "i32", "SPLITS": "i32", "MASK_ROWS": "i32",
             "sq_h": "i32", "sq_r": "i32",
             "sk_h": "i32", "sk_s": "i32", "sv_h": "i32", "sv_s": "i32", "sm_r": "i32", "D": "constexpr",
             "BLOCK_R": "constexpr", "BLOCK_S": "constexpr", "SPLIT_LEN": "constexpr", "PDL": "constexpr"}
    for block_s in sorted({32} | {c["block_s"] for c in A.SPLITS.values()}):  # prefill's and every decode split
        kernel = compile_kernel(A._split_kernel, split, {"D": dim, "BLOCK_R": rows, "BLOCK_S": block_s,
                                                         "SPLIT_LEN": 64, "PDL": True}, ("R_PAD", "sq_h", "sq_r", "sk_h", "sk_s",
                                                                            "sv_h", "sv_s"), warps)
        assert re.search(r"mma", kernel.asm["ptx"]), "scores and p v should run on the tensor cores"
        assert stack_bytes(kernel) == 0, block_s
        # the mask's bytes are asked for with k's and v's, not after the scores' MMAs (a second trip to memory)
        ops = re.findall(r"\b(LDG\.E\.U8|HG?MMA)\b", _cuobjdump(kernel, "-sass"))  # mma or, at 64+ rows, wgmma
        assert ops.index("LDG.E.U8") < min(ops.index(m) for m in ("HMMA", "HGMMA") if m in ops), block_s
        assert_pdl_order(kernel)
    merge = {"acc_ptr": "*fp32", "ml_ptr": "*fp32", "o_ptr": "*bf16", "R_PAD": "i32", "SPLITS": "i32", "so_h": "i32",
             "so_r": "i32", "D": "constexpr", "BLOCK_SPLITS": "constexpr", "BLOCK_D": "constexpr",
             "PDL": "constexpr"}
    block_d = A.merge_block_d(dim)
    for splits in (32, 64):  # up to 62 splits of a 982-slot cache at 16 slots each
        kernel = compile_kernel(A._merge_kernel, merge, {"D": dim, "BLOCK_SPLITS": splits, "BLOCK_D": block_d,
                                                         "PDL": True}, ("so_h", "so_r"), A.merge_warps(splits, block_d))
        assert stack_bytes(kernel) == 0, splits
        assert_pdl_order(kernel)


@pytest.mark.parametrize("block", [1024, A.MATMUL_MAX_SLOTS])
def test_masked_softmax_kernel_compiles_without_spilling(block):
    # the matmul form's softmax: a row of a 982-slot cache (the 12B bench's) and the longest it takes
    sig = {"s_ptr": "*fp32", "mask_ptr": "*u8", "p_ptr": "*bf16", "S": "i32", "R": "i32", "MASK_ROWS": "i32",
           "sm_r": "i32", "BLOCK": "constexpr"}
    kernel = compile_kernel(A._masked_softmax_kernel, sig, {"BLOCK": block}, ("sm_r",), A.softmax_warps(block))
    assert stack_bytes(kernel) == 0


@pytest.mark.parametrize("width", [64, 3840])
def test_add_norms_kernel_compiles_with_whole_vector_loads_and_no_spills(width):
    # the 12B's row of 3840 held in registers by one program (its launch's warps), and a tiny model's
    from gemma4_agent.model import triton_norms as N

    block = triton.next_power_of_2(width)
    sig = {"h_ptr": "*bf16", "y_ptr": "*bf16", "w_post_ptr": "*bf16", "w_pre_ptr": "*bf16", "scale_ptr": "*bf16",
           "h_out_ptr": "*bf16", "x_ptr": "*bf16", "N": "i32", "eps_post": "fp32", "eps_pre": "fp32",
           "HAS_SCALE": "constexpr", "BLOCK": "constexpr", "PDL": "constexpr"}
    for scaled in (False, True):
        kernel = compile_kernel(N._add_norms_kernel, sig, {"HAS_SCALE": scaled, "BLOCK": block, "PDL": True}, ("N",),
                                N.warps(block))
        assert stack_bytes(kernel) == 0, scaled
        ptx = kernel.asm["ptx"]
        assert_pdl_order(kernel)
        if width == 3840:  # 16 values a thread: 16-byte loads of h, y and both weights
            assert loads(ptx)["ld.global.v4.b32"] >= 4, loads(ptx)


def test_gelu_mul_kernel_compiles_with_whole_vector_loads():
    # a decode step's 15360 values of gate and up: 8 a thread in 16-byte loads; PDL wait before, release after
    import math

    from gemma4_agent.model import triton_gelu as G

    sig = {"gate_ptr": "*bf16", "up_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32", "s_gate": "i32", "s_up": "i32",
           "TWO_BETA": "constexpr", "BLOCK": "constexpr", "PDL": "constexpr"}
    kernel = compile_kernel(G._gelu_mul_kernel, sig, {"TWO_BETA": 2 * math.sqrt(2 / math.pi), "BLOCK": G.BLOCK,
                                                      "PDL": True}, ("N", "s_gate", "s_up"), 4)
    assert loads(kernel.asm["ptx"])["ld.global.v4.b32"] == 2, loads(kernel.asm["ptx"])
    assert stack_bytes(kernel) == 0
    assert_pdl_order(kernel)


@pytest.mark.parametrize("dim", [64, 256, 512])
def test_qkv_kernel_compiles_without_spills(dim):
    # a head's halves in registers at the warps the op launches with (the 12B's 256 and 512, a tiny model's 64);
    # PDL wait before anything is read, release after
    from gemma4_agent.model import triton_qkv as Q

    sig = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16",
           "qw_ptr": "*bf16", "kw_ptr": "*bf16", "q_out_ptr": "*bf16", "kc_ptr": "*bf16", "vc_ptr": "*bf16",
           "slots_ptr": "*i64", "H": "i32", "KV": "i32", "s_q": "i32", "s_k": "i32", "s_v": "i32", "s_cs": "i32",
           "sc_h": "i32", "sc_s": "i32", "eps": "fp32", "D": "constexpr", "PDL": "constexpr"}
    kernel = compile_kernel(Q._qkv_kernel, sig, {"D": dim, "PDL": True},
                            ("s_q", "s_k", "s_v", "s_cs", "sc_h", "sc_s"), Q.warps(dim))
    assert stack_bytes(kernel) == 0
    assert_pdl_order(kernel)
