"""The gateway's side of receipts, on both store backends: what ``delivery_states`` says a store holds, and the
receipts ``ReceiptIssuer`` signs from it (verified with the box's own verifier)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.errors import TransportError
from edge.fleet.receipts import ReceiptIssuer
from edge.wire.envelope import GENESIS_PREV
from edge.wire.receipts import MAX_HOLES, Receipt, verify_receipt

KEY = Ed25519PrivateKey.generate()


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def published(sent: list[tuple[str, bytes]], device: str) -> list[Receipt]:
    return [verify_receipt(p, KEY.public_key(), device) for t, p in sent if t == f"devices/{device}/receipts"]


def test_delivery_state_of_a_chain_with_holes(fleet, store) -> None:
    dev = fleet.device("box-1")
    envs = [dev.seal() for _ in range(9)]
    # 1..3, then 5, 7, 9: holes 4 and 6 and 8; then 6 arrives late.
    store.ingest([dev.msg(envs[i]) for i in (0, 1, 2, 4, 6, 8)])
    store.ingest([dev.msg(envs[5])])
    state = store.delivery_states(["box-1", "nobody"])["box-1"]
    assert (state.stored, state.head, state.missing) == (3, 9, ((4, 4), (8, 8)))
    assert state.head_hash == dev.prev and state.stored_hash != GENESIS_PREV
    assert "nobody" not in store.delivery_states(["nobody"])


def test_a_registered_box_without_envelopes_gets_a_genesis_state(fleet, store) -> None:
    fleet.device("box-2")
    state = store.delivery_states(["box-2"])["box-2"]
    assert (state.stored, state.head, state.stored_hash, state.missing) == (0, 0, GENESIS_PREV, ())


def test_first_envelope_above_one_leaves_the_lower_counters_undescribed_as_a_hole(fleet, store) -> None:
    dev = fleet.device("box-3")
    envs = [dev.seal() for _ in range(5)]
    store.ingest([dev.msg(envs[4])])  # shared subscriptions: counter 5 can be stored first
    state = store.delivery_states(["box-3"])["box-3"]
    assert (state.stored, state.head, state.missing) == (0, 5, ((1, 4),))


def test_issuer_signs_what_is_stored_and_nothing_more(fleet, store) -> None:
    dev = fleet.device("box-1")
    envs = [dev.seal() for _ in range(6)]
    store.ingest([dev.msg(envs[i]) for i in (0, 1, 3, 5)])
    sent: list[tuple[str, bytes]] = []
    issuer = ReceiptIssuer(KEY, "gw-1", lambda t, p: sent.append((t, p)), interval_s=0.0)
    issuer.note(["box-1", "stranger"])
    assert issuer.issue(store) == 1
    (r,) = published(sent, "box-1")
    assert [c for c in range(1, 8) if r.covers(c)] == [1, 2, 4, 6]
    assert r.gateway == "gw-1" and issuer.due_in() is None


def test_more_holes_than_a_receipt_lists_never_claim_a_missing_counter(fleet, store) -> None:
    dev = fleet.device("box-1")
    n = 2 * (MAX_HOLES + 5) + 1
    envs = [dev.seal() for _ in range(n)]
    store.ingest([dev.msg(envs[i]) for i in range(0, n, 2)])  # every even counter missing
    sent: list[tuple[str, bytes]] = []
    issuer = ReceiptIssuer(KEY, "gw", lambda t, p: sent.append((t, p)), interval_s=0.0)
    issuer.note(["box-1"])
    issuer.issue(store)
    (r,) = published(sent, "box-1")
    assert len(r.holes) == MAX_HOLES and r.head == n
    assert not any(r.covers(c) for c in range(2, n, 2))
    assert r.covers(n) and r.covers(1)


def test_one_receipt_per_interval_unless_asked_and_asking_is_bounded(fleet, store) -> None:
    dev = fleet.device("box-1")
    store.ingest([dev.msg(dev.seal())])
    clock = Clock()
    sent: list[tuple[str, bytes]] = []
    issuer = ReceiptIssuer(KEY, "gw", lambda t, p: sent.append((t, p)), interval_s=5.0, monotonic=clock)
    issuer.note(["box-1"])
    assert issuer.issue(store) == 1
    issuer.note(["box-1"])
    clock.t += 0.5
    assert issuer.issue(store) == 0 and issuer.due_in() == pytest.approx(4.5)
    issuer.note(["box-1"], force=True)  # the box asked (its birth): answered within a second, not five
    assert issuer.due_in() == pytest.approx(0.5)
    clock.t += 0.5
    assert issuer.issue(store) == 1
    for _ in range(100):  # a status flood: still one receipt a second
        issuer.note(["box-1"], force=True)
        assert issuer.issue(store) == 0
    clock.t += 1.0
    assert issuer.issue(store) == 1 and len(sent) == 3


def test_a_broker_that_is_down_keeps_the_box_pending(fleet, store) -> None:
    dev = fleet.device("box-1")
    store.ingest([dev.msg(dev.seal())])
    clock = Clock()
    up = False
    sent: list[tuple[str, bytes]] = []

    def publish(topic: str, payload: bytes) -> None:
        if not up:
            raise TransportError("not connected")
        sent.append((topic, payload))

    issuer = ReceiptIssuer(KEY, "gw", publish, interval_s=0.0, monotonic=clock)
    issuer.note(["box-1"])
    assert issuer.issue(store) == 0 and issuer.failures == 1
    up = True
    assert issuer.issue(store) == 0  # backing off
    clock.t += 1.0
    assert issuer.issue(store) == 1 and published(sent, "box-1")[0].head == 1


class _StatesOnly:
    """The one call of the store interface the issuer makes, answering fixed states."""

    def __init__(self, states: dict) -> None:
        self.states = states

    def delivery_states(self, device_ids):
        return {d: self.states[d] for d in device_ids if d in self.states}


def test_a_state_that_cannot_be_signed_holds_up_no_other_box() -> None:
    from edge.fleet.store import DeliveryState  # noqa: PLC0415

    h = b"\x01" * 32
    states = {"box-a": DeliveryState(5, h, 3, h, ()), "box-b": DeliveryState(2, h, 2, h, ())}  # a: stored > head
    sent: list[tuple[str, bytes]] = []
    issuer = ReceiptIssuer(KEY, "gw", lambda t, p: sent.append((t, p)), interval_s=0.0)
    issuer.note(["box-a", "box-b"])
    assert issuer.issue(_StatesOnly(states)) == 1
    assert published(sent, "box-b")[0].stored == 2 and not published(sent, "box-a")
    assert issuer.failures == 1 and issuer.due_in() is None
