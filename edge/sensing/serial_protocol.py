"""The serial sensor-board wire protocol, sans-IO: bytes in, packets, frames and readings out.

The format is specified in ``docs/serial-protocol.md``; this module is its only implementation (the board emulator in
``tools/sim`` encodes with it too). In short, on the wire every packet is COBS-encoded and followed by ``0x00``; a
decoded packet is::

    version/type (u8: version << 4 | type) | length (u16 LE) | payload (length bytes) | CRC-32 (u32 LE)

with the CRC-32 (zlib/IEEE) computed over version/type, length and payload.

Invariants:

- No I/O, no clock reads, no threads: callers pass bytes in and an explicit ``now`` for time-based rules.
- Nothing from the wire is trusted before it is checked. The CRC is verified before any header field is read; the
  length field is compared with the bytes actually received and never used to size an allocation; frame buffers
  grow only with chunk data actually received, so a declared frame size is never allocated up front.
- Memory is bounded by ``SerialLimits``: the decoder buffers at most ``max_encoded_bytes`` while looking for a
  delimiter (a delimiter-free stream is dropped and counted once, then skipped to the next ``0x00``), and the
  assembler holds at most ``max_partial_frames`` partial frames of at most ``max_frame_bytes`` each.
- Bad input never raises: every rejected packet, chunk or partial frame increments exactly one counter in
  ``rejects`` (by reason) and processing continues with the next packet. The one exception is ``SerialLimits``
  itself, which raises ``ConfigError`` for nonsensical limits (a local fault, not bad input).
"""

from __future__ import annotations

import enum
import math
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar

import numpy as np
from cobs import cobs

from edge.errors import ConfigError
from edge.sensing.frames import Frame, PixelFormat, Reading

__all__ = [
    "FORMAT_CODES",
    "PROTOCOL_VERSION",
    "FrameAssembler",
    "FrameBegin",
    "FrameChunk",
    "FrameEnd",
    "Hello",
    "Packet",
    "PacketDecoder",
    "PacketType",
    "ReadingPacket",
    "SerialLimits",
    "encode",
    "encode_packet",
    "frame_layout",
]

PROTOCOL_VERSION = 1

_HEADER = struct.Struct("<BH")  # version/type, payload length
_CRC = struct.Struct("<I")
_OVERHEAD = _HEADER.size + _CRC.size  # 7 bytes around every payload
_U16_MAX = 0xFFFF


class PacketType(enum.IntEnum):
    """The low nibble of the version/type byte."""

    HELLO = 0x1
    FRAME_BEGIN = 0x2
    FRAME_CHUNK = 0x3
    FRAME_END = 0x4
    READING = 0x5


#: Wire codes of the pixel formats (FRAME_BEGIN ``format_code``); 0 is reserved and never valid.
FORMAT_CODES: Mapping[PixelFormat, int] = MappingProxyType(
    {
        PixelFormat.RGB888: 1,
        PixelFormat.BGR888: 2,
        PixelFormat.GRAY8: 3,
        PixelFormat.YUYV: 4,
        PixelFormat.NV12: 5,
    }
)
_FORMATS_BY_CODE: Mapping[int, PixelFormat] = MappingProxyType({code: fmt for fmt, code in FORMAT_CODES.items()})


