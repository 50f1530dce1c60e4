"""The agent core eager vs torch.compile'd (AgentConfig.compile): start-up time, per-frame latency and whether the
actions are the same, on an engine (default: the bundled demo) and random 640x480 frames.

    python benchmarks/agent_compile.py [--engine DIR] [--device cpu|cuda] [--frames N]
"""
import argparse
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
    parser.add_argument("--frames", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(args.frames)]
    extra = {"engine": args.engine} if args.engine else {}
    report, actions = {}, {}
    for compiled in (False, True):
        t0 = time.perf_counter()
        agent = Agent(AgentConfig(compile=compiled, device=args.device, budget_ms=60_000, **extra))
        start_s = time.perf_counter() - t0
        results = [agent.act(f) for f in frames]
        actions[compiled] = [r.text for r in results]
        report["compiled" if compiled else "eager"] = {
            "start_s": round(start_s, 1),
            "per_frame_ms_p50": round(float(np.median([r.timings_ms["total"] for r in results])), 2),
            "statuses": sorted({r.status for r in results})}
        del agent
    report["same_actions"] = actions[False] == actions[True]
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
