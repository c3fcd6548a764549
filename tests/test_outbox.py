"""The durable outbox: chain and counters, bounds and announced loss, reopen, foreign files, bit rot, a full disk.

Real SQLite files and real Ed25519 keys; every envelope read back is opened with ``open_envelope`` and the public key.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from edge.telemetry.outbox import (
    SCHEMA_VERSION,
    EnvelopeTooLargeError,
    ForeignOutboxError,
    Outbox,
    OutboxError,
    OutboxFormatError,
    OutboxFullError,
    Sealed,
)
from edge.wire.envelope import GENESIS_PREV, Envelope, envelope_hash, open_envelope, seal_envelope
from edge.wire.errors import MalformedRecordError
from edge.wire.records import InferenceRecord, ReadingRecord
from edge.wire.schema import LossNotice, TelemetryLimits

KEY = Ed25519PrivateKey.generate()
PUB = KEY.public_key()
DEVICE = "box-7"
LIMITS = TelemetryLimits()


def inference(seq: int) -> InferenceRecord:
    return InferenceRecord(
        seq=seq,
        timestamp=1_700_000_000.0 + seq,
        model_id="digits@1.2.0",
        model_sha256="ab" * 32,
        input_sha256=f"{seq:064x}",
        pixel_format="GRAY8",
        top_k=((3, 0.875), (8, 0.0625)),
        score=None,
        label=3,
        preprocess_us=120,
        inference_us=340,
        latency_us=900,
        backend="neon",
    )


def batch(n: int, start: int = 0) -> list[InferenceRecord]:
    return [inference(start + i) for i in range(n)]


MakeOutbox = Callable[..., Outbox]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[MakeOutbox]:
    """Open outboxes on ``tmp_path / 'outbox.db'`` (by default); all closed at the end."""
    opened: list[Outbox] = []

    def open_(path: Path | None = None, **kw: object) -> Outbox:
        kw.setdefault("device_id", DEVICE)
        kw.setdefault("key", KEY)
        kw.setdefault("limits", LIMITS)
        ob = Outbox(path or tmp_path / "outbox.db", **kw)  # type: ignore[arg-type]
        opened.append(ob)
        return ob

    yield open_
    for ob in opened:
        ob.close()


def opened(ob: Outbox, after: int = 0) -> list[Envelope]:
    return [open_envelope(data, PUB, LIMITS) for _, data in ob.pending(after, limit=10**6)]


def data_records(env: Envelope) -> list[object]:
    return [r for r in env.records if not isinstance(r, LossNotice)]


def notice(env: Envelope) -> LossNotice | None:
    first = env.records[0] if env.records else None
    return first if isinstance(first, LossNotice) else None


def flip_byte(path: Path, counter: int, offset: int) -> bytes:
    """Corrupt one byte of a row behind the outbox's back (bit rot); returns the original bytes."""
    with sqlite3.connect(path) as db:
        (data,) = db.execute("SELECT data FROM envelopes WHERE counter = ?", (counter,)).fetchone()
        rotten = bytearray(data)
        rotten[offset % len(rotten)] ^= 0x10
        db.execute("UPDATE envelopes SET data = ? WHERE counter = ?", (bytes(rotten), counter))
    return bytes(data)


# ----------------------------------------------------------------------------------------------- chain and order


def test_counters_increase_by_one_and_chain(make: MakeOutbox) -> None:
    ob = make()
    sealed = [ob.seal(batch(3)), *ob.seal_many([batch(2), batch(0), [ReadingRecord(1, 21.5, 1_700_000_000.0)]])]
    assert [s.counter for s in sealed] == [1, 2, 3, 4]
    envs = opened(ob)
    assert [e.counter for e in envs] == [1, 2, 3, 4]
    assert envs[0].prev == GENESIS_PREV
    for prev, env in itertools.pairwise(envs):
        assert env.prev == prev.hash
    for s, env, (_, data) in zip(sealed, envs, ob.pending(), strict=True):
        assert s == Sealed(env.counter, envelope_hash(data), len(data), len(env.records), None)
        assert env.device_id == DEVICE
    assert [len(e.records) for e in envs] == [3, 2, 0, 1]