@dataclass(frozen=True, slots=True)
class SerialLimits:
    """Every limit the receiver enforces, in one place.

    Attributes:
        max_payload_bytes: largest payload accepted (the length field is u16, so at most 65535). The default fits
            a FRAME_CHUNK carrying 4096 data bytes (8 bytes of chunk header + 4096).
        max_frame_bytes: largest frame a FRAME_BEGIN may declare (default: 640x480 RGB888).
        max_partial_frames: frames that may be in assembly at once; a further FRAME_BEGIN evicts the oldest.
        partial_frame_timeout: seconds without a chunk after which a partial frame is dropped as stale.
    """

    max_payload_bytes: int = 8 + 4096
    max_frame_bytes: int = 640 * 480 * 3
    max_partial_frames: int = 2
    partial_frame_timeout: float = 1.0

    def __post_init__(self) -> None:
        # The smallest useful payload is FRAME_BEGIN's; anything below cannot carry the protocol at all.
        if not _FrameBeginStruct.size <= self.max_payload_bytes <= _U16_MAX:
            raise ConfigError(
                "max_payload_bytes", self.max_payload_bytes, f"an int in [{_FrameBeginStruct.size}, {_U16_MAX}]"
            )
        if self.max_frame_bytes < 1:
            raise ConfigError("max_frame_bytes", self.max_frame_bytes, "a positive int")
        if self.max_partial_frames < 1:
            raise ConfigError("max_partial_frames", self.max_partial_frames, "a positive int")
        if not (self.partial_frame_timeout > 0 and math.isfinite(self.partial_frame_timeout)):
            raise ConfigError("partial_frame_timeout", self.partial_frame_timeout, "a positive finite number")

    @property
    def max_packet_bytes(self) -> int:
        """Largest decoded packet: header, payload and CRC."""
        return self.max_payload_bytes + _OVERHEAD

    @property
    def max_encoded_bytes(self) -> int:
        """Largest COBS-encoded packet without its delimiter (COBS adds at most one byte per 254, plus one)."""
        return self.max_packet_bytes + self.max_packet_bytes // 254 + 1


_HelloStruct = struct.Struct("<IBBHH")  # board id, fw major, fw minor, fw patch, max chunk
_FrameBeginStruct = struct.Struct("<IHHBIQ")  # frame id, width, height, format code, total bytes, timestamp µs
_ChunkHeaderStruct = struct.Struct("<II")  # frame id, byte offset
_FrameEndStruct = struct.Struct("<II")  # frame id, CRC-32 of the frame bytes
_Reading32Struct = struct.Struct("<HQf")  # channel, timestamp µs, float32
_Reading64Struct = struct.Struct("<HQd")  # channel, timestamp µs, float64


@dataclass(frozen=True, slots=True)
class Hello:
    """HELLO: the board announces itself after power-up or reset.

    Attributes:
        board_id: the board's serial number.
        fw_major: firmware major version.
        fw_minor: firmware minor version.
        fw_patch: firmware patch version.
        max_chunk: the largest FRAME_CHUNK data the board will send, in bytes.
    """

    TYPE: ClassVar[PacketType] = PacketType.HELLO
    board_id: int
    fw_major: int
    fw_minor: int
    fw_patch: int
    max_chunk: int

    def payload(self) -> bytes:
        """Serialise the payload.

        Returns:
            The payload bytes.

        Raises:
            struct.error: a field is out of range for its wire type.
        """
        return _HelloStruct.pack(self.board_id, self.fw_major, self.fw_minor, self.fw_patch, self.max_chunk)


@dataclass(frozen=True, slots=True)
class FrameBegin:
    """FRAME_BEGIN: a frame of ``total_bytes`` follows in chunks.

    Attributes:
        frame_id: the board's frame number (wraps at 2**32).
        width: pixels per row.
        height: rows.
        format_code: the pixel format's wire code (``FORMAT_CODES``).
        total_bytes: the frame's size in bytes; must match width, height and format exactly.
        timestamp_us: capture time in microseconds since the Unix epoch, or 0 when the board has no clock.
    """

    TYPE: ClassVar[PacketType] = PacketType.FRAME_BEGIN
    frame_id: int
    width: int
    height: int
    format_code: int
    total_bytes: int
    timestamp_us: int

    def payload(self) -> bytes:
        """Serialise the payload.

        Returns:
            The payload bytes.

        Raises:
            struct.error: a field is out of range for its wire type.
        """
        return _FrameBeginStruct.pack(
            self.frame_id, self.width, self.height, self.format_code, self.total_bytes, self.timestamp_us
        )


