"""A node reconfigured in one process: one compiled agent after another (as the node's cleanup + configure builds
them), each with its own image budget, on the same random 640x480 frames; start-up and per-frame latency of each.

    python benchmarks/agent_reconfigure.py [--engine DIR] [--device cpu|cuda] [--frames N]
        [--image-tokens 70 140 280 70] [--json OUT]
"""
import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gemma4_agent.agent import Agent, AgentConfig  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", default=None)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--frames", type=int, default=15)
    parser.add_argument("--image-tokens", type=int, nargs="+", default=[70, 140, 280, 70])
    parser.add_argument("--json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(args.frames)]
    extra = {"engine": args.engine} if args.engine else {}
    rows = []
    for tokens in args.image_tokens:
        t0 = time.perf_counter()
        agent = Agent(AgentConfig(compile=True, device=args.device, budget_ms=60_000, image_tokens=tokens, **extra))
        start_s = time.perf_counter() - t0
        results = [agent.act(f) for f in frames]  # the first compiles what the warm-up did not
        rows.append({"image_tokens": tokens, "start_s": round(start_s, 1),
                     "first_frame_ms": round(results[0].timings_ms["total"], 1),
                     "per_frame_ms_p50": round(float(np.median([r.timings_ms["total"] for r in results[1:]])), 2)})
        print(json.dumps(rows[-1]), flush=True)
        del agent, results
        gc.collect()
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "device": args.device,
                                               "agents": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
