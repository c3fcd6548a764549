"""The outbox's SQLite schema: creating it, checking an existing file against it, migrating schema 1.

Invariants:
- A file is an outbox of ours when ``application_id`` is "edob", ``user_version`` is ``SCHEMA_VERSION`` (or 1 or 2,
  migrated here), its tables have exactly the expected columns, and its head row names our device id and key. The
  owner is checked before any migration: another key would see every row as corrupt and delete it.
- Everything here runs inside the caller's opening transaction (``BEGIN IMMEDIATE``): all or nothing.
- The head row and the delivery row (the latest receipt and what receipts and PUBACKs deleted) are the only state
  besides the envelopes; ``Head`` is how one transaction sees and changes the head.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from edge.errors import InputError
from edge.log import event
from edge.telemetry.loss import Loss
from edge.wire.envelope import GENESIS_PREV, envelope_hash

__all__ = [
    "INSERT_ENVELOPE",
    "READ_DELIVERY",
    "SCHEMA_VERSION",
    "ForeignOwnerError",
    "Head",
    "Opened",
    "SchemaError",
    "open_schema",
    "read_head",
    "write_head",
]

log = logging.getLogger("edge.telemetry.outbox")

# PRAGMA user_version of an outbox of this schema (1: no row digests; 2: no delivery row; both migrated)
SCHEMA_VERSION: Final = 3
_APPLICATION_ID: Final = 0x65646F62  # "edob": marks the file as an edge outbox (PRAGMA application_id)
_MIGRATE_CHUNK: Final = 64  # rows read per step while migrating

# The blob is the last column: the small ones (and the digest) sit in the b-tree cell, so reading them (ack's
# RETURNING, drops) never walks the blob's overflow pages. ``hash`` is SHA-256 of ``data`` (= ``envelope_hash``).
_ENVELOPES_TABLE: Final = """CREATE TABLE {name} (
        counter INTEGER PRIMARY KEY,
        records INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        created REAL NOT NULL,
        hash BLOB NOT NULL,
        data BLOB NOT NULL
    )"""
# One row (id 0): the latest receipt that covered anything, as received (the box's proof of delivered work), and
# how many envelopes receipts (receipted_*) and, without a receipt key, the broker's PUBACKs (acked_*) deleted.
_DELIVERY_TABLE: Final = """CREATE TABLE delivery (
        id INTEGER PRIMARY KEY CHECK (id = 0),
        receipt BLOB,
        stored INTEGER NOT NULL,
        head INTEGER NOT NULL,
        issued REAL NOT NULL,
        receipted_envelopes INTEGER NOT NULL,
        receipted_records INTEGER NOT NULL,
        acked_envelopes INTEGER NOT NULL,
        acked_records INTEGER NOT NULL
    )"""
_NEW_DELIVERY: Final = "INSERT INTO delivery VALUES (0, NULL, 0, 0, 0.0, 0, 0, 0, 0)"
_DELIVERY_COLUMNS: Final = (
    "id",
    "receipt",
    "stored",
    "head",
    "issued",
    "receipted_envelopes",
    "receipted_records",
    "acked_envelopes",
    "acked_records",
)
READ_DELIVERY: Final = f"SELECT {', '.join(_DELIVERY_COLUMNS[1:])} FROM delivery WHERE id = 0"  # noqa: S608
_SCHEMA: Final = (
    _ENVELOPES_TABLE.format(name="envelopes"),
    _DELIVERY_TABLE,
    # One row (id 0). backlog_* mirror the envelopes table so bounds are checked without scanning it (an aggregate
    # would read every row). unannounced_* is loss (corrupt rows) that the next sealed envelope must report.
    """CREATE TABLE head (
        id INTEGER PRIMARY KEY CHECK (id = 0),
        device_id TEXT NOT NULL,
        public_key BLOB NOT NULL,
        next_counter INTEGER NOT NULL,
        last_hash BLOB NOT NULL,
        backlog_envelopes INTEGER NOT NULL,
        backlog_bytes INTEGER NOT NULL,
        backlog_records INTEGER NOT NULL,
        dropped_envelopes INTEGER NOT NULL,
        dropped_records INTEGER NOT NULL,
        corrupt_rows INTEGER NOT NULL,
        unannounced_envelopes INTEGER NOT NULL,
        unannounced_records INTEGER NOT NULL,
        unannounced_first INTEGER NOT NULL,
        unannounced_last INTEGER NOT NULL
    )""",
)
_ENVELOPE_COLUMNS: Final = ("counter", "records", "bytes", "created", "hash", "data")
_V1_ENVELOPE_COLUMNS: Final = ("counter", "data", "records", "bytes", "created")  # schema 1, migrated on open
_HEAD_COLUMNS: Final = (
    "id",
    "device_id",
    "public_key",
    "next_counter",
    "last_hash",
    "backlog_envelopes",
    "backlog_bytes",
    "backlog_records",
    "dropped_envelopes",
    "dropped_records",
    "corrupt_rows",
    "unannounced_envelopes",
    "unannounced_records",
    "unannounced_first",
    "unannounced_last",
)
_HEAD_STATE: Final = _HEAD_COLUMNS[3:]  # what a transaction may change
_READ_HEAD: Final = f"SELECT {', '.join(_HEAD_STATE)} FROM head WHERE id = 0"  # noqa: S608 -- constants
_WRITE_HEAD: Final = f"UPDATE head SET {', '.join(f'{c} = ?' for c in _HEAD_STATE)} WHERE id = 0"  # noqa: S608
_INSERT_INTO: Final = "INSERT INTO {} (counter, records, bytes, created, hash, data) VALUES (?, ?, ?, ?, ?, ?)"
INSERT_ENVELOPE: Final = _INSERT_INTO.format("envelopes")


class SchemaError(InputError):
    """The file is not an outbox of this schema, or its head is inconsistent (the message names the path).

    The file is input the outbox did not write (or not as it is now); ``Outbox`` raises it as ``OutboxFormatError``.
    """


class ForeignOwnerError(SchemaError):
    """The outbox belongs to another device id or another key."""


@dataclass
class Head:
    """The head row as one transaction sees and changes it."""

    next_counter: int
    last_hash: bytes
    backlog_envelopes: int
    backlog_bytes: int
    backlog_records: int
    dropped_envelopes: int
    dropped_records: int
    corrupt_rows: int
    unannounced_envelopes: int
    unannounced_records: int
    unannounced_first: int
    unannounced_last: int

    def unannounced(self) -> Loss | None:
        """The loss (corrupt rows) the next sealed envelope must announce, or None."""
        if self.unannounced_envelopes == 0:
            return None
        return Loss.of_envelopes(
            self.unannounced_first,
            self.unannounced_last,
            envelopes=self.unannounced_envelopes,
            records=self.unannounced_records,
        )

    def set_unannounced(self, loss: Loss | None) -> None:
        """Record ``loss`` as not yet announced (None: everything was).

        Raises:
            ValueError: ``loss`` holds unsealed records, which the head has no column for (only the sink has them).
        """
        loss = loss or Loss()
        if loss.unsealed:
            raise ValueError(f"the head cannot keep {loss.unsealed} unsealed records")
        self.unannounced_envelopes, self.unannounced_records = loss.envelopes, loss.records
        self.unannounced_first, self.unannounced_last = loss.first, loss.last

    def remove_corrupt(self, counter: int, records: int, size: int) -> int:
        """Take a corrupt row out of the backlog as unannounced loss: the next envelope sealed reports it.

        Returns:
            The records it held (a negative count from a damaged row counts as 0).
        """
        records, size = max(int(records), 0), int(size)
        self.backlog_envelopes -= 1
        self.backlog_bytes -= size
        self.backlog_records -= records
        self.corrupt_rows += 1
        row = Loss.of_envelopes(counter, counter, envelopes=1, records=records)
        self.set_unannounced(row.merge(self.unannounced()))
        return records


def read_head(conn: sqlite3.Connection) -> Head | None:
    """The head row, or None if it is missing."""
    row = conn.execute(_READ_HEAD).fetchone()
    return None if row is None else Head(*row)


def write_head(conn: sqlite3.Connection, head: Head) -> None:
    """Write the head row back."""
    conn.execute(_WRITE_HEAD, [getattr(head, c) for c in _HEAD_STATE])


@dataclass(frozen=True, slots=True)
class Opened:
    """What opening found.

    Attributes:
        created: the file was new and the schema was created.
        version: the ``user_version`` found (0 for a new file, 1 when migrated).
        removed: (counter, records, why) of rows a schema-1 migration removed as corrupt.
    """

    created: bool
    version: int
    removed: list[tuple[int, int, str]]


def open_schema(
    conn: sqlite3.Connection,
    path: str,
    device_id: str,
    public_raw: bytes,
    signature_fault: Callable[[int, bytes], str | None],
) -> Opened:
    """Create the schema in an empty file, or check an existing one (and migrate schema 1), in one transaction.

    Args:
        conn: the connection, in autocommit mode (no transaction open).
        path: the file, for messages.
        device_id: our device id.
        public_raw: our raw Ed25519 public key.
        signature_fault: why a schema-1 row (counter, bytes) is not our envelope for that counter, or None.

    Returns:
        What was found.

    Raises:
        SchemaError: not an outbox of this schema, or an inconsistent head (the message names ``path``).
        ForeignOwnerError: another device id or key.
        sqlite3.Error: SQLite failed; the transaction was rolled back.
    """
    conn.execute("BEGIN IMMEDIATE")  # a concurrent first open must not create the schema twice
    removed: list[tuple[int, int, str]] = []
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        created = version == 0 and not tables
        if created:
            _create(conn, device_id, public_raw)
        else:
            _check(conn, path, version, tables, device_id, public_raw)
            if version == 1:
                removed = _migrate_v1(conn, path, signature_fault)
            if version in {1, 2}:
                conn.execute(_DELIVERY_TABLE)
                conn.execute(_NEW_DELIVERY)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            _repair_totals(conn, path)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return Opened(created, version, removed)


def _create(conn: sqlite3.Connection, device_id: str, public_raw: bytes) -> None:
    for statement in _SCHEMA:
        conn.execute(statement)
    placeholders = ", ".join("?" * len(_HEAD_COLUMNS))
    conn.execute(
        f"INSERT INTO head ({', '.join(_HEAD_COLUMNS)}) VALUES ({placeholders})",  # noqa: S608 -- constants
        (0, device_id, public_raw, 1, GENESIS_PREV, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    )
    conn.execute(_NEW_DELIVERY)
    conn.execute(f"PRAGMA application_id={_APPLICATION_ID}")
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


def _check(  # noqa: PLR0917 -- all of it is what the file is checked against
    conn: sqlite3.Connection, path: str, version: int, tables: set[str], device_id: str, public_raw: bytes
) -> None:
    app = conn.execute("PRAGMA application_id").fetchone()[0]
    wanted = {"envelopes", "head"} | ({"delivery"} if version == SCHEMA_VERSION else set())
    if app != _APPLICATION_ID or version not in {1, 2, SCHEMA_VERSION} or not wanted <= tables:
        raise SchemaError(
            f"{path} is not an outbox of schema {SCHEMA_VERSION} (or 1 or 2, migrated)"
            f" (application_id {app:#x}, user_version {version}, tables {sorted(tables)})"
        )
    envelope_columns = _V1_ENVELOPE_COLUMNS if version == 1 else _ENVELOPE_COLUMNS
    expected_tables: list[tuple[str, tuple[str, ...]]] = [("envelopes", envelope_columns), ("head", _HEAD_COLUMNS)]
    if version == SCHEMA_VERSION:
        expected_tables.append(("delivery", _DELIVERY_COLUMNS))
    for table, expected in expected_tables:
        columns = tuple(r[1] for r in conn.execute(f"PRAGMA table_info({table})"))
        if columns != expected:
            raise SchemaError(f"{path}: table {table} has columns {columns}, expected {expected}")
    row = conn.execute("SELECT device_id, public_key FROM head WHERE id = 0").fetchone()
    if row is None:
        raise SchemaError(f"{path}: the head row is missing")
    if row[0] != device_id:
        raise ForeignOwnerError(f"{path} belongs to device {row[0]!r}, not {device_id!r}")
    if row[1] != public_raw:
        # Continuing another key's chain would also turn its whole backlog into "corrupt" rows.
        raise ForeignOwnerError(f"{path} was sealed with another key of device {device_id!r}")


def _repair_totals(conn: sqlite3.Connection, path: str) -> None:
    head = read_head(conn)
    if head is None:
        raise SchemaError(f"{path}: the head row is missing")
    top = conn.execute("SELECT MAX(counter) FROM envelopes").fetchone()[0]
    if top is not None and top >= head.next_counter:
        raise SchemaError(f"{path}: envelope {top} is at or past the head's next counter")
    count = conn.execute("SELECT COUNT(*) FROM envelopes").fetchone()[0]
    if count != head.backlog_envelopes:
        # Only an edit from outside can cause this; the scan reads every row once, at start-up only.
        n, nbytes, records = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(bytes), 0), COALESCE(SUM(records), 0) FROM envelopes"
        ).fetchone()
        event(log, logging.WARNING, "outbox backlog totals repaired", path=path, rows=n, head=count)
        head.backlog_envelopes, head.backlog_bytes, head.backlog_records = n, nbytes, records
        write_head(conn, head)


def _migrate_v1(
    conn: sqlite3.Connection, path: str, signature_fault: Callable[[int, bytes], str | None]
) -> list[tuple[int, int, str]]:
    """Schema 1 -> 2: a digest for every row whose signature verifies; the table is rebuilt with the blob last.

    A digest computed over rotten bytes would certify the rot, so each row is verified once (our signature, device
    and counter, ~0.2 ms per row); a row that fails is removed as corrupt, counted and announced like one found by
    ``pending``.
    """
    head = read_head(conn)
    if head is None:
        raise SchemaError(f"{path}: the head row is missing")
    removed: list[tuple[int, int, str]] = []
    conn.execute(_ENVELOPES_TABLE.format(name="envelopes_v2"))
    after = 0
    while rows := conn.execute(
        "SELECT counter, data, records, bytes, created FROM envelopes WHERE counter > ? ORDER BY counter LIMIT ?",
        (after, _MIGRATE_CHUNK),
    ).fetchall():
        for counter, data, records, size, created in rows:
            if (why := signature_fault(counter, data)) is not None:
                removed.append((counter, head.remove_corrupt(counter, records, size), why))
                continue
            insert = (counter, records, size, created, envelope_hash(data), data)
            conn.execute(_INSERT_INTO.format("envelopes_v2"), insert)
        after = rows[-1][0]
    conn.execute("DROP TABLE envelopes")
    conn.execute("ALTER TABLE envelopes_v2 RENAME TO envelopes")
    write_head(conn, head)
    return removed
