"""`gemma4-agent replay` on generated bags (mcap + sqlite3, raw + compressed), a bag without
commands, broken inputs, and realtime mode with frames faster than inference. Runs on a
random-weight tiny engine: the numbers are not a policy's, only their shape and bookkeeping are checked."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from gemma4_agent.cli import main
from gemma4_agent.evaluation.dev_engine import write_random_engine
from gemma4_agent.evaluation.replay import summary_line
from gemma4_agent.sim import EpisodeConfig, WorldConfig, run_episode
from gemma4_agent.sim.generate_bags import write_episode_bag

WORLD = WorldConfig(width=96, height=72)
EPISODE = EpisodeConfig(max_duration_s=1.2)  # 12 frames
REPORT_KEYS = {"frames", "processed", "dropped", "deadline_misses", "fallbacks", "action_type_agreement",
               "angular_sign_agreement", "linear_mae", "angular_mae", "latency_ms", "latency_ms_by_stage",
               "decode_steps_mean", "post_safety"}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return write_random_engine(tmp_path_factory.mktemp("eng") / "random")


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    root = tmp_path_factory.mktemp("bags")
    out = {}
    for i, (storage, compressed) in enumerate([("mcap", False), ("mcap", True), ("sqlite3", False), ("sqlite3", True)]):
        path = root / f"{storage}_{'jpeg' if compressed else 'raw'}"
        write_episode_bag(path, run_episode(4200 + i, WORLD, episode_config=EPISODE), rate_hz=10.0,
                          storage=storage, compressed=compressed)
        out[path.name] = path
    return out


def _write_bag(path: Path, with_images: bool = True, frames: int = 5, cut: tuple = ()) -> Path:
    """A hand-made bag: rgb8 images only (no /cmd_vel, no /instruction), or only a Twist topic. Images whose index is
    in `cut` lose half their pixel data (a message broken on the way: it cannot be decoded)."""
    ts = get_typestore(Stores.ROS2_JAZZY)
    T = ts.types
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        if with_images:
            conn = w.add_connection("/front/image", "sensor_msgs/msg/Image", typestore=ts)
        else:
            conn = w.add_connection("/cmd_vel", "geometry_msgs/msg/Twist", typestore=ts)
        rng = np.random.default_rng(0)
        for k in range(frames):
            t = 10**18 + k * 100_000_000
            if with_images:
                data = rng.integers(0, 256, 48 * 64 * 3 // (2 if k in cut else 1), dtype=np.uint8)
                header = T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=t // 10**9, nanosec=t % 10**9),
                                                  frame_id="cam")
                msg = T["sensor_msgs/msg/Image"](header=header, height=48, width=64, encoding="rgb8", is_bigendian=0,
                                                 step=64 * 3, data=data)
                w.write(conn, t, ts.serialize_cdr(msg, "sensor_msgs/msg/Image"))
            else:
                V = T["geometry_msgs/msg/Vector3"]
                msg = T["geometry_msgs/msg/Twist"](linear=V(x=0.1, y=0.0, z=0.0), angular=V(x=0.0, y=0.0, z=0.0))
                w.write(conn, t, ts.serialize_cdr(msg, "geometry_msgs/msg/Twist"))
    return path


def _replay(args, out: Path) -> dict:
    assert main(["replay", *map(str, args), "--report", str(out), "--no-progress"]) == 0
    assert (out / "report.md").exists() and (out / "latency.png").exists()
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("name", ["mcap_raw", "mcap_jpeg", "sqlite3_raw", "sqlite3_jpeg"])
def test_replay_each_storage_and_encoding(engine, bags, name, tmp_path):
    report = _replay([bags[name], "--engine", engine, "--max-frames", "6"], tmp_path / "r")
    assert REPORT_KEYS <= set(report)
    assert report["frames"] == report["processed"] == 6 and report["dropped"] == 0
    assert 0.0 <= report["action_type_agreement"] <= 1.0
    assert report["compared_frames"] == 6
    assert report["linear_mae"] >= 0 and report["angular_mae"] >= 0
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    assert set(report["latency_ms_by_stage"]) >= {"preprocess", "prefill", "decode", "total"}
    assert report["mode"] == "offline"
    md = (tmp_path / "r" / "report.md").read_text()
    assert "action type agreement" in md and "![" in md
    assert any(p.startswith("commands_") for p in report["plots"])
    assert len((tmp_path / "r" / "frames.jsonl").read_text().splitlines()) == 6


def test_replay_folder_of_bags_aggregates(engine, bags, tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("mcap_raw", "sqlite3_jpeg"):
        shutil.copytree(bags[name], folder / name)
    report = _replay([folder, "--engine", engine, "--max-frames", "4"], tmp_path / "r")
    assert report["bags"] == 2 and report["frames"] == 8
    assert set(report["per_bag"]) == {"mcap_raw", "sqlite3_jpeg"}
    assert all(b["frames"] == 4 for b in report["per_bag"].values())
    # the sign agreement is over turning frames only: the summary says how many it rests on
    assert f"over {report['turning_frames']} turning frames" in summary_line(report)
    assert f"angular sign agreement ({report['turning_frames']} turning frames)" in (tmp_path / "r" / "report.md").read_text()


def test_bag_without_commands_is_latency_only(engine, tmp_path):
    bag = _write_bag(tmp_path / "imgs")
    report = _replay([bag, "--engine", engine, "--instruction", "go to the blue cube"], tmp_path / "r")
    assert report["frames"] == report["processed"] == 5
    assert report["has_recorded_commands"] is False
    for key in ("action_type_agreement", "angular_sign_agreement", "linear_mae", "angular_mae"):
        assert report[key] is None
    assert report["latency_ms"]["p50"] > 0
    assert "latency-only" in (tmp_path / "r" / "report.md").read_text()


def test_undecodable_images_are_bad_frames_and_the_replay_goes_on(engine, tmp_path, capsys):
    bag = _write_bag(tmp_path / "imgs", cut=(1, 3))
    report = _replay([bag, "--engine", engine, "--instruction", "go to the blue cube"], tmp_path / "r")
    assert report["frames"] == 5 and report["processed"] == 3 and report["bad_frames"] == 2
    records = [json.loads(line) for line in (tmp_path / "r" / "frames.jsonl").read_text().splitlines()]
    assert [r["status"] == "bad_frame" for r in records] == [False, True, False, True, False]
    for r in records:  # the bad ones say why and carry no command; the others were acted on
        assert ("cannot be decoded" in r["error"] and r["linear_x"] is None) if r["status"] == "bad_frame" \
            else (r["error"] is None and r["linear_x"] is not None)
    assert "2 bad frames (not acted on)" in capsys.readouterr().out
    assert "| bad frames (not acted on: frames.jsonl says why) | 2 |" in (tmp_path / "r" / "report.md").read_text()
    # every image bad: nothing to replay, said in one line
    err = _error([_write_bag(tmp_path / "all_bad", cut=range(5)), "--engine", engine, "--report", tmp_path / "r2"],
                 capsys)
    assert "none of its 5 images can be decoded" in err and "cannot be decoded" in err


def _error(args, capsys) -> str:
    rc = main(["replay", *map(str, args), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and err.startswith("error:")
    return err


def test_clear_errors(engine, bags, tmp_path, capsys):
    assert "does not exist" in _error([tmp_path / "missing", "--engine", engine, "--report", tmp_path / "r"], capsys)
    # corrupt: the storage file cut in half
    broken = tmp_path / "broken"
    shutil.copytree(bags["mcap_raw"], broken)
    mcap = next(broken.glob("*.mcap"))
    mcap.write_bytes(mcap.read_bytes()[: mcap.stat().st_size // 2])
    assert "broken" in _error([broken, "--engine", engine, "--report", tmp_path / "r"], capsys)
    # not a bag at all
    junk = tmp_path / "junk.mcap"
    junk.write_bytes(b"not a bag" * 100)
    assert "junk" in _error([junk, "--engine", engine, "--report", tmp_path / "r"], capsys)
    # no image topic
    err = _error([_write_bag(tmp_path / "twist_only", with_images=False), "--engine", engine,
                  "--report", tmp_path / "r"], capsys)
    assert "no Image or CompressedImage topic" in err and "/cmd_vel" in err
    # a named topic that is not there
    err = _error([bags["mcap_raw"], "--engine", engine, "--image-topic", "/nope", "--report", tmp_path / "r"], capsys)
    assert "/nope" in err and "/camera/image_raw" in err


def test_realtime_drops_frames_when_the_camera_outpaces_inference(engine, bags, tmp_path):
    # 12 frames replayed at 50x: one every 2 ms, far faster than an agent step
    report = _replay([bags["mcap_raw"], "--engine", engine, "--realtime", "--speed", "50", "--budget-ms", "5000"],
                     tmp_path / "r")
    assert report["mode"] == "realtime"
    assert report["dropped"] > 0 and report["dropped_replaced"] > 0
    assert report["processed"] + report["dropped"] == report["frames"] == 12
    assert report["processed"] >= 1
    # end-to-end latency includes the wait in the slot: at least the agent's own time
    assert report["latency_ms"]["p50"] >= report["latency_ms_by_stage"]["total"]["p50"] * 0.99


def test_realtime_deadline_misses_with_a_tiny_budget(engine, bags, tmp_path):
    report = _replay([bags["mcap_jpeg"], "--engine", engine, "--realtime", "--speed", "5", "--budget-ms", "1",
                      "--max-frames", "5"], tmp_path / "r")
    # with a 1 ms budget every frame is either stale, cut at the deadline (fallback), or late
    acted = report["processed"]
    assert report["deadline_misses"] == acted
    assert report["fallbacks"] + report["dropped_stale"] >= 1


def _repinned(src: Path, dst: Path, edit) -> Path:
    """A copy of engine `src` with `edit(folder)` applied and its manifest pinned again: a user's own build whose
    hashes match but whose files are malformed."""
    from gemma4_agent.engines.manifest import read_manifest, write_manifest

    shutil.copytree(src, dst)
    edit(dst)
    manifest = read_manifest(dst, verify_files=False)
    write_manifest(dst, manifest, list(manifest.files))
    return dst


def _edit_json(name: str, change):
    def edit(folder: Path) -> None:
        path = folder / name
        data = json.loads(path.read_text())
        path.write_text(json.dumps(change(data)))
    return edit


def _one_line_error(args, capsys) -> str:
    rc = main(["replay", *map(str, args), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1 and "error:" in err, err
    return err


def test_user_mistakes_give_one_line_before_any_work(engine, bags, tmp_path, capsys):
    bag = bags["mcap_raw"]
    # a count, a rate or a budget of 0 or less: refused by the parser, before the engine loads
    for option, value in (("--speed", "0"), ("--max-frames", "0"), ("--budget-ms", "-5")):
        with pytest.raises(SystemExit) as stop:
            main(["replay", str(bag), "--engine", str(engine), "--realtime", option, value,
                  "--report", str(tmp_path / "r"), "--no-progress"])
        assert stop.value.code == 2
        assert f"argument {option}: {value} must be greater than 0" in capsys.readouterr().err
    # options the agent's config refuses together: its reason on one line, not pydantic's report
    err = _one_line_error([bag, "--engine", engine, "--backend", "onnxruntime", "--compile",
                           "--report", tmp_path / "r"], capsys)
    assert "compile applies to the torch backend only" in err
    # a --report path that cannot be a folder: refused before the replay, the file kept
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    err = _one_line_error([bag, "--engine", engine, "--report", taken], capsys)
    assert f"--report {taken}: cannot create the output folder" in err
    assert taken.read_text() == "keep me"
    # an instruction the engine's prompt cache cannot hold
    err = _one_line_error([bag, "--engine", engine, "--instruction", "go to the red ball " * 40,
                           "--report", tmp_path / "r"], capsys)
    assert "shorten the instruction" in err


@pytest.mark.parametrize("name, edit, says", [
    ("agent_not_json", lambda d: (d / "agent.json").write_text('{"image_tokens": '), "agent.json: Expecting value"),
    ("agent_bad_tokens", _edit_json("agent.json", lambda a: dict(a, image_tokens=100)),
     "agent.json: AgentDefaults: image_tokens: Input should be 70, 140, 280, 560 or 1120 (got 100)"),
    ("config_bad_field", _edit_json("config.json", lambda c: dict(c, text_config=dict(c["text_config"],
                                                                                     num_hidden_layers="three"))),
     "config.json: ModelConfig: text_config.num_hidden_layers: Input should be a valid integer"),
    ("config_a_list", lambda d: (d / "config.json").write_text("[1, 2]"), "expected a JSON object"),
])
def test_malformed_engine_files_are_named(engine, bags, tmp_path, capsys, name, edit, says):
    broken = _repinned(engine, tmp_path / name, edit)
    err = _one_line_error([bags["mcap_raw"], "--engine", broken, "--report", tmp_path / "r"], capsys)
    assert says in err and "rebuild the engine" in err, err


def test_an_instruction_in_the_bag_too_long_for_the_engine_is_refused_once_and_the_replay_goes_on(engine, bags):
    # as the node does with its instruction topic: the instruction before stays, the refusal is said once
    import dataclasses
    import warnings

    from gemma4_agent.bagio import pair_frames_with_commands, read_episode
    from gemma4_agent.evaluation.replay import load_agent, replay_offline

    episode = read_episode(bags["mcap_raw"])
    labels = pair_frames_with_commands(episode.frames, episode.commands, episode.instructions)[:6]
    long = "go to the red ball " * 40
    labels = labels[:2] + [dataclasses.replace(lf, instruction=long) for lf in labels[2:]]
    agent = load_agent(engine, 60_000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own: a warning once per place and text
        records = replay_offline(agent, labels, "bag", progress=False)
    assert len([w for w in caught if str(w.message).startswith("instruction from the bag refused")]) == 1
    assert [r.status for r in records] == ["ok"] * 6
    assert {r.instruction for r in records} == {labels[0].instruction}
