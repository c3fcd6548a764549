"""A read-only look at a box's outbox, for ``edge telemetry status``: safe while the service runs.

Opens the SQLite file read-only (no key needed, nothing written, the service's transactions undisturbed) and reads
the head, the backlog and the delivery row in one read transaction, so the figures add up.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from edge.errors import InputError
from edge.telemetry._delivery import DeliveryStats, read_delivery

__all__ = ["OutboxReport", "OutboxUnreadableError", "inspect_outbox"]


class OutboxUnreadableError(InputError):
    """The outbox file is missing, not an outbox, or of an older schema than this command reads."""


@dataclass(frozen=True, slots=True)
class OutboxReport:
    """What a box has sealed, delivered and still holds.

    Attributes:
        device_id: whose outbox it is.
        sealed: envelopes sealed, ever (the last counter issued).
        backlog_envelopes, backlog_records, backlog_bytes: what it still holds (not receipted yet).
        oldest_counter: the lowest counter it holds, None when empty.
        oldest_created: when that envelope was sealed (epoch seconds), None when empty.
        dropped_envelopes, dropped_records: deleted unsent by its bounds, ever (announced by loss notices).
        corrupt_rows: removed because their bytes rotted, ever (announced too).
        delivery: the latest receipt and what receipts and PUBACKs deleted.
    """

    device_id: str
    sealed: int
    backlog_envelopes: int
    backlog_records: int
    backlog_bytes: int
    oldest_counter: int | None
    oldest_created: float | None
    dropped_envelopes: int
    dropped_records: int
    corrupt_rows: int
    delivery: DeliveryStats


def inspect_outbox(path: Path) -> OutboxReport:
    """Read an outbox without changing it.

    Args:
        path: the outbox file (``telemetry.outbox``).

    Raises:
        OutboxUnreadableError: the file is missing or is not an outbox this version reads (the message says which).
    """
    if not path.is_file():
        raise OutboxUnreadableError(
            f'no outbox at {path} (telemetry.outbox): the service has not run with sink.kind = "telemetry" yet'
        )
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as e:
        raise OutboxUnreadableError(f"cannot open {path}: {e}") from e
    try:
        conn.execute("BEGIN")  # one snapshot for every figure
        head = conn.execute(
            "SELECT device_id, next_counter, backlog_envelopes, backlog_records, backlog_bytes, dropped_envelopes,"
            " dropped_records, corrupt_rows FROM head WHERE id = 0"
        ).fetchone()
        oldest = conn.execute("SELECT counter, created FROM envelopes ORDER BY counter LIMIT 1").fetchone()
        delivery = read_delivery(conn)
        conn.execute("COMMIT")
    except sqlite3.Error as e:
        raise OutboxUnreadableError(
            f"{path} is not an outbox this version reads ({e}); start the service once to migrate it"
        ) from e
    finally:
        conn.close()
    if head is None:
        raise OutboxUnreadableError(f"{path}: the head row is missing")
    device, next_counter, n, records, nbytes, dropped, dropped_records, corrupt = head
    return OutboxReport(
        device_id=device,
        sealed=next_counter - 1,
        backlog_envelopes=n,
        backlog_records=records,
        backlog_bytes=nbytes,
        oldest_counter=None if oldest is None else oldest[0],
        oldest_created=None if oldest is None else oldest[1],
        dropped_envelopes=dropped,
        dropped_records=dropped_records,
        corrupt_rows=corrupt,
        delivery=delivery,
    )
