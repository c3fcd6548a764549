"""The time floor: only rises, survives restarts, is persisted atomically, and rejects a corrupt file loudly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from edge.errors import ConfigError
from edge.ota.clock import TimeFloor


def test_starts_at_zero_and_never_lowers(tmp_path: Path) -> None:
    floor = TimeFloor(tmp_path / "floor.json")
    assert floor.floor() == 0.0 and floor.source == "none"
    assert not (tmp_path / "floor.json").exists()
    assert floor.prove(1_800_000_000.5, "tuf timestamp v3")
    assert not floor.prove(1_700_000_000, "command")  # older: ignored
    assert not floor.prove(1_800_000_000.5, "command")  # equal: not a rise
    assert floor.floor() == 1_800_000_000.5 and floor.source == "tuf timestamp v3"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, True])
def test_non_finite_values_are_ignored(tmp_path: Path, bad: float) -> None:
    floor = TimeFloor(tmp_path / "floor.json")
    assert not floor.prove(bad, "x")
    assert floor.floor() == 0.0


def test_persisted_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "floor.json"
    TimeFloor(path).prove(1_795_000_000, "firmware build")
    assert json.loads(path.read_text()) == {"floor": 1_795_000_000.0, "source": "firmware build"}
    again = TimeFloor(path)
    assert again.floor() == 1_795_000_000.0 and again.source == "firmware build"
    assert [p.name for p in tmp_path.iterdir()] == ["floor.json"]  # no temp files left behind


def test_now_is_max_of_clock_and_floor(tmp_path: Path) -> None:
    floor = TimeFloor(tmp_path / "floor.json")
    floor.prove(1_795_000_000, "t")
    assert floor.now(0.0) == 1_795_000_000  # a clock reset to 1970 is lifted to the floor
    assert floor.now(1_900_000_000) == 1_900_000_000  # a clock ahead is believed
    assert floor.now(math.nan) == 1_795_000_000


@pytest.mark.parametrize(
    "content", [b"", b"{", b"[]", b'{"floor": "x", "source": "s"}', b'{"floor": NaN, "source": "s"}', b'{"floor": 1}']
)
def test_corrupt_file_is_a_config_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "floor.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as ei:
        TimeFloor(path)
    assert str(path) in str(ei.value)
