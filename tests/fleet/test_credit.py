"""The ledger counts work, not messages: every way a box could be credited for work it did not do, one test each.

The rules are ``edge.fleet.credit``'s; they are tested sans-IO first, then through the real store on SQLite and
PostgreSQL, where claims made by concurrent transactions must still credit every input once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading

import pytest

from edge.fleet.credit import HOUR_S, BatchCredits, CreditRules, Owner, claim_key
from edge.fleet.store import open_store
from edge.wire.records import InferenceRecord

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
MIDNIGHT = 1_700_006_400.0
DAY0 = "2023-11-14"
RULES = CreditRules(ceiling_per_s=1000.0)
ENROLLED = T0 - 86400


def inf(input_tag: str, *, ts: float = T0, model: str = "digits@1.0.0") -> InferenceRecord:
    return InferenceRecord(
        seq=0,
        timestamp=ts,
        model_id=model,
        model_sha256="11" * 32,
        input_sha256=hashlib.sha256(input_tag.encode()).hexdigest(),
        pixel_format="GRAY8",
        top_k=((3, 0.75),),
        score=None,
        label=None,
        preprocess_us=1,
        inference_us=1,
        latency_us=1,
        backend="numpy",
    )


def outcomes(resolution, device="cam-a"):
    return {o: n for (dev, _day, _m, o), n in resolution.tally.items() if dev == device}


# ------------------------------------------------------------------------------------------------------ sans-IO


def test_same_input_twice_in_one_envelope_is_credited_once():
    plan = BatchCredits(RULES)
    plan.add("cam-a", 1, DAY0, T0, ENROLLED, [inf("x"), inf("x"), inf("y")])
    assert len(plan.keys()) == 2 and len(plan.new_claims(None)) == 2  # the second x claims nothing of its own
    res = plan.resolve(None, {})
    assert outcomes(res) == {"credited": 2, "duplicate_input": 1}
    assert json.loads(res.exceptions["cam-a", 1]) == {"duplicate_input": [1]}


def test_input_claimed_before_is_a_duplicate_for_its_owner_and_a_copy_for_others():
    plan = BatchCredits(RULES)
    plan.add("cam-a", 5, DAY0, T0, ENROLLED, [inf("x")])
    plan.add("cam-b", 9, DAY0, T0, ENROLLED, [inf("y")])
    kx = claim_key("digits@1.0.0", inf("x").input_sha256)
    ky = claim_key("digits@1.0.0", inf("y").input_sha256)
    owners = {
        kx: Owner("cam-a", 2),  # cam-a claimed x in an earlier envelope
        ky: Owner("cam-c", 1),  # cam-c claimed y first
    }
    res = plan.resolve(owners, {})
    assert outcomes(res, "cam-a") == {"duplicate_input": 1}
    assert outcomes(res, "cam-b") == {"copied": 1}
    assert json.loads(res.exceptions["cam-b", 9]) == {"copied": [[0, "cam-c"]]}


def test_two_boxes_claiming_one_input_in_one_batch_first_is_credited():
    plan = BatchCredits(RULES)
    plan.add("cam-a", 1, DAY0, T0, ENROLLED, [inf("x")])
    plan.add("cam-b", 1, DAY0, T0, ENROLLED, [inf("x"), inf("x")])
    claims = plan.new_claims(None)
    assert (list(claims.devices), len(claims)) == (["cam-a"], 1)
    res = plan.resolve(None, {})
    assert outcomes(res, "cam-a") == {"credited": 1}
    assert outcomes(res, "cam-b") == {"copied": 2}


@pytest.mark.parametrize(
    ("ts", "received", "plausible"),
    [
        (T0, T0, True),
        (T0 + 600, T0, True),  # a clock up to max_ahead_s fast
        (T0 + 601, T0, False),  # from the future
        (T0 - 30 * 86400, T0, False),  # before enrollment (a day ago)
        (ENROLLED - 600, ENROLLED + 30 * 86400 - 1, True),  # a backlog of 30 days, enrolled 30 days ago
        (ENROLLED + 3600, ENROLLED + 31 * 86400, False),  # older than max_age_s
        (0.0, T0, False),  # a box clock in 1970
    ],
)
def test_implausible_times_are_not_credited(ts, received, plausible):
    plan = BatchCredits(RULES)
    plan.add("cam-a", 1, DAY0, received, ENROLLED, [inf("x", ts=ts)])
    res = plan.resolve(None, {})
    assert outcomes(res) == ({"credited": 1} if plausible else {"implausible_time": 1})
    assert (len(plan.keys()) == 1) is plausible  # an implausible record claims nothing


def test_ceiling_per_hour_of_the_box_timeline():
    rules = CreditRules(ceiling_per_s=1 / 1800, ceilings={"digits": 2 / 3600})  # per name: 2 an hour
    assert rules.hourly_cap("digits@9.9.9") == 2 and rules.hourly_cap("other@1") == 2
    plan = BatchCredits(rules)
    hour = int(T0 // HOUR_S)
    base = hour * HOUR_S
    plan.add("cam-a", 1, DAY0, base + 3000, ENROLLED, [inf(f"i{i}", ts=base + i) for i in range(4)])
    plan.add("cam-a", 2, DAY0, base + 3000, ENROLLED, [inf("next-hour", ts=base - 1)])  # the hour before
    res = plan.resolve(None, {("cam-a", "digits@1.0.0", hour): (1, 2)})  # one credited earlier, cap 2
    assert outcomes(res) == {"credited": 2, "over_ceiling": 3}
    assert json.loads(res.exceptions["cam-a", 1]) == {"over_ceiling": [1, 2, 3]}
    assert res.hours == [("cam-a", "digits@1.0.0", hour - 1, 1, 2), ("cam-a", "digits@1.0.0", hour, 1, 2)]


# --------------------------------------------------------------------------------------------------- the store


def test_resent_records_and_replayed_inputs_are_duplicates_across_batches(store, fleet):
    a = fleet.device("cam-a")
    recs = a.inferences(10)
    store.ingest([a.msg(a.seal(records=recs), T0)])
    store.ingest([a.msg(a.seal(records=recs[:4] + a.inferences(2)), T0 + 5)])  # 4 re-sent among 2 new
    (row,) = store.ledger()
    assert (row.claimed, row.credited) == (16, 12)
    assert row.uncredited() == {"duplicate_input": 4, "copied": 0, "over_ceiling": 0, "implausible_time": 0}
    second = list(store.envelopes("cam-a"))[1]
    assert json.loads(second.credit) == {"duplicate_input": [0, 1, 2, 3]}


def test_copied_inputs_flagged_first_verified_claimant_credited(store, fleet):
    a, b = fleet.device("cam-a"), fleet.device("cam-b")
    recs = a.inferences(5)
    store.ingest([a.msg(a.seal(records=recs), T0)])
    store.ingest([b.msg(b.seal(records=[dataclasses.replace(r, timestamp=T0 + 1) for r in recs]), T0 + 1)])
    rows = {r.device_id: r for r in store.ledger()}
    assert (rows["cam-a"].credited, rows["cam-b"].credited) == (5, 0)
    assert rows["cam-b"].uncredited()["copied"] == 5
    assert json.loads(next(store.envelopes("cam-b")).credit) == {"copied": [[i, "cam-a"] for i in range(5)]}


def test_claimed_throughput_beyond_the_model_flagged(store_url, make_fleet):
    store = open_store(store_url, rules=CreditRules(ceiling_per_s=1000.0, ceilings={"digits": 10 / 3600}))
    try:
        a = make_fleet(store).device("cam-a")
        hour = int(T0 // HOUR_S) * HOUR_S
        recs = [dataclasses.replace(r, timestamp=hour + i) for i, r in enumerate(a.inferences(25))]
        store.ingest([a.msg(a.seal(records=recs[:12]), T0), a.msg(a.seal(records=recs[12:]), T0 + 1)])
        (row,) = store.ledger()
        assert (row.claimed, row.credited, row.uncredited()["over_ceiling"]) == (25, 10, 15)
        # Other models keep their own ceiling (the default here).
        store.ingest([a.msg(a.seal_inferences(30, "yolo@1"), T0 + 2)])
        assert store.ledger()[0].credits["yolo@1"] == {"credited": 30}
    finally:
        store.close()


def test_box_clock_far_off_earns_nothing_but_its_envelopes_are_kept(store, fleet):
    a = fleet.device("cam-a")
    recs = [dataclasses.replace(r, timestamp=1.0) for r in a.inferences(3)]  # an RTC-less box in 1970
    (res,) = store.ingest([a.msg(a.seal(records=recs), T0)])
    assert res.verdict.accepted  # authentic data: stored, re-verifiable
    (row,) = store.ledger()
    assert (row.claimed, row.credited, row.uncredited()["implausible_time"]) == (3, 0, 3)


def _claim_race(url, devices, barrier, out):
    store = open_store(url)
    try:
        barrier.wait(10)
        out.extend(store.ingest([d.msg(d.seal(records=d.shared), T0) for d in devices]))
    finally:
        store.close()


@pytest.mark.parametrize("backend", ["postgresql"])
def test_concurrent_gateways_credit_each_input_once(store, store_url, fleet, backend):
    """Two gateway processes (two connections) take claims on the same inputs at the same moment."""
    devices = [fleet.device(f"cam-{i}") for i in range(8)]
    shared = [inf(f"frame-{i}") for i in range(200)]
    for i, d in enumerate(devices):
        d.shared = [dataclasses.replace(r, seq=i) for r in shared]
    barrier = threading.Barrier(2)
    results: list[object] = []
    threads = [threading.Thread(target=_claim_race, args=(store_url, devices[k::2], barrier, results)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 8 and all(r.verdict.accepted for r in results)
    rows = store.ledger()
    assert sum(r.credited for r in rows) == 200  # every input once, whichever box won it
    assert sum(r.uncredited()["copied"] for r in rows) == 7 * 200


def test_ledger_sums_exact_and_bounded_whatever_loss_notices_claim(store, fleet, raw):
    """Loss notices at the contract's bounds, repeated: the sums stay exact integers, equal on both backends."""
    from edge.wire.envelope import envelope_hash, seal_envelope  # noqa: PLC0415
    from edge.wire.schema import LossNotice  # noqa: PLC0415

    a = fleet.device("cam-a")
    top = 2**53 - 100

    def seal(records):
        data = seal_envelope(a.id, a.counter + 1, a.prev, records, T0, a.key)
        a.counter, a.prev = a.counter + 1, envelope_hash(data)
        return data

    msgs = [a.msg(seal([]), T0)]
    a.counter = top - 1  # the box "dropped" counters 2 .. top - 1 and says so, again and again
    for i in range(20):
        notice = LossNotice(T0, top - 2, (top - 2) * 1000, 2, top - 1)  # 1000 records each: the contract's most
        msgs.append(a.msg(seal([notice]), T0 + 1 + i))
    store.ingest(msgs)
    store.ingest([a.msg(seal([LossNotice(T0, 1, 1000, top + 19, top + 19)]), MIDNIGHT)])
    rows = store.ledger()
    assert [r.announced_lost for r in rows] == [top - 2, 1]  # each dropped counter once, however often announced
    assert [r.announced_lost_records for r in rows] == [(top - 2) * 1000, 1000]
    stored = raw("SELECT announced_lost, announced_lost_records FROM ledger ORDER BY day")
    assert [tuple(map(type, r)) for r in stored] == [(int, int)] * 2  # integers, never floats
    assert max(v for r in stored for v in r) < 2**63


