"""End-to-end receipts against real processes: a box's telemetry (DeviceTelemetry in this process), mosquitto
configured by the fleet's fragment, and `edge gateway run` storing into SQLite and signing receipts.

The faults are the ones the issue names: the gateway away while the broker queues, the broker SIGKILLed with
envelopes it had acknowledged, the box restarted with a backlog. In every case the box's outbox empties only
through receipts, and the store holds every counter the box sealed, once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleet_fixtures import Client, Fleet, FleetBroker, GatewayProcess, wait_until

from edge.config import parse_config
from edge.fleet.store import open_store
from edge.identity.keys import load_private_key
from edge.telemetry.device import DeviceTelemetry
from edge.wire.envelope import GENESIS_PREV, envelope_hash, seal_envelope
from edge.wire.receipts import GENESIS_HASH, Receipt, sign_receipt
from edge.wire.records import ReadingRecord

DEVICE = "box-r1"


def box_document(fleet: Fleet, keys: Path, **telemetry) -> dict:
    return {
        "device": {"id": DEVICE, "data_dir": str(keys.parent / "data")},
        "sink": {"kind": "telemetry"},
        "telemetry": {
            "host": "127.0.0.1",
            "port": fleet.port,
            "ca": str(keys / "fleet-ca.pem"),
            "cert": str(keys / "device.pem"),
            "key": str(keys / "device.key"),
            "fleet_key": str(keys / "fleet-commands.pub"),
            "receipt_key": str(keys / "fleet-receipts.pub"),
            "batch_records": 1,
            **telemetry,
        },
    }


def box_config(fleet: Fleet, keys: Path, **telemetry):
    return parse_config(box_document(fleet, keys, **telemetry))


def telemetry_status(fleet: Fleet, keys: Path, tmp: Path) -> dict:
    """`edge telemetry status --json` as a process, on a TOML file with the box's configuration."""
    doc = box_document(fleet, keys)
    lines = []
    for section, values in doc.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    conf = tmp / "box.toml"
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "edge", "telemetry", "status", "--config", str(conf), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def new_box(cfg) -> DeviceTelemetry:
    box = DeviceTelemetry(cfg, model_id="m@1", model_sha256="0" * 64, backend="numpy")
    box.start()
    return box


def write(box: DeviceTelemetry, n: int) -> None:
    for i in range(n):
        box.sink.write([ReadingRecord(channel=1, value=float(i), timestamp=time.time())])
    box.sink.flush()


def stored_counters(fleet: Fleet) -> list[int]:
    with open_store(fleet.store_url) as store:
        return [e.counter for e in store.envelopes(DEVICE)]


@pytest.fixture
def rig(tmp_path):
    fleet = Fleet(tmp_path / "fleet")
    _record, creds = fleet.enroll(DEVICE)
    gw_creds = fleet.identity("gateway")
    broker = FleetBroker(fleet, tmp_path / "broker")
    broker.start()
    gateway = GatewayProcess(fleet.gateway_config(gw_creds, receipt_interval_s=0.05), tmp_path / "gw")
    yield fleet, creds.cert.parent, broker, gateway
    gateway.stop()
    broker.stop()
    fleet.close()


def test_outbox_empties_through_receipts_only(rig, tmp_path) -> None:
    fleet, keys, _broker, gateway = rig
    gateway.start()
    box = new_box(box_config(fleet, keys))
    try:
        write(box, 30)
        assert wait_until(lambda: box.outbox.stats().backlog_envelopes == 0, 30)
        delivery = box.outbox.delivery()
        assert delivery.receipted_envelopes == 30 and delivery.acked_envelopes == 0
        assert delivery.head == 30 and delivery.stored == 30 and delivery.receipt is not None
        assert stored_counters(fleet) == list(range(1, 31))
        status = telemetry_status(fleet, keys, tmp_path)  # while the service runs
        assert status["delivery"] == "receipts" and status["sealed"] == 30 and status["receipted"] == 30
        assert status["waiting"] == 0 and status["latest_receipt"]["verified"] is True
        assert status["latest_receipt"]["stored"] == 30
    finally:
        box.close()


def test_gateway_away_keeps_everything_then_the_receipt_empties_the_outbox(rig) -> None:
    fleet, keys, _broker, gateway = rig
    # The gateway's persistent session exists (it subscribed once), then it goes away: the broker queues for it.
    gateway.start()
    gateway.stop()
    box = new_box(box_config(fleet, keys))
    try:
        write(box, 20)
        assert wait_until(lambda: box.publisher.stats().unreceipted == 20, 20)
        time.sleep(0.5)
        assert box.outbox.stats().backlog_envelopes == 20  # PUBACKed, not receipted: kept
        gateway.start()
        assert wait_until(lambda: box.outbox.stats().backlog_envelopes == 0, 30)
        assert stored_counters(fleet) == list(range(1, 21))
    finally:
        box.close()


