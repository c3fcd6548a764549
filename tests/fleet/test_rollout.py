"""The rollout planner (sans-IO): stage sizes, advancement, the abort threshold at its boundary, timeouts,
rollbacks only where the version committed, and strict decoding of the persisted rollout."""

from __future__ import annotations

import json

import pytest

from edge.fleet.rollout.planner import (
    Command,
    Rollout,
    RolloutConflictError,
    RolloutError,
    abort,
    mark_sent,
    new_rollout,
    order_devices,
    parse_percent,
    parse_stages,
    plan,
    stage_sizes,
    summary,
)
from edge.fleet.store import DeviceEvent

T0 = 1_700_000_000.0
RID = "c0ffee01"


def ids(n: int) -> list[str]:
    return [f"box-{i:03d}" for i in range(n)]


def event(device: str, kind: str, at: float, *, version: str = "2.0.0", rollout: str | None = RID,
          model: str = "digits", reason: str | None = None) -> DeviceEvent:  # fmt: skip
    data = {"model": model, "version": version, "from": "digits@1.0.0", "slot": "b", "reason": reason,
            "rollout": rollout}  # fmt: skip
    return DeviceEvent(device, 1, at, at, f"ota.{kind}", data)


def start(n: int, stages: tuple[float, ...] = (0.1, 0.5, 1.0), abort_on: float = 0.05) -> Rollout:
    return new_rollout(RID, "digits", "2.0.0", stages, ids(n), now=T0, abort_on=abort_on)


def step(r: Rollout, events: list[DeviceEvent], now: float, **kw: float) -> tuple[Rollout, list[Command]]:
    """Plan, then confirm every publish (what the driver does when the broker takes each command)."""
    r, cmds = plan(r, events, now, **kw)
    for c in cmds:
        r = mark_sent(r, c, now)
    return r, cmds


@pytest.mark.parametrize(
    ("n", "sizes"), [(1, (1, 1, 1)), (3, (1, 2, 3)), (10, (1, 5, 10)), (100, (10, 50, 100))]
)  # fmt: skip
def test_stage_sizes_cover_ceil_of_the_fraction_and_at_least_one(n, sizes) -> None:
    assert stage_sizes(n, (0.1, 0.5, 1.0)) == sizes
    assert stage_sizes(7, (0.3, 1.0)) == (3, 7)  # ceil(2.1)
    assert stage_sizes(20, (0.05, 1.0)) == (1, 20)  # 5% of 20 is exactly 1: float error must not make it 2


def test_devices_are_ordered_by_hash_of_rollout_and_device_and_differ_per_rollout() -> None:
    a = order_devices("aaaa", ids(50))
    assert a == order_devices("aaaa", reversed(ids(50))) and sorted(a) == ids(50)
    assert a != order_devices("bbbb", ids(50))
    assert [d.device_id for d in start(50).devices] == list(order_devices(RID, ids(50)))


def test_first_plan_commands_only_the_first_stage_and_records_it_before_sending() -> None:
    r, cmds = plan(start(10), [], T0 + 1)
    first = r.devices[0].device_id
    assert cmds == [
        Command(first, "models/update", {"name": "digits", "version": "2.0.0", "rollout": RID, "force": False})
    ]
    assert r.devices[0].commanded_at == T0 + 1 and r.devices[0].sent_at is None
    assert all(d.commanded_at is None for d in r.devices[1:])


def test_unconfirmed_publish_is_resent_confirmed_one_is_not() -> None:
    r, cmds = plan(start(10), [], T0 + 1)
    r2, again = plan(r, [], T0 + 3)  # the publish failed: nothing marked it sent
    assert again == cmds and r2.devices[0].commanded_at == T0 + 1  # the first command time is kept
    r3 = mark_sent(r2, again[0], T0 + 3)
    assert plan(r3, [], T0 + 5)[1] == []


def test_stages_advance_as_each_stage_commits_and_the_rollout_completes() -> None:
    r, cmds = step(start(10), [], T0 + 1)
    seen = [c.device_id for c in cmds]
    events: list[DeviceEvent] = []
    t = T0 + 1
    for expected_new in (4, 5):
        t += 10
        events += [event(d, "committed", t) for d in seen]
        r, cmds = step(r, events, t)
        assert len(cmds) == expected_new and r.state == "running"
        seen += [c.device_id for c in cmds]
    assert r.stage == 2 and seen == [d.device_id for d in r.devices]
    t += 10
    r, cmds = step(r, [*events, *(event(d, "committed", t) for d in seen)], t)
    assert cmds == [] and r.state == "completed" and r.finished_at == t
    assert all(d.outcome == "committed" for d in r.devices)
    assert plan(r, [], t + 100) == (r, [])  # finished: nothing more


