"""Event records of accepted envelopes are stored as rows of their own (both backends): in the envelope's
transaction, once per (device, counter, index) however often the envelope is redelivered, and queried by kind
prefix, receipt time and device."""

from __future__ import annotations

import pytest

from edge.fleet.errors import GatewayInputError, StoreError
from edge.fleet.store import open_store
from edge.wire.chain import VerdictKind as V
from edge.wire.schema import EventRecord

T0 = 1_700_000_000.0  # the enrollment clock of the simulated devices (conftest)


def ota(kind: str, version: str = "2.0.0", **extra: object) -> EventRecord:
    data: dict[str, object] = {"model": "digits", "version": version, "from": "digits@1.0.0", "slot": "b"}
    return EventRecord(T0, f"ota.{kind}", {**data, "rollout": "ab12", **extra})  # type: ignore[dict-item]


def test_event_records_of_accepted_envelopes_are_stored_with_their_envelope(store, fleet) -> None:
    a = fleet.device("cam-a")
    env = a.seal(records=[*a.readings(1), ota("downloading"), ota("committed", variant="int8", latency_ms=3.5)])
    assert [r.verdict.kind for r in store.ingest([a.msg(env, at=T0 + 5)])] == [V.FIRST]
    got = store.events()
    assert [(e.device_id, e.counter, e.kind, e.received_at, e.ts) for e in got] == [
        ("cam-a", 1, "ota.downloading", T0 + 5, T0),
        ("cam-a", 1, "ota.committed", T0 + 5, T0),
    ]
    assert got[1].data == {
        "model": "digits",
        "version": "2.0.0",
        "from": "digits@1.0.0",
        "slot": "b",
        "rollout": "ab12",
        "variant": "int8",
        "latency_ms": 3.5,
    }
    assert store.ledger()[0].events == 2


def test_redelivered_envelope_adds_no_events(store, fleet) -> None:
    a = fleet.device("cam-a")
    env = a.seal(records=[ota("committed")])
    store.ingest([a.msg(env)])
    kinds = [r.verdict.kind for r in store.ingest([a.msg(env, at=T0 + 1), a.msg(env, at=T0 + 2)])]
    assert kinds == [V.DUPLICATE, V.DUPLICATE]
    assert len(store.events()) == 1


def test_rejected_envelope_stores_no_events(store, fleet) -> None:
    a, b = fleet.device("cam-a"), fleet.device("cam-b")
    env = a.seal(records=[ota("committed")])
    assert store.ingest([a.msg(env, topic=b.topic)])[0].verdict.kind is V.WRONG_TOPIC  # a's envelope on b's topic
    stranger = fleet.device("cam-x", register=False)
    assert store.ingest([stranger.msg(stranger.seal(records=[ota("committed")]))])[0].stored is False
    assert store.events() == []


def test_events_roll_back_with_a_failed_batch(store_url, store, fleet, raw) -> None:
    a = fleet.device("cam-a")
    e1 = a.seal(records=[ota("committed")])
    store.ingest([a.msg(e1)])
    e2 = a.seal(records=[ota("trial", version="3.0.0")])
    # A row that makes the batch's envelope insert fail: the whole batch, its events included, must roll back.
    raw("INSERT INTO envelopes (device_id, counter, received_at, day, records, hash, prev, data)"
        " VALUES ('cam-a', 2, 0, 'x', 0, ?, ?, ?)", (b"h", b"p", b"d"))  # fmt: skip
    with pytest.raises(StoreError):
        store.ingest([a.msg(e2)])
    assert [e.kind for e in store.events()] == ["ota.committed"]


def test_events_query_by_prefix_since_device_and_limit(store, fleet) -> None:
    a, b = fleet.device("cam-a"), fleet.device("cam-b")
    store.ingest([a.msg(a.seal(records=[ota("downloading"), EventRecord(T0, "outbox.dropped", {"n": 3})]), at=T0)])
    store.ingest([b.msg(b.seal(records=[ota("refused", reason="never_retry")]), at=T0 + 10)])
    store.ingest([a.msg(a.seal(records=[ota("committed"), EventRecord(T0, "otax", {"raw": b"\x01\xff"})]), at=T0 + 20)])
    assert [e.kind for e in store.events(kind_prefix="ota.")] == ["ota.downloading", "ota.refused", "ota.committed"]
    assert [e.kind for e in store.events(kind_prefix="ota")] == [
        "ota.downloading", "ota.refused", "ota.committed", "otax"
    ]  # fmt: skip
    assert [e.kind for e in store.events(since=T0 + 10)] == ["ota.refused", "ota.committed", "otax"]
    assert [(e.device_id, e.kind) for e in store.events(device_id="cam-a", kind_prefix="ota.", since=T0 + 1)] == [
        ("cam-a", "ota.committed")
    ]
    assert store.events(kind_prefix="outbox.")[0].data == {"n": 3}
    assert store.events(kind_prefix="otax")[0].data == {"raw": "01ff"}  # bytes as hex: JSON has no bytes
    assert [e.kind for e in store.events(limit=2)] == ["ota.downloading", "outbox.dropped"]
    assert store.events(limit=0) == []
    assert store.events(kind_prefix="ota.", device_id="nobody") == []
    assert store.events(kind_prefix="50%_?'") == []  # wildcards and quotes are plain text


@pytest.mark.parametrize(("kwargs", "match"), [({"since": -1.0}, "since"), ({"since": float("nan")}, "since"),
                                               ({"limit": -1}, "limit"), ({"limit": True}, "limit")])  # fmt: skip
def test_events_bad_arguments_are_typed_errors(store, kwargs, match) -> None:
    with pytest.raises(GatewayInputError, match=match):
        store.events(**kwargs)


def test_database_of_the_previous_release_gains_the_events_table(store_url, store, fleet, raw) -> None:
    a = fleet.device("cam-a")
    store.ingest([a.msg(a.seal(2))])
    store.close()
    raw("DROP TABLE events")  # what the previous release created: schema version 1 without events
    s = open_store(store_url)
    try:
        assert s.events() == []
        assert [r.verdict.kind for r in s.ingest([a.msg(a.seal(records=[ota("committed")]))])] == [V.NEXT]
        assert [e.counter for e in s.events()] == [2]
        assert [e.counter for e in s.envelopes("cam-a")] == [1, 2]
    finally:
        s.close()
    open_store(store_url).close()  # opening again is a no-op
