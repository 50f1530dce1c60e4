"""Evaluate a bag recorded by `play --record` (the node's outputs) against the played bag.

The node's `~/action` reports carry the camera frame's stamp; the recorder's
`/gemma4_agent_play/frames` topic maps each published stamp to the played frame's index, and the
played bag's `/cmd_vel` after that frame is the reference. A frame without a report was dropped
(replaced in the node's one-slot buffer, or lost in transport).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..bagio import BagError, _open, pair_frames_with_commands, read_episode
from .metrics import FrameRecord, summarize
from .play import FRAMES_TOPIC


def read_recording(path: str | Path) -> dict[str, Any]:
    """frames (index -> stamp_ns), actions (list of dicts with t_ns), cmd_vel count, last diagnostics values."""
    frames: dict[int, int] = {}
    actions: list[dict[str, Any]] = []
    cmd_vel: list[tuple[int, float, float]] = []
    diagnostics: dict[str, str] = {}
    with _open(path) as reader:
        try:
            for conn, t_ns, raw in reader.messages():
                msg = reader.deserialize(raw, conn.msgtype)
                if conn.topic == FRAMES_TOPIC:
                    d = json.loads(msg.data)
                    frames[int(d["index"])] = int(d["stamp_ns"])
                elif conn.msgtype == "std_msgs/msg/String" and conn.topic.endswith("/action"):
                    d = json.loads(msg.data)
                    d["t_ns"] = t_ns
                    actions.append(d)
                elif conn.msgtype == "geometry_msgs/msg/Twist":
                    cmd_vel.append((t_ns, float(msg.linear.x), float(msg.angular.z)))
                elif conn.msgtype == "diagnostic_msgs/msg/DiagnosticArray":
                    for status in msg.status:
                        if status.name.endswith(": inference"):
                            diagnostics = {kv.key: kv.value for kv in status.values}
        except (ValueError, KeyError) as exc:
            raise BagError(f"{path}: unexpected content: {type(exc).__name__}: {exc}") from exc
    return {"frames": frames, "actions": actions, "cmd_vel": cmd_vel, "diagnostics": diagnostics}


def evaluate_recording(recorded: str | Path, played: str | Path, budget_ms: float | None = None,
                       image_topic: str | None = None) -> tuple[dict[str, Any], list[FrameRecord]]:
    """(summary as in replay's report, per-frame records) of the node's outputs vs the played bag."""
    from ..actions import action_to_twist, load_action_spec

    rec = read_recording(recorded)
    if not rec["frames"]:
        raise BagError(f"{recorded}: no {FRAMES_TOPIC} messages (not recorded by `gemma4-agent play --record`?)")
    episode = read_episode(played, image_topic=image_topic)
    labels = pair_frames_with_commands(episode.frames, episode.commands, episode.instructions)
    by_stamp = {stamp: idx for idx, stamp in rec["frames"].items()}
    reports = {}
    for a in rec["actions"]:
        st = a.get("stamp") or {}
        idx = by_stamp.get(int(st.get("sec", 0)) * 10**9 + int(st.get("nanosec", 0)))
        if idx is not None:
            reports[idx] = a
    diag = rec["diagnostics"]
    if budget_ms is None:
        try:
            budget_ms = float(diag.get("budget_ms", 500.0))
        except ValueError:
            budget_ms = 500.0
    spec = load_action_spec()
    t0 = labels[0].frame.t_ns if labels else 0
    records = []
    for k in sorted(rec["frames"]):
        if k >= len(labels):
            continue
        lf = labels[k]
        r = reports.get(k)
        fr = FrameRecord(bag=Path(played).name, index=k, t_s=(lf.frame.t_ns - t0) / 1e9,
                         status=r["status"] if r else "dropped", instruction=lf.instruction)
        if lf.command is not None:
            fr.rec_linear_x, fr.rec_angular_z = lf.command.linear_x, lf.command.angular_z
        if r and r["status"] in ("ok", "fallback"):
            raw = action_to_twist(r.get("action") or {}, spec)
            fr.raw_linear_x, fr.raw_angular_z = float(raw["linear_x"]), float(raw["angular_z"])
            fr.linear_x, fr.angular_z = float(r["twist"]["linear_x"]), float(r["twist"]["angular_z"])
            fr.latency_ms = r.get("latency_ms")
            fr.timings_ms = {k2: float(v) for k2, v in (r.get("timings_ms") or {}).items()}
            fr.decode_steps = int(r.get("decode_steps") or 0)
            fr.deadline_hit = "deadline" in str(r.get("error") or "")
        records.append(fr)
    summary = summarize(records, budget_ms)
    summary["budget_ms"] = budget_ms
    summary["cmd_vel_messages"] = len(rec["cmd_vel"])
    summary["action_reports"] = len(rec["actions"])
    summary["node_diagnostics"] = diag
    return summary, records
