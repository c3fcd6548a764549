"""The pixel formats a source can deliver and the preprocessor can read, apart from numpy.

The configuration names them, and ``edge --help`` loads the configuration's module: this one stays free of numpy so
that the help answers without loading it. ``edge.sensing.frames`` documents each format's array layout.
"""

from __future__ import annotations

import enum

__all__ = ["PixelFormat"]


class PixelFormat(enum.StrEnum):
    """Pixel formats a source can deliver and the preprocessor can read."""

    RGB888 = "RGB888"
    BGR888 = "BGR888"
    GRAY8 = "GRAY8"
    YUYV = "YUYV"
    NV12 = "NV12"
