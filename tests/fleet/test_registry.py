"""The fleet registry over a real SQLite store, and the mosquitto fragment it generates, proven on a real broker.

The attacks of hostile boxes on that broker, and the live sync through a running gateway, are in
``test_broker_attacks.py``."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from fleet_fixtures import Client, Fleet, FleetBroker, utcnow, wait_until

import edge.fleet.pki.registry as registry_module
from edge.errors import ConfigError
from edge.fleet.errors import DeviceExistsError, UnknownDeviceError
from edge.fleet.pki.ca import EnrollmentError
from edge.fleet.pki.registry import MAX_PACKET_BYTES, MAX_QUEUED_MESSAGES, BrokerListener
from edge.identity import build_csr, generate_device_identity
from edge.identity.keys import load_private_key
from edge.wire.schema import DEFAULT_LIMITS


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path / "fleet")
    yield f
    f.close()


@pytest.fixture
def fleet_broker(fleet, tmp_path):
    b = FleetBroker(fleet, tmp_path / "mosquitto")
    b.start()
    yield b
    b.stop()


def rights(fleet: Fleet) -> dict[str, set[tuple[str, str]]]:
    """Each identity's granted (acltype, topic) pairs, read from the generated broker/dynsec.json."""
    doc = json.loads((fleet.registry.broker_dir / "dynsec.json").read_text())
    roles = {r["rolename"]: {(a["acltype"], a["topic"]) for a in r["acls"] if a["allow"]} for r in doc["roles"]}
    assert not any(doc["defaultACLAccess"][k] for k in ("publishClientSend", "publishClientReceive", "subscribe"))
    return {c["username"]: set().union(*(roles[r["rolename"]] for r in c["roles"])) for c in doc["clients"]}


DEVICE_RIGHTS = {
    ("publishClientSend", "devices/cam-1/telemetry"),
    ("publishClientSend", "devices/cam-1/status"),
    ("publishClientSend", "devices/cam-1/replies"),
    ("subscribeLiteral", "devices/cam-1/commands"),
    ("publishClientReceive", "devices/cam-1/commands"),
    ("subscribeLiteral", "devices/cam-1/receipts"),
    ("publishClientReceive", "devices/cam-1/receipts"),
}


def test_enroll_registers_the_device_and_writes_its_bundle(fleet) -> None:
    record, creds = fleet.enroll("cam-1")
    assert fleet.store.device("cam-1") == record
    bundle = fleet.registry.bundle_dir("cam-1")
    assert sorted(p.name for p in bundle.iterdir()) == [
        "device.pem",
        "fleet-ca.pem",
        "fleet-commands.pub",
        "fleet-receipts.pub",
    ]
    assert (bundle / "device.pem").read_text() == record.cert_pem
    assert (bundle / "fleet-ca.pem").read_bytes() == fleet.ca.cert_pem
    assert (bundle / "fleet-commands.pub").read_bytes() == fleet.ca.commands_public_pem
    key = fleet.registry.lookup("cam-1")
    raw = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key is not None and key.public_bytes(*raw) == load_private_key(creds.key).public_key().public_bytes(*raw)
    assert rights(fleet)["cam-1"] == DEVICE_RIGHTS
    assert ("subscribePattern", "$share/+/devices/+/telemetry") in rights(fleet)["gateway"]


def test_unknown_and_revoked_devices_have_no_key(fleet) -> None:
    fleet.enroll("cam-1")
    assert fleet.registry.lookup("nobody") is None
    first = fleet.registry.revoke("cam-1", ca=fleet.ca, now=utcnow())
    assert fleet.registry.lookup("cam-1") is None
    again = fleet.registry.revoke("cam-1", ca=fleet.ca, now=utcnow())
    assert again.revoked_at == first.revoked_at  # idempotent: the first revocation time stands
    assert "cam-1" not in rights(fleet)
    with pytest.raises(UnknownDeviceError):
        fleet.registry.revoke("nobody", ca=fleet.ca, now=utcnow())


def test_device_enrolled_as_gateway_identity_rejected(fleet, tmp_path) -> None:
    # The broker's username is the CN: a device named "gateway" would read every device's telemetry.
    ident = generate_device_identity(tmp_path / "evil", "gateway")
    with pytest.raises(EnrollmentError) as info:
        fleet.registry.enroll(ident.csr.read_bytes(), ca=fleet.ca, now=utcnow())
    assert info.value.reason == "reserved_id"
    assert fleet.store.device("gateway") is None


def test_device_enrolled_as_operator_identity_rejected(fleet, tmp_path) -> None:
    fleet.registry.add_operator("operator")
    ident = generate_device_identity(tmp_path / "evil", "operator")
    with pytest.raises(EnrollmentError) as info:
        fleet.registry.enroll(ident.csr.read_bytes(), ca=fleet.ca, now=utcnow())
    assert info.value.reason == "reserved_id"


