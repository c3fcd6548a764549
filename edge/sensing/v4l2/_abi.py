"""The slice of the V4L2 kernel ABI (``linux/videodev2.h``) that single-planar mmap capture needs, as ctypes.

ctypes lays the structures out with the platform's C rules, so their sizes (which are part of each ioctl number)
come out right on every architecture: 64-bit ``struct timeval`` and the pointer members of the unions give
``v4l2_buffer`` 88 bytes and ``v4l2_format`` 208 on aarch64 and x86-64. ``tests/test_v4l2.py`` checks every number
here against the C header, compiled by gcc on the host.
"""

from __future__ import annotations

import ctypes
from typing import Any, Final

__all__ = [
    "BUF_TYPE_VIDEO_CAPTURE",
    "CAP_STREAMING",
    "CAP_VIDEO_CAPTURE",
    "FIELD_NONE",
    "FRMIVAL_TYPE_DISCRETE",
    "FRMSIZE_TYPE_DISCRETE",
    "MEMORY_MMAP",
    "VIDIOC",
    "fourcc",
    "fourcc_name",
    "v4l2_buffer",
    "v4l2_capability",
    "v4l2_fmtdesc",
    "v4l2_format",
    "v4l2_frmivalenum",
    "v4l2_frmsizeenum",
    "v4l2_requestbuffers",
    "v4l2_streamparm",
]

BUF_TYPE_VIDEO_CAPTURE: Final = 1
MEMORY_MMAP: Final = 1
FIELD_NONE: Final = 1
FIELD_ANY: Final = 0
CAP_VIDEO_CAPTURE: Final = 0x00000001
CAP_STREAMING: Final = 0x04000000
CAP_DEVICE_CAPS: Final = 0x80000000
FRMSIZE_TYPE_DISCRETE: Final = 1
FRMSIZE_TYPE_CONTINUOUS: Final = 2
FRMSIZE_TYPE_STEPWISE: Final = 3
FRMIVAL_TYPE_DISCRETE: Final = 1
FRMIVAL_TYPE_CONTINUOUS: Final = 2
FRMIVAL_TYPE_STEPWISE: Final = 3
BUF_FLAG_ERROR: Final = 0x00000040
BUF_FLAG_TIMESTAMP_MASK: Final = 0x0000E000
BUF_FLAG_TIMESTAMP_MONOTONIC: Final = 0x00002000
CAP_TIMEPERFRAME: Final = 0x1000


def fourcc(name: str) -> int:
    """The 32-bit code of a four-character pixel format name (``v4l2_fourcc``)."""
    raw = name.encode("ascii")
    if len(raw) != 4:
        raise ValueError(f"a fourcc has 4 characters, not {name!r}")
    return raw[0] | raw[1] << 8 | raw[2] << 16 | raw[3] << 24


def fourcc_name(code: int) -> str:
    """The four characters of a pixel format code, printable ones only (a driver's code may be anything)."""
    chars = [(code >> shift) & 0xFF for shift in (0, 8, 16, 24)]
    return "".join(chr(c) if 32 <= c < 127 else "?" for c in chars)


class v4l2_capability(ctypes.Structure):  # noqa: N801
    _fields_ = (
        ("driver", ctypes.c_uint8 * 16),
        ("card", ctypes.c_uint8 * 32),
        ("bus_info", ctypes.c_uint8 * 32),
        ("version", ctypes.c_uint32),
        ("capabilities", ctypes.c_uint32),
        ("device_caps", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32 * 3),
    )


