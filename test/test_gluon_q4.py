"""The Gluon int4 GEMM (gemma4_agent/quant/gluon_q4.py), checked without a GPU: Gluon has no interpreter, so
(1) the weight operand it builds in registers (a word's nibbles placed by the bits-of-1.0 trick, joined, reshaped and
permuted) is replayed in torch on the engine's own packed weights and must equal the engine's dequantized weight in
the permuted column order that x is given, bit for bit; (2) the kernel compiles for sm_90 with that operand already in
wgmma's register layout (no data moved between threads: asserted by the compiler), no spills, and no register of a
wgmma's operand written before that wgmma is done (with IN_FLIGHT = 1 ptxas does write them: the wrong products
measured on the H100); (3) with the operand through shared memory instead (in x's own column order, also replayed),
it compiles with each step's wgmmas left in flight. On an sm_90 GPU, every configuration's product is checked here
(gpu_decode_kernels.py --parts gluon_gemm times them)."""
import re

import numpy as np
import pytest
import torch

from gemma4_agent.quant.int4 import Int4Linear

G = pytest.importorskip("gemma4_agent.quant.gluon_q4", exc_type=ImportError)


def nibble(words: np.ndarray, s: np.ndarray, i: int) -> np.ndarray:
    """The kernel's _nibble: nibble i of each word into a float's mantissa beside 1.0, scaled: (q - 8) s."""
    copy = words << np.uint32(11) if i < 3 else words >> np.uint32(1) if i < 6 else words >> np.uint32(13)
    v = ((copy & np.uint32(0xF << (4 * i + 11 - 12 * (i // 3)))) | np.uint32(0x3F800000)).view(np.float32)
    S = s * np.float32(1 << (12 - 4 * i + 12 * (i // 3)))
    return v * S - (S + 8 * s)


def operand(words: np.ndarray, s: np.ndarray, natural: bool = False) -> torch.Tensor:
    """The kernel's _operand (or _operand_natural) for one block of 64 columns: words [BN, 4, 2] (a thread's two
    words last), their scales [BN, 4, 1] -> [BN, 64]."""
    n = [torch.from_numpy(nibble(words, s, i)) for i in range(8)]
    j = lambda a, b: torch.stack([a, b], -1)  # noqa: E731 (gl.join: a new last dimension)
    w = j(j(j(n[0], n[1]), j(n[2], n[3])), j(j(n[4], n[5]), j(n[6], n[7])))
    if natural:
        return w.permute(0, 1, 2, 5, 4, 3).reshape(len(words), 64)
    return w.reshape(len(words), 2, 2, 2, 2, 2, 2).permute(0, 3, 6, 5, 1, 2, 4).reshape(len(words), 64)


def test_permutation_permutes_each_block_of_64_and_permuted_applies_it():
    perm = G.permutation(256)
    assert sorted(perm.tolist()) == list(range(256))
    assert all(sorted(perm[b:b + 64].tolist()) == list(range(b, b + 64)) for b in range(0, 256, 64))
    x = torch.randn(5, 256)
    assert torch.equal(G.permuted(x), x[:, perm])


@pytest.mark.parametrize("natural", [False, True])
def test_operand_is_the_dequantized_weight_in_the_order_x_is_given(natural):
    # the register operand: x's permuted column order; the shared-memory one: x's own
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 64, bias=False)
    with torch.no_grad():
        lin.weight.normal_()
        lin.weight[0, :32] = 0  # an all-zero group
        lin.weight[1, 5] = 1e3  # a group with one large value
    mod = Int4Linear.from_float(lin, "q4_0")
    words = mod.qweight.view(torch.int32).numpy().view(np.uint32)
    scales = mod.scales.view(torch.float16).float().numpy()
    want = mod.dequantize(torch.float32)
    want = want if natural else want[:, G.permutation(256)]
    for kb in range(4):
        s = scales[:, 2 * kb + np.arange(4) // 2, None]  # a pair's group: first two pairs, then last two
        got = operand(words[:, 8 * kb:8 * kb + 8].reshape(-1, 4, 2), s, natural)
        assert torch.equal(got, want[:, 64 * kb:64 * kb + 64])


triton = pytest.importorskip("triton")


def compiled_sm90(kernel, tensors: dict, constexprs: dict):
    """A Gluon kernel compiled for sm_90 (Triton here: 3.8 in CI; 3.6, the lent machines', checked too) with the
    argument types `tensors` (in order, then the constexprs) and 16-divisible pointers and N, K."""
    from test_kernels_compile import SM90
    from triton.experimental.gluon._runtime import GluonASTSource

    sig = {**tensors, "M": "i32", "N": "i32", "K": "i32", "K_GROUPS": "i32",
           **{name: "constexpr" for name in constexprs}}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(sig) if name in ("s_ptr", "y_ptr", "N", "K")}
    return triton.compile(GluonASTSource(kernel, sig, constexprs, attrs), target=SM90,
                          options={"num_warps": constexprs["num_warps"]})  # convert_layout(assert_trivial) holds


def compiled(block_m, block_n, stages, sub, tail, smem_operand=False, split=1):
    """q4_gemm_kernel compiled for sm_90."""
    xl, wl = G.layouts(block_m, block_n, sub)
    tl_ = G.layouts(tail, block_n)[0] if tail else xl
    sig = {"x_desc": f"tensordesc<bf16[{block_m}, 64],{xl!r}>",
           "xt_desc": f"tensordesc<bf16[{tail or block_m}, 64],{tl_!r}>",
           "w_desc": f"tensordesc<i32[{block_n}, {8 * sub}],{wl!r}>",
           "s_ptr": "*fp16", "y_ptr": "*fp32" if split > 1 else "*bf16"}
    warps = block_n // 16
    constexprs = dict(BM=block_m, BN=block_n, STAGES=stages, SUB=sub, TAIL=tail, WL=G.words_layout(block_n, warps),
                      PL=G.pairs_layout(block_n, warps), num_warps=warps, IN_FLIGHT=0,
                      AL=G.operand_layout(block_n) if smem_operand else None, SPLIT=split)
    return compiled_sm90(G.q4_gemm_kernel, sig, constexprs)


@pytest.mark.parametrize("block_m,block_n,stages,sub,tail", [(64, 64, 4, 1, 0), (128, 64, 4, 1, 0), (256, 64, 3, 1, 0),
                                                            (128, 128, 4, 1, 0), (128, 64, 3, 2, 0), (64, 64, 4, 2, 0),
                                                            (256, 64, 3, 1, 32), (256, 64, 3, 1, 64)])
def test_compiles_for_sm90_with_the_operand_in_place_and_its_registers_kept_until_its_wgmma_is_done(block_m, block_n,
                                                                                                    stages, sub, tail):
    from test_kernels_compile import _cuobjdump, stack_bytes

    kernel = compiled(block_m, block_n, stages, sub, tail)
    assert stack_bytes(kernel) == 0
    sass = _cuobjdump(kernel, "-sass")
    assert f"HGMMA.64x{block_m}x16.F32.BF16" in sass
    if tail:
        assert f"HGMMA.64x{tail}x16.F32.BF16" in sass  # the tail's MMA on the same operand
    assert not re.search(r"\b(STS|LDSM|SHFL)\b", sass)  # the operand never goes through shared memory or shuffles
    assert operand_registers_overwritten_in_flight(sass) == []


def engine_configs(gemm) -> list:
    """The keyword arguments of every configuration of gluon_q4.configs_for (the unmeasured too) that calls `gemm`."""
    return [c.keywords for rows in (76, 286) for c in G.configs_for(rows, unmeasured=True).values() if c.func is gemm]


@pytest.mark.parametrize("block_m,block_n,stages,sub,tail,split", sorted({
    (128, 128, 3, 2, 0, 1), (256, 64, 2, 2, 32, 1), (256, 128, 2, 1, 32, 1), (64, 64, 4, 1, 0, 1),
    *[tuple(c[k] for k in ("block_m", "block_n", "stages", "sub", "tail", "split"))
      for c in engine_configs(G.q4_gemm)]}))
def test_the_shared_memory_operand_compiles_with_each_steps_wgmmas_left_in_flight(block_m, block_n, stages, sub,
                                                                                   tail, split):
    from test_kernels_compile import _cuobjdump, stack_bytes

    kernel = compiled(block_m, block_n, stages, sub, tail, smem_operand=True, split=split)
    sass = _cuobjdump(kernel, "-sass")
    if split == 1:
        assert stack_bytes(kernel) == 0
    else:  # the parts' float32 adds (fire and forget), whose addresses may spill after the loop, never inside it
        assert "REDG.E.ADD.F32" in sass and not re.search(r"\b(ATOMG|STG)\b", sass)
        assert not [line for line in main_loop(sass) if re.search(r"\b(STL|LDL)\b", line[1])]
    # wgmma reads both operands from shared memory (descriptors, no register operand) ...
    assert re.search(rf"HGMMA\.64x{block_m}x16\.F32\.BF16 R\d+, gdesc\[", sass)
    assert not re.search(r"HGMMA\.\S+ R\d+, R\d+,", sass)
    # ... stored there (16 bytes a store) and fenced for the async proxy before the wgmmas that read it ...
    order = re.findall(r"\b(STS\.128|FENCE\.VIEW\.ASYNC\.S|HGMMA)\b", sass)
    assert "STS.128" in order and order.index("STS.128") < order.index("FENCE.VIEW.ASYNC.S") < order.index("HGMMA")
    # ... and the main loop leaves the step's wgmma groups (one a block of 64, two with a tail) in flight
    assert f"WARPGROUP.DEPBAR.LE gsb0, 0x{sub * (2 if tail else 1)}" in sass


@pytest.mark.parametrize("block_n,stages", sorted({(c["block_n"], c["stages"]) for c in engine_configs(G.q4_gemm_wb)}))
def test_the_weights_as_second_operand_compile_with_each_steps_wgmma_left_in_flight(block_n, stages):
    from test_kernels_compile import _cuobjdump, stack_bytes

    xl, wl = G.layouts(64, block_n)
    kernel = compiled_sm90(G.q4_gemm_wb_kernel,
                           {"x_desc": f"tensordesc<bf16[64, 64],{xl!r}>",
                            "w_desc": f"tensordesc<i32[{block_n}, 8],{wl!r}>", "s_ptr": "*fp16", "y_ptr": "*bf16"},
                           dict(BN=block_n, STAGES=stages, WL=G.words_layout(64, 4), PL=G.pairs_layout(64, 4),
                                AL=G.operand_layout(block_n), num_warps=4))
    assert stack_bytes(kernel) == 0
    sass = _cuobjdump(kernel, "-sass")
    # x's 64 rows against block_n weight rows, both operands read from shared memory ...
    assert re.search(rf"HGMMA\.64x{block_n}x16\.F32\.BF16 R\d+, gdesc\[", sass)
    assert not re.search(r"HGMMA\.\S+ R\d+, R\d+,", sass)
    # ... the dequantized weights stored there and fenced before the wgmmas, which stay in flight a step
    loop = [op for _, op, _ in main_loop(sass)]
    assert loop.index("STS.128") < loop.index("FENCE.VIEW.ASYNC.S") < next(
        i for i, op in enumerate(loop) if op.startswith("HGMMA"))
    assert "WARPGROUP.DEPBAR.LE gsb0, 0x1" in sass


def main_loop(sass: str) -> list:
    """(address, opcode, operands) of the innermost loop around the first wgmma."""
    lines = [(int(a, 16), op, rest) for a, op, rest in re.findall(
        r"/\*([0-9a-f]{4})\*/\s+((?:@!?U?P\w+\s+)?[A-Z][A-Z0-9_.]*)([^;]*);", sass)]
    first = next(a for a, op, _ in lines if "HGMMA" in op)
    start, end = min(((int(m.group(1), 16), a) for a, op, rest in lines if "BRA" in op
                      for m in [re.search(r"0x([0-9a-f]+)", rest)] if m and int(m.group(1), 16) <= first < a),
                     key=lambda se: se[1] - se[0])
    return [line for line in lines if start <= line[0] <= end]


def operand_registers_overwritten_in_flight(sass: str) -> list:
    """(wgmma, instruction) pairs in the main loop where an instruction writes a register of a wgmma's register
    operand before the wait that completes that wgmma (the loop taken twice round). wgmma reads the operand
    asynchronously: such a write races it (the twenty-third session's wrong products with wgmmas left in flight)."""
    body = main_loop(sass)
    races = []
    for i, (a, op, rest) in enumerate(body):
        m = re.search(r"\sR\d+, R(\d+),", rest) if "HGMMA" in op else None  # rest: "x64x16.F32.BF16 R24, R56, ..."
        if not m:
            continue
        regs = {f"R{int(m.group(1)) + j}" for j in range(4)}
        for a2, op2, rest2 in body[i + 1:] + body[:i]:
            if "WARPGROUP.DEPBAR" in op2 and "0x0" in rest2:
                break  # every wgmma before it is done
            written = re.match(r"\s*(R\d+)", rest2)
            if written and written.group(1) in regs and "HGMMA" not in op2:
                races.append((a, a2))
                break
    return races


def test_tail_for_rows():
    assert G.tail_for(286) == 32 and G.tail_for(260) == 16 and G.tail_for(256) == 0 and G.tail_for(321) == 0
    assert G.tail_for(76, 64) == 16 and G.tail_for(128, 64) == 64 and G.tail_for(64, 64) == 0


def test_the_engine_times_only_the_forms_measured_on_a_gpu():
    # the twenty-fifth session's forms stay out of the engine's candidates until a GPU has run them
    assert set(G.configs_for(286)) == {"gluon_128", "gluon_128_s2", "gluon_256_32", "gluon_256_32_s2"}
    assert set(G.configs_for(76)) == {"gluon_128", "gluon_128_s2"}
    assert set(G.configs_for(286)) < set(G.configs_for(286, unmeasured=True))
    assert {"gluon_64_16", "gluon_wb_256"} <= set(G.configs_for(76, unmeasured=True))


def finished(what: str, seconds: float = 30.0) -> None:
    """Wait for the GPU's queued work, failing by name if it is still running after `seconds` (a kernel that hangs
    on a barrier would otherwise hold the whole run)."""
    import time

    done = torch.cuda.Event()
    done.record()
    end = time.monotonic() + seconds
    while not done.query():
        if time.monotonic() > end:
            pytest.fail(f"{what}: still running after {seconds} s")
        time.sleep(1e-3)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="wgmma needs an sm_90 GPU")
@pytest.mark.parametrize("rows", [76, 286])
def test_every_configuration_on_the_gpu_matches_the_dequantized_matmul(rows):
    # the unmeasured forms too, so that their first run on a GPU is here; 384 weight rows leave a part tile at 256
    torch.manual_seed(0)
    mod = Int4Linear.from_float(torch.nn.Linear(512, 384, bias=False), "q4_0").cuda()
    x = torch.randn(rows, 512, device="cuda").to(torch.bfloat16)
    want = x.float() @ mod.dequantize(torch.float32).t()
    for name, gemm in G.configs_for(rows, unmeasured=True).items():
        for _ in range(2):  # twice, as graph replays run it: the split form's float32 sum must start from zero
            y = gemm(x, mod.qweight, mod.scales)
            finished(name)
        err = ((y.float() - want).norm() / want.norm()).item()
        assert err < 1e-2, (name, err)
