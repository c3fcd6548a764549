"""The values sources produce: camera-like frames and scalar sensor readings.

Array layouts by pixel format (all ``uint8``; rows may be padded, i.e. any row stride):

- ``RGB888`` / ``BGR888``: shape ``(H, W, 3)``.
- ``GRAY8``: shape ``(H, W)`` (``(H, W, 1)`` is accepted too).
- ``YUYV``: packed 4:2:2, shape ``(H, W, 2)``; each pair of pixels is ``Y0 U Y1 V``. ``W`` is even.
- ``NV12``: 4:2:0 semi-planar, shape ``(H * 3 // 2, W)``: ``H`` rows of Y, then ``H / 2`` rows of interleaved
  ``U V``. ``H`` and ``W`` are even.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from edge.sensing.pixels import PixelFormat

__all__ = ["Frame", "PixelFormat", "Reading"]


@dataclass(frozen=True, slots=True)
class Frame:
    """One image from a source.

    Attributes:
        data: the pixels, laid out as the module docstring says for ``pixel_format``.
        pixel_format: how ``data`` is encoded.
        seq: the source's frame number, starting at 0.
        timestamp: wall-clock capture time (seconds since the epoch).
        label: the ground-truth class where the source knows it (test sets), else ``None``.
        release: for a frame whose ``data`` is a view of a buffer the source lends (a V4L2 mmap buffer), what gives
            it back; the pipeline calls it once, as soon as the preprocessing has read the pixels or the frame is
            dropped or rejected, and ``data`` must not be read after it. ``None`` for frames that own their pixels.
        dropped_before: frames the source knows it lost just before this one (sequence gaps of a capture device).
    """

    data: npt.NDArray[np.uint8]
    pixel_format: PixelFormat
    seq: int
    timestamp: float
    label: int | None = None
    release: Callable[[], None] | None = field(default=None, compare=False, repr=False)
    dropped_before: int = 0


@dataclass(frozen=True, slots=True)
class Reading:
    """One scalar sample from a serial sensor channel."""

    channel: int
    value: float
    timestamp: float
