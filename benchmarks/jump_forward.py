"""Decode steps and per-frame latency per action with and without jump-forward, through the agent core
on the random-weight tiny engine (demo tokenizer, real grammar).

    python benchmarks/jump_forward.py --frames 40
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gemma4_agent.agent import Agent, AgentConfig  # noqa: E402
from gemma4_agent.evaluation.dev_engine import write_random_engine  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--engine", help="engine folder (default: a random-weight tiny engine)")
    args = parser.parse_args()
    engine = Path(args.engine) if args.engine else write_random_engine(Path(tempfile.mkdtemp()) / "random")
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (240, 320, 3), dtype=np.uint8) for _ in range(args.frames)]
    agents = {jf: Agent(AgentConfig(engine=engine, budget_ms=60_000, jump_forward=jf)) for jf in (True, False)}
    rows = {jf: [] for jf in agents}
    for i, frame in enumerate(frames):  # interleaved: both see the same machine load
        for jf, agent in agents.items():
            r = agent.act(frame, stamp_s=0.1 * i, now_s=0.1 * i)
            rows[jf].append((r.decode_steps, r.free_tokens, r.timings_ms["decode"], r.timings_ms["total"]))
    report = {}
    for jf, r in rows.items():
        a = np.array(r)
        report["on" if jf else "off"] = {"decode_steps": float(a[:, 0].mean()), "free_tokens": float(a[:, 1].mean()),
                                         "decode_ms_p50": float(np.median(a[:, 2])), "total_ms_p50": float(np.median(a[:, 3]))}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
