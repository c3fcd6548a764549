"""Attacks on ingest, one test each, on both backends: every one is rejected (or, for a reordered pair, accepted
exactly once), counted under its kind in the quarantine, and the chain of the real device is unaffected."""

from __future__ import annotations

import itertools

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.fleet.store import Inbound, open_store
from edge.wire.chain import VerdictKind
from edge.wire.cose import sig_structure
from edge.wire.envelope import GENESIS_PREV, envelope_hash, seal_envelope
from edge.wire.schema import TelemetryLimits

V = VerdictKind
T0 = 1_700_000_000.0


def kinds(results):
    return [r.verdict.kind for r in results]


def head(store, device_id):
    return next(s for s in store.statuses() if s.device_id == device_id).last_counter


def assert_chain_intact(store, dev, *, expect_next=V.NEXT):
    """The device's own next envelope still extends its chain, and the stored chain links."""
    (result,) = store.ingest([dev.msg(dev.seal())])
    assert result.verdict.kind is expect_next
    stored = list(store.envelopes(dev.id))
    pairs = itertools.pairwise(stored)
    assert all(b.prev == a.hash for a, b in pairs if b.counter == a.counter + 1)
    assert stored[-1].counter == dev.counter


def test_forged_signature_rejected(store, fleet, make_fleet):
    a = fleet.device("cam-a")
    store.ingest([a.msg(a.seal())])
    mallory = make_fleet(store).device("cam-a", register=False)  # claims a's id, signs with its own key
    mallory.counter, mallory.prev = a.counter, a.prev
    (r,) = store.ingest([a.msg(mallory.seal())])
    assert r.verdict.kind is V.BAD_SIGNATURE and not r.stored
    assert store.quarantine_counts() == {"bad_signature": 1}
    assert store.ledger()[0].rejects == 1 and head(store, "cam-a") == 1
    assert_chain_intact(store, a)


def test_tampered_envelope_rejected(store, fleet):
    a = fleet.device("cam-a")
    data = bytearray(a.seal())
    assert data[-66:-64] == b"\x58\x40"  # the signature's head: the byte before it is the payload's last
    data[-67] ^= 0x01
    (r,) = store.ingest([a.msg(bytes(data))])
    assert r.verdict.kind is V.BAD_SIGNATURE and not r.stored
    assert sum(store.quarantine_counts().values()) == 1
    a.counter, a.prev = 0, GENESIS_PREV
    assert_chain_intact(store, a, expect_next=V.FIRST)


def test_envelope_of_a_republished_on_b_topic_rejected(store, fleet):
    a = fleet.device("cam-a")
    b = fleet.device("cam-b")
    data = a.seal()
    (r,) = store.ingest([b.msg(data)])  # arrives on devices/cam-b/telemetry
    assert r.verdict.kind is V.WRONG_TOPIC and not r.stored
    assert store.quarantine_counts() == {"wrong_topic": 1}
    # Attributed to the publisher the broker authenticated (cam-b's topic), never to the signer the bytes name:
    # a box cannot get its rejects counted against another box by replaying that box's envelopes.
    q = store.quarantined()[0]
    assert q["device"] == "cam-b" and "'cam-a'" in q["reason"]
    assert [(r.device_id, r.rejects) for r in store.ledger()] == [("cam-b", 1)]
    assert head(store, "cam-a") is None and head(store, "cam-b") is None
    assert kinds(store.ingest([a.msg(data)])) == [V.FIRST]  # the same bytes on the right topic are data
    assert_chain_intact(store, b, expect_next=V.FIRST)


def test_replayed_envelope_is_duplicate_not_new_data(store, fleet):
    a = fleet.device("cam-a")
    e = [a.seal() for _ in range(3)]
    store.ingest([a.msg(x) for x in e])
    replay = store.ingest([a.msg(e[0], T0 + 86400), a.msg(e[2], T0 + 86400)])
    assert kinds(replay) == [V.DUPLICATE, V.DUPLICATE] and all(r.stored for r in replay)
    assert len(list(store.envelopes("cam-a"))) == 3  # stored once
    assert sum(r.envelopes for r in store.ledger()) == 3
    assert sum(r.duplicates for r in store.ledger()) == 2
    assert_chain_intact(store, a)


def test_envelope_older_than_the_first_seen_fills_its_hole_once(store, fleet):
    """Envelopes sealed before the gateway's first accepted one are missing, not history: each may arrive late, once
    (with shared subscriptions counter 2 can commit before counter 1); a replay of it is then a duplicate."""
    a = fleet.device("cam-a")
    old = [a.seal() for _ in range(3)]  # sealed, not delivered yet (e.g. before the gateway started)
    (first,) = store.ingest([a.msg(a.seal())])  # the chain starts at counter 4
    assert first.verdict.kind is V.FIRST and first.verdict.missing == 3
    assert sum(r.missing for r in store.ledger()) == 3
    (r,) = store.ingest([a.msg(old[1])])
    assert r.verdict.kind is V.LATE and r.stored
    assert sum(r.missing for r in store.ledger()) == 2
    (again,) = store.ingest([a.msg(old[1])])
    assert again.verdict.kind is V.DUPLICATE and not store.quarantine_counts()
    assert head(store, "cam-a") == 4
    assert_chain_intact(store, a)


