"""`gemma4-agent train-demo`: train the embedded demo model on the synthetic world, on a CPU.

    gemma4-agent train-demo [--out engines/demo] [--seed 0] [--episodes N] [--steps K] [--minutes M]

1. Roll out N expert episodes (world seeds TRAIN_SEED_BASE + seed * 10^6 + i, never used by
   `generate-bags`), with perturbed execution in part of them, and keep every frame in memory as
   uint8 patches (some frames JPEG-compressed first, as compressed bags deliver them).
2. Train a tiny Gemma 4 Unified (gemma4_agent.demo.config) to continue the agent's prompt
       <bos><|turn>user\\n{instruction}\\n<|image><|image|>x63<image|><turn|>\\n<|turn>model\\n
   with the expert's canonical action text and <turn|>; loss on those tokens only. Half the frames
   are mirrored left-right, with the steering sign flipped.
3. Write the engine folder (config.json, model.safetensors, tokenizer.json, agent.json,
   training.json, manifest.json) and print per-frame agreement with the expert on held-out episodes.

Reproducible from --seed (same machine, same thread count). K steps fix the schedule; --minutes only
caps the wall-clock time (training stops early, and says so, if the machine is slower).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..model.config import ModelConfig
from ..model.network import Gemma4
from ..model.tokenizer import TURN_END, PromptBuilder
from .config import demo_config_json
from .data import IMAGE_TOKENS, PATCH_SIZE, POOLING, FrameSet, PerturbConfig, collect, mirror_action, mirror_patches, \
    train_world_seed
from .tokenizer import build_tokenizer

DEFAULT_INSTRUCTION = "go to the red ball"
MAX_PREFIX, MAX_CONTEXT = 64, 512
IGNORE = -100


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("engines/demo"), help="engine folder to write")
    parser.add_argument("--seed", type=int, default=0, help="seeds the episodes, the initial weights and the batches")
    parser.add_argument("--episodes", type=int, default=256, help="training episodes (about 150 frames each)")
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps (the learning-rate schedule)")
    parser.add_argument("--batch", type=int, default=32, help="examples per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW, cosine decay)")
    parser.add_argument("--minutes", type=float, default=28.0, help="wall-clock cap for the whole run")
    parser.add_argument("--dagger-episodes", type=int, default=96,
                        help="episodes the half-trained model drives, labelled by the expert (0: no DAgger)")
    parser.add_argument("--dagger-at", type=float, default=0.5, help="share of the steps after which DAgger runs")
    parser.add_argument("--eval-episodes", type=int, default=12, help="held-out episodes for the final check (0: skip)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--workers", type=int, default=2, help="processes rendering episodes (same data for any count)")
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)  # cuda: for experiments only
    parser.add_argument("--hidden", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def init_model(cfg: ModelConfig, seed: int) -> Gemma4:
    torch.manual_seed(seed)
    model = Gemma4(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and name.endswith("weight"):
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
            elif name.endswith("pos_embedding"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


DECISION_WEIGHT = 4.0  # loss weight of the action-name token (move / stop): the decision that matters most
NEAR_MOVE_WEIGHT = 3.0  # extra factor when the answer is "move" within NEAR_DISTANCE of the named object, or
NEAR_DISTANCE = 0.7     # of the episode's target when another object is named: a premature stop is final in
                        # closed loop (the frame no longer changes), a late one is not
OTHER_TARGET_SHARE = 0.3  # examples that name another object of the frame than the episode's target


class Examples:
    """Token sequences for FrameSets: per-frame prompt and target ids (plain and mirrored) and the
    loss weight of each target token. `extend` appends more frames (DAgger)."""

    def __init__(self, frames: FrameSet, tokenizer, spec, system: str = ""):
        self.prompts = PromptBuilder(tokenizer)
        self.image_id = self.prompts.image_id
        self.spec, self.system = spec, system
        self._end = self.prompts.text(TURN_END)
        self._quote = self.prompts.text('":"')[0]
        self._decision_ids = {self.prompts.text(n)[0] for n in spec.actions if len(self.prompts.text(n)) == 1}
        self._prompt_cache: dict[str, list[int]] = {}
        self._text_cache: dict[str, list[int]] = {}
        self._weight_cache: dict[tuple, list[float]] = {}
        self.options: list[list[tuple]] = []  # per frame: the true instruction first, then other objects named
        self.frames = frames  # the first FrameSet (positions, and its patches as chunk 0)
        self._chunks: list[torch.Tensor] = [frames.patches]
        self._starts: list[int] = [0, len(frames)]
        self._add(frames)

    def __len__(self) -> int:
        return len(self.options)

    def _target(self, action: dict) -> list[int]:
        text = self.spec.format_action(action)
        if text not in self._text_cache:
            self._text_cache[text] = self.prompts.text(text) + self._end
        return self._text_cache[text]

    def _weights(self, tgt: list[int], near_move: bool) -> list[float]:
        key = (tuple(tgt), near_move)
        if key not in self._weight_cache:
            w = [1.0] * len(tgt)
            for j, t in enumerate(tgt):
                if t in self._decision_ids and j > 0 and tgt[j - 1] == self._quote:
                    w[j] = DECISION_WEIGHT * (NEAR_MOVE_WEIGHT if near_move else 1.0)
                    break
            self._weight_cache[key] = w
        return self._weight_cache[key]

    def _option(self, instr: str, action: dict, dist: float, num_patches: int, other: float = float("inf")) -> tuple:
        """(prompt, target, mirrored target, weights, mirrored weights) of one instruction + label."""
        if instr not in self._prompt_cache:
            self._prompt_cache[instr] = (self.prompts.prefix(instr, self.system) + self.prompts.image(num_patches)
                                         + self.prompts.suffix())
        target, mirrored = self._target(action), self._target(mirror_action(action))
        # near: the named object, or (for another object named) the episode's target, is close. A stop
        # there would look plausible, and is final in closed loop.
        near_move = action["action"] != "stop" and min(dist, other) < NEAR_DISTANCE
        return (self._prompt_cache[instr], target, mirrored, self._weights(target, near_move),
                self._weights(mirrored, near_move))

    def _add(self, frames: FrameSet) -> None:
        num_patches = frames.patches.shape[1]
        distances = frames.distances or [float("inf")] * len(frames)
        others = frames.others or [[] for _ in range(len(frames))]
        for instr, action, dist, alts in zip(frames.instructions, frames.actions, distances, others):
            self.options.append([self._option(instr, action, dist, num_patches)]
                                + [self._option(*alt, num_patches, dist) for alt in alts])

    def extend(self, frames: FrameSet) -> None:
        """Append frames (kept as another chunk: no copy of the patches already held)."""
        if not torch.equal(frames.positions, self.frames.positions):
            raise ValueError("frames of another size")
        self._chunks.append(frames.patches)
        self._starts.append(self._starts[-1] + len(frames))
        self._add(frames)

    def patches(self, index: torch.Tensor) -> torch.Tensor:
        """uint8 patches [B, P, D] of examples `index`, from whichever chunk holds each."""
        if len(self._chunks) == 1:
            return self._chunks[0][index]
        starts = torch.tensor(self._starts)
        chunk = torch.searchsorted(starts, index, right=True) - 1
        out = torch.empty((len(index),) + tuple(self._chunks[0].shape[1:]), dtype=self._chunks[0].dtype)
        for c in chunk.unique().tolist():
            sel = chunk == c
            out[sel] = self._chunks[c][index[sel] - self._starts[c]]
        return out

    def batch(self, index: torch.Tensor, mirror: torch.Tensor, pick: torch.Tensor | None = None):
        """ids [B, L] (pad 0 at the end), labels [B, L] (IGNORE outside targets), loss weights [B, L],
        pixels [B, P, D] float. `pick` (uniform [0, 1) per example): below OTHER_TARGET_SHARE, the
        example names another object of the frame (uniformly) with the expert's answer for it."""
        seqs, labels, weights = [], [], []
        picks = pick.tolist() if pick is not None else [1.0] * len(index)
        for i, m, u in zip(index.tolist(), mirror.tolist(), picks):
            options = self.options[i]
            k = 0
            if len(options) > 1 and u < OTHER_TARGET_SHARE:
                k = 1 + min(len(options) - 2, int(u / OTHER_TARGET_SHARE * (len(options) - 1)))
            prompt, target, mirrored, w, mw = options[k]
            tgt = mirrored if m else target
            seqs.append(prompt + tgt)
            labels.append([IGNORE] * len(prompt) + tgt)
            weights.append([0.0] * len(prompt) + (mw if m else w))
        length = max(len(s) for s in seqs)
        ids = torch.tensor([s + [0] * (length - len(s)) for s in seqs])
        lab = torch.tensor([s + [IGNORE] * (length - len(s)) for s in labels])
        wts = torch.tensor([s + [0.0] * (length - len(s)) for s in weights])
        patches = self.patches(index)
        if bool(mirror.any()):
            patches[mirror] = mirror_patches(patches[mirror], self.frames.positions)
        return ids, lab, wts, patches.float() / 255.0


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def train(model: Gemma4, examples: Examples, steps: int, batch: int, lr: float, seed: int, deadline: float,
          progress: bool = True, device: str = "cpu", dagger_step: int | None = None, dagger=None,
          focus: int | None = None) -> dict:
    """AdamW over `steps` steps. With `dagger_step`, `dagger(model)` -> (FrameSet, stats) is called there;
    its frames join the examples and fill half of every later batch (as do examples[focus:] from the start)."""
    from tqdm import tqdm

    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-8)
    gen = torch.Generator().manual_seed(seed + 1)
    positions = examples.frames.positions.to(device)
    losses: list[float] = []
    done = 0
    extra: dict = {}
    bar = tqdm(range(steps), desc="train", unit="step", disable=not progress)
    for step in bar:
        if time.monotonic() > deadline:
            bar.write(f"time cap reached after {step} of {steps} steps: stopping early")
            break
        if dagger is not None and step == dagger_step:
            t0 = time.monotonic()
            new, extra = dagger(model)
            focus = len(examples)
            examples.extend(new)
            extra["seconds"] = round(time.monotonic() - t0, 1)
            bar.write(f"dagger: {json.dumps(extra)}")
            model.train()
        n = len(examples)
        if focus is None:
            index = torch.randint(0, n, (batch,), generator=gen)
        else:
            half = batch // 2
            index = torch.cat([torch.randint(0, n, (batch - half,), generator=gen),
                               torch.randint(focus, n, (half,), generator=gen)])
        mirror = torch.rand(batch, generator=gen) < 0.5
        pick = torch.rand(batch, generator=gen)
        ids, labels, weights, pixels = (t.to(device) for t in examples.batch(index, mirror, pick))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        logits = model(ids, pixels, positions[None].expand(batch, -1, -1), (ids == examples.image_id).long())
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                             ignore_index=IGNORE, reduction="none")
        loss = (ce * weights[:, 1:].reshape(-1)).sum() / (labels[:, 1:] != IGNORE).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        done = step + 1
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", lr=f"{lr_at(step, steps, lr):.1e}")
    bar.close()
    model.eval()
    return {"steps_done": done, "final_loss": float(np.mean(losses[-100:])) if losses else float("nan"),
            "loss_curve": [round(float(np.mean(losses[i:i + 50])), 4) for i in range(0, len(losses), 50)],
            "dagger": extra}


