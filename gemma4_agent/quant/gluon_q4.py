"""The prefill's int4 GEMM on sm_90 (H100/H200) in Gluon, Triton's explicit dialect: q4_0 weights (as the engine
packs them) times bf16 x. Candidates of triton_q4's int4 matmul at 17-512 rows, timed against the others on first use
per shape (and their product checked first), so taken only where faster (BENCHMARKS.md, twenty-fourth session: at a
280-token frame's 286 rows, q/k/v 1.7x and gate/up 1.06x faster than the engine's other paths on an H100).

Why Gluon: the tl.dot GEMM (triton_q4) dequantizes a weight tile, routes it through shared memory into the register
layout wgmma wants and then waits for each wgmma, one program of 8 warps an SM, so the tensor cores and the
dequantization take turns (Nsight Compute, eighteenth session); Triton's own warp specialization does not apply on
sm_90 (`tl.range(warp_specialize=True)` fails to compile around a dequantized dot, or does nothing). Here every
layout is ours. y^T = W x^T on wgmma, the weight tile first (64 rows a warp group); x and the weight words come
through a TMA ring in shared memory; at 65-128 and 257-320 rows one program takes every row (64 or 256 and a tail of
16-64, a second wgmma on the same operand), so each weight tile is dequantized once a frame. (q4_gemm_wb swaps the
roles: x's rows first, the weights second, so that x is read from L2 less often.) The dequantized tile goes either
- to shared memory (the engine's form, `smem_operand`): two steps' worth, in x's own column order, each step's
  wgmmas left in flight while the next step is dequantized; or
- straight into wgmma's register operand, x's columns permuted once a call (`permuted`) so that each thread's
  operand elements are whole words of its own (the layout change asserted to move no data). Each step must then wait
  for its own wgmmas (IN_FLIGHT = 0): wgmma reads a register operand asynchronously, and ptxas gives those registers
  to the next step's dequantization before the wait (seen in the SASS; the products came out wrong with IN_FLIGHT =
  1, twenty-third session). Kept for comparison (gpu_decode_kernels.py --parts gluon_gemm).
q4_0 only (zero point 8), bf16 x, K a multiple of 128. CPU checks: test/test_gluon_q4.py (the operand's arithmetic
and order replayed in torch; the sm_90 compile and its SASS); on the GPU, triton_q4's every-path tests."""
import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from .triton_q4 import _nibble as _place_nibble, _unit  # triton.jit helpers: Gluon calls them as they are

BLOCK_K = 64  # K a step: one TMA box of 8 words a row, four k16 MMAs
BK = gl.constexpr(BLOCK_K)  # the same, for the kernel


def permutation(K: int) -> torch.Tensor:
    """perm with x'[:, p] = x[:, perm[p]]: in each block of 64, the MMA's column p = 32h + 16a + 8b + 2t + c (thread t
    of a quad, k16 block j = 2h + a, element pair b, element c) reads element 16t + 8h + 4a + 2b + c, i.e. word 2t + h
    nibble 4a + 2b + c of the thread's row."""
    p = torch.arange(64)
    h, a, b, t, c = p // 32, p // 16 % 2, p // 8 % 2, p // 2 % 4, p % 2
    block = 16 * t + 8 * h + 4 * a + 2 * b + c
    return (torch.arange(0, K, 64)[:, None] + block[None, :]).reshape(-1)


