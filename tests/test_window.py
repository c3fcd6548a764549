"""The publisher's window (``edge.telemetry.window``) driven by sequences of events, without threads, broker or clock.

``Sim`` plays the publisher's part the way ``Publisher`` does: it reads a dict outbox after the window's cursor,
publishes what ``next`` returns, keeps the deliveries the broker has not resolved, queues the deletions the window
hands out and commits them (optionally not before a restart, as when the outbox is failing).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.mqtt import NO_MATCHING_SUBSCRIBERS
from edge.telemetry.window import READ_MIN, Action, Outcome, PublishWindow, Resolution

ACKED, UNHEARD, REFUSED, LOST = Outcome.ACKED, Outcome.UNHEARD, Outcome.REFUSED, Outcome.LOST


class Sim:
    """A driver of ``PublishWindow`` over a dict outbox and a list of unresolved deliveries."""

    def __init__(self, n: int = 0, *, window: int = 4, receive_maximum: int = 65535, pause: float = 1.0) -> None:
        self.core = PublishWindow(window, pause)
        self.receive_maximum = receive_maximum
        self.outbox: dict[int, bytes] = {}
        self.next_counter = 1
        self.add(n)
        self.connected = True
        self.now = 0.0
        self.pending: list[tuple[int, int]] = []  # (epoch, counter) of deliveries not resolved
        self.sent: list[tuple[int, int]] = []  # (epoch, counter) of every publication
        self.to_commit: list[int] = []
        self.deleted: list[int] = []  # every deletion the window handed out, in order
        self.acked: set[int] = set()  # counters that got an ACKED outcome at least once

    def add(self, n: int) -> None:
        for _ in range(n):
            self.outbox[self.next_counter] = b"env-%d" % self.next_counter
            self.next_counter += 1

    def fill(self) -> None:
        """What ``Publisher._fill`` does, the outbox read to its end each time the queue runs dry."""
        core = self.core
        core.limit(self.receive_maximum)
        while True:
            nxt = core.next()
            if nxt is None:
                want = core.wants()
                if not want:
                    return
                rows = [(c, self.outbox[c]) for c in sorted(self.outbox) if c > core.cursor][:want]
                if not rows:
                    return
                core.offer(rows)
                continue
            counter, data = nxt
            assert data == b"env-%d" % counter
            epoch = core.published(counter)
            self.pending.append((epoch, counter))
            self.sent.append((epoch, counter))
            assert core.in_flight <= core.capacity

    def step(self, *, flush: bool = True) -> Action:
        """One round of ``Publisher._step``: decide, then restart (and commit, unless ``flush`` is false) or fill."""
        action = self.core.decide(connected=self.connected, now=self.now)
        if action is Action.RESTART:
            self.core.restart()
            if flush:
                self.commit()
        elif action is Action.PUBLISH:
            self.fill()
        return action

    def resolve(self, counter: int, outcome: Outcome, *, epoch: int | None = None) -> Resolution:
        """The broker resolves the oldest unresolved delivery of ``counter`` (of ``epoch`` if given)."""
        i = next(i for i, (e, c) in enumerate(self.pending) if c == counter and epoch in (None, e))
        e, c = self.pending.pop(i)
        return self._apply(e, c, outcome)

    def _apply(self, epoch: int, counter: int, outcome: Outcome) -> Resolution:
        r = self.core.resolved(epoch, counter, outcome, self.now)
        if outcome is ACKED:
            self.acked.add(counter)
        if r.delete:
            assert outcome is ACKED, "only an acknowledgement deletes"
            assert counter not in self.deleted, f"{counter} deleted twice"
            self.deleted.append(counter)
            self.to_commit.append(counter)
        return r

    def drop(self) -> None:
        """The connection ends: every unresolved delivery fails, as ``MqttTransport`` does."""
        self.connected = False
        pending, self.pending = self.pending, []
        for e, c in pending:
            self._apply(e, c, LOST)

    def commit(self) -> None:
        """The acker's group commit: the outbox deletes the queued counters."""
        for c in self.to_commit:
            assert c in self.outbox, f"{c} deleted from the outbox twice"
            del self.outbox[c]
        self.core.committed(self.to_commit)
        self.to_commit = []

    def published_in(self, epoch: int) -> list[int]:
        return [c for e, c in self.sent if e == epoch]


