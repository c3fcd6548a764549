"""The claim index and its log: a claim is found until it leaves the window, whatever the runs and merges did; the
log survives a restart and is how two gateway processes see each other's claims."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest

from edge.fleet.claims import ClaimBatch, ClaimIndex, decode_batch, encode_batch
from edge.fleet.errors import StoreError, StoreUnavailableError
from edge.fleet.store import open_store

T0 = 1_700_000_000.0
HOUR = int(T0 // 3600)


def keys(*values: int) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def batch(device: str, counter: int, *values: int) -> ClaimBatch:
    return ClaimBatch([device], [counter], [keys(*values)])


def test_log_rows_round_trip_and_corruption_is_a_store_error():
    b = ClaimBatch(["cam-b", "cam-a", "cam-b"], [7, 1, 8], [keys(5, -3), keys(2**63 - 1), keys(-(2**63))])
    back = decode_batch(encode_batch(b))
    assert (list(back.devices), list(back.counters)) == (["cam-b", "cam-a", "cam-b"], [7, 1, 8])
    assert [k.tolist() for k in back.keys] == [[5, -3], [2**63 - 1], [-(2**63)]]
    row = encode_batch(b)
    for bad in (row[:-1], row + b"\x00", b"XXXX" + row[4:], row[:5] + b"\xff\xff\xff\x7f" + row[9:], b""):
        with pytest.raises(StoreError, match="claim log row is corrupt"):
            decode_batch(bad)


def test_lookup_finds_claims_across_runs_and_merges():
    index = ClaimIndex()
    rng = np.random.default_rng(7)
    claimed = {}
    for i in range(40):  # forty batches: runs are made and merged in tiers
        ks = rng.integers(-(2**63), 2**63 - 1, size=int(rng.integers(1, 400)), dtype=np.int64)
        ks = np.setdiff1d(ks, keys(*claimed))  # a batch claims only what is unclaimed
        index.add(batch(f"cam-{i % 3}", i + 1, *ks.tolist()), HOUR, HOUR - 10)
        claimed.update({k: (f"cam-{i % 3}", i + 1) for k in ks.tolist()})
        assert len(index._runs) <= 12  # tiers: about log2(claims / batch) runs
    probe = np.asarray([*list(claimed)[::7], 123, 456], dtype=np.int64)
    found = index.lookup(np.unique(probe), HOUR - 10)
    assert found == {k: claimed[k] for k in np.unique(probe).tolist() if k in claimed}
    assert len(index) == len(claimed)


def test_claims_leave_the_window_and_a_key_may_then_be_claimed_again():
    index = ClaimIndex()
    index.add(batch("cam-a", 1, 11, 12), HOUR, HOUR - 48)
    assert index.lookup(keys(11, 12), HOUR - 48) == {11: ("cam-a", 1), 12: ("cam-a", 1)}
    # Two days later claim 11 is out of the window, before any merge has dropped it.
    later = HOUR + 49
    assert index.lookup(keys(11, 12), later - 48) == {}
    index.add(batch("cam-b", 9, 11), later, later - 48)  # claimed again: the newer claim is the one
    for _ in range(6):  # force merges, which drop what left the window and keep the newer of two claims
        index.add(batch("cam-c", 2, *np.arange(1000, 1010).tolist()), later, later - 48)
        index.add(batch("cam-c", 3, *np.arange(2000, 2003).tolist()), later, later - 48)
    assert index.lookup(keys(11, 12), later - 48) == {11: ("cam-b", 9)}


def _inference(model, tag, ts):
    from edge.wire.records import InferenceRecord  # noqa: PLC0415

    return InferenceRecord(0, ts, model, "11" * 32, hashlib.sha256(tag.encode()).hexdigest(), "GRAY8", ((1, 0.5),),
                           None, None, 1, 1, 1, "numpy")  # fmt: skip


def test_a_restarted_gateway_still_knows_what_was_claimed(store_url, store, fleet):
    a, b = fleet.device("cam-a"), fleet.device("cam-b")
    recs = [_inference("digits@1.0.0", f"frame-{i}", T0) for i in range(5)]
    store.ingest([a.msg(a.seal(records=recs), T0)])
    store.close()
    again = open_store(store_url)  # a new process: its index is rebuilt from the claim log
    try:
        again.ingest([
            a.msg(a.seal(records=recs[:2]), T0 + 1),  # re-sent: duplicates
            b.msg(b.seal(records=[dataclasses.replace(r, seq=9) for r in recs[2:]]), T0 + 2),  # copies
        ])  # fmt: skip
        rows = {r.device_id: r for r in again.ledger()}
        assert rows["cam-a"].credits["digits@1.0.0"] == {"credited": 5, "duplicate_input": 2}
        assert rows["cam-b"].credits["digits@1.0.0"] == {"copied": 3}
    finally:
        again.close()


def test_two_gateways_on_one_database_see_each_others_claims(store_url, store, fleet):
    """Two stores (two processes) interleave their batches: the second credits nothing the first already has."""
    a, b = fleet.device("cam-a"), fleet.device("cam-b")
    other = open_store(store_url)
    try:
        recs = [_inference("digits@1.0.0", f"frame-{i}", T0) for i in range(4)]
        store.ingest([a.msg(a.seal(records=recs[:2]), T0)])  # warms this store's index
        other.ingest([b.msg(b.seal(records=[_inference("digits@1.0.0", "x", T0)]), T0)])  # and the other's
        store.ingest([a.msg(a.seal(records=recs[2:]), T0 + 1)])
        other.ingest([b.msg(b.seal(records=recs), T0 + 2)])  # all four were claimed by cam-a, in the other store
        rows = {r.device_id: r for r in other.ledger()}
        assert rows["cam-a"].credited == 4
        assert rows["cam-b"].credits["digits@1.0.0"] == {"credited": 1, "copied": 4}
    finally:
        other.close()


def test_a_failed_batch_claims_nothing(store_url, store, fleet, raw):
    """A batch whose transaction fails keeps no claims: the inputs are credited when the batch comes back."""
    a = fleet.device("cam-a")
    recs = [_inference("digits@1.0.0", f"frame-{i}", T0) for i in range(3)]
    data = a.seal(records=recs)
    if store_url.startswith("sqlite"):
        raw("CREATE TRIGGER no_ledger BEFORE INSERT ON ledger BEGIN SELECT RAISE(ABORT, 'refused'); END")
    else:
        raw("CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'refused'; END $$ LANGUAGE plpgsql")
        raw("CREATE TRIGGER no_ledger BEFORE INSERT ON ledger FOR EACH ROW EXECUTE FUNCTION refuse()")
    with pytest.raises(StoreError):
        store.ingest([a.msg(data, T0)])
    raw("DROP TRIGGER no_ledger" + ("" if store_url.startswith("sqlite") else " ON ledger"))
    (r,) = store.ingest([a.msg(data, T0 + 1)])  # the broker redelivers it
    assert r.verdict.accepted
    assert store.ledger()[0].credits["digits@1.0.0"] == {"credited": 3}


def test_a_corrupt_claim_log_row_stops_ingest_with_the_fix(store_url, store, fleet, raw):
    a = fleet.device("cam-a")
    store.ingest([a.msg(a.seal_inferences(2), T0)])
    store.close()
    raw("UPDATE claim_log SET data = ?", (b"not a claim log row",))
    again = open_store(store_url)
    try:
        with pytest.raises(StoreUnavailableError, match=r"claim_log seq \d+\): delete that row"):
            again.ingest([a.msg(a.seal_inferences(1), T0 + 1)])
    finally:
        again.close()
