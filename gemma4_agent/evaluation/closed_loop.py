"""`gemma4-agent sim --engine DIR --episodes N --seed S --report OUTDIR`: the agent drives the robot
in the synthetic world, closed loop.

Each episode (world seed `episode_seed(S, i)`, as generate-bags numbers them) renders a frame at the
camera rate (10 Hz), the agent acts on it (`now_s` = simulated time; the decode deadline is lifted,
as in offline replay, so machine load does not change the outcome), and its command after the
safety filter drives the robot for one camera period in `control_dt` sub-steps.
Success (issue 8's definition): the robot reaches the target, its centre within the success radius
(`success(world)`), within the time limit. Stricter, reported next to it: `stopped_in_radius`, the agent
commanded a stop while inside the radius (the episode runs on until that or the time limit, so both are
measured). The expert's action on the same state is logged for agreement numbers.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .metrics import FrameRecord, percentiles, summarize


def run_closed_loop_episode(agent, seed: int, world_config=None, episode_config=None) -> tuple[dict[str, Any], list[FrameRecord]]:
    from ..sim import EpisodeConfig, World, expert_action, success
    from ..sim.expert import action_to_twist as expert_twist

    ecfg = episode_config or EpisodeConfig()
    world = World(world_config, seed=seed)
    agent.set_instruction(world.instruction)
    agent.safety.reset()
    period = 1.0 / ecfg.rate_hz
    substeps = max(1, math.ceil(period / ecfg.control_dt - 1e-9))
    max_frames = int(math.floor(ecfg.max_duration_s * ecfg.rate_hz + 1e-9))
    records: list[FrameRecord] = []
    stopped = False
    reached_at = None
    path = 0.0
    start_distance = world.distance_to(world.target)
    for i in range(max_frames):
        t = i * period
        frame = world.render(noise_key=i)
        expert = expert_action(world, None)
        result = agent.act(frame, stamp_s=t, now_s=t)
        rec = FrameRecord(bag=f"seed_{seed}", index=i, t_s=t, status=result.status, instruction=world.instruction)
        rec.rec_linear_x, rec.rec_angular_z = expert_twist(expert)
        twist = result.twist or {"linear_x": 0.0, "angular_z": 0.0}
        if result.status in ("ok", "fallback"):
            from ..actions import action_to_twist

            raw = action_to_twist(result.action or {}, agent.spec)
            rec.raw_linear_x, rec.raw_angular_z = float(raw["linear_x"]), float(raw["angular_z"])
            rec.linear_x, rec.angular_z = float(twist["linear_x"]), float(twist["angular_z"])
            rec.timings_ms = {k: round(float(v), 3) for k, v in result.timings_ms.items()}
            rec.latency_ms = rec.timings_ms.get("total")
            rec.decode_steps = int(result.decode_steps)
        records.append(rec)
        within = success(world)
        if within and reached_at is None:
            reached_at = t
        stop = (result.action or {}).get("action") == "stop" or (abs(twist["linear_x"]) < 1e-6 and abs(twist["angular_z"]) < 1e-6)
        if within and stop and result.status == "ok":
            stopped = True
            break
        x0, y0 = world.robot.x, world.robot.y
        for _ in range(substeps):
            world.step(float(twist["linear_x"]), float(twist["angular_z"]), period / substeps)
        path += math.hypot(world.robot.x - x0, world.robot.y - y0)
    result_row = {"seed": seed, "instruction": world.instruction, "success": reached_at is not None,
                  "time_to_success_s": None if reached_at is None else round(reached_at, 2),
                  "stopped_in_radius": stopped, "frames": len(records), "time_s": round(len(records) * period, 2),
                  "start_distance_m": round(start_distance, 3),
                  "final_distance_m": round(world.distance_to(world.target), 3), "path_m": round(path, 3)}
    return result_row, records


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import positive
    from ..model.config import IMAGE_TOKEN_COUNTS

    parser.add_argument("--engine", type=Path, default=None, help="engine folder (default: the bundled demo engine)")
    parser.add_argument("--episodes", type=positive(int), default=20)
    parser.add_argument("--seed", type=int, default=888888, help="episode i uses world seed SEED*100003+i")
    parser.add_argument("--report", type=Path, default=Path("out/sim"))
    parser.add_argument("--max-duration-s", type=positive(float), default=40.0, help="episode time limit (s)")
    parser.add_argument("--rate", type=positive(float), default=10.0, help="camera frames per second")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--budget-ms", type=positive(float), default=500.0, help="nominal budget for deadline_misses")
    parser.add_argument("--image-tokens", type=int, default=None, choices=IMAGE_TOKEN_COUNTS)
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"])
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from ..engines.manifest import EngineError
    from ..sim import EpisodeConfig, WorldConfig
    from ..sim.generate_bags import episode_seed
    from .replay import OFFLINE_AGENT_BUDGET_MS, engine_name, load_agent, machine_info
    from .report import make_report_folder, write_report

    # before the engine loads: a bad --report path or world size fails at once
    make_report_folder(args.report)
    wcfg = WorldConfig(width=args.width, height=args.height)
    ecfg = EpisodeConfig(rate_hz=args.rate, max_duration_s=args.max_duration_s)
    try:
        agent = load_agent(args.engine, OFFLINE_AGENT_BUDGET_MS, image_tokens=args.image_tokens, device=args.device)
    except (EngineError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    agent.act(np.zeros((args.height, args.width, 3), np.uint8))  # warm-up, out of the numbers
    rows, by_ep, all_records = [], {}, []
    bar = tqdm(range(args.episodes), desc="sim", unit="ep", disable=args.no_progress)
    for i in bar:
        row, recs = run_closed_loop_episode(agent, episode_seed(args.seed, i), wcfg, ecfg)
        row["episode"] = i
        rows.append(row)
        by_ep[f"episode_{i:04d}"] = recs
        all_records += recs
        bar.set_postfix(success=f"{sum(r['success'] for r in rows)}/{len(rows)}")
    summary = summarize(all_records, args.budget_ms)
    n = len(rows)
    report: dict[str, Any] = {
        "kind": "sim", "engine": str(agent.config.engine), "engine_name": engine_name(agent),
        "image_tokens": agent.image_tokens, "seed": args.seed, "episodes": n,
        "success_rate": round(sum(r["success"] for r in rows) / n, 4) if n else None,
        "stopped_in_radius_rate": round(sum(r["stopped_in_radius"] for r in rows) / n, 4) if n else None,
        "mean_time_to_success_s": (round(float(np.mean([r["time_to_success_s"] for r in rows if r["success"]])), 2)
                                   if any(r["success"] for r in rows) else None),
        "max_duration_s": args.max_duration_s, "rate_hz": args.rate,
        "command": "gemma4-agent " + " ".join(sys.argv[1:]), "machine": machine_info(),
        "latency_ms": summary["latency_ms"], "latency_ms_by_stage": summary["latency_ms_by_stage"],
        "frames": summary["frames"], "processed": summary["processed"], "fallbacks": summary["fallbacks"],
        "deadline_misses": summary["deadline_misses"], "decode_steps_mean": summary["decode_steps_mean"],
        "expert_agreement": {k: summary[k] for k in ("action_type_agreement", "angular_sign_agreement",
                                                     "linear_mae", "angular_mae")},
        "per_episode": rows,
    }
    header = [f"- engine: `{report['engine_name']}` ({report['engine']}), {agent.image_tokens} image tokens",
              f"- {n} episodes, seeds `episode_seed({args.seed}, i)`, time limit {args.max_duration_s:g} s, "
              f"{args.rate:g} Hz camera",
              f"- **success rate {report['success_rate']}** (target reached within the radius and the time limit); "
              f"stopped inside the radius {report['stopped_in_radius_rate']}",
              f"- machine: {report['machine']['cpu']} ({report['machine']['cores']} cores), {report['machine']['date']}"]
    extra = ["## Episodes", "", "| episode | seed | instruction | success | stopped in radius | time s | final dist m |",
             "|---|---|---|---|---|---|---|"]
    extra += [f"| {r['episode']} | {r['seed']} | {r['instruction']} | {r['success']} | {r['stopped_in_radius']} | "
              f"{r['time_s']} | {r['final_distance_m']} |" for r in rows] + [""]
    table_summary = dict(summary, **{k: report[k] for k in ("frames", "processed")})
    report_full = dict(table_summary, **report)
    # the table rows compare the agent with the expert on the same state ("recorded" = expert)
    paths = write_report(args.report, report_full, all_records, "Closed-loop simulation report", header,
                         dict(list(by_ep.items())[:2]), extra)
    print(f"sim: {n} episodes, success rate {report['success_rate']} (stopped inside the radius "
          f"{report['stopped_in_radius_rate']}), "
          f"latency p50/p90/p99 {summary['latency_ms']['p50']}/{summary['latency_ms']['p90']}/"
          f"{summary['latency_ms']['p99']} ms")
    print(f"report: {paths['md']}")
    return 0
