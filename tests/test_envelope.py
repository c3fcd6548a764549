"""Envelopes and records: round trips, batching, and every limit enforced on hostile input."""

from __future__ import annotations

import contextlib
import re
import runpy
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.wire.cose import sig_structure
from edge.wire.envelope import GENESIS_PREV, Batcher, envelope_hash, open_envelope, seal_envelope
from edge.wire.errors import BadSignatureError, MalformedEnvelopeError, MalformedRecordError
from edge.wire.records import InferenceRecord, ReadingRecord
from edge.wire.schema import (
    EventRecord,
    LossNotice,
    TelemetryLimits,
    decode_record,
    decode_records,
    encode_record,
    encode_records,
)

KEY = Ed25519PrivateKey.generate()
PUB = KEY.public_key()


def inference(seq: int = 1, **kw: object) -> InferenceRecord:
    fields: dict[str, object] = {
        "seq": seq,
        "timestamp": 1_700_000_000.25,
        "model_id": "digits@1.2.0",
        "model_sha256": "ab" * 32,
        "input_sha256": "cd" * 32,
        "pixel_format": "GRAY8",
        "top_k": ((3, 0.875), (8, 0.0625)),
        "score": None,
        "label": 3,
        "preprocess_us": 120,
        "inference_us": 340,
        "latency_us": 900,
        "backend": "neon",
    }
    fields.update(kw)
    return InferenceRecord(**fields)  # type: ignore[arg-type]


ALL_KINDS = [
    inference(),
    inference(2, top_k=(), score=0.25, label=None),
    ReadingRecord(channel=4, value=-12.5, timestamp=1_700_000_001.0),
    LossNotice(1_700_000_002.0, envelopes_dropped=3, records_dropped=250, first_counter=2, last_counter=4),
    EventRecord(1_700_000_003.0, "ota.committed", {"version": "1.3.0", "slot": "b", "ok": True, "n": -1, "x": None}),
]


def test_every_record_type_round_trips() -> None:
    for r in ALL_KINDS:
        assert decode_record(encode_record(r)) == r
    assert decode_records(encode_records(ALL_KINDS)) == ALL_KINDS


def test_seal_open_round_trip() -> None:
    prev = b"\x05" * 32  # counter 5: its loss notice names counters 2..4, sealed before it
    data = seal_envelope("box-1", 5, prev, ALL_KINDS, 1_700_000_010.5, KEY)
    env = open_envelope(data, PUB)
    assert (env.device_id, env.counter, env.prev, env.created) == ("box-1", 5, prev, 1_700_000_010.5)
    assert list(env.records) == ALL_KINDS
    assert env.hash == envelope_hash(data)
    nxt = open_envelope(seal_envelope("box-1", 6, env.hash, [], 1_700_000_011.0, KEY), PUB)
    assert nxt.prev == env.hash and nxt.records == ()


def test_seal_refuses_broken_chain_fields() -> None:
    with pytest.raises(MalformedEnvelopeError, match="genesis"):
        seal_envelope("box-1", 1, b"\x01" * 32, [], 1.0, KEY)
    with pytest.raises(MalformedEnvelopeError, match="genesis"):
        seal_envelope("box-1", 2, GENESIS_PREV, [], 1.0, KEY)
    with pytest.raises(MalformedEnvelopeError, match="counter"):
        seal_envelope("box-1", 0, GENESIS_PREV, [], 1.0, KEY)


def test_tampered_record_bad_signature() -> None:
    data = seal_envelope("box-1", 1, GENESIS_PREV, [inference()], 1.0, KEY)
    tampered = data.replace(b"digits@1.2.0", b"digits@6.6.6")
    with pytest.raises(BadSignatureError):
        open_envelope(tampered, PUB)


# ------------------------------------------------------------------------------------------------------- batching


def test_batcher_releases_by_count() -> None:
    b: Batcher[int] = Batcher(max_records=3, max_age_s=60)
    assert b.add(1, now=0.0) is None
    assert b.add(2, now=1.0) is None
    assert b.add(3, now=2.0) == [1, 2, 3]
    assert len(b) == 0 and b.deadline() is None


