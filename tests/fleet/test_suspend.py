"""Suspending a flooding box: the reject budget (sans-IO), the store's suspensions on SQLite and PostgreSQL, and the
broker state a suspension produces. The whole path against real processes is in ``test_hostile_fleet.py``."""

from __future__ import annotations

import pytest
from conftest import T0

from edge.fleet.broker_sync import device_role, fleet_state, plan
from edge.fleet.suspend import MAX_FACTOR, STRIKE_MEMORY_S, RejectBudget, suspension_length


def test_budget_allows_a_burst_then_suspends_once_and_refills() -> None:
    b = RejectBudget(burst=100, per_s=1.0)
    assert not b.spend("mallory", 100, T0)  # exactly the burst
    assert b.spend("mallory", 1, T0)  # one more: overdrawn
    assert not b.spend("mallory", 100, T0)  # the bucket is full again: the rejects still queued do not re-trigger
    assert b.spend("mallory", 1, T0)
    # Refills at per_s: 10 s later there are 10 tokens.
    b = RejectBudget(burst=100, per_s=1.0)
    assert not b.spend("x", 100, T0)
    assert not b.spend("x", 10, T0 + 10)
    assert b.spend("x", 1, T0 + 10)


def test_budget_is_per_box_and_a_shed_count_spends_at_once() -> None:
    b = RejectBudget(burst=100, per_s=1.0)
    assert b.spend("flood", 17_000, T0)  # one shed row of a QoS 0 flood overdraws it at once
    assert not b.spend("honest", 1, T0)  # another box's budget is its own


def test_budget_zero_never_suspends_and_idle_boxes_are_forgotten() -> None:
    off = RejectBudget(burst=0, per_s=1.0)
    assert not off.enabled and not off.spend("mallory", 10**9, T0)
    b = RejectBudget(burst=10, per_s=1.0)
    for i in range(1000):
        b.spend(f"box-{i}", 5, T0)
    assert len(b._buckets) == 1000
    b.forget_idle(T0 + 5)  # refilled: nothing to remember
    assert not b._buckets


def test_suspension_doubles_per_strike_up_to_64_times() -> None:
    assert [suspension_length(k, 60.0) for k in (1, 2, 3, 7)] == [60.0, 120.0, 240.0, 3840.0]
    assert suspension_length(100, 60.0) == 60.0 * MAX_FACTOR
    assert suspension_length(0, 60.0) == 60.0


def test_store_records_suspensions_with_strikes(store, fleet) -> None:
    fleet.device("mallory")
    assert store.suspend("stranger", now=T0, base_s=60, reason="r", by="gw") is None  # not registered: no row
    s1 = store.suspend("mallory", now=T0, base_s=60, reason="flood", by="gateway-1")
    assert s1 is not None and (s1.since, s1.until, s1.strikes, s1.by) == (T0, T0 + 60, 1, "gateway-1")
    # While it is in force, another gateway's decision finds it and changes nothing.
    assert store.suspend("mallory", now=T0 + 10, base_s=60, reason="again", by="gateway-2") == s1
    assert store.suspensions(now=T0 + 59) == [s1] and store.suspensions(now=T0 + 60) == []
    # A repeat within a day of its end doubles; after a quiet day it starts over.
    s2 = store.suspend("mallory", now=T0 + 100, base_s=60, reason="flood", by="gateway-1")
    assert s2 is not None and (s2.strikes, s2.until - s2.since) == (2, 120)
    s3 = store.suspend("mallory", now=s2.until + STRIKE_MEMORY_S + 1, base_s=60, reason="flood", by="gateway-1")
    assert s3 is not None and s3.strikes == 1
    # The operator lifts it; strikes are kept for the next time.
    lifted = store.resume("mallory", now=s3.since + 5)
    assert lifted is not None and lifted.until == s3.since + 5 and store.suspensions(now=s3.since + 6) == []
    assert store.resume("mallory", now=s3.since + 6) is None  # nothing in force
    s4 = store.suspend("mallory", now=s3.since + 7, base_s=60, reason="flood", by="gateway-1")
    assert s4 is not None and s4.strikes == 2
    assert [s.device_id for s in store.suspensions()] == ["mallory"]


def test_store_bounds_what_it_keeps_of_a_reason(store, fleet) -> None:
    fleet.device("mallory")
    s = store.suspend("mallory", now=T0, base_s=60, reason="x" * 10_000, by="g" * 1000)
    assert s is not None and len(s.reason) == 500 and len(s.by) == 64
    assert store.suspensions() == [s]


def test_a_suspended_box_has_no_client_and_its_client_is_deleted_first() -> None:
    before = fleet_state(["gateway-1"], [], ["cam-1", "mallory"])
    during = fleet_state(["gateway-1"], [], ["cam-1", "mallory"], suspended=["mallory"])
    assert "mallory" not in during.clients and device_role("mallory") in during.roles
    assert during.clients["cam-1"] == before.clients["cam-1"]
    commands = plan(during, before)
    assert commands == [{"command": "deleteClient", "username": "mallory"}]
    back = plan(before, during)
    assert back == [{"command": "createClient", "username": "mallory", "roles": [{"rolename": device_role("mallory")}]}]


@pytest.mark.parametrize("burst", [-1, 1_000_001, 1.5, "100", True])
def test_reject_burst_out_of_range_is_a_config_error(burst) -> None:
    from edge.errors import ConfigError  # noqa: PLC0415
    from edge.fleet.config import parse_gateway_config  # noqa: PLC0415

    with pytest.raises(ConfigError, match="reject_burst"):
        parse_gateway_config({"gateway": {"reject_burst": burst}})
