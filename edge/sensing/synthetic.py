"""Deterministic camera-like frames of handwritten digits, for the synthetic source, the demo, the tests and the
model builder.

Invariants:

- Every function here is pure: the same digit, generator state and arguments give the same bytes, on every
  platform (elementwise numpy arithmetic followed by ``np.rint``; no BLAS reductions, no threads).
- ``render_digit_frame`` draws from ``rng`` in a fixed order that does not depend on the pixel format, so the
  held-out frames of ``render_test_frames`` are the same scene in every format.
- The YUV encoders are BT.601 limited range, the inverse of OpenCV's ``COLOR_YUV2RGB_YUYV`` / ``_NV12``; chroma is
  the mean of each horizontal pair (YUYV) or 2x2 block (NV12). Layouts are those of :mod:`edge.sensing.frames`.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from edge.errors import FrameError, InputError
from edge.sensing.frames import PixelFormat

__all__ = [
    "digits_test_set",
    "render_digit_frame",
    "render_test_frames",
    "rgb_to_gray",
    "rgb_to_nv12",
    "rgb_to_yuyv",
    "to_pixel_format",
]

U8 = npt.NDArray[np.uint8]
F64 = npt.NDArray[np.float64]

# Size range of the rendered digit (pixels, square), as a camera at varying distance would see it.
_MIN_SIZE = 50
_MAX_SIZE = 90
_TEST_SET_RESOURCE = "digits-test.npz"

# BT.601 limited range, RGB -> YCbCr (rows: Y, U=Cb, V=Cr); offsets 16/128.
_BT601 = np.array(
    [
        [0.257, 0.504, 0.098],
        [-0.148, -0.291, 0.439],
        [0.439, -0.368, -0.071],
    ],
    dtype=np.float64,
)
_BT601_OFFSET = np.array([16.0, 128.0, 128.0], dtype=np.float64)


def _upscale_bilinear(src: F64, size: int) -> F64:
    """Scale a small square image to ``size`` x ``size`` with bilinear interpolation (half-pixel centres)."""
    n = src.shape[0]
    pos = (np.arange(size, dtype=np.float64) + 0.5) * (n / size) - 0.5
    pos = np.clip(pos, 0.0, n - 1.0)
    i0 = np.minimum(np.floor(pos).astype(np.intp), n - 2)
    frac = pos - i0
    rows = src[i0] * (1.0 - frac)[:, None] + src[i0 + 1] * frac[:, None]
    out: F64 = rows[:, i0] * (1.0 - frac)[None, :] + rows[:, i0 + 1] * frac[None, :]
    return out


def render_digit_frame(
    digit: npt.NDArray[np.generic], rng: np.random.Generator, *, height: int = 120, width: int = 160
) -> U8:
    """Render one 8x8 digit as a noisy, tinted camera frame.

    The digit is scaled to a random square of 50-90 px (smaller if the frame is smaller) at a random position;
    background and ink get random brightness and tint (the ink is always brighter than the background, as in the
    source data set); Gaussian sensor noise is added.

    Args:
        digit: an ``(8, 8)`` array of ink values ``0..16`` (scikit-learn's ``load_digits`` images).
        rng: the generator all randomness is drawn from (a fixed number of draws per call).
        height: frame height in pixels (even, so every pixel format can encode it).
        width: frame width in pixels (even).

    Returns:
        The frame, ``(height, width, 3)`` uint8 RGB.

    Raises:
        InputError: the digit is not 8x8 or the frame size is not positive and even.
    """
    if digit.shape != (8, 8):
        raise InputError(f"digit must have shape (8, 8), got {digit.shape}")
    if height < 2 or width < 2 or height % 2 or width % 2:
        raise InputError(f"frame size must be positive and even, got {height}x{width}")
    max_size = min(_MAX_SIZE, height, width)
    min_size = min(_MIN_SIZE, max_size)
    size = int(rng.integers(min_size, max_size + 1))
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    background = rng.uniform(10.0, 110.0)
    contrast = rng.uniform(90.0, 200.0)
    bg_tint = rng.uniform(0.75, 1.0, size=3)
    fg_tint = rng.uniform(0.75, 1.0, size=3)
    noise_sigma = rng.uniform(1.0, 8.0)
    # float32 noise: half the cost of float64 and still far finer than the 1-level quantisation of the output.
    img = rng.standard_normal((height, width, 3), dtype=np.float32)
    img *= np.float32(noise_sigma)

    ink = _upscale_bilinear(np.clip(digit.astype(np.float64), 0.0, 16.0) / 16.0, size)
    bg_rgb = (background * bg_tint).astype(np.float32)
    fg_rgb = np.minimum(background + contrast, 255.0) * fg_tint
    img += bg_rgb
    patch = (ink[:, :, None] * (fg_rgb - bg_rgb)).astype(np.float32)
    img[top : top + size, left : left + size] += patch
    np.rint(img, out=img)
    np.clip(img, 0, 255, out=img)
    out: U8 = img.astype(np.uint8)
    return out


def _check_rgb(rgb: npt.NDArray[np.generic], *, even: bool) -> None:
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise FrameError(f"expected an (H, W, 3) uint8 RGB frame, got {rgb.shape} {rgb.dtype}")
    if even and (rgb.shape[0] % 2 or rgb.shape[1] % 2):
        raise FrameError(f"YUV 4:2:x needs even height and width, got {rgb.shape[0]}x{rgb.shape[1]}")


def _to_u8(values: F64) -> U8:
    out: U8 = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return out


def _yuv(rgb: U8) -> F64:
    """Full-resolution BT.601 limited-range Y, U, V planes as float64, shape (H, W, 3), unrounded."""
    return _mix(rgb, _BT601) + _BT601_OFFSET


def _mix(rgb: U8, matrix: F64) -> F64:
    """``rgb @ matrix.T`` as elementwise products: exact same bits everywhere, unlike a BLAS matmul."""
    c = rgb.astype(np.float64)
    r, g, b = c[:, :, 0:1], c[:, :, 1:2], c[:, :, 2:3]
    out: F64 = r * matrix[:, 0] + g * matrix[:, 1] + b * matrix[:, 2]
    return out


def rgb_to_yuyv(rgb: U8) -> U8:
    """Encode an RGB frame as packed YUYV 4:2:2 (BT.601 limited range).

    Args:
        rgb: ``(H, W, 3)`` uint8 RGB, ``W`` even.

    Returns:
        ``(H, W, 2)`` uint8: channel 0 is Y of every pixel, channel 1 alternates U (even columns) and V (odd),
        i.e. the bytes ``Y0 U Y1 V`` per pixel pair.

    Raises:
        FrameError: the frame is not ``(H, W, 3)`` uint8 or has an odd size.
    """
    _check_rgb(rgb, even=True)
    yuv = _yuv(rgb)
    h, w = rgb.shape[:2]
    # Chroma is linear in RGB, so averaging U/V over the pair equals converting the averaged colour.
    pair = yuv[:, :, 1:].reshape(h, w // 2, 2, 2).mean(axis=2)
    out = np.empty((h, w, 2), dtype=np.uint8)
    out[:, :, 0] = _to_u8(yuv[:, :, 0])
    out[:, 0::2, 1] = _to_u8(pair[:, :, 0])
    out[:, 1::2, 1] = _to_u8(pair[:, :, 1])
    return out


def rgb_to_nv12(rgb: U8) -> U8:
    """Encode an RGB frame as NV12 4:2:0 (BT.601 limited range).

    Args:
        rgb: ``(H, W, 3)`` uint8 RGB, ``H`` and ``W`` even.

    Returns:
        ``(H * 3 // 2, W)`` uint8: ``H`` rows of Y, then ``H / 2`` rows of interleaved ``U V`` (one pair per 2x2
        block).

    Raises:
        FrameError: the frame is not ``(H, W, 3)`` uint8 or has an odd size.
    """
    _check_rgb(rgb, even=True)
    yuv = _yuv(rgb)
    h, w = rgb.shape[:2]
    block = yuv[:, :, 1:].reshape(h // 2, 2, w // 2, 2, 2).mean(axis=(1, 3))
    out = np.empty((h * 3 // 2, w), dtype=np.uint8)
    out[:h] = _to_u8(yuv[:, :, 0])
    out[h:] = _to_u8(block.reshape(h // 2, w))
    return out


def rgb_to_gray(rgb: U8) -> U8:
    """Convert RGB to 8-bit luma with the BT.601 weights of OpenCV's ``COLOR_RGB2GRAY`` (full range).

    Args:
        rgb: ``(H, W, 3)`` uint8 RGB.

    Returns:
        ``(H, W)`` uint8.

    Raises:
        FrameError: the frame is not ``(H, W, 3)`` uint8.
    """
    _check_rgb(rgb, even=False)
    return _to_u8(_mix(rgb, np.array([[0.299, 0.587, 0.114]]))[:, :, 0])


def to_pixel_format(rgb: U8, fmt: PixelFormat | str) -> U8:
    """Encode an RGB frame in any :class:`PixelFormat`.

    Args:
        rgb: ``(H, W, 3)`` uint8 RGB (even size for YUYV and NV12).
        fmt: the target format (a :class:`PixelFormat` or its name).

    Returns:
        A new C-contiguous uint8 array laid out as :mod:`edge.sensing.frames` describes for ``fmt``.

    Raises:
        FrameError: the frame is not RGB888 or cannot be encoded in ``fmt``.
        InputError: ``fmt`` is not a known pixel format.
    """
    try:
        fmt = PixelFormat(fmt)
    except ValueError as e:
        raise InputError(f"unknown pixel format {fmt!r}") from e
    _check_rgb(rgb, even=False)
    if fmt is PixelFormat.RGB888:
        return np.array(rgb, dtype=np.uint8, order="C", copy=True)
    if fmt is PixelFormat.BGR888:
        return np.ascontiguousarray(rgb[:, :, ::-1])
    if fmt is PixelFormat.GRAY8:
        return rgb_to_gray(rgb)
    if fmt is PixelFormat.YUYV:
        return rgb_to_yuyv(rgb)
    return rgb_to_nv12(rgb)


def digits_test_set() -> tuple[U8, npt.NDArray[np.int64], int]:
    """Load the committed held-out digits (never seen in training) from the package data.

    Returns:
        ``(digits, labels, seed)``: ``digits`` uint8 ``(N, 8, 8)`` with values ``0..16``, ``labels`` int64 ``(N,)``,
        and the seed that renders them (see :func:`render_test_frames`).

    Raises:
        InputError: the data file is missing or malformed (a broken install).
    """
    resource = importlib.resources.files("edge").joinpath("models", _TEST_SET_RESOURCE)
    try:
        with resource.open("rb") as f, np.load(f) as data:
            digits = np.asarray(data["digits"], dtype=np.uint8)
            labels = np.asarray(data["labels"], dtype=np.int64)
            seed = int(data["seed"])
    except (OSError, KeyError, ValueError) as e:
        raise InputError(f"held-out digits set edge/models/{_TEST_SET_RESOURCE} is unreadable: {e}") from e
    if digits.ndim != 3 or digits.shape[1:] != (8, 8) or labels.shape != (digits.shape[0],):
        raise InputError(f"held-out digits set has shapes {digits.shape} / {labels.shape}, expected (N,8,8) / (N,)")
    return digits, labels, seed


def render_test_frames(
    fmt: PixelFormat | str, *, count: int | None = None, height: int = 120, width: int = 160
) -> Iterator[tuple[U8, int]]:
    """Yield the held-out digits rendered as frames, always the same frames for the same arguments.

    Args:
        fmt: the pixel format of the yielded frames.
        count: how many frames (the first ``count`` of the set); ``None`` for all of them.
        height: frame height (even).
        width: frame width (even).

    Yields:
        ``(frame, label)`` pairs; the scene of the i-th frame does not depend on ``fmt`` or ``count``.

    Raises:
        InputError: the held-out set cannot be loaded, or ``fmt`` is unknown.
    """
    digits, labels, seed = digits_test_set()
    n = len(digits) if count is None else min(count, len(digits))
    rng = np.random.default_rng(seed)
    for i in range(n):
        rgb = render_digit_frame(digits[i], rng, height=height, width=width)
        yield to_pixel_format(rgb, fmt), int(labels[i])
