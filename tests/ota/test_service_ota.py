"""Over-the-air updates end to end: a running `edge run` box, the fleet's broker (mutual TLS, ACLs from the registry),
the gateway with its rollout driver, and the TUF repository served over loopback HTTP.

A good release is rolled out and the box switches to it without restarting; a broken one fails its trial, the box
rolls back, the rollout aborts; after a restart the box runs the committed release from its slot.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_public_key

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "fleet"))  # the fleet fixtures (CA, registry, broker) are shared
sys.path.insert(0, str(ROOT / "tools" / "models"))

import ota_models  # noqa: E402
from fleet_fixtures import Fleet, FleetBroker, utcnow, wait_until  # noqa: E402
from repo_helpers import PUBLISHER, make_publisher_key  # noqa: E402
from static_server import StaticServer  # noqa: E402

from edge.fleet.config import BrokerConfig, GatewayConfig, IngestConfig, MetricsConfig, RolloutConfig  # noqa: E402
from edge.fleet.gateway import Gateway  # noqa: E402
from edge.fleet.models.repository import FleetRepository  # noqa: E402
from edge.fleet.rollout.driver import RolloutFiles, start_rollout  # noqa: E402
from edge.fleet.store import open_store  # noqa: E402
from edge.identity.did import public_from_did_key  # noqa: E402
from edge.wire.envelope import open_envelope  # noqa: E402
from edge.wire.records import InferenceRecord  # noqa: E402

BOX = "box-1"


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Fleet, FleetRepository]]:
    """A fleet with a model repository (before enrollment: the bundle carries its root), publisher acme, and
    digits 2.0.0 (good, int8 + float) and 3.0.0 (broken) published."""
    d = tmp_path / "fleet"
    d.mkdir()
    f = Fleet(d)
    repo = FleetRepository.init(d, now=utcnow())
    key, pub = make_publisher_key(tmp_path / "acme", PUBLISHER)
    repo.add_publisher(PUBLISHER, load_pem_public_key(pub.read_bytes()), ["digits"], now=utcnow())
    releases = ota_models.write_demo_releases(tmp_path / "releases")
    for rel in releases:
        repo.publish(
            rel.files["model"],
            name="digits",
            version=rel.version,
            publisher=PUBLISHER,
            publisher_key=key,
            now=utcnow(),
            golden=rel.files["golden"],
            float_variant=rel.files.get("float"),
            tolerance=1.6,
            latency_budget_ms=50.0,
        )
    try:
        yield f, repo
    finally:
        f.close()


def box_config(box_dir: Path, keys: Path, port: int, repo_url: str) -> Path:
    cfg = box_dir / "edge.toml"
    cfg.write_text(
        f"""
[device]
id = "{BOX}"
data_dir = "{box_dir / "data"}"
[source]
kind = "synthetic"
fps = 50
[sink]
kind = "telemetry"
[telemetry]
host = "127.0.0.1"
port = {port}
ca = "{keys / "fleet-ca.pem"}"
cert = "{keys / "device.pem"}"
key = "{keys / "device.key"}"
fleet_key = "{keys / "fleet-commands.pub"}"
batch_records = 20
batch_age_s = 0.3
[ota]
repository = "{repo_url}"
root = "{keys / "tuf-root.json"}"
"""
    )
    return cfg


def models_seen(url: str) -> list[str]:
    """The model ids of the box's stored inference records, collapsed into runs (what ran, in order)."""
    store = open_store(url)
    try:
        dev = store.device(BOX)
        assert dev is not None
        key = public_from_did_key(dev.did)
        runs: list[str] = []
        for stored in store.envelopes(BOX):
            for r in open_envelope(stored.data, key).records:
                if isinstance(r, InferenceRecord) and (not runs or runs[-1] != r.model_id):
                    runs.append(r.model_id)
        return runs
    finally:
        store.close()


def ota_events(url: str) -> list[tuple[str, str | None, str | None]]:
    store = open_store(url)
    try:
        return [(e.kind, e.data.get("version"), e.data.get("reason")) for e in store.events(kind_prefix="ota.")]
    finally:
        store.close()


def rollout_state(fleet_dir: Path) -> str | None:
    r = RolloutFiles(fleet_dir).current()
    return None if r is None else r.state


