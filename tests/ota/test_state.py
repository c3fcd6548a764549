"""The updater's state machine: every allowed and every illegal transition, the strict codec, the state file."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from hostile_files import sparse_file, traced_peak

from edge.ota import _faults
from edge.ota.errors import IllegalTransition
from edge.ota.state import (
    MAX_STATE_BYTES,
    STATES,
    TRANSITIONS,
    StateCorrupt,
    StateFile,
    UpdateState,
    decode,
    encode,
    transition,
)

ALLOWED = {
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
PAIRS = list(itertools.product(STATES, STATES))


def test_table_is_exactly_the_documented_protocol() -> None:
    assert {(a, b) for a, tos in TRANSITIONS.items() for b in tos} == ALLOWED


@pytest.mark.parametrize(("src", "dst"), sorted(ALLOWED))
def test_allowed_transition(src: str, dst: str) -> None:
    st = UpdateState(state=src, name="digits", version="2.0.0", slot="a", previous="factory")  # type: ignore[arg-type]
    new = transition(st, dst, now=123.0, reason="network")  # type: ignore[arg-type]
    assert (new.state, new.updated_at, new.reason, new.name) == (dst, 123.0, "network", "digits")


@pytest.mark.parametrize(("src", "dst"), [p for p in PAIRS if p not in ALLOWED])
def test_illegal_transition_raises(src: str, dst: str) -> None:
    st = UpdateState(state=src)  # type: ignore[arg-type]
    with pytest.raises(IllegalTransition, match=f"{src} -> {dst}"):
        transition(st, dst, now=1.0)  # type: ignore[arg-type]


def _full() -> UpdateState:
    return UpdateState(
        state="trial",
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
