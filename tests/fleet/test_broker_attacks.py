"""Hostile boxes against the broker the fleet generates: a real mosquitto run only from `edge fleet`'s fragment,
boxes with their own enrolled keys and certificates running a plain MQTT client (the attacker's choice), and a
running gateway (the `Gateway` class, or `edge gateway run`) that applies the registry to the broker live.

Each attack has its own test. What must hold: a box connects only as itself, cannot reach the gateways' shared
subscription or another box's topics, publishes only its own telemetry, status and replies, cannot send oversized
packets or dynamic-security commands; enroll and revoke take effect within seconds without a broker restart.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import cbor2
import pytest
from fleet_fixtures import Client, Creds, Fleet, FleetBroker, utcnow, wait_until

from edge.fleet.gateway import Gateway
from edge.fleet.pki.registry import MAX_PACKET_BYTES
from edge.identity.keys import generate_device_identity
from edge.wire.commands import KEY_NONCE
from edge.wire.schema import DEFAULT_LIMITS

ROOT = Path(__file__).resolve().parents[2]
SYNC_S = 15.0  # the gateway polls the registry every 2 s; generous for a loaded CI machine


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path / "fleet")
    yield f
    f.close()


@pytest.fixture
def broker(fleet: Fleet, tmp_path: Path) -> Iterator[FleetBroker]:
    b = FleetBroker(fleet, tmp_path / "mosquitto")
    yield b
    b.stop()


@pytest.fixture
def boxes(fleet: Fleet, broker: FleetBroker) -> dict[str, Creds]:
    """Two enrolled boxes and a gateway identity, then the broker started from the generated files."""
    creds = {name: fleet.enroll(name)[1] for name in ("cam-a", "cam-b")}
    creds["gateway-1"] = fleet.identity("gateway-1")
    broker.start()
    return creds


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    opened: list[Client] = []
    yield opened
    for c in opened:
        c.close()


def connect(broker: FleetBroker, clients: list[Client], creds: Creds, client_id: str | None = None) -> Client:
    c = Client(broker, creds, client_id)
    clients.append(c)
    assert c.connected, c.connect_result
    return c


def ingest_group(broker: FleetBroker, clients: list[Client], gateway: Creds) -> Client:
    g = connect(broker, clients, gateway)
    assert g.subscribe("$share/ingest/devices/+/telemetry") == "Granted QoS 1"
    return g


@pytest.fixture
def gateway(fleet: Fleet, boxes: dict[str, Creds]) -> Iterator[Gateway]:
    gw = Gateway(fleet.gateway_config(boxes["gateway-1"]))
    gw.start()
    try:
        assert gw.transport.wait_connected(10)
        assert wait_until(lambda: gw.broker_sync.syncs >= 1, SYNC_S), gw.broker_sync.last_error
        yield gw
    finally:
        gw.stop()


def can_publish(broker: FleetBroker, creds: Creds, topic: str) -> bool:
    c = Client(broker, creds, timeout=2)
    try:
        return c.connected and c.publish(topic, b"x") == "Success"
    finally:
        c.close()


# -- sessions ---------------------------------------------------------------------------------------------------------


def test_box_cannot_take_over_another_boxs_session(boxes, broker, clients) -> None:
    a = connect(broker, clients, boxes["cam-a"])
    assert a.subscribe("devices/cam-a/commands") == "Granted QoS 1"
    # cam-b asks for cam-a's client id: the broker makes it "cam-b" (the CN), so cam-a's session is untouched.
    b = connect(broker, clients, boxes["cam-b"], client_id="cam-a")
    time.sleep(0.5)
    assert not a.disconnected.is_set(), a.disconnect_reason
    assert b.publish("devices/cam-a/telemetry", b"as cam-a") == "Not authorized"  # it is still cam-b
    assert b.publish("devices/cam-b/telemetry", b"as itself") == "Success"
    gw = connect(broker, clients, boxes["gateway-1"])
    assert gw.publish("devices/cam-a/commands", b"cmd") == "Success"
    assert wait_until(lambda: len(a.received("devices/cam-a/commands")) == 1, 5)
    assert b.received() == []


def test_box_cannot_take_over_the_gateways_session(fleet, boxes, broker, clients, gateway) -> None:
    connects = gateway.transport.connects
    evil = connect(broker, clients, boxes["cam-b"], client_id="gateway-1")
    time.sleep(1.0)
    assert gateway.transport.connected and gateway.transport.connects == connects  # never kicked
    assert evil.subscribe("$share/ingest/devices/+/telemetry") == "Not authorized"
    assert evil.publish("devices/cam-a/commands", b"forged") == "Not authorized"
    # The gateway still gets the telemetry of its group: a malformed envelope is quarantined, i.e. it arrived.
    a = connect(broker, clients, boxes["cam-a"])
    before = gateway.ingest.stats.messages
    assert a.publish("devices/cam-a/telemetry", b"not an envelope") == "Success"
    assert wait_until(lambda: gateway.ingest.stats.messages > before, 10)


def test_gateway_identity_belongs_to_gateway_certificates_alone(fleet, boxes, broker, clients) -> None:
    gw = connect(broker, clients, boxes["gateway-1"])
    # Even a certificate of the fleet CA that the registry never recorded is not a gateway by its client id.
    stranger = connect(broker, clients, fleet.client_creds("stranger"), client_id="gateway-1")
    time.sleep(0.5)
    assert not gw.disconnected.is_set(), gw.disconnect_reason
    assert stranger.subscribe("devices/+/status") == "Not authorized"
    assert stranger.publish("devices/cam-a/commands", b"x") == "Not authorized"


# -- subscriptions ----------------------------------------------------------------------------------------------------


def test_box_cannot_join_the_shared_ingest_group(boxes, broker, clients) -> None:
    g = ingest_group(broker, clients, boxes["gateway-1"])
    evil = connect(broker, clients, boxes["cam-b"])
    assert evil.subscribe("$share/ingest/devices/+/telemetry") == "Not authorized"
    assert evil.subscribe("$share/other/devices/+/telemetry") == "Not authorized"
    a = connect(broker, clients, boxes["cam-a"])
    for i in range(20):
        assert a.publish("devices/cam-a/telemetry", b"%d" % i) == "Success"
    # Not one envelope dealt to the box (and then dropped): the gateway gets all 20.
    assert wait_until(lambda: len(g.received()) == 20, 10), len(g.received())
    time.sleep(0.3)
    assert len(g.received()) == 20 and evil.received() == []


def test_box_cannot_subscribe_to_another_boxs_topics(boxes, broker, clients) -> None:
    evil = connect(broker, clients, boxes["cam-b"])
    for topic in (
        "devices/cam-a/commands",
        "devices/cam-a/telemetry",
        "devices/cam-a/replies",
        "devices/cam-a/#",
        "devices/+/telemetry",
        "devices/+/status",
        "devices/#",
        "#",
        "$SYS/#",
        "$CONTROL/dynamic-security/v1/response",
    ):
        assert evil.subscribe(topic) == "Not authorized", topic
    assert evil.subscribe("devices/cam-b/commands") == "Granted QoS 1"  # its own, the one it needs
    assert evil.subscribe("devices/cam-b/telemetry") == "Not authorized"  # least privilege: not even its own


# -- publishing -------------------------------------------------------------------------------------------------------


def test_box_cannot_publish_outside_its_namespace(boxes, broker, clients) -> None:
    evil = connect(broker, clients, boxes["cam-b"])
    for topic in (
        "devices/cam-a/telemetry",
        "devices/cam-a/status",
        "devices/cam-a/replies",
        "devices/cam-a/commands",
        "devices/cam-b/other",
        "devices/cam-b",
        "elsewhere",
    ):
        assert evil.publish(topic, b"x") == "Not authorized", topic
    for topic in ("devices/cam-b/telemetry", "devices/cam-b/status", "devices/cam-b/replies"):
        assert evil.publish(topic, b"x") == "Success", topic


def test_box_cannot_publish_on_its_own_commands_topic(boxes, broker, clients) -> None:
    box = connect(broker, clients, boxes["cam-b"])
    assert box.subscribe("devices/cam-b/commands") == "Granted QoS 1"
    # Only the fleet (gateway, operator) commands a box; a box forging its own commands is refused at the broker.
    assert box.publish("devices/cam-b/commands", b"self-made") == "Not authorized"
    time.sleep(0.3)
    assert box.received() == []


def test_box_cannot_send_dynamic_security_commands(boxes, broker, clients) -> None:
    evil = connect(broker, clients, boxes["cam-b"])
    grant = {"commands": [{"command": "addClientRole", "username": "cam-b", "rolename": "edge-gateway"}]}
    assert evil.publish("$CONTROL/dynamic-security/v1", json.dumps(grant).encode()) == "Not authorized"
    assert evil.subscribe("$share/ingest/devices/+/telemetry") == "Not authorized"  # still nothing more


def test_oversized_publish_disconnects_the_box_and_others_keep_flowing(boxes, broker, clients) -> None:
    g = ingest_group(broker, clients, boxes["gateway-1"])
    a = connect(broker, clients, boxes["cam-a"])
    evil = connect(broker, clients, boxes["cam-b"])
    # The largest legal envelope still passes.
    assert a.publish("devices/cam-a/telemetry", b"\0" * DEFAULT_LIMITS.max_envelope_bytes) == "Success"
    evil.client.publish("devices/cam-b/telemetry", b"\0" * (MAX_PACKET_BYTES + 1), qos=1)
    assert evil.disconnected.wait(5), "the broker kept a client that sent an oversized packet"
    assert "oversize packet" in broker.log.read_text()
    for i in range(5):
        assert a.publish("devices/cam-a/telemetry", b"%d" % i) == "Success"
    assert wait_until(lambda: len(g.received()) == 6, 10)
    assert {m.topic for m in g.received()} == {"devices/cam-a/telemetry"}


# -- the live sync ----------------------------------------------------------------------------------------------------


def test_gateway_applies_the_registry_at_connect(fleet, boxes, broker, clients) -> None:
    _, late = fleet.enroll("cam-late")  # the broker runs and did not load it
    assert not can_publish(broker, late, "devices/cam-late/telemetry")
    gw = Gateway(fleet.gateway_config(boxes["gateway-1"]))
    gw.start()
    try:
        assert wait_until(lambda: can_publish(broker, late, "devices/cam-late/telemetry"), SYNC_S)
    finally:
        gw.stop()


def test_gateway_on_an_empty_store_does_not_empty_the_broker(fleet, boxes, broker, gateway, clients, tmp_path) -> None:
    """A careless operator starts a second gateway whose [gateway] store is a fresh, empty database: its registry
    names no device, and applying it would delete every box from the broker. It refuses, says why, and the boxes
    keep publishing."""
    creds = fleet.identity("gateway-2")
    assert wait_until(lambda: connect(broker, clients, creds).connected, SYNC_S)  # the running gateway applied it
    cfg = fleet.gateway_config(creds)
    cfg = replace(cfg, gateway=replace(cfg.gateway, store=f"sqlite:///{tmp_path / 'empty.db'}"))
    wrong = Gateway(cfg)
    wrong.start()
    try:
        assert wait_until(lambda: "names no device" in (wrong.broker_sync.last_error or ""), SYNC_S)
        assert "is [gateway] store this fleet's database" in (wrong.broker_sync.last_error or "")
        assert can_publish(broker, boxes["cam-a"], "devices/cam-a/telemetry")
        assert can_publish(broker, boxes["cam-b"], "devices/cam-b/telemetry")
    finally:
        wrong.stop()


def test_gateway_repairs_access_rules_changed_behind_the_registrys_back(fleet, boxes, broker, gateway, clients) -> None:
    # Another gateway identity (or anyone with $CONTROL rights) grants cam-b the gateway role.
    other = connect(broker, clients, fleet.identity("gateway-2"))  # applied live by the running gateway
    grant = {"commands": [{"command": "addClientRole", "username": "cam-b", "rolename": "edge-gateway"}]}
    assert wait_until(
        lambda: other.publish("$CONTROL/dynamic-security/v1", json.dumps(grant).encode()) == "Success", SYNC_S
    )

    def status_subscription() -> str:
        c = Client(broker, boxes["cam-b"], timeout=2)
        try:
            return c.subscribe("devices/+/status") if c.connected else "not connected"
        finally:
            c.close()

    assert wait_until(lambda: status_subscription() == "Granted QoS 1", 5)  # the grant took effect
    # A full comparison (at connect, on every registry change, and every few minutes) removes it; cause one now.
    fleet.registry.write_broker_fragment(fleet.ca, now=utcnow())
    assert wait_until(lambda: status_subscription() == "Not authorized", SYNC_S)


def test_box_enrolled_while_the_gateway_runs_connects_without_broker_restart(fleet, boxes, broker, tmp_path) -> None:
    config = tmp_path / "gateway.toml"
    gw = boxes["gateway-1"]
    config.write_text(
        f'[gateway]\nfleet_dir = "{fleet.dir}"\n'  # no id: the CN of broker.cert ("gateway-1")
        f'[broker]\nhost = "127.0.0.1"\nport = {fleet.port}\nca = "{gw.ca}"\ncert = "{gw.cert}"\nkey = "{gw.key}"\n'
        "[metrics]\nenabled = false\n[rollout]\nenabled = false\n"
    )
    log = (tmp_path / "gateway.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "gateway", "run", "--config", str(config)], cwd=ROOT, stdout=log, stderr=log
    )
    pid = broker.proc.pid if broker.proc else None
    try:
        keys = tmp_path / "new-box"
        ident = generate_device_identity(keys, "cam-new")
        enroll = subprocess.run(
            [sys.executable, "-m", "edge", "fleet", "--dir", str(fleet.dir), "enroll", str(ident.csr)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert enroll.returncode == 0, enroll.stderr
        assert "a running `edge gateway run` applies it" in enroll.stderr and "restart the broker" in enroll.stderr
        for f in Path(enroll.stdout.strip()).iterdir():
            shutil.copy(f, keys / f.name)
        box = Creds("cam-new", keys / "fleet-ca.pem", keys / "device.pem", keys / "device.key")
        started = time.monotonic()
        assert wait_until(lambda: can_publish(broker, box, "devices/cam-new/telemetry"), SYNC_S), (
            tmp_path / "gateway.log"
        ).read_text()[-2000:]
        assert time.monotonic() - started < SYNC_S
        assert broker.proc is not None and broker.proc.pid == pid and broker.proc.poll() is None  # no restart
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "gateway.log").read_text()[-2000:]


def test_revoked_box_is_kicked_and_refused_while_the_gateway_runs(fleet, boxes, broker, clients, gateway) -> None:
    box = connect(broker, clients, boxes["cam-b"])
    assert box.subscribe("devices/cam-b/commands") == "Granted QoS 1"
    revoke = subprocess.run(
        [sys.executable, "-m", "edge", "fleet", "--dir", str(fleet.dir), "revoke", "cam-b"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert revoke.returncode == 0, revoke.stderr
    assert "deletes it from the broker within seconds" in revoke.stdout
    # Deleted from the broker by the running gateway, which disconnects it.
    assert box.disconnected.wait(SYNC_S), gateway.broker_sync.last_error
    # Without a reload its certificate still passes TLS, but it has no right left.
    again = connect(broker, clients, boxes["cam-b"])
    assert again.publish("devices/cam-b/telemetry", b"x") == "Not authorized"
    assert again.subscribe("devices/cam-b/commands") == "Not authorized"
    # The other box is untouched; and after a reload the CRL refuses the revoked box's handshake too.
    assert can_publish(broker, boxes["cam-a"], "devices/cam-a/telemetry")
    broker.reload()
    refused = Client(broker, boxes["cam-b"], "cam-b", timeout=2)
    clients.append(refused)
    assert not refused.connected


# -- the operator ---------------------------------------------------------------------------------------------------


def test_operator_identity_may_only_command_and_read_replies(fleet, boxes, broker, clients, gateway) -> None:
    op = fleet.identity("operator", operator=True)
    assert wait_until(lambda: can_publish(broker, op, "devices/cam-a/commands"), SYNC_S)
    c = connect(broker, clients, op)
    assert c.subscribe("devices/cam-a/replies") == "Granted QoS 1"
    for topic in ("devices/+/telemetry", "$share/ingest/devices/+/telemetry", "devices/+/status", "#"):
        assert c.subscribe(topic) == "Not authorized", topic
    for topic in ("devices/cam-a/telemetry", "devices/cam-a/status", "$CONTROL/dynamic-security/v1"):
        assert c.publish(topic, b"{}") == "Not authorized", topic


def test_fleet_command_uses_the_operator_identity_not_the_gateways(fleet, boxes, broker, clients, gateway, tmp_path):
    op = fleet.identity("operator", operator=True)
    (fleet.dir / "operator").mkdir()
    for f in (op.cert, op.key):  # where `edge fleet ca issue-client operator --operator` puts them
        shutil.copy(f, fleet.dir / "operator" / f.name)
    box = connect(broker, clients, boxes["cam-a"])
    assert box.subscribe("devices/cam-a/commands") == "Granted QoS 1"

    def answer(_c, _u, msg) -> None:  # a box that replies to every command with its nonce
        payload = cbor2.loads(cbor2.loads(msg.payload).value[2])
        reply = {"nonce": payload[KEY_NONCE].hex(), "ok": True, "result": {"pong": True}}
        box.client.publish("devices/cam-a/replies", json.dumps(reply).encode(), qos=1)

    box.client.on_message = answer
    gw = boxes["gateway-1"]
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[gateway]\nfleet_dir = "{fleet.dir}"\n'
        f'[broker]\nhost = "127.0.0.1"\nport = {fleet.port}\nca = "{gw.ca}"\ncert = "{gw.cert}"\nkey = "{gw.key}"\n'
    )

    def command(env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edge", "fleet", "command", "--config", str(config), "cam-a", "ping"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, **(env or {})},
        )

    connects = gateway.transport.connects
    assert wait_until(lambda: command().returncode == 0, SYNC_S)  # once the running gateway applied "operator"
    assert json.loads(command().stdout)["result"] == {"pong": True}
    assert gateway.transport.connected and gateway.transport.connects == connects  # the gateway was not kicked
    missing = command({"EDGE_FLEET_OPERATOR": "alice"})
    assert missing.returncode == 2
    assert "operator/alice.pem" in missing.stderr and "issue-client alice --operator" in missing.stderr
    assert "Traceback" not in missing.stderr
