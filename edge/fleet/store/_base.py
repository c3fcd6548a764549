"""The store's logic, shared by both backends: ingest, the registry, status, the ledger and quarantine queries.

Backends (``_sqlite``, ``_postgres``) supply the connection, the transaction, the SQL dialect and the error types to
translate. The ingest rules (what each verdict stores, counts and quarantines) are ``_plan``'s: this module reads
and writes what its plans say and decides nothing about a message itself.

Ingest of one batch, in one transaction:
1. Each message is routed by its topic (``edge.wire.topics.topic_route``): ``devices/<id>/telemetry`` to the
   verifier, ``devices/<id>/status`` to the status parser, anything else to ``wrong_topic`` without verifying
   anything. A message is attributed to the device of its topic, the identity the broker authenticated.
2. The registered devices among the telemetry topics are loaded with one query, and their chain rows locked with one
   query in sorted order (created first if missing): every later read of a chain happens under that lock.
3. Each telemetry message is verified in order by ``ChainVerifier`` over a ``BatchState`` and planned by
   ``_plan.IngestPlanner``; accepted envelopes, chain heads, quarantine rows and ledger increments are collected in
   memory as the plans say. Status messages are planned too: the last valid one of each device in the batch is
   stored, earlier ones are ``superseded``.
4. The inference records of the accepted envelopes are credited (``edge.fleet.credit``): under the claims lock
   (``_claims_session``: on SQLite this transaction, which holds the write lock; on PostgreSQL a short transaction
   of its own on a second connection, under an advisory lock) the in-memory claim index (``edge.fleet.claims``)
   reads the claims other processes logged since it last looked, says who claimed the batch's inputs before, and
   the batch's new claims are appended to ``claim_log``; the per-hour counts for the ceilings are read.
5. Everything is written with one ``executemany`` per table, ledger rows in sorted order, on PostgreSQL all in one
   pipeline (one round trip): envelopes (with the credit of their uncredited inferences), chain heads, quarantine,
   ledger, the event records of accepted envelopes (a duplicate adds none: it is not accepted), claimed and credited
   inferences, hourly credits; then the status rows.
A database failure anywhere rolls the whole batch back and raises ``StoreError`` (``StoreUnavailableError`` when the
database could not be reached or was busy); bad input never raises.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

import edge.fleet.store._sql as q
from edge.fleet.claims import ClaimBatch, ClaimIndex, decode_batch, encode_batch
from edge.fleet.credit import HOUR_S, BatchCredits, CreditRules, Outcome, Owner, Resolution
from edge.fleet.errors import (
    DeviceExistsError,
    GatewayInputError,
    StoreError,
    StoreUnavailableError,
    UnknownDeviceError,
)
from edge.fleet.store._batch import BatchState, ChainRow, DeviceKey, Hole, LedgerTally
from edge.fleet.store._checks import check_day, check_device, check_time, redact, utc_day
from edge.fleet.store._plan import (
    QUARANTINE_PAYLOAD_BYTES,
    SUPERSEDED,
    IngestPlanner,
    event_rows,
    quarantine_row,
)
from edge.fleet.store._sql import Dialect
from edge.fleet.store._status import StatusRow, merge_status, parse_status
from edge.fleet.store.types import (
    DeliveryState,
    DeviceEvent,
    DeviceRecord,
    DeviceStatus,
    GatewayHeartbeat,
    Inbound,
    IngestResult,
    LedgerRow,
    StoredEnvelope,
)
from edge.fleet.suspend import STRIKE_MEMORY_S, Suspension, suspension_length
from edge.wire._bounds import MAX_COUNTER
from edge.wire.chain import ChainLink, ChainVerifier, Verdict
from edge.wire.envelope import GENESIS_PREV, Envelope
from edge.wire.receipts import MAX_HOLES
from edge.wire.schema import TelemetryLimits
from edge.wire.topics import STATUS, TELEMETRY, topic_route

__all__ = ["QUARANTINE_PAYLOAD_BYTES", "SqlStore"]

_IN_CHUNK: Final = 10000  # ids per IN list: far below SQLite's 32766 bound parameters
_PRUNE_EVERY_S: Final = 600.0  # claim log rows beyond the ledger's window are deleted this often
_PAGE_ROWS: Final = 64  # envelopes per page when streaming: ~1 MB at 14 KB each, bounded by 64 x the size limit
_KEY_CACHE_MAX: Final = 65536


def _day_conditions(day_from: str | None, day_to: str | None) -> tuple[str, list[object]]:
    sql, params = "", list[object]()
    if check_day(day_from, "day_from") is not None:
        sql, params = sql + " AND day >= ?", [*params, day_from]
    if check_day(day_to, "day_to") is not None:
        sql, params = sql + " AND day <= ?", [*params, day_to]
    return sql, params


class _DayCache:
    """UTC days of receipt times, computed once per day number (a batch spans one or two days)."""

    def __init__(self) -> None:
        self._days: dict[int, str] = {}

    def __call__(self, t: float) -> str:
        n = int(t // 86400)
        day = self._days.get(n)
        if day is None:
            day = self._days[n] = utc_day(t)
        return day


class ClaimSession(Protocol):
    """Where a batch reads the claim log's tail and appends its claims (see ``SqlStore._claims_session``)."""

    durable: bool  # True: what is appended is committed when the session ends (before the batch's transaction)

    def query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        """Run one statement (dialect SQL); returns its rows, if any."""

    def append(self, created: float, data: bytes) -> int:
        """Append a claim log row; returns its ``seq``."""


