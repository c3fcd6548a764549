"""The fleet verbs that meet the broker and the running gateway, against a real mosquitto configured by the fleet
directory's fragment and a real `edge gateway run` process:

- `edge fleet command` finds the broker in the fleet directory (the listener `edge fleet broker-config` recorded),
  with no gateway configuration on its command line;
- `edge fleet status` sees the running gateway's heartbeat, and calls its picture stale once the gateway stopped."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleet_fixtures import Fleet, FleetBroker, GatewayProcess, wait_until

ROOT = Path(__file__).resolve().parents[2]


def edge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge", *args], capture_output=True, text=True, timeout=90, check=False, cwd=ROOT
    )


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Fleet, FleetBroker]]:
    """A fleet with one enrolled box (not running) and an operator identity, and its broker (not started)."""
    f = Fleet(tmp_path / "fleet")
    f.enroll("cam-1")
    issued = edge("fleet", "ca", "issue-client", "operator", "--operator", "--dir", str(f.dir))
    assert issued.returncode == 0, issued.stderr
    broker = FleetBroker(f, tmp_path / "broker")
    try:
        yield f, broker
    finally:
        broker.stop()
        f.close()


def test_command_takes_the_broker_from_the_fleet_directory(fleet) -> None:
    f, broker = fleet
    down = edge("fleet", "command", "--dir", str(f.dir), "cam-1", "ping", "--wait", "1")
    assert down.returncode == 1 and "Traceback" not in down.stderr, down.stderr
    assert f"cannot connect to the broker at 127.0.0.1:{f.port}" in down.stderr
    assert "listener.json" in down.stderr  # where the address came from, so the operator knows what to fix
    broker.start()
    # Connected and published through the fleet directory's broker: the box is enrolled but not running, so the
    # broker says nobody is subscribed to its commands (not a connection failure).
    up = edge("fleet", "command", "--dir", str(f.dir), "cam-1", "ping", "--wait", "1")
    assert up.returncode == 1, up.stderr
    assert "cam-1 is not subscribed to its commands" in up.stderr, up.stderr
    # --port overrides the recorded listener.
    other = edge("fleet", "command", "--dir", str(f.dir), "--port", "1", "cam-1", "ping", "--wait", "1")
    assert other.returncode == 1 and "127.0.0.1:1 (from --host/--port)" in other.stderr, other.stderr


def test_status_sees_the_running_gateways_heartbeat_and_goes_stale_when_it_stops(fleet, tmp_path: Path) -> None:
    f, broker = fleet
    gateway = GatewayProcess(f.gateway_config(f.identity("gw-hb")), tmp_path / "gw")
    broker.start()  # after the identity: the broker reads its access rules when it starts
    try:
        gateway.start()

        def beats() -> list[dict]:
            proc = edge("fleet", "status", "--dir", str(f.dir), "--json")
            assert proc.returncode == 0, proc.stderr
            body = json.loads(proc.stdout)
            return [body["stale"], *body["gateways"]]

        # The first beat as it starts; the next as soon as it is connected (checked every second).
        assert wait_until(lambda: len(b := beats()) == 2 and b[1]["connected"], 30)
        stale, gw = beats()
        assert stale is False and (gw["gateway_id"], gw["connected"], gw["stopped_at"]) == ("gw-hb", True, None)
        text = edge("fleet", "status", "--dir", str(f.dir))
        assert "gateway gw-hb (" in text.stdout and "connected to the broker" in text.stdout
        assert "STALE" not in text.stdout
    finally:
        assert gateway.stop() == 0
    after = edge("fleet", "status", "--dir", str(f.dir))
    assert "STALE: the gateway stopped at" in after.stdout, after.stdout
    started = time.time()
    assert json.loads(edge("fleet", "status", "--dir", str(f.dir), "--json").stdout)["stale"] is True
    assert time.time() - started < 30
