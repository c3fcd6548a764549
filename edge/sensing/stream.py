"""Network streams (RTSP, HTTP) and video files through FFmpeg (PyAV): the I/O shell around ``edge.sensing.live``.

``source.kind = "stream"`` with ``source.url`` is a live camera (``StreamSource``); with ``source.path`` it is a
recording (``VideoFileSource``). Both deliver NV12 frames (``edge.sensing.frames``), whatever the stream's codec.

Invariants:

- FFmpeg does the I/O and the decoding, in its own threads (``thread_type = "AUTO"``) with the GIL released.
- Pixels are copied once between FFmpeg and the model input: the decoder's 4:2:0 planes go straight into one
  contiguous NV12 array (``to_nv12``), which the C preprocessing reads in place. Only frames in another layout or
  in full ("JPEG") range are first converted by FFmpeg's swscale (a second copy). A frame of odd width or height
  loses its last column or row (NV12 needs even sizes; cropping keeps the other pixels exact, scaling would not).
- A live stream: the newest frame wins (``LatestSlot``). One decode thread per source keeps decoding at the
  stream's pace; a consumer slower than the stream gets the newest frame each time it asks, and every frame it
  never saw is counted (``dropped``, and ``Frame.dropped_before`` on the next delivered frame). ``Frame.seq`` counts
  decoded frames, so ``seq`` gaps are exactly the drops. Latency stays about one frame plus the decoder's (and
  the pipeline's own input queue, up to ``pipeline.queue_size`` frames unless it drops the oldest).
- A live stream that cannot be opened, breaks or ends is reopened after a backoff (0.5 s doubling up to
  ``reconnect_max_s``), counted in ``reconnects`` and logged with its cause; it never ends ``items()`` on its own.
  Only ``close()`` does, at once: it wakes the consumer and the backoff wait. A decode thread blocked inside FFmpeg
  (a silent server) is abandoned after ``StreamLimits.join_s`` and ends by itself within the I/O timeouts.
- A video file: every frame in order, none dropped, as fast as the consumer takes them or paced by the file's
  timestamps (``realtime``); then ``items()`` returns. A missing file is a ``ConfigError`` naming ``source.path``,
  a file FFmpeg cannot decode an ``InputError`` naming it, both raised when the source is opened.
- No credential is logged or put into an error: URLs and FFmpeg's messages (which quote the URL) pass through
  ``edge.log.redact``. FFmpeg's own log stays off (PyAV's default), so nothing reaches stderr unredacted.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from edge.config import SourceConfig
from edge.errors import ConfigError, InputError, TransportError
from edge.log import Throttle, event, redact
from edge.sensing.frames import Frame, PixelFormat
from edge.sensing.live import Backoff, LatestSlot, Pacer, StreamClock, wait_ticking

try:
    import av
    from av.container import InputContainer
    from av.video.frame import VideoFrame
    from av.video.plane import VideoPlane
    from av.video.reformatter import VideoReformatter
    from av.video.stream import VideoStream
except ImportError as e:  # the camera extra is not installed
    raise ConfigError(
        "source.kind",
        "stream",
        "PyAV for streams and video files: install the camera extra, pip install 'n3-edge[camera]'",
    ) from e

__all__ = ["StreamLimits", "StreamSource", "VideoFileSource", "open_stream", "stream_options", "to_nv12"]

log = logging.getLogger("edge.sensing.stream")

U8 = npt.NDArray[np.uint8]

# Decoder layouts copied into NV12 without FFmpeg's swscale: the 4:2:0 planes are the NV12 samples already.
_DIRECT: Final = frozenset({"yuv420p", "nv12"})
_FULL_RANGE: Final = 2  # AVCOL_RANGE_JPEG: 0..255 samples, not the 16..235 video range the preprocessing expects
_VIDEO_RANGE: Final = 1  # AVCOL_RANGE_MPEG: the BT.601 limited range of docs/preprocessing.md
_RTSP: Final = ("rtsp://", "rtsps://")


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """How long FFmpeg may wait, and how long a reconnecting source waits (seconds).

    Attributes:
        open_timeout_s: connecting, the RTSP handshake and probing the stream until its first frames.
        read_timeout_s: the longest silence of an open stream before it counts as broken.
        first_backoff_s: the first wait before reopening a failed stream (doubling up to ``reconnect_max_s``).
        join_s: how long ``close()`` waits for the decode thread to finish.
    """

    open_timeout_s: float = 10.0
    read_timeout_s: float = 5.0
    first_backoff_s: float = 0.5
    join_s: float = 0.5


def stream_options(url: str, rtsp_transport: str, limits: StreamLimits) -> dict[str, str]:
    """FFmpeg's options to open ``url``: RTSP's transport and socket timeouts, so a dead peer raises, never hangs.

    PyAV's own timeouts (``av.open(timeout=...)``) bound every step as well; these make FFmpeg's sockets give up
    at the same time, with a clearer error than an interrupted call.

    Args:
        url: the stream's URL.
        rtsp_transport: ``tcp`` (RTP interleaved in the RTSP connection) or ``udp``.
        limits: the timeouts.
    """
    socket_us = str(round(limits.read_timeout_s * 1_000_000))
    if url.startswith(_RTSP):
        # Only the video: an audio track would cost bandwidth and a second RTP session for nothing.
        return {"rtsp_transport": rtsp_transport, "timeout": socket_us, "allowed_media_types": "video"}
    # HTTP: "timeout" is the socket's, "rw_timeout" every protocol's read/write timeout (both microseconds).
    return {"timeout": socket_us, "rw_timeout": socket_us}


def _plane(plane: VideoPlane, rows: int, cols: int) -> U8:
    """A view of the first ``rows`` x ``cols`` bytes of a plane (its padding left out); no copy."""
    return np.ndarray((rows, cols), dtype=np.uint8, buffer=memoryview(plane), strides=(plane.line_size, 1))


def to_nv12(frame: VideoFrame, reformatter: VideoReformatter | None = None) -> U8 | None:
    """One decoded frame as a contiguous NV12 array ``(H * 3 // 2, W)``, in one copy where the decoder allows.

    ``yuv420p`` and ``nv12`` frames in video range are copied (and, for ``yuv420p``, interleaved) straight into the
    new array: the samples are NV12's already, so this is exact and one pass. Anything else (4:2:2, 4:4:4, 10-bit,
    RGB, full range) is converted by FFmpeg's swscale first. Odd widths and heights drop their last column or row.

    Why not ``frame.to_ndarray(format="nv12")``: that is swscale into a new frame, then PyAV's concatenation of its
    planes (and a copy of each plane whose rows are padded): two or three passes. Measured on the dev VM at
    1920x1080: 11.7 ms for it against 1.7 ms here.

    Args:
        frame: a decoded video frame.
        reformatter: a reusable swscale context holder (one per stream, so the context is built once).

    Returns:
        The NV12 array, or None for a frame too small to hold one 2x2 block.
    """
    planes = frame.planes
    if (
        frame.format.name not in _DIRECT
        or frame.color_range == _FULL_RANGE
        or any(p.line_size <= 0 for p in planes)  # a bottom-up frame: let swscale turn it the right way up
    ):
        rf = reformatter if reformatter is not None else VideoReformatter()
        frame = rf.reformat(frame, format="nv12", dst_color_range=_VIDEO_RANGE)
        planes = frame.planes
    height, width = frame.height & ~1, frame.width & ~1
    if height == 0 or width == 0:
        return None
    out: U8 = np.empty((height * 3 // 2, width), dtype=np.uint8)
    out[:height] = _plane(planes[0], height, width)
    if frame.format.name == "nv12":
        out[height:] = _plane(planes[1], height // 2, width)
    else:
        uv = out[height:].reshape(height // 2, width // 2, 2)
        uv[..., 0] = _plane(planes[1], height // 2, width // 2)
        uv[..., 1] = _plane(planes[2], height // 2, width // 2)
    return out


def _cause(e: BaseException) -> str:
    """A failure's description for logs and errors: FFmpeg's message without the URL it quotes, redacted anyway."""
    if isinstance(e, av.error.FFmpegError):
        return redact(f"{type(e).__name__}: {e.strerror}")
    return redact(f"{type(e).__name__}: {e}")


def _video_stream(container: InputContainer) -> VideoStream:
    """The first video stream, set up to decode in FFmpeg's threads.

    Raises:
        InputError: the input has no video stream.
    """
    if not container.streams.video:
        raise InputError("no video stream")
    stream = container.streams.video[0]
    # Frame and slice threads inside FFmpeg, as many as it sees cores, decoding with the GIL released: a small
    # board's core alone may not keep up with 1080p H.264. Frame threads cost a frame or two of latency per thread,
    # which a live box accepts for the throughput (the latest-frame slot keeps it from growing further).
    stream.thread_type = "AUTO"
    return stream


class _Decoder:
    """Packets to checked frames; a packet the decoder refuses and a frame it marks corrupt are counted, not fatal."""

    def __init__(self, container: InputContainer, stream: VideoStream) -> None:
        self._container = container
        self._stream = stream
        self.bad = 0

    def frames(self) -> Iterator[VideoFrame]:
        """Decoded frames in presentation order. Read (I/O) errors propagate; decode errors are counted in ``bad``."""
        for packet in self._container.demux(self._stream):
            try:
                decoded = self._stream.decode(packet)
            except av.error.FFmpegError:
                # A damaged packet (lost RTP packets, a corrupt file region): the decoder resynchronises itself.
                self.bad += 1
                continue
            for frame in decoded:
                if frame.is_corrupt:  # decoded with concealed errors: its pixels are not the camera's
                    self.bad += 1
                    continue
                yield frame


@dataclass(frozen=True, slots=True)
class _Decoded:
    data: U8
    seq: int
    timestamp: float


class StreamSource:
    """A live network stream (RTSP, HTTP): the newest decoded frame wins, reconnecting after every failure.

    Implements the service's ``Source`` protocol. ``items()`` starts the decode thread on its first call.

    Args:
        url: an ``rtsp://``, ``rtsps://``, ``http://`` or ``https://`` URL (credentials in it are never logged).
        rtsp_transport: ``tcp`` or ``udp``.
        reconnect_max_s: the longest wait between reconnection attempts.
        fps: hand out at most this many frames a second (0: as fast as the consumer asks); the frames in between
            are dropped and counted, as for any consumer slower than the stream.
        count: stop after handing out this many frames (0: run until ``close()``).
        limits: timeouts and waits; ``StreamLimits()`` by default.
    """

    def __init__(
        self,
        url: str,
        *,
        rtsp_transport: str = "tcp",
        reconnect_max_s: float = 30.0,
        fps: float = 0.0,
        count: int = 0,
        limits: StreamLimits | None = None,
    ) -> None:
        self._url = url
        self._count = count
        self.shown_url = redact(url)
        self._limits = limits or StreamLimits()
        self._options = stream_options(url, rtsp_transport, self._limits)
        self._transport = rtsp_transport if url.startswith(_RTSP) else None
        self._backoff = Backoff(reconnect_max_s, self._limits.first_backoff_s)
        self._period = 1.0 / fps if fps > 0 else 0.0
        self._slot: LatestSlot[_Decoded] = LatestSlot()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._log_retry = Throttle(60.0, first=10)
        self.reconnects = 0
        self.decoded = 0
        # Monotonic time the source last showed it is busy reconnecting (an attempt, or a second of backoff): the
        # service's watchdog counts it as progress, so a stream that is down is waited for, not restarted. Not
        # moved by decoded frames: while connected, progress is the pipeline's own (records), so a stuck pipeline
        # still starves the watchdog.
        self.alive_at = time.monotonic()
        self._bad = 0  # of connections that ended; the current one's are in its decoder
        self._decoder: _Decoder | None = None

    @property
    def rejected(self) -> int:
        """Packets the decoder refused and frames it marked corrupt (lost packets, damaged data)."""
        decoder = self._decoder
        return self._bad + (decoder.bad if decoder is not None else 0)

    @property
    def dropped(self) -> int:
        """Decoded frames the consumer never saw because a newer one replaced them."""
        return self._slot.dropped

    def items(self) -> Iterator[Frame]:
        """Yield the newest decoded frame each time the consumer asks, until ``close()``.

        Yields:
            NV12 frames; ``seq`` counts decoded frames, ``dropped_before`` the frames replaced since the last one.
            Stops after ``count`` frames when that is set.

        Raises:
            TransportError: the decode thread failed on an unexpected error (a bug, not a broken stream).
        """
        self._start()
        pacer = Pacer() if self._period else None
        for n in itertools.count():
            if self._count and n >= self._count:
                return
            if pacer is not None:
                wait = pacer.delay(n * self._period, time.monotonic())
                if wait > 0 and self._stop.wait(wait):
                    return
            got = self._slot.take()
            if got is None:
                if self._failure is not None:
                    raise TransportError(f"stream {self.shown_url}: {_cause(self._failure)}") from self._failure
                return
            d, dropped = got
            yield Frame(d.data, PixelFormat.NV12, d.seq, d.timestamp, dropped_before=dropped)

    def close(self) -> None:
        """Stop: ``items()`` returns at once; the decode thread ends (waited for up to ``join_s``). Idempotent."""
        self._stop.set()
        self._slot.close()
        with self._lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(self._limits.join_s)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="edge-stream", daemon=True)
                self._thread.start()

    # -- the decode thread -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._connect_loop()
        except BaseException as e:
            # Not a broken stream (those are retried): a bug. The consumer must hear of it, not wait forever.
            self._failure = e
            event(log, logging.ERROR, "stream decode thread failed", url=self.shown_url, error=_cause(e))
        finally:
            self._slot.close()
            event(
                log,
                logging.INFO,
                "stream source closed",
                url=self.shown_url,
                decoded=self.decoded,
                delivered=self._slot.taken,
                dropped=self._slot.dropped,
                rejected=self.rejected,
                reconnects=self.reconnects,
            )

    def _connect_loop(self) -> None:
        clock = StreamClock()
        reformatter = VideoReformatter()
        attempt = 0
        while not self._stop.is_set():
            self.alive_at = time.monotonic()
            if attempt:
                self.reconnects += 1
            attempt += 1
            delivered = 0
            clock.reset()  # a new connection's timestamps start over
            began = time.monotonic()
            try:
                container = av.open(
                    self._url,
                    options=self._options,
                    timeout=(self._limits.open_timeout_s, self._limits.read_timeout_s),
                )
            except (av.error.FFmpegError, OSError) as e:
                what, cause = "stream unavailable", _cause(e)
            else:
                try:
                    delivered = self._pump(container, clock, reformatter)
                    what, cause = "stream ended", "end of stream"
                except (av.error.FFmpegError, OSError, InputError) as e:
                    what, cause = "stream broken", _cause(e)
                finally:
                    container.close()
            if self._stop.is_set():
                return
            if delivered:
                self._backoff.reset()  # it worked for a while: a fresh failure starts the backoff again
            delay = self._backoff.next_delay()
            suppressed = self._log_retry.allow(what)
            if suppressed is not None:
                event(
                    log,
                    logging.WARNING,
                    what,
                    url=self.shown_url,
                    cause=cause,
                    frames=delivered,
                    # FFmpeg reports a silent RTSP server as "invalid data": the time taken tells it was a timeout.
                    after_s=round(time.monotonic() - began, 3),
                    retry_in_s=round(delay, 3),
                    reconnects=self.reconnects,
                    suppressed=suppressed,
                )
            if wait_ticking(self._stop, delay, self._tick):
                return

    def _tick(self) -> None:
        self.alive_at = time.monotonic()

    def _pump(self, container: InputContainer, clock: StreamClock, reformatter: VideoReformatter) -> int:
        """Decode into the slot until the stream ends or ``close()``; returns the frames decoded."""
        stream = _video_stream(container)
        decoder = self._decoder = _Decoder(container, stream)
        event(
            log,
            logging.INFO,
            "stream connected",
            url=self.shown_url,
            transport=self._transport,
            codec=stream.codec_context.name,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            reconnects=self.reconnects,
        )
        n = 0
        try:
            for frame in decoder.frames():
                if self._stop.is_set():
                    break
                data = to_nv12(frame, reformatter)
                if data is None:
                    self._bad += 1
                    continue
                self._slot.put(_Decoded(data, self.decoded, clock.stamp(frame.time, time.time())))
                self.decoded += 1
                n += 1
        finally:
            self._bad += decoder.bad
            self._decoder = None
        return n


class VideoFileSource:
    """Every frame of a video file, in order; paced by the file's timestamps with ``realtime``.

    Implements the service's ``Source`` protocol. The file is opened, and its first frame decoded, here: a missing
    or undecodable file fails at start-up, not in the middle of a run.

    Args:
        path: the video file.
        realtime: hand frames out at the file's own rate (its timestamps); else as fast as the consumer takes them.
        fps: hand frames out at this fixed rate instead (0: off; it wins over ``realtime``).
        count: stop after this many frames (0: the whole file).

    Raises:
        ConfigError: the file does not exist or cannot be read (names ``source.path``).
        InputError: the file is not a video FFmpeg can decode, or has no decodable video frame.
    """

    def __init__(self, path: Path, *, realtime: bool = False, fps: float = 0.0, count: int = 0) -> None:
        self._path = path
        self._realtime = realtime
        self._period = 1.0 / fps if fps > 0 else 0.0
        self._count = count
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._iterating = False
        try:
            self._container = av.open(str(path))
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
            raise ConfigError("source.path", str(path), f"a readable video file ({e.strerror})") from e
        except (av.error.FFmpegError, OSError) as e:
            raise InputError(f"source.path {str(path)!r}: not a video file FFmpeg can decode ({_cause(e)})") from e
        try:
            stream = _video_stream(self._container)
            rate = stream.average_rate
            self._rate = float(rate) if rate else 0.0
            self._decoder = _Decoder(self._container, stream)
            self._frames = self._decoder.frames()
            first = next(self._frames, None)  # decoding one frame now: a file that cannot, fails at start-up
        except InputError as e:
            self._container.close()
            raise InputError(f"source.path {str(path)!r}: {e}") from e
        except (av.error.FFmpegError, OSError) as e:
            self._container.close()
            raise InputError(f"source.path {str(path)!r}: not a video file FFmpeg can decode ({_cause(e)})") from e
        if first is None:
            self._container.close()
            raise InputError(f"source.path {str(path)!r}: no decodable video frame")
        self._first: VideoFrame | None = first

    @property
    def rejected(self) -> int:
        """Packets the decoder refused and frames it marked corrupt."""
        return self._decoder.bad

    def items(self) -> Iterator[Frame]:
        """Yield the file's frames in order, then return (or at ``close()``).

        Raises:
            InputError: reading the file failed part-way.
        """
        with self._lock:
            if self._iterating or self._first is None or self._stop.is_set():
                return  # one pass only: a second call, or a closed source, yields nothing
            self._iterating = True
            first, self._first = self._first, None
        reformatter = VideoReformatter()
        clock = StreamClock()
        pacer = Pacer() if self._period or self._realtime else None
        seq = 0
        try:
            for frame in itertools.chain((first,), self._frames):
                if self._stop.is_set() or (self._count and seq >= self._count):
                    return
                data = to_nv12(frame, reformatter)
                if data is None:
                    self._decoder.bad += 1
                    continue
                media = frame.time
                if pacer is not None:
                    due = self._media_time(media, seq)
                    wait = pacer.delay(due, time.monotonic()) if due is not None else 0.0
                    if wait > 0 and self._stop.wait(wait):
                        return
                yield Frame(data, PixelFormat.NV12, seq, clock.stamp(media, time.time()))
                seq += 1
        except (av.error.FFmpegError, OSError) as e:
            raise InputError(f"source.path {str(self._path)!r}: read failed at frame {seq} ({_cause(e)})") from e
        finally:
            self._container.close()

    def _media_time(self, pts_s: float | None, seq: int) -> float | None:
        """When frame ``seq`` is due on the media clock: fixed ``fps``, else its timestamp, else the average rate."""
        if self._period:
            return seq * self._period
        if pts_s is not None:
            return pts_s
        return seq / self._rate if self._rate else None

    def close(self) -> None:
        """Stop ``items()`` at its next frame (or wait); releases the file if ``items()`` never ran. Idempotent."""
        self._stop.set()
        with self._lock:
            if not self._iterating:
                self._first = None
                self._container.close()


def open_stream(cfg: SourceConfig, limits: StreamLimits | None = None) -> StreamSource | VideoFileSource:
    """The source for ``source.kind = "stream"``: a live URL, or a video file in ``source.path``.

    Args:
        cfg: the validated source section (exactly one of ``url`` and ``path`` is set).
        limits: timeouts and waits of a live stream.

    Raises:
        ConfigError: the file does not exist or cannot be read.
        InputError: the file is not a decodable video.
    """
    if cfg.path is not None:
        return VideoFileSource(cfg.path, realtime=cfg.realtime, fps=cfg.fps, count=cfg.count)
    return StreamSource(
        cfg.url,
        rtsp_transport=cfg.rtsp_transport,
        reconnect_max_s=cfg.reconnect_max_s,
        fps=cfg.fps,
        count=cfg.count,
        limits=limits,
    )
