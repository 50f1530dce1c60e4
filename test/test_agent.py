"""The agent core on a random-weight tiny model with the demo tokenizer: grammar-constrained decoding
always yields a schema-valid action, the budget is enforced, bad frames never crash."""
import gc
import json
import weakref

import numpy as np
import pytest
import torch

from gemma4_agent.agent import Agent, AgentConfig
from gemma4_agent.actions import load_action_spec, parse_action
from gemma4_agent.engine.kv_cache import CacheFull
from gemma4_agent.engines.manifest import EngineError
from gemma4_agent.evaluation.dev_engine import tiny_config, write_random_engine  # noqa: F401 (tiny_config: other tests)


@pytest.fixture(scope="module")
def random_engine(tmp_path_factory):
    return write_random_engine(tmp_path_factory.mktemp("eng") / "random")


def _frames(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (48 + 8 * (i % 3), 64, 3), dtype=np.uint8) for i in range(n)]


def test_constrained_actions_are_always_valid(random_engine):
    agent = Agent(AgentConfig(engine=random_engine, budget_ms=60_000))  # CI machines are slow and shared
    spec = load_action_spec()
    for frame in _frames(200):
        result = agent.act(frame)
        assert result.status == "ok", result
        assert parse_action(result.text, spec).ok, result.text
        assert abs(result.twist["linear_x"]) <= spec.safety.max_linear_x
        # jump-forward: one model call per free token at most
        assert result.decode_steps <= result.free_tokens


def test_bf16_on_cpu_acts_as_fp32_does(random_engine):
    # dtype auto is bf16 on CPUs with AMX (model.loader.resolve_dtype): the whole CPU path in bf16, every action valid
    agents = {d: Agent(AgentConfig(engine=random_engine, dtype=d, budget_ms=60_000)) for d in ("float32", "bfloat16")}
    assert next(agents["bfloat16"].session.model.parameters()).dtype == torch.bfloat16
    spec = load_action_spec()
    same = 0
    for frame in _frames(30, seed=2):
        results = {d: agent.act(frame) for d, agent in agents.items()}
        assert results["bfloat16"].status == "ok" and parse_action(results["bfloat16"].text, spec).ok
        same += results["bfloat16"].action["action"] == results["float32"].action["action"]
    assert same >= 24  # a random model's near-ties may flip under bf16's rounding; most frames agree


def test_unconstrained_random_model_rarely_speaks_json(random_engine):
    from gemma4_agent.actions.selectors import GreedySelector

    agent = Agent(AgentConfig(engine=random_engine))
    valid = 0
    for frame in _frames(20, seed=1):
        step = agent.session.step(frame, GreedySelector({1}))
        valid += parse_action(agent.engine.tokenizer.decode(step.tokens), agent.spec).ok
    assert valid <= 2


def test_budget_and_bad_frames(random_engine):
    agent = Agent(AgentConfig(engine=random_engine, budget_ms=60_000))
    assert agent.act(_frames(1)[0], stamp_s=10.0, now_s=70.5).status == "dropped_stale"
    for bad in (np.zeros((0, 5, 3), np.uint8), np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32), None):
        result = agent.act(bad)
        assert result.status == "bad_frame" and result.twist is None
    assert agent.act(_frames(1)[0]).status == "ok"  # keeps serving


def test_deadline_stops_decode_with_fallback(random_engine):
    agent = Agent(AgentConfig(engine=random_engine, budget_ms=60_000))
    result = agent.act(_frames(1)[0], stamp_s=0.0, now_s=59.9999)  # 0.1 ms left: decode cannot finish
    assert result.status == "fallback" and result.deadline_hit
    assert result.action == {"action": "stop"} and result.twist == {"linear_x": 0.0, "angular_z": 0.0}


def test_instruction_change_and_json(random_engine):
    agent = Agent(AgentConfig(engine=random_engine, budget_ms=60_000))
    agent.set_instruction("go to the blue cube")
    out = json.loads(agent.act(_frames(1)[0]).to_json(stamp=1.5))
    assert out["stamp"] == 1.5 and set(out["timings_ms"]) >= {"preprocess", "prefill", "decode", "total"}


