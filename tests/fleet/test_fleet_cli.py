"""`edge fleet` as an operator runs it: the real command line in a subprocess, on a fleet directory of its own."""

from __future__ import annotations

import grp
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from mqtt_broker import free_port
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.fleet.pki.registry import MAX_QUEUED_MESSAGES


def fleet(edge_cli, fleet_dir, *args: str, env: dict[str, str] | None = None):
    return edge_cli("fleet", "--dir", str(fleet_dir), *args, env=env)


def broker_clients(fleet_dir) -> dict[str, list[str]]:
    """The broker's clients and their roles in the generated dynamic-security state (broker/dynsec.json)."""
    doc = json.loads((fleet_dir / "broker" / "dynsec.json").read_text())
    return {c["username"]: [r["rolename"] for r in c["roles"]] for c in doc["clients"]}


def test_operator_flow_init_enroll_list_revoke(edge_cli, tmp_path) -> None:
    fd = tmp_path / "fleet"
    init = fleet(edge_cli, fd, "ca", "init", "--name", "acme-fleet")
    assert init.returncode == 0, init.stderr
    assert (fd / "ca.key").stat().st_mode & 0o777 == 0o600
    ca = x509.load_pem_x509_certificate((fd / "ca.pem").read_bytes())
    assert ca.subject.rfc4514_string() == "CN=acme-fleet"
    assert (fd / "broker" / "crl.pem").exists() and (fd / "broker" / "edge-fleet.conf").exists()
    assert (fd / "broker" / "dynsec.json").exists()

    keys = edge_cli("keys", "generate", "--dir", str(tmp_path / "box"), "--device-id", "cam-7")
    assert keys.returncode == 0, keys.stderr
    enroll = fleet(edge_cli, fd, "enroll", str(tmp_path / "box" / "device.csr"), "--json")
    assert enroll.returncode == 0, enroll.stderr
    out = json.loads(enroll.stdout)
    assert out["device_id"] == "cam-7"
    assert out["did"] == (tmp_path / "box" / "device.did").read_text().strip()
    assert out["bundle"] == str(fd / "devices" / "cam-7")
    assert [p.rsplit("/", 1)[1] for p in out["files"]] == [
        "device.pem",
        "fleet-ca.pem",
        "fleet-commands.pub",
        "fleet-receipts.pub",
    ]
    assert all(Path(p).is_file() for p in out["files"])
    cert = x509.load_pem_x509_certificate((fd / "devices" / "cam-7" / "device.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert broker_clients(fd)["cam-7"] == ["edge-device:cam-7"]
    assert "a running `edge gateway run` applies it to the broker" in enroll.stderr  # what makes it effective

    listed = fleet(edge_cli, fd, "devices", "--json")
    assert [(d["device_id"], d["state"]) for d in json.loads(listed.stdout)] == [("cam-7", "active")]
    text = fleet(edge_cli, fd, "devices")
    assert "cam-7" in text.stdout and "active" in text.stdout and out["did"] in text.stdout

    revoke = fleet(edge_cli, fd, "revoke", "cam-7")
    assert revoke.returncode == 0, revoke.stderr
    assert "revoked cam-7" in revoke.stdout
    assert "deletes it from the broker within seconds" in revoke.stdout and "restart the broker" in revoke.stdout
    assert json.loads(fleet(edge_cli, fd, "devices", "--json").stdout)[0]["state"] == "revoked"
    assert "cam-7" not in broker_clients(fd)
    crl = x509.load_pem_x509_crl((fd / "broker" / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None


def test_ca_init_refuses_to_replace_the_ca(edge_cli, tmp_path) -> None:
    fd = tmp_path / "fleet"
    assert fleet(edge_cli, fd, "ca", "init").returncode == 0
    before = (fd / "ca.pem").read_bytes()
    again = fleet(edge_cli, fd, "ca", "init")
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
    assert (fd / "ca.pem").read_bytes() == before
    forced = fleet(edge_cli, fd, "ca", "init", "--force")
    assert forced.returncode == 0 and (fd / "ca.pem").read_bytes() != before


def test_enroll_of_a_forged_csr_exits_1_naming_the_check(edge_cli, tmp_path) -> None:
    fd = tmp_path / "fleet"
    assert fleet(edge_cli, fd, "ca", "init").returncode == 0
    edge_cli("keys", "generate", "--dir", str(tmp_path / "box"), "--device-id", "cam-1")
    pem = (tmp_path / "box" / "device.csr").read_bytes()
    der = x509.load_pem_x509_csr(pem).public_bytes(Encoding.DER)
    forged = tmp_path / "forged.csr"
    forged.write_bytes(x509.load_der_x509_csr(der.replace(b"cam-1", b"cam-2")).public_bytes(Encoding.PEM))
    proc = fleet(edge_cli, fd, "enroll", str(forged))
    assert proc.returncode == 1
    assert "enrollment refused (signature)" in proc.stderr
    assert json.loads(fleet(edge_cli, fd, "devices", "--json").stdout) == []
    missing = fleet(edge_cli, fd, "enroll", str(tmp_path / "absent.csr"))
    assert missing.returncode == 2 and "absent.csr" in missing.stderr


def test_commands_without_a_ca_exit_2_and_say_how_to_create_one(edge_cli, tmp_path) -> None:
    proc = fleet(edge_cli, tmp_path / "empty", "revoke", "cam-1")
    assert proc.returncode == 2 and "edge fleet ca init" in proc.stderr


def test_issue_server_and_gateway_client(edge_cli, tmp_path) -> None:
    fd = tmp_path / "fleet"
    assert fleet(edge_cli, fd, "ca", "init").returncode == 0
    server = fleet(edge_cli, fd, "ca", "issue-server", "--host", "127.0.0.1", "--host", "broker.local")
    assert server.returncode == 0, server.stderr
    # mosquitto drops root for its own user before it loads the key: the broker's group may read it (when it exists).
    key = (fd / "broker" / "server.key").stat()
    try:
        gid = grp.getgrnam("mosquitto").gr_gid
    except KeyError:
        assert key.st_mode & 0o777 == 0o600 and "no group 'mosquitto'" in server.stderr
    else:
        assert (key.st_mode & 0o777, key.st_gid) == (0o640, gid), server.stdout + server.stderr
        assert "group 'mosquitto', mode 0640" in server.stdout
    san = x509.load_pem_x509_certificate((fd / "broker" / "server.pem").read_bytes()).extensions
    assert san.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == [
        "broker.local"
    ]
    nogroup = fleet(edge_cli, fd, "ca", "issue-server", "--host", "127.0.0.1", "--broker-group", "no-such-group-x")
    assert nogroup.returncode == 0 and "no group 'no-such-group-x'" in nogroup.stderr
    assert (fd / "broker" / "server.key").stat().st_mode & 0o777 == 0o600
    client = fleet(edge_cli, fd, "ca", "issue-client", "ingest-1", "--out-dir", str(tmp_path / "gw"))
    assert client.returncode == 0, client.stderr
    assert (tmp_path / "gw" / "ingest-1.key").stat().st_mode & 0o777 == 0o600
    assert broker_clients(fd)["ingest-1"] == ["edge-gateway"]
    assert "gateway" not in broker_clients(fd)  # the first recorded identity replaces the implicit default
    bad = fleet(edge_cli, fd, "ca", "issue-client", "devices/#")
    assert bad.returncode == 1 and "invalid device id" in bad.stderr


def test_issue_operator_client(edge_cli, tmp_path) -> None:
    fd = tmp_path / "fleet"
    assert fleet(edge_cli, fd, "ca", "init").returncode == 0
    op = fleet(edge_cli, fd, "ca", "issue-client", "alice", "--operator")
    assert op.returncode == 0, op.stderr
    assert (fd / "operator" / "alice.pem").exists() and (fd / "operator" / "alice.key").stat().st_mode & 0o777 == 0o600
    assert broker_clients(fd)["alice"] == ["edge-operator"]
    assert (fd / "broker" / "operators").read_text().splitlines()[1:] == ["alice"]
    clash = fleet(edge_cli, fd, "ca", "issue-client", "alice")  # an operator's name cannot become a gateway's
    assert clash.returncode == 1 and "operator identity" in clash.stderr


def test_broker_config_keeps_listener_settings(edge_cli, tmp_path) -> None:
    fd = tmp_path / "fleet"
    assert fleet(edge_cli, fd, "ca", "init").returncode == 0
    proc = fleet(edge_cli, fd, "broker-config", "--port", "18883", "--bind", "127.0.0.1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(fd / "broker" / "edge-fleet.conf")
    edge_cli("keys", "generate", "--dir", str(tmp_path / "box"), "--device-id", "cam-1")
    assert fleet(edge_cli, fd, "enroll", str(tmp_path / "box" / "device.csr")).returncode == 0
    # Regenerated on enroll: the listener settings given once are kept.
    assert "listener 18883 127.0.0.1\n" in (fd / "broker" / "edge-fleet.conf").read_text()


def test_broker_config_dynsec_plugin_override(edge_cli, tmp_path) -> None:
    fd = tmp_path / "fleet"
    assert fleet(edge_cli, fd, "ca", "init").returncode == 0
    missing = fleet(edge_cli, fd, "broker-config", "--dynsec-plugin", str(tmp_path / "nowhere.so"))
    assert missing.returncode == 2
    assert "broker.dynsec_plugin" in missing.stderr and str(tmp_path / "nowhere.so") in missing.stderr
    assert "Traceback" not in missing.stderr
    plugin = tmp_path / "lib" / "mosquitto_dynamic_security.so"
    plugin.parent.mkdir()
    plugin.write_bytes(b"")
    ok = fleet(edge_cli, fd, "broker-config", "--dynsec-plugin", str(plugin))
    assert ok.returncode == 0, ok.stderr
    assert f"plugin {plugin}\n" in (fd / "broker" / "edge-fleet.conf").read_text()
    assert json.loads((fd / "broker" / "listener.json").read_text())["dynsec_plugin"] == str(plugin)


def test_fleet_dir_from_environment_and_store_override(edge_cli, tmp_path) -> None:
    fd, db = tmp_path / "from-env", tmp_path / "elsewhere.db"
    env = {"EDGE_FLEET_DIR": str(fd)}
    init = edge_cli("fleet", "--store", f"sqlite:///{db}", "ca", "init", env=env)
    assert init.returncode == 0, init.stderr
    assert (fd / "ca.pem").exists() and db.exists() and not (fd / "fleet.db").exists()
    edge_cli("keys", "generate", "--dir", str(tmp_path / "box"), "--device-id", "cam-1")
    proc = edge_cli("fleet", "--store", f"sqlite:///{db}", "enroll", str(tmp_path / "box" / "device.csr"), env=env)
    assert proc.returncode == 0, proc.stderr
    assert not (fd / "fleet.db").exists()
    listed = edge_cli("fleet", "--store", f"sqlite:///{db}", "devices", "--json", env=env)
    assert [d["device_id"] for d in json.loads(listed.stdout)] == ["cam-1"]
    default_store = edge_cli("fleet", "devices", "--json", env=env)  # the fleet directory's own store: empty
    assert json.loads(default_store.stdout) == []


# -- the generated broker settings, in a real mosquitto ---------------------------------------------------------------


class _Mosquitto:
    """mosquitto started from a mosquitto.conf that includes the fleet's fragment; stopped with SIGTERM."""

    def __init__(self, conf: Path, port: int) -> None:
        self.conf, self.port = conf, port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([exe, "-c", str(self.conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read().decode() if self.proc.stdout else ""
                raise AssertionError(f"mosquitto exited: {out}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("mosquitto did not listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # what systemd sends: mosquitto saves its database first
            self.proc.wait(10)


def _session(port: int, name: str, cert: Path, key: Path, ca: Path, got: list[bytes] | None = None) -> mqtt.Client:
    """A persistent MQTT 5 session (clean_start=0, 1 hour), as the gateway and the boxes keep theirs."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
    c.tls_set(ca_certs=str(ca), certfile=str(cert), keyfile=str(key))
    up = threading.Event()
    c.on_connect = lambda _c, _u, _f, rc, _p: up.set() if not rc.is_failure else None
    if got is not None:
        c.on_message = lambda _c, _u, m: got.append(bytes(m.payload))
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 3600
    c.connect("127.0.0.1", port, clean_start=False, properties=props)
    c.loop_start()
    assert up.wait(5), f"{name} was not accepted"
    return c


@pytest.mark.parametrize("layout", ["debian", "standalone"])
def test_broker_config_fragment_queues_beyond_1000_and_persists_across_a_restart(edge_cli, tmp_path, layout) -> None:
    """A box offline while 1500 commands are queued for it gets all of them after a SIGTERM restart of the broker:
    the fragment's queue limit (mosquitto's default drops all but 1000) and its persistence (without it, a restart
    forgets the session). "debian": mosquitto.conf sets persistence_location, as Debian's does, and the fragment
    must not (mosquitto refuses a duplicate); "standalone": the fragment carries it (--persistence-location)."""
    fd, port, work = tmp_path / "fleet", free_port(), tmp_path / "mosquitto"
    db = work / "db"
    db.mkdir(parents=True)
    assert fleet(edge_cli, fd, "ca", "init").returncode == 0
    assert fleet(edge_cli, fd, "ca", "issue-server", "--host", "127.0.0.1").returncode == 0
    assert fleet(edge_cli, fd, "ca", "issue-client", "gw-1").returncode == 0
    edge_cli("keys", "generate", "--dir", str(tmp_path / "box"), "--device-id", "cam-1")
    assert fleet(edge_cli, fd, "enroll", str(tmp_path / "box" / "device.csr")).returncode == 0
    where = ["--persistence-location", str(db)] if layout == "standalone" else []
    cfg = fleet(edge_cli, fd, "broker-config", "--port", str(port), "--bind", "127.0.0.1", *where)
    assert cfg.returncode == 0, cfg.stderr
    fragment = (fd / "broker" / "edge-fleet.conf").read_text()
    assert f"max_queued_messages {MAX_QUEUED_MESSAGES}\n" in fragment and "persistence true\n" in fragment
    assert ("persistence_location " in fragment.replace("# persistence_location", "")) == (layout == "standalone")
    run_as = "user root\n" if os.geteuid() == 0 else ""  # as root it would switch to a user that cannot read tmp
    main = f"{run_as}log_dest stdout\n"
    if layout == "debian":  # Debian's mosquitto.conf, its own conf.d, then the fleet's directory
        (work / "conf.d").mkdir()
        main += f"persistence true\npersistence_location {db}/\ninclude_dir {work / 'conf.d'}\n"
    (work / "mosquitto.conf").write_text(main + f"include_dir {fd / 'broker'}\n")
    broker = _Mosquitto(work / "mosquitto.conf", port)
    broker.start()
    ca, box = fd / "ca.pem", tmp_path / "box"
    try:
        cam = _session(port, "cam-1", fd / "devices" / "cam-1" / "device.pem", box / "device.key", ca)
        done = threading.Event()
        cam.on_subscribe = lambda *_a: done.set()
        cam.subscribe("devices/cam-1/commands", qos=1)
        assert done.wait(5)
        cam.disconnect()
        cam.loop_stop()
        gw = _session(port, "gw-1", fd / "gateway" / "gw-1.pem", fd / "gateway" / "gw-1.key", ca)
        sent = [gw.publish("devices/cam-1/commands", b"%d" % i, qos=1) for i in range(1500)]
        for info in sent:
            info.wait_for_publish(10)
        assert all(info.is_published() for info in sent)
        gw.disconnect()
        gw.loop_stop()
        broker.stop()
        assert (db / "mosquitto.db").exists()  # saved where the configuration says, not in the working directory
        broker.start()
        got: list[bytes] = []
        cam = _session(port, "cam-1", fd / "devices" / "cam-1" / "device.pem", box / "device.key", ca, got)
        deadline = time.monotonic() + 10
        while len(got) < 1500 and time.monotonic() < deadline:
            time.sleep(0.05)
        cam.disconnect()
        cam.loop_stop()
        assert sorted(int(x) for x in got) == list(range(1500))
    finally:
        broker.stop()
    doctor = fleet(edge_cli, fd, "doctor", "--broker-conf", str(work / "mosquitto.conf"))
    assert "Traceback" not in doctor.stderr
    settings = [line for line in doctor.stdout.splitlines() if line.split(" ")[1:2] == ["broker"]]
    assert settings and all(line.startswith("OK") for line in settings), doctor.stdout


def test_broker_config_persistence_location_is_kept_and_can_be_removed(edge_cli, tmp_path) -> None:
    fd = tmp_path / "fleet"
    assert fleet(edge_cli, fd, "ca", "init").returncode == 0
    assert fleet(edge_cli, fd, "broker-config", "--persistence-location", str(tmp_path / "db")).returncode == 0
    edge_cli("keys", "generate", "--dir", str(tmp_path / "box"), "--device-id", "cam-1")
    assert fleet(edge_cli, fd, "enroll", str(tmp_path / "box" / "device.csr")).returncode == 0
    assert f"\npersistence_location {tmp_path / 'db'}/\n" in (fd / "broker" / "edge-fleet.conf").read_text()
    assert fleet(edge_cli, fd, "broker-config", "--persistence-location", "").returncode == 0
    assert "\npersistence_location " not in (fd / "broker" / "edge-fleet.conf").read_text()
    # Every setting line has a comment line saying why, right above it.
    lines = (fd / "broker" / "edge-fleet.conf").read_text().splitlines()
    start = lines.index("persistence true")
    for i, line in enumerate(lines[start : lines.index("retain_available true") + 1], start):
        if line and not line.startswith("#"):
            assert lines[i - 1].startswith("#"), line
