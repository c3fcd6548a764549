"""The durable outbox: every signed envelope from the moment it is sealed until the fleet said it is stored.

An envelope leaves the outbox when a signed receipt of the fleet covers it (``apply_receipt``,
``edge.wire.receipts``), or, on a box without the fleet receipt key, when the broker acknowledged it (``ack``).

One SQLite database (stdlib ``sqlite3``) on the data partition. It also owns the device's chain head (the next
counter and the hash of the last envelope), so sealing an envelope and advancing the head are one transaction.

Invariants:
- A counter is issued at most once, even across kill -9 and power loss: the counter, the chain head and the envelope
  are committed together (``BEGIN IMMEDIATE`` ... ``COMMIT``) with ``synchronous=FULL``. In WAL mode,
  ``synchronous=NORMAL`` does not fsync the WAL at commit, so a power cut can roll back the last commits after their
  envelopes were published; the device would then issue those counters again with different bytes, which the
  gateway sees as a fork. The head is read inside every write transaction, never cached, so even two processes on
  one file cannot issue the same counter; the primary key on ``counter`` refuses a head that fell behind.
- The chain: envelope ``n`` has ``prev = envelope_hash(envelope n-1)``; the head's hash is that of the last envelope
  sealed, whether it is still here, acknowledged or dropped.
- Bounded: the backlog never exceeds ``max_envelopes`` envelopes or ``max_bytes`` envelope bytes. To seal past a
  bound (or on a full disk) the oldest envelopes are deleted in the same transaction, and the envelope being sealed
  starts with a loss notice naming them; if a dropped envelope carried a loss notice itself, its counts and range
  are carried into the new one, so every gap the gateway sees stays explained by an envelope that is delivered or
  still here. Loss is never silent: it is announced, counted (``dropped_*``) and logged.
- A row whose bytes changed since it was sealed (bit rot) is never published: each row stores the SHA-256 of its
  bytes (its chain hash, computed at seal time anyway); ``pending`` recomputes it (~10 us for 14 KB; 0.018 ms per
  envelope read in all, where checking our own Ed25519 signature made it 0.19 ms) and checks that the bytes are the
  envelope of this device and this counter. A row that fails is deleted, counted (``corrupt_rows``), logged and
  announced as loss in the next envelope sealed. A file of schema 1 (no digests) is migrated when opened
  (``_outbox_schema``): each row's signature is verified once, and only rows that verify get a digest; the others
  are removed as corrupt.
- Records the caller dropped before sealing (``seal_many(..., unsealed=n)``) are announced in the same notice as the
  outbox's own loss; the arithmetic of both is ``edge.telemetry.loss``.
- Nothing is half-written: every failure rolls its transaction back; a full disk that dropping cannot fix raises
  ``OutboxFullError`` with the outbox unchanged, and the caller keeps its records.
- State lives only in this database, changed only by transactions (no side files). Besides the envelopes and the
  head, the delivery row keeps the latest receipt applied and what receipts and PUBACKs deleted
  (``edge.telemetry._delivery``).
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edge.errors import EdgeError, InputError, ResourceError, TransportError
from edge.identity.keys import validate_device_id
from edge.log import event
from edge.telemetry._delivery import (
    Applied,
    DeliveryStats,
    ReceiptMismatchError,
    apply_receipt,
    count_acked,
    read_delivery,
)
from edge.telemetry._outbox_schema import (
    INSERT_ENVELOPE,
    SCHEMA_VERSION,
    ForeignOwnerError,
    Head,
    SchemaError,
    open_schema,
    read_head,
    write_head,
)
from edge.telemetry.loss import Loss, merge
from edge.wire._cbor import DECODE_ERRORS
from edge.wire.envelope import EnvelopeLayout, envelope_hash, first_record, parse_envelope, seal_envelope
from edge.wire.receipts import Receipt
from edge.wire.schema import TYPE_LOSS, LossNotice, TelemetryLimits, TelemetryRecord, encode_record, record_from_item

__all__ = [
    "SCHEMA_VERSION",
    "Applied",
    "DeliveryStats",
    "EnvelopeTooLargeError",
    "ForeignOutboxError",
    "Outbox",
    "OutboxError",
    "OutboxFormatError",
    "OutboxClosedError",
    "OutboxFullError",
    "OutboxUnavailableError",
    "OutboxStats",
    "ReceiptMismatchError",
    "Sealed",
]

log = logging.getLogger("edge.telemetry.outbox")

# The largest canonical loss notice (map head, 7 keys, a float64, four 9-byte uints and a 5-byte unsealed count: 59
# bytes) plus the growth of the record array head and of the payload's byte-string head when it is prepended (2 + 2
# bytes), rounded up: an envelope is accepted only if it fits with this much room, so a notice can always be added.
_NOTICE_SLACK: Final = 64
_DROP_CHUNK: Final = 64  # rows read per step while choosing the oldest envelopes to drop
# Counters per DELETE in ``ack``: below SQLite's smallest default variable limit (999 before 3.32).
_ACK_CHUNK: Final = 500
_BUSY_TIMEOUT_S: Final = 5.0
# A checkpoint truncates the WAL back to this size, so the file a burst left behind does not hold disk space.
_WAL_SIZE_LIMIT: Final = 4 * 1024 * 1024


class OutboxError(EdgeError):
    """Groups the outbox's errors (caught, never raised: each subclass has its fault root); the message names it."""