def test_pending_is_in_counter_order_after_and_limited(make: MakeOutbox) -> None:
    ob = make()
    ob.seal_many([batch(1, i) for i in range(6)])
    assert [c for c, _ in ob.pending()] == [1, 2, 3, 4, 5, 6]
    assert [c for c, _ in ob.pending(after=3)] == [4, 5, 6]
    assert [c for c, _ in ob.pending(after=1, limit=2)] == [2, 3]
    assert ob.pending(after=6) == []


def test_ack_deletes_exactly_those(make: MakeOutbox) -> None:
    ob = make()
    ob.seal_many([batch(2, i) for i in range(5)])
    assert ob.ack([2, 4]) == 2
    assert [c for c, _ in ob.pending()] == [1, 3, 5]
    assert ob.ack([2, 4, 99, 0]) == 0  # already deleted or never sealed: no-op
    assert ob.ack([]) == 0
    st_ = ob.stats()
    assert (st_.backlog_envelopes, st_.backlog_records, st_.next_counter) == (3, 6, 6)
    assert st_.backlog_bytes == sum(len(d) for _, d in ob.pending())


def test_ack_of_a_large_group_keeps_totals_exact(make: MakeOutbox) -> None:
    # More counters than one DELETE takes (chunks), with duplicates, unknown and already deleted ones.
    ob = make()
    for start in range(0, 1200, 400):
        ob.seal_many([batch(1 + (start + i) % 3, start + i) for i in range(400)])
    rows = ob.pending(limit=10**6)
    assert ob.ack([5, 6]) == 2
    chosen = [c for c, _ in rows if c % 7 != 0 and c not in (5, 6)]
    assert ob.ack([*chosen, *chosen[:50], 5, 6, 0, 10**9]) == len(chosen)
    left = ob.pending(limit=10**6)
    assert [c for c, _ in left] == [c for c, _ in rows if c % 7 == 0]
    st_ = ob.stats()
    assert (st_.backlog_envelopes, st_.backlog_bytes) == (len(left), sum(len(d) for _, d in left))
    assert st_.backlog_records == sum(1 + (c - 1) % 3 for c, _ in left)


def test_seal_many_is_all_or_nothing(make: MakeOutbox) -> None:
    ob = make()
    ob.seal(batch(1))
    bad = dataclasses.replace(inference(9), model_sha256="zz")
    with pytest.raises(MalformedRecordError):
        ob.seal_many([batch(1), [bad]])
    assert [c for c, _ in ob.pending()] == [1]
    assert ob.seal(batch(1)).counter == 2  # the failed group burned no counter


# ------------------------------------------------------------------------------------------ bounds and loss notices


def test_bound_by_count_drops_oldest_and_announces_loss(make: MakeOutbox) -> None:
    ob = make(max_envelopes=3)
    ob.seal_many([batch(2), batch(3), batch(4)])
    s4 = ob.seal(batch(5))
    assert s4.loss is not None
    assert (s4.loss.envelopes_dropped, s4.loss.records_dropped, s4.loss.first_counter, s4.loss.last_counter) == (
        1,
        2,
        1,
        1,
    )
    envs = opened(ob)
    assert [e.counter for e in envs] == [2, 3, 4]
    assert notice(envs[2]) == s4.loss and len(data_records(envs[2])) == 5
    st_ = ob.stats()
    assert (st_.backlog_envelopes, st_.dropped_envelopes, st_.dropped_records) == (3, 1, 2)
    assert st_.backlog_records == 3 + 4 + 5
    assert st_.backlog_records + st_.dropped_records == 2 + 3 + 4 + 5


def test_bound_by_bytes_drops_oldest_and_announces_loss(make: MakeOutbox) -> None:
    ob = make(max_bytes=4000)
    small = [ob.seal(batch(4, 10 * i)) for i in range(5)]
    assert all(s.loss is None for s in small) and sum(s.nbytes for s in small) <= 4000
    big = ob.seal(batch(12))  # needs the room of several small ones
    assert big.loss is not None
    lost = big.loss
    assert lost.first_counter == 1 and lost.envelopes_dropped == lost.last_counter >= 2
    assert lost.records_dropped == 4 * lost.envelopes_dropped
    st_ = ob.stats()
    assert st_.backlog_bytes <= 4000
    assert st_.backlog_bytes == sum(len(d) for _, d in ob.pending())
    assert st_.dropped_envelopes == lost.envelopes_dropped
    assert st_.backlog_envelopes + st_.dropped_envelopes == 6
    assert opened(ob)[0].counter == lost.last_counter + 1


