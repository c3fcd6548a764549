"""Ingest: messages from the broker -> fair batches -> one store transaction each -> acknowledgements.

Invariants:
- A message is acknowledged (PUBACK) only after the transaction that stored or quarantined it committed. If the
  gateway dies before that, the broker still holds the message for the gateway's persistent session and
  redelivers it; the store is idempotent (a redelivered envelope is a ``duplicate``, stored once).
- Every message is either stored (telemetry accepted or a duplicate, a status recorded or superseded) or
  quarantined with a reason. Nothing a box can publish stops ingest:
  - a message that makes its batch fail in a way the store did not classify (a ``StoreError`` that is not
    ``StoreUnavailableError``, or any other exception) is retried alone; if it fails alone it is quarantined as
    ``internal`` with its complete payload, and the others of its batch are stored as usual;
  - batches are assembled round-robin over the devices with messages waiting (by the topic's device), so one box
    flooding its topics gets one slot per round, like every other box;
  - QoS 0 messages are not flow-controlled by the broker: beyond ``qos0_queue_max`` waiting for one device they are
    dropped unread, counted, and quarantined as one ``shed`` row per device and batch;
  - reject logs are throttled per device and kind, with a count of what was suppressed;
  - a box whose rejects overdraw its budget (``edge.fleet.suspend``) is suspended: recorded in the store, then
    ``on_suspended`` is called (the broker sync deletes the box's client, which cuts off its flood at the broker).
- The store unavailable (``StoreUnavailableError``: database down, locked, disk full) acknowledges nothing; the same
  batch is retried with backoff. If it stays unavailable for ``store_timeout_s``, or the worker fails in any way
  nobody expected, ingest stops for good: ``failed`` says why, ``alive`` turns false, and the gateway process exits
  non-zero so its supervisor restarts it. It never lives on without ingesting.
- Memory is bounded: the gateway's Receive Maximum caps the QoS 1 messages in flight to it, and ``qos0_queue_max``
  the QoS 0 messages per device.
- ``received_at`` never goes backwards within one loop (a wall clock stepped back by NTP is held at its last value).
- Receipts (``receipts``, an ``edge.fleet.receipts.ReceiptIssuer``): after a batch committed, every box with an
  envelope in it that is now stored (accepted or a duplicate) is owed a receipt, and a box whose status arrived
  (its birth after a (re)connect) asks for one; they are issued on the worker's next turns, from committed state.
- Every gap in a box's chain is logged at warning level with the box and the missing counters (throttled per box,
  with the count of suppressed lines) and counted.

One ``IngestLoop`` owns one worker thread and one ``Store`` opened on that thread (stores are per-thread).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeVar

from edge.fleet.errors import IngestFailedError, StoreUnavailableError
from edge.fleet.metrics import GatewayMetrics
from edge.fleet.receipts import ReceiptIssuer
from edge.fleet.store import Inbound, IngestResult, Store
from edge.fleet.suspend import RejectBudget, Suspension
from edge.log import Throttle, event
from edge.mqtt import Incoming
from edge.wire.chain import VerdictKind
from edge.wire.topics import TELEMETRY, topic_device_any, topic_route

__all__ = ["IngestLoop", "IngestStats"]

log = logging.getLogger("edge.fleet.ingest")

_RETRY_MIN_S, _RETRY_MAX_S = 0.2, 5.0
_LOG_EVERY_S: Final = 10.0  # at most one reject log per (device, kind) per interval
_LOG_KEYS_MAX: Final = 10_000
T = TypeVar("T")
_Item = tuple[Incoming, float]


@dataclass
class IngestStats:
    """Counters of one ingest loop (the metrics carry the same and more)."""

    messages: int = 0
    batches: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    records: int = 0
    statuses: int = 0
    bad_statuses: int = 0
    store_errors: int = 0
    internal: int = 0
    shed: int = 0
    suspensions: int = 0
    gaps: int = 0


class FairQueue:
    """Messages waiting per device, taken round-robin over the devices that have any. Thread-safe.

    Args:
        qos0_max: the most QoS 0 messages waiting for one device; more are dropped on arrival (counted).
    """

    def __init__(self, qos0_max: int) -> None:
        self._qos0_max = max(1, qos0_max)
        self._cond = threading.Condition()
        self._queues: dict[str, collections.deque[_Item]] = {}
        self._ready: collections.deque[str] = collections.deque()
        self._size = 0
        self._closed = False
        self._shed: collections.Counter[str] = collections.Counter()
        self._shed_topic: dict[str, str] = {}

    def __len__(self) -> int:
        """Messages waiting."""
        with self._cond:
            return self._size

    def put(self, key: str, item: _Item, *, qos0: bool) -> bool:
        """Queue ``item`` for device ``key`` (``""`` for a topic that names none).

        Returns:
            False when it was dropped: a QoS 0 message for a device that already has ``qos0_max`` waiting.
        """
        with self._cond:
            q = self._queues.get(key)
            if q is None:
                q = self._queues[key] = collections.deque()
            if qos0 and len(q) >= self._qos0_max:
                self._shed[key] += 1
                self._shed_topic[key] = item[0].topic
                return False
            if not q:
                self._ready.append(key)
            q.append(item)
            self._size += 1
            self._cond.notify()
            return True

    def close(self) -> None:
        """Wake the taker; ``take`` returns what is left, then nothing."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def take(self, limit: int, wait_more_s: float, idle_s: float = 1.0) -> tuple[list[_Item], bool]:
        """Up to ``limit`` messages, one per device per round; waits for the first (at most ``idle_s``: an idle
        worker still turns), then up to ``wait_more_s`` for more.

        Returns:
            (messages, closed): ``closed`` once ``close`` was called (the messages are the last ones); no messages
            when ``idle_s`` passed without any.
        """
        with self._cond:
            if not self._size and not self._closed:
                self._cond.wait(idle_s)
            if not self._size:
                return [], self._closed
            deadline = time.monotonic() + wait_more_s
            while self._size < limit and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    break
            out: list[_Item] = []
            while self._ready and len(out) < limit:
                key = self._ready.popleft()
                q = self._queues[key]
                out.append(q.popleft())
                if q:
                    self._ready.append(key)
                else:
                    del self._queues[key]  # idle devices cost nothing
            self._size -= len(out)
            return out, self._closed

    def take_shed(self) -> list[tuple[str, str, int]]:
        """(device, last topic, count) of QoS 0 messages dropped since the last call."""
        with self._cond:
            out = [(k, self._shed_topic[k], n) for k, n in self._shed.items()]
            self._shed.clear()
            self._shed_topic.clear()
            return out