def test_mismatched_engine_is_refused(random_engine, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(random_engine, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["text_config"]["sliding_window"] = 16
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EngineError):
        Agent(AgentConfig(engine=bad))
    with pytest.raises(EngineError, match="backend"):
        Agent(AgentConfig(engine=random_engine, backend="onnxruntime"))


def test_safety_overrides_are_validated_and_applied(random_engine):
    from pydantic import ValidationError

    agent = Agent(AgentConfig(engine=random_engine, budget_ms=60_000, safety={"max_linear_x": 0.05}))
    assert agent.safety.limits.max_linear_x == 0.05
    for frame in _frames(5, seed=3):
        assert abs(agent.act(frame).twist["linear_x"]) <= 0.05 + 1e-9
    with pytest.raises(ValidationError):
        agent.set_safety(max_linear_x=-1.0)
    assert agent.safety.limits.max_linear_x == 0.05  # a rejected change leaves the limits as they were
    with pytest.raises(ValidationError):
        Agent(AgentConfig(engine=random_engine, safety={"no_such_limit": 1.0}))


def test_reset_motion_restarts_the_acceleration_limit(random_engine):
    agent = Agent(AgentConfig(engine=random_engine, budget_ms=60_000))
    limits = agent.safety.limits
    agent.safety.step({"linear_x": limits.max_linear_x, "angular_z": 0.0}, 0.0, valid=True)
    agent.safety.step({"linear_x": limits.max_linear_x, "angular_z": 0.0}, 10.0, valid=True)
    agent.reset_motion()
    out = agent.safety.step({"linear_x": limits.max_linear_x, "angular_z": 0.0}, 10.01, valid=True)
    assert out.twist["linear_x"] <= limits.max_linear_accel * 0.01 + 1e-6  # from rest again


def test_compile_is_refused_for_prebuilt_backends(random_engine):
    with pytest.raises(ValueError, match="torch backend only"):
        AgentConfig(engine=random_engine, backend="onnxruntime", compile=True)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_an_agent_let_go_gives_back_its_model_and_memory(random_engine, device):
    # The node's cleanup + configure makes a new agent in the same process each time. What the one before held (its
    # model, cache and, on CUDA, graphs; compiled code keeps references of its own) must come back, or a robot
    # reconfigured a few times runs out of memory.
    models, allocated = [], []
    for _ in range(2):
        agent = Agent(AgentConfig(engine=random_engine, device=device, compile=True, budget_ms=60_000))
        for frame in _frames(3):
            assert agent.act(frame).status == "ok"
        models.append(weakref.ref(agent.session.model))
        del agent
        gc.collect()
        if device == "cuda":
            torch.cuda.synchronize()
            allocated.append(torch.cuda.memory_allocated())
    assert [m() for m in models] == [None, None]
    assert len(set(allocated)) <= 1, allocated  # the same after each: nothing kept from one agent to the next


@pytest.mark.parametrize("mode", ["prefix", "window"])
def test_an_image_budget_past_the_engines_context_gets_a_cache_that_holds_it(random_engine, mode):
    # the torch model's cache is sized by the agent: 560 image tokens and an action need more than the engine's
    # default context (256 positions after a 64-token prefix); a frame's chunk used to fail at configure
    agent = Agent(AgentConfig(engine=random_engine, image_tokens=560, mode=mode, window_frames=2, budget_ms=60_000))
    frames_kept = 1 if mode == "prefix" else 2
    assert agent.session.config.max_context == 64 + frames_kept * (560 + 64 + agent.max_new_tokens)
    for frame in _frames(3):  # window mode: the first frame evicted at the third
        result = agent.act(np.resize(frame, (480, 640, 3)))
        assert result.status == "ok", result


@pytest.mark.parametrize("mode", ["prefix", "window"])
def test_an_instruction_too_long_for_the_cache_is_refused_and_the_one_before_stays(random_engine, mode):
    # the node hands every instruction from its topic to the agent: one longer than the engine's max_prefix used to
    # be refused only after the cache was cleared, and the frames after it ran without their prompt. Two agents see
    # the same frames; one is also sent the long instruction in between.
    refusing, reference = (Agent(AgentConfig(engine=random_engine, mode=mode, budget_ms=60_000)) for _ in range(2))
    frame = _frames(1)[0]
    for agent in (refusing, reference):
        agent.session.step(frame)  # window mode: this frame stays in the window
    with pytest.raises(CacheFull, match="max_prefix is 64: shorten the instruction"):
        refusing.set_instruction("go to the red ball " * 40)
    assert refusing.instruction == "go to the red ball"
    a, b = (agent.session.step(frame, keep_logits=True).logits_log[0] for agent in (refusing, reference))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_an_action_longer_than_any_fixed_cap_is_decoded_whole(random_engine, tmp_path):
    # a vocabulary of one's own (config/actions.yaml says adding actions or fields needs no code change): an action
    # of seven 3-decimal fields is ~110 characters, past the 32 tokens the decode was capped at, so every one of them
    # was cut and fell back. The cap is now the longest action the vocabulary can spell.
    fields = {n: {"type": "number", "min": -10.0, "max": 10.0, "decimals": 3} for n in ("x", "y", "z", "yaw")}
    fields.update(roll={"type": "number", "min": -3.0, "max": 3.0, "decimals": 3}, pitch={"type": "enum",
                  "values": ["level", "up", "down"]}, speed={"type": "number", "min": 0.0, "max": 0.5, "decimals": 3})
    actions = {"version": 1, "decimals": 2, "fallback": "stop", "stop_action": "stop",
               "actions": {"pose": {"description": "go to a pose", "fields": fields,
                                    "twist": {"linear_x": "speed", "angular_z": 0.0}},
                           "stop": {"description": "stand still", "fields": {},
                                    "twist": {"linear_x": 0.0, "angular_z": 0.0}}}}
    path = tmp_path / "actions.yaml"
    path.write_text(json.dumps(actions))  # JSON is YAML
    agent = Agent(AgentConfig(engine=random_engine, actions=path, budget_ms=60_000))
    spec = load_action_spec(path)
    assert agent.max_new_tokens == spec.longest_text() + 1 > 100
    kinds = set()
    for frame in _frames(30):
        result = agent.act(frame)
        assert result.status == "ok", result
        kinds.add(result.action["action"])
    assert kinds == {"pose", "stop"}
