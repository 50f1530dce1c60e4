"""`gemma4-agent bench` as a user runs it (a subprocess, the tiny config, CPU): the report has the fields the
streaming-engine issue names, for each cache mode, on float and int4 weights."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gemma4_agent.model.loader import resolve_dtype

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
    assert report["cache"] == cache and report["frames"] == 4 and report["device"]
    assert report["dtype"] == str(resolve_dtype("auto", "cpu")).replace("torch.", "")  # fp32 but on CPUs with AMX
    assert report["quant"] == ("q4_0" if extra else None)
    p = report["per_frame_ms"]
    assert 0 < p["p50"] <= p["p90"] <= p["p99"]
    for key in ("first_decile_p50_ms", "last_decile_p50_ms", "prefill_ms_p50", "decode_ms_per_token_p50"):
        assert report[key] > 0, key
    assert report["selector"] == "fixed" and report["tokens_mean"] == 3 and report["decode_steps_mean"] == 2
    assert report["prefill_ms_p50"] < p["p50"]  # a frame is its prefill plus its decode steps
    assert report["warmup_s"] * 1e3 > p["p50"]  # the warm-up frames (3 by default) take longer than one frame


def test_bench_cli_times_an_action_of_the_grammar(tmp_path):
    # --selector grammar: each frame decodes one action as the agent does (the action grammar, jump-forward), so a
    # frame's tokens outnumber its forward passes (forced runs go in one pass) and the action ends before the cap
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "gemma4_agent.cli", "bench", "--config",
                           str(ROOT / "benchmarks" / "tiny-config.json"), "--device", "cpu", "--frames", "3",
                           "--image-tokens", "70", "--decode-tokens", "64", "--selector", "grammar",
                           "--prefix-tokens", "40", "--json", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["selector"] == "grammar"
    assert 1 <= report["decode_steps_mean"] < report["tokens_mean"] - 1 and report["tokens_mean"] < 64
    assert 0 < report["decode_ms_p50"] < report["per_frame_ms"]["p50"]


def test_bench_cli_refuses_a_missing_config(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gemma4_agent.cli", "bench", "--config", str(tmp_path / "nope.json"),
                           "--frames", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0
    assert "nope" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("option", ["--frames", "--prefix-tokens", "--decode-tokens"])
def test_bench_cli_refuses_counts_of_zero_before_any_work(option):
    proc = subprocess.run([sys.executable, "-m", "gemma4_agent.cli", "bench", "--config",
                           str(ROOT / "benchmarks" / "tiny-config.json"), option, "0"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2 and f"argument {option}: 0 must be greater than 0" in proc.stderr, proc.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the message of a machine without CUDA")
def test_bench_cli_says_when_there_is_no_cuda_device():
    proc = subprocess.run([sys.executable, "-m", "gemma4_agent.cli", "bench", "--config",
                           str(ROOT / "benchmarks" / "tiny-config.json"), "--device", "cuda", "--frames", "1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_floor_counts_the_prefill_flops_of_int4_layers_as_of_dense_ones():
    # int4 weights are buffers, not parameters: a count of parameters once left the int4 prefill out of the floor
    from gemma4_agent.engine.bench import floor_ms
    from gemma4_agent.model import ModelConfig, build_model
    from gemma4_agent.quant.int4 import Int4Linear, quantize_model

    model = build_model(ModelConfig.from_json(ROOT / "benchmarks" / "tiny-config.json"))
    text = model.config.text_config
    linear = sum(p.numel() for p in model.layers.parameters() if p.ndim == 2)
    ceilings = {"copy_bandwidth_gbs": 1.0, "matmul_tflops": 1e-9}  # 1 FLOP per ms
    dense = floor_ms(model, 100, 1, ceilings, 0)  # one decoded token: no decode steps, the prefill alone
    assert dense == pytest.approx(2 * linear * 100 + 2 * text.vocab_size * text.hidden_size)
    quantize_model(model, "q4_0", progress=False)
    assert not any(p.ndim == 2 for p in model.layers.parameters())
    assert any(isinstance(m, Int4Linear) for m in model.layers.modules())
    assert floor_ms(model, 100, 1, ceilings, 0) == pytest.approx(dense)


def test_exclusive_times_split_the_busy_timeline_without_counting_overlap_twice():
    # PDL: b is scheduled while a runs and waits for it, so b owns only what follows a's end; c starts after an
    # idle gap (not charged to anyone's busy time, listed as the gap b -> c); d runs entirely beside c and adds no
    # time; the second a follows an idle gap after c, which ended last of c and d
    from gemma4_agent.engine.bench import exclusive_table, exclusive_times, idle_table

    busy, idle = exclusive_times([("c", 20.0, 25.0), ("a", 0.0, 10.0), ("b", 5.0, 15.0), ("d", 21.0, 23.0),
                                  ("a", 30.0, 40.0)])
    assert busy == {"a": (20.0, 2), "b": (5.0, 1), "c": (5.0, 1), "d": (0.0, 1)}
    assert idle == {"b -> c": (5.0, 1), "c -> a": (5.0, 1)}
    table = exclusive_table(busy, frames=2)
    assert table.startswith("GPU busy time without overlap: 0.01 ms a frame")
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| a ") or line.startswith("| b ")]
    assert rows[0][:3] == ["| a", "0.010", "66.7%"] and rows[1][:3] == ["| b", "0.003", "16.7%"]
    gaps = idle_table(idle, frames=2)
    assert gaps.startswith("GPU idle between kernels: 0.01 ms a frame")
    assert "| b -> c | 0.003 | 50.0% | 0.5 | 5.00 |" in gaps


def test_timed_choices_report_what_each_choice_picked():
    pytest.importorskip("triton")
    from gemma4_agent.engine.bench import timed_choices
    from gemma4_agent.quant import triton_q4

    key = (3840, 15360, 1, False)
    triton_q4._CHUNK.picks[key] = "gemv_q8"
    try:
        choices = timed_choices()
    finally:
        del triton_q4._CHUNK.picks[key]
    assert choices["int4_matmul (N, K, rows, zero-points)"]["(3840, 15360, 1, False)"] == "gemv_q8"
    assert len(choices) == 4 and all(isinstance(v, dict) for v in choices.values())


def test_a_profile_left_for_later_is_taken_when_called_and_not_before(tmp_path):
    # the 12B int4 script times every row first and profiles after (the profiler slows what runs after it)
    from gemma4_agent.engine.bench import run_bench

    config = str(ROOT / "benchmarks" / "tiny-config.json")
    now, later = tmp_path / "now.txt", tmp_path / "later.txt"
    r_now = run_bench(config, "cpu", 2, 70, 2, "prefix", 40, warmup=1, profile_to=now)
    assert now.exists() and r_now["profile_s"] > 0
    pending = []
    r = run_bench(config, "cpu", 2, 70, 2, "prefix", 40, warmup=1, profile_to=later, profile_later=pending)
    assert not later.exists() and "profile_s" not in r and len(pending) == 1
    pending[0]()
    assert "Self CPU" in later.read_text() and r["profile_s"] > 0


def test_frames_timed_without_decode_ahead_are_reported_apart_with_their_tokens_compared():
    from gemma4_agent.engine.bench import run_bench

    config = str(ROOT / "benchmarks" / "tiny-config.json")
    r = run_bench(config, "cpu", 3, 70, 3, "prefix", 40, warmup=1, without_decode_ahead=True)
    apart = r["without_decode_ahead"]
    assert set(apart["per_frame_ms"]) >= {"p50", "p90", "p99"} and apart["decode_ms_per_token_p50"] > 0
    assert apart["same_tokens_as_decode_ahead"] == 1.0  # the same frame from the same prefix: the same tokens
