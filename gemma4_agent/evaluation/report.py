"""Write an evaluation report: report.json, report.md (tables + embedded PNGs) and matplotlib plots."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

from .metrics import FrameRecord

MAX_COMMAND_PLOTS = 4


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "bag"


def plot_latency(records: Sequence[FrameRecord], path: Path) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acted = [r for r in records if r.acted]
    stages = [s for s in ("preprocess", "prefill", "decode", "total") if any(s in r.timings_ms for r in acted)]
    series = [[r.timings_ms[s] for r in acted if s in r.timings_ms] for s in stages]
    labels = list(stages)
    e2e = [r.latency_ms for r in acted if r.latency_ms is not None]
    if e2e:
        series.append(e2e)
        labels.append("end_to_end")
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.boxplot(series, showfliers=True)
    ax.set_xticks(range(1, len(labels) + 1), labels)
    ax.set_ylabel("ms")
    ax.set_title(f"latency per stage ({len(acted)} frames)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_commands(records: Sequence[FrameRecord], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    acted = [r for r in records if r.acted]
    recorded = [r for r in records if r.rec_linear_x is not None]
    for ax, field, label in ((axes[0], "angular_z", "angular_z (rad/s)"), (axes[1], "linear_x", "linear_x (m/s)")):
        if recorded:
            ax.step([r.t_s for r in recorded], [getattr(r, "rec_" + field) for r in recorded], where="post",
                    color="black", lw=1.5, label="recorded")
        ax.plot([r.t_s for r in acted], [getattr(r, "raw_" + field) for r in acted], ".", ms=4, color="tab:blue",
                label="agent (raw action)")
        ax.step([r.t_s for r in acted], [getattr(r, field) for r in acted], where="post", color="tab:orange",
                lw=1, alpha=0.8, label="agent (after safety)")
        dropped = [r.t_s for r in records if not r.acted]
        if dropped:
            ax.plot(dropped, [0.0] * len(dropped), "x", color="tab:red", ms=4, label="dropped")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper right", fontsize=7)
    axes[1].set_xlabel("time since first frame (s)")
    axes[0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def metrics_table(summary: dict[str, Any]) -> list[str]:
    lat = summary.get("latency_ms") or {}
    rows = [
        ("frames", summary.get("frames")), ("processed", summary.get("processed")),
        ("dropped (replaced / stale)", f"{summary.get('dropped')} ({summary.get('dropped_replaced')} / "
                                       f"{summary.get('dropped_stale')})"),
        ("deadline misses", summary.get("deadline_misses")), ("fallbacks", summary.get("fallbacks")),
        ("bad frames (not acted on: frames.jsonl says why)", summary.get("bad_frames") or None),
        ("decode steps (mean)", summary.get("decode_steps_mean")),
        ("action type agreement", summary.get("action_type_agreement")),
        (f"angular sign agreement ({summary.get('turning_frames', 0)} turning frames)",
         summary.get("angular_sign_agreement")),
        ("linear_x MAE (raw / after safety)", f"{_fmt(summary.get('linear_mae'))} / "
                                              f"{_fmt((summary.get('post_safety') or {}).get('linear_mae'))}"),
        ("angular_z MAE (raw / after safety)", f"{_fmt(summary.get('angular_mae'))} / "
                                               f"{_fmt((summary.get('post_safety') or {}).get('angular_mae'))}"),
        ("latency p50 / p90 / p99 (ms)", f"{_fmt(lat.get('p50'))} / {_fmt(lat.get('p90'))} / {_fmt(lat.get('p99'))}"),
    ]
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows if v is not None or k.startswith(("action", "angular sign"))]
    return lines


def stage_table(summary: dict[str, Any]) -> list[str]:
    stages = summary.get("latency_ms_by_stage") or {}
    if not stages:
        return []
    lines = ["| stage | p50 | p90 | p99 | mean | max |", "|---|---|---|---|---|---|"]
    for name, p in list(stages.items()) + [("end to end", summary.get("latency_ms") or {})]:
        lines.append(f"| {name} | " + " | ".join(_fmt(p.get(k)) for k in ("p50", "p90", "p99", "mean", "max")) + " |")
    return lines


def make_report_folder(out: Path) -> Path:
    """Create the output folder before the run: a path that cannot be a folder fails at once, not after it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"--report {out}: cannot create the output folder here ({err.strerror or err})") from err
    return out


def write_report(out: Path, report: dict[str, Any], records: Sequence[FrameRecord], title: str,
                 header_lines: Sequence[str] = (), by_bag: dict[str, Sequence[FrameRecord]] | None = None,
                 extra_sections: Sequence[str] = ()) -> dict[str, Path]:
    """report.json, report.md, latency.png and commands_*.png under `out`; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    plots: list[tuple[str, Path]] = []
    lat = plot_latency(records, out / "latency.png")
    if lat:
        plots.append(("Latency per stage", lat))
    for name, recs in list((by_bag or {}).items())[:MAX_COMMAND_PLOTS]:
        p = plot_commands(recs, out / f"commands_{_slug(name)}.png", f"commanded vs recorded: {name}")
        plots.append((f"Commands: {name}", p))
    report = dict(report, plots=[p.name for _, p in plots])
    paths["json"] = out / "report.json"
    paths["json"].write_text(json.dumps(report, indent=2, default=str) + "\n")
    md = [f"# {title}", ""] + list(header_lines) + [""] + metrics_table(report) + [""]
    if not report.get("has_recorded_commands", True):
        md += ["No recorded commands in the input: latency-only results (agreement not computed).", ""]
    st = stage_table(report)
    if st:
        md += ["## Latency by stage (ms)", ""] + st + [""]
    md += list(extra_sections)
    for caption, p in plots:
        md += [f"## {caption}", "", f"![{caption}]({p.name})", ""]
    paths["md"] = out / "report.md"
    paths["md"].write_text("\n".join(md) + "\n")
    return paths
