"""What an operator watches and relies on: ``/healthz``, per-box gauges, and the gateway re-signing the TUF timestamp.

Every test runs ``edge gateway run`` as a process against a real mosquitto configured from a real fleet directory,
with a real TUF repository made by ``FleetRepository.init`` (its own keys) where the repository matters.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_metrics import PROMETHEUS_SERIES, dashboard_exprs, exposed_metrics, rule_exprs, used_metrics
from fleet_fixtures import Client, Fleet, FleetBroker, GatewayProcess, utcnow, wait_until
from gateway_helpers import inference_records
from mqtt_broker import free_port
from tuf.api.metadata import Metadata, Root, Timestamp

from edge.fleet.config import MetricsConfig
from edge.fleet.models.freshness import check_interval, refresh_due, repository_lock
from edge.fleet.models.repository import FleetRepository
from edge.identity.keys import load_private_key
from edge.wire.envelope import GENESIS_PREV, envelope_hash, seal_envelope


@dataclasses.dataclass
class Ops:
    fleet: Fleet
    broker: FleetBroker
    gateway: GatewayProcess
    port: int

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def healthz(self) -> tuple[int, dict[str, object]]:
        code, body = self.get("/healthz")
        return code, json.loads(body)

    def samples(self, prefix: str) -> dict[str, float]:
        """Every sample of /metrics whose name starts with ``prefix``, by its full name with labels."""
        _code, text = self.get("/metrics")
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(prefix)
        }


@pytest.fixture
def ops(tmp_path: Path) -> Iterator[Ops]:
    """A fleet, its broker, and (not yet started) a gateway with metrics on a free port."""
    fleet = Fleet(tmp_path / "fleet")
    broker = FleetBroker(fleet, tmp_path / "broker")
    broker.start()
    port = free_port()
    cfg = fleet.gateway_config(fleet.identity("gw-ops"))
    cfg = dataclasses.replace(cfg, metrics=MetricsConfig(enabled=True, port=port))
    gateway = GatewayProcess(cfg, tmp_path / "gw")
    try:
        yield Ops(fleet, broker, gateway, port)
    finally:
        gateway.stop()
        broker.stop()
        fleet.close()


def _timestamp(fleet_dir: Path) -> Metadata[Timestamp]:
    return Metadata.from_bytes((fleet_dir / "repository" / "metadata" / "timestamp.json").read_bytes())


def _verify_timestamp(fleet_dir: Path) -> Metadata[Timestamp]:
    """The current timestamp, checked as a box checks it: signed by the root's timestamp keys, not expired."""
    root: Metadata[Root] = Metadata.from_bytes((fleet_dir / "repository" / "metadata" / "root.json").read_bytes())
    ts = _timestamp(fleet_dir)
    root.verify_delegate("timestamp", ts)  # raises if the signature does not verify
    assert not ts.signed.is_expired(utcnow()), ts.signed.expires
    return ts


def test_healthz_is_200_while_connected_and_503_naming_the_broker_once_it_stops(ops: Ops) -> None:
    ops.gateway.start()
    assert wait_until(lambda: ops.healthz()[0] == 200, 15), ops.healthz()
    _code, body = ops.healthz()
    assert body["status"] == "ok" and body["broker"] == "connected" and body["store"] == "ok", body
    assert wait_until(lambda: ops.samples("edge_gateway_store_up")["edge_gateway_store_up"] == 1.0, 5)

    ops.broker.stop()
    assert wait_until(lambda: ops.healthz()[0] == 503, 15), ops.healthz()
    _code, body = ops.healthz()
    assert body["status"] == "unavailable" and body["broker"] == "disconnected", body
    assert f"broker 127.0.0.1:{ops.broker.port}: not connected" in body["reasons"], body  # type: ignore[operator]
    assert wait_until(lambda: ops.samples("edge_gateway_connected")["edge_gateway_connected"] == 0.0, 5)
    assert ops.gateway.alive  # unhealthy, not dead: it reconnects when the broker returns

    ops.broker.start()
    assert wait_until(lambda: ops.healthz()[0] == 200, 20), ops.healthz()


