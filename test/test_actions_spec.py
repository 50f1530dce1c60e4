"""The action spec: YAML -> pydantic models, JSON schema, EBNF grammar, canonical text."""
from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from gemma4_agent.actions import SpecError, default_actions_path, load_action_spec
from gemma4_agent.actions.spec import ActionSpec, format_units, number_alternatives

BASE = {
    "decimals": 2, "fallback": "stop", "stop_action": "stop",
    "actions": {
        "move": {"fields": {"linear_x": {"type": "number", "unit": "m/s", "min": -0.2, "max": 0.5},
                            "angular_z": {"type": "number", "unit": "rad/s", "min": -1.0, "max": 1.0}},
                 "twist": {"linear_x": "linear_x", "angular_z": "angular_z"}},
        "stop": {"fields": {}, "twist": {"linear_x": 0.0, "angular_z": 0.0}},
    },
}


def with_extra_actions():
    d = copy.deepcopy(BASE)
    d["actions"]["turn"] = {"fields": {"angle": {"type": "number", "unit": "rad", "min": -1.57, "max": 1.57,
                                                 "decimals": 1 + 1}},
                            "twist": {"angular_z": {"field": "angle", "scale": 0.5}}}
    d["actions"]["grasp"] = {"fields": {"hand": {"type": "enum", "values": ["left", "right"]},
                                        "force": {"type": "integer", "min": 0, "max": 12}}}
    return d


def test_default_file_loads():
    spec = load_action_spec()
    assert default_actions_path().name == "actions.yaml"
    assert {"move", "stop"} <= set(spec.action_names)
    assert spec.fallback in ("stop", "hold_last")
    assert spec.stop_action() == {"action": spec.stop_action_name}
    mv = spec.fields["move"]
    assert mv["linear_x"].decimals == 2 and mv["angular_z"].decimals == 2
    assert -0.5 <= mv["linear_x"].min <= mv["linear_x"].max <= 0.5
    assert (mv["angular_z"].min, mv["angular_z"].max) == (-1.0, 1.0)
    s = spec.safety
    assert s.max_linear_x > 0 and s.max_angular_z > 0 and s.max_linear_accel > 0 and s.command_timeout_s > 0
    assert load_action_spec() is spec  # cached


def test_json_schema_bounds_every_number():
    spec = ActionSpec.from_dict(with_extra_actions())
    schema = spec.json_schema()
    assert schema["discriminator"]["propertyName"] == "action"
    defs = schema["$defs"]
    assert len(defs) == 4
    for d in defs.values():
        assert d["additionalProperties"] is False
        for name, prop in d["properties"].items():
            if prop.get("type") in ("number", "integer"):
                assert "minimum" in prop and "maximum" in prop, name
    assert defs["ActionMove"]["properties"]["linear_x"]["decimals"] == 2
    assert defs["ActionMove"]["properties"]["linear_x"]["unit"] == "m/s"
    json.dumps(schema)


def test_models_are_a_discriminated_union():
    spec = load_action_spec()
    assert spec.validate({"action": "move", "linear_x": 0.3, "angular_z": -1}) == \
        {"action": "move", "linear_x": 0.3, "angular_z": -1.0}
    for bad in [{"action": "move", "linear_x": 0.3}, {"action": "move", "linear_x": 0.9, "angular_z": 0},
                {"action": "stop", "x": 1}, {"action": "fly"}, {"action": "move", "linear_x": "0.3", "angular_z": 0},
                {"action": "move", "linear_x": True, "angular_z": 0}]:
        with pytest.raises(ValueError):
            spec.validate(bad)


def test_format_action_is_canonical():
    spec = load_action_spec()
    assert spec.format_action({"action": "move", "linear_x": 0.3, "angular_z": -0.25}) == \
        '{"action":"move","linear_x":0.30,"angular_z":-0.25}'
    assert spec.format_action({"action": "move", "linear_x": -0.0, "angular_z": 1}) == \
        '{"action":"move","linear_x":0.00,"angular_z":1.00}'
    assert spec.format_action({"action": "stop"}) == '{"action":"stop"}'
    assert "move" in spec.describe()


