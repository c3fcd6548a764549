"""The publisher: drains the durable outbox to the broker in counter order, at most ``window`` envelopes in flight.

Two ways to delete, chosen when it is created:
- With receipts (``receipts=ReceiptPolicy(...)``, the box has the fleet receipt key): an envelope leaves the outbox
  only when a verified receipt of the fleet covers it (``on_receipt`` -> ``Outbox.apply_receipt``); a PUBACK only
  frees its slot in the window. What no receipt covers in time is published again (``edge.telemetry.window``).
- Without: an envelope leaves the outbox once the broker acknowledged it with a success reason code (below).

Invariants:
- PUBACK mode: an envelope leaves the outbox only after the broker acknowledged it with a success reason code:
  ``ack`` is called only with counters whose ``Delivery`` is ``ok``. Nothing else deletes, so a crash, a disconnect,
  a refusal or a failed ``ack`` can cause a republication but never a loss (the gateway deduplicates by counter and
  hash). Receipt mode: only ``apply_receipt`` deletes, and only what a receipt signed by the fleet covers.
- Envelopes are published in counter order from the oldest unacknowledged one; after a disconnect (a delivery failed
  with ``TransportError`` or the transport reports itself disconnected) everything that was in flight is forgotten
  and publishing restarts from the oldest unacknowledged envelope once the transport is connected again.
- A PUBACK with "No matching subscribers" (0x10) is not a delivery: nobody received the envelope (no gateway is
  subscribed, e.g. right after a broker restart, which forgets offline sessions' subscriptions in mosquitto 2.0).
  The envelope is kept and treated like a refusal, so the outbox holds it until a gateway listens.
- A refusal (a PUBACK with a failure reason, e.g. "Not authorized" or "Quota exceeded") is counted and logged; the
  envelope stays in the outbox and publishing restarts from the oldest unacknowledged envelope after
  ``refusal_pause`` seconds. A permanently refused envelope is thus retried until the outbox's bounds drop it, which
  the outbox announces as loss: never silently.
- Acknowledgements are committed in groups by a second thread (group commit: one outbox transaction as soon as
  ``ack_batch`` acknowledgements wait or the oldest has waited ``ack_interval`` seconds; a group holds everything
  collected by then). The commit's fsync thus overlaps publishing instead of stalling it (it was half of the time
  per envelope when done inline). Before the outbox is read from the start again, the waiting acknowledgements are
  committed (``_flush_acks``), so what was acknowledged is not published again.
- At most ``min(window, transport.receive_maximum)`` envelopes are in flight.
- While offline the thread keeps running: it polls at most every ``_IDLE_S`` seconds, and ``wake()`` (called by the
  sealer after each seal) starts publishing at once.

The window's rules (order, capacity, what is deleted, when to restart or pause) are ``edge.telemetry.window``'s
sans-IO ``PublishWindow``; this module owns the threads, the clock, the outbox and the transport, and feeds it events.
Only ``edge.mqtt`` knows MQTT; this module sees ``publish`` returning a ``Delivery``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Protocol

from edge.errors import EdgeError, InputError, TransportError
from edge.log import event
from edge.mqtt import Delivery
from edge.telemetry.window import Action, Outcome, PublishWindow, ReceiptPolicy
from edge.wire.receipts import Receipt

__all__ = ["DEFAULT_WINDOW", "OutboxReader", "Publisher", "PublisherStats", "ReceiptPolicy", "Transport"]

log = logging.getLogger("edge.telemetry.publisher")

# Measured with tools/bench/telemetry.py (figures in transport.py's docstring): throughput rises up to ~500 in flight
# and is flat beyond (500 and 1000 within noise); 500 envelopes of ~2 KB are ~1 MB of paho's memory. The broker's
# Receive Maximum caps it further.
DEFAULT_WINDOW: Final = 500
_IDLE_S: Final = 0.05  # the longest a new envelope waits when wake() was not called
_ERROR_PAUSE_S: Final = 0.5  # after an outbox failure: do not spin on a broken database


class OutboxReader(Protocol):
    """What the publisher needs of the outbox (``edge.telemetry.outbox.Outbox`` implements it)."""

    def pending(self, after: int = 0, limit: int = 1000) -> list[tuple[int, bytes]]:
        """Unacknowledged envelopes with counter > ``after``, in counter order, at most ``limit``."""
        ...

    def ack(self, counters: Iterable[int]) -> object:
        """Delete the acknowledged envelopes in one transaction; unknown counters are no-ops."""
        ...

    def rows(self, counters: Iterable[int]) -> list[tuple[int, bytes]]:
        """The envelopes still held among ``counters`` (receipt mode: to publish again)."""
        ...

    def apply_receipt(self, receipt: Receipt, data: bytes) -> Any:
        """Delete what a verified receipt covers (receipt mode); returns what it did (``.deleted``)."""
        ...


class Transport(Protocol):
    """What the publisher needs of the transport (``MqttTransport`` implements it)."""

    @property
    def connected(self) -> bool:
        """True while a session is up."""
        ...

    @property
    def receive_maximum(self) -> int:
        """The broker's limit on messages in flight."""
        ...

    @property
    def connects(self) -> int:
        """Successful connections so far: a change means a new session."""
        ...

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> Delivery:
        """Send one message; raises ``TransportError`` when not connected."""
        ...


