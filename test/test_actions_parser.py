"""Defensive parser: never raises, never returns a command outside the configured ranges."""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from gemma4_agent.actions import ActionParser, ParseStats, action_to_twist, load_action_spec, parse_action

SPEC = load_action_spec()
MOVE = SPEC.fields["move"]


def assert_in_range(action):
    """The returned action is a valid action of the spec, inside its ranges."""
    assert isinstance(action, dict)
    assert action["action"] in SPEC.actions
    assert SPEC.validate(action) == action
    for name, info in SPEC.fields[action["action"]].items():
        v = action[name]
        if info.type != "enum":
            assert math.isfinite(v) and info.min <= v <= info.max
    tw = action_to_twist(action, SPEC)
    assert all(math.isfinite(x) for x in tw.values())


@pytest.mark.parametrize("text, reason", [
    ('{"action":"move","linear_x":0.30,"angular_z":-0.25}', None),
    ('  {"action": "move", "angular_z": 1, "linear_x": 0.5}\n', None),
    ('{"action":"stop"}', None),
    ("", "empty"),
    ("   ", "empty"),
    ("go forward", "not_json"),
    ('{"action":"move","linear_x":0.3', "truncated"),
    ('{"action":"mo', "truncated"),
    ('{"action":"move","linear_x":0.30,"angular_z":-0.25}}', "not_json"),
    ('[1, 2]', "not_object"),
    ('"stop"', "not_object"),
    ('{"linear_x":0.3}', "missing_action"),
    ('{"action":"fly"}', "unknown_action"),
    ('{"action":3}', "wrong_type"),
    ('{"action":"move","linear_x":0.3}', "missing_key"),
    ('{"action":"stop","speed":1}', "extra_key"),
    ('{"action":"move","linear_x":0.3,"angular_z":0,"x":1}', "extra_key"),
    ('{"action":"move","linear_x":NaN,"angular_z":0}', "non_finite"),
    ('{"action":"move","linear_x":Infinity,"angular_z":0}', "non_finite"),
    ('{"action":"move","linear_x":-Infinity,"angular_z":0}', "non_finite"),
    ('{"action":"move","linear_x":1e400,"angular_z":0}', "non_finite"),
    ('{"action":"move","linear_x":0.51,"angular_z":0}', "out_of_range"),
    ('{"action":"move","linear_x":0.3,"angular_z":-1.01}', "out_of_range"),
    ('{"action":"move","linear_x":"0.3","angular_z":0}', "wrong_type"),
    ('{"action":"move","linear_x":true,"angular_z":0}', "wrong_type"),
    ('{"action":"move","linear_x":null,"angular_z":0}', "wrong_type"),
    ('{"action":"move","linear_x":0.1,"linear_x":0.2,"angular_z":0}', "duplicate_key"),
    ('{"action":"move","linear_x":' + "9" * 5000 + ',"angular_z":0}', "too_long"),
    ('{"action":"move","linear_x":' + "9" * 100 + ',"angular_z":0}', "out_of_range"),
    ("[" * 3000 + "]" * 3000, "too_long"),
    ("[" * 2000, "not_json"),  # nested too deeply (RecursionError inside json)
])
def test_cases(text, reason):
    r = parse_action(text, SPEC)
    assert r.ok == (reason is None), r
    assert r.reason == reason, r
    assert (r.error is None) == r.ok
    assert_in_range(r.action)
    if not r.ok:
        assert r.action == SPEC.stop_action()


def test_tiny_numbers_and_rounding():
    r = parse_action('{"action":"move","linear_x":1e-300,"angular_z":-4.9e-324}', SPEC)
    assert r.ok and r.action == {"action": "move", "linear_x": 0.0, "angular_z": 0.0}
    r = parse_action('{"action":"move","linear_x":0.4999999,"angular_z":0.123}', SPEC)
    assert r.ok and r.action["linear_x"] == 0.5 and r.action["angular_z"] == 0.12


def test_non_text_inputs():
    assert parse_action(None, SPEC).reason == "not_text"
    assert parse_action(b'{"action":"stop"}', SPEC).ok
    assert parse_action(b"\xff\xfe", SPEC).reason == "not_json"
    assert parse_action({"action": "stop"}, SPEC).reason == "not_text"


