"""The gateway verifier, one test per attack or fault: every input gets exactly one verdict."""

from __future__ import annotations

from dataclasses import dataclass, field

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.wire.chain import ChainVerifier, MemoryChainState, VerdictKind
from edge.wire.cose import sig_structure
from edge.wire.envelope import GENESIS_PREV, envelope_hash, seal_envelope
from edge.wire.records import ReadingRecord
from edge.wire.schema import TelemetryLimits

V = VerdictKind


@dataclass
class Registry:
    """The device registry, in memory (implements ``KeyLookup``)."""

    keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)

    def lookup(self, device_id: str) -> Ed25519PublicKey | None:
        return self.keys.get(device_id)


class Device:
    """A device as the firmware runs it: a key, a counter and the hash of its last envelope."""

    def __init__(self, device_id: str) -> None:
        self.id = device_id
        self.key = Ed25519PrivateKey.generate()
        self.counter = 0
        self.prev = GENESIS_PREV

    def seal(self, n_records: int = 2) -> bytes:
        self.counter += 1
        recs = [
            ReadingRecord(channel=i, value=float(self.counter), timestamp=1e9 + self.counter) for i in range(n_records)
        ]
        data = seal_envelope(self.id, self.counter, self.prev, recs, 1e9 + self.counter, self.key)
        self.prev = envelope_hash(data)
        return data


@pytest.fixture
def a() -> Device:
    return Device("box-a")


@pytest.fixture
def b() -> Device:
    return Device("box-b")


@pytest.fixture
def verifier(a: Device, b: Device) -> ChainVerifier:
    return ChainVerifier(Registry({a.id: a.key.public_key(), b.id: b.key.public_key()}), MemoryChainState())


def test_next_in_order_accepted_chain(verifier: ChainVerifier, a: Device) -> None:
    kinds = [verifier.verify(a.seal(), topic_device=a.id).kind for _ in range(5)]
    assert kinds == [V.FIRST, V.NEXT, V.NEXT, V.NEXT, V.NEXT]
    v = verifier.verify(a.seal(3), topic_device=a.id)
    assert v.accepted and v.counter == 6 and len(v.records) == 3 and v.device_id == a.id


def test_first_envelope_may_start_at_any_counter(verifier: ChainVerifier, a: Device) -> None:
    a.counter = 41
    a.prev = b"\x05" * 32
    v = verifier.verify(a.seal())
    assert v.kind is V.FIRST and v.counter == 42
    assert verifier.verify(a.seal()).kind is V.NEXT


def test_forged_signature_rejected(verifier: ChainVerifier, a: Device) -> None:
    mallory = Device(a.id)  # claims a's id, signs with its own key
    v = verifier.verify(mallory.seal(), topic_device=a.id)
    assert v.kind is V.BAD_SIGNATURE and not v.records
    # The state did not move: a's real first envelope is still "first".
    assert verifier.verify(a.seal()).kind is V.FIRST


def test_tampered_envelope_bad_signature(verifier: ChainVerifier, a: Device) -> None:
    data = a.seal()
    i = data.index(cbor2.dumps(1.0 + 1e9)[1:])  # a byte inside a signed record
    tampered = data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :]
    assert verifier.verify(tampered).kind is V.BAD_SIGNATURE


def test_envelope_replayed_is_duplicate(verifier: ChainVerifier, a: Device) -> None:
    e1, e2 = a.seal(), a.seal()
    assert verifier.verify(e1).kind is V.FIRST
    assert verifier.verify(e2).kind is V.NEXT
    assert verifier.verify(e2).kind is V.DUPLICATE  # QoS 1 redelivery of the head
    v = verifier.verify(e1)  # replay of an older one
    assert v.kind is V.DUPLICATE and not v.accepted and not v.records
    assert verifier.verify(a.seal()).kind is V.NEXT


def test_reordered_pair_detected(verifier: ChainVerifier, a: Device) -> None:
    """1, then 3 before 2: 3 is a gap of 1; 2 arriving late fills the hole (``late``, accepted, once)."""
    e1, e2, e3 = a.seal(), a.seal(), a.seal()
    assert verifier.verify(e1).kind is V.FIRST
    v3 = verifier.verify(e3)
    assert v3.kind is V.GAP and v3.missing == 1
    v2 = verifier.verify(e2)
    assert v2.kind is V.LATE and v2.accepted and v2.counter == 2 and len(v2.records) == 2
    assert verifier.verify(e2).kind is V.DUPLICATE  # the hole is closed: a second copy is not data
    assert verifier.verify(a.seal()).kind is V.NEXT


def test_late_envelope_that_does_not_link_is_forked(verifier: ChainVerifier, a: Device) -> None:
    e1 = a.seal()
    a.seal()  # the real 2, never delivered
    e3 = a.seal()
    verifier.verify(e1)
    verifier.verify(e3)
    # A second, different envelope 2 signed by the device (a compromised or buggy device): its hash is not e3's prev.
    fake2 = seal_envelope(a.id, 2, envelope_hash(e1), [], 5.0, a.key)
    assert verifier.verify(fake2).kind is V.FORKED