@dataclass(frozen=True, slots=True)
class PublisherStats:
    """Counters of the publisher (a snapshot).

    Attributes:
        published: envelopes handed to the transport, republications included.
        acked: envelopes acknowledged by the broker and committed to the outbox.
        republished: publications of a counter that had been published before (after a disconnect or a refusal).
        refused: PUBACKs with a failure reason, or with "No matching subscribers" (nobody received it).
        failures: refusals, transport failures of deliveries and outbox errors, all together.
        resets: restarts from the oldest unacknowledged envelope.
        in_flight: envelopes published and not yet resolved.
        backlog: envelopes read from the outbox and not yet acknowledged (in flight or about to be published): a
            lower bound of the outbox's backlog, exact right after the outbox was read to its end.
        receipts: receipts applied (receipt mode).
        receipted: envelopes receipts deleted from the outbox.
        unreceipted: envelopes the broker acknowledged that no receipt covered yet.
        resent: envelopes published again because no receipt covered them in time (or a receipt named a hole).
        receipt_failures: receipts that contradicted the outbox or could not be applied (logged).
    """

    published: int
    acked: int
    republished: int
    refused: int
    failures: int
    resets: int
    in_flight: int
    backlog: int
    receipts: int = 0
    receipted: int = 0
    unreceipted: int = 0
    resent: int = 0
    receipt_failures: int = 0


