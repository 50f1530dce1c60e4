"""`gemma4-agent generate-bags`: write synthetic-world expert episodes as ROS 2 bags.

One bag per episode, `OUT/episode_XXXX` (rosbag2 version 9, mcap or sqlite3). Episode i of a
run with `--seed S` uses world seed `S * 100003 + i`, so episodes never repeat across runs
with different seeds (for i < 100003) and any single episode can be rebuilt from its number.

Topics (bag time = 2026-01-01T00:00:00Z + episode time):
  /camera/image_raw             sensor_msgs/msg/Image, rgb8          (or, with --compressed,
  /camera/image_raw/compressed  sensor_msgs/msg/CompressedImage, jpeg)  one per frame, header
                                stamp = bag time of the frame
  /cmd_vel                      geometry_msgs/msg/Twist, the expert's command for the frame,
                                1 ms after it
  /instruction                  std_msgs/msg/String, 1 us before the first frame and before the
                                first frame of every following second
  /sim/episode                  std_msgs/msg/String, one JSON summary (seed, instruction,
                                reached, frames) after the last command
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore
from tqdm import tqdm

from gemma4_agent.sim.episodes import EpisodeConfig, EpisodeStep, run_episode
from gemma4_agent.sim.expert import action_to_twist
from gemma4_agent.sim.world import WorldConfig

BAG_EPOCH_NS = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z: fixed, so bags are reproducible
SEED_STRIDE = 100003
IMAGE_TOPIC = "/camera/image_raw"
COMPRESSED_TOPIC = "/camera/image_raw/compressed"
CMD_TOPIC = "/cmd_vel"
INSTRUCTION_TOPIC = "/instruction"
EPISODE_TOPIC = "/sim/episode"
STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}


def episode_seed(seed: int, index: int) -> int:
    """World seed of episode `index` in a run with base seed `seed`."""
    return seed * SEED_STRIDE + index


def write_episode_bag(
    path: Path,
    steps: Iterable[EpisodeStep],
    *,
    rate_hz: float,
    storage: str = "mcap",
    compressed: bool = False,
    jpeg_quality: int = 90,
    metadata: dict | None = None,
) -> dict:
    """Write one episode's steps (rendered) as a bag at `path`; returns the episode summary."""
    typestore = get_typestore(Stores.ROS2_JAZZY)
    types = typestore.types
    Time, Header = types["builtin_interfaces/msg/Time"], types["std_msgs/msg/Header"]
    String, Twist, Vector3 = types["std_msgs/msg/String"], types["geometry_msgs/msg/Twist"], types["geometry_msgs/msg/Vector3"]
    period_ns = int(round(1e9 / rate_hz))
    cmd_offset_ns = min(1_000_000, period_ns // 2)  # "right after the frame", before the next

    summary = dict(metadata or {}, frames=0, reached=False, instruction=None, storage=storage, compressed=compressed)
    writer = Writer(path, version=9, storage_plugin=STORAGES[storage])
    with writer:
        if compressed:
            img_type = "sensor_msgs/msg/CompressedImage"
            img_conn = writer.add_connection(COMPRESSED_TOPIC, img_type, typestore=typestore)
        else:
            img_type = "sensor_msgs/msg/Image"
            img_conn = writer.add_connection(IMAGE_TOPIC, img_type, typestore=typestore)
        cmd_conn = writer.add_connection(CMD_TOPIC, "geometry_msgs/msg/Twist", typestore=typestore)
        ins_conn = writer.add_connection(INSTRUCTION_TOPIC, "std_msgs/msg/String", typestore=typestore)
        ep_conn = writer.add_connection(EPISODE_TOPIC, "std_msgs/msg/String", typestore=typestore)

        def put(conn, t_ns: int, msg, msgtype: str) -> None:
            writer.write(conn, t_ns, typestore.serialize_cdr(msg, msgtype))

        last_second = -1
        t_ns = BAG_EPOCH_NS
        for step in steps:
            if step.frame is None:
                raise ValueError("write_episode_bag needs rendered steps (run_episode(render=True))")
            t_ns = BAG_EPOCH_NS + step.index * period_ns
            second = (t_ns - BAG_EPOCH_NS) // 10**9
            if second != last_second:  # the instruction is re-said once per second
                put(ins_conn, t_ns - 1000, String(data=step.instruction), "std_msgs/msg/String")
                last_second = second
            header = Header(stamp=Time(sec=t_ns // 10**9, nanosec=t_ns % 10**9), frame_id="camera")
            put(img_conn, t_ns, _image_msg(types, header, step.frame, compressed, jpeg_quality), img_type)
            linear, angular = action_to_twist(step.action)
            twist = Twist(linear=Vector3(x=linear, y=0.0, z=0.0), angular=Vector3(x=0.0, y=0.0, z=angular))
            put(cmd_conn, t_ns + cmd_offset_ns, twist, "geometry_msgs/msg/Twist")
            summary.update(frames=summary["frames"] + 1, reached=bool(step.reached), instruction=step.instruction)
        put(ep_conn, t_ns + cmd_offset_ns + 1000, String(data=json.dumps(summary)), "std_msgs/msg/String")
    return summary


def _image_msg(types, header, frame: np.ndarray, compressed: bool, jpeg_quality: int):
    h, w = frame.shape[:2]
    if compressed:
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        return types["sensor_msgs/msg/CompressedImage"](header=header, format="jpeg", data=buf.reshape(-1))
    return types["sensor_msgs/msg/Image"](
        header=header, height=h, width=w, encoding="rgb8", is_bigendian=0, step=w * 3,
        data=np.ascontiguousarray(frame).reshape(-1),
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output folder; bags go to OUT/episode_XXXX")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help=f"episode i uses world seed SEED*{SEED_STRIDE}+i")
    parser.add_argument("--storage", choices=sorted(STORAGES), default="mcap")
    parser.add_argument("--compressed", action="store_true", help="JPEG CompressedImage instead of raw rgb8")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--rate", type=float, default=10.0, help="camera frames per second")
    parser.add_argument("--max-duration", type=float, default=40.0, help="episode time limit (s)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing episode bags")


def run(args: argparse.Namespace) -> int:
    world_cfg = WorldConfig(width=args.width, height=args.height)
    episode_cfg = EpisodeConfig(rate_hz=args.rate, max_duration_s=args.max_duration)
    args.out.mkdir(parents=True, exist_ok=True)
    width = max(4, int(math.log10(max(args.episodes, 1))) + 1)
    frames = reached = 0
    for i in tqdm(range(args.episodes), desc="episodes", unit="ep"):
        path = args.out / f"episode_{i:0{width}d}"
        if path.exists():
            if not args.overwrite:
                print(f"error: {path} exists (pass --overwrite to replace it)")
                return 2
            shutil.rmtree(path)
        seed = episode_seed(args.seed, i)
        steps = run_episode(seed, world_cfg, episode_config=episode_cfg)
        summary = write_episode_bag(
            path, steps, rate_hz=args.rate, storage=args.storage, compressed=args.compressed,
            jpeg_quality=args.jpeg_quality, metadata={"seed": seed, "episode": i},
        )
        frames += summary["frames"]
        reached += summary["reached"]
    print(f"wrote {args.episodes} episodes ({frames} frames, expert reached the target in {reached}) to {args.out}")
    return 0