@dataclass(frozen=True, slots=True)
class FrameChunk:
    """FRAME_CHUNK: ``data`` is the frame's bytes at ``offset``.

    Attributes:
        frame_id: the frame this chunk belongs to.
        offset: byte offset of ``data`` in the frame; chunks arrive in order, without gaps or overlaps.
        data: at least one byte of frame data.
    """

    TYPE: ClassVar[PacketType] = PacketType.FRAME_CHUNK
    frame_id: int
    offset: int
    data: bytes

    def payload(self) -> bytes:
        """Serialise the payload.

        Returns:
            The payload bytes.

        Raises:
            struct.error: a field is out of range for its wire type.
        """
        return _ChunkHeaderStruct.pack(self.frame_id, self.offset) + self.data


@dataclass(frozen=True, slots=True)
class FrameEnd:
    """FRAME_END: all chunks of the frame were sent.

    Attributes:
        frame_id: the frame that ends.
        crc32: CRC-32 (zlib/IEEE) of the whole frame's bytes.
    """

    TYPE: ClassVar[PacketType] = PacketType.FRAME_END
    frame_id: int
    crc32: int

    def payload(self) -> bytes:
        """Serialise the payload.

        Returns:
            The payload bytes.

        Raises:
            struct.error: a field is out of range for its wire type.
        """
        return _FrameEndStruct.pack(self.frame_id, self.crc32)


@dataclass(frozen=True, slots=True)
class ReadingPacket:
    """READING: one scalar sample.

    Attributes:
        channel: the sensor channel.
        timestamp_us: sample time in microseconds since the Unix epoch, or 0 when the board has no clock.
        value: the sample.
        double: whether the value travels as float64 (payload 18 bytes) rather than float32 (14 bytes).
    """

    TYPE: ClassVar[PacketType] = PacketType.READING
    channel: int
    timestamp_us: int
    value: float
    double: bool = True

    def payload(self) -> bytes:
        """Serialise the payload.

        Returns:
            The payload bytes.

        Raises:
            struct.error: a field is out of range for its wire type.
        """
        layout = _Reading64Struct if self.double else _Reading32Struct
        return layout.pack(self.channel, self.timestamp_us, self.value)


Packet = Hello | FrameBegin | FrameChunk | FrameEnd | ReadingPacket


def encode_packet(ptype: PacketType | int, payload: bytes) -> bytes:
    """Frame a payload for the wire: header, CRC-32, COBS, trailing ``0x00``.

    Args:
        ptype: the packet type (an int is accepted so tests can send types the protocol lacks).
        payload: the payload bytes.

    Returns:
        The bytes to write, ending with the ``0x00`` delimiter.

    Raises:
        ValueError: ``ptype`` does not fit the type nibble or ``payload`` is longer than the u16 length field.
    """
    if not 0 <= int(ptype) <= 0xF:
        raise ValueError(f"packet type {ptype!r} does not fit in 4 bits")
    if len(payload) > _U16_MAX:
        raise ValueError(f"payload of {len(payload)} bytes exceeds the u16 length field")
    body = _HEADER.pack(PROTOCOL_VERSION << 4 | int(ptype), len(payload)) + payload
    return bytes(cobs.encode(body + _CRC.pack(zlib.crc32(body)))) + b"\x00"


def encode(packet: Packet) -> bytes:
    """Encode a typed packet for the wire.

    Args:
        packet: the packet.

    Returns:
        The bytes to write, ending with the ``0x00`` delimiter.

    Raises:
        ValueError: a field is out of range for its wire type, or the payload is too long.
    """
    try:
        payload = packet.payload()
    except struct.error as e:
        raise ValueError(f"cannot encode {packet!r}: {e}") from e
    return encode_packet(packet.TYPE, payload)