def test_dropped_loss_notice_is_carried_into_the_next(make: MakeOutbox) -> None:
    # A notice inside a dropped envelope would otherwise vanish with it, leaving the gap it explained unexplained.
    ob = make(max_envelopes=2)
    for i in range(6):
        ob.seal(batch(1, i))
    # 3 dropped 1, 4 dropped 2, 5 dropped 3 (carrying 1), 6 dropped 4 (carrying 2).
    notices = [notice(e) for e in opened(ob)]
    assert [(n.envelopes_dropped, n.records_dropped, n.first_counter, n.last_counter) for n in notices if n] == [
        (2, 2, 1, 3),
        (2, 2, 2, 4),
    ]
    assert ob.stats().dropped_envelopes == 4


def test_oversized_batch_refused_and_nothing_written(make: MakeOutbox) -> None:
    ob = make(max_bytes=2000)
    ob.seal(batch(1))
    before = ob.stats()
    with pytest.raises(EnvelopeTooLargeError):
        ob.seal(batch(30))  # larger than the whole outbox on its own
    with pytest.raises(EnvelopeTooLargeError):
        ob.seal_many([batch(1), batch(LIMITS.max_records)])  # no slot left for a loss notice
    assert ob.stats() == before
    assert [c for c, _ in ob.pending()] == [1]


# -------------------------------------------------------------------------------------------- files and reopening


def test_reopen_resumes_counter_and_backlog(make: MakeOutbox, tmp_path: Path) -> None:
    ob = make(max_envelopes=3)
    ob.seal_many([batch(1, i) for i in range(4)])  # one dropped
    ob.ack([3])
    before, rows = ob.stats(), ob.pending()
    ob.close()
    ob = make(max_envelopes=3)
    assert ob.stats() == before
    assert ob.pending() == rows
    s = ob.seal(batch(1))
    assert s.counter == 5
    assert open_envelope(ob.pending(after=4)[0][1], PUB).prev == envelope_hash(rows[-1][1])


def test_foreign_device_outbox_refused(make: MakeOutbox) -> None:
    make().close()
    with pytest.raises(ForeignOutboxError, match="box-7"):
        make(device_id="box-8")


def test_foreign_key_outbox_refused(make: MakeOutbox) -> None:
    # Another key would see the whole backlog as corrupt and delete it: refused instead.
    make().seal(batch(1))
    with pytest.raises(ForeignOutboxError, match="another key"):
        make(key=Ed25519PrivateKey.generate())


