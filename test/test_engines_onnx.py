"""ONNX export + the onnxruntime backend: the exported graphs, driven by the unchanged streaming
session, match the torch model (fp32, and q4_0 at ORT's exact accuracy level against the same q4_0
weights dequantized) frame after frame in prefix and window modes; the graphs pass onnx.checker and
use only operators TensorRT 10.3 parses; broken or mismatched engine folders are refused."""
import json
import re
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from gemma4_agent.engine import SessionConfig, StreamingSession  # noqa: E402
from gemma4_agent.engines.backends import load_engine  # noqa: E402
from gemma4_agent.engines.build_cli import build_engine  # noqa: E402
from gemma4_agent.engines.manifest import EngineError  # noqa: E402
from gemma4_agent.engines.onnx_export import (GRAPHS, fake_quantize_model, graph_ops, q4_0_fake_quant,  # noqa: E402
                                              q4_0_quantize)
from gemma4_agent.model import load_model  # noqa: E402
from gemma4_agent.model.tokenizer import PromptBuilder  # noqa: E402

from conftest import BOI, EOI, IMAGE, tiny_tokenizer  # noqa: E402

# ONNX operators the TensorRT 10.3 ONNX parser imports (onnx-tensorrt 10.x operators.md), restricted to
# the ones a transformer graph may plausibly use. A new op appearing in the export fails the test: check
# it against the parser's support matrix for TensorRT 10.3 before adding it here.
TENSORRT_10_3_OPS = {
    "Abs", "Add", "And", "ArgMax", "Cast", "Ceil", "Clip", "Concat", "Constant", "ConstantOfShape", "Cos",
    "CumSum", "DequantizeLinear", "Div", "Einsum", "Equal", "Erf", "Exp", "Expand", "Flatten", "Floor", "Gather",
    "GatherElements", "GatherND", "Gemm", "Greater", "GreaterOrEqual", "Identity", "If", "IsNaN",
    "LayerNormalization", "Less", "LessOrEqual", "Log", "MatMul", "Max", "Min", "Mul", "Neg", "Not", "Or", "Pow",
    "QuantizeLinear", "Range", "Reciprocal", "ReduceMax", "ReduceMean", "ReduceSum", "Relu", "Reshape",
    "ScatterElements", "ScatterND", "Shape", "Sigmoid", "Sin", "Slice", "Softmax", "Split", "Sqrt", "Squeeze",
    "Sub", "Tanh", "Tile", "TopK", "Transpose", "Unsqueeze", "Where",
}
CASES = [("kv_shared_window8", "none"), ("kv_separate", "none"), ("gqa_window3", "q4_0")]