def test_batcher_releases_by_age() -> None:
    b: Batcher[int] = Batcher(max_records=100, max_age_s=5)
    assert b.add(1, now=10.0) is None
    assert b.deadline() == 15.0
    assert b.due(now=14.9) is None
    assert b.due(now=15.0) == [1]
    assert b.due(now=100.0) is None
    assert b.add(2, now=20.0) is None
    assert b.add(3, now=25.5) == [2, 3]  # the oldest waited past max_age: released with the newcomer


def test_batcher_flush_returns_pending_in_order() -> None:
    b: Batcher[str] = Batcher(max_records=10, max_age_s=1)
    for x in "abc":
        b.add(x, now=0.0)
    assert b.flush() == ["a", "b", "c"]
    assert b.flush() == []


# ------------------------------------------------------------------------------------------------------- limits


def test_oversized_record_rejected() -> None:
    limits = TelemetryLimits(max_record_bytes=128)
    big = EventRecord(1.0, "status", {f"k{i}": "x" * 200 for i in range(5)})
    with pytest.raises(MalformedRecordError, match="limit 128"):
        encode_record(big, limits)
    with pytest.raises(MalformedRecordError, match="limit 128"):
        decode_record(encode_record(big), limits)
    # Inside an envelope signed by a device with looser limits: still refused, after the signature.
    data = seal_envelope("box-1", 1, GENESIS_PREV, [big], 1.0, KEY)
    with pytest.raises(MalformedRecordError, match="limit 128"):
        open_envelope(data, PUB, TelemetryLimits(max_record_bytes=128))


def test_too_many_records_rejected_before_decoding() -> None:
    data = seal_envelope("box-1", 1, GENESIS_PREV, [inference(i) for i in range(5)], 1.0, KEY)
    with pytest.raises(MalformedRecordError, match="5 records, limit 4"):
        open_envelope(data, PUB, TelemetryLimits(max_records=4))
    # An array head claiming 2**32 records is refused from the head, not by decoding (or allocating) them.
    with pytest.raises(MalformedRecordError, match="limit"):
        decode_records(b"\x9a\xff\xff\xff\xff")


def test_too_deep_cbor_rejected() -> None:
    deep: object = 1
    for _ in range(50):
        deep = [deep]
    item = {0: 4, 1: 1.0, 2: "status", 3: {"k": deep}}
    with pytest.raises(MalformedRecordError, match="depth"):
        decode_record(cbor2.dumps(item))


def test_duplicate_keys_rejected() -> None:
    # {0: 2, 1: 1.0, 2: 1, 3: 1.0, 3: 2.0}: a reading whose value appears twice (which one would a verifier store?)
    data = bytes.fromhex("a5000201f93c00020103f93c0003f94000")
    with pytest.raises(MalformedRecordError, match=r"[Dd]uplicate"):
        decode_record(data)


@pytest.mark.parametrize(
    "item",
    [
        {0: 9, 1: 1.0},  # unknown record type
        {0: 2, 1: 1.0, 2: 1, 3: "12.5"},  # value as text
        {0: 2, 1: 1.0, 2: -1, 3: 1.0},  # negative channel
        {0: 2, 1: float("nan"), 2: 1, 3: 1.0},  # NaN timestamp
        {0: 2, 1: 1.0, 2: 1, 3: float("inf")},
        {0: 2, 1: 1.0, 2: True, 3: 1.0},  # bool is not an int here
        {0: 2, 1: 1.0, 2: 1, 3: 1.0, 99: 0},  # unknown key
        {0: 2, 1: 1.0, 2: 1},  # missing key
        {0: 3, 1: 1.0, 2: 5, 3: 10, 4: 7, 5: 6},  # loss: first > last
        {0: 4, 1: 1.0, 2: "status", 3: {"nested": {"no": 1}}},
        {0: 4, 1: 1.0, 2: "", 3: {}},
        [0, 2],
        "reading",
    ],
)
def test_wrong_types_and_ranges_rejected(item: object) -> None:
    with pytest.raises(MalformedRecordError):
        decode_record(cbor2.dumps(item))


