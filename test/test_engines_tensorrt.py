"""TensorRT backend. TensorRT cannot be installed on the development machines (see shared PLATFORM.md):
the tests that build or run plans skip here with a stated reason and run on the Jetson. What runs
everywhere: the module imports without TensorRT, using it fails with a clear message, and the
TensorRT-flavoured export (bfloat16 graphs, INT4 blocked DequantizeLinear) is well formed and uses
only operators TensorRT 10.3 parses."""
import json

import pytest
import torch

onnx = pytest.importorskip("onnx")

from gemma4_agent.engines import tensorrt_backend  # noqa: E402  (imports without tensorrt)
from gemma4_agent.engines.build_cli import build_engine  # noqa: E402
from gemma4_agent.engines.manifest import EngineError  # noqa: E402
from gemma4_agent.engines.onnx_export import GRAPHS, graph_ops  # noqa: E402

from conftest import tiny_tokenizer  # noqa: E402
from test_engines_onnx import TENSORRT_10_3_OPS  # noqa: E402

try:
    import tensorrt  # noqa: F401
    HAVE_TRT = True
except ImportError:
    HAVE_TRT = False

needs_trt = pytest.mark.skipif(not HAVE_TRT, reason="tensorrt not installed: runs on the Jetson")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: runs on the Jetson")


@pytest.fixture(scope="module")
def trt_export(tiny_checkpoints, tmp_path_factory):
    """A TensorRT engine folder exported without building plans (what `--export-only` writes)."""
    out = tmp_path_factory.mktemp("trt") / "gqa_q4"
    return build_engine(tiny_checkpoints["gqa_window3"], out, "tensorrt", "q4_0", max_context=400, max_prefix=32,
                        image_tokens=70, tokenizer=tiny_tokenizer(), export_only=True, log=lambda *_: None)


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed: the not-installed path cannot be exercised")
def test_without_tensorrt_using_it_fails_clearly(trt_export, tmp_path, tiny_checkpoints):
    from gemma4_agent.engines.backends import load_engine

    with pytest.raises(EngineError, match=r"TensorRT is not installed here: build the engine on the Jetson \(JetPack 6, "
                                          r"TensorRT 10.3\): see docs/JETSON.md"):
        tensorrt_backend.require_tensorrt()
    with pytest.raises(EngineError, match="TensorRT is not installed here"):
        load_engine(trt_export, "tensorrt", device="cpu")
    with pytest.raises(EngineError, match="TensorRT is not installed here"):
        build_engine(tiny_checkpoints["gqa_window3"], tmp_path / "x", "tensorrt", "none", tokenizer=tiny_tokenizer())
    with pytest.raises(EngineError, match="TensorRT is not installed here"):
        tensorrt_backend.build_plan(trt_export, json.loads((trt_export / "engine.json").read_text()))


def test_tensorrt_export_is_well_formed(trt_export):
    info = json.loads((trt_export / "engine.json").read_text())
    assert info["dtype"] == "bfloat16" and info["quant"] == "q4_0" and not info["plans_built"]
    manifest = json.loads((trt_export / "manifest.json").read_text())
    assert manifest["backend"] == "tensorrt" and manifest["quant"] == "q4_0"
    for graph in GRAPHS:
        onnx.checker.check_model(str(trt_export / graph), full_check=True)
        ops = graph_ops(trt_export / graph)
        assert ops <= TENSORRT_10_3_OPS, sorted(ops - TENSORRT_10_3_OPS)
    model = onnx.load(str(trt_export / "prefill.onnx"), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dq
    for n in dq:  # INT4 weights, bf16 block scales: TensorRT 10's weight-only INT4 form
        assert inits[n.input[0]].data_type == onnx.TensorProto.INT4
        assert inits[n.input[1]].data_type == onnx.TensorProto.BFLOAT16
    inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    assert inputs["image_embeds"] == onnx.TensorProto.BFLOAT16 and inputs["k_0"] == onnx.TensorProto.BFLOAT16
    # profiles cover the session's chunks: decode T=1, prefill up to max(max_chunk, max_prefix)
    from gemma4_agent.model.config import ModelConfig

    decode, prefill = tensorrt_backend.decoder_profiles(ModelConfig.from_json(trt_export), info)
    assert decode["ids"] == ((1, 1), (1, 1), (1, 1)) and prefill["ids"][2] == (1, 134)
    assert decode["k_0"][0][2] == info["capacity"]["sliding_attention"]


@needs_cuda
@needs_trt
def test_build_and_match_torch_on_device(trt_export, tiny_checkpoints, tmp_path):
    """On the Jetson: build plans from the export and compare a streaming session against torch."""
    from gemma4_agent.engines.verify_cli import compare

    out = build_engine(trt_export, tmp_path / "plans", "tensorrt", "q4_0", log=print)
    report = compare(out, tiny_checkpoints["gqa_window3"], frames=4, device="cuda", dtype=torch.bfloat16)
    assert report["token_agreement"] >= 0.9, report
    assert report["max_rel_logit_diff"] < 5e-2, report


@needs_cuda
@needs_trt
def test_manifest_refuses_other_gpu(trt_export, tmp_path):
    import shutil

    from gemma4_agent.engines.backends import load_engine
    from gemma4_agent.engines.manifest import write_manifest, read_manifest

    out = build_engine(trt_export, tmp_path / "plans", "tensorrt", "q4_0", log=print)
    other = tmp_path / "other"
    shutil.copytree(out, other)
    manifest = read_manifest(other).model_copy(update={"gpu_arch": "sm_00"})
    write_manifest(other, manifest, list(manifest.files))
    with pytest.raises(EngineError, match="built for GPU sm_00"):
        load_engine(other, "tensorrt", device="cuda", dtype=torch.bfloat16)


def test_the_agent_sizes_its_cache_as_the_plan_was_built(trt_export):
    # A plan's KV shapes are fixed at its build (decoder_profiles); the agent sizes its cache from the engine's
    # agent.json. The build wrote the checkpoint's agent.json there, not the --max-context / --max-prefix /
    # --image-tokens it was built with, so the session's cache and the plan disagreed at the first frame.
    from gemma4_agent.engine.session import max_chunk
    from gemma4_agent.engines.onnx_export import cache_capacity
    from gemma4_agent.model import ModelConfig, build_model

    defaults = json.loads((trt_export / "agent.json").read_text())
    assert (defaults["max_context"], defaults["max_prefix"], defaults["image_tokens"]) == (400, 32, 70)
    model = build_model(ModelConfig.from_json(trt_export), device="meta")
    session_capacity = cache_capacity(model, defaults["max_context"], defaults["max_prefix"],
                                      max_chunk(defaults["image_tokens"]))
    assert session_capacity == json.loads((trt_export / "engine.json").read_text())["capacity"]


@needs_cuda
@needs_trt
def test_an_image_budget_other_than_the_plans_is_refused_when_the_agent_starts(trt_export, tmp_path):
    # the plans' KV shapes depend on the image budget they were built for (a sliding layer holds a window and a
    # frame's chunk): another budget is refused at configure, not at every frame
    from gemma4_agent.agent import Agent, AgentConfig

    out = build_engine(trt_export, tmp_path / "plans", "tensorrt", "q4_0", log=print)
    Agent(AgentConfig(engine=out, backend="tensorrt", device="cuda", budget_ms=60_000))  # its own budget: fine
    with pytest.raises(EngineError, match="cache slots"):
        Agent(AgentConfig(engine=out, backend="tensorrt", device="cuda", image_tokens=140, budget_ms=60_000))