def permuted(x: torch.Tensor) -> torch.Tensor:
    """x[:, permutation(K)] as one copy: within a block of 64 the permutation only reorders the bits of the column
    index (element bits t1 t0 h a b c -> column bits h a b t1 t0 c), a reshape and permute, no index tensor."""
    m, k = x.shape
    return x.reshape(m, k // 64, 2, 2, 2, 2, 2, 2).permute(0, 1, 4, 5, 6, 2, 3, 7).reshape(m, k)


def words_layout(BN, num_warps):
    """[BN, 8] words: lane 4g + t of warp w holds rows 16w + g and 16w + g + 8, words 2t and 2t + 1 (the rows and
    columns wgmma's first operand gives that thread, before the nibbles are spread)."""
    warps = [[16 << i, 0] for i in range((num_warps - 1).bit_length())]
    return gl.DistributedLinearLayout(reg_bases=[[0, 1], [8, 0]], lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
                                      warp_bases=warps, block_bases=[], shape=[BN, 8])


def pairs_layout(BN, num_warps):
    """The same words as [BN, 4, 2]: a thread's two words (same group, same scale) along the last dimension, so
    that a scale loaded as [BN, 4] (SliceLayout(2, this)) is one value a row a thread, broadcast over both."""
    warps = [[16 << i, 0, 0] for i in range((num_warps - 1).bit_length())]
    return gl.DistributedLinearLayout(reg_bases=[[0, 0, 1], [8, 0, 0]],
                                      lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
                                      warp_bases=warps, block_bases=[], shape=[BN, 4, 2])


@gluon.jit
def _nibble(words, magic, S, C, i: gl.constexpr):
    # nibble i of every word as (q - 8) s: placed in a float's mantissa next to 1.0 by the GEMV's trick (one LOP3:
    # triton_q4._nibble), v = 1 + q 2^(p - 23), so that (q - 8) s = v S' - (S' + C) with S' = s 2^(23 - p) (one FMA)
    unit = _unit(i)
    return gl.fma(_place_nibble(words, magic, i), S * unit, -(S * unit + C)).to(gl.bfloat16)


@gluon.jit
def _nibbles(words, s, magic):
    # [BN, 4, 2] words and their scales [BN, 4, 1] -> [BN, t, h, c, b, a] bf16: nibble 4a + 2b + c of word 2t + h
    C = 8.0 * s
    return gl.join(gl.join(gl.join(_nibble(words, magic, s, C, 0), _nibble(words, magic, s, C, 1)),
                           gl.join(_nibble(words, magic, s, C, 2), _nibble(words, magic, s, C, 3))),
                   gl.join(gl.join(_nibble(words, magic, s, C, 4), _nibble(words, magic, s, C, 5)),
                           gl.join(_nibble(words, magic, s, C, 6), _nibble(words, magic, s, C, 7))))


@gluon.jit
def _operand(words, s, magic, a_layout: gl.constexpr, BN: gl.constexpr):
    # the words' weights [BN, 64] in wgmma's register layout, in x's permuted column order (asserted trivial: no
    # data moves): [BN, t1 t0, h, c, b, a] -> [BN, h, a, b, t1, t0, c]
    w = gl.reshape(_nibbles(words, s, magic), [BN, 2, 2, 2, 2, 2, 2])
    w = gl.permute(w, [0, 3, 6, 5, 1, 2, 4])
    return gl.convert_layout(gl.reshape(w, [BN, 64]), a_layout, assert_trivial=True)


@gluon.jit
def _operand_natural(words, s, magic, BN: gl.constexpr):
    # the same weights in x's own column order (for shared memory, where any register layout can be stored):
    # [BN, t, h, c, b, a] -> [BN, t, h, a, b, c]
    return gl.reshape(gl.permute(_nibbles(words, s, magic), [0, 1, 2, 5, 4, 3]), [BN, 64])


@gluon.jit
def _scales(s_ptr, rows, pair, N, K_GROUPS, group):
    # the scales [R, 4, 1] of a thread's words (PL's slice: `pair` 0-3 is the word pair, two a group of 32) from group
    # `group` on, of weight rows `rows` (those past the last row read the last row's: their products are not stored)
    off = gl.expand_dims(gl.minimum(rows, N - 1) * K_GROUPS, 1) + gl.expand_dims(pair // 2, 0)
    return gl.expand_dims(gl.load(s_ptr + off + group).to(gl.float32), 2)


@gluon.jit
def _load_step(x_desc, xt_desc, w_desc, x_smem, xt_smem, w_smem, ready, m0, n0, step, first, SUB: gl.constexpr,
               STAGES: gl.constexpr, TAIL: gl.constexpr):
    # this program's step `step` (step `first` + `step` of K): its SUB blocks of x (and of its TAIL rows) and its
    # words into the ring, one barrier for all
    stage = step % STAGES
    step += first
    XT_BYTES: gl.constexpr = xt_desc.block_type.nbytes if TAIL > 0 else 0
    NBYTES: gl.constexpr = SUB * (x_desc.block_type.nbytes + XT_BYTES) + w_desc.block_type.nbytes
    mbarrier.expect(ready.index(stage), NBYTES)
    for j in gl.static_range(SUB):
        k0 = (step * SUB + j) * BK
        tma.async_copy_global_to_shared(x_desc, [m0, k0], ready.index(stage), x_smem.index(stage * SUB + j))
        if TAIL > 0:
            tma.async_copy_global_to_shared(xt_desc, [m0 + x_desc.block_type.shape[0], k0], ready.index(stage),
                                            xt_smem.index(stage * SUB + j))
    tma.async_copy_global_to_shared(w_desc, [n0, step * SUB * (BK // 8)], ready.index(stage), w_smem.index(stage))


@gluon.jit
def _store(y_ptr, acc, m0, n0, M, N, BM: gl.constexpr, BN: gl.constexpr, layout: gl.constexpr,
           SPLIT: gl.constexpr):
    # y [M, N] rows m0.. from acc [BN weight rows, BM rows of x]; with SPLIT > 1 y is float32 (zeroed by the
    # caller) and acc is added into it (a fire-and-forget reduction: bf16 atomics would be compare-and-swap loops)
    rn = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, layout))
    rm = m0 + gl.arange(0, BM, layout=gl.SliceLayout(0, layout))
    mask = gl.expand_dims(rn < N, 1) & gl.expand_dims(rm < M, 0)
    ptrs = y_ptr + gl.expand_dims(rm, 0) * N + gl.expand_dims(rn, 1)
    if SPLIT > 1:
        gl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")
    else:
        gl.store(ptrs, acc.to(gl.bfloat16), mask=mask)


@gluon.jit
def q4_gemm_kernel(x_desc, xt_desc, w_desc, s_ptr, y_ptr, M, N, K, K_GROUPS, BM: gl.constexpr, BN: gl.constexpr,
                   STAGES: gl.constexpr, SUB: gl.constexpr, TAIL: gl.constexpr, WL: gl.constexpr,
                   PL: gl.constexpr, num_warps: gl.constexpr, IN_FLIGHT: gl.constexpr = 0,
                   AL: gl.constexpr = None, SPLIT: gl.constexpr = 1):
    # a step of the pipeline: SUB blocks of 64 columns (one barrier, one words copy and its bookkeeping for all).
    # TAIL > 0: one program takes all of x's rows, BM and the TAIL after them (a second MMA on the same operand), so
    # 286 rows cost 256 + 32 rows of MMAs and one dequantization a weight tile.
    # AL (a shared layout): the operand goes through shared memory, two steps' worth, in x's own column order (x not
    # permuted: any register layout can be stored), and wgmma reads it from there, so each step's wgmmas stay in
    # flight while the next step is dequantized (IN_FLIGHT is then 1 whatever given), which a register operand cannot
    # do safely (module docstring)
    # SPLIT > 1: K in SPLIT parts, one a program, their products added into a float32 y (for shapes of too few
    # weight tiles to fill the GPU; at 2 parts the sum is the same whichever part comes first: 0 + a + b = 0 + b + a)
    SMEM_A: gl.constexpr = AL is not None
    part = gl.program_id(0) % SPLIT
    pid = gl.program_id(0) // SPLIT
    tiles_m = gl.cdiv(M, BM) if TAIL == 0 else 1
    m0 = (pid % tiles_m) * BM  # the programs sharing a weight tile run together (it is read once from L2)
    n0 = (pid // tiles_m) * BN
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BM, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES * SUB, BM, BK], x_desc.layout)
    w_smem = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BN, SUB * (BK // 8)], w_desc.layout)
    xt_smem = x_smem
    if TAIL > 0:
        tail_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                              instr_shape=[16, TAIL, 16])
        at_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=tail_layout, k_width=2)
        xt_smem = gl.allocate_shared_memory(xt_desc.dtype, [STAGES * SUB, TAIL, BK], xt_desc.layout)
        acc_t = gl.zeros([BN, TAIL], gl.float32, layout=tail_layout)
    if SMEM_A:
        a_smem = gl.allocate_shared_memory(gl.bfloat16, [2 * SUB, BN, BK], AL)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
    n_k = K // (SUB * BK * SPLIT)  # this program's steps, from step `first` of K
    first = part * n_k
    for i in gl.static_range(STAGES - 1):
        if i < n_k:
            _load_step(x_desc, xt_desc, w_desc, x_smem, xt_smem, w_smem, ready, m0, n0, i, first, SUB, STAGES, TAIL)
    # a thread's scales: its two rows, the group of its words (2t, 2t + 1: group t // 2 of a block's two)
    sl: gl.constexpr = gl.SliceLayout(2, PL)
    rows = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, sl))
    pair = gl.arange(0, 4, layout=gl.SliceLayout(0, sl))
    acc = gl.zeros([BN, BM], gl.float32, layout=acc_layout)
    # the bits of 1.0 as a value the compiler cannot fold into an immediate (K_GROUPS < 2^30): one LOP3 a nibble
    magic = ((K_GROUPS >> 30) | 0x3F800000).to(gl.uint32)
    for kb in range(n_k):
        stage = kb % STAGES
        # the step's scales (SUB is 1 or 2), asked for before the wait for its words
        s0 = _scales(s_ptr, rows, pair, N, K_GROUPS, 2 * (first + kb) * SUB)
        if SUB > 1:
            s1 = _scales(s_ptr, rows, pair, N, K_GROUPS, 2 * (first + kb) * SUB + 2)
        mbarrier.wait(ready.index(stage), (kb // STAGES) & 1)
        for j in gl.static_range(SUB):
            s = s0 if j == 0 else s1
            words = w_smem.index(stage).slice(j * (BK // 8), BK // 8, dim=1).load(WL).to(gl.uint32, bitcast=True)
            words = gl.convert_layout(gl.reshape(words, [BN, 4, 2]), PL, assert_trivial=True)
            if SMEM_A:  # the buffer the step before last read: its wgmmas are done (the wait below)
                a_buf = a_smem.index((kb % 2) * SUB + j)
                a_buf.store(_operand_natural(words, s, magic, BN))
                fence_async_shared()
                acc = warpgroup_mma(a_buf, x_smem.index(stage * SUB + j).permute((1, 0)), acc, is_async=True)
                if TAIL > 0:
                    acc_t = warpgroup_mma(a_buf, xt_smem.index(stage * SUB + j).permute((1, 0)), acc_t,
                                          is_async=True)
            else:
                a = _operand(words, s, magic, a_layout, BN)
                acc = warpgroup_mma(a, x_smem.index(stage * SUB + j).permute((1, 0)), acc, is_async=True)
                if TAIL > 0:
                    acc_t = warpgroup_mma(gl.convert_layout(a, at_layout, assert_trivial=True),
                                          xt_smem.index(stage * SUB + j).permute((1, 0)), acc_t, is_async=True)
        # the step before is done (this step's wgmma groups may still run): its buffers take the load STAGES - 1
        # steps ahead
        LEFT: gl.constexpr = SUB * (1 if SMEM_A else IN_FLIGHT)
        if TAIL > 0:
            acc, acc_t = warpgroup_mma_wait(num_outstanding=2 * LEFT, deps=(acc, acc_t))
        else:
            acc = warpgroup_mma_wait(num_outstanding=LEFT, deps=(acc, ))
        if kb + STAGES - 1 < n_k:
            _load_step(x_desc, xt_desc, w_desc, x_smem, xt_smem, w_smem, ready, m0, n0, kb + STAGES - 1, first, SUB,
                       STAGES, TAIL)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
    _store(y_ptr, acc, m0, n0, M, N, BM, BN, acc_layout, SPLIT)
    if TAIL > 0:
        acc_t = warpgroup_mma_wait(num_outstanding=0, deps=(acc_t, ))
        _store(y_ptr, acc_t, BM, n0, M, N, TAIL, BN, tail_layout, SPLIT)


@gluon.jit
def q4_gemm_wb_kernel(x_desc, w_desc, s_ptr, y_ptr, M, N, K, K_GROUPS, BN: gl.constexpr, STAGES: gl.constexpr,
                      WL: gl.constexpr, PL: gl.constexpr, AL: gl.constexpr, num_warps: gl.constexpr):
    # The roles swapped: y = x W^T with x's 64 rows as wgmma's first operand and BN (256) dequantized weight rows as
    # its second, so a program reads 64 rows of x and the weights' tile is dequantized once for each 64 rows of x.
    # Where q4_gemm_kernel's 64-weight-row programs each read all of x from L2 (the pace at a 280-token frame's 286
    # rows, BENCHMARKS.md twenty-fourth session), this reads x a quarter as often and the int4 words (a quarter of
    # x's bytes a weight tile) once for each 64 rows of x. One warp group; the tile dequantized 64 rows at a time
    # (q4_gemm_kernel's layouts) into a double-buffered shared tile, each step's wgmma left in flight meanwhile.
    BM: gl.constexpr = 64
    CHUNKS: gl.constexpr = BN // 64
    pid = gl.program_id(0)
    tiles_m = gl.cdiv(M, BM)
    m0 = (pid % tiles_m) * BM  # the programs sharing a weight tile run together (its words read once from HBM)
    n0 = (pid // tiles_m) * BN
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BN, 16])
    x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BM, BK], x_desc.layout)
    w_smem = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BN, BK // 8], w_desc.layout)
    b_smem = gl.allocate_shared_memory(gl.bfloat16, [2, BN, BK], AL)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
    n_k = K // BK
    for i in gl.static_range(STAGES - 1):
        if i < n_k:
            _load_step(x_desc, x_desc, w_desc, x_smem, x_smem, w_smem, ready, m0, n0, i, 0, 1, STAGES, 0)
    sl: gl.constexpr = gl.SliceLayout(2, PL)
    rows = gl.arange(0, 64, layout=gl.SliceLayout(1, sl))
    pair = gl.arange(0, 4, layout=gl.SliceLayout(0, sl))
    acc = gl.zeros([BM, BN], gl.float32, layout=acc_layout)
    magic = ((K_GROUPS >> 30) | 0x3F800000).to(gl.uint32)
    for kb in range(n_k):
        stage = kb % STAGES
        # each chunk's scales (rows 64 apart: CHUNKS is 1, 2 or 4), asked for before the wait for the step's words
        s0 = _scales(s_ptr, n0 + rows, pair, N, K_GROUPS, 2 * kb)
        if CHUNKS > 1:
            s1 = _scales(s_ptr, n0 + 64 + rows, pair, N, K_GROUPS, 2 * kb)
        if CHUNKS > 2:
            s2 = _scales(s_ptr, n0 + 128 + rows, pair, N, K_GROUPS, 2 * kb)
            s3 = _scales(s_ptr, n0 + 192 + rows, pair, N, K_GROUPS, 2 * kb)
        mbarrier.wait(ready.index(stage), (kb // STAGES) & 1)
        b_buf = b_smem.index(kb % 2)  # the buffer the step before last read: its wgmmas are done (the wait below)
        for c in gl.static_range(CHUNKS):
            s = s0 if c == 0 else s1 if c == 1 else s2 if c == 2 else s3
            words = w_smem.index(stage).slice(c * 64, 64, dim=0).load(WL).to(gl.uint32, bitcast=True)
            words = gl.convert_layout(gl.reshape(words, [64, 4, 2]), PL, assert_trivial=True)
            b_buf.slice(c * 64, 64, dim=0).store(_operand_natural(words, s, magic, 64))
        fence_async_shared()
        acc = warpgroup_mma(x_smem.index(stage), b_buf.permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))  # the step before is done
        if kb + STAGES - 1 < n_k:
            _load_step(x_desc, x_desc, w_desc, x_smem, x_smem, w_smem, ready, m0, n0, kb + STAGES - 1, 0, 1, STAGES,
                       0)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
    rm = m0 + gl.arange(0, BM, layout=gl.SliceLayout(1, acc_layout))
    rn = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, acc_layout))
    mask = gl.expand_dims(rm < M, 1) & gl.expand_dims(rn < N, 0)
    gl.store(y_ptr + gl.expand_dims(rm, 1) * N + gl.expand_dims(rn, 0), acc.to(gl.bfloat16), mask=mask)