class OutboxUnavailableError(OutboxError, TransportError):
    """The outbox's database cannot be opened or used (SQLite failed, not in WAL mode)."""


class OutboxClosedError(OutboxError, RuntimeError):
    """The outbox was used after ``close()``: a bug of its caller."""


class OutboxFormatError(OutboxError, InputError):
    """The file is not an outbox of this schema (another database, another version, or an inconsistent head)."""


class ForeignOutboxError(OutboxFormatError):
    """The outbox belongs to another device id or another key: its chain is not ours to continue."""


class OutboxFullError(OutboxError, ResourceError):
    """The disk is full even after dropping the oldest envelopes; nothing was written, retry later."""


class EnvelopeTooLargeError(OutboxError, InputError):
    """One batch can never be sealed: too many records, or larger than the outbox or the wire allows on its own."""


@dataclass(frozen=True, slots=True)
class Sealed:
    """An envelope committed to the outbox.

    Attributes:
        counter: its counter.
        hash: ``envelope_hash`` of its bytes (the next envelope's ``prev``).
        nbytes: its size in bytes.
        records: how many of the caller's records it holds (a prepended loss notice is not counted).
        loss: the loss notice it starts with, or None.
    """

    counter: int
    hash: bytes
    nbytes: int
    records: int
    loss: LossNotice | None = None


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """Counters of the outbox, read in one transaction (they add up).

    Attributes:
        backlog_envelopes: envelopes waiting for an acknowledgement.
        backlog_bytes: their total size.
        backlog_records: the caller's records they hold.
        next_counter: the counter the next envelope will get.
        dropped_envelopes: envelopes deleted unsent by policy (bounds or full disk), ever.
        dropped_records: the caller's records they held.
        corrupt_rows: rows deleted because their bytes no longer verified, ever.
    """

    backlog_envelopes: int
    backlog_bytes: int
    backlog_records: int
    next_counter: int
    dropped_envelopes: int
    dropped_records: int
    corrupt_rows: int


@dataclass
class _Txn:
    """One sealing transaction: the head it changes, its clock reading, what it sealed and dropped so far."""

    head: Head
    now: float
    attempted_bytes: int = 0
    attempted: int = 0
    dropped: list[Loss] = field(default_factory=list)
    rest: Loss = field(default_factory=Loss)  # loss beyond what the last notice could hold: the next one's


class _DiskFullError(ResourceError):
    """SQLITE_FULL inside a write transaction (already rolled back); ``attempted`` is the bytes sealed until then."""

    def __init__(self, attempted: int, batches: int) -> None:
        super().__init__(f"database or disk is full after sealing {batches} envelopes ({attempted} bytes)")
        self.attempted = attempted
        self.batches = batches


def _is_full(e: sqlite3.Error) -> bool:
    # The error code is the contract; the message is SQLite's fixed text for it, kept for errors raised without one.
    return getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "database or disk is full" in str(e)


