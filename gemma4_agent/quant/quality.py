"""Quality of an int4 model against its float original: KL(p_float || p_int4) of the next-token
distribution and top-1 agreement, over a set of frames in the agent's prompt.

    python -m gemma4_agent.quant.quality FLOAT_CKPT INT4_CKPT [INT4_CKPT ...] [--calib BAG_OR_DIR] [--frames N]
        [--answer] [--bf16]
    python -m gemma4_agent.quant.quality --tiny      # a tiny random-weight model, both schemes

Prints a Markdown table. "last" is the prompt's last position (the first action token); "all" averages
every position of every prompt (mostly image and instruction tokens: a model trained with the loss on its
answer only, like the demo engine, was never taught to predict those). `--answer` appends the float model's
own greedy answer to each prompt (up to `<turn|>` / eos, at most 32 tokens) and reports KL and top-1 over
the positions that predict it ("answer": what the agent actually decodes). `--bf16` adds the float model
run in bfloat16 as a row (the cost of bf16 alone, for scale)."""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def compare_models(reference, candidate, batches: list[dict], answer_from: list[int] | None = None) -> dict:
    """KL and top-1 agreement of candidate vs reference, over model.forward kwargs batches.

    answer_from[i]: first position of batch i whose next token is answer text (see `append_reference_answers`);
    then "last" is that position (the answer's first token) and the answer positions get their own keys."""
    kl_all, top_all, kl_last, top_last, kl_ans, top_ans = [], [], [], [], [], []
    for i, batch in enumerate(batches):
        lp = F.log_softmax(reference(**batch).float(), dim=-1)[0]
        lq = F.log_softmax(candidate(**batch).float(), dim=-1)[0]
        kl = (lp.exp() * (lp - lq)).sum(-1).clamp(min=0)
        agree = (lp.argmax(-1) == lq.argmax(-1)).float()
        if answer_from is not None:
            start = answer_from[i]
            kl_ans.append(kl[start:-1])  # the last position predicts past the answer
            top_ans.append(agree[start:-1])
            kl, agree = kl[:start + 1], agree[:start + 1]  # "all" and "last": the prompt, as without answers
        kl_all.append(kl)
        top_all.append(agree)
        kl_last.append(kl[-1])
        top_last.append(agree[-1])
    kl_all, top_all = torch.cat(kl_all), torch.cat(top_all)
    row = {"prompts": len(batches), "positions": int(kl_all.numel()),
           "kl_mean": float(kl_all.mean()), "kl_p99": float(torch.quantile(kl_all, 0.99)),
           "top1": float(top_all.mean()), "kl_last": float(torch.stack(kl_last).mean()),
           "top1_last": float(torch.stack(top_last).mean())}
    if answer_from is not None:
        kl_ans, top_ans = torch.cat(kl_ans), torch.cat(top_ans)
        row.update({"answer_positions": int(kl_ans.numel()), "kl_answer": float(kl_ans.mean()),
                    "kl_answer_max": float(kl_ans.max()), "top1_answer": float(top_ans.mean())})
    return row


@torch.no_grad()
def append_reference_answers(model, batches: list[dict], stop_ids: set[int], max_new: int = 32
                             ) -> tuple[list[dict], list[int]]:
    """Each prompt + the model's own greedy continuation (up to and including a stop id, at most max_new
    tokens). Returns the extended batches and, per batch, the position that predicts the first answer token."""
    out, starts = [], []
    for batch in batches:
        b = dict(batch)
        start = b["input_ids"].shape[1] - 1
        for _ in range(max_new):
            token = model(**b)[0, -1].argmax().view(1, 1)
            b["input_ids"] = torch.cat([b["input_ids"], token.to(b["input_ids"])], dim=1)
            mm = b["mm_token_type_ids"]
            b["mm_token_type_ids"] = torch.cat([mm, torch.zeros_like(token).to(mm)], dim=1)
            if int(token) in stop_ids:
                break
        out.append(b)
        starts.append(start)
    return out, starts


def prompt_batches(model, source: str | Path | None, max_frames: int, folder: str | Path) -> list[dict]:
    """model.forward kwargs of the agent's prompt around each frame of `source` (a bag, a folder of bags or of
    images; synthetic frames when None), each bag frame with its bag's instruction."""
    from .quantize_cli import calibration_batches, load_frames

    frames = load_frames(source, max_frames) if source else random_frames(max_frames)
    return calibration_batches(model, frames, folder)


def _stop_ids(model, folder: str | Path) -> set[int]:
    ids = {model.config.text_config.eos_token_id}
    if (Path(folder) / "tokenizer.json").is_file():
        from ..model.tokenizer import TURN_END, load_tokenizer

        turn_end = load_tokenizer(folder).token_to_id(TURN_END)
        if turn_end is not None:
            ids.add(turn_end)
    return {int(i) for i in ids if i is not None}


