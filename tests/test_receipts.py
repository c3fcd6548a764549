"""Receipts: the wire format (sign, verify, attacks), what a receipt covers, the window's receipt mode and the
outbox's ``apply_receipt`` (a real SQLite outbox)."""

from __future__ import annotations

import time

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from edge.telemetry.outbox import Outbox, ReceiptMismatchError
from edge.telemetry.window import Action, Outcome, PublishWindow, ReceiptPolicy
from edge.wire.cose import ALG_EDDSA, HEADER_ALG, HEADER_KID, sign1
from edge.wire.receipts import (
    GENESIS_HASH,
    MAX_HOLES,
    Receipt,
    ReceiptError,
    holes_between,
    sign_receipt,
    verify_receipt,
)
from edge.wire.records import ReadingRecord
from edge.wire.schema import DEFAULT_LIMITS

DEV = "box-1"
KEY = Ed25519PrivateKey.generate()
H = bytes(range(32))


def receipt(stored=0, head=0, start=None, holes=(), device=DEV, stored_hash=None, head_hash=None) -> Receipt:
    sh = GENESIS_HASH if stored == 0 else (stored_hash or H)
    hh = sh if head == stored else (head_hash or b"\x07" * 32)
    return Receipt(device, stored, sh, head, hh, stored if start is None else start, tuple(holes), 1.7e9, "gw-1")


# -- the wire format --------------------------------------------------------------------------------------------


def test_round_trip_and_coverage() -> None:
    r = receipt(stored=4, head=20, holes=[(5, 6), (10, 10)])
    got = verify_receipt(sign_receipt(r, KEY), KEY.public_key(), DEV)
    assert got == r
    covered = [c for c in range(0, 23) if got.covers(c)]
    assert covered == [1, 2, 3, 4, 7, 8, 9, *range(11, 21)]
    assert list(got.stored_ranges()) == [(1, 4), (7, 9), (11, 20)]
    assert got.in_holes(5) and got.in_holes(10) and not got.in_holes(7)


def test_undescribed_counters_between_stored_and_from_are_not_covered() -> None:
    r = receipt(stored=2, head=30, start=10, holes=[(12, 12)])
    assert [c for c in range(1, 32) if r.covers(c)] == [1, 2, 11, *range(13, 31)]
    assert list(r.stored_ranges()) == [(1, 2), (11, 11), (13, 30)]


@given(
    st.lists(st.integers(1, 60), max_size=30, unique=True),
    st.integers(1, 60),
)
def test_stored_ranges_are_exactly_what_covers_says(missing_set: list[int], head: int) -> None:
    missing = sorted(m for m in missing_set if m < head)
    ranges: list[tuple[int, int]] = []
    for m in missing:
        if ranges and ranges[-1][1] == m - 1:
            ranges[-1] = (ranges[-1][0], m)
        else:
            ranges.append((m, m))
    stored = ranges[0][0] - 1 if ranges else head
    holes = [r for r in ranges if r[0] > stored]
    start, listed = holes_between(holes, stored, head)
    r = receipt(stored=stored, head=head, start=start, holes=listed)
    r = verify_receipt(sign_receipt(r, KEY), KEY.public_key(), DEV)
    from_ranges = {c for lo, hi in r.stored_ranges() for c in range(lo, hi + 1)}
    assert from_ranges == {c for c in range(0, head + 2) if r.covers(c)}
    assert not from_ranges & set(missing)  # never claims a missing counter


def test_too_many_holes_keeps_the_highest_and_raises_from() -> None:
    missing = [(2 * i, 2 * i) for i in range(1, MAX_HOLES + 11)]  # 74 single holes, each after a stored counter
    head = missing[-1][1] + 1
    start, holes = holes_between(missing, 1, head)
    assert len(holes) == MAX_HOLES and holes[-1] == missing[-1] and start == missing[-MAX_HOLES - 1][1]
    r = verify_receipt(sign_receipt(receipt(stored=1, head=head, start=start, holes=holes), KEY), KEY.public_key(), DEV)
    assert not any(r.covers(lo) for lo, _ in missing)


