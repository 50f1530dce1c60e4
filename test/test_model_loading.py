"""Checkpoint loading: sharded and single-file, bf16 and fp32, and the three error cases."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from gemma4_agent.model import CheckpointError, ModelConfig, build_model, load_model

from conftest import save_tiny_checkpoint


def _reference_logits(path):
    ids = torch.tensor([[2, 5, 6, 7, 8, 9, 10]])
    return ids, load_model(path)(ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_and_single_file_load_the_same(tmp_path, dtype):
    pytest.importorskip("transformers")
    single = save_tiny_checkpoint(tmp_path / "single", "kv_shared_window8")
    sharded = save_tiny_checkpoint(tmp_path / "sharded", "kv_shared_window8", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]) > 10
    a, b = load_model(single, dtype=dtype), load_model(sharded, dtype=dtype)
    assert a.embed_tokens.weight.dtype == dtype
    ids = torch.tensor([[2, 5, 6, 7, 8, 9, 10]])
    assert torch.equal(a(ids), b(ids))


def test_bf16_checkpoint_loads_as_fp32(tmp_path):
    pytest.importorskip("transformers")
    path = save_tiny_checkpoint(tmp_path / "ck", "kv_separate")
    tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(path / "model.safetensors").items()}
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    model = load_model(path, dtype=torch.float32)
    assert model.layers[0].self_attn.q_proj.weight.dtype == torch.float32


def _rewrite(path, change):
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    pytest.importorskip("transformers")
    path = save_tiny_checkpoint(tmp_path / "ck", "kv_separate")
    _rewrite(path, lambda t: t.pop("model.language_model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match="missing.*layers.1.mlp.up_proj.weight"):
        load_model(path)


def test_unexpected_tensor_is_named(tmp_path):
    pytest.importorskip("transformers")
    path = save_tiny_checkpoint(tmp_path / "ck", "kv_separate")
    _rewrite(path, lambda t: t.__setitem__("model.language_model.layers.0.self_attn.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="unexpected.*layers.0.self_attn.extra.weight"):
        load_model(path)


def test_misshaped_tensor_is_named(tmp_path):
    pytest.importorskip("transformers")
    path = save_tiny_checkpoint(tmp_path / "ck", "kv_separate")
    _rewrite(path, lambda t: t.__setitem__("model.language_model.norm.weight", torch.zeros(7)))
    with pytest.raises(CheckpointError, match=r"model.language_model.norm.weight.*\(7,\).*\(64,\)"):
        load_model(path)


def test_audio_weights_are_ignored(tiny_checkpoints):
    assert "model.embed_audio.embedding_projection.weight" in load_file(
        tiny_checkpoints["kv_separate"] / "model.safetensors")
    load_model(tiny_checkpoints["kv_separate"])


def test_missing_folder_and_bad_config(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="gemma4_unified"):
        load_model(tmp_path)


def test_corrupt_weights_and_malformed_index_are_named(tmp_path):
    from gemma4_agent.evaluation.dev_engine import write_random_engine
    from gemma4_agent.model.loader import checkpoint_metadata

    ck = write_random_engine(tmp_path / "ck")
    weights = ck / "model.safetensors"
    good = weights.read_bytes()
    for broken in (good[:1000], b"\xff" * 5000):  # cut short; garbage (a header length past the end)
        weights.write_bytes(broken)
        for call in (load_model, checkpoint_metadata):
            with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file .*corrupt"):
                call(ck)
    weights.write_bytes(good)
    load_model(ck)
    for index in ('{"weight_map": [1]}', "{", '{"weight_map": {}}'):
        (ck / "model.safetensors.index.json").write_text(index)
        with pytest.raises(CheckpointError, match="index"):
            load_model(ck)


def test_config_resolves_a_file_a_folder_or_a_preset(tmp_path):
    # what `inspect` and `bench --config` take: a config.json, a checkpoint folder holding one, or a preset's name
    preset = ModelConfig.preset("gemma4-12b")
    (tmp_path / "config.json").write_text(preset.model_dump_json())
    for given in (tmp_path / "config.json", tmp_path, str(tmp_path), "gemma4-12b"):
        assert ModelConfig.resolve(given).fingerprint() == preset.fingerprint(), given
    with pytest.raises(FileNotFoundError, match="not a preset .gemma4-12b"):
        ModelConfig.resolve("gemma4-13b")


def test_inspect_cli_names_what_is_wrong_without_a_traceback(tmp_path):
    (tmp_path / "llama.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "broken.json").write_text("{")
    preset = json.loads(ModelConfig.preset("gemma4-12b").model_dump_json())
    (tmp_path / "field.json").write_text(json.dumps(dict(preset, text_config=dict(preset["text_config"],
                                                                                  hidden_size="big"))))
    (tmp_path / "list.json").write_text("[]")
    for given, says in ((tmp_path / "nope", "not a preset"), (tmp_path / "llama.json", "expected 'gemma4_unified'"),
                        (tmp_path / "broken.json", "not valid JSON"),
                        (tmp_path / "field.json", "text_config.hidden_size: Input should be a valid integer"),
                        (tmp_path / "list.json", "expected a JSON object")):
        proc = subprocess.run([sys.executable, "-m", "gemma4_agent.cli", "inspect", str(given)], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "gemma4_agent.cli", "inspect", "gemma4-12b"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "11,957,272,576" in proc.stdout, proc.stderr


def test_12b_preset_on_meta_device():
    cfg = ModelConfig.preset("gemma4-12b")
    model = build_model(cfg, device="meta")
    n = model.num_parameters()
    assert round(n / 1e9, 2) == 11.96, n
    assert sum(1 for t in cfg.text_config.layer_types if t == "full_attention") == 8
    full = cfg.text_config.layer(5)
    assert (full.head_dim, full.num_kv_heads, full.k_eq_v) == (512, 1, True)
    assert model.layers[5].self_attn.v_proj is None and model.layers[0].self_attn.v_proj is not None


def test_importing_the_package_does_not_import_transformers():
    code = ("import sys, gemma4_agent, gemma4_agent.model, gemma4_agent.model.tokenizer; "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_auto_dtype_is_bf16_on_cuda_and_on_cpus_with_amx(monkeypatch):
    from gemma4_agent.model.loader import resolve_dtype

    assert resolve_dtype("float32", "cuda") == torch.float32 and resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)  # this CPU's answer, whichever it is
    assert resolve_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # a torch without the probe: the safe choice
    assert resolve_dtype("auto", "cpu") == torch.float32
