"""A V4L2 capture device with a ring of mmap buffers: the I/O half of the V4L2 source.

``Device.open`` checks the node is a streaming video capture device; ``offers`` enumerates formats, sizes and frame
intervals; ``start`` sets what ``negotiate.choose`` picked, requests and maps the buffers, queues them all and starts
streaming. ``dequeue`` waits for the next filled buffer and returns it as a ``Captured``: a view of the mapped
memory (no copy) with the driver's sequence number and timestamp; ``requeue`` gives it back to the driver.

Every ioctl failure is an ``OSError`` from the kernel (``errno`` tells which: ENODEV/EIO when the device is gone),
wrapped by the source into the service's errors. The mapped buffers are Python ``mmap`` objects: a view of one keeps
it mapped, so ``close`` never unmaps memory a frame still reads; the kernel frees the buffers when the last view
is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import select
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from edge.errors import TransportError
from edge.sensing.v4l2 import _abi as abi
from edge.sensing.v4l2.negotiate import Choice, Offer

__all__ = ["Captured", "Device", "DeviceGone", "Format"]

# Frame intervals a stepwise or continuous enumeration is sampled at: the common rates.
_COMMON_RATES = (60, 50, 30, 25, 20, 15, 10, 5)
# Sizes a stepwise or continuous enumeration is sampled at (and its minimum and maximum).
_COMMON_SIZES = ((320, 240), (640, 480), (800, 600), (1280, 720), (1920, 1080))


class DeviceGone(TransportError):  # noqa: N818 -- names the condition: the device went away
    """The device was unplugged or failed (ENODEV, EIO, an error event): close it and open it again.

    Attributes:
        errno: the kernel's error number.
    """

    def __init__(self, errno_: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno_


@dataclass(frozen=True, slots=True)
class Format:
    """What the driver actually set: the fourcc, the size, the row stride and the largest image size."""

    fourcc: str
    width: int
    height: int
    bytesperline: int
    sizeimage: int


@dataclass(frozen=True, slots=True)
class Captured:
    """A filled buffer: ``data`` is a zero-copy view of its mapped memory, valid until it is requeued."""

    index: int
    data: memoryview
    sequence: int
    timestamp_s: float  # the driver's timestamp (CLOCK_MONOTONIC for nearly every driver), in seconds
    monotonic: bool  # the driver says its timestamps are CLOCK_MONOTONIC
    error: bool  # V4L2_BUF_FLAG_ERROR: the driver says the data may be corrupt


def _ioctl(fd: int, name: str, arg: Any) -> Any:
    """One ioctl, retried on EINTR (a signal during a blocking call is not an error)."""
    while True:
        try:
            return fcntl.ioctl(fd, abi.VIDIOC[name], arg)
        except InterruptedError:
            continue
        except OSError as e:
            if e.errno in (errno.ENODEV, errno.EIO, errno.ENXIO):
                raise DeviceGone(e.errno, f"VIDIOC_{name}: {e.strerror}") from e
            raise


class Device:
    """An open V4L2 capture device (see the module docstring); not thread-safe except ``requeue``."""

    def __init__(self, path: str) -> None:
        """Open ``path`` and check it can stream video capture.

        Raises:
            FileNotFoundError, PermissionError: the node is missing or not readable by this user.
            OSError: it is not a V4L2 device (ENOTTY), or cannot stream captured video (EINVAL with a message).
        """
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._maps: list[mmap.mmap] = []
        self._streaming = False
        try:
            cap = abi.v4l2_capability()
            _ioctl(self._fd, "QUERYCAP", cap)
            caps = cap.device_caps if cap.capabilities & abi.CAP_DEVICE_CAPS else cap.capabilities
            self.driver = bytes(cap.driver).rstrip(b"\0").decode(errors="replace")
            self.card = bytes(cap.card).rstrip(b"\0").decode(errors="replace")
            if not caps & abi.CAP_VIDEO_CAPTURE or not caps & abi.CAP_STREAMING:
                raise OSError(errno.EINVAL, f"{path} ({self.card}) is not a streaming video capture device")
        except BaseException:
            os.close(self._fd)
            raise

    def fileno(self) -> int:
        """The device's file descriptor (for select)."""
        return self._fd

    # ------------------------------------------------------------ enumeration

    def offers(self) -> list[Offer]:
        """Every single-planar capture format, size and frame interval the device enumerates."""
        out: list[Offer] = []
        for index in range(64):
            desc = abi.v4l2_fmtdesc(index=index, type=abi.BUF_TYPE_VIDEO_CAPTURE)
            if not self._enum("ENUM_FMT", desc):
                break
            name = abi.fourcc_name(desc.pixelformat)
            for width, height in self._sizes(desc.pixelformat):
                out.append(Offer(name, width, height, tuple(self._intervals(desc.pixelformat, width, height))))
        return out

    def _enum(self, name: str, arg: Any) -> bool:
        try:
            _ioctl(self._fd, name, arg)
        except DeviceGone:
            raise
        except OSError as e:
            if e.errno == errno.EINVAL:
                return False  # the end of the list
            raise
        return True

    def _sizes(self, pixelformat: int) -> list[tuple[int, int]]:
        sizes: list[tuple[int, int]] = []
        for index in range(256):
            e = abi.v4l2_frmsizeenum(index=index, pixel_format=pixelformat)
            if not self._enum("ENUM_FRAMESIZES", e):
                break
            if e.type == abi.FRMSIZE_TYPE_DISCRETE:
                sizes.append((e.discrete.width, e.discrete.height))
                continue
            sw = e.stepwise
            step_w, step_h = max(sw.step_width, 1), max(sw.step_height, 1)
            candidates = [(sw.min_width, sw.min_height), *_COMMON_SIZES, (sw.max_width, sw.max_height)]
            for w, h in candidates:
                ok = sw.min_width <= w <= sw.max_width and sw.min_height <= h <= sw.max_height
                if ok and (w - sw.min_width) % step_w == 0 and (h - sw.min_height) % step_h == 0:
                    sizes.append((w, h))
            break  # a stepwise or continuous enumeration has one entry
        return list(dict.fromkeys(sizes))

    def _intervals(self, pixelformat: int, width: int, height: int) -> list[Fraction]:
        found: list[Fraction] = []
        for index in range(64):
            e = abi.v4l2_frmivalenum(index=index, pixel_format=pixelformat, width=width, height=height)
            if not self._enum("ENUM_FRAMEINTERVALS", e):
                break
            if e.type == abi.FRMIVAL_TYPE_DISCRETE:
                if e.discrete.denominator:
                    found.append(Fraction(e.discrete.numerator, e.discrete.denominator))
                continue
            lo, hi = e.stepwise.min, e.stepwise.max
            if lo.denominator and hi.denominator:
                low, high = Fraction(lo.numerator, lo.denominator), Fraction(hi.numerator, hi.denominator)
                found += [Fraction(1, r) for r in _COMMON_RATES if low <= Fraction(1, r) <= high]
            break
        return found

    # ------------------------------------------------------------ streaming

    def start(self, choice: Choice, buffers: int) -> Format:
        """Set the format (and the rate), map ``buffers`` buffers, queue them and start streaming.

        Returns:
            The format the driver set, which ``Captured`` data follows (its stride may exceed the width).

        Raises:
            OSError: the driver refused (its errno), or set another format than the one asked for (EINVAL).
        """
        fmt = abi.v4l2_format(type=abi.BUF_TYPE_VIDEO_CAPTURE)
        fmt.fmt.pix.width, fmt.fmt.pix.height = choice.width, choice.height
        fmt.fmt.pix.pixelformat = abi.fourcc(choice.fourcc)
        fmt.fmt.pix.field = abi.FIELD_NONE
        _ioctl(self._fd, "S_FMT", fmt)
        got = Format(
            abi.fourcc_name(fmt.fmt.pix.pixelformat),
            fmt.fmt.pix.width,
            fmt.fmt.pix.height,
            fmt.fmt.pix.bytesperline,
            fmt.fmt.pix.sizeimage,
        )
        if (got.fourcc, got.width, got.height) != (choice.fourcc, choice.width, choice.height):
            raise OSError(
                errno.EINVAL,
                f"{self.path} set {got.fourcc} {got.width}x{got.height} when asked for "
                f"{choice.fourcc} {choice.width}x{choice.height}",
            )
        if choice.interval is not None:
            parm = abi.v4l2_streamparm(type=abi.BUF_TYPE_VIDEO_CAPTURE)
            _ioctl(self._fd, "G_PARM", parm)
            if parm.parm.capture.capability & abi.CAP_TIMEPERFRAME:
                parm.parm.capture.timeperframe.numerator = choice.interval.numerator
                parm.parm.capture.timeperframe.denominator = choice.interval.denominator
                _ioctl(self._fd, "S_PARM", parm)
        req = abi.v4l2_requestbuffers(count=buffers, type=abi.BUF_TYPE_VIDEO_CAPTURE, memory=abi.MEMORY_MMAP)
        _ioctl(self._fd, "REQBUFS", req)
        if req.count < 2:
            raise OSError(errno.ENOMEM, f"{self.path} granted {req.count} buffer(s); streaming needs 2")
        for index in range(req.count):
            buf = abi.v4l2_buffer(index=index, type=abi.BUF_TYPE_VIDEO_CAPTURE, memory=abi.MEMORY_MMAP)
            _ioctl(self._fd, "QUERYBUF", buf)
            self._maps.append(
                mmap.mmap(self._fd, buf.length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=buf.m.offset)
            )
        for index in range(req.count):
            self.requeue(index)
        _ioctl(self._fd, "STREAMON", ctypes.c_int(abi.BUF_TYPE_VIDEO_CAPTURE))
        self._streaming = True
        return got

    @property
    def buffer_count(self) -> int:
        """Buffers in the ring."""
        return len(self._maps)

    def dequeue(self, timeout: float) -> Captured | None:
        """The next filled buffer, or None if none came within ``timeout`` seconds.

        Raises:
            DeviceGone: the device was unplugged or reported an error event.
        """
        try:
            readable, _, broken = select.select([self._fd], [], [self._fd], timeout)
        except InterruptedError:
            return None
        if not readable and not broken:
            return None
        buf = abi.v4l2_buffer(type=abi.BUF_TYPE_VIDEO_CAPTURE, memory=abi.MEMORY_MMAP)
        try:
            _ioctl(self._fd, "DQBUF", buf)
        except BlockingIOError:
            return None  # woken without a filled buffer (another event)
        except OSError as e:
            if broken or e.errno == errno.EPIPE:
                raise DeviceGone(e.errno or errno.EIO, f"VIDIOC_DQBUF: {e.strerror}") from e
            raise
        used = min(buf.bytesused or buf.length, len(self._maps[buf.index]))
        return Captured(
            index=buf.index,
            data=memoryview(self._maps[buf.index])[:used],
            sequence=buf.sequence,
            timestamp_s=buf.timestamp.tv_sec + buf.timestamp.tv_usec / 1e6,
            monotonic=buf.flags & abi.BUF_FLAG_TIMESTAMP_MASK == abi.BUF_FLAG_TIMESTAMP_MONOTONIC,
            error=bool(buf.flags & abi.BUF_FLAG_ERROR),
        )

    def requeue(self, index: int) -> None:
        """Give buffer ``index`` back to the driver to fill again (safe from another thread)."""
        buf = abi.v4l2_buffer(index=index, type=abi.BUF_TYPE_VIDEO_CAPTURE, memory=abi.MEMORY_MMAP)
        _ioctl(self._fd, "QBUF", buf)

    def close(self) -> None:
        """Stop streaming and close; mapped buffers a frame still views stay mapped until that view is gone."""
        if self._fd < 0:
            return
        if self._streaming:
            with contextlib.suppress(OSError, DeviceGone):  # an unplugged device refuses it: nothing left to stop
                _ioctl(self._fd, "STREAMOFF", ctypes.c_int(abi.BUF_TYPE_VIDEO_CAPTURE))
        for m in self._maps:
            with contextlib.suppress(BufferError):
                m.close()  # refused while a frame's view exists: that view keeps the mapping alive
        self._maps.clear()
        os.close(self._fd)
        self._fd = -1
