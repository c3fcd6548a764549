"""The sans-IO rules of a live source: the latest-frame slot, the reconnect backoff, pacing and stream timestamps.

Nothing here opens a device, a socket or a file, or reads a clock: times come in as arguments (``now``, ``arrival``,
both seconds), so each rule is tested by feeding it numbers. ``LatestSlot`` is the one piece that blocks (a
condition variable between two threads), and it never sleeps on its own.

Invariants:

- ``LatestSlot`` holds at most one item. ``put`` replaces an item nobody took, and counts it as dropped; ``take``
  returns the newest item with the number dropped since the previous ``take``. Every put item is taken exactly
  once or counted as dropped exactly once (``offered == taken + dropped + held``), so no loss is silent.
- ``Backoff`` waits ``first``, then twice as long after each failure, never more than ``ceiling``; ``reset`` (a
  connection that delivered) starts again from ``first``.
- ``Pacer`` never makes a consumer wait longer than the media's own spacing, and never lets it run ahead of it; a
  consumer that fell behind is not paid back with a burst (the schedule restarts from the late frame).
- ``StreamClock`` stamps a frame with its media time (pts) laid onto the wall clock of arrival: the network's jitter
  is removed, but a stamp is never later than the frame's arrival nor more than ``max_lag_s`` before it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Backoff", "LatestSlot", "Pacer", "StreamClock", "wait_ticking"]

T = TypeVar("T")


class LatestSlot(Generic[T]):
    """A one-item mailbox between a producer (a decode thread) and a consumer: the newest item wins.

    A consumer slower than the producer sees only the newest item each time it asks, so its latency stays one item
    instead of growing with a queue; what it never saw is counted.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: T | None = None
        self._full = False
        self._closed = False
        self._pending_drops = 0
        self.offered = 0
        self.taken = 0
        self.dropped = 0

    def put(self, item: T) -> None:
        """Offer ``item``; an item still waiting is replaced and counted as dropped. Ignored once closed."""
        with self._cond:
            if self._closed:
                return
            self.offered += 1
            if self._full:
                self.dropped += 1
                self._pending_drops += 1
            self._item = item
            self._full = True
            self._cond.notify()

    def take(self, timeout: float | None = None) -> tuple[T, int] | None:
        """Wait for an item and take it.

        Args:
            timeout: seconds to wait at most; None waits until an item comes or the slot is closed.

        Returns:
            The newest item and how many items were dropped since the previous ``take``; None when the slot is
            closed (even with an item in it: a closed source delivers nothing more) or the wait timed out.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._full or self._closed, timeout):
                return None
            if self._closed:
                return None
            item, dropped = self._item, self._pending_drops
            self._item, self._full, self._pending_drops = None, False, 0
            self.taken += 1
            assert item is not None  # _full implies an item
            return item, dropped

    def close(self) -> None:
        """Wake every waiting ``take`` (they return None) and refuse further items. Idempotent."""
        with self._cond:
            self._closed = True
            if self._full:
                # The item nobody will take now is a loss too: the counts still add up.
                self._full, self._item = False, None
                self.dropped += 1
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called."""
        return self._closed


def wait_ticking(stop: threading.Event, seconds: float, tick: Callable[[], None]) -> bool:
    """Wait ``seconds`` unless ``stop`` is set, calling ``tick`` after each second waited; True if stopped.

    A source backing off between reconnection attempts ticks to show the service's watchdog it is alive.
    """
    left = seconds
    while left > 0:
        step = min(left, 1.0)
        if stop.wait(step):
            return True
        left -= step
        tick()
    return stop.is_set()


class Backoff:
    """The waits between reconnection attempts: ``first`` seconds, doubling after each failure, up to ``ceiling``.

    Args:
        ceiling: the longest wait (``source.reconnect_max_s``).
        first: the first wait.

    Raises:
        ValueError: ``first`` or ``ceiling`` is not positive.
    """

    def __init__(self, ceiling: float, first: float = 0.5) -> None:
        if not (first > 0 and ceiling > 0):
            raise ValueError(f"backoff waits must be positive, got first={first!r} ceiling={ceiling!r}")
        self.first = min(first, ceiling)
        self.ceiling = ceiling
        self._next = self.first
        self.failures = 0

    def next_delay(self) -> float:
        """The wait before the next attempt, after one more failure."""
        delay = self._next
        self._next = min(self._next * 2, self.ceiling)
        self.failures += 1
        return delay

    def reset(self) -> None:
        """A connection worked: the next failure waits ``first`` again."""
        self._next = self.first
        self.failures = 0


class Pacer:
    """When the next frame is due, from its media time: a file replayed at its own rate, or a fixed frame rate.

    The first frame (and a frame whose media time went backwards: a new stream, a wrapped clock) anchors the schedule
    at ``now``; each later frame is due at the anchor plus its media time since the anchor's. A frame that is late
    by more than ``max_late_s`` re-anchors the schedule there instead of letting the following frames burst out to
    catch up; smaller lateness (a sleep that woke a little late) is absorbed, so the long-run rate stays exact.

    Args:
        max_late_s: lateness tolerated before the schedule restarts.
    """

    def __init__(self, max_late_s: float = 0.1) -> None:
        self._max_late = max_late_s
        self._anchor: tuple[float, float] | None = None  # (now, media time) of the anchor frame
        self._last_media = 0.0

    def delay(self, media_s: float, now: float) -> float:
        """Seconds to wait before handing out the frame with media time ``media_s`` (0 when it is due)."""
        anchor = self._anchor
        backwards = media_s < self._last_media
        self._last_media = media_s
        if anchor is None or backwards:
            self._anchor = (now, media_s)
            return 0.0
        due = anchor[0] + (media_s - anchor[1])
        if due < now - self._max_late:
            self._anchor = (now, media_s)
            return 0.0
        return max(0.0, due - now)


class StreamClock:
    """Wall-clock stamps for decoded frames from their presentation times.

    ``stamp`` lays the media time onto the wall clock at an anchor (the first frame's arrival), so frames that
    arrive in bursts keep their even spacing. It re-anchors at the arrival whenever the stamp would be later than the
    arrival (the sender's clock runs fast, a jump forward) or more than ``max_lag_s`` before it (a reconnect, a jump
    back, a clock that drifted slow). A frame without a media time is stamped with its arrival.

    Args:
        max_lag_s: how far a stamp may lie before the frame's arrival.
    """

    def __init__(self, max_lag_s: float = 1.0) -> None:
        self._max_lag = max_lag_s
        self._anchor: tuple[float, float] | None = None  # (arrival, media time)

    def reset(self) -> None:
        """A new connection: its media times start over."""
        self._anchor = None

    def stamp(self, media_s: float | None, arrival: float) -> float:
        """The frame's timestamp (seconds since the epoch).

        Args:
            media_s: the frame's presentation time in seconds, or None where the stream has none.
            arrival: when the decoded frame arrived (seconds since the epoch).
        """
        if media_s is None:
            return arrival
        anchor = self._anchor
        if anchor is not None:
            t = anchor[0] + (media_s - anchor[1])
            if arrival - self._max_lag <= t <= arrival:
                return t
        self._anchor = (arrival, media_s)
        return arrival