def agent_defaults(system: str = "") -> dict:
    from ..sim.world import COLOURS, SHAPES

    return {
        "image_tokens": IMAGE_TOKENS,
        "instruction": DEFAULT_INSTRUCTION,
        "system": system,
        "max_prefix": MAX_PREFIX,
        "max_context": MAX_CONTEXT,
        "patch_size": PATCH_SIZE,
        "pooling": POOLING,
        "target_end": TURN_END,
        "instructions": [f"go to the {c} {s}" for c in COLOURS for s in SHAPES],
    }


def run(args: argparse.Namespace) -> int:
    from ..actions.spec import load_action_spec
    from ..engines.torch_engine import write_torch_engine
    from .evaluate import frame_agreement

    t_start = time.monotonic()
    deadline = t_start + args.minutes * 60.0
    torch.set_num_threads(args.threads)
    progress = not args.quiet
    tokenizer = build_tokenizer()
    spec = load_action_spec()
    config_json = demo_config_json(tokenizer.get_vocab_size(), **({"hidden": args.hidden} if args.hidden else {}))
    cfg = ModelConfig.model_validate(config_json)

    seeds = [train_world_seed(args.seed, i) for i in range(args.episodes)]
    frames = collect(seeds, PerturbConfig(), rng_seed=args.seed, progress=progress, desc="collect", jpeg_prob=0.3,
                     workers=args.workers)
    num_frames = len(frames)
    t_data = time.monotonic() - t_start
    print(f"collected {len(frames)} frames from {args.episodes} episodes in {t_data:.0f} s "
          f"({frames.patches.numel() / 2**20:.0f} MiB of patches)", flush=True)
    examples = Examples(frames, tokenizer, spec)

    model = init_model(cfg, args.seed).to(args.device)
    print(f"model: {model.num_parameters() / 1e6:.2f} M parameters, {cfg.text_config.num_hidden_layers} layers "
          f"{cfg.text_config.layer_types}, hidden {cfg.text_config.hidden_size}", flush=True)
    t0 = time.monotonic()
    dagger = None
    if args.dagger_episodes > 0:
        from .dagger import dagger_collect

        dagger_seeds = [train_world_seed(args.seed, args.episodes + j) for j in range(args.dagger_episodes)]

        def dagger(m):
            return dagger_collect(m, tokenizer, dagger_seeds, rng_seed=args.seed, progress=progress)

    stats = train(model, examples, args.steps, args.batch, args.lr, args.seed, deadline, progress, args.device,
                  dagger_step=int(args.steps * args.dagger_at), dagger=dagger)
    t_train = time.monotonic() - t0
    print(f"trained {stats['steps_done']} steps in {t_train / 60:.1f} min, final loss {stats['final_loss']:.4f}", flush=True)
    del examples, frames

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("manifest.json", "training.json"):
        (out / stale).unlink(missing_ok=True)
    training = {
        "command": f"gemma4-agent train-demo --seed {args.seed} --episodes {args.episodes} --steps {args.steps} "
                   f"--batch {args.batch} --lr {args.lr} --dagger-episodes {args.dagger_episodes} "
                   f"--dagger-at {args.dagger_at} --threads {args.threads}",
        "dagger": stats["dagger"],
        "seed": args.seed, "episodes": args.episodes, "train_frames": num_frames, "steps": args.steps,
        "steps_done": stats["steps_done"], "batch": args.batch, "lr": args.lr, "threads": args.threads,
        "final_loss": round(stats["final_loss"], 5), "loss_curve": stats["loss_curve"],
        "data_seconds": round(t_data, 1), "train_seconds": round(t_train, 1),
        "torch": torch.__version__, "machine": platform.machine(),
        "train_world_seeds": f"{seeds[0]}..{train_world_seed(args.seed, args.episodes + args.dagger_episodes - 1)}",
    }
    if args.eval_episodes > 0:
        metrics = frame_agreement(model, tokenizer, episodes=args.eval_episodes, seed=9_000, progress=progress)
        training["heldout_frame_agreement"] = metrics
        print("held-out per-frame agreement (bag seed 9000): " + json.dumps(metrics), flush=True)
    training["total_seconds"] = round(time.monotonic() - t_start, 1)
    (out / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    write_torch_engine(out, model=model.cpu(), config_json=config_json, tokenizer=tokenizer, agent_defaults=agent_defaults(),
                       name="demo", max_context=MAX_CONTEXT)
    print(f"engine written to {out} in {training['total_seconds'] / 60:.1f} min total", flush=True)
    return 0
