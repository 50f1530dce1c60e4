"""Training data for the demo model: expert rollouts in the synthetic world, in memory.

Each camera frame becomes one example: the prompt the agent builds (prefix with the instruction,
the frame's image block, the suffix) followed by the expert's action text and `<turn|>`. Frames
are kept as the preprocessed patch grid in uint8 (the processor's float values are exactly k/255,
so nothing is lost), about 190 KB a frame.

The rollouts mirror `gemma4_agent.sim.episodes.run_expert` (same camera rate, physics sub-steps,
stop hold), but the executed command may be perturbed while the label stays the expert's: noise
on the command and short bursts of random commands put the robot in states the pure expert never
visits (target at the image edge, overshoot, odd approach angles), so the model learns to recover
(DART-style; the labels are still the expert's answer for each state).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ..model.preprocess import preprocess_frame
from ..sim.episodes import EpisodeConfig
from ..sim.expert import ExpertConfig, expert_action, success
from ..sim.world import World, WorldConfig

IMAGE_TOKENS = 70  # soft-token budget the demo model is trained (and must be run) at
PATCH_SIZE, POOLING = 16, 2  # 32-px merged patches: 320x240 -> 288x224 -> 9 x 7 = 63 image tokens
TRAIN_SEED_BASE = 9_000_000_000  # training world seeds: far from any `generate-bags --seed S` (S * 100003 + i)


def train_world_seed(seed: int, index: int) -> int:
    """World seed of training episode `index` for `train-demo --seed seed`."""
    return TRAIN_SEED_BASE + seed * 1_000_000 + index


class PerturbConfig(BaseModel):
    """How the executed command departs from the expert's label during data collection."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    p_episode: float = Field(0.6, ge=0.0, le=1.0)  # share of episodes that are perturbed at all
    linear_noise: float = Field(0.08, ge=0.0)  # m/s, Gaussian, added to the executed command
    angular_noise: float = Field(0.25, ge=0.0)  # rad/s
    p_burst: float = Field(0.04, ge=0.0, le=1.0)  # chance per frame to start a burst of random commands
    burst_frames: tuple[int, int] = (3, 12)


def is_search(action: dict, expert: ExpertConfig | None = None) -> bool:
    """The expert's "target not in view" command (turn left in place). In view, linear_x = 0 would
    need a bearing past the field of view, so this exact command means search."""
    cfg = expert or ExpertConfig()
    return (action.get("action") == "move" and action.get("linear_x") == 0.0
            and action.get("angular_z") == round(cfg.search_angular, 2))


def mirror_action(action: dict, expert: ExpertConfig | None = None) -> dict:
    """The expert's label for the left-right mirrored frame: steering flips sign; search (turn left,
    whatever the image) and stop stay."""
    if action.get("action") != "move" or is_search(action, expert):
        return dict(action)
    return {**action, "angular_z": -action["angular_z"] + 0.0}


@dataclass
class Step:
    frame: np.ndarray
    instruction: str
    action: dict
    distance: float  # robot centre to target centre (m)
    others: list = field(default_factory=list)  # (instruction, action, distance) with another object as the target


def other_targets(world: World, expert_config: ExpertConfig | None = None) -> list[tuple[str, dict, float]]:
    """The expert's answer in the same state for each other object named as the target: the same
    image under other instructions, so the model has to read the instruction (counterfactual labels)."""
    true_index = world.target_index
    out = []
    try:
        for k in range(len(world.objects)):
            if k == true_index:
                continue
            world.target_index = k
            out.append((world.instruction, expert_action(world, expert_config), world.distance_to(world.target)))
    finally:
        world.target_index = true_index
    return out


def rollout(world_seed: int, perturb: PerturbConfig | None = None, rng: np.random.Generator | None = None,
            world_config: WorldConfig | None = None, expert_config: ExpertConfig | None = None,
            episode_config: EpisodeConfig | None = None) -> Iterator[Step]:
    """One episode with the expert labelling every frame; perturbed execution when `perturb` is given."""
    world = World(world_config, seed=world_seed)
    ecfg = episode_config or EpisodeConfig()
    period = 1.0 / ecfg.rate_hz
    substeps = max(1, math.ceil(period / ecfg.control_dt - 1e-9))
    max_frames = int(math.floor(ecfg.max_duration_s * ecfg.rate_hz + 1e-9))
    hold_frames = int(round(ecfg.stop_hold_s * ecfg.rate_hz))
    rng = rng or np.random.default_rng(world_seed)
    active = perturb is not None and rng.uniform() < perturb.p_episode
    burst_left, burst_cmd = 0, (0.0, 0.0)
    stopped = 0
    for i in range(max_frames):
        label = expert_action(world, expert_config)
        yield Step(world.render(noise_key=i), world.instruction, label, world.distance_to(world.target),
                   other_targets(world, expert_config))
        if label["action"] == "stop":
            stopped += 1
            if stopped > hold_frames:
                return
            linear, angular = 0.0, 0.0
        else:
            linear, angular = label["linear_x"], label["angular_z"]
            if active:
                if burst_left == 0 and rng.uniform() < perturb.p_burst:
                    burst_left = int(rng.integers(perturb.burst_frames[0], perturb.burst_frames[1] + 1))
                    burst_cmd = (float(rng.uniform(-0.05, 0.4)), float(rng.uniform(-1.0, 1.0)))
                if burst_left > 0:
                    burst_left -= 1
                    linear, angular = burst_cmd
                else:
                    linear += float(rng.normal(0.0, perturb.linear_noise))
                    angular += float(rng.normal(0.0, perturb.angular_noise))
                linear = float(np.clip(linear, -0.2, 0.5))
                angular = float(np.clip(angular, -1.0, 1.0))
        for _ in range(substeps):
            world.step(linear, angular, period / substeps)