class SqlStore(abc.ABC):
    """Everything of ``edge.fleet.store.types.Store`` except the connection; see the module docstring.

    Not safe for concurrent use: one instance per thread.
    """

    dialect: Dialect

    def __init__(self, url: str, limits: TelemetryLimits, rules: CreditRules) -> None:
        """Connect and create, migrate or check the schema.

        Args:
            url: the URL it was opened with (kept as ``url``).
            limits: the telemetry limits for verification.
            rules: the ledger's crediting rules.

        Raises:
            StoreError: cannot connect, or the schema is newer than this code.
        """
        self.url = url
        self._limits = limits
        self._rules = rules
        self._claims: ClaimIndex | None = None  # loaded at the first batch that credits anything
        self._claims_seq = 0
        self._claims_pruned_at = 0.0
        self._pending_claims: tuple[ClaimBatch, int, int, int] | None = None
        self._key_objects: dict[bytes, Ed25519PublicKey] = {}
        self._sql_cache: dict[str, str] = {}
        self._closed = False
        with self._guard("open"):
            self._connect()
        try:
            self._init_schema()
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------------------------------------- the backend

    @abc.abstractmethod
    def _connect(self) -> None:
        """Open the connection (raises the driver's errors)."""

    @abc.abstractmethod
    def _disconnect(self) -> None:
        """Close the connection."""

    @abc.abstractmethod
    def _driver_errors(self) -> tuple[type[BaseException], ...]:
        """The driver's exception types, translated to ``StoreError``."""

    @abc.abstractmethod
    def _transient_errors(self) -> tuple[type[BaseException], ...]:
        """The driver's exception types that mean "unreachable or busy, try again" (``StoreUnavailableError``)."""

    @abc.abstractmethod
    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        """A write transaction: committed on success, rolled back on any exception."""

    @abc.abstractmethod
    def _lock_schema(self) -> None:
        """Serialise schema creation against other processes (inside the transaction)."""

    def _pipeline(self) -> contextlib.AbstractContextManager[object]:
        """Statements whose results nobody reads, sent together (PostgreSQL: one round trip); SQLite: nothing."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def _execute(self, sql: str, params: Sequence[object] = ()) -> int:
        """Run one statement; returns its row count."""

    @abc.abstractmethod
    def _executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> int:
        """Run one statement for many parameter rows; returns the rows it changed in all."""

    @abc.abstractmethod
    def _query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        """Run one query; returns all rows."""

    # ----------------------------------------------------------------------------------------------- plumbing

    def _sql(self, text: str) -> str:
        out = self._sql_cache.get(text)
        if out is None:
            out = self._sql_cache[text] = self.dialect.sql(text)
        return out

    @contextlib.contextmanager
    def _guard(self, operation: str) -> Iterator[None]:
        """Translate the driver's errors into ``StoreError`` naming the backend and operation."""
        if self._closed and operation != "open":
            raise StoreError(f"{self.dialect.name} store {operation}: the store is closed")
        try:
            yield
        # The URL (redacted) names which database failed; the driver's multi-line text becomes one line.
        except self._transient_errors() as e:
            raise StoreUnavailableError(
                f"{self.dialect.name} store {redact(self.url)} {operation} failed: {' '.join(str(e).split())}"
            ) from e
        except self._driver_errors() as e:
            raise StoreError(
                f"{self.dialect.name} store {redact(self.url)} {operation} failed: {' '.join(str(e).split())}"
            ) from e

    def _init_schema(self) -> None:
        with self._guard("schema check"), self._transaction():
            self._lock_schema()
            self._execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            (version,) = self._query("SELECT MAX(version) FROM schema_version")[0]
            if version is None:
                for statement in q.SCHEMA:
                    self._execute(self._sql(statement))
                version = 1
                self._execute(self._sql("INSERT INTO schema_version (version) VALUES (?)"), (version,))
            if version > q.SCHEMA_VERSION:
                raise StoreError(
                    f"{redact(self.url)}: schema version {version}, this code knows {q.SCHEMA_VERSION}"
                    " (written by a newer gateway: upgrade it)"
                )
            while version < q.SCHEMA_VERSION:
                version += 1
                for statement in q.MIGRATIONS[version]:
                    self._execute(self._sql(statement))
                self._execute(self._sql("INSERT INTO schema_version (version) VALUES (?)"), (version,))
            for statement in q.ADDITIONS:
                self._execute(self._sql(statement))

    def close(self) -> None:
        """Close the connection; idempotent."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(*self._driver_errors()):
                self._disconnect()

    def __enter__(self) -> SqlStore:
        """Use the store as a context manager that closes it."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the store."""
        self.close()

    # ------------------------------------------------------------------------------------------------ devices

    def add_device(self, device: DeviceRecord) -> None:
        """Register a device (see ``Store.add_device``)."""
        check_device(device)
        with self._guard("add_device"), self._transaction():
            inserted = self._execute(
                self._sql(q.INSERT_DEVICE),
                dataclasses.astuple(device),
            )
            if not inserted:
                raise DeviceExistsError(f"device {device.device_id!r} is already registered")
            self._execute(
                self._sql("INSERT INTO chains (device_id) VALUES (?) ON CONFLICT (device_id) DO NOTHING"),
                (device.device_id,),
            )

    def device(self, device_id: str) -> DeviceRecord | None:
        """The device with this id, or None (see ``Store.device``)."""
        with self._guard("device"):
            rows = self._query(self._sql(q.SELECT_DEVICES + " WHERE device_id = ?"), (device_id,))
        return _device_record(rows[0]) if rows else None

    def devices(self) -> list[DeviceRecord]:
        """Every registered device, ordered by id (see ``Store.devices``)."""
        with self._guard("devices"):
            rows = self._query(q.SELECT_DEVICES)
        # Sorted here, not by the database: PostgreSQL's collation may not order ids by code point as SQLite does.
        return [_device_record(r) for r in sorted(rows)]

    def revoke_device(self, device_id: str, at: float) -> DeviceRecord:
        """Revoke a device from ``at`` on; idempotent (see ``Store.revoke_device``)."""
        at = check_time(at, "revocation time")
        with self._guard("revoke_device"), self._transaction():
            self._execute(
                self._sql("UPDATE devices SET revoked_at = ? WHERE device_id = ? AND revoked_at IS NULL"),
                (at, device_id),
            )
            rows = self._query(self._sql(q.SELECT_DEVICES + " WHERE device_id = ?"), (device_id,))
        if not rows:
            raise UnknownDeviceError(f"no device {device_id!r} is registered")
        return _device_record(rows[0])

    def renew_device(self, device_id: str, cert_pem: str) -> DeviceRecord:
        """Replace an active device's certificate (see ``Store.renew_device``)."""
        if not isinstance(cert_pem, str):
            raise GatewayInputError(f"device {device_id!r}: cert_pem must be text")
        with self._guard("renew_device"), self._transaction():
            self._execute(
                self._sql("UPDATE devices SET cert_pem = ? WHERE device_id = ? AND revoked_at IS NULL"),
                (cert_pem, device_id),
            )
            rows = self._query(self._sql(q.SELECT_DEVICES + " WHERE device_id = ?"), (device_id,))
        if not rows:
            raise UnknownDeviceError(f"no device {device_id!r} is registered")
        record = _device_record(rows[0])
        if record.revoked_at is not None:
            raise UnknownDeviceError(f"device {device_id!r} is revoked: it cannot renew its certificate")
        return record

    # ------------------------------------------------------------------------------------------------- ingest

    def ingest(self, batch: Sequence[Inbound]) -> list[IngestResult]:
        """Verify and store a batch in one transaction (see ``Store.ingest`` and the module docstring).

        Args:
            batch: messages in the order received.

        Returns:
            One result per message, in order.

        Raises:
            GatewayInputError: a ``received_at`` is not epoch seconds (the caller's clock, not the device's input).
            StoreUnavailableError: the database could not be reached or was busy; nothing was committed.
            StoreError: the database refused the batch; nothing was committed.
        """
        for msg in batch:
            check_time(msg.received_at, "received_at")
        if not batch:
            return []
        # Claims the transaction logs are kept in memory only once it committed: a rolled-back batch claimed nothing.
        self._pending_claims = None
        with self._guard("ingest"), self._transaction():
            results = self._ingest(batch)
        self._keep_claims()  # SQLite: they committed with the batch
        return results

    def _ingest(self, batch: Sequence[Inbound]) -> list[IngestResult]:
        routes = [topic_route(m.topic) for m in batch]
        ids = sorted({dev for kind, dev in routes if kind == TELEMETRY and dev is not None})
        devices = self._load_device_keys(ids)
        chains = self._lock_chains([i for i in ids if devices[i] is not None])
        tally = LedgerTally()
        state = BatchState(self, devices, chains, tally)
        verifier = ChainVerifier(state, state, self._limits)
        planner = IngestPlanner(state, self._limits)
        credits = BatchCredits(self._rules)
        days = _DayCache()
        accepted: list[tuple[Envelope, float, str, bytes]] = []
        events: list[tuple[object, ...]] = []
        quarantined: list[tuple[object, ...]] = []
        results: list[IngestResult] = []
        for position, (msg, (kind, dev)) in enumerate(zip(batch, routes, strict=True)):
            t = float(msg.received_at)
            day = days(t)
            v: Verdict | None = None
            if kind == TELEMETRY and dev is not None:
                state.at(t, day)
                v = verifier.verify(msg.payload, topic_device=dev)
                plan = planner.telemetry(v, dev, t)
            elif kind == STATUS and dev is not None:
                plan = planner.status(position, dev, msg.payload, t)
            else:
                plan = planner.other(msg.topic, msg.payload, dev)
            if plan.accept:
                env = v.envelope if v is not None else None
                assert env is not None and dev is not None  # only accepted verdicts are accepted; dev is their kid
                chain = chains[dev]
                accepted.append((env, t, day, msg.payload))
                tally.accepted(dev, day, env.records, late=plan.late, chain=chain)
                device_key = devices[dev]
                assert device_key is not None  # its key verified the envelope
                credits.add(dev, env.counter, day, t, device_key.enrolled_at, env.records)
                events.extend(event_rows(dev, env.counter, t, env.records))
                if chain.last_accepted is None or t > chain.last_accepted:
                    chain.last_accepted = t
            if plan.count is not None:
                assert dev is not None  # the planner counts only against the device of the topic
                tally.add(dev, day, plan.count)
            if plan.quarantine is not None:
                quarantined.append(quarantine_row(msg, dev, plan))
            if plan.supersedes is not None:
                results[plan.supersedes] = IngestResult(None, SUPERSEDED.stored, SUPERSEDED.outcome, dev)
            results.append(IngestResult(v if plan.verdict is None else plan.verdict, plan.stored, plan.outcome, dev))
        # The credit first: the claims lock covers the decision and its few rows, never the bulk of the batch (on
        # PostgreSQL it is a transaction of its own; on SQLite this transaction holds the write lock throughout).
        resolution = self._credit(credits, max(float(m.received_at) for m in batch)) if accepted else None
        exceptions = resolution.exceptions if resolution is not None else {}
        envelope_rows = [
            (env.device_id, env.counter, t, day, len(env.records), env.hash, env.prev, data,
             exceptions.get((env.device_id, env.counter)))
            for env, t, day, data in accepted
        ]  # fmt: skip
        with self._pipeline():  # PostgreSQL: every bulk write of the batch in one round trip
            self._write_batch(envelope_rows, chains, quarantined, tally)
            if events:
                self._executemany(self._sql(q.INSERT_EVENT), events)
            self._write_credits(tally, resolution)
        for dev, row in planner.statuses():
            self._upsert_status(dev, row)
        return results

    def quarantine(self, batch: Sequence[Inbound], kind: str, reason: str) -> None:
        """Quarantine messages unverified, complete (see ``Store.quarantine``)."""
        for msg in batch:
            check_time(msg.received_at, "received_at")
        days = _DayCache()
        rows, tally = [], LedgerTally()
        with self._guard("quarantine"), self._transaction():
            planner = IngestPlanner(BatchState(self, {}, {}, tally), self._limits)
            for msg in batch:
                who = topic_route(msg.topic)[1]
                plan = planner.held(who, msg.payload, kind, reason)
                rows.append(quarantine_row(msg, who, plan))
                if plan.count is not None:
                    assert who is not None  # the planner counts only against the device of the topic
                    tally.add(who, days(float(msg.received_at)), plan.count)
            self._write_batch([], {}, rows, tally)

    def _load_device_keys(self, ids: list[str]) -> dict[str, DeviceKey | None]:
        found: dict[str, DeviceKey | None] = dict.fromkeys(ids)
        if ids:
            cond, params = self.dialect.in_list("device_id", ids)
            for device_id, raw, revoked_at, enrolled_at in self._query(
                f"SELECT device_id, public_key, revoked_at, enrolled_at FROM devices WHERE {cond}",  # noqa: S608
                params,
            ):
                found[device_id] = DeviceKey(self._key_object(bytes(raw)), revoked_at, enrolled_at)
        return found

    def _key_object(self, raw: bytes) -> Ed25519PublicKey:
        key = self._key_objects.get(raw)
        if key is None:
            if len(self._key_objects) >= _KEY_CACHE_MAX:
                self._key_objects.clear()
            key = self._key_objects[raw] = Ed25519PublicKey.from_public_bytes(raw)
        return key

    def _lock_chains(self, ids: list[str]) -> dict[str, ChainRow]:
        """Lock the chain rows of ``ids`` (sorted) for this transaction, creating missing ones; return them."""
        chains = self._select_chains(ids)
        missing = [i for i in ids if i not in chains]
        if missing:
            cond, params = self.dialect.in_list("device_id", missing)
            self._execute(
                f"INSERT INTO chains (device_id) SELECT device_id FROM devices WHERE {cond}"  # noqa: S608
                " ORDER BY device_id ON CONFLICT (device_id) DO NOTHING",
                params,
            )
            chains.update(self._select_chains(missing))
        return chains

    def _select_chains(self, ids: list[str]) -> dict[str, ChainRow]:
        if not ids:
            return {}
        cond, params = self.dialect.in_list("device_id", ids)
        rows = self._query(
            "SELECT device_id, head_counter, head_hash, head_prev, gaps, last_accepted, lost_mark FROM chains"  # noqa: S608
            f" WHERE {cond} ORDER BY device_id{self.dialect.lock_rows}",
            params,
        )
        return {
            dev: ChainRow(None if c is None else ChainLink(c, bytes(h), bytes(p)), gaps, last, mark)
            for dev, c, h, p, gaps, last, mark in rows
        }

    def _write_batch(
        self,
        envelope_rows: Sequence[tuple[object, ...]],
        chains: dict[str, ChainRow],
        quarantine_rows: list[tuple[object, ...]],
        tally: LedgerTally,
    ) -> None:
        if envelope_rows:
            self._executemany(self._sql(q.INSERT_ENVELOPE), envelope_rows)
        chain_rows = [
            (c.head.counter, c.head.hash, c.head.prev, c.gaps, c.last_accepted, c.lost_mark, dev)
            for dev, c in sorted(chains.items())
            if c.dirty and c.head is not None
        ]
        if chain_rows:
            self._executemany(self._sql(q.UPDATE_CHAIN), chain_rows)
        if quarantine_rows:
            self._executemany(self._sql(q.INSERT_QUARANTINE), quarantine_rows)
        ledger_rows = tally.ledger_rows()
        if ledger_rows:
            self._executemany(self._sql(q.UPSERT_LEDGER), ledger_rows)

    # Credits (inside the ingest transaction; the rules are edge.fleet.credit's)

    def _credit(self, credits: BatchCredits, now: float) -> Resolution:
        """Decide the batch's credits: who claimed its inputs before, under the claims lock, then the ceilings."""
        min_hour = int((now - self._rules.max_age_s) // HOUR_S) - 1  # the window, an hour of slack
        with self._claims_session() as session:
            index = self._claim_index(now, session)
            owners = {
                k: Owner(dev, c)
                for k, (dev, c) in index.lookup(credits.keys(), min_hour).items()
                # A claim naming this batch's own envelope was logged by an earlier attempt whose batch then failed
                # (the claims commit first on PostgreSQL): it is this batch's claim, not an earlier one.
                if not credits.claims_own(k, dev, c)
            }
            batch = credits.new_claims(owners)
            if len(batch):
                seq = session.append(now, encode_batch(batch))
                self._pending_claims = (batch, seq, int(now // HOUR_S), min_hour)
        if session.durable:
            self._keep_claims()
        buckets = credits.buckets()
        hours = {(d, m, h): (n, cap) for d, m, h, n, cap in self._credit_hours(buckets)} if buckets else {}
        return credits.resolve(owners, hours)

    def _keep_claims(self) -> None:
        """Add the logged claims to the index once they are durable (they committed)."""
        pending, self._pending_claims = self._pending_claims, None
        if pending is not None and self._claims is not None:
            claims, seq, hour, min_hour = pending
            self._claims.add(claims, hour, min_hour)
            self._claims_seq = max(self._claims_seq, seq)

    @abc.abstractmethod
    def _claims_session(self) -> contextlib.AbstractContextManager[ClaimSession]:
        """Claim decisions, serialised with other stores on this database: the tail of the log is read and this
        batch's claims appended inside it (SQLite: the batch's own transaction; PostgreSQL: a short transaction of
        its own under an advisory lock, so the lock is not held while the batch's bulk commits)."""

    def _claim_index(self, now: float, session: ClaimSession) -> ClaimIndex:
        """The claim index, with every claim other processes logged since this store last looked (under the lock).

        Raises:
            StoreUnavailableError: a claim log row is corrupt: the index cannot be trusted until it is repaired.
        """
        index = self._claims
        if index is None:
            # First use: rebuild from the claims within the window (older work is not credited anyway).
            index = ClaimIndex()
            rows = session.query(
                self._sql("SELECT seq, created, data FROM claim_log WHERE created >= ? ORDER BY seq"),
                (now - self._rules.max_age_s - 2 * HOUR_S,),
            )
        else:
            rows = session.query(
                self._sql("SELECT seq, created, data FROM claim_log WHERE seq > ? ORDER BY seq"),
                (self._claims_seq,),
            )
        min_hour = int((now - self._rules.max_age_s) // HOUR_S) - 1
        for seq, created, data in rows:
            try:
                index.add(decode_batch(bytes(data)), int(created // HOUR_S), min_hour)
            except StoreError as e:
                raise StoreUnavailableError(
                    f"{e} (claim_log seq {seq}): delete that row and restart; its claims are forgotten, nothing else"
                ) from e
            self._claims_seq = max(self._claims_seq, int(seq))
        self._claims = index
        if now - self._claims_pruned_at >= _PRUNE_EVERY_S:
            session.query(self._sql("DELETE FROM claim_log WHERE created < ?"), (now - self._rules.max_age_s - 86400,))
            self._claims_pruned_at = now
        return index

    def _write_credits(self, tally: LedgerTally, resolution: Resolution | None) -> None:
        """The ledger's inference counts (claimed and credited) and, when something was not credited, why."""
        credited = {} if resolution is None else resolution.tally
        inference_rows = [
            (dev, day, model, n, credited.get((dev, day, model, Outcome.CREDITED.value), 0))
            for dev, day, model, n in tally.inference_rows()
        ]
        if inference_rows:
            self._executemany(self._sql(q.UPSERT_INFERENCES), inference_rows)
        if resolution is None:
            return
        if resolution.hours:
            self._executemany(self._sql(q.UPSERT_HOURS), resolution.hours)
        rows = [(*key, n) for key, n in sorted(resolution.tally.items()) if key[3] != Outcome.CREDITED.value]
        if rows:
            self._executemany(self._sql(q.UPSERT_CREDITS), rows)

    def _credit_hours(self, buckets: list[tuple[str, str, int]]) -> list[tuple[Any, ...]]:
        """(device, model, hour, credited, cap) of the stored buckets among ``buckets``.

        One query for the batch: its devices and the span of its hours (usually one or two), filtered here.
        """
        out: list[tuple[Any, ...]] = []
        devices = sorted({d for d, _m, _h in buckets})
        lo, hi = min(h for _d, _m, h in buckets), max(h for _d, _m, h in buckets)
        for i in range(0, len(devices), _IN_CHUNK):
            cond, params = self.dialect.in_list("device_id", devices[i : i + _IN_CHUNK])
            p = self.dialect.placeholder
            out += self._query(
                "SELECT device_id, model_id, hour, credited, cap FROM credit_hours"  # noqa: S608
                f" WHERE {cond} AND hour >= {p} AND hour <= {p}",
                [*params, lo, hi],
            )
        wanted = set(buckets)
        return [r for r in out if (r[0], r[1], r[2]) in wanted]

    # Backing (for BatchState, inside the ingest transaction)

    def load_device_key(self, device_id: str) -> DeviceKey | None:
        """The device's key and revocation time, or None (``Backing``)."""
        return self._load_device_keys([device_id])[device_id]

    def stored_link(self, device_id: str, counter: int) -> ChainLink | None:
        """The stored envelope at ``counter`` as a link, or None (``Backing``)."""
        rows = self._query(
            self._sql("SELECT hash, prev FROM envelopes WHERE device_id = ? AND counter = ?"), (device_id, counter)
        )
        return ChainLink(counter, bytes(rows[0][0]), bytes(rows[0][1])) if rows else None

    def hole_at(self, device_id: str, counter: int) -> Hole | None:
        """The open hole containing ``counter``, or None (``Backing``); holes are disjoint, keyed by ``lo``."""
        rows = self._query(
            self._sql("SELECT lo, hi, day FROM holes WHERE device_id = ? AND lo <= ? ORDER BY lo DESC LIMIT 1"),
            (device_id, counter),
        )
        if rows and rows[0][1] >= counter:
            return Hole(*rows[0])
        return None

    def replace_hole(self, device_id: str, old_lo: int | None, new: list[Hole]) -> None:
        """Delete the hole at ``old_lo`` and insert ``new`` (``Backing``)."""
        if old_lo is not None:
            self._execute(self._sql("DELETE FROM holes WHERE device_id = ? AND lo = ?"), (device_id, old_lo))
        if new:
            self._executemany(
                self._sql("INSERT INTO holes (device_id, lo, hi, day) VALUES (?, ?, ?, ?)"),
                [(device_id, h.lo, h.hi, h.day) for h in new],
            )

    # ------------------------------------------------------------------------------------------------ receipts

    def delivery_states(self, device_ids: Sequence[str]) -> dict[str, DeliveryState]:
        """What is stored of each device's chain (see ``Store.delivery_states``): a few indexed reads per device."""
        ids = sorted(set(device_ids))
        out: dict[str, DeliveryState] = {}
        if not ids:
            return out
        # No transaction: the head is read first and only holes below it are read after, so a batch committed
        # in between (PostgreSQL reads at READ COMMITTED) can only have filled holes (stored) or opened new ones
        # above that head (left out): the state read never says stored of a counter that is not.
        with self._guard("delivery states"):
            cond, params = self.dialect.in_list("d.device_id", ids)
            heads = self._query(
                "SELECT d.device_id, c.head_counter, c.head_hash, c.gaps FROM devices d"  # noqa: S608 -- constants
                f" LEFT JOIN chains c ON c.device_id = d.device_id WHERE {cond}",
                params,
            )
            for dev, head, head_hash, gaps in heads:
                if head is None:
                    out[dev] = DeliveryState(0, GENESIS_PREV, 0, GENESIS_PREV, ())
                elif not gaps:  # the usual case: no hole, so one read per batch for every device in it
                    out[dev] = DeliveryState(int(head), bytes(head_hash), int(head), bytes(head_hash), ())
                else:
                    out[dev] = self._delivery_with_holes(dev, int(head), bytes(head_hash))
        return out

    def _delivery_with_holes(self, dev: str, head: int, head_hash: bytes) -> DeliveryState:
        # The highest holes only: a box that skipped counters on purpose cannot make this read unbounded.
        rows = self._query(
            self._sql("SELECT lo, hi FROM holes WHERE device_id = ? AND lo < ? ORDER BY lo DESC LIMIT ?"),
            (dev, head, MAX_HOLES + 1),
        )
        missing = tuple((int(lo), int(hi)) for lo, hi in reversed(rows))
        lowest = self._query(self._sql("SELECT MIN(lo) FROM holes WHERE device_id = ? AND lo < ?"), (dev, head))[0][0]
        stored = head if lowest is None else int(lowest) - 1
        if stored == head:
            stored_hash = head_hash
        elif stored == 0:
            stored_hash = GENESIS_PREV
        else:
            link = self.stored_link(dev, stored)
            if link is None:  # the envelope right below the lowest hole is stored by construction
                raise StoreError(f"internal error: {dev!r} has no stored envelope {stored} below its holes")
            stored_hash = link.hash
        return DeliveryState(stored, stored_hash, head, head_hash, tuple(m for m in missing if m[0] > stored))

    # ------------------------------------------------------------------------------------------------- status

    def record_status(self, device_id: str, status: Mapping[str, Any], at: float) -> None:
        """Store a device's latest status message (see ``Store.record_status`` and ``_status``).

        Args:
            device_id: the device id of the status topic (registered or not: strangers are kept, see ``strangers``).
            status: the decoded JSON object.
            at: the gateway's receipt time.

        Raises:
            GatewayInputError: invalid device id or time, not a JSON-encodable mapping, or over 64 KiB as JSON.
            StoreError: the database failed.
        """
        new = parse_status(device_id, status, at)
        with self._guard("record_status"), self._transaction():
            self._upsert_status(device_id, new)

    def _upsert_status(self, device_id: str, new: StatusRow) -> None:
        """Store ``new`` as the device's status, merged with the stored one (inside a transaction)."""
        if not self._execute(self._sql(q.INSERT_STATUS), (device_id, *dataclasses.astuple(new))):
            (old,) = self._query(self._sql(q.SELECT_STATUS + self.dialect.lock_rows), (device_id,))
            old_row = StatusRow(*old)
            row = merge_status(old_row, new)
            self._execute(self._sql(q.UPDATE_STATUS), (*dataclasses.astuple(row), device_id))
            if old_row.info == new.info:
                return  # the retained copy delivered again: its backlog is as old as the first delivery's
        if new.outbox_backlog is not None:
            # With the chain head of now: what is accepted from here on drains this backlog (the box sends in order).
            self._execute(self._sql(q.UPSERT_BACKLOG), (device_id, new.outbox_backlog, new.last_seen, device_id))

    # ------------------------------------------------------------------------------------------------ heartbeats

    def beat(self, heartbeat: GatewayHeartbeat) -> None:
        """Record a gateway's heartbeat (see ``Store.beat``)."""
        h = heartbeat
        at = check_time(h.at, "heartbeat time")
        with self._guard("beat"), self._transaction():
            self._execute(
                self._sql(q.UPSERT_HEARTBEAT),
                (h.gateway_id[:128], h.host[:255], h.pid, h.started_at, at, int(h.connected), h.stopped_at),
            )

    def heartbeats(self) -> list[GatewayHeartbeat]:
        """Every gateway's latest heartbeat, newest first (see ``Store.heartbeats``)."""
        with self._guard("heartbeats"):
            rows = self._query(
                "SELECT gateway_id, host, pid, started_at, at, connected, stopped_at FROM gateway_heartbeats"
            )
        beats = [
            GatewayHeartbeat(g, host, pid, started, at, bool(c), stopped)
            for g, host, pid, started, at, c, stopped in rows
        ]
        return sorted(beats, key=lambda b: (-b.at, b.gateway_id))

    # ------------------------------------------------------------------------------------------- suspensions

    def suspend(self, device_id: str, *, now: float, base_s: float, reason: str, by: str) -> Suspension | None:
        """Suspend a registered device unless a suspension is in force (see ``Store.suspend``)."""
        now = check_time(now, "suspension time")
        with self._guard("suspend"), self._transaction():
            if not self._query(self._sql("SELECT 1 FROM devices WHERE device_id = ?"), (device_id,)):
                return None
            old = self._suspension(device_id, lock=True)
            if old is not None and old.active(now):
                return old
            strikes = old.strikes + 1 if old is not None and now - old.until < STRIKE_MEMORY_S else 1
            new = Suspension(device_id, now, now + suspension_length(strikes, base_s), strikes, reason[:500], by[:64])
            row = (new.since, new.until, new.strikes, new.reason, new.by, device_id)
            if old is None:
                self._execute(
                    self._sql(
                        "INSERT INTO suspensions (since, until, strikes, reason, by_gateway, device_id)"
                        " VALUES (?, ?, ?, ?, ?, ?)"
                    ),
                    row,
                )
            else:
                self._execute(
                    self._sql(
                        "UPDATE suspensions SET since = ?, until = ?, strikes = ?, reason = ?, by_gateway = ?"
                        " WHERE device_id = ?"
                    ),
                    row,
                )
        return new

    def resume(self, device_id: str, *, now: float) -> Suspension | None:
        """End the device's suspension now (see ``Store.resume``)."""
        now = check_time(now, "resume time")
        with self._guard("resume"), self._transaction():
            old = self._suspension(device_id, lock=True)
            if old is None or not old.active(now):
                return None
            self._execute(self._sql("UPDATE suspensions SET until = ? WHERE device_id = ?"), (now, device_id))
        return dataclasses.replace(old, until=now)

    def suspensions(self, *, now: float | None = None) -> list[Suspension]:
        """The last suspension per device, in force at ``now`` only when given (see ``Store.suspensions``)."""
        sql = "SELECT device_id, since, until, strikes, reason, by_gateway FROM suspensions"
        params: tuple[object, ...] = ()
        if now is not None:
            sql += " WHERE since <= ? AND until > ?"
            params = (now, now)
        with self._guard("suspensions"):
            rows = self._query(self._sql(sql + " ORDER BY device_id"), params)
        return [Suspension(*r) for r in rows]

    def _suspension(self, device_id: str, *, lock: bool) -> Suspension | None:
        sql = "SELECT device_id, since, until, strikes, reason, by_gateway FROM suspensions WHERE device_id = ?"
        rows = self._query(self._sql(sql + (self.dialect.lock_rows if lock else "")), (device_id,))
        return Suspension(*rows[0]) if rows else None

    def statuses(self) -> list[DeviceStatus]:
        """The status of every registered device, ordered by id (see ``Store.statuses``)."""
        with self._guard("statuses"):
            rows = self._query(
                self._sql(
                    "SELECT d.device_id, s.state, s.reason, s.since, s.last_seen, s.model, s.outbox_backlog, s.info,"
                    " c.head_counter, c.gaps, c.last_accepted, r.rejects, d.revoked_at,"
                    " b.backlog, b.reported_at, b.head_counter"
                    " FROM devices d"
                    " LEFT JOIN statuses s ON s.device_id = d.device_id"
                    " LEFT JOIN chains c ON c.device_id = d.device_id"
                    " LEFT JOIN backlog_reports b ON b.device_id = d.device_id"
                    " LEFT JOIN (SELECT device_id, CAST(SUM(rejects) AS {int}) AS rejects FROM ledger"
                    " GROUP BY device_id) r ON r.device_id = d.device_id"
                )
            )
        out = []
        for row in sorted(rows):
            dev, state, reason, since, seen, model, backlog, info, head, gaps, accepted, rejects = row[:12]
            revoked_at, reported, reported_at, head_then = row[12:]
            last_seen = max((t for t in (seen, accepted) if t is not None), default=None)
            out.append(
                DeviceStatus(
                    dev,
                    state or "unknown",
                    reason,
                    since,
                    last_seen,
                    head,
                    gaps or 0,
                    rejects or 0,
                    model,
                    backlog if reported is None else _drained(reported, head_then, head),
                    json.loads(info) if info else {},
                    revoked_at,
                    reported,
                    reported_at,
                )
            )
        return out

    def strangers(self) -> list[DeviceStatus]:
        """Status messages from device ids that are not registered, ordered by id (see ``Store.strangers``)."""
        with self._guard("strangers"):
            rows = self._query(
                "SELECT device_id, state, reason, since, last_seen, model, outbox_backlog, info FROM statuses s"
                " WHERE NOT EXISTS (SELECT 1 FROM devices d WHERE d.device_id = s.device_id)"
            )
        return [
            DeviceStatus(dev, state, reason, since, seen, None, 0, 0, model, backlog, json.loads(info))
            for dev, state, reason, since, seen, model, backlog, info in sorted(rows)
        ]

    # ------------------------------------------------------------------------------------------------- ledger

    def ledger(
        self, *, device_id: str | None = None, day_from: str | None = None, day_to: str | None = None
    ) -> list[LedgerRow]:
        """Ledger rows ordered by (device, day); day bounds inclusive (see ``Store.ledger``)."""
        where, params = _day_conditions(day_from, day_to)
        if device_id is not None:
            where, params = where + " AND device_id = ?", [*params, device_id]
        with self._guard("ledger"):
            rows = self._query(
                self._sql(f"SELECT device_id, day, {q.LEDGER_COLUMNS} FROM ledger WHERE 1 = 1{where}"),  # noqa: S608
                params,
            )
            models = self._query(
                self._sql(
                    f"SELECT device_id, day, model_id, count, credited FROM ledger_inferences WHERE 1 = 1{where}"  # noqa: S608
                ),
                params,
            )
            credit_rows = self._query(
                self._sql(
                    f"SELECT device_id, day, model_id, outcome, count FROM ledger_credits WHERE 1 = 1{where}"  # noqa: S608
                ),
                params,
            )
        inferences: dict[tuple[str, str], dict[str, int]] = {}
        credits: dict[tuple[str, str], dict[str, dict[str, int]]] = {}
        for dev, day, model, n, credited in sorted(models):
            inferences.setdefault((dev, day), {})[model] = n
            if credited:
                credits.setdefault((dev, day), {}).setdefault(model, {})[Outcome.CREDITED.value] = credited
        for dev, day, model, outcome, n in sorted(credit_rows):
            credits.setdefault((dev, day), {}).setdefault(model, {})[outcome] = n
        out = []
        for dev, day, env, rec, readings, events, missing, late, dups, rejects, lost, lost_rec in sorted(rows):
            out.append(
                LedgerRow(
                    device_id=dev,
                    day=day,
                    envelopes=env,
                    records=rec,
                    inferences=inferences.get((dev, day), {}),
                    readings=readings,
                    events=events,
                    missing=missing,
                    late=late,
                    duplicates=dups,
                    rejects=rejects,
                    announced_lost=lost,
                    announced_lost_records=lost_rec,
                    credits=credits.get((dev, day), {}),
                )
            )
        return out

    def envelopes(
        self, device_id: str, *, day_from: str | None = None, day_to: str | None = None, from_counter: int = 0
    ) -> Iterator[StoredEnvelope]:
        """Stored envelopes of a device in counter order, fetched in pages (see ``Store.envelopes``).

        Pages are read by key (counter > the last one returned), so no cursor stays open between pages and other
        calls on this store may interleave; an envelope filled late below the current position is not returned.

        Raises:
            GatewayInputError: a day is not ``YYYY-MM-DD`` (raised here, before iterating).
            StoreError: the database failed (raised while iterating).
        """
        where, params = _day_conditions(day_from, day_to)
        return self._envelope_pages(device_id, where, params, max(0, from_counter))

    def _envelope_pages(self, device_id: str, where: str, params: list[object], start: int) -> Iterator[StoredEnvelope]:
        stop = MAX_COUNTER
        if where:  # a day range: its counter bounds from the day index, then pages along the primary key
            with self._guard("envelopes"):
                lo, hi = self._query(
                    self._sql(f"SELECT MIN(counter), MAX(counter) FROM envelopes WHERE device_id = ?{where}"),  # noqa: S608
                    [device_id, *params],
                )[0]
            if lo is None:
                return
            start, stop = max(start, lo), hi
        page = self._sql(
            "SELECT counter, hash, prev, received_at, data, credit FROM envelopes"  # noqa: S608
            f" WHERE device_id = ? AND counter >= ? AND counter <= ?{where} ORDER BY counter LIMIT ?"
        )
        while start <= stop:
            with self._guard("envelopes"):
                rows = self._query(page, [device_id, start, stop, *params, _PAGE_ROWS])
            for counter, h, prev, received_at, data, credit in rows:
                yield StoredEnvelope(device_id, counter, bytes(h), bytes(prev), received_at, bytes(data), credit)
            if len(rows) < _PAGE_ROWS:
                return
            start = rows[-1][0] + 1

    def credit_caps(self, device_id: str) -> dict[tuple[str, int], int]:
        """The cap of every (model, hour) with credited inferences of the device (see ``Store.credit_caps``)."""
        with self._guard("credit_caps"):
            rows = self._query(
                self._sql("SELECT model_id, hour, cap FROM credit_hours WHERE device_id = ?"), (device_id,)
            )
        return {(model, hour): cap for model, hour, cap in rows}

    # ------------------------------------------------------------------------------------------------- events

    def events(
        self, *, kind_prefix: str = "", since: float = 0.0, device_id: str | None = None, limit: int = 10000
    ) -> list[DeviceEvent]:
        """Stored events, oldest first (see ``Store.events``)."""
        since = check_time(since, "since")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise GatewayInputError(f"limit must be an integer >= 0, got {limit!r}")
        if not isinstance(kind_prefix, str):
            raise GatewayInputError(f"kind_prefix must be text, got {type(kind_prefix).__name__}")
        where, params = " WHERE received_at >= ?", list[object]([since])
        if kind_prefix:
            # substr, not LIKE or a range: no wildcard escaping, and PostgreSQL collations cannot reorder it.
            where, params = where + " AND substr(kind, 1, ?) = ?", [*params, len(kind_prefix), kind_prefix]
        if device_id is not None:
            where, params = where + " AND device_id = ?", [*params, device_id]
        with self._guard("events"):
            rows = self._query(
                self._sql(
                    "SELECT device_id, counter, idx, ts, received_at, kind, data FROM events"  # noqa: S608
                    f"{where} ORDER BY received_at, device_id, counter, idx LIMIT ?"
                ),
                [*params, limit],
            )
        return [
            DeviceEvent(dev, counter, ts, at, kind, json.loads(data)) for dev, counter, _i, ts, at, kind, data in rows
        ]

    # --------------------------------------------------------------------------------------------- quarantine

    def quarantine_counts(self) -> dict[str, int]:
        """Rejected inputs by kind (see ``Store.quarantine_counts``)."""
        with self._guard("quarantine_counts"):
            rows = self._query("SELECT kind, COUNT(*) FROM quarantine GROUP BY kind ORDER BY kind")
        return {kind: int(n) for kind, n in rows}

    def quarantined(self, *, limit: int = 100) -> list[dict[str, Any]]:
        """The newest quarantined inputs first (see ``Store.quarantined``)."""
        with self._guard("quarantined"):
            rows = self._query(
                self._sql(
                    "SELECT received_at, topic, device_id, kind, reason, size, hash FROM quarantine"
                    " ORDER BY id DESC LIMIT ?"
                ),
                (max(0, int(limit)),),
            )
        keys = ("time", "topic", "device", "kind", "reason", "size", "hash")
        return [dict(zip(keys, (*r[:6], None if r[6] is None else bytes(r[6]).hex()), strict=True)) for r in rows]


# --------------------------------------------------------------------------------------------------- helpers


def _drained(reported: int, head_then: int | None, head_now: int | None) -> int:
    """A reported backlog less the envelopes accepted since (the head's advance): a box sends its outbox in counter
    order, so the oldest waiting envelopes are the next ones the gateway accepts."""
    return max(0, reported - max(0, (head_now or 0) - (head_then or 0)))


def _device_record(row: tuple[Any, ...]) -> DeviceRecord:
    device_id, did, public_key, cert_pem, enrolled_at, revoked_at = row
    return DeviceRecord(device_id, did, bytes(public_key), cert_pem, enrolled_at, revoked_at)