# -- classification -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ok", "reason_code", "lost", "outcome"),
    [
        (True, 0, False, ACKED),
        (True, NO_MATCHING_SUBSCRIBERS, False, UNHEARD),
        (False, 0x87, False, REFUSED),
        (False, 0x97, False, REFUSED),
        (False, None, True, LOST),
    ],
)
def test_a_delivery_is_classified_by_its_puback(
    ok: bool, reason_code: int | None, lost: bool, outcome: Outcome
) -> None:
    assert Outcome.of(ok=ok, reason_code=reason_code, lost=lost) is outcome


def test_invalid_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="window"):
        PublishWindow(0, 1.0)
    with pytest.raises(ValueError, match="refusal_pause"):
        PublishWindow(1, -0.1)


# -- order and window -----------------------------------------------------------------------------------------------


def test_publishes_in_counter_order_and_a_full_window_stops_publishing() -> None:
    sim = Sim(10, window=4)
    assert sim.step() is Action.PUBLISH
    assert sim.published_in(0) == [1, 2, 3, 4]
    assert sim.core.next() is None and sim.core.wants() == 0, "a full window neither publishes nor reads"
    assert (sim.core.in_flight, sim.core.queued) == (4, 6)
    sim.step()
    assert sim.published_in(0) == [1, 2, 3, 4], "nothing more while nothing resolved"
    assert sim.resolve(1, ACKED).delete
    sim.step()
    assert sim.published_in(0) == [1, 2, 3, 4, 5], "one slot freed, one envelope published"


def test_the_window_is_capped_by_the_receive_maximum_and_never_below_one() -> None:
    sim = Sim(10, window=8, receive_maximum=3)
    sim.step()
    assert sim.core.in_flight == 3 and sim.core.capacity == 3
    sim.receive_maximum = 0
    for c in (1, 2, 3):
        sim.resolve(c, ACKED)
    sim.step()
    assert sim.core.capacity == 1 and sim.published_in(0) == [1, 2, 3, 4]


def test_reads_at_least_read_min_and_refills_by_a_quarter() -> None:
    core = PublishWindow(1000, 1.0)
    assert core.limit(12) == 12 and core.wants() == READ_MIN and core.refill_at == 3
    assert core.limit(2000) == 1000 and core.wants() == 1000 and core.refill_at == 250


def test_out_of_order_acknowledgements_free_their_slots_and_delete_each_counter() -> None:
    sim = Sim(8, window=4)
    sim.step()
    assert [sim.resolve(c, ACKED).delete for c in (3, 1, 4)] == [True, True, True]
    assert sim.deleted == [3, 1, 4] and sim.core.in_flight == 1
    sim.step()
    assert sim.published_in(0) == [1, 2, 3, 4, 5, 6, 7], "freed slots take the next counters, in order"
    sim.commit()
    assert sorted(sim.outbox) == [2, 5, 6, 7, 8]


def test_rows_out_of_counter_order_are_a_bug() -> None:
    core = PublishWindow(4, 1.0)
    core.offer([(5, b"a"), (6, b"b")])
    with pytest.raises(RuntimeError, match="counter order"):
        core.offer([(6, b"c")])
    with pytest.raises(RuntimeError, match="counter order"):
        PublishWindow(4, 1.0).offer([(2, b"a"), (1, b"b")])


def test_publishing_anything_but_the_next_envelope_is_a_bug() -> None:
    core = PublishWindow(1, 1.0)
    core.offer([(1, b"a"), (2, b"b")])
    with pytest.raises(RuntimeError, match="not the next"):
        core.published(2)
    core.published(1)
    with pytest.raises(RuntimeError, match="not the next"):
        core.published(2)  # the window is full


# -- refusals, losses, restarts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("outcome", [REFUSED, UNHEARD])
def test_a_refused_envelope_is_kept_paused_and_resent_first(outcome: Outcome) -> None:
    sim = Sim(6, window=4, pause=1.0)
    sim.step()
    sim.resolve(1, ACKED)
    r = sim.resolve(2, outcome)
    assert r == Resolution(delete=False, restart=True, pause=True)
    assert sim.resolve(3, outcome) == Resolution(delete=False, restart=True, pause=False), "one pause, one log line"
    assert sim.step() is Action.RESTART
    assert sim.core.cursor == 0 and sim.core.idle
    assert sim.step() is Action.WAIT and sim.core.retry_in(sim.now) == 1.0
    sim.now = 0.999
    assert sim.step() is Action.WAIT
    sim.now = 1.0
    assert sim.core.retry_in(sim.now) is None
    assert sim.step() is Action.PUBLISH
    assert sim.published_in(1) == [2, 3, 4, 5], "resent from the oldest unacknowledged, in counter order"
    assert sim.deleted == [1] and 2 in sim.outbox
    assert (sim.core.refused, sim.core.failures, sim.core.republished) == (2, 2, 3)


