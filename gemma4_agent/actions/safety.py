"""Safety limits applied to every command before it is published. Pure functions (ROS-free), plus a
small stateful `SafetyFilter` that chains them for a stream of commands.

A twist here is a dict {"linear_x": m/s, "angular_z": rad/s}; the ROS adapter builds the message.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

from .spec import TWIST_FIELDS, ActionSpec, SafetyLimits, TwistFromField

Twist = Dict[str, float]


def zero_twist() -> Twist:
    return {k: 0.0 for k in TWIST_FIELDS}


def _finite(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError, OverflowError):
        return 0.0
    return v if math.isfinite(v) else 0.0


def action_to_twist(action: Mapping[str, Any], spec: ActionSpec) -> Twist:
    """The Twist fields of a (validated) action, from the spec's `twist` mapping. Unknown actions and
    non-numeric values give zeros. Not limited: pass the result through `clamp_twist`."""
    out = zero_twist()
    try:
        definition = spec.actions.get(action.get("action")) if isinstance(action, Mapping) else None
    except TypeError:
        definition = None
    if definition is None:
        return out
    for key, ref in definition.twist.items():
        if isinstance(ref, TwistFromField):
            value = _finite(action.get(ref.field)) * ref.scale
        elif isinstance(ref, str):
            value = _finite(action.get(ref))
        else:
            value = float(ref)
        out[key] = _finite(value)
    return out


def _clip(x: float, bound: float) -> float:
    return min(max(x, -bound), bound)


def clamp_twist(twist: Mapping[str, Any], limits: SafetyLimits) -> Twist:
    """Each field into [-max, +max]; NaN/Inf/missing -> 0."""
    return {"linear_x": _clip(_finite(twist.get("linear_x", 0.0)), limits.max_linear_x),
            "angular_z": _clip(_finite(twist.get("angular_z", 0.0)), limits.max_angular_z)}


def ramp(prev: float, target: float, dt: float, accel: float, decel: float) -> float:
    """One axis: move from `prev` toward `target` within `dt` seconds, speeding up at most at `accel`
    and slowing down (toward 0) at most at `decel` (units/s^2). A sign change slows to 0 first."""
    prev, target = _finite(prev), _finite(target)
    dt = _finite(dt)
    if dt <= 0.0 or target == prev:
        return prev
    v, t_left = prev, dt
    if v != 0.0 and (target * v <= 0.0 or abs(target) < abs(v)):
        goal = target if target * v > 0.0 else 0.0          # slow down toward goal (same sign or 0)
        need = abs(v - goal)
        can = decel * t_left
        if can < need:
            return v - math.copysign(can, v)
        t_left -= need / decel if decel > 0 else t_left
        v = goal
    if v == target:
        return v
    can = accel * t_left                                     # speed up from v (0 or same sign) to target
    return v + _clip(target - v, can)


def rate_limit(prev: Optional[Mapping[str, Any]], target: Mapping[str, Any], dt: float,
               limits: SafetyLimits) -> Twist:
    """Limit the change from the previous command over `dt` seconds (acceleration limits). No
    previous command: the robot is taken to be at rest. dt <= 0: the previous command is kept."""
    p = zero_twist() if prev is None else {k: _finite(prev.get(k, 0.0)) for k in TWIST_FIELDS}
    return {"linear_x": ramp(p["linear_x"], _finite(target.get("linear_x", 0.0)), dt,
                             limits.max_linear_accel, limits.linear_decel),
            "angular_z": ramp(p["angular_z"], _finite(target.get("angular_z", 0.0)), dt,
                              limits.max_angular_accel, limits.angular_decel)}


def watchdog_expired(last_valid_s: Optional[float], now_s: float, timeout_s: float) -> bool:
    """True when no valid command came for `timeout_s` (or none ever came)."""
    if last_valid_s is None:
        return True
    try:
        age = float(now_s) - float(last_valid_s)
    except (TypeError, ValueError):
        return True
    return not (age <= timeout_s)  # NaN -> expired


def apply_watchdog(twist: Mapping[str, Any], last_valid_s: Optional[float], now_s: float,
                   timeout_s: float) -> Twist:
    """Zero twist when the watchdog expired, else the twist unchanged."""
    if watchdog_expired(last_valid_s, now_s, timeout_s):
        return zero_twist()
    return {k: _finite(twist.get(k, 0.0)) for k in TWIST_FIELDS}


@dataclass
class SafetyOutput:
    twist: Twist
    watchdog: bool = False      # zeroed by the watchdog
    clamped: bool = False       # a field was outside the limits
    rate_limited: bool = False  # the acceleration limit changed the command


class SafetyFilter:
    """Clamp -> acceleration limit against the previous published command -> watchdog.

    `step(twist, now_s, valid)`: `valid` is False when `twist` comes from a fallback (it then does
    not refresh the watchdog). The watchdog zero is immediate (not rate limited).
    """

    def __init__(self, limits: SafetyLimits):
        self.limits = limits
        self.reset()

    def reset(self) -> None:
        self.prev: Optional[Twist] = None
        self.prev_s: Optional[float] = None
        self.last_valid_s: Optional[float] = None

    def step(self, twist: Mapping[str, Any], now_s: float, valid: bool = True) -> SafetyOutput:
        now_s = _finite(now_s)
        if valid:
            self.last_valid_s = now_s
        target = clamp_twist(twist, self.limits)
        clamped = any(target[k] != _finite(twist.get(k, 0.0)) for k in TWIST_FIELDS)
        if watchdog_expired(self.last_valid_s, now_s, self.limits.command_timeout_s):
            out = SafetyOutput(zero_twist(), watchdog=True, clamped=clamped)
        else:
            dt = 0.0 if self.prev_s is None else now_s - self.prev_s
            limited = rate_limit(self.prev, target, dt, self.limits)
            out = SafetyOutput(limited, clamped=clamped, rate_limited=limited != target)
        self.prev, self.prev_s = dict(out.twist), now_s
        return out

    def check(self, now_s: float) -> SafetyOutput:
        """Timer tick without a new command: the watchdog zero if it expired, else the last command."""
        if watchdog_expired(self.last_valid_s, now_s, self.limits.command_timeout_s):
            self.prev, self.prev_s = zero_twist(), _finite(now_s)
            return SafetyOutput(zero_twist(), watchdog=True)
        return SafetyOutput(dict(self.prev) if self.prev else zero_twist())