class IngestLoop:
    """Batches incoming messages into store transactions and acknowledges what committed.

    Args:
        open_store: opens the store; called once, on the worker thread.
        metrics: where to count.
        batch_max: the most messages per transaction.
        batch_wait_s: how long the first message of a batch waits for company.
        clock: wall-clock seconds (receipt and commit times).
        store_timeout_s: how long the store may stay unavailable before ingest gives up (the process then exits).
        qos0_queue_max: QoS 0 messages that may wait per device before more are dropped.
        budget: the boxes' reject budgets; None never suspends.
        suspend_s: the first suspension's length (``Store.suspend``).
        gateway_id: who decides a suspension (recorded with it).
    """

    def __init__(
        self,
        open_store: Callable[[], Store],
        metrics: GatewayMetrics,
        *,
        batch_max: int = 200,
        batch_wait_s: float = 0.02,
        clock: Callable[[], float] = time.time,
        store_timeout_s: float = 300.0,
        qos0_queue_max: int = 100,
        budget: RejectBudget | None = None,
        suspend_s: float = 60.0,
        gateway_id: str = "",
    ) -> None:
        self._open_store = open_store
        self.metrics = metrics
        self._batch_max = max(1, batch_max)
        self._batch_wait = max(0.0, batch_wait_s)
        self._clock = clock
        self._store_timeout = store_timeout_s
        self._queue = FairQueue(qos0_queue_max)
        self._last_t = 0.0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._throttle = Throttle(_LOG_EVERY_S, max_keys=_LOG_KEYS_MAX)
        self.failed: BaseException | None = None
        self.heartbeat = time.monotonic()  # the worker's latest turn (the systemd watchdog is fed while it moves)
        self.stats = IngestStats()
        self._budget = budget
        self._suspend_s = suspend_s
        self._gateway_id = gateway_id
        self._overdrawn: dict[str, str] = {}  # device -> the last reject's kind, until its suspension is recorded
        self._budget_swept = time.monotonic()
        self.on_suspended: Callable[[Suspension], None] | None = None  # called on the worker thread
        self.receipts: ReceiptIssuer | None = None  # set before start(); used on the worker thread only

    @property
    def alive(self) -> bool:
        """True while the worker runs and has not given up."""
        return self._thread is not None and self._thread.is_alive() and self.failed is None

    def start(self) -> None:
        """Open the store on the worker thread and start ingesting.

        Raises:
            StoreError: the store cannot be opened (raised here, not on the worker, so startup fails loudly).
        """
        self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def submit(self, msg: Incoming) -> None:
        """Queue a received message (called on the network thread; never blocks)."""
        t = max(self._clock(), self._last_t)
        self._last_t = t
        key = topic_device_any(msg.topic) or ""
        if self._queue.put(key, (msg, t), qos0=msg.qos == 0):
            self.metrics.queue.inc()
        else:
            self.stats.shed += 1
            self.metrics.rejects.labels(reason="shed").inc()

    def stop(self, timeout: float = 10.0) -> None:
        """Store and acknowledge what was received so far, then stop the worker.

        Args:
            timeout: seconds to wait for the last batch.
        """
        self._stopping.set()
        self._queue.close()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the worker ---------------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            store = self._open_store()
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            while True:
                self.heartbeat = time.monotonic()
                receipts = self.receipts
                due = receipts.due_in() if receipts is not None else None
                idle = 1.0 if due is None else min(1.0, due)
                batch, last = self._queue.take(self._batch_max, self._batch_wait, idle)
                if batch:
                    self._handle(store, batch)
                self._quarantine_shed(store)
                self._suspend(store)
                if receipts is not None:
                    receipts.issue(store)
                if last and not len(self._queue):
                    return
        except BaseException as e:  # a bug or a store gone for good: say so and stop; the process exits non-zero
            self.failed = e
            event(log, logging.CRITICAL, "ingest stopped", error=f"{type(e).__name__}: {e}"[:500])
        finally:
            store.close()

    def _handle(self, store: Store, batch: list[_Item]) -> None:
        self.metrics.queue.dec(len(batch))
        self.stats.messages += len(batch)
        try:
            results = self._committed(lambda: store.ingest([_inbound(m, t) for m, t in batch]), len(batch))
        except IngestFailedError:
            raise
        except Exception as e:  # anything but "unavailable": find the message that causes it
            if len(batch) == 1:
                results = [self._quarantine_internal(store, batch[0], e)]
            else:
                event(log, logging.WARNING, "batch failed; storing its messages one by one", error=_brief(e))
                for item in batch:
                    self._handle_one(store, item)
                return
        if results is None:
            # Stopping with the database down: leave the batch unacknowledged; the broker redelivers it.
            event(log, logging.WARNING, "stopped with a batch unstored; the broker keeps it", n=len(batch))
            return
        self._done(batch, results)

    def _handle_one(self, store: Store, item: _Item) -> None:
        m, t = item
        try:
            results = self._committed(lambda: store.ingest([_inbound(m, t)]), 1)
        except IngestFailedError:
            raise
        except Exception as e:  # this message fails alone: quarantine it, carry on
            results = [self._quarantine_internal(store, item, e)]
        if results is not None:
            self._done([item], results)

    def _quarantine_internal(self, store: Store, item: _Item, error: BaseException) -> IngestResult:
        """Quarantine a message whose handling failed unexpectedly; a store that cannot even do that is failed."""
        m, t = item
        reason = f"handling it failed unexpectedly: {_brief(error)}"
        event(log, logging.ERROR, "message quarantined: handling it failed", topic=m.topic[:200], error=_brief(error))
        try:
            self._committed(lambda: store.quarantine([_inbound(m, t)], "internal", reason), 1)
        except IngestFailedError:
            raise
        except Exception as e:
            raise IngestFailedError(f"the store cannot quarantine a message: {_brief(e)}") from e
        self.stats.internal += 1
        return IngestResult(None, False, "internal", topic_device_any(m.topic))

    def _quarantine_shed(self, store: Store) -> None:
        shed = self._queue.take_shed()
        if not shed:
            return
        now = self._clock()
        rows = [Inbound(topic, b"", now) for _dev, topic, _n in shed]
        for dev, _topic, n in shed:
            self._spend(dev, n, "shed", now)
            if self._throttle.allow("shed", dev) is not None:
                event(log, logging.WARNING, "QoS 0 messages dropped: the device's queue is full", device=dev, n=n)
        reason = (
            "QoS 0 messages dropped unread: the device's queue was full ("
            + ", ".join(f"{d or '?'}: {n}" for d, _t, n in shed)[:900]
        )
        self._committed(lambda: store.quarantine(rows, "shed", reason + ")"), len(rows))

    def _committed(self, fn: Callable[[], T], n: int) -> T | None:
        """``fn()`` until it commits; on ``StoreUnavailableError`` count, log and back off. None if stopped meanwhile.

        Raises:
            IngestFailedError: the store stayed unavailable for ``store_timeout_s``.
        """
        delay = _RETRY_MIN_S
        since: float | None = None
        while True:
            try:
                return fn()
            except StoreUnavailableError as e:
                now = self.heartbeat = time.monotonic()  # retrying is turning, not hanging
                since = now if since is None else since
                self.stats.store_errors += 1
                self.metrics.store_errors.inc()
                if now - since >= self._store_timeout:
                    raise IngestFailedError(
                        f"the store has been unavailable for {now - since:.0f} s (limit {self._store_timeout:g} s): {e}"
                    ) from e
                event(log, logging.ERROR, f"{n} message(s) not stored; retrying", error=str(e)[:500])
                if self._stopping.wait(delay):
                    return None
                delay = min(delay * 2, _RETRY_MAX_S)

    def _done(self, batch: list[_Item], results: list[IngestResult]) -> None:
        """Count, log and acknowledge a committed batch."""
        stored_at = self._clock()
        self.stats.batches += 1
        stored: list[str] = []
        asked: list[str] = []
        for (m, _t), res in zip(batch, results, strict=True):
            self._count(m, res)
            if not m.ack():
                self.metrics.ack_lost.inc()
            if res.device_id is None or not res.stored:
                continue
            if res.outcome in ("recorded", "superseded"):
                asked.append(res.device_id)
            elif topic_route(m.topic)[0] == TELEMETRY:
                stored.append(res.device_id)
        if self.receipts is not None:
            self.receipts.note(stored)
            self.receipts.note(asked, force=True)
        self.metrics.observe(results, stored_at=stored_at, received_at=[t for _m, t in batch])

    def _count(self, m: Incoming, res: IngestResult) -> None:
        v = res.verdict
        if v is not None and v.accepted:
            self.stats.accepted += 1
            self.stats.records += len(v.records)
            if v.missing and v.kind in (VerdictKind.GAP, VerdictKind.FIRST) and v.counter is not None:
                self._gap(v.device_id or "", v.counter, v.missing)
            return
        if res.outcome in ("recorded", "superseded", "cleared"):
            self.stats.statuses += 1
            return
        if res.stored:
            self.stats.duplicates += 1
            return
        if res.outcome == "malformed" and v is None:
            self.stats.bad_statuses += 1
        elif res.outcome != "internal":
            self.stats.rejected += 1
        if res.outcome != "internal" and res.device_id:  # the gateway's own failure is not the box's reject
            self._spend(res.device_id, 1, res.outcome, self._clock())
        suppressed = self._throttle.allow(res.device_id or "", res.outcome)
        if suppressed is not None:
            event(
                log,
                logging.WARNING,
                "message rejected",
                topic=m.topic[:200],
                verdict=res.outcome,
                reason=(v.reason if v is not None else "")[:300],
                device=res.device_id,
                suppressed=suppressed,
            )

    def _gap(self, device: str, counter: int, missing: int) -> None:
        """A gap: counters ``counter - missing .. counter - 1`` have not arrived (yet). Logged, counted."""
        self.stats.gaps += 1
        self.metrics.gaps.inc()
        suppressed = self._throttle.allow(device, "gap")
        if suppressed is not None:
            event(
                log,
                logging.WARNING,
                "gap in a box's chain: envelopes missing",
                device=device,
                first_missing=counter - missing,
                last_missing=counter - 1,
                missing=missing,
                received=counter,
                suppressed=suppressed,
            )

    def _spend(self, device_id: str, n: int, kind: str, now: float) -> None:
        if self._budget is not None and device_id and self._budget.spend(device_id, n, now):
            self._overdrawn[device_id] = kind

    def _suspend(self, store: Store) -> None:
        """Record the suspension of every box that overdrew its budget (outside the batch transaction)."""
        if self._budget is None:
            return
        if time.monotonic() - self._budget_swept > 60.0:
            self._budget.forget_idle(self._clock())
            self._budget_swept = time.monotonic()
        if not self._overdrawn:
            return
        overdrawn, self._overdrawn = self._overdrawn, {}
        for dev, kind in sorted(overdrawn.items()):
            now = self._clock()
            reason = (
                f"more than {self._budget.burst} rejected messages at once (the budget refills "
                f"{self._budget.per_s:g}/s); the last one: {kind}"
            )

            def record(d: str = dev, t: float = now, r: str = reason) -> Suspension | None:
                return store.suspend(d, now=t, base_s=self._suspend_s, reason=r, by=self._gateway_id)

            try:
                found = self._committed(record, 1)
            except IngestFailedError:
                raise
            except Exception as e:  # a suspension is a defence, not ingest: log it and carry on ingesting
                event(log, logging.ERROR, "suspension not recorded", device=dev, error=_brief(e))
                continue
            if found is None or found.since != now:
                continue  # unregistered, or suspended already (by us or another gateway)
            self.stats.suspensions += 1
            self.metrics.suspensions.inc()
            event(
                log,
                logging.WARNING,
                "device suspended",
                device=dev,
                until=found.until,
                strikes=found.strikes,
                reason=reason,
            )
            if self.on_suspended is not None:
                self.on_suspended(found)


def _inbound(m: Incoming, t: float) -> Inbound:
    return Inbound(m.topic, m.payload, t)


def _brief(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:300]
