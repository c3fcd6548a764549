"""The state of one ingest batch: keys and chain heads loaded once, ledger increments summed in memory.

``BatchState`` is the verifier's ``KeyLookup`` and ``ChainStateStore`` for the duration of one transaction. The
common path (an envelope that extends its chain) touches no database at all: heads come from the rows the batch
locked, new links are remembered in memory until the batch writes them with one ``executemany``. Only the rare
paths (a counter at or below the head, a gap, a late fill) read or write through ``Backing``.

Invariants:
- A revoked device has no key from its ``revoked_at`` on, judged by the message's ``received_at`` (``now``).
- The chain of a device is read only if the batch locked its row (``chains``); anything else is a bug and raises.
- ``LedgerTally`` holds increments (a late fill's ``missing`` is negative), written as ``column + increment``;
  its rows come out sorted by key, the order in which a batch takes the ledger's row locks, so two concurrent
  batches never deadlock on them.
- Loss notices count each dropped counter once per device: a notice adds only the part of its range above the
  device's ``lost_mark`` (the highest counter announced so far), so repeating a notice adds nothing and a device's
  announced losses never exceed its counter range (``edge.wire._bounds`` says why that keeps every sum
  inside 64 bits). A notice carried by a late envelope, below a later notice's range, adds nothing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge.fleet.errors import StoreError
from edge.fleet.store._sql import LEDGER_COUNTERS
from edge.wire._bounds import MAX_RECORDS_PER_ENVELOPE
from edge.wire.chain import ChainLink
from edge.wire.records import InferenceRecord, ReadingRecord
from edge.wire.schema import EventRecord, LossNotice, TelemetryRecord

__all__ = ["Backing", "BatchState", "ChainRow", "DeviceKey", "Hole", "LedgerTally"]

_FIELD = {name: i for i, name in enumerate(LEDGER_COUNTERS)}
_ENVELOPES, _RECORDS, _READINGS, _EVENTS, _LATE, _LOST, _LOST_RECORDS = (
    _FIELD[n]
    for n in ("envelopes", "records", "readings", "events", "late", "announced_lost", "announced_lost_records")
)


@dataclass(frozen=True, slots=True)
class DeviceKey:
    """A registered device as the key lookup needs it."""

    key: Ed25519PublicKey
    revoked_at: float | None
    enrolled_at: float


@dataclass(slots=True)
class ChainRow:
    """A device's locked chain row, changed in memory and written back once per batch."""

    head: ChainLink | None
    gaps: int
    last_accepted: float | None
    lost_mark: int = 0
    dirty: bool = False

    def announce(self, notice: LossNotice) -> tuple[int, int]:
        """Count a loss notice against ``lost_mark`` (see the module docstring).

        Records dropped before sealing (``unsealed_records``) have no counter to repeat: they count in full, once
        per accepted envelope that carries the notice.

        Returns:
            (envelopes, records) it adds to the ledger.
        """
        mark, unsealed = self.lost_mark, notice.unsealed_records
        if notice.last_counter <= mark:
            return 0, unsealed
        self.lost_mark = notice.last_counter
        self.dirty = True
        if notice.first_counter > mark:
            return notice.envelopes_dropped, notice.records_dropped + unsealed
        envelopes = min(notice.envelopes_dropped, notice.last_counter - mark)
        return envelopes, min(notice.records_dropped, envelopes * MAX_RECORDS_PER_ENVELOPE) + unsealed


@dataclass(frozen=True, slots=True)
class Hole:
    """An open range of missing counters and the UTC day the gap that opened it was received."""

    lo: int
    hi: int
    day: str


class Backing(Protocol):
    """The database side of a batch (the store implements it inside the batch's transaction)."""

    def load_device_key(self, device_id: str) -> DeviceKey | None:
        """The device's key and revocation time, or None if it is not registered."""

    def stored_link(self, device_id: str, counter: int) -> ChainLink | None:
        """The stored envelope at ``counter``, or None."""

    def hole_at(self, device_id: str, counter: int) -> Hole | None:
        """The open hole containing ``counter``, or None."""

    def replace_hole(self, device_id: str, old_lo: int | None, new: list[Hole]) -> None:
        """Delete the hole starting at ``old_lo`` (if given) and insert ``new``."""


