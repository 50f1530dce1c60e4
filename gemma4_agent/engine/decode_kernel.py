"""A decode step's decoder layers as one persistent Triton kernel (CUDA, q4_0 weights, one token).

Why: the step as separate kernels is ~10 dependent launches a layer (GEMVs, norms, q/k/v, attention split and merge,
gate), each waiting for the one before to drain: on an H100 the 12B's step took 3.43 ms replayed where reading its
weights takes 2.28 (BENCHMARKS.md, twentieth session); ~0.8 ms of it the small kernels, ~0.45 the GEMVs' ramps and
tails. Here G programs, all resident at once, walk every layer's phases in order and hand results on through
arrival counters in memory instead of kernel boundaries; before waiting for a phase's input a program asks for its
first weights of that phase, so HBM keeps streaming while the phase before ends. Per layer:

    qkv    the joined q/k/v rows, split evenly over the programs; each first computes the layer's input norm
           (the last layer's residual add and norms, redundantly: no program of its own)      waits: all down rows
    split  items (KV head, split of the cache): q/k norms and RoPE, the new K/V written by the split whose range
           holds its slot, that split's partial softmax                                        waits: all qkv rows
    merge  items (query head): the splits merged into the attention output                    waits: all splits
    o      o_proj's rows                                                                       waits: all merges
    gu     rows of gate and up, each program first computing the residual add and both norms; gelu(gate) * up
                                                                                               waits: all o rows
    down   down_proj's rows                                                                    waits: all gu rows

The arithmetic is the separate kernels': the int8-x GEMV's (quant/triton_q4.py), the norms' (model/triton_norms.py),
q/k/v's (model/triton_qkv.py), the gate's (model/triton_gelu.py) and the split attention's, rounding where they
round. Each layer's intermediate results have buffers of their own, so that no program reads a line another SM
wrote earlier in the launch through its (incoherent) L1; the attention partials, shared by the layers, are read past
L1. The counters are zero between launches: the last program to finish resets them.

Used by the streaming session for its one-token steps where `SessionConfig.decode_kernel` is on and the model
qualifies (`supported`); tested in Triton's interpreter with one program (test_decode_kernel.py) and on the GPU.
"""
from __future__ import annotations

import math

import torch

from ..model.config import FULL, SLIDING
from ..model.triton_gelu import gelu_mul_values
from ..model.triton_norms import add_norms_values, rms_normed
from ..model.triton_qkv import normed, rotated
from ..quant import triton_q4
from ..quant.int4 import Int4Linear
from ..triton_env import rounded, tl, triton

# Constants the kernel reads as globals (Triton takes only constexpr globals). Per layer a row of the table of
# addresses and flags (int64) and a row of arrival counters.
_const = tl.constexpr if tl is not None else int
(QKV_W, QKV_S, O_W, O_S, GU_W, GU_S, DN_W, DN_S, Q_NORM, K_NORM, POST_ATTN, PRE_FF, POST_FF, NEXT_NORM, SCALAR,
 K_CACHE, V_CACHE, IS_FULL) = (_const(i) for i in range(18))
FIELDS = _const(18)
C_QKV, C_SPLIT, C_MERGE, C_O, C_GU, C_DOWN = (_const(i) for i in range(6))
COUNTERS = _const(6)
BLOCK_S = _const(32)  # cache slots an attention tile
MAX_SPLITS = 32  # of a KV head's cache: a merge reads all of them


