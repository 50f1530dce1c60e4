"""`gemma4-agent train-demo` end to end at a tiny size (1 episode, 2 steps, 1 DAgger episode after the
first step): the engine folder it writes loads and verifies."""
from __future__ import annotations

import argparse
import json

from gemma4_agent.engines.manifest import read_manifest
from gemma4_agent.model import ModelConfig, load_model


def test_train_demo_smoke(tmp_path):
    from gemma4_agent.demo import train

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "engine"), "--episodes", "1", "--steps", "2", "--batch", "4",
                              "--eval-episodes", "0", "--workers", "1", "--dagger-episodes", "1", "--quiet"])
    assert train.run(args) == 0
    out = tmp_path / "engine"
    read_manifest(out)
    model = load_model(out)
    assert model.config.fingerprint() == ModelConfig.from_json(out).fingerprint()
    training = json.loads((out / "training.json").read_text())
    assert training["steps_done"] == 2 and training["train_frames"] > 0
    assert training["dagger"]["episodes"] == 1 and training["dagger"]["frames"] > 0