class Outbox:
    """The durable, bounded store of sealed envelopes and owner of the chain head; thread-safe.

    One connection, guarded by a lock: the sealer thread (``seal``/``seal_many``) and the publisher thread
    (``pending``/``ack``) share it. Rows are checked against their digests outside the lock.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        device_id: str,
        key: Ed25519PrivateKey,
        limits: TelemetryLimits,
        max_bytes: int = 64 * 1024 * 1024,
        max_envelopes: int = 100_000,
        clock: Callable[[], float] = time.time,
        verify_rows: bool = True,
        max_pages: int | None = None,
    ) -> None:
        """Open the outbox at ``path``, creating it on first use.

        Args:
            path: the database file on the data partition (its directory must exist).
            device_id: this device's id; an existing outbox must belong to it.
            key: the device's private key (it signs envelopes; its public half checks rows of a schema-1 file once,
                when they are migrated).
            limits: the limits the gateway applies; no envelope is sealed that it would refuse.
            max_bytes: the most envelope bytes the backlog may hold (the file is larger by SQLite's page overhead,
                ~10 %, plus a WAL of up to a few MiB).
            max_envelopes: the most envelopes the backlog may hold.
            clock: epoch seconds for ``created`` and loss notices (injectable for tests).
            verify_rows: check each row in ``pending`` against the SHA-256 digest stored at seal time, and that it
                holds the envelope of this device and counter (bit rot); ``pending`` costs 0.018 ms per 14 KB
                envelope with it, 0.006 ms without (it was 0.19 ms when it verified our signature).
            max_pages: cap the database at this many pages (``PRAGMA max_page_count``): simulates a full disk.

        Raises:
            ValueError: a bound is not positive.
            InvalidDeviceIdError: ``device_id`` is not a valid device id.
            OutboxFormatError: the file is not an outbox of this schema.
            ForeignOutboxError: the outbox belongs to another device id or key.
            OutboxError: the database cannot be opened (the message names the path).
        """
        if max_bytes < 1 or max_envelopes < 1:
            raise ValueError(
                f"outbox bounds must be positive, got max_bytes={max_bytes}, max_envelopes={max_envelopes}"
            )
        self.path = Path(path)
        self.device_id = validate_device_id(device_id)
        self.limits = limits
        self.max_bytes = max_bytes
        self.max_envelopes = max_envelopes
        self.verify_rows = verify_rows
        self._key = key
        self._public = key.public_key()
        self._public_raw = self._public.public_bytes(Encoding.Raw, PublicFormat.Raw)
        self._clock = clock
        self._lock = threading.Lock()
        self._layout = EnvelopeLayout(self.device_id)
        try:
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE takes the write lock up front, so a
            # transaction never fails half-way on a lock upgrade). timeout is SQLite's busy_timeout.
            self._conn: sqlite3.Connection | None = sqlite3.connect(
                self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as e:
            raise OutboxUnavailableError(f"cannot open outbox {self.path}: {e}") from e
        try:
            self._configure(max_pages)
            self._open_schema()
        except ForeignOwnerError as e:
            self._conn.close()
            raise ForeignOutboxError(str(e)) from e
        except SchemaError as e:
            self._conn.close()
            raise OutboxFormatError(str(e)) from e
        except sqlite3.DatabaseError as e:
            self._conn.close()
            if isinstance(e, sqlite3.OperationalError):
                raise OutboxUnavailableError(f"cannot open outbox {self.path}: {e}") from e
            raise OutboxFormatError(f"{self.path} is not an outbox: {e}") from e
        except BaseException:
            self._conn.close()
            raise

    # ------------------------------------------------------------------------------------------------- opening

    def _configure(self, max_pages: int | None) -> None:
        conn = self._db()
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise OutboxUnavailableError(f"cannot open outbox {self.path}: journal_mode is {mode!r}, WAL is required")
        # FULL, not NORMAL: in WAL mode NORMAL skips the fsync at commit, so a power cut could undo the last commits
        # after their envelopes were published, and their counters would be issued again (a fork at the gateway).
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
        # Distributions build SQLite with SECURE_DELETE (Debian does), which zero-fills every freed page through the
        # WAL: an acked 14 KB envelope then costs four more page writes, 4x the commit time of an ack group and as
        # much flash wear as sealing it. FAST still zeroes deleted cells inside the pages written anyway. Delivered
        # envelopes are no secret; durability is unchanged (freed pages are not part of any committed state).
        conn.execute("PRAGMA secure_delete=FAST")
        if max_pages is not None:
            conn.execute(f"PRAGMA max_page_count={int(max_pages)}")

    def _open_schema(self) -> None:
        opened = open_schema(self._db(), str(self.path), self.device_id, self._public_raw, self._signature_fault)
        if opened.created:
            event(log, logging.INFO, "outbox created", path=str(self.path), device=self.device_id)
        if opened.version == 1:
            event(log, logging.WARNING, "outbox migrated to schema 2", path=str(self.path), removed=len(opened.removed))
        for counter, records, why in opened.removed:
            event(log, logging.ERROR, "outbox row corrupt: removed unsent", counter=counter, records=records, why=why)

    # ------------------------------------------------------------------------------------------------- helpers

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise OutboxClosedError(f"outbox {self.path} is closed")
        return self._conn

    def _read_head(self) -> Head:
        head = read_head(self._db())
        if head is None:
            raise OutboxFormatError(f"{self.path}: the head row is missing")
        return head

    def _write_head(self, head: Head) -> None:
        write_head(self._db(), head)

    def _rollback(self) -> None:
        conn = self._db()
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def _sqlite_error(self, what: str, e: sqlite3.Error) -> OutboxError:
        if _is_full(e):
            return OutboxFullError(f"outbox {self.path}: {what}: {e}")
        return OutboxError(f"outbox {self.path}: {what}: {e}")

    # ------------------------------------------------------------------------------------------------- sealing

    def seal(self, records: Sequence[TelemetryRecord], *, unsealed: int = 0) -> Sealed:
        """Seal one envelope and commit it with the advanced chain head (one fsync).

        Args:
            records: the batch, at most ``limits.max_records - 1`` records (one slot is kept for a loss notice).
            unsealed: records the caller dropped before sealing, to announce in this envelope's loss notice.

        Returns:
            What was committed.

        Raises:
            EnvelopeTooLargeError: the batch can never fit (see ``seal_many``); nothing written.
            OutboxFullError: the disk is full even after dropping the oldest envelopes; nothing written.
            MalformedRecordError: a record violates the schema or ``limits``; nothing written.
            MalformedEnvelopeError: the envelope exceeds ``limits.max_envelope_bytes`` or the clock is out of range.
            OutboxError: the outbox is closed or SQLite failed; nothing written.
        """
        return self.seal_many([records], unsealed=unsealed)[0]

    def seal_many(self, batches: Sequence[Sequence[TelemetryRecord]], *, unsealed: int = 0) -> list[Sealed]:
        """Seal several envelopes, in order, in one transaction (group commit: one fsync for all).

        Bounds are enforced per envelope before it is inserted: the oldest envelopes are deleted until it fits, and
        it starts with a loss notice naming them (merged with any loss not yet announced and with ``unsealed``). On a
        full disk the oldest envelopes are dropped the same way to make room and the transaction is retried once.

        Args:
            batches: the batches, each at most ``limits.max_records - 1`` records.
            unsealed: records the caller dropped before sealing (they never got a counter); the first envelope
                announces them. With no batches, one envelope holding only the notice is sealed.

        Returns:
            One ``Sealed`` per batch (or the one notice envelope), in order, all committed.

        Raises:
            ValueError: ``unsealed`` is negative.
            EnvelopeTooLargeError: a batch has too many records, or its envelope plus a worst-case loss notice
                exceeds ``max_bytes`` or ``limits.max_envelope_bytes``; nothing written.
            OutboxFullError: the disk is full even after dropping; nothing written (keep the records, retry later).
            MalformedRecordError: a record violates the schema or ``limits``; nothing written.
            MalformedEnvelopeError: an envelope exceeds ``limits.max_envelope_bytes`` or the clock is out of range.
            OutboxError: the outbox is closed or SQLite failed; nothing written.
        """
        for records in batches:
            if len(records) >= self.limits.max_records:
                raise EnvelopeTooLargeError(
                    f"batch of {len(records)} records: at most {self.limits.max_records - 1}"
                    " (one slot is kept for a loss notice)"
                )
        given = Loss.of_unsealed(unsealed) if unsealed else None
        if not batches:
            if given is None:
                return []
            batches = [[]]
        with self._lock:
            try:
                try:
                    return self._seal_transaction(batches, given, reserve=0)
                except _DiskFullError as first:
                    # Room for what failed to fit, twice over: SQLite needs pages for the b-tree besides the blobs.
                    estimate = first.attempted * len(batches) // max(first.batches, 1)
                    reserve = 2 * estimate + 4 * self._page_size()
                self._checkpoint()
                try:
                    return self._seal_transaction(batches, given, reserve=reserve)
                except _DiskFullError as e:
                    raise OutboxFullError(
                        f"outbox {self.path}: disk full even after dropping the oldest envelopes;"
                        f" {len(batches)} batches not sealed"
                    ) from e
            except sqlite3.Error as e:
                raise self._sqlite_error("seal", e) from e

    def _seal_transaction(
        self, batches: Sequence[Sequence[TelemetryRecord]], given: Loss | None, reserve: int
    ) -> list[Sealed]:
        conn = self._db()
        tx: _Txn | None = None
        try:
            conn.execute("BEGIN IMMEDIATE")
            tx = _Txn(self._read_head(), self._clock())
            loss = merge(tx.head.unannounced(), given)
            if reserve > 0 and tx.head.backlog_envelopes > 0:
                loss = merge(loss, self._drop_oldest(tx, min_envelopes=1, min_bytes=reserve))
            out = []
            for records in batches:
                out.append(self._seal_one(tx, records, loss))
                loss = tx.rest or None  # the rest is announced by the next envelope
            tx.head.set_unannounced(None)
            self._write_head(tx.head)
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            self._rollback()
            if _is_full(e):
                raise _DiskFullError(tx.attempted_bytes if tx else 0, max(tx.attempted if tx else 0, 1)) from e
            raise
        except BaseException:
            self._rollback()
            raise
        for d in tx.dropped:
            event(
                log,
                logging.WARNING,
                "outbox dropped the oldest envelopes unsent",
                envelopes=d.envelopes,
                records=d.records,
                first=d.first,
                last=d.last,
            )
        if tx.rest:
            # Only carried notices can add up past one notice's bound, and only in a group too short to announce
            # the rest; the head keeps no unsealed count, so this is said here, loudly.
            event(log, logging.ERROR, "outbox loss beyond one notice's bound not announced", records=tx.rest.unsealed)
        return out

    def _seal_one(self, tx: _Txn, records: Sequence[TelemetryRecord], loss: Loss | None) -> Sealed:
        # Sealed optimistically with what is known to be unannounced; re-sealed (signed again, rarely) only when a
        # bound forces a drop, because the notice must be inside the signed envelope that follows the drop.
        head, now = tx.head, tx.now
        if head.backlog_envelopes + 1 > self.max_envelopes:
            # The count bound is known before encoding: drop first, so the envelope is encoded and signed once.
            loss = merge(loss, self._drop_oldest(tx, min_envelopes=head.backlog_envelopes + 1 - self.max_envelopes))
        notice = self._notice(tx, loss)
        data = self._seal_bytes(tx, records, notice)
        tx.attempted_bytes += len(data)
        tx.attempted += 1
        own = len(data) - (len(encode_record(notice, self.limits)) if notice else 0)
        cap = min(self.max_bytes, self.limits.max_envelope_bytes)
        if own + _NOTICE_SLACK > cap:
            raise EnvelopeTooLargeError(
                f"envelope of {len(records)} records is {own} bytes; with room for a loss notice it must fit {cap}"
            )
        while head.backlog_envelopes + 1 > self.max_envelopes or head.backlog_bytes + len(data) > self.max_bytes:
            if head.backlog_envelopes == 0:  # cannot happen after the size check above; never loop forever
                raise EnvelopeTooLargeError(f"envelope of {len(data)} bytes does not fit an empty outbox")
            freed = self._drop_oldest(
                tx,
                min_envelopes=head.backlog_envelopes + 1 - self.max_envelopes,
                min_bytes=head.backlog_bytes + len(data) + _NOTICE_SLACK - self.max_bytes,
            )
            loss = merge(loss, freed)
            notice = self._notice(tx, loss)
            data = self._seal_bytes(tx, records, notice)
        digest = envelope_hash(data)
        try:
            # The chain hash doubles as the row's digest: bit rot is found without verifying our own signature.
            self._db().execute(INSERT_ENVELOPE, (head.next_counter, len(records), len(data), now, digest, data))
        except sqlite3.IntegrityError as e:
            raise OutboxFormatError(f"{self.path}: counter {head.next_counter} exists: the head is behind") from e
        sealed = Sealed(head.next_counter, digest, len(data), len(records), notice)
        head.next_counter += 1
        head.last_hash = digest
        head.backlog_envelopes += 1
        head.backlog_bytes += len(data)
        head.backlog_records += len(records)
        return sealed

    @staticmethod
    def _notice(tx: _Txn, loss: Loss | None) -> LossNotice | None:
        # One notice holds a bounded count of unsealed records; what it cannot hold waits for the next envelope.
        if not loss:
            tx.rest = Loss()
            return None
        announced, tx.rest = loss.split()
        return announced.notice(tx.now)

    def _seal_bytes(self, tx: _Txn, records: Sequence[TelemetryRecord], notice: LossNotice | None) -> bytes:
        batch: Sequence[TelemetryRecord] = records if notice is None else [notice, *records]
        head = tx.head
        return seal_envelope(
            self.device_id, head.next_counter, head.last_hash, batch, tx.now, self._key, limits=self.limits
        )

    def _drop_oldest(self, tx: _Txn, *, min_envelopes: int, min_bytes: int = 0) -> Loss:
        """Delete the oldest envelopes until at least ``min_envelopes`` and ``min_bytes`` are freed (or none is left).

        Returns the loss to announce: the envelopes deleted, merged with the notices they carried.
        """
        conn, head = self._db(), tx.head
        count = nbytes = nrecords = 0
        first = last = 0
        carried: Loss | None = None
        after = 0
        while count < max(min_envelopes, 1) or nbytes < min_bytes:
            rows = conn.execute(
                "SELECT counter, data, records, bytes FROM envelopes WHERE counter > ? ORDER BY counter LIMIT ?",
                (after, _DROP_CHUNK),
            ).fetchall()
            if not rows:
                break
            for counter, data, records, size in rows:
                first = first or counter
                last = after = counter
                count += 1
                nbytes += size
                nrecords += records
                carried = merge(carried, self._carried_loss(data))
                if count >= max(min_envelopes, 1) and nbytes >= min_bytes:
                    break
        if count == 0:  # the head counted a backlog the table does not hold: only an edit from outside does this
            raise OutboxFormatError(f"{self.path}: head counts {head.backlog_envelopes} envelopes, the table none")
        conn.execute("DELETE FROM envelopes WHERE counter BETWEEN ? AND ?", (first, last))
        head.backlog_envelopes -= count
        head.backlog_bytes -= nbytes
        head.backlog_records -= nrecords
        head.dropped_envelopes += count
        head.dropped_records += nrecords
        tx.dropped.append(Loss.of_envelopes(first, last, envelopes=count, records=nrecords))
        return tx.dropped[-1].merge(carried)

    def _carried_loss(self, data: bytes) -> Loss | None:
        # A dropped envelope may itself announce earlier loss (its first record); that announcement must survive, or
        # the gap it explained would become unexplained at the gateway. Our own canonical bytes: a notice, if any, is
        # the first record. A row too damaged to read carries nothing we could forward.
        try:
            _, msg = parse_envelope(data, self.limits)
            first = first_record(msg.payload, self.limits)
            if not isinstance(first, dict) or first.get(0) != TYPE_LOSS:
                return None
            notice = record_from_item(first)
        except (InputError, *DECODE_ERRORS) as e:
            log.debug("dropped row unreadable, no loss notice carried: %s", e)
            return None
        assert isinstance(notice, LossNotice)
        return Loss.from_notice(notice)

    def _page_size(self) -> int:
        return int(self._db().execute("PRAGMA page_size").fetchone()[0])

    def _checkpoint(self) -> None:
        # On a real full disk the WAL holds space; moving it into the database and truncating it frees some.
        try:
            self._db().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as e:
            event(log, logging.WARNING, "outbox checkpoint failed", path=str(self.path), error=str(e))

    # ---------------------------------------------------------------------------------------------- publishing

    def pending(self, after: int = 0, limit: int = 1000) -> list[tuple[int, bytes]]:
        """Unacknowledged envelopes with a counter above ``after``, in counter order.

        With ``verify_rows``, each row is checked first (the SHA-256 digest stored when it was sealed, device and
        counter): a row that fails is deleted, counted as ``corrupt_rows``, logged and announced as loss in the next
        envelope, never returned.

        Args:
            after: return counters greater than this (the last one the publisher has in flight).
            limit: the most envelopes to return.

        Returns:
            (counter, envelope bytes) pairs.

        Raises:
            OutboxError: the outbox is closed or SQLite failed.
        """
        out: list[tuple[int, bytes]] = []
        while len(out) < limit:
            want = limit - len(out)
            with self._lock:
                try:
                    rows: list[tuple[int, bytes, bytes]] = (
                        self._db()
                        .execute(
                            "SELECT counter, data, hash FROM envelopes WHERE counter > ? ORDER BY counter LIMIT ?",
                            (after, want),
                        )
                        .fetchall()
                    )
                except sqlite3.Error as e:
                    raise self._sqlite_error("read pending", e) from e
            if not rows:
                break
            # Checked outside the lock: hashing must not stall the sealer.
            if not self.verify_rows:
                out.extend((c, d) for c, d, _ in rows)
                break
            bad = [(c, d, why) for c, d, h in rows if (why := self._row_fault(c, d, h)) is not None]
            bad_counters = {c for c, _, _ in bad}
            out.extend((c, d) for c, d, _ in rows if c not in bad_counters)
            after = rows[-1][0]
            if bad:
                self._remove_corrupt(bad)
            if len(rows) < want or not bad:
                break
        return out

    def _row_fault(self, counter: int, data: object, digest: object) -> str | None:
        # Any change to the bytes changes their SHA-256; a change to the stored digest no longer matches them. The
        # layout check catches a row moved with its digest to another counter.
        if type(data) is not bytes or type(digest) is not bytes:
            return "data or digest is not a blob"
        if hashlib.sha256(data).digest() != digest:
            return "digest mismatch: the bytes changed since they were sealed"
        return self._layout.fault(data, counter)

    def _signature_fault(self, counter: int, data: bytes) -> str | None:
        # Schema-1 rows have no digest: our own signature, then the same device and counter check (migration only).
        try:
            device, msg = parse_envelope(data, self.limits)
            msg.verify(self._public)
        except InputError as e:
            return f"{type(e).__name__}: {e}"
        if device != self.device_id:
            return "a valid envelope, but not the one for this counter"
        return self._layout.payload_fault(msg.payload, counter)

    def _remove_corrupt(self, bad: list[tuple[int, bytes, str]]) -> None:
        with self._lock:
            conn = self._db()
            try:
                conn.execute("BEGIN IMMEDIATE")
                head = self._read_head()
                removed: list[tuple[int, int, str]] = []
                for counter, data, why in bad:
                    # data = ?: a row acked (deleted) or rewritten since it was read is left alone.
                    row = conn.execute(
                        "DELETE FROM envelopes WHERE counter = ? AND data = ? RETURNING records, bytes",
                        (counter, data),
                    ).fetchone()
                    if row is not None:
                        removed.append((counter, head.remove_corrupt(counter, row[0], row[1]), why))
                self._write_head(head)
                conn.execute("COMMIT")
            except sqlite3.Error as e:
                self._rollback()
                if not _is_full(e):
                    raise self._sqlite_error("remove corrupt rows", e) from e
                # They are not returned either way; removal is retried on the next pending().
                event(log, logging.ERROR, "outbox cannot remove corrupt rows: disk full", rows=len(bad))
                return
            except BaseException:
                self._rollback()
                raise
        for counter, records, why in removed:
            event(log, logging.ERROR, "outbox row corrupt: removed unsent", counter=counter, records=records, why=why)

    def ack(self, counters: Iterable[int]) -> int:
        """Delete acknowledged envelopes, all in one transaction (one ``DELETE`` per 500 counters).

        Args:
            counters: counters the broker acknowledged; unknown or already deleted ones are ignored.

        Returns:
            How many envelopes were deleted.

        Raises:
            OutboxFullError: the disk is too full even to record the deletion (retry later; nothing changed).
            OutboxError: the outbox is closed or SQLite failed; nothing changed.
        """
        wanted = sorted(set(counters))
        if not wanted:
            return 0
        with self._lock:
            conn = self._db()
            try:
                conn.execute("BEGIN IMMEDIATE")
                head = self._read_head()
                deleted = records = 0
                for i in range(0, len(wanted), _ACK_CHUNK):
                    chunk = wanted[i : i + _ACK_CHUNK]
                    # RETURNING reports exactly the rows deleted: unknown or already deleted counters add nothing.
                    rows = conn.execute(
                        f"DELETE FROM envelopes WHERE counter IN ({', '.join('?' * len(chunk))})"  # noqa: S608
                        " RETURNING records, bytes",
                        chunk,
                    ).fetchall()
                    deleted += len(rows)
                    records += sum(r for r, _ in rows)
                    head.backlog_envelopes -= len(rows)
                    head.backlog_records -= sum(r for r, _ in rows)
                    head.backlog_bytes -= sum(b for _, b in rows)
                if deleted:
                    self._write_head(head)
                    count_acked(conn, deleted, records)
                conn.execute("COMMIT")
            except sqlite3.Error as e:
                self._rollback()
                raise self._sqlite_error("ack", e) from e
            except BaseException:
                self._rollback()
                raise
        return deleted

    def apply_receipt(self, receipt: Receipt, data: bytes) -> Applied:
        """Delete every envelope a verified receipt covers, in one transaction, and keep it if it is the newest.

        Args:
            receipt: a receipt verified for this device (``edge.wire.receipts.verify_receipt``).
            data: its bytes as received.

        Returns:
            How many envelopes (and records) it deleted, and whether it is now the latest receipt kept.

        Raises:
            ReceiptMismatchError: it names a counter this box never sealed or another envelope's hash; nothing
                changed.
            OutboxError: the outbox is closed or SQLite failed (``OutboxFullError``: retry later); nothing changed.
        """
        if receipt.device_id != self.device_id:
            raise ReceiptMismatchError(f"receipt for device {receipt.device_id!r}, not {self.device_id!r}")
        with self._lock:
            conn = self._db()
            try:
                conn.execute("BEGIN IMMEDIATE")
                head = self._read_head()
                applied = apply_receipt(conn, head, receipt, data)
                if applied.deleted:
                    self._write_head(head)
                conn.execute("COMMIT")
            except sqlite3.Error as e:
                self._rollback()
                raise self._sqlite_error("apply receipt", e) from e
            except BaseException:
                self._rollback()
                raise
        return applied

    def rows(self, counters: Iterable[int]) -> list[tuple[int, bytes]]:
        """The envelopes still held among ``counters``, in counter order, checked like ``pending``'s (to resend).

        Args:
            counters: counters to read (at most a few thousand at once); unknown or deleted ones are left out.

        Raises:
            OutboxError: the outbox is closed or SQLite failed.
        """
        wanted = sorted(set(counters))
        found: list[tuple[int, bytes, bytes]] = []
        with self._lock:
            try:
                for i in range(0, len(wanted), _ACK_CHUNK):
                    chunk = wanted[i : i + _ACK_CHUNK]
                    marks = ", ".join("?" * len(chunk))
                    query = f"SELECT counter, data, hash FROM envelopes WHERE counter IN ({marks}) ORDER BY counter"  # noqa: S608
                    found.extend(self._db().execute(query, chunk).fetchall())
            except sqlite3.Error as e:
                raise self._sqlite_error("read rows", e) from e
        if not self.verify_rows:
            return [(c, d) for c, d, _ in found]
        bad = [(c, d, why) for c, d, h in found if (why := self._row_fault(c, d, h)) is not None]
        if bad:
            self._remove_corrupt(bad)
        bad_counters = {c for c, _, _ in bad}
        return [(c, d) for c, d, _ in found if c not in bad_counters]

    def delivery(self) -> DeliveryStats:
        """The latest receipt applied and what receipts and PUBACKs deleted.

        Raises:
            OutboxError: the outbox is closed or SQLite failed.
        """
        with self._lock:
            try:
                return read_delivery(self._db())
            except sqlite3.Error as e:
                raise self._sqlite_error("delivery", e) from e

    # ------------------------------------------------------------------------------------------------ the rest

    def stats(self) -> OutboxStats:
        """The outbox's counters, consistent with each other.

        Returns:
            The counters.

        Raises:
            OutboxError: the outbox is closed or SQLite failed.
        """
        with self._lock:
            try:
                head = self._read_head()
            except sqlite3.Error as e:
                raise self._sqlite_error("stats", e) from e
        return OutboxStats(
            backlog_envelopes=head.backlog_envelopes,
            backlog_bytes=head.backlog_bytes,
            backlog_records=head.backlog_records,
            next_counter=head.next_counter,
            dropped_envelopes=head.dropped_envelopes,
            dropped_records=head.dropped_records,
            corrupt_rows=head.corrupt_rows,
        )

    def close(self) -> None:
        """Close the database (idempotent); later calls raise ``OutboxError``."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Outbox:
        """The outbox itself."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close it."""
        self.close()
