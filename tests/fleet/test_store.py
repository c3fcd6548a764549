"""The gateway store on both backends: registry, ingest, chain state, ledger, status, quarantine, concurrency."""

from __future__ import annotations

import itertools
import random
import threading

import pytest
from pg import fresh_database

from edge.errors import ConfigError
from edge.fleet.errors import DeviceExistsError, GatewayInputError, StoreError, UnknownDeviceError
from edge.fleet.store import GatewayHeartbeat, Inbound, open_store
from edge.fleet.store._checks import redact
from edge.fleet.store._sql import SCHEMA_VERSION
from edge.wire.chain import VerdictKind

V = VerdictKind
T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
MIDNIGHT = 1_700_006_400.0  # 2023-11-15 00:00:00 UTC


def kinds(results):
    return [r.verdict.kind for r in results]


# ------------------------------------------------------------------------------------------------------ registry


def test_device_add_get_list_revoke(store, fleet):
    b = fleet.device("cam-b")
    a = fleet.device("cam-a")
    got = store.device("cam-a")
    assert got is not None
    assert (got.did, got.public_key, got.cert_pem, got.revoked_at) == (a.did, a.public_raw, a.cert_pem, None)
    assert "BEGIN CERTIFICATE" in got.cert_pem
    assert [d.device_id for d in store.devices()] == ["cam-a", "cam-b"]
    assert store.device("cam-z") is None
    with pytest.raises(DeviceExistsError):
        store.add_device(b.record())
    revoked = store.revoke_device("cam-b", T0 + 5)
    assert revoked.revoked_at == T0 + 5
    again = store.revoke_device("cam-b", T0 + 99)  # idempotent: the first revocation time stays
    assert again.revoked_at == T0 + 5
    assert store.device("cam-b").revoked_at == T0 + 5
    assert store.device("cam-a").revoked_at is None
    with pytest.raises(UnknownDeviceError):
        store.revoke_device("cam-z", T0)


def test_renewing_replaces_the_certificate_of_an_active_device_only(store, fleet):
    a = fleet.device("cam-a")
    renewed = store.renew_device("cam-a", "-----BEGIN CERTIFICATE-----\nrenewed\n")
    assert renewed.cert_pem.endswith("renewed\n")
    assert (renewed.did, renewed.public_key) == (a.did, a.public_raw)
    assert store.device("cam-a").cert_pem == renewed.cert_pem
    store.revoke_device("cam-a", T0 + 5)
    with pytest.raises(UnknownDeviceError, match="revoked"):
        store.renew_device("cam-a", "-----BEGIN CERTIFICATE-----\nagain\n")
    assert store.device("cam-a").cert_pem == renewed.cert_pem
    with pytest.raises(UnknownDeviceError):
        store.renew_device("cam-z", "x")


def test_device_record_with_foreign_did_refused(store, fleet):
    a = fleet.device("cam-a", register=False)
    other = fleet.device("cam-b", register=False)
    bad = a.record().__class__(a.id, other.did, a.public_raw, a.cert_pem, T0)
    with pytest.raises(GatewayInputError, match="does not name its public key"):
        store.add_device(bad)
    with pytest.raises(GatewayInputError):
        store.add_device(a.record().__class__("bad/id", a.did, a.public_raw, "", T0))
    assert store.devices() == []


# -------------------------------------------------------------------------------------------------------- ingest


def test_clean_chain_ingested(store, fleet):
    a = fleet.device("cam-a")
    data = [a.seal(3) for _ in range(5)]
    results = store.ingest([a.msg(d, T0 + i) for i, d in enumerate(data)])
    assert kinds(results) == [V.FIRST, V.NEXT, V.NEXT, V.NEXT, V.NEXT]
    assert all(r.stored for r in results)
    stored = list(store.envelopes("cam-a"))
    assert [e.counter for e in stored] == [1, 2, 3, 4, 5]
    assert [e.data for e in stored] == data
    assert stored[1].prev == stored[0].hash and stored[0].received_at == T0
    (row,) = store.ledger()
    assert (row.device_id, row.envelopes, row.records, row.readings, row.missing) == ("cam-a", 5, 15, 15, 0)
    (status,) = store.statuses()
    assert (status.last_counter, status.gaps, status.state, status.last_seen) == (5, 0, "unknown", T0 + 4)
    # The chain survives a reopen: the next envelope extends it.
    reopened = open_store(store.url)
    try:
        assert kinds(reopened.ingest([a.msg(a.seal())])) == [V.NEXT]
    finally:
        reopened.close()
    assert [e.counter for e in store.envelopes("cam-a", from_counter=5)] == [5, 6]