def markdown_table(rows: dict[str, dict]) -> str:
    answer = any("kl_answer" in r for r in rows.values())
    head = "| model | prompts | positions | KL mean (all) | KL p99 (all) | top-1 (all) | KL (last) | top-1 (last) |"
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
    if answer:
        head += " answer positions | KL mean (answer) | KL max (answer) | top-1 (answer) |"
        rule += "---:|---:|---:|---:|"
    lines = [head, rule]
    for name, r in rows.items():
        line = (f"| {name} | {r['prompts']} | {r['positions']} | {r['kl_mean']:.2e} | {r['kl_p99']:.2e} | "
                f"{100 * r['top1']:.1f}% | {r['kl_last']:.2e} | {100 * r['top1_last']:.1f}% |")
        if answer:
            line += (f" {r['answer_positions']} | {r['kl_answer']:.2e} | {r['kl_answer_max']:.2e} | "
                     f"{100 * r['top1_answer']:.1f}% |" if "kl_answer" in r else " | | | |")
        lines.append(line)
    return "\n".join(lines)


def random_frames(n: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth random frames (blobs of colour, not white noise)."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        frames.append(np.kron(small, np.ones((8, 8, 1), dtype=np.uint8)))
    return frames


def tiny_config(vocab: int = 512, hidden: int = 128) -> dict:
    """A tiny Gemma 4 config whose linears all have in_features a multiple of 128 (both schemes apply)."""
    return {"model_type": "gemma4_unified", "boi_token_id": 290, "eoi_token_id": 291, "image_token_id": 292,
            "text_config": {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden,
                            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                            "head_dim": 32, "global_head_dim": 64, "num_global_key_value_heads": 1,
                            "attention_k_eq_v": True, "sliding_window": 32, "final_logit_softcapping": 30.0,
                            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]},
            "vision_config": {"patch_size": 8, "pooling_kernel_size": 2, "mm_embed_dim": 32, "mm_posemb_size": 64,
                              "output_proj_dims": 32}}


def tiny_random_model(seed: int = 0, outliers: bool = True, **cfg_kwargs):
    """A random tiny model with randomised norms and (optionally) a few outlier input channels, as real LLMs have."""
    from ..model import ModelConfig, build_model

    cfg_json = tiny_config(**cfg_kwargs)
    torch.manual_seed(seed)
    model = build_model(ModelConfig.model_validate(cfg_json))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("norm.weight"):
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))
                if outliers and name.endswith(("input_layernorm.weight", "pre_feedforward_layernorm.weight")):
                    idx = torch.randperm(p.numel(), generator=gen)[:4]
                    p[idx] *= 8.0
    return model, cfg_json


def tiny_report(frames: int = 8, seed: int = 0) -> dict[str, dict]:
    from ..quant.quantize_cli import calibration_batches
    from .int4 import decoder_linears, int4_backend, quantize_model

    model, _ = tiny_random_model(seed)
    calib = calibration_batches(model, random_frames(frames, seed=seed + 100))
    evals = calibration_batches(model, random_frames(frames, seed=seed + 200))
    rows = {}
    noisy = copy.deepcopy(model)  # sensitivity baseline: 1% multiplicative noise on the decoder linears
    with torch.no_grad():
        for _, m in decoder_linears(noisy):
            m.weight.mul_(1 + 0.01 * torch.randn(m.weight.shape, generator=torch.Generator().manual_seed(seed)))
    rows["tiny random, float + 1% weight noise (baseline)"] = compare_models(model, noisy, evals)
    for scheme, emb in (("q4_0", False), ("q4_0", True), ("awq-g128", False), ("awq-g128", True)):
        q = quantize_model(copy.deepcopy(model), scheme, calib=calib, include_embedding=emb, progress=False)
        with int4_backend("auto"):
            rows[f"tiny random, {scheme}{' +embedding' if emb else ''}"] = compare_models(model, q, evals)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gemma4_agent.quant.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference", nargs="?", help="float checkpoint folder")
    parser.add_argument("quantized", nargs="*", help="quantized checkpoint folder(s)")
    parser.add_argument("--calib", help="ROS 2 bag, folder of bags, or image folder (default: synthetic frames); "
                                        "a bag's frames are prompted with its /instruction")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="report on a tiny random-weight model")
    parser.add_argument("--answer", action="store_true",
                        help="also compare over the float model's own greedy answer to each prompt (teacher-forced)")
    parser.add_argument("--bf16", action="store_true", help="add the float model in bfloat16 as a row")
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.tiny:
        rows = tiny_report(args.frames)
    else:
        if not args.reference or not args.quantized:
            parser.error("give a float checkpoint and at least one quantized checkpoint (or --tiny)")
        from ..model import load_model

        reference = load_model(args.reference)
        batches = prompt_batches(reference, args.calib, args.frames, args.reference)
        starts = None
        if args.answer:
            batches, starts = append_reference_answers(reference, batches, _stop_ids(reference, args.reference))
        rows = {}
        if args.bf16:
            rows[f"{Path(args.reference).name} (float, bf16)"] = compare_models(
                reference, load_model(args.reference, dtype=torch.bfloat16), batches, starts)
        for path in args.quantized:
            rows[Path(path).name] = compare_models(reference, load_model(path), batches, starts)
    print(markdown_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