def test_gateway_identity_named_like_a_device_rejected(fleet) -> None:
    fleet.enroll("cam-1")
    with pytest.raises(EnrollmentError):
        fleet.registry.add_gateway("cam-1")
    with pytest.raises(EnrollmentError):
        fleet.registry.add_operator("cam-1")
    with pytest.raises(ConfigError):
        fleet.registry.write_broker_fragment(fleet.ca, gateway_ids=["cam-1"], now=utcnow())


def test_gateway_and_operator_identities_never_coincide(fleet) -> None:
    # An operator named like a gateway would share its client id (the CN) and could take over its session.
    fleet.registry.add_gateway("gateway-1")
    with pytest.raises(EnrollmentError):
        fleet.registry.add_operator("gateway-1")
    fleet.registry.add_operator("operator")
    with pytest.raises(EnrollmentError):
        fleet.registry.add_gateway("operator")
    assert rights(fleet).keys() >= {"gateway"}  # the files are not rewritten by add_*
    fleet.registry.write_broker_fragment(fleet.ca, now=utcnow())
    got = rights(fleet)
    assert got["operator"] == {
        ("publishClientSend", "devices/+/commands"),
        ("subscribePattern", "devices/+/replies"),
        ("publishClientReceive", "devices/+/replies"),
    }
    assert "gateway" not in got and ("publishClientSend", "$CONTROL/dynamic-security/v1") in got["gateway-1"]


def test_key_enrolled_under_a_second_id_rejected(fleet) -> None:
    _, creds = fleet.enroll("cam-1")
    second = build_csr(load_private_key(creds.key), "cam-2")
    with pytest.raises(EnrollmentError) as info:
        fleet.registry.enroll(second, ca=fleet.ca, now=utcnow())
    assert info.value.reason == "key_reused"
    assert fleet.store.device("cam-2") is None and not fleet.registry.bundle_dir("cam-2").exists()


def test_device_id_enrolled_twice_rejected(fleet, tmp_path) -> None:
    fleet.enroll("cam-1")
    ident = generate_device_identity(tmp_path / "replacement", "cam-1")
    with pytest.raises(DeviceExistsError):
        fleet.registry.enroll(ident.csr.read_bytes(), ca=fleet.ca, now=utcnow())


def test_added_gateway_identities_survive_every_rewrite(fleet) -> None:
    assert fleet.registry.gateway_ids() == ("gateway",)
    fleet.registry.add_gateway("ingest-1")
    fleet.registry.add_gateway("gateway")
    fleet.enroll("cam-1")  # rewrites the fragment with the recorded identities, not a default
    got = rights(fleet)
    assert got["ingest-1"] == got["gateway"] and ("publishClientSend", "devices/+/commands") in got["gateway"]


def test_fragment_is_a_complete_listener(fleet) -> None:
    fleet.registry.set_listener(BrokerListener(port=18999, bind="127.0.0.1"))
    conf = fleet.registry.write_broker_fragment(fleet.ca, now=utcnow()).read_text()
    lines = [line for line in conf.splitlines() if line and not line.startswith("#")]
    assert lines[0] == "listener 18999 127.0.0.1"
    assert f"cafile {fleet.ca.cert_path}" in lines
    for wanted in (
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",  # the client id is the certificate's CN
        "allow_anonymous false",
        f"max_packet_size {MAX_PACKET_BYTES}",
        f"max_queued_messages {MAX_QUEUED_MESSAGES}",  # the default, 1000, drops acknowledged telemetry
        f"plugin_opt_config_file {fleet.registry.broker_dir / 'dynsec.json'}",
    ):
        assert wanted in lines
    assert DEFAULT_LIMITS.max_envelope_bytes < MAX_PACKET_BYTES  # a legal envelope always fits
    assert any(line.startswith("crlfile ") for line in lines)
    assert any(line.startswith("plugin ") and line.endswith("/mosquitto_dynamic_security.so") for line in lines)
    assert not any(line.startswith("acl_file") for line in lines)  # it never checks subscriptions
    assert not (fleet.registry.broker_dir / "acl").exists()
    with pytest.raises(ConfigError):
        BrokerListener(port=0)
    with pytest.raises(ConfigError):
        BrokerListener(bind="127.0.0.1\nlistener 1883")  # no config injection through the bind address


