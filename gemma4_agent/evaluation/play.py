"""`gemma4-agent play BAG [--rate 1.0] [--record OUT_BAG]`: republish a bag's camera frames and
instructions over real ROS 2 topics at their recorded timing, and (with `--record`) write the
node's outputs to a new bag from a subscriber in the same process.

- Images (Image or CompressedImage, as recorded) go to `--image-topic-out` (default
  `/camera/image_raw`; a CompressedImage goes to `<that>/compressed`, image_transport's naming).
  Header stamps are rewritten to "now" (less the recorded capture-to-receive delay) so that a node
  judging frame age against its own clock sees live frames; `--keep-stamps` keeps them.
- `/instruction` (std_msgs/String) is republished as recorded.
- The recorder writes each `--topics` topic (default `/cmd_vel`, `/gemma4_agent/action`,
  `/diagnostics`) as CDR bytes straight from DDS into an mcap bag (rosbags Writer), receive time
  as bag time, plus `/gemma4_agent_play/frames`: one JSON String per published frame
  (`index`, `bag_t_ns`, `stamp_ns` as published), so outputs can be matched to input frames.
"""
from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..bagio import BagError, IMAGE_TYPES

DEFAULT_RECORD_TOPICS = ("/cmd_vel", "/gemma4_agent/action", "/diagnostics")
KNOWN_TYPES = {"/cmd_vel": "geometry_msgs/msg/Twist", "/gemma4_agent/action": "std_msgs/msg/String",
               "/diagnostics": "diagnostic_msgs/msg/DiagnosticArray"}
FRAMES_TOPIC = "/gemma4_agent_play/frames"


def msg_class(msgtype: str):
    pkg, _, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{pkg}.msg"), name)


@dataclass
class PlayResult:
    frames: int = 0
    instructions: int = 0
    recorded: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0
    record_path: Path | None = None


