"""`gemma4-agent replay BAG --engine DIR --report OUTDIR [--realtime]`: drive the agent core with a
bag's frames and compare its commands with the bag's recorded `/cmd_vel`.

Offline (default): every frame is processed, in order, with `now_s` = the frame's stamp (so the
frame is never stale and the safety filter's rate limits run on recorded time). The agent's own
decode deadline is lifted (budget 60 s) so that a busy machine does not turn model output into
fallbacks; `deadline_misses` still counts frames whose agent time exceeded `--budget-ms`.

Realtime (`--realtime`): a feeder thread delivers frames at their recorded times into a one-slot
buffer (latest wins) and the agent works through it as the node's worker does: a frame that
arrives while the agent is busy replaces the pending one (that one is counted `dropped`), the
agent drops frames older than the budget (`dropped_stale`) and cuts a decode at the deadline
(fallback); `deadline_misses` counts commands later than the budget after the frame's capture.

BAG may be a bag folder, its storage file, or a folder of bags (results aggregated, and per bag).
An image that cannot be decoded is a `bad_frame` (not acted on, its reason in frames.jsonl), as the node
counts a bad camera message; the replay goes on.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from ..bagio import BagError, LabelledFrame, find_bags, pair_frames_with_commands, read_episode
from .metrics import FrameRecord, agreement_text, summarize

OFFLINE_AGENT_BUDGET_MS = 60_000.0


def load_agent(engine: str | Path | None, budget_ms: float | None = None, **kwargs: Any):
    from ..agent import Agent, AgentConfig

    cfg: dict[str, Any] = {k: v for k, v in kwargs.items() if v is not None}
    if engine is not None:
        cfg["engine"] = Path(engine)
    if budget_ms is not None:
        cfg["budget_ms"] = budget_ms
    return Agent(AgentConfig(**cfg))


def _raw_twist(agent, action: dict | None) -> tuple[float, float]:
    from ..actions import action_to_twist

    tw = action_to_twist(action or {}, agent.spec)
    return float(tw["linear_x"]), float(tw["angular_z"])


def _record(agent, bag: str, k: int, lf: LabelledFrame, t0_ns: int, result, latency_ms: float | None) -> FrameRecord:
    rec = FrameRecord(bag=bag, index=k, t_s=(lf.frame.t_ns - t0_ns) / 1e9, status=result.status,
                      instruction=agent.instruction)
    if lf.command is not None:
        rec.rec_linear_x, rec.rec_angular_z = lf.command.linear_x, lf.command.angular_z
    if result.status == "bad_frame":  # the bag's own reason (an undecodable image) before the agent's
        rec.error = lf.frame.error or result.error
    if result.status in ("ok", "fallback"):
        rec.raw_linear_x, rec.raw_angular_z = _raw_twist(agent, result.action)
        rec.linear_x, rec.angular_z = float(result.twist["linear_x"]), float(result.twist["angular_z"])
        rec.timings_ms = {k2: round(float(v), 3) for k2, v in result.timings_ms.items()}
        rec.decode_steps = int(result.decode_steps)
        rec.deadline_hit = bool(result.deadline_hit)
        rec.latency_ms = latency_ms
    return rec


def _set_instruction(agent, lf: LabelledFrame, override: str | None) -> None:
    from ..engine.kv_cache import CacheFull

    text = override or lf.instruction
    if text and text.strip() and text.strip() != agent.instruction:
        try:
            agent.set_instruction(text)
        except CacheFull as err:  # as the node does with its topic's: the instruction before stays
            warnings.warn(f"instruction from the bag refused, {agent.instruction!r} kept: {err}", stacklevel=2)


def _stamp_rel_s(lf: LabelledFrame, t0_ns: int) -> float:
    stamp = lf.frame.stamp_ns or lf.frame.t_ns  # unstamped frames count from their arrival
    return (stamp - t0_ns) / 1e9


def replay_offline(agent, labels: Sequence[LabelledFrame], bag: str, override: str | None = None,
                   progress: bool = True) -> list[FrameRecord]:
    t0 = labels[0].frame.t_ns
    out = []
    for k, lf in enumerate(tqdm(labels, desc=f"replay {bag}", unit="frame", disable=not progress, leave=False)):
        _set_instruction(agent, lf, override)
        stamp = _stamp_rel_s(lf, t0)
        result = agent.act(lf.frame.rgb, stamp_s=stamp, now_s=stamp)
        out.append(_record(agent, bag, k, lf, t0, result, result.timings_ms.get("total")))
    return out


def replay_realtime(agent, labels: Sequence[LabelledFrame], bag: str, override: str | None = None,
                    progress: bool = True, speed: float = 1.0) -> list[FrameRecord]:
    from ..ros.frame_slot import LatestSlot

    t0 = labels[0].frame.t_ns
    slot = LatestSlot()
    fed = threading.Event()
    base = time.time() + 0.05  # wall-clock time of the bag's first frame
    records: dict[int, FrameRecord] = {}

    def feed() -> None:
        try:
            for k, lf in enumerate(labels):
                delay = base + (lf.frame.t_ns - t0) / 1e9 / speed - time.time()
                if delay > 0:
                    time.sleep(delay)
                slot.put(k)
        finally:
            fed.set()

    feeder = threading.Thread(target=feed, name="replay_feeder", daemon=True)
    feeder.start()
    bar = tqdm(total=len(labels), desc=f"replay {bag} (realtime)", unit="frame", disable=not progress, leave=False)
    seen = 0
    while True:
        k = slot.take(timeout=0.05)
        if k is None:
            if fed.is_set():
                k = slot.take(timeout=0.0)
                if k is None:
                    break
            else:
                continue
        lf = labels[k]
        _set_instruction(agent, lf, override)
        stamp = base + _stamp_rel_s(lf, t0) / speed
        result = agent.act(lf.frame.rgb, stamp_s=stamp, now_s=time.time())
        records[k] = _record(agent, bag, k, lf, t0, result, (time.time() - stamp) * 1e3)
        bar.update(k + 1 - seen)
        seen = k + 1
    bar.close()
    feeder.join()
    out = []
    for k, lf in enumerate(labels):
        rec = records.get(k)
        if rec is None:  # replaced in the slot by a newer frame before the agent took it
            rec = FrameRecord(bag=bag, index=k, t_s=(lf.frame.t_ns - t0) / 1e9, status="dropped",
                              instruction=lf.instruction)
            if lf.command is not None:
                rec.rec_linear_x, rec.rec_angular_z = lf.command.linear_x, lf.command.angular_z
        out.append(rec)
    return out


def replay(bag_path: str | Path, agent, *, realtime: bool = False, image_topic: str | None = None,
           cmd_topic: str = "/cmd_vel", instruction_topic: str = "/instruction", instruction: str | None = None,
           max_frames: int | None = None, progress: bool = True, speed: float = 1.0,
           ) -> tuple[dict[str, list[FrameRecord]], dict[str, Any]]:
    """Replay every bag under `bag_path`; returns (records by bag name, per-bag info)."""
    bags = find_bags(bag_path)
    by_bag: dict[str, list[FrameRecord]] = {}
    info: dict[str, Any] = {}
    warmed = False
    for bag in tqdm(bags, desc="bags", unit="bag", disable=not progress or len(bags) == 1):
        episode = read_episode(bag, image_topic=image_topic, cmd_topic=cmd_topic, instruction_topic=instruction_topic)
        if not episode.frames:
            raise BagError(f"{bag}: image topic {episode.image_topic!r} has no messages")
        labels = pair_frames_with_commands(episode.frames, episode.commands, episode.instructions)
        if max_frames:
            labels = labels[:max_frames]
        name = bag.name if bag.name not in by_bag else str(bag)
        if not warmed:  # first call pays one-time costs (allocation, kernels): keep it out of the numbers
            first = next((lf for lf in labels if lf.frame.rgb is not None), None)
            if first is None:
                raise BagError(f"{bag}: none of its {len(labels)} images can be decoded ({labels[0].frame.error})")
            _set_instruction(agent, first, instruction)
            agent.act(first.frame.rgb)
            warmed = True
        agent.safety.reset()
        by_bag[name] = (replay_realtime(agent, labels, name, instruction, progress, speed) if realtime
                        else replay_offline(agent, labels, name, instruction, progress))
        info[name] = {"path": str(bag), "image_topic": episode.image_topic,
                      "image_type": episode.topics.get(episode.image_topic), "commands": len(episode.commands),
                      "instructions": sorted({i.text for i in episode.instructions})}
    return by_bag, info


def machine_info() -> dict[str, Any]:
    import os

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def engine_name(agent) -> str:
    try:
        return json.loads((Path(agent.config.engine) / "manifest.json").read_text()).get("name") or str(agent.config.engine)
    except (OSError, ValueError):
        return str(agent.config.engine)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import positive
    from ..model.config import IMAGE_TOKEN_COUNTS

    parser.add_argument("bag", type=Path, help="bag folder, storage file (.mcap/.db3) or a folder of bags")
    parser.add_argument("--engine", type=Path, default=None, help="engine folder (default: the bundled demo engine)")
    parser.add_argument("--report", type=Path, default=Path("out/replay"), help="output folder (default out/replay)")
    parser.add_argument("--realtime", action="store_true",
                        help="deliver frames at their recorded times (latest wins; drops and misses counted)")
    parser.add_argument("--speed", type=positive(float), default=1.0,
                        help="realtime playback speed factor (default 1.0)")
    parser.add_argument("--image-topic", default=None, help="image topic (default: the first Image/CompressedImage)")
    parser.add_argument("--cmd-topic", default="/cmd_vel", help="recorded command topic (Twist/TwistStamped)")
    parser.add_argument("--instruction-topic", default="/instruction")
    parser.add_argument("--instruction", default=None, help="fixed instruction (overrides the bag's)")
    parser.add_argument("--budget-ms", type=positive(float), default=None,
                        help="latency budget (default: the agent's, 500)")
    parser.add_argument("--image-tokens", type=int, default=None, choices=IMAGE_TOKEN_COUNTS)
    parser.add_argument("--backend", default=None, choices=["torch", "onnxruntime", "tensorrt"])
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"])
    parser.add_argument("--compile", action="store_true", default=None,
                        help="torch backend: torch.compile the decoder first (a slow start, faster frames)")
    parser.add_argument("--max-frames", type=positive(int), default=None,
                        help="replay at most this many frames per bag")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from ..engine.kv_cache import CacheFull
    from ..engines.manifest import EngineError
    from .report import make_report_folder

    # frames decoded from a bag are read-only arrays; preprocessing only reads them
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

    try:
        bags = find_bags(args.bag)  # fail on a bad path before loading the engine
        make_report_folder(args.report)  # and on a report path that cannot be a folder, before the replay
        budget = args.budget_ms if args.budget_ms is not None else 500.0
        agent = load_agent(args.engine, budget if args.realtime else OFFLINE_AGENT_BUDGET_MS,
                           image_tokens=args.image_tokens, backend=args.backend, device=args.device,
                           compile=args.compile)
        if args.instruction:  # refused here, before the replay, when the engine cannot hold it
            agent.set_instruction(args.instruction)
        if args.budget_ms is None:
            from ..agent import AgentConfig
            budget = AgentConfig.model_fields["budget_ms"].default
        by_bag, info = replay(args.bag, agent, realtime=args.realtime, image_topic=args.image_topic,
                              cmd_topic=args.cmd_topic, instruction_topic=args.instruction_topic,
                              instruction=args.instruction, max_frames=args.max_frames,
                              progress=not args.no_progress, speed=args.speed)
    except (BagError, EngineError, OSError, CacheFull) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    records = [r for recs in by_bag.values() for r in recs]
    report: dict[str, Any] = {
        "kind": "replay",
        "mode": "realtime" if args.realtime else "offline",
        "engine": str(agent.config.engine), "engine_name": engine_name(agent),
        "image_tokens": agent.image_tokens, "budget_ms": budget,
        "command": "gemma4-agent replay " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["replay"] else sys.argv[1:]),
        "machine": machine_info(),
        "bags": len(by_bag),
        **summarize(records, budget),
        "per_bag": {name: dict(info[name], **summarize(recs, budget)) for name, recs in by_bag.items()},
    }
    from .report import write_report

    header = [f"- engine: `{report['engine_name']}` ({report['engine']}), {agent.image_tokens} image tokens",
              f"- mode: {report['mode']}, budget {budget:g} ms, {len(by_bag)} bag(s): "
              + ", ".join(f"`{n}`" for n in list(by_bag)[:8]) + (" ..." if len(by_bag) > 8 else ""),
              f"- machine: {report['machine']['cpu']} ({report['machine']['cores']} cores), {report['machine']['date']}"]
    extra = []
    if len(by_bag) > 1:
        extra = ["## Per bag", "", "| bag | frames | processed | dropped | type agr. | sign agr. | p50 ms |",
                 "|---|---|---|---|---|---|---|"]
        for name, s in report["per_bag"].items():
            extra.append(f"| {name} | {s['frames']} | {s['processed']} | {s['dropped']} | "
                         f"{s['action_type_agreement']} | {s['angular_sign_agreement']} | {s['latency_ms']['p50']} |")
        extra.append("")
    with open(args.report / "frames.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r.to_dict()) + "\n")
    paths = write_report(args.report, report, records, "Replay report", header, by_bag, extra)
    print(summary_line(report))
    print(f"report: {paths['md']}")
    return 0


def summary_line(s: dict[str, Any]) -> str:
    lat = s["latency_ms"]
    agree = agreement_text(s) if s.get("has_recorded_commands") else "no recorded commands: latency only"
    bad = f", {s['bad_frames']} bad frames (not acted on)" if s.get("bad_frames") else ""
    return (f"{s['frames']} frames, {s['processed']} processed, {s['dropped']} dropped{bad}, {s['deadline_misses']} "
            f"deadline misses, {s['fallbacks']} fallbacks; {agree}; latency p50/p90/p99 {lat['p50']}/{lat['p90']}/"
            f"{lat['p99']} ms")