@pytest.fixture(scope="module")
def ort_engines(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("ort_engines")
    return {(name, quant): build_engine(tiny_checkpoints[name], root / f"{name}_{quant}", "onnxruntime", quant,
                                        max_context=400, max_prefix=32, image_tokens=70, tokenizer=tiny_tokenizer(),
                                        log=lambda *_: None)
            for name, quant in CASES}


def _frames(n, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(24, 32), (32, 24), (16, 40)]
    return [rng.integers(0, 256, (*shapes[i % 3], 3), dtype=np.uint8) for i in range(n)]


@pytest.mark.parametrize("mode", ["prefix", "window"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_ort_session_matches_torch(ort_engines, tiny_checkpoints, case, mode):
    name, quant = case
    engine = load_engine(ort_engines[case], "onnxruntime")
    reference = load_model(tiny_checkpoints[name])
    if quant == "q4_0":
        unquantized = load_model(tiny_checkpoints[name])
        fake_quantize_model(reference)
    prompts = PromptBuilder(tiny_tokenizer(), IMAGE, BOI, EOI)
    cfg = SessionConfig(mode=mode, image_tokens=70, max_new_tokens=4, max_prefix=32, max_context=400,
                        window_frames=2, rebase_threshold=150)
    sessions = [StreamingSession(m, prompts, cfg) for m in (engine.model, reference)]
    for s in sessions:
        s.set_prefix("go to the red ball", system="user model")
    worst, compared, rebased = 0.0, 0, False
    for frame in _frames(6):
        before = sessions[0].next_pos
        got, want = (s.step(frame, keep_logits=True) for s in sessions)
        rebased |= sessions[0].next_pos < before
        assert got.tokens == want.tokens
        for a, b in zip(got.logits_log, want.logits_log):
            worst = max(worst, ((a - b).norm() / b.norm()).item())
            compared += 1
    assert compared == 6 * 4 and worst < 1e-3, worst
    assert sessions[0].next_pos == sessions[1].next_pos
    if mode == "window":
        assert rebased and len(sessions[0].blocks) == 2
    for k_ort, k_ref in zip(sessions[0].cache.k, sessions[1].cache.k):  # the KV written back in place
        assert torch.allclose(k_ort, k_ref, atol=1e-4)
    if quant == "q4_0":  # the quantization is real: the float model's logits differ much more
        s_float = StreamingSession(unquantized, prompts, cfg)
        s_float.set_prefix("go to the red ball", system="user model")
        s_q = StreamingSession(engine.model, prompts, cfg)
        s_q.set_prefix("go to the red ball", system="user model")
        frame = _frames(1, seed=5)[0]
        a, b = s_q.step(frame, keep_logits=True).logits_log[0], s_float.step(frame, keep_logits=True).logits_log[0]
        assert ((a - b).norm() / b.norm()).item() > 1e-3


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_graphs_check_and_use_tensorrt_ops(ort_engines, case):
    folder = ort_engines[case]
    for graph in GRAPHS:
        onnx.checker.check_model(str(folder / graph), full_check=True)
        ops = graph_ops(folder / graph)
        assert ops <= TENSORRT_10_3_OPS, f"{graph}: not in the TensorRT 10.3 list: {sorted(ops - TENSORRT_10_3_OPS)}"
    model = onnx.load(str(folder / "decode.onnx"), load_external_data=False)
    assert model.opset_import[0].version == 21
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    if case[1] == "q4_0":
        inits = {i.name: i for i in model.graph.initializer}
        assert dq and all(inits[n.input[0]].data_type == onnx.TensorProto.INT4 for n in dq)
        assert all({a.name: a.i for a in n.attribute}["block_size"] == 32 for n in dq)
    else:
        assert not dq
    # weights live in the one shared external-data file, stored once for prefill and decode
    external = {e.value for i in model.graph.initializer for e in i.external_data if e.key == "location"}
    assert external == {"weights.bin"}
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["backend"] == "onnxruntime" and manifest["quant"] == case[1]
    assert {"onnx", "onnxruntime", "torch"} <= set(manifest["library_versions"])
    assert set(manifest["files"]) >= {*GRAPHS, "weights.bin", "config.json", "tokenizer.json", "engine.json"}


def test_q4_0_matches_gguf_formula():
    w = torch.randn(4, 64)
    q, d = q4_0_quantize(w.numpy(), axis=1)
    assert q.dtype == np.int8 and q.min() >= -8 and q.max() <= 7 and d.shape == (4, 2)
    block = w[0, :32].numpy()
    amax = block[np.abs(block).argmax()]
    d_ref = np.float32(amax / -8.0)
    q_ref = np.minimum(15, (block * np.float32(1.0 / d_ref) + np.float32(8.5)).astype(np.int8)) - 8
    assert np.array_equal(q[0, :32], q_ref)
    assert d[0, 0] == np.float32(np.float16(d_ref))
    assert (q[:, :] == -8).any(axis=1).all()  # the amax element maps to -8 (d = amax / -8)
    err = (q4_0_fake_quant(w) - w).abs().max()
    assert 0 < err < w.abs().max() / 8


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_broken_engines_are_refused(ort_engines, tmp_path):
    good = ort_engines[CASES[0]]
    with pytest.raises(EngineError, match="built for backend 'onnxruntime', not 'torch'"):
        load_engine(good, "torch")
    with pytest.raises(EngineError, match="built for backend 'onnxruntime', not 'tensorrt'"):
        load_engine(good, "tensorrt")
    # built from another model config
    other = _copy(good, tmp_path / "other_config")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["config_hash"] = "0123456789abcdef"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="different model config"):
        load_engine(other, "onnxruntime")
    # config.json replaced after the build
    edited = _copy(good, tmp_path / "edited_config")
    cfg = json.loads((edited / "config.json").read_text())
    cfg["text_config"]["sliding_window"] = 5
    (edited / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EngineError, match="config.json"):
        load_engine(edited, "onnxruntime")
    # missing file
    missing = _copy(good, tmp_path / "missing")
    (missing / "weights.bin").unlink()
    with pytest.raises(EngineError, match="weights.bin listed in the manifest is missing"):
        load_engine(missing, "onnxruntime")
    # truncated file
    truncated = _copy(good, tmp_path / "truncated")
    data = (truncated / "weights.bin").read_bytes()
    (truncated / "weights.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(EngineError, match="truncated"):
        load_engine(truncated, "onnxruntime")
    # same size, corrupt bytes
    corrupt = _copy(good, tmp_path / "corrupt")
    raw = bytearray((corrupt / "prefill.onnx").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (corrupt / "prefill.onnx").write_bytes(bytes(raw))
    with pytest.raises(EngineError, match="prefill.onnx does not match its manifest hash"):
        load_engine(corrupt, "onnxruntime")
    # no manifest at all
    bare = _copy(good, tmp_path / "bare")
    (bare / "manifest.json").unlink()
    with pytest.raises(EngineError, match="no manifest.json"):
        load_engine(bare, "onnxruntime")
    # a file given where the folder was meant
    with pytest.raises(EngineError, match=f"is a file: give the engine.s folder \\({re.escape(str(good))} holds it\\)"):
        load_engine(good / "manifest.json", "onnxruntime")


def test_cli_build_and_verify(tiny_checkpoints, tmp_path, capsys):
    from gemma4_agent.cli import main

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints["same_head_dim"], ckpt)
    tiny_tokenizer().save(str(ckpt / "tokenizer.json"))
    (ckpt / "agent.json").write_text(json.dumps({"image_tokens": 70, "max_prefix": 32, "max_context": 256,
                                                 "instruction": "go to the red ball"}))
    out = tmp_path / "engines" / "tiny"
    assert main(["build-engine", "--checkpoint", str(ckpt), "--backend", "onnxruntime", "--quant", "none",
                 "--out", str(out)]) == 0
    assert (out / "agent.json").is_file() and (out / "manifest.json").is_file()
    report_path = tmp_path / "verify.json"
    assert main(["verify-engine", str(out), "--checkpoint", str(ckpt), "--frames", "3", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["frames"] == 3 and report["token_agreement"] == 1.0
    assert report["max_abs_logit_diff"] < 1e-3 and report["max_rel_logit_diff"] < 1e-3
    # verify against a checkpoint of another config: refused with a clear message
    assert main(["verify-engine", str(out), "--checkpoint", str(tiny_checkpoints["gqa_window3"])]) == 1
    assert "different model config" in capsys.readouterr().out
    # sizes and counts of 0 or less: refused by the parser before any work (were a tensor error's traceback, or
    # "no median for empty data")
    for args in (["build-engine", "--checkpoint", str(ckpt), "--out", str(tmp_path / "neg"), "--max-context", "-5"],
                 ["verify-engine", str(out), "--checkpoint", str(ckpt), "--frames", "0"]):
        with pytest.raises(SystemExit) as stop:
            main(args)
        assert stop.value.code == 2 and f"{args[-1]} must be greater than 0" in capsys.readouterr().err
    assert not (tmp_path / "neg").exists()
    # tensorrt cannot be built here: a clear error, nothing half-written claimed as an engine
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert main(["build-engine", "--checkpoint", str(ckpt), "--backend", "tensorrt", "--out",
                     str(tmp_path / "trt")]) == 1
        assert "TensorRT is not installed here" in capsys.readouterr().out


def _tiny_torch_engine(folder):
    """A random-weight torch engine with the demo tokenizer; agent.json: 70 image tokens, prefix 64, context 256."""
    from gemma4_agent.demo.tokenizer import build_tokenizer
    from gemma4_agent.engines.torch_engine import write_torch_engine
    from gemma4_agent.model import ModelConfig, build_model

    from test_agent import tiny_config

    tokenizer = build_tokenizer()
    cfg_json = tiny_config(tokenizer)
    defaults = {"image_tokens": 70, "instruction": "go to the red ball", "max_prefix": 64, "max_context": 256}
    return write_torch_engine(folder, model=build_model(ModelConfig.model_validate(cfg_json)), config_json=cfg_json,
                              tokenizer=tokenizer, agent_defaults=defaults)


def test_agent_runs_on_the_ort_engine(tmp_path):
    """The agent core (grammar-constrained decoding) on an onnxruntime engine built from a torch engine
    folder gives the same actions as on the torch engine."""
    from gemma4_agent.agent import Agent, AgentConfig

    torch_engine = _tiny_torch_engine(tmp_path / "torch")
    ort_engine = build_engine(torch_engine, tmp_path / "ort", "onnxruntime", "none", log=lambda *_: None)
    agents = [Agent(AgentConfig(engine=torch_engine, budget_ms=60_000)),  # no deadline: compare full decodes
              Agent(AgentConfig(engine=ort_engine, backend="onnxruntime", budget_ms=60_000))]
    rng = np.random.default_rng(3)
    for i in range(4):
        frame = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        # one clock for both: the safety filter's acceleration limit depends on the time between commands
        a, b = (agent.act(frame, stamp_s=0.1 * i, now_s=0.1 * i) for agent in agents)
        assert (a.status, a.text, a.twist, a.action) == (b.status, b.text, b.twist, b.action)


def test_an_engine_holds_the_context_and_image_budget_it_was_built_for(tmp_path):
    # build-engine --max-context / --image-tokens: the engine's agent.json says what it was built for (it kept the
    # checkpoint's, so the agent sized its cache for another engine). An image budget that needs more context than
    # the engine was built with is refused by name, with the --max-context that would hold it.
    from gemma4_agent.actions import load_action_spec
    from gemma4_agent.agent import Agent, AgentConfig

    action = load_action_spec().longest_text() + 1  # the decode cap: the longest action and its end token
    built = build_engine(_tiny_torch_engine(tmp_path / "torch"), tmp_path / "ort", "onnxruntime", "none",
                         max_context=800, image_tokens=140, log=lambda *_: None)
    defaults = json.loads((built / "agent.json").read_text())
    assert (defaults["image_tokens"], defaults["max_prefix"], defaults["max_context"]) == (140, 64, 800)
    assert defaults["instruction"] == "go to the red ball"  # the checkpoint's other defaults kept
    agent = Agent(AgentConfig(engine=built, backend="onnxruntime", image_tokens=560, budget_ms=60_000))
    assert agent.session.config.max_context == 800 >= 64 + 560 + 64 + action
    frame = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    assert agent.act(frame).status == "ok"
    needed = 64 + 1120 + 64 + action
    with pytest.raises(EngineError, match=rf"context of {needed} positions .* for 800: .* --max-context {needed}"):
        Agent(AgentConfig(engine=built, backend="onnxruntime", image_tokens=1120, budget_ms=60_000))