def test_forged_receipt_is_refused() -> None:
    data = sign_receipt(receipt(stored=5, head=5), Ed25519PrivateKey.generate())
    with pytest.raises(ReceiptError, match="does not verify"):
        verify_receipt(data, KEY.public_key(), DEV)


def test_receipt_for_another_device_is_refused() -> None:
    data = sign_receipt(receipt(stored=5, head=5, device="box-2"), KEY)
    with pytest.raises(ReceiptError, match="for device 'box-2'"):
        verify_receipt(data, KEY.public_key(), DEV)


def test_a_command_signature_is_not_a_receipt() -> None:
    # Same COSE profile, another kid: a message signed for another purpose never counts as a receipt.
    body = cbor2.dumps({1: 1}, canonical=True)
    data = sign1(body, KEY, protected={HEADER_ALG: ALG_EDDSA, HEADER_KID: b"fleet"}, unprotected={})
    with pytest.raises(ReceiptError, match="protected header"):
        verify_receipt(data, KEY.public_key(), DEV)


def _signed_payload(payload: dict) -> bytes:
    protected = {HEADER_ALG: ALG_EDDSA, HEADER_KID: b"receipt"}
    return sign1(cbor2.dumps(payload, canonical=True), KEY, protected=protected, unprotected={})


def _payload(over: dict) -> dict:
    p = {1: 1, 2: DEV, 3: 4, 4: H, 5: 9, 6: b"\x07" * 32, 7: 4, 8: [[5, 6]], 9: 1.7e9, 10: "gw"}
    p.update(over)
    return p


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({3: 10}, "stored 10 <= from"),  # stored above head
        ({8: [[6, 5]]}, "out of order"),
        ({8: [[5, 9]]}, "out of order"),  # a hole reaching the head, which is stored
        ({8: [[5, 6], [7, 8]]}, "out of order"),  # adjacent holes are one hole
        ({8: [[3, 3]]}, "out of order"),  # a hole inside the stored prefix
        ({7: 2}, "stored 4 <= from"),
        ({4: b"short"}, "stored_hash"),
        ({3: 0, 7: 0}, "32 zero bytes"),
        ({5: 2**53 + 1}, "counter"),
        ({3: True}, "counter"),
        ({9: float("nan")}, "epoch"),
        ({8: [[1, 1]] * (MAX_HOLES + 1)}, "holes must be"),
        ({1: 2}, "version"),
        ({10: "x" * 200}, "gateway"),
    ],
)
def test_malformed_fields_are_refused(change: dict, why: str) -> None:
    with pytest.raises(ReceiptError, match=why):
        verify_receipt(_signed_payload(_payload(change)), KEY.public_key(), DEV)


def test_extra_or_missing_keys_and_garbage_are_refused() -> None:
    p = _payload({})
    p[11] = 0
    with pytest.raises(ReceiptError, match=r"keys 1\.\.10"):
        verify_receipt(_signed_payload(p), KEY.public_key(), DEV)
    for junk in (b"", b"\xff" * 10, b"\xd2" + b"\x84" * 5000):
        with pytest.raises(ReceiptError):
            verify_receipt(junk, KEY.public_key(), DEV)


# -- the window in receipt mode ---------------------------------------------------------------------------------

POLICY = ReceiptPolicy(timeout_s=10.0, backoff_max_s=40.0, hole_grace_s=1.0, sync_wait_s=2.0, max_unreceipted=6)


def _publish_all(w: PublishWindow, now: float) -> list[int]:
    out = []
    while (nxt := w.next()) is not None:
        w.published(nxt[0], now)
        out.append(nxt[0])
    return out


def _rows(*counters: int) -> list[tuple[int, bytes]]:
    return [(c, b"e%d" % c) for c in counters]