def test_inference_sha256_must_be_32_bytes() -> None:
    item = cbor2.loads(encode_record(inference()))
    item[4] = b"\x00" * 31
    with pytest.raises(MalformedRecordError, match="model_sha256"):
        decode_record(cbor2.dumps(item))
    with pytest.raises(MalformedRecordError, match="hex"):
        encode_record(inference(model_sha256="zz" * 32))


def test_tags_in_records_rejected() -> None:
    item = {0: 2, 1: cbor2.CBORTag(1, 1_700_000_000), 2: 1, 3: 1.0}  # a datetime tag where a float belongs
    with pytest.raises(MalformedRecordError, match="tag"):
        decode_record(cbor2.dumps(item))


def test_trailing_bytes_after_record_rejected() -> None:
    with pytest.raises(MalformedRecordError, match="trailing"):
        decode_record(encode_record(ALL_KINDS[2]) + b"\x00")


def test_payload_naming_another_device_rejected() -> None:
    # Signed by box-1 with kid box-1, but the payload claims box-2: the device's own bug, never accepted.
    payload = cbor2.dumps({1: 1, 2: "box-2", 3: 1, 4: GENESIS_PREV, 5: 1.0, 6: []}, canonical=True)
    prot = cbor2.dumps({1: -8, 4: b"box-1"}, canonical=True)
    data = cbor2.dumps(cbor2.CBORTag(18, [prot, {}, payload, KEY.sign(sig_structure(prot, payload))]))
    with pytest.raises(MalformedEnvelopeError, match="differs from the kid"):
        open_envelope(data, PUB)


def test_non_canonical_envelope_rejected() -> None:
    # The same signed parts with an unprotected header added: a different hash, the same valid signature.
    data = seal_envelope("box-1", 1, GENESIS_PREV, [], 1.0, KEY)
    parts = list(cbor2.loads(data).value)
    parts[1] = {99: 0}
    with pytest.raises(MalformedEnvelopeError, match="unprotected"):
        open_envelope(cbor2.dumps(cbor2.CBORTag(18, parts)), PUB)
    # A non-shortest head for the payload byte string.
    p = parts[2]
    assert 24 <= len(p) < 256
    longer = data.replace(bytes([0x58, len(p)]) + p, bytes([0x59, 0, len(p)]) + p)
    with pytest.raises(MalformedEnvelopeError, match="canonical"):
        open_envelope(longer, PUB)


# ------------------------------------------------------------------------------------------------------ properties

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
timestamps = st.floats(min_value=0, max_value=4e9, allow_nan=False)
u32 = st.integers(0, 2**32 - 1)
u63 = st.integers(0, 2**63 - 1)
short_text = st.text(min_size=1, max_size=16).filter(str.isprintable)
sha = st.binary(min_size=32, max_size=32).map(bytes.hex)

inference_records = st.builds(
    InferenceRecord,
    seq=u63,
    timestamp=timestamps,
    model_id=st.text(min_size=1, max_size=128).filter(str.isprintable),
    model_sha256=sha,
    input_sha256=sha,
    pixel_format=short_text,
    top_k=st.lists(st.tuples(u32, finite), max_size=8).map(tuple),
    score=st.none() | finite,
    label=st.none() | u32,
    preprocess_us=u63,
    inference_us=u63,
    latency_us=u63,
    backend=short_text,
)
reading_records = st.builds(ReadingRecord, channel=u32, value=finite, timestamp=timestamps)
event_values = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | finite | st.text(max_size=32)
event_records = st.builds(
    EventRecord,
    timestamp=timestamps,
    kind=st.text(min_size=1, max_size=64).filter(str.isprintable),
    data=st.dictionaries(st.text(min_size=1, max_size=16), event_values | st.binary(max_size=32), max_size=8),
)
loss_records = st.builds(
    lambda ts, first, span, rec: LossNotice(ts, span, min(rec, span * 1000), first, first + span - 1),
    timestamps,
    st.integers(1, 2**40),
    st.integers(1, 1000),
    u63,
)
records = inference_records | reading_records | event_records | loss_records


