"""sensor_msgs Image / CompressedImage -> RGB uint8 array (H, W, 3).

Works on rclpy messages and rosbags messages alike (it reads only the message fields). The raw
path checks the layout (size, `step`, buffer length), drops any row padding (rosbags-image reads
rows as packed, ignoring `step`) and lets rosbags-image's `image_to_cvimage` (OpenCV underneath) do
byte order and colour conversion; the compressed path decodes with OpenCV's `imdecode`. Every failure is a `BadImage` with a
`kind` from `BAD_IMAGE_KINDS`; nothing else escapes.
"""
from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
from rosbags.image import ImageError, image_to_cvimage

BAD_IMAGE_KINDS = ("unsupported_encoding", "truncated", "bad_step", "empty", "decode_failed")

# encoding -> (numpy dtype, channels): what a camera sends and convert_color can turn into rgb8.
RAW_ENCODINGS = {
    "rgb8": ("uint8", 3),
    "bgr8": ("uint8", 3),
    "rgba8": ("uint8", 4),
    "bgra8": ("uint8", 4),
    "mono8": ("uint8", 1),
    "rgb16": ("uint16", 3),
    "bgr16": ("uint16", 3),
    "rgba16": ("uint16", 4),
    "bgra16": ("uint16", 4),
    "mono16": ("uint16", 1),
    "bayer_rggb8": ("uint8", 1),
    "bayer_bggr8": ("uint8", 1),
    "bayer_gbrg8": ("uint8", 1),
    "bayer_grbg8": ("uint8", 1),
}

# CompressedImage.format is "jpeg", "png", or image_transport's "<encoding>; <codec> compressed <enc>".
COMPRESSED_CODECS = ("jpeg", "jpg", "png")


class BadImage(Exception):
    """A message that cannot become an RGB frame. `kind` is one of BAD_IMAGE_KINDS."""

    def __init__(self, kind: str, detail: str):
        assert kind in BAD_IMAGE_KINDS, kind
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def is_compressed(msg) -> bool:
    return hasattr(msg, "format")


def to_rgb(msg) -> np.ndarray:
    """An Image or CompressedImage message as a C-contiguous RGB uint8 array (H, W, 3) it owns."""
    try:
        return compressed_to_rgb(msg) if is_compressed(msg) else raw_to_rgb(msg)
    except BadImage:
        raise
    except (ImageError, cv2.error, ValueError, TypeError) as err:  # library refused: no crash
        raise BadImage("decode_failed", f"{type(err).__name__}: {err}") from err


def raw_to_rgb(msg) -> np.ndarray:
    encoding = str(msg.encoding).strip().lower()
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if encoding not in RAW_ENCODINGS:
        raise BadImage("unsupported_encoding", f"encoding {msg.encoding!r} (supported: {', '.join(RAW_ENCODINGS)})")
    if height == 0 or width == 0:
        raise BadImage("empty", f"{width}x{height} image")
    dtype_name, channels = RAW_ENCODINGS[encoding]
    dtype = np.dtype(dtype_name)
    row_bytes = width * channels * dtype.itemsize
    if step < row_bytes:
        raise BadImage("bad_step", f"step {step} < width {width} x {channels} channels x {dtype.itemsize} bytes")
    if step % dtype.itemsize:
        raise BadImage("bad_step", f"step {step} is not a multiple of the {dtype.itemsize}-byte sample")
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size < step * height:
        raise BadImage("truncated", f"{data.size} bytes < step {step} x height {height}")
    packed = data[: step * height].reshape(height, step)[:, :row_bytes]
    packed_msg = SimpleNamespace(encoding=encoding, height=height, width=width, step=row_bytes,
                                 is_bigendian=bool(msg.is_bigendian), data=np.ascontiguousarray(packed))
    rgb = image_to_cvimage(packed_msg, "rgb8")
    # rgb8 in -> a view of the message's bytes out: copy, so the frame owns its pixels.
    return rgb.copy() if not rgb.flags.owndata or not rgb.flags.c_contiguous else rgb


def compressed_to_rgb(msg) -> np.ndarray:
    fmt = str(msg.format).strip().lower()
    if "compresseddepth" in fmt.replace(" ", "") or not any(codec in fmt for codec in COMPRESSED_CODECS):
        raise BadImage("unsupported_encoding", f"compressed format {msg.format!r} (supported: jpeg, png)")
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size == 0:
        raise BadImage("empty", "no compressed bytes")
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)  # grey and 16-bit become 8-bit BGR, alpha dropped
    if bgr is None or bgr.size == 0:
        raise BadImage("decode_failed", f"OpenCV could not decode {data.size} bytes as {msg.format!r}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