def test_puback_frees_the_slot_but_deletes_nothing_and_the_deadline_resends() -> None:
    w = PublishWindow(4, 0.5, POLICY)
    assert w.decide(connected=True, now=0.0, session=1) is Action.WAIT  # waiting for the session's receipt
    assert w.decide(connected=True, now=2.5, session=1) is Action.PUBLISH  # none came: publish anyway
    w.offer(_rows(1, 2, 3))
    assert _publish_all(w, 3.0) == [1, 2, 3]
    for c in (1, 2, 3):
        res = w.resolved(w.epoch, c, Outcome.ACKED, 3.1)
        assert not res.delete
    assert w.unreceipted == 3 and w.in_flight == 0
    w.receipt_applied(receipt(stored=1, head=1))
    assert w.unreceipted == 2
    assert w.due(12.9) == []
    assert w.due(13.0) == [2, 3]  # 10 s after their publication
    w.offer_resend([2, 3], _rows(3))  # 2 was deleted by a receipt meanwhile: only 3 goes out again
    assert _publish_all(w, 13.0) == [3]
    w.resolved(w.epoch, 3, Outcome.ACKED, 13.1)
    assert w.due(32.9) == [] and w.due(33.0) == [3]  # the second wait doubles
    assert w.resent == 1 and w.republished == 1


def test_a_hole_is_resent_after_the_grace_not_at_once() -> None:
    w = PublishWindow(8, 0.5, POLICY)
    w.decide(connected=True, now=0.0, session=1)
    w.receipt_applied(receipt())  # the session's first receipt: synced
    assert w.decide(connected=True, now=0.1, session=1) is Action.PUBLISH
    w.offer(_rows(1, 2, 3, 4))
    _publish_all(w, 1.0)
    for c in (1, 2, 3, 4):
        w.resolved(w.epoch, c, Outcome.ACKED, 1.0)
    w.receipt_applied(receipt(stored=1, head=4, holes=[(2, 3)]))
    assert w.unreceipted == 2
    assert w.due(1.9) == [] and w.due(2.0) == [2, 3]


def test_unreceipted_envelopes_are_bounded() -> None:
    w = PublishWindow(100, 0.5, POLICY)
    w.decide(connected=True, now=0.0, session=1)
    w.receipt_applied(receipt())
    w.offer(_rows(*range(1, 11)))
    assert _publish_all(w, 0.0) == [1, 2, 3, 4, 5, 6]  # max_unreceipted = 6
    for c in range(1, 7):
        w.resolved(w.epoch, c, Outcome.ACKED, 0.0)
    assert w.next() is None and w.wants() == 0
    w.receipt_applied(receipt(stored=3, head=3))
    assert _publish_all(w, 0.0) == [7, 8, 9]


def test_rereading_after_a_restart_skips_what_waits_for_a_receipt() -> None:
    w = PublishWindow(100, 0.5, POLICY)
    w.decide(connected=True, now=0.0, session=1)
    w.receipt_applied(receipt())
    w.offer(_rows(1, 2, 3))
    _publish_all(w, 0.0)
    w.resolved(w.epoch, 1, Outcome.ACKED, 0.0)
    w.resolved(w.epoch, 2, Outcome.ACKED, 0.0)
    w.resolved(w.epoch, 3, Outcome.LOST, 0.0)
    assert w.decide(connected=True, now=0.1, session=1) is Action.RESTART
    w.restart()
    assert w.decide(connected=True, now=0.2, session=2) is Action.WAIT  # new session: wait for its receipt
    w.receipt_applied(receipt(stored=1, head=1))
    assert w.decide(connected=True, now=0.3, session=2) is Action.PUBLISH
    w.offer(_rows(2, 3))  # 1 is deleted in the outbox; 2 waits for its receipt; 3 was lost: again
    assert _publish_all(w, 0.3) == [3]


def test_puback_mode_is_unchanged_by_sessions() -> None:
    w = PublishWindow(4, 0.5)
    assert w.decide(connected=True, now=0.0, session=1) is Action.PUBLISH
    w.offer(_rows(1))
    _publish_all(w, 0.0)
    assert w.resolved(w.epoch, 1, Outcome.ACKED, 0.0).delete


# -- the outbox -------------------------------------------------------------------------------------------------


