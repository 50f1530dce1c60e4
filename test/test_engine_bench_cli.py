"""`gemma4-agent bench` as a user runs it (a subprocess, the tiny config, CPU): the report has the fields the
streaming-engine issue names, for each cache mode, on float and int4 weights."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cache, extra", [("prefix", []), ("none", []), ("window", ["--quant", "q4_0"])])
def test_bench_cli_reports_latency_percentiles(tmp_path, cache, extra):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "gemma4_agent.cli", "bench", "--config",
                           str(ROOT / "benchmarks" / "tiny-config.json"), "--device", "cpu", "--frames", "4",
                           "--image-tokens", "70", "--decode-tokens", "3", "--cache", cache, "--prefix-tokens", "40",
                           "--json", str(out), *extra], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["cache"] == cache and report["frames"] == 4 and report["device"] and report["dtype"] == "float32"
    assert report["quant"] == ("q4_0" if extra else None)
    p = report["per_frame_ms"]
    assert 0 < p["p50"] <= p["p90"] <= p["p99"]
    for key in ("first_decile_p50_ms", "last_decile_p50_ms", "prefill_ms_p50", "decode_ms_per_token_p50"):
        assert report[key] > 0, key
    assert report["prefill_ms_p50"] < p["p50"]  # a frame is its prefill plus its decode steps


def test_bench_cli_refuses_a_missing_config(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gemma4_agent.cli", "bench", "--config", str(tmp_path / "nope.json"),
                           "--frames", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0
    assert "nope" in proc.stderr and "Traceback" not in proc.stderr
