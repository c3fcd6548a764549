"""edge.sensing.synthetic: deterministic renders, every pixel format, BT.601 encoders that invert OpenCV's decoders."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from edge.errors import FrameError, InputError
from edge.sensing.frames import PixelFormat
from edge.sensing.synthetic import (
    digits_test_set,
    render_digit_frame,
    render_test_frames,
    rgb_to_nv12,
    rgb_to_yuyv,
    to_pixel_format,
)

DIGIT = np.array(
    [
        [0, 0, 5, 13, 9, 1, 0, 0],
        [0, 0, 13, 15, 10, 15, 5, 0],
        [0, 3, 15, 2, 0, 11, 8, 0],
        [0, 4, 12, 0, 0, 8, 8, 0],
        [0, 5, 8, 0, 0, 9, 8, 0],
        [0, 4, 11, 0, 1, 12, 7, 0],
        [0, 2, 14, 5, 10, 12, 0, 0],
        [0, 0, 6, 13, 10, 0, 0, 0],
    ],
    dtype=np.uint8,
)


def bt601_decode(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Float64 BT.601 limited-range YUV -> RGB (the textbook inverse, as OpenCV's YUV2RGB uses)."""
    y = (y.astype(np.float64) - 16.0) * 1.164
    u = u.astype(np.float64) - 128.0
    v = v.astype(np.float64) - 128.0
    return np.stack([y + 1.596 * v, y - 0.813 * v - 0.391 * u, y + 2.018 * u], axis=-1)


