"""Temporary: hyper-parameter sweep for the demo model (not shipped). One data set, variants in parallel."""
import json
import math
import multiprocessing as mp
import os
import sys
import time
import traceback
from pathlib import Path

import torch


def run_variant(v, examples, tokenizer, out, device, frames_eps, loop_eps):
    from gemma4_agent.model.config import ModelConfig
    from gemma4_agent.demo.config import demo_config_json
    from gemma4_agent.demo.train import init_model, train
    from gemma4_agent.demo.evaluate import frame_agreement, closed_loop
    torch.set_num_threads(1)
    name = v["name"]
    try:
        t0 = time.time()
        cj = demo_config_json(tokenizer.get_vocab_size(), hidden=v.get("hidden", 128), layer_types=v.get("layers"),
                              intermediate=v.get("inter"), mm_embed=v.get("mm", 128))
        cfg = ModelConfig.model_validate(cj)
        model = init_model(cfg, v.get("seed", 0)).to(device)
        stats = train(model, examples, v.get("steps", 2600), v.get("batch", 32), v.get("lr", 2e-3), v.get("seed", 0),
                      time.monotonic() + v.get("max_train_s", 300), False, device)
        t1 = time.time()
        res = {"variant": v, "params": model.num_parameters(), "train_s": round(t1 - t0, 1),
               "final_loss": stats["final_loss"], "steps_done": stats["steps_done"], "curve": stats["loss_curve"][::4]}
        res["frames"] = frame_agreement(model, tokenizer, frames_eps, 9000)
        t2 = time.time()
        res["closed_loop"] = closed_loop(model, tokenizer, loop_eps, 7)
        res["eval_s"] = round(time.time() - t1, 1)
        print(json.dumps(res), flush=True)
        (Path(out) / f"{name}.json").write_text(json.dumps(res, indent=1))
        if v.get("save"):
            from gemma4_agent.engines.torch_engine import write_torch_engine
            write_torch_engine(Path(out) / name, model=model.cpu(), config_json=cj, tokenizer=tokenizer, name="demo")
    except Exception:
        traceback.print_exc()
        print(f"variant {name} failed", flush=True)


def main():
    spec = json.loads(sys.argv[1])
    out = Path(spec.get("out", os.environ.get("OUT", "/tmp/sweep")))
    out.mkdir(parents=True, exist_ok=True)
    from gemma4_agent.demo.tokenizer import build_tokenizer
    from gemma4_agent.demo.data import collect, PerturbConfig, train_world_seed
    from gemma4_agent.demo.train import Examples
    from gemma4_agent.actions.spec import load_action_spec
    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    aspec = load_action_spec()
    t0 = time.time()
    seeds = [train_world_seed(0, i) for i in range(spec["episodes"])]
    perturb = PerturbConfig(**spec.get("perturb", {})) if spec.get("perturb", {}) is not None else None
    frames = collect(seeds, perturb, rng_seed=0, jpeg_prob=spec.get("jpeg", 0.3), workers=spec.get("workers", 14))
    print(f"collected {len(frames)} frames in {time.time() - t0:.0f}s", flush=True)
    examples = Examples(frames, tokenizer, aspec)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=run_variant, args=(v, examples, tokenizer, out, spec.get("device", "cuda"),
                                                   spec.get("frames_eps", 20), spec.get("loop_eps", 50)))
             for v in spec["variants"]]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    print(f"all done in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
