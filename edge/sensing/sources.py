"""Frame sources: synthetic renders, an ``.npz`` file, a directory of ``.npy`` frames, or a serial sensor.

Every source follows the ``Source`` protocol: ``items()`` yields frames (and, for sensors, readings) until the input
ends or ``close()`` is called; it never raises on a bad input item (the pipeline's preprocessing rejects and counts
malformed frames), only on a failed device.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt

from edge.arrays import ArrayLimits, NpzArchive, read_npy
from edge.config import SourceConfig
from edge.errors import ConfigError, InputError
from edge.sensing.frames import Frame, PixelFormat, Reading

__all__ = [
    "FRAMES_FILE_LIMITS",
    "FRAME_FILE_LIMITS",
    "MAX_FRAMES_FILE_BYTES",
    "MAX_FRAME_FILE_BYTES",
    "ArraySource",
    "DirectorySource",
    "Source",
    "SyntheticSource",
    "open_source",
]

Item = Frame | Reading

# An ``.npz`` source is held in memory whole (every frame, for looping): its file and its inflated arrays are bounded
# well below a box's RAM. A recording larger than this is a directory of ``.npy`` frames, read one at a time.
MAX_FRAMES_FILE_BYTES: Final = 512 * 2**20
# One ``.npy`` frame of a directory source: an 8K (7680 x 4320) RGB frame is 95 MiB.
MAX_FRAME_FILE_BYTES: Final = 128 * 2**20
FRAMES_FILE_LIMITS: Final = ArrayLimits(
    max_file_bytes=MAX_FRAMES_FILE_BYTES,
    max_array_bytes=MAX_FRAMES_FILE_BYTES,
    max_total_bytes=MAX_FRAMES_FILE_BYTES,
    max_arrays=16,
)
FRAME_FILE_LIMITS: Final = ArrayLimits(
    max_file_bytes=MAX_FRAME_FILE_BYTES, max_array_bytes=MAX_FRAME_FILE_BYTES, max_total_bytes=MAX_FRAME_FILE_BYTES
)


class Source(Protocol):
    """What the pipeline reads from."""

    def items(self) -> Iterator[Item]:
        """Yield frames and readings until exhausted or closed."""
        ...

    def close(self) -> None:
        """Stop ``items()`` promptly; idempotent."""
        ...

    @property
    def rejected(self) -> int:
        """Malformed inputs this source itself rejected so far."""
        ...


class _Paced:
    """Shared behaviour: a stop event and optional pacing to a frame rate."""

    def __init__(self, fps: float) -> None:
        self._stop = threading.Event()
        self._period = 1.0 / fps if fps > 0 else 0.0
        self._next = 0.0

    def close(self) -> None:
        """Stop producing; ``items()`` returns at its next step."""
        self._stop.set()

    @property
    def rejected(self) -> int:
        """In-memory and file sources reject nothing themselves (preprocessing does)."""
        return 0

    def _wait_turn(self) -> bool:
        """Sleep until the next frame is due; False once closed."""
        if self._period:
            now = time.monotonic()
            self._next = max(self._next + self._period, now) if self._next else now
            if self._next > now and self._stop.wait(self._next - now):
                return False
        return not self._stop.is_set()


class ArraySource(_Paced):
    """Frames from arrays in memory (an ``.npz`` file's contents, or a benchmark's frames).

    Args:
        frames: the frames, in the layout of ``pixel_format``.
        pixel_format: how the frames are encoded.
        labels: ground-truth classes, one per frame, or None.
        count: frames to produce; 0 means each frame once (or forever with ``loop``).
        loop: start again after the last frame.
        fps: pace to this rate; 0 is as fast as the pipeline takes them.
    """

    def __init__(
        self,
        frames: list[npt.NDArray[np.uint8]] | npt.NDArray[np.uint8],
        pixel_format: PixelFormat,
        *,
        labels: list[int] | None = None,
        count: int = 0,
        loop: bool = False,
        fps: float = 0.0,
    ) -> None:
        super().__init__(fps)
        if len(frames) == 0:
            raise InputError("the source has no frames")
        if labels is not None and len(labels) != len(frames):
            raise InputError(f"{len(labels)} labels for {len(frames)} frames")
        self._frames = frames
        self._labels = labels
        self._format = pixel_format
        self._count = count
        self._loop = loop

    def items(self) -> Iterator[Item]:
        """Yield the frames in order, each stamped with its sequence number and the time it was handed out."""
        n = len(self._frames)
        limit = self._count or (0 if self._loop else n)
        seq = 0
        while (limit == 0 or seq < limit) and self._wait_turn():
            i = seq % n
            label = self._labels[i] if self._labels is not None else None
            yield Frame(self._frames[i], self._format, seq, time.time(), label)
            seq += 1


class SyntheticSource(ArraySource):
    """Camera-like frames of the held-out digits, rendered once and then cycled (rendering is not the workload).

    Args:
        pixel_format: the format to deliver the renders in.
        count: frames to produce; 0 is unlimited.
        fps: pace to this rate; 0 is as fast as the pipeline takes them.
        cycle: how many distinct renders to keep in memory.
    """

    def __init__(self, pixel_format: PixelFormat, *, count: int = 0, fps: float = 0.0, cycle: int = 512) -> None:
        from edge.sensing.synthetic import render_test_frames  # noqa: PLC0415 (only this source needs the renderer)

        # A bounded run renders each frame it shows (up to ``cycle``); an endless one cycles a small set.
        n = min(cycle, count) if count else 64
        frames: list[npt.NDArray[np.uint8]] = []
        labels: list[int] = []
        for frame, label in render_test_frames(pixel_format, count=n):
            frame.setflags(write=False)  # shared by every lap of the cycle: nobody may change it
            frames.append(frame)
            labels.append(label)
        super().__init__(frames, pixel_format, labels=labels, count=count, loop=True, fps=fps)


def _load_npz(path: Path) -> tuple[npt.NDArray[np.uint8], list[int] | None]:
    """The frames (and labels) of an ``.npz`` source, every declared size checked first (``FRAMES_FILE_LIMITS``)."""
    try:
        with NpzArchive(path, FRAMES_FILE_LIMITS) as data:
            if "frames" not in data.names:
                raise InputError(f"{path}: no array named 'frames'")
            frames = data.read("frames")
            raw_labels = data.read("labels") if "labels" in data.names else None
    except OSError as e:
        raise InputError(f"{path}: not a readable .npz file ({e.strerror or e})") from e
    try:
        labels = None if raw_labels is None else [int(x) for x in raw_labels]
    except (TypeError, ValueError) as e:
        raise InputError(f"{path}: 'labels' must be one integer per frame ({e})") from e
    return frames, labels


class DirectorySource(_Paced):
    """Frames from the ``.npy`` files of a directory, in name order, loaded one at a time."""

    def __init__(self, directory: Path, pixel_format: PixelFormat, *, loop: bool = False, fps: float = 0.0) -> None:
        super().__init__(fps)
        self._files = sorted(directory.glob("*.npy"))
        if not self._files:
            raise ConfigError("source.path", str(directory), "a directory with .npy frames")
        self._format = pixel_format
        self._loop = loop
        self._bad = 0

    @property
    def rejected(self) -> int:
        """Files that could not be read as arrays."""
        return self._bad

    def items(self) -> Iterator[Item]:
        """Yield one frame per readable file; unreadable files are counted and skipped."""
        seq = 0
        while True:
            for f in self._files:
                if not self._wait_turn():
                    return
                try:
                    data = read_npy(f, FRAME_FILE_LIMITS)
                except (OSError, InputError):
                    # A malformed, oversized or pickled file is one bad input, counted like a bad frame.
                    self._bad += 1
                    continue
                yield Frame(data, self._format, seq, time.time())
                seq += 1
            if not self._loop:
                return


def open_source(cfg: SourceConfig, *, model_size: tuple[int, int] = (0, 0)) -> Source:
    """Build the source the configuration names.

    ``model_size`` is the model input's (width, height): a camera negotiates a capture size that covers it.

    Raises:
        ConfigError: the source's path or port is unusable.
        InputError: the source's file is malformed.
    """
    if cfg.kind == "synthetic":
        return SyntheticSource(cfg.pixel_format, count=cfg.count, fps=cfg.fps)
    if cfg.kind == "npz":
        assert cfg.path is not None  # parse_config guarantees it
        frames, labels = _load_npz(cfg.path)
        return ArraySource(frames, cfg.pixel_format, labels=labels, count=cfg.count, loop=cfg.loop, fps=cfg.fps)
    if cfg.kind == "directory":
        assert cfg.path is not None
        return DirectorySource(cfg.path, cfg.pixel_format, loop=cfg.loop, fps=cfg.fps)
    if cfg.kind == "stream":
        # PyAV (FFmpeg) only when a stream or video file is configured; without it the import is a ConfigError.
        from edge.sensing.stream import open_stream  # noqa: PLC0415

        return open_stream(cfg)
    if cfg.kind == "v4l2":
        from edge.sensing.v4l2.source import V4l2Source  # noqa: PLC0415

        return V4l2Source(
            cfg.device,
            model_size=model_size,
            capture_format=cfg.capture_format,
            width=cfg.width,
            height=cfg.height,
            fps=cfg.fps,
            buffers=cfg.buffers,
            reconnect_max_s=cfg.reconnect_max_s,
        )
    from edge.sensing.serial_source import SerialSource  # noqa: PLC0415 (pyserial only when a sensor is configured)

    return SerialSource(cfg.port, baudrate=cfg.baudrate)
