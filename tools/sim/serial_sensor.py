#!/usr/bin/env python3
"""Emulate a serial sensor board: HELLO, then chunked frames and readings, optionally with line damage.

The wire format comes from ``edge.sensing.serial_protocol`` (one implementation of the protocol, shared with the
receiver). Frames are deterministic for a given ``--seed`` (``synthetic_frames``) or come from ``--from-npz``.

When it finishes, it prints a JSON manifest on stdout saying which frames and readings went out intact, so a test
can compare exactly what the receiver must have accepted::

    {"frames_sent": 20, "frames_intact": [0, 1, 3, ...], "frame_timestamps_us": [...],
     "readings": [{"channel": 0, "value": 0.5, "timestamp_us": 0, "intact": true}, ...], "damaged_packets": 4}

Damage (``--garbage RATE``): before each packet, with probability RATE, either random noise bytes are inserted
(which spoil the packet that follows unless the noise happens to end with 0x00) or one bit of the packet is flipped.

Usage, with two linked ptys from socat (the receiver opens the other end)::

    socat -d -d pty,raw,echo=0 pty,raw,echo=0      # prints /dev/pts/A and /dev/pts/B
    python tools/sim/serial_sensor.py --port /dev/pts/A --frames 20 --width 64 --height 48 --format YUYV \\
        --readings 5 --garbage 0.1 --fps 30

Tests pass an inherited pty master file descriptor with ``--fd N`` instead of ``--port``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import serial

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing edge

from edge.sensing.frames import PixelFormat
from edge.sensing.serial_protocol import (
    FORMAT_CODES,
    FrameBegin,
    FrameChunk,
    FrameEnd,
    Hello,
    ReadingPacket,
    encode,
    frame_layout,
)

BOARD_ID = 0x5E45


def synthetic_frames(
    count: int, width: int, height: int, pixel_format: PixelFormat, seed: int
) -> list[npt.NDArray[np.uint8]]:
    """Deterministic test frames: a moving gradient plus seeded noise, shaped for ``pixel_format``.

    Args:
        count: number of frames.
        width: pixels per row.
        height: rows.
        pixel_format: the layout to produce.
        seed: the noise seed; equal arguments give equal frames.

    Returns:
        ``count`` uint8 arrays in the layout of ``edge.sensing.frames``.

    Raises:
        ValueError: the dimensions are invalid for the format.
    """
    layout = frame_layout(pixel_format, width, height)
    if layout is None:
        raise ValueError(f"{width}x{height} is not a valid {pixel_format} size")
    shape, nbytes = layout
    rng = np.random.default_rng(seed)
    ramp = np.arange(nbytes, dtype=np.uint32)
    frames = []
    for i in range(count):
        noise = rng.integers(0, 16, size=nbytes, dtype=np.uint32)
        frames.append(((ramp + 7 * i + noise) % 256).astype(np.uint8).reshape(shape))
    return frames


def reading_value(index: int, seed: int) -> float:
    """The deterministic value of the ``index``-th reading.

    Args:
        index: the reading's position in the stream.
        seed: the run's seed.

    Returns:
        A finite value.
    """
    return float(np.sin(0.1 * index + seed) * 100.0)


def frames_from_npz(path: Path, pixel_format: PixelFormat) -> tuple[list[npt.NDArray[np.uint8]], int, int]:
    """Load frames from an npz holding an array ``frames`` of shape (N, *frame shape).

    Args:
        path: the npz file.
        pixel_format: the layout the frames are in.

    Returns:
        The frames, their width and their height.

    Raises:
        ValueError: the array is not uint8 or its shape does not fit the format.
    """
    with np.load(path) as npz:
        stack = np.asarray(npz["frames"])
    if stack.dtype != np.uint8 or stack.ndim < 3:
        raise ValueError(f"{path}: 'frames' must be a uint8 array (N, H, W[, C]), got {stack.dtype} {stack.shape}")
    width = int(stack.shape[2])
    height = int(stack.shape[1]) * 2 // 3 if pixel_format is PixelFormat.NV12 else int(stack.shape[1])
    layout = frame_layout(pixel_format, width, height)
    if layout is None or layout[0] != stack.shape[1:]:
        raise ValueError(f"{path}: frames of shape {stack.shape[1:]} do not fit {pixel_format}")
    return [np.ascontiguousarray(f) for f in stack], width, height


@dataclass
class _Planned:
    """One packet to send, and what it belongs to (for the manifest)."""

    data: bytes
    frame: int | None = None
    reading: int | None = None


def plan(
    frames: list[npt.NDArray[np.uint8]],
    pixel_format: PixelFormat,
    readings_per_frame: int,
    chunk: int,
    seed: int,
    manifest: dict[str, object],
) -> Iterator[tuple[int, list[_Planned]]]:
    """The packets of a session, grouped per frame (HELLO first, in the group of frame 0).

    Args:
        frames: the frames to send.
        pixel_format: their layout.
        readings_per_frame: readings sent after each frame, on channels 0..3 in turn, alternating float32/float64.
        chunk: the largest chunk data size.
        seed: the run's seed (reading values).
        manifest: filled with the timestamps and readings as they are planned.

    Yields:
        ``(frame index, packets)``.
    """
    readings: list[dict[str, object]] = []
    timestamps: list[int] = []
    manifest["readings"] = readings
    manifest["frame_timestamps_us"] = timestamps
    reading_index = 0
    for index, pixels in enumerate(frames):
        group = [_Planned(encode(Hello(BOARD_ID, 1, 0, 0, chunk)))] if index == 0 else []
        data = pixels.tobytes()
        height = pixels.shape[0] * 2 // 3 if pixel_format is PixelFormat.NV12 else pixels.shape[0]
        ts = time.time_ns() // 1000
        timestamps.append(ts)
        begin = FrameBegin(index, pixels.shape[1], height, FORMAT_CODES[pixel_format], len(data), ts)
        group.append(_Planned(encode(begin), frame=index))
        for offset in range(0, len(data), chunk):
            group.append(_Planned(encode(FrameChunk(index, offset, data[offset : offset + chunk])), frame=index))
        group.append(_Planned(encode(FrameEnd(index, zlib.crc32(data))), frame=index))
        for _ in range(readings_per_frame):
            double = reading_index % 2 == 0
            value = reading_value(reading_index, seed)
            if not double:
                value = float(np.float32(value))  # what the receiver will see after the float32 round trip
            ts = time.time_ns() // 1000
            packet = ReadingPacket(reading_index % 4, ts, value, double=double)
            readings.append({"channel": packet.channel, "value": value, "timestamp_us": ts, "intact": True})
            group.append(_Planned(encode(packet), reading=reading_index))
            reading_index += 1
        yield index, group


def damage(data: bytes, rng: np.random.Generator) -> tuple[bytes, bool]:
    """Spoil a packet the way a noisy line does.

    Args:
        data: the encoded packet with its delimiter.
        rng: the damage generator.

    Returns:
        The bytes to send instead, and whether the packet will fail to decode.
    """
    if rng.random() < 0.5:
        noise = rng.integers(0, 256, size=int(rng.integers(1, 33)), dtype=np.uint8).tobytes()
        # Noise ending in 0x00 is resynchronised before the packet starts, so the packet survives.
        return noise + data, noise[-1] != 0
    spoiled = bytearray(data)
    pos = int(rng.integers(0, len(data) - 1))  # never the delimiter: the next packet must stay decodable
    spoiled[pos] ^= 1 << int(rng.integers(0, 8))
    return bytes(spoiled), True


def _fd_writer(fd: int) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    return write


def main(argv: list[str] | None = None) -> int:
    """Run the emulator.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--port", help="serial device or pty path to write to")
    target.add_argument("--fd", type=int, help="an inherited, open file descriptor to write to")
    parser.add_argument("--baudrate", type=int, default=921600)
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--height", type=int, default=48)
    parser.add_argument("--format", choices=[f.value for f in PixelFormat], default="YUYV")
    parser.add_argument("--readings", type=int, default=0, help="readings sent after each frame")
    parser.add_argument("--garbage", type=float, default=0.0, help="probability of damage before each packet")
    parser.add_argument("--fps", type=float, default=30.0, help="frame rate; 0 sends as fast as the line allows")
    parser.add_argument("--chunk", type=int, default=1024, help="largest chunk data size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from-npz", type=Path, help="send the frames of this npz's array 'frames' instead")
    args = parser.parse_args(argv)

    pixel_format = PixelFormat(args.format)
    if args.from_npz is not None:
        frames, _, _ = frames_from_npz(args.from_npz, pixel_format)
    else:
        frames = synthetic_frames(args.frames, args.width, args.height, pixel_format, args.seed)

    port = None
    if args.fd is not None:
        write = _fd_writer(args.fd)
    else:
        port = serial.serial_for_url(args.port, baudrate=args.baudrate)
        write = port.write

    # The damage generator is separate from the frame generator, so --garbage never changes the pixels.
    rng = np.random.default_rng(args.seed + 1)
    manifest: dict[str, object] = {"frames_sent": len(frames)}
    damaged_frames: set[int] = set()
    damaged_packets = 0
    start = time.monotonic()
    write(b"\x00")  # flush whatever the receiver buffered before we came up
    for index, group in plan(frames, pixel_format, args.readings, args.chunk, args.seed, manifest):
        if args.fps > 0:
            time.sleep(max(0.0, start + index / args.fps - time.monotonic()))
        for planned in group:
            data, spoiled = planned.data, False
            if args.garbage > 0 and rng.random() < args.garbage:
                data, spoiled = damage(data, rng)
            if spoiled:
                damaged_packets += 1
                if planned.frame is not None:
                    damaged_frames.add(planned.frame)
                if planned.reading is not None:
                    readings = manifest["readings"]
                    assert isinstance(readings, list)
                    readings[planned.reading]["intact"] = False
            write(data)
    if port is not None:
        port.flush()
        port.close()
    manifest["frames_intact"] = [i for i in range(len(frames)) if i not in damaged_frames]
    manifest["damaged_packets"] = damaged_packets
    json.dump(manifest, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