@dataclass(slots=True)
class LedgerTally:
    """Ledger increments of one batch, per (device, day) and per (device, day, model)."""

    counts: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    inferences: Counter[tuple[str, str, str]] = field(default_factory=Counter)

    def add(self, device_id: str, day: str, name: str, n: int = 1) -> None:
        """Add ``n`` to one counter.

        Args:
            device_id: the device.
            day: the UTC day.
            name: a ``LEDGER_COUNTERS`` column.
            n: the increment (negative for a late fill's ``missing``).
        """
        row = self.counts.get((device_id, day))
        if row is None:
            row = self.counts[device_id, day] = [0] * len(LEDGER_COUNTERS)
        row[_FIELD[name]] += n

    def accepted(
        self, device_id: str, day: str, records: tuple[TelemetryRecord, ...], *, late: bool, chain: ChainRow
    ) -> None:
        """Count an accepted envelope and its records.

        Args:
            device_id: the device.
            day: the UTC day it was received.
            records: its records.
            late: it filled a hole.
            chain: the device's chain row (its loss notices move ``lost_mark``).
        """
        row = self.counts.get((device_id, day))
        if row is None:
            row = self.counts[device_id, day] = [0] * len(LEDGER_COUNTERS)
        readings = events = lost = lost_records = 0
        models: Counter[str] = Counter()
        for r in records:
            t = type(r)
            if t is InferenceRecord:
                models[r.model_id] += 1  # type: ignore[union-attr]
            elif t is ReadingRecord:
                readings += 1
            elif t is EventRecord:
                events += 1
            elif t is LossNotice:
                envelopes, dropped = chain.announce(r)  # type: ignore[arg-type]
                lost += envelopes
                lost_records += dropped
        row[_ENVELOPES] += 1
        row[_RECORDS] += len(records)
        row[_READINGS] += readings
        row[_EVENTS] += events
        row[_LATE] += late
        row[_LOST] += lost
        row[_LOST_RECORDS] += lost_records
        for model, n in models.items():
            self.inferences[device_id, day, model] += n

    def ledger_rows(self) -> list[tuple[object, ...]]:
        """(device, day, *counters) rows, sorted by (device, day)."""
        return [(dev, day, *row) for (dev, day), row in sorted(self.counts.items())]

    def inference_rows(self) -> list[tuple[str, str, str, int]]:
        """(device, day, model, count) rows, sorted."""
        return [(dev, day, model, n) for (dev, day, model), n in sorted(self.inferences.items())]


class BatchState:
    """Keys and chain state for one batch (``KeyLookup`` and ``ChainStateStore`` of ``edge.wire.chain``)."""

    def __init__(
        self,
        backing: Backing,
        devices: dict[str, DeviceKey | None],
        chains: dict[str, ChainRow],
        tally: LedgerTally,
    ) -> None:
        """Create the state of a batch.

        Args:
            backing: the database, for the rare paths.
            devices: devices already looked up (None: not registered); others are loaded on demand.
            chains: the chain rows the batch locked, by device id.
            tally: where gap and late-fill ``missing`` changes are counted.
        """
        self._backing = backing
        self._devices = devices
        self.chains = chains
        self._tally = tally
        self._new: dict[tuple[str, int], ChainLink] = {}
        self.now = 0.0
        self.day = ""

    def at(self, now: float, day: str) -> None:
        """Set the receipt time and day of the message about to be verified."""
        self.now = now
        self.day = day

    def device(self, device_id: str) -> DeviceKey | None:
        """The registered device (revoked or not), or None."""
        if device_id not in self._devices:
            self._devices[device_id] = self._backing.load_device_key(device_id)
        return self._devices[device_id]

    # KeyLookup

    def lookup(self, device_id: str) -> Ed25519PublicKey | None:
        """The device's key, or None if it is unknown or was revoked at or before ``now``."""
        dev = self.device(device_id)
        if dev is None or (dev.revoked_at is not None and self.now >= dev.revoked_at):
            return None
        return dev.key

    # ChainStateStore

    def _chain(self, device_id: str) -> ChainRow:
        chain = self.chains.get(device_id)
        if chain is None:
            raise StoreError(f"internal error: the chain of {device_id!r} was not locked by this batch")
        return chain

    def head(self, device_id: str) -> ChainLink | None:
        """The device's head link."""
        return self._chain(device_id).head

    def link_at(self, device_id: str, counter: int) -> ChainLink | None:
        """The accepted link at ``counter``: the head, one accepted in this batch, or a stored one."""
        head = self._chain(device_id).head
        if head is not None and head.counter == counter:
            return head
        link = self._new.get((device_id, counter))
        if link is not None:
            return link
        return self._backing.stored_link(device_id, counter)

    def is_missing(self, device_id: str, counter: int) -> bool:
        """Whether ``counter`` is inside an open hole."""
        return self._backing.hole_at(device_id, counter) is not None

    def advance(self, device_id: str, link: ChainLink, *, missing_from: int | None) -> None:
        """Make ``link`` the head; open a hole for a gap and count its missing counters on today's ledger."""
        chain = self._chain(device_id)
        chain.head = link
        chain.dirty = True
        self._new[device_id, link.counter] = link
        if missing_from is not None and missing_from < link.counter:
            n = link.counter - missing_from
            self._backing.replace_hole(device_id, None, [Hole(missing_from, link.counter - 1, self.day)])
            chain.gaps += n
            self._tally.add(device_id, self.day, "missing", n)

    def fill(self, device_id: str, link: ChainLink) -> None:
        """Close ``link.counter`` in its hole; the day that opened the hole gets one ``missing`` fewer."""
        chain = self._chain(device_id)
        c = link.counter
        hole = self._backing.hole_at(device_id, c)
        if hole is None:
            raise StoreError(f"internal error: late counter {c} of {device_id!r} is in no hole")
        pieces = [Hole(lo, hi, hole.day) for lo, hi in ((hole.lo, c - 1), (c + 1, hole.hi)) if lo <= hi]
        self._backing.replace_hole(device_id, hole.lo, pieces)
        chain.gaps -= 1
        chain.dirty = True
        self._new[device_id, c] = link
        self._tally.add(device_id, hole.day, "missing", -1)
