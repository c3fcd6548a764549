"""The loss arithmetic of the box's uplink, sans-IO: what went unsent, and the signed notice that says so.

Two places drop telemetry. The outbox deletes sealed envelopes (over its bounds, on a full disk, or rows whose bytes
rotted); the sink drops records it holds in memory while the outbox refuses them, before they ever got a counter.
Both are stated as a ``Loss`` and announced in one format, a ``LossNotice`` record (type 3) at the head of the next
envelope sealed, which the fleet's ledger counts (``announced_lost`` / ``announced_lost_records``).

Invariants:
- A ``Loss`` is either empty or announceable: envelopes >= 1 with 1 <= first <= last and envelopes <= last - first
  + 1, or unsealed records only (envelopes, records, first and last all 0), or both.
- Merging adds counts and spans ranges: the losses merged are disjoint sets of counters (an envelope is dropped at
  most once), so the sums are exact and the range explains every counter of each part.
- Nothing is capped silently: one notice holds at most ``MAX_UNSEALED_RECORDS`` unsealed records; ``split`` returns
  the rest for the next notice, and ``PendingLoss`` offers the sink's records in pieces of that size.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge.wire.schema import MAX_UNSEALED_RECORDS, LossNotice

__all__ = ["Loss", "PendingLoss", "merge"]


@dataclass(frozen=True, slots=True)
class Loss:
    """Telemetry gone unsent that an envelope must announce.

    Attributes:
        envelopes: sealed envelopes dropped.
        records: the caller's records those envelopes held.
        first: the lowest counter dropped (0 when no envelope was).
        last: the highest counter dropped (0 when no envelope was).
        unsealed: records dropped before they were sealed (they never had a counter).
    """

    envelopes: int = 0
    records: int = 0
    first: int = 0
    last: int = 0
    unsealed: int = 0

    def __post_init__(self) -> None:
        if min(self.envelopes, self.records, self.first, self.last, self.unsealed) < 0:
            raise ValueError(f"loss counts must not be negative: {self}")
        if self.envelopes:
            if not 1 <= self.first <= self.last or self.envelopes > self.last - self.first + 1:
                raise ValueError(f"{self.envelopes} envelopes cannot lie in counters {self.first}..{self.last}")
        elif (self.records, self.first, self.last) != (0, 0, 0):
            raise ValueError(f"a loss without envelopes has no records or counters: {self}")

    @classmethod
    def of_envelopes(cls, first: int, last: int, *, envelopes: int, records: int) -> Loss:
        """Envelopes ``first..last`` dropped (``envelopes`` of them, holding ``records`` records).

        Raises:
            ValueError: the counts do not fit the range.
        """
        return cls(envelopes, records, first, last)

    @classmethod
    def of_unsealed(cls, records: int) -> Loss:
        """Records dropped before they were sealed.

        Raises:
            ValueError: ``records`` is negative.
        """
        return cls(unsealed=records)

    @classmethod
    def from_notice(cls, notice: LossNotice) -> Loss:
        """The loss a notice announced (to carry it forward when the envelope holding it is dropped in turn)."""
        return cls(
            notice.envelopes_dropped,
            notice.records_dropped,
            notice.first_counter,
            notice.last_counter,
            notice.unsealed_records,
        )

    def __bool__(self) -> bool:
        """Whether there is anything to announce."""
        return bool(self.envelopes or self.unsealed)

    def merge(self, other: Loss | None) -> Loss:
        """This loss and ``other`` (a disjoint set of counters) as one.

        Returns:
            The sum of the counts over the span of both ranges.
        """
        if not other:
            return self
        if not self:
            return other
        if not other.envelopes:
            first, last = self.first, self.last
        elif not self.envelopes:
            first, last = other.first, other.last
        else:
            first, last = min(self.first, other.first), max(self.last, other.last)
        return Loss(
            self.envelopes + other.envelopes,
            self.records + other.records,
            first,
            last,
            self.unsealed + other.unsealed,
        )

    def split(self) -> tuple[Loss, Loss]:
        """What one notice can announce, and the rest (unsealed records beyond ``MAX_UNSEALED_RECORDS``)."""
        if self.unsealed <= MAX_UNSEALED_RECORDS:
            return self, Loss()
        head = Loss(self.envelopes, self.records, self.first, self.last, MAX_UNSEALED_RECORDS)
        return head, Loss.of_unsealed(self.unsealed - MAX_UNSEALED_RECORDS)

    def notice(self, now: float) -> LossNotice:
        """The record that announces this loss.

        Args:
            now: when it is announced (epoch seconds).

        Raises:
            ValueError: the loss is empty, or holds more unsealed records than one notice may (``split`` first).
        """
        if not self:
            raise ValueError("nothing to announce")
        if self.unsealed > MAX_UNSEALED_RECORDS:
            raise ValueError(f"{self.unsealed} unsealed records: one notice holds {MAX_UNSEALED_RECORDS}")
        return LossNotice(now, self.envelopes, self.records, self.first, self.last, self.unsealed)


def merge(a: Loss | None, b: Loss | None) -> Loss | None:
    """``a`` merged with ``b``; None when both are None or empty."""
    if a is None:
        return b or None
    return a.merge(b) or None


class PendingLoss:
    """Records dropped before sealing that no committed envelope has announced yet (the sink keeps one).

    The sink calls ``drop`` when it lets records go, ``offer`` for the part the next seal should announce, and
    ``announced`` once that seal committed; a seal that fails announces nothing, so the records stay pending.
    """

    def __init__(self) -> None:
        """Nothing pending."""
        self._records = 0

    @property
    def records(self) -> int:
        """Dropped records not announced yet."""
        return self._records

    def drop(self, records: int) -> None:
        """Count ``records`` dropped records.

        Raises:
            ValueError: ``records`` is negative.
        """
        if records < 0:
            raise ValueError(f"cannot drop {records} records")
        self._records += records

    def offer(self) -> int:
        """How many records the next envelope should announce (at most one notice's worth; 0 for none)."""
        return min(self._records, MAX_UNSEALED_RECORDS)

    def announced(self, records: int) -> None:
        """An envelope announcing ``records`` (from ``offer``) was committed.

        Raises:
            ValueError: it announces more than is pending, or a negative count.
        """
        if not 0 <= records <= self._records:
            raise ValueError(f"{records} records announced, {self._records} pending")
        self._records -= records
