"""Synthetic world: rendering geometry and determinism, the expert's decisions, closed loop."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest

from gemma4_agent.sim import (
    EpisodeConfig,
    ExpertConfig,
    SceneObject,
    World,
    WorldConfig,
    expert_action,
    run_episode,
    success,
)
from gemma4_agent.sim.expert import stop_distance
from gemma4_agent.sim.world import Robot

CLEAN = WorldConfig(max_noise_sigma=0.0, max_brightness_jitter=0.0, max_tint_jitter=0.0)


def scene(objects, robot=Robot(0.0, 0.0, 0.0), config=CLEAN, target_index=0) -> World:
    world = World(config, seed=0)
    world.set_scene(objects, target_index, robot)
    return world


def red_mask(img: np.ndarray) -> np.ndarray:
    r, g, b = (img[..., i].astype(int) for i in range(3))
    return (r > 90) & (r > 2 * g) & (r > 2 * b)


def test_render_is_deterministic_by_seed():
    a, b, c = World(seed=7), World(seed=7), World(seed=8)
    assert a.instruction == b.instruction and a.objects == b.objects and a.robot == b.robot
    assert np.array_equal(a.render(3), b.render(3))
    assert not np.array_equal(a.render(3), c.render(3))
    img = a.render(3)
    assert img.dtype == np.uint8 and img.shape == (240, 320, 3)


def test_noise_varies_by_frame_key_but_not_the_scene():
    world = World(WorldConfig(max_noise_sigma=6.0), seed=1)
    while world.lighting.noise_sigma < 2.0:  # pick an episode with visible noise
        world.reset(world.seed + 1)
    f0, f1 = world.render(0), world.render(1)
    assert not np.array_equal(f0, f1)
    assert np.abs(f0.astype(int) - f1.astype(int)).mean() < 12


def test_red_ball_straight_ahead_is_in_the_centre_column():
    world = scene([SceneObject("ball", "red", 2.0, 0.0), SceneObject("cube", "blue", 0.0, 2.5)])
    img = world.render()
    red = red_mask(img)
    w = img.shape[1]
    assert red[:, w // 2].sum() > 10  # the ball covers the centre column
    cols = np.nonzero(red.any(axis=0))[0]
    assert abs((cols.min() + cols.max()) / 2 - w / 2) < 3  # and is centred on it
    assert not red[:, : w // 4].any() and not red[:, 3 * w // 4 :].any()


def test_object_on_the_left_appears_on_the_left_and_shrinks_with_distance():
    near = scene([SceneObject("ball", "red", 2.0, 0.6)]).render()
    far = scene([SceneObject("ball", "red", 4.0, 1.2)]).render()  # same bearing, twice as far
    for img in (near, far):
        cols = np.nonzero(red_mask(img).any(axis=0))[0]
        assert cols.max() < img.shape[1] / 2  # left of centre
    assert red_mask(near).sum() > 3 * red_mask(far).sum()  # area ~ 1/distance^2


def test_object_behind_the_robot_is_not_drawn():
    img = scene([SceneObject("ball", "red", -2.0, 0.0)]).render()
    assert not red_mask(img).any()


def test_near_object_hides_far_object():
    world = scene([SceneObject("ball", "red", 3.5, 0.0), SceneObject("cube", "blue", 1.5, 0.0)])
    img = world.render()
    col = img[:, img.shape[1] // 2].astype(int)
    assert not red_mask(img[:, img.shape[1] // 2 - 5 : img.shape[1] // 2 + 5]).any()
    assert ((col[:, 2] > 2 * col[:, 0]) & (col[:, 2] > 80)).sum() > 20  # the blue cube instead


@pytest.mark.parametrize("shape", ["ball", "cube", "cylinder", "cone"])
def test_every_shape_renders_its_colour(shape):
    img = scene([SceneObject(shape, "red", 2.0, 0.0, yaw=0.3)]).render()
    assert red_mask(img).sum() > 200


def test_640x480_renders_and_is_fast_at_320x240():
    big = World(WorldConfig(width=640, height=480), seed=2).render()
    assert big.shape == (480, 640, 3)
    world = World(seed=2)
    world.render()
    t0 = time.perf_counter()
    for i in range(100):
        world.render(i)
    ms = (time.perf_counter() - t0) * 10
    assert ms < 20, f"{ms:.2f} ms per frame"  # ~1 ms expected; loose bound for busy CI


def test_sampled_episodes_are_valid():
    in_view = 0
    for seed in range(30):
        world = World(seed=seed)
        names = [o.name for o in world.objects]
        assert 3 <= len(names) <= 5 and len(set(names)) == len(names)  # target unambiguous
        assert world.instruction == f"go to the {world.target.name}"
        for i, a in enumerate(world.objects):
            for b in world.objects[i + 1 :]:
                assert math.hypot(a.x - b.x, a.y - b.y) > a.radius + b.radius
        assert world.distance_to(world.target) >= world.config.min_start_distance
        in_view += world.in_view(world.target)
    assert 3 <= in_view <= 27  # some episodes need a search, some do not


def test_robot_cannot_leave_the_arena():
    world = scene([SceneObject("ball", "red", -2.0, -2.0)], robot=Robot(2.5, 0.0, 0.0))
    for _ in range(100):
        world.step(0.5, 0.0, 0.1)
    lim = world.config.arena_size / 2 - world.config.robot_radius
    assert abs(world.robot.x) <= lim


def test_expert_searches_left_when_target_out_of_view():
    for target_y in (2.0, -2.0):  # target to the left or to the right, both outside the view
        world = scene([SceneObject("ball", "red", 0.0, target_y)])
        assert not world.in_view(world.target)
        assert expert_action(world) == {"action": "move", "linear_x": 0.0, "angular_z": 0.6}


def test_expert_steers_toward_visible_target():
    left = expert_action(scene([SceneObject("ball", "red", 2.0, 0.8)]))
    right = expert_action(scene([SceneObject("ball", "red", 2.0, -0.8)]))
    ahead = expert_action(scene([SceneObject("ball", "red", 2.0, 0.0)]))
    assert left["action"] == "move" and left["angular_z"] > 0 and 0 < left["linear_x"] < 0.3
    assert right["angular_z"] < 0 and right["angular_z"] == -left["angular_z"]
    assert ahead == {"action": "move", "linear_x": 0.3, "angular_z": 0.0}


def test_expert_stops_within_radius():
    world = scene([SceneObject("ball", "red", 0.38, 0.0)])
    assert success(world)
    assert expert_action(world) == {"action": "stop"}
    assert not success(scene([SceneObject("ball", "red", 0.8, 0.0)]))


def test_expert_stops_with_a_margin_inside_the_success_radius():
    near = scene([SceneObject("ball", "red", 0.45, 0.0)])  # a success already, but the expert drives on
    assert success(near) and stop_distance(near) == pytest.approx(0.4)
    assert expert_action(near)["action"] == "move"
    cube = scene([SceneObject("cube", "red", 0.44, 0.0)])  # a cube blocks the robot at 0.43 m: stop before
    assert stop_distance(cube) == pytest.approx(0.45) and expert_action(cube) == {"action": "stop"}
    no_margin = ExpertConfig(stop_margin=0.0)
    assert expert_action(near, no_margin) == {"action": "stop"}


def test_expert_actions_are_in_range_and_rounded():
    for seed in range(5):
        for step in run_episode(seed, render=False):
            a = step.action
            if a["action"] == "move":
                assert 0.0 <= a["linear_x"] <= 0.5 and -1.0 <= a["angular_z"] <= 1.0
                assert a["linear_x"] == round(a["linear_x"], 2) and a["angular_z"] == round(a["angular_z"], 2)
            else:
                assert a == {"action": "stop"}


def test_closed_loop_expert_reaches_target():
    reached = 0
    for seed in range(20):
        steps = list(run_episode(seed, render=False))
        last = steps[-1]
        reached += last.reached and last.action == {"action": "stop"}
        assert steps[0].t == 0.0 and steps[1].t == pytest.approx(0.1)
    assert reached >= 19


def test_episode_holds_stop_and_renders_frames():
    cfg = EpisodeConfig(rate_hz=5.0, stop_hold_s=1.0)
    steps = list(run_episode(3, WorldConfig(width=96, height=72), ExpertConfig(), cfg))
    assert all(s.frame.shape == (72, 96, 3) for s in steps)
    stops = [s for s in steps if s.action["action"] == "stop"]
    assert len(stops) == 1 + 5 and steps[-1].reached  # first stop + 1 s at 5 Hz
    assert len(steps) <= cfg.max_duration_s * cfg.rate_hz