def test_reordered_pair_accepted_as_gap_and_late(store, fleet):
    a = fleet.device("cam-a")
    e1, e2, e3 = a.seal(), a.seal(), a.seal()
    assert kinds(store.ingest([a.msg(e1), a.msg(e3)])) == [V.FIRST, V.GAP]
    (r,) = store.ingest([a.msg(e2)])
    assert r.verdict.kind is V.LATE and r.stored and len(r.verdict.records) == 2
    assert store.quarantine_counts() == {}
    (row,) = store.ledger()
    assert (row.envelopes, row.missing, row.late) == (3, 0, 1)
    assert_chain_intact(store, a)


def test_forked_counter_rejected(store, fleet):
    a = fleet.device("cam-a")
    e1, e2 = a.seal(), a.seal()
    store.ingest([a.msg(e1), a.msg(e2)])
    # The device's key signs a different envelope 2 (a cloned key, a restored snapshot): same counter, other content.
    other2 = seal_envelope(a.id, 2, envelope_hash(e1), a.readings(1), T0 + 99, a.key)
    branch3 = seal_envelope(a.id, 3, envelope_hash(other2), a.readings(1), T0 + 100, a.key)
    results = store.ingest([a.msg(other2), a.msg(branch3)])
    assert kinds(results) == [V.FORKED, V.FORKED] and not any(r.stored for r in results)
    assert store.quarantine_counts() == {"forked": 2}
    assert [x.data for x in store.envelopes("cam-a")] == [e1, e2]
    assert_chain_intact(store, a)


def test_forked_late_envelope_rejected(store, fleet):
    a = fleet.device("cam-a")
    e1 = a.seal()
    a.seal()  # the real 2, never delivered
    e3 = a.seal()
    store.ingest([a.msg(e1), a.msg(e3)])
    fake2 = seal_envelope(a.id, 2, envelope_hash(e1), [], T0, a.key)  # fits the hole, but e3 does not name it
    assert kinds(store.ingest([a.msg(fake2)])) == [V.FORKED]
    assert store.quarantine_counts() == {"forked": 1}
    assert store.statuses()[0].gaps == 1  # the hole stays open for the real one
    assert_chain_intact(store, a)


def test_revoked_device_envelope_rejected(store, fleet):
    a = fleet.device("cam-a")
    before, after = a.seal(), a.seal()
    store.revoke_device("cam-a", T0 + 10)
    results = store.ingest([a.msg(before, T0 + 9), a.msg(after, T0 + 10)])
    assert kinds(results) == [V.FIRST, V.UNKNOWN_DEVICE]  # judged by the time each was received
    assert "revoked" in results[1].verdict.reason
    assert store.quarantine_counts() == {"unknown_device": 1}
    assert store.ledger()[0].rejects == 1 and head(store, "cam-a") == 1
    assert kinds(store.ingest([a.msg(a.seal(), T0 + 20)])) == [V.UNKNOWN_DEVICE]


