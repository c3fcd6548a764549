"""The PostgreSQL backend: several gateway processes on one database, serialised per device by row locks.

Invariants:
- Write transactions run at READ COMMITTED. Ingest locks the chain rows of the batch's devices with one
  ``SELECT .. ORDER BY device_id FOR UPDATE`` (rows locked in that order in every process, so two batches never
  deadlock); a batch blocked on a row re-reads it when the lock is granted and, statement by statement, sees what
  the other batch committed, so an envelope both received is stored once and classified ``duplicate`` by the second.
- Ledger rows are upserted in sorted order for the same reason. ``lock_timeout`` bounds any wait.
- Schema creation takes a transaction-scoped advisory lock, so two processes starting on an empty database do not
  race to create it.
- A lost connection fails the call with ``StoreError``; the next call reconnects.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Final

import psycopg

from edge.fleet.credit import CreditRules
from edge.fleet.errors import StoreError
from edge.fleet.store._base import SqlStore
from edge.fleet.store._sql import POSTGRESQL
from edge.wire.schema import TelemetryLimits

__all__ = ["CONNECT_TIMEOUT_S", "LOCK_TIMEOUT_S", "PostgresStore"]

CONNECT_TIMEOUT_S: Final = 10
LOCK_TIMEOUT_S: Final = 30
_SCHEMA_LOCK_KEY: Final = 0x6564676567770001  # "edgegw" + 1: the advisory lock of schema creation
_CLAIMS_LOCK_KEY: Final = 0x6564676567770002  # "edgegw" + 2: claim decisions, one transaction at a time


class _Session:
    """The claims transaction, as a ``ClaimSession``: committed when the session ends."""

    durable = True

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        cur = self._conn.execute(sql, params)
        return cur.fetchall() if cur.description else []

    def append(self, created: float, data: bytes) -> int:
        cur = self._conn.execute("INSERT INTO claim_log (created, data) VALUES (%s, %s) RETURNING seq", (created, data))
        row = cur.fetchone()
        assert row is not None  # RETURNING always returns the row it inserted
        return int(row[0])


class PostgresStore(SqlStore):
    """``Store`` over a PostgreSQL database (see the module docstring); not safe for concurrent use."""

    dialect = POSTGRESQL

    def __init__(self, url: str, limits: TelemetryLimits, rules: CreditRules) -> None:
        """Connect and create or check the schema.

        Args:
            url: a libpq URL, ``postgresql://user@host:port/dbname``.
            limits: the telemetry limits.
            rules: the ledger's crediting rules.

        Raises:
            StoreError: cannot connect, or the schema is newer.
        """
        self._conn: psycopg.Connection[Any] | None = None
        self._claims_conn: psycopg.Connection[Any] | None = None
        super().__init__(url, limits, rules)

    def _connect(self) -> None:
        conn = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
        conn.execute(f"SET lock_timeout = '{LOCK_TIMEOUT_S}s'")
        self._conn = conn

    @property
    def _db(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            if self._closed:
                raise StoreError("postgresql store is closed")
            self._connect()  # the previous connection was lost: a failed call raised, this one starts afresh
        assert self._conn is not None
        return self._conn

    def _disconnect(self) -> None:
        for conn in (self._conn, self._claims_conn):
            if conn is not None:
                conn.close()

    def _driver_errors(self) -> tuple[type[BaseException], ...]:
        return (psycopg.Error,)

    def _transient_errors(self) -> tuple[type[BaseException], ...]:
        # Connection failures, lock and statement timeouts, a server shutting down, disk full: the server, not the
        # statement (a DataError or IntegrityError is about what was sent, and fails again however often it is sent).
        return (psycopg.OperationalError, psycopg.InterfaceError)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._db.transaction():
            yield

    def _lock_schema(self) -> None:
        self._execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))

    def _pipeline(self) -> contextlib.AbstractContextManager[object]:
        return self._db.pipeline()

    def _execute(self, sql: str, params: Sequence[object] = ()) -> int:
        return self._db.execute(sql, params).rowcount

    def _executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> int:
        with self._db.cursor() as cur:
            cur.executemany(sql, rows)
            return cur.rowcount

    @contextlib.contextmanager
    def _claims_session(self) -> Iterator[_Session]:
        # A transaction of its own on a second connection, under an advisory lock: one gateway process at a time
        # reads the claim log's tail, decides and appends, so two processes never both credit one input, and the
        # lock is held for this small transaction only, not for the batch's bulk and its commit. (Claims that
        # commit while their batch then fails are recognised as the batch's own when it is redelivered.)
        with contextlib.ExitStack() as stack:
            conn = self._claims_connection()
            try:
                self._begin_claims(conn, stack)
            except psycopg.OperationalError:
                # An idle connection the server dropped (a restart, a terminated backend) shows only now: one more
                # try on a fresh one, before anything was decided.
                stack.close()
                conn.close()
                conn = self._claims_connection()
                self._begin_claims(conn, stack)
            try:
                yield _Session(conn)
            except psycopg.Error:
                conn.close()  # whatever failed, the next batch starts on a fresh connection
                raise

    @staticmethod
    def _begin_claims(conn: psycopg.Connection[Any], stack: contextlib.ExitStack) -> None:
        stack.enter_context(conn.transaction())
        # No fsync of its own, so the lock is not held across one: the batch's transaction commits after it, and
        # its synchronous commit flushes the WAL up to and past this one. Should the batch fail, these claims are
        # its own on redelivery anyway, and losing them in a crash loses nothing.
        conn.execute(
            "SELECT pg_advisory_xact_lock(%s), set_config('synchronous_commit', 'off', true)", (_CLAIMS_LOCK_KEY,)
        )

    def _claims_connection(self) -> psycopg.Connection[Any]:
        conn = self._claims_conn
        if conn is None or conn.closed or conn.broken:
            conn = self._claims_conn = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
            conn.execute(f"SET lock_timeout = '{LOCK_TIMEOUT_S}s'")
        return conn

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        return self._db.execute(sql, params).fetchall()
