"""The fleet's storage: the ``Store`` protocol and its record types (``types``), and ``open_store``.

Two backends share every rule (``_base.SqlStore``) and differ only in connection handling, SQL dialect and locking:
``_sqlite`` (the embedded default, WAL) and ``_postgres`` (several gateway processes on one database). ``_sql`` holds
the schema and its migrations, ``_plan`` the ingest rules as a sans-IO planner (what each verdict stores, counts and
quarantines; ``_base`` carries its plans out), ``_batch`` the state of one ingest batch, ``_checks`` and ``_status``
the pure checks on what callers hand the store. ``open_store`` lives here, not beside the types, so that the backends
can import the types without an import loop.
"""

from __future__ import annotations

from edge.errors import ConfigError
from edge.fleet.credit import CreditRules
from edge.fleet.store.types import (
    DeliveryState,
    DeviceEvent,
    DeviceRecord,
    DeviceStatus,
    GatewayHeartbeat,
    Inbound,
    IngestResult,
    LedgerRow,
    Store,
    StoredEnvelope,
)
from edge.wire.schema import DEFAULT_LIMITS, TelemetryLimits

__all__ = [
    "DeliveryState",
    "DeviceEvent",
    "DeviceRecord",
    "DeviceStatus",
    "GatewayHeartbeat",
    "Inbound",
    "IngestResult",
    "LedgerRow",
    "Store",
    "StoredEnvelope",
    "open_store",
]


def open_store(url: str, *, limits: TelemetryLimits = DEFAULT_LIMITS, rules: CreditRules | None = None) -> Store:
    """Open (and create, migrate or check the schema of) a store.

    Args:
        url: ``sqlite:///abs/path.db``, ``sqlite:relative.db`` or a bare file path for SQLite (WAL mode);
            ``postgresql://...`` (or ``postgres://...``) for PostgreSQL.
        limits: the telemetry limits envelopes are verified under.
        rules: the ledger's crediting rules (``edge.fleet.credit``); None: the defaults.

    Returns:
        The store. The schema is created if missing (versioned in a ``schema_version`` table).

    Raises:
        ConfigError: the URL names no supported backend.
        StoreError: the database cannot be opened, or its schema is newer than this code.
    """
    if not isinstance(url, str) or not url:
        raise ConfigError("store url", url, "sqlite:///path.db, sqlite:path.db, a file path or postgresql://...")
    if url.startswith(("postgresql://", "postgres://")):
        from edge.fleet.store._postgres import PostgresStore  # noqa: PLC0415 -- psycopg is an optional extra

        return PostgresStore(url, limits, rules or CreditRules())
    scheme, sep, _ = url.partition("://")
    if sep and scheme != "sqlite":
        raise ConfigError("store url", url, "a sqlite: or postgresql:// URL or a file path")
    from edge.fleet.store._sqlite import SqliteStore  # noqa: PLC0415 -- keep import cost out of postgres users

    return SqliteStore(url, limits, rules or CreditRules())
