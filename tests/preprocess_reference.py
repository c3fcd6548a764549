"""The exact float64 reference for preprocessing tests, written independently of every backend.

Deliberately simple: the rules of docs/preprocessing.md applied per output pixel in float64 (vectorised over the
output grid only so tests stay fast). No tables, no caches, no folding.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

CY, CUB, CUG, CVG, CVR = (c / 2**20 for c in (1220542, 2116026, -409993, -852492, 1673527))


def frame_size(src: npt.NDArray[np.uint8], fmt: str) -> tuple[int, int]:
    """(height, width) of the frame."""
    if fmt == "NV12":
        return src.shape[0] * 2 // 3, src.shape[1]
    return src.shape[0], src.shape[1]


def source_rgb(src: npt.NDArray[np.uint8], fmt: str, y: npt.NDArray[Any], x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Float64 (..., C) pixel values at absolute frame coordinates, in R,G,B order (GRAY8: one channel)."""
    if fmt == "RGB888":
        return src[y, x].astype(np.float64)
    if fmt == "BGR888":
        return src[y, x][..., ::-1].astype(np.float64)
    if fmt == "GRAY8":
        return src.reshape(src.shape[0], src.shape[1])[y, x].astype(np.float64)[..., None]
    if fmt == "YUYV":
        yy = src[y, x, 0].astype(np.float64)
        u = src[y, (x // 2) * 2, 1].astype(np.float64)
        v = src[y, (x // 2) * 2 + 1, 1].astype(np.float64)
    else:
        h = src.shape[0] * 2 // 3
        yy = src[y, x].astype(np.float64)
        u = src[h + y // 2, (x // 2) * 2].astype(np.float64)
        v = src[h + y // 2, (x // 2) * 2 + 1].astype(np.float64)
    r = CY * (yy - 16) + CVR * (v - 128)
    g = CY * (yy - 16) + CVG * (v - 128) + CUG * (u - 128)
    b = CY * (yy - 16) + CUB * (u - 128)
    return np.clip(np.stack((r, g, b), axis=-1), 0.0, 255.0)


def _coord(i: npt.NDArray[Any], n_in: int, n_out: int) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any]]:
    s = (i + 0.5) * (n_in / n_out) - 0.5
    s = np.where(s < 0, 0.0, s)
    c0 = np.floor(s).astype(np.int64)
    w = s - c0
    clamp = c0 >= n_in - 1
    c0 = np.where(clamp, n_in - 1, c0)
    w = np.where(clamp, 0.0, w)
    c1 = np.minimum(c0 + 1, n_in - 1)
    return c0, c1, w


def reference_pixels(
    src: npt.NDArray[np.uint8],
    fmt: str,
    size: tuple[int, int],
    *,
    crop: tuple[int, int, int, int] | None = None,
    letterbox: float | None = None,
    channel_order: str = "RGB",
) -> npt.NDArray[np.float64]:
    """The resized image in pixel units, shape (C, out_h, out_w), float64."""
    fh, fw = frame_size(src, fmt)
    cx, cy, cw, ch = crop if crop is not None else (0, 0, fw, fh)
    oh, ow = size
    channels = 1 if fmt == "GRAY8" else 3
    result = np.empty((channels, oh, ow), dtype=np.float64)
    if letterbox is None:
        top, left, nh, nw = 0, 0, oh, ow
    else:
        s = min(oh / ch, ow / cw)
        nh, nw = max(1, round(ch * s)), max(1, round(cw * s))
        top, left = (oh - nh) // 2, (ow - nw) // 2
        result[...] = letterbox
    yy, xx = np.meshgrid(np.arange(nh), np.arange(nw), indexing="ij")
    y0, y1, wy = _coord(yy, ch, nh)
    x0, x1, wx = _coord(xx, cw, nw)
    y0, y1, x0, x1 = y0 + cy, y1 + cy, x0 + cx, x1 + cx
    wx, wy = wx[..., None], wy[..., None]
    p00, p01 = source_rgb(src, fmt, y0, x0), source_rgb(src, fmt, y0, x1)
    p10, p11 = source_rgb(src, fmt, y1, x0), source_rgb(src, fmt, y1, x1)
    img = (1 - wy) * ((1 - wx) * p00 + wx * p01) + wy * ((1 - wx) * p10 + wx * p11)
    if channels == 3 and channel_order == "BGR":
        img = img[..., ::-1]
    result[:, top : top + nh, left : left + nw] = np.moveaxis(img, -1, 0)
    return result


def normalise(pixels: npt.NDArray[np.float64], mean: Any, std: Any) -> npt.NDArray[np.float64]:
    """(pixel - mean[c]) / std[c] over a (C, H, W) array."""
    c = pixels.shape[0]
    m = np.broadcast_to(np.asarray(mean, dtype=np.float64), (c,))[:, None, None]
    s = np.broadcast_to(np.asarray(std, dtype=np.float64), (c,))[:, None, None]
    return (pixels - m) / s


def quantise(values: npt.NDArray[np.float64], dtype: str, scale: float | None, zero_point: int | None) -> Any:
    """The exact quantisation rule (round half to even, saturate), as float64."""
    q = np.rint(values) if scale is None else np.rint(values / scale) + (zero_point or 0)
    lo, hi = (-128, 127) if dtype == "int8" else (0, 255)
    return np.clip(q, lo, hi)


def to_layout(chw: npt.NDArray[Any], layout: str) -> npt.NDArray[Any]:
    """(C, H, W) -> the public output shape."""
    return chw[None] if layout == "NCHW" else np.moveaxis(chw, 0, -1)[None]


def assert_close(
    got: npt.NDArray[Any],
    src: npt.NDArray[np.uint8],
    fmt: str,
    size: tuple[int, int],
    *,
    mean: Any = 0.0,
    std: Any = 1.0,
    layout: str = "NCHW",
    dtype: str = "float32",
    scale: float | None = None,
    zero_point: int | None = None,
    crop: tuple[int, int, int, int] | None = None,
    letterbox: float | None = None,
    channel_order: str = "RGB",
    typical: float | None = 1e-3,
) -> float:
    """Check got against the reference; returns the max error (pixel units for float32, LSB for integers).

    float32: <= 0.5 pixel units everywhere and <= ``typical`` (a much tighter bound the float32 arithmetic allows)
    so that a regression shows; integer dtypes: <= 1 LSB of quantising the exact value.
    """
    pix = reference_pixels(src, fmt, size, crop=crop, letterbox=letterbox, channel_order=channel_order)
    vals = normalise(pix, mean, std)
    c = pix.shape[0]
    s = np.broadcast_to(np.asarray(std, dtype=np.float64), (c,))[:, None, None]
    if dtype == "float32":
        assert got.dtype == np.float32
        want = to_layout(vals, layout)
        err_pix = np.abs(got.astype(np.float64) - want) * to_layout(np.broadcast_to(np.abs(s), vals.shape), layout)
        err = float(err_pix.max())
        assert err <= 0.5, f"float32 error {err} pixel units"
        if typical is not None:
            assert err <= typical, f"float32 error {err} pixel units, larger than the expected {typical}"
        return err
    want = to_layout(quantise(vals, dtype, scale, zero_point), layout)
    assert got.dtype == np.dtype(dtype)
    err = float(np.abs(got.astype(np.float64) - want).max())
    assert err <= 1.0, f"{dtype} error {err} LSB"
    return err


def rel_tol(values: npt.NDArray[Any]) -> float:
    """float32 relative rounding of the largest magnitude, for callers composing bounds."""
    return float(np.abs(values).max()) * 2 * math.ulp(1.0) * 2**29
