"""The int4 quality tools on the demo engine: the quality report prompts exactly as the agent does (instruction
before the image, each bag frame with the bag's instruction) and compares over the answer the agent decodes;
the demo evaluation of a quantized engine runs the int4 kernels and says so."""
import copy
import json
from pathlib import Path

import pytest
import torch

from gemma4_agent.demo.decode import ActionTrie, BatchDecoder
from gemma4_agent.demo.evaluate import main as evaluate_main
from gemma4_agent.demo.evaluate import model_info
from gemma4_agent.model import load_model
from gemma4_agent.model.tokenizer import PromptBuilder, load_tokenizer
from gemma4_agent.quant.int4 import int4_backend, quantize_model
from gemma4_agent.quant.quality import (_stop_ids, append_reference_answers, compare_models, markdown_table,
                                        prompt_batches, random_frames, tiny_random_model)
from gemma4_agent.quant.quantize_cli import calibration_batches, quantize_checkpoint
from gemma4_agent.sim import EpisodeConfig, run_episode
from gemma4_agent.sim.generate_bags import write_episode_bag

ENGINE = Path(__file__).resolve().parents[1] / "engines" / "demo"
demo_only = pytest.mark.skipif(not (ENGINE / "manifest.json").is_file(), reason="engines/demo not built")
SEEDS = (4242 * 100003, 4242 * 100003 + 1)


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    root = tmp_path_factory.mktemp("bags")
    for i, seed in enumerate(SEEDS):
        steps = run_episode(seed, episode_config=EpisodeConfig(max_duration_s=1.0))
        write_episode_bag(root / f"episode_{i:04d}", steps, rate_hz=10.0)
    return root


@demo_only
def test_prompt_batches_are_the_agents_prompt_with_each_bags_instruction(bags):
    model, tok = load_model(ENGINE), load_tokenizer(ENGINE)
    prompts = PromptBuilder(tok, model.config.image_token_id, model.config.boi_token_id, model.config.eoi_token_id)
    instructions = [next(iter(run_episode(s, episode_config=EpisodeConfig(max_duration_s=0.1)))).instruction
                    for s in SEEDS]
    batches = prompt_batches(model, bags, 4, ENGINE)  # a folder of two bags: frames from both
    seen = set()
    for b in batches:
        ids = b["input_ids"][0].tolist()
        matches = [i for i in instructions if ids == prompts.prefix(i) + prompts.image(63) + prompts.suffix()]
        assert len(matches) == 1, tok.decode(ids, skip_special_tokens=False)[:80]
        seen.add(matches[0])
        assert int(b["mm_token_type_ids"].sum()) == 63
    assert seen == set(instructions)
    # the answer compared is the one the agent decodes (trie-constrained greedy = plain greedy here)
    ext, starts = append_reference_answers(model, batches, _stop_ids(model, ENGINE))
    trie = ActionTrie.from_spec(tok)
    for b, e, s in zip(batches, ext, starts):
        answer = tok.decode(e["input_ids"][0, s + 1:].tolist(), skip_special_tokens=False)
        ids = b["input_ids"][0].tolist()
        instruction = [i for i in instructions if ids[:len(prompts.prefix(i))] == prompts.prefix(i)]
        expected = BatchDecoder(model, tok, trie).decode(instruction, b["pixel_values"], b["image_position_ids"][0])[0]
        assert answer == expected + "<turn|>"


def test_answer_positions_are_compared_separately():
    model, _ = tiny_random_model(2)
    batches = calibration_batches(model, random_frames(2, seed=3))
    ext, starts = append_reference_answers(model, batches, stop_ids={-1}, max_new=5)
    assert [e["input_ids"].shape[1] - b["input_ids"].shape[1] for e, b in zip(ext, batches)] == [5, 5]
    assert starts == [b["input_ids"].shape[1] - 1 for b in batches]
    same = compare_models(model, model, ext, starts)
    assert same["answer_positions"] == 10 and same["kl_answer"] == 0 and same["top1_answer"] == 1
    q = quantize_model(copy.deepcopy(model), "q4_0", progress=False)
    with_answers = compare_models(model, q, ext, starts)
    prompt_only = compare_models(model, q, batches)
    assert with_answers["positions"] == prompt_only["positions"]  # "all"/"last" stay over the prompt
    assert with_answers["kl_last"] == pytest.approx(prompt_only["kl_last"], rel=1e-4, abs=1e-7)
    assert with_answers["kl_answer"] > 0
    assert "top-1 (answer)" in markdown_table({"q4_0": with_answers, "no answers": prompt_only})


@demo_only
def test_evaluate_runs_the_int4_kernels_of_a_quantized_engine(tmp_path):
    dst = tmp_path / "demo-q4_0"
    quantize_checkpoint(ENGINE, dst, "q4_0", progress=False)
    out = tmp_path / "eval.json"
    with int4_backend("kernel"):  # no silent dequantize fallback
        assert evaluate_main(["--engine", str(dst), "--seed", "7", "--episodes", "0", "--frames-episodes", "1",
                              "--threads", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["model"] == {"dtype": "float32", "quant": "q4_0", "int4_layers": "decoder_linear",
                               "int4_linear_modules": 26, "int4_embedding": False}  # 4 layers x 7, no v_proj on 2
    # the float engine: 0.80 on this episode (it stops late); a broken int4 path would be far off
    assert result["frames"]["frames"] > 20 and result["frames"]["action_type_agreement"] >= 0.7
    assert model_info(load_model(ENGINE, dtype=torch.bfloat16))["dtype"] == "bfloat16"