@pytest.mark.slow
def test_rollouts_update_a_running_box_and_roll_back_a_broken_release(fleet, tmp_path: Path) -> None:
    f, repo = fleet
    _record, creds = f.enroll(BOX)
    keys = creds.key.parent
    assert (keys / "tuf-root.json").read_bytes() == repo.root_bytes()  # provisioned by enrollment
    broker = FleetBroker(f, tmp_path / "broker")
    broker.start()
    gw_creds = f.client_creds("gateway")
    url = f"sqlite:///{f.dir / 'fleet.db'}"
    cfg = GatewayConfig(
        gateway=IngestConfig(id="gateway", fleet_dir=f.dir, store=url, batch_max=50),
        broker=BrokerConfig(host="127.0.0.1", port=f.port, ca=gw_creds.ca, cert=gw_creds.cert, key=gw_creds.key),
        metrics=MetricsConfig(enabled=False),
        rollout=RolloutConfig(interval_s=0.2, device_timeout_s=120.0),
    )
    gateway = Gateway(cfg)
    box: subprocess.Popen[bytes] | None = None
    with StaticServer(repo.repository_dir) as server:
        try:
            gateway.start()
            assert gateway.transport.wait_connected(10)
            box_dir = tmp_path / "box"
            box_dir.mkdir()
            config = box_config(box_dir, keys, f.port, server.url)
            log = (box_dir / "edge.log").open("wb")
            box = subprocess.Popen(
                [sys.executable, "-m", "edge", "run", "--config", str(config)], stdout=log, stderr=log
            )

            def online_with(model: str) -> bool:
                store = open_store(url)
                try:
                    return any(
                        s.device_id == BOX and s.state == "online" and s.model == model for s in store.statuses()
                    )
                finally:
                    store.close()

            assert wait_until(lambda: online_with("digits@1.0.0"), 30), (box_dir / "edge.log").read_text()[-3000:]

            store = open_store(url)
            try:
                start_rollout(f.dir, store, "digits", "2.0.0", [1.0], now=time.time(), abort_on=0.05)
            finally:
                store.close()
            assert wait_until(lambda: rollout_state(f.dir) == "completed", 60), (box_dir / "edge.log").read_text()[
                -3000:
            ]
            # The records switch to the new model while the same process keeps running.
            assert wait_until(lambda: models_seen(url)[-1:] == ["digits@2.0.0"], 20)
            assert box.poll() is None
            assert online_with("digits@2.0.0")
            assert ("ota.committed", "2.0.0", None) in ota_events(url)

            store = open_store(url)
            try:
                start_rollout(f.dir, store, "digits", "3.0.0", [1.0], now=time.time(), abort_on=0.05)
            finally:
                store.close()
            assert wait_until(lambda: rollout_state(f.dir) == "aborted", 60), (box_dir / "edge.log").read_text()[-3000:]
            assert ("ota.rolled_back", "3.0.0", "wrong_outputs") in ota_events(url)
            time.sleep(1.0)  # records keep flowing: still from 2.0.0, never from 3.0.0
            seen = models_seen(url)
            assert seen == ["digits@1.0.0", "digits@2.0.0"], seen
            assert box.poll() is None

            # A restart runs the committed release from its slot, not the factory model.
            box.send_signal(signal.SIGTERM)
            assert box.wait(30) == 0
            box = subprocess.Popen(
                [sys.executable, "-m", "edge", "run", "--config", str(config)], stdout=log, stderr=log
            )
            assert wait_until(lambda: online_with("digits@2.0.0"), 30), (box_dir / "edge.log").read_text()[-3000:]
        finally:
            if box is not None and box.poll() is None:
                box.send_signal(signal.SIGTERM)
                try:
                    box.wait(30)
                except subprocess.TimeoutExpired:
                    box.kill()
            gateway.stop()
            broker.stop()


def test_missing_trusted_root_turns_updates_off_not_the_service(tmp_path: Path, edge_cli) -> None:
    # A box configured for updates whose bundle lacks tuf-root.json (enrolled before the repository existed) keeps
    # doing its work: updates are off and the log says why.
    cfg = tmp_path / "edge.toml"
    out = tmp_path / "records.jsonl"
    cfg.write_text(
        f"""
[device]
data_dir = "{tmp_path / "data"}"
[source]
kind = "synthetic"
[sink]
kind = "jsonl"
path = "{out}"
[ota]
repository = "http://127.0.0.1:9/"
"""
    )
    proc = edge_cli("run", "--config", str(cfg), "--frames", "20")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "over-the-air updates disabled" in proc.stderr and "ota.root" in proc.stderr
    assert len(out.read_text().splitlines()) == 20