def test_stale_replay_below_head_rejected(a: Device) -> None:
    verifier = ChainVerifier(Registry({a.id: a.key.public_key()}), MemoryChainState(history=2))
    old = [a.seal() for _ in range(5)]
    for e in old:
        verifier.verify(e)
    assert verifier.verify(old[0]).kind is V.STALE  # forgotten hash, not a known hole: a replay
    assert verifier.verify(old[4]).kind is V.DUPLICATE


def test_forked_counter_detected(verifier: ChainVerifier, a: Device) -> None:
    e1 = a.seal()
    e2 = a.seal()
    assert verifier.verify(e1).kind is V.FIRST
    assert verifier.verify(e2).kind is V.NEXT
    # The device signs a different envelope 2 (a cloned key, a restored snapshot): same counter, other content.
    other2 = seal_envelope(a.id, 2, envelope_hash(e1), [ReadingRecord(9, 9.0, 9.0)], 9.0, a.key)
    v = verifier.verify(other2)
    assert v.kind is V.FORKED and not v.accepted
    # Counter 3 whose prev is not the head: a branch that does not extend what we accepted.
    branch3 = seal_envelope(a.id, 3, envelope_hash(other2), [], 10.0, a.key)
    assert verifier.verify(branch3).kind is V.FORKED
    assert verifier.verify(a.seal()).kind is V.NEXT  # the real 3 still extends the real chain


def test_gap_counts_missing_envelopes(verifier: ChainVerifier, a: Device) -> None:
    assert verifier.verify(a.seal()).kind is V.FIRST
    for _ in range(4):
        a.seal()  # 2..5 lost
    v = verifier.verify(a.seal())
    assert v.kind is V.GAP and v.missing == 4 and v.accepted and v.counter == 6
    assert verifier.verify(a.seal()).kind is V.NEXT


def test_unknown_device_rejected(verifier: ChainVerifier) -> None:
    stranger = Device("box-z")
    v = verifier.verify(stranger.seal(), topic_device="box-z")
    assert v.kind is V.UNKNOWN_DEVICE and v.device_id == "box-z"


def test_revoked_device_rejected(a: Device) -> None:
    registry = Registry({a.id: a.key.public_key()})
    verifier = ChainVerifier(registry, MemoryChainState())
    assert verifier.verify(a.seal()).kind is V.FIRST
    del registry.keys[a.id]
    assert verifier.verify(a.seal()).kind is V.UNKNOWN_DEVICE


def test_envelope_of_a_republished_on_b_topic_rejected(verifier: ChainVerifier, a: Device, b: Device) -> None:
    data = a.seal()
    v = verifier.verify(data, topic_device=b.id)
    assert v.kind is V.WRONG_TOPIC and v.device_id == a.id and not v.records
    assert verifier.verify(data, topic_device=a.id).kind is V.FIRST  # the state did not move


def test_truncated_cbor_malformed(verifier: ChainVerifier, a: Device) -> None:
    data = a.seal()
    for cut in (0, 1, 5, len(data) // 2, len(data) - 1):
        assert verifier.verify(data[:cut]).kind is V.MALFORMED


def test_oversized_envelope_malformed(a: Device) -> None:
    limits = TelemetryLimits(max_envelope_bytes=1024)
    verifier = ChainVerifier(Registry({a.id: a.key.public_key()}), MemoryChainState(), limits)
    v = verifier.verify(a.seal(n_records=100))
    assert v.kind is V.MALFORMED and "limit 1024" in v.reason and v.envelope_hash is None
    assert verifier.verify(b"\xd2" + b"\x00" * 10_000_000).kind is V.MALFORMED


def test_wrong_algorithm_rejected(verifier: ChainVerifier, a: Device) -> None:
    payload = cbor2.loads(a.seal()).value[2]
    for alg in (-7, -35, 0, "EdDSA"):
        prot = cbor2.dumps({1: alg, 4: a.id.encode()}, canonical=True)
        data = cbor2.dumps(cbor2.CBORTag(18, [prot, {}, payload, a.key.sign(sig_structure(prot, payload))]))
        v = verifier.verify(data)
        assert v.kind is V.MALFORMED and "alg" in v.reason


def test_signed_payload_violating_schema_malformed(verifier: ChainVerifier, a: Device) -> None:
    payload = cbor2.dumps({1: 1, 2: a.id, 3: 1, 4: GENESIS_PREV, 5: 1.0, 6: [{0: 77}]}, canonical=True)
    prot = cbor2.dumps({1: -8, 4: a.id.encode()}, canonical=True)
    data = cbor2.dumps(cbor2.CBORTag(18, [prot, {}, payload, a.key.sign(sig_structure(prot, payload))]))
    v = verifier.verify(data)
    assert v.kind is V.MALFORMED and "record type" in v.reason


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.none() | st.sampled_from(["box-a", "box-b"]))
def test_random_bytes_get_a_verdict(data: bytes, topic: str | None) -> None:
    a = Device("box-a")
    verifier = ChainVerifier(Registry({a.id: a.key.public_key()}), MemoryChainState())
    v = verifier.verify(data, topic_device=topic)
    assert v.kind in {V.MALFORMED, V.UNKNOWN_DEVICE, V.BAD_SIGNATURE, V.WRONG_TOPIC}
