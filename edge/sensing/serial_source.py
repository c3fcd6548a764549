"""A frame and reading source reading a serial sensor board (the I/O shell around ``serial_protocol``).

Invariants:

- This module only moves bytes: all parsing, validation and limits live in the sans-IO ``PacketDecoder`` and
  ``FrameAssembler``; it supplies them with bytes, a monotonic ``now`` and a wall-clock receive time.
- Bad input never raises: it is rejected and counted by reason in ``rejects``; each reason is logged on its first
  occurrence and then at most once per ``log_every_s`` seconds, so a noisy line cannot flood the log.
- Joining a board that is already sending costs the packet in flight (and the rest of its frame's chunks): those
  rejects, before the first accepted item and within ``join_s`` of opening, are counted like any other but logged
  at info, once per reason, so every start of the service does not put a warning in the journal. A board that
  never gets through (a wrong baud rate) is warned about once that window has passed.
- A port that fails or disappears (including the peer closing a pty) raises ``TransportError`` from ``items()``:
  a device failure, not bad input. A serial line has no end-of-stream, so ``items()`` ends cleanly only after
  ``close()``.
- ``close()`` is idempotent, may be called from another thread, and makes ``items()`` return within about
  ``read_timeout`` (sooner where pyserial can cancel a blocked read).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

import serial

from edge.errors import TransportError
from edge.log import Throttle
from edge.sensing.frames import Frame, Reading
from edge.sensing.serial_protocol import FrameAssembler, Hello, PacketDecoder, SerialLimits

__all__ = ["JOIN_S", "SerialSource"]

_log = logging.getLogger("edge.sensing.serial")

# Upper bound of one read call; larger backlogs are drained over several iterations.
_MAX_READ = 64 * 1024
# How long after opening a reject may still be the packet or frame the board was sending when the port opened. A
# frame at 1 fps on a slow box completes well within it; a line that never yields an item is warned about after it.
JOIN_S = 5.0


class SerialSource:
    """Frames and readings from a sensor board speaking the protocol of ``docs/serial-protocol.md``.

    Implements the service's ``Source`` protocol: ``items()``, ``close()`` and ``rejected``.
    """

    def __init__(
        self,
        port: str,
        *,
        baudrate: int = 921600,
        limits: SerialLimits | None = None,
        read_timeout: float = 0.1,
        log_every_s: float = 10.0,
        join_s: float = JOIN_S,
    ) -> None:
        """Open the port.

        Args:
            port: a device path (``/dev/ttyUSB0``, a pty slave) or a pyserial URL.
            baudrate: line speed.
            limits: protocol limits; defaults to ``SerialLimits()``.
            read_timeout: seconds one read may block; bounds how long ``close()`` can take to take effect.
            log_every_s: log each reject reason on its first occurrence, then at most once per this many
                seconds, with the count suppressed in between (``edge.log.Throttle``).
            join_s: how long after opening, before the first accepted item, rejects are taken for the packet the
                board was sending when the port opened (logged at info, counted all the same).

        Raises:
            TransportError: the port cannot be opened.
            ValueError: ``read_timeout`` or ``log_every_s`` is not positive.
        """
        if read_timeout <= 0:
            raise ValueError(f"read_timeout must be positive, got {read_timeout!r}")
        if not log_every_s > 0:
            raise ValueError(f"log_every_s must be positive, got {log_every_s!r}")
        limits = limits if limits is not None else SerialLimits()
        self._port_name = port
        self._decoder = PacketDecoder(limits)
        self._assembler = FrameAssembler(limits)
        self._reject_log = Throttle(log_every_s)
        self._counted: dict[str, int] = {}
        self._joined_logged: set[str] = set()
        self._synced = False  # an item has been accepted: every reject from now on is the line's fault
        self._lock = threading.Lock()
        self._closed = False
        self._in_read = False
        try:
            self._serial: Any = serial.serial_for_url(port, baudrate=baudrate, timeout=read_timeout)
        except (serial.SerialException, OSError, ValueError) as e:
            raise TransportError(f"cannot open serial port {port!r}: {e}") from e
        self._opened_at = time.monotonic()
        self._join_s = join_s

    @property
    def rejected(self) -> int:
        """Malformed packets and dropped partial frames so far (decoder and assembler together)."""
        return self._decoder.rejected + self._assembler.rejected

    @property
    def rejects(self) -> Mapping[str, int]:
        """Rejects by reason (a snapshot); the reason names are listed in ``serial_protocol``."""
        merged = dict(self._decoder.rejects)
        for reason, count in self._assembler.rejects.items():
            merged[reason] = merged.get(reason, 0) + count
        return MappingProxyType(merged)

    @property
    def hello(self) -> Hello | None:
        """The board's last HELLO, if one arrived."""
        return self._assembler.hello

    def items(self) -> Iterator[Frame | Reading]:
        """Yield frames and readings as they arrive, until ``close()``.

        Returns:
            An iterator of ``Frame`` (``seq`` counts accepted frames from 0) and ``Reading`` values.

        Raises:
            TransportError: the port failed or disappeared.
        """
        try:
            while not self._closed:
                data = self._read()
                # Taken before this read's packets can bring the line in step: a read may hold both the tail of the
                # packet in flight at the join and the first whole one.
                joining = not self._synced and time.monotonic() - self._opened_at < self._join_s
                now, wall = time.monotonic(), time.time()
                packets = self._decoder.feed(data) if data else []
                for packet in packets:
                    item = self._assembler.push(packet, now, received_at=wall)
                    if item is not None:
                        self._synced = True
                        yield item
                if not packets:
                    # A silent line must still age out partial frames whose board went quiet.
                    self._assembler.expire(now)
                self._log_rejects(joining)
        finally:
            self.close()

    def close(self) -> None:
        """Stop ``items()`` and release the port. Idempotent; safe from another thread.

        A read blocked in another thread is cancelled and that thread closes the port when the read returns;
        otherwise the port is closed here. The fd is never closed under a running ``select()``.
        """
        with self._lock:
            self._closed = True
            if self._in_read:
                cancel = getattr(self._serial, "cancel_read", None)
                if cancel is not None:
                    cancel()
            else:
                self._close_port()

    def _read(self) -> bytes:
        with self._lock:
            if self._closed:
                return b""
            self._in_read = True
        try:
            waiting = self._serial.in_waiting
            data: bytes = self._serial.read(min(max(1, waiting), _MAX_READ))
        except (serial.SerialException, OSError) as e:
            if self._closed:
                return b""
            raise TransportError(f"serial port {self._port_name!r} failed: {e}") from e
        finally:
            with self._lock:
                self._in_read = False
                if self._closed:
                    self._close_port()
        return data

    def _close_port(self) -> None:
        try:
            self._serial.close()
        except (serial.SerialException, OSError) as e:
            # Closing is best effort: the port may already be gone, which is what a close is for anyway.
            _log.debug("closing %s: %s", self._port_name, e)

    def _log_rejects(self, joining: bool) -> None:
        for reason, count in self.rejects.items():
            new = count - self._counted.get(reason, 0)
            if new <= 0:
                continue
            self._counted[reason] = count
            if joining:
                # Not through the throttle: the first reject after the join is still logged as a warning at once.
                if reason not in self._joined_logged:
                    self._joined_logged.add(reason)
                    _log.info("serial %s: rejected %s while joining the stream (%d so far)", self._port_name, reason,
                              count)  # fmt: skip
                continue
            if self._reject_log.allow(reason, n=new) is not None:
                _log.warning("serial %s: rejected %s (%d so far)", self._port_name, reason, count)
