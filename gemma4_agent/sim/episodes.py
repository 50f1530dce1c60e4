"""Run one episode of the expert in the world at a camera rate.

At each camera tick the world is rendered, the expert chooses an action from the same state,
and the action is held until the next tick while the robot moves in `control_dt` sub-steps
(a robot base applies the last cmd_vel until a new one arrives). After the expert first says
"stop" the episode records `stop_hold_s` more seconds of stopping, so that datasets carry
enough stop examples; it ends at `max_duration_s` otherwise (a failure).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from gemma4_agent.sim.expert import ExpertConfig, action_to_twist, expert_action, success
from gemma4_agent.sim.world import World, WorldConfig


class EpisodeConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    rate_hz: float = Field(10.0, gt=0.0, le=1000.0)  # camera frames per second
    control_dt: float = Field(0.02, gt=0.0)  # physics sub-step (s)
    max_duration_s: float = Field(40.0, gt=0.0)
    stop_hold_s: float = Field(1.0, ge=0.0)  # stopped frames recorded after reaching the target


@dataclass(frozen=True)
class EpisodeStep:
    index: int  # frame index in the episode
    t: float  # seconds since the episode start
    frame: np.ndarray | None  # RGB uint8 (H, W, 3); None when run with render=False
    instruction: str
    action: dict  # the expert's action for this frame
    pose: tuple[float, float, float]  # robot (x, y, yaw) when the frame was taken
    target_distance: float  # robot centre to target centre (m)
    reached: bool  # success(world) at this frame


def run_episode(
    seed: int,
    world_config: WorldConfig | None = None,
    expert_config: ExpertConfig | None = None,
    episode_config: EpisodeConfig | None = None,
    render: bool = True,
) -> Iterator[EpisodeStep]:
    """Yield the episode of `seed` frame by frame (deterministic in its arguments)."""
    world = World(world_config, seed=seed)
    yield from run_expert(world, expert_config, episode_config, render)


def run_expert(
    world: World,
    expert_config: ExpertConfig | None = None,
    episode_config: EpisodeConfig | None = None,
    render: bool = True,
) -> Iterator[EpisodeStep]:
    """Drive `world` (already reset) with the expert; yields one step per camera frame."""
    ecfg = episode_config or EpisodeConfig()
    period = 1.0 / ecfg.rate_hz
    substeps = max(1, math.ceil(period / ecfg.control_dt - 1e-9))
    max_frames = int(math.floor(ecfg.max_duration_s * ecfg.rate_hz + 1e-9))
    hold_frames = int(round(ecfg.stop_hold_s * ecfg.rate_hz))
    stopped_frames = 0
    for i in range(max_frames):
        r = world.robot
        action = expert_action(world, expert_config)
        yield EpisodeStep(
            index=i,
            t=i * period,
            frame=world.render(noise_key=i) if render else None,
            instruction=world.instruction,
            action=action,
            pose=(r.x, r.y, r.yaw),
            target_distance=world.distance_to(world.target),
            reached=success(world),
        )
        if action["action"] == "stop":
            stopped_frames += 1
            if stopped_frames > hold_frames:
                return
        linear, angular = action_to_twist(action)
        for _ in range(substeps):
            world.step(linear, angular, period / substeps)
