"""The updater's state machine: the (state, event) -> state table, every legal and every illegal pair, the strict
codec, the state file."""

from __future__ import annotations

import itertools
import json
from collections import deque
from pathlib import Path

import pytest
from hostile_files import sparse_file, traced_peak

from edge.ota import _faults
from edge.ota.errors import IllegalTransition
from edge.ota.state import (
    ACTIVE_STATES,
    MAX_STATE_BYTES,
    STATES,
    TRANSITIONS,
    Event,
    State,
    StateCorrupt,
    StateFile,
    UpdateState,
    decode,
    encode,
    next_state,
    transition,
)

# The protocol of the module docstring, written out again: the table must be exactly this.
PROTOCOL = {
    (State.IDLE, Event.START): State.DOWNLOADING,
    (State.DOWNLOADING, Event.DOWNLOADED): State.VERIFYING,
    (State.VERIFYING, Event.VERIFIED): State.STAGED,
    (State.STAGED, Event.TRIAL_STARTED): State.TRIAL,
    (State.TRIAL, Event.ACTIVATED): State.COMMITTED,
    (State.COMMITTED, Event.DONE): State.IDLE,
    (State.DOWNLOADING, Event.FAILED): State.ROLLED_BACK,
    (State.VERIFYING, Event.FAILED): State.ROLLED_BACK,
    (State.STAGED, Event.FAILED): State.ROLLED_BACK,
    (State.TRIAL, Event.FAILED): State.ROLLED_BACK,
    (State.ROLLED_BACK, Event.DONE): State.IDLE,
    (State.COMMITTED, Event.START): State.DOWNLOADING,
    (State.ROLLED_BACK, Event.START): State.DOWNLOADING,
    (State.IDLE, Event.REVERT): State.ROLLED_BACK,
}
# The (from, to) pairs the table allowed before it had events: the table with events may allow no other move.
MOVES_BEFORE_EVENTS = {
    ("idle", "downloading"),
    ("idle", "rolled_back"),
    ("downloading", "verifying"),
    ("downloading", "rolled_back"),
    ("verifying", "staged"),
    ("verifying", "rolled_back"),
    ("staged", "trial"),
    ("staged", "rolled_back"),
    ("trial", "committed"),
    ("trial", "rolled_back"),
    ("committed", "idle"),
    ("committed", "downloading"),
    ("rolled_back", "idle"),
    ("rolled_back", "downloading"),
}
# What the work of a state in the middle of an update produces; START, DONE and REVERT come from outside a run.
RUN_EVENTS = frozenset({Event.DOWNLOADED, Event.VERIFIED, Event.TRIAL_STARTED, Event.ACTIVATED, Event.FAILED})
ILLEGAL = [p for p in itertools.product(State, Event) if p not in PROTOCOL]


def _record(state: State) -> UpdateState:
    return UpdateState(state=state, name="digits", version="2.0.0", slot="a", previous="factory")


def test_table_is_exactly_the_documented_protocol() -> None:
    assert dict(TRANSITIONS) == PROTOCOL
    assert all(type(s) is State and type(e) is Event and type(t) is State for (s, e), t in TRANSITIONS.items())


def test_table_allows_the_same_moves_as_before_it_had_events() -> None:
    assert {(s.value, t.value) for (s, _), t in TRANSITIONS.items()} == MOVES_BEFORE_EVENTS


@pytest.mark.parametrize(("src", "on", "dst"), [(s, e, t) for (s, e), t in PROTOCOL.items()])
def test_legal_transition(src: State, on: Event, dst: State) -> None:
    assert next_state(src, on) is dst
    new = transition(_record(src), on, now=123.0, reason="network")
    assert (new.state, new.updated_at, new.reason, new.name, new.slot) == (dst, 123.0, "network", "digits", "a")


@pytest.mark.parametrize(("src", "on"), ILLEGAL)
def test_illegal_pair_raises_naming_state_and_event(src: State, on: Event) -> None:
    with pytest.raises(IllegalTransition, match=f"event {on.value} in state {src.value}$") as e:
        next_state(src, on)
    assert e.value.reason == "illegal_transition"
    before = _record(src)
    with pytest.raises(IllegalTransition, match=f"event {on.value} in state {src.value}$"):
        transition(before, on, now=1.0)


def test_some_pairs_are_illegal_in_every_state() -> None:
    # A table that allowed every pair would make the illegal-pair test vacuous.
    assert {s for s, _ in ILLEGAL} == set(State)
    assert (State.COMMITTED, Event.FAILED) in ILLEGAL  # once `active` names the new slot, the commit stands


def test_every_state_is_reachable_from_idle_and_leads_back_to_idle() -> None:
    def reachable(start: State) -> set[State]:
        seen, todo = {start}, deque([start])
        while todo:
            here = todo.popleft()
            for (s, _), t in TRANSITIONS.items():
                if s is here and t not in seen:
                    seen.add(t)
                    todo.append(t)
        return seen

    assert reachable(State.IDLE) == set(State)
    assert all(State.IDLE in reachable(s) for s in State)  # no state where the updater is stuck for good


