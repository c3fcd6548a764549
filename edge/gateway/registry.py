"""The fleet registry: enrolls devices (CA + store + bundle), revokes them, and keeps the broker's view in step.

The fleet directory (``edge fleet --dir DIR``; default ``$EDGE_FLEET_DIR`` or ``./fleet``)::

    <fleet dir>/                          mode 0755: the broker, running as its own user, reads ca.pem and broker/
      ca.key (0600)  ca.pem               the fleet CA (Ed25519, self-signed, BasicConstraints CA, path_length 0)
      commands.key (0600)  commands.pub   the fleet command key (Ed25519): signs commands; separate from the CA key
      fleet.db                            the default store (sqlite:///<dir>/fleet.db); ``--store URL`` overrides
      broker/edge-fleet.conf              the mosquitto fragment: the fleet's mutual-TLS listener (generated)
      broker/acl  broker/crl.pem          its ACL and CRL (generated on every enroll, revoke and broker-config)
      broker/listener.json                the listener's port, bind address, server certificate and key (input)
      broker/gateways                     gateway identities granted every device's topics, one per line (input;
                                          absent: just "gateway"); ``edge fleet ca issue-client`` adds to it
      broker/server.pem  server.key       the broker's certificate (``edge fleet ca issue-server``' default)
      devices/<id>/device.pem fleet-ca.pem fleet-commands.pub [tuf-root.json]   the bundle to copy into the box's
                                          keys directory (tuf-root.json once the model repository exists)
      tuf/  repository/                   the TUF model repository: role keys and the served files (docs/ota.md)

Invariants:
- A device is in the ACL iff it is enrolled and not revoked, and then it may use ``devices/<its id>/#`` only. There is
  no ``pattern`` rule: a certificate that is revoked, or that this registry never recorded (issued by hand, by an
  old CA), gets no topic even if the TLS layer let it in. The gateway identities get ``devices/#`` (which, in
  mosquitto 2, also covers reading through ``$share/<group>/devices/...``).
- A device id and a gateway identity never coincide: the broker's username is the certificate's CN, so a device
  enrolled as "gateway" would read every device's data. ``enroll`` refuses a gateway name, ``add_gateway`` an
  enrolled id, and the fragment is not written if the two sets meet.
- One key, one device: a CSR whose key is already enrolled (under any id, revoked or not) is refused.
- Every generated file is written atomically (``edge._fs.atomic_write``): a broker reloading at any moment reads a
  complete old or complete new file. Every identity written into the ACL is re-validated, so a bad row in the store
  cannot inject ACL lines.
- The CRL always exists (empty when nothing is revoked): with ``crlfile`` set, OpenSSL refuses every client whose
  issuer has no CRL.

The broker applies changes on SIGHUP (``systemctl reload mosquitto``): mosquitto 2.0 then re-reads the ACL and the
CRL (measured with 2.0.11). A revoked device that is still connected keeps its TCP session until it reconnects, but
from the reload on the ACL denies it every topic.

Why the fragment carries its own ``listener``: mosquitto applies listener options (``cafile``,
``require_certificate``, ``use_identity_as_username``, ``crlfile``) to the last ``listener`` *of the same file*; in a
file read through ``include_dir`` they would configure the default listener instead (measured with 2.0.11: it opened
port 1883). The operator's ``mosquitto.conf`` therefore only needs::

    per_listener_settings false
    include_dir /path/to/fleet/broker

EMQX equivalent (a clustered broker for large fleets): an SSL listener with ``verify = verify_peer`` and
``fail_if_no_peer_cert = true`` on the fleet CA, ``peer_cert_as_username = cn`` (the CN becomes the username), the
CRL under the listener's ``ssl_options`` (``enable_crl_check``), and file authorization rules (``acl.conf``)::

    {allow, {user, "gateway"}, all, ["devices/#"]}.
    {allow, {user, "cam-1"}, all, ["devices/cam-1/#"]}.
    {deny, all}.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge._fs import atomic_write
from edge.errors import ConfigError
from edge.gateway.ca import CA_CERT_FILE, EnrollmentError, FleetCA
from edge.gateway.store import DeviceRecord, Store
from edge.identity.keys import validate_device_id

__all__ = [
    "ACL_FILE",
    "BROKER_DIR",
    "BUNDLE_CA_FILE",
    "BUNDLE_CERT_FILE",
    "BUNDLE_COMMANDS_FILE",
    "CRL_FILE",
    "DEFAULT_GATEWAY_IDS",
    "DEVICES_DIR",
    "FRAGMENT_FILE",
    "GATEWAYS_FILE",
    "LISTENER_FILE",
    "BrokerListener",
    "Registry",
]

BROKER_DIR: Final = "broker"
DEVICES_DIR: Final = "devices"
ACL_FILE: Final = "acl"
CRL_FILE: Final = "crl.pem"
FRAGMENT_FILE: Final = "edge-fleet.conf"
LISTENER_FILE: Final = "listener.json"
GATEWAYS_FILE: Final = "gateways"
# The bundle's names are the box's configuration defaults (telemetry.cert, telemetry.ca, telemetry.fleet_key), so
# copying the directory's files into <data_dir>/keys/ is the whole installation.
BUNDLE_CERT_FILE: Final = "device.pem"
BUNDLE_CA_FILE: Final = "fleet-ca.pem"
BUNDLE_COMMANDS_FILE: Final = "fleet-commands.pub"
BUNDLE_TUF_ROOT_FILE: Final = "tuf-root.json"  # ota.root's default
# The newest root of the model repository (edge.gateway.repository keeps it there): the box's first trusted root.
TUF_ROOT_SOURCE: Final = Path("repository") / "metadata" / "root.json"
DEFAULT_GATEWAY_IDS: Final = ("gateway",)
_MAX_STATE_FILE_BYTES: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class BrokerListener:
    """The fleet's mutual-TLS listener in the generated mosquitto fragment.

    Attributes:
        port: the TCP port (8883 is MQTT over TLS).
        bind: the address to listen on; None for every interface.
        certfile: the broker's certificate (PEM); None: ``<fleet dir>/broker/server.pem``.
        keyfile: its private key (PEM); None: ``<fleet dir>/broker/server.key``.
    """

    port: int = 8883
    bind: str | None = None
    certfile: Path | None = None
    keyfile: Path | None = None

    def __post_init__(self) -> None:
        """Check the values.

        Raises:
            ConfigError: a port outside 1..65535, or a bind address or path with whitespace (mosquitto's config
                syntax cannot quote it).
        """
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ConfigError("broker.port", self.port, "a TCP port number 1..65535")
        for key, value in (
            ("broker.bind", self.bind),
            ("broker.certfile", self.certfile),
            ("broker.keyfile", self.keyfile),
        ):
            if value is not None and (not str(value) or any(c.isspace() for c in str(value))):
                raise ConfigError(key, str(value), "a non-empty value without whitespace")


def _read_small(path: Path) -> bytes:
    with path.open("rb") as f:
        data = f.read(_MAX_STATE_FILE_BYTES + 1)
    if len(data) > _MAX_STATE_FILE_BYTES:
        raise ConfigError(path.name, str(path), f"a file of at most {_MAX_STATE_FILE_BYTES} bytes")
    return data


class Registry:
    """Enrollment and revocation over a ``Store`` and a fleet directory; also the ``KeyLookup`` of the verifier.

    Args:
        store: the gateway store (the source of truth for devices).
        fleet_dir: the fleet directory (see the module docstring).
    """

    def __init__(self, store: Store, fleet_dir: str | os.PathLike[str]) -> None:
        self.store = store
        self.fleet_dir = Path(fleet_dir).absolute()

    # -- paths and inputs ---------------------------------------------------------------------------------------

    @property
    def broker_dir(self) -> Path:
        """Where the broker fragment, ACL and CRL live."""
        return self.fleet_dir / BROKER_DIR

    def bundle_dir(self, device_id: str) -> Path:
        """The directory of a device's bundle.

        Args:
            device_id: a valid device id.

        Returns:
            ``<fleet dir>/devices/<id>``.

        Raises:
            InvalidDeviceIdError: the id is not valid (it would not be a safe file name).
        """
        return self.fleet_dir / DEVICES_DIR / validate_device_id(device_id)

    def gateway_ids(self) -> tuple[str, ...]:
        """The gateway identities the ACL grants ``devices/#``.

        Returns:
            The names in ``broker/gateways`` (sorted, deduplicated), or ``("gateway",)`` if the file is absent.

        Raises:
            ConfigError: the file is unreadable or names an invalid identity.
            InvalidDeviceIdError: a name in it is not a valid identity.
        """
        path = self.broker_dir / GATEWAYS_FILE
        try:
            text = _read_small(path).decode("utf-8")
        except FileNotFoundError:
            return DEFAULT_GATEWAY_IDS
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError("gateway identities", str(path), f"a readable UTF-8 file ({e})") from e
        names = {line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")}
        return tuple(sorted(validate_device_id(n) for n in names))

    def add_gateway(self, name: str) -> tuple[str, ...]:
        """Record a gateway identity (``edge fleet ca issue-client`` calls this); the fragment is not rewritten.

        The first name added replaces the implicit default ("gateway") unless that is added too.

        Args:
            name: the identity (the CN of its client certificate).

        Returns:
            The gateway identities after the call.

        Raises:
            InvalidDeviceIdError: not a valid identity.
            EnrollmentError: an enrolled device has this id (reason ``reserved_id``).
        """
        validate_device_id(name)
        if self.store.device(name) is not None:
            raise EnrollmentError("reserved_id", f"{name!r} is an enrolled device; a gateway identity must differ")
        path = self.broker_dir / GATEWAYS_FILE
        current = set(self.gateway_ids()) if path.exists() else set()
        names = tuple(sorted(current | {name}))
        self.broker_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        header = (
            "# Gateway identities granted devices/# by the broker ACL, one per line (edge fleet ca issue-client).\n"
        )
        atomic_write(path, (header + "".join(f"{n}\n" for n in names)).encode())
        return names

    def listener(self) -> BrokerListener:
        """The listener of the fragment (``broker/listener.json``, defaults if absent).

        Returns:
            The listener settings.

        Raises:
            ConfigError: the file is unreadable or holds invalid settings.
        """
        path = self.broker_dir / LISTENER_FILE
        try:
            data: Any = json.loads(_read_small(path))
        except FileNotFoundError:
            return BrokerListener()
        except (OSError, ValueError) as e:
            raise ConfigError("broker listener", str(path), f"a readable JSON file ({e})") from e
        if not isinstance(data, dict) or not set(data) <= {"port", "bind", "certfile", "keyfile"}:
            raise ConfigError("broker listener", str(path), "an object with port, bind, certfile, keyfile")
        paths = {k: Path(v) if isinstance(v, str) else v for k, v in data.items() if k in ("certfile", "keyfile")}
        for k, v in paths.items():
            if v is not None and not isinstance(v, Path):
                raise ConfigError(f"broker.{k}", v, "a path string or null")
        bind = data.get("bind")
        if bind is not None and not isinstance(bind, str):
            raise ConfigError("broker.bind", bind, "an address string or null")
        return BrokerListener(port=data.get("port", 8883), bind=bind, **paths)

    def set_listener(self, listener: BrokerListener) -> None:
        """Persist the listener settings used by every later fragment.

        Args:
            listener: the settings.
        """
        self.broker_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        body = {
            "port": listener.port,
            "bind": listener.bind,
            "certfile": None if listener.certfile is None else str(listener.certfile),
            "keyfile": None if listener.keyfile is None else str(listener.keyfile),
        }
        atomic_write(self.broker_dir / LISTENER_FILE, (json.dumps(body, indent=2) + "\n").encode())

    # -- enrollment ---------------------------------------------------------------------------------------------

    def enroll(self, csr_pem: bytes, *, ca: FleetCA, now: datetime.datetime) -> DeviceRecord:
        """Certify a device, register it, write its bundle and regenerate the broker fragment.

        Args:
            csr_pem: the device's CSR (untrusted).
            ca: the fleet CA.
            now: the enrollment time (timezone-aware).

        Returns:
            The stored record.

        Raises:
            EnrollmentError: the CSR fails a check (see ``FleetCA.sign_csr``), its id is a gateway identity
                (``reserved_id``), or its key is enrolled already (``key_reused``).
            DeviceExistsError: the id is registered (revoked or not): a replaced box needs a new id.
            StoreError: the database failed; nothing was registered.
        """
        issued = ca.sign_csr(csr_pem, now=now)
        if issued.device_id in self.gateway_ids():
            raise EnrollmentError("reserved_id", f"{issued.device_id!r} is a gateway identity, not a device id")
        for other in self.store.devices():
            # The did names the key: one key certified under two ids would let one box speak as two.
            if other.did == issued.did:
                raise EnrollmentError("key_reused", f"this key is enrolled already, as device {other.device_id!r}")
        record = DeviceRecord(
            device_id=issued.device_id,
            did=issued.did,
            public_key=issued.public_key,
            cert_pem=issued.cert_pem,
            enrolled_at=now.timestamp(),
        )
        self.store.add_device(record)
        self.write_bundle(record, ca=ca)
        self.write_broker_fragment(ca, now=now)
        return record

    def write_bundle(self, record: DeviceRecord, *, ca: FleetCA) -> Path:
        """Write (or rewrite) a device's bundle: its certificate, the fleet CA, the fleet command key and, once the
        model repository exists, its newest root (the box's first trusted TUF root).

        Args:
            record: the device.
            ca: the fleet CA.

        Returns:
            The bundle directory.
        """
        directory = self.bundle_dir(record.device_id)
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        atomic_write(directory / BUNDLE_CERT_FILE, record.cert_pem.encode("ascii"))
        atomic_write(directory / BUNDLE_CA_FILE, ca.cert_pem)
        atomic_write(directory / BUNDLE_COMMANDS_FILE, ca.commands_public_pem)
        root = self.fleet_dir / TUF_ROOT_SOURCE
        if root.is_file():
            atomic_write(directory / BUNDLE_TUF_ROOT_FILE, root.read_bytes())
        return directory

    def revoke(self, device_id: str, *, ca: FleetCA, now: datetime.datetime) -> DeviceRecord:
        """Revoke a device: mark it in the store, then regenerate the ACL (without it) and the CRL (with it).

        Idempotent: revoking again keeps the first revocation time and rewrites the same fragment.

        Args:
            device_id: the device.
            ca: the fleet CA (signs the CRL).
            now: the revocation time (timezone-aware).

        Returns:
            The record after the call.

        Raises:
            UnknownDeviceError: no such device.
            StoreError: the database failed.
        """
        record = self.store.revoke_device(device_id, now.timestamp())
        self.write_broker_fragment(ca, now=now)
        return record

    def lookup(self, device_id: str) -> Ed25519PublicKey | None:
        """The device's public key for the telemetry verifier (``edge.telemetry.verify.KeyLookup``).

        Args:
            device_id: the kid of an envelope.

        Returns:
            The key, or None when the device is unknown or revoked.

        Raises:
            StoreError: the database failed.
        """
        record = self.store.device(device_id)
        if record is None or record.revoked_at is not None:
            return None
        return Ed25519PublicKey.from_public_bytes(record.public_key)

    # -- the broker's view --------------------------------------------------------------------------------------

    def write_broker_fragment(
        self,
        ca: FleetCA,
        *,
        gateway_ids: Sequence[str] | None = None,
        now: datetime.datetime,
    ) -> Path:
        """Regenerate ``broker/crl.pem``, ``broker/acl`` and ``broker/edge-fleet.conf`` from the store.

        Args:
            ca: the fleet CA (signs the CRL; its certificate is the listener's ``cafile``).
            gateway_ids: identities granted ``devices/#``; None: ``gateway_ids()``.
            now: the CRL's thisUpdate (timezone-aware).

        Returns:
            The path of ``edge-fleet.conf``.

        Raises:
            ConfigError: a gateway identity is also an enrolled device, or the listener settings are invalid.
            InvalidDeviceIdError: an identity is not valid (nothing is written).
            StoreError: the database failed.
        """
        gateways = sorted({validate_device_id(g) for g in (self.gateway_ids() if gateway_ids is None else gateway_ids)})
        devices = self.store.devices()
        clash = sorted(set(gateways) & {d.device_id for d in devices})
        if clash:
            raise ConfigError("gateway identities", clash, "names that are not enrolled devices")
        active = [validate_device_id(d.device_id) for d in devices if d.revoked_at is None]
        revoked = [(_serial(d), d.revoked_at) for d in devices if d.revoked_at is not None]
        listener = self.listener()
        stamp = now.astimezone(datetime.UTC).isoformat(timespec="seconds")
        acl = [
            f"# Generated by `edge fleet` at {stamp} from the fleet registry; rewritten on every enroll and revoke.",
            "# Do not edit: change the registry (edge fleet enroll/revoke/ca issue-client) instead.",
            "",
            "# Gateway identities: every device's topics (ingest reads them via $share/<group>/devices/+/telemetry).",
        ]
        for g in gateways:
            acl += [f"user {g}", "topic readwrite devices/#", ""]
        acl.append("# Enrolled, non-revoked devices: each its own namespace only. No pattern rule on purpose.")
        for device_id in active:
            acl += [f"user {device_id}", f"topic readwrite devices/{device_id}/#", ""]

        broker = self.broker_dir
        broker.mkdir(mode=0o755, parents=True, exist_ok=True)
        certfile = listener.certfile or broker / "server.pem"
        keyfile = listener.keyfile or broker / "server.key"
        bind = f" {listener.bind}" if listener.bind else ""
        conf = f"""# The edge fleet's mutual-TLS listener, generated by `edge fleet` at {stamp}; do not edit.
# mosquitto.conf includes it with: include_dir {broker}
# Reload the broker (SIGHUP) after every enroll or revoke. Listener options apply only to a listener of the same
# file, so this fragment defines its own.
listener {listener.port}{bind}
certfile {certfile}
keyfile {keyfile}
cafile {self.fleet_dir / CA_CERT_FILE}
require_certificate true
use_identity_as_username true
crlfile {broker / CRL_FILE}
acl_file {broker / ACL_FILE}
allow_anonymous false
"""
        # The CRL first: a reload between two writes then never lets a revoked device in under the old ACL alone.
        atomic_write(broker / CRL_FILE, ca.crl([(s, at) for s, at in revoked if at is not None], now=now))
        atomic_write(broker / ACL_FILE, ("\n".join(acl).rstrip("\n") + "\n").encode())
        atomic_write(broker / FRAGMENT_FILE, conf.encode())
        return broker / FRAGMENT_FILE


def _serial(record: DeviceRecord) -> int:
    try:
        return int(x509.load_pem_x509_certificate(record.cert_pem.encode("ascii")).serial_number)
    except (ValueError, UnicodeEncodeError) as e:
        raise ConfigError(f"device {record.device_id} certificate", record.cert_pem[:40], "a PEM certificate") from e