def test_gap_then_late_fill_lowers_missing(store, fleet):
    a = fleet.device("cam-a")
    e = [a.seal() for _ in range(6)]
    assert kinds(store.ingest([a.msg(e[0]), a.msg(e[4])])) == [V.FIRST, V.GAP]
    (row,) = store.ledger()
    assert row.missing == 3 and store.statuses()[0].gaps == 3
    assert kinds(store.ingest([a.msg(e[2])])) == [V.LATE]  # the middle of the hole: splits it in two
    assert store.ledger()[0].missing == 2 and store.statuses()[0].gaps == 2
    assert kinds(store.ingest([a.msg(e[1]), a.msg(e[3]), a.msg(e[5])])) == [V.LATE, V.LATE, V.NEXT]
    (row,) = store.ledger()
    assert (row.envelopes, row.missing, row.late) == (6, 0, 3)
    assert store.statuses()[0].gaps == 0
    assert [x.counter for x in store.envelopes("cam-a")] == [1, 2, 3, 4, 5, 6]
    assert kinds(store.ingest([a.msg(e[2])])) == [V.DUPLICATE]  # a filled hole stays filled


def test_late_fill_credits_the_day_the_gap_opened(store, fleet):
    a = fleet.device("cam-a")
    e = [a.seal() for _ in range(3)]
    store.ingest([a.msg(e[0], MIDNIGHT - 10), a.msg(e[2], MIDNIGHT - 5)])
    store.ingest([a.msg(e[1], MIDNIGHT + 5)])
    day0, day1 = store.ledger()
    assert (day0.day, day0.envelopes, day0.missing, day0.late) == ("2023-11-14", 2, 0, 0)
    assert (day1.day, day1.envelopes, day1.missing, day1.late) == ("2023-11-15", 1, 0, 1)


def test_duplicate_within_and_across_batches_stored_once(store, fleet):
    a = fleet.device("cam-a")
    e1, e2 = a.seal(), a.seal()
    first = store.ingest([a.msg(e1), a.msg(e1), a.msg(e2)])
    assert kinds(first) == [V.FIRST, V.DUPLICATE, V.NEXT]
    second = store.ingest([a.msg(e2), a.msg(e1)])
    assert kinds(second) == [V.DUPLICATE, V.DUPLICATE]
    assert all(r.stored for r in first + second)
    assert [x.counter for x in store.envelopes("cam-a")] == [1, 2]
    (row,) = store.ledger()
    assert (row.envelopes, row.duplicates, row.rejects) == (2, 3, 0)
    assert store.quarantine_counts() == {}


def test_empty_batch_is_a_no_op(store):
    assert store.ingest([]) == []


def test_bad_receipt_time_refused_before_anything_is_stored(store, fleet):
    a = fleet.device("cam-a")
    with pytest.raises(GatewayInputError, match="received_at"):
        store.ingest([a.msg(a.seal()), Inbound(a.topic, b"", float("nan"))])
    assert list(store.envelopes("cam-a")) == []


