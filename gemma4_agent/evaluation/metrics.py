"""Per-frame records and the metrics computed over them (shared by replay, sim and demo).

A recorded zero twist is a "stop"; anything else a "move". The agent's type is taken the same way
from the twist of its raw action (before safety limits), so "move 0, 0" and "stop" agree.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

STOP_EPS = 1e-6
SIGN_THRESHOLD = 0.05  # rad/s: frames whose recorded |angular_z| exceeds this count for sign agreement
STAGES = ("preprocess", "prefill", "decode", "total")


def twist_type(linear_x: float, angular_z: float) -> str:
    return "stop" if abs(linear_x) <= STOP_EPS and abs(angular_z) <= STOP_EPS else "move"


@dataclass
class FrameRecord:
    """One frame: what the agent did with it and what was recorded after it."""

    bag: str
    index: int
    t_s: float  # seconds since the bag's first frame
    status: str  # ok | fallback | dropped_stale | bad_frame | dropped (replaced in the slot)
    raw_linear_x: float | None = None  # the model's action, before safety limits
    raw_angular_z: float | None = None
    linear_x: float | None = None  # after safety limits (what would be published)
    angular_z: float | None = None
    rec_linear_x: float | None = None  # recorded command (None: none recorded for this frame)
    rec_angular_z: float | None = None
    latency_ms: float | None = None  # capture stamp -> command (realtime) or agent total (offline)
    timings_ms: dict[str, float] = field(default_factory=dict)
    decode_steps: int = 0
    deadline_hit: bool = False
    instruction: str | None = None
    error: str | None = None  # why a bad_frame was not acted on (e.g. an image that cannot be decoded)

    @property
    def acted(self) -> bool:
        return self.status in ("ok", "fallback")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentiles(values: Iterable[float], qs: Sequence[int] = (50, 90, 99)) -> dict[str, float | None]:
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if arr.size == 0:
        return {f"p{q}": None for q in qs} | {"mean": None, "max": None}
    out = {f"p{q}": round(float(np.percentile(arr, q)), 3) for q in qs}
    out["mean"] = round(float(arr.mean()), 3)
    out["max"] = round(float(arr.max()), 3)
    return out


def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def _mae(pairs: list[tuple[float, float]]) -> float | None:
    return round(float(np.mean([abs(a - b) for a, b in pairs])), 4) if pairs else None


def agreement(records: Sequence[FrameRecord]) -> dict[str, Any]:
    """Agreement of the agent's commands with the recorded ones, over acted frames with a recording."""
    both = [r for r in records if r.acted and r.rec_linear_x is not None and r.raw_linear_x is not None]
    type_ok = sum(twist_type(r.raw_linear_x, r.raw_angular_z) == twist_type(r.rec_linear_x, r.rec_angular_z)
                  for r in both)
    turning = [r for r in both if abs(r.rec_angular_z) > SIGN_THRESHOLD]
    sign_ok = sum(math.copysign(1, r.rec_angular_z) == (math.copysign(1, r.raw_angular_z) if r.raw_angular_z else 0)
                  for r in turning)
    post = [r for r in both if r.linear_x is not None]
    post_type_ok = sum(twist_type(r.linear_x, r.angular_z) == twist_type(r.rec_linear_x, r.rec_angular_z)
                       for r in post)
    return {
        "compared_frames": len(both),
        "turning_frames": len(turning),
        "action_type_agreement": _ratio(type_ok, len(both)),
        "angular_sign_agreement": _ratio(sign_ok, len(turning)),
        "linear_mae": _mae([(r.raw_linear_x, r.rec_linear_x) for r in both]),
        "angular_mae": _mae([(r.raw_angular_z, r.rec_angular_z) for r in both]),
        "post_safety": {
            "action_type_agreement": _ratio(post_type_ok, len(post)),
            "linear_mae": _mae([(r.linear_x, r.rec_linear_x) for r in post]),
            "angular_mae": _mae([(r.angular_z, r.rec_angular_z) for r in post]),
        },
    }


def agreement_text(s: dict[str, Any]) -> str:
    """One line of the agreement numbers; the sign is over turning frames only, so their count goes with it."""
    return (f"action type agreement {s['action_type_agreement']}, angular sign agreement {s['angular_sign_agreement']} "
            f"(over {s.get('turning_frames', 0)} turning frames), MAE linear {s['linear_mae']} angular {s['angular_mae']}")


def summarize(records: Sequence[FrameRecord], budget_ms: float) -> dict[str, Any]:
    """The report's numbers over `records` (one bag or many)."""
    acted = [r for r in records if r.acted]
    stages = sorted({k for r in acted for k in r.timings_ms}, key=lambda s: (STAGES + (s,)).index(s))
    out: dict[str, Any] = {
        "frames": len(records),
        "processed": len(acted),
        "dropped": sum(r.status in ("dropped", "dropped_stale") for r in records),
        "dropped_replaced": sum(r.status == "dropped" for r in records),
        "dropped_stale": sum(r.status == "dropped_stale" for r in records),
        "bad_frames": sum(r.status == "bad_frame" for r in records),
        "deadline_misses": sum(r.latency_ms is not None and r.latency_ms > budget_ms for r in acted),
        "deadline_hits": sum(r.deadline_hit for r in acted),
        "fallbacks": sum(r.status == "fallback" for r in acted),
        "decode_steps_mean": round(float(np.mean([r.decode_steps for r in acted])), 3) if acted else None,
        "has_recorded_commands": any(r.rec_linear_x is not None for r in records),
    }
    out.update(agreement(records))
    out["latency_ms"] = percentiles(r.latency_ms for r in acted)
    out["latency_ms_by_stage"] = {s: percentiles(r.timings_ms.get(s) for r in acted) for s in stages}
    return out