def test_per_box_gauges_cover_exactly_the_enrolled_unrevoked_boxes(ops: Ops) -> None:
    _rec, creds = ops.fleet.enroll("cam-1")
    ops.fleet.enroll("cam-2")  # enrolled, never heard from
    ops.fleet.enroll("cam-3")
    ops.fleet.store.revoke_device("cam-3", time.time())
    ops.broker.restart()  # the broker loads the boxes' access rules when it starts
    ops.gateway.start()
    box = Client(ops.broker, creds)
    try:
        key = load_private_key(creds.key)
        prev = GENESIS_PREV
        for counter in (1, 2, 5):  # 3 and 4 never arrive: a gap of two
            data = seal_envelope("cam-1", counter, prev, inference_records("cam-1", counter, 2), time.time(), key)
            assert box.publish("devices/cam-1/telemetry", data) == "Success"
            prev = envelope_hash(data)
        status = {"state": "online", "outbox_backlog": 7}
        assert box.publish("devices/cam-1/status", json.dumps(status).encode(), retain=True) == "Success"
    finally:
        box.close()

    head = 'edge_gateway_device_chain_head{device="cam-1"}'
    assert wait_until(lambda: ops.samples(head).get(head) == 5.0, 30), ops.samples("edge_gateway_device")
    s = ops.samples("edge_gateway_device_")
    assert s['edge_gateway_device_gaps{device="cam-1"}'] == 2.0
    assert abs(s['edge_gateway_device_last_seen_timestamp_seconds{device="cam-1"}'] - time.time()) < 60
    assert wait_until(
        lambda: (
            ops.samples("edge_gateway_device_backlog").get('edge_gateway_device_backlog_envelopes{device="cam-1"}')
            == 7.0
        ),
        30,
    ), ops.samples("edge_gateway_device_")
    s = ops.samples("edge_gateway_device_")
    assert s['edge_gateway_device_online{device="cam-1"}'] == 1.0
    assert s['edge_gateway_device_rejects_total{device="cam-1"}'] == 0.0
    # cam-2 is enrolled but never heard: counted, with no made-up liveness; cam-3 is revoked: no series at all.
    assert s['edge_gateway_device_gaps{device="cam-2"}'] == 0.0
    assert 'edge_gateway_device_online{device="cam-2"}' not in s
    assert not [k for k in s if "cam-3" in k], s
    devices = {k.split('device="')[1].split('"')[0] for k in s if 'device="' in k}
    assert devices == {"cam-1", "cam-2"}

    # With every kind of series present, the deploy files (alert rules, dashboard) use only what is exported.
    used = used_metrics(rule_exprs() + dashboard_exprs()) - PROMETHEUS_SERIES
    exposed = exposed_metrics(ops.get("/metrics")[1])
    assert used <= exposed, sorted(used - exposed)


def test_gateway_resigns_the_timestamp_before_it_expires_and_again_on_its_timer(ops: Ops) -> None:
    # A lifetime of 17.3 s: re-signed with under a third (5.8 s) left, so about every 11.5 s; checked every 1.7 s.
    FleetRepository.init(ops.fleet.dir, now=utcnow(), expiry_days={"timestamp": 0.0002})
    first = _timestamp(ops.fleet.dir).signed.version
    ops.gateway.start()
    versions = {first}
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline and len(versions) < 3:
        # A box polling all along never sees an expired or badly signed timestamp.
        versions.add(_verify_timestamp(ops.fleet.dir).signed.version)
        time.sleep(0.5)
    assert len(versions) >= 3, versions
    log = ops.gateway.log_text()
    assert log.count('"tuf timestamp re-signed"') >= 2, log[-3000:]
    assert ops.samples("edge_gateway_tuf_refreshes_total")['edge_gateway_tuf_refreshes_total{result="ok"}'] >= 2
    expiry = ops.samples("edge_gateway_tuf_timestamp_expiry")["edge_gateway_tuf_timestamp_expiry_timestamp_seconds"]
    assert abs(expiry - _timestamp(ops.fleet.dir).signed.expires.timestamp()) < 10


def test_a_fresh_timestamp_is_left_alone_and_a_stale_one_waits_for_the_repository_lock(ops: Ops) -> None:
    # Signed 20 hours ago with the default lifetime of a day: 4 h left, under a third. Due at once.
    FleetRepository.init(ops.fleet.dir, now=utcnow() - datetime.timedelta(hours=20))
    before = _timestamp(ops.fleet.dir)
    with repository_lock(ops.fleet.dir) as held:  # an operator's `edge fleet models publish` in progress
        assert held
        ops.gateway.start()
        time.sleep(3)
        assert _timestamp(ops.fleet.dir).signed.version == before.signed.version  # never while another writes
    assert wait_until(lambda: _timestamp(ops.fleet.dir).signed.version == before.signed.version + 1, 15)
    after = _verify_timestamp(ops.fleet.dir)
    assert after.signed.expires - utcnow() > datetime.timedelta(hours=23)
    # Fresh now: the next checks leave it alone (every re-sign is a download for every box).
    time.sleep(3)
    assert _timestamp(ops.fleet.dir).signed.version == after.signed.version
    assert ops.gateway.log_text().count('"tuf timestamp re-signed"') == 1


