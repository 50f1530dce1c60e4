"""The agent core on a random-weight tiny model with the demo tokenizer: grammar-constrained decoding
always yields a schema-valid action, the budget is enforced, bad frames never crash."""
import json

import numpy as np
import pytest
import torch

from gemma4_agent.agent import Agent, AgentConfig
from gemma4_agent.actions import load_action_spec, parse_action
from gemma4_agent.demo.tokenizer import build_tokenizer
from gemma4_agent.engines.manifest import EngineError
from gemma4_agent.engines.torch_engine import write_torch_engine
from gemma4_agent.model import ModelConfig, build_model


def tiny_config(tokenizer) -> dict:
    ids = {t: tokenizer.token_to_id(t) for t in ("<|image>", "<image|>", "<|image|>")}
    return {
        "model_type": "gemma4_unified",
        "boi_token_id": ids["<|image>"], "eoi_token_id": ids["<image|>"], "image_token_id": ids["<|image|>"],
        "text_config": {"vocab_size": tokenizer.get_vocab_size(), "hidden_size": 64, "intermediate_size": 128,
                        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                        "global_head_dim": 32, "num_global_key_value_heads": 1, "attention_k_eq_v": True,
                        "sliding_window": 32, "final_logit_softcapping": 30.0,
                        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]},
        "vision_config": {"patch_size": 8, "pooling_kernel_size": 2, "mm_embed_dim": 32, "mm_posemb_size": 64,
                          "output_proj_dims": 32},
    }


@pytest.fixture(scope="module")
def random_engine(tmp_path_factory):
    tokenizer = build_tokenizer()
    cfg_json = tiny_config(tokenizer)
    torch.manual_seed(0)
    model = build_model(ModelConfig.model_validate(cfg_json))
    return write_torch_engine(tmp_path_factory.mktemp("eng") / "random", model=model, config_json=cfg_json,
                              tokenizer=tokenizer, agent_defaults={"image_tokens": 70, "instruction": "go to the red ball",
                                                                   "max_prefix": 64, "max_context": 256})


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


def test_unconstrained_random_model_rarely_speaks_json(random_engine):
    from gemma4_agent.engine.session import GreedySelector

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
