"""The CUDA kernels compiled ahead of time for an H100/H200 (sm_90) with Triton's bundled ptxas: no GPU needed.

The interpreter tests (test_quant_triton.py, test_decode_attention_triton.py) check the arithmetic; this checks
what only the compiler sees: every kernel and autotuning configuration compiles (a config that does not would
fail the engine's first decode step on the GPU), and the weight loads are 16-byte vectors, which the decode
step's bandwidth depends on (they silently became 8-byte loads when a row's length reached the kernel only as
K / 8). Arguments are specialised as the JIT specialises them at the 12B's shapes (pointers and integers
divisible by 16 marked so, K / GROUP = 120 not)."""
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from gemma4_agent.model import triton_attention as A  # noqa: E402
from gemma4_agent.quant import triton_q4 as T  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)


def compile_kernel(fn, signature: dict, constexprs: dict, divisible: tuple, num_warps: int = 4):
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(signature)
             if name.endswith("_ptr") or name in divisible}
    src = ASTSource(fn=fn, signature=dict(signature), constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=SM90, options={"num_warps": num_warps})


def compile_ptx(fn, signature: dict, constexprs: dict, divisible: tuple, num_warps: int = 4) -> str:
    return compile_kernel(fn, signature, constexprs, divisible, num_warps).asm["ptx"]


def stack_bytes(kernel) -> int:
    """Local memory per thread (register spills), from the cubin, by the cuobjdump that ships with Triton."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        pytest.skip("no cuobjdump in this Triton")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"STACK:(\d+)", usage).group(1))


def loads(ptx: str) -> Counter:
    return Counter(re.findall(r"ld\.global[\.\w]*", ptx))


GEMV_SIG = {"x_ptr": "*bf16", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "y_ptr": "*bf16", "N": "i32",
            "K": "i32", "K_WORDS": "i32", "K_GROUPS": "i32", "GROUP": "constexpr", "HAS_ZEROS": "constexpr",
            "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "PROGRAMS": "constexpr"}


@pytest.mark.parametrize("has_zeros", [False, True])
def test_every_gemv_configuration_compiles_with_16_byte_weight_loads(has_zeros):
    sig = dict(GEMV_SIG, z_ptr="*u8" if has_zeros else "*fp16")
    group = 128 if has_zeros else 32
    configs = [c for c in T._gemv_configs() if c.kwargs["BLOCK_K"] % group == 0]
    # one of each (block shape, walking or not, warps)
    picked = {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], bool(c.kwargs["PROGRAMS"]), c.num_warps): c for c in configs}
    assert len(picked) >= 20
    vectorised = 0
    for c in picked.values():
        ptx = compile_ptx(T._gemv_kernel.fn, sig, {"GROUP": group, "HAS_ZEROS": has_zeros, **c.kwargs},
                          ("N", "K", "K_WORDS"), c.num_warps)
        threads = 32 * c.num_warps
        words_per_thread = c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] // 8 // threads
        x_per_thread = c.kwargs["BLOCK_K"] // threads
        if words_per_thread >= 4 and x_per_thread >= 8:  # enough per thread for 16-byte loads of both
            n = loads(ptx)
            assert n["ld.global.v4.b32"] > 0 and n["ld.global.v2.b32"] == 0 and n["ld.global.b32"] == 0, (c, n)
            vectorised += 1
    assert vectorised >= 10


def test_dequant_kernel_loads_whole_vectors_and_one_scale_per_group():
    sig = {"qw_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*fp16", "w_ptr": "*bf16", "N": "i32", "K": "i32",
           "K_BYTES": "i32", "K_GROUPS": "i32", "GROUP": "constexpr", "HAS_ZEROS": "constexpr",
           "BLOCK_N": "constexpr", "BLOCK_B": "constexpr"}
    ptx = compile_ptx(T._dequant_kernel, sig, {"GROUP": 32, "HAS_ZEROS": False, "BLOCK_N": 8, "BLOCK_B": 256},
                      ("N", "K", "K_BYTES"))
    n = loads(ptx)
    assert n["ld.global.v4.b32"] > 0 and n["ld.global.b16"] <= 2, n  # (it gathered 32 scales per thread)


def test_gemm_configurations_compile_without_spilling():
    sig = {"x_ptr": "*bf16", "qw_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*fp16", "y_ptr": "*bf16", "M": "i32",
           "N": "i32", "K": "i32", "K_BYTES": "i32", "K_GROUPS": "i32", "M_BUCKET": "i32", "GROUP": "constexpr",
           "HAS_ZEROS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    for c in T._gemm_configs():
        for group, has_zeros in ((32, False), (128, True)):  # blocks of whole groups, and blocks inside a group
            s = dict(sig, z_ptr="*u8" if has_zeros else "*fp16")
            kernel = compile_kernel(T._gemm_kernel.fn, s, {"GROUP": group, "HAS_ZEROS": has_zeros, **c.kwargs},
                                    ("N", "K", "K_BYTES"), c.num_warps)
            assert stack_bytes(kernel) == 0, (c, group)  # spilled registers cost the tile loop its speed


@pytest.mark.parametrize("dim, rows", [(256, 16), (512, 16), (512, 32)])  # sliding, full, jump-forward rows
def test_decode_attention_kernels_compile(dim, rows):
    split = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "mask_ptr": "*u8", "acc_ptr": "*fp32",
             "ml_ptr": "*fp32", "R": "i32", "S": "i32", "SPLITS": "i32", "sq_h": "i32", "sq_r": "i32", "sk_h": "i32",
             "sk_s": "i32", "sv_h": "i32", "sv_s": "i32", "sm_r": "i32", "D": "constexpr", "BLOCK_R": "constexpr",
             "BLOCK_S": "constexpr", "SPLIT_LEN": "constexpr"}
    ptx = compile_ptx(A._split_kernel, split, {"D": dim, "BLOCK_R": rows, "BLOCK_S": 32, "SPLIT_LEN": 64},
                      ("sq_h", "sq_r", "sk_h", "sk_s", "sv_h", "sv_s"))
    assert re.search(r"mma", ptx), "scores and p v should run on the tensor cores"
    merge = {"acc_ptr": "*fp32", "ml_ptr": "*fp32", "o_ptr": "*bf16", "R": "i32", "SPLITS": "i32", "so_h": "i32",
             "so_r": "i32", "D": "constexpr", "BLOCK_R": "constexpr", "BLOCK_SPLITS": "constexpr"}
    compile_ptx(A._merge_kernel, merge, {"D": dim, "BLOCK_R": rows, "BLOCK_SPLITS": 32}, ("so_h", "so_r"))
