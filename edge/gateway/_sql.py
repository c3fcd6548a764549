"""The gateway schema and its two dialects: one SQL text, small per-backend substitutions.

Statements are written once with ``?`` placeholders and ``{blob}``, ``{real}``, ``{int}``, ``{id_pk}`` type slots;
``Dialect.sql`` fills them for SQLite or PostgreSQL (``%s`` placeholders, BYTEA, DOUBLE PRECISION, BIGINT, an
identity column). No statement contains a literal ``?`` or ``%``: the placeholder swap is a plain replace.

Invariants of the schema (version ``SCHEMA_VERSION``):
- ``envelopes``: one row per accepted (device, counter), the exact bytes; primary key (device_id, counter).
- ``chains``: one row per registered device (created with the device, or on first ingest): the head link, the
  number of open missing counters and the last accepted receipt time. It is the row ingest locks per device.
- ``holes``: open ranges of missing counters per device, disjoint, keyed by their low end, with the UTC day the
  gap was opened (a late fill lowers that day's ``missing``).
- ``ledger`` / ``ledger_inferences``: counters per (device, UTC day[, model]), only ever incremented.
- ``quarantine``: every rejected input, newest by id. ``statuses``: the last status message per device id,
  registered or not.
- ``events``: one row per ``EventRecord`` of an accepted envelope (OTA transitions and the like), keyed by
  (device_id, counter, idx within the envelope), written in the envelope's transaction; ``data`` is JSON text.

Additive changes (``ADDITIONS``) keep ``SCHEMA_VERSION``: they are ``IF NOT EXISTS`` statements run at every open,
so a database made by an earlier release of the same version gains them, and an earlier release still opens a
database that has them (it ignores what it does not know). A change that is not additive bumps the version.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

__all__ = ["ADDITIONS", "DIALECTS", "SCHEMA", "SCHEMA_VERSION", "Dialect"]

SCHEMA_VERSION: Final = 1

SCHEMA: Final = (
    """CREATE TABLE devices (
        device_id TEXT PRIMARY KEY,
        did TEXT NOT NULL,
        public_key {blob} NOT NULL,
        cert_pem TEXT NOT NULL,
        enrolled_at {real} NOT NULL,
        revoked_at {real}
    )""",
    """CREATE TABLE chains (
        device_id TEXT PRIMARY KEY,
        head_counter {int},
        head_hash {blob},
        head_prev {blob},
        gaps {int} NOT NULL DEFAULT 0,
        last_accepted {real}
    )""",
    """CREATE TABLE envelopes (
        device_id TEXT NOT NULL,
        counter {int} NOT NULL,
        received_at {real} NOT NULL,
        day TEXT NOT NULL,
        records INTEGER NOT NULL,
        hash {blob} NOT NULL,
        prev {blob} NOT NULL,
        data {blob} NOT NULL,
        PRIMARY KEY (device_id, counter)
    )""",
    """CREATE TABLE holes (
        device_id TEXT NOT NULL,
        lo {int} NOT NULL,
        hi {int} NOT NULL,
        day TEXT NOT NULL,
        PRIMARY KEY (device_id, lo)
    )""",
    """CREATE TABLE ledger (
        device_id TEXT NOT NULL,
        day TEXT NOT NULL,
        envelopes {int} NOT NULL DEFAULT 0,
        records {int} NOT NULL DEFAULT 0,
        readings {int} NOT NULL DEFAULT 0,
        events {int} NOT NULL DEFAULT 0,
        missing {int} NOT NULL DEFAULT 0,
        late {int} NOT NULL DEFAULT 0,
        duplicates {int} NOT NULL DEFAULT 0,
        rejects {int} NOT NULL DEFAULT 0,
        announced_lost {int} NOT NULL DEFAULT 0,
        PRIMARY KEY (device_id, day)
    )""",
    """CREATE TABLE ledger_inferences (
        device_id TEXT NOT NULL,
        day TEXT NOT NULL,
        model_id TEXT NOT NULL,
        count {int} NOT NULL,
        PRIMARY KEY (device_id, day, model_id)
    )""",
    """CREATE TABLE quarantine (
        id {id_pk},
        received_at {real} NOT NULL,
        topic TEXT NOT NULL,
        device_id TEXT,
        kind TEXT NOT NULL,
        reason TEXT NOT NULL,
        size INTEGER NOT NULL,
        hash {blob},
        payload {blob} NOT NULL
    )""",
    "CREATE INDEX quarantine_kind ON quarantine (kind)",
    # Exports by day range find their counter bounds here instead of scanning the device's whole chain.
    "CREATE INDEX envelopes_day ON envelopes (device_id, day, counter)",
    """CREATE TABLE statuses (
        device_id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        reason TEXT,
        since {real} NOT NULL,
        last_seen {real} NOT NULL,
        model TEXT,
        outbox_backlog {int},
        info TEXT NOT NULL
    )""",
)

# Run at every open, after the version check (see the module docstring): each must be idempotent.
ADDITIONS: Final = (
    """CREATE TABLE IF NOT EXISTS events (
        device_id TEXT NOT NULL,
        counter {int} NOT NULL,
        idx INTEGER NOT NULL,
        ts {real} NOT NULL,
        received_at {real} NOT NULL,
        kind TEXT NOT NULL,
        data TEXT NOT NULL,
        PRIMARY KEY (device_id, counter, idx)
    )""",
    # Rollouts poll "events since T": by the gateway's receipt time.
    "CREATE INDEX IF NOT EXISTS events_received ON events (received_at)",
)

# Ledger columns incremented by ingest, in the order ``LedgerTally`` produces them.
LEDGER_COUNTERS: Final = (
    "envelopes",
    "records",
    "readings",
    "events",
    "missing",
    "late",
    "duplicates",
    "rejects",
    "announced_lost",
)

# Statements are built from our own identifiers only (column names, dialect keywords); values are always bound.
LEDGER_COLUMNS = ", ".join(LEDGER_COUNTERS)
UPSERT_LEDGER = (
    f"INSERT INTO ledger (device_id, day, {LEDGER_COLUMNS}) VALUES (?, ?, {', '.join('?' * len(LEDGER_COUNTERS))})"  # noqa: S608
    " ON CONFLICT (device_id, day) DO UPDATE SET "
    + ", ".join(f"{c} = ledger.{c} + excluded.{c}" for c in LEDGER_COUNTERS)
)
UPSERT_INFERENCES = (
    "INSERT INTO ledger_inferences (device_id, day, model_id, count) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (device_id, day, model_id) DO UPDATE SET count = ledger_inferences.count + excluded.count"
)
INSERT_ENVELOPE = (
    "INSERT INTO envelopes (device_id, counter, received_at, day, records, hash, prev, data)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
UPDATE_CHAIN = (
    "UPDATE chains SET head_counter = ?, head_hash = ?, head_prev = ?, gaps = ?, last_accepted = ? WHERE device_id = ?"
)
INSERT_QUARANTINE = (
    "INSERT INTO quarantine (received_at, topic, device_id, kind, reason, size, hash, payload)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_EVENT = (
    "INSERT INTO events (device_id, counter, idx, ts, received_at, kind, data) VALUES (?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (device_id, counter, idx) DO NOTHING"
)
SELECT_DEVICES = "SELECT device_id, did, public_key, cert_pem, enrolled_at, revoked_at FROM devices"
INSERT_DEVICE = (
    "INSERT INTO devices (device_id, did, public_key, cert_pem, enrolled_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (device_id) DO NOTHING"
)
INSERT_STATUS = (
    "INSERT INTO statuses (device_id, state, reason, since, last_seen, model, outbox_backlog, info)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device_id) DO NOTHING"
)
SELECT_STATUS = "SELECT state, reason, since, last_seen, model, outbox_backlog, info FROM statuses WHERE device_id = ?"
UPDATE_STATUS = (
    "UPDATE statuses SET state = ?, reason = ?, since = ?, last_seen = ?, model = ?, outbox_backlog = ?, info = ?"
    " WHERE device_id = ?"
)


@dataclass(frozen=True, slots=True)
class Dialect:
    """What differs between the backends' SQL.

    Attributes:
        name: ``sqlite`` or ``postgresql``.
        placeholder: the parameter marker replacing ``?``.
        types: the values of the type slots.
        lock_rows: appended to the chain-row SELECT to lock the rows (empty where the transaction already holds
            the whole database).
        array_params: True if an id list binds as one array parameter (``= ANY(?)``); else it expands to ``IN``.
    """

    name: str
    placeholder: str
    types: tuple[tuple[str, str], ...]
    lock_rows: str
    array_params: bool

    def sql(self, text: str) -> str:
        """Translate a statement written in the neutral form.

        Args:
            text: SQL with ``?`` placeholders and ``{blob}``-style type slots.

        Returns:
            The statement for this backend.
        """
        for slot, value in self.types:
            text = text.replace("{" + slot + "}", value)
        return text.replace("?", self.placeholder)

    def in_list(self, column: str, values: Sequence[str]) -> tuple[str, list[object]]:
        """A condition ``column`` is one of ``values``, with its parameters.

        Args:
            column: the column name (trusted: ours).
            values: the values (at least one).

        Returns:
            (SQL fragment, parameters).
        """
        if self.array_params:
            return f"{column} = ANY({self.placeholder})", [list(values)]
        marks = ",".join([self.placeholder] * len(values))
        return f"{column} IN ({marks})", list(values)


SQLITE: Final = Dialect(
    name="sqlite",
    placeholder="?",
    types=(("blob", "BLOB"), ("real", "REAL"), ("int", "INTEGER"), ("id_pk", "INTEGER PRIMARY KEY AUTOINCREMENT")),
    lock_rows="",
    array_params=False,
)

POSTGRESQL: Final = Dialect(
    name="postgresql",
    placeholder="%s",
    types=(
        ("blob", "BYTEA"),
        ("real", "DOUBLE PRECISION"),
        ("int", "BIGINT"),
        ("id_pk", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"),
    ),
    lock_rows=" FOR UPDATE",
    array_params=True,
)

DIALECTS: Final = {d.name: d for d in (SQLITE, POSTGRESQL)}
