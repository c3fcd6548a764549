"""`edge fleet status` and the shared conventions of the fleet verbs, as an operator runs them: real processes over
a real fleet directory and SQLite store.

What is checked: `--dir`/`--store` after the verb as well as before it; `--json` output that parses on every verb
that prints data, with ISO 8601 UTC times; the gateway heartbeat (a stale or missing one is said loudly); when each
box was last seen; the backlog draining as envelopes arrive; revoked boxes shown as revoked; `--watch` redrawing
until Ctrl-C, which exits 0; and an `examples:` block in each verb's help."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gateway_helpers import SimDevice

from edge.fleet.store import GatewayHeartbeat, Inbound, open_store

ROOT = Path(__file__).resolve().parents[2]


def edge(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge", *args], capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT
    )


def iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def beat(fleet: Path, at: float, *, stopped: bool = False, gateway: str = "gw-1") -> None:
    store = open_store(f"sqlite:///{fleet / 'fleet.db'}")
    try:
        store.beat(GatewayHeartbeat(gateway, "host-a", 4242, at - 600, at, True, at if stopped else None))
    finally:
        store.close()


@pytest.fixture
def fleet(tmp_path: Path) -> dict[str, object]:
    """A fleet store: cam-a online (5 envelopes, backlog 4 reported after the 3rd), cam-b revoked, cam-c silent."""
    a, b, c = SimDevice("cam-a"), SimDevice("cam-b"), SimDevice("cam-c")
    store = open_store(f"sqlite:///{tmp_path / 'fleet.db'}")
    seen = float(int(time.time()) - 90)
    try:
        for d in (a, b, c):
            store.add_device(d.record())
        store.ingest([Inbound("devices/cam-a/telemetry", a.seal(), seen - 10) for _ in range(3)])
        birth = {"state": "online", "model": "digits@1.0.0", "outbox_backlog": 4, "ts": seen}
        store.record_status("cam-a", birth, seen)
        store.record_status("cam-a", birth, seen + 30)  # the retained copy again: no new report, no sign of life
        store.ingest([Inbound("devices/cam-a/telemetry", a.seal(), seen) for _ in range(2)])  # two of the four arrive
        store.record_status("cam-b", {"state": "online", "model": "digits@1.0.0"}, seen)
        store.revoke_device("cam-b", seen + 5)
    finally:
        store.close()
    return {"dir": tmp_path, "seen": seen}


def status_json(fleet_dir: Path, *extra: str) -> dict:
    proc = edge("fleet", "status", "--dir", str(fleet_dir), "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    body: dict = json.loads(proc.stdout)
    return body


def test_dir_and_store_work_after_the_verb_as_well_as_before(fleet) -> None:
    d = fleet["dir"]
    after = edge("fleet", "status", "--dir", str(d), "--json")
    before = edge("fleet", "--dir", str(d), "status", "--json")
    assert after.returncode == before.returncode == 0, after.stderr + before.stderr
    devices = [x["device_id"] for x in json.loads(after.stdout)["devices"]]
    assert devices == [x["device_id"] for x in json.loads(before.stdout)["devices"]] == ["cam-a", "cam-b", "cam-c"]
    # Given after the verb it wins over the one before; not repeated, the one before stays (SUPPRESS defaults).
    wrong = d / "elsewhere"
    wrong.mkdir()
    override = edge("fleet", "--dir", str(wrong), "status", "--dir", str(d), "--json")
    assert [x["device_id"] for x in json.loads(override.stdout)["devices"]] == devices
    store = edge("fleet", "--dir", str(wrong), "status", "--store", f"sqlite:///{d / 'fleet.db'}", "--json")
    assert [x["device_id"] for x in json.loads(store.stdout)["devices"]] == devices
    nested = edge("fleet", "rollout", "list", "--dir", str(d), "--json")
    assert nested.returncode == 0 and json.loads(nested.stdout) == [], nested.stderr


def test_status_shows_last_seen_revoked_and_the_backlog_less_what_arrived_since(fleet) -> None:
    body = status_json(fleet["dir"])
    a, b, c = body["devices"]
    seen = fleet["seen"]
    assert (a["state"], a["last_seen"], a["last_counter"]) == ("online", iso(seen), 5)
    assert 80 <= a["last_seen_age_s"] < 600
    # Reported 4 waiting when the head was 3; 2 accepted since: 2 still waiting, as far as the fleet can tell.
    assert (a["outbox_backlog"], a["backlog_reported"], a["backlog_reported_at"]) == (2, 4, iso(seen))
    assert (b["state"], b["reported_state"], b["revoked_at"]) == ("revoked", "online", iso(seen + 5))
    assert (c["state"], c["last_seen"], c["outbox_backlog"]) == ("unknown", None, None)
    text = edge("fleet", "status", "--dir", str(fleet["dir"]))
    assert text.returncode == 0, text.stderr
    row_b = next(line for line in text.stdout.splitlines() if line.startswith("cam-b"))
    assert "revoked" in row_b.split()
    row_a = next(line for line in text.stdout.splitlines() if line.startswith("cam-a"))
    assert iso(seen) in row_a and "min" in row_a  # last seen, and how long ago
    assert "3 devices, 1 online, 1 revoked, 1 offline or never seen" in text.stdout


def test_status_says_stale_without_a_gateway_heartbeat(fleet) -> None:
    d = fleet["dir"]
    never = edge("fleet", "status", "--dir", str(d))
    assert never.returncode == 0
    assert "STALE: no gateway heartbeat was ever recorded" in never.stdout and "edge gateway run" in never.stdout
    assert status_json(d)["stale"] is True

    old = time.time() - 120
    beat(d, old)
    stale = edge("fleet", "status", "--dir", str(d))
    assert f"gateway gw-1 (host-a, pid 4242): last heartbeat {iso(old)}" in stale.stdout
    line = next(x for x in stale.stdout.splitlines() if x.startswith("STALE"))
    age = int(line.split("no gateway heartbeat for ")[1].split(" s;")[0])
    assert 119 <= age < 300 and "is `edge gateway run` running?" in line
    assert "--stale-after" in edge("fleet", "status", "--help").stdout
    assert status_json(d, "--stale-after", "600")["stale"] is False  # the threshold is the operator's

    beat(d, time.time())
    fresh = edge("fleet", "status", "--dir", str(d))
    assert "STALE" not in fresh.stdout + fresh.stderr and "connected to the broker" in fresh.stdout
    body = status_json(d)
    assert body["stale"] is False and body["gateways"][0]["gateway_id"] == "gw-1"
    assert body["gateways"][0]["heartbeat_age_s"] < 60

    beat(d, time.time(), stopped=True)  # a clean stop: the picture stops being kept at once
    stopped = edge("fleet", "status", "--dir", str(d))
    assert "STALE: the gateway stopped at" in stopped.stdout


def test_status_watch_redraws_until_ctrl_c_and_exits_0(fleet) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "fleet", "status", "--dir", str(fleet["dir"]), "--watch", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        titles, rows = 0, 0
        deadline = time.monotonic() + 30
        while titles < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            titles += line.startswith("edge fleet status at ") and "Ctrl-C to stop" in line
            rows += line.startswith("cam-a")
        assert titles == 2 and rows >= 1  # two redraws, each with the table
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_json_parses_on_every_data_verb(fleet) -> None:
    d = str(fleet["dir"])
    out = Path(d) / "cam-a.ledger"
    for args in (
        ["status"],
        ["ledger"],
        ["devices"],
        ["claims", "list"],
        ["rollout", "list"],
        ["rollout", "status"],
        ["ledger", "--device", "cam-a", "--export", str(out)],
        ["ledger-verify", str(out)],
    ):
        proc = edge("fleet", *args, "--dir", d, "--json")
        assert proc.returncode == 0, (args, proc.stderr)
        json.loads(proc.stdout)  # the whole of stdout is one JSON document
    devices = json.loads(edge("fleet", "devices", "--dir", d, "--json").stdout)
    for row in devices:
        assert row["enrolled_at"].endswith("Z")
        datetime.datetime.fromisoformat(row["enrolled_at"])  # ISO 8601


@pytest.mark.parametrize(
    "verb",
    [
        ["status"],
        ["ledger"],
        ["ledger-verify"],
        ["command"],
        ["devices"],
        ["revoke"],
        ["ca", "init"],
        ["claims", "list"],
        ["rollout", "list"],
        ["rollout", "status"],
        ["doctor"],
    ],
    ids=" ".join,
)
def test_help_ends_with_examples(verb: list[str]) -> None:
    proc = edge("fleet", *verb, "--help")
    assert proc.returncode == 0, proc.stderr
    examples = proc.stdout.split("\nexamples:\n", 1)[1]
    assert examples.startswith("  edge fleet"), examples
    assert "--dir DIR" in proc.stdout  # the global options are the verb's too
