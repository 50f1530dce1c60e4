"""What the GPU's int8-x GEMV (triton_q4._gemv_q8_kernel) does to the demo task: the demo engine in q4_0, its
decode steps' int4 layers fed x rounded to int8 per 32 values (scale amax / 127), as that kernel rounds it,
against the same engine without the rounding. On CPU: the rounding is applied to the layers' inputs at decode
steps (one new position per sequence) and the CPU int4 kernel does the rest; the kernel itself equals "x rounded,
then the int4 matmul" to float32 summation order (test/test_quant_triton.py), so this is its arithmetic, not a
model of it, but for the CPU kernel's bf16 activations, which round the rounded x once more (both rows have that).

    python benchmarks/int8_x_accuracy.py [--engine engines/demo] [--frames-episodes 20] [--episodes 50] [--json OUT]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gemma4_agent.demo.decode import ActionTrie  # noqa: E402
from gemma4_agent.demo.evaluate import closed_loop, frame_agreement, model_info  # noqa: E402
from gemma4_agent.model.loader import load_model  # noqa: E402
from gemma4_agent.model.tokenizer import load_tokenizer  # noqa: E402
from gemma4_agent.quant.int4 import Int4Linear, quantize_model  # noqa: E402
from gemma4_agent.quant.triton_q4 import round_x_int8  # noqa: E402


def round_decode_inputs(model, counter: dict) -> list:
    """Forward pre-hooks rounding the input of every int4 layer at decode steps (one position per sequence);
    `counter["calls"]` counts the calls rounded."""
    def hook(module, args):
        x = args[0]
        if x.dim() < 2 or x.shape[-2] != 1:
            return None
        counter["calls"] = counter.get("calls", 0) + 1
        return (round_x_int8(x),)

    return [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, Int4Linear)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", type=Path, default=Path("engines/demo"))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--frames-episodes", type=int, default=20)
    parser.add_argument("--episodes", type=int, default=50, help="closed-loop episodes (0: skip)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.engine)
    defaults = args.engine / "agent.json"
    system = json.loads(defaults.read_text()).get("system", "") if defaults.is_file() else ""
    trie = ActionTrie.from_spec(tokenizer)
    model = quantize_model(load_model(args.engine, dtype=torch.float32), "q4_0", progress=False)
    results = {"engine": str(args.engine), "model": model_info(model), "seed": args.seed}
    for variant in ("q4_0", "q4_0, int8 x at decode steps"):
        counter = {}
        hooks = round_decode_inputs(model, counter) if "int8" in variant else []
        t = time.monotonic()
        row = {}
        if args.frames_episodes:
            row["frames"] = frame_agreement(model, tokenizer, args.frames_episodes, args.seed, trie, True, system)
        if args.episodes:
            row["closed_loop"] = {k: v for k, v in closed_loop(model, tokenizer, args.episodes, args.seed, trie,
                                                               progress=True, system=system).items()
                                  if k != "failures"}
        row["seconds"] = round(time.monotonic() - t, 1)
        row["layer_calls_rounded"] = counter.get("calls", 0)
        for h in hooks:
            h.remove()
        results[variant] = row
        print(json.dumps({variant: row}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
