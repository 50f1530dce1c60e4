"""Quantized checkpoints end to end: quantize -> save -> load_model -> logits equal the fake-quantized float
model; the streaming session and the agent engine run on them; the quantize CLI; the quality report and the
GPU check script in their CPU modes."""
import copy
import json

import numpy as np
import pytest
import torch

from gemma4_agent.engine import SessionConfig, StreamingSession
from gemma4_agent.engines.torch_engine import write_torch_engine
from gemma4_agent.model import load_model
from gemma4_agent.model.loader import checkpoint_metadata
from gemma4_agent.model.tokenizer import PromptBuilder
from gemma4_agent.quant.int4 import (Int4Embedding, Int4Linear, decoder_linears, fake_quantize, int4_backend,
                                     quantize_model, save_quantized)
from gemma4_agent.quant.quality import compare_models, random_frames, tiny_random_model
from gemma4_agent.quant.quantize_cli import calibration_batches, quantize_checkpoint

from conftest import BOI, EOI, IMAGE, tiny_tokenizer


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    model, cfg_json = tiny_random_model(0)
    return write_torch_engine(tmp_path_factory.mktemp("src") / "float", model=model, config_json=cfg_json,
                              tokenizer=tiny_tokenizer(512),
                              agent_defaults={"image_tokens": 70, "instruction": "go to the red ball"})


def _batches(model, n=2, seed=5):
    return calibration_batches(model, random_frames(n, seed=seed))


@pytest.mark.parametrize("embedding", [False, True])
def test_q4_0_save_load_equals_fake_quantized(engine_dir, tmp_path, embedding):
    src = load_model(engine_dir)
    cfg_json = json.loads((engine_dir / "config.json").read_text())
    fake = copy.deepcopy(src)
    with torch.no_grad():
        for _, m in decoder_linears(fake):
            m.weight.copy_(fake_quantize(m.weight, "q4_0"))
        if embedding:
            fake.embed_tokens.weight.copy_(fake_quantize(fake.embed_tokens.weight, "q4_0"))
    quantize_model(src, "q4_0", include_embedding=embedding, progress=False)
    out = save_quantized(src, cfg_json, tmp_path / "q", source=engine_dir)
    meta = json.loads(checkpoint_metadata(out)["gemma4_agent.quantization"])
    assert meta["scheme"] == "q4_0" and meta["group_size"] == 32 and meta["format"] == 1
    assert meta["layers"] == ("decoder_linear+embedding" if embedding else "decoder_linear")
    assert (out / "tokenizer.json").is_file() and (out / "agent.json").is_file()
    loaded = load_model(out)
    assert all(isinstance(m, Int4Linear) for _, m in decoder_linears(loaded))
    assert isinstance(loaded.embed_tokens, Int4Embedding) == embedding
    batch = _batches(loaded, 1)[0]
    ref = fake(**batch)
    with int4_backend("dequant"):  # float32 dequantized weights: identical to the fake-quantized model
        assert torch.equal(loaded(**batch), ref)
    got = loaded(**batch)  # packed CPU kernel: bf16 activations and bf16 scales, like a bf16 model
    bf16 = float((copy.deepcopy(fake).to(torch.bfloat16)(**batch).float() - ref).norm() / ref.norm())
    assert float((got - ref).norm() / ref.norm()) < max(5e-2, 3 * bf16)
    # bf16 load keeps the packed weights and fp16 scales exactly
    loaded16 = load_model(out, dtype=torch.bfloat16)
    assert loaded16.layers[0].mlp.up_proj.scales.dtype == torch.int16
    assert torch.equal(loaded16.layers[0].mlp.up_proj.dequantize(), loaded.layers[0].mlp.up_proj.dequantize())


def test_awq_save_load_and_session(engine_dir, tmp_path):
    src = load_model(engine_dir)
    cfg_json = json.loads((engine_dir / "config.json").read_text())
    float_model = copy.deepcopy(src)
    quantize_model(src, "awq-g128", calib=_batches(src, 3, seed=1), progress=False)
    assert src.layers[0].self_attn.o_proj.input_scale is not None
    assert src.layers[0].self_attn.q_proj.input_scale is None  # folded into input_layernorm
    out = save_quantized(src, cfg_json, tmp_path / "awq", source=engine_dir)
    loaded = load_model(out)
    batch = _batches(loaded, 1, seed=9)[0]
    with int4_backend("dequant"):
        assert torch.allclose(loaded(**batch), src(**batch), atol=1e-5)
    assert compare_models(float_model, loaded, [batch])["kl_mean"] < 1.0
    # the streaming engine runs unchanged on the quantized model (prefix and window modes)
    prompts = PromptBuilder(tiny_tokenizer(512), IMAGE, BOI, EOI)
    for mode in ("prefix", "window"):
        session = StreamingSession(loaded, prompts, SessionConfig(mode=mode, image_tokens=70, max_new_tokens=4,
                                                                  max_prefix=32, max_context=400, window_frames=2))
        session.set_prefix("go to the red ball")
        for frame in random_frames(3, seed=2):
            result = session.step(frame)
            assert len(result.tokens) == 4 and result.timings_ms["total"] > 0


