"""The pure numpy twin of the ``edge._native`` preprocessing kernels.

Same entry signature and semantics as ``edge._native.preprocess`` (see ``native/preprocess.h``): it receives
parameters ``edge.inference.preprocess`` has already validated and folded, and fills ``out``. It touches only the
source rows and columns the bilinear taps need: those pixels are converted to RGB float32, blended horizontally
through the column tables, then vertically, normalised and quantised.

Invariant: the column/row tables are computed in float64 by the same formula as the C driver, so both pick the
same source pixels; only float32 rounding differs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["preprocess"]

# BT.601 limited range, OpenCV's fixed-point constants as fractions of 2^20.
_CY = 1220542 / 2**20
_CUB = 2116026 / 2**20
_CUG = -409993 / 2**20
_CVG = -852492 / 2**20
_CVR = 1673527 / 2**20

_RGB888, _BGR888, _GRAY8, _YUYV, _NV12 = range(5)
_F32, _U8, _I8 = range(3)
_NCHW = 0


def _taps(n_out: int, n_in: int) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.float32]]:
    """Half-pixel-centre bilinear taps (OpenCV INTER_LINEAR's clamping) for n_out outputs over n_in inputs."""
    s = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    s = np.maximum(s, 0.0)
    i0 = np.floor(s).astype(np.intp)
    w = s - i0
    edge = i0 >= n_in - 1
    i0[edge] = n_in - 1
    w[edge] = 0.0
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, w.astype(np.float32)


def _yuv_to_rgb(y: npt.NDArray[Any], u: npt.NDArray[Any], v: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    yf = np.float32(_CY) * (y.astype(np.float32) - 16)
    uf = u.astype(np.float32) - 128
    vf = v.astype(np.float32) - 128
    rgb = np.stack(
        (yf + np.float32(_CVR) * vf, yf + np.float32(_CUG) * uf + np.float32(_CVG) * vf, yf + np.float32(_CUB) * uf),
        axis=-1,
    )
    clipped: npt.NDArray[np.float32] = np.clip(rgb, 0.0, 255.0)
    return clipped


def _taps_rgb(
    src: npt.NDArray[np.uint8], fmt: int, rows: npt.NDArray[np.intp], x0: npt.NDArray[np.intp], x1: npt.NDArray[np.intp]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Float pixels (len(rows), len(x), C) at absolute frame rows and the two tap columns, planes in source order.

    Whole rows are taken first (contiguous copies), then the tap columns: cheaper than a 2-D fancy index.
    """
    if fmt == _GRAY8:
        lines = np.take(src.reshape(src.shape[0], src.shape[1]), rows, axis=0)
        return np.take(lines, x0, axis=1)[..., None].astype(np.float32), np.take(lines, x1, axis=1)[..., None].astype(
            np.float32
        )
    if fmt in (_RGB888, _BGR888):
        lines = np.take(src, rows, axis=0)
        return np.take(lines, x0, axis=1).astype(np.float32), np.take(lines, x1, axis=1).astype(np.float32)
    if fmt == _YUYV:
        lines = np.take(src, rows, axis=0)
        luma, chroma = lines[..., 0], lines[..., 1]

        def at_yuyv(x: npt.NDArray[np.intp]) -> npt.NDArray[np.float32]:
            pair = (x // 2) * 2
            return _yuv_to_rgb(
                np.take(luma, x, axis=1), np.take(chroma, pair, axis=1), np.take(chroma, pair + 1, axis=1)
            )

        return at_yuyv(x0), at_yuyv(x1)
    height = src.shape[0] // 3 * 2
    luma = np.take(src, rows, axis=0)
    chroma = np.take(src, height + rows // 2, axis=0)

    def at_nv12(x: npt.NDArray[np.intp]) -> npt.NDArray[np.float32]:
        pair = (x // 2) * 2
        return _yuv_to_rgb(np.take(luma, x, axis=1), np.take(chroma, pair, axis=1), np.take(chroma, pair + 1, axis=1))

    return at_nv12(x0), at_nv12(x1)


def _store(out: npt.NDArray[Any], values: npt.NDArray[np.float32], dtype: int) -> None:
    if dtype == _F32:
        out[...] = values
        return
    lo, hi = (-128.0, 127.0) if dtype == _I8 else (0.0, 255.0)
    # np.rint rounds half to even, like the C kernels' cvtps / lrintf.
    out[...] = np.rint(np.clip(values, lo, hi))


# Positional like the C entry it stands in for: the wrapper calls either with the same argument tuple.
def preprocess(  # noqa: PLR0917
    src: npt.NDArray[np.uint8],
    out: npt.NDArray[Any],
    fmt: int,
    crop: tuple[int, int, int, int],
    inner: tuple[int, int, int, int],
    order: int,
    alpha: tuple[float, float, float],
    beta: tuple[float, float, float],
    fill: float,
    dtype: int,
    layout: int,
) -> None:
    """Fill ``out`` like ``edge._native.preprocess`` (arguments already validated by the public wrapper).

    Args:
        src: uint8 frame (rows of any stride) in the layout of ``fmt`` (0 RGB888, 1 BGR888, 2 GRAY8, 3 YUYV, 4 NV12).
        out: C-contiguous output, ``(1, C, H, W)`` for layout 0 or ``(1, H, W, C)`` for layout 1.
        fmt: pixel format code.
        crop: ``(x, y, width, height)`` inside the frame.
        inner: ``(top, left, height, width)`` of the rectangle of ``out`` the crop is resized into.
        order: 0 for RGB output, 1 for BGR.
        alpha, beta: per output channel, ``value = pixel * alpha + beta`` (quantisation folded in).
        fill: letterbox value in pixel units for the part of ``out`` outside ``inner``.
        dtype: 0 float32, 1 uint8, 2 int8.
        layout: 0 NCHW, 1 NHWC.
    """
    cx, cy, cw, ch = crop
    top, left, ih, iw = inner
    channels = 1 if fmt == _GRAY8 else 3
    x0, x1, wx = _taps(iw, cw)
    y0, y1, wy = _taps(ih, ch)
    # Each needed source row once (consecutive output rows often share one when upscaling).
    rows, rinv = np.unique(np.concatenate((y0, y1)), return_inverse=True)
    a, b = _taps_rgb(src, fmt, rows + cy, x0 + cx, x1 + cx)
    b -= a
    b *= wx[None, :, None]
    a += b
    top_rows, bottom_rows = np.take(a, rinv[:ih], axis=0), np.take(a, rinv[ih:], axis=0)
    bottom_rows -= top_rows
    bottom_rows *= wy[:, None, None]
    top_rows += bottom_rows
    img = top_rows
    swap = channels == 3 and ((fmt == _BGR888) != (order == 1))
    if swap:
        img = img[..., ::-1]
    al = np.asarray(alpha[:channels], dtype=np.float32)
    be = np.asarray(beta[:channels], dtype=np.float32)
    img *= al
    img += be
    values = img
    view = out[0] if layout == _NCHW else np.moveaxis(out[0], -1, 0)
    if (ih, iw) != view.shape[1:]:
        fill_values = np.float32(fill) * al + be
        _store(view, np.broadcast_to(fill_values[:, None, None], view.shape), dtype)
    _store(view[:, top : top + ih, left : left + iw], np.moveaxis(values, -1, 0), dtype)