def test_new_actions_need_no_code():
    spec = ActionSpec.from_dict(with_extra_actions())
    assert spec.format_action({"action": "turn", "angle": -1.5}) == '{"action":"turn","angle":-1.50}'
    assert spec.format_action({"action": "grasp", "hand": "left", "force": 3}) == \
        '{"action":"grasp","hand":"left","force":3}'
    g = spec.ebnf()
    assert "act_turn" in g and "act_grasp" in g and '"\\"left\\""' in g


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d["actions"]["move"]["fields"]["linear_x"].update(min=1.0), "min"),
    (lambda d: d["actions"]["move"]["fields"]["linear_x"].update(max=0.505), "decimals"),
    (lambda d: d["actions"]["move"]["fields"]["linear_x"].pop("max"), "min and max"),
    (lambda d: d["actions"]["stop"]["fields"].update(x={"min": 0, "max": 1}), "no fields"),
    (lambda d: d.update(stop_action="halt"), "stop_action"),
    (lambda d: d["actions"]["move"]["twist"].update(linear_x="speed"), "unknown field"),
    (lambda d: d["actions"]["move"]["twist"].update(linear_y=0.0), "twist key"),
    (lambda d: d["actions"].update({"Bad-Name": {}}), "action name"),
    (lambda d: d["actions"]["move"]["fields"].update(action={"min": 0, "max": 1}), "field name"),
    (lambda d: d.update(fallback="explode"), "fallback"),
    (lambda d: d.update(unknown_key=1), "unknown_key"),
])
def test_invalid_specs_are_rejected(mutate, match):
    d = copy.deepcopy(BASE)
    mutate(d)
    with pytest.raises(SpecError, match=match):
        ActionSpec.from_dict(d)


def test_file_errors_are_one_line_naming_the_place(tmp_path):
    p = tmp_path / "a.yaml"
    p.write_text("actions:\n  move: [unclosed\n")
    with pytest.raises(SpecError) as err:
        load_action_spec(p)
    assert str(err.value) == f"{p}: not valid YAML: line 3, column 1: expected ',' or ']', but got '<stream end>'"
    p.write_text("actions:\n  move:\n    fields:\n      speed: {type: float, min: 0, max: 1}\n")
    with pytest.raises(SpecError) as err:
        load_action_spec(p)
    assert "\n" not in str(err.value) and "actions.move.fields.speed.type: Input should be" in str(err.value)
    assert "(got 'float')" in str(err.value)
    for missing in (tmp_path / "missing.yaml", tmp_path):  # a wrong path, or a folder
        with pytest.raises(FileNotFoundError, match="action file not found"):
            load_action_spec(missing)


def test_yaml_file_errors(tmp_path):
    p = tmp_path / "a.yaml"
    p.write_text("actions: [1, 2")
    with pytest.raises(SpecError):
        load_action_spec(p)
    with pytest.raises(FileNotFoundError):
        load_action_spec(tmp_path / "missing.yaml")


def _regex(alternatives):
    def tok(t):
        return re.escape(t[1:-1]) if t.startswith('"') else t
    return re.compile("|".join("".join(tok(t) for t in a.split()) for a in alternatives))


@settings(max_examples=150, deadline=None)
@given(st.integers(-2500, 2500), st.integers(0, 2600), st.integers(0, 3))
def test_number_grammar_spells_exactly_the_range(lo, width, decimals):
    hi = lo + width
    rx = _regex(number_alternatives(lo, hi, decimals))
    for u in range(lo - 3, hi + 4):
        text = format_units(u, decimals)
        assert bool(rx.fullmatch(text)) == (lo <= u <= hi), (lo, hi, decimals, text)
    # no other spelling: leading zeros, "+", "-0", missing decimals
    for bad in ["00", "+1", "-0", "1.", ".5", "01.00", "-0.00", "1e1"]:
        if bad != format_units(0, decimals) and not re.fullmatch(r"-?(0|[1-9]\d*)(\.\d{%d})?" % decimals, bad):
            assert not rx.fullmatch(bad)
    assert not rx.fullmatch("-" + format_units(0, decimals))


def test_longest_text_bounds_every_action_and_is_reached():
    # the agent's decode cap rests on it: no action the grammar allows is longer
    spec = load_action_spec()
    rng = np.random.default_rng(0)
    lengths = []
    for _ in range(500):
        name = spec.action_names[rng.integers(len(spec.action_names))]
        action = {"action": name}
        for field, info in spec.fields[name].items():
            action[field] = (info.spec.values[rng.integers(len(info.spec.values))] if info.type == "enum"
                             else rng.choice([info.min, info.max, rng.uniform(info.min, info.max)]))
        lengths.append(len(spec.format_action(action)))
    assert max(lengths) == spec.longest_text() == len('{"action":"move","linear_x":-0.20,"angular_z":-1.00}')
