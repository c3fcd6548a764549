"""`edge fleet rollout start|status|abort` as an operator runs them (real subprocesses) over a real store and the
fleet directory's rollout files."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from gateway_helpers import SimDevice

from edge.fleet.rollout.planner import Rollout
from edge.fleet.store import open_store

ROOT = Path(__file__).resolve().parents[2]


def fleet(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge", "fleet", "--dir", str(tmp_path), "rollout", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )


def populate(tmp_path: Path) -> None:
    """Four enrolled devices: three run digits (one of them revoked), one runs another model."""
    store = open_store(f"sqlite:///{tmp_path / 'fleet.db'}")
    try:
        for i, model in enumerate(["digits@1.0.0", "digits@1.0.0", "digits@1.0.0", "faces@3"]):
            d = SimDevice(f"box-{i}")
            store.add_device(d.record())
            store.record_status(d.id, {"state": "online", "model": model}, time.time())
        store.revoke_device("box-2", time.time())
    finally:
        store.close()


def test_start_status_abort_as_an_operator_runs_them(tmp_path: Path) -> None:
    populate(tmp_path)
    started = fleet(tmp_path, "start", "digits", "2.0.0", "--stages", "50%,100%", "--abort-on", "10%", "--json")
    assert started.returncode == 0, started.stderr
    body = json.loads(started.stdout)
    assert sorted(d["device_id"] for d in body["devices"]) == ["box-0", "box-1"]  # not revoked, not faces
    assert (body["state"], body["stage"], body["abort_on_percent"]) == ("running", 1, 10.0)
    assert [s["devices"] for s in body["stages"]] == [1, 2]
    rid = body["id"]
    assert (tmp_path / "rollouts" / "current").read_text().strip() == rid
    assert Rollout.decode((tmp_path / "rollouts" / f"{rid}.json").read_bytes()).version == "2.0.0"

    again = fleet(tmp_path, "start", "digits", "2.0.1")
    assert again.returncode == 2 and f"rollout {rid}" in again.stderr and "still running" in again.stderr

    status = fleet(tmp_path, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["id"] == rid
    text = fleet(tmp_path, "status")
    assert text.returncode == 0 and f"rollout {rid}: digits 2.0.0  running" in text.stdout and "box-0" in text.stdout

    aborted = fleet(tmp_path, "abort")
    assert aborted.returncode == 0, aborted.stderr
    assert f"rollout {rid} aborted" in aborted.stdout
    after = json.loads(fleet(tmp_path, "status", "--json").stdout)
    assert (after["state"], after["reason"]) == ("aborted", "operator")
    assert fleet(tmp_path, "abort").returncode == 2  # nothing is running any more
    restarted = fleet(tmp_path, "start", "digits", "2.0.1", "--devices", "box-3", "--json")
    assert restarted.returncode == 0, restarted.stderr  # the aborted one no longer blocks a new one
    assert [d["device_id"] for d in json.loads(restarted.stdout)["devices"]] == ["box-3"]
    old = fleet(tmp_path, "status", "--id", rid, "--json")
    assert json.loads(old.stdout)["state"] == "aborted"


def test_start_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    populate(tmp_path)
    none = fleet(tmp_path, "start", "nobody-runs-this", "1.0")
    assert none.returncode == 2 and "no eligible devices" in none.stderr
    revoked = fleet(tmp_path, "start", "digits", "2.0.0", "--devices", "box-0,box-2")
    assert revoked.returncode == 2 and "box-2" in revoked.stderr
    bad = fleet(tmp_path, "start", "digits", "2.0.0", "--stages", "50%,10%")
    assert bad.returncode == 2 and "--stages" in bad.stderr
    assert not (tmp_path / "rollouts" / "current").exists()
    status = fleet(tmp_path, "status")
    assert status.returncode == 2 and "no rollout" in status.stderr
