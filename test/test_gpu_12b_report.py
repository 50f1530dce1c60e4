"""benchmarks/gpu_12b_report.py over the raw 12B results committed with BENCHMARKS.md: the latest run of each series
in its table, the plots written, and the profile's busy table grouped by kind of work."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_12b_report as report  # noqa: E402


def test_report_lists_the_latest_run_of_each_series_and_draws_its_plots(tmp_path):
    results = ROOT / "benchmarks" / "results"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_12b_report.py"), "--results", str(results),
                          "--out", str(tmp_path)], capture_output=True, text=True, check=True).stdout
    # the newest int4 file with a compiled 280-token row of 12 decoded tokens (not an action under the grammar, whose
    # length the weights choose), found here without the script's ordering helpers
    def row_of(r):
        return r.get("compile") and r.get("image_tokens") == 280 and r.get("selector", "fixed") == "fixed"

    newest = max((p for p in results.glob("gpu_12b_int4_h200_*.json")
                  if any(row_of(r) for r in json.loads(p.read_text())["runs"])),
                 key=lambda p: (p.stem[18:28], p.stem[28:]))
    run = next(r for r in json.loads(newest.read_text())["runs"] if row_of(r))
    row = next(line for line in out.splitlines() if line.startswith("| int4 | 280 "))
    assert f"| {run['per_frame_ms']['p50']:.1f} |" in row and newest.name in row
    assert len([line for line in out.splitlines() if line.startswith("| bf16 ") or line.startswith("| int4 ")]) == 4
    if any(results.glob("gpu_12b_int4_h100_*.json")):  # the H100 leases' series, its own rows
        assert any(line.startswith("| H100 int4 | 280 ") for line in out.splitlines()), out
    for png in ("gpu_12b_progress.png", "gpu_12b_int4_breakdown.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_busy_table_groups_kernels_by_kind_and_keeps_the_untabled_rest_as_other(tmp_path):
    profile = tmp_path / "profile.txt"
    profile.write_text("first table\n\nGPU busy time without overlap: 10.00 ms a frame\n\n"
                       "| kernel | ms a frame | share | calls a frame | us a call |\n|---|---:|---:|---:|---:|\n"
                       "| _gemv_q8_kernel | 4.000 | 40% | 10 | 4 |\n| _gemv_kernel | 1.000 | 10% | 1 | 4 |\n"
                       "| nvjet_sm90_tst_256x144 | 2.000 | 20% | 1 | 2 |\n| _split_kernel | 1.500 | 15% | 1 | 1 |\n"
                       "| triton_poi_fused_x | 0.500 | 5% | 1 | 1 |\n\nGPU idle between kernels: 1.00 ms a frame\n")
    busy, kinds = report.busy_table(profile)
    assert busy == 10.0
    assert kinds == {"decode GEMVs": 5.0, "prefill: cuBLAS (weights, attention)": 2.0, "decode attention": 1.5,
                     "other": 1.5}
