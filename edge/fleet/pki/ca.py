"""The fleet CA: certifies devices from their CSRs, issues the broker's and the gateways' certificates, signs the CRL.

It also holds the fleet command key, a second Ed25519 key that signs commands to devices (``edge.wire.commands``):
a device trusts commands from that key only, so a leaked TLS identity (any certificate the CA issued) cannot command
the fleet, and the CA key can stay offline while commands are signed daily.

Invariants:
- ``ca.key`` and ``commands.key`` are written through ``atomic_write`` with mode 0600 and loaded only if no group or
  other permission bit is set (``edge.identity.load_private_key``); ``init`` never replaces an existing CA unless
  ``force`` is given (a new CA orphans every certificate the old one issued).
- ``sign_csr`` certifies a key only after checking, in order: the PEM parses; the CSR's signature verifies (proof
  of possession: whoever sent it holds the private key); the key is Ed25519; the subject is exactly one CN that is a
  valid device id; the subjectAltName is exactly one URI and it is the did:key of that very key. Any failure raises
  ``EnrollmentError`` naming the check, and nothing is issued.
- Nothing is copied from a CSR but the key, the CN and the did: extensions in a CSR (a request for CA rights, other
  key usages, more names) are never honoured; the CA builds every extension itself.
- A device certificate is for client authentication only (KeyUsage digitalSignature, ExtendedKeyUsage clientAuth,
  BasicConstraints CA false), carries AKI/SKI, and never outlives the CA certificate. Validity starts one hour before
  ``now``, so a broker whose clock is slightly behind the CA's accepts a certificate issued a moment ago.
- The CA certificate is self-signed, BasicConstraints CA with path_length 0 (it certifies leaves only).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge._fs import atomic_write
from edge.errors import ConfigError, InputError
from edge.identity.did import did_key_from_public
from edge.identity.errors import InvalidDeviceIdError, KeyExistsError, KeyFileError
from edge.identity.keys import load_private_key, load_public_key, validate_device_id

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "COMMANDS_KEY_FILE",
    "COMMANDS_PUBLIC_FILE",
    "EnrollmentError",
    "FleetCA",
    "IssuedDevice",
]

CA_KEY_FILE: Final = "ca.key"
CA_CERT_FILE: Final = "ca.pem"
COMMANDS_KEY_FILE: Final = "commands.key"
COMMANDS_PUBLIC_FILE: Final = "commands.pub"

# An Ed25519 CSR with a did:key SAN is ~400 bytes of PEM; the bound keeps a hostile upload from being parsed at all.
_MAX_CSR_BYTES: Final = 16 * 1024
_MAX_CERT_FILE_BYTES: Final = 64 * 1024
_BACKDATE: Final = datetime.timedelta(hours=1)


class EnrollmentError(InputError):
    """A CSR cannot be certified: the message names the check that failed.

    Attributes:
        reason: a short name of the failed check (``pem``, ``signature``, ``key_type``, ``subject``, ``device_id``,
            ``san``, ``did_mismatch``).
    """

    def __init__(self, reason: str, detail: str) -> None:
        """Create the error.

        Args:
            reason: the short name of the failed check.
            detail: what was wrong, for a human.
        """
        self.reason = reason
        super().__init__(f"enrollment refused ({reason}): {detail}")


@dataclass(frozen=True, slots=True)
class IssuedDevice:
    """A device certificate the CA issued.

    Attributes:
        device_id: the CN (also the MQTT username the broker derives from the certificate).
        did: the did:key of the certified key (the certificate's SAN URI).
        public_key: the raw 32-byte Ed25519 public key.
        cert_pem: the certificate, PEM.
        serial: its serial number (what a CRL names).
    """

    device_id: str
    did: str
    public_key: bytes
    cert_pem: str
    serial: int


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_private(key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


def _utc(now: datetime.datetime) -> datetime.datetime:
    if now.tzinfo is None:
        raise ValueError(f"now must be timezone-aware, got naive {now.isoformat()}")
    return now.astimezone(datetime.UTC)


class FleetCA:
    """The fleet CA and command key, loaded from a fleet directory (see ``edge.fleet.pki.registry``).

    Use ``FleetCA.init`` to create one and ``FleetCA.load`` to open it.

    Args:
        directory: the fleet directory.
        key: the CA's private key.
        certificate: the CA's self-signed certificate.
        commands_key: the fleet command key.
    """

    def __init__(
        self,
        directory: Path,
        key: Ed25519PrivateKey,
        certificate: x509.Certificate,
        commands_key: Ed25519PrivateKey,
    ) -> None:
        self.directory = directory
        self._key = key
        self.certificate = certificate
        self._commands_key = commands_key
        self._ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())

    # -- creating and opening -----------------------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        directory: str | os.PathLike[str],
        *,
        name: str = "edge-fleet-ca",
        days: int = 3650,
        force: bool = False,
        now: datetime.datetime | None = None,
    ) -> FleetCA:
        """Create a new fleet CA and command key in ``directory``.

        Args:
            directory: the fleet directory; created with mode 0755 if missing (the broker, running as its own
                user, reads ``ca.pem`` and ``broker/`` from it; the private keys are protected by their own 0600).
            name: the CA certificate's subject CN.
            days: the CA certificate's validity.
            force: replace an existing CA (every certificate the old one issued stops being trusted).
            now: the issuing time (default: the system clock).

        Returns:
            The new CA.

        Raises:
            KeyExistsError: a CA key exists and ``force`` is false.
            ValueError: ``days`` < 1 or an empty ``name``.
        """
        if days < 1:
            raise ValueError(f"days must be >= 1, got {days}")
        if not name:
            raise ValueError("the CA name must not be empty")
        root = Path(directory)
        root.mkdir(mode=0o755, parents=True, exist_ok=True)
        ca_key_path = root / CA_KEY_FILE
        if not force and (ca_key_path.exists() or ca_key_path.is_symlink()):
            raise KeyExistsError(ca_key_path)
        t = _utc(now or datetime.datetime.now(datetime.UTC))
        key = Ed25519PrivateKey.generate()
        public = key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(t - _BACKDATE)
            .not_valid_after(t + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, None)
        )
        commands_key = Ed25519PrivateKey.generate()
        # Public parts first, private keys last: a crash part-way leaves no ca.key, so init can simply run again.
        atomic_write(root / CA_CERT_FILE, cert.public_bytes(Encoding.PEM))
        atomic_write(
            root / COMMANDS_PUBLIC_FILE,
            commands_key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo),
        )
        atomic_write(root / COMMANDS_KEY_FILE, _pem_private(commands_key), mode=0o600)
        atomic_write(ca_key_path, _pem_private(key), mode=0o600)
        return cls(root, key, cert, commands_key)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> FleetCA:
        """Open the fleet CA in ``directory``.

        Args:
            directory: the fleet directory ``init`` wrote.

        Returns:
            The CA.

        Raises:
            KeyFileError: a key is missing, readable by others, or not Ed25519 (``KeyPermissionError`` for the mode).
            ConfigError: ``ca.pem`` is missing or unreadable, is not a CA certificate, or does not match ``ca.key``;
                ``commands.pub`` does not match ``commands.key``.
        """
        root = Path(directory)
        cert_path = root / CA_CERT_FILE
        for name in (CA_KEY_FILE, COMMANDS_KEY_FILE):
            if not (root / name).exists():
                raise KeyFileError(root / name, "an existing fleet key (create the fleet CA with: edge fleet ca init)")
        key = load_private_key(root / CA_KEY_FILE)
        commands_key = load_private_key(root / COMMANDS_KEY_FILE)
        try:
            with cert_path.open("rb") as f:
                data = f.read(_MAX_CERT_FILE_BYTES + 1)
            if len(data) > _MAX_CERT_FILE_BYTES:
                raise ValueError(f"more than {_MAX_CERT_FILE_BYTES} bytes")
            cert = x509.load_pem_x509_certificate(data)
        except OSError as e:
            raise ConfigError("fleet CA certificate", str(cert_path), f"a readable PEM file ({e.strerror})") from e
        except ValueError as e:
            raise ConfigError("fleet CA certificate", str(cert_path), f"a PEM certificate ({e})") from e
        raw = Encoding.Raw, PublicFormat.Raw
        cert_key = cert.public_key()
        if not isinstance(cert_key, Ed25519PublicKey) or cert_key.public_bytes(*raw) != key.public_key().public_bytes(
            *raw
        ):
            raise ConfigError("fleet CA certificate", str(cert_path), f"the certificate of the key in {CA_KEY_FILE}")
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise ConfigError("fleet CA certificate", str(cert_path), "a CA certificate (BasicConstraints CA true)")
        published = load_public_key(root / COMMANDS_PUBLIC_FILE)
        if published.public_bytes(*raw) != commands_key.public_key().public_bytes(*raw):
            raise ConfigError(
                "fleet command key", str(root / COMMANDS_PUBLIC_FILE), f"the public key of {COMMANDS_KEY_FILE}"
            )
        return cls(root, key, cert, commands_key)

    # -- properties ---------------------------------------------------------------------------------------------

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate, PEM (what devices, gateways and the broker trust)."""
        return self.certificate.public_bytes(Encoding.PEM)

    @property
    def cert_path(self) -> Path:
        """Where the CA certificate lives (the broker's ``cafile``)."""
        return self.directory / CA_CERT_FILE

    @property
    def commands_key(self) -> Ed25519PrivateKey:
        """The fleet command key: signs commands (``edge.wire.commands.sign_command``)."""
        return self._commands_key

    @property
    def commands_public(self) -> Ed25519PublicKey:
        """The public half of the command key: provisioned on every box as ``fleet-commands.pub``."""
        return self._commands_key.public_key()

    @property
    def commands_public_pem(self) -> bytes:
        """``commands_public`` as SubjectPublicKeyInfo PEM."""
        return self.commands_public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)

    # -- issuing ------------------------------------------------------------------------------------------------

    def _leaf(
        self,
        cn: str,
        public_key: Ed25519PublicKey | ec.EllipticCurvePublicKey,
        san: x509.SubjectAlternativeName,
        usage: x509.ObjectIdentifier,
        *,
        now: datetime.datetime,
        days: int,
    ) -> x509.Certificate:
        if days < 1:
            raise ValueError(f"days must be >= 1, got {days}")
        t = _utc(now)
        # A leaf never outlives its CA: past the CA's end nothing could verify it anyway.
        not_after = min(t + datetime.timedelta(days=days), self.certificate.not_valid_after_utc)
        return (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(t - _BACKDATE)
            .not_valid_after(not_after)
            .add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski), critical=False)
            .sign(self._key, None)
        )

    def sign_csr(self, csr_pem: bytes, *, now: datetime.datetime, days: int = 825) -> IssuedDevice:
        """Certify a device from its CSR (``edge keys generate`` writes one).

        Args:
            csr_pem: the PEM CSR as the device sent it (untrusted).
            now: the issuing time (timezone-aware).
            days: the certificate's validity (cut at the CA's own end).

        Returns:
            The issued certificate and the facts the registry stores.

        Raises:
            EnrollmentError: a check failed (see the module docstring for the order); nothing was issued.
            ValueError: ``days`` < 1 or a naive ``now`` (the caller's mistake, not the device's).
        """
        if not isinstance(csr_pem, bytes) or len(csr_pem) > _MAX_CSR_BYTES:
            raise EnrollmentError("pem", f"a CSR must be PEM bytes of at most {_MAX_CSR_BYTES} bytes")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as e:
            raise EnrollmentError("pem", f"not a PEM certificate signing request ({e})") from e
        # Proof of possession: the request is signed by the key it asks to certify.
        try:
            pop = csr.is_signature_valid
        except (UnsupportedAlgorithm, InvalidSignature, ValueError) as e:
            raise EnrollmentError("signature", f"the CSR's signature cannot be checked ({e})") from e
        if not pop:
            raise EnrollmentError("signature", "the CSR's signature does not verify (no proof of key possession)")
        try:
            key = csr.public_key()
        except (UnsupportedAlgorithm, ValueError) as e:
            raise EnrollmentError("key_type", f"the CSR's key cannot be read ({e})") from e
        if not isinstance(key, Ed25519PublicKey):
            raise EnrollmentError("key_type", f"device keys are Ed25519, the CSR holds {type(key).__name__}")
        attributes = list(csr.subject)
        if len(attributes) != 1 or attributes[0].oid != NameOID.COMMON_NAME:
            raise EnrollmentError("subject", f"the subject must be exactly one CN (the device id), got {csr.subject}")
        try:
            device_id = validate_device_id(attributes[0].value)
        except InvalidDeviceIdError as e:
            raise EnrollmentError("device_id", str(e)) from e
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound as e:
            raise EnrollmentError("san", "the CSR has no subjectAltName (expected one URI: the did:key)") from e
        except (ValueError, x509.DuplicateExtension) as e:
            raise EnrollmentError("san", f"the CSR's extensions cannot be parsed ({e})") from e
        names = list(san)
        if len(names) != 1 or not isinstance(names[0], x509.UniformResourceIdentifier):
            raise EnrollmentError("san", f"the subjectAltName must be exactly one URI (the did:key), got {names}")
        did = did_key_from_public(key)
        if names[0].value != did:
            raise EnrollmentError("did_mismatch", f"the SAN URI {names[0].value!r:.100} is not the key's did {did}")
        cert = self._leaf(
            device_id,
            key,
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(did)]),
            ExtendedKeyUsageOID.CLIENT_AUTH,
            now=now,
            days=days,
        )
        return IssuedDevice(
            device_id=device_id,
            did=did,
            public_key=key.public_bytes(Encoding.Raw, PublicFormat.Raw),
            cert_pem=cert.public_bytes(Encoding.PEM).decode("ascii"),
            serial=cert.serial_number,
        )

    def issue_server(self, hosts: Sequence[str], *, now: datetime.datetime, days: int = 825) -> tuple[bytes, bytes]:
        """Issue the broker's TLS server certificate.

        The key is ECDSA P-256, not Ed25519: every TLS client stack (paho's OpenSSL, EMQX's Erlang, browsers for a
        dashboard) accepts it; the CA that signs it is still the fleet's Ed25519 CA.

        Args:
            hosts: host names and IP addresses clients connect to (each becomes a SAN; the first is also the CN).
            now: the issuing time (timezone-aware).
            days: validity (cut at the CA's own end).

        Returns:
            (certificate PEM, private key PEM); store the key with mode 0600.

        Raises:
            ValueError: no host, an empty host, or ``days`` < 1.
        """
        if not hosts:
            raise ValueError("a server certificate needs at least one host")
        names: list[x509.GeneralName] = []
        for h in hosts:
            if not h or h != h.strip():
                raise ValueError(f"invalid host {h!r}")
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                names.append(x509.DNSName(h))
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._leaf(
            hosts[0],
            key.public_key(),
            x509.SubjectAlternativeName(names),
            ExtendedKeyUsageOID.SERVER_AUTH,
            now=now,
            days=days,
        )
        return cert.public_bytes(Encoding.PEM), _pem_private(key)

    def issue_client(self, name: str, *, now: datetime.datetime, days: int = 825) -> tuple[bytes, bytes]:
        """Issue a client certificate for a gateway identity (the broker's username is its CN).

        Args:
            name: the identity, e.g. ``gateway`` (same rules as a device id: it becomes an MQTT username).
            now: the issuing time (timezone-aware).
            days: validity (cut at the CA's own end).

        Returns:
            (certificate PEM, Ed25519 private key PEM); store the key with mode 0600.

        Raises:
            InvalidDeviceIdError: ``name`` is not a valid identity.
            ValueError: ``days`` < 1.
        """
        validate_device_id(name)
        key = Ed25519PrivateKey.generate()
        cert = self._leaf(
            name,
            key.public_key(),
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(did_key_from_public(key.public_key()))]),
            ExtendedKeyUsageOID.CLIENT_AUTH,
            now=now,
            days=days,
        )
        return cert.public_bytes(Encoding.PEM), _pem_private(key)

    def crl(self, revoked: Sequence[tuple[int, float]], *, now: datetime.datetime, days: int = 3650) -> bytes:
        """Sign a certificate revocation list.

        The broker reads the CRL from a local file that is rewritten on every revocation, so its nextUpdate is far
        away: OpenSSL refuses every client once a CRL's nextUpdate has passed, and a forgotten refresh would lock
        the whole fleet out. The CRL number is ``now`` in milliseconds, so later CRLs have larger numbers.

        Args:
            revoked: (certificate serial, revocation time in epoch seconds) pairs.
            now: thisUpdate (timezone-aware).
            days: how long until nextUpdate (cut at the CA's own end).

        Returns:
            The CRL, PEM.

        Raises:
            ValueError: ``days`` < 1.
        """
        if days < 1:
            raise ValueError(f"days must be >= 1, got {days}")
        t = _utc(now)
        next_update = min(t + datetime.timedelta(days=days), self.certificate.not_valid_after_utc)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(t)
            .next_update(max(next_update, t + datetime.timedelta(seconds=1)))
            .add_extension(x509.CRLNumber(int(t.timestamp() * 1000)), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski), critical=False)
        )
        for serial, at in sorted(set(revoked)):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(datetime.datetime.fromtimestamp(at, datetime.UTC))
                .build()
            )
        return builder.sign(self._key, None).public_bytes(Encoding.PEM)
