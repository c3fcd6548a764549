"""SerialSource against the board emulator over a real pseudo-terminal.

Wiring: ``os.openpty()`` gives a master fd and a slave fd; only the slave has a device path (``os.ttyname``), and
pyserial needs a path, so ``SerialSource`` opens the slave path while the emulator subprocess inherits the master
fd (``--fd``, ``pass_fds``) and writes to it. This needs no relay thread or socat, and the pty line discipline is
the same one a USB serial adapter goes through (both ends are put in raw mode, so no byte is translated or echoed).
The test keeps its own copy of the master open while data flows, so the emulator exiting is not a hangup; the
hangup test closes every copy on purpose.

Peer closing: a serial line has no end-of-stream, so when the other end disappears (here: the last master fd is
closed, the kernel reports EIO on the slave) ``items()`` raises ``TransportError``; it ends cleanly only after
``close()``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import threading
import time
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from edge.errors import TransportError
from edge.sensing.frames import Frame, PixelFormat, Reading
from edge.sensing.serial_protocol import ReadingPacket, encode
from edge.sensing.serial_source import SerialSource

SIM = Path(__file__).resolve().parents[1] / "tools" / "sim" / "serial_sensor.py"


def load_sim() -> ModuleType:
    spec = importlib.util.spec_from_file_location("serial_sensor_sim", SIM)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


sim = load_sim()


@contextmanager
def pty_pair() -> Iterator[tuple[int, int, str]]:
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    try:
        yield master, slave, os.ttyname(slave)
    finally:
        for fd in (master, slave):
            with contextlib.suppress(OSError):  # the hangup test closes the master itself
                os.close(fd)


@dataclass
class Consumer:
    """Iterates a source in a thread, as the service does."""

    source: SerialSource
    items: list[Frame | Reading] = field(default_factory=list)
    error: BaseException | None = None
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for item in self.source.items():
                self.items.append(item)
        except BaseException as e:
            self.error = e

    @property
    def frames(self) -> list[Frame]:
        return [i for i in self.items if isinstance(i, Frame)]

    @property
    def readings(self) -> list[Reading]:
        return [i for i in self.items if isinstance(i, Reading)]

    def wait_for(self, frames: int, readings: int, timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (len(self.frames) < frames or len(self.readings) < readings):
            time.sleep(0.01)

    def stop(self) -> float:
        start = time.monotonic()
        self.source.close()
        self.thread.join(timeout=2.0)
        assert not self.thread.is_alive()
        return time.monotonic() - start


def run_sim(master: int, *args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(SIM), "--fd", str(master), *args],
        pass_fds=(master,),
        capture_output=True,
        timeout=10,
        check=True,
    )
    manifest: dict[str, Any] = json.loads(proc.stdout)
    return manifest


def test_frames_and_readings_arrive_intact() -> None:
    with pty_pair() as (master, _, path):
        source = SerialSource(path)
        consumer = Consumer(source)
        # Paced like a camera (60 fps) rather than as fast as possible: the receiver sees the line go idle.
        manifest = run_sim(
            master, *("--frames", "20", "--width", "64", "--height", "48", "--format", "YUYV", "--fps", "60")
        )
        consumer.wait_for(frames=20, readings=0)
        assert consumer.stop() < 0.5
    assert consumer.error is None
    expected = sim.synthetic_frames(20, 64, 48, PixelFormat.YUYV, 0)
    assert [f.seq for f in consumer.frames] == list(range(20))
    for frame, pixels, ts in zip(consumer.frames, expected, manifest["frame_timestamps_us"], strict=True):
        assert frame.pixel_format is PixelFormat.YUYV
        assert frame.data.shape == (48, 64, 2)
        np.testing.assert_array_equal(frame.data, pixels)
        assert frame.timestamp == ts / 1e6
    assert source.rejected == 0
    assert source.hello is not None and source.hello.board_id == sim.BOARD_ID


def test_readings_interleaved_with_frames_arrive_intact() -> None:
    with pty_pair() as (master, _, path):
        source = SerialSource(path)
        consumer = Consumer(source)
        manifest = run_sim(
            master, "--frames", "10", "--width", "32", "--height", "24", "--format", "NV12", "--readings", "5"
        )
        consumer.wait_for(frames=10, readings=50)
        consumer.stop()
    assert consumer.error is None
    expected = sim.synthetic_frames(10, 32, 24, PixelFormat.NV12, 0)
    assert len(consumer.frames) == 10
    for frame, pixels in zip(consumer.frames, expected, strict=True):
        np.testing.assert_array_equal(frame.data, pixels)
    sent = [(r["channel"], r["value"], r["timestamp_us"] / 1e6) for r in manifest["readings"]]
    assert [(r.channel, r.value, r.timestamp) for r in consumer.readings] == sent
    assert source.rejected == 0


def test_garbage_injection_good_frames_still_arrive_and_rejects_counted() -> None:
    with pty_pair() as (master, _, path):
        source = SerialSource(path)
        consumer = Consumer(source)
        manifest = run_sim(
            master,
            *("--frames", "30", "--width", "32", "--height", "24", "--format", "GRAY8"),
            *("--readings", "2", "--garbage", "0.1", "--chunk", "128", "--fps", "0", "--seed", "7"),
        )
        intact = manifest["frames_intact"]
        intact_readings = [r for r in manifest["readings"] if r["intact"]]
        consumer.wait_for(frames=len(intact), readings=len(intact_readings))
        consumer.stop()
    assert consumer.error is None
    assert manifest["damaged_packets"] > 0
    assert 0 < len(intact) < 30
    expected = sim.synthetic_frames(30, 32, 24, PixelFormat.GRAY8, 7)
    assert len(consumer.frames) == len(intact)
    for frame, index in zip(consumer.frames, intact, strict=True):
        np.testing.assert_array_equal(frame.data, expected[index])
    assert [f.seq for f in consumer.frames] == list(range(len(intact)))
    assert [(r.channel, r.value) for r in consumer.readings] == [(r["channel"], r["value"]) for r in intact_readings]
    assert source.rejected > 0
    assert source.rejected == sum(source.rejects.values())


def test_frames_from_npz(tmp_path: Path) -> None:
    frames = np.random.default_rng(1).integers(0, 256, (4, 12, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "frames.npz", frames=frames)
    with pty_pair() as (master, _, path):
        source = SerialSource(path)
        consumer = Consumer(source)
        run_sim(master, "--from-npz", str(tmp_path / "frames.npz"), "--format", "RGB888", "--fps", "0")
        consumer.wait_for(frames=4, readings=0)
        consumer.stop()
    assert len(consumer.frames) == 4
    for frame, pixels in zip(consumer.frames, frames, strict=True):
        assert frame.pixel_format is PixelFormat.RGB888
        np.testing.assert_array_equal(frame.data, pixels)


def test_close_returns_promptly_on_a_silent_line() -> None:
    with pty_pair() as (_, _, path):
        source = SerialSource(path, read_timeout=1.0)  # close must not wait for the read timeout
        consumer = Consumer(source)
        time.sleep(0.2)
        # Well under the 1 s read timeout, so the blocked read was cancelled, not waited out (slack for loaded CI).
        assert consumer.stop() < 0.5
        source.close()  # idempotent
        assert list(source.items()) == []
    assert consumer.error is None


def test_peer_closing_raises_transport_error() -> None:
    with pty_pair() as (master, _, path):
        source = SerialSource(path)
        consumer = Consumer(source)
        proc = subprocess.Popen(
            [sys.executable, str(SIM), "--fd", str(master), "--frames", "2", "--fps", "0"],
            pass_fds=(master,),
            stdout=subprocess.DEVNULL,
        )
        os.close(master)  # the emulator now holds the last master fd: its exit is the peer going away
        assert proc.wait(timeout=10) == 0
        consumer.thread.join(timeout=3.0)
        assert not consumer.thread.is_alive()
    assert isinstance(consumer.error, TransportError)
    assert isinstance(consumer.error.__cause__, OSError)


def test_missing_port_raises_transport_error(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="cannot open"):
        SerialSource(str(tmp_path / "ttyUSB9"))


def _reading(value: float) -> bytes:
    return encode(ReadingPacket(channel=1, timestamp_us=0, value=value))


def test_rejects_logged_without_flood(caplog: pytest.LogCaptureFixture) -> None:
    with pty_pair() as (master, _, path):
        source = SerialSource(path, log_every_s=60.0)
        consumer = Consumer(source)
        os.write(master, _reading(1.0))  # in step with the board: every reject from now on is the line's fault
        consumer.wait_for(frames=0, readings=1)
        with caplog.at_level(logging.WARNING, logger="edge.sensing.serial"):
            for _ in range(50):
                os.write(master, b"\x05\x01\x00")  # invalid COBS, one reject each
                time.sleep(0.001)
            deadline = time.monotonic() + 2.0
            while source.rejected < 50 and time.monotonic() < deadline:
                time.sleep(0.01)
            consumer.stop()
    assert source.rejects == {"cobs": 50}
    logged = [r for r in caplog.records if r.name == "edge.sensing.serial"]
    assert len(logged) == 1  # 50 rejects within a minute: the first one logged, the rest counted
    assert "cobs" in logged[0].getMessage()


def test_joining_a_board_mid_packet_is_counted_but_not_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    """The service opens the port while the board is half-way through a packet: that packet is lost and counted,
    but it is what joining a live line costs, so it is logged at info (a journal's warnings stay for real faults);
    the next reject, once in step, is a warning again."""
    packet = _reading(2.0)
    with pty_pair() as (master, _, path):
        source = SerialSource(path, log_every_s=60.0)
        consumer = Consumer(source)
        with caplog.at_level(logging.INFO, logger="edge.sensing.serial"):
            os.write(master, packet[len(packet) // 2 :] + _reading(3.0))  # the tail of one packet, then a whole one
            consumer.wait_for(frames=0, readings=1)
            joined = dict(source.rejects)
            os.write(master, b"\x05\x01\x00")  # invalid COBS, now that the line is in step
            deadline = time.monotonic() + 2.0
            while source.rejected < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            consumer.stop()
    assert [r.value for r in consumer.readings] == [3.0]
    assert sum(joined.values()) == 1, joined
    records = [r for r in caplog.records if r.name == "edge.sensing.serial"]
    assert [r.levelno for r in records] == [logging.INFO, logging.WARNING], [r.getMessage() for r in records]
    assert "joining" in records[0].getMessage() and "cobs" in records[1].getMessage()


def test_a_line_that_never_gets_through_is_warned_about_after_the_join_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A wrong baud rate looks like a join that never ends: once ``join_s`` has passed without an item, its rejects
    are warnings."""
    with pty_pair() as (master, _, path):
        source = SerialSource(path, log_every_s=60.0, join_s=0.3)
        consumer = Consumer(source)
        with caplog.at_level(logging.INFO, logger="edge.sensing.serial"):
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline and not any(
                r.levelno == logging.WARNING for r in caplog.records if r.name == "edge.sensing.serial"
            ):
                os.write(master, b"\x05\x01\x00")
                time.sleep(0.05)
            consumer.stop()
    levels = [r.levelno for r in caplog.records if r.name == "edge.sensing.serial"]
    assert levels[0] == logging.INFO and logging.WARNING in levels, levels
    assert consumer.readings == [] and source.rejects["cobs"] >= 2
