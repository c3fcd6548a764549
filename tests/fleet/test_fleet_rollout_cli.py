"""`edge fleet rollout start|status|abort` as an operator runs them (real subprocesses) over a real store and the
fleet directory's rollout files."""

from __future__ import annotations

import json
import os
import signal
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

    again = fleet(tmp_path, "start", "digits", "2.0.1")  # a conflict with the state, not a usage error: exit 1
    assert again.returncode == 1 and f"rollout {rid}" in again.stderr and "still running" in again.stderr

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
    assert fleet(tmp_path, "abort").returncode == 1  # nothing is running any more
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
    status = fleet(tmp_path, "status")  # an empty state: exit 0
    assert status.returncode == 0 and "no rollout" in status.stdout


def test_list_shows_history_newest_first_and_abort_marks_unreached_devices_skipped(tmp_path: Path) -> None:
    populate(tmp_path)
    assert fleet(tmp_path, "list").stdout.startswith("no rollouts yet")
    first = json.loads(fleet(tmp_path, "start", "digits", "2.0.0", "--stages", "50%,100%", "--json").stdout)
    assert fleet(tmp_path, "abort").returncode == 0
    status = json.loads(fleet(tmp_path, "status", "--json").stdout)
    # No gateway ran, so the abort came before any device was commanded: none was reached and none ever will be,
    # so they are skipped, not waiting.
    outcomes = {d["device_id"]: d["outcome"] for d in status["devices"]}
    assert sorted(outcomes.values()) == ["skipped", "skipped"], outcomes
    assert status["stages"][1]["skipped"] == 1 and status["stages"][1]["waiting"] == 0
    text = fleet(tmp_path, "status")
    assert "SKIPPED" in text.stdout and text.stdout.count("skipped") == 2, text.stdout

    time.sleep(1.1)  # created_at orders the history; a second apart
    second = json.loads(fleet(tmp_path, "start", "digits", "2.0.1", "--devices", "box-3", "--json").stdout)
    listed = fleet(tmp_path, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["id"] for r in rows] == [second["id"], first["id"]]  # newest first
    assert (rows[0]["state"], rows[0]["current"], rows[0]["devices"]) == ("running", True, 1)
    assert (rows[1]["state"], rows[1]["reason"], rows[1]["skipped"], rows[1]["current"]) == (
        "aborted", "operator", 2, False
    )  # fmt: skip
    assert rows[1]["created_at"].endswith("Z")
    table = fleet(tmp_path, "list")
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "STARTED", "FINISHED"]
    assert lines[1].startswith(f"{second['id']} *") and "digits 2.0.1" in lines[1] and "running" in lines[1]
    assert lines[2].startswith(first["id"]) and "aborted (operator)" in lines[2]


def test_status_watch_redraws_until_ctrl_c(tmp_path: Path) -> None:
    populate(tmp_path)
    fleet(tmp_path, "start", "digits", "2.0.0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "fleet", "rollout", "status", "--dir", str(tmp_path), "--watch", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        redraws = 0
        deadline = time.monotonic() + 30
        while redraws < 2 and time.monotonic() < deadline:
            redraws += proc.stdout.readline().startswith("edge fleet rollout status at ")
        assert redraws == 2
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0 and "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