class Recorder:
    """Writes raw CDR messages of the given topics into an mcap bag (thread-safe)."""

    def __init__(self, node, path: Path, topics: dict[str, str], qos_depth: int = 100):
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from rosbags.rosbag2 import StoragePlugin, Writer
        from rosbags.typesys import Stores, get_typestore

        self.typestore = get_typestore(Stores.ROS2_JAZZY)
        self.path = path
        self.writer = Writer(path, version=9, storage_plugin=StoragePlugin.MCAP)
        self.writer.open()
        self.lock = threading.Lock()
        self.counts = {t: 0 for t in topics}
        self.conns = {}
        self.node = node
        self.closed = False
        qos = QoSProfile(depth=qos_depth, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
        self.subs = []
        for topic, msgtype in topics.items():
            self.conns[topic] = self.writer.add_connection(topic, msgtype, typestore=self.typestore)
            self.subs.append(node.create_subscription(msg_class(msgtype), topic,
                                                      lambda raw, t=topic: self.write(t, raw), qos, raw=True))

    def now_ns(self) -> int:
        return self.node.get_clock().now().nanoseconds

    def write(self, topic: str, raw: bytes, t_ns: int | None = None) -> None:
        with self.lock:
            if self.closed:
                return
            self.writer.write(self.conns[topic], self.now_ns() if t_ns is None else t_ns, bytes(raw))
            self.counts[topic] += 1

    def add_topic(self, topic: str, msgtype: str) -> None:
        with self.lock:
            self.conns[topic] = self.writer.add_connection(topic, msgtype, typestore=self.typestore)
            self.counts[topic] = 0

    def close(self) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                self.writer.close()


def _read_inputs(bag: Path, image_topic: str | None, instruction_topic: str, duration_s: float | None):
    """[(t_ns, kind, msgtype, raw)] of the image and instruction topics, in time order."""
    from ..bagio import _open, _pick_image_topic

    out = []
    with _open(bag) as reader:
        topics = {c.topic: c.msgtype for c in reader.connections}
        image_topic = _pick_image_topic(bag, topics, image_topic)
        conns = [c for c in reader.connections if c.topic in (image_topic, instruction_topic)]
        try:
            start = None
            for conn, t_ns, raw in reader.messages(connections=conns):
                start = t_ns if start is None else start
                if duration_s is not None and t_ns - start > duration_s * 1e9:
                    break
                kind = "image" if conn.topic == image_topic else "instruction"
                if kind == "instruction" and conn.msgtype != "std_msgs/msg/String":
                    raise BagError(f"{bag}: {instruction_topic} is {conn.msgtype}, expected std_msgs/msg/String")
                out.append((t_ns, kind, conn.msgtype, bytes(raw)))
        except BagError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise BagError(f"{bag}: corrupt bag, reading failed: {type(exc).__name__}: {exc}") from exc
    if not any(k == "image" for _, k, _, _ in out):
        raise BagError(f"{bag}: image topic {image_topic!r} has no messages")
    return out, topics[image_topic]


def play(bag: str | Path, *, rate: float = 1.0, image_topic: str | None = None,
         image_topic_out: str = "/camera/image_raw", instruction_topic: str = "/instruction",
         instruction_topic_out: str = "/instruction", record: str | Path | None = None,
         record_topics: Sequence[str] = DEFAULT_RECORD_TOPICS, duration_s: float | None = None,
         wait_for_subscribers_s: float = 10.0, tail_s: float = 1.0, keep_stamps: bool = False,
         progress: bool = True, overwrite: bool = False, init_ros: bool = True) -> PlayResult:
    """Play `bag` over ROS 2 (rclpy, the current ROS_DOMAIN_ID); see the module doc."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile
    from rclpy.serialization import deserialize_message, serialize_message
    from std_msgs.msg import String
    from tqdm import tqdm

    bag = Path(bag)
    if rate <= 0:
        raise ValueError("rate must be > 0")
    inputs, image_type = _read_inputs(bag, image_topic, instruction_topic, duration_s)
    if image_type not in IMAGE_TYPES:
        raise BagError(f"{bag}: {image_type} is not an image type")
    record_path = Path(record) if record is not None else None
    if record_path is not None and record_path.exists():
        if not overwrite:
            raise FileExistsError(f"{record_path} exists (pass --overwrite to replace it)")
        shutil.rmtree(record_path) if record_path.is_dir() else record_path.unlink()

    if init_ros:
        rclpy.init()
    node = rclpy.create_node("gemma4_agent_play")
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, name="play_executor", daemon=True)
    recorder = None
    result = PlayResult(record_path=record_path)
    try:
        compressed = image_type.endswith("CompressedImage")
        img_cls = msg_class(image_type)
        img_out = image_topic_out.rstrip("/") + ("/compressed" if compressed else "")
        img_pub = node.create_publisher(img_cls, img_out, QoSProfile(depth=5))
        ins_pub = node.create_publisher(String, instruction_topic_out, 10)
        if record_path is not None:
            types = {}
            for topic in record_topics:
                types[topic] = KNOWN_TYPES.get(topic) or _discover_type(node, topic)
            recorder = Recorder(node, record_path, types)
            recorder.add_topic(FRAMES_TOPIC, "std_msgs/msg/String")
        spinner.start()
        # Wait until someone listens (the node's image subscription), then a moment for the
        # other side to match us too: a reliable volatile message sent before that is lost.
        deadline = time.monotonic() + wait_for_subscribers_s
        has_instr = any(k == "instruction" for _, k, _, _ in inputs)
        while time.monotonic() < deadline and (img_pub.get_subscription_count() == 0
                                               or (has_instr and ins_pub.get_subscription_count() == 0)):
            time.sleep(0.05)
        time.sleep(0.3)

        t0_bag = inputs[0][0]
        t0_wall = time.monotonic() + 0.05
        bar = tqdm(total=sum(k == "image" for _, k, _, _ in inputs), desc="play", unit="frame",
                   disable=not progress, leave=False)
        index = 0
        for t_ns, kind, msgtype, raw in inputs:
            delay = t0_wall + (t_ns - t0_bag) / 1e9 / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if kind == "instruction":
                ins_pub.publish(deserialize_message(raw, String))
                result.instructions += 1
                continue
            msg = deserialize_message(raw, img_cls)
            if not keep_stamps:
                stamp_ns = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
                age_ns = max(0, t_ns - stamp_ns) if stamp_ns else 0
                now_ns = node.get_clock().now().nanoseconds - age_ns
                msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(now_ns, 10**9)
            img_pub.publish(msg)
            if recorder is not None:
                pub_stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
                recorder.write(FRAMES_TOPIC, serialize_message(String(data=json.dumps(
                    {"index": index, "bag_t_ns": t_ns, "stamp_ns": pub_stamp}))))
            index += 1
            bar.update(1)
        bar.close()
        result.frames = index
        result.duration_s = (inputs[-1][0] - t0_bag) / 1e9 / rate
        time.sleep(tail_s)  # outputs of the last frames
    finally:
        if recorder is not None:
            recorder.close()
            result.recorded = dict(recorder.counts)
        executor.shutdown()
        if spinner.is_alive():
            spinner.join()
        node.destroy_node()
        if init_ros:
            rclpy.try_shutdown()
    return result


def _discover_type(node, topic: str, timeout_s: float = 3.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, types in node.get_topic_names_and_types():
            if name == topic and types:
                return types[0]
        time.sleep(0.1)
    raise BagError(f"cannot record {topic}: its type is unknown (not published yet and not one of {sorted(KNOWN_TYPES)})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bag", type=Path, help="bag folder or storage file (.mcap/.db3)")
    parser.add_argument("--rate", type=float, default=1.0, help="playback speed factor (default 1.0)")
    parser.add_argument("--record", type=Path, default=None, help="write the recorded topics to this new bag (mcap)")
    parser.add_argument("--topics", nargs="+", default=list(DEFAULT_RECORD_TOPICS),
                        help="topics to record (default: %(default)s)")
    parser.add_argument("--duration-s", type=float, default=None, help="play only this many seconds of the bag")
    parser.add_argument("--image-topic", default=None, help="image topic in the bag (default: the first image topic)")
    parser.add_argument("--image-topic-out", default="/camera/image_raw",
                        help="publish images here (CompressedImage: <this>/compressed); default %(default)s")
    parser.add_argument("--instruction-topic", default="/instruction", help="instruction topic in the bag")
    parser.add_argument("--instruction-topic-out", default="/instruction")
    parser.add_argument("--keep-stamps", action="store_true", help="publish the recorded header stamps unchanged")
    parser.add_argument("--wait-s", type=float, default=10.0, help="wait this long for subscribers before playing")
    parser.add_argument("--tail-s", type=float, default=1.0, help="keep recording this long after the last frame")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --record bag")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    try:
        result = play(args.bag, rate=args.rate, image_topic=args.image_topic, image_topic_out=args.image_topic_out,
                      instruction_topic=args.instruction_topic, instruction_topic_out=args.instruction_topic_out,
                      record=args.record, record_topics=args.topics, duration_s=args.duration_s,
                      wait_for_subscribers_s=args.wait_s, tail_s=args.tail_s, keep_stamps=args.keep_stamps,
                      progress=not args.no_progress, overwrite=args.overwrite)
    except (BagError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(f"played {result.frames} frames and {result.instructions} instructions in {result.duration_s:.1f} s")
    if result.record_path is not None:
        print(f"recorded to {result.record_path}: " + ", ".join(f"{t} {n}" for t, n in result.recorded.items()))
    return 0
