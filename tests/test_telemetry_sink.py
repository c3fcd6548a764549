"""The telemetry sink with a real outbox: batching, bad records rejected alone, a full disk survived."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edge.fleet.store import DeviceRecord, Inbound, open_store
from edge.identity.did import did_key_from_public
from edge.telemetry.outbox import Outbox
from edge.telemetry.sink import TelemetrySink
from edge.wire.envelope import open_envelope
from edge.wire.records import InferenceRecord, ReadingRecord
from edge.wire.schema import DEFAULT_LIMITS, LossNotice

DEVICE = "sink-box"


def inference(seq: int, backend: str = "native-avx2") -> InferenceRecord:
    return InferenceRecord(
        seq=seq,
        timestamp=1_790_000_000.0 + seq,
        model_id="digits@1.0.0",
        model_sha256="ab" * 32,
        input_sha256=f"{seq:064x}",
        pixel_format="YUYV",
        top_k=((3, 0.9), (5, 0.05), (8, 0.01)),
        score=None,
        label=3,
        preprocess_us=12,
        inference_us=90,
        latency_us=150,
        backend=backend,
    )


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def open_outbox(path: Path, key: Ed25519PrivateKey, **kw) -> Outbox:
    return Outbox(path, device_id=DEVICE, key=key, limits=DEFAULT_LIMITS, **kw)


def sealed_records(outbox: Outbox, key: Ed25519PrivateKey) -> list:
    out = []
    for _counter, data in outbox.pending(0, 100_000):
        out.extend(open_envelope(data, key.public_key(), DEFAULT_LIMITS).records)
    return out


def test_full_batches_are_sealed_in_order_and_the_rest_on_close(tmp_path, key) -> None:
    outbox = open_outbox(tmp_path / "o.sqlite", key)
    woken = []
    sink = TelemetrySink(outbox, wake=lambda: woken.append(1), batch_records=10, batch_age_s=60)
    sink.write([inference(i) for i in range(25)])
    assert outbox.stats().backlog_envelopes == 2  # two full batches; five records wait for more or for age
    sink.close()
    assert outbox.stats().backlog_envelopes == 3
    records = sealed_records(outbox, key)
    assert [r.seq for r in records] == list(range(25))
    assert sink.stats.envelopes == 3 and sink.stats.records == 25 and woken


def test_batches_are_sealed_by_age(tmp_path, key) -> None:
    outbox = open_outbox(tmp_path / "o.sqlite", key)
    sink = TelemetrySink(outbox, batch_records=1000, batch_age_s=0.05)
    try:
        sink.write([inference(0), ReadingRecord(2, 21.5, 1_790_000_000.0)])
        deadline = time.monotonic() + 3
        while outbox.stats().backlog_envelopes == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert outbox.stats().backlog_envelopes == 1
    finally:
        sink.close()


def test_a_record_that_cannot_be_encoded_is_rejected_alone(tmp_path, key) -> None:
    outbox = open_outbox(tmp_path / "o.sqlite", key)
    sink = TelemetrySink(outbox, batch_records=5, batch_age_s=60)
    too_large = inference(2, backend="x" * (DEFAULT_LIMITS.max_record_bytes + 1))
    not_finite = ReadingRecord(7, float("nan"), 1_790_000_000.0)
    sink.write([inference(0), inference(1), too_large, inference(3), not_finite])
    sink.write([inference(5)])
    sink.close()
    assert sink.stats.rejected_records == 2
    kept = sealed_records(outbox, key)
    assert [r.seq for r in kept if isinstance(r, InferenceRecord)] == [0, 1, 3, 5]


def test_full_disk_drops_oldest_by_policy_and_announces_it(tmp_path, key) -> None:
    # A database capped at a few pages: the outbox makes room by dropping its oldest envelopes, and the next
    # envelope carries a signed loss notice; the sink sees no failure at all.
    outbox = open_outbox(tmp_path / "o.sqlite", key, max_pages=12)
    sink = TelemetrySink(outbox, batch_records=20, batch_age_s=60)
    for start in range(0, 3000, 20):
        sink.write([inference(i) for i in range(start, start + 20)])
    sink.close()
    stats = outbox.stats()
    assert sink.stats.seal_failures == 0 and sink.stats.envelopes == 150
    assert stats.dropped_envelopes > 0 and stats.dropped_records == 20 * stats.dropped_envelopes
    assert stats.backlog_envelopes + stats.dropped_envelopes == 150
    notices = [r for r in sealed_records(outbox, key) if isinstance(r, LossNotice)]
    assert notices and notices[-1].last_counter < stats.next_counter


def test_full_disk_where_nothing_fits_holds_counts_and_later_announces(tmp_path, key) -> None:
    path = tmp_path / "o.sqlite"
    outbox = open_outbox(path, key, max_pages=4)  # the empty schema: master, envelopes, head, delivery
    sink = TelemetrySink(outbox, batch_records=400, batch_age_s=60, max_held_batches=2)
    for start in range(0, 2000, 400):
        sink.write([inference(i) for i in range(start, start + 400)])  # never raises into the pipeline
    assert sink.stats.seal_failures == 5 and sink.stats.envelopes == 0
    assert sink.stats.held_batches == 2 and sink.stats.dropped_batches == 3
    assert sink.stats.dropped_records == 1200
    # The operator frees space: the held batches go out, led by a signed loss notice counting what was dropped.
    outbox.close()
    sink.outbox = open_outbox(path, key)
    sink.write([inference(2000)])
    sink.close()
    records = sealed_records(sink.outbox, key)
    assert records[0] == LossNotice(records[0].timestamp, 0, 0, 0, 0, unsealed_records=1200)
    assert [r.seq for r in records[1:]] == list(range(1200, 2001))
    assert not any(isinstance(r, LossNotice) for r in records[1:])  # announced once


def test_records_the_sink_drops_reach_the_fleet_ledger(tmp_path, key) -> None:
    """Sink drops and outbox drops, in one loss format, counted by the fleet's own ingest into its ledger."""
    path = tmp_path / "o.sqlite"
    outbox = open_outbox(path, key, max_pages=4)  # the empty schema: master, envelopes, head, delivery
    sink = TelemetrySink(outbox, batch_records=400, batch_age_s=60, max_held_batches=1)
    for start in range(0, 1200, 400):
        sink.write([inference(i) for i in range(start, start + 400)])
    assert sink.stats.dropped_records == 800
    outbox.close()
    # Room again, but a small backlog bound: the outbox drops the envelope that announced the sink's loss, and
    # carries that announcement into its own notice.
    sink.outbox = open_outbox(path, key, max_envelopes=2)
    for start in (1200, 1300):
        sink.write([inference(i) for i in range(start, start + 100)])
        sink.flush()
    sink.close()
    dropped = sink.outbox.stats()
    assert (dropped.dropped_envelopes, dropped.dropped_records) == (1, 400)

    store = open_store(f"sqlite:///{tmp_path / 'gateway.db'}")
    try:
        public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        did = did_key_from_public(key.public_key())
        store.add_device(DeviceRecord(DEVICE, did, public, "", time.time() - 3600))
        inbound = [Inbound(f"devices/{DEVICE}/telemetry", d, time.time()) for _, d in sink.outbox.pending(0, 1000)]
        assert all(r.verdict is not None and r.verdict.accepted for r in store.ingest(inbound))
        rows = store.ledger()
    finally:
        store.close()
    assert sum(r.announced_lost for r in rows) == dropped.dropped_envelopes
    # Every record that never reached the fleet is in its loss figures: the sink's 800 and the outbox's.
    assert sum(r.announced_lost_records for r in rows) == 800 + dropped.dropped_records
