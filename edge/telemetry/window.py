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

With receipts (``ReceiptPolicy``; the box has the fleet receipt key), deletion follows the fleet, not the broker:
- ``ACKED`` deletes nothing: the counter waits for a receipt (``unreceipted``) until a deadline, ``timeout_s`` after
  its publication, doubling with every resend of it up to ``backoff_max_s``. ``due`` hands out the counters whose
  deadline passed, to be read again and published before anything new (``offer_resend``).
- ``receipt`` forgets every counter the receipt covers (the driver deleted them from the outbox first); a counter it
  lists as a hole is due ``hole_grace_s`` after it was last published (with several gateways on a shared
  subscription a later envelope is often stored first, so a hole is normal for a moment, not a loss).
- At most ``max_unreceipted`` envelopes are in flight or waiting for a receipt: new envelopes wait, so a fleet that
  stores nothing cannot make a box fill the broker's queue.
- After every new session (``decide(session=...)`` changes) nothing is published until a receipt arrives or
  ``sync_wait_s`` passed: the gateway answers the box's birth with a receipt, so a box that reconnects resends only
  what the fleet lacks. Counters waiting for a receipt keep their deadlines across sessions (the broker holds them
  for the gateways' persistent sessions; if it lost them, they are resent when their deadline passes).
- Reading the outbox again (after a restart) skips counters that wait for a receipt.
"""

from __future__ import annotations

import enum
import heapq
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from edge.mqtt import NO_MATCHING_SUBSCRIBERS
from edge.wire.receipts import Receipt

__all__ = ["READ_MIN", "Action", "Outcome", "PublishWindow", "ReceiptPolicy", "Resolution"]

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


@dataclass(frozen=True, slots=True)
class ReceiptPolicy:
    """How a box that deletes on receipts publishes (see the module docstring).

    Attributes:
        timeout_s: an envelope the broker acknowledged and no receipt covered within this time is published again.
        backoff_max_s: the longest wait for a receipt after repeated resends of one envelope.
        hole_grace_s: a counter a receipt names as a hole is published again once its last publication is this old.
        sync_wait_s: after a new session, how long to wait for the fleet's receipt before publishing anyway.
        max_unreceipted: the most envelopes in flight or waiting for a receipt at once.
    """

    timeout_s: float = 30.0
    backoff_max_s: float = 600.0
    hole_grace_s: float = 2.0
    sync_wait_s: float = 3.0
    max_unreceipted: int = 10_000

    def __post_init__(self) -> None:
        if min(self.timeout_s, self.hole_grace_s, self.sync_wait_s) < 0 or self.backoff_max_s < self.timeout_s:
            raise ValueError(f"invalid receipt policy {self!r}: times >= 0, backoff_max_s >= timeout_s")
        if self.max_unreceipted < 1:
            raise ValueError(f"max_unreceipted must be >= 1, got {self.max_unreceipted}")


_ACK: Final = Resolution(delete=True, restart=False, pause=False)
_NOTHING: Final = Resolution(delete=False, restart=False, pause=False)


class PublishWindow:
    """The bookkeeping of the publications in flight, driven by events."""

    def __init__(self, window: int, refusal_pause: float, receipts: ReceiptPolicy | None = None) -> None:
        """Create an empty window (epoch 0, cursor 0).

        Args:
            window: the most envelopes in flight (further capped by the broker's Receive Maximum, see ``limit``).
            refusal_pause: seconds without publishing after a refusal.
            receipts: delete on receipts with this policy; None: delete on the broker's PUBACK.

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
        # Receipts (None: PUBACK deletion).
        self.policy = receipts
        self._awaiting: dict[int, tuple[float, float, int]] = {}  # counter -> (deadline, last published, resends)
        self._expiry: list[tuple[float, int]] = []  # heap of (deadline, counter); stale entries skipped when popped
        self._resending: dict[int, int] = {}  # counter -> resends so far, from ``due`` until acknowledged again
        self._published_at: dict[int, float] = {}  # in flight: when it was published (carried into _awaiting)
        self.receipt: Receipt | None = None  # the newest receipt seen
        self._session: object = None
        self._sync_until = 0.0
        self.synced = True
        self.resent = 0

    # -- state ----------------------------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Envelopes published in this epoch and not resolved."""
        return len(self._inflight)

    @property
    def unreceipted(self) -> int:
        """Envelopes the broker acknowledged that no receipt covered yet (receipt mode)."""
        return len(self._awaiting)

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

    def decide(self, *, connected: bool, now: float, session: object = None) -> Action:
        """What to do after the resolutions collected so far.

        Args:
            connected: whether the transport has a session now.
            now: the current monotonic time.
            session: identifies the transport's current session (its connect count); a change starts a wait for
                the fleet's receipt in receipt mode.

        Returns:
            ``RESTART`` when the connection is lost or an outcome made the window stale and it holds anything;
            ``PUBLISH`` when connected, no refusal pause runs and (receipt mode) the session is synced; ``WAIT``
            otherwise.
        """
        if self._stale or not connected:
            self._stale = False
            return Action.RESTART if self.holding else Action.WAIT
        if self.policy is not None and session != self._session:
            self._session = session
            self.synced = False
            self._sync_until = now + self.policy.sync_wait_s
        if not self.synced:
            if now < self._sync_until:
                return Action.WAIT
            self.synced = True  # no receipt came: publish; the fleet deduplicates what it already has
        return Action.PUBLISH if now >= self.resume_at else Action.WAIT

    def retry_in(self, now: float) -> float | None:
        """Seconds until something is due: a refusal pause or a wait for a receipt ends, or a deadline passes.

        Args:
            now: the current monotonic time.

        Returns:
            The seconds, None when nothing is scheduled.
        """
        # While a pause or the wait for a receipt blocks publishing, a passed deadline cannot be acted on: waking for
        # it would spin.
        blocked = max(self.resume_at, 0.0 if self.synced else self._sync_until)
        if blocked > now:
            return blocked - now
        if self._expiry:
            return max(0.0, self._expiry[0][0] - now)
        return None

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
        if self._queue or not self._room():
            return 0
        return max(self.capacity, READ_MIN)

    def _room(self) -> bool:
        if len(self._inflight) >= self.capacity:
            return False
        return self.policy is None or len(self._awaiting) + len(self._inflight) < self.policy.max_unreceipted

    def next(self) -> tuple[int, bytes] | None:
        """The envelope to publish now: the oldest read and not yet published.

        Returns:
            ``(counter, envelope)``, or None when the window is full or nothing is queued (then see ``wants``).
        """
        if not self._queue or not self._room():
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
        # Acknowledged already, its deletion not yet committed (the outbox still holds it): never published again,
        # or its second acknowledgement, once the deletion is committed and forgotten, would delete it twice.
        done = self._deleting | self._deleted
        # Published and acknowledged, waiting for a receipt: not again until its deadline (``due``).
        done |= self._awaiting.keys()
        self._queue.extend(r for r in rows if r[0] not in done)
        self.cursor = last

    def due(self, now: float) -> list[int]:
        """Counters whose wait for a receipt is over (receipt mode): read them and ``offer_resend`` them.

        Args:
            now: the current monotonic time.

        Returns:
            The counters, ascending; they no longer wait (an acknowledgement of their resend starts a new wait).
        """
        out: list[int] = []
        heap, waiting = self._expiry, self._awaiting
        while heap and heap[0][0] <= now:
            deadline, counter = heapq.heappop(heap)
            entry = waiting.get(counter)
            if entry is None or entry[0] != deadline:
                continue  # covered by a receipt since, or rescheduled: a stale heap entry
            del waiting[counter]
            self._resending[counter] = entry[2] + 1
            out.append(counter)
        out.sort()
        return out

    def offer_resend(self, counters: Sequence[int], rows: Sequence[tuple[int, bytes]]) -> None:
        """Envelopes ``due`` handed out, read again: published next, before anything new, in counter order.

        Args:
            counters: what ``due`` returned.
            rows: ``(counter, envelope)`` of those the outbox still holds (a receipt may have deleted the others).
        """
        held = {c for c, _ in rows}
        for counter in counters:
            if counter not in held:
                self._resending.pop(counter, None)
        self.resent += len(rows)
        self._queue.extendleft(reversed(sorted(rows)))

    def published(self, counter: int, now: float = 0.0) -> int:
        """The envelope ``next`` returned was handed to the transport.

        Args:
            counter: its counter.
            now: the current monotonic time (receipt mode: its wait for a receipt is counted from it).

        Returns:
            The epoch to pass back to ``resolved`` with its outcome.

        Raises:
            RuntimeError: ``counter`` is not what ``next`` returns (a bug of the driver).
        """
        if not self._queue or self._queue[0][0] != counter or len(self._inflight) >= self.capacity:
            raise RuntimeError(f"published {counter}, not the next envelope of the window")
        self._queue.popleft()
        self._inflight.add(counter)
        if self.policy is not None:
            self._published_at[counter] = now
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
        if self.policy is not None:
            return self._resolved_receipt_mode(counter, outcome, now, current)
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
                if not current and self._queue:
                    # A late acknowledgement from before a restart, for a counter this epoch has read but not yet
                    # published: publishing it again would be acknowledged as a "first" time once the deletion is
                    # committed (it is then nowhere in the books), and deleted twice.
                    self._queue = deque(r for r in self._queue if r[0] != counter)
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

    def _resolved_receipt_mode(self, counter: int, outcome: Outcome, now: float, current: bool) -> Resolution:
        policy = self.policy
        assert policy is not None
        published = self._published_at.pop(counter, now)
        resends = self._resending.pop(counter, 0)
        if outcome is Outcome.ACKED:
            if (self.receipt is None or not self.receipt.covers(counter)) and counter not in self._awaiting:
                wait = min(policy.timeout_s * 2 ** min(resends, 30), policy.backoff_max_s)
                self._wait_for_receipt(counter, published + wait, published, resends)
            return _NOTHING
        if resends:
            self._resending[counter] = resends  # republished after the restart: the count carries on
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

    def _wait_for_receipt(self, counter: int, deadline: float, published: float, resends: int) -> None:
        self._awaiting[counter] = (deadline, published, resends)
        heapq.heappush(self._expiry, (deadline, counter))

    def receipt_applied(self, receipt: Receipt) -> None:
        """A verified receipt was applied to the outbox (what it covers is deleted there): forget what it covers,
        schedule the holes it names, and end the wait for the session's first receipt.

        Args:
            receipt: the receipt.
        """
        policy = self.policy
        if policy is None:
            return
        if self.receipt is None or (receipt.head, receipt.stored) >= (self.receipt.head, self.receipt.stored):
            self.receipt = receipt
        self.synced = True
        for counter in [c for c in self._awaiting if receipt.covers(c)]:
            del self._awaiting[counter]
        for counter in [c for c in self._resending if receipt.covers(c)]:
            del self._resending[counter]
        if self._queue and any(receipt.covers(c) for c, _ in self._queue):
            self._queue = deque(r for r in self._queue if not receipt.covers(r[0]))
        for counter, (deadline, published, resends) in list(self._awaiting.items()) if receipt.holes else ():
            if receipt.in_holes(counter) and published + policy.hole_grace_s < deadline:
                self._wait_for_receipt(counter, published + policy.hole_grace_s, published, resends)
        if len(self._expiry) > 4 * len(self._awaiting) + 1024:
            # Entries of covered counters are skipped lazily; rebuild once most of the heap is such entries.
            self._expiry = [(d, c) for c, (d, _p, _r) in self._awaiting.items()]
            heapq.heapify(self._expiry)

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
        self._published_at.clear()
        return forgotten
