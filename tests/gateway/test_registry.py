"""The fleet registry over a real SQLite store, and the mosquitto fragment it generates, proven on a real broker."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from fleet_fixtures import Client, Fleet, FleetBroker, utcnow, wait_until

from edge.errors import ConfigError
from edge.gateway.ca import EnrollmentError
from edge.gateway.errors import DeviceExistsError, UnknownDeviceError
from edge.gateway.registry import BrokerListener
from edge.identity import build_csr, generate_device_identity
from edge.identity.keys import load_private_key


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


def acl_users(fleet: Fleet) -> dict[str, list[str]]:
    users: dict[str, list[str]] = {}
    current = None
    for line in (fleet.registry.broker_dir / "acl").read_text().splitlines():
        if line.startswith("user "):
            current = line.split(" ", 1)[1]
            users[current] = []
        elif line.startswith("topic "):
            users[current].append(line)
        else:
            assert not line.startswith("pattern"), "a pattern rule would grant unregistered certificates topics"
    return users


def test_enroll_registers_the_device_and_writes_its_bundle(fleet) -> None:
    record, creds = fleet.enroll("cam-1")
    assert fleet.store.device("cam-1") == record
    bundle = fleet.registry.bundle_dir("cam-1")
    assert sorted(p.name for p in bundle.iterdir()) == ["device.pem", "fleet-ca.pem", "fleet-commands.pub"]
    assert (bundle / "device.pem").read_text() == record.cert_pem
    assert (bundle / "fleet-ca.pem").read_bytes() == fleet.ca.cert_pem
    assert (bundle / "fleet-commands.pub").read_bytes() == fleet.ca.commands_public_pem
    key = fleet.registry.lookup("cam-1")
    raw = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key is not None and key.public_bytes(*raw) == load_private_key(creds.key).public_key().public_bytes(*raw)
    assert acl_users(fleet)["cam-1"] == ["topic readwrite devices/cam-1/#"]
    assert acl_users(fleet)["gateway"] == ["topic readwrite devices/#"]


def test_unknown_and_revoked_devices_have_no_key(fleet) -> None:
    fleet.enroll("cam-1")
    assert fleet.registry.lookup("nobody") is None
    first = fleet.registry.revoke("cam-1", ca=fleet.ca, now=utcnow())
    assert fleet.registry.lookup("cam-1") is None
    again = fleet.registry.revoke("cam-1", ca=fleet.ca, now=utcnow())
    assert again.revoked_at == first.revoked_at  # idempotent: the first revocation time stands
    assert "cam-1" not in acl_users(fleet)
    with pytest.raises(UnknownDeviceError):
        fleet.registry.revoke("nobody", ca=fleet.ca, now=utcnow())


def test_device_enrolled_as_gateway_identity_rejected(fleet, tmp_path) -> None:
    # The broker's username is the CN: a device named "gateway" would read every device's telemetry.
    ident = generate_device_identity(tmp_path / "evil", "gateway")
    with pytest.raises(EnrollmentError) as info:
        fleet.registry.enroll(ident.csr.read_bytes(), ca=fleet.ca, now=utcnow())
    assert info.value.reason == "reserved_id"
    assert fleet.store.device("gateway") is None


def test_gateway_identity_named_like_a_device_rejected(fleet) -> None:
    fleet.enroll("cam-1")
    with pytest.raises(EnrollmentError):
        fleet.registry.add_gateway("cam-1")
    with pytest.raises(ConfigError):
        fleet.registry.write_broker_fragment(fleet.ca, gateway_ids=["cam-1"], now=utcnow())


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
    users = acl_users(fleet)
    assert users["ingest-1"] == users["gateway"] == ["topic readwrite devices/#"]


def test_fragment_is_a_complete_listener(fleet) -> None:
    fleet.registry.set_listener(BrokerListener(port=18999, bind="127.0.0.1"))
    conf = fleet.registry.write_broker_fragment(fleet.ca, now=utcnow()).read_text()
    lines = [line for line in conf.splitlines() if line and not line.startswith("#")]
    assert lines[0] == "listener 18999 127.0.0.1"
    assert f"cafile {fleet.ca.cert_path}" in lines
    for wanted in ("require_certificate true", "use_identity_as_username true", "allow_anonymous false"):
        assert wanted in lines
    assert any(line.startswith("crlfile ") for line in lines) and any(line.startswith("acl_file ") for line in lines)
    with pytest.raises(ConfigError):
        BrokerListener(port=0)
    with pytest.raises(ConfigError):
        BrokerListener(bind="127.0.0.1\nlistener 1883")  # no config injection through the bind address


def test_enrolled_device_confined_to_its_namespace_and_gateway_reads_all(fleet, fleet_broker) -> None:
    _, a_creds = fleet.enroll("cam-a")
    _, b_creds = fleet.enroll("cam-b")
    fleet_broker.reload()
    gateway = Client(fleet_broker, fleet.client_creds("gateway"), "ingest-worker-1")
    a = Client(fleet_broker, a_creds)
    b = Client(fleet_broker, b_creds)
    try:
        assert gateway.connected and a.connected and b.connected
        gateway.subscribe("$share/ingest/devices/+/telemetry")
        b.subscribe("devices/cam-a/#")  # granted by mosquitto, but nothing may be delivered to b
        assert a.publish("devices/cam-a/telemetry", b"mine") == "Success"
        assert a.publish("devices/cam-b/telemetry", b"forged") == "Not authorized"
        assert a.publish("devices/other", b"x") == "Not authorized"
        assert wait_until(lambda: len(gateway.received()) == 1, 5)
        assert [(m.topic, m.payload) for m in gateway.received()] == [("devices/cam-a/telemetry", b"mine")]
        # The gateway may command a device.
        a.subscribe("devices/cam-a/commands")
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


def test_revoked_device_refused_by_the_crl_after_reload(fleet, fleet_broker) -> None:
    _, a_creds = fleet.enroll("cam-a")
    _, b_creds = fleet.enroll("cam-b")
    fleet_broker.reload()
    b = Client(fleet_broker, b_creds)
    assert b.connected
    try:
        fleet.registry.revoke("cam-b", ca=fleet.ca, now=utcnow())
        fleet_broker.reload()
        # Its open session lost every right with the reloaded ACL...
        assert b.publish("devices/cam-b/telemetry", b"x") == "Not authorized"
    finally:
        b.close()
    # ...and a new connection fails the TLS handshake on the CRL.
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