def _outbox(tmp_path, n: int) -> Outbox:
    ob = Outbox(tmp_path / "o.sqlite", device_id=DEV, key=KEY, limits=DEFAULT_LIMITS)
    ob.seal_many([[ReadingRecord(channel=1, value=float(i), timestamp=time.time())] for i in range(n)])
    return ob


def _hash(ob: Outbox, counter: int) -> bytes:
    return ob._db().execute("SELECT hash FROM envelopes WHERE counter = ?", (counter,)).fetchone()[0]


def test_apply_receipt_deletes_exactly_what_it_covers_and_keeps_the_newest(tmp_path) -> None:
    ob = _outbox(tmp_path, 10)
    r = receipt(stored=3, head=8, holes=[(5, 6)], stored_hash=_hash(ob, 3), head_hash=_hash(ob, 8))
    data = sign_receipt(r, KEY)
    applied = ob.apply_receipt(r, data)
    assert (applied.deleted, applied.records, applied.kept) == (6, 6, True)
    assert [c for c, _ in ob.pending()] == [5, 6, 9, 10]
    assert ob.stats().backlog_envelopes == 4
    d = ob.delivery()
    assert (d.receipt, d.stored, d.head, d.receipted_envelopes, d.acked_envelopes) == (data, 3, 8, 6, 0)
    older = receipt(stored=3, head=3, stored_hash=_hash_or(r.stored_hash))
    assert not ob.apply_receipt(older, b"older").kept
    assert ob.delivery().receipt == data
    ob.close()
    reopened = Outbox(tmp_path / "o.sqlite", device_id=DEV, key=KEY, limits=DEFAULT_LIMITS)
    assert reopened.delivery().receipt == data and reopened.stats().backlog_envelopes == 4
    reopened.close()


def _hash_or(h: bytes) -> bytes:
    return h


def test_a_receipt_for_counters_never_sealed_deletes_nothing(tmp_path) -> None:
    ob = _outbox(tmp_path, 3)
    with pytest.raises(ReceiptMismatchError, match="sealed only 3"):
        ob.apply_receipt(receipt(stored=0, head=9, holes=[(1, 8)]), b"x")
    assert ob.stats().backlog_envelopes == 3


def test_a_receipt_naming_another_envelope_at_a_held_counter_deletes_nothing(tmp_path) -> None:
    ob = _outbox(tmp_path, 5)
    with pytest.raises(ReceiptMismatchError, match="another envelope"):
        ob.apply_receipt(receipt(stored=2, head=2, stored_hash=b"\x09" * 32), b"x")
    assert ob.stats().backlog_envelopes == 5


def test_schema_2_outbox_is_migrated_with_its_backlog(tmp_path) -> None:
    ob = _outbox(tmp_path, 4)
    ob.close()
    import sqlite3  # noqa: PLC0415

    with sqlite3.connect(tmp_path / "o.sqlite") as db:
        db.execute("DROP TABLE delivery")
        db.execute("PRAGMA user_version = 2")
    ob = Outbox(tmp_path / "o.sqlite", device_id=DEV, key=KEY, limits=DEFAULT_LIMITS)
    assert ob.stats().backlog_envelopes == 4 and ob.delivery().receipt is None
    ob.close()


def test_worked_example_in_docs_matches_the_generator() -> None:
    import re  # noqa: PLC0415
    import runpy  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    root = Path(__file__).resolve().parent.parent
    example = runpy.run_path(str(root / "tools" / "telemetry_example.py"))["example_receipt"]()
    text = (root / "docs" / "telemetry.md").read_text(encoding="utf-8")
    block = re.search(r"## 9\. Receipts.*?```text\n(.*?)```", text, re.S)
    assert block is not None
    assert bytes.fromhex("".join(block.group(1).split())) == example
    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")  # RFC 8032 TEST 1
    r = verify_receipt(example, Ed25519PrivateKey.from_private_bytes(seed).public_key(), "box-1")
    assert [c for c in range(40, 47) if r.covers(c)] == [40, 41, 42, 44, 45]
