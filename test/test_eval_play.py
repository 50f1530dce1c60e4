"""`gemma4-agent play` / `demo` over real DDS: the real node runs as a subprocess (random-weight tiny
engine) on a private ROS_DOMAIN_ID, a bag is played into it, the recorder writes its outputs to a new
bag, and that bag is read back and evaluated."""
from __future__ import annotations

import itertools
import json
import os
import zlib

import pytest

from gemma4_agent.bagio import bag_topics
from gemma4_agent.cli import main
from gemma4_agent.evaluation.demo import default_sample_bag
from gemma4_agent.evaluation.dev_engine import write_random_engine
from gemma4_agent.evaluation.play import FRAMES_TOPIC
from gemma4_agent.evaluation.recorded import read_recording

_domains = itertools.count()
_BASE = zlib.crc32(f"eval-play-{os.getpid()}".encode()) % 200


def domain_id() -> int:
    return 1 + (_BASE + next(_domains)) % 200


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return write_random_engine(tmp_path_factory.mktemp("eng") / "random")


def _demo(args, out, monkeypatch) -> dict:
    monkeypatch.setenv("ROS_DOMAIN_ID", "0")  # restored after the test (demo sets its own)
    rc = main(["demo", *map(str, args), "--out", str(out), "--domain-id", str(domain_id()), "--no-progress"])
    assert rc == 0, (out / "node.log").read_text() if (out / "node.log").exists() else "no node log"
    return json.loads((out / "report.json").read_text())


def test_demo_plays_the_sample_bag_into_the_node_and_records(engine, tmp_path, monkeypatch):
    sample = default_sample_bag()
    assert (sample / "metadata.yaml").exists()
    assert bag_topics(sample)["/camera/image_raw/compressed"] == "sensor_msgs/msg/CompressedImage"
    out = tmp_path / "out"
    report = _demo(["--engine", engine, "--duration-s", "1.45"], out, monkeypatch)
    assert report["played_frames"] == 15 and report["node_exit_code"] == 0
    # the recorded bag is a readable ROS 2 bag with the node's outputs
    recorded = out / "recorded_bag"
    topics = bag_topics(recorded)
    assert topics["/cmd_vel"] == "geometry_msgs/msg/Twist"
    assert topics["/gemma4_agent/action"] == "std_msgs/msg/String"
    assert topics["/diagnostics"] == "diagnostic_msgs/msg/DiagnosticArray"
    rec = read_recording(recorded)
    assert sorted(rec["frames"]) == list(range(15))
    assert len(rec["actions"]) >= 1 and len(rec["cmd_vel"]) >= len(rec["actions"]) - 1
    assert rec["diagnostics"].get("lifecycle_state") == "active"
    assert int(rec["diagnostics"]["frames_received"]) >= 1
    # evaluation: every played frame is accounted for; the node's reports matched to their frames
    assert report["frames"] == 15 and report["processed"] + report["dropped"] == 15
    assert report["processed"] >= 1 and 0.0 <= report["action_type_agreement"] <= 1.0
    assert report["compared_frames"] == report["processed"]
    assert report["latency_ms"]["p50"] > 0
    assert (out / "report.md").exists() and (out / "commands_sample_bag.png").exists()


def test_play_errors(tmp_path, capsys):
    assert main(["play", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "does not exist" in err
