"""Camera frame -> model input tensor: crop, bilinear resize, colour conversion, normalisation, quantisation.

One call does all of it in one pass over the pixels it needs (C kernels in ``edge._native`` with run-time SIMD
dispatch, or the pure numpy twin in ``_preprocess_numpy`` with the same semantics). ``docs/preprocessing.md``
states the rules; in short:

- Resize: bilinear with half-pixel centres (OpenCV ``INTER_LINEAR``, torch ``align_corners=False``), both ways.
- YUYV / NV12: BT.601 limited range with OpenCV's fixed-point constants, evaluated at the source pixels in float
  (clamped to [0, 255], not rounded) before interpolation; chroma is nearest (no chroma interpolation).
- Normalisation ``v = (pixel - mean[c]) / std[c]``; ``int8``/``uint8`` quantise ``v / scale + zero_point`` with
  round-half-to-even and saturation.

Invariants: every argument is validated here, once, for every backend (so they all raise the same errors); the
kernels receive only validated, folded parameters (per-channel ``alpha``/``beta``, an inner rectangle for the
letterbox). The validated plan of a call is cached, keyed by the frame shape and every scalar argument with its exact
type, so a service calling with the same options per frame pays the validation once. Source rows may have any
stride (also negative); a source whose pixels are not packed inside a row is copied once to a contiguous array
first.

Backend selection happens at import: the best native path the CPU supports, unless ``EDGE_PREPROCESS`` forces
``numpy`` or a native path (``scalar``, ``sse4``, ``avx2``, ``neon``). A missing extension falls back to numpy with a
WARNING, or raises ``ImportError`` when ``EDGE_REQUIRE_NATIVE=1``.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from edge.errors import ConfigError, FrameError
from edge.inference import _preprocess_numpy
from edge.sensing.frames import PixelFormat

__all__ = ["available_backends", "backend", "preprocess_image"]

_log = logging.getLogger("edge.inference.preprocess")

_FMT_CODES = {
    PixelFormat.RGB888: 0,
    PixelFormat.BGR888: 1,
    PixelFormat.GRAY8: 2,
    PixelFormat.YUYV: 3,
    PixelFormat.NV12: 4,
}
_DTYPES: dict[str, tuple[int, type[np.generic]]] = {
    "float32": (0, np.float32),
    "uint8": (1, np.uint8),
    "int8": (2, np.int8),
}
_LAYOUTS = {"NCHW": 0, "NHWC": 1}
_ORDERS = {"RGB": 0, "BGR": 1}
_NATIVE_PATHS = ("avx2", "sse4", "neon", "scalar")

_Kernel = Callable[..., None]

try:
    from edge import _native  # type: ignore[attr-defined]
except ImportError as exc:  # pragma: no cover - exercised by CI without a build
    if os.environ.get("EDGE_REQUIRE_NATIVE") == "1":
        raise ImportError(f"EDGE_REQUIRE_NATIVE=1 but the C extension edge._native cannot be imported: {exc}") from exc
    _native = None
    _log.warning("edge._native cannot be imported (%s): preprocessing falls back to the slower numpy twin", exc)


def available_backends() -> list[str]:
    """List the preprocessing backends usable in this process, best first.

    Returns:
        Names such as ``["native-avx2", "native-sse4", "native-scalar", "numpy"]``; ``numpy`` is always last.
    """
    paths: list[str] = list(_native.simd_paths()) if _native is not None else []
    return [f"native-{p}" for p in paths] + ["numpy"]


def _resolve(name: str, what: str) -> str:
    """Map ``avx2``/``native-avx2``/``numpy`` to a full backend name available here, or raise ValueError."""
    full = name if name == "numpy" or name.startswith("native-") else f"native-{name}"
    if full not in available_backends():
        raise ValueError(f"{what}: backend {name!r} is not available here (available: {available_backends()})")
    return full


def _select() -> str:
    forced = os.environ.get("EDGE_PREPROCESS", "").strip()
    if not forced:
        return available_backends()[0]
    try:
        chosen = _resolve(forced, "EDGE_PREPROCESS")
    except ValueError as e:
        raise ConfigError("EDGE_PREPROCESS", forced, f"one of {available_backends()} or a short native name") from e
    _log.info("preprocessing backend forced by EDGE_PREPROCESS: %s", chosen)
    return chosen


_SELECTED = _select()
_log.info("preprocessing backend: %s (available: %s)", _SELECTED, available_backends())


def backend() -> str:
    """Name the preprocessing path ``preprocess_image`` uses by default.

    Returns:
        ``"native-avx2"``, ``"native-sse4"``, ``"native-scalar"``, ``"native-neon"`` or ``"numpy"``.
    """
    return _SELECTED


_KERNELS: dict[str, _Kernel] = {
    name: (
        _preprocess_numpy.preprocess
        if name == "numpy"
        else functools.partial(_native.preprocess, path=name.removeprefix("native-"))
    )
    for name in available_backends()
}


def _is_int(v: object) -> bool:
    # The exact-type test first: the ABC check costs ~1 us and this runs per call on the hot path.
    return type(v) is int or (isinstance(v, numbers.Integral) and not isinstance(v, bool))


def _is_real(v: object) -> bool:
    return type(v) is float or type(v) is int or (isinstance(v, numbers.Real) and not isinstance(v, bool))


def _per_channel(name: str, value: float | Sequence[float], channels: int) -> list[float]:
    if _is_real(value):
        vals = [float(value)] * channels  # type: ignore[arg-type]
    elif isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, Sequence, np.ndarray)):
        raise TypeError(f"{name} must be a float or a sequence of {channels} floats, got {type(value).__name__}")
    else:
        if len(value) != channels:
            raise ValueError(f"{name} must have {channels} values for this pixel format, got {len(value)}")
        vals = []
        for v in value:
            if not _is_real(v):
                raise TypeError(f"{name} must contain only real numbers, got {v!r}")
            vals.append(float(v))
    for v in vals:
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {vals}")
    return vals


def _frame_geometry(shape: tuple[int, ...], fmt: PixelFormat) -> tuple[int, int]:
    """Check the array shape for the pixel format and return the frame's (height, width)."""
    ndim = len(shape)
    if fmt in (PixelFormat.RGB888, PixelFormat.BGR888):
        if ndim != 3 or shape[2] != 3:
            raise FrameError(f"src: {fmt} needs shape (H, W, 3), got {shape}")
    elif fmt == PixelFormat.GRAY8:
        if not (ndim == 2 or (ndim == 3 and shape[2] == 1)):
            raise FrameError(f"src: GRAY8 needs shape (H, W) or (H, W, 1), got {shape}")
    elif fmt == PixelFormat.YUYV:
        if ndim != 3 or shape[2] != 2:
            raise FrameError(f"src: YUYV needs shape (H, W, 2), got {shape}")
    elif ndim != 2:
        raise FrameError(f"src: NV12 needs shape (H*3/2, W), got {shape}")
    rows, width = int(shape[0]), int(shape[1])
    if rows < 1 or width < 1:
        raise FrameError(f"src: empty frame of shape {shape}")
    if fmt in (PixelFormat.YUYV, PixelFormat.NV12) and width % 2:
        raise FrameError(f"src: {fmt} needs an even width, got {width}")
    if fmt == PixelFormat.NV12:
        # rows == H * 3 / 2 with H even is exactly "rows is a multiple of 3" (then H = rows * 2 / 3 is even).
        if rows % 3:
            raise FrameError(f"src: NV12 needs H*3/2 rows for an even H (a multiple of 3), got {rows}")
        return rows // 3 * 2, width
    return rows, width


