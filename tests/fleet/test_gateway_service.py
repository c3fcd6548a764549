"""The gateway process against a real mosquitto (TLS, ACLs): ingest, acknowledgement after storage, shared
subscriptions, device status, metrics, and `edge gateway run` killed at random moments."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest
from fleet_fixtures import wait_until
from gateway_helpers import Publisher, SimDevice, gateway_config, gateway_toml
from mqtt_broker import free_port
from pg import fresh_database

from edge.fleet.gateway import Gateway
from edge.fleet.store import open_store

ROOT = Path(__file__).resolve().parents[2]


def stored_counters(url: str, device_id: str) -> list[int]:
    store = open_store(url)
    try:
        return [e.counter for e in store.envelopes(device_id)]
    finally:
        store.close()


def enroll(url: str, devices: list[SimDevice]) -> None:
    store = open_store(url)
    try:
        for d in devices:
            store.add_device(d.record())
    finally:
        store.close()


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleet.db'}"


def test_gateway_verifies_stores_and_counts_every_envelope(broker, pki, tmp_path, store_url) -> None:
    devices = [SimDevice(f"cam-{i}") for i in range(3)]
    enroll(store_url, devices)
    port = free_port()
    gw = Gateway(gateway_config(broker, pki, tmp_path, store_url, metrics_port=port))
    gw.start()
    try:
        assert gw.transport.wait_connected(10)
        time.sleep(0.3)  # the SUBSCRIBE is queued right after CONNACK; let the broker register it
        pubs = [Publisher(broker, pki, d.id, key=d.key) for d in devices]
        for _ in range(20):
            for d, p in zip(devices, pubs, strict=True):
                p.publish(f"devices/{d.id}/telemetry", d.seal(10))
        # An attacker with a valid certificate of its own replays cam-0's envelope on its own topic.
        intruder = SimDevice("cam-x")
        ip = Publisher(broker, pki, intruder.id, key=intruder.key)
        ip.publish("devices/cam-x/telemetry", devices[0].seal(10))
        for p in [*pubs, ip]:
            p.close()
        assert wait_until(lambda: all(len(stored_counters(store_url, d.id)) >= 20 for d in devices), 20)
        assert wait_until(lambda: gw.ingest.stats.rejected == 1, 10)
        for d in devices:
            assert stored_counters(store_url, d.id) == list(range(1, 21))
        store = open_store(store_url)
        rows = store.ledger()
        assert sum(r.records for r in rows) == 3 * 20 * 10
        assert {r.device_id for r in rows} == {d.id for d in devices}
        assert all(r.inferences == {"digits@1.0.0": 200} for r in rows)
        assert store.quarantine_counts() == {"wrong_topic": 1}
        store.close()
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'edge_gateway_envelopes_total{verdict="first"} 3.0' in text
        assert 'edge_gateway_envelopes_total{verdict="next"} 57.0' in text
        assert 'edge_gateway_rejects_total{reason="wrong_topic"} 1.0' in text
        assert "edge_gateway_records_total 600.0" in text
        assert "edge_gateway_ingest_latency_seconds_count 61.0" in text
    finally:
        stats = gw.stop()
    assert stats.accepted == 60 and stats.rejected == 1 and stats.records == 600


def test_device_status_follows_birth_and_will(broker, pki, tmp_path, store_url) -> None:
    dev = SimDevice("cam-s")
    enroll(store_url, [dev])
    gw = Gateway(gateway_config(broker, pki, tmp_path, store_url))
    gw.start()
    try:
        assert gw.transport.wait_connected(10)
        time.sleep(0.3)
        # The device's own client: birth retained on connect, Last Will when the connection dies without a goodbye.
        creds = pki.client(dev.id, key=dev.key)
        script = Path(__file__).with_name("status_device.py")
        child = subprocess.Popen(
            [
                sys.executable,
                str(script),
                broker.host,
                str(broker.port),
                str(creds.ca),
                str(creds.cert),
                str(creds.key),
                dev.id,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None and child.stdout.readline().strip() == "online"

        def status():
            s = open_store(store_url)
            try:
                return next(x for x in s.statuses() if x.device_id == dev.id)
            finally:
                s.close()

        assert wait_until(lambda: status().state == "online", 10)
        st = status()
        assert st.model == "digits@1.0.0" and st.outbox_backlog == 7 and st.reason is None
        child.kill()  # no DISCONNECT: the broker publishes the will
        child.wait()
        assert wait_until(lambda: status().state == "offline", 15)
        st = status()
        assert st.reason == "lost" and st.model == "digits@1.0.0"  # what it ran is still known while it is away
    finally:
        gw.stop()


def test_two_gateways_split_the_load_and_store_each_envelope_once(broker, pki, tmp_path, store_url) -> None:
    devices = [SimDevice(f"box-{i}") for i in range(4)]
    enroll(store_url, devices)
    gws = [Gateway(gateway_config(broker, pki, tmp_path, store_url, gateway_id=f"gw-{i}")) for i in range(2)]
    for g in gws:
        g.start()
    try:
        assert all(g.transport.wait_connected(10) for g in gws)
        time.sleep(0.3)
        pubs = [Publisher(broker, pki, d.id, key=d.key) for d in devices]
        for _ in range(30):
            for d, p in zip(devices, pubs, strict=True):
                p.publish(f"devices/{d.id}/telemetry", d.seal(5))
        for p in pubs:
            p.close()
        assert wait_until(lambda: sum(g.ingest.stats.accepted for g in gws) >= 120, 30)
    finally:
        stats = [g.stop() for g in gws]
    assert all(s.accepted > 0 for s in stats), "the shared subscription did not split the load"
    assert sum(s.accepted for s in stats) == 120 and sum(s.rejected for s in stats) == 0
    for d in devices:
        assert stored_counters(store_url, d.id) == list(range(1, 31))
    store = open_store(store_url)
    assert all(r.missing == 0 for r in store.ledger())
    store.close()


@pytest.mark.slow
def test_gateway_killed_at_random_moments_loses_nothing(broker, pki, tmp_path, store_url) -> None:
    """kill -9 of `edge gateway run` while devices publish: the broker keeps what was not acknowledged, so after
    restarts every envelope is stored exactly once (acknowledged only after the transaction committed)."""
    devices = [SimDevice(f"dev-{i}") for i in range(3)]
    enroll(store_url, devices)
    cfg_path = tmp_path / "gateway.toml"
    cfg_path.write_text(gateway_toml(gateway_config(broker, pki, tmp_path, store_url, batch_max=20)))

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "edge", "gateway", "run", "--config", str(cfg_path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def wait_connected(proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if '"connected"' in line:
                return
        raise AssertionError("gateway did not connect")

    proc = start()
    wait_connected(proc)
    time.sleep(0.3)
    pubs = [Publisher(broker, pki, d.id, key=d.key) for d in devices]
    rng = random.Random(7)
    per_device = 0
    try:
        for _round in range(4):
            for _ in range(rng.randint(15, 40)):
                for d, p in zip(devices, pubs, strict=True):
                    p.publish(f"devices/{d.id}/telemetry", d.seal(20))
                per_device += 1
            time.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            # Published while the gateway is down: queued by the broker for the gateway's persistent session.
            for _ in range(rng.randint(5, 15)):
                for d, p in zip(devices, pubs, strict=True):
                    p.publish(f"devices/{d.id}/telemetry", d.seal(20))
                per_device += 1
            proc = start()
            wait_connected(proc)
        assert wait_until(lambda: all(len(stored_counters(store_url, d.id)) == per_device for d in devices), 60, 0.5), {
            d.id: len(stored_counters(store_url, d.id)) for d in devices
        }
    finally:
        for p in pubs:
            p.close()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err[-2000:]
    summary = json.loads(out.strip().splitlines()[-1])["gateway"]
    assert summary["rejected"] == 0
    for d in devices:
        assert stored_counters(store_url, d.id) == list(range(1, per_device + 1))
    store = open_store(store_url)
    rows = store.ledger()
    store.close()
    assert sum(r.envelopes for r in rows) == 3 * per_device
    assert sum(r.records for r in rows) == 3 * per_device * 20
    assert all(r.missing == 0 for r in rows)


def test_database_outage_is_retried_until_the_batch_commits(broker, pki, tmp_path, pg_admin_url) -> None:
    """PostgreSQL refuses connections for a while: the batch is retried (nothing acknowledged, nothing skipped) and
    stored once the database is back."""
    with fresh_database(pg_admin_url) as url:
        name = url.rsplit("/", 1)[1]
        dev = SimDevice("pg-box")
        enroll(url, [dev])
        gw = Gateway(gateway_config(broker, pki, tmp_path, url))
        gw.start()
        pub = None
        try:
            assert gw.transport.wait_connected(10)
            time.sleep(0.3)
            pub = Publisher(broker, pki, dev.id, key=dev.key)
            pub.publish(f"devices/{dev.id}/telemetry", dev.seal(5))
            assert wait_until(lambda: gw.ingest.stats.accepted == 1, 10)
            with psycopg.connect(pg_admin_url, autocommit=True) as admin:
                admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            try:
                for _ in range(5):
                    pub.publish(f"devices/{dev.id}/telemetry", dev.seal(5))
                assert wait_until(lambda: gw.ingest.stats.store_errors >= 2, 15)
                assert gw.ingest.stats.accepted == 1
            finally:
                with psycopg.connect(pg_admin_url, autocommit=True) as admin:
                    admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
            assert wait_until(lambda: gw.ingest.stats.accepted == 6, 30)
        finally:
            if pub is not None:
                pub.close()
            stats = gw.stop()
        assert stats.rejected == 0 and stats.duplicates == 0
        assert stored_counters(url, dev.id) == [1, 2, 3, 4, 5, 6]
