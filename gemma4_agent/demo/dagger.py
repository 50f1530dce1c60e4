"""DAgger for the demo model: let the partly trained model drive, label what it sees with the expert.

The model's own mistakes take the robot to states the expert never visits (a premature stop just
short of the target, a turn toward a distractor); those frames, labelled with the expert's action,
are what the model needs to learn to recover. Each tick the executed command is the model's
(through the safety filter, as the agent runs it), or the expert's with probability `beta`. An
episode ends `hold_frames` after the expert first says stop, after `stuck_frames` frames of the
model stopping where the expert says move (the frame no longer changes: enough copies), or at
`max_frames`.
"""
from __future__ import annotations

import json
import math

import numpy as np
import torch

from ..sim.episodes import EpisodeConfig
from ..sim.expert import action_to_twist, expert_action
from ..sim.world import World
from .data import FrameSet, frame_patches, other_targets
from .decode import ActionTrie, BatchDecoder


@torch.no_grad()
def dagger_collect(model, tokenizer, world_seeds: list[int], rng_seed: int = 0, beta: float = 0.3,
                   max_frames: int = 250, stuck_frames: int = 10, hold_frames: int = 10, batch: int = 64,
                   trie: ActionTrie | None = None, progress: bool = False) -> tuple[FrameSet, dict]:
    from tqdm import tqdm

    from ..actions.safety import SafetyFilter
    from ..actions.spec import load_action_spec

    was_training = model.training
    model.eval()
    decoder = BatchDecoder(model, tokenizer, trie)
    spec = load_action_spec()
    ecfg = EpisodeConfig()
    period = 1.0 / ecfg.rate_hz
    substeps = max(1, math.ceil(period / ecfg.control_dt - 1e-9))
    rng = np.random.default_rng([rng_seed, len(world_seeds), 7])
    worlds = [World(seed=s) for s in world_seeds]
    filters = [SafetyFilter(spec.safety) for _ in worlds]
    stopped = [0] * len(worlds)
    stuck = [0] * len(worlds)
    active = list(range(len(worlds)))
    patches_out: list[torch.Tensor] = []
    instructions: list[str] = []
    actions: list[dict] = []
    distances: list[float] = []
    episode: list[int] = []
    others: list[list] = []
    positions = None
    disagreements = 0
    for tick in tqdm(range(max_frames), desc="dagger", unit="tick", disable=not progress):
        if not active:
            break
        still = []
        for j in range(0, len(active), batch):
            idx = active[j:j + batch]
            frames = [frame_patches(worlds[i].render(noise_key=tick)) for i in idx]
            positions = frames[0][1]
            u8 = torch.stack([f[0] for f in frames])
            texts = decoder.decode([worlds[i].instruction for i in idx], u8.float() / 255.0, positions)
            for k, (i, text) in enumerate(zip(idx, texts)):
                w = worlds[i]
                label = expert_action(w)
                mine = json.loads(text)
                patches_out.append(u8[k])
                instructions.append(w.instruction)
                actions.append(label)
                distances.append(w.distance_to(w.target))
                episode.append(i)
                others.append(other_targets(w))
                disagreements += mine.get("action") != label["action"]
                if label["action"] == "stop":
                    stopped[i] += 1
                stuck[i] = stuck[i] + 1 if (mine.get("action") == "stop" and label["action"] != "stop") else 0
                if stopped[i] > hold_frames or stuck[i] >= stuck_frames:
                    continue
                still.append(i)
                lin, ang = action_to_twist(label if rng.uniform() < beta else mine)
                tw = filters[i].step({"linear_x": lin, "angular_z": ang}, tick * period).twist
                for _ in range(substeps):
                    w.step(tw["linear_x"], tw["angular_z"], period / substeps)
        active = still
    model.train(was_training)
    stats = {"episodes": len(worlds), "frames": len(actions),
             "type_disagreement": round(disagreements / max(1, len(actions)), 4)}
    return FrameSet(torch.stack(patches_out), positions, instructions, actions, distances, episode, others), stats