def test_run_ends_have_no_exit_on_a_step_event() -> None:
    """Idle, committed and rolled_back end a run: no step event moves them, so a finished run cannot go on or fail."""
    ends = set(State) - ACTIVE_STATES
    assert ends == {State.IDLE, State.COMMITTED, State.ROLLED_BACK}
    assert [(s, e) for (s, e) in TRANSITIONS if s in ends and e in RUN_EVENTS] == []
    assert {e for (s, e) in TRANSITIONS if s in ends} == {Event.START, Event.DONE, Event.REVERT}


@pytest.mark.parametrize("state", sorted(ACTIVE_STATES))
def test_a_step_in_progress_either_moves_on_or_rolls_back(state: State) -> None:
    exits = {e: t for (s, e), t in TRANSITIONS.items() if s is state}
    assert exits.pop(Event.FAILED) is State.ROLLED_BACK
    assert len(exits) == 1  # one success event per step: the run is a line, not a choice
    ((on, to),) = exits.items()
    assert on in RUN_EVENTS and to is not State.ROLLED_BACK


def test_every_persisted_state_has_its_crash_points() -> None:
    for state in State:
        assert set(_faults.state_points(state.value)) <= set(_faults.FAULT_POINTS)


def test_states_are_the_persisted_words() -> None:
    assert tuple(State) == STATES
    assert [s.value for s in STATES] == [
        "idle",
        "downloading",
        "verifying",
        "staged",
        "trial",
        "committed",
        "rolled_back",
    ]


@pytest.mark.parametrize("name", [s.value for s in State])
def test_state_file_of_the_previous_format_loads_and_is_rewritten_identically(name: str) -> None:
    """A state file already on a box (written before the table had events) loads, and is written back byte for byte."""
    data = (
        b'{"attempts":1,"failed":["digits@1.5"],"name":"digits","previous":"a","reason":null,"rollout":"r-1",'
        b'"schema":1,"slot":"b","state":"' + name.encode() + b'","updated_at":1700000000.5,"version":"2.0.0"}\n'
    )
    st = decode(data)
    assert type(st.state) is State and st.state.value == name
    assert encode(st) == data


def _full() -> UpdateState:
    return UpdateState(
        state=State.TRIAL,
        name="digits",
        version="2.0.0",
        slot="b",
        previous="a",
        reason=None,
        attempts=1,
        rollout="r-1",
        failed=frozenset({"digits@3.0.0", "digits@1.5"}),
        updated_at=1700000000.5,
    )


def test_encode_decode_round_trip() -> None:
    st = _full()
    assert decode(encode(st)) == st
    assert json.loads(encode(st))["failed"] == ["digits@1.5", "digits@3.0.0"]


def _mutated(**changes: object) -> bytes:
    body = json.loads(encode(_full()))
    body.update(changes)
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"state": "idle"}', "missing"),
        (_mutated(extra=1), "unknown"),
        (_mutated(schema=2), "schema"),
        (_mutated(state="exploded"), "unknown state"),
        (_mutated(slot="c"), "slot"),
        (_mutated(previous="z"), "previous"),
        (_mutated(attempts=-1), "attempts"),
        (_mutated(attempts=True), "attempts"),
        (_mutated(failed="digits@1"), "failed"),
        (_mutated(failed=["../etc"]), "model id"),
        (_mutated(updated_at="yesterday"), "updated_at"),
        (_mutated(reason="Not A Word"), "reason"),
        (_mutated(version=None), "both"),
        (_mutated(slot=None), "needs name"),
        (_mutated(name=7), "name"),
    ],
)
def test_decode_is_strict(data: bytes, match: str) -> None:
    with pytest.raises(StateCorrupt, match=match) as e:
        decode(data)
    assert e.value.reason == "corrupt_state"


def test_state_file_round_trip_and_missing(tmp_path: Path) -> None:
    f = StateFile(tmp_path / "ota" / "state.json")
    assert f.load() == UpdateState()
    f.save(_full())
    assert f.load() == _full()
    assert not list((tmp_path / "ota").glob(".*.tmp"))


def test_state_file_removes_a_temp_file_left_by_a_crash(tmp_path: Path) -> None:
    f = StateFile(tmp_path / "state.json")
    f.save(_full())
    stale = tmp_path / ".state.json.abc123.tmp"
    stale.write_bytes(b"half")
    assert f.load() == _full()
    assert not stale.exists()


def test_state_file_corrupt_raises_typed_error(tmp_path: Path) -> None:
    f = StateFile(tmp_path / "state.json")
    (tmp_path / "state.json").write_bytes(b'{"state": "trial", "truncated')
    with pytest.raises(StateCorrupt):
        f.load()


def test_fault_points_are_many_distinct_and_checked() -> None:
    assert len(set(_faults.FAULT_POINTS)) == len(_faults.FAULT_POINTS) >= 20
    _faults.checkpoint("state.idle.written")  # no-op without EDGE_OTA_HALT_AT
    with pytest.raises(ValueError, match="unknown fault point"):
        _faults.checkpoint("no.such.point")


def test_huge_state_file_is_refused_without_being_read(tmp_path: Path) -> None:
    """A state file grown to a gigabyte (a corrupt /data, or its owner's doing) is refused from its first MiB."""
    path = sparse_file(tmp_path / "state.json", 1 << 30)
    with traced_peak() as peak, pytest.raises(StateCorrupt, match=f"more than {MAX_STATE_BYTES}"):
        StateFile(path).load()
    assert peak[0] < 4 * MAX_STATE_BYTES