def test_a_failed_resign_is_logged_and_retried_and_the_gateway_keeps_running(ops: Ops) -> None:
    FleetRepository.init(ops.fleet.dir, now=utcnow() - datetime.timedelta(hours=20))
    (key_file,) = (ops.fleet.dir / "tuf" / "keys" / "timestamp").glob("*.pem")
    good = key_file.read_bytes()
    key_file.write_bytes(b"not a key\n")  # a corrupted key file: signing fails
    before = _timestamp(ops.fleet.dir).signed.version
    ops.gateway.start()
    assert wait_until(lambda: '"tuf refresh failed"' in ops.gateway.log_text(), 15), ops.gateway.log_text()[-2000:]
    line = next(json.loads(x) for x in ops.gateway.log_text().splitlines() if '"tuf refresh failed"' in x)
    assert line["level"] == "error" and str(key_file) in line["error"], line
    assert ops.samples("edge_gateway_tuf")['edge_gateway_tuf_refreshes_total{result="failed"}'] >= 1
    assert ops.gateway.alive and ops.healthz()[0] == 200
    assert _timestamp(ops.fleet.dir).signed.version == before

    key_file.write_bytes(good)  # the operator fixes the key: the retry (within 10 s) re-signs
    assert wait_until(lambda: _timestamp(ops.fleet.dir).signed.version == before + 1, 20)
    _verify_timestamp(ops.fleet.dir)


def test_keys_kept_offline_are_said_once_and_nothing_is_signed(ops: Ops) -> None:
    FleetRepository.init(ops.fleet.dir, now=utcnow() - datetime.timedelta(hours=20))
    for role in ("snapshot", "timestamp"):
        for f in (ops.fleet.dir / "tuf" / "keys" / role).glob("*.pem"):
            f.unlink()  # the operator keeps them on another machine and runs `edge fleet models refresh` there
    before = _timestamp(ops.fleet.dir).signed.version
    ops.gateway.start()
    assert wait_until(lambda: "edge fleet models refresh" in ops.gateway.log_text(), 15)
    assert ops.gateway.log_text().count("edge fleet models refresh") == 1
    assert _timestamp(ops.fleet.dir).signed.version == before
    assert ops.gateway.alive
    # Its expiry is still exported: EdgeTufTimestampExpiring watches whoever re-signs it elsewhere.
    expiry = ops.samples("edge_gateway_tuf_timestamp")["edge_gateway_tuf_timestamp_expiry_timestamp_seconds"]
    assert expiry == _timestamp(ops.fleet.dir).signed.expires.timestamp()


def test_fleet_models_commands_wait_for_the_repository_lock(tmp_path: Path) -> None:
    # The other side of the lock: `edge fleet models refresh` (like publish) never writes while a gateway signs.
    fleet = tmp_path / "fleet"
    FleetRepository.init(fleet, now=utcnow())
    version = _timestamp(fleet).signed.version
    args = [sys.executable, "-m", "edge", "fleet", "--dir", str(fleet), "models", "refresh"]
    with repository_lock(fleet) as held:
        assert held
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(3)
        assert _timestamp(fleet).signed.version == version
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert _timestamp(fleet).signed.version == version + 1


def _at(hours: float) -> datetime.datetime:
    return datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(hours=hours)


LIFETIMES = {"timestamp": 1.0, "snapshot": 7.0}


@pytest.mark.parametrize(
    ("timestamp_left_h", "snapshot_left_h", "due"),
    [
        (23, 160, None),  # just signed
        (8.01, 160, None),  # a third of a day is 8 h: not yet
        (7.99, 160, "timestamp"),
        (-1, 160, "timestamp"),  # expired already (the gateway was down): at once
        (20, 55, "snapshot"),  # a third of 7 days is 56 h
    ],
)
def test_refresh_is_due_with_less_than_a_third_of_a_lifetime_left(
    timestamp_left_h: float, snapshot_left_h: float, due: str | None
) -> None:
    expiries = {"timestamp": _at(timestamp_left_h), "snapshot": _at(snapshot_left_h), "root": _at(1)}
    assert refresh_due(expiries, LIFETIMES, _at(0)) == due


def test_checks_run_every_tenth_of_the_timestamps_lifetime_within_bounds() -> None:
    assert check_interval({"timestamp": 1.0}) == 60.0  # a day: every minute
    assert check_interval({"timestamp": 0.0001}) == pytest.approx(1.0)  # 8.6 s: every second, not faster
    assert check_interval({"timestamp": 0.005}) == pytest.approx(43.2)
