"""generate-bags writes real ROS 2 bags; bagio reads them (and fails clearly on bad ones)."""
from __future__ import annotations

import numpy as np
import pytest
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from gemma4_agent import cli
from gemma4_agent.bagio import BagError, Command, Frame, Instruction, bag_topics, iter_records, pair_frames_with_commands, read_episode
from gemma4_agent.sim import EpisodeConfig, WorldConfig, run_episode
from gemma4_agent.sim.expert import action_to_twist
from gemma4_agent.sim.generate_bags import episode_seed

W, H, SEED = 96, 72, 4


def generate(out, *extra: str) -> int:
    args = ["generate-bags", "--out", str(out), "--episodes", "2", "--seed", str(SEED),
            "--width", str(W), "--height", str(H), "--max-duration", "6", *extra]
    return cli.main(args)


@pytest.fixture(scope="module")
def expected():
    """The episodes generate-bags should have written, rebuilt from their seeds."""
    world_cfg = WorldConfig(width=W, height=H)
    return [list(run_episode(episode_seed(SEED, i), world_cfg, episode_config=EpisodeConfig(max_duration_s=6)))
            for i in range(2)]


@pytest.mark.parametrize("storage,compressed", [("mcap", False), ("sqlite3", False), ("mcap", True), ("sqlite3", True)])
def test_generated_bags_read_back(tmp_path, expected, storage, compressed):
    assert generate(tmp_path, "--storage", storage, *(["--compressed"] if compressed else [])) == 0
    for i, steps in enumerate(expected):
        ep = read_episode(tmp_path / f"episode_{i:04d}")
        assert ep.image_topic == ("/camera/image_raw/compressed" if compressed else "/camera/image_raw")
        assert len(ep.frames) == len(ep.commands) == len(steps)
        assert len(ep.instructions) == int(np.ceil(len(steps) / 10))  # once per second at 10 Hz
        assert {x.text for x in ep.instructions} == {steps[0].instruction}
        for frame, step in zip(ep.frames, steps):
            assert frame.rgb.shape == (H, W, 3) and frame.rgb.dtype == np.uint8
            assert frame.stamp_ns == frame.t_ns
            if compressed:
                assert np.abs(frame.rgb.astype(int) - step.frame.astype(int)).mean() < 6
            else:
                assert np.array_equal(frame.rgb, step.frame)
        labelled = pair_frames_with_commands(ep.frames, ep.commands, ep.instructions)
        for lf, step in zip(labelled, steps):
            assert lf.command is not None and lf.instruction == step.instruction
            assert (lf.command.linear_x, lf.command.angular_z) == action_to_twist(step.action)


def test_iter_records_is_time_ordered_and_storage_file_path_works(tmp_path):
    assert generate(tmp_path) == 0
    bag = tmp_path / "episode_0000"
    records = list(iter_records(bag / "episode_0000.mcap"))
    times = [r.t_ns for r in records]
    assert times == sorted(times)
    assert isinstance(records[0], Instruction) and isinstance(records[1], Frame) and isinstance(records[2], Command)
    assert "/sim/episode" in bag_topics(bag)


def test_existing_output_is_not_overwritten(tmp_path):
    assert generate(tmp_path) == 0
    assert generate(tmp_path) == 2
    assert generate(tmp_path, "--overwrite") == 0


def test_missing_path(tmp_path):
    with pytest.raises(BagError, match="does not exist"):
        read_episode(tmp_path / "nope")


def test_not_a_bag(tmp_path):
    (tmp_path / "junk.txt").write_text("hello")
    with pytest.raises(BagError, match="not a readable"):
        read_episode(tmp_path / "junk.txt")
    with pytest.raises(BagError):
        read_episode(tmp_path)  # a folder without metadata.yaml


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_mcap(tmp_path, damage):
    assert generate(tmp_path) == 0
    mcap = tmp_path / "episode_0000" / "episode_0000.mcap"
    data = mcap.read_bytes()
    mcap.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x89MCAP0\r\n" + bytes(len(data) - 8))
    with pytest.raises(BagError, match="corrupt|not a readable"):
        read_episode(mcap.parent)


def test_missing_image_topic(tmp_path):
    typestore = get_typestore(Stores.ROS2_JAZZY)
    Twist, Vector3 = typestore.types["geometry_msgs/msg/Twist"], typestore.types["geometry_msgs/msg/Vector3"]
    path = tmp_path / "no_camera"
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        conn = writer.add_connection("/cmd_vel", "geometry_msgs/msg/Twist", typestore=typestore)
        msg = Twist(linear=Vector3(x=0.1, y=0.0, z=0.0), angular=Vector3(x=0.0, y=0.0, z=0.2))
        writer.write(conn, 1, typestore.serialize_cdr(msg, "geometry_msgs/msg/Twist"))
    with pytest.raises(BagError, match=r"no Image or CompressedImage topic.*/cmd_vel"):
        read_episode(path)
    with pytest.raises(BagError, match=r"'/camera/image_raw' not in bag.*/cmd_vel"):
        read_episode(path, image_topic="/camera/image_raw")
    with pytest.raises(BagError, match="not an image"):
        read_episode(path, image_topic="/cmd_vel")


def test_pairing_leaves_frames_without_commands_unlabelled():
    rgb = np.zeros((2, 2, 3), np.uint8)
    frames = [Frame(t, t, rgb, "/c") for t in (100, 200, 300)]
    commands = [Command(50, 9.0, 9.0), Command(110, 0.1, 0.2), Command(310, 0.3, 0.4)]
    out = pair_frames_with_commands(frames, commands, [Instruction(150, "go")])
    assert [lf.command for lf in out] == [commands[1], None, commands[2]]
    assert [lf.instruction for lf in out] == [None, "go", "go"]
