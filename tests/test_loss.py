"""The sans-IO loss arithmetic: sequences of drops -> the notices that announce them, and what the ledger counts."""

from __future__ import annotations

import cbor2
import pytest

from edge.fleet.store._batch import ChainRow
from edge.telemetry.loss import Loss, PendingLoss, merge
from edge.wire.errors import MalformedRecordError
from edge.wire.schema import MAX_UNSEALED_RECORDS, LossNotice, decode_record, encode_record

T = 1_790_000_000.0


def test_outbox_drops_then_carried_notice_merge_into_one_range() -> None:
    first = Loss.of_envelopes(3, 4, envelopes=2, records=7)
    carried = Loss.from_notice(LossNotice(T, 1, 5, 1, 1))  # the dropped envelope 3 had announced counter 1
    assert first.merge(carried).notice(T) == LossNotice(T, 3, 12, 1, 4)


def test_sink_drops_join_the_outbox_notice_without_a_range() -> None:
    outbox = Loss.of_envelopes(9, 9, envelopes=1, records=100)
    sink = Loss.of_unsealed(250)
    assert merge(sink, outbox) == merge(outbox, sink) == Loss(1, 100, 9, 9, 250)
    assert sink.notice(T) == LossNotice(T, 0, 0, 0, 0, unsealed_records=250)


def test_nothing_dropped_announces_nothing() -> None:
    assert merge(None, None) is None and merge(Loss(), None) is None and merge(None, Loss()) is None
    with pytest.raises(ValueError, match="nothing to announce"):
        Loss().notice(T)


@pytest.mark.parametrize(
    "args",
    [
        {"envelopes": 3, "records": 0, "first": 5, "last": 6},  # three envelopes cannot lie in two counters
        {"envelopes": 0, "records": 4},  # records of no envelope
        {"unsealed": -1},
    ],
)
def test_impossible_losses_refused(args: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=r"envelopes|records|negative"):
        Loss(**args)


def test_more_unsealed_than_one_notice_holds_is_split_not_capped() -> None:
    loss = Loss(1, 10, 2, 2, MAX_UNSEALED_RECORDS + 5)
    with pytest.raises(ValueError, match="one notice holds"):
        loss.notice(T)
    head, rest = loss.split()
    assert head.notice(T) == LossNotice(T, 1, 10, 2, 2, MAX_UNSEALED_RECORDS)
    assert rest == Loss.of_unsealed(5)


def test_pending_loss_offers_in_pieces_and_keeps_what_was_not_committed() -> None:
    pending = PendingLoss()
    assert pending.offer() == 0
    pending.drop(400)
    pending.drop(MAX_UNSEALED_RECORDS)
    assert pending.offer() == MAX_UNSEALED_RECORDS
    # The seal failed: nothing announced, nothing forgotten.
    assert pending.records == MAX_UNSEALED_RECORDS + 400
    pending.announced(pending.offer())
    assert pending.offer() == 400
    pending.announced(400)
    assert pending.records == 0
    with pytest.raises(ValueError, match="announced"):
        pending.announced(1)


def test_unsealed_notice_round_trips_and_old_notices_decode_unchanged() -> None:
    new = LossNotice(T, 0, 0, 0, 0, unsealed_records=7)
    assert decode_record(encode_record(new)) == new
    old = cbor2.dumps({0: 3, 1: T, 2: 2, 3: 9, 4: 4, 5: 5}, canonical=True)  # a notice from before key 6
    assert decode_record(old) == LossNotice(T, 2, 9, 4, 5)
    assert encode_record(LossNotice(T, 2, 9, 4, 5)) == old  # key 6 is omitted when 0: one encoding


@pytest.mark.parametrize(
    ("item", "match"),
    [
        ({0: 3, 1: T, 2: 0, 3: 0, 4: 0, 5: 0}, "envelopes"),  # announces nothing
        ({0: 3, 1: T, 2: 1, 3: 0, 4: 1, 5: 1, 6: 0}, "unsealed_records"),  # 0 must be absent
        ({0: 3, 1: T, 2: 0, 3: 0, 4: 2, 5: 3, 6: 1}, "must be 0..0"),  # a range without envelopes
        ({0: 3, 1: T, 2: 0, 3: 5, 4: 0, 5: 0, 6: 1}, "records_dropped"),  # records without envelopes
        ({0: 3, 1: T, 2: 0, 3: 0, 4: 0, 5: 0, 6: MAX_UNSEALED_RECORDS + 1}, "unsealed_records"),
    ],
)
def test_malformed_unsealed_notices_rejected(item: dict[int, object], match: str) -> None:
    with pytest.raises(MalformedRecordError, match=match):
        decode_record(cbor2.dumps(item, canonical=True))


def test_ledger_counts_unsealed_records_in_full_and_ranges_once() -> None:
    chain = ChainRow(None, 0, None)
    assert chain.announce(LossNotice(T, 0, 0, 0, 0, 300)) == (0, 300)
    assert chain.announce(LossNotice(T, 2, 20, 1, 2, 5)) == (2, 25)
    # A notice over counters already announced adds only its unsealed records.
    assert chain.announce(LossNotice(T, 1, 10, 2, 2, 4)) == (0, 4)
    assert chain.announce(LossNotice(T, 1, 10, 2, 2)) == (0, 0)