class _Rejects:
    """Reject counters by reason, exposed read-only."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self.view: Mapping[str, int] = MappingProxyType(self._counts)

    def add(self, reason: str) -> None:
        self._counts[reason] = self._counts.get(reason, 0) + 1

    def total(self) -> int:
        return sum(self._counts.values())


def _parse_payload(ptype: PacketType, payload: bytes) -> Packet | None:
    """Parse a CRC-checked payload; ``None`` when its size does not fit the type."""
    n = len(payload)
    if ptype is PacketType.HELLO and n == _HelloStruct.size:
        return Hello(*_HelloStruct.unpack(payload))
    if ptype is PacketType.FRAME_BEGIN and n == _FrameBeginStruct.size:
        return FrameBegin(*_FrameBeginStruct.unpack(payload))
    if ptype is PacketType.FRAME_CHUNK and n > _ChunkHeaderStruct.size:
        frame_id, offset = _ChunkHeaderStruct.unpack_from(payload)
        return FrameChunk(frame_id, offset, payload[_ChunkHeaderStruct.size :])
    if ptype is PacketType.FRAME_END and n == _FrameEndStruct.size:
        return FrameEnd(*_FrameEndStruct.unpack(payload))
    if ptype is PacketType.READING and n == _Reading32Struct.size:
        channel, ts, value = _Reading32Struct.unpack(payload)
        return ReadingPacket(channel, ts, value, double=False)
    if ptype is PacketType.READING and n == _Reading64Struct.size:
        channel, ts, value = _Reading64Struct.unpack(payload)
        return ReadingPacket(channel, ts, value, double=True)
    return None


class PacketDecoder:
    """Turns a byte stream into packets, rejecting and counting anything malformed.

    Reject reasons (``rejects`` keys): ``too_large`` (no delimiter within ``max_encoded_bytes``, or a decoded packet
    over ``max_packet_bytes``), ``cobs`` (invalid COBS), ``short`` (fewer than 7 decoded bytes), ``crc``,
    ``version``, ``length`` (length field disagrees with the bytes received), ``type`` (unknown packet type),
    ``payload`` (payload size invalid for its type). Empty segments (consecutive ``0x00``) are idle fill, not rejects.
    """

    def __init__(self, limits: SerialLimits | None = None) -> None:
        """Create a decoder.

        Args:
            limits: the limits to enforce; defaults to ``SerialLimits()``.
        """
        self._limits = limits if limits is not None else SerialLimits()
        self._pending = bytearray()
        # After an overflow, bytes are skipped (not buffered) until the next delimiter resynchronises the stream.
        self._discarding = False
        self._rejects = _Rejects()

    @property
    def rejects(self) -> Mapping[str, int]:
        """Rejected packets by reason (a live read-only view)."""
        return self._rejects.view

    @property
    def rejected(self) -> int:
        """Total rejected packets."""
        return self._rejects.total()

    def feed(self, data: bytes) -> list[Packet]:
        """Consume bytes from the wire.

        Args:
            data: any number of bytes, split anywhere (the result does not depend on how the stream is split).

        Returns:
            The packets completed by ``data``, in stream order. Malformed packets are counted, not returned.
        """
        view = memoryview(data)
        out: list[Packet] = []
        start = 0
        while True:
            end = data.find(0, start)
            if end < 0:
                self._accumulate(view[start:])
                return out
            self._accumulate(view[start:end])
            if self._discarding:
                self._discarding = False
            elif self._pending:
                packet = self._decode(bytes(self._pending))
                if packet is not None:
                    out.append(packet)
            self._pending.clear()
            start = end + 1

    def _accumulate(self, part: memoryview) -> None:
        if self._discarding or not part:
            return
        if len(self._pending) + len(part) > self._limits.max_encoded_bytes:
            # Counted once per oversized segment, however long the garbage runs on.
            self._rejects.add("too_large")
            self._pending.clear()
            self._discarding = True
            return
        self._pending += part

    def _decode(self, encoded: bytes) -> Packet | None:
        try:
            raw = bytes(cobs.decode(encoded))
        except cobs.DecodeError:
            self._rejects.add("cobs")
            return None
        if len(raw) > self._limits.max_packet_bytes:
            self._rejects.add("too_large")
            return None
        if len(raw) < _OVERHEAD:
            self._rejects.add("short")
            return None
        # Integrity before structure: no header field is looked at until the CRC says the bytes are what was sent.
        body, (crc,) = raw[: -_CRC.size], _CRC.unpack_from(raw, len(raw) - _CRC.size)
        if zlib.crc32(body) != crc:
            self._rejects.add("crc")
            return None
        version_type, length = _HEADER.unpack_from(body)
        if version_type >> 4 != PROTOCOL_VERSION:
            self._rejects.add("version")
            return None
        payload = body[_HEADER.size :]
        if length != len(payload):
            self._rejects.add("length")
            return None
        try:
            ptype = PacketType(version_type & 0xF)
        except ValueError:
            self._rejects.add("type")
            return None
        packet = _parse_payload(ptype, payload)
        if packet is None:
            self._rejects.add("payload")
        return packet


def frame_layout(pixel_format: PixelFormat, width: int, height: int) -> tuple[tuple[int, ...], int] | None:
    """The array shape and byte size of a frame, following ``edge.sensing.frames``.

    Args:
        pixel_format: the frame's pixel format.
        width: pixels per row.
        height: rows.

    Returns:
        ``(shape, nbytes)``, or ``None`` when the dimensions are invalid for the format (zero, odd YUYV width,
        odd NV12 width or height).
    """
    if width <= 0 or height <= 0:
        return None
    if pixel_format in (PixelFormat.RGB888, PixelFormat.BGR888):
        return (height, width, 3), width * height * 3
    if pixel_format is PixelFormat.GRAY8:
        return (height, width), width * height
    if pixel_format is PixelFormat.YUYV:
        return ((height, width, 2), width * height * 2) if width % 2 == 0 else None
    if pixel_format is PixelFormat.NV12:
        if width % 2 or height % 2:
            return None
        return (height * 3 // 2, width), width * height * 3 // 2
    return None


@dataclass(slots=True)
class _Partial:
    begin: FrameBegin
    pixel_format: PixelFormat
    shape: tuple[int, ...]
    last_seen: float
    data: bytearray = field(default_factory=bytearray)


class FrameAssembler:
    """Reassembles frames from packets and converts readings, within ``SerialLimits``.

    Rules (see ``docs/serial-protocol.md``): a FRAME_BEGIN must name a known format, declare at most
    ``max_frame_bytes`` and exactly the byte size its dimensions imply; chunks of a frame arrive in order, each
    starting where the previous one ended, and never past the declared size; FRAME_END must follow the last chunk
    and carry the CRC-32 of the frame bytes. A chunk that breaks a rule drops its partial frame. A HELLO means the
    board restarted, so frames in assembly are dropped.

    Reject reasons (``rejects`` keys): ``format``, ``frame_too_large``, ``dims``, ``duplicate`` (a FRAME_BEGIN for a
    frame id in assembly: the old partial is dropped), ``too_many_partial`` (the oldest partial evicted), ``orphan``
    (CHUNK or END for no frame in assembly), ``overlap``, ``gap``, ``overrun``, ``incomplete`` (END before all
    bytes), ``frame_crc``, ``stale`` (no chunk for ``partial_frame_timeout``), ``reset`` (dropped by a HELLO),
    ``value`` (a non-finite reading).
    """

    def __init__(self, limits: SerialLimits | None = None) -> None:
        """Create an assembler.

        Args:
            limits: the limits to enforce; defaults to ``SerialLimits()``.
        """
        self._limits = limits if limits is not None else SerialLimits()
        self._partials: dict[int, _Partial] = {}  # insertion order = age, oldest first
        self._rejects = _Rejects()
        self._next_seq = 0
        self.hello: Hello | None = None
        """The board's last HELLO, if any."""

    @property
    def rejects(self) -> Mapping[str, int]:
        """Rejected packets and dropped partial frames by reason (a live read-only view)."""
        return self._rejects.view

    @property
    def rejected(self) -> int:
        """Total rejects."""
        return self._rejects.total()

    @property
    def partial_frames(self) -> int:
        """Frames currently in assembly."""
        return len(self._partials)

    def expire(self, now: float) -> None:
        """Drop partial frames that received nothing for ``partial_frame_timeout`` seconds.

        Args:
            now: the current time on a monotonic clock (seconds), the same clock as every ``push``.
        """
        timeout = self._limits.partial_frame_timeout
        for frame_id in [i for i, p in self._partials.items() if now - p.last_seen > timeout]:
            del self._partials[frame_id]
            self._rejects.add("stale")

    def push(self, packet: Packet, now: float, received_at: float | None = None) -> Frame | Reading | None:
        """Apply one packet.

        Args:
            packet: a packet from ``PacketDecoder``.
            now: the current time on a monotonic clock (seconds); drives partial-frame expiry.
            received_at: wall-clock receive time (seconds since the epoch), used as the timestamp of frames and
                readings whose board timestamp is 0; defaults to ``now``.

        Returns:
            A completed ``Frame``, a ``Reading``, or ``None`` (the packet was consumed or rejected).
        """
        self.expire(now)
        wall = now if received_at is None else received_at
        if isinstance(packet, FrameChunk):
            self._chunk(packet, now)
            return None
        if isinstance(packet, FrameEnd):
            return self._end(packet, wall)
        if isinstance(packet, FrameBegin):
            self._begin(packet, now)
            return None
        if isinstance(packet, ReadingPacket):
            if not math.isfinite(packet.value):
                self._rejects.add("value")
                return None
            return Reading(packet.channel, packet.value, _seconds(packet.timestamp_us, wall))
        self.hello = packet
        for _ in range(len(self._partials)):
            self._rejects.add("reset")
        self._partials.clear()
        return None

    def _begin(self, begin: FrameBegin, now: float) -> None:
        pixel_format = _FORMATS_BY_CODE.get(begin.format_code)
        if pixel_format is None:
            self._rejects.add("format")
            return
        if begin.total_bytes > self._limits.max_frame_bytes:
            self._rejects.add("frame_too_large")
            return
        layout = frame_layout(pixel_format, begin.width, begin.height)
        if layout is None or layout[1] != begin.total_bytes:
            self._rejects.add("dims")
            return
        if self._partials.pop(begin.frame_id, None) is not None:
            self._rejects.add("duplicate")
        while len(self._partials) >= self._limits.max_partial_frames:
            # Evict the oldest: a frame whose END was lost must not block every newer frame until it goes stale.
            del self._partials[next(iter(self._partials))]
            self._rejects.add("too_many_partial")
        self._partials[begin.frame_id] = _Partial(begin, pixel_format, layout[0], now)

    def _chunk(self, chunk: FrameChunk, now: float) -> None:
        partial = self._partials.get(chunk.frame_id)
        if partial is None:
            self._rejects.add("orphan")
            return
        received = len(partial.data)
        reason = None
        if chunk.offset < received:
            reason = "overlap"
        elif chunk.offset > received:
            reason = "gap"
        elif received + len(chunk.data) > partial.begin.total_bytes:
            reason = "overrun"
        if reason is not None:
            # The frame can no longer complete correctly; dropping it now frees its memory at once.
            del self._partials[chunk.frame_id]
            self._rejects.add(reason)
            return
        partial.data += chunk.data
        partial.last_seen = now

    def _end(self, end: FrameEnd, wall: float) -> Frame | None:
        partial = self._partials.pop(end.frame_id, None)
        if partial is None:
            self._rejects.add("orphan")
            return None
        if len(partial.data) != partial.begin.total_bytes:
            self._rejects.add("incomplete")
            return None
        if zlib.crc32(partial.data) != end.crc32:
            self._rejects.add("frame_crc")
            return None
        pixels = np.frombuffer(partial.data, dtype=np.uint8).reshape(partial.shape)
        frame = Frame(pixels, partial.pixel_format, self._next_seq, _seconds(partial.begin.timestamp_us, wall))
        self._next_seq += 1
        return frame


def _seconds(timestamp_us: int, fallback: float) -> float:
    """A board timestamp in seconds, or ``fallback`` when the board sent 0 (no clock)."""
    return timestamp_us / 1e6 if timestamp_us else fallback
