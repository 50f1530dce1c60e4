"""Read any ROS 2 bag (mcap or sqlite3) into typed records: frames, instructions, commands.

Used by replay evaluation and demo training. Bags from the synthetic world and from real robots
read the same way: the image topic is found by type when not given (sensor_msgs Image or
CompressedImage, any encoding, returned as RGB uint8), and the command and instruction topics
are optional (a bag without them just yields no such records).

Every failure to read a bag surfaces as `BagError` with a message that says what to fix. An image
that cannot be decoded is not a failure of the bag: its frame comes with no pixels and the reason
(`Frame.error`), for the reader to count and skip, as the node does with a bad camera message.
"""
from __future__ import annotations

import bisect
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
from rosbags.highlevel import AnyReader
from rosbags.image import message_to_cvimage
from rosbags.typesys import Stores, get_typestore

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
TWIST_TYPES = ("geometry_msgs/msg/Twist", "geometry_msgs/msg/TwistStamped")
STRING_TYPE = "std_msgs/msg/String"


class BagError(ValueError):
    """A bag cannot be read as asked: missing, not a bag, corrupt, or lacking a topic."""


@dataclass(frozen=True)
class Frame:
    t_ns: int  # bag (receive) time
    stamp_ns: int  # header stamp (capture time)
    rgb: np.ndarray | None  # uint8 (H, W, 3); None: the message could not be decoded (`error` says why)
    topic: str
    error: str | None = None


@dataclass(frozen=True)
class Instruction:
    t_ns: int
    text: str


@dataclass(frozen=True)
class Command:
    t_ns: int
    linear_x: float
    angular_z: float


Record = Union[Frame, Instruction, Command]


@dataclass
class Episode:
    """All records of a bag, each list in time order."""

    path: Path
    image_topic: str
    topics: dict[str, str]  # every topic in the bag -> message type
    frames: list[Frame] = field(default_factory=list)
    instructions: list[Instruction] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)


@dataclass(frozen=True)
class LabelledFrame:
    """A frame with the command recorded after it and the instruction in force at it."""

    frame: Frame
    command: Command | None  # first command in [frame, next frame); None if none was recorded
    instruction: str | None


def bag_topics(path: str | Path) -> dict[str, str]:
    """Topic -> message type of every topic in the bag."""
    with _open(path) as reader:
        return {c.topic: c.msgtype for c in reader.connections}


def iter_records(
    path: str | Path,
    image_topic: str | None = None,
    cmd_topic: str = "/cmd_vel",
    instruction_topic: str = "/instruction",
) -> Iterator[Record]:
    """Yield Frame, Instruction and Command records in bag-time order."""
    bag = Path(path)
    with _open(bag) as reader:
        topics = {c.topic: c.msgtype for c in reader.connections}
        image_topic = _pick_image_topic(bag, topics, image_topic)
        wanted = [c for c in reader.connections if c.topic in (image_topic, cmd_topic, instruction_topic)]
        wanted = [c for c in wanted if c.topic == image_topic or _usable(c.topic, c.msgtype, cmd_topic, instruction_topic)]
        try:
            for conn, t_ns, raw in reader.messages(connections=wanted):
                msg = reader.deserialize(raw, conn.msgtype)
                if conn.topic == image_topic:
                    stamp_ns = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
                    try:
                        rgb, error = _to_rgb(msg, bag, t_ns), None
                    except BagError as bad:  # one bad image is that frame's problem, not the bag's
                        rgb, error = None, str(bad)
                    yield Frame(t_ns, stamp_ns, rgb, conn.topic, error)
                elif conn.topic == cmd_topic:
                    twist = msg.twist if conn.msgtype.endswith("TwistStamped") else msg
                    yield Command(t_ns, float(twist.linear.x), float(twist.angular.z))
                else:
                    yield Instruction(t_ns, str(msg.data))
        except BagError:
            raise
        except Exception as exc:  # noqa: BLE001 -- the storage libraries raise many types on bad data
            raise BagError(f"{bag}: corrupt bag, reading failed: {type(exc).__name__}: {exc}") from exc


def read_episode(
    path: str | Path,
    image_topic: str | None = None,
    cmd_topic: str = "/cmd_vel",
    instruction_topic: str = "/instruction",
) -> Episode:
    """Read a whole bag into memory (frames, instructions, commands)."""
    bag = Path(path)
    topics = bag_topics(bag)
    episode = Episode(bag, _pick_image_topic(bag, topics, image_topic), topics)
    for rec in iter_records(bag, episode.image_topic, cmd_topic, instruction_topic):
        if isinstance(rec, Frame):
            episode.frames.append(rec)
        elif isinstance(rec, Command):
            episode.commands.append(rec)
        else:
            episode.instructions.append(rec)
    return episode


