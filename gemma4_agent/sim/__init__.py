"""Synthetic world for training and evaluating the agent without a robot.

`world` holds the arena, the robot and the camera renderer; `expert` the privileged policy
that produces the reference commands; `episodes` runs the two together; `generate_bags` writes
episodes as ROS 2 bags.
"""
from gemma4_agent.sim.expert import ExpertConfig, action_to_twist, expert_action, success
from gemma4_agent.sim.episodes import EpisodeConfig, EpisodeStep, run_episode, run_expert
from gemma4_agent.sim.world import SceneObject, World, WorldConfig

__all__ = [
    "EpisodeConfig",
    "EpisodeStep",
    "ExpertConfig",
    "SceneObject",
    "World",
    "WorldConfig",
    "action_to_twist",
    "expert_action",
    "run_episode",
    "run_expert",
    "success",
]
