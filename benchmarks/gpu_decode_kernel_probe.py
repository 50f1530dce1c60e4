"""The persistent decode kernel (engine/decode_kernel.py) at the 12B shape (48 layers, q4_0, random weights, a
901-slot context), graph-replayed ms a step per configuration; each configuration's output compared with the first's
(the L2 prefetch and eviction policy must not change a bit).

    python3 benchmarks/gpu_decode_kernel_probe.py OUT_DIR PREFETCH_BYTES:EVICT ...   e.g. 0: 1048576: 262144:evict_first
"""
import json, sys, time, os
import torch
from gemma4_agent.model import ModelConfig, build_model
from gemma4_agent.model.network import attention_mask
from gemma4_agent.quant.int4 import quantize_model
from gemma4_agent.engine.fusion import join_projections
from gemma4_agent.engine.kv_cache import StaticKVCache
out = sys.argv[1]
t0 = time.time()
def stamp(s): print(f"[{time.time()-t0:6.1f}] {s}", flush=True)
model = build_model(ModelConfig.preset("gemma4-12b"), device="cuda", dtype=torch.bfloat16)
quantize_model(model, "q4_0", include_embedding=True, progress=False)
join_projections(model)
stamp("12B q4_0 built")
cache = StaticKVCache(model, 600 + 286 + 64 + 64, 608, 286 + 64, device="cuda", dtype=torch.bfloat16, slot_align=64)
g = torch.Generator(device="cuda").manual_seed(0)
for k, v in zip(cache.k, cache.v):
    k.normal_(generator=g); v.normal_(generator=g)
npos = 900  # a frame's context: 600 prefix + 286 frame + a few decoded
for t in cache.capacity:
    cache.slot_pos[t][:600] = torch.arange(600)
    cache.slot_pos[t][608:608 + 300] = torch.arange(600, 900)
pos = torch.tensor([npos], device="cuda"); block = torch.tensor([-1], device="cuda")
slots = {t: torch.tensor([608 + 300], device="cuda") for t in cache.capacity}
cache.place(slots, pos, block)
masks = {t: attention_mask(pos, cache.slot_pos[t], block[None], cache.slot_block[t][None], model.windows[t])
         for t in cache.capacity}
rope = model.rope(pos, torch.bfloat16)
h = model.embed(torch.tensor([[17]], device="cuda"))
print({t: int(m.sum()) for t, m in masks.items()}, flush=True)
saved = [(k.clone(), v.clone()) for k, v in zip(cache.k, cache.v)]
rows = []
configs = [dict(block_n=16, block_k=2048, num_warps=8, programs_per_sm=1, prefetch_bytes=pf, evict=ev)
           for pf, ev in ((int(a.split(":")[0]), a.split(":")[1]) for a in sys.argv[2:])]
ref = None
for cfg in configs:
    for (k, v), (ks, vs) in zip(zip(cache.k, cache.v), saved):
        k.copy_(ks); v.copy_(vs)
    row = dict(cfg)
    try:
        from gemma4_agent.engine.decode_kernel import DecodeKernel
        kern = DecodeKernel(model, cache, **cfg)
        got = kern(h, masks, rope).float()
        torch.cuda.synchronize()
        if ref is None:
            ref = got.clone()
        row["equal_to_first"] = bool(torch.equal(got, ref))
        row["finite"] = bool(torch.isfinite(got).all())
        row.update(kern.kernel_info, programs=kern.programs)
        stamp(f"{cfg} first call ok: {row}")
        s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                kern(h, masks, rope)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            kern(h, masks, rope)
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(20):
                graph.replay()
            e1.record(); torch.cuda.synchronize()
            times.append(e0.elapsed_time(e1) / 20)
        row["layers_ms_per_step"] = sorted(times)[len(times) // 2]
        row["counts_zero_after"] = int(kern.counts.abs().sum()) == 0
    except Exception as exc:
        import traceback; traceback.print_exc()
        row["error"] = repr(exc)[:300]
    print(json.dumps(row), flush=True)
    rows.append(row)
    json.dump(rows, open(os.path.join(out, "dk_probe.json"), "w"), indent=1)
