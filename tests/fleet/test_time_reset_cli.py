"""`edge fleet command --at-box-floor`: the operator's way to reach a box whose time floor is wrongly in the future
(docs/commands.md, "Recovery: time/reset"). The command is issued at the command floor the box reported in its last
status, as the fleet store holds it; without such a status the operator is told what is missing, before anything is
signed or sent. The box's side of the recovery runs end to end in tests/test_device_commands.py."""

from __future__ import annotations

import datetime
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge.errors import ConfigError
from edge.fleet.cli.data import _box_time
from edge.fleet.config import default_store_url
from edge.fleet.pki.ca import FleetCA
from edge.fleet.store import open_store

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_800_000_000.0
FAR = NOW + 10 * 365 * 86400.0


def record(fleet: Path, device: str, status: dict) -> str:
    url = default_store_url(fleet)
    store = open_store(url)
    try:
        store.record_status(device, status, NOW)
    finally:
        store.close()
    return url


def times(command_floor: float) -> dict:
    return {"build": 1_793_491_200.0, "command_floor": command_floor, "command_not_before": 0.0, "ota_floor": None}


def test_at_box_floor_issues_at_the_floor_the_box_reported(tmp_path: Path) -> None:
    url = record(tmp_path, "cam-1", {"state": "online", "time": times(FAR)})
    assert _box_time(url, "cam-1", NOW) == FAR  # poisoned: a command issued now would be expired there
    record(tmp_path, "cam-2", {"state": "online", "time": times(NOW - 60)})
    assert _box_time(url, "cam-2", NOW) == NOW  # a healthy box: issued now, as without the option


@pytest.mark.parametrize(
    "status", [None, {"state": "online"}, {"state": "online", "time": {"command_floor": None}}], ids=str
)
def test_at_box_floor_without_a_reported_floor_names_the_device_and_the_fix(tmp_path: Path, status) -> None:
    url = record(tmp_path, "cam-1", status) if status is not None else default_store_url(tmp_path)
    with pytest.raises(ConfigError) as ei:
        _box_time(url, "cam-1", NOW)
    message = str(ei.value)
    assert "--at-box-floor" in message and "cam-1" in message and "edge gateway run" in message


def test_fleet_command_at_box_floor_refuses_before_signing_when_the_store_has_no_floor(tmp_path: Path) -> None:
    fleet = FleetCA.init(tmp_path / "fleet", now=datetime.datetime.now(datetime.UTC))
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'[gateway]\nfleet_dir = "{fleet.directory}"\n[broker]\nhost = "127.0.0.1"\nport = 1\n')
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge",
            "fleet",
            "command",
            "--config",
            str(cfg),
            "--at-box-floor",
            "cam-1",
            "time/reset",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 2, proc.stderr
    assert "--at-box-floor" in proc.stderr and "cam-1" in proc.stderr
    assert "cannot connect" not in proc.stderr and time.monotonic() - started < 30  # it never tried the broker