if triton is not None:

    @triton.jit
    def _wait(ptr, target):
        # spin on the count past L1, then one acquire: what the counted programs wrote before counting is visible
        while tl.load(ptr, volatile=True) < target:
            pass
        tl.atomic_add(ptr, 0, sem="acquire")

    @triton.jit
    def _signal(ptr):
        tl.debug_barrier()  # every thread's stores issued before the count says so (release, GPU scope)
        tl.atomic_add(ptr, 1, sem="release")

    @triton.jit
    def _dot(a, b, ASM: tl.constexpr):
        # a @ b in float32 on the tensor cores, float32 operands exactly (not tf32: what the tests compare); Triton's
        # interpreter (no ASM) multiplies a bf16 dot's bit patterns, so there the operands go in as float32 (exact)
        if ASM:
            if a.dtype == tl.float32:
                return tl.dot(a, b, input_precision="ieee")
            return tl.dot(a, b)
        else:
            return tl.dot(a.to(tl.float32), b.to(tl.float32))

    @triton.jit
    def _ptr(tab, field, dtype):
        return tl.load(tab + field).to(tl.pointer_type(dtype))

    @triton.jit
    def _prefetch_rows(qw, sc, r0, r_end, K, PF: tl.constexpr, ASM: tl.constexpr):
        if PF > 0:
            triton_q4.prefetch_rows(qw, sc, r0, r_end, K, PF, ASM)

    @triton.jit
    def _rows(n, p, G):
        # this program's share of n rows: [r0, r_end), as even as G programs allow
        per = tl.cdiv(n, G)
        r0 = p * per
        return r0, tl.minimum(r0 + per, n)

    @triton.jit
    def _tile(qw, sc, r0, r_end, t, n_k, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVICT: tl.constexpr):
        # weight tile t of this program's rows, row block by row block, K block by K block (masked past r_end), as
        # triton_q4._weight_block loads it; EVICT: the loads' L2 eviction policy
        rows = r0 + (t // n_k) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = rows < r_end
        k0 = (t % n_k) * BLOCK_K
        wc = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        words = tl.load(qw + rows[:, None] * (K // 8) + wc[None, :], mask=ok[:, None] & (wc < K // 8)[None, :],
                        other=0, eviction_policy=EVICT)
        gc = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        s = tl.load(sc + rows[:, None] * (K // 32) + gc[None, :], mask=ok[:, None] & (gc < K // 32)[None, :],
                    other=0, eviction_policy=EVICT).to(tl.float32)
        return words, s, tl.zeros((BLOCK_N, BLOCK_K // 32), tl.float32) + 8.0

    @triton.jit
    def _first(qw, sc, r0, r_end, K, GATED: tl.constexpr, INTER, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               EVICT: tl.constexpr):
        # the first tile (GATED: of the gate's rows and of the up rows INTER below them), asked for before a phase's
        # wait: weights only, which nothing in the launch writes
        n_k = tl.cdiv(K, BLOCK_K)
        w, s, z = _tile(qw, sc, r0, r_end, 0, n_k, K, BLOCK_N, BLOCK_K, EVICT)
        if GATED:
            wu, su, zu = _tile(qw, sc, r0 + INTER, r_end + INTER, 0, n_k, K, BLOCK_N, BLOCK_K, EVICT)
        else:
            wu, su, zu = w, s, z
        return w, s, z, wu, su, zu

    @triton.jit
    def _gemv_rows(first, x_ptr, qw, sc, y_ptr, r0, r_end, K, GATED: tl.constexpr, INTER, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, TWO_BETA: tl.constexpr, ASM: tl.constexpr, EVICT: tl.constexpr):
        # y[r] = W[r] . x over rows [r0, r_end) (the int8-x GEMV's sums), from `first` (_first) on; GATED: y[r] =
        # gelu(gate[r] . x) * (up[r] . x), rounding as the gate kernel. Software-pipelined by hand: the next tile is
        # asked for before this one is summed, so a program keeps two tiles of loads in flight
        n_k = tl.cdiv(K, BLOCK_K)
        n_tiles = tl.cdiv(r_end - r0, BLOCK_N) * n_k
        w, s, z, wu, su, zu = first
        acc = tl.zeros((BLOCK_N, BLOCK_K // 32), tl.float32)
        acc_u = tl.zeros((BLOCK_N, BLOCK_K // 32), tl.float32)
        dtype = y_ptr.dtype.element_ty
        for t in range(0, n_tiles):
            w2, s2, z2 = _tile(qw, sc, r0, r_end, t + 1, n_k, K, BLOCK_N, BLOCK_K, EVICT)
            if GATED:
                wu2, su2, zu2 = _tile(qw, sc, r0 + INTER, r_end + INTER, t + 1, n_k, K, BLOCK_N, BLOCK_K,
                                     EVICT)
            k0 = (t % n_k) * BLOCK_K
            acc += triton_q4._q8_block(w, s, z, x_ptr, k0, K, False, BLOCK_N, BLOCK_K, 32, ASM)
            if GATED:
                acc_u += triton_q4._q8_block(wu, su, zu, x_ptr, k0, K, False, BLOCK_N, BLOCK_K, 32, ASM)
            if t % n_k == n_k - 1:  # the row block's last K block: its outputs
                rows = r0 + (t // n_k) * BLOCK_N + tl.arange(0, BLOCK_N)
                y = tl.sum(acc, axis=1)
                if GATED:
                    y = gelu_mul_values(rounded(y, dtype), rounded(tl.sum(acc_u, axis=1), dtype), dtype, TWO_BETA)
                tl.store(y_ptr + rows, y.to(dtype), mask=rows < r_end)
                acc = tl.zeros((BLOCK_N, BLOCK_K // 32), tl.float32)
                acc_u = tl.zeros((BLOCK_N, BLOCK_K // 32), tl.float32)
            w, s, z = w2, s2, z2
            if GATED:
                wu, su, zu = wu2, su2, zu2

    @triton.jit
    def _gemv_phase(x_ptr, qw, sc, y_ptr, N, K, p, G, wait_ptr, target, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, ASM: tl.constexpr, EVICT: tl.constexpr):
        # y[r] = W[r] . x for this program's rows, after the count at wait_ptr reaches target
        r0, r_end = _rows(N, p, G)
        first = _first(qw, sc, r0, r_end, K, False, 0, BLOCK_N, BLOCK_K, EVICT)
        _wait(wait_ptr, target)
        _gemv_rows(first, x_ptr, qw, sc, y_ptr, r0, r_end, K, False, 0, BLOCK_N, BLOCK_K, 1.0, ASM, EVICT)

    @triton.jit
    def _norms_into(x_out, h_ptr, y_ptr, w_post, w_pre, scale_ptr, h_out, n, eps, FIRST: tl.constexpr,
                    HAS_SCALE: tl.constexpr, WRITE_H, HIDDEN_PAD: tl.constexpr):
        # x_out = pre(h + post(y) [* scale]), as the add_norms kernel; FIRST: pre(h) alone (layer 0's input norm).
        # The new residual goes to h_out where WRITE_H (one program; the others compute the same values)
        cols = tl.arange(0, HIDDEN_PAD)
        ok = cols < n
        dtype = x_out.dtype.element_ty
        h = tl.load(h_ptr + cols, mask=ok, other=0).to(tl.float32)
        w_pre_v = tl.load(w_pre + cols, mask=ok, other=0).to(tl.float32)
        if FIRST:
            x = rms_normed(h, w_pre_v, n, eps)
        else:
            y = tl.load(y_ptr + cols, mask=ok, other=0).to(tl.float32)
            w_post_v = tl.load(w_post + cols, mask=ok, other=0).to(tl.float32)
            scale = tl.load(scale_ptr).to(tl.float32) if HAS_SCALE else 1.0
            h_new, x = add_norms_values(h, y, w_post_v, w_pre_v, scale, n, eps, eps, HAS_SCALE, dtype)
            if WRITE_H:
                tl.store(h_out + cols, h_new.to(dtype), mask=ok)
        tl.debug_barrier()  # the threads of this program are done reading the x before (same buffer)
        tl.store(x_out + cols, x.to(dtype), mask=ok)
        tl.debug_barrier()  # and see each other's x

    @triton.jit
    def _split_item(item, tab, qkv_row, cos_ptr, sin_ptr, mask_ptr, slot_ptr, S, SPLITS, split_len, acc_ptr, ml_ptr,
                    eps, H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr, R_PAD: tl.constexpr,
                    K_EQ_V: tl.constexpr, dtype: tl.constexpr, ASM: tl.constexpr):
        # (KV head j, split sp): scores of the j's query heads over the split's slots, a masked online softmax and
        # its share of p v in float32, as triton_attention's split kernel, the rows and the head's dims in halves
        R: tl.constexpr = H // KV
        j = item // SPLITS
        sp = item % SPLITS
        half = tl.arange(0, D // 2)
        r = tl.arange(0, R_PAD)
        q_rows = qkv_row + (j * R + tl.minimum(r, R - 1))[:, None] * D  # padding rows repeat the last (not stored)
        y1, y2 = normed(q_rows, _ptr(tab, Q_NORM, dtype), eps, True, D)
        q1, q2 = rotated(y1, y2, cos_ptr, sin_ptr, dtype, D)
        kc = _ptr(tab, K_CACHE, dtype) + j * S * D
        vc = _ptr(tab, V_CACHE, dtype) + j * S * D
        slot = tl.load(slot_ptr)
        start = sp * split_len
        if (slot >= start) & (slot < start + split_len):  # this split holds the new token's slot: write its K/V
            k_row = qkv_row + H * D + j * D
            k1, k2 = normed(k_row, _ptr(tab, K_NORM, dtype), eps, True, D)
            k1, k2 = rotated(k1, k2, cos_ptr, sin_ptr, dtype, D)
            tl.store(kc + slot * D + half, k1)
            tl.store(kc + slot * D + D // 2 + half, k2)
            v_row = k_row if K_EQ_V else qkv_row + H * D + KV * D + j * D
            v1, v2 = normed(v_row, k_row, eps, False, D)
            tl.store(vc + slot * D + half, v1.to(dtype))
            tl.store(vc + slot * D + D // 2 + half, v2.to(dtype))
        tl.debug_barrier()  # (a block's own global stores are visible to it after the barrier)
        m_i = tl.full((R_PAD,), float("-inf"), tl.float32)
        l_i = tl.zeros((R_PAD,), tl.float32)
        acc1 = tl.zeros((R_PAD, D // 2), tl.float32)
        acc2 = tl.zeros((R_PAD, D // 2), tl.float32)
        for s0 in range(start, start + split_len, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            s_ok = s < S
            k1 = tl.load(kc + s[:, None] * D + half[None, :], mask=s_ok[:, None], other=0)
            k2 = tl.load(kc + s[:, None] * D + D // 2 + half[None, :], mask=s_ok[:, None], other=0)
            scores = _dot(q1, tl.trans(k1), ASM) + _dot(q2, tl.trans(k2), ASM)
            allowed = tl.load(mask_ptr + s, mask=s_ok, other=0)
            scores = tl.where(allowed[None, :] != 0, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing allowed yet: keep zeros, not NaN
            alpha = tl.exp(m_i - m_safe)
            pr = tl.exp(scores - m_safe[:, None])
            v1 = tl.load(vc + s[:, None] * D + half[None, :], mask=s_ok[:, None], other=0)
            v2 = tl.load(vc + s[:, None] * D + D // 2 + half[None, :], mask=s_ok[:, None], other=0)
            l_i = l_i * alpha + tl.sum(pr, axis=1)
            acc1 = acc1 * alpha[:, None] + _dot(pr.to(dtype), v1, ASM)
            acc2 = acc2 * alpha[:, None] + _dot(pr.to(dtype), v2, ASM)
            m_i = m_new
        base = (j * SPLITS + sp) * R_PAD + r
        ok = r < R
        tl.store(acc_ptr + base[:, None] * D + half[None, :], acc1, mask=ok[:, None])
        tl.store(acc_ptr + base[:, None] * D + D // 2 + half[None, :], acc2, mask=ok[:, None])
        tl.store(ml_ptr + base * 2, m_i, mask=ok)
        tl.store(ml_ptr + base * 2 + 1, l_i, mask=ok)

    @triton.jit
    def _merge_item(hq, attn_row, acc_ptr, ml_ptr, SPLITS, H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr,
                    R_PAD: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
        # query head hq: its splits' partial sums rescaled to their common maximum, as the merge kernel; partials
        # read past L1 (the layers share their buffer)
        R: tl.constexpr = H // KV
        sp = tl.arange(0, BLOCK_SPLITS)
        sp_ok = sp < SPLITS
        rows = ((hq // R) * SPLITS + sp) * R_PAD + hq % R
        m = tl.load(ml_ptr + rows * 2, mask=sp_ok, other=float("-inf"), cache_modifier=".cg")
        lsum = tl.load(ml_ptr + rows * 2 + 1, mask=sp_ok, other=0, cache_modifier=".cg")
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - tl.max(m, axis=0)))
        total = tl.sum(lsum * w, axis=0)
        for d0 in tl.static_range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            acc = tl.load(acc_ptr + rows[:, None] * D + d[None, :], mask=sp_ok[:, None], other=0, cache_modifier=".cg")
            out = tl.sum(acc * w[:, None], axis=0) / total
            tl.store(attn_row + hq * D + d, out.to(attn_row.dtype.element_ty))

    @triton.jit
    def _attention(L, p, G, tab, cnt, qkv_row, attn_row, cos_ptr, sin_ptr, mask_ptr, slot_ptr, S, SPLITS,
                   split_len, acc_ptr, ml_ptr, eps, H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr,
                   R_PAD: tl.constexpr, K_EQ_V: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
                   dtype: tl.constexpr, ASM: tl.constexpr):
        for item in range(p, KV * SPLITS, G):
            _wait(cnt + C_QKV, G)
            _split_item(item, tab, qkv_row, cos_ptr, sin_ptr, mask_ptr, slot_ptr, S, SPLITS, split_len, acc_ptr,
                        ml_ptr, eps, H, KV, D, R_PAD, K_EQ_V, dtype, ASM)
            _signal(cnt + C_SPLIT)
        for hq in range(p, H, G):
            _wait(cnt + C_SPLIT, KV * SPLITS)
            _merge_item(hq, attn_row, acc_ptr, ml_ptr, SPLITS, H, KV, D, R_PAD, BLOCK_SPLITS, BLOCK_D)
            _signal(cnt + C_MERGE)

    @triton.jit
    def _decode_layers_kernel(
            tab_ptr, cnt_ptr, h_in, w_in0, out_ptr, xs_ptr, hs_ptr, qkv_ptr, attn_ptr, o_ptr, act_ptr, dn_ptr,
            acc_ptr, ml_ptr, mask_s, mask_f, cos_s, sin_s, cos_f, sin_f, slot_s, slot_f,
            S_S, S_F, SPLITS_S, SPLITS_F, LEN_S, LEN_F, NL, HIDDEN, INTER, QKV_MAX, ATT_MAX, eps, G,
            H: tl.constexpr, KV_S: tl.constexpr, KV_F: tl.constexpr, D_S: tl.constexpr, D_F: tl.constexpr,
            R_PAD_S: tl.constexpr, R_PAD_F: tl.constexpr, K_EQ_V_S: tl.constexpr, K_EQ_V_F: tl.constexpr,
            HIDDEN_PAD: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_D_S: tl.constexpr, BLOCK_D_F: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TWO_BETA: tl.constexpr, ASM: tl.constexpr,
            PF: tl.constexpr = 0, EVICT: tl.constexpr = ""):
        p = tl.program_id(0)
        dtype = out_ptr.dtype.element_ty
        x_mine = xs_ptr + p * HIDDEN_PAD  # this program's copy of the layer's normed input
        for L in range(0, NL):
            tab = tab_ptr + L * FIELDS
            cnt = cnt_ptr + L * COUNTERS
            full = tl.load(tab + IS_FULL) != 0
            qkv_row = qkv_ptr + L * QKV_MAX
            attn_row = attn_ptr + L * ATT_MAX
            # --- q/k/v, after the last layer's residual add and norms (layer 0: its input norm of the embedding)
            n_qkv = tl.where(full, H * D_F + (1 if K_EQ_V_F else 2) * KV_F * D_F,
                             H * D_S + (1 if K_EQ_V_S else 2) * KV_S * D_S)
            qw = _ptr(tab, QKV_W, tl.int32)
            sc = _ptr(tab, QKV_S, tl.float16)
            r0, r_end = _rows(n_qkv, p, G)
            first = _first(qw, sc, r0, r_end, HIDDEN, False, 0, BLOCK_N, BLOCK_K, EVICT)
            o_k = tl.where(full, H * D_F, H * D_S)
            o0, o_end = _rows(HIDDEN, p, G)
            _prefetch_rows(_ptr(tab, O_W, tl.int32), _ptr(tab, O_S, tl.float16), o0, o_end, o_k, PF, ASM)
            if L == 0:
                _norms_into(x_mine, h_in, h_in, w_in0, w_in0, w_in0, h_in, HIDDEN, eps, True, False, False,
                            HIDDEN_PAD)
            else:
                prev = tab - FIELDS
                _wait(cnt - COUNTERS + C_DOWN, G)
                _norms_into(x_mine, hs_ptr + (2 * L - 2) * HIDDEN, dn_ptr + (L - 1) * HIDDEN,
                            _ptr(prev, POST_FF, dtype), _ptr(prev, NEXT_NORM, dtype), _ptr(prev, SCALAR, dtype),
                            hs_ptr + (2 * L - 1) * HIDDEN, HIDDEN, eps, False, True, p == 0, HIDDEN_PAD)
            _gemv_rows(first, x_mine, qw, sc, qkv_row, r0, r_end, HIDDEN, False, 0, BLOCK_N, BLOCK_K, TWO_BETA, ASM,
                       EVICT)
            _signal(cnt + C_QKV)
            # --- attention: splits, then merges
            if full:
                _attention(L, p, G, tab, cnt, qkv_row, attn_row, cos_f, sin_f, mask_f, slot_f, S_F, SPLITS_F, LEN_F,
                           acc_ptr, ml_ptr, eps, H, KV_F, D_F, R_PAD_F, K_EQ_V_F, BLOCK_SPLITS, BLOCK_D_F, dtype, ASM)
            else:
                _attention(L, p, G, tab, cnt, qkv_row, attn_row, cos_s, sin_s, mask_s, slot_s, S_S, SPLITS_S, LEN_S,
                           acc_ptr, ml_ptr, eps, H, KV_S, D_S, R_PAD_S, K_EQ_V_S, BLOCK_SPLITS, BLOCK_D_S, dtype, ASM)
            # --- o (gate/up's rows asked into L2 first)
            g0, g_end = _rows(INTER, p, G)
            _prefetch_rows(_ptr(tab, GU_W, tl.int32), _ptr(tab, GU_S, tl.float16), g0, g_end, HIDDEN, PF, ASM)
            _prefetch_rows(_ptr(tab, GU_W, tl.int32), _ptr(tab, GU_S, tl.float16), g0 + INTER, g_end + INTER, HIDDEN,
                           PF, ASM)
            _gemv_phase(attn_row, _ptr(tab, O_W, tl.int32), _ptr(tab, O_S, tl.float16), o_ptr + L * HIDDEN, HIDDEN,
                        tl.where(full, H * D_F, H * D_S), p, G, cnt + C_MERGE, H, BLOCK_N, BLOCK_K, ASM, EVICT)
            _signal(cnt + C_O)
            # --- gate and up: rows r of each, after the residual add and both norms; gelu(gate) * up
            qw = _ptr(tab, GU_W, tl.int32)
            sc = _ptr(tab, GU_S, tl.float16)
            r0, r_end = _rows(INTER, p, G)
            first = _first(qw, sc, r0, r_end, HIDDEN, True, INTER, BLOCK_N, BLOCK_K, EVICT)
            d0, d_end = _rows(HIDDEN, p, G)
            _prefetch_rows(_ptr(tab, DN_W, tl.int32), _ptr(tab, DN_S, tl.float16), d0, d_end, INTER, PF, ASM)
            _wait(cnt + C_O, G)
            h_res = h_in if L == 0 else hs_ptr + (2 * L - 1) * HIDDEN
            _norms_into(x_mine, h_res, o_ptr + L * HIDDEN, _ptr(tab, POST_ATTN, dtype), _ptr(tab, PRE_FF, dtype),
                        h_res, hs_ptr + 2 * L * HIDDEN, HIDDEN, eps, False, False, p == 0, HIDDEN_PAD)
            _gemv_rows(first, x_mine, qw, sc, act_ptr + L * INTER, r0, r_end, HIDDEN, True, INTER, BLOCK_N, BLOCK_K,
                       TWO_BETA, ASM, EVICT)
            _signal(cnt + C_GU)
            # --- down (the next layer's q/k/v rows asked into L2 first)
            if L + 1 < NL:
                nxt = tab + FIELDS
                n_next = tl.where(tl.load(nxt + IS_FULL) != 0, H * D_F + (1 if K_EQ_V_F else 2) * KV_F * D_F,
                                  H * D_S + (1 if K_EQ_V_S else 2) * KV_S * D_S)
                q0, q_end = _rows(n_next, p, G)
                _prefetch_rows(_ptr(nxt, QKV_W, tl.int32), _ptr(nxt, QKV_S, tl.float16), q0, q_end, HIDDEN, PF, ASM)
            _gemv_phase(act_ptr + L * INTER, _ptr(tab, DN_W, tl.int32), _ptr(tab, DN_S, tl.float16),
                        dn_ptr + L * HIDDEN, HIDDEN, INTER, p, G, cnt + C_GU, G, BLOCK_N, BLOCK_K, ASM, EVICT)
            _signal(cnt + C_DOWN)
        # the last layer's residual add and the final norm, by one program
        if p == 0:
            last = tab_ptr + (NL - 1) * FIELDS
            _wait(cnt_ptr + (NL - 1) * COUNTERS + C_DOWN, G)
            _norms_into(out_ptr, hs_ptr + (2 * NL - 2) * HIDDEN, dn_ptr + (NL - 1) * HIDDEN,
                        _ptr(last, POST_FF, dtype), _ptr(last, NEXT_NORM, dtype), _ptr(last, SCALAR, dtype),
                        hs_ptr + (2 * NL - 1) * HIDDEN, HIDDEN, eps, False, True, False, HIDDEN_PAD)
        # the last program out sets every count back to zero for the next launch
        if tl.atomic_add(cnt_ptr + NL * COUNTERS, 1, sem="acq_rel") == G - 1:
            for c0 in range(0, NL * COUNTERS + 1, 1024):
                c = c0 + tl.arange(0, 1024)
                tl.store(cnt_ptr + c, tl.zeros((1024,), tl.int32), mask=c < NL * COUNTERS + 1)


def _joined(owner) -> Int4Linear | None:
    return owner.__dict__.get("joined")


def _q4_0(mod) -> bool:
    return (isinstance(mod, Int4Linear) and mod.scheme == "q4_0" and mod.zeros is None and mod.input_scale is None
            and not mod.__dict__.get("_released"))


def supported(model, device: torch.device) -> str | None:
    """None where the persistent kernel can run this model's decode step on `device`; otherwise why not."""
    if triton is None:
        return "Triton is not installed"
    if device.type != "cuda":
        return "it runs on CUDA only"
    if torch.cuda.get_device_capability(device)[0] < 8:
        return "it needs a GPU of compute capability 8.0 or later (tensor-core dot products)"
    text = model.config.text_config
    for i, layer in enumerate(model.layers):
        mods = [_joined(layer.self_attn), layer.self_attn.o_proj, _joined(layer.mlp), layer.mlp.down_proj]
        if not all(_q4_0(m) for m in mods):
            return f"layer {i}'s projections are not all joined q4_0 int4 layers (quantize with --scheme q4_0)"
        if layer.input_layernorm.weight.dtype != torch.bfloat16:
            return "it runs bf16 activations only"
        if text.layer(i).head_dim < 32:
            return "heads narrower than 32 values (the tensor cores' smallest tile in halves of a head)"
    if text.hidden_size % 32 or text.intermediate_size % 32:
        return "hidden and intermediate sizes must be multiples of 32 (q4_0 groups)"
    return None


class DecodeKernel:
    """The persistent kernel bound to a model and its KV cache: every buffer and the table of addresses made once
    (CUDA-graph safe), then `__call__(h, masks, rope)` per one-token step -> the final-normed hidden state, as
    model.decode gives it. Joined projections (engine/fusion.py) are required: the session joins them on CUDA."""

    def __init__(self, model, cache, block_n: int = 16, block_k: int = 2048, num_warps: int = 8,
                 programs_per_sm: int = 1, max_registers: int | None = None, prefetch_bytes: int = 0,
                 evict: str = ""):
        text = model.config.text_config
        self.model, self.cache = model, cache
        self.device = torch.device(cache.device)
        dtype = model.layers[0].input_layernorm.weight.dtype
        self.n_layers, self.hidden, self.inter = len(model.layers), text.hidden_size, text.intermediate_size
        self.heads, self.eps = text.num_attention_heads, text.rms_norm_eps
        self.meta = dict(block_n=block_n, block_k=block_k, num_warps=num_warps, prefetch_bytes=prefetch_bytes,
                         evict=evict)
        # launch options: a register cap lets more programs share an SM (at the price of spills)
        self.launch = dict(num_warps=num_warps, **({"maxnreg": max_registers} if max_registers else {}))
        self.programs_per_sm = programs_per_sm
        specs = {t: text.layer(model.layer_types.index(t)) for t in set(model.layer_types)}
        specs.setdefault(SLIDING, specs.get(FULL))
        specs.setdefault(FULL, specs[SLIDING])
        self.specs = specs
        self._keep = []  # tensors whose addresses the table holds (layer scalars in the activation dtype)
        rows = []
        for i, layer in enumerate(model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            nxt = model.layers[i + 1].input_layernorm if i + 1 < self.n_layers else model.norm
            scalar = layer.layer_scalar.to(dtype)
            self._keep.append(scalar)
            mods = (_joined(attn), attn.o_proj, _joined(mlp), mlp.down_proj)
            ptrs = [t.data_ptr() for m in mods for t in (m.qweight, m.scales)]
            ptrs += [w.data_ptr() for w in (attn.q_norm.weight, attn.k_norm.weight, layer.post_attention_layernorm.weight,
                                            layer.pre_feedforward_layernorm.weight,
                                            layer.post_feedforward_layernorm.weight, nxt.weight, scalar)]
            ptrs += [cache.k[i].data_ptr(), cache.v[i].data_ptr(), int(model.layer_types[i] == FULL)]
            rows.append(ptrs)
        self.table = torch.tensor(rows, dtype=torch.int64, device=self.device)
        self.w_in0 = model.layers[0].input_layernorm.weight
        self.programs = 1 if self.device.type == "cpu" else None  # on CUDA: from the kernel's occupancy (first call)
        self.dtype = dtype
        self._buffers(dtype)

    def _buffers(self, dtype) -> None:
        dev, nl, heads = self.device, self.n_layers, self.heads
        self.hidden_pad = triton.next_power_of_2(self.hidden)
        qkv = [heads * s.head_dim + (1 if s.k_eq_v else 2) * s.num_kv_heads * s.head_dim for s in self.specs.values()]
        self.qkv_max, self.att_max = max(qkv), max(heads * s.head_dim for s in self.specs.values())
        new = lambda *shape, dt=dtype: torch.zeros(shape, device=dev, dtype=dt)  # noqa: E731
        self.hs, self.out = new(2 * nl, self.hidden), new(self.hidden)
        self.qkv, self.attn = new(nl, self.qkv_max), new(nl, self.att_max)
        self.o, self.act, self.dn = new(nl, self.hidden), new(nl, self.inter), new(nl, self.hidden)
        self.counts = new(nl * COUNTERS + 1, dt=torch.int32)
        self.xs = None  # [programs, hidden_pad], once the program count is known

    def _split_plan(self, t: str, programs: int) -> tuple[int, int, int]:
        """(splits, slots a split, rows padded) of layer type t's attention: about one split a program."""
        spec, slots = self.specs[t], self.cache.capacity[t]
        splits = max(1, min(MAX_SPLITS, programs // spec.num_kv_heads, -(-slots // int(BLOCK_S))))
        length = -(-(-(-slots // splits)) // int(BLOCK_S)) * int(BLOCK_S)
        return -(-slots // length), length, max(16, triton.next_power_of_2(self.heads // spec.num_kv_heads))

    def _args(self, h, masks, rope, programs: int):
        plans = {t: self._split_plan(t, programs) for t in (SLIDING, FULL)}
        if self.xs is None or self.xs.shape[0] != programs:
            self.xs = torch.zeros(programs, self.hidden_pad, device=self.device, dtype=self.dtype)
            spec = lambda t: self.specs[t]  # noqa: E731
            size = max(spec(t).num_kv_heads * plans[t][0] * plans[t][2] * spec(t).head_dim for t in plans)
            self.acc = torch.zeros(size, device=self.device, dtype=torch.float32)
            self.ml = torch.zeros(2 * size, device=self.device, dtype=torch.float32)
        per_type = {}
        for t in (SLIDING, FULL):
            tt = t if t in masks else next(iter(masks))  # a model with one layer type: the other's are never read
            cos, sin = rope[tt]
            per_type[t] = (masks[tt].reshape(-1, masks[tt].shape[-1])[-1], cos[-1], sin[-1],
                           self.cache.cur_slots[tt][-1:], self.cache.capacity[tt])
        (ms, cs, ss, sls, S_s), (mf, cf, sf, slf, S_f) = per_type[SLIDING], per_type[FULL]
        sp = self.specs
        args = (self.table, self.counts, h.reshape(-1), self.w_in0, self.out, self.xs, self.hs, self.qkv, self.attn,
                self.o, self.act, self.dn, self.acc, self.ml, ms, mf, cs, ss, cf, sf, sls, slf,
                S_s, S_f, plans[SLIDING][0], plans[FULL][0], plans[SLIDING][1], plans[FULL][1],
                self.n_layers, self.hidden, self.inter, self.qkv_max, self.att_max, self.eps, programs)
        const = dict(H=self.heads, KV_S=sp[SLIDING].num_kv_heads, KV_F=sp[FULL].num_kv_heads,
                     D_S=sp[SLIDING].head_dim, D_F=sp[FULL].head_dim, R_PAD_S=plans[SLIDING][2],
                     R_PAD_F=plans[FULL][2], K_EQ_V_S=sp[SLIDING].k_eq_v, K_EQ_V_F=sp[FULL].k_eq_v,
                     HIDDEN_PAD=self.hidden_pad,
                     BLOCK_SPLITS=triton.next_power_of_2(max(plans[SLIDING][0], plans[FULL][0])),
                     BLOCK_D_S=min(64, sp[SLIDING].head_dim), BLOCK_D_F=min(64, sp[FULL].head_dim),
                     BLOCK_N=self.meta["block_n"], BLOCK_K=self.meta["block_k"],
                     TWO_BETA=2 * math.sqrt(2 / math.pi), ASM=self.device.type == "cuda",
                     PF=self.meta["prefetch_bytes"], EVICT=self.meta["evict"])
        return args, const

    def _resident_programs(self, h, masks, rope) -> int:
        """Programs that fit on the GPU at once (all must: they wait for each other), at most programs_per_sm an
        SM, from the compiled kernel's registers and shared memory."""
        props = torch.cuda.get_device_properties(self.device)
        sms = props.multi_processor_count
        args, const = self._args(h, masks, rope, sms * self.programs_per_sm)
        kernel = _decode_layers_kernel.warmup(*args, grid=(1,), **self.launch, **const)
        kernel._init_handles()
        warps = self.meta["num_warps"]
        regs_per_warp = -(-kernel.n_regs * 32 // 256) * 256
        fit = min(getattr(props, "regs_per_multiprocessor", 65536) // max(1, warps * regs_per_warp),
                  props.max_threads_per_multi_processor // (32 * warps),
                  getattr(props, "shared_memory_per_multiprocessor", 233472) // max(1, kernel.metadata.shared + 1024),
                  32)
        if fit < 1:
            raise RuntimeError(f"the decode kernel does not fit an SM ({kernel.n_regs} registers a thread, "
                               f"{kernel.metadata.shared} bytes of shared memory)")
        self.kernel_info = dict(n_regs=kernel.n_regs, n_spills=kernel.n_spills, shared=kernel.metadata.shared, fit=fit)
        return sms * min(fit, self.programs_per_sm)

    @torch.no_grad()
    def __call__(self, h: torch.Tensor, masks: dict, rope: dict) -> torch.Tensor:
        """h [1, 1, hidden] (the embedded token), each layer type's mask [.., 1, slots] and (cos, sin) [1, D] for
        the token, the cache's slots placed (StaticKVCache.place) -> final-normed hidden [1, 1, hidden]; the
        token's K/V written into the cache."""
        if self.programs is None:
            self.programs = self._resident_programs(h, masks, rope)
        args, const = self._args(h, masks, rope, self.programs)
        _decode_layers_kernel[(self.programs,)](*args, **self.launch, **const)
        return self.out.view(1, 1, -1)