def test_broker_killed_with_acknowledged_envelopes_costs_a_resend_not_data(rig) -> None:
    fleet, keys, broker, gateway = rig
    gateway.start()
    gateway.stop()  # the broker now queues for the gateway's session, in memory only (persistence false here)
    box = new_box(box_config(fleet, keys, receipt_timeout_s=1.0))
    try:
        write(box, 15)
        assert wait_until(lambda: box.publisher.stats().unreceipted == 15, 20)
        broker.proc.kill()  # type: ignore[union-attr]  # SIGKILL: everything it acknowledged is gone
        broker.proc.wait()  # type: ignore[union-attr]
        broker.start()
        gateway.start()
        assert wait_until(lambda: box.outbox.stats().backlog_envelopes == 0, 60)
        assert stored_counters(fleet) == list(range(1, 16))
        assert box.publisher.stats().resent >= 15
    finally:
        box.close()


def test_restarted_box_resends_only_what_the_fleet_lacks(rig) -> None:
    fleet, keys, _broker, gateway = rig
    gateway.start()
    cfg = box_config(fleet, keys, receipt_timeout_s=60.0)
    box = new_box(cfg)
    write(box, 10)
    assert wait_until(lambda: box.outbox.stats().backlog_envelopes == 0, 30)
    gateway.stop()
    write(box, 5)  # published, acknowledged by the broker, queued for the stopped gateway
    assert wait_until(lambda: box.publisher.stats().unreceipted == 5, 20)
    box.close()
    gateway.start()  # stores the 5 from its session queue while the box is down
    assert wait_until(lambda: len(stored_counters(fleet)) == 15, 30)
    again = new_box(cfg)
    try:
        # The birth asks, the gateway answers: the 5 are receipted without being published again.
        assert wait_until(lambda: again.outbox.stats().backlog_envelopes == 0, 30)
        assert again.publisher.stats().published == 0

        # Its birth status, as the fleet stored it, reports how it delivers and the receipt it kept from before.
        def info() -> dict:
            with open_store(fleet.store_url) as store:
                return next(s.info for s in store.statuses() if s.device_id == DEVICE)

        assert wait_until(lambda: info().get("state") == "online", 20), info()
        assert info()["delivery"] == "receipts" and info()["receipt"]["stored"] >= 10
    finally:
        again.close()


def test_receipt_signed_by_another_key_deletes_nothing(rig) -> None:
    fleet, keys, _broker, _gateway = rig
    box = new_box(box_config(fleet, keys))  # no gateway: nothing is receipted
    try:
        write(box, 3)
        assert wait_until(lambda: box.outbox.stats().backlog_envelopes == 3, 10)
        mallory = Ed25519PrivateKey.generate()
        forged = sign_receipt(Receipt(DEVICE, 3, b"\x01" * 32, 3, b"\x01" * 32, 3, (), time.time(), "mallory"), mallory)
        box._on_receipt(forged)  # what the network thread does with a message on devices/<id>/receipts
        real_key_wrong_history = sign_receipt(
            Receipt(DEVICE, 0, GENESIS_HASH, 7, b"\x02" * 32, 0, ((1, 6),), time.time(), "gw"),
            fleet_receipt_key(fleet),
        )
        box._on_receipt(real_key_wrong_history)  # counters this box never sealed: another history
        time.sleep(0.5)
        assert box.outbox.stats().backlog_envelopes == 3
        assert box.receipts_rejected == 1
        assert box.publisher.stats().receipt_failures == 1
    finally:
        box.close()


def fleet_receipt_key(fleet: Fleet) -> Ed25519PrivateKey:
    from edge.fleet.pki.receipt_key import ensure_receipt_key  # noqa: PLC0415

    return ensure_receipt_key(fleet.dir)


def test_gateway_logs_every_gap_with_the_box_and_the_counters(rig) -> None:
    fleet, keys, broker, gateway = rig
    gateway.start()
    key = load_private_key(keys / "device.key")
    client = Client(broker, _box_creds(keys))
    try:
        prev, envs = GENESIS_PREV, []
        for c in range(1, 6):
            data = seal_envelope(DEVICE, c, prev, [ReadingRecord(1, 1.0, time.time())], time.time(), key)
            envs.append(data)
            prev = envelope_hash(data)
        for c in (1, 2, 5):  # 3 and 4 skipped: one gap
            client.publish(f"devices/{DEVICE}/telemetry", envs[c - 1])
        assert wait_until(lambda: len(stored_counters(fleet)) == 3, 20)
        gap = [e for e in _events(gateway) if e.get("msg") == "gap in a box's chain: envelopes missing"]
        assert len(gap) == 1 and gap[0]["level"] == "warning"
        assert (gap[0]["device"], gap[0]["first_missing"], gap[0]["last_missing"], gap[0]["missing"]) == (
            DEVICE,
            3,
            4,
            2,
        )
    finally:
        client.close()


def _box_creds(keys: Path):
    from fleet_fixtures import Creds  # noqa: PLC0415

    return Creds(DEVICE, keys / "fleet-ca.pem", keys / "device.pem", keys / "device.key")


def _events(gateway: GatewayProcess) -> list[dict]:
    out = []
    for line in gateway.log_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out
