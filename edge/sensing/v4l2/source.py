"""The V4L2 camera source (``source.kind = "v4l2"``): mmap capture into the preprocessing, reopened when unplugged.

Raw formats (NV12, YUYV, RGB3, BGR3, GREY) reach the preprocessing as a numpy view of the driver's buffer: no copy
of the pixels in Python. The frame's ``release`` gives the buffer back to the driver; the pipeline calls it as soon
as the preprocessing has read the pixels, or when it drops the frame. MJPG frames are decoded by libjpeg-turbo
(simplejpeg) into a new RGB image, and their buffer goes back at once.

Dropped frames are counted from the driver's sequence numbers (``SequenceTracker``) and reported on the next frame
(``Frame.dropped_before``). Timestamps are the driver's, moved from its monotonic clock to wall-clock time.

An unplugged camera, a driver error or a device that is not there yet does not end the service: the source reports
it, waits (0.5 s doubling up to ``source.reconnect_max_s``), opens the device again, negotiates again, and counts it
(``reopens``). Only a configuration the device can never satisfy (a format or size it does not offer) is an error.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from edge.errors import ConfigError
from edge.log import event
from edge.sensing.frames import Frame, Reading
from edge.sensing.live import Backoff, wait_ticking
from edge.sensing.pixels import PixelFormat
from edge.sensing.v4l2.device import Captured, Device, DeviceGone, Format
from edge.sensing.v4l2.negotiate import RAW_FORMATS, Choice, NegotiationError, choose, describe_offers
from edge.sensing.v4l2.sequence import SequenceTracker

__all__ = ["V4l2Source", "frame_array"]

log = logging.getLogger(__name__)

_FIRST_BACKOFF_S = 0.5
# How long to wait for the pipeline to give back lent buffers before reopening (it does within a frame's time).
_RETURN_TIMEOUT_S = 5.0
# A capture with no frame for this long is stalled: reopen it (a driver that stopped without an error).
_STALL_S = 10.0
# A node refused (EACCES) for this long is not udev catching up after a plug: the user lacks the group.
_DENIED_S = 15.0


def frame_array(data: memoryview, fmt: Format) -> npt.NDArray[np.uint8]:
    """The pixels of a raw capture buffer as an array in the preprocessing's layout, without copying.

    The row stride (``bytesperline``) may exceed the row; the view keeps it, as the preprocessing reads any stride.

    Raises:
        ValueError: the buffer is shorter than the format says (a truncated frame).
    """
    flat = np.frombuffer(data, dtype=np.uint8)
    w, h, stride = fmt.width, fmt.height, fmt.bytesperline
    if fmt.fourcc == "NV12":
        rows = h + h // 2
        need = stride * (rows - 1) + w
        if flat.size < need:
            raise ValueError(f"NV12 {w}x{h} needs {need} bytes, the buffer holds {flat.size}")
        return np.lib.stride_tricks.as_strided(flat, shape=(rows, w), strides=(stride, 1))
    channels = {"YUYV": 2, "RGB3": 3, "BGR3": 3, "GREY": 1}[fmt.fourcc]
    need = stride * (h - 1) + w * channels
    if flat.size < need:
        raise ValueError(f"{fmt.fourcc} {w}x{h} needs {need} bytes, the buffer holds {flat.size}")
    if channels == 1:
        return np.lib.stride_tricks.as_strided(flat, shape=(h, w), strides=(stride, 1))
    return np.lib.stride_tricks.as_strided(flat, shape=(h, w, channels), strides=(stride, channels, 1))


class V4l2Source:
    """Frames from a V4L2 camera (see the module docstring).

    Args:
        device: ``source.device``: the node or a stable ``/dev/v4l/by-id/`` path.
        model_size: the model input's (width, height), which negotiation covers when it can.
        capture_format, width, height, fps: ``source.capture_format``, ``width``, ``height``, ``fps``.
        buffers: ``source.buffers``, the mmap ring's size.
        reconnect_max_s: ``source.reconnect_max_s``, the backoff's ceiling.
        opener: how to open the device (tests and tools pass their own; the default is ``Device``).
    """

    def __init__(
        self,
        device: str,
        *,
        model_size: tuple[int, int] = (0, 0),
        capture_format: str = "auto",
        width: int = 0,
        height: int = 0,
        fps: float = 0.0,
        buffers: int = 4,
        reconnect_max_s: float = 30.0,
        opener: Callable[[str], Device] = Device,
    ) -> None:
        self.device = device
        self._model_size = model_size
        self._capture_format, self._width, self._height, self._fps = capture_format, width, height, fps
        self._buffers = buffers
        self._reconnect_max_s = reconnect_max_s
        self._opener = opener
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._returned = threading.Condition(self._lock)
        self._lent = 0
        self._generation = 0
        self.sequence = SequenceTracker()
        self.reopens = 0
        self.failures = 0
        self.corrupt = 0
        self.negotiated: Choice | None = None
        # Monotonic time this source last showed it works: a frame, or a reopen attempt or backoff tick while the
        # camera is away. The service's watchdog counts it as progress, so an unplugged camera is waited for.
        self.alive_at = time.monotonic()
        self._denied_since = 0.0
        self.format: Format | None = None
        if capture_format == "MJPG":
            _simplejpeg()  # a missing extra is a configuration error at start, not at the first frame

    @property
    def rejected(self) -> int:
        """Frames the driver flagged as corrupt (V4L2_BUF_FLAG_ERROR) and the source dropped."""
        return self.corrupt

    @property
    def dropped(self) -> int:
        """Frames the driver captured and could not deliver (sequence gaps), since the start."""
        return self.sequence.dropped

    def close(self) -> None:
        """Stop ``items()`` within its next poll (a fraction of a second)."""
        self._stop.set()

    # ------------------------------------------------------------ the capture loop

    def items(self) -> Iterator[Frame | Reading]:
        """Frames until ``close()``; reopens the device whenever it goes away."""
        backoff = Backoff(self._reconnect_max_s, _FIRST_BACKOFF_S)
        seq = 0
        while not self._stop.is_set():
            self.alive_at = time.monotonic()
            dev = self._open()
            if dev is None:
                if self._wait(backoff.next_delay()):
                    return
                continue
            lost: str | None = None
            try:
                for frame in self._stream(dev, seq):
                    seq = frame.seq + 1
                    backoff.reset()  # frames flow again: the next failure starts from the first step
                    yield frame
                    # Not kept while the next frame is awaited: its view of a mapped buffer would keep the device
                    # open after an unplug (the mapping holds the file), and the camera could never come back.
                    del frame
            except (DeviceGone, OSError) as e:  # unplugged, or any driver error: reopening is the remedy for both
                # Only its text: the exception's traceback holds _stream's frame, whose views of the mapped buffers
                # would keep the device open through the backoff, and a replugged camera (vivid's Disconnect, a USB
                # camera) cannot come back while any handle on the old one is open.
                lost = str(e)
            finally:
                self._retire(dev)
            delay = backoff.next_delay()
            if lost is not None:
                self.failures += 1
                event(log, logging.WARNING, "camera lost, reopening", device=self.device, error=lost,
                      failures=self.failures, retry_in_s=delay)  # fmt: skip
            if self._wait(delay):
                return
            self.reopens += 1

    def _wait(self, seconds: float) -> bool:
        """Back off for ``seconds`` (True: closed meanwhile), showing the watchdog the loop is alive each second."""
        return wait_ticking(self._stop, seconds, self._tick)

    def _tick(self) -> None:
        self.alive_at = time.monotonic()

    def _open(self) -> Device | None:
        """Open and start the device; None (logged) when it is not there or not usable yet."""
        try:
            dev = self._opener(self.device)
        except FileNotFoundError:
            event(log, logging.WARNING, "camera not present", device=self.device)
            return None
        except PermissionError as e:
            if e.errno == errno.EPERM:
                # systemd's device policy (DevicePolicy=closed, DeviceAllow=char-video4linux) resolves the device
                # class when the service starts: a camera driver loaded later is not in it. Exiting lets systemd
                # restart the service (Restart=on-failure) with the class allowed.
                raise ConfigError(
                    "source.device",
                    self.device,
                    "a device the service's device policy allows (Operation not permitted: the camera's driver was "
                    "loaded after the service started, so DeviceAllow=char-video4linux did not cover it; a restart "
                    "does; load the driver at boot, e.g. videodev in /etc/modules-load.d/, to avoid it)",
                ) from None
            # EACCES: right after a plug the node may still be root's for a moment, until udev gives it to group
            # video; a permission that stays refused is the configuration's.
            now = time.monotonic()
            self._denied_since = self._denied_since or now
            if now - self._denied_since > _DENIED_S:
                raise ConfigError(
                    "source.device",
                    self.device,
                    f"a device this user may open ({e.strerror}; add the service's user to group video)",
                ) from None
            event(log, logging.WARNING, "camera permission denied", device=self.device, error=e.strerror)
            return None
        except DeviceGone as e:
            event(log, logging.WARNING, "camera cannot be opened", device=self.device, error=str(e))
            return None
        except OSError as e:
            if e.errno in (errno.ENOTTY, errno.EINVAL):
                raise ConfigError("source.device", self.device, f"a V4L2 video capture device ({e})") from None
            event(log, logging.WARNING, "camera cannot be opened", device=self.device, error=str(e))
            return None
        try:
            offers = dev.offers()
            choice = choose(
                offers,
                capture_format=self._capture_format,
                width=self._width,
                height=self._height,
                fps=self._fps,
                model_size=self._model_size,
                device=self.device,
            )
            if choice.fourcc == "MJPG":
                _simplejpeg()
            self.format = dev.start(choice, self._buffers)
        except NegotiationError:
            dev.close()
            raise
        except DeviceGone as e:
            dev.close()
            event(log, logging.WARNING, "camera lost while starting", device=self.device, error=str(e))
            return None
        except OSError as e:
            dev.close()
            raise ConfigError(
                "source.capture_format", self._capture_format,
                f"a capture {self.device} accepts ({e}); it offers {describe_offers(offers)}",
            ) from None  # fmt: skip
        self.negotiated = choice
        self._denied_since = 0.0
        self.sequence.restart()
        event(
            log,
            logging.INFO,
            "camera streaming",
            device=self.device,
            driver=dev.driver,
            card=dev.card,
            format=self.format.fourcc,
            width=self.format.width,
            height=self.format.height,
            stride=self.format.bytesperline,
            fps=choice.fps,
            buffers=dev.buffer_count,
        )
        return dev

    def _stream(self, dev: Device, seq: int) -> Iterator[Frame]:
        fmt = self.format
        assert fmt is not None
        generation = self._generation
        pixel_format = RAW_FORMATS.get(fmt.fourcc, PixelFormat.RGB888)
        # The driver's monotonic timestamps become wall-clock time by the clocks' offset, taken per frame (cheap).
        last_frame = time.monotonic()
        while not self._stop.is_set():
            got = dev.dequeue(timeout=0.2)
            if got is None:
                with self._lock:
                    starved = self._lent >= dev.buffer_count  # every buffer is with the pipeline: its pace, not ours
                if starved:
                    # Not alive_at: a pipeline stuck with every buffer must still starve the watchdog.
                    last_frame = time.monotonic()
                elif time.monotonic() - last_frame > _STALL_S:
                    raise DeviceGone(errno.ETIMEDOUT, f"no frame for {_STALL_S:.0f} s")
                continue
            last_frame = self.alive_at = time.monotonic()
            lost = self.sequence.observe(got.sequence)
            if got.error:
                self.corrupt += 1
                dev.requeue(got.index)
                continue
            wall = _wall_time(got)
            if fmt.fourcc == "MJPG":
                try:
                    data = _decode_jpeg(got.data)
                except ValueError as e:
                    self.corrupt += 1
                    event(log, logging.WARNING, "camera frame not decodable", device=self.device, error=str(e))
                    continue
                finally:
                    dev.requeue(got.index)
                yield Frame(data, PixelFormat.RGB888, seq, wall, dropped_before=lost)
            else:
                try:
                    data = frame_array(got.data, fmt)
                except ValueError as e:
                    self.corrupt += 1
                    dev.requeue(got.index)
                    event(log, logging.WARNING, "camera frame truncated", device=self.device, error=str(e))
                    continue
                with self._lock:
                    self._lent += 1
                yield Frame(data, pixel_format, seq, wall, release=self._releaser(dev, got, generation),
                            dropped_before=lost)  # fmt: skip
            seq += 1

    def _releaser(self, dev: Device, got: Captured, generation: int) -> Callable[[], None]:
        done = False

        def release() -> None:
            nonlocal done
            with self._lock:
                if done:
                    return
                done = True
                self._lent -= 1
                current = generation == self._generation
                self._returned.notify_all()
            if current:
                # The device may have gone away meanwhile: the capture loop sees that itself and reopens.
                with contextlib.suppress(OSError, DeviceGone):
                    dev.requeue(got.index)

        return release

    def _retire(self, dev: Device) -> None:
        """Close a device once the pipeline has given back what it holds (bounded wait), so a reopen finds it free."""
        with self._lock:
            self._generation += 1  # late releases of this device's frames no longer requeue
            deadline = time.monotonic() + _RETURN_TIMEOUT_S
            while self._lent > 0 and (left := deadline - time.monotonic()) > 0:
                self._returned.wait(left)
        dev.close()


def _wall_time(got: Captured) -> float:
    if got.monotonic and got.timestamp_s > 0:
        return time.time() - (time.monotonic() - got.timestamp_s)
    return time.time()


def _simplejpeg() -> Any:
    try:
        import simplejpeg  # noqa: PLC0415 -- only MJPG cameras need it
    except ImportError:
        raise ConfigError(
            "source.capture_format",
            "MJPG",
            "a raw format, or the camera extra installed for MJPG (pip install 'n3-edge[camera]': libjpeg-turbo)",
        ) from None
    return simplejpeg


def _decode_jpeg(data: memoryview) -> npt.NDArray[np.uint8]:
    """A JPEG frame decoded to RGB by libjpeg-turbo; ValueError for one it cannot decode."""
    try:
        out: npt.NDArray[np.uint8] = _simplejpeg().decode_jpeg(data, colorspace="RGB")
    except (ValueError, RuntimeError, TypeError) as e:
        raise ValueError(f"not a decodable JPEG: {e}") from None
    return out
