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

from edge.gateway._sql import POSTGRESQL
from edge.gateway._store_sql import SqlStore
from edge.gateway.errors import StoreError
from edge.telemetry.schema import TelemetryLimits

__all__ = ["CONNECT_TIMEOUT_S", "LOCK_TIMEOUT_S", "PostgresStore"]

CONNECT_TIMEOUT_S: Final = 10
LOCK_TIMEOUT_S: Final = 30
_SCHEMA_LOCK_KEY: Final = 0x6564676567770001  # "edgegw" + 1: the advisory lock of schema creation


class PostgresStore(SqlStore):
    """``Store`` over a PostgreSQL database (see the module docstring); not safe for concurrent use."""

    dialect = POSTGRESQL

    def __init__(self, url: str, limits: TelemetryLimits) -> None:
        """Connect and create or check the schema.

        Args:
            url: a libpq URL, ``postgresql://user@host:port/dbname``.
            limits: the telemetry limits.

        Raises:
            StoreError: cannot connect, or the schema is newer.
        """
        self._conn: psycopg.Connection[Any] | None = None
        super().__init__(url, limits)

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
        if self._conn is not None:
            self._conn.close()

    def _driver_errors(self) -> tuple[type[BaseException], ...]:
        return (psycopg.Error,)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._db.transaction():
            yield

    def _lock_schema(self) -> None:
        self._execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))

    def _execute(self, sql: str, params: Sequence[object] = ()) -> int:
        return self._db.execute(sql, params).rowcount

    def _executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        with self._db.cursor() as cur:
            cur.executemany(sql, rows)

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        return self._db.execute(sql, params).fetchall()
