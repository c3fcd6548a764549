"""`edge fleet doctor`: a real fleet directory, real certificates, a real mosquitto started from the generated fragment,
and the real command line. Each test breaks one thing the delivery guarantees depend on and expects the doctor to
say so (and exit 1), or checks a healthy fleet passes."""

from __future__ import annotations

import datetime
import grp
import json
import os
import pwd
import threading

import paho.mqtt.client as mqtt
import pytest
from fleet_fixtures import Fleet, FleetBroker, utcnow
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge._fs import atomic_write
from edge.fleet.doctor import (
    check_crl,
    check_settings,
    check_timestamp,
    connect_packet,
    parse_conf,
    parse_connack,
)
from edge.fleet.pki.registry import MAX_QUEUED_MESSAGES


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path / "fleet")
    f.identity("gw-1")
    cert, key = f.ca.issue_client("gw-1", now=utcnow(), days=60)
    (f.dir / "gateway").mkdir()
    atomic_write(f.dir / "gateway" / "gw-1.pem", cert)  # where `edge fleet ca issue-client` puts it
    atomic_write(f.dir / "gateway" / "gw-1.key", key, mode=0o600)
    try:  # what `edge fleet ca issue-server` does: the broker's group may read its key
        os.chown(f.dir / "broker" / "server.key", -1, grp.getgrnam("mosquitto").gr_gid)
        (f.dir / "broker" / "server.key").chmod(0o640)
    except (KeyError, PermissionError):
        pass
    yield f
    f.close()


@pytest.fixture
def broker(fleet, tmp_path):
    b = FleetBroker(fleet, tmp_path / "mosquitto")
    b.start()
    yield b
    b.stop()


def doctor(edge_cli, fleet: Fleet, *args: str):
    proc = edge_cli("fleet", "--dir", str(fleet.dir), "doctor", *args)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def lines(proc, severity: str) -> list[str]:
    return [line for line in proc.stdout.splitlines() if line.startswith(severity + " ")]


def test_healthy_fleet_with_its_broker_exits_0(edge_cli, fleet, broker) -> None:
    proc = doctor(edge_cli, fleet, "--broker-conf", str(broker.conf))
    assert proc.returncode == 0, proc.stdout
    assert lines(proc, "ERROR") == []
    assert any("broker fragment" in line and "is current" in line for line in lines(proc, "OK"))
    assert any("broker persistence_location" in line for line in lines(proc, "OK"))
    # Without --connect it only shakes hands: the client id is forced to the CN, a CONNECT would take the session over.
    session = [line for line in proc.stdout.splitlines() if "gateway session gw-1" in line]
    assert session and session[0].startswith("OK") and "pass --connect" in session[0]
    findings = json.loads(doctor(edge_cli, fleet, "--json").stdout)
    assert {"severity", "what", "detail", "fix"} <= set(findings[0])


def test_fragment_with_mosquittos_default_queue_limit_is_an_error(edge_cli, fleet) -> None:
    fragment = fleet.registry.broker_dir / "edge-fleet.conf"
    text = fragment.read_text().replace(f"max_queued_messages {MAX_QUEUED_MESSAGES}", "max_queued_messages 1000")
    fragment.write_text(text)
    proc = doctor(edge_cli, fleet)
    assert proc.returncode == 1
    (err,) = [line for line in lines(proc, "ERROR") if "max_queued_messages" in line]
    assert "1000" in err and "fix: edge fleet" in err and "broker-config" in err
    assert any("broker fragment" in line for line in lines(proc, "WARN"))  # and it is not what broker-config writes


def test_main_config_overriding_the_fragment_is_reported(edge_cli, fleet, broker, tmp_path) -> None:
    # A file read after the fragment (include_dir order) wins: the doctor reads what mosquitto reads.
    late = tmp_path / "late"
    late.mkdir()
    (late / "zz.conf").write_text("autosave_interval 1800\npersistence false\n")
    conf = tmp_path / "main.conf"
    conf.write_text(broker.conf.read_text() + f"include_dir {late}\n")
    proc = doctor(edge_cli, fleet, "--broker-conf", str(conf))
    assert proc.returncode == 1
    errors = "\n".join(lines(proc, "ERROR"))
    assert "broker persistence: false" in errors and "zz.conf:2" in errors