def test_a_lost_delivery_restarts_without_a_pause() -> None:
    sim = Sim(3, window=4)
    sim.step()
    assert sim.resolve(2, LOST) == Resolution(delete=False, restart=True, pause=False)
    assert sim.step() is Action.RESTART
    assert sim.step() is Action.PUBLISH and sim.published_in(1) == [1, 2, 3]
    assert (sim.core.refused, sim.core.failures, sim.core.resets) == (0, 1, 1)


def test_reconnect_resends_everything_unacknowledged_in_counter_order() -> None:
    sim = Sim(10, window=5)
    sim.step()
    for c in (4, 2):
        sim.resolve(c, ACKED)
    sim.drop()
    assert sim.step() is Action.RESTART, "a lost connection forgets the window"
    assert sim.core.cursor == 0 and sim.core.idle and sim.core.resets == 1
    assert sim.step() is Action.WAIT, "offline and empty: nothing to restart, nothing to publish"
    assert sim.core.resets == 1
    sim.connected = True
    assert sim.step() is Action.PUBLISH
    assert sim.published_in(1) == [1, 3, 5, 6, 7]
    assert sim.core.republished == 3 and sim.core.failures == 3


def test_a_restart_with_nothing_to_forget_is_not_counted() -> None:
    sim = Sim(0, window=2)
    sim.connected = False
    assert sim.step() is Action.WAIT and sim.core.resets == 0


def test_outcomes_of_a_forgotten_epoch_do_not_steer_the_window() -> None:
    sim = Sim(6, window=3)
    sim.step()
    sim.resolve(1, REFUSED)  # epoch 0 is stale; 2 and 3 are still at the broker
    sim.step()
    sim.now = 5.0
    sim.step()
    assert sim.published_in(1) == [1, 2, 3]
    r = sim.resolve(2, REFUSED, epoch=0)
    assert r == Resolution(delete=False, restart=False, pause=False)
    assert sim.core.in_flight == 3 and sim.core.retry_in(sim.now) is None
    assert sim.resolve(3, ACKED, epoch=0).delete, "an acknowledgement counts from any epoch: the broker has it"
    assert sim.core.in_flight == 3, "but it frees no slot of the current epoch"
    assert sim.step() is Action.PUBLISH


def test_nothing_acknowledged_is_deleted_twice() -> None:
    sim = Sim(4, window=4)
    sim.step()
    sim.resolve(1, REFUSED)
    sim.step()  # restart: 2, 3, 4 still in flight from epoch 0
    sim.now = 1.0
    sim.step()
    assert sim.published_in(1) == [1, 2, 3, 4]
    assert sim.resolve(2, ACKED, epoch=0).delete
    assert not sim.resolve(2, ACKED, epoch=1).delete, "the republication's PUBACK deletes nothing again"
    assert sim.deleted == [2] and sim.core.in_flight == 3
    sim.commit()
    assert sim.resolve(3, ACKED, epoch=0).delete
    sim.commit()
    assert not sim.resolve(3, ACKED, epoch=1).delete, "not even after the first deletion was committed"
    for e, c in list(sim.pending):
        sim.resolve(c, ACKED, epoch=e)
    sim.commit()
    assert sim.deleted == [2, 3, 4, 1] and not sim.outbox
    assert (sim.core._unresolved, sim.core._deleting, sim.core._deleted) == ({}, set(), set()), "and then forgotten"


def test_an_acknowledged_envelope_read_again_before_its_commit_is_not_deleted_again() -> None:
    sim = Sim(3, window=3)
    sim.step()
    sim.resolve(1, ACKED)
    sim.resolve(2, LOST)
    sim.resolve(3, LOST)
    sim.step(flush=False)  # the commit failed: 1 is still in the outbox
    sim.step()
    # Read again but not published again: it is acknowledged, only its deletion waits.
    assert sim.published_in(1) == [2, 3]
    sim.commit()
    assert sim.deleted == [1] and sorted(sim.outbox) == [2, 3]


