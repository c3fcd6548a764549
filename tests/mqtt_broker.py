"""A real mosquitto for tests: its own PKI, config, port and persistence directory.

The test PKI mirrors the fleet's: an Ed25519 CA, a server certificate for 127.0.0.1/localhost, and per-device
client certificates whose subject CN is the device id. mosquitto takes the identity from the certificate
(`use_identity_as_username`) and an ACL pattern confines each device to `devices/<its id>/#`; the identity
"gateway" may read and write everything under `devices/`.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

GATEWAY_ID = "gateway"
# More gateway identities the tests run side by side (the broker binds each process's client id to its certificate).
GATEWAY_IDS = (GATEWAY_ID, "gw-0", "gw-1", "gw-2")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass(frozen=True)
class ClientCreds:
    """Paths a client needs for mutual TLS."""

    device_id: str
    ca: Path
    cert: Path
    key: Path


class TestPKI:
    """An Ed25519 CA that issues the broker's server certificate and client certificates on demand, and revokes
    client certificates through a CRL (``crl``; a broker uses it only when started with ``crlfile``)."""

    __test__ = False  # not a test class, whatever its name

    def __init__(self, directory: Path, ca_name: str = "test-fleet-ca") -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._ca_key = ed25519.Ed25519PrivateKey.generate()
        now = datetime.datetime.now(datetime.UTC)
        self._now = now
        self._ca = (
            x509.CertificateBuilder()
            .subject_name(_name(ca_name))
            .issuer_name(_name(ca_name))
            .public_key(self._ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self._ca_key, None)
        )
        self.ca = self.dir / "ca.pem"
        self.ca.write_bytes(self._ca.public_bytes(serialization.Encoding.PEM))
        server_key = ec.generate_private_key(ec.SECP256R1())
        san = x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        )
        self.server_cert = self.dir / "server.pem"
        self.server_key = self.dir / "server.key"
        self.server_cert.write_bytes(
            self._issue("localhost", server_key.public_key(), san).public_bytes(serialization.Encoding.PEM)
        )
        self.server_key.write_bytes(_pem_key(server_key))
        self._revoked: list[x509.RevokedCertificate] = []
        self.crl = self.dir / "crl.pem"
        self._write_crl()  # an empty CRL: with crlfile set, OpenSSL refuses every client whose issuer has none

    def _issue(
        self,
        cn: str,
        public_key: ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey,
        san: x509.SubjectAlternativeName | None = None,
        *,
        expired: bool = False,
    ) -> x509.Certificate:
        # An expired certificate was valid for a day that ended an hour ago (the CA itself is valid then too).
        start, end = (
            (self._now - datetime.timedelta(days=1), self._now - datetime.timedelta(hours=1))
            if expired
            else (self._now - datetime.timedelta(minutes=5), self._now + datetime.timedelta(days=2))
        )
        b = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self._ca.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
        )
        if san is not None:
            b = b.add_extension(san, critical=False)
        return b.sign(self._ca_key, None)

    def client(self, device_id: str, key: ed25519.Ed25519PrivateKey | None = None) -> ClientCreds:
        """Issue (or reuse) a client certificate with CN = ``device_id`` for ``key`` (a new key by default)."""
        cert, key_path = self.dir / f"{device_id}.pem", self.dir / f"{device_id}.key"
        if key is not None or not cert.exists():
            key = key or ed25519.Ed25519PrivateKey.generate()
            cert.write_bytes(self._issue(device_id, key.public_key()).public_bytes(serialization.Encoding.PEM))
            key_path.write_bytes(_pem_key(key))
            key_path.chmod(0o600)
        return ClientCreds(device_id, self.ca, cert, key_path)

    def expired_client(self, device_id: str) -> ClientCreds:
        """A client certificate with CN = ``device_id`` (a new key) whose validity ended an hour ago.

        Written beside, never over, the files of ``client(device_id)``.
        """
        cert, key_path = self.dir / f"{device_id}.expired.pem", self.dir / f"{device_id}.expired.key"
        key = ed25519.Ed25519PrivateKey.generate()
        cert.write_bytes(
            self._issue(device_id, key.public_key(), expired=True).public_bytes(serialization.Encoding.PEM)
        )
        key_path.write_bytes(_pem_key(key))
        key_path.chmod(0o600)
        return ClientCreds(device_id, self.ca, cert, key_path)

    def revoke(self, creds: ClientCreds) -> None:
        """Put ``creds``' certificate on the CRL (``crl``); a broker reads it when it starts."""
        serial = x509.load_pem_x509_certificate(creds.cert.read_bytes()).serial_number
        self._revoked.append(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1))
            .build()
        )
        self._write_crl()

    def _write_crl(self) -> None:
        now = datetime.datetime.now(datetime.UTC)
        b = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self._ca.subject)
            .last_update(now - datetime.timedelta(minutes=5))
            .next_update(now + datetime.timedelta(days=1))
        )
        for r in self._revoked:
            b = b.add_revoked_certificate(r)
        self.crl.write_bytes(b.sign(self._ca_key, None).public_bytes(serialization.Encoding.PEM))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """One mosquitto process with TLS, client certificates, ACLs and persistence, on a loopback port of its own."""

    def __init__(
        self,
        directory: Path,
        pki: TestPKI,
        *,
        port: int | None = None,
        gateways: tuple[str, ...] = GATEWAY_IDS,
        crlfile: Path | None = None,
        extra: str = "",
    ) -> None:
        """Write the configuration (nothing runs until ``start``).

        ``crlfile``: the listener refuses the client certificates this CRL lists (``TestPKI.crl``). ``extra``: more
        lines for mosquitto.conf (global options, e.g. ``clientid_prefixes``).
        """
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            raise RuntimeError("mosquitto is not installed: `make test` installs it with apt-get")
        self.exe = exe
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pki = pki
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        acl = self.dir / "acl"
        # Gateway identities (each gateway process has its own certificate, its CN = its client id) read everything.
        rules = "".join(f"user {g}\ntopic readwrite devices/#\n\n" for g in gateways)
        acl.write_text(f"{rules}pattern readwrite devices/%u/#\n")
        self.log = self.dir / "mosquitto.log"
        self.conf = self.dir / "mosquitto.conf"
        run_as = (
            "user root\n" if os.geteuid() == 0 else ""
        )  # as root mosquitto would switch to a user that cannot read tmp
        self.conf.write_text(
            f"""{run_as}per_listener_settings false
allow_anonymous false
persistence true
persistence_location {self.dir}/
autosave_interval 1
max_inflight_messages 0
max_queued_messages 0
log_dest file {self.log}
log_type error
log_type warning
log_type notice
listener {self.port} 127.0.0.1
cafile {pki.ca}
certfile {pki.server_cert}
keyfile {pki.server_key}
require_certificate true
use_identity_as_username true
acl_file {acl}
"""
            # The CRL is read when mosquitto starts: revoke first, then start the broker.
            + (f"crlfile {crlfile}\n" if crlfile is not None else "")
            + extra
        )

    def start(self, timeout: float = 10.0) -> None:
        """Start mosquitto and wait until it accepts TCP connections."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.proc = subprocess.Popen(
            [self.exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with {self.proc.returncode}: {self.log.read_text(errors='replace')}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout} s")

    def stop(self, *, kill: bool = False) -> None:
        """Stop mosquitto: SIGTERM (it saves its persistence) or SIGKILL (a crash)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def restart(self, *, kill: bool = False, down_for: float = 0.0) -> None:
        """Stop, stay down for ``down_for`` seconds, start again on the same port."""
        self.stop(kill=kill)
        time.sleep(down_for)
        self.start()

    @property
    def running(self) -> bool:
        """True while the process lives."""
        return self.proc is not None and self.proc.poll() is None