def test_duplicate_persistence_location_is_an_error(edge_cli, fleet, tmp_path) -> None:
    # What mosquitto refuses to start with: Debian's mosquitto.conf sets one, and the fragment would set another.
    edge_cli("fleet", "--dir", str(fleet.dir), "broker-config", "--persistence-location", str(tmp_path / "db"))
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"persistence true\npersistence_location /var/lib/mosquitto/\ninclude_dir {fleet.dir / 'broker'}\n")
    proc = doctor(edge_cli, fleet, "--broker-conf", str(conf))
    assert proc.returncode == 1
    assert any("Duplicate persistence_location" in line for line in lines(proc, "ERROR"))
    missing = tmp_path / "nowhere.conf"
    proc = doctor(edge_cli, fleet, "--broker-conf", str(missing))
    assert proc.returncode == 1 and any(str(missing) in line and "missing" in line for line in lines(proc, "ERROR"))


def test_expired_crl_is_an_error(edge_cli, fleet) -> None:
    past = utcnow() - datetime.timedelta(days=10)
    atomic_write(fleet.registry.broker_dir / "crl.pem", fleet.ca.crl([], now=past, days=2))
    proc = doctor(edge_cli, fleet)
    assert proc.returncode == 1
    (err,) = [line for line in lines(proc, "ERROR") if line.startswith("ERROR CRL")]
    assert "nextUpdate" in err and "has passed" in err


def test_expiring_and_missing_certificates_and_missing_crl(edge_cli, fleet) -> None:
    cert, _ = fleet.ca.issue_client("gw-1", now=utcnow(), days=10)
    atomic_write(fleet.dir / "gateway" / "gw-1.pem", cert)
    (fleet.registry.broker_dir / "crl.pem").unlink()
    (fleet.registry.broker_dir / "server.pem").unlink()
    proc = doctor(edge_cli, fleet)
    assert proc.returncode == 1
    assert any("gw-1.pem" in line and "(9 days)" in line for line in lines(proc, "WARN"))
    errors = "\n".join(lines(proc, "ERROR"))
    assert "crl.pem is missing" in errors and "server.pem is missing" in errors and "issue-server" in errors


def test_server_key_unreadable_by_the_broker_user_is_an_error(edge_cli, fleet) -> None:
    try:
        pwd.getpwnam("mosquitto")
        grp.getgrnam("mosquitto")
    except KeyError:
        pytest.skip("no mosquitto user on this host")
    key = fleet.registry.broker_dir / "server.key"
    key.chmod(0o600)  # root-only: mosquitto drops to its user before it loads the key
    if key.stat().st_uid == pwd.getpwnam("mosquitto").pw_uid:
        pytest.skip("the key belongs to the mosquitto user")
    proc = doctor(edge_cli, fleet)
    assert proc.returncode == 1
    assert any("server key" in line and "not readable by 'mosquitto'" in line for line in lines(proc, "ERROR"))


def test_expired_tuf_timestamp_is_reported(edge_cli, fleet) -> None:
    meta = fleet.dir / "repository" / "metadata"
    meta.mkdir(parents=True)
    (meta / "timestamp.json").write_text(json.dumps({"signed": {"expires": "2020-01-01T00:00:00Z"}}))
    proc = doctor(edge_cli, fleet)
    assert proc.returncode == 1
    (err,) = [line for line in lines(proc, "ERROR") if "TUF timestamp" in line]
    assert "expired" in err and "models refresh" in err


def test_missing_fleet_directory_and_usage_errors(edge_cli, tmp_path) -> None:
    proc = edge_cli("fleet", "--dir", str(tmp_path / "none"), "doctor")
    assert proc.returncode == 1 and "does not exist" in proc.stdout and "Traceback" not in proc.stderr
    assert edge_cli("fleet", "--dir", str(tmp_path), "doctor", "--bogus").returncode == 2


