"""`edge fleet` as an operator runs it: the real command line in a subprocess, on a fleet directory of its own."""

from __future__ import annotations

import json

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding


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
    assert [p.rsplit("/", 1)[1] for p in out["files"]] == ["device.pem", "fleet-ca.pem", "fleet-commands.pub"]
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


def test_enroll_of_a_forged_csr_exits_2_naming_the_check(edge_cli, tmp_path) -> None:
    fd = tmp_path / "fleet"
    assert fleet(edge_cli, fd, "ca", "init").returncode == 0
    edge_cli("keys", "generate", "--dir", str(tmp_path / "box"), "--device-id", "cam-1")
    pem = (tmp_path / "box" / "device.csr").read_bytes()
    der = x509.load_pem_x509_csr(pem).public_bytes(Encoding.DER)
    forged = tmp_path / "forged.csr"
    forged.write_bytes(x509.load_der_x509_csr(der.replace(b"cam-1", b"cam-2")).public_bytes(Encoding.PEM))
    proc = fleet(edge_cli, fd, "enroll", str(forged))
    assert proc.returncode == 2
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
    assert (fd / "broker" / "server.key").stat().st_mode & 0o777 == 0o600
    san = x509.load_pem_x509_certificate((fd / "broker" / "server.pem").read_bytes()).extensions
    assert san.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == [
        "broker.local"
    ]
    client = fleet(edge_cli, fd, "ca", "issue-client", "ingest-1", "--out-dir", str(tmp_path / "gw"))
    assert client.returncode == 0, client.stderr
    assert (tmp_path / "gw" / "ingest-1.key").stat().st_mode & 0o777 == 0o600
    assert broker_clients(fd)["ingest-1"] == ["edge-gateway"]
    assert "gateway" not in broker_clients(fd)  # the first recorded identity replaces the implicit default
    bad = fleet(edge_cli, fd, "ca", "issue-client", "devices/#")
    assert bad.returncode == 2 and "invalid device id" in bad.stderr


def test_issue_operator_client(edge_cli, tmp_path) -> None:
    fd = tmp_path / "fleet"
    assert fleet(edge_cli, fd, "ca", "init").returncode == 0
    op = fleet(edge_cli, fd, "ca", "issue-client", "alice", "--operator")
    assert op.returncode == 0, op.stderr
    assert (fd / "operator" / "alice.pem").exists() and (fd / "operator" / "alice.key").stat().st_mode & 0o777 == 0o600
    assert broker_clients(fd)["alice"] == ["edge-operator"]
    assert (fd / "broker" / "operators").read_text().splitlines()[1:] == ["alice"]
    clash = fleet(edge_cli, fd, "ca", "issue-client", "alice")  # an operator's name cannot become a gateway's
    assert clash.returncode == 2 and "operator identity" in clash.stderr


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