def test_dynsec_plugin_override_and_missing_plugin(fleet, tmp_path, monkeypatch) -> None:
    plugin = tmp_path / "lib" / "mosquitto_dynamic_security.so"
    plugin.parent.mkdir()
    plugin.write_bytes(b"")
    fleet.registry.set_listener(BrokerListener(port=fleet.port, bind="127.0.0.1", dynsec_plugin=plugin))
    assert f"plugin {plugin}" in fleet.registry.write_broker_fragment(fleet.ca, now=utcnow()).read_text()
    plugin.unlink()
    with pytest.raises(ConfigError) as info:
        fleet.registry.write_broker_fragment(fleet.ca, now=utcnow())
    assert info.value.key == "broker.dynsec_plugin" and str(plugin) in str(info.value)
    assert "--dynsec-plugin" in str(info.value)

    fleet.registry.set_listener(BrokerListener(port=fleet.port, bind="127.0.0.1"))
    nowhere = [tmp_path / "usr" / "lib" / "aarch64-linux-gnu" / "mosquitto_dynamic_security.so"]
    monkeypatch.setattr(registry_module, "dynsec_plugin_candidates", lambda: nowhere)
    with pytest.raises(ConfigError) as info:
        fleet.enroll("cam-1")
    assert str(nowhere[0]) in str(info.value) and "--dynsec-plugin" in str(info.value)
    assert fleet.store.device("cam-1") is None  # refused before anything was registered


def test_dynsec_plugin_candidates_start_with_this_machines_multiarch_directory() -> None:
    candidates = registry_module.dynsec_plugin_candidates()
    multiarch = sysconfig.get_config_var("MULTIARCH")
    if multiarch:
        assert candidates[0] == Path("/usr/lib") / multiarch / "mosquitto_dynamic_security.so"
    assert Path("/usr/local/lib/mosquitto_dynamic_security.so") in candidates
    assert len(set(candidates)) == len(candidates)


def test_enrolled_device_confined_to_its_namespace_and_gateway_reads_all(fleet, fleet_broker) -> None:
    _, a_creds = fleet.enroll("cam-a")
    _, b_creds = fleet.enroll("cam-b")
    fleet_broker.restart()  # without a running gateway, the broker learns the registry when it starts
    gateway = Client(fleet_broker, fleet.client_creds("gateway"), "ingest-worker-1")
    a = Client(fleet_broker, a_creds)
    b = Client(fleet_broker, b_creds)
    try:
        assert gateway.connected and a.connected and b.connected
        assert gateway.subscribe("$share/ingest/devices/+/telemetry") == "Granted QoS 1"
        assert b.subscribe("devices/cam-a/#") == "Not authorized"  # checked when it subscribes
        assert a.publish("devices/cam-a/telemetry", b"mine") == "Success"
        assert a.publish("devices/cam-b/telemetry", b"forged") == "Not authorized"
        assert a.publish("devices/other", b"x") == "Not authorized"
        assert wait_until(lambda: len(gateway.received()) == 1, 5)
        assert [(m.topic, m.payload) for m in gateway.received()] == [("devices/cam-a/telemetry", b"mine")]
        # The gateway may command a device.
        assert a.subscribe("devices/cam-a/commands") == "Granted QoS 1"
        assert gateway.publish("devices/cam-a/commands", b"cmd") == "Success"
        assert wait_until(lambda: len(a.received("devices/cam-a/commands")) == 1, 5)
        assert b.received() == []
    finally:
        for c in (gateway, a, b):
            c.close()


def test_certificate_the_registry_never_recorded_gets_no_topic(fleet, fleet_broker) -> None:
    # Signed by the fleet CA (TLS accepts it), but neither an enrolled device nor a gateway identity.
    stranger = Client(fleet_broker, fleet.client_creds("stranger"))
    try:
        assert stranger.connected
        assert stranger.publish("devices/stranger/telemetry", b"x") == "Not authorized"
    finally:
        stranger.close()


def test_revoked_device_refused_by_the_broker_restarted_without_a_gateway(fleet, fleet_broker) -> None:
    _, a_creds = fleet.enroll("cam-a")
    _, b_creds = fleet.enroll("cam-b")
    fleet_broker.restart()
    b = Client(fleet_broker, b_creds)
    assert b.connected
    b.close()
    fleet.registry.revoke("cam-b", ca=fleet.ca, now=utcnow())
    assert "cam-b" not in rights(fleet)  # written at once: the next start loads the registry's full state
    fleet_broker.restart()
    # A new connection fails the TLS handshake on the CRL.
    again = Client(fleet_broker, b_creds, "cam-b-again", timeout=2)
    try:
        assert not again.connected, again.connect_result
    finally:
        again.close()
    assert "certificate verify failed" in fleet_broker.log.read_text()
    a = Client(fleet_broker, a_creds)
    try:
        assert a.connected and a.publish("devices/cam-a/telemetry", b"x") == "Success"
    finally:
        a.close()