def pair_frames_with_commands(
    frames: Sequence[Frame],
    commands: Sequence[Command],
    instructions: Sequence[Instruction] = (),
) -> list[LabelledFrame]:
    """Label each frame with the command that follows it (the expert's command for it).

    The command of frame i is the first one recorded at or after frame i and before frame
    i + 1. Inputs must be in time order (as `read_episode` returns them).
    """
    cmd_times = [c.t_ns for c in commands]
    ins_times = [i.t_ns for i in instructions]
    out = []
    for k, frame in enumerate(frames):
        end = frames[k + 1].t_ns if k + 1 < len(frames) else None
        j = bisect.bisect_left(cmd_times, frame.t_ns)
        cmd = commands[j] if j < len(commands) and (end is None or cmd_times[j] < end) else None
        m = bisect.bisect_right(ins_times, frame.t_ns) - 1
        out.append(LabelledFrame(frame, cmd, instructions[m].text if m >= 0 else None))
    return out


def find_bags(path: str | Path) -> list[Path]:
    """The bag at `path`, or the bags in the folder `path` (sorted); BagError if none."""
    p = Path(path)
    if not p.exists():
        raise BagError(f"{p}: no such bag (path does not exist)")
    if p.is_file() or (p / "metadata.yaml").exists() or any(p.glob("*.mcap")) or any(p.glob("*.db3")):
        return [p]
    bags = sorted(d for d in p.iterdir() if d.is_dir() and ((d / "metadata.yaml").exists() or any(d.glob("*.mcap"))
                                                             or any(d.glob("*.db3"))))
    if not bags:
        raise BagError(f"{p}: neither a bag nor a folder of bags (no metadata.yaml, .mcap or .db3 inside)")
    return bags


@contextmanager
def _open(path: str | Path) -> Iterator[AnyReader]:
    """An opened AnyReader, closed on exit; BagError if the bag cannot be opened."""
    bag = Path(path)
    if not bag.exists():
        raise BagError(f"{bag}: no such bag (path does not exist)")
    # A storage file inside a rosbag2 folder names its folder: open that.
    if bag.is_file() and bag.suffix in (".mcap", ".db3") and (bag.parent / "metadata.yaml").exists():
        bag = bag.parent
    try:
        # Bags without embedded message definitions (older sqlite3) need a default typestore.
        reader = AnyReader([bag], default_typestore=get_typestore(Stores.ROS2_JAZZY))
        reader.open()
    except Exception as exc:  # noqa: BLE001 -- rosbag1/rosbag2/mcap/sqlite raise different types
        raise BagError(f"{bag}: not a readable ROS 2 bag: {type(exc).__name__}: {exc}") from exc
    try:
        yield reader
    finally:
        reader.close()


def _pick_image_topic(bag: Path, topics: dict[str, str], image_topic: str | None) -> str:
    if image_topic is None:
        for topic, msgtype in topics.items():
            if msgtype in IMAGE_TYPES:
                return topic
        raise BagError(f"{bag}: no Image or CompressedImage topic; topics: {_listing(topics)}")
    if image_topic not in topics:
        raise BagError(f"{bag}: image topic {image_topic!r} not in bag; topics: {_listing(topics)}")
    if topics[image_topic] not in IMAGE_TYPES:
        raise BagError(f"{bag}: topic {image_topic!r} is {topics[image_topic]}, not an image; topics: {_listing(topics)}")
    return image_topic


def _usable(topic: str, msgtype: str, cmd_topic: str, instruction_topic: str) -> bool:
    """Command/instruction topics of an unexpected type are an error, not silently empty."""
    if topic == cmd_topic and msgtype not in TWIST_TYPES:
        raise BagError(f"topic {topic!r} is {msgtype}, expected one of {TWIST_TYPES}")
    if topic == instruction_topic and msgtype != STRING_TYPE:
        raise BagError(f"topic {topic!r} is {msgtype}, expected {STRING_TYPE}")
    return True


def _to_rgb(msg, bag: Path, t_ns: int) -> np.ndarray:
    try:
        img = message_to_cvimage(msg, "rgb8")
    except Exception as exc:  # noqa: BLE001 -- undecodable JPEG asserts; odd encodings raise ImageError
        raise BagError(f"{bag}: image at t={t_ns} ns cannot be decoded: {type(exc).__name__}: {exc}") from exc
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise BagError(f"{bag}: image at t={t_ns} ns converts to {img.dtype} {img.shape}, not uint8 RGB")
    return np.ascontiguousarray(img)


def _listing(topics: dict[str, str]) -> str:
    return ", ".join(f"{t} ({m})" for t, m in sorted(topics.items())) or "(none)"
