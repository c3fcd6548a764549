"""The gateway schema and its two dialects: one SQL text, small per-backend substitutions.

Statements are written once with ``?`` placeholders and ``{blob}``, ``{real}``, ``{int}``, ``{id_pk}`` type slots;
``Dialect.sql`` fills them for SQLite or PostgreSQL (``%s`` placeholders, BYTEA, DOUBLE PRECISION, BIGINT, an
identity column). No statement contains a literal ``?`` or ``%``: the placeholder swap is a plain replace.

Versions: ``SCHEMA`` is version 1; ``MIGRATIONS[v]`` takes a database from version v - 1 to v. A new database is
created at version 1 and migrated like an old one, so both always have the same schema. A migration runs inside the
schema transaction (all of it or nothing) under the schema lock.

Invariants of the schema (version ``SCHEMA_VERSION``):
- ``envelopes``: one row per accepted (device, counter), the exact bytes; primary key (device_id, counter).
- ``chains``: one row per registered device (created with the device, or on first ingest): the head link, the
  number of open missing counters, the last accepted receipt time and ``lost_mark``, the highest counter a loss
  notice of the device has announced (each dropped counter is counted once). It is the row ingest locks per device.
- ``holes``: open ranges of missing counters per device, disjoint, keyed by their low end, with the UTC day the
  gap was opened (a late fill lowers that day's ``missing``).
- ``ledger`` / ``ledger_inferences``: counters per (device, UTC day[, model]), only ever incremented;
  ``ledger_inferences`` counts claimed inferences and the credited ones among them, ``ledger_credits`` the others
  (``edge.fleet.credit`` outcomes other than ``credited``) per (device, day, model, outcome).
- ``claim_log``: the claims (``credit.claim_key`` -> first claimant) each batch made, one row per batch, in commit
  order (``seq``); the store keeps the index in memory and reads here what other processes appended
  (``edge.fleet.claims``). Rows older than the ledger's window are deleted.
  ``credit_hours``: credited inferences per (device, model, UTC hour of the box's timeline) and the cap in force
  when the hour's first credit was counted.
- ``envelopes.credit``: NULL when every inference of the envelope was credited, else the JSON of the uncredited
  records' indices by outcome (what a ledger export shows for that envelope).
- ``quarantine``: every rejected input, newest by id. ``statuses``: the last status message per device id,
  registered or not.
- ``suspensions``: the last suspension of each device suspended at least once (``edge.fleet.suspend``); it is in
  force while ``since <= now < until``.
- ``backlog_reports``: the latest outbox backlog each device id reported in a status message (a new message, not
  a retained copy delivered again), when, and the head counter of its chain then.
- ``gateway_heartbeats``: one row per gateway id, rewritten every few seconds while it runs (``stopped_at`` set
  when it stopped cleanly).
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

__all__ = ["ADDITIONS", "DIALECTS", "MIGRATIONS", "SCHEMA", "SCHEMA_VERSION", "Dialect"]

SCHEMA_VERSION: Final = 2

# Version 1: never changes (a new database starts here and is migrated).
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

MIGRATIONS: Final[dict[int, tuple[str, ...]]] = {
    # Version 2 (issue 11): the ledger counts work, not messages; loss notices count each dropped counter once.
    2: (
        "ALTER TABLE chains ADD COLUMN lost_mark {int} NOT NULL DEFAULT 0",
        "ALTER TABLE ledger ADD COLUMN announced_lost_records {int} NOT NULL DEFAULT 0",
        "ALTER TABLE envelopes ADD COLUMN credit TEXT",
        # One row per ingest batch that claimed inputs: the log of the in-memory claim index (edge.fleet.claims).
        """CREATE TABLE claim_log (
            seq {id_pk},
            created {real} NOT NULL,
            data {blob} NOT NULL
        )""",
        "CREATE INDEX claim_log_created ON claim_log (created)",
        """CREATE TABLE ledger_credits (
            device_id TEXT NOT NULL,
            day TEXT NOT NULL,
            model_id TEXT NOT NULL,
            outcome TEXT NOT NULL,
            count {int} NOT NULL,
            PRIMARY KEY (device_id, day, model_id, outcome)
        )""",
        """CREATE TABLE credit_hours (
            device_id TEXT NOT NULL,
            model_id TEXT NOT NULL,
            hour {int} NOT NULL,
            credited {int} NOT NULL,
            cap {int} NOT NULL,
            PRIMARY KEY (device_id, model_id, hour)
        )""",
        "ALTER TABLE ledger_inferences ADD COLUMN credited {int} NOT NULL DEFAULT 0",
        # Version 1 credited every inference it counted: its days keep that credit.
        "UPDATE ledger_inferences SET credited = count",
    ),
}

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
    # A box that overdrew its reject budget (edge.fleet.suspend): the last suspension per device.
    """CREATE TABLE IF NOT EXISTS suspensions (
        device_id TEXT PRIMARY KEY,
        since {real} NOT NULL,
        until {real} NOT NULL,
        strikes INTEGER NOT NULL,
        reason TEXT NOT NULL,
        by_gateway TEXT NOT NULL
    )""",
    # The latest outbox backlog each box reported, and the head of its chain when it did: `edge fleet status`
    # subtracts what was accepted since, so the figure drains with delivery instead of freezing at the birth message.
    """CREATE TABLE IF NOT EXISTS backlog_reports (
        device_id TEXT PRIMARY KEY,
        backlog {int} NOT NULL,
        reported_at {real} NOT NULL,
        head_counter {int}
    )""",
    # Each gateway process writes its row every few seconds (edge.fleet.heartbeat): `edge fleet status` tells from
    # it whether the status it shows is being kept up to date.
    """CREATE TABLE IF NOT EXISTS gateway_heartbeats (
        gateway_id TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        started_at {real} NOT NULL,
        at {real} NOT NULL,
        connected INTEGER NOT NULL,
        stopped_at {real}
    )""",
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
    "announced_lost_records",
)

# Statements are built from our own identifiers only (column names, dialect keywords); values are always bound.
LEDGER_COLUMNS = ", ".join(LEDGER_COUNTERS)
UPSERT_LEDGER = (
    f"INSERT INTO ledger (device_id, day, {LEDGER_COLUMNS}) VALUES (?, ?, {', '.join('?' * len(LEDGER_COUNTERS))})"  # noqa: S608
    " ON CONFLICT (device_id, day) DO UPDATE SET "
    + ", ".join(f"{c} = ledger.{c} + excluded.{c}" for c in LEDGER_COUNTERS)
)
UPSERT_INFERENCES = (
    "INSERT INTO ledger_inferences (device_id, day, model_id, count, credited) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (device_id, day, model_id) DO UPDATE SET count = ledger_inferences.count + excluded.count,"
    " credited = ledger_inferences.credited + excluded.credited"
)
INSERT_ENVELOPE = (
    "INSERT INTO envelopes (device_id, counter, received_at, day, records, hash, prev, data, credit)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
UPDATE_CHAIN = (
    "UPDATE chains SET head_counter = ?, head_hash = ?, head_prev = ?, gaps = ?, last_accepted = ?, lost_mark = ?"
    " WHERE device_id = ?"
)
UPSERT_CREDITS = (
    "INSERT INTO ledger_credits (device_id, day, model_id, outcome, count) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (device_id, day, model_id, outcome) DO UPDATE SET count = ledger_credits.count + excluded.count"
)
# The cap stays the one in force when the hour's first credit was counted: an hour is judged by one rule.
UPSERT_HOURS = (
    "INSERT INTO credit_hours (device_id, model_id, hour, credited, cap) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (device_id, model_id, hour) DO UPDATE SET credited = credit_hours.credited + excluded.credited"
)
INSERT_CLAIM_LOG = "INSERT INTO claim_log (created, data) VALUES (?, ?)"
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
UPSERT_BACKLOG = (
    "INSERT INTO backlog_reports (device_id, backlog, reported_at, head_counter)"
    " VALUES (?, ?, ?, (SELECT head_counter FROM chains WHERE device_id = ?))"
    " ON CONFLICT (device_id) DO UPDATE SET backlog = excluded.backlog, reported_at = excluded.reported_at,"
    " head_counter = excluded.head_counter"
)
UPSERT_HEARTBEAT = (
    "INSERT INTO gateway_heartbeats (gateway_id, host, pid, started_at, at, connected, stopped_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (gateway_id) DO UPDATE SET host = excluded.host, pid = excluded.pid,"
    " started_at = excluded.started_at, at = excluded.at, connected = excluded.connected,"
    " stopped_at = excluded.stopped_at"
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

    def in_list(self, column: str, values: Sequence[object]) -> tuple[str, list[object]]:
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