def layouts(BM: int, BN: int, sub: int = 1):
    """The shared-memory layouts of x's and the words' TMA tiles (`sub` blocks of 64 columns a step)."""
    return (gl.NVMMASharedLayout.get_default_for([BM, BLOCK_K], gl.bfloat16),
            gl.NVMMASharedLayout.get_default_for([BN, sub * BLOCK_K // 8], gl.int32))


def tail_for(rows: int, block_m: int = 256) -> int:
    """The tail tile (16-64 rows) that takes what block_m rows leave, 0 where that is nothing or too much."""
    rest = rows - block_m
    return max(16, 1 << (rest - 1).bit_length()) if 0 < rest <= 64 else 0


def operand_layout(BN: int):
    """The shared layout of the operand's buffers (q4_gemm's smem_operand)."""
    return gl.NVMMASharedLayout.get_default_for([BN, BLOCK_K], gl.bfloat16)


def configs_for(rows: int, unmeasured: bool = False) -> dict:
    """The configurations the engine times at `rows` rows of x: name -> a function (x, qweight, scales, out=y), each
    with the operand in shared memory. The fastest on an H100 (BENCHMARKS.md, twenty-fourth session): at 257-320 rows
    one program for all (256 and a tail) of 64 weight rows; 128 x 128 with one block of 64 columns a step otherwise
    (the full layers' q/k at 76 and 286 rows). Each also with 2 stages instead of 3, which fits two programs an SM
    (94 and 74 KB of shared memory), so one's MMAs can run while the other dequantizes.

    `unmeasured`: also the forms built in the twenty-fifth session, compiled and checked for sm_90 on the CPU but not
    yet run on a GPU, so kept from the engine until they are (the drop-on-failure check in triton_q4 would not catch
    one that hung): at 257-320 rows 128 weight rows a program (x read from L2 half as often) and K in two halves (for
    o and down, whose 64-row tiles are 60 programs for 132 SMs); at every row count the weights as wgmma's second
    operand (q4_gemm_wb: x read from L2 a quarter as often as with 64 weight rows a program); and at 65-128 rows
    (a 70-token frame's 76) one program for all of x's rows, 64 and a tail, as at 257-320."""
    def q4(block_m, block_n, stages, tail=0, split=1):
        return functools.partial(q4_gemm, block_m=block_m, block_n=block_n, stages=stages, sub=1, tail=tail,
                                 split=split, smem_operand=True)

    measured = {"gluon_128": q4(128, 128, 3), "gluon_128_s2": q4(128, 128, 2)}
    new = {"gluon_wb_256": functools.partial(q4_gemm_wb, block_n=256, stages=3),
           "gluon_wb_256_s2": functools.partial(q4_gemm_wb, block_n=256, stages=2),
           "gluon_wb_128": functools.partial(q4_gemm_wb, block_n=128, stages=4)}
    t = tail_for(rows)
    if t:
        measured.update({f"gluon_256_{t}": q4(256, 64, 3, t), f"gluon_256_{t}_s2": q4(256, 64, 2, t)})
        new.update({f"gluon_256_{t}_n128": q4(256, 128, 3, t), f"gluon_256_{t}_k2": q4(256, 64, 3, t, 2)})
    t = tail_for(rows, 64)
    if t:
        new.update({f"gluon_64_{t}": q4(64, 64, 3, t), f"gluon_64_{t}_n128": q4(64, 128, 3, t)})
    return {**measured, **new} if unmeasured else measured


@functools.lru_cache(maxsize=None)
def _sm90(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] == 9  # asked once per device, not per matmul


def usable(x: torch.Tensor, zeros, group: int) -> bool:
    """Whether this kernel can take x against a weight: an sm_90 GPU, bf16 x, q4_0 (group 32, no zero points)."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and zeros is None and group == 32 and x.shape[1] % 128 == 0
            and _sm90(x.device.index if x.device.index is not None else torch.cuda.current_device()))


def q4_gemm(x, qweight, scales, block_m: int, block_n: int = 64, stages: int = 3, sub: int = 2, tail: int = 0,
            split: int = 1, x_permuted=None, in_flight: int = 0, smem_operand: bool = False, out=None):
    """y [M, N] = x [M, K] (bf16) times the q4_0 weight (qweight [N, K / 2] packed as the engine packs it, scales
    [N, K / 32] fp16 or their int16 bits), into `out` where given. `x_permuted`: permuted(x) where the caller has it
    (one copy a call otherwise). A program: block_m rows of x (64, 128 or 256), block_n weight rows (64: one warp
    group, 128: two), `sub` (1 or 2) blocks of 64 columns a pipeline step, `stages` steps in flight;
    `tail` > 0: one program takes every row, block_m and `tail` after them (tail_for). `smem_operand`: the operand
    through shared memory in x's own column order (x is not permuted), its wgmmas left in flight (q4_gemm_kernel).
    `split` 2: K in two halves, one a program, added into a float32 buffer then rounded into y (for the shapes of too
    few weight tiles to fill the GPU; more parts would make the sum depend on the order the programs finish in)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    m, k = x.shape
    words = qweight.view(torch.int32)
    n = words.shape[0]
    if tail and m > block_m + tail:
        raise ValueError(f"q4_gemm: {m} rows do not fit {block_m} + a tail of {tail}")
    if split not in (1, 2):
        raise ValueError(f"q4_gemm: split must be 1 or 2, got {split}")
    if k % (sub * BLOCK_K * split) or scales.shape != (n, k // 32):
        raise ValueError(f"q4_gemm: K {k} must be a multiple of {sub * BLOCK_K * split} with scales [N, K / 32], "
                         f"got {tuple(scales.shape)}")
    xp = x if smem_operand else x_permuted if x_permuted is not None else permuted(x)
    xl, wl = layouts(block_m, block_n, sub)
    x_desc = TensorDescriptor(xp, [m, k], [k, 1], [block_m, BLOCK_K], xl)
    xt_desc = TensorDescriptor(xp, [m, k], [k, 1], [tail, BLOCK_K], layouts(tail, block_n)[0]) if tail else x_desc
    w_desc = TensorDescriptor(words, [n, k // 8], [k // 8, 1], [block_n, sub * BLOCK_K // 8], wl)
    y = out if out is not None else torch.empty(m, n, device=x.device, dtype=torch.bfloat16)
    total = torch.zeros(m, n, device=x.device, dtype=torch.float32) if split > 1 else y  # the parts added into it
    grid = ((1 if tail else triton.cdiv(m, block_m)) * triton.cdiv(n, block_n) * split, )
    q4_gemm_kernel[grid](x_desc, xt_desc, w_desc, scales.view(torch.float16), total, m, n, k, k // 32, BM=block_m,
                         BN=block_n, STAGES=stages, SUB=sub, TAIL=tail, WL=words_layout(block_n, block_n // 16),
                         PL=pairs_layout(block_n, block_n // 16), num_warps=block_n // 16, IN_FLIGHT=in_flight,
                         AL=operand_layout(block_n) if smem_operand else None, SPLIT=split)
    if split > 1:
        y.copy_(total)
    return y


def q4_gemm_wb(x, qweight, scales, block_n: int = 256, stages: int = 3, out=None):
    """y [M, N] = x [M, K] (bf16) times the q4_0 weight as q4_gemm, with the weights as wgmma's second operand
    (q4_gemm_wb_kernel): programs of 64 rows of x and `block_n` (64, 128 or 256) weight rows."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    m, k = x.shape
    words = qweight.view(torch.int32)
    n = words.shape[0]
    if k % BLOCK_K or scales.shape != (n, k // 32) or block_n not in (64, 128, 256):
        raise ValueError(f"q4_gemm_wb: K {k} must be a multiple of {BLOCK_K} with scales [N, K / 32] (got "
                         f"{tuple(scales.shape)}) and block_n 64, 128 or 256 (got {block_n})")
    xl, wl = layouts(64, block_n)
    x_desc = TensorDescriptor(x, [m, k], [k, 1], [64, BLOCK_K], xl)
    w_desc = TensorDescriptor(words, [n, k // 8], [k // 8, 1], [block_n, BLOCK_K // 8], wl)
    y = out if out is not None else torch.empty(m, n, device=x.device, dtype=torch.bfloat16)
    grid = (triton.cdiv(m, 64) * triton.cdiv(n, block_n), )
    q4_gemm_wb_kernel[grid](x_desc, w_desc, scales.view(torch.float16), y, m, n, k, k // 32, BN=block_n,
                            STAGES=stages, WL=words_layout(64, 4), PL=pairs_layout(64, 4),
                            AL=operand_layout(block_n), num_warps=4)
    return y