def _packed(src: npt.NDArray[Any], bpp: int) -> npt.NDArray[Any]:
    """Return src itself when pixels are packed inside each row (any row stride), else one contiguous copy."""
    ok = src.strides[1] == bpp and (src.ndim == 2 or src.shape[2] == 1 or src.strides[2] == 1)
    return src if ok else np.ascontiguousarray(src)


def _letterbox_rect(out_h: int, out_w: int, in_h: int, in_w: int) -> tuple[int, int, int, int]:
    s = min(out_h / in_h, out_w / in_w)
    nh = min(out_h, max(1, round(in_h * s)))
    nw = min(out_w, max(1, round(in_w * s)))
    return (out_h - nh) // 2, (out_w - nw) // 2, nh, nw


def preprocess_image(
    src: npt.ArrayLike,
    *,
    pixel_format: PixelFormat | str,
    size: tuple[int, int],
    mean: float | Sequence[float] = 0.0,
    std: float | Sequence[float] = 1.0,
    layout: str = "NCHW",
    dtype: str = "float32",
    scale: float | None = None,
    zero_point: int | None = None,
    crop: tuple[int, int, int, int] | None = None,
    letterbox: float | None = None,
    channel_order: str = "RGB",
    out: npt.NDArray[Any] | None = None,
    backend: str | None = None,
) -> npt.NDArray[Any]:
    """Turn one camera frame into a model input tensor.

    Args:
        src: uint8 frame laid out as ``edge.sensing.frames`` says for ``pixel_format``; any row stride (padded,
            negative); a frame whose pixels are not packed inside a row is copied once first.
        pixel_format: the frame's ``PixelFormat`` (or its name).
        size: ``(height, width)`` of the model input, both >= 1.
        mean, std: per-channel normalisation in pixel units (0..255), a float or one value per output channel;
            ``std`` nonzero and finite.
        layout: ``"NCHW"`` -> shape ``(1, C, H, W)``, ``"NHWC"`` -> ``(1, H, W, C)``; C is 3, or 1 for GRAY8.
        dtype: ``"float32"``, ``"uint8"`` or ``"int8"``.
        scale, zero_point: quantisation ``q = saturate(round_half_even(v / scale) + zero_point)``; required for
            int8, optional for uint8 (without: ``q = saturate(round_half_even(v))``), rejected for float32.
        crop: ``(x, y, width, height)`` in source pixels, inside the frame.
        letterbox: None to stretch, or a fill value in pixel units: keep the crop's aspect ratio, centre it and
            fill the border with this value (normalised like a pixel).
        channel_order: ``"RGB"`` or ``"BGR"`` for colour outputs.
        out: optional C-contiguous writable array of exactly the output shape and dtype, filled and returned.
        backend: None for ``backend()``, or a name from ``available_backends()`` (``"numpy"``, ``"native-sse4"``,
            short native names like ``"avx2"`` too).

    Returns:
        The output tensor (``out`` itself when given).

    Raises:
        TypeError: an argument of the wrong type (``src`` or ``out`` with the wrong dtype, a non-integer size...).
        ValueError: an invalid value (``FrameError`` for a source of the wrong shape for its format), naming the
            argument.
    """
    arr = src if isinstance(src, np.ndarray) else np.asarray(src)
    if arr.dtype != np.uint8:
        raise TypeError(f"src must be a uint8 array, got dtype {arr.dtype}")
    args = (pixel_format, size, mean, std, layout, dtype, scale, zero_point, crop, letterbox, channel_order, backend)
    # Validation and folding depend only on the scalar arguments and the frame shape: cache the plan, keyed with
    # the exact types too (so 4.0 or True never reuse the plan of 4 or 1 and skip their TypeError).
    try:
        key: tuple[Any, ...] | None = (arr.shape, *map(_key_part, args))
        plan = _PLANS.get(key)  # type: ignore[arg-type]
    except TypeError:  # an unhashable argument: validated the slow way below
        key, plan = None, None
    if plan is None:
        plan = _make_plan(arr.shape, *args)
        if key is not None:
            if len(_PLANS) >= _PLAN_CACHE_SIZE:
                _PLANS.clear()
            _PLANS[key] = plan
    arr = _packed(arr, plan.bpp)

    if out is None:
        result: npt.NDArray[Any] = np.empty(plan.shape, dtype=plan.np_dtype)
    else:
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out must be a numpy array, got {type(out).__name__}")
        if out.dtype != plan.np_dtype:
            raise TypeError(f"out must have dtype {dtype}, got {out.dtype}")
        if out.shape != plan.shape:
            raise ValueError(f"out must have shape {plan.shape}, got {out.shape}")
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("out must be C-contiguous and writable")
        result = out
    plan.kernel(arr, result, *plan.args)
    return result