def test_the_memory_of_deletions_ends_with_the_last_delivery_and_the_commit() -> None:
    sim = Sim(50, window=8)
    for _ in range(200):
        sim.step()
        for _, c in list(sim.pending):
            sim.resolve(c, ACKED)
        sim.commit()
        if not sim.outbox:
            break
    assert sim.deleted == list(range(1, 51)) and not sim.pending
    assert (sim.core._unresolved, sim.core._deleting, sim.core._deleted) == ({}, set(), set())


def test_a_late_ack_from_before_a_restart_is_not_published_and_deleted_again() -> None:
    """Found by the random interleavings: 2 is in flight when an unheard publication restarts the window; the new
    session's Receive Maximum is 1, so the new epoch reads 1..3 and publishes only 1; then the old epoch's
    acknowledgement of 2 arrives and 2 is deleted. The new epoch must not publish 2 again: once that deletion is
    committed nothing remembers 2, and its second acknowledgement would delete it twice."""
    sim = Sim(3, window=2, pause=1.0)
    sim.step()
    sim.resolve(1, UNHEARD)
    assert sim.step() is Action.RESTART
    sim.now += 10
    sim.receive_maximum = 1
    assert sim.step() is Action.PUBLISH
    assert sim.pending == [(0, 2), (1, 1)]
    assert sim.resolve(2, ACKED, epoch=0).delete
    sim.commit()
    sim.resolve(1, ACKED, epoch=1)
    sim.commit()
    sim.step()
    assert sim.published_in(1) == [1, 3]
    sim.resolve(3, ACKED)
    sim.commit()
    assert not sim.outbox and sim.deleted == [2, 1, 3]


# -- random interleavings -------------------------------------------------------------------------------------------

OPS = st.sampled_from(["step", "step_noflush", "resolve", "drop", "connect", "time", "commit", "add"])
OUTCOMES = [ACKED, ACKED, UNHEARD, REFUSED, LOST]


@settings(max_examples=300, deadline=None)
@given(
    window=st.integers(1, 6),
    n=st.integers(0, 12),
    ops=st.lists(st.tuples(OPS, st.integers(0, 1000)), max_size=80),
)
def test_random_interleavings_keep_the_invariants(window: int, n: int, ops: list[tuple[str, int]]) -> None:
    sim = Sim(n, window=window, pause=1.0)
    for op, k in ops:
        if op in ("step", "step_noflush"):
            if sim.step(flush=op == "step") is Action.RESTART:
                assert sim.core.cursor == 0 and sim.core.idle
        elif op == "resolve" and sim.pending:
            epoch, counter = sim.pending[k % len(sim.pending)]
            sim.resolve(counter, OUTCOMES[k % len(OUTCOMES)], epoch=epoch)
        elif op == "drop":
            sim.drop()
        elif op == "connect" and not sim.connected:
            sim.connected = True
            sim.receive_maximum = k % 8  # a new session may bring another Receive Maximum
        elif op == "time":
            sim.now += k / 500
        elif op == "commit":
            sim.commit()
        elif op == "add":
            sim.add(k % 5)
        assert sim.core.in_flight <= sim.core.capacity, "never more than the window in flight"
        assert set(sim.deleted) <= sim.acked, "only acknowledged counters are deleted"
        assert len(set(sim.deleted)) == len(sim.deleted), "nothing is deleted twice"
        for epoch in range(sim.core.epoch + 1):
            sent = sim.published_in(epoch)
            assert sent == sorted(set(sent)), "each epoch publishes in counter order, each counter once"
    # Then a good network: everything left is published, acknowledged and deleted exactly once.
    sim.connected = True
    sim.now += 10
    total = sim.next_counter - 1
    for _ in range(4 * total + 10):
        sim.step()
        for e, c in list(sim.pending):
            sim.resolve(c, ACKED, epoch=e)
        sim.commit()
        if not sim.outbox:
            break
    assert not sim.outbox and sorted(sim.deleted) == list(range(1, total + 1))
    assert (sim.core._unresolved, sim.core._deleting, sim.core._deleted) == ({}, set(), set())
