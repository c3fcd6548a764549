"""The time floor: only rises, survives restarts, is persisted atomically, rejects a corrupt file loudly, and cannot
be poisoned: one signed time moves it at most MAX_AHEAD_S past the box's own clock, a box whose clock is unset goes
further only when two sources signed by different keys agree, and the fleet's time/reset brings a poisoned one back.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from edge.errors import ConfigError
from edge.ota.clock import BUILD_TIME, MAX_AHEAD_S, TimeFloor, clock_unset, horizon

B = 1_790_000_000.0  # this test's firmware build time
T = 1_800_000_000.0  # the true time in these tests (clock set: the box's clock reads T)
YEAR = 365 * 86400.0


def floor_at(tmp_path: Path, name: str = "floor.json") -> TimeFloor:
    return TimeFloor(tmp_path / name, build_time=B)


def test_starts_at_zero_and_never_lowers(tmp_path: Path) -> None:
    floor = floor_at(tmp_path)
    assert floor.floor() == 0.0 and floor.source == "none"
    assert not (tmp_path / "floor.json").exists()
    assert floor.prove(T + 0.5, "tuf timestamp v3", kind="tuf", clock=T)
    assert not floor.prove(T - 100, "command", kind="command", clock=T)  # older: ignored
    assert not floor.prove(T + 0.5, "command", kind="command", clock=T)  # equal: not a rise
    assert floor.floor() == T + 0.5 and floor.source == "tuf timestamp v3"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, True])
def test_non_finite_values_are_ignored(tmp_path: Path, bad: float) -> None:
    floor = floor_at(tmp_path)
    assert not floor.prove(bad, "x", kind="tuf", clock=T)
    assert floor.floor() == 0.0


def test_persisted_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "floor.json"
    TimeFloor(path, build_time=B).prove(T, "tuf timestamp v1", kind="tuf", clock=T)
    assert json.loads(path.read_text()) == {"floor": T, "rule": 1, "source": "tuf timestamp v1"}
    again = TimeFloor(path, build_time=B)
    assert again.floor() == T and again.source == "tuf timestamp v1"
    assert [p.name for p in tmp_path.iterdir()] == ["floor.json"]  # no temp files left behind


def test_now_is_max_of_clock_floor_and_build_time(tmp_path: Path) -> None:
    floor = floor_at(tmp_path)
    assert floor.now(0.0) == B  # never older than the code it runs, even before anything was proven
    floor.prove(T, "t", kind="tuf", clock=T)
    assert floor.now(0.0) == T  # a clock reset to 1970 is lifted to the floor
    assert floor.now(T + YEAR) == T + YEAR  # a clock ahead is believed
    assert floor.now(math.nan) == T


def test_build_time_is_not_in_the_future() -> None:
    # A release must not stamp a build time ahead of the real time: every box would believe it is later than it is.
    assert 1_700_000_000 < BUILD_TIME <= time.time()
    assert TimeFloor(Path("/nonexistent/floor.json")).build_time == BUILD_TIME


@pytest.mark.parametrize(
    "content", [b"", b"{", b"[]", b'{"floor": "x", "source": "s"}', b'{"floor": NaN, "source": "s"}', b'{"floor": 1}']
)
def test_corrupt_file_is_a_config_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "floor.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as ei:
        TimeFloor(path)
    assert str(path) in str(ei.value) and "remove the file" in str(ei.value)


# -- the horizon: one signed time -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tuf", "command"])
def test_far_future_signed_time_raises_the_floor_only_to_the_horizon(tmp_path: Path, kind) -> None:
    # A stolen timestamp or command key (or a fleet whose clock jumped) signs a time ten years ahead.
    floor = floor_at(tmp_path)
    assert floor.prove(T + 10 * YEAR, "stolen", kind=kind, clock=T)
    assert floor.floor() == T + MAX_AHEAD_S == horizon(T, B)
    assert "bounded" in floor.source
    # Survives a restart as the horizon, not as the signed time.
    assert TimeFloor(tmp_path / "floor.json", build_time=B).floor() == T + MAX_AHEAD_S


def test_ratchet_of_times_each_slightly_ahead_does_not_pass_the_horizon(tmp_path: Path) -> None:
    # Each message is just within MAX_AHEAD_S of the floor the last one left: measured from the floor, they would
    # walk it a day ahead in 24 steps. Measured from the box's clock, they stop at the horizon.
    floor = floor_at(tmp_path)
    clock = T
    floor.prove(T, "tuf timestamp v1", kind="tuf", clock=clock)
    for i in range(24):
        clock += 1.0  # the box's clock moves on a little between messages
        kind = "tuf" if i % 2 else "command"
        floor.prove(floor.floor() + MAX_AHEAD_S - 1, f"step {i}", kind=kind, clock=clock)
        assert floor.floor() <= clock + MAX_AHEAD_S
    assert floor.floor() == clock + MAX_AHEAD_S


def test_clock_is_unset_before_the_build_time() -> None:
    assert clock_unset(0.0, B) and clock_unset(B - 1, B) and clock_unset(math.nan, B)
    assert not clock_unset(B, B) and not clock_unset(T, B)
    assert horizon(0.0, B) == B + MAX_AHEAD_S == horizon(math.nan, B)


# -- confirmation: a box whose clock is unset ----------------------------------------------------------------------


def test_rtc_less_box_floor_raised_by_two_agreeing_sources_and_not_by_one(tmp_path: Path) -> None:
    floor = floor_at(tmp_path)
    boot = 1000.0  # the box woke up in 1970 and has been up 1000 s
    floor.prove(T, "tuf timestamp v7", kind="tuf", clock=boot)
    assert floor.floor() == B + MAX_AHEAD_S  # one source: the horizon of the build time, no further
    floor.prove(T + 60, "tuf timestamp v8", kind="tuf", clock=boot + 60)
    assert floor.floor() == B + MAX_AHEAD_S  # the same key again is still one source
    # A fleet command, signed by the other key, 30 minutes "later" than the timestamp after 100 s of uptime: agrees.
    assert floor.prove(T + 1800 + 100, "command", kind="command", clock=boot + 100)
    assert floor.floor() == T + 60  # the smaller of the two (the latest timestamp claim)
    assert floor.source == "command + tuf timestamp v8"


def test_one_stolen_key_cannot_confirm_itself(tmp_path: Path) -> None:
    floor = floor_at(tmp_path)
    for i in range(5):  # a command key thief signs agreeing far-future times
        floor.prove(T + 10 * YEAR + i, f"command {i}", kind="command", clock=1000.0 + i)
    assert floor.floor() == B + MAX_AHEAD_S


def test_disagreeing_sources_do_not_raise_the_floor(tmp_path: Path) -> None:
    # A stolen timestamp key says ten years ahead; the fleet's genuine command says T: no agreement, no raise.
    floor = floor_at(tmp_path)
    floor.prove(T + 10 * YEAR, "stolen timestamp", kind="tuf", clock=1000.0)
    floor.prove(T, "command", kind="command", clock=1010.0)
    assert floor.floor() == B + MAX_AHEAD_S


def test_sources_agree_across_uptime(tmp_path: Path) -> None:
    # A timestamp at boot and a command two days of uptime later: compared as offsets from the box's clock.
    floor = floor_at(tmp_path)
    floor.prove(T, "tuf", kind="tuf", clock=1000.0)
    floor.prove(T + 2 * 86400, "command", kind="command", clock=1000.0 + 2 * 86400)
    assert floor.floor() == T


def test_a_box_whose_clock_is_set_takes_no_confirmation(tmp_path: Path) -> None:
    # Both keys stolen, or one fleet clock wrong for both: a box with a set clock still stops at its horizon.
    floor = floor_at(tmp_path)
    floor.prove(T + YEAR, "tuf", kind="tuf", clock=T)
    floor.prove(T + YEAR, "command", kind="command", clock=T + 1)
    assert floor.floor() == T + 1 + MAX_AHEAD_S


def test_lower_bound_never_passes_the_box_clock_on_one_source(tmp_path: Path) -> None:
    floor = floor_at(tmp_path)
    floor.prove(T + 10 * YEAR, "stolen", kind="command", clock=T)
    assert floor.lower_bound() == T


# -- recovery ---------------------------------------------------------------------------------------------------------


def test_reset_brings_a_poisoned_floor_back_to_the_fleet_time(tmp_path: Path) -> None:
    path = tmp_path / "floor.json"
    # Two sources that agreed on a wrong time (one fleet with a wrong clock signs both) poisoned an RTC-less box.
    floor = TimeFloor(path, build_time=B)
    floor.prove(T + YEAR, "tuf", kind="tuf", clock=1000.0)
    floor.prove(T + YEAR, "command", kind="command", clock=1001.0)
    assert floor.floor() == T + YEAR
    assert floor.reset(T, clock=1002.0)
    assert floor.floor() == T and floor.source == "time/reset"
    assert TimeFloor(path, build_time=B).floor() == T
    # The reset forgot the claims: the poisoned timestamp claim cannot re-confirm with the next command.
    floor.prove(T + YEAR, "command", kind="command", clock=1003.0)
    assert floor.floor() == T


def test_reset_never_raises_and_never_goes_below_the_box_clock(tmp_path: Path) -> None:
    floor = floor_at(tmp_path)
    floor.prove(T, "tuf", kind="tuf", clock=T)
    assert not floor.reset(T + YEAR, clock=T)  # a stolen command key cannot use a reset to push the floor up
    assert floor.floor() == T
    assert floor.reset(0.0, clock=T - 50)  # a fleet clock far behind: the floor goes no lower than the box's own
    assert floor.floor() == T - 50
    with pytest.raises(ValueError, match="finite"):
        floor.reset(math.nan, clock=T)


def test_floor_file_from_before_the_rule_is_kept_reported_and_reset(tmp_path: Path) -> None:
    # Written by the old code, which believed any signed time: ten years ahead. Loaded as it is (the box cannot tell
    # it from a proven floor), reported as ahead, and lowered by the fleet's time/reset.
    path = tmp_path / "floor.json"
    path.write_text(json.dumps({"floor": T + 10 * YEAR, "source": "command"}))
    floor = TimeFloor(path, build_time=B)
    assert floor.floor() == T + 10 * YEAR and floor.ahead(T)
    assert floor.now(T) == T + 10 * YEAR  # until the reset, metadata is judged at that time
    assert floor.lower_bound() == 0.0  # nothing vouches for it: it must not lift the command floor
    floor.reset(T, clock=T)
    assert not floor.ahead(T) and floor.now(T) == T and floor.lower_bound() == T - MAX_AHEAD_S
    assert json.loads(path.read_text())["rule"] == 1


def test_floor_file_from_before_the_rule_still_readable_both_ways(tmp_path: Path) -> None:
    # An older firmware (after an A/B rollback) reads only "floor" and "source": the new file keeps both.
    path = tmp_path / "floor.json"
    path.write_text(json.dumps({"floor": T, "source": "tuf timestamp v9"}))
    floor = TimeFloor(path, build_time=B)
    assert (floor.floor(), floor.source, floor.lower_bound()) == (T, "tuf timestamp v9", 0.0)
    floor.prove(T + 60, "tuf timestamp v10", kind="tuf", clock=T + 60)
    doc = json.loads(path.read_text())
    assert (doc["floor"], doc["source"]) == (T + 60, "tuf timestamp v10")
    assert floor.lower_bound() == T + 60 - MAX_AHEAD_S