def block_constant_rgb(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Colours constant over 2x2 blocks, kept inside the range BT.601 limited range can represent exactly."""
    blocks = rng.integers(20, 236, size=(h // 2, w // 2, 3), dtype=np.uint8)
    return np.repeat(np.repeat(blocks, 2, axis=0), 2, axis=1)


def test_render_is_deterministic_per_seed():
    a = render_digit_frame(DIGIT, np.random.default_rng(5))
    b = render_digit_frame(DIGIT, np.random.default_rng(5))
    c = render_digit_frame(DIGIT, np.random.default_rng(6))
    assert a.shape == (120, 160, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_render_draws_a_digit_brighter_than_background():
    frame = render_digit_frame(DIGIT, np.random.default_rng(1), height=64, width=96).astype(np.float64)
    gray = frame.mean(axis=2)
    # The ink covers a minority of the frame and is far brighter than the median (background) level.
    assert gray.max() - np.median(gray) > 60
    assert (gray > np.median(gray) + 40).mean() < 0.4


@pytest.mark.parametrize("bad", [np.zeros((8, 7)), np.zeros((64,))])
def test_render_rejects_non_8x8_digit(bad):
    with pytest.raises(InputError):
        render_digit_frame(bad, np.random.default_rng(0))


def test_render_rejects_odd_frame_size():
    with pytest.raises(InputError):
        render_digit_frame(DIGIT, np.random.default_rng(0), height=121)


@pytest.mark.parametrize(
    ("fmt", "shape"),
    [
        (PixelFormat.RGB888, (120, 160, 3)),
        (PixelFormat.BGR888, (120, 160, 3)),
        (PixelFormat.GRAY8, (120, 160)),
        (PixelFormat.YUYV, (120, 160, 2)),
        (PixelFormat.NV12, (180, 160)),
    ],
)
def test_to_pixel_format_shapes(fmt, shape):
    rgb = render_digit_frame(DIGIT, np.random.default_rng(3))
    out = to_pixel_format(rgb, fmt)
    assert out.shape == shape and out.dtype == np.uint8 and out.flags.c_contiguous
    assert not np.shares_memory(out, rgb)


def test_bgr_is_rgb_reversed_and_names_work():
    rgb = render_digit_frame(DIGIT, np.random.default_rng(3))
    assert np.array_equal(to_pixel_format(rgb, "BGR888"), rgb[:, :, ::-1])
    with pytest.raises(InputError):
        to_pixel_format(rgb, "RGBA")


def test_yuyv_round_trips_through_bt601_inverse():
    rgb = block_constant_rgb(np.random.default_rng(11), 32, 48)
    yuyv = rgb_to_yuyv(rgb)
    y = yuyv[:, :, 0]
    u = np.repeat(yuyv[:, 0::2, 1], 2, axis=1)
    v = np.repeat(yuyv[:, 1::2, 1], 2, axis=1)
    back = bt601_decode(y, u, v)
    assert np.abs(back - rgb).max() <= 3.0


def test_nv12_round_trips_through_bt601_inverse():
    rgb = block_constant_rgb(np.random.default_rng(12), 32, 48)
    nv12 = rgb_to_nv12(rgb)
    h = 32
    y = nv12[:h]
    uv = nv12[h:].reshape(h // 2, -1, 2)
    u = np.repeat(np.repeat(uv[:, :, 0], 2, axis=0), 2, axis=1)
    v = np.repeat(np.repeat(uv[:, :, 1], 2, axis=0), 2, axis=1)
    back = bt601_decode(y, u, v)
    assert np.abs(back - rgb).max() <= 3.0


def test_yuv_encoders_invert_opencv_decoders():
    cv2 = pytest.importorskip("cv2")
    rgb = block_constant_rgb(np.random.default_rng(13), 40, 64)
    from_yuyv = cv2.cvtColor(rgb_to_yuyv(rgb), cv2.COLOR_YUV2RGB_YUYV)
    from_nv12 = cv2.cvtColor(rgb_to_nv12(rgb), cv2.COLOR_YUV2RGB_NV12)
    assert np.abs(from_yuyv.astype(int) - rgb).max() <= 3
    assert np.abs(from_nv12.astype(int) - rgb).max() <= 3


def test_chroma_is_averaged_over_the_pair():
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[:, 0] = (200, 30, 30)
    rgb[:, 1] = (30, 30, 200)
    yuyv = rgb_to_yuyv(rgb)
    mean = rgb.astype(np.float64).mean(axis=1)[0]
    u = 128 - 0.148 * mean[0] - 0.291 * mean[1] + 0.439 * mean[2]
    v = 128 + 0.439 * mean[0] - 0.368 * mean[1] - 0.071 * mean[2]
    assert yuyv[0, 0, 1] == round(u) and yuyv[0, 1, 1] == round(v)


@pytest.mark.parametrize("encode", [rgb_to_yuyv, rgb_to_nv12])
def test_yuv_encoders_reject_odd_sizes(encode):
    with pytest.raises(FrameError):
        encode(np.zeros((4, 5, 3), dtype=np.uint8))
    with pytest.raises(FrameError):
        encode(np.zeros((4, 4), dtype=np.uint8))


def test_held_out_set_is_the_committed_quarter():
    digits, labels, seed = digits_test_set()
    assert digits.dtype == np.uint8 and digits.shape[1:] == (8, 8) and digits.max() <= 16
    assert labels.dtype == np.int64 and labels.shape == (digits.shape[0],)
    assert 400 <= len(labels) <= 500  # 25% of scikit-learn's 1797 digits
    assert set(np.unique(labels)) == set(range(10))
    assert isinstance(seed, int)


def test_test_frames_are_deterministic_and_the_same_scene_in_every_format():
    first = list(render_test_frames(PixelFormat.RGB888, count=4))
    again = list(render_test_frames("RGB888", count=4))
    assert [label for _, label in first] == [label for _, label in again]
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(first, again, strict=True))
    for fmt in (PixelFormat.BGR888, PixelFormat.GRAY8, PixelFormat.YUYV, PixelFormat.NV12):
        frames = list(render_test_frames(fmt, count=4))
        for (frame, label), (rgb, rgb_label) in zip(frames, first, strict=True):
            assert label == rgb_label
            assert np.array_equal(frame, to_pixel_format(rgb, fmt))


def test_test_frames_count_is_a_prefix():
    _, labels, _ = digits_test_set()
    few = list(render_test_frames(PixelFormat.GRAY8, count=3))
    assert [label for _, label in few] == labels[:3].tolist()
    many = itertools.islice(render_test_frames(PixelFormat.GRAY8), 3)
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(few, many, strict=True))
