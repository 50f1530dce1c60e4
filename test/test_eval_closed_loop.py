"""`gemma4-agent sim`: closed loop in the synthetic world (random-weight tiny engine, short episodes)."""
import json

import pytest

from gemma4_agent.cli import main
from gemma4_agent.evaluation.closed_loop import run_closed_loop_episode
from gemma4_agent.evaluation.dev_engine import write_random_engine
from gemma4_agent.evaluation.replay import load_agent
from gemma4_agent.sim import EpisodeConfig, WorldConfig


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return write_random_engine(tmp_path_factory.mktemp("eng") / "random")


def test_sim_cli_report(engine, tmp_path):
    out = tmp_path / "sim"
    rc = main(["sim", "--engine", str(engine), "--episodes", "2", "--seed", "31", "--max-duration-s", "1.0",
               "--width", "96", "--height", "72", "--report", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert {"success_rate", "episodes", "per_episode", "latency_ms", "stopped_in_radius_rate", "expert_agreement"} <= set(report)
    assert report["episodes"] == 2 and 0.0 <= report["success_rate"] <= 1.0
    assert [r["episode"] for r in report["per_episode"]] == [0, 1]
    assert all(1 <= r["frames"] <= 10 for r in report["per_episode"])
    assert report["latency_ms"]["p50"] > 0
    assert "success rate" in (out / "report.md").read_text()


def test_sim_cli_refuses_bad_numbers_and_report_path_before_running(engine, tmp_path, capsys):
    for option, value in (("--episodes", "0"), ("--rate", "0"), ("--max-duration-s", "-1")):
        with pytest.raises(SystemExit) as stop:
            main(["sim", "--engine", str(engine), option, value, "--report", str(tmp_path / "r"), "--no-progress"])
        assert stop.value.code == 2 and f"argument {option}: {value} must be greater than 0" in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    assert main(["sim", "--engine", str(engine), "--episodes", "1", "--report", str(taken), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"gemma4-agent sim: error: --report {taken}: cannot create the output folder here (File exists)"
    assert taken.read_text() == "keep me"
    # a value one of the configs refuses: its field and reason on one line, before the engine loads (here there is
    # none to load, which would be the error after it)
    assert main(["sim", "--engine", str(tmp_path / "no_engine"), "--episodes", "1", "--width", "8", "--report",
                 str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "gemma4-agent sim: error: WorldConfig: width: Input should be greater than or equal to 16 (got 8)"


def test_episode_success_is_reaching_the_radius_and_stopping_there_is_reported(engine):
    agent = load_agent(engine, 60_000.0)
    world = WorldConfig(width=64, height=48, success_radius=10.0)  # the robot starts "at" the target
    real_act = agent.act

    def act_as(action):
        def act(rgb, stamp_s=None, now_s=None):
            result = real_act(rgb, stamp_s, now_s)
            result.status, result.action = "ok", action
            result.twist = {"linear_x": 0.0 if action["action"] == "stop" else 0.2, "angular_z": 0.0}
            return result
        return act

    agent.act = act_as({"action": "stop"})
    row, recs = run_closed_loop_episode(agent, 5, world, EpisodeConfig(max_duration_s=1.0))
    assert row["success"] and row["stopped_in_radius"] and row["frames"] == 1 and row["time_to_success_s"] == 0.0
    agent.act = act_as({"action": "move", "linear_x": 0.2, "angular_z": 0.0})  # inside the radius, never stops
    row, recs = run_closed_loop_episode(agent, 5, world, EpisodeConfig(max_duration_s=0.5))
    assert row["success"] and not row["stopped_in_radius"] and row["frames"] == 5
    agent.act = act_as({"action": "stop"})  # stops far from the target: neither
    row, recs = run_closed_loop_episode(agent, 5, WorldConfig(width=64, height=48), EpisodeConfig(max_duration_s=0.5))
    assert not row["success"] and not row["stopped_in_radius"] and row["frames"] == 5
