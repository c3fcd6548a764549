"""The ingest queue: one box flooding its topics gets one slot per round, like every other box, and QoS 0 floods are
bounded per device (QoS 1 is bounded by the broker's Receive Maximum and never dropped)."""

from __future__ import annotations

import threading
import time

from edge.fleet.ingest import FairQueue
from edge.mqtt import Incoming


def msg(device: str, n: int, qos: int = 1) -> tuple[Incoming, float]:
    m = Incoming(None, mid=n, qos=qos, topic=f"devices/{device}/telemetry", payload=b"%d" % n, duplicate=False)  # type: ignore[arg-type]
    return m, float(n)


def test_batches_are_round_robin_over_devices():
    q = FairQueue(qos0_max=100)
    for n in range(50):
        q.put("flood", msg("flood", n), qos0=False)
    for n in range(3):
        q.put("a", msg("a", 100 + n), qos0=False)
        q.put("b", msg("b", 200 + n), qos0=False)
    batch, closed = q.take(6, 0.0)
    assert not closed
    topics = [m.topic.split("/")[1] for m, _t in batch]
    assert sorted(topics) == ["a", "a", "b", "b", "flood", "flood"]  # the flood waits its turn
    rest, _ = q.take(100, 0.0)
    assert len(rest) == 56 - 6 and len(q) == 0
    # Each device's own messages keep their order.
    flood = [int(m.payload) for m, _t in batch + rest if m.topic.startswith("devices/flood/")]
    assert flood == sorted(flood)


def test_qos0_flood_is_shed_beyond_its_bound_qos1_never():
    q = FairQueue(qos0_max=10)
    kept = [q.put("x", msg("x", n, qos=0), qos0=True) for n in range(25)]
    assert kept.count(True) == 10
    for n in range(25):
        assert q.put("x", msg("x", 100 + n), qos0=False)  # QoS 1: the broker bounds it, nothing is dropped
    assert len(q) == 35
    assert q.take_shed() == [("x", "devices/x/telemetry", 15)]
    assert q.take_shed() == []


def test_take_waits_for_the_first_and_close_wakes_it():
    q = FairQueue(qos0_max=1)
    got: list[object] = []

    def taker():
        got.append(q.take(10, 0.0))

    t = threading.Thread(target=taker)
    t.start()
    time.sleep(0.1)
    assert not got  # nothing queued yet: it waits
    q.put("a", msg("a", 1), qos0=False)
    t.join(2)
    assert got and len(got[0][0]) == 1
    q.close()
    assert q.take(10, 0.0) == ([], True)
