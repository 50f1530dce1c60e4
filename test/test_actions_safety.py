"""Safety limits: clamping, acceleration limit, watchdog; action -> twist mapping."""
from __future__ import annotations


import pytest
from hypothesis import given, settings, strategies as st

from gemma4_agent.actions import (SafetyFilter, SafetyLimits, action_to_twist, apply_watchdog, clamp_twist,
                                  load_action_spec, ramp, rate_limit, watchdog_expired, zero_twist)
from gemma4_agent.actions.spec import ActionSpec

SPEC = load_action_spec()
LIM = SafetyLimits(max_linear_x=0.5, max_angular_z=1.0, max_linear_accel=0.5, max_angular_accel=2.0,
                   max_linear_decel=1.0, max_angular_decel=4.0, command_timeout_s=1.0)


def test_action_to_twist():
    assert action_to_twist({"action": "move", "linear_x": 0.3, "angular_z": -0.25}, SPEC) == \
        {"linear_x": 0.3, "angular_z": -0.25}
    assert action_to_twist({"action": "stop"}, SPEC) == zero_twist()
    assert action_to_twist({"action": "nope"}, SPEC) == zero_twist()
    assert action_to_twist({"action": "move", "linear_x": float("nan"), "angular_z": "x"}, SPEC) == zero_twist()
    assert action_to_twist(None, SPEC) == zero_twist()
    spec = ActionSpec.from_dict({"actions": {
        "stop": {}, "turn": {"fields": {"angle": {"min": -1.5, "max": 1.5}},
                             "twist": {"angular_z": {"field": "angle", "scale": 0.5}}}}})
    assert action_to_twist({"action": "turn", "angle": 1.2}, spec) == {"linear_x": 0.0, "angular_z": 0.6}


def test_clamp():
    assert clamp_twist({"linear_x": 2.0, "angular_z": -3.0}, LIM) == {"linear_x": 0.5, "angular_z": -1.0}
    assert clamp_twist({"linear_x": 0.2, "angular_z": 0.3}, LIM) == {"linear_x": 0.2, "angular_z": 0.3}
    assert clamp_twist({"linear_x": float("nan"), "angular_z": float("inf")}, LIM) == zero_twist()
    assert clamp_twist({}, LIM) == zero_twist()


def test_acceleration_limit():
    # speeding up: 0.5 m/s^2 over 0.1 s -> +0.05
    assert rate_limit(zero_twist(), {"linear_x": 0.5, "angular_z": 1.0}, 0.1, LIM) == \
        pytest.approx({"linear_x": 0.05, "angular_z": 0.2})
    # slowing down uses the decel limit: 1.0 m/s^2 over 0.1 s -> -0.1
    assert rate_limit({"linear_x": 0.5, "angular_z": 0.0}, zero_twist(), 0.1, LIM)["linear_x"] == pytest.approx(0.4)
    # reversing: slow to 0 first (0.1 m/s at decel 1.0 takes 0.1 s), then speed up for the rest
    assert ramp(0.1, -0.2, 0.2, accel=0.5, decel=1.0) == pytest.approx(-0.05)
    # within the budget: the target itself
    assert rate_limit({"linear_x": 0.3, "angular_z": 0.1}, {"linear_x": 0.32, "angular_z": 0.0}, 0.1, LIM) == \
        pytest.approx({"linear_x": 0.32, "angular_z": 0.0})
    # no time, no change; no previous command: at rest
    assert rate_limit({"linear_x": 0.3, "angular_z": 0.1}, zero_twist(), 0.0, LIM) == {"linear_x": 0.3, "angular_z": 0.1}
    assert rate_limit(None, {"linear_x": 0.5, "angular_z": 0.0}, -1.0, LIM) == zero_twist()


@settings(max_examples=300, deadline=None)
@given(st.floats(-1, 1), st.floats(-1, 1), st.floats(0, 2))
def test_ramp_never_exceeds_the_limits(prev, target, dt):
    out = ramp(prev, target, dt, accel=0.5, decel=1.0)
    assert abs(out - prev) <= 1.0 * dt + 1e-9
    assert min(prev, target) - 1e-12 <= out <= max(prev, target) + 1e-12
    if abs(out) > abs(prev) + 1e-12:  # speeding up: at most accel * dt beyond the previous speed
        assert abs(out) - max(abs(prev), 0) <= 0.5 * dt + 1e-9


def test_watchdog():
    assert watchdog_expired(None, 5.0, 1.0)
    assert not watchdog_expired(4.5, 5.0, 1.0)
    assert watchdog_expired(3.9, 5.0, 1.0)
    assert watchdog_expired(4.5, float("nan"), 1.0)
    tw = {"linear_x": 0.3, "angular_z": 0.2}
    assert apply_watchdog(tw, 4.5, 5.0, 1.0) == tw
    assert apply_watchdog(tw, 3.0, 5.0, 1.0) == zero_twist()


def test_filter_sequence():
    f = SafetyFilter(LIM)
    go = {"linear_x": 0.9, "angular_z": 0.0}
    out = f.step(go, 0.0)
    assert out.twist == zero_twist() and out.clamped  # no previous command: at rest, dt 0
    out = f.step(go, 0.1)
    assert out.twist["linear_x"] == pytest.approx(0.05) and out.rate_limited
    for i in range(2, 20):
        out = f.step(go, i * 0.1)
    assert out.twist["linear_x"] == pytest.approx(0.5)  # clamped to max_linear_x
    # fallback commands (valid=False) do not refresh the watchdog: zero after command_timeout_s
    out = f.step(go, 2.5, valid=False)
    assert not out.watchdog and out.twist["linear_x"] == pytest.approx(0.5)
    out = f.step(go, 2.95, valid=False)
    assert out.watchdog and out.twist == zero_twist()
    assert f.check(3.0).watchdog
    # a valid command again ramps up from zero
    out = f.step(go, 3.1)
    assert out.twist["linear_x"] == pytest.approx(0.05)
    assert not f.check(3.2).watchdog and f.check(3.2).twist == out.twist
    assert f.check(5.0).watchdog