def test_session_cache_reuse_is_exact_on_quantized_model(engine_dir, tmp_path):
    """Prefix-mode logits equal a from-scratch recompute ('none' mode) on the int4 model, kernel path included."""
    src = load_model(engine_dir)
    quantize_model(src, "q4_0", include_embedding=True, progress=False)
    out = save_quantized(src, json.loads((engine_dir / "config.json").read_text()), tmp_path / "q", source=engine_dir)
    model = load_model(out)
    prompts = PromptBuilder(tiny_tokenizer(512), IMAGE, BOI, EOI)
    results = {}
    for mode in ("prefix", "none"):
        session = StreamingSession(model, prompts, SessionConfig(mode=mode, image_tokens=70, max_new_tokens=3,
                                                                 max_prefix=32, max_context=200))
        session.set_prefix("go to the green cube")
        results[mode] = [session.step(f, keep_logits=True) for f in random_frames(2, seed=3)]
    for a, b in zip(results["prefix"], results["none"]):
        for la, lb in zip(a.logits_log, b.logits_log):
            assert float((la - lb).norm() / lb.norm()) < 5e-2


def test_quantize_cli(engine_dir, tmp_path):
    import cv2

    from gemma4_agent.cli import main
    from gemma4_agent.engines.backends import load_engine

    images = tmp_path / "frames"
    images.mkdir()
    for i, frame in enumerate(random_frames(3, seed=7)):
        cv2.imwrite(str(images / f"{i:03d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    assert main(["quantize", str(engine_dir), str(tmp_path / "q"), "--scheme", "q4_0"]) == 0
    assert main(["quantize", str(engine_dir), str(tmp_path / "awq"), "--scheme", "awq-g128", "--calib", str(images),
                 "--embedding", "--frames", "2"]) == 0
    assert main(["quantize", str(engine_dir), str(tmp_path / "bad"), "--scheme", "awq-g128"]) == 2  # no --calib
    assert main(["quantize", str(tmp_path / "q"), str(tmp_path / "again"), "--scheme", "q4_0"]) == 2  # already int4
    engine = load_engine(tmp_path / "awq")  # manifest rewritten: the output is an engine folder too
    assert isinstance(engine.model.embed_tokens, Int4Embedding)
    session = StreamingSession(engine.model, engine.prompts, SessionConfig(image_tokens=70, max_new_tokens=2,
                                                                           max_prefix=32, max_context=200))
    session.set_prefix("go to the red ball")
    assert len(session.step(random_frames(1)[0]).tokens) == 2


def test_quantized_manifest_names_the_torch_that_wrote_it(engine_dir, tmp_path):
    import shutil

    from gemma4_agent.engines.manifest import read_manifest, write_manifest

    src = tmp_path / "src"
    shutil.copytree(engine_dir, src)
    old = read_manifest(src, verify_files=False)
    files = sorted(p.name for p in src.iterdir() if p.is_file() and p.name != "manifest.json")
    write_manifest(src, old.model_copy(update={"library_versions": {"torch": "1.0.0", "onnx": "1.2.3"}}), files)
    quantize_checkpoint(src, tmp_path / "q", "q4_0", progress=False)
    new = read_manifest(tmp_path / "q")
    assert new.quant == "q4_0"
    assert new.library_versions == {"torch": torch.__version__.split("+")[0], "onnx": "1.2.3"}


def test_quality_and_gpu_check_cpu_modes(tmp_path, capsys):
    from gemma4_agent.quant import gpu_check
    from gemma4_agent.quant.quality import markdown_table

    model, _ = tiny_random_model(1)
    q = quantize_model(copy.deepcopy(model), "q4_0", progress=False)
    row = compare_models(model, q, _batches(model, 2))
    assert 0 <= row["top1"] <= 1 and row["kl_mean"] >= 0
    assert "| x |" in markdown_table({"x": row})
    assert gpu_check.main(["--reduced", "--device", "cpu", "--json", str(tmp_path / "g.json"), "--iters", "1"]) == 0
    result = json.loads((tmp_path / "g.json").read_text())
    assert all(r["ok"] for r in result["accuracy"])
    assert result["bytes"]["total_bytes"] < result["bytes"]["bf16_bytes"]


def test_quantize_cli_calibration_source_errors(engine_dir, tmp_path, capsys):
    from gemma4_agent.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["quantize", str(engine_dir), str(tmp_path / "q"), "--scheme", "awq-g128", "--calib", str(empty)]) == 2
    assert "no images" in capsys.readouterr().err
    assert main(["quantize", str(engine_dir), str(tmp_path / "q"), "--scheme", "awq-g128",
                 "--calib", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()  # nothing half-written


def test_quantize_cli_refuses_a_used_dst_and_corrupt_weights(engine_dir, tmp_path):
    """Run as a user does (a subprocess): one error line, exit 2, nothing of what is there overwritten."""
    import shutil
    import subprocess
    import sys

    def quantize(src, dst):
        proc = subprocess.run([sys.executable, "-m", "gemma4_agent.cli", "quantize", str(src), str(dst),
                               "--scheme", "q4_0"], capture_output=True, text=True, timeout=300)
        err = proc.stderr.strip()
        assert proc.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
        return err

    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    assert "exists and is not empty" in quantize(engine_dir, used)
    assert [p.name for p in used.iterdir()] == ["notes.txt"]
    before = {p.name: p.read_bytes() for p in engine_dir.iterdir()}
    assert "exists and is not empty" in quantize(engine_dir, engine_dir)  # into its own source
    assert {p.name: p.read_bytes() for p in engine_dir.iterdir()} == before
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    assert "exists and is not a folder" in quantize(engine_dir, a_file)
    cut = tmp_path / "cut"
    shutil.copytree(engine_dir, cut)
    (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:1000])
    assert "is not a readable safetensors file" in quantize(cut, tmp_path / "q")
    assert not (tmp_path / "q").exists()
