"""q4_0 is GGUF Q4_0 bit for bit: a line-by-line port of ggml's quantize_row_q4_0_ref / dequantize_row_q4_0
in numpy float32 is the oracle (block bytes, fp16 d bits, dequantized values)."""
import numpy as np
import pytest
import torch

from gemma4_agent.quant.int4 import dequantize, pack_nibbles, quantize_q4_0, to_gguf_q4_0, unpack_nibbles

QK4_0 = 32


def ggml_quantize_row_q4_0_ref(x: np.ndarray) -> bytes:
    """ggml-quants.c quantize_row_q4_0_ref: per block, fp16 d then 16 bytes qs (q[j] | q[j + 16] << 4)."""
    assert x.dtype == np.float32 and x.size % QK4_0 == 0
    out = bytearray()
    for i in range(x.size // QK4_0):
        block = x[i * QK4_0:(i + 1) * QK4_0]
        amax = np.float32(0.0)
        mx = np.float32(0.0)
        for j in range(QK4_0):
            v = block[j]
            if amax < np.abs(v):
                amax = np.abs(v)
                mx = v
        d = np.float32(mx / np.float32(-8))
        idv = np.float32(np.float32(1.0) / d) if d != 0 else np.float32(0.0)
        out += np.float16(d).tobytes()
        for j in range(QK4_0 // 2):
            x0 = np.float32(block[j] * idv)
            x1 = np.float32(block[QK4_0 // 2 + j] * idv)
            xi0 = min(15, int(np.float32(x0 + np.float32(8.5))))  # (int8_t) truncates toward zero
            xi1 = min(15, int(np.float32(x1 + np.float32(8.5))))
            out.append(xi0 | (xi1 << 4))
    return bytes(out)


def ggml_dequantize_row_q4_0(blocks: bytes, k: int) -> np.ndarray:
    y = np.empty(k, np.float32)
    raw = np.frombuffer(blocks, np.uint8).reshape(-1, 18)
    for i, b in enumerate(raw):
        d = np.float32(b[:2].copy().view(np.float16)[0])
        for j in range(QK4_0 // 2):
            x0 = int(b[2 + j] & 0x0F) - 8
            x1 = int(b[2 + j] >> 4) - 8
            y[i * QK4_0 + j] = np.float32(x0) * d
            y[i * QK4_0 + j + QK4_0 // 2] = np.float32(x1) * d
    return y


def _cases():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 256, generator=gen)
    w[0, :32] = 0.0  # all-zero group
    w[1, 32:64] = -0.0  # all negative-zero group
    w[2, :32] = 0.0
    w[2, 5] = 3.0  # single large positive value, rest zero
    w[3, 64:96] *= 0.01
    w[3, 70] = -5.0  # single large negative value among small ones
    w[4, 96:128] = 1.0  # ties: first occurrence of max |x| wins
    w[4, 100] = -1.0
    w[5, 128:160] = torch.linspace(-4, 4, 32)  # +-4 tie between first and last
    w[6] *= 1e-6  # tiny scales (fp16 subnormal d)
    w[7] *= 300.0  # large values
    yield "edge", w
    yield "randn", torch.randn(16, 512, generator=gen)
    yield "heavy_tail", torch.randn(4, 256, generator=gen) ** 3
    yield "bf16", torch.randn(4, 128, generator=gen).to(torch.bfloat16)


@pytest.mark.parametrize("name,w", list(_cases()))
def test_q4_0_matches_ggml_bit_for_bit(name, w):
    q, d = quantize_q4_0(w)
    ours = to_gguf_q4_0(pack_nibbles(q), d)
    ref = ggml_quantize_row_q4_0_ref(w.float().reshape(-1).numpy())
    assert ours == ref, f"{name}: block bytes differ"
    deq_ref = ggml_dequantize_row_q4_0(ref, w.numel()).reshape(w.shape)
    deq = dequantize(pack_nibbles(q), d, None, 32).numpy()
    assert deq.tobytes() == deq_ref.tobytes(), f"{name}: dequantized values differ"


def test_all_zero_group_and_packing():
    w = torch.zeros(2, 64)
    q, d = quantize_q4_0(w)
    assert (q == 8).all() and (d == 0).all()
    assert torch.equal(dequantize(pack_nibbles(q), d, None, 32), w)
    r = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(r)), r)
    assert pack_nibbles(r).shape == (3, 32)


def test_single_large_value_is_exact():
    for big in (7.25, -7.25):
        w = torch.zeros(1, 32)
        w[0, 3] = big
        q, d = quantize_q4_0(w)
        deq = dequantize(pack_nibbles(q), d, None, 32)
        assert deq[0, 3] == big and (deq[0, torch.arange(32) != 3] == 0).all()
        assert q[0, 3] == 0  # the extreme maps to -8 * d
