"""The gateway's heartbeat in the store: how ``edge fleet status`` tells live data from a stale picture.

Everything ``edge fleet status`` shows (states, last seen, backlogs) is what a running gateway wrote; with no gateway
running it simply stops changing, which a table cannot show. So each gateway process writes a ``GatewayHeartbeat``
row every ``HEARTBEAT_INTERVAL_S`` seconds (and at once when it connects to or loses the broker) from a thread of
its own, with a store connection of its own (a store is not shared between threads), and a last one with
``stopped_at`` when it stops (its stop event, or the process's exit). ``edge fleet status`` calls the data stale
when no gateway that has not stopped beat within ``STALE_AFTER_S``.

A beat that fails (the database is down) is logged and retried at the next interval: the heartbeat never stops the
gateway, whose ingest loop has its own handling of an unavailable store.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Final

from edge.errors import EdgeError
from edge.fleet.store import GatewayHeartbeat, Store
from edge.log import event

__all__ = ["HEARTBEAT_INTERVAL_S", "STALE_AFTER_S", "HeartbeatWriter", "start_heartbeat"]

log = logging.getLogger("edge.fleet.heartbeat")

HEARTBEAT_INTERVAL_S: Final = 10.0
# Three missed beats: one slow beat (a busy database) is not yet an alarm.
STALE_AFTER_S: Final = 3 * HEARTBEAT_INTERVAL_S
_EXIT_WAIT_S: Final = 5.0  # for the last beat at exit: one write, unless the database is slow or down


class HeartbeatWriter:
    """Writes one gateway's heartbeats on a thread of its own until ``stop`` is set.

    Args:
        open_store: opens the store (called on the heartbeat thread, again after a failure).
        gateway_id: the gateway's identity.
        connected: says whether the gateway is connected to the broker now.
        stop: set when the gateway stops; the writer then records ``stopped_at`` and ends (at the process's exit
            at the latest, whatever ended it).
        interval_s: seconds between beats.
        clock: wall-clock seconds.
    """

    def __init__(
        self,
        open_store: Callable[[], Store],
        gateway_id: str,
        connected: Callable[[], bool],
        stop: threading.Event,
        *,
        interval_s: float = HEARTBEAT_INTERVAL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._open_store = open_store
        self._connected = connected
        self._stop = stop
        self._interval = interval_s
        self._clock = clock
        self._store: Store | None = None
        self._started = clock()
        self._id = gateway_id
        self._host = socket.gethostname()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        """Start beating (the first beat at once)."""
        # The thread is a daemon (it must never hold a failing gateway up), so the interpreter would end it wherever it
        # is; at exit it is stopped and waited for instead, so the last beat (``stopped_at``) is written.
        atexit.register(self._at_exit)
        self._thread.start()

    def _at_exit(self) -> None:
        self._stop.set()
        self._thread.join(_EXIT_WAIT_S)

    def beat(self, *, stopped: bool = False) -> bool:
        """Write one heartbeat now.

        Args:
            stopped: the gateway is stopping: record ``stopped_at``.

        Returns:
            Whether it was written (a failure is logged and the connection reopened next time).
        """
        now = self._clock()
        beat = GatewayHeartbeat(
            self._id, self._host, os.getpid(), self._started, now, self._connected(), now if stopped else None
        )
        try:
            if self._store is None:
                self._store = self._open_store()
            self._store.beat(beat)
        except (EdgeError, OSError) as e:
            event(log, logging.WARNING, "heartbeat not written", error=str(e)[:300])
            self._close()
            return False
        return True

    def _close(self) -> None:
        if self._store is not None:
            store, self._store = self._store, None
            store.close()

    def _run(self) -> None:
        try:
            last = time.monotonic()
            was = self._connected()
            self.beat()
            # Checked every second, so a (dis)connection shows at once rather than at the next interval.
            while not self._stop.wait(min(1.0, self._interval)):
                now, up = time.monotonic(), self._connected()
                if up != was or now - last >= self._interval:
                    self.beat()
                    last, was = now, up
            self.beat(stopped=True)
        finally:
            self._close()
            atexit.unregister(self._at_exit)


def start_heartbeat(
    open_store: Callable[[], Store], gateway_id: str, connected: Callable[[], bool], stop: threading.Event
) -> HeartbeatWriter:
    """Start a gateway's heartbeat thread; it ends when ``stop`` is set.

    Args:
        open_store: opens the gateway's store.
        gateway_id: the gateway's identity.
        connected: says whether the gateway is connected to the broker now.
        stop: the gateway's stop event.

    Returns:
        The running writer.
    """
    writer = HeartbeatWriter(open_store, gateway_id, connected, stop)
    writer.start()
    return writer
