"""The publisher's window, sans-IO: which envelope to publish next, what may be deleted, when to restart or retry.

``PublishWindow`` holds no thread, reads no clock and does no I/O: the driver (``edge.telemetry.publisher``) reads
the outbox, calls the transport and passes every event in, with the time ``now`` where a decision depends on it.
Every method is called from one thread (the publisher's); ``in_flight``, ``queued``, ``refill_at`` and the counters
may be read from others (each read is exact, a set of them approximately simultaneous).

Invariants:
- Envelopes are published in counter order: ``offer`` accepts only counters above everything read since the last
  restart, ``next`` returns the oldest one read and not yet published, and ``published`` accepts only that one.
- At most ``capacity`` envelopes of the current epoch are in flight, ``capacity = max(1, min(window,
  receive_maximum))``: ``next`` returns None while the window is full.
- A counter is handed out for deletion (``Resolution.delete``) only for an ``ACKED`` outcome (a PUBACK with a success
  reason code other than "No matching subscribers"), and at most once while a delivery of it may still resolve or
  its deletion is not committed (``committed``): an envelope published in two epochs and acknowledged twice is
  deleted once. Nothing else deletes, so a refusal, a lost connection or a crash causes a republication, never a
  loss.
- An acknowledgement counts even from an epoch since forgotten (the broker has the envelope). Any other outcome of
  the current epoch makes the window stale: the next ``decide`` answers ``RESTART``, and ``restart`` forgets
  everything in flight and queued, starts a new epoch and rewinds the cursor to 0, so the driver reads the outbox
  again from its oldest unacknowledged envelope and resends all of it in counter order. Outcomes of older epochs
  neither steer the window nor restart it again.
- "No matching subscribers" (0x10) is not a delivery (nobody received the envelope): it is handled like a refusal.
- A refusal of the current epoch starts a pause of ``refusal_pause`` seconds unless one is running: ``decide`` answers
  ``WAIT`` until ``now`` reaches its end, and ``Resolution.pause`` is true once per pause (one log line, not one per
  envelope of a window refused at once).
- A lost connection (``decide`` with ``connected=False``) restarts the window if it holds anything.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from edge.mqtt import NO_MATCHING_SUBSCRIBERS

__all__ = ["READ_MIN", "Action", "Outcome", "PublishWindow", "Resolution"]

# The least the driver reads from the outbox at once, even for a small window: one query per few envelopes would
# cost more than the envelopes it reads.
READ_MIN: Final = 256


class Outcome(enum.Enum):
    """How one publication resolved."""

    ACKED = "acked"  # a PUBACK with a success reason code: the broker has it and a subscriber got it
    UNHEARD = "unheard"  # a PUBACK with "No matching subscribers": the broker has it, nobody received it
    REFUSED = "refused"  # a PUBACK with a failure reason code ("Not authorized", "Quota exceeded", ...)
    LOST = "lost"  # the connection ended first: it may or may not have reached the broker

    @classmethod
    def of(cls, *, ok: bool, reason_code: int | None, lost: bool) -> Outcome:
        """Classify a resolved delivery (``edge.mqtt.Delivery``'s ``ok``, ``reason_code`` and ``error``).

        Args:
            ok: the broker acknowledged it with a success reason code.
            reason_code: the PUBACK's reason code, None when there was no PUBACK.
            lost: the delivery failed with a transport error.

        Returns:
            The outcome.
        """
        if ok:
            return cls.UNHEARD if reason_code == NO_MATCHING_SUBSCRIBERS else cls.ACKED
        return cls.LOST if lost else cls.REFUSED


class Action(enum.Enum):
    """What the driver does next, as answered by ``PublishWindow.decide``."""

    RESTART = "restart"  # call restart(), commit the waiting deletions, then read the outbox from its start
    PUBLISH = "publish"  # read and publish while next() returns envelopes
    WAIT = "wait"  # nothing to do until an event (a resolution, new envelopes, the end of a pause)


@dataclass(frozen=True, slots=True)
class Resolution:
    """What one resolved publication means.

    Attributes:
        delete: the counter is acknowledged: delete it from the outbox (never true twice for one counter).
        restart: the window became stale: the next ``decide`` answers ``RESTART``.
        pause: this refusal started a pause (true once per pause: the one to log).
    """

    delete: bool
    restart: bool
    pause: bool


_ACK: Final = Resolution(delete=True, restart=False, pause=False)
_NOTHING: Final = Resolution(delete=False, restart=False, pause=False)


class PublishWindow:
    """The bookkeeping of the publications in flight, driven by events."""

    def __init__(self, window: int, refusal_pause: float) -> None:
        """Create an empty window (epoch 0, cursor 0).

        Args:
            window: the most envelopes in flight (further capped by the broker's Receive Maximum, see ``limit``).
            refusal_pause: seconds without publishing after a refusal.

        Raises:
            ValueError: ``window`` < 1 or a negative ``refusal_pause``.
        """
        if window < 1 or refusal_pause < 0:
            raise ValueError(f"window={window} must be >= 1, refusal_pause={refusal_pause} must be >= 0")
        self.window = window
        self.refusal_pause = refusal_pause
        self.capacity = window  # min(window, receive_maximum) as of the latest limit()
        self.refill_at = 1  # resolutions worth waking the driver for: a quarter of the capacity
        self.epoch = 0  # increments on every restart: outcomes of an older epoch no longer steer the window
        self.cursor = 0  # the highest counter read from the outbox since the last restart
        self.resume_at = 0.0  # after a refusal: publishing waits until now reaches it
        self._queue: deque[tuple[int, bytes]] = deque()  # read from the outbox, not yet published
        self._inflight: set[int] = set()  # published in this epoch, not resolved
        self._high = 0  # the highest counter ever published: below it, a publication is a republication
        self._stale = False  # an outcome of this epoch asks for a restart
        # Deduplication of deletions. A counter republished after a restart may be acknowledged once per epoch; it is
        # remembered while any of its deliveries is unresolved or its deletion is not committed, and no longer.
        self._unresolved: dict[int, int] = {}  # counter -> deliveries of any epoch not yet resolved
        self._deleting: set[int] = set()  # handed out for deletion, commit not confirmed
        self._deleted: set[int] = set()  # committed, with deliveries still unresolved
        self.published_total = 0
        self.republished = 0
        self.refused = 0
        self.failures = 0
        self.resets = 0

    # -- state ----------------------------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Envelopes published in this epoch and not resolved."""
        return len(self._inflight)

    @property
    def queued(self) -> int:
        """Envelopes read from the outbox and not published yet."""
        return len(self._queue)

    @property
    def holding(self) -> bool:
        """Whether a restart would forget anything (in flight, queued, or a cursor past the start)."""
        return bool(self._inflight or self._queue or self.cursor)

    @property
    def idle(self) -> bool:
        """Nothing in flight and nothing queued."""
        return not (self._inflight or self._queue)

    # -- decisions ------------------------------------------------------------------------------------------------

    def decide(self, *, connected: bool, now: float) -> Action:
        """What to do after the resolutions collected so far.

        Args:
            connected: whether the transport has a session now.
            now: the current monotonic time.

        Returns:
            ``RESTART`` when the connection is lost or an outcome made the window stale and it holds anything;
            ``PUBLISH`` when connected and no refusal pause runs; ``WAIT`` otherwise.
        """
        if self._stale or not connected:
            self._stale = False
            return Action.RESTART if self.holding else Action.WAIT
        return Action.PUBLISH if now >= self.resume_at else Action.WAIT

    def retry_in(self, now: float) -> float | None:
        """Seconds until a refusal pause ends, None when none runs.

        Args:
            now: the current monotonic time.
        """
        return self.resume_at - now if self.resume_at > now else None

    def limit(self, receive_maximum: int) -> int:
        """Set the capacity for this round of publishing from the broker's Receive Maximum.

        Args:
            receive_maximum: the broker's limit on messages in flight (it may change on every connect).

        Returns:
            The capacity: ``max(1, min(window, receive_maximum))``.
        """
        self.capacity = max(1, min(self.window, receive_maximum))
        self.refill_at = max(1, self.capacity // 4)
        return self.capacity

    def wants(self) -> int:
        """How many envelopes to read from the outbox (after ``cursor``) now.

        Returns:
            0 unless the queue is empty and the window has room; then ``max(capacity, READ_MIN)``.
        """
        if self._queue or len(self._inflight) >= self.capacity:
            return 0
        return max(self.capacity, READ_MIN)

    def next(self) -> tuple[int, bytes] | None:
        """The envelope to publish now: the oldest read and not yet published.

        Returns:
            ``(counter, envelope)``, or None when the window is full or nothing is queued (then see ``wants``).
        """
        if not self._queue or len(self._inflight) >= self.capacity:
            return None
        return self._queue[0]

    # -- events ---------------------------------------------------------------------------------------------------

    def offer(self, rows: Sequence[tuple[int, bytes]]) -> None:
        """Envelopes read from the outbox: unacknowledged, in counter order, all after ``cursor``.

        Args:
            rows: ``(counter, envelope)`` pairs.

        Raises:
            RuntimeError: a counter not above the cursor or out of order (a bug of the reader).
        """
        last = self.cursor
        for counter, _ in rows:
            if counter <= last:
                raise RuntimeError(f"outbox rows out of counter order: {counter} after {last}")
            last = counter
        self._queue.extend(rows)
        self.cursor = last

    def published(self, counter: int) -> int:
        """The envelope ``next`` returned was handed to the transport.

        Args:
            counter: its counter.

        Returns:
            The epoch to pass back to ``resolved`` with its outcome.

        Raises:
            RuntimeError: ``counter`` is not what ``next`` returns (a bug of the driver).
        """
        if not self._queue or self._queue[0][0] != counter or len(self._inflight) >= self.capacity:
            raise RuntimeError(f"published {counter}, not the next envelope of the window")
        self._queue.popleft()
        self._inflight.add(counter)
        self._unresolved[counter] = self._unresolved.get(counter, 0) + 1
        self.published_total += 1
        if counter <= self._high:
            self.republished += 1
        else:
            self._high = counter
        return self.epoch

    def resolved(self, epoch: int, counter: int, outcome: Outcome, now: float) -> Resolution:
        """A publication resolved.

        Args:
            epoch: what ``published`` returned for it.
            counter: its counter.
            outcome: how it resolved.
            now: the current monotonic time (a refusal pause starts from it).

        Returns:
            Whether to delete the counter, whether the window must restart, whether a pause started.
        """
        current = epoch == self.epoch
        if current:
            self._inflight.discard(counter)
        left = self._unresolved.get(counter, 0) - 1
        first = counter not in self._deleting and counter not in self._deleted
        if left > 0:
            self._unresolved[counter] = left
        else:
            self._unresolved.pop(counter, None)
            self._deleted.discard(counter)  # its last delivery: nothing can mention it again
        if outcome is Outcome.ACKED:
            if first:
                self._deleting.add(counter)
            return _ACK if first else _NOTHING
        self.failures += 1
        pause = False
        if outcome is not Outcome.LOST:
            self.refused += 1
            if current and now >= self.resume_at:
                self.resume_at = now + self.refusal_pause
                pause = True
        if current:
            self._stale = True
        return Resolution(delete=False, restart=current, pause=pause)

    def committed(self, counters: Sequence[int]) -> None:
        """Deletions handed out by ``resolved`` are committed to the outbox: it will not offer them again.

        Args:
            counters: the committed counters.
        """
        for counter in counters:
            self._deleting.discard(counter)
            if counter in self._unresolved:
                self._deleted.add(counter)  # a delivery of it may still be acknowledged

    def restart(self) -> int:
        """Forget the window: a new epoch, nothing queued or in flight, the cursor back at 0.

        Returns:
            How many publications were in flight (their outcomes will no longer steer the window).
        """
        forgotten = len(self._inflight)
        self.epoch += 1
        self._inflight.clear()
        self._queue.clear()
        self.cursor = 0
        self._stale = False
        self.resets += 1
        return forgotten
