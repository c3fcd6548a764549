"""The SQLite backend: one file in WAL mode, one connection per store, ``BEGIN IMMEDIATE`` write transactions.

Invariants:
- Every write transaction starts with ``BEGIN IMMEDIATE``: it takes the database's write lock before reading the
  chain heads, so two stores on one file (threads or processes) serialise per batch and never verify against a
  head the other is about to move. A store waits up to ``BUSY_TIMEOUT_S`` for the lock, then fails with
  ``StoreError``.
- ``synchronous=FULL``: a committed batch survives a power cut. The ingest loop acknowledges the broker after the
  commit; with ``NORMAL`` a WAL commit is not fsynced and acknowledged envelopes could vanish.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

from edge.gateway._sql import SQLITE
from edge.gateway._store_sql import SqlStore
from edge.gateway.errors import StoreError
from edge.telemetry.schema import TelemetryLimits

__all__ = ["BUSY_TIMEOUT_S", "SqliteStore", "sqlite_path"]

BUSY_TIMEOUT_S: Final = 30.0


def sqlite_path(url: str) -> str:
    """The file path of a SQLite store URL.

    Args:
        url: ``sqlite:///abs/path.db`` (absolute), ``sqlite:relative.db``, or a bare path.

    Returns:
        The path (``:memory:`` passes through).
    """
    if url.startswith("sqlite://"):
        return url[len("sqlite://") :]
    if url.startswith("sqlite:"):
        return url[len("sqlite:") :]
    return url


class SqliteStore(SqlStore):
    """``Store`` over one SQLite file (see the module docstring); not safe for concurrent use."""

    dialect = SQLITE

    def __init__(self, url: str, limits: TelemetryLimits) -> None:
        """Open the file (created if missing) and create or check the schema.

        Args:
            url: see ``sqlite_path``.
            limits: the telemetry limits.

        Raises:
            StoreError: the file cannot be opened as a database, or its schema is newer.
        """
        self._path = sqlite_path(url)
        if not self._path:
            raise StoreError(f"{url!r}: no database file named")
        self._conn: sqlite3.Connection | None = None
        super().__init__(url, limits)

    def _connect(self) -> None:
        if self._path != ":memory:":
            parent = Path(self._path).parent
            if not parent.is_dir():
                raise StoreError(f"cannot open {self._path!r}: directory {str(parent)!r} does not exist")
        conn = sqlite3.connect(self._path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as e:
            conn.close()
            raise StoreError(f"cannot open {self._path!r} as a SQLite database: {e}") from e
        self._conn = conn

    @property
    def _db(self) -> sqlite3.Connection:
        assert self._conn is not None  # set by _connect before any use
        return self._conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def _driver_errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.Error,)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _lock_schema(self) -> None:
        pass  # BEGIN IMMEDIATE already holds the database's write lock

    def _execute(self, sql: str, params: Sequence[object] = ()) -> int:
        return self._db.execute(sql, params).rowcount

    def _executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        self._db.executemany(sql, rows)

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        return self._db.execute(sql, params).fetchall()