def test_hold_last_and_stats():
    parser = ActionParser(SPEC, fallback="hold_last")
    assert parser.parse("nope").action == SPEC.stop_action()  # nothing valid yet
    good = parser.parse('{"action":"move","linear_x":0.20,"angular_z":0.10}')
    assert good.ok
    bad = parser.parse('{"action":"move","linear_x":7,"angular_z":0}')
    assert not bad.ok and bad.reason == "out_of_range" and bad.action == good.action
    assert parser.parse("").action == good.action
    assert parser.stats.as_dict() == {"total": 4, "ok": 1, "failed": 3,
                                      "reasons": {"not_json": 1, "out_of_range": 1, "empty": 1}}
    stop_parser = ActionParser(SPEC, fallback="stop")
    stop_parser.parse('{"action":"move","linear_x":0.20,"angular_z":0.10}')
    assert stop_parser.parse("x").action == SPEC.stop_action()
    stats = ParseStats()
    parse_action("x", SPEC, stats=stats)
    parse_action('{"action":"stop"}', SPEC, stats=stats)
    assert stats.as_dict()["reasons"] == {"not_json": 1} and stats.ok == 1


def test_logs_first_occurrence(caplog):
    parser = ActionParser(SPEC)
    with caplog.at_level("WARNING", logger="gemma4_agent.actions"):
        parser.parse("x")
        parser.parse("y")
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1


# ---- property-based -------------------------------------------------------------------------------

numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-2, 2),
    st.integers(-10**30, 10**30),
    st.sampled_from([0, -0.0, 1e-320, 5e-324, 1e308, -1e308, 0.5, -0.2, 1.0, -1.0, 0.505, -0.205]),
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8)
keys = st.sampled_from(["action", "linear_x", "angular_z", "angle", "x", "", "ACTION", "linear_x "])


@st.composite
def action_like(draw):
    obj = {}
    if draw(st.booleans()):
        obj["action"] = draw(st.sampled_from(["move", "stop", "turn", "Move", ""]) | st.text(max_size=5) | json_values)
    for k in draw(st.lists(keys, max_size=5)):
        obj[k] = draw(numbers | json_values)
    if draw(st.booleans()):
        obj.update({"action": "move", "linear_x": draw(numbers), "angular_z": draw(numbers)})
    return obj


def dump(obj, rnd):
    text = json.dumps(obj, allow_nan=True, separators=rnd.choice([(",", ":"), (", ", ": ")]))
    return text


@st.composite
def texts(draw):
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.text())                                          # arbitrary unicode
    if kind == 1:
        return draw(st.binary()).decode("latin-1")
    obj = draw(action_like())
    text = json.dumps(obj, allow_nan=True)
    if kind == 2:
        return text[: draw(st.integers(0, len(text)))]                  # truncated
    if kind == 3:                                                       # numbers spelled oddly
        lx = draw(st.sampled_from(["1e400", "-1e400", "1e-400", "-0", "0.3e0", "3E-1", "NaN", "-Infinity",
                                   "00.3", ".3", "0x1", "+0.3", "0.30000000000000000000001", "9" * 400]))
        return '{"action":"move","linear_x":%s,"angular_z":0.00}' % lx
    if kind == 4:                                                       # unicode inserted at random
        i = draw(st.integers(0, len(text)))
        return text[:i] + draw(st.text(min_size=1, max_size=3)) + text[i:]
    return text


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts(), st.sampled_from(["stop", "hold_last"]))
def test_never_raises_never_out_of_range(text, policy):
    parser = ActionParser(SPEC, fallback=policy)
    parser.parse('{"action":"move","linear_x":0.50,"angular_z":-1.00}')
    r = parser.parse(text)
    assert isinstance(r.ok, bool)
    assert_in_range(r.action)
    if r.ok:
        assert r.error is None and r.reason is None
    else:
        assert r.error and r.reason
        expected = parser.last_valid if policy == "hold_last" else SPEC.stop_action()
        assert r.action == expected


@settings(max_examples=300, deadline=None)
@given(st.floats(-0.2, 0.5), st.floats(-1.0, 1.0))
def test_valid_values_round_trip(lx, az):
    text = SPEC.format_action({"action": "move", "linear_x": lx, "angular_z": az})
    r = parse_action(text, SPEC)
    assert r.ok, text
    assert abs(r.action["linear_x"] - lx) <= 0.005 + 1e-12 and abs(r.action["angular_z"] - az) <= 0.005 + 1e-12
    assert SPEC.format_action(r.action) == text
