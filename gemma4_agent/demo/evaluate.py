"""Quick in-process evaluation of a demo model against the expert, on held-out world seeds.

- `frame_agreement`: expert episodes exactly as `generate-bags --seed S` records them (world seed
  S * 100003 + i); the model decodes an action for every frame; agreement with the expert per frame.
- `closed_loop`: the model drives (through the action safety filter, as the agent does) in worlds
  S * 100003 + i; success = the robot centre comes within the success radius of the target within
  the episode time (40 s).

Both decode with the action trie (grammar-equivalent, canonical tokens) over a batched KV cache.

    python -m gemma4_agent.demo.evaluate --engine engines/demo --seed 7 --episodes 50 [--frames-episodes 20]

An int4 engine (`gemma4-agent quantize`) evaluates the same way; the output's first line names the dtype,
the quantization scheme and the number of int4 modules, so a run cannot silently evaluate a float model.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..sim.episodes import EpisodeConfig, run_episode
from ..sim.expert import action_to_twist, success
from ..sim.world import World
from .data import frame_patches
from .decode import ActionTrie, BatchDecoder

SEED_STRIDE = 100003  # as generate-bags: episode i of --seed S is world seed S * SEED_STRIDE + i
SIGN_DEADBAND = 0.05  # rad/s: |angular_z| below this counts as "straight"


def episode_seed(seed: int, index: int) -> int:
    return seed * SEED_STRIDE + index


def _sign(x: float, eps: float) -> int:
    return 0 if abs(x) < eps else (1 if x > 0 else -1)


def agreement(pred: list[dict], ref: list[dict], deadband: float = SIGN_DEADBAND) -> dict:
    """Per-frame agreement of predicted actions with reference actions."""
    if not ref:
        return {"frames": 0}
    p_tw = np.array([action_to_twist(a) for a in pred])
    r_tw = np.array([action_to_twist(a) for a in ref])
    same_type = np.array([p.get("action") == r.get("action") for p, r in zip(pred, ref)])
    strict = np.sign(p_tw[:, 1]) == np.sign(r_tw[:, 1])
    banded = np.array([_sign(a, deadband) == _sign(b, deadband) or abs(a - b) <= deadband
                       for a, b in zip(p_tw[:, 1], r_tw[:, 1])])
    return {
        "frames": len(ref),
        "action_type_agreement": round(float(same_type.mean()), 4),
        "angular_sign_agreement": round(float(banded.mean()), 4),
        "angular_sign_agreement_strict": round(float(strict.mean()), 4),
        "linear_mae": round(float(np.abs(p_tw[:, 0] - r_tw[:, 0]).mean()), 4),
        "angular_mae": round(float(np.abs(p_tw[:, 1] - r_tw[:, 1]).mean()), 4),
        "stop_recall": round(float(np.mean([p.get("action") == "stop" for p, r in zip(pred, ref) if r.get("action") == "stop"]
                                           or [1.0])), 4),
    }


def _decode_frames(decoder: BatchDecoder, instructions, patches_u8, positions, batch: int = 64) -> list[dict]:
    out = []
    for i in range(0, len(instructions), batch):
        texts = decoder.decode(instructions[i:i + batch], patches_u8[i:i + batch].float() / 255.0, positions)
        out += [json.loads(t) for t in texts]
    return out


def frame_agreement(model, tokenizer, episodes: int = 20, seed: int = 9000, trie: ActionTrie | None = None,
                    progress: bool = False, system: str = "") -> dict:
    from tqdm import tqdm

    decoder = BatchDecoder(model, tokenizer, trie, system)
    instructions, refs, chunks = [], [], []
    positions = None
    for i in tqdm(range(episodes), desc="frames", unit="ep", disable=not progress):
        for step in run_episode(episode_seed(seed, i)):
            p, positions = frame_patches(step.frame)
            chunks.append(p)
            instructions.append(step.instruction)
            refs.append(step.action)
    preds = _decode_frames(decoder, instructions, torch.stack(chunks), positions)
    metrics = agreement(preds, refs)
    metrics["episodes"] = episodes
    metrics["seed"] = seed
    return metrics


def closed_loop(model, tokenizer, episodes: int = 50, seed: int = 7, trie: ActionTrie | None = None,
                safety: bool = True, progress: bool = False, system: str = "", batch: int = 64) -> dict:
    """The model drives; returns success_rate and episode details."""
    from tqdm import tqdm

    from ..actions.spec import load_action_spec

    decoder = BatchDecoder(model, tokenizer, trie, system)
    spec = load_action_spec()
    ecfg = EpisodeConfig()
    period = 1.0 / ecfg.rate_hz
    substeps = max(1, math.ceil(period / ecfg.control_dt - 1e-9))
    max_frames = int(math.floor(ecfg.max_duration_s * ecfg.rate_hz + 1e-9))
    worlds = [World(seed=episode_seed(seed, i)) for i in range(episodes)]
    filters = None
    if safety:
        from ..actions.safety import SafetyFilter

        filters = [SafetyFilter(spec.safety) for _ in worlds]
    reached_at = [None] * episodes
    last_action: list[dict] = [{} for _ in range(episodes)]
    active = list(range(episodes))
    bar = tqdm(range(max_frames), desc="closed loop", unit="tick", disable=not progress)
    for tick in bar:
        still = []
        for i in active:
            if success(worlds[i]):
                reached_at[i] = tick * period
            else:
                still.append(i)
        active = still
        if not active:
            break
        for j in range(0, len(active), batch):
            idx = active[j:j + batch]
            frames = [frame_patches(worlds[i].render(noise_key=tick)) for i in idx]
            positions = frames[0][1]
            pixels = torch.stack([f[0] for f in frames]).float() / 255.0
            texts = decoder.decode([worlds[i].instruction for i in idx], pixels, positions)
            for i, text in zip(idx, texts):
                action = last_action[i] = json.loads(text)
                lin, ang = action_to_twist(action)
                if filters is not None:
                    tw = filters[i].step({"linear_x": lin, "angular_z": ang}, tick * period, valid=True).twist
                    lin, ang = tw["linear_x"], tw["angular_z"]
                for _ in range(substeps):
                    worlds[i].step(lin, ang, period / substeps)
        bar.set_postfix(active=len(active))
    bar.close()
    ok = [t is not None for t in reached_at]
    failures = []
    for i, w in enumerate(worlds):
        if ok[i]:
            continue
        nearest = min(w.objects, key=w.distance_to)
        failures.append({"world_seed": episode_seed(seed, i), "instruction": w.instruction,
                         "final_distance": round(w.distance_to(w.target), 2), "last_action": last_action[i].get("action"),
                         "nearest_object": nearest.name, "nearest_distance": round(w.distance_to(nearest), 2)})
    return {
        "episodes": episodes,
        "seed": seed,
        "success_rate": round(float(np.mean(ok)), 4),
        "mean_time_to_reach_s": round(float(np.mean([t for t in reached_at if t is not None])), 2) if any(ok) else None,
        "failures": failures,
        "safety_filter": safety,
    }


def model_info(model) -> dict:
    """What is being evaluated: float dtype, int4 scheme and the int4 modules actually in the model."""
    from ..quant.int4 import Int4Embedding, Int4Linear

    meta = getattr(model, "int4_metadata", None) or {}
    return {"dtype": str(model.norm.weight.dtype).replace("torch.", ""), "quant": meta.get("scheme"),
            "int4_layers": meta.get("layers"),
            "int4_linear_modules": sum(isinstance(m, Int4Linear) for m in model.modules()),
            "int4_embedding": isinstance(model.embed_tokens, Int4Embedding)}


def main(argv: list[str] | None = None) -> int:
    from ..model.loader import load_model
    from ..model.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(prog="python -m gemma4_agent.demo.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", type=Path, default=Path("engines/demo"))
    parser.add_argument("--seed", type=int, default=7, help="held-out bag seed (world seeds seed*100003+i)")
    parser.add_argument("--episodes", type=int, default=50, help="closed-loop episodes (0: skip)")
    parser.add_argument("--frames-episodes", type=int, default=20, help="per-frame agreement episodes (0: skip)")
    parser.add_argument("--no-safety", action="store_true", help="closed loop without the safety filter")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="float dtype of the model (for an int4 engine: of its unquantized tensors; on CPU the "
                             "int4 kernel takes bf16 activations either way)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.engine, dtype=getattr(torch, args.dtype))
    tokenizer = load_tokenizer(args.engine)
    defaults_path = args.engine / "agent.json"
    system = json.loads(defaults_path.read_text()).get("system", "") if defaults_path.is_file() else ""
    trie = ActionTrie.from_spec(tokenizer)
    results = {"engine": str(args.engine), "model": model_info(model)}
    print(json.dumps(results), flush=True)
    if args.frames_episodes:
        t = time.monotonic()
        results["frames"] = frame_agreement(model, tokenizer, args.frames_episodes, args.seed, trie, True, system)
        results["frames"]["seconds"] = round(time.monotonic() - t, 1)
        print(json.dumps(results["frames"]), flush=True)
    if args.episodes:
        t = time.monotonic()
        results["closed_loop"] = closed_loop(model, tokenizer, args.episodes, args.seed, trie, not args.no_safety, True,
                                             system)
        results["closed_loop"]["seconds"] = round(time.monotonic() - t, 1)
        print(json.dumps(results["closed_loop"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