def test_other_sqlite_database_refused(make: MakeOutbox, tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE envelopes (x)")
    with pytest.raises(OutboxFormatError, match="not an outbox"):
        make(path)


def test_newer_schema_version_refused(make: MakeOutbox, tmp_path: Path) -> None:
    make().close()
    with sqlite3.connect(tmp_path / "outbox.db") as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(OutboxFormatError, match=f"user_version {SCHEMA_VERSION + 1}"):
        make()


# Schema 1 exactly as it was shipped (no row digests, the blob before the small columns): files of it are migrated.
V1_SCHEMA = (
    """CREATE TABLE envelopes (
        counter INTEGER PRIMARY KEY, data BLOB NOT NULL, records INTEGER NOT NULL, bytes INTEGER NOT NULL,
        created REAL NOT NULL)""",
    """CREATE TABLE head (
        id INTEGER PRIMARY KEY CHECK (id = 0), device_id TEXT NOT NULL, public_key BLOB NOT NULL,
        next_counter INTEGER NOT NULL, last_hash BLOB NOT NULL, backlog_envelopes INTEGER NOT NULL,
        backlog_bytes INTEGER NOT NULL, backlog_records INTEGER NOT NULL, dropped_envelopes INTEGER NOT NULL,
        dropped_records INTEGER NOT NULL, corrupt_rows INTEGER NOT NULL, unannounced_envelopes INTEGER NOT NULL,
        unannounced_records INTEGER NOT NULL, unannounced_first INTEGER NOT NULL, unannounced_last INTEGER NOT NULL)""",
)


def write_v1_outbox(path: Path, sizes: list[int], *, first: int = 1, dropped: int = 0) -> list[bytes]:
    """A schema-1 outbox holding envelopes ``first``.. of ``sizes`` records (``dropped`` earlier ones acked/dropped)."""
    envelopes, prev = [], GENESIS_PREV
    for i in range(1, first + len(sizes)):
        n = sizes[i - first] if i >= first else 1
        data = seal_envelope(DEVICE, i, prev, batch(n, 10 * i), 1_700_000_000.0 + i, KEY, limits=LIMITS)
        prev = envelope_hash(data)
        if i >= first:
            envelopes.append(data)
    raw_key = PUB.public_bytes(Encoding.Raw, PublicFormat.Raw)
    with sqlite3.connect(path) as db:
        for statement in V1_SCHEMA:
            db.execute(statement)
        db.executemany(
            "INSERT INTO envelopes VALUES (?, ?, ?, ?, ?)",
            [(first + i, d, n, len(d), 1_700_000_000.0) for i, (d, n) in enumerate(zip(envelopes, sizes, strict=True))],
        )
        db.execute(
            "INSERT INTO head VALUES (0, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0, 0, 0, 0)",
            (
                DEVICE,
                raw_key,
                first + len(sizes),
                prev,
                len(envelopes),
                sum(map(len, envelopes)),
                sum(sizes),
                dropped,
                dropped,
            ),
        )
        db.execute("PRAGMA application_id = 0x65646F62")
        db.execute("PRAGMA user_version = 1")
    return envelopes


def test_schema_1_outbox_is_migrated_with_digests(make: MakeOutbox, tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    envelopes = write_v1_outbox(path, [3, 4, 5], first=3, dropped=2)
    ob = make()
    assert ob.pending() == [(3, envelopes[0]), (4, envelopes[1]), (5, envelopes[2])]
    st_ = ob.stats()
    assert (st_.backlog_envelopes, st_.backlog_records, st_.next_counter, st_.corrupt_rows) == (3, 12, 6, 0)
    assert st_.backlog_bytes == sum(map(len, envelopes))
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        digests = dict(db.execute("SELECT counter, hash FROM envelopes"))
    assert digests == {c: envelope_hash(d) for c, d in zip((3, 4, 5), envelopes, strict=True)}
    s = ob.seal(batch(1))  # the chain goes on from the migrated head
    assert s.counter == 6 and s.loss is None
    assert open_envelope(ob.pending(after=5)[0][1], PUB).prev == envelope_hash(envelopes[-1])
    rows = ob.pending()
    ob.close()
    assert make().pending() == rows  # reopened as schema 2, nothing changed


def test_schema_1_rotten_row_is_not_blessed_by_the_migration(
    make: MakeOutbox, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A digest computed over bytes that already rotted would make the rot look intact: each row is verified first.
    path = tmp_path / "outbox.db"
    envelopes = write_v1_outbox(path, [3, 4, 5])
    with sqlite3.connect(path) as db:
        db.execute(
            "UPDATE envelopes SET data = ? WHERE counter = 2", (envelopes[1][:200] + b"\x00" + envelopes[1][201:],)
        )
    with caplog.at_level(logging.ERROR, logger="edge.telemetry.outbox"):
        ob = make()
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    assert [c for c, _ in ob.pending()] == [1, 3]
    st_ = ob.stats()
    assert (st_.corrupt_rows, st_.backlog_envelopes, st_.backlog_records, st_.dropped_envelopes) == (1, 2, 8, 0)
    s = ob.seal(batch(1))
    assert s.loss == LossNotice(s.loss.timestamp, 1, 4, 2, 2) if s.loss else pytest.fail("no loss notice")


def test_schema_1_outbox_of_another_key_is_refused_not_migrated(make: MakeOutbox, tmp_path: Path) -> None:
    # Migrating first would verify every row under the wrong key and delete the whole backlog as corrupt.
    path = tmp_path / "outbox.db"
    write_v1_outbox(path, [1, 1])
    with pytest.raises(ForeignOutboxError, match="another key"):
        make(key=Ed25519PrivateKey.generate())
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (1,)
        assert db.execute("SELECT COUNT(*) FROM envelopes").fetchone() == (2,)


def test_garbage_file_refused(make: MakeOutbox, tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"definitely not sqlite" * 100)
    with pytest.raises(OutboxFormatError):
        make(path)


def test_unopenable_path_names_it(make: MakeOutbox, tmp_path: Path) -> None:
    path = tmp_path / "missing-dir" / "outbox.db"
    with pytest.raises(OutboxError, match="missing-dir"):
        make(path)


def test_closed_outbox_raises(make: MakeOutbox) -> None:
    ob = make()
    ob.close()
    ob.close()
    with pytest.raises(OutboxError, match="closed"):
        ob.seal(batch(1))
    with pytest.raises(OutboxError, match="closed"):
        ob.pending()


# ------------------------------------------------------------------------------------------------------ bit rot


def test_corrupt_row_is_skipped_counted_and_removed(
    make: MakeOutbox, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ob = make()
    ob.seal_many([batch(3, 0), batch(4, 10), batch(5, 20)])
    ob.close()
    flip_byte(tmp_path / "outbox.db", 2, 200)
    ob = make()
    with caplog.at_level(logging.ERROR, logger="edge.telemetry.outbox"):
        assert [c for c, _ in ob.pending()] == [1, 3]
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    st_ = ob.stats()
    assert (st_.corrupt_rows, st_.backlog_envelopes, st_.backlog_records, st_.dropped_envelopes) == (1, 2, 8, 0)
    with sqlite3.connect(tmp_path / "outbox.db") as db:
        assert db.execute("SELECT COUNT(*) FROM envelopes WHERE counter = 2").fetchone() == (0,)
    # The gap is announced by the next envelope.
    s = ob.seal(batch(1))
    assert s.loss == LossNotice(s.loss.timestamp, 1, 4, 2, 2) if s.loss else pytest.fail("no loss notice")
    assert ob.seal(batch(1)).loss is None  # announced once


def test_row_holding_another_counters_envelope_is_corrupt(make: MakeOutbox, tmp_path: Path) -> None:
    ob = make()
    ob.seal_many([batch(1), batch(1)])
    ob.close()
    with sqlite3.connect(tmp_path / "outbox.db") as db:  # a validly signed envelope, but the wrong one
        db.execute("UPDATE envelopes SET data = (SELECT data FROM envelopes WHERE counter = 1) WHERE counter = 2")
    ob = make()
    assert [c for c, _ in ob.pending()] == [1]
    assert ob.stats().corrupt_rows == 1


def flip_digest_byte(path: Path, counter: int, offset: int) -> None:
    """Corrupt one byte of the digest stored beside a row (bit rot in the check value itself)."""
    with sqlite3.connect(path) as db:
        (digest,) = db.execute("SELECT hash FROM envelopes WHERE counter = ?", (counter,)).fetchone()
        rotten = bytearray(digest)
        rotten[offset % len(rotten)] ^= 0x01
        db.execute("UPDATE envelopes SET hash = ? WHERE counter = ?", (bytes(rotten), counter))


def test_rotten_digest_is_caught_like_a_rotten_row(make: MakeOutbox, tmp_path: Path) -> None:
    ob = make()
    ob.seal_many([batch(3, 0), batch(4, 10), batch(5, 20)])
    ob.close()
    flip_digest_byte(tmp_path / "outbox.db", 3, 31)
    ob = make()
    assert [c for c, _ in ob.pending()] == [1, 2]
    st_ = ob.stats()
    assert (st_.corrupt_rows, st_.backlog_envelopes, st_.backlog_records) == (1, 2, 7)
    s = ob.seal(batch(1))
    assert s.loss == LossNotice(s.loss.timestamp, 1, 5, 3, 3) if s.loss else pytest.fail("no loss notice")


@pytest.mark.parametrize("offset", [0, 1, 20, 200, -70, -1])
def test_any_flipped_byte_of_a_row_is_caught(make: MakeOutbox, tmp_path: Path, offset: int) -> None:
    # Header, kid, payload head, records, signature head, signature: the digest covers every byte.
    ob = make()
    ob.seal_many([batch(2), batch(2)])
    ob.close()
    flip_byte(tmp_path / "outbox.db", 2, offset)
    ob = make()
    assert [c for c, _ in ob.pending()] == [1]
    assert ob.stats().corrupt_rows == 1


def test_row_moved_with_its_digest_to_another_counter_is_corrupt(make: MakeOutbox, tmp_path: Path) -> None:
    # The digest matches its bytes, but they are counter 1's envelope: the counter check catches it.
    ob = make()
    ob.seal_many([batch(1), batch(1)])
    ob.close()
    with sqlite3.connect(tmp_path / "outbox.db") as db:
        db.execute(
            "UPDATE envelopes SET (data, hash) = (SELECT data, hash FROM envelopes WHERE counter = 1) WHERE counter = 2"
        )
    ob = make()
    assert [c for c, _ in ob.pending()] == [1]
    assert ob.stats().corrupt_rows == 1


def test_row_of_another_device_with_its_digest_is_corrupt(make: MakeOutbox, tmp_path: Path) -> None:
    ob = make()
    ob.seal_many([batch(1), batch(1)])
    ob.close()
    other = seal_envelope("box-8", 2, bytes(range(32)), batch(1), 1_700_000_000.0, KEY, limits=LIMITS)
    with sqlite3.connect(tmp_path / "outbox.db") as db:
        db.execute("UPDATE envelopes SET data = ?, hash = ? WHERE counter = 2", (other, envelope_hash(other)))
    ob = make()
    assert [c for c, _ in ob.pending()] == [1]
    assert ob.stats().corrupt_rows == 1


def test_pending_fills_its_limit_past_corrupt_rows(make: MakeOutbox, tmp_path: Path) -> None:
    ob = make()
    ob.seal_many([batch(1, i) for i in range(6)])
    ob.close()
    for counter in (1, 2):
        flip_byte(tmp_path / "outbox.db", counter, -1)  # in the signature
    ob = make()
    assert [c for c, _ in ob.pending(limit=2)] == [3, 4]


def test_verify_rows_off_returns_rows_unchecked(make: MakeOutbox, tmp_path: Path) -> None:
    ob = make()
    ob.seal(batch(1))
    ob.close()
    flip_byte(tmp_path / "outbox.db", 1, -1)
    ob = make(verify_rows=False)
    assert [c for c, _ in ob.pending()] == [1]
    assert ob.stats().corrupt_rows == 0


# ----------------------------------------------------------------------------------------------------- full disk


def test_full_disk_drops_oldest_then_raises_typed_error(make: MakeOutbox) -> None:
    ob = make(max_pages=40)  # 160 KiB with 4 KiB pages; each envelope of 20 records is ~3 KiB
    sealed: list[Sealed] = []
    for i in range(200):
        sealed.append(ob.seal(batch(20, 100 * i)))
        if sealed[-1].loss is not None:
            break
    lost = sealed[-1].loss
    assert lost is not None, "the page cap was never reached"
    assert lost.first_counter == 1 and lost.last_counter == lost.envelopes_dropped
    assert lost.records_dropped == 20 * lost.envelopes_dropped
    assert ob.stats().dropped_envelopes == lost.envelopes_dropped
    # More than the whole file can hold in one group: even dropping everything is not enough.
    before, rows = ob.stats(), ob.pending()
    with pytest.raises(OutboxFullError):
        ob.seal_many([batch(20, 10_000 * (j + 1)) for j in range(80)])
    assert ob.stats() == before  # nothing half-written, nothing dropped
    assert ob.pending() == rows
    s = ob.seal(batch(20))  # the caller retries later: the chain goes on without a gap
    assert s.counter == before.next_counter
    assert open_envelope(ob.pending()[-1][1], PUB).prev == envelope_hash(rows[-1][1])


# ------------------------------------------------------------------------------------------------------ threads


def test_sealer_and_publisher_threads_share_one_outbox(make: MakeOutbox) -> None:
    ob = make()
    total = 40
    acked: list[int] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def sealer() -> None:
        try:
            for i in range(total):
                ob.seal(batch(2, 10 * i))
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)
        finally:
            done.set()

    def publisher() -> None:
        try:
            last = 0
            while not (done.is_set() and not ob.pending(after=last)):
                rows = ob.pending(after=last, limit=8)
                if rows:
                    last = rows[-1][0]
                    ob.ack([c for c, _ in rows])
                    acked.extend(c for c, _ in rows)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=sealer), threading.Thread(target=publisher)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert acked == list(range(1, total + 1))
    assert ob.stats().backlog_envelopes == 0


# ------------------------------------------------------------------------------------------------ property test

# (operation, arguments): seal [records], seal_many [records per batch], ack [indices into pending],
# reopen [], corrupt [index into pending].
OPS = st.one_of(
    st.tuples(st.just("seal"), st.lists(st.integers(0, 4), min_size=1, max_size=1)),
    st.tuples(st.just("seal_many"), st.lists(st.integers(0, 3), min_size=1, max_size=3)),
    st.tuples(st.just("ack"), st.lists(st.integers(0, 7), max_size=4)),
    st.tuples(st.just("reopen"), st.just([])),
    st.tuples(st.just("corrupt"), st.lists(st.integers(0, 7), min_size=1, max_size=1)),
)


class Model:
    """What the test knows independently of the outbox: every envelope it saw, acked or corrupted."""

    def __init__(self) -> None:
        self.records: dict[int, int] = {}  # counter -> caller's records, from Sealed
        self.seen: dict[int, bytes] = {}  # counter -> bytes, the first time pending() showed it
        self.acked: dict[int, bytes] = {}
        self.corrupted: dict[int, bytes] = {}  # original bytes

    def notices(self, envelopes: dict[int, bytes]) -> list[LossNotice]:
        out = []
        for data in envelopes.values():
            n = notice(open_envelope(data, PUB, LIMITS))
            if n is not None:
                out.append(n)
        return out


def check(ob: Outbox, m: Model) -> dict[int, bytes]:
    present = dict(ob.pending(limit=10**6))
    for c, data in present.items():
        assert m.seen.setdefault(c, data) == data, f"counter {c} changed its bytes"
    st_ = ob.stats()
    assert st_.next_counter == len(m.records) + 1
    assert set(present) <= set(m.records)
    assert st_.backlog_envelopes == len(present)
    assert st_.backlog_bytes == sum(map(len, present.values()))
    sealed = len(m.records)
    assert sealed == len(present) + len(m.acked) + st_.dropped_envelopes + st_.corrupt_rows
    assert st_.corrupt_rows == len(m.corrupted)
    assert sum(m.records.values()) == (
        st_.backlog_records
        + sum(m.records[c] for c in m.acked)
        + st_.dropped_records
        + sum(m.records[c] for c in m.corrupted)
    )
    return present


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, max_size=24))
def test_sequences_keep_counters_backlog_and_loss_accounting(ops: list[tuple[str, list[int]]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "outbox.db"

        def open_() -> Outbox:
            return Outbox(path, device_id=DEVICE, key=KEY, limits=LIMITS, max_envelopes=3, max_bytes=1800)

        ob, m, seq = open_(), Model(), 0
        try:
            for op, args in ops:
                if op in ("seal", "seal_many"):
                    out = ob.seal_many([batch(n, seq + 10 * i) for i, n in enumerate(args)])
                    seq += 100
                    for s, n in zip(out, args, strict=True):
                        assert s.counter == len(m.records) + 1, "a counter was skipped or reused"
                        m.records[s.counter] = n
                elif op == "ack":
                    rows = ob.pending(limit=10**6)
                    chosen = {rows[i % len(rows)] for i in args} if rows else set()
                    assert ob.ack([c for c, _ in chosen] + [10**9]) == len(chosen)
                    m.acked.update(chosen)
                elif op == "reopen":
                    ob.close()
                    ob = open_()
                else:
                    rows = ob.pending(limit=10**6)
                    if rows:
                        ob.close()
                        counter = rows[args[0] % len(rows)][0]
                        m.corrupted[counter] = flip_byte(path, counter, 7 * counter)
                        ob = open_()
                check(ob, m)
            ob.seal(batch(1))  # announces whatever is still unannounced
            m.records[len(m.records) + 1] = 1
            present = check(ob, m)
            final = ob.stats()
        finally:
            ob.close()

    # The chain over everything ever seen, and every gap explained by an envelope delivered or still here (or,
    # for a notice that was itself in a corrupted row, by what that row said before it rotted).
    known = {**m.seen, **m.corrupted}
    for c, data in sorted(known.items()):
        env = open_envelope(data, PUB, LIMITS)
        assert env.counter == c
        if c == 1:
            assert env.prev == GENESIS_PREV
        elif c - 1 in known:
            assert env.prev == envelope_hash(known[c - 1])
    gone = set(m.records) - set(present) - set(m.acked)
    cover = m.notices({**present, **m.acked}) + m.notices(m.corrupted)
    for c in gone:
        assert any(n.first_counter <= c <= n.last_counter for n in cover), f"counter {c} vanished unannounced"
    # Each loss is counted by exactly one notice that survives (a dropped notice moves into the next one), except
    # what a corrupted row announced: its bytes are gone, its own loss is announced instead.
    surviving = m.notices({**present, **m.acked})
    lost_with_rows = sum(n.envelopes_dropped for n in m.notices(m.corrupted))
    assert sum(n.envelopes_dropped for n in surviving) == final.dropped_envelopes + final.corrupt_rows - lost_with_rows
    event(f"dropped: {final.dropped_envelopes > 0}, corrupt: {final.corrupt_rows > 0}")