def test_store_migrates_a_version_1_database(store_url, fleet, make_fleet, raw):
    """A gateway upgraded in place: its old days keep their credit, new work is credited by the new rules."""
    from edge.fleet.store import _sql  # noqa: PLC0415

    # Rebuild the database as version 1 had it: drop what version 2 added, then reopen.
    store = fleet.store
    a = fleet.device("cam-a")
    store.ingest([a.msg(a.seal_inferences(3), T0)])
    store.close()
    for table in ("claim_log", "ledger_credits", "credit_hours"):
        raw(f"DROP TABLE {table}")
    for t, c in (
        ("chains", "lost_mark"),
        ("ledger", "announced_lost_records"),
        ("envelopes", "credit"),
        ("ledger_inferences", "credited"),
    ):
        raw(f"ALTER TABLE {t} DROP COLUMN {c}")
    raw("DELETE FROM schema_version WHERE version > 1")
    again = open_store(store_url)
    try:
        assert raw("SELECT MAX(version) FROM schema_version")[0][0] == _sql.SCHEMA_VERSION
        (row,) = again.ledger()
        assert (row.claimed, row.credited) == (3, 3)  # version 1 credited what it counted
        again.ingest([a.msg(a.seal_inferences(2), T0 + 1)])
        assert again.ledger()[0].credited == 5
    finally:
        again.close()