class Publisher:
    """A thread that publishes the outbox's envelopes and deletes them once acknowledged."""

    def __init__(
        self,
        outbox: OutboxReader,
        transport: Transport,
        topic: str,
        *,
        window: int = DEFAULT_WINDOW,
        ack_batch: int = 64,
        ack_interval: float = 0.005,
        refusal_pause: float = 1.0,
        receipts: ReceiptPolicy | None = None,
    ) -> None:
        """Create a publisher (``start`` starts its thread).

        Args:
            outbox: the durable outbox.
            transport: the connection to the broker (started and stopped by the caller).
            topic: where envelopes go (``devices/<id>/telemetry``).
            window: the most envelopes in flight (also capped by the broker's Receive Maximum).
            ack_batch: commit as soon as this many acknowledgements wait.
            ack_interval: the longest an acknowledgement waits for its group, in seconds.
            refusal_pause: seconds before republishing after the broker refused an envelope.
            receipts: delete on the fleet's receipts with this policy (``on_receipt``); None: on the PUBACK.

        Raises:
            ValueError: ``window`` or ``ack_batch`` < 1, or a negative interval.
        """
        if window < 1 or ack_batch < 1 or ack_interval < 0 or refusal_pause < 0:
            raise ValueError(
                f"window={window}, ack_batch={ack_batch} must be >= 1; ack_interval={ack_interval}, "
                f"refusal_pause={refusal_pause} must be >= 0"
            )
        self._outbox = outbox
        self._transport = transport
        self.topic = topic
        self.window = window
        self.ack_batch = ack_batch
        self.ack_interval = ack_interval
        self.refusal_pause = refusal_pause
        # The window's bookkeeping; it belongs to the publisher thread (other threads only read its counters).
        self._core = PublishWindow(window, refusal_pause, receipts)
        self.receipt_mode = receipts is not None
        # Verified receipts, appended by the transport's network thread, applied by the publisher thread.
        self._receipts_in: deque[tuple[Receipt, bytes]] = deque()
        self._receipts = 0
        self._receipted = 0
        self._receipt_failures = 0
        self.last_receipt: Receipt | None = None
        self._wake = threading.Event()
        self._more = True  # the outbox may hold envelopes we have not read: set by wake() and by the idle poll
        self._stop_at: float | None = None  # monotonic drain deadline once stop() was called
        self._thread: threading.Thread | None = None
        # Resolved deliveries, appended by the transport's network thread (deque appends and pops are atomic).
        self._done: deque[tuple[int, int, Delivery]] = deque()
        # Committed groups, appended by the acker thread, handed to the core by the publisher thread.
        self._committed: deque[list[int]] = deque()
        # Acknowledged counters waiting for their group commit, shared with the acker thread under _ack_cv.
        self._ack_cv = threading.Condition()
        self._ack_q: list[int] = []
        self._ack_due = 0.0
        self._ack_busy = False  # the acker is inside outbox.ack
        self._ack_now = False  # commit what waits without waiting for the group (flush, stop)
        self._ack_exit = False
        self._acker: threading.Thread | None = None
        self._acked = 0
        self._failures = 0  # outbox failures; the core counts the deliveries that failed

    # -- public -------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the publishing thread.

        Raises:
            RuntimeError: already started.
        """
        if self._thread is not None:
            raise RuntimeError("publisher already started")
        self._acker = threading.Thread(target=self._run_acker, name="publisher-acks", daemon=True)
        self._acker.start()
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._thread.start()

    def on_receipt(self, receipt: Receipt, data: bytes) -> None:
        """A receipt verified for this device arrived (any thread): the publisher thread applies it.

        Args:
            receipt: the verified receipt.
            data: its bytes as received (the outbox keeps the newest as proof of delivery).
        """
        if not self.receipt_mode:
            return  # PUBACK mode: deletion follows the broker; a receipt changes nothing
        self._receipts_in.append((receipt, data))
        self._wake.set()

    def wake(self) -> None:
        """Tell the publisher that the outbox has new envelopes (the sealer calls it after each seal)."""
        self._more = True
        self._wake.set()

    def stop(self, drain_timeout: float = 5.0) -> None:
        """Publish what is pending for up to ``drain_timeout`` seconds, commit the acknowledgements, stop.

        In receipt mode, draining also waits for the receipts of what was published. What is not acknowledged (or
        receipted) by then stays in the outbox for the next start.

        Args:
            drain_timeout: seconds to keep draining (0: stop after committing what is acknowledged).
        """
        self._stop_at = time.monotonic() + drain_timeout
        self.wake()
        if self._thread is not None:
            self._thread.join(drain_timeout + 5.0)

    @property
    def running(self) -> bool:
        """Whether the thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> PublisherStats:
        """A snapshot of the counters.

        Returns:
            The counters (read without a lock: each is exact, the set approximately simultaneous).
        """
        core = self._core
        in_flight = core.in_flight
        return PublisherStats(
            published=core.published_total,
            acked=self._acked,
            republished=core.republished,
            refused=core.refused,
            failures=self._failures + core.failures,
            resets=core.resets,
            in_flight=in_flight,
            backlog=core.queued + in_flight + len(self._ack_q),
            receipts=self._receipts,
            receipted=self._receipted,
            unreceipted=core.unreceipted,
            resent=core.resent,
            receipt_failures=self._receipt_failures,
        )

    # -- the thread ---------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                if self._step():
                    break
            except Exception:  # the outbox or a bug: logged with its traceback, counted, retried; never fatal
                log.exception("publisher step failed")
                self._failures += 1
                self._reset(flush=False)  # the outbox may be what failed: do not wait on it here
                if self._stopping_expired():
                    break
                self._wake.wait(_ERROR_PAUSE_S)
        with self._ack_cv:
            self._ack_exit = self._ack_now = True  # the acker commits what waits, then ends
            self._ack_cv.notify_all()
        if self._acker is not None:
            self._acker.join(5.0)
        event(log, logging.INFO, "publisher stopped", **_asdict(self.stats()))

    def _stopping_expired(self) -> bool:
        return self._stop_at is not None and time.monotonic() >= self._stop_at

    def _step(self) -> bool:
        """One round: collect acknowledgements, commit, publish up to the window, wait. True when finished."""
        self._wake.clear()
        self._collect()
        connected = self._transport.connected
        action = self._core.decide(connected=connected, now=time.monotonic(), session=self._transport.connects)
        if action is Action.RESTART:
            self._reset()
        elif action is Action.PUBLISH:
            self._fill()
        if self._stop_at is not None:
            # Receipt mode: drained once what was published is receipted too (the outbox keeps the rest anyway).
            drained = self._core.idle and not self._more and not self._core.unreceipted
            if drained or self._stopping_expired():
                return True
        self._wait(connected)
        return False

    def _collect(self) -> None:
        """Hand committed groups and resolved deliveries to the core; queue the deletions it decides."""
        core = self._core
        committed = self._committed
        while committed:
            core.committed(committed.popleft())
        while self._receipts_in:
            self._apply(*self._receipts_in.popleft())
        done = self._done
        if not done:
            return
        now = time.monotonic()
        while done:
            epoch, counter, d = done.popleft()
            outcome = Outcome.of(ok=d.ok, reason_code=d.reason_code, lost=d.error is not None)
            r = core.resolved(epoch, counter, outcome, now)
            if r.delete:
                self._ack_later(counter)
            elif r.pause:
                if outcome is Outcome.UNHEARD:
                    event(log, logging.WARNING, "no gateway subscribed; envelopes kept", counter=counter)
                else:
                    event(log, logging.WARNING, "envelope refused by the broker", counter=counter, reason=d.reason)

    def _apply(self, receipt: Receipt, data: bytes) -> None:
        """Delete what a receipt covers from the outbox, then tell the window (publisher thread)."""
        try:
            applied = self._outbox.apply_receipt(receipt, data)
        except EdgeError as e:
            # A contradiction (another history at the fleet) or a failing outbox: nothing was deleted. Loud, counted;
            # a later receipt is applied on its own merits.
            self._receipt_failures += 1
            level = logging.ERROR if isinstance(e, InputError) else logging.WARNING
            event(log, level, "receipt not applied", error=str(e), stored=receipt.stored, head=receipt.head)
            return
        self._receipts += 1
        self._receipted += applied.deleted
        if self.last_receipt is None or (receipt.head, receipt.stored) >= (
            self.last_receipt.head,
            self.last_receipt.stored,
        ):
            self.last_receipt = receipt
        self._core.receipt_applied(receipt)

    def _ack_later(self, counter: int) -> None:
        with self._ack_cv:
            if not self._ack_q:
                self._ack_due = time.monotonic() + self.ack_interval
                self._ack_cv.notify()  # the acker sleeps without a deadline while nothing waits
            self._ack_q.append(counter)
            if len(self._ack_q) == self.ack_batch:
                self._ack_cv.notify()

    def _run_acker(self) -> None:
        """The group-commit thread: waits for a full or old enough group, deletes it from the outbox."""
        while True:
            with self._ack_cv:
                while not (
                    self._ack_q
                    and (self._ack_now or len(self._ack_q) >= self.ack_batch or time.monotonic() >= self._ack_due)
                ):
                    if self._ack_exit and not self._ack_q:
                        return
                    timeout = max(0.0, self._ack_due - time.monotonic()) if self._ack_q else None
                    self._ack_cv.wait(timeout)
                batch, self._ack_q = self._ack_q, []
                self._ack_busy = True
            committed = False
            try:
                self._outbox.ack(batch)
                committed = True
            except Exception:  # the outbox changed nothing: the group waits and is retried; logged and counted
                log.exception("acknowledgement commit failed (%d envelopes; retried)", len(batch))
                self._failures += 1
            finally:
                with self._ack_cv:
                    self._ack_busy = False
                    if committed:
                        self._acked += len(batch)
                        self._committed.append(batch)
                    else:
                        self._ack_q[:0] = batch
                        self._ack_due = time.monotonic() + _ERROR_PAUSE_S
                    self._ack_cv.notify_all()
            if not committed and self._ack_exit:
                return  # stopping with a broken outbox: the envelopes stay and are republished after a restart

    def _flush_acks(self, timeout: float = 2.0) -> None:
        """Commit the waiting acknowledgements now and wait for it (bounded: a failing outbox must not hang us)."""
        with self._ack_cv:
            if not self._ack_q and not self._ack_busy:
                return
            self._ack_now = True
            self._ack_cv.notify_all()
            self._ack_cv.wait_for(lambda: not self._ack_q and not self._ack_busy, timeout)
            self._ack_now = self._ack_exit

    def _reset(self, *, flush: bool = True) -> None:
        """Forget the window; the next fill reads the outbox from its oldest unacknowledged envelope."""
        forgotten = self._core.restart()
        if forgotten:
            event(log, logging.INFO, "restarting from the oldest unacknowledged envelope", in_flight=forgotten)
        self._more = True
        if flush:
            self._flush_acks()  # before re-reading: what is acknowledged must not be published again

    def _fill(self) -> None:
        core = self._core
        core.limit(self._transport.receive_maximum)
        now = time.monotonic()
        if self.receipt_mode:
            due = core.due(now)
            if due:
                core.offer_resend(due, self._outbox.rows(due))
        while True:
            nxt = core.next()
            if nxt is None:
                limit = core.wants()
                if not limit or not self._more:
                    return
                rows = self._outbox.pending(after=core.cursor, limit=limit)
                if len(rows) < limit:
                    self._more = False  # read to its end: wait for wake() or the idle poll
                if not rows:
                    return
                core.offer(rows)
                continue
            counter, data = nxt
            try:
                d = self._transport.publish(self.topic, data)
            except TransportError:
                self._reset()  # lost the connection between the check and the publish
                return
            epoch = core.published(counter, now)
            d.add_done_callback(partial(self._resolved, epoch, counter))

    def _resolved(self, epoch: int, counter: int, d: Delivery) -> None:
        """A delivery resolved (on the transport's network thread): hand it to the publisher thread."""
        done = self._done
        done.append((epoch, counter, d))
        # Wake the publisher per quarter window, not per PUBACK: it then refills in a burst. Waking it for every
        # acknowledgement made the two threads trade the GIL per message and halved the throughput.
        if not d.ok or len(done) >= min(self._core.refill_at, self._core.in_flight):
            self._wake.set()

    def _wait(self, connected: bool) -> None:
        timeout = _IDLE_S
        pause = self._core.retry_in(time.monotonic()) if connected else None
        if pause is not None:
            timeout = min(timeout, pause)
        if self._stop_at is not None:
            timeout = min(timeout, max(0.0, self._stop_at - time.monotonic()))
        if not self._wake.wait(timeout):
            self._more = True  # the idle poll: read the outbox again even without wake()


def _asdict(s: PublisherStats) -> dict[str, int]:
    return {name: getattr(s, name) for name in PublisherStats.__slots__}
