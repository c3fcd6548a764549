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

from edge.fleet.credit import CreditRules
from edge.fleet.errors import StoreError
from edge.fleet.store._base import SqlStore
from edge.fleet.store._sql import SQLITE
from edge.wire.schema import TelemetryLimits

__all__ = ["BUSY_TIMEOUT_S", "SqliteStore", "sqlite_path"]

BUSY_TIMEOUT_S: Final = 30.0
CACHE_KIB: Final = 64 * 1024


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


class _Session:
    """The batch's own transaction, as a ``ClaimSession``."""

    durable = False

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        return self._db.execute(sql, params).fetchall()

    def append(self, created: float, data: bytes) -> int:
        cur = self._db.execute("INSERT INTO claim_log (created, data) VALUES (?, ?)", (created, data))
        assert cur.lastrowid is not None  # an INSERT into a rowid table always has one
        return int(cur.lastrowid)


class SqliteStore(SqlStore):
    """``Store`` over one SQLite file (see the module docstring); not safe for concurrent use."""

    dialect = SQLITE

    def __init__(self, url: str, limits: TelemetryLimits, rules: CreditRules) -> None:
        """Open the file (created if missing) and create or check the schema.

        Args:
            url: see ``sqlite_path``.
            limits: the telemetry limits.
            rules: the ledger's crediting rules.

        Raises:
            StoreError: the file cannot be opened as a database, or its schema is newer.
        """
        self._path = sqlite_path(url)
        if not self._path:
            raise StoreError(f"{url!r}: no database file named")
        self._conn: sqlite3.Connection | None = None
        super().__init__(url, limits, rules)

    def _connect(self) -> None:
        if self._path != ":memory:":
            parent = Path(self._path).parent
            if not parent.is_dir():
                raise StoreError(f"cannot open {self._path!r}: directory {str(parent)!r} does not exist")
        conn = sqlite3.connect(self._path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            # 64 MiB of page cache (the default is 2 MiB): every batch inserts its claims at random places of the
            # claim index, between envelope blobs that would otherwise push the index's pages out.
            conn.execute(f"PRAGMA cache_size={-CACHE_KIB}")
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

    def _transient_errors(self) -> tuple[type[BaseException], ...]:
        # "database is locked", "disk I/O error", "unable to open database file", "database or disk is full":
        # the file or its lock, not the statement. (It also covers a missing table: that one fails for good, and
        # the ingest loop gives up on an unavailable store after its deadline.)
        return (sqlite3.OperationalError,)

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

    def _executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> int:
        return self._db.executemany(sql, rows).rowcount

    @contextlib.contextmanager
    def _claims_session(self) -> Iterator[_Session]:
        # BEGIN IMMEDIATE already holds the database's write lock for the whole batch: the claims are decided in
        # the batch's transaction and commit with it.
        yield _Session(self._db)

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        return self._db.execute(sql, params).fetchall()