class v4l2_fmtdesc(ctypes.Structure):  # noqa: N801
    _fields_ = (
        ("index", ctypes.c_uint32),
        ("type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("description", ctypes.c_uint8 * 32),
        ("pixelformat", ctypes.c_uint32),
        ("mbus_code", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32 * 3),
    )


class v4l2_frmsize_discrete(ctypes.Structure):  # noqa: N801
    _fields_ = (("width", ctypes.c_uint32), ("height", ctypes.c_uint32))


class v4l2_frmsize_stepwise(ctypes.Structure):  # noqa: N801
    _fields_ = tuple(
        (name, ctypes.c_uint32)
        for name in ("min_width", "max_width", "step_width", "min_height", "max_height", "step_height")
    )


class _frmsize_union(ctypes.Union):  # noqa: N801
    _fields_ = (("discrete", v4l2_frmsize_discrete), ("stepwise", v4l2_frmsize_stepwise))


class v4l2_frmsizeenum(ctypes.Structure):  # noqa: N801
    _anonymous_ = ("u",)
    _fields_ = (
        ("index", ctypes.c_uint32),
        ("pixel_format", ctypes.c_uint32),
        ("type", ctypes.c_uint32),
        ("u", _frmsize_union),
        ("reserved", ctypes.c_uint32 * 2),
    )


class v4l2_fract(ctypes.Structure):  # noqa: N801
    _fields_ = (("numerator", ctypes.c_uint32), ("denominator", ctypes.c_uint32))


class v4l2_frmival_stepwise(ctypes.Structure):  # noqa: N801
    _fields_ = (("min", v4l2_fract), ("max", v4l2_fract), ("step", v4l2_fract))


class _frmival_union(ctypes.Union):  # noqa: N801
    _fields_ = (("discrete", v4l2_fract), ("stepwise", v4l2_frmival_stepwise))


class v4l2_frmivalenum(ctypes.Structure):  # noqa: N801
    _anonymous_ = ("u",)
    _fields_ = (
        ("index", ctypes.c_uint32),
        ("pixel_format", ctypes.c_uint32),
        ("width", ctypes.c_uint32),
        ("height", ctypes.c_uint32),
        ("type", ctypes.c_uint32),
        ("u", _frmival_union),
        ("reserved", ctypes.c_uint32 * 2),
    )


class v4l2_pix_format(ctypes.Structure):  # noqa: N801
    _fields_ = tuple(
        (name, ctypes.c_uint32)
        for name in (
            "width",
            "height",
            "pixelformat",
            "field",
            "bytesperline",
            "sizeimage",
            "colorspace",
            "priv",
            "flags",
            "ycbcr_enc",
            "quantization",
            "xfer_func",
        )
    )


class _format_union(ctypes.Union):  # noqa: N801
    # raw_data is the union's declared size; the pointer member stands for v4l2_window's pointers, which give the
    # union (and so the structure) the platform's pointer alignment.
    _fields_ = (("pix", v4l2_pix_format), ("raw_data", ctypes.c_uint8 * 200), ("_align", ctypes.c_void_p))


class v4l2_format(ctypes.Structure):  # noqa: N801
    _fields_ = (("type", ctypes.c_uint32), ("fmt", _format_union))


class v4l2_captureparm(ctypes.Structure):  # noqa: N801
    _fields_ = (
        ("capability", ctypes.c_uint32),
        ("capturemode", ctypes.c_uint32),
        ("timeperframe", v4l2_fract),
        ("extendedmode", ctypes.c_uint32),
        ("readbuffers", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32 * 4),
    )


class _parm_union(ctypes.Union):  # noqa: N801
    _fields_ = (("capture", v4l2_captureparm), ("raw_data", ctypes.c_uint8 * 200))


class v4l2_streamparm(ctypes.Structure):  # noqa: N801
    _fields_ = (("type", ctypes.c_uint32), ("parm", _parm_union))


class v4l2_requestbuffers(ctypes.Structure):  # noqa: N801
    _fields_ = (
        ("count", ctypes.c_uint32),
        ("type", ctypes.c_uint32),
        ("memory", ctypes.c_uint32),
        ("capabilities", ctypes.c_uint32),
        ("flags", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8 * 3),
    )


class timeval(ctypes.Structure):  # noqa: N801
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long))


class v4l2_timecode(ctypes.Structure):  # noqa: N801
    _fields_ = (
        ("type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("frames", ctypes.c_uint8),
        ("seconds", ctypes.c_uint8),
        ("minutes", ctypes.c_uint8),
        ("hours", ctypes.c_uint8),
        ("userbits", ctypes.c_uint8 * 4),
    )


class _buffer_m(ctypes.Union):  # noqa: N801
    _fields_ = (
        ("offset", ctypes.c_uint32),
        ("userptr", ctypes.c_ulong),
        ("planes", ctypes.c_void_p),
        ("fd", ctypes.c_int32),
    )


class v4l2_buffer(ctypes.Structure):  # noqa: N801
    _fields_ = (
        ("index", ctypes.c_uint32),
        ("type", ctypes.c_uint32),
        ("bytesused", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("field", ctypes.c_uint32),
        ("timestamp", timeval),
        ("timecode", v4l2_timecode),
        ("sequence", ctypes.c_uint32),
        ("memory", ctypes.c_uint32),
        ("m", _buffer_m),
        ("length", ctypes.c_uint32),
        ("reserved2", ctypes.c_uint32),
        ("request_fd", ctypes.c_int32),
    )


# asm-generic/ioctl.h, which arm64 and x86 both use: dir (2 bits) | size (14) | type (8) | nr (8).
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, struct: type[Any] | None) -> int:
    size = 0 if struct is None else ctypes.sizeof(struct)
    return direction << 30 | size << 16 | ord("V") << 8 | nr


VIDIOC: Final = {
    "QUERYCAP": _ioc(_IOC_READ, 0, v4l2_capability),
    "ENUM_FMT": _ioc(_IOC_READ | _IOC_WRITE, 2, v4l2_fmtdesc),
    "G_FMT": _ioc(_IOC_READ | _IOC_WRITE, 4, v4l2_format),
    "S_FMT": _ioc(_IOC_READ | _IOC_WRITE, 5, v4l2_format),
    "REQBUFS": _ioc(_IOC_READ | _IOC_WRITE, 8, v4l2_requestbuffers),
    "QUERYBUF": _ioc(_IOC_READ | _IOC_WRITE, 9, v4l2_buffer),
    "QBUF": _ioc(_IOC_READ | _IOC_WRITE, 15, v4l2_buffer),
    "DQBUF": _ioc(_IOC_READ | _IOC_WRITE, 17, v4l2_buffer),
    "STREAMON": _ioc(_IOC_WRITE, 18, ctypes.c_int),
    "STREAMOFF": _ioc(_IOC_WRITE, 19, ctypes.c_int),
    "G_PARM": _ioc(_IOC_READ | _IOC_WRITE, 21, v4l2_streamparm),
    "S_PARM": _ioc(_IOC_READ | _IOC_WRITE, 22, v4l2_streamparm),
    "ENUM_FRAMESIZES": _ioc(_IOC_READ | _IOC_WRITE, 74, v4l2_frmsizeenum),
    "ENUM_FRAMEINTERVALS": _ioc(_IOC_READ | _IOC_WRITE, 75, v4l2_frmivalenum),
}