def test_two_concurrent_writers_store_each_envelope_once(store_url, store, fleet):
    """Two gateway workers behind a shared subscription: each gets part of the stream, some envelopes both.

    Each envelope is accepted exactly once (as next, gap or late: the split reorders them), every copy delivered
    twice is a duplicate, nothing is forked or stale, and every chain ends complete. The first envelope of each
    device is delivered before the split (a device's first envelope may carry any counter: see the verifier).
    """
    rng = random.Random(7)
    devices = [fleet.device(f"cam-{i}") for i in range(4)]
    store.ingest([d.msg(d.seal()) for d in devices])
    envelopes = [(d, d.seal()) for _ in range(2, 41) for d in devices]  # round-robin, in counter order per device
    share: dict[int, list[Inbound]] = {0: [], 1: []}
    twice = 0
    for i, (d, e) in enumerate(envelopes):
        to = rng.choice(((0,), (1,), (0, 1)))
        twice += len(to) == 2
        for n in to:
            share[n].append(d.msg(e, T0 + i))
    barrier = threading.Barrier(2)
    results: dict[int, list] = {0: [], 1: []}
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        s = open_store(store_url)
        try:
            barrier.wait()
            for k in range(0, len(share[n]), 3):
                results[n] += s.ingest(share[n][k : k + 3])
        except BaseException as e:  # surfaced below
            errors.append(e)
        finally:
            s.close()

    threads = [threading.Thread(target=writer, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    both = results[0] + results[1]
    assert all(sum(r.verdict.accepted for r in results[n]) > 0 for n in (0, 1))  # both did store work
    assert sum(r.verdict.accepted for r in both) == len(envelopes)
    assert sum(r.verdict.kind is V.DUPLICATE for r in both) == twice
    assert {r.verdict.kind for r in both} <= {V.NEXT, V.GAP, V.LATE, V.DUPLICATE}
    for d in devices:
        stored = list(store.envelopes(d.id))
        assert [x.counter for x in stored] == list(range(1, 41))
        assert all(b.prev == a.hash for a, b in itertools.pairwise(stored))
    rows = store.ledger()
    assert [(r.envelopes, r.missing) for r in rows] == [(40, 0)] * 4
    assert sum(r.duplicates for r in rows) == twice
    assert all(s.gaps == 0 and s.last_counter == 40 for s in store.statuses())
    assert store.quarantine_counts() == {}


def test_database_failure_rolls_back_the_whole_batch(store, fleet, raw):
    a = fleet.device("cam-a")
    e = [a.seal() for _ in range(4)]
    store.ingest([a.msg(e[0])])
    # A row the chain does not know about occupies counter 3: inserting the batch's envelope 3 violates the key.
    raw("INSERT INTO envelopes (device_id, counter, received_at, day, records, hash, prev, data) "
        "VALUES (?, 3, 0, 'x', 0, ?, ?, ?)", ("cam-a", b"h", b"p", b"d"))  # fmt: skip
    junk = Inbound("nonsense", b"junk", T0)
    with pytest.raises(StoreError, match="ingest failed"):
        store.ingest([a.msg(e[1]), junk, a.msg(e[2]), a.msg(e[3])])
    assert [x.counter for x in store.envelopes("cam-a")] == [1, 3]  # 2 and 4 were rolled back with 3
    assert store.ledger()[0].envelopes == 1
    assert store.statuses()[0].last_counter == 1
    assert store.quarantine_counts() == {}  # the junk of the failed batch is not quarantined either
    raw("DELETE FROM envelopes WHERE counter = 3")
    assert kinds(store.ingest([a.msg(e[1]), junk, a.msg(e[2]), a.msg(e[3])])) == [
        V.NEXT, V.WRONG_TOPIC, V.NEXT, V.NEXT
    ]  # fmt: skip


# -------------------------------------------------------------------------------------------------------- schema


def test_schema_newer_version_refused(store_url, store, raw):
    store.close()
    raw("UPDATE schema_version SET version = 99")
    with pytest.raises(StoreError, match="schema version 99"):
        open_store(store_url)
    raw("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
    open_store(store_url).close()  # the same database opens again at the version this code knows


def test_open_store_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for url, file in (("sqlite:rel.db", "rel.db"), (str(tmp_path / "bare.db"), "bare.db"),
                      (f"sqlite:///{tmp_path}/abs.db", "abs.db")):  # fmt: skip
        s = open_store(url)
        s.close()
        assert (tmp_path / file).is_file() and s.url == url
    with pytest.raises(ConfigError):
        open_store("mysql://localhost/db")
    with pytest.raises(StoreError, match="does not exist"):
        open_store(f"sqlite:///{tmp_path}/no/such/dir.db")
    (tmp_path / "garbage.db").write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError):
        open_store(str(tmp_path / "garbage.db"))


def test_private_server_fallback(private_pg, make_fleet):
    """The path taken when no server answers: initdb + pg_ctl on a free port (kept alive by this test)."""
    with fresh_database(private_pg) as url:
        s = open_store(url)
        try:
            a = make_fleet(s).device("cam-a")
            assert kinds(s.ingest([a.msg(a.seal()), a.msg(a.seal())])) == [V.FIRST, V.NEXT]
            assert s.url.endswith(url.rsplit("/", 1)[1]) and ":5432/" not in s.url
        finally:
            s.close()


# -------------------------------------------------------------------------------------------------------- status


def test_backlog_is_the_latest_report_less_what_was_accepted_since(store, fleet):
    a = fleet.device("cam-a")
    store.ingest([a.msg(a.seal(), T0) for _ in range(2)])
    birth = {"state": "online", "device": "cam-a", "ts": T0, "outbox_backlog": 5}
    store.record_status("cam-a", birth, T0 + 1)  # reported with the head at 2
    s = store.statuses()[0]
    assert (s.outbox_backlog, s.backlog_reported, s.backlog_reported_at) == (5, 5, T0 + 1)
    store.ingest([a.msg(a.seal(), T0 + 2) for _ in range(3)])
    assert store.statuses()[0].outbox_backlog == 2  # three of the five arrived
    store.record_status("cam-a", birth, T0 + 3)  # the retained copy redelivered: no new report, no new baseline
    assert (store.statuses()[0].outbox_backlog, store.statuses()[0].backlog_reported_at) == (2, T0 + 1)
    store.record_status("cam-a", {"state": "offline", "reason": "lost", "device": "cam-a"}, T0 + 4)
    assert store.statuses()[0].outbox_backlog == 2  # the Last Will says nothing of the outbox: the figure stays
    store.ingest([a.msg(a.seal(), T0 + 5) for _ in range(4)])
    assert store.statuses()[0].outbox_backlog == 0  # never below zero (newer envelopes drained with the old)
    store.record_status("cam-a", {**birth, "ts": T0 + 6, "outbox_backlog": 1}, T0 + 6)
    assert (store.statuses()[0].outbox_backlog, store.statuses()[0].backlog_reported_at) == (1, T0 + 6)


def test_revoked_devices_carry_their_revocation_time_in_status(store, fleet):
    fleet.device("cam-a")
    fleet.device("cam-b")
    store.revoke_device("cam-b", T0)
    a, b = store.statuses()
    assert (a.revoked_at, b.revoked_at) == (None, T0)


def test_gateway_heartbeats_replace_each_other_per_gateway_newest_first(store):
    assert store.heartbeats() == []
    store.beat(GatewayHeartbeat("gw-1", "host-a", 10, T0, T0 + 10, True))
    store.beat(GatewayHeartbeat("gw-2", "host-b", 20, T0, T0 + 20, False))
    store.beat(GatewayHeartbeat("gw-1", "host-a", 11, T0 + 25, T0 + 30, True, T0 + 30))
    assert store.heartbeats() == [
        GatewayHeartbeat("gw-1", "host-a", 11, T0 + 25, T0 + 30, True, T0 + 30),
        GatewayHeartbeat("gw-2", "host-b", 20, T0, T0 + 20, False),
    ]


def test_status_online_offline_transitions(store, fleet):
    fleet.device("cam-a")
    fleet.device("cam-b")
    online = {"state": "online", "device": "cam-a", "ts": T0, "model": "digits@1.0.0", "outbox_backlog": 3}
    store.record_status("cam-a", online, T0)
    a, b = store.statuses()
    assert (a.state, a.since, a.last_seen, a.model, a.outbox_backlog, a.info) == (
        "online", T0, T0, "digits@1.0.0", 3, online
    )  # fmt: skip
    assert (b.state, b.since, b.last_seen, b.info) == ("unknown", None, None, {})
    store.record_status("cam-a", online, T0 + 30)  # the retained copy again: not a sign of life
    assert store.statuses()[0].last_seen == T0
    store.record_status("cam-a", {**online, "ts": T0 + 60, "outbox_backlog": 0}, T0 + 60)
    a = store.statuses()[0]
    assert (a.state, a.since, a.last_seen, a.outbox_backlog) == ("online", T0, T0 + 60, 0)
    store.record_status("cam-a", {"state": "offline", "reason": "lost", "device": "cam-a"}, T0 + 90)
    a = store.statuses()[0]
    assert (a.state, a.reason, a.since, a.last_seen, a.model) == ("offline", "lost", T0 + 90, T0 + 90, "digits@1.0.0")
    store.record_status("cam-a", {"state": "online", "ts": T0 + 120}, T0 + 120)
    a = store.statuses()[0]
    assert (a.state, a.reason, a.since) == ("online", None, T0 + 120)
    store.record_status("cam-a", {"state": "rebooting", "x": 1}, T0 + 130)  # odd, but the device's word
    assert store.statuses()[0].state == "unknown"
    with pytest.raises(GatewayInputError):  # NaN is not JSON (RFC 8259): refused, not stored
        store.record_status("cam-a", {"state": "online", "x": float("nan")}, T0 + 140)
    # A stranger's status is kept, but listed apart from the registered devices.
    store.record_status("ghost-1", {"state": "online"}, T0)
    assert [s.device_id for s in store.statuses()] == ["cam-a", "cam-b"]
    assert [(s.device_id, s.state) for s in store.strangers()] == [("ghost-1", "online")]
    with pytest.raises(GatewayInputError):
        store.record_status("ghost/1", {"state": "online"}, T0)
    with pytest.raises(GatewayInputError):
        store.record_status("cam-a", {"state": "online", "blob": object()}, T0)


def test_last_seen_includes_accepted_envelopes(store, fleet):
    a = fleet.device("cam-a")
    store.record_status("cam-a", {"state": "online"}, T0)
    store.ingest([a.msg(a.seal(), T0 + 50)])
    s = store.statuses()[0]
    assert (s.since, s.last_seen, s.last_counter) == (T0, T0 + 50, 1)


# -------------------------------------------------------------------------------------------------------- ledger


def test_ledger_by_day_boundaries(store, fleet):
    a = fleet.device("cam-a")
    b = fleet.device("cam-b")
    store.ingest([
        a.msg(a.seal_inferences(4, "digits@1.0.0"), MIDNIGHT - 0.001),
        a.msg(a.seal_inferences(3, "digits@2.0.0"), MIDNIGHT),
        a.msg(a.seal_loss(7, 9), MIDNIGHT + 1),
        b.msg(b.seal(5), MIDNIGHT - 3600),
    ])  # fmt: skip
    rows = store.ledger()
    assert [(r.device_id, r.day) for r in rows] == [("cam-a", "2023-11-14"), ("cam-a", "2023-11-15"),
                                                   ("cam-b", "2023-11-14")]  # fmt: skip
    a0, a1, b0 = rows
    assert (a0.envelopes, a0.records, a0.inferences, a0.readings) == (1, 4, {"digits@1.0.0": 4}, 0)
    assert (a1.envelopes, a1.records, a1.inferences) == (2, 5, {"digits@2.0.0": 3})
    assert (a1.events, a1.announced_lost) == (1, 3)
    assert (b0.envelopes, b0.readings) == (1, 5)
    assert store.ledger(day_from="2023-11-15") == [a1]
    assert store.ledger(day_to="2023-11-14") == [a0, b0]
    assert store.ledger(device_id="cam-b") == [b0]
    assert store.ledger(device_id="cam-a", day_from="2023-11-15", day_to="2023-11-15") == [a1]
    assert store.ledger(day_from="2023-11-16") == []
    assert [e.counter for e in store.envelopes("cam-a", day_from="2023-11-15")] == [2, 10]
    assert [e.counter for e in store.envelopes("cam-a", day_to="2023-11-14")] == [1]
    assert list(store.envelopes("cam-a", day_from="2023-12-01")) == []
    for bad in ("2023-13-01", "yesterday", "2023-1-5"):
        with pytest.raises(GatewayInputError):
            store.ledger(day_from=bad)
        with pytest.raises(GatewayInputError):
            store.envelopes("cam-a", day_to=bad)


def test_envelopes_streamed_in_pages(store, fleet):
    a = fleet.device("cam-a")
    data = [a.seal(1) for _ in range(150)]  # more than two pages
    store.ingest([a.msg(d) for d in data])
    it = store.envelopes("cam-a", from_counter=10)
    first = next(it)
    store.ingest([a.msg(a.seal(1))])  # other calls may interleave with a stream
    assert [first.counter, *(e.counter for e in it)] == list(range(10, 152))


# ---------------------------------------------------------------------------------------------------- quarantine


def test_quarantine_listing(store, fleet, raw):
    a = fleet.device("cam-a")
    good = a.seal()
    store.ingest([
        Inbound("devices/cam-a/telemetry", good[:-3], T0 + 1),
        Inbound("weird/topic", good, T0 + 2),
        Inbound("devices/cam-a/telemetry", b"\xd2" + b"\x00" * 100_000, T0 + 3),
    ])  # fmt: skip
    assert store.quarantine_counts() == {"malformed": 2, "wrong_topic": 1}
    newest = store.quarantined(limit=2)
    assert [q["time"] for q in newest] == [T0 + 3, T0 + 2]
    big, topic = newest
    assert (big["kind"], big["device"], big["size"], big["topic"]) == (
        "malformed", "cam-a", 100_001, "devices/cam-a/telemetry"
    )  # fmt: skip
    # A topic outside every device's namespace is nobody's: what the envelope claims inside does not count.
    assert (topic["kind"], topic["device"], topic["topic"]) == ("wrong_topic", None, "weird/topic")
    assert "not devices/<device id>/telemetry" in topic["reason"]
    assert len(store.quarantined()) == 3
    sizes = raw("SELECT size, length(payload) FROM quarantine ORDER BY id")
    assert [tuple(r) for r in sizes] == [(len(good) - 3, len(good) - 3), (len(good), len(good)), (100_001, 65536)]
    assert store.ledger()[0].rejects == 2
    assert store.statuses()[0].rejects == 2


@pytest.mark.parametrize("backend", ["postgresql"])
def test_lost_connection_fails_the_call_then_reconnects(store, fleet, raw, backend):
    a = fleet.device("cam-a")
    e1, e2 = a.seal(), a.seal()
    store.ingest([a.msg(e1)])
    raw("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database()"
        " AND pid <> pg_backend_pid()")  # fmt: skip
    with pytest.raises(StoreError, match="ingest failed"):
        store.ingest([a.msg(e2)])  # not committed: the caller must not acknowledge it
    assert kinds(store.ingest([a.msg(e2)])) == [V.NEXT]  # the next call reconnects; the redelivery is new data


def test_store_url_password_never_in_messages(store_url, store, raw):
    if store_url.startswith("postgresql://"):
        url = store_url.replace("postgresql://postgres@", "postgresql://postgres:s3cret@")  # trust auth ignores it
    else:
        url = store_url
    store.close()
    raw("UPDATE schema_version SET version = 99")
    with pytest.raises(StoreError) as info:
        open_store(url)
    assert "s3cret" not in str(info.value) and "schema version 99" in str(info.value)
    assert redact("postgresql://u:s3cret@h:5432/db?password=s3cret&sslmode=require") == (
        "postgresql://u:***@h:5432/db?password=***&sslmode=require"
    )