def _key_part(v: object) -> object:
    if isinstance(v, (tuple, list)):
        return (type(v), tuple(v), tuple(map(type, v)))
    return (type(v), v)


class _Plan(NamedTuple):
    """A validated call: everything but the arrays."""

    bpp: int
    shape: tuple[int, ...]
    np_dtype: type[np.generic]
    kernel: _Kernel
    args: tuple[Any, ...]  # the kernel arguments after src and out


_PLANS: dict[tuple[Any, ...], _Plan] = {}
_PLAN_CACHE_SIZE = 64


# Positional: called with the argument tuple that is also the cache key.
def _make_plan(  # noqa: PLR0917
    src_shape: tuple[int, ...],
    pixel_format: PixelFormat | str,
    size: tuple[int, int],
    mean: float | Sequence[float],
    std: float | Sequence[float],
    layout: str,
    dtype: str,
    scale: float | None,
    zero_point: int | None,
    crop: tuple[int, int, int, int] | None,
    letterbox: float | None,
    channel_order: str,
    backend: str | None,
) -> _Plan:
    """Validate every scalar argument of ``preprocess_image`` and fold them into kernel arguments."""
    # --- the source and its format
    if isinstance(pixel_format, PixelFormat):
        fmt = pixel_format
    elif isinstance(pixel_format, str):
        try:
            fmt = PixelFormat(pixel_format)
        except ValueError:
            raise ValueError(f"pixel_format: unknown {pixel_format!r}, expected one of {list(PixelFormat)}") from None
    else:
        raise TypeError(f"pixel_format must be a PixelFormat or str, got {type(pixel_format).__name__}")
    frame_h, frame_w = _frame_geometry(src_shape, fmt)
    bpp = {PixelFormat.RGB888: 3, PixelFormat.BGR888: 3, PixelFormat.YUYV: 2}.get(fmt, 1)
    channels = 1 if fmt == PixelFormat.GRAY8 else 3

    # --- output geometry
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise TypeError(f"size must be a (height, width) pair, got {size!r}")
    if not (_is_int(size[0]) and _is_int(size[1])):
        raise TypeError(f"size must contain integers, got {size!r}")
    out_h, out_w = int(size[0]), int(size[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    if crop is None:
        cx, cy, cw, ch = 0, 0, frame_w, frame_h
    else:
        if not isinstance(crop, (tuple, list)) or len(crop) != 4:
            raise TypeError(f"crop must be (x, y, width, height), got {crop!r}")
        if not all(_is_int(v) for v in crop):
            raise TypeError(f"crop must contain integers, got {crop!r}")
        cx, cy, cw, ch = (int(v) for v in crop)
        if cw < 1 or ch < 1 or cx < 0 or cy < 0 or cx + cw > frame_w or cy + ch > frame_h:
            raise ValueError(f"crop {crop!r} does not lie inside the {frame_w}x{frame_h} frame")
    if letterbox is None:
        inner = (0, 0, out_h, out_w)
        fill = 0.0
    else:
        if not _is_real(letterbox):
            raise TypeError(f"letterbox must be None or a fill value, got {type(letterbox).__name__}")
        fill = float(letterbox)
        if not math.isfinite(fill):
            raise ValueError(f"letterbox fill must be finite, got {fill}")
        inner = _letterbox_rect(out_h, out_w, ch, cw)

    # --- names
    if not isinstance(layout, str) or layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {list(_LAYOUTS)}, got {layout!r}")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    if not isinstance(channel_order, str) or channel_order not in _ORDERS:
        raise ValueError(f"channel_order must be one of {list(_ORDERS)}, got {channel_order!r}")
    dtype_code, np_dtype = _DTYPES[dtype]

    # --- normalisation, folded into value = pixel * alpha + beta (quantisation included)
    means = _per_channel("mean", mean, channels)
    stds = _per_channel("std", std, channels)
    if any(s == 0.0 for s in stds):
        raise ValueError(f"std must be nonzero, got {stds}")
    alpha = [1.0 / s for s in stds]
    beta = [-m / s for m, s in zip(means, stds, strict=True)]
    if dtype == "float32":
        if scale is not None or zero_point is not None:
            raise ValueError("scale and zero_point apply only to dtype 'int8' or 'uint8'")
    else:
        lo, hi = (-128, 127) if dtype == "int8" else (0, 255)
        if scale is None:
            if dtype == "int8":
                raise ValueError("dtype 'int8' requires scale and zero_point")
            if zero_point is not None:
                raise ValueError("zero_point requires scale")
        else:
            if not _is_real(scale):
                raise TypeError(f"scale must be a float, got {type(scale).__name__}")
            if not (math.isfinite(scale) and scale > 0):
                raise ValueError(f"scale must be positive and finite, got {scale}")
            if zero_point is None:
                if dtype == "int8":
                    raise ValueError("dtype 'int8' requires zero_point")
                zero_point = 0
            if not _is_int(zero_point):
                raise TypeError(f"zero_point must be an integer, got {type(zero_point).__name__}")
            if not lo <= int(zero_point) <= hi:
                raise ValueError(f"zero_point must be in [{lo}, {hi}] for {dtype}, got {zero_point}")
            # round_half_even(x) + zp == round_half_even(x + zp) for an integer zp: fold both in.
            alpha = [a / scale for a in alpha]
            beta = [b / scale + int(zero_point) for b in beta]
    f32max = float(np.finfo(np.float32).max)
    if not all(abs(v) < f32max for v in (*alpha, *beta)):
        raise ValueError("mean/std/scale give coefficients beyond float32 range (std or scale too small)")
    alpha3 = (alpha + alpha * 2)[:3]
    beta3 = (beta + beta * 2)[:3]

    shape = (1, channels, out_h, out_w) if layout == "NCHW" else (1, out_h, out_w, channels)
    kernel = _KERNELS[_SELECTED if backend is None else _resolve(backend, "backend")]
    args = (
        _FMT_CODES[fmt],
        (cx, cy, cw, ch),
        inner,
        _ORDERS[channel_order],
        tuple(alpha3),
        tuple(beta3),
        fill,
        dtype_code,
        _LAYOUTS[layout],
    )
    return _Plan(bpp, shape, np_dtype, kernel, args)