@settings(max_examples=150, deadline=None)
@given(st.lists(records, max_size=12), st.integers(1, 2**53), timestamps)
def test_random_records_round_trip(recs: list[object], counter: int, created: float) -> None:
    # A loss notice names counters sealed before its envelope: the envelope's counter follows them.
    counter = max([counter, *(r.last_counter + 1 for r in recs if isinstance(r, LossNotice))])
    prev = GENESIS_PREV if counter == 1 else b"\x11" * 32
    env = open_envelope(seal_envelope("box-1", counter, prev, recs, created, KEY), PUB)  # type: ignore[arg-type]
    assert list(env.records) == recs and env.counter == counter


_SEED_ENVELOPE = seal_envelope("box-1", 7, b"\x22" * 32, ALL_KINDS, 1_700_000_000.0, KEY)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.binary(max_size=300)
    | st.builds(
        lambda pos, byte: _SEED_ENVELOPE[:pos] + bytes([byte]) + _SEED_ENVELOPE[pos + 1 :],
        st.integers(0, len(_SEED_ENVELOPE) - 1),
        st.integers(0, 255),
    )
    | st.integers(1, len(_SEED_ENVELOPE)).map(lambda n: _SEED_ENVELOPE[:n])
)
def test_random_bytes_never_crash_open_envelope(data: bytes) -> None:
    with contextlib.suppress(MalformedEnvelopeError, MalformedRecordError, BadSignatureError):
        open_envelope(data, PUB)


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary(),
        lambda c: st.lists(c) | st.dictionaries(st.integers(0, 12) | st.text(), c),
        max_leaves=30,
    )
)
def test_random_cbor_items_never_crash_record_decoding(item: object) -> None:
    with contextlib.suppress(MalformedRecordError):
        decode_record(cbor2.dumps(item))


def test_worked_example_in_docs_matches_the_generator() -> None:
    root = Path(__file__).resolve().parent.parent
    example = runpy.run_path(str(root / "tools" / "telemetry_example.py"))["example_envelope"]()
    block = re.search(r"```text\n(.*?)```", (root / "docs" / "telemetry.md").read_text(encoding="utf-8"), re.S)
    assert block is not None
    lines = block.group(1).split("\n")
    assert bytes.fromhex("".join(x for x in lines if x and not x.startswith("sha256:"))) == example
    assert f"sha256: {envelope_hash(example).hex()}" in lines
    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")  # RFC 8032 TEST 1
    env = open_envelope(example, Ed25519PrivateKey.from_private_bytes(seed).public_key())
    assert env.device_id == "box-1" and env.counter == 1 and len(env.records) == 2


# -- bounds a hostile box cannot cross (issue 11) ---------------------------------------------------------------------


@pytest.mark.parametrize("fake", [1.0, True, 1.5, "1", b"\x01"], ids=["float", "true", "float-1.5", "text", "bytes"])
def test_record_keys_must_be_integers(fake: object) -> None:
    # 1.0 and true are equal to 1 in Python: a decoder that only compared sets would take {0: 2, 1.0: ...} as a
    # reading, and the same record would have two encodings (two hashes, two claims of one inference).
    item = {0: 2, fake: 1_700_000_000.0, 2: 1, 3: 1.0}
    with pytest.raises(MalformedRecordError, match="record key"):
        decode_record(cbor2.dumps(item))
    inf = cbor2.loads(encode_record(inference()))
    inf[True] = inf.pop(1)  # the timestamp under `true`
    with pytest.raises(MalformedRecordError, match="record key"):
        decode_record(cbor2.dumps(inf))


