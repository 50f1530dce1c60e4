"""The persistent decode kernel (gemma4_agent/engine/decode_kernel.py) against the layers' own modules: a q4_0 model's
one-token steps, one after another over a cache holding a prefix, through both layer types (a window shorter than
the context, K = V on the full layers), in Triton's interpreter with one program and on the GPU with all of them.

The reference is model.decode with each int4 layer computed as the int8-x GEMV computes it (x rounded to int8 per 32
values, the dequantized weight in float32), in float32, so that what is left between the two is summation order; a
missing norm, a wrong head or slot, a stale cache line cost > 1e-1. On the GPU also each phase of a layer at the 12B's
shape in bf16, against the modules applied to the kernel's own inputs (no error carried from phase to phase)."""
import textwrap

import pytest
import torch

pytest.importorskip("triton")

from conftest import case_errors  # noqa: E402

CASES = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from gemma4_agent.engine.decode_kernel import DecodeKernel
    from gemma4_agent.engine.fusion import join_projections
    from gemma4_agent.engine.kv_cache import StaticKVCache
    from gemma4_agent.model import ModelConfig, build_model
    from gemma4_agent.model.network import attention_mask
    from gemma4_agent.quant import triton_q4
    from gemma4_agent.quant.int4 import Int4Linear, quantize_model

    def config(head_dim, global_head_dim):
        return ModelConfig.model_validate({
            "model_type": "gemma4_unified", "boi_token_id": 290, "eoi_token_id": 291, "image_token_id": 292,
            "text_config": {"vocab_size": 300, "hidden_size": 128, "intermediate_size": 256,
                            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                            "head_dim": head_dim, "global_head_dim": global_head_dim,
                            "num_global_key_value_heads": 1, "attention_k_eq_v": True, "sliding_window": 6,
                            "final_logit_softcapping": 30.0},
            "vision_config": {"patch_size": 4, "pooling_kernel_size": 2, "mm_embed_dim": 32, "mm_posemb_size": 16,
                              "output_proj_dims": 32}})

    def int8_x_linear(self, x):
        # what the int8-x GEMV computes
        w = self.dequantize(torch.float32)
        return F.linear(triton_q4.round_x_int8(x).float(), w).to(x.dtype)

    @torch.no_grad()
    def errors(device):
        """Per step: relative error of the final hidden state and of the step's new K and V, kernel against the
        modules; and whether their logits choose the same token."""
        # float32, which the interpreter computes exactly (its bf16 rounds by truncation, ~4e-3 a rounding) and the
        # GPU too (its dot products in IEEE float32): what is left is summation order, which a random tiny model
        # magnifies from bf16's roundings to a few percent over its layers. On a GPU, the tensor cores' tile: halves
        # of a head >= 16
        dtype = torch.float32
        dims = (16, 32) if device == "cpu" else (64, 128)
        model = build_model(config(*dims), device=device, dtype=torch.float32, seed=1)
        g = torch.Generator().manual_seed(2)
        for layer in model.layers:  # norms and scalars away from 1, so that each is checked
            for norm in (layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
                         layer.post_feedforward_layernorm, layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.copy_((torch.rand(norm.weight.shape, generator=g) + 0.5).to(device))
            layer.layer_scalar.fill_(0.8)
        quantize_model(model, "q4_0", progress=False)
        model = model.to(dtype)
        model._init_rope(device)  # (float32 tables, as build_model keeps them)
        join_projections(model)
        caches = [StaticKVCache(model, 64, 16, 8, device=device, dtype=dtype) for _ in range(2)]
        ids = torch.randint(0, 290, (1, 30), generator=g).to(device)
        Int4Linear.forward = int8_x_linear
        # a prefix of 12 tokens in both caches, by the modules
        pos = torch.arange(12, device=device)
        blocks = torch.full((12,), -1, device=device)
        for cache in caches:
            cache.place({t: cache.prefix_slots(0, 12) for t in cache.capacity}, pos, blocks)
            masks = {t: attention_mask(pos, cache.slot_pos[t], blocks[None], cache.slot_block[t][None],
                                       model.windows[t]) for t in cache.capacity}
            model.decode(model.embed(ids[:, :12]), pos, masks, cache)
        kernel = DecodeKernel(model, caches[1])
        out = []
        for step in range(12, 22):  # past the sliding ring's end: its slots wrap
            pos = torch.tensor([step], device=device)
            block = torch.tensor([-1], device=device)
            h = model.embed(ids[:, step:step + 1])
            hidden = []
            for cache, run in zip(caches, ("modules", "kernel")):
                slots = {t: torch.tensor(s, device=device) for t, s in cache.ring_slot_numbers(1).items()}
                cache.place(slots, pos, block)
                masks = {t: attention_mask(pos, cache.slot_pos[t], block[None], cache.slot_block[t][None],
                                           model.windows[t]) for t in cache.capacity}
                rope = model.rope(pos, dtype)
                if run == "modules":
                    hidden.append(model.decode(h, pos, masks, cache, rope).clone())
                else:
                    hidden.append(kernel(h, masks, rope).clone())
            rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
            kv = [rel(caches[1].k[i][:, :, slots[t]], caches[0].k[i][:, :, slots[t]])
                  + rel(caches[1].v[i][:, :, slots[t]], caches[0].v[i][:, :, slots[t]])
                  for i, t in enumerate(model.layer_types)]
            same = bool(model.logits(hidden[1]).argmax() == model.logits(hidden[0]).argmax())
            out.append([step, rel(hidden[1], hidden[0]), max(kv), same])
        return out
''')


def check(rows, tolerance):
    assert len(rows) == 10
    for step, err_hidden, err_kv, same in rows:
        assert err_hidden < tolerance and err_kv < tolerance, (step, err_hidden, err_kv)
    assert sum(same for *_, same in rows) >= 9  # a bf16 flip may move a near tie


def test_decode_kernel_equals_the_modules_in_the_interpreter():
    check(case_errors(CASES, "cpu"), 1e-5)  # float32: summation order alone (2e-7 to 6e-7 seen)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_kernel_equals_the_modules_on_the_gpu():
    check(case_errors(CASES, "cuda"), 1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_decode_kernel_phases_at_the_12b_shape():
    import json

    import torch.nn.functional as F

    from gemma4_agent.engine.decode_kernel import DecodeKernel
    from gemma4_agent.engine.fusion import join_projections
    from gemma4_agent.engine.kv_cache import StaticKVCache
    from gemma4_agent.model import ModelConfig, build_model
    from gemma4_agent.model.config import PRESETS_DIR
    from gemma4_agent.model.network import add_and_norm_modules, apply_rope, attention_mask, rms_norm
    from gemma4_agent.quant.int4 import quantize_model
    from gemma4_agent.quant.triton_q4 import round_x_int8

    cfg = json.loads((PRESETS_DIR / "gemma4-12b.json").read_text())
    cfg["text_config"].update(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], vocab_size=512)
    model = build_model(ModelConfig.model_validate(cfg), device="cuda", dtype=torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    for layer in model.layers:
        layer.layer_scalar.fill_(0.8)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
                     layer.post_feedforward_layernorm, layer.self_attn.q_norm, layer.self_attn.k_norm):
            norm.weight.uniform_(0.5, 1.5, generator=g)
    quantize_model(model, "q4_0", progress=False)
    join_projections(model)
    cache = StaticKVCache(model, 1024, 608, 350, device="cuda", dtype=torch.bfloat16, slot_align=64)
    for i, (k, v) in enumerate(zip(cache.k, cache.v)):  # a cache of normed K and V, as the layers leave it
        k.copy_(rms_norm(torch.randn(k.shape, generator=g, device="cuda"), None, 1e-6))
        v.copy_(rms_norm(torch.randn(v.shape, generator=g, device="cuda"), None, 1e-6))
    for t in cache.capacity:  # a 600-token prefix and 300 tokens of a frame
        cache.slot_pos[t][:600] = torch.arange(600)
        cache.slot_pos[t][608:908] = torch.arange(600, 900)
    pos, block = torch.tensor([900], device="cuda"), torch.tensor([-1], device="cuda")
    slot = 908
    cache.place({t: torch.tensor([slot], device="cuda") for t in cache.capacity}, pos, block)
    masks = {t: attention_mask(pos, cache.slot_pos[t], block[None], cache.slot_block[t][None], model.windows[t])
             for t in cache.capacity}
    rope = model.rope(pos, torch.bfloat16)
    h = model.embed(torch.tensor([[17]], device="cuda"))
    kernel = DecodeKernel(model, cache)
    out = kernel(h, masks, rope)

    def lin(mod, x):  # as the int8-x GEMV
        return F.linear(round_x_int8(x).float(), mod.dequantize(torch.float32)).to(torch.bfloat16)

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    errors = {}
    h_res, x = h.reshape(-1), model.layers[0].input_layernorm(h.reshape(-1))
    for i, layer in enumerate(model.layers):
        attn, t = layer.self_attn, model.layer_types[i]
        d, heads, kv = attn.head_dim, attn.num_heads, attn.num_kv_heads
        if i > 0:  # the last layer's residual add and the norms, from the kernel's values
            prev = model.layers[i - 1]
            h2, x = add_and_norm_modules(kernel.hs[2 * i - 2], kernel.dn[i - 1], prev.post_feedforward_layernorm,
                                         layer.input_layernorm, prev.layer_scalar)
            errors[f"{i} residual"] = rel(kernel.hs[2 * i - 1], h2)
            h_res = kernel.hs[2 * i - 1]
        joined = attn.__dict__["joined"]
        qkv = kernel.qkv[i, :joined.out_features]
        errors[f"{i} qkv"] = rel(qkv, lin(joined, x))
        q, k = qkv[:heads * d].view(1, 1, heads, d), qkv[heads * d:(heads + kv) * d].view(1, 1, kv, d)
        v = k if attn.v_proj is None else qkv[(heads + kv) * d:].view(1, 1, kv, d)
        cos, sin = rope[t]
        q = apply_rope(attn.q_norm(q), cos, sin)[0, 0]
        errors[f"{i} k written"] = rel(cache.k[i][0, :, slot], apply_rope(attn.k_norm(k), cos, sin)[0, 0])
        errors[f"{i} v written"] = rel(cache.v[i][0, :, slot], attn.v_norm(v)[0, 0])
        scores = torch.einsum("hgd,hsd->hgs", q.view(kv, heads // kv, d).float(), cache.k[i][0].float())
        p = torch.softmax(scores.masked_fill(~masks[t].reshape(1, 1, -1), float("-inf")), -1)
        ref = torch.einsum("hgs,hsd->hgd", p, cache.v[i][0].float()).reshape(-1)
        errors[f"{i} attention"] = rel(kernel.attn[i, :heads * d], ref)
        errors[f"{i} o"] = rel(kernel.o[i], lin(attn.o_proj, kernel.attn[i, :heads * d]))
        h1, x2 = add_and_norm_modules(h_res, kernel.o[i], layer.post_attention_layernorm,
                                      layer.pre_feedforward_layernorm)
        errors[f"{i} residual after attention"] = rel(kernel.hs[2 * i], h1)
        gate, up = lin(layer.mlp.__dict__["joined"], x2).split(layer.mlp.down_proj.in_features)
        errors[f"{i} gate"] = rel(kernel.act[i], F.gelu(gate, approximate="tanh") * up)
        errors[f"{i} down"] = rel(kernel.dn[i], lin(layer.mlp.down_proj, kernel.act[i]))
    last = model.layers[-1]
    _, x_final = add_and_norm_modules(kernel.hs[-2], kernel.dn[-1], last.post_feedforward_layernorm, model.norm,
                                      last.layer_scalar)
    errors["final norm"] = rel(out.reshape(-1), x_final)
    print(json.dumps(errors))
    assert all(e < 2e-2 for e in errors.values()), errors
