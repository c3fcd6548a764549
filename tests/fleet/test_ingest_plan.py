"""The ingest rules alone (``edge.fleet.store._plan``): every verdict kind and every route, without a database.

The store's tests check that the plans are carried out (``test_store``, ``test_ingest_security``); these check what
the plans say: what each verdict stores, what it counts on whose ledger, what goes to quarantine and why.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.fleet.store import Inbound
from edge.fleet.store._batch import DeviceKey
from edge.fleet.store._checks import iso
from edge.fleet.store._plan import (
    CLEARED,
    QUARANTINE_PAYLOAD_BYTES,
    SUPERSEDED,
    IngestPlanner,
    Plan,
    event_rows,
    quarantine_row,
)
from edge.wire.chain import Verdict, VerdictKind
from edge.wire.records import ReadingRecord
from edge.wire.schema import DEFAULT_LIMITS, EventRecord, TelemetryLimits
from edge.wire.topics import topic_route

V = VerdictKind
T0 = 1_700_000_000.0
H = b"\x11" * 32
KEY = Ed25519PrivateKey.generate().public_key()

ACCEPTED = (V.FIRST, V.NEXT, V.GAP, V.LATE)
REJECTED = (V.FORKED, V.STALE, V.BAD_SIGNATURE, V.UNKNOWN_DEVICE, V.WRONG_TOPIC, V.MALFORMED)


class Registry:
    """The registered devices as a dict; remembers which ids the planner read."""

    def __init__(self, **devices: DeviceKey) -> None:
        self.devices = devices
        self.reads: list[str] = []

    def device(self, device_id: str) -> DeviceKey | None:
        self.reads.append(device_id)
        return self.devices.get(device_id)


def registered(revoked_at: float | None = None) -> DeviceKey:
    return DeviceKey(KEY, revoked_at, T0 - 86400)


def planner(registry: Registry | None = None, limits: TelemetryLimits = DEFAULT_LIMITS) -> IngestPlanner:
    return IngestPlanner(registry if registry is not None else Registry(cam_a=registered()), limits)


def verdict(kind: VerdictKind, device_id: str | None = "cam_a", reason: str = "why") -> Verdict:
    return Verdict(kind, reason, device_id, 7, H)


def test_every_verdict_kind_is_planned_here():
    assert {*ACCEPTED, V.DUPLICATE, *REJECTED} == set(VerdictKind)


# ------------------------------------------------------------------------------------------------ telemetry


@pytest.mark.parametrize("kind", ACCEPTED)
def test_accepted_verdict_stores_the_envelope_and_quarantines_nothing(kind):
    plan = planner().telemetry(verdict(kind), "cam_a", T0)
    assert (plan.accept, plan.stored, plan.outcome) == (True, True, kind.value)
    assert plan.late is (kind is V.LATE)
    assert (plan.count, plan.quarantine, plan.verdict, plan.supersedes) == (None, None, None, None)


@pytest.mark.parametrize("kind", [*ACCEPTED, V.DUPLICATE])
def test_common_path_plans_are_shared_and_read_no_device(kind):
    reg = Registry(cam_a=registered())
    p = planner(reg)
    first = p.telemetry(verdict(kind), "cam_a", T0)
    assert p.telemetry(verdict(kind, reason="another"), "cam_a", T0 + 1) is first
    assert reg.reads == []


def test_duplicate_is_stored_already_and_counted_not_quarantined():
    plan = planner().telemetry(verdict(V.DUPLICATE), "cam_a", T0)
    assert (plan.accept, plan.stored, plan.outcome) == (False, True, "duplicate")
    assert (plan.count, plan.quarantine) == ("duplicates", None)


@pytest.mark.parametrize("kind", REJECTED)
def test_rejected_verdict_is_quarantined_with_its_kind_reason_and_hash(kind):
    v = verdict(kind)
    plan = planner().telemetry(v, "cam_a", T0)
    assert (plan.accept, plan.stored, plan.outcome) == (False, False, kind.value)
    assert (plan.quarantine, plan.reason, plan.envelope_hash) == (kind.value, "why", H)
    assert plan.count == "rejects"
    assert plan.verdict == v and plan.keep == QUARANTINE_PAYLOAD_BYTES


@pytest.mark.parametrize("kind", REJECTED)
def test_rejects_on_a_strangers_topic_are_quarantined_not_counted(kind):
    plan = planner(Registry()).telemetry(verdict(kind, device_id="ghost"), "ghost", T0)
    assert plan.quarantine == kind.value and plan.count is None


def test_forgery_naming_another_box_counts_against_the_topics_box():
    reg = Registry(cam_a=registered(), cam_b=registered())
    plan = planner(reg).telemetry(verdict(V.WRONG_TOPIC, device_id="cam_b"), "cam_a", T0)
    assert plan.count == "rejects" and reg.reads == ["cam_a"]
    assert plan.reason == "why (the envelope names 'cam_b')"


def test_malformed_envelope_without_a_kid_keeps_its_reason():
    plan = planner().telemetry(Verdict(V.MALFORMED, "truncated", None), "cam_a", T0)
    assert (plan.reason, plan.envelope_hash, plan.count) == ("truncated", None, "rejects")


def test_revoked_device_reason_says_revoked_and_when():
    reg = Registry(cam_a=registered(revoked_at=T0 - 60))
    v = verdict(V.UNKNOWN_DEVICE, reason="no key for device 'cam_a'")
    plan = planner(reg).telemetry(v, "cam_a", T0)
    expected = f"device 'cam_a' was revoked at {iso(T0 - 60)}; envelope received at {iso(T0)}"
    assert plan.reason == expected
    assert plan.verdict == dataclasses.replace(v, reason=expected)
    assert plan.count == "rejects"  # a revoked device is still registered: its rejects are on its ledger


def test_revoked_kid_on_another_boxs_topic_names_the_kid():
    reg = Registry(cam_a=registered(), cam_b=registered(revoked_at=T0 - 60))
    plan = planner(reg).telemetry(verdict(V.UNKNOWN_DEVICE, device_id="cam_b"), "cam_a", T0)
    assert plan.reason.startswith("device 'cam_b' was revoked at ")
    assert plan.reason.endswith(" (the envelope names 'cam_b')")


def test_unregistered_device_reason_is_the_verifiers():
    v = verdict(V.UNKNOWN_DEVICE, device_id="ghost", reason="no key for device 'ghost'")
    plan = planner(Registry()).telemetry(v, "ghost", T0)
    assert (plan.reason, plan.verdict, plan.count) == ("no key for device 'ghost'", v, None)


def test_unknown_device_that_is_registered_and_not_revoked_keeps_the_reason():
    plan = planner().telemetry(verdict(V.UNKNOWN_DEVICE), "cam_a", T0)
    assert plan.reason == "why"


# ------------------------------------------------------------------------------------------------- routes


@pytest.mark.parametrize(
    ("topic", "route"),
    [
        ("devices/cam_a/telemetry", ("telemetry", "cam_a")),
        ("devices/cam_a/status", ("status", "cam_a")),
        ("devices/cam_a/replies", ("other", "cam_a")),
        ("devices/cam_a/telemetry/x", ("other", "cam_a")),
        ("devices/bad id/telemetry", ("other", None)),
        ("devices/bad id/status", ("other", None)),
        ("sensors/cam_a/telemetry", ("other", None)),
        ("", ("other", None)),
    ],
)
def test_topic_routes(topic, route):
    assert topic_route(topic) == route


@pytest.mark.parametrize(
    ("topic", "who", "count"),
    [
        ("devices/cam_a/replies", "cam_a", "rejects"),
        ("devices/ghost/replies", "ghost", None),
        ("sensors/cam_a/telemetry", None, None),
    ],
)
def test_other_topic_is_wrong_topic_unverified(topic, who, count):
    data = b"\xd2\x84" + b"x" * 100
    plan = planner().other(topic, data, topic_route(topic)[1])
    assert (plan.stored, plan.outcome, plan.quarantine, plan.count) == (False, "wrong_topic", "wrong_topic", count)
    assert plan.reason == f"topic {topic!r} is not devices/<device id>/telemetry or /status"
    assert plan.envelope_hash is not None and plan.verdict is not None
    assert (plan.verdict.kind, plan.verdict.device_id, plan.verdict.reason) == (V.WRONG_TOPIC, None, plan.reason)


def test_other_topic_input_over_the_limit_or_not_bytes_gets_no_hash():
    limits = TelemetryLimits(max_envelope_bytes=256)
    p = planner(limits=limits)
    assert p.other("x", b"a" * 256, None).envelope_hash is not None
    assert p.other("x", b"a" * 257, None).envelope_hash is None
    assert p.other("x", "text", None).envelope_hash is None


def test_other_topic_reason_bounds_the_topic():
    plan = planner().other("t" * 5000, b"", None)
    assert len(plan.reason) < 200


# ------------------------------------------------------------------------------------------------- status


def test_status_is_recorded_and_the_last_of_a_device_wins():
    p = planner()
    assert p.status(0, "cam_a", b'{"state":"online","n":0}', T0).outcome == "recorded"
    second = p.status(1, "cam_b", b'{"state":"online"}', T0)
    third = p.status(2, "cam_a", b'{"state":"offline","n":2}', T0 + 1)
    assert (second.stored, second.outcome, second.supersedes) == (True, "recorded", None)
    assert (third.stored, third.outcome, third.supersedes) == (True, "recorded", 0)
    assert (third.count, third.quarantine, third.accept) == (None, None, False)
    rows = p.statuses()
    assert [dev for dev, _row in rows] == ["cam_a", "cam_b"]
    assert (rows[0][1].state, json.loads(rows[0][1].info)) == ("offline", {"state": "offline", "n": 2})
    assert (SUPERSEDED.stored, SUPERSEDED.outcome) == (True, "superseded")


def test_empty_status_clears_and_supersedes_nothing():
    p = planner()
    p.status(0, "cam_a", b'{"state":"online"}', T0)
    assert p.status(1, "cam_a", b"", T0) is CLEARED
    assert (CLEARED.stored, CLEARED.outcome, CLEARED.quarantine) == (True, "cleared", None)
    assert p.status(2, "cam_a", b'{"state":"online"}', T0).supersedes == 0


@pytest.mark.parametrize(("device", "count"), [("cam_a", "rejects"), ("ghost", None)])
@pytest.mark.parametrize("payload", [b"[1, 2]", b"\xff", b"{" * 100, b"x" * 20000])
def test_hostile_status_is_quarantined_malformed(device, count, payload):
    p = planner()
    plan = p.status(0, device, payload, T0)
    assert (plan.stored, plan.outcome, plan.quarantine, plan.count) == (False, "malformed", "malformed", count)
    assert plan.reason.startswith("status: ") and plan.envelope_hash is None and plan.verdict is None
    assert p.statuses() == []


def test_status_does_not_read_the_registry_unless_rejected():
    reg = Registry()
    planner(reg).status(0, "cam_a", b'{"state":"online"}', T0)
    assert reg.reads == []


# -------------------------------------------------------------------------------------------------- held


def test_held_message_keeps_its_whole_payload_and_counts_a_reject():
    limits = TelemetryLimits(max_envelope_bytes=256)
    p = planner(limits=limits)
    plan = p.held("cam_a", b"a" * 200, "shed", "queue full")
    assert (plan.stored, plan.outcome, plan.quarantine, plan.reason) == (False, "shed", "shed", "queue full")
    assert (plan.count, plan.keep) == ("rejects", 256) and plan.envelope_hash is not None
    assert p.held("cam_a", b"a" * 257, "shed", "x").envelope_hash is None
    assert p.held(None, b"", "shed", "x").count is None
    # What is not bytes is kept as no bytes, hashed as such.
    assert p.held("cam_a", "text", "shed", "x").envelope_hash == p.held("cam_a", b"", "shed", "x").envelope_hash


# ------------------------------------------------------------------------------------------------- rows


def test_quarantine_row_bounds_and_escapes_text():
    plan = Plan(stored=False, outcome="malformed", quarantine="malformed", reason="r\x00" * 1000, envelope_hash=H)
    msg = Inbound("devices/\x00/" + "t" * 2000, b"p" * (QUARANTINE_PAYLOAD_BYTES + 10), T0)
    at, topic, dev, kind, reason, size, h, data = quarantine_row(msg, None, plan)
    assert (at, dev, kind, size, h) == (T0, None, "malformed", QUARANTINE_PAYLOAD_BYTES + 10, H)
    # Bounded first, then escaped: a NUL is four characters in the column.
    assert topic == "devices/\\x00/" + "t" * (1024 - 10)
    assert reason == "r\\x00" * 512
    assert data == b"p" * QUARANTINE_PAYLOAD_BYTES


def test_quarantine_row_of_input_that_is_not_bytes_or_text():
    plan = Plan(stored=False, outcome="malformed", quarantine="malformed", reason="r", keep=10)
    row = quarantine_row(Inbound(42, "text", 1), "cam_a", plan)  # type: ignore[arg-type]
    assert row == (1.0, "42", "cam_a", "malformed", "r", 0, None, b"")


def test_event_rows_are_the_event_records_at_their_index():
    records = [
        ReadingRecord(channel=0, value=1.0, timestamp=T0),
        EventRecord(T0 + 1, "ota.committed", {"b": b"\x01\x02", "a": 1}),
        EventRecord(T0 + 2, "outbox.dropped", {}),
    ]
    assert event_rows("cam_a", 5, T0 + 9, records) == [
        ("cam_a", 5, 1, T0 + 1, T0 + 9, "ota.committed", '{"a": 1, "b": "0102"}'),
        ("cam_a", 5, 2, T0 + 2, T0 + 9, "outbox.dropped", "{}"),
    ]
    assert event_rows("cam_a", 5, T0, records[:1]) == []


def test_plans_are_frozen():
    plan = planner().telemetry(verdict(V.NEXT), "cam_a", T0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.accept = False  # type: ignore[misc]
