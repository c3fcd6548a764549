"""The telemetry sink: records from the pipeline → batches → signed envelopes in the durable outbox → publisher.

Invariants:
- A record is either still in the in-memory batch (lost only if the process dies before the batch is sealed: at
  most one batch, ``batch_records`` records or ``batch_age_s`` seconds of them) or in a signed envelope in the
  outbox, which keeps it until the broker acknowledged it.
- Batches are sealed in order; several batches due at once are sealed in one transaction (one fsync).
- A record that cannot be encoded or is too large is rejected alone (counted, logged); its batch still goes out.
- When the outbox cannot take a batch (disk full after it dropped what policy allows) the batch stays in memory,
  the failure is counted and logged, and sealing is retried on the next write or tick: the service keeps running.
  Memory for such batches is bounded (``max_held_batches``); past it the oldest held batch is dropped, counted
  and logged, because by then the box has a full disk and an operator must act. Those records never got a
  counter, so the first envelope sealed afterwards starts with a signed loss notice (``LossNotice``, the outbox's
  own format, with ``unsealed_records``) that says how many, and the fleet's ledger counts them with the outbox's
  losses: loss is announced, never silent. The count is kept by ``edge.telemetry.loss.PendingLoss``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from edge.config import LIVE_SETTINGS
from edge.errors import InputError
from edge.log import event
from edge.telemetry.loss import PendingLoss
from edge.telemetry.outbox import EnvelopeTooLargeError, Outbox, OutboxError
from edge.wire.envelope import Batcher
from edge.wire.records import Record
from edge.wire.schema import DEFAULT_LIMITS, EventRecord, TelemetryLimits, TelemetryRecord, encode_record

__all__ = ["SinkStats", "TelemetrySink"]

log = logging.getLogger("edge.telemetry.sink")


@dataclass
class SinkStats:
    """Counters of the telemetry sink."""

    records: int = 0
    envelopes: int = 0
    rejected_records: int = 0
    seal_failures: int = 0
    held_batches: int = 0
    dropped_batches: int = 0
    dropped_records: int = 0


class TelemetrySink:
    """A ``Sink`` that signs and persists records for publication.

    Args:
        outbox: the durable outbox (it owns the counter and the chain).
        wake: called after each seal so the publisher starts at once (None: nobody to wake).
        batch_records: seal when this many records are waiting.
        batch_age_s: seal when the oldest waiting record is this old.
        max_held_batches: batches kept in memory while the outbox refuses them.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        outbox: Outbox,
        *,
        wake: Callable[[], None] | None = None,
        batch_records: int = 100,
        batch_age_s: float = 1.0,
        max_held_batches: int = 64,
        limits: TelemetryLimits = DEFAULT_LIMITS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.outbox = outbox
        self._limits = limits
        self.stats = SinkStats()
        self._wake = wake or (lambda: None)
        self._batcher: Batcher[TelemetryRecord] = Batcher(batch_records, batch_age_s)
        self._held: deque[list[TelemetryRecord]] = deque()
        self._max_held = max_held_batches
        self._lost = PendingLoss()  # records dropped from memory that no sealed notice has announced yet
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="edge-seal-timer", daemon=True)
        self._ticker.start()

    def write(self, records: Sequence[Record | EventRecord]) -> None:
        """Add records; seal every batch that became full."""
        with self._lock:
            now = self._clock()
            for r in records:
                batch = self._batcher.add(r, now)
                if batch is not None:
                    self._held.append(batch)
            self.stats.records += len(records)
            if self._held:
                self._seal_held()

    @property
    def batching(self) -> tuple[int, float]:
        """The current (batch_records, batch_age_s)."""
        with self._lock:
            return self._batcher.max_records, self._batcher.max_age_s

    def set_batching(self, batch_records: int | None = None, batch_age_s: float | None = None) -> None:
        """Change when batches are sealed, while records flow (the fleet's ``set`` command); thread-safe.

        Both values are validated first, with the configuration's own rules, so either both change or neither.
        A batch that the new values make due (it already holds ``batch_records`` records or is ``batch_age_s``
        old) is sealed at once.

        Args:
            batch_records: seal at this many records (an integer >= 1); None keeps the current value.
            batch_age_s: seal when the oldest record is this old (a finite number >= 0.001); None keeps it.

        Raises:
            ConfigError: a value is out of range; the message names the configuration key.
        """
        records = (
            None
            if batch_records is None
            else LIVE_SETTINGS["telemetry.batch_records"]("telemetry.batch_records", batch_records)
        )
        age = (
            None
            if batch_age_s is None
            else LIVE_SETTINGS["telemetry.batch_age_s"]("telemetry.batch_age_s", batch_age_s)
        )
        with self._lock:
            if records is not None:
                self._batcher.max_records = records
            if age is not None:
                self._batcher.max_age_s = age
            batch = self._batcher.due(self._clock())
            if batch is None and len(self._batcher) >= self._batcher.max_records:
                batch = self._batcher.flush()
            if batch:
                self._held.append(batch)
            if self._held:
                self._seal_held()

    def flush(self) -> None:
        """Seal whatever is waiting, full batch or not."""
        with self._lock:
            rest = self._batcher.flush()
            if rest:
                self._held.append(rest)
            if self._held:
                self._seal_held()

    def close(self) -> None:
        """Seal what is waiting and stop the age timer (the publisher is stopped by its owner)."""
        self._closed.set()
        self._ticker.join(timeout=5)
        self.flush()

    def _tick(self) -> None:
        # Seals batches by age; wakes a little after the batch deadline, or every 0.5 s when idle.
        while not self._closed.is_set():
            with self._lock:
                deadline = self._batcher.deadline()
            wait = 0.5 if deadline is None else max(0.0, deadline - self._clock())
            if self._closed.wait(min(wait, 0.5)):
                return
            with self._lock:
                batch = self._batcher.due(self._clock())
                if batch is not None:
                    self._held.append(batch)
                if self._held:
                    self._seal_held()

    def _seal_held(self) -> None:
        # Called with the lock held. Each retry makes the held batches strictly smaller, so this ends.
        filtered = False
        while self._held:
            unsealed = self._lost.offer()
            try:
                sealed = self.outbox.seal_many(list(self._held), unsealed=unsealed)
            except EnvelopeTooLargeError as e:
                if all(len(b) == 1 for b in self._held):
                    self._hold_after_failure(e)  # cannot happen with valid records; kept bounded all the same
                    return
                # Records that are each valid can still make an envelope over the limit: halve the batches.
                self._held = deque(h for b in self._held for h in (b[: len(b) // 2], b[len(b) // 2 :]) if h)
                continue
            except OutboxError as e:  # before InputError: a corrupt outbox file is not the records' fault
                self._hold_after_failure(e)
                return
            except InputError as e:
                if filtered:
                    # Every record encodes alone, yet the batch does not: drop it loudly rather than stall.
                    self._drop_held(e)
                    return
                # Some record cannot travel (unencodable, over a limit): reject it alone, seal the rest.
                self._held = deque(k for k in (self._valid_only(b) for b in self._held) if k)
                filtered = True
                continue
            self._held.clear()
            self._lost.announced(unsealed)
            self.stats.held_batches = 0
            self.stats.envelopes += len(sealed)
            self._wake()

    def _valid_only(self, batch: list[TelemetryRecord]) -> list[TelemetryRecord]:
        kept = []
        for r in batch:
            try:
                encode_record(r, self._limits)
            except InputError as e:
                self.stats.rejected_records += 1
                n = self.stats.rejected_records
                if n <= 10 or n % 1000 == 0:
                    event(log, logging.WARNING, "record rejected", error=str(e), count=n)
                continue
            kept.append(r)
        return kept

    def _drop_held(self, e: Exception) -> None:
        for lost in self._held:
            self.stats.dropped_batches += 1
            self.stats.dropped_records += len(lost)
            self._lost.drop(len(lost))
        self._held.clear()
        self.stats.held_batches = 0
        event(log, logging.ERROR, "telemetry batch dropped", error=str(e))

    def _hold_after_failure(self, e: OutboxError) -> None:
        self.stats.seal_failures += 1
        while len(self._held) > self._max_held:
            lost = self._held.popleft()
            self.stats.dropped_batches += 1
            self.stats.dropped_records += len(lost)
            self._lost.drop(len(lost))
        self.stats.held_batches = len(self._held)
        n = self.stats.seal_failures
        if n <= 10 or n % 100 == 0:
            event(log, logging.ERROR, "cannot seal telemetry", error=str(e), held_batches=len(self._held), count=n)
