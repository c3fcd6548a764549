"""Onboarding end to end, with real processes: `edge fleet serve` (the HTTPS enrollment endpoint), mosquitto
configured by the registry, `edge gateway run`, and `edge enroll` on boxes that start with nothing but a claim code.

Each attack or fault the onboarding issue names is a test here; every one runs against the real endpoint process.
"""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import ssl
import stat
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from fleet_fixtures import Fleet, FleetBroker, GatewayProcess, utcnow, wait_until
from mqtt_broker import free_port

from edge._fs import atomic_write
from edge.config import load_config
from edge.enrollment.client import EnrollClient, EnrollRefusedError
from edge.fleet.pki.ca import FleetCA
from edge.fleet.store import open_store
from edge.identity.csr import build_csr
from edge.identity.did import did_key_from_public
from edge.wire.onboard import parse_claim

ROOT = Path(__file__).resolve().parents[2]


def edge(*args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "edge", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


class Endpoint:
    """`edge fleet serve` as a process on a free loopback port."""

    def __init__(self, fleet_dir: Path, broker_port: int, log: Path, *extra: str) -> None:
        self.port = free_port()
        self.log = log
        ready = log.with_suffix(".ready")
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "edge",
                    "fleet",
                    "--dir",
                    str(fleet_dir),
                    "serve",
                    "--listen",
                    f"127.0.0.1:{self.port}",
                    "--broker",
                    f"127.0.0.1:{broker_port}",
                    "--ready-file",
                    str(ready),
                    *extra,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        if not wait_until(lambda: ready.exists() or self.proc.poll() is not None, 30):
            raise RuntimeError("the endpoint did not start")
        if self.proc.poll() is not None:
            raise RuntimeError(f"the endpoint exited: {log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(15)


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.fleet = Fleet(tmp / "fleet")
        gw = self.fleet.identity("gateway")
        self.broker = FleetBroker(self.fleet, tmp / "broker")
        self.broker.start()
        self.gateway = GatewayProcess(self.fleet.gateway_config(gw, receipt_interval_s=0.05), tmp / "gw")
        self.gateway.start()
        self.endpoint = Endpoint(self.fleet.dir, self.fleet.port, tmp / "endpoint.log")

    def claim(self, *extra: str) -> str:
        proc = edge(
            "fleet", "--dir", str(self.fleet.dir), "claims", "create",
            "--server", f"127.0.0.1:{self.endpoint.port}", "--json", *extra,
            check=True,
        )  # fmt: skip
        return json.loads(proc.stdout)[0]["code"]

    def box(self, name: str) -> Path:
        """The box's /etc/edge/edge.toml: the same for every box but its data directory (a box's own disk).

        Like the factory file of the Yocto layer and the Debian package, it names no sink (records go to the
        journal): enrolling is what makes the box publish to its fleet.
        """
        data = self.tmp / name / "data"
        conf = self.tmp / name / "edge.toml"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(
            f'[device]\ndata_dir = "{data}"\n'
            '[telemetry]\nbatch_records = 1\nreceipt_timeout_s = 2\n[log]\nlevel = "warning"\n'
        )
        return conf

    def enroll(self, conf: Path, code: str, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return edge("enroll", "--config", str(conf), "--claim", code, "--json", *extra, timeout=timeout)

    def devices(self) -> dict[str, str]:
        with open_store(self.fleet.store_url) as store:
            return {d.device_id: d.did for d in store.devices()}

    def close(self) -> None:
        self.endpoint.stop()
        self.gateway.stop()
        self.broker.stop()
        self.fleet.close()


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


def data_dir(conf: Path) -> Path:
    return conf.parent / "data"


def test_a_box_with_only_a_claim_code_enrolls_and_its_first_envelope_is_verified_and_stored(rig) -> None:
    conf = rig.box("box-a")
    code = rig.claim()
    started = time.monotonic()
    proc = rig.enroll(conf, code)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["first_envelope_receipted"] is True
    print(f"\nclaim to first verified envelope: {out['first_envelope_s']:.2f} s in-process, {elapsed:.2f} s wall")
    device = out["device_id"]
    assert device.startswith("box-")
    keys = data_dir(conf) / "keys"
    # The key was made on the box, owner-only; the fleet holds only its public half.
    assert stat.S_IMODE((keys / "device.key").stat().st_mode) == 0o600
    assert rig.devices() == {device: out["did"]}
    for name in ("device.pem", "fleet-ca.pem", "fleet-commands.pub", "fleet-receipts.pub", "enrollment.json"):
        assert (keys / name).is_file(), name
    dropin = (data_dir(conf) / "edge.toml").read_text()
    assert f"port = {rig.fleet.port}" in dropin
    assert load_config(conf).sink.kind == "telemetry", dropin  # the factory file's journal sink no more
    with open_store(rig.fleet.store_url) as store:
        assert [e.counter for e in store.envelopes(device)] == [1]
    # The shared configuration names no id: the certificate's CN is the box's id, and the status command agrees.
    status = edge("telemetry", "status", "--config", str(conf), "--json", check=True)
    assert json.loads(status.stdout)["device"] == device
    # The claim is used up, and shows so.
    claims = json.loads(edge("fleet", "--dir", str(rig.fleet.dir), "claims", "list", "--json", check=True).stdout)
    assert [(c["state"], c["device_id"]) for c in claims] == [("used", device)]


def test_a_claim_code_used_twice_enrolls_one_box(rig) -> None:
    code = rig.claim()
    first = rig.enroll(rig.box("box-1"), code, "--first-envelope-timeout", "0")
    assert first.returncode == 0, first.stderr
    second = rig.enroll(rig.box("box-2"), code, "--first-envelope-timeout", "0")
    assert second.returncode == 1  # refused input, not usage (docs/cli.md)
    assert "used by another box" in second.stderr
    assert len(rig.devices()) == 1
    assert not (data_dir(rig.tmp / "box-2" / "edge.toml") / "keys" / "device.pem").exists()


def test_an_expired_claim_code_is_refused(rig) -> None:
    code = rig.claim("--expires", "1s")
    time.sleep(1.5)
    proc = rig.enroll(rig.box("box-1"), code, "--first-envelope-timeout", "0")
    assert proc.returncode == 1  # refused input, not usage (docs/cli.md)
    assert "expired" in proc.stderr
    assert rig.devices() == {}


def test_a_revoked_claim_code_is_refused(rig) -> None:
    code = rig.claim()
    claim_id = parse_claim(code).claim_id
    edge("fleet", "--dir", str(rig.fleet.dir), "claims", "revoke", claim_id, check=True)
    proc = rig.enroll(rig.box("box-1"), code, "--first-envelope-timeout", "0")
    assert proc.returncode == 1  # refused input, not usage (docs/cli.md)
    assert "revoked" in proc.stderr
    assert rig.devices() == {}


def _csr_der(key: Ed25519PrivateKey, device_id: str) -> bytes:
    return x509.load_pem_x509_csr(build_csr(key, device_id)).public_bytes(Encoding.DER)


def test_a_csr_for_another_id_than_the_claims_is_refused(rig) -> None:
    code = parse_claim(rig.claim("--device-id", "pi-kitchen"))
    client = EnrollClient(code.host, code.port)
    ca = client.fetch_ca(code.ca_fingerprint)
    with pytest.raises(EnrollRefusedError) as e:
        client.simple_enroll(
            client.context(ca), code.secret_text, _csr_der(Ed25519PrivateKey.generate(), "pi-garage"), deadline=0
        )
    assert e.value.status == 403
    assert "pi-kitchen" in e.value.detail
    assert rig.devices() == {}
    # The box refuses before it asks, too, naming both ids.
    proc = rig.enroll(rig.box("box-1"), code.text(), "--device-id", "pi-garage", "--first-envelope-timeout", "0")
    assert proc.returncode == 2
    assert "pi-kitchen" in proc.stderr
    assert "pi-garage" in proc.stderr
    # The id the claim pins is what the box becomes.
    proc = rig.enroll(rig.box("box-1"), code.text(), "--first-envelope-timeout", "0")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["device_id"] == "pi-kitchen"


def test_a_replayed_enrollment_gets_the_same_certificate_and_enrolls_nothing_new(rig) -> None:
    code = parse_claim(rig.claim())
    client = EnrollClient(code.host, code.port)
    ca = client.fetch_ca(code.ca_fingerprint)
    key = Ed25519PrivateKey.generate()
    csr = _csr_der(key, "box-replay")
    first = client.simple_enroll(client.context(ca), code.secret_text, csr, deadline=0)
    replay = client.simple_enroll(client.context(ca), code.secret_text, csr, deadline=0)
    # The replay returns what was issued (a public certificate, useless without the box's key) and issues nothing.
    assert replay.serial_number == first.serial_number
    assert rig.devices() == {"box-replay": did_key_from_public(key.public_key())}
    # The same request with another key (a thief who saw the code after it was used) is refused.
    with pytest.raises(EnrollRefusedError) as e:
        client.simple_enroll(
            client.context(ca), code.secret_text, _csr_der(Ed25519PrivateKey.generate(), "x"), deadline=0
        )
    assert e.value.status == 403


def test_a_repeat_for_another_id_gets_the_keys_identity_and_a_revoked_key_reopens_nothing(rig) -> None:
    """The claim stays bound to its key: a repeat that asks for another id gets the identity the key has, and once
    that device is revoked the code enrolls nobody, neither the revoked key nor a new one."""
    code = parse_claim(rig.claim())
    client = EnrollClient(code.host, code.port)
    ca = client.fetch_ca(code.ca_fingerprint)
    key = Ed25519PrivateKey.generate()
    first = client.simple_enroll(client.context(ca), code.secret_text, _csr_der(key, "box-a"), deadline=0)
    again = client.simple_enroll(client.context(ca), code.secret_text, _csr_der(key, "box-b"), deadline=0)
    assert again.serial_number == first.serial_number
    assert rig.devices() == {"box-a": did_key_from_public(key.public_key())}
    edge("fleet", "--dir", str(rig.fleet.dir), "revoke", "box-a", check=True)
    for k, device in ((key, "box-a"), (key, "box-c"), (Ed25519PrivateKey.generate(), "box-d")):
        with pytest.raises(EnrollRefusedError) as e:
            client.simple_enroll(client.context(ca), code.secret_text, _csr_der(k, device), deadline=0)
        assert e.value.status == 403
    assert set(rig.devices()) == {"box-a"}
    # The revoked key with a fresh code is refused before the code is touched: a new key can still use it.
    fresh = parse_claim(rig.claim())
    with pytest.raises(EnrollRefusedError) as e:
        client.simple_enroll(client.context(ca), fresh.secret_text, _csr_der(key, "box-a"), deadline=0)
    assert e.value.status == 403 and "revoked" in e.value.detail
    client.simple_enroll(
        client.context(ca), fresh.secret_text, _csr_der(Ed25519PrivateKey.generate(), "box-e"), deadline=0
    )
    assert set(rig.devices()) == {"box-a", "box-e"}


def test_enrolling_as_root_into_the_service_users_data_directory_is_refused(rig, tmp_path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the check is for a root shell on a box")
    conf = rig.box("box-root")
    data = data_dir(conf)
    data.mkdir(parents=True)
    os.chown(data, 65534, 65534)  # nobody: as /data/edge belongs to the service's user on a box
    proc = rig.enroll(conf, rig.claim(), "--first-envelope-timeout", "0")
    assert proc.returncode == 2
    assert "sudo -u" in proc.stderr and "device.data_dir" in proc.stderr
    assert not (data / "keys").exists()


class _ImpostorHandler(BaseHTTPRequestHandler):
    ca_der: bytes = b""

    def log_message(self, *_args) -> None:
        pass

    def do_GET(self) -> None:
        body = base64.encodebytes(
            pkcs7.serialize_certificates([x509.load_der_x509_certificate(self.ca_der)], Encoding.DER)
        )
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.server.posts += 1  # type: ignore[attr-defined]
        self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()


def _impostor(tmp: Path, ca_to_show: x509.Certificate, tls_issuer: FleetCA) -> HTTPServer:
    """A TLS server on loopback: it serves ``ca_to_show`` as its CA certificates and a TLS certificate for
    127.0.0.1 issued by ``tls_issuer``."""
    cert, key = tls_issuer.issue_server(["127.0.0.1"], now=utcnow(), days=2)
    atomic_write(tmp / "mitm.pem", cert)
    atomic_write(tmp / "mitm.key", key, mode=0o600)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp / "mitm.pem", tmp / "mitm.key")
    handler = type("H", (_ImpostorHandler,), {"ca_der": ca_to_show.public_bytes(Encoding.DER)})
    server = HTTPServer(("127.0.0.1", 0), handler)
    server.posts = 0  # type: ignore[attr-defined]
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("shows", ["its own CA", "the fleet's CA"])
def test_a_server_that_presents_another_certificate_gets_nothing(rig, tmp_path, shows) -> None:
    """A man in the middle at the claim's address: whether it offers its own CA (wrong fingerprint) or the fleet's
    public CA certificate with a TLS certificate it issued itself, the box sends it no CSR and writes nothing."""
    other = FleetCA.init(tmp_path / "other-fleet", now=utcnow())
    fleet_ca = x509.load_pem_x509_certificate(rig.fleet.ca.cert_pem)
    shown = x509.load_pem_x509_certificate(other.cert_pem) if shows == "its own CA" else fleet_ca
    mitm = _impostor(tmp_path, shown, other)
    try:
        real = parse_claim(rig.claim())
        forged = real.text().replace(f":{real.port}/", f":{mitm.server_address[1]}/")
        conf = rig.box("box-1")
        proc = rig.enroll(conf, forged, "--first-envelope-timeout", "0")
        assert proc.returncode == 1  # refused input, not usage (docs/cli.md)
        assert "not the fleet" in proc.stderr or "not the fleet's enrollment endpoint" in proc.stderr
        assert mitm.posts == 0  # type: ignore[attr-defined]
        assert not (data_dir(conf) / "keys" / "device.pem").exists()
        # The claim is untouched: the owner can still use it at the real endpoint.
        proc = rig.enroll(conf, real.text(), "--first-envelope-timeout", "0")
        assert proc.returncode == 0, proc.stderr
    finally:
        mitm.shutdown()


def test_a_box_renews_its_certificate_and_a_revoked_box_cannot(rig) -> None:
    conf = rig.box("box-1")
    proc = rig.enroll(conf, rig.claim(), "--first-envelope-timeout", "0")
    assert proc.returncode == 0, proc.stderr
    device = json.loads(proc.stdout)["device_id"]
    cert_path = data_dir(conf) / "keys" / "device.pem"
    before = x509.load_pem_x509_certificate(cert_path.read_bytes())
    # 30 days is the default validity; the renewal is not due on day 0.
    due = edge("enroll", "--config", str(conf), "--renew-if-due", check=True)
    assert "not due" in due.stdout
    renewed = edge("enroll", "--config", str(conf), "--renew", "--json", check=True)
    after = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert after.serial_number != before.serial_number
    assert after.public_key().public_bytes_raw() == before.public_key().public_bytes_raw()
    assert json.loads(renewed.stdout)["device_id"] == device
    with open_store(rig.fleet.store_url) as store:
        assert (
            x509.load_pem_x509_certificate(store.device(device).cert_pem.encode()).serial_number == after.serial_number
        )
    edge("fleet", "--dir", str(rig.fleet.dir), "revoke", device, check=True)
    refused = edge("enroll", "--config", str(conf), "--renew")
    assert refused.returncode == 1  # refused input, not usage (docs/cli.md)
    assert "revoked" in refused.stderr
    assert x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number == after.serial_number


def test_a_power_cut_during_enrollment_never_leaves_a_half_enrolled_box(rig) -> None:
    """`edge enroll` killed with SIGKILL at random moments: after each cut the box either has its certificate (and
    then every other file) or none; running the same command again always finishes, with the same key."""
    rng = random.Random(7)
    code = rig.claim()
    conf = rig.box("box-cut")
    keys = data_dir(conf) / "keys"
    needed = ("fleet-ca.pem", "fleet-commands.pub", "fleet-receipts.pub", "enrollment.json")
    cuts = 0
    for _ in range(6):
        if (keys / "device.pem").exists():
            break
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge", "enroll", "--config", str(conf), "--claim", code,
             "--first-envelope-timeout", "0"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(rng.uniform(0.3, 1.6))  # the interpreter starts in ~0.5 s; the enrollment takes a few tenths
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        cuts += 1
        if (keys / "device.pem").exists():
            assert all((keys / n).exists() for n in needed)
        key_before = (keys / "device.key").read_bytes() if (keys / "device.key").exists() else None
        if key_before is not None:
            assert stat.S_IMODE((keys / "device.key").stat().st_mode) == 0o600
    assert cuts >= 1
    key_before = (keys / "device.key").read_bytes() if (keys / "device.key").exists() else None
    if not (keys / "device.pem").exists():
        proc = rig.enroll(conf, code, "--first-envelope-timeout", "0")
        assert proc.returncode == 0, proc.stderr
    assert all((keys / n).exists() for n in (*needed, "device.pem"))
    if key_before is not None:
        assert (keys / "device.key").read_bytes() == key_before
    assert len(rig.devices()) == 1


def test_two_boxes_claiming_at_once(rig) -> None:
    """Two boxes with two codes both enroll; two boxes with one code: exactly one does."""
    codes = [rig.claim(), rig.claim()]
    shared = rig.claim()
    confs = [rig.box(f"box-{i}") for i in range(4)]
    results: dict[int, subprocess.CompletedProcess[str]] = {}

    def run(i: int, code: str) -> None:
        results[i] = rig.enroll(confs[i], code, "--first-envelope-timeout", "0")

    threads = [
        threading.Thread(target=run, args=(0, codes[0])),
        threading.Thread(target=run, args=(1, codes[1])),
        threading.Thread(target=run, args=(2, shared)),
        threading.Thread(target=run, args=(3, shared)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert results[0].returncode == 0, results[0].stderr
    assert results[1].returncode == 0, results[1].stderr
    assert sorted([results[2].returncode, results[3].returncode]) == [0, 1]
    loser = results[2] if results[2].returncode else results[3]
    assert "used by another box" in loser.stderr
    assert len(rig.devices()) == 3


def test_a_manual_claim_waits_for_the_operators_approval(rig) -> None:
    code = rig.claim("--approval", "manual")
    claim_id = parse_claim(code).claim_id
    conf = rig.box("box-1")
    command = [sys.executable, "-m", "edge", "enroll", "--config", str(conf), "--claim", code]
    proc = subprocess.Popen(
        [*command, "--first-envelope-timeout", "0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )

    def state() -> str:
        rows = json.loads(edge("fleet", "--dir", str(rig.fleet.dir), "claims", "list", "--json", check=True).stdout)
        return rows[0]["state"]

    try:
        assert wait_until(lambda: state() == "pending", 60, interval=0.5)
        assert rig.devices() == {}
        edge("fleet", "--dir", str(rig.fleet.dir), "claims", "approve", claim_id, check=True)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert len(rig.devices()) == 1
    assert state() == "used"


def test_the_endpoint_survives_garbage_and_says_what_is_wrong(rig) -> None:
    """Hostile requests: no claim, a malformed claim, a malformed CSR, an oversized body, a stalled handshake."""
    import http.client  # noqa: PLC0415

    port = rig.endpoint.port
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE

    def post(path: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
        conn.request("POST", path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, r.read().decode()

    enroll = "/.well-known/est/simpleenroll"
    assert post(enroll, b"x", {})[0] == 401
    bad = base64.b64encode(b"claim:AAAA").decode()
    assert post(enroll, b"x", {"Authorization": f"Basic {bad}"})[0] == 401
    good = parse_claim(rig.claim()).secret_text
    auth = {"Authorization": "Basic " + base64.b64encode(f"claim:{good}".encode()).decode()}
    status, text = post(enroll, b"not a csr", auth)
    assert status == 400
    assert "CSR" in text
    assert post(enroll, b"x" * (128 * 1024), auth)[0] == 413
    assert post("/.well-known/est/simplereenroll", b"x", {})[0] in (400, 401)
    # A client that connects and never finishes its handshake holds one slot, not the endpoint.
    import socket  # noqa: PLC0415

    stalled = socket.create_connection(("127.0.0.1", port))
    try:
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
        conn.request("GET", "/.well-known/est/cacerts")
        assert conn.getresponse().status == 200
    finally:
        stalled.close()
    assert rig.endpoint.proc.poll() is None
    assert rig.devices() == {}


def test_the_service_renews_before_expiry_and_says_when_the_box_must_be_claimed_again(rig, caplog) -> None:
    """The service's renewer (edge.enrollment.renewer) against the real endpoint, its clock moved through the
    certificate's life: nothing while fresh, a renewal with a third left, a clear error once expired."""
    from edge.config import load_config  # noqa: PLC0415
    from edge.enrollment.procedure import certificate_times  # noqa: PLC0415
    from edge.enrollment.renewer import Renewer  # noqa: PLC0415

    conf = rig.box("box-1")
    assert rig.enroll(conf, rig.claim(), "--first-envelope-timeout", "0").returncode == 0
    cfg = load_config(conf)
    cert_path = data_dir(conf) / "keys" / "device.pem"

    def cert() -> x509.Certificate:
        return x509.load_pem_x509_certificate(cert_path.read_bytes())

    first = cert()
    start, end = certificate_times(first)
    fresh = Renewer(cfg, clock=lambda: start + (end - start) / 2)
    assert fresh.step() == fresh.check_s
    assert cert().serial_number == first.serial_number
    due = Renewer(cfg, clock=lambda: end - 86400)
    assert due.step() == due.check_s
    assert due.renewals == 1
    assert cert().serial_number != first.serial_number
    _, new_end = certificate_times(cert())
    expired = Renewer(cfg, clock=lambda: new_end + 1)
    assert expired.step() == expired.retry_s
    assert "must be claimed again" in (expired.last_error or "")
    assert any(r.levelname == "ERROR" and "expired" in r.getMessage() for r in caplog.records)