def test_a_box_already_running_the_version_counts_as_committed_and_single_device_fleet_completes() -> None:
    r, cmds = step(start(1), [], T0 + 1)
    r, cmds = step(r, [event("box-000", "committed", T0 + 2, rollout=None, version="2.0")], T0 + 2)
    assert r.state == "completed" and cmds == []  # "2.0" is "2.0.0"; rollout None: a periodic check or a re-answer


def test_events_that_do_not_concern_this_rollout_are_ignored() -> None:
    r, cmds = step(start(1), [], T0 + 10)
    dev = cmds[0].device_id
    noise = [
        event(dev, "committed", T0 + 5),  # received before the command
        event(dev, "committed", T0 + 11, version="3.0.0"),
        event(dev, "committed", T0 + 11, model="other"),
        event(dev, "rolled_back", T0 + 11, rollout="deadbeef"),  # another rollout's
        event(dev, "trial", T0 + 11),  # not an outcome
        event("box-999", "rolled_back", T0 + 11),  # not in the rollout
    ]
    r, _ = step(r, noise, T0 + 12)
    assert r.state == "running" and r.devices[0].outcome is None


def test_abort_threshold_one_failure_in_twenty_aborts_in_twenty_one_does_not() -> None:
    for n, aborts in ((20, True), (21, False)):
        r, cmds = step(start(n, stages=(1.0,)), [], T0 + 1)
        assert len(cmds) == n
        evs = [event(cmds[0].device_id, "rolled_back", T0 + 2, reason="golden")]
        evs += [event(c.device_id, "committed", T0 + 2) for c in cmds[1:]]
        r, out = step(r, evs, T0 + 3)
        assert (r.state == "aborted") is aborts, n
        if aborts:
            assert r.reason is not None and r.reason.startswith("threshold: 1 of 20")
            assert sorted(c.device_id for c in out) == sorted(c.device_id for c in cmds[1:])
            assert {c.name for c in out} == {"models/rollback"}
        else:
            assert r.state == "completed"


def test_zero_threshold_aborts_on_any_failure_and_a_hundred_percent_only_when_all_fail() -> None:
    r, cmds = step(start(4, stages=(1.0,), abort_on=0.0), [], T0)
    r, _ = step(r, [event(cmds[0].device_id, "refused", T0 + 1, reason="never_retry")], T0 + 1)
    assert r.state == "aborted"
    r, cmds = step(start(2, stages=(1.0,), abort_on=1.0), [], T0)
    r, _ = step(r, [event(cmds[0].device_id, "refused", T0 + 1)], T0 + 1)
    assert r.state == "running"
    r, _ = step(r, [event(cmds[1].device_id, "rolled_back", T0 + 2)], T0 + 2)
    assert r.state == "aborted"


def test_broken_version_aborts_at_the_first_stage_and_nobody_else_is_commanded() -> None:
    r, cmds = step(start(10), [], T0 + 1)
    r, out = step(r, [event(cmds[0].device_id, "rolled_back", T0 + 2, reason="golden mismatch")], T0 + 2)
    assert r.state == "aborted" and out == []  # nobody committed: no rollback to send
    assert r.devices[0].outcome == "failed" and r.devices[0].reason == "rolled_back: golden mismatch"
    assert sum(d.commanded_at is not None for d in r.devices) == 1 and r.finished_at == T0 + 2


def test_silent_device_times_out_and_counts_as_a_failure() -> None:
    r, _ = step(start(10), [], T0)
    r, _ = step(r, [], T0 + 899, device_timeout_s=900)
    assert r.state == "running" and r.devices[0].outcome is None
    r, _ = step(r, [], T0 + 900, device_timeout_s=900)
    assert r.state == "aborted" and r.devices[0].outcome == "timed_out"


def test_a_device_never_reached_does_not_time_out() -> None:
    r, cmds = plan(start(10), [], T0)  # publish failed, never confirmed
    r, again = plan(r, [], T0 + 10_000, device_timeout_s=900)
    assert r.state == "running" and r.devices[0].outcome is None and again == cmds


def test_operator_abort_rolls_back_only_committed_devices_including_late_committers() -> None:
    r, cmds = step(start(10, stages=(0.5, 1.0)), [], T0)
    assert len(cmds) == 5
    done = [c.device_id for c in cmds[:3]]
    failed = cmds[3].device_id
    evs = [event(d, "committed", T0 + 1) for d in done]
    r, _ = step(r, evs, T0 + 1)
    r = abort(r)
    assert r.state == "aborted" and r.reason == "operator"
    evs.append(event(failed, "refused", T0 + 2, reason="never_retry"))
    r, out = plan(r, evs, T0 + 2)
    assert sorted(c.device_id for c in out) == sorted(done) and {c.name for c in out} == {"models/rollback"}
    assert out[0].args == {"name": "digits", "version": "2.0.0", "rollout": RID}
    for c in out:
        r = mark_sent(r, c, T0 + 2)
    assert r.finished_at is None  # the fifth device may still answer
    late = cmds[4].device_id
    r, out = step(r, [*evs, event(late, "committed", T0 + 3)], T0 + 3)
    assert [c.device_id for c in out] == [late]  # committed after the abort: rolled back too
    r, out = step(r, evs, T0 + 4)
    assert out == [] and r.finished_at == T0 + 4
    assert all(d.commanded_at is None for d in r.devices[5:])  # the second stage never started
    never = [d["outcome"] for d in summary(r)["devices"][5:]]
    assert never == ["skipped"] * len(never)  # never reached: not "waiting" for what will never come
    with pytest.raises(RolloutConflictError, match="aborted"):
        abort(r)