def test_broker_down_is_an_error(edge_cli, fleet) -> None:
    proc = doctor(edge_cli, fleet)  # no broker started
    assert proc.returncode == 1
    assert any("gateway session gw-1" in line and "refused" in line.lower() for line in lines(proc, "ERROR"))


def _gateway_session(broker: FleetBroker, fleet: Fleet, *, subscribe: bool) -> None:
    """Connect as gw-1 with a persistent session (clean_start=0, 1 hour), optionally subscribe, disconnect."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="gw-1", protocol=mqtt.MQTTv5)
    gw = fleet.dir / "gateway"
    c.tls_set(ca_certs=str(fleet.ca.cert_path), certfile=str(gw / "gw-1.pem"), keyfile=str(gw / "gw-1.key"))
    up, subbed = threading.Event(), threading.Event()
    c.on_connect = lambda *_a: up.set()
    c.on_subscribe = lambda *_a: subbed.set()
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 3600
    c.connect(broker.host, broker.port, clean_start=False, properties=props)
    c.loop_start()
    assert up.wait(5)
    if subscribe:
        c.subscribe("devices/+/status", qos=1)
        assert subbed.wait(5)
    c.disconnect()
    c.loop_stop()


def test_connect_reports_the_gateway_session_and_leaves_none_behind(edge_cli, fleet, broker) -> None:
    proc = doctor(edge_cli, fleet, "--connect")
    (line,) = [x for x in proc.stdout.splitlines() if "gateway session gw-1" in x]
    assert line.startswith("WARN") and "no persistent session" in line
    # The probe ended the session its CONNECT created: asking again still finds none.
    again = doctor(edge_cli, fleet, "--connect")
    assert any("no persistent session" in x for x in lines(again, "WARN"))
    _gateway_session(broker, fleet, subscribe=True)
    present = doctor(edge_cli, fleet, "--connect")
    assert any("gw-1" in x and "keeps a persistent session" in x for x in lines(present, "OK")), present.stdout
    # ... and the probe did not remove it.
    assert any("keeps a persistent session" in x for x in lines(doctor(edge_cli, fleet, "--connect"), "OK"))


# -- the sans-IO core ---------------------------------------------------------------------------------------------


def test_settings_core_defaults_are_not_lossless() -> None:
    findings = check_settings(parse_conf("listener 8883\n", "m.conf"), whole_config=True, regenerate="r")
    bad = {f.what.split()[1] for f in findings if f.severity == "ERROR"}
    assert {"persistence", "autosave_interval", "max_queued_messages"} <= bad
    assert "retain_available" not in bad  # mosquitto's default is true
    zero = check_settings(parse_conf("max_queued_messages 0\n", "m"), whole_config=False, regenerate="r")
    assert any(f.severity == "WARN" and "quota of nothing" in f.detail for f in zero)


def test_crl_and_timestamp_core(fleet) -> None:
    now = utcnow()
    pem = fleet.ca.crl([], now=now, days=10)
    assert check_crl(pem, ca=fleet.ca.certificate, now=now, path="c", fix="f").severity == "WARN"
    other = Fleet(fleet.dir.parent / "other")
    try:
        forged = other.ca.crl([], now=now)
        assert check_crl(forged, ca=fleet.ca.certificate, now=now, path="c", fix="f").severity == "ERROR"
    finally:
        other.close()
    soon = (now + datetime.timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    doc = json.dumps({"signed": {"expires": soon}}).encode()
    assert check_timestamp(doc, now=now, path="t", fix="f").severity == "WARN"
    assert check_timestamp(b"{", now=now, path="t", fix="f").severity == "ERROR"


def test_mqtt_packet_encoding() -> None:
    pkt = connect_packet("gw-1", clean_start=False, session_expiry=60)
    assert pkt[0] == 0x10 and pkt[1] == len(pkt) - 2 and b"MQTT\x05\x00" in pkt  # MQTT 5, Clean Start 0
    assert parse_connack(b"\x20\x03\x01\x00\x00") == (True, 0)
    assert parse_connack(b"\x20\x03\x00\x87\x00") == (False, 0x87)
    with pytest.raises(ValueError):
        parse_connack(b"\x30\x00\x00\x00")