@pytest.mark.parametrize(
    ("field", "value"),
    [(3, "digits\x00@1.0"), (3, "digits@1\n2"), (6, "GRAY\x1b8"), (11, "ne\u2028on")],
    ids=["nul-model", "newline-model", "escape-format", "line-separator-backend"],
)
def test_identifiers_must_be_printable(field: int, value: str) -> None:
    # A NUL makes PostgreSQL refuse a text value, and with it the whole ingest batch; control characters forge log
    # lines and table rows.
    item = cbor2.loads(encode_record(inference()))
    item[field] = value
    with pytest.raises(MalformedRecordError, match="printable"):
        decode_record(cbor2.dumps(item))
    event = {0: 4, 1: 1.0, 2: "ota\x00committed", 3: {}}
    with pytest.raises(MalformedRecordError, match="printable"):
        decode_record(cbor2.dumps(event))


def test_counter_bounded_by_the_contract() -> None:
    top = 2**53
    env = open_envelope(seal_envelope("box-1", top, b"\x11" * 32, [], 1.0, KEY), PUB)
    assert env.counter == top
    with pytest.raises(MalformedEnvelopeError, match=r"2\*\*53"):
        seal_envelope("box-1", top + 1, b"\x11" * 32, [], 1.0, KEY)
    # The same bound on the verifier's side, for an envelope a hostile box signs itself.
    payload = cbor2.dumps({1: 1, 2: "box-1", 3: top + 1, 4: b"\x11" * 32, 5: 1.0, 6: []}, canonical=True)
    prot = cbor2.dumps({1: -8, 4: b"box-1"}, canonical=True)
    data = cbor2.dumps(cbor2.CBORTag(18, [prot, {}, payload, KEY.sign(sig_structure(prot, payload))]))
    with pytest.raises(MalformedEnvelopeError, match=r"2\*\*53"):
        open_envelope(data, PUB)


def _signed(counter: int, records: list[dict[int, object]]) -> bytes:
    """An envelope a hostile box seals by hand, bypassing ``seal_envelope``'s own checks."""
    payload = cbor2.dumps({1: 1, 2: "box-1", 3: counter, 4: b"\x11" * 32, 5: 1.0, 6: records}, canonical=True)
    prot = cbor2.dumps({1: -8, 4: b"box-1"}, canonical=True)
    return cbor2.dumps(cbor2.CBORTag(18, [prot, {}, payload, KEY.sign(sig_structure(prot, payload))]))


def test_loss_notice_numbers_bounded_by_what_is_plausible() -> None:
    def notice(envelopes: int, records: int, first: int, last: int) -> dict[int, object]:
        return {0: 3, 1: 1.0, 2: envelopes, 3: records, 4: first, 5: last}

    assert open_envelope(_signed(11, [notice(3, 3000, 8, 10)]), PUB).records[0].records_dropped == 3000
    # Dropped envelopes held at most 1000 records each.
    with pytest.raises(MalformedRecordError, match="records_dropped"):
        open_envelope(_signed(11, [notice(3, 3001, 8, 10)]), PUB)
    # More envelopes than the counter range holds.
    with pytest.raises(MalformedRecordError, match="cannot hold"):
        open_envelope(_signed(11, [notice(4, 1, 8, 10)]), PUB)
    # A loss of counters at or after the announcing envelope's own: not a loss, only noise for the ledger's sums.
    with pytest.raises(MalformedRecordError, match="at or after its own"):
        open_envelope(_signed(10, [notice(3, 3, 8, 10)]), PUB)
    with pytest.raises(MalformedRecordError, match="first_counter: got 9007199254740993"):
        open_envelope(_signed(11, [notice(1, 1, 2**53 + 1, 2**53 + 1)]), PUB)
    # seal_envelope refuses to sign what a verifier would reject.
    with pytest.raises(MalformedRecordError, match="at or after its own"):
        seal_envelope("box-1", 5, b"\x11" * 32, [LossNotice(1.0, 1, 1, 5, 5)], 1.0, KEY)


def test_telemetry_limits_cannot_exceed_the_contract() -> None:
    with pytest.raises(ValueError, match="contract"):
        TelemetryLimits(max_records=1001)
