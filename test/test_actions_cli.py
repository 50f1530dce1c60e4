"""`gemma4-agent parse-action` as a subprocess."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(lines, *args):
    proc = subprocess.run([sys.executable, "-m", "gemma4_agent.cli", "parse-action", *args],
                          input="".join(line + "\n" for line in lines), capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    return proc


def test_parse_action_lines():
    lines = [json.dumps('{"action":"move","linear_x":0.30,"angular_z":-0.25}'),
             json.dumps('{"action":"move","linear_x":0.9,"angular_z":0}'),
             '{"action":"stop"}',                      # not a JSON string: the raw line is the text
             json.dumps("héllo ☃"),
             "",
             json.dumps('{"action":"move","linear_x":NaN,"angular_z":0}')]
    proc = run_cli(lines, "--actions", str(ROOT / "config" / "actions.yaml"))
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(out) == len(lines)
    for o in out:
        assert set(o) >= {"ok", "action", "twist", "error"}
        assert set(o["twist"]) == {"linear_x", "angular_z"}
    assert out[0] == {"ok": True, "action": {"action": "move", "linear_x": 0.3, "angular_z": -0.25},
                      "twist": {"linear_x": 0.3, "angular_z": -0.25}, "error": None, "reason": None}
    assert not out[1]["ok"] and out[1]["reason"] == "out_of_range" and out[1]["action"] == {"action": "stop"}
    assert out[1]["twist"] == {"linear_x": 0.0, "angular_z": 0.0} and out[1]["error"]
    assert out[2]["ok"] and out[2]["action"] == {"action": "stop"}
    assert [o["reason"] for o in out[3:]] == ["not_json", "empty", "non_finite"]


def test_default_file_hold_last_and_summary():
    lines = [json.dumps('{"action":"move","linear_x":0.10,"angular_z":0.00}'), json.dumps("junk")]
    proc = run_cli(lines, "--fallback", "hold_last", "--summary")
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert out[1]["ok"] is False and out[1]["action"] == out[0]["action"]
    assert out[1]["twist"] == {"linear_x": 0.1, "angular_z": 0.0}
    assert json.loads(proc.stderr.strip().splitlines()[-1])["reasons"] == {"not_json": 1}


def test_custom_file_and_errors(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text("actions:\n  stop: {}\n  turn:\n    fields:\n      angle: {min: -1.5, max: 1.5}\n"
                 "    twist: {angular_z: {field: angle, scale: 2.0}}\n")
    proc = run_cli([json.dumps('{"action":"turn","angle":0.75}')], "--actions", str(f))
    out = json.loads(proc.stdout)
    assert out["ok"] and out["twist"] == {"linear_x": 0.0, "angular_z": 1.0}  # 1.5 clamped to max_angular_z
    bad = tmp_path / "bad.yaml"
    bad.write_text("actions: {}\n")
    proc = run_cli([], "--actions", str(bad))
    assert proc.returncode == 2 and "error" in proc.stderr
    proc = run_cli([], "--print-grammar")
    assert proc.returncode == 0 and proc.stdout.startswith("root ::=")
