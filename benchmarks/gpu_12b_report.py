"""Where the 12B engine stands, drawn from the raw results that BENCHMARKS.md quotes (no GPU needed):

- `gpu_12b_progress.png`: per-frame p50 of every compiled prefix-cache run at the 12B shape, bf16 and int4, at 280
  and 70 image tokens, in the order the runs were made, against each series' floor and the 1.5x target;
- `gpu_12b_int4_breakdown.png`: where the latest profiled int4 frame's time goes (the profile's busy table grouped
  into kinds of work, and the rest of the frame: the GPU idle, waiting on the host);
- on stdout, a Markdown table of the latest run of each series.

The series are the files named `gpu_12b_h200_*` and `gpu_12b_int4_h200_*`, and `gpu_12b_int4_h100_*` for the leases
that lent an H100 (its floor is its own: measured on it); the runs of an experiment that was measured and dropped are
kept as `gpu_12b_int4_experiment_{h200,h100}_*`, outside them.

    python benchmarks/gpu_12b_report.py [--results benchmarks/results] [--out benchmarks/results]
"""
import argparse
import json
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SERIES = {"bf16": "gpu_12b_h200_", "int4": "gpu_12b_int4_h200_", "H100 int4": "gpu_12b_int4_h100_"}
# kernel name pattern -> kind of work, first match wins (names as torch.profiler reports them)
# (cuBLAS's kernels do not say whose matmul they run: since the 2026-11-29s run the prefill attention's q k^T and
# p v are among them, beside its softmax kernel)
KINDS = [(r"_gemv", "decode GEMVs"), (r"_dequant_kernel", "prefill: int4 dequantization"),
         (r"_gemm_kernel", "prefill: int4 GEMM (Triton)"), (r"nvjet|gemm", "prefill: cuBLAS (weights, attention)"),
         (r"_split_kernel|_merge_kernel", "decode attention"),
         (r"sdpa|fmha|flash|_masked_softmax", "prefill attention (SDPA; softmax)"),
         (r"_add_norms|_qkv_kernel|_gelu_mul", "norms, RoPE, cache writes, gate"), (r".", "other")]


def run_label(path: Path, prefix: str) -> str:
    return path.stem[len(prefix):]


def run_order(path: Path, prefix: str) -> tuple[str, str]:
    # 2026-11-29 before 2026-11-29b: the date, then the letter the later runs of a day carry
    label = run_label(path, prefix)
    return label[:10], label[10:]


def collect(results: Path) -> dict[str, list[dict]]:
    """series -> runs (compiled, prefix cache, a fixed count of decoded tokens: those with a floor), oldest first,
    each with its file's label."""
    out: dict[str, list[dict]] = {}
    for series, prefix in SERIES.items():
        rows = []
        for path in sorted(results.glob(f"{prefix}*.json"), key=lambda p: run_order(p, prefix)):
            for run in json.loads(path.read_text()).get("runs", []):
                if run.get("compile") and run.get("cache") == "prefix" and "per_frame_ms" in run \
                        and run.get("selector", "fixed") == "fixed":
                    rows.append({**run, "label": run_label(path, prefix), "file": path.name})
        out[series] = rows
    return out


def busy_table(profile: Path) -> tuple[float, dict[str, float]]:
    """The profile's "GPU busy time without overlap" table (engine/bench.py write_profile): (busy ms a frame,
    kind of work -> ms a frame)."""
    text = profile.read_text()
    match = re.search(r"GPU busy time without overlap: ([0-9.]+) ms a frame\n\n(.*?)(?:\n\n|\Z)", text, re.S)
    if match is None:
        raise ValueError(f"{profile}: no busy-time table")
    busy = float(match.group(1))
    kinds: dict[str, float] = {}
    for line in match.group(2).splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        kind = next(k for pattern, k in KINDS if re.search(pattern, cells[0]))
        if kind != "other":
            kinds[kind] = kinds.get(kind, 0.0) + float(cells[1])
    kinds["other"] = busy - sum(kinds.values())  # with the kernels past the table's last row
    return busy, kinds


def latest_table(runs: dict[str, list[dict]]) -> str:
    lines = ["| series | image tokens | p50 ms | floor ms | p50 / floor | decode ms/token | prefill ms | run |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for series, rows in runs.items():
        for tokens in (280, 70):
            mine = [r for r in rows if r["image_tokens"] == tokens]
            if mine:
                r = mine[-1]
                lines.append(f"| {series} | {tokens} | {r['per_frame_ms']['p50']:.1f} | {r['floor_ms']:.1f} | "
                             f"{r['per_frame_ms']['p50'] / r['floor_ms']:.2f} | {r['decode_ms_per_token_p50']:.2f} | "
                             f"{r['prefill_ms_p50']:.1f} | `{r['file']}` |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def plot_progress(runs: dict[str, list[dict]], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.2), sharey=False)
    for ax, (series, rows) in zip(axes, runs.items()):
        labels = list(dict.fromkeys(r["label"] for r in rows))
        for tokens, color in ((280, "tab:blue"), (70, "tab:orange")):
            mine = [r for r in rows if r["image_tokens"] == tokens]
            if not mine:
                continue
            xs = [labels.index(r["label"]) for r in mine]
            ax.plot(xs, [r["per_frame_ms"]["p50"] for r in mine], "o-", color=color, label=f"{tokens} image tokens")
            floor = mine[-1]["floor_ms"]
            ax.axhline(floor, color=color, ls=":", lw=1, label=f"floor, {tokens} ({floor:.1f} ms)")
            ax.axhline(1.5 * floor, color=color, ls="--", lw=1, label=f"1.5x floor, {tokens}")
        ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
        ax.set_ylim(bottom=0)
        ax.set_title(f"{series}: per-frame p50, 12 decoded tokens")
        ax.set_ylabel("ms")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_breakdown(frame_ms: float, busy_ms: float, kinds: dict[str, float], title: str, path: Path) -> None:
    plt = _pyplot()
    parts = sorted(kinds.items(), key=lambda kv: -kv[1]) + [("GPU idle (waiting on the host)", frame_ms - busy_ms)]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.barh([name for name, _ in parts][::-1], [ms for _, ms in parts][::-1], color="tab:blue")
    for i, (_, ms) in enumerate(parts[::-1]):
        ax.text(ms, i, f" {ms:.1f}", va="center", fontsize=8)
    ax.set_xlabel("ms a frame")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    runs = collect(args.results)
    if not any(runs.values()):
        print(f"no 12B results under {args.results}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    plot_progress(runs, args.out / "gpu_12b_progress.png")
    profiled = [r for r in runs["int4"] if r["image_tokens"] == 280
                and (args.results / f"profile_int4_compiled_280_h200_{r['label']}.txt").exists()]
    if profiled:
        r = profiled[-1]
        busy, kinds = busy_table(args.results / f"profile_int4_compiled_280_h200_{r['label']}.txt")
        plot_breakdown(r["per_frame_ms"]["p50"], busy, kinds,
                       f"int4, 280 image tokens: a {r['per_frame_ms']['p50']:.1f} ms frame (run {r['label']})",
                       args.out / "gpu_12b_int4_breakdown.png")
    print(latest_table(runs), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
