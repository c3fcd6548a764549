"""systemd integration: the sd_notify protocol and a watchdog that pings only while the pipeline makes progress.

systemd starts the service with ``NOTIFY_SOCKET`` (a datagram socket path, ``@`` for the abstract namespace) and,
when the unit sets ``WatchdogSec``, ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``). The service sends ``READY=1`` once
it runs, ``STATUS=...`` lines for ``systemctl status``, ``WATCHDOG=1`` at half the watchdog period, and
``STOPPING=1`` when it shuts down.

Invariants of the watchdog (``WatchdogPolicy``, sans-IO: it takes the clock as an argument):
- a ping is sent at most every ``interval`` seconds (half of ``WATCHDOG_USEC``);
- a ping is sent only if the pipeline emitted something since the previous ping, so a stuck source or a stuck
  inference stops the pings and systemd restarts the service after ``WatchdogSec``. A source slower than half the
  watchdog period therefore needs a longer ``WatchdogSec`` (docs/configuration.md).
Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Notifier", "WatchdogPolicy"]


@dataclass
class WatchdogPolicy:
    """When to ping: every ``interval`` seconds, and only after progress.

    Attributes:
        interval: seconds between pings (half of systemd's watchdog period).
        last_ping: monotonic time of the latest ping (starts at READY).
    """

    interval: float
    last_ping: float

    def due(self, now: float, last_progress: float) -> bool:
        """Whether to ping now; records the ping when it says yes.

        Args:
            now: the monotonic clock.
            last_progress: monotonic time of the pipeline's latest output.
        """
        if now - self.last_ping < self.interval or last_progress <= self.last_ping:
            return False
        self.last_ping = now
        return True


class Notifier:
    """Sends sd_notify messages to systemd (nothing at all when not started by systemd).

    Args:
        environ: the process environment (``os.environ``).
    """

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        path = environ.get("NOTIFY_SOCKET", "")
        # The abstract namespace is spelled with a leading "@" in the variable and a NUL byte on the wire.
        self._address = "\0" + path[1:] if path.startswith("@") else path
        self._sock: socket.socket | None = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())  # a watchdog meant for another process is not ours to feed
        self.watchdog_interval: float | None = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and mine else None

    @property
    def enabled(self) -> bool:
        """Whether systemd listens."""
        return self._sock is not None

    def send(self, **fields: object) -> None:
        """Send ``KEY=value`` lines (for example ``send(READY=1, STATUS="running")``); errors are ignored."""
        if self._sock is None:
            return
        message = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        # systemd gone or its socket full: the service must not die of its supervisor's state.
        with contextlib.suppress(OSError):
            self._sock.sendto(message, self._address)

    def close(self) -> None:
        """Close the socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