def test_truncated_cbor_rejected(store, fleet):
    a = fleet.device("cam-a")
    data = a.seal()
    cuts = [0, 1, 5, len(data) // 2, len(data) - 1]
    results = store.ingest([a.msg(data[:cut]) for cut in cuts])
    assert kinds(results) == [V.MALFORMED] * len(cuts)
    assert store.quarantine_counts() == {"malformed": len(cuts)}
    a.counter, a.prev = 0, GENESIS_PREV
    assert_chain_intact(store, a, expect_next=V.FIRST)


def test_oversized_envelope_rejected(store_url, store, fleet):
    a = fleet.device("cam-a")
    results = store.ingest([a.msg(b"\xd2\x84" + b"\x00" * (600 * 1024))])
    assert kinds(results) == [V.MALFORMED] and "limit" in results[0].verdict.reason
    # A validly signed envelope above a gateway's configured limit is refused too.
    small = open_store(store_url, limits=TelemetryLimits(max_envelope_bytes=1024))
    try:
        (r,) = small.ingest([a.msg(a.seal(100))])
        assert r.verdict.kind is V.MALFORMED and "limit 1024" in r.verdict.reason
    finally:
        small.close()
    assert store.quarantine_counts() == {"malformed": 2}
    assert [q["size"] for q in store.quarantined()][1] == 600 * 1024 + 2
    a.counter, a.prev = 0, GENESIS_PREV
    assert_chain_intact(store, a, expect_next=V.FIRST)


def test_unknown_device_rejected(store, make_fleet, fleet):
    a = fleet.device("cam-a")
    stranger = make_fleet(store).device("ghost-1", register=False)
    (r,) = store.ingest([stranger.msg(stranger.seal())])
    assert r.verdict.kind is V.UNKNOWN_DEVICE and "revoked" not in r.verdict.reason
    assert store.quarantine_counts() == {"unknown_device": 1}
    assert store.quarantined()[0]["device"] == "ghost-1"
    assert [s.device_id for s in store.statuses()] == ["cam-a"]
    assert store.ledger() == []  # strangers get no ledger rows
    assert_chain_intact(store, a, expect_next=V.FIRST)


@pytest.mark.parametrize(
    "topic",
    ["devices/cam-a/telemetry/x", "devices/cam-a/commands", "devices/../telemetry", "devices//telemetry", "", "#"],
)
def test_garbage_topic_rejected(store, fleet, topic):
    a = fleet.device("cam-a")
    data = a.seal()
    (r,) = store.ingest([Inbound(topic, data, T0)])
    assert r.verdict.kind is V.WRONG_TOPIC and not r.stored
    assert store.quarantine_counts() == {"wrong_topic": 1}
    assert head(store, "cam-a") is None  # nothing was verified into the chain
    assert kinds(store.ingest([a.msg(data)])) == [V.FIRST]


def test_wrong_algorithm_rejected(store, fleet):
    a = fleet.device("cam-a")
    payload = cbor2.loads(a.seal()).value[2]
    prot = cbor2.dumps({1: -7, 4: a.id.encode()}, canonical=True)  # ES256 named, an Ed25519 signature inside
    data = cbor2.dumps(cbor2.CBORTag(18, [prot, {}, payload, a.key.sign(sig_structure(prot, payload))]))
    assert kinds(store.ingest([a.msg(data)])) == [V.MALFORMED]
    assert store.quarantine_counts() == {"malformed": 1}


@pytest.mark.parametrize("backend", ["sqlite"])  # one backend is enough: the property is about the verifier path
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(st.sampled_from(["devices/cam-a/telemetry", "devices/x/telemetry", "junk"]), st.binary(max_size=300)),
        min_size=1,
        max_size=20,
    )
)
def test_garbage_batch_gets_verdicts_never_raises(store, fleet, backend, garbage):
    if store.device("cam-a") is None:
        fleet.device("cam-a")
    before = sum(store.quarantine_counts().values())
    results = store.ingest([Inbound(t, p, T0) for t, p in garbage])
    assert len(results) == len(garbage)
    assert all(not r.stored for r in results)
    assert sum(store.quarantine_counts().values()) == before + len(garbage)
    assert head(store, "cam-a") is None


# -- status messages: a box's own word, parsed under bounds (issue 11) -------------------------------------------------

STATUS_BOMBS = {
    "depth": b'{"a":' * 5000 + b"1" + b"}" * 5000,
    "depth-list": b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    "oversize": b'{"state":"online","pad":"' + b"x" * 20_000 + b'"}',
    "nan": b'{"state":"online","x":NaN}',
    "infinity": b'{"state":"online","x":-Infinity}',
    "duplicate-keys": b'{"state":"online","state":"offline"}',
    "lone-surrogate": b'{"state":"online","x":"\\ud800"}',
    "not-utf8": b'{"state":"\xff\xfe"}',
    "not-an-object": b'["online"]',
    "not-json": b"\xd2\x84garbage",
    "huge-number": b'{"state":"online","x":' + b"9" * 5000 + b"}",
}


@pytest.mark.parametrize("payload", list(STATUS_BOMBS.values()), ids=list(STATUS_BOMBS))
def test_hostile_status_quarantined_and_ingest_goes_on(store, fleet, payload):
    a = fleet.device("cam-a")
    b = fleet.device("cam-b")
    results = store.ingest([
        Inbound("devices/cam-a/status", payload, T0),
        b.msg(b.seal(), T0),  # another box's envelope in the same batch is stored all the same
    ])  # fmt: skip
    assert [(r.outcome, r.stored) for r in results] == [("malformed", False), ("first", True)]
    assert store.quarantine_counts() == {"malformed": 1}
    q = store.quarantined()[0]
    assert (q["device"], q["topic"]) == ("cam-a", "devices/cam-a/status") and q["reason"].startswith("status")
    assert [(r.device_id, r.rejects) for r in store.ledger()] == [("cam-a", 1), ("cam-b", 0)]
    assert_chain_intact(store, a, expect_next=V.FIRST)


def test_status_messages_of_one_batch_coalesce_per_device(store, fleet):
    fleet.device("cam-a")
    flood = [Inbound("devices/cam-a/status", b'{"state":"online","n":%d}' % i, T0 + i) for i in range(50)]
    results = store.ingest([*flood, Inbound("devices/cam-a/status", b"", T0 + 60)])
    assert [r.outcome for r in results] == ["superseded"] * 49 + ["recorded", "cleared"]
    (s,) = store.statuses()
    assert s.info == {"state": "online", "n": 49} and s.state == "online"
