"""The outbox's delivery state: applying a receipt, counting what PUBACKs deleted, reading the latest receipt.

Everything here runs inside the outbox's write transaction (``Outbox`` holds the lock and the transaction); the
functions take the connection and the head as that transaction sees it.

Invariants:
- An envelope is deleted on a receipt only if the receipt covers its counter (``Receipt.covers``, exact).
- A receipt that contradicts the outbox deletes nothing: one that names a counter this box never sealed, or whose
  hash at ``stored`` or ``head`` differs from the envelope the box holds (or last sealed) at that counter. Either
  means the fleet holds another history than this box (a fork, a restored backup, a key in the wrong hands), which
  an operator must look at; deleting on it could lose the box's own envelopes.
- The delivery row keeps the latest receipt that the box applied, never one older than it holds (a receipt with a
  lower ``head``, e.g. a retained one from before, does not replace it).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from edge.errors import InputError
from edge.telemetry._outbox_schema import READ_DELIVERY, Head
from edge.wire.receipts import Receipt

__all__ = ["Applied", "DeliveryStats", "ReceiptMismatchError", "apply_receipt", "count_acked", "read_delivery"]


class ReceiptMismatchError(InputError):
    """A signed receipt contradicts this outbox (another history at the fleet); nothing was deleted."""


@dataclass(frozen=True, slots=True)
class Applied:
    """What one receipt did.

    Attributes:
        deleted: envelopes it deleted from the outbox.
        records: the records they held.
        kept: it became the latest receipt kept.
    """

    deleted: int
    records: int
    kept: bool


@dataclass(frozen=True, slots=True)
class DeliveryStats:
    """The delivery row.

    Attributes:
        receipt: the latest receipt applied, as received (None before the first).
        stored, head, issued: its fields (0 before the first).
        receipted_envelopes, receipted_records: deleted because a receipt covered them, ever.
        acked_envelopes, acked_records: deleted on the broker's PUBACK (no receipt key), ever.
    """

    receipt: bytes | None
    stored: int
    head: int
    issued: float
    receipted_envelopes: int
    receipted_records: int
    acked_envelopes: int
    acked_records: int


def read_delivery(conn: sqlite3.Connection) -> DeliveryStats:
    """The delivery row."""
    row = conn.execute(READ_DELIVERY).fetchone()
    if row is None:
        raise sqlite3.DatabaseError("the delivery row is missing")
    data, *rest = row
    return DeliveryStats(None if data is None else bytes(data), *rest)


def _check_against(conn: sqlite3.Connection, head: Head, receipt: Receipt) -> None:
    sealed = head.next_counter - 1
    if receipt.head > sealed:
        raise ReceiptMismatchError(
            f"receipt says envelope {receipt.head} is stored, but this box has sealed only {sealed}: "
            "the fleet holds another history of this device"
        )
    for counter, want, name in (
        (receipt.head, receipt.head_hash, "head"),
        (receipt.stored, receipt.stored_hash, "stored"),
    ):
        if counter == 0:
            continue
        have: bytes | None = head.last_hash if counter == sealed else None
        if have is None:
            row = conn.execute("SELECT hash FROM envelopes WHERE counter = ?", (counter,)).fetchone()
            have = None if row is None else bytes(row[0])
        if have is not None and have != want:
            raise ReceiptMismatchError(
                f"receipt's {name} hash for envelope {counter} is not the hash of the envelope this box sealed: "
                "the fleet stored another envelope under this counter"
            )


def apply_receipt(conn: sqlite3.Connection, head: Head, receipt: Receipt, data: bytes) -> Applied:
    """Delete every envelope the receipt covers, count it, keep the receipt if it is the newest (in a transaction).

    Args:
        conn: the outbox's connection, inside a write transaction.
        head: the head as this transaction read it (its backlog is updated; the caller writes it).
        receipt: a verified receipt for this device.
        data: its bytes as received (kept as the box's proof of delivery).

    Returns:
        What it did.

    Raises:
        ReceiptMismatchError: it contradicts the outbox; nothing changed.
        sqlite3.Error: SQLite failed (the caller rolls back).
    """
    _check_against(conn, head, receipt)
    deleted = records = nbytes = 0
    for lo, hi in receipt.stored_ranges():
        rows = conn.execute(
            "DELETE FROM envelopes WHERE counter BETWEEN ? AND ? RETURNING records, bytes", (lo, hi)
        ).fetchall()
        deleted += len(rows)
        records += sum(r for r, _ in rows)
        nbytes += sum(b for _, b in rows)
    head.backlog_envelopes -= deleted
    head.backlog_records -= records
    head.backlog_bytes -= nbytes
    kept = read_delivery(conn)
    newer = (receipt.head, receipt.stored, receipt.issued) >= (kept.head, kept.stored, kept.issued)
    if newer:
        conn.execute(
            "UPDATE delivery SET receipt = ?, stored = ?, head = ?, issued = ?,"
            " receipted_envelopes = receipted_envelopes + ?, receipted_records = receipted_records + ? WHERE id = 0",
            (data, receipt.stored, receipt.head, receipt.issued, deleted, records),
        )
    elif deleted:
        conn.execute(
            "UPDATE delivery SET receipted_envelopes = receipted_envelopes + ?,"
            " receipted_records = receipted_records + ? WHERE id = 0",
            (deleted, records),
        )
    return Applied(deleted, records, newer)


def count_acked(conn: sqlite3.Connection, envelopes: int, records: int) -> None:
    """Count envelopes deleted on the broker's PUBACK (inside the ``ack`` transaction)."""
    conn.execute(
        "UPDATE delivery SET acked_envelopes = acked_envelopes + ?, acked_records = acked_records + ? WHERE id = 0",
        (envelopes, records),
    )
