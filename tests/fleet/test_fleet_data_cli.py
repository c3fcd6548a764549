"""`edge fleet status|ledger|ledger-verify` as an operator runs them (real subprocesses) over a real store."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gateway_helpers import SimDevice

from edge.fleet.store import Inbound, open_store

ROOT = Path(__file__).resolve().parents[2]


def fleet(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge", "fleet", "--dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )


@pytest.fixture
def populated(tmp_path: Path) -> dict[str, SimDevice]:
    """Two devices in the default store: one sent 5 envelopes with counter 3 missing and is online; one is silent."""
    a, b = SimDevice("cam-a"), SimDevice("cam-b")
    store = open_store(f"sqlite:///{tmp_path / 'fleet.db'}")
    try:
        for d in (a, b):
            store.add_device(d.record())
        envs = [a.seal(4) for _ in range(5)]
        now = time.time()
        store.ingest([Inbound("devices/cam-a/telemetry", e, now) for i, e in enumerate(envs) if i != 2])
        store.ingest([Inbound("devices/cam-b/telemetry", envs[0], now)])  # a's envelope on b's topic: rejected
        store.record_status("cam-a", {"state": "online", "model": "digits@1.0.0", "outbox_backlog": 3}, now)
    finally:
        store.close()
    return {"a": a, "b": b}


def test_status_json_lists_state_chain_gaps_rejects_and_backlog(tmp_path, populated) -> None:
    proc = fleet(tmp_path, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    devices = {d["device_id"]: d for d in json.loads(proc.stdout)["devices"]}
    a, b = devices["cam-a"], devices["cam-b"]
    assert (a["state"], a["last_counter"], a["gaps"], a["model"], a["outbox_backlog"]) == (
        "online",
        5,
        1,
        "digits@1.0.0",
        3,
    )
    assert b["state"] == "unknown" and b["last_counter"] is None
    # Attributed to the device whose topic it came on (the broker authenticated it), not to the signer it names.
    assert (a["rejects"], b["rejects"]) == (0, 1)
    text = fleet(tmp_path, "status")
    assert text.returncode == 0 and "cam-a" in text.stdout and "1 online" in text.stdout


def test_ledger_json_counts_verified_work(tmp_path, populated) -> None:
    proc = fleet(tmp_path, "ledger", "--json")
    assert proc.returncode == 0, proc.stderr
    a, b = json.loads(proc.stdout)["ledger"]
    assert a["device_id"] == "cam-a" and a["envelopes"] == 4 and a["records"] == 16
    assert a["inferences"] == {"digits@1.0.0": 16} and a["missing"] == 1 and a["rejects"] == 0
    assert (a["claimed"], a["credited"], a["uncredited"]["duplicate_input"]) == (16, 16, 0)
    assert (b["device_id"], b["rejects"], b["claimed"]) == ("cam-b", 1, 0)
    text = fleet(tmp_path, "ledger")
    assert text.returncode == 0 and "16 inferences claimed, 16 credited" in text.stdout


def test_export_verifies_and_tampering_is_caught(tmp_path, populated) -> None:
    out = tmp_path / "cam-a.ledger"
    proc = fleet(tmp_path, "ledger", "--device", "cam-a", "--export", str(out))
    assert proc.returncode == 0, proc.stderr
    claimed = json.loads(proc.stdout)
    assert claimed["envelopes"] == 4 and claimed["gaps"] == 1
    verify = [sys.executable, "-m", "edge", "fleet", "ledger-verify", "--json", str(out), "--key",
              str(tmp_path / "ledger.pub")]  # fmt: skip
    ok = subprocess.run(verify, capture_output=True, text=True, cwd=ROOT, check=False)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["records"] == 16
    lines = out.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["totals"]["records"] == 16
    header["totals"]["records"] = 17  # a claim of more work than the envelopes prove
    out.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    bad = subprocess.run(verify, capture_output=True, text=True, cwd=ROOT, check=False)
    assert bad.returncode == 3 and "does not verify" in bad.stderr and "Traceback" not in bad.stderr
    # Without the ledger key there is nothing to check the signature against: a usage error naming the option.
    nokey = subprocess.run(verify[:-2], capture_output=True, text=True, cwd=ROOT, check=False)
    assert nokey.returncode == 2 and "--key" in nokey.stderr and "Traceback" not in nokey.stderr


def test_export_needs_a_device(tmp_path, populated) -> None:
    proc = fleet(tmp_path, "ledger", "--export", str(tmp_path / "x.ledger"))
    assert proc.returncode == 2 and "--device" in proc.stderr


def test_ledger_verify_did_pins_the_identity_the_export_must_be_for(tmp_path, populated) -> None:
    out = tmp_path / "cam-a.ledger"
    assert fleet(tmp_path, "ledger", "--device", "cam-a", "--export", str(out)).returncode == 0
    a, b = populated["a"].record().did, populated["b"].record().did
    right = fleet(tmp_path, "ledger-verify", str(out), "--did", a)
    assert right.returncode == 0, right.stderr
    assert f"verified {out}: cam-a ({a})" in right.stdout  # a line for people; --json for scripts
    # A valid export, signed by the fleet, but of another device than the one the verifier asked about.
    wrong = fleet(tmp_path, "ledger-verify", str(out), "--did", b)
    assert wrong.returncode == 3, wrong.stderr
    assert a in wrong.stderr and b in wrong.stderr and "does not verify" in wrong.stderr
    assert "Traceback" not in wrong.stderr and wrong.stdout == ""