def frame_patches(rgb: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The agent's preprocessing at the demo budget: (uint8 patches [63, 3072], positions [63, 2])."""
    patches, positions = preprocess_frame(rgb, IMAGE_TOKENS, PATCH_SIZE, POOLING)
    return (patches * 255.0).round_().to(torch.uint8), positions


def mirror_patches(patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Patches of the left-right mirrored (resized) frame: columns reversed, inside and across patches.
    patches [..., N, side*side*3] in (row, col) order; positions [N, 2] (x, y)."""
    cols = int(positions[:, 0].max()) + 1
    rows = int(positions[:, 1].max()) + 1
    side = int(round(math.sqrt(patches.shape[-1] // 3)))
    lead = patches.shape[:-2]
    grid = patches.reshape(*lead, rows, cols, side, side, 3)
    return grid.flip(-4).flip(-2).reshape(patches.shape)


@dataclass
class FrameSet:
    """Frames in memory: uint8 patches, the instruction and expert action of each."""

    patches: torch.Tensor  # [N, P, D] uint8
    positions: torch.Tensor  # [P, 2] (all frames share one size)
    instructions: list[str]
    actions: list[dict]
    distances: list[float] = field(default_factory=list)  # robot to target (m), per frame
    episode: list[int] = field(default_factory=list)
    others: list[list] = field(default_factory=list)  # per frame: other_targets(...) (may be empty)

    def __len__(self) -> int:
        return len(self.actions)


def jpeg_roundtrip(rgb: np.ndarray, quality: int) -> np.ndarray:
    """The frame as a compressed image topic delivers it (JPEG encode + decode)."""
    import cv2

    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        return rgb
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _collect_episode(job) -> tuple[torch.Tensor, torch.Tensor, list[str], list[dict], list[float]]:
    world_seed, perturb, rng_seed, world_config, jpeg_prob, jpeg_quality = job
    torch.set_num_threads(1)
    rng = np.random.default_rng([rng_seed, world_seed])  # per episode: the same data with any worker count
    buf, instructions, actions, distances, others = [], [], [], [], []
    positions = None
    for step in rollout(world_seed, perturb, rng, world_config):
        frame = step.frame
        if jpeg_prob > 0 and rng.uniform() < jpeg_prob:
            frame = jpeg_roundtrip(frame, int(rng.integers(jpeg_quality[0], jpeg_quality[1] + 1)))
        patches, positions = frame_patches(frame)
        buf.append(patches)
        instructions.append(step.instruction)
        actions.append(step.action)
        distances.append(step.distance)
        others.append(step.others)
    return torch.stack(buf), positions, instructions, actions, distances, others


def collect(world_seeds: list[int], perturb: PerturbConfig | None = None, rng_seed: int = 0,
            world_config: WorldConfig | None = None, progress: bool = False, desc: str = "episodes",
            jpeg_prob: float = 0.0, jpeg_quality: tuple[int, int] = (60, 95), workers: int = 1) -> FrameSet:
    """Roll out the given episodes and keep every frame (a `jpeg_prob` share of them JPEG-compressed).
    The result does not depend on `workers` (processes rolling out episodes in parallel)."""
    from tqdm import tqdm

    jobs = [(seed, perturb, rng_seed, world_config, jpeg_prob, jpeg_quality) for seed in world_seeds]
    chunks: list[torch.Tensor] = []
    instructions: list[str] = []
    actions: list[dict] = []
    distances: list[float] = []
    others: list[list] = []
    episode: list[int] = []
    positions = None

    def consume(results):
        nonlocal positions
        for e, (patches, pos, instr, acts, dists, alts) in enumerate(tqdm(results, total=len(jobs), desc=desc, unit="ep",
                                                            disable=not progress)):
            chunks.append(patches)
            positions = pos
            instructions.extend(instr)
            actions.extend(acts)
            distances.extend(dists)
            others.extend(alts)
            episode.extend([e] * len(acts))

    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            consume(pool.imap(_collect_episode, jobs, chunksize=1))
    else:
        consume(map(_collect_episode, jobs))
    if positions is None:
        raise ValueError("no frames collected")
    return FrameSet(torch.cat(chunks), positions, instructions, actions, distances, episode, others)
