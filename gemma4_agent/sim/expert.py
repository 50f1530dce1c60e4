"""The expert: a privileged-state policy whose commands are the reference actions.

It reads the true target position, but its decisions are chosen to be functions of what the
camera shows, so that a model seeing one frame can imitate it:
- target not in view  -> turn in place, always to the left (one direction: a single frame
  cannot tell which way the target is, so a "turn toward it" rule could not be learned);
- target in view      -> steer proportionally to its bearing (its horizontal image position),
  drive forward, slower when the bearing is large;
- target within the stop distance (it fills the lower image) -> stop. The stop distance lies
  `stop_margin` inside the success radius (but never closer than the robot can get to the
  target's footprint), so a learner that stops a frame or two early still succeeds.
Numbers are rounded to 2 decimals, the precision the action language carries.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from gemma4_agent.sim.world import World


class ExpertConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    search_angular: float = Field(0.6, gt=0.0, le=1.0)  # rad/s, always positive (left)
    max_linear: float = Field(0.3, gt=0.0, le=0.5)  # m/s when the target is straight ahead
    angular_gain: float = Field(1.5, gt=0.0)  # rad/s per rad of bearing
    max_angular: float = Field(1.0, gt=0.0, le=1.0)
    slow_bearing: float = Field(0.6, gt=0.0)  # bearing (rad) at which forward speed reaches 0
    view_margin: float = Field(0.05, ge=0.0)  # target centre must be this far inside the FOV (rad)
    stop_margin: float = Field(0.1, ge=0.0)  # stop this far inside the success radius (m) ...
    contact_clearance: float = Field(0.02, ge=0.0)  # ... or this far outside contact, whichever is farther


def _round(x: float) -> float:
    return round(x, 2) + 0.0  # + 0.0 turns -0.0 into 0.0


def success(world: World) -> bool:
    """The target is reached: robot centre within `success_radius` of the target centre."""
    return world.distance_to(world.target) <= world.config.success_radius


def stop_distance(world: World, config: ExpertConfig | None = None) -> float:
    """Robot centre to target centre (m) at which the expert stops: `stop_margin` inside the success
    radius, but no closer than `contact_clearance` outside contact with the target's footprint (a
    0.28 m cube blocks the 0.15 m robot at 0.43 m), and never outside the success radius."""
    cfg = config or ExpertConfig()
    c = world.config
    contact = world.target.radius + c.robot_radius + cfg.contact_clearance
    return min(c.success_radius, max(c.success_radius - cfg.stop_margin, contact))


def expert_action(world: World, config: ExpertConfig | None = None) -> dict:
    """The expert's action for the world's current state, in the project's action language."""
    cfg = config or ExpertConfig()
    target = world.target
    if world.distance_to(target) <= stop_distance(world, cfg):
        return {"action": "stop"}
    if not world.in_view(target, cfg.view_margin):
        return {"action": "move", "linear_x": 0.0, "angular_z": _round(cfg.search_angular)}
    bearing = world.bearing_to(target)
    angular = max(-cfg.max_angular, min(cfg.max_angular, cfg.angular_gain * bearing))
    linear = cfg.max_linear * max(0.0, 1.0 - abs(bearing) / cfg.slow_bearing)
    return {"action": "move", "linear_x": _round(min(0.5, linear)), "angular_z": _round(angular)}


def action_to_twist(action: dict) -> tuple[float, float]:
    """(linear_x, angular_z) of an action dict; "stop" and anything else -> (0, 0)."""
    if action.get("action") == "move":
        return float(action.get("linear_x", 0.0)), float(action.get("angular_z", 0.0))
    return 0.0, 0.0


__all__ = ["ExpertConfig", "action_to_twist", "expert_action", "stop_distance", "success"]
