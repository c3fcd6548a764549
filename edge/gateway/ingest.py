"""Ingest: messages from the broker → batches → one store transaction each → acknowledgements.

Invariants:
- A telemetry message is acknowledged (PUBACK) only after the transaction that verified and stored it committed.
  If the gateway dies before that, the broker still holds the message for the gateway's persistent session and
  redelivers it; the store is idempotent (a redelivered envelope is a ``duplicate``, stored once).
- A failed transaction (``StoreError``: the database is down or locked) acknowledges nothing; the same batch is
  retried with backoff until it commits or the gateway stops, so nothing is lost and nothing is skipped.
- Memory is bounded by the broker: the gateway's Receive Maximum caps the messages in flight to it.
- Status messages (retained JSON on ``devices/<id>/status``) are recorded as they come; a malformed one is counted,
  logged and acknowledged, because redelivering it would not make it valid.

One ``IngestLoop`` owns one worker thread and one ``Store`` opened on that thread (stores are per-thread).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from edge.gateway.errors import StoreError
from edge.gateway.metrics import GatewayMetrics
from edge.gateway.store import Inbound, Store
from edge.identity.keys import validate_device_id
from edge.log import event
from edge.telemetry.transport import Incoming

__all__ = ["IngestLoop", "IngestStats", "MAX_STATUS_BYTES"]

log = logging.getLogger("edge.gateway.ingest")

MAX_STATUS_BYTES = 16 * 1024
_RETRY_MIN_S, _RETRY_MAX_S = 0.2, 5.0
T = TypeVar("T")


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


class IngestLoop:
    """Batches incoming telemetry into store transactions and acknowledges what committed.

    Args:
        open_store: opens the store; called once, on the worker thread.
        metrics: where to count.
        batch_max: the most messages per transaction.
        batch_wait_s: how long the first message of a batch waits for company.
        clock: wall-clock seconds (receipt and commit times).
    """

    def __init__(
        self,
        open_store: Callable[[], Store],
        metrics: GatewayMetrics,
        *,
        batch_max: int = 200,
        batch_wait_s: float = 0.02,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._open_store = open_store
        self.metrics = metrics
        self._batch_max = max(1, batch_max)
        self._batch_wait = max(0.0, batch_wait_s)
        self._clock = clock
        self._queue: queue.SimpleQueue[tuple[Incoming, float] | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.stats = IngestStats()

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
        self._queue.put((msg, self._clock()))
        self.metrics.queue.inc()

    def stop(self, timeout: float = 10.0) -> None:
        """Store and acknowledge what was received so far, then stop the worker.

        Args:
            timeout: seconds to wait for the last batch.
        """
        self._stopping.set()
        self._queue.put(None)
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
                batch, last = self._next_batch()
                if batch:
                    self._handle(store, batch)
                if last:
                    return
        finally:
            store.close()

    def _next_batch(self) -> tuple[list[tuple[Incoming, float]], bool]:
        """Up to ``batch_max`` messages: waits for the first, then at most ``batch_wait`` for the rest."""
        first = self._queue.get()
        if first is None:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self._batch_wait
        while len(batch) < self._batch_max:
            try:
                # Take what is already queued without waiting; wait only while the batch is young.
                item = self._queue.get_nowait()
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    item = self._queue.get(timeout=left)
                except queue.Empty:
                    break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _handle(self, store: Store, batch: list[tuple[Incoming, float]]) -> None:
        self.metrics.queue.dec(len(batch))
        self.stats.messages += len(batch)
        telemetry = []
        for m, t in batch:
            if m.topic.endswith("/telemetry"):
                telemetry.append((m, t))
            else:
                self._status(store, m, t)
        if telemetry:
            self._telemetry(store, telemetry)

    def _retrying(self, what: str, fn: Callable[[], T]) -> T | None:
        """``fn()`` until it commits; on ``StoreError`` count, log and back off. None if stopped meanwhile."""
        delay = _RETRY_MIN_S
        while True:
            try:
                return fn()
            except StoreError as e:
                self.stats.store_errors += 1
                self.metrics.store_errors.inc()
                event(log, logging.ERROR, f"{what} not stored; retrying", error=str(e))
                if self._stopping.wait(delay):
                    return None
                delay = min(delay * 2, _RETRY_MAX_S)

    def _telemetry(self, store: Store, batch: list[tuple[Incoming, float]]) -> None:
        inbound = [Inbound(m.topic, m.payload, t) for m, t in batch]
        results = self._retrying(f"batch of {len(batch)}", lambda: store.ingest(inbound))
        if results is None:
            # Stopping with the database down: leave the batch unacknowledged; the broker redelivers it.
            event(log, logging.WARNING, "stopped with a batch unstored; the broker keeps it", n=len(batch))
            return
        stored_at = self._clock()
        self.stats.batches += 1
        for (m, _t), res in zip(batch, results, strict=True):
            v = res.verdict
            if v.accepted:
                self.stats.accepted += 1
                self.stats.records += len(v.records)
            elif res.stored:
                self.stats.duplicates += 1
            else:
                self.stats.rejected += 1
                event(
                    log,
                    logging.WARNING,
                    "envelope rejected",
                    topic=m.topic,
                    verdict=v.kind.value,
                    reason=v.reason,
                    device=v.device_id,
                )
            if not m.ack():
                self.metrics.ack_lost.inc()
        self.metrics.observe(results, stored_at=stored_at, received_at=[t for _m, t in batch])

    def _status(self, store: Store, m: Incoming, t: float) -> None:
        parts = m.topic.split("/")
        try:
            if len(parts) != 3 or parts[0] != "devices" or parts[2] != "status":
                raise ValueError(f"not a status topic: {m.topic!r:.100}")
            device_id = validate_device_id(parts[1])
            if len(m.payload) > MAX_STATUS_BYTES:
                raise ValueError(f"{len(m.payload)} bytes > {MAX_STATUS_BYTES}")
            if not m.payload:
                # An empty retained message clears the topic: nothing to record.
                m.ack()
                return
            body = json.loads(m.payload)
            if not isinstance(body, dict):
                raise ValueError("status is not a JSON object")

            def record() -> bool:
                store.record_status(device_id, body, t)
                return True

            # The store may still refuse valid JSON (too large once normalised, say): an InputError, caught below.
            if self._retrying("status", record) is None:
                return  # stopping: unacknowledged, the broker redelivers it
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, InvalidDeviceIdError, InputError
            # Acknowledged all the same: redelivering a malformed status would not make it valid.
            self.stats.bad_statuses += 1
            self.metrics.statuses.labels(outcome="malformed").inc()
            event(log, logging.WARNING, "status message rejected", topic=m.topic[:200], error=str(e)[:200])
            m.ack()
            return
        self.stats.statuses += 1
        self.metrics.statuses.labels(outcome="recorded").inc()
        m.ack()