def test_summary_counts_each_stage_and_device() -> None:
    r, cmds = step(start(10), [], T0)
    r, _ = step(r, [event(cmds[0].device_id, "committed", T0 + 1)], T0 + 1)
    s = summary(r)
    assert (s["state"], s["stage"], len(s["devices"])) == ("running", 2, 10)
    assert s["stages"][0] | {} == {"stage": 1, "percent": 10.0, "devices": 1, "new": 1, "waiting": 0, "skipped": 0,
                                   "commanded": 0, "committed": 1, "failed": 0, "timed_out": 0}  # fmt: skip
    assert s["stages"][1]["commanded"] == 4 and s["stages"][1]["new"] == 4
    assert s["stages"][2]["waiting"] == 5
    json.dumps(s)


def test_parse_percentages_and_stages() -> None:
    assert parse_stages("10%,50%,100%") == (0.1, 0.5, 1.0)
    assert parse_percent("5%") == 0.05 and parse_percent("2.5") == 0.025 and parse_percent("0%") == 0.0
    for bad in ("50%,10%,100%", "10%,50%", "0%,100%", "10%,10%,100%", "abc", "", "150%", "-5%", "10%;100%"):
        with pytest.raises(RolloutError):
            parse_stages(bad)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rollout_id": "XYZ"}, "hex"),
        ({"name": "Bad Name"}, "model name"),
        ({"version": "v2"}, "version"),
        ({"device_ids": []}, "no devices"),
        ({"device_ids": ["ok", "bad/id"]}, "device"),
        ({"abort_on": 1.5}, "abort_on"),
        ({"stages": (0.5,)}, "100%"),
    ],
)
def test_new_rollout_rejects_invalid_arguments(kwargs, match) -> None:
    args: dict[str, object] = {"rollout_id": RID, "name": "digits", "version": "2.0.0", "stages": (0.1, 1.0),
                               "device_ids": ids(3)} | kwargs  # fmt: skip
    with pytest.raises(RolloutError, match=match):
        new_rollout(now=T0, **args)  # type: ignore[arg-type]


def test_json_round_trip_keeps_everything() -> None:
    r, cmds = step(start(10), [], T0)
    r, _ = step(r, [event(cmds[0].device_id, "rolled_back", T0 + 1, reason="slow")], T0 + 1)
    assert Rollout.decode(r.encode()) == r
    assert Rollout.decode(start(3).encode()) == start(3)


def _mutate(r: Rollout, fn) -> bytes:
    body = json.loads(r.encode())
    fn(body)
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("mutation", "match"),
    [
        (lambda b: b.pop("state"), "missing"),
        (lambda b: b.update(extra=1), "unknown"),
        (lambda b: b.update(schema=2), "schema"),
        (lambda b: b.update(state="paused"), "state"),
        (lambda b: b.update(stage=3), "stage"),
        (lambda b: b.update(stage=1.0), "integer"),
        (lambda b: b.update(created_at="yesterday"), "number"),
        (lambda b: b.update(created_at=float("inf")), "finite"),
        (lambda b: b.update(force=1), "true or false"),
        (lambda b: b.update(stages=[0.5, 0.1, 1.0]), "increase"),
        (lambda b: b.update(devices=[]), "no devices"),
        (lambda b: b.update(devices={}), "list"),
        (lambda b: b["devices"].append(b["devices"][0]), "twice"),
        (lambda b: b["devices"][0].update(outcome="great"), "outcome"),
        (lambda b: b["devices"][1].update(outcome="committed"), "without a command"),
        (lambda b: b["devices"][0].pop("sent_at"), "missing"),
        (lambda b: b.update(id="../etc"), "hex"),
    ],
)
def test_strict_decoding_rejects_corrupt_files(mutation, match) -> None:
    r, _ = step(start(10), [], T0)
    with pytest.raises(RolloutError, match=match):
        Rollout.decode(_mutate(r, mutation))


def test_decoding_non_json_is_a_typed_error() -> None:
    for data in (b"", b"\xff\xfe", b"[1, 2]", b"{"):
        with pytest.raises(RolloutError):
            Rollout.decode(data)
