"""Image / CompressedImage -> RGB: every supported encoding, row padding, and each kind of bad image.

Runs on rclpy messages (what the node receives) and on rosbags messages (what replay reads).
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from rosbags.typesys import Stores, get_typestore
from sensor_msgs.msg import CompressedImage, Image

from gemma4_agent.ros.image_convert import BAD_IMAGE_KINDS, BadImage, to_rgb

H, W = 6, 7
RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)


def image(encoding: str, pixels: np.ndarray, pad: int = 0, bigendian: bool = False) -> Image:
    h, w = pixels.shape[:2]
    row = pixels.reshape(h, -1).view(np.uint8)
    step = row.shape[1] + pad
    data = np.zeros((h, step), np.uint8)
    data[:, : row.shape[1]] = row
    msg = Image(height=h, width=w, encoding=encoding, step=step, is_bigendian=int(bigendian))
    msg.data = data.tobytes()
    return msg


def grey(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


@pytest.mark.parametrize("pad", [0, 1, 5, 64])
@pytest.mark.parametrize("encoding,pixels,expected", [
    ("rgb8", RGB, RGB),
    ("bgr8", RGB[..., ::-1], RGB),
    ("rgba8", np.dstack([RGB, np.full((H, W), 77, np.uint8)]), RGB),
    ("bgra8", np.dstack([RGB[..., ::-1], np.full((H, W), 77, np.uint8)]), RGB),
    ("mono8", grey(RGB), np.repeat(grey(RGB)[..., None], 3, axis=2)),
])
def test_raw_encodings_with_row_padding(encoding, pixels, expected, pad):
    out = to_rgb(image(encoding, np.ascontiguousarray(pixels), pad=pad))
    assert out.dtype == np.uint8 and out.shape == (H, W, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, expected)


def test_output_owns_its_pixels():
    msg = image("rgb8", RGB, pad=0)
    out = to_rgb(msg)
    out[:] = 0  # must not write into the message
    np.testing.assert_array_equal(to_rgb(msg), RGB)


@pytest.mark.parametrize("bigendian", [False, True])
def test_mono16_both_byte_orders(bigendian):
    values = (np.arange(H * W, dtype=np.uint32).reshape(H, W) * 1000).astype(np.uint16)
    pixels = values.astype(">u2" if bigendian else "<u2")
    out = to_rgb(image("mono16", pixels, pad=2, bigendian=bigendian))
    expected = (values.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(out[..., 1], expected)


def test_bayer_rggb8_demosaics_to_rgb():
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:] = (200, 40, 10)
    mosaic = np.zeros((8, 8), np.uint8)
    mosaic[0::2, 0::2] = 200  # R
    mosaic[0::2, 1::2] = 40   # G
    mosaic[1::2, 0::2] = 40   # G
    mosaic[1::2, 1::2] = 10   # B
    out = to_rgb(image("bayer_rggb8", mosaic, pad=3))
    np.testing.assert_allclose(out[2:-2, 2:-2].astype(int), rgb[2:-2, 2:-2].astype(int), atol=2)


def test_jpeg_and_png():
    big = cv2.resize(RGB, (64, 48), interpolation=cv2.INTER_NEAREST)
    ok, png = cv2.imencode(".png", cv2.cvtColor(big, cv2.COLOR_RGB2BGR))
    msg = CompressedImage(format="png")
    msg.data = png.tobytes()
    np.testing.assert_array_equal(to_rgb(msg), big)

    ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(big, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 100])
    msg = CompressedImage(format="jpeg")
    msg.data = jpg.tobytes()
    out = to_rgb(msg)
    assert out.shape == big.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - big.astype(int)).mean() < 8  # lossy, but the colours are RGB, not BGR


def test_image_transport_format_string_and_grey_png():
    g = grey(cv2.resize(RGB, (32, 24)))
    ok, png = cv2.imencode(".png", g)
    msg = CompressedImage(format="mono8; png compressed ")  # as image_transport's compressed plugin writes it
    msg.data = png.tobytes()
    out = to_rgb(msg)
    np.testing.assert_array_equal(out, np.repeat(g[..., None], 3, axis=2))


def test_rosbags_messages_convert_too():
    store = get_typestore(Stores.ROS2_JAZZY)
    Msg = store.types["sensor_msgs/msg/Image"]
    Header = store.types["std_msgs/msg/Header"]
    Time = store.types["builtin_interfaces/msg/Time"]
    data = np.zeros((H, W * 3 + 4), np.uint8)
    data[:, : W * 3] = RGB[..., ::-1].reshape(H, -1)
    msg = Msg(header=Header(stamp=Time(sec=1, nanosec=2), frame_id="cam"), height=H, width=W, encoding="bgr8",
              is_bigendian=0, step=W * 3 + 4, data=data.reshape(-1))
    np.testing.assert_array_equal(to_rgb(msg), RGB)


def bad_cases():
    ok = image("rgb8", RGB, pad=4)
    truncated = image("rgb8", RGB, pad=4)
    truncated.data = bytes(ok.data)[:-1]
    bad_step = image("rgb8", RGB)
    bad_step.step = W * 3 - 1
    odd_step = image("mono16", np.zeros((H, W), np.uint16))
    odd_step.step = W * 2 + 1
    odd_step.data = bytes(odd_step.step * H)
    unsupported = image("rgb8", RGB)
    unsupported.encoding = "32FC1"
    garbage_jpeg = CompressedImage(format="jpeg")
    garbage_jpeg.data = b"\xff\xd8\xff\xe0 definitely not a jpeg"
    return [
        ("unsupported_encoding", unsupported),
        ("unsupported_encoding", Image(height=2, width=2, encoding="yuv422", step=4, data=bytes(8))),
        ("unsupported_encoding", CompressedImage(format="16UC1; compressedDepth png", data=b"\x89PNG")),
        ("unsupported_encoding", CompressedImage(format="tiff", data=b"II*\x00")),
        ("truncated", truncated),
        ("truncated", Image(height=H, width=W, encoding="rgb8", step=W * 3, data=b"")),
        ("bad_step", bad_step),
        ("bad_step", odd_step),
        ("empty", Image(encoding="rgb8")),
        ("empty", Image(height=0, width=W, encoding="rgb8", step=W * 3)),
        ("empty", CompressedImage(format="png", data=b"")),
        ("decode_failed", garbage_jpeg),
        ("decode_failed", CompressedImage(format="png", data=b"\x89PNG\r\n\x1a\n truncated png")),
    ]


@pytest.mark.parametrize("kind,msg", bad_cases(), ids=[f"{k}-{i}" for i, (k, _) in enumerate(bad_cases())])
def test_bad_images_raise_typed_errors(kind, msg):
    with pytest.raises(BadImage) as err:
        to_rgb(msg)
    assert err.value.kind == kind and err.value.kind in BAD_IMAGE_KINDS
    assert err.value.detail


def test_every_bad_kind_is_covered():
    assert {kind for kind, _ in bad_cases()} == set(BAD_IMAGE_KINDS)
