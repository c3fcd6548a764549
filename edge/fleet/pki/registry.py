"""The fleet registry: enrolls devices (CA + store + bundle), revokes them, and keeps the broker's view in step.

The fleet directory (``edge fleet --dir DIR``; default ``$EDGE_FLEET_DIR`` or ``./fleet``)::

    <fleet dir>/                          mode 0755: the broker, running as its own user, reads ca.pem and broker/
      ca.key (0600)  ca.pem               the fleet CA (Ed25519, self-signed, BasicConstraints CA, path_length 0)
      commands.key (0600)  commands.pub   the fleet command key (Ed25519): signs commands; separate from the CA key
      fleet.db                            the default store (sqlite:///<dir>/fleet.db); ``--store URL`` overrides
      broker/edge-fleet.conf              the mosquitto fragment: delivery settings and the mutual-TLS listener
      broker/dynsec.json  broker/crl.pem  the dynamic-security plugin's state and the CRL (generated on every enroll,
                                          revoke, issue-client and broker-config)
      broker/listener.json                the listener's port, bind address, server certificate and key, and the
                                          dynamic-security plugin's path (input; ``edge fleet broker-config``)
      broker/gateways                     gateway identities, one per line (input; absent: just "gateway");
                                          ``edge fleet ca issue-client NAME`` adds to it
      broker/operators                    operator identities (``edge fleet command``), one per line (input;
                                          ``edge fleet ca issue-client NAME --operator`` adds to it)
      broker/server.pem  server.key       the broker's certificate (``edge fleet ca issue-server``' default)
      gateway/<name>.pem .key             gateway client certificates; operator/<name>.pem .key: operators'
      receipts.key (0600)  receipts.pub   the fleet receipt key (Ed25519): signs delivery receipts (pki.receipt_key)
      devices/<id>/device.pem fleet-ca.pem fleet-commands.pub fleet-receipts.pub [tuf-root.json]
                                          the bundle to copy into the box's
                                          keys directory (tuf-root.json once the model repository exists)
      tuf/  repository/                   the TUF model repository: role keys and the served files (docs/ota.md)

Every enrolled box is treated as hostile: it holds its own key and certificate and may run any MQTT client. The
broker therefore binds identity itself, from the generated files alone:

- The client id is the certificate's CN (``use_identity_as_username`` + ``use_username_as_clientid``): a box can
  neither take over another box's session nor a gateway's (a box asking for "gateway-1" simply is itself).
- mosquitto's dynamic-security plugin, not ``acl_file`` (which never checks subscriptions: a box could join the
  gateways' ``$share`` group and have other boxes' telemetry dealt to it, then silently dropped): every publish,
  subscription and delivery is checked, and only what ``edge.fleet.broker_sync.fleet_state`` grants is allowed.
  A device may publish ``devices/<id>/{telemetry,status,replies}`` and subscribe to ``devices/<id>/commands``;
  gateway identities get the shared telemetry, the status, the commands and the plugin's ``$CONTROL`` topics;
  operator identities get the commands and the replies.
- ``max_packet_size`` refuses (and disconnects) a publish larger than an envelope can be (``MAX_PACKET_BYTES``).
- ``max_queued_messages`` (``MAX_QUEUED_MESSAGES``) lets the gateways' sessions queue what they have not taken yet
  instead of dropping it: with mosquitto's default (1000) the broker drops telemetry it has already acknowledged to
  the boxes as soon as the gateways fall 1000 messages behind, which one box flooding its own topic achieves in a
  fraction of a second (measured: ``tools/bench/hostile.py`` lost honest envelopes with the default). Not 0
  ("unlimited" in 2.0.11, measured): some 2.0.x versions read 0 as a quota of nothing.
- The delivery settings (``render_fragment``): persistence, autosave, byte and message queue limits, in-flight
  limit, session expiration, retained messages; each with its reason in the fragment. ``persistence_location`` only
  when ``broker-config --persistence-location`` recorded one: Debian's mosquitto.conf sets it, and mosquitto refuses
  a second one at start. ``edge.fleet.doctor`` checks them as mosquitto applies them.

Invariants:
- A device is in the plugin's state iff it is enrolled and not revoked. A certificate that is revoked, or that this
  registry never recorded (issued by hand, by an old CA), gets no right even if the TLS layer let it in.
- Device ids, gateway identities and operator identities never coincide (the broker's username and client id are
  the certificate's CN): ``enroll`` refuses a gateway or operator name, ``add_gateway``/``add_operator`` an enrolled
  id or a name of the other kind, and nothing is written if the sets meet.
- One key, one device: a CSR whose key is already enrolled (under any id, revoked or not) is refused.
- Every generated file is written atomically (``edge._fs.atomic_write``): a broker starting at any moment reads a
  complete old or complete new file, and ``dynsec.json`` always holds the registry's full state. Every identity
  written is re-validated, so a bad row in the store cannot inject configuration.
- The CRL always exists (empty when nothing is revoked): with ``crlfile`` set, OpenSSL refuses every client whose
  issuer has no CRL.

How changes reach the broker: the plugin of mosquitto 2.0.11 reads ``dynsec.json`` only when the broker starts (not
on SIGHUP). A running ``edge gateway run`` applies the registry through ``$CONTROL/dynamic-security/v1``
(``edge.fleet.broker_sync``): at every connect, and within seconds of every change. A revoked device is deleted
from the plugin, which disconnects it; it may reconnect at the TLS level, but then has no right at all, and a
reload (SIGHUP) makes the CRL refuse its handshake too. Without a running gateway (e.g. the very first gateway
identity), restart the broker. mosquitto rewrites ``dynsec.json`` after every ``$CONTROL`` change if it can write
``broker/``: keep that directory the operator's (mode 0755), so the file stays the registry's; mosquitto then logs
that it cannot save, which is expected.

Why the fragment carries its own ``listener``: mosquitto applies listener options (``cafile``,
``require_certificate``, ``use_identity_as_username``, ``use_username_as_clientid``, ``crlfile``) to the last
``listener`` *of the same file*; in a file read through ``include_dir`` they would configure the default listener
instead (measured with 2.0.11: it opened port 1883). The operator's ``mosquitto.conf`` therefore only needs
(after Debian's own ``include_dir /etc/mosquitto/conf.d``, which may stay)::

    include_dir /path/to/fleet/broker

EMQX equivalent (a clustered broker for large fleets): an SSL listener with ``verify = verify_peer`` and
``fail_if_no_peer_cert = true`` on the fleet CA, ``peer_cert_as_username = cn`` and ``peer_cert_as_clientid = cn``
(the CN becomes username and client id), the CRL under the listener's ``ssl_options`` (``enable_crl_check``),
``mqtt.max_packet_size`` = ``MAX_PACKET_BYTES``, and authorization rules, which EMQX checks on subscribe as well,
kept per identity in its built-in database through the REST API (the live counterpart of ``$CONTROL``; rules with
``${username}`` placeholders would also grant certificates the registry never recorded), as in ``acl.conf``::

    {allow, {user, "gateway-1"}, subscribe, ["$share/+/devices/+/telemetry", "devices/+/status"]}.
    {allow, {user, "gateway-1"}, publish, ["devices/+/commands"]}.
    {allow, {user, "operator"}, publish, ["devices/+/commands"]}.
    {allow, {user, "operator"}, subscribe, ["devices/+/replies"]}.
    {allow, {user, "cam-1"}, publish, ["devices/cam-1/telemetry", "devices/cam-1/status", "devices/cam-1/replies"]}.
    {allow, {user, "cam-1"}, subscribe, [{eq, "devices/cam-1/commands"}]}.
    {deny, all}.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge._fs import atomic_write
from edge.errors import ConfigError, EdgeError
from edge.fleet.broker_sync import BrokerState, BrokerSync, config_json, fleet_state
from edge.fleet.errors import UnknownDeviceError
from edge.fleet.pki.ca import CA_CERT_FILE, EnrollmentError, FleetCA
from edge.fleet.pki.receipt_key import receipt_public_pem
from edge.fleet.store import DeviceRecord, Store
from edge.identity.keys import validate_device_id
from edge.wire.schema import DEFAULT_LIMITS

__all__ = [
    "BROKER_DIR",
    "BUNDLE_CA_FILE",
    "BUNDLE_CERT_FILE",
    "BUNDLE_COMMANDS_FILE",
    "CRL_FILE",
    "DEFAULT_GATEWAY_IDS",
    "DEFAULT_OPERATOR",
    "DEVICES_DIR",
    "DYNSEC_FILE",
    "DYNSEC_PLUGIN_NAME",
    "FRAGMENT_FILE",
    "GATEWAYS_FILE",
    "GATEWAY_DIR",
    "LISTENER_FILE",
    "MAX_PACKET_BYTES",
    "AUTOSAVE_INTERVAL_S",
    "MAX_INFLIGHT_MESSAGES",
    "MAX_QUEUED_BYTES",
    "MAX_QUEUED_MESSAGES",
    "PERSISTENT_CLIENT_EXPIRATION",
    "OPERATORS_FILE",
    "OPERATOR_DIR",
    "BrokerListener",
    "Registry",
    "RegistrySource",
    "broker_sync_for_fleet",
    "dynsec_plugin_candidates",
    "load_listener",
    "render_fragment",
]

BROKER_DIR: Final = "broker"
DEVICES_DIR: Final = "devices"
GATEWAY_DIR: Final = "gateway"  # where ``edge fleet ca issue-client`` writes gateway certificates
OPERATOR_DIR: Final = "operator"  # and operator certificates (``--operator``)
DEFAULT_OPERATOR: Final = "operator"
CRL_FILE: Final = "crl.pem"
DYNSEC_FILE: Final = "dynsec.json"
FRAGMENT_FILE: Final = "edge-fleet.conf"
LISTENER_FILE: Final = "listener.json"
GATEWAYS_FILE: Final = "gateways"
OPERATORS_FILE: Final = "operators"
_LEGACY_ACL_FILE: Final = "acl"  # the acl_file of earlier versions: removed, so no one mistakes it for the rules
DYNSEC_PLUGIN_NAME: Final = "mosquitto_dynamic_security.so"
# The largest MQTT packet the broker accepts: the largest envelope a box may send, plus 64 KiB for what surrounds
# it in a PUBLISH (fixed header, the topic of at most ~90 bytes, packet id, MQTT 5 properties) with a wide margin,
# so no legal envelope is ever refused while a hostile box cannot make the broker buffer megabytes per message.
# Commands (4 KiB), status, replies and the gateway's $CONTROL requests (128 KiB) are far smaller.
MAX_PACKET_BYTES: Final = DEFAULT_LIMITS.max_envelope_bytes + 64 * 1024
# Messages a gateway session may have waiting at the broker: at 200 envelopes/s (1,000 boxes) over an hour of gateway
# outage; broker memory is the bound (docs/gateway.md, "Sizing the broker").
MAX_QUEUED_MESSAGES: Final = 1_000_000
# The same queue in bytes: 4 GiB holds the hour above at 2 KiB envelopes twice over, while a box flooding its topic
# with maximal envelopes makes the broker drop (a resend for the boxes: receipts) instead of exhausting its memory.
MAX_QUEUED_BYTES: Final = 4 << 30
# A client's unacknowledged QoS 1 publishes toward the broker (the broker's Receive Maximum): at least a box's publish
# window (500, telemetry's measured plateau), so no box is throttled; mosquitto's default, 20, throttles them.
MAX_INFLIGHT_MESSAGES: Final = 1000
# Seconds between the broker's saves of its database: what a SIGKILL or power loss can cost (the boxes resend it).
# Not 1: every save rewrites the whole database, gigabytes while a gateway outage fills the queues.
AUTOSAVE_INTERVAL_S: Final = 10
# How long the broker keeps the session of a client that asked to be kept forever (MQTT 3 clean_session=0, or MQTT 5
# expiry 0xFFFFFFFF) once it is offline; MQTT 5 clients with their own expiry (gateway 1 day, box 1 hour by default)
# keep theirs. Long enough for any outage, bounded so an abandoned identity does not keep a queue for ever.
PERSISTENT_CLIENT_EXPIRATION: Final = "30d"
# The bundle's names are the box's configuration defaults (telemetry.cert, telemetry.ca, telemetry.fleet_key), so
# copying the directory's files into <data_dir>/keys/ is the whole installation.
BUNDLE_CERT_FILE: Final = "device.pem"
BUNDLE_CA_FILE: Final = "fleet-ca.pem"
BUNDLE_COMMANDS_FILE: Final = "fleet-commands.pub"
BUNDLE_RECEIPTS_FILE: Final = "fleet-receipts.pub"  # telemetry.receipt_key's default
BUNDLE_TUF_ROOT_FILE: Final = "tuf-root.json"  # ota.root's default
# The newest root of the model repository (edge.fleet.models.repository keeps it there): the box's first trusted root.
TUF_ROOT_SOURCE: Final = Path("repository") / "metadata" / "root.json"
DEFAULT_GATEWAY_IDS: Final = ("gateway",)
_MAX_STATE_FILE_BYTES: Final = 1 << 20
_LISTENER_KEYS: Final = frozenset({"port", "bind", "certfile", "keyfile", "dynsec_plugin", "persistence_location"})


@dataclass(frozen=True, slots=True)
class BrokerListener:
    """The fleet's mutual-TLS listener in the generated mosquitto fragment.

    Attributes:
        port: the TCP port (8883 is MQTT over TLS).
        bind: the address to listen on; None for every interface.
        certfile: the broker's certificate (PEM); None: ``<fleet dir>/broker/server.pem``.
        keyfile: its private key (PEM); None: ``<fleet dir>/broker/server.key``.
        dynsec_plugin: mosquitto's dynamic-security plugin; None: found in the usual places
            (``dynsec_plugin_candidates``).
        persistence_location: the broker's database directory, written into the fragment; None: mosquitto.conf sets
            it (Debian's default does: ``/var/lib/mosquitto/``), and mosquitto refuses a second one at start.
    """

    port: int = 8883
    bind: str | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    dynsec_plugin: Path | None = None
    persistence_location: Path | None = None

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
            ("broker.dynsec_plugin", self.dynsec_plugin),
            ("broker.persistence_location", self.persistence_location),
        ):
            if value is not None and (not str(value) or any(c.isspace() for c in str(value))):
                raise ConfigError(key, str(value), "a non-empty value without whitespace")


def dynsec_plugin_candidates() -> list[Path]:
    """Where mosquitto's dynamic-security plugin usually is, most likely first.

    Debian and Ubuntu put it in the multiarch library directory (``/usr/lib/x86_64-linux-gnu``,
    ``/usr/lib/aarch64-linux-gnu``, ``/usr/lib/arm-linux-gnueabihf``); builds from source in ``/usr/local/lib``.
    """
    lib = Path("/usr/lib")
    arches = [sysconfig.get_config_var("MULTIARCH") or ""]
    machine = platform.machine()
    arches += [f"{machine}-linux-gnu", "arm-linux-gnueabihf" if machine.startswith("arm") else ""]
    out: list[Path] = []
    for p in [
        *(lib / a / DYNSEC_PLUGIN_NAME for a in arches if a),
        lib / DYNSEC_PLUGIN_NAME,
        Path("/usr/lib64") / DYNSEC_PLUGIN_NAME,
        Path("/usr/local/lib") / DYNSEC_PLUGIN_NAME,
        Path("/usr/local/lib64") / DYNSEC_PLUGIN_NAME,
    ]:
        if p not in out:
            out.append(p)
    return out


def _read_small(path: Path) -> bytes:
    with path.open("rb") as f:
        data = f.read(_MAX_STATE_FILE_BYTES + 1)
    if len(data) > _MAX_STATE_FILE_BYTES:
        raise ConfigError(path.name, str(path), f"a file of at most {_MAX_STATE_FILE_BYTES} bytes")
    return data


def load_listener(broker_dir: Path) -> BrokerListener:
    """The broker settings ``edge fleet broker-config`` recorded (``<broker dir>/listener.json``; defaults if absent).

    Args:
        broker_dir: ``<fleet dir>/broker``.

    Returns:
        The listener settings.

    Raises:
        ConfigError: the file is unreadable or holds invalid settings.
    """
    path = broker_dir / LISTENER_FILE
    try:
        data: Any = json.loads(_read_small(path))
    except FileNotFoundError:
        return BrokerListener()
    except (OSError, ValueError) as e:
        raise ConfigError("broker listener", str(path), f"a readable JSON file ({e})") from e
    if not isinstance(data, dict) or not set(data) <= _LISTENER_KEYS:
        raise ConfigError("broker listener", str(path), f"an object with keys among {sorted(_LISTENER_KEYS)}")
    paths = {
        k: Path(v) if isinstance(v, str) else v
        for k, v in data.items()
        if k in ("certfile", "keyfile", "dynsec_plugin", "persistence_location")
    }
    for k, v in paths.items():
        if v is not None and not isinstance(v, Path):
            raise ConfigError(f"broker.{k}", v, "a path string or null")
    bind = data.get("bind")
    if bind is not None and not isinstance(bind, str):
        raise ConfigError("broker.bind", bind, "an address string or null")
    return BrokerListener(port=data.get("port", 8883), bind=bind, **paths)


def render_fragment(fleet_dir: Path, listener: BrokerListener, plugin: Path, *, now: datetime.datetime) -> str:
    """The text of ``broker/edge-fleet.conf``: every broker setting the delivery guarantees depend on, then the
    fleet's mutual-TLS listener (``edge fleet doctor`` compares the file with this, comments aside).

    Args:
        fleet_dir: the fleet directory (absolute).
        listener: the listener settings.
        plugin: the dynamic-security plugin.
        now: the generation time written into the header (timezone-aware).

    Returns:
        The fragment.
    """
    stamp = now.astimezone(datetime.UTC).isoformat(timespec="seconds")
    broker = fleet_dir / BROKER_DIR
    certfile = listener.certfile or broker / "server.pem"
    keyfile = listener.keyfile or broker / "server.key"
    bind = f" {listener.bind}" if listener.bind else ""
    if listener.persistence_location is None:
        location = (
            "# persistence_location is mosquitto.conf's (Debian's default: /var/lib/mosquitto/): mosquitto refuses a\n"
            "# second one. Without one it saves into its working directory (under systemd: /, which it cannot write);\n"
            "# `edge fleet broker-config --persistence-location DIR` writes it here instead."
        )
    else:
        location = (
            "# Where the database is saved: a directory the broker's user can write (and mosquitto.conf sets none).\n"
            f"persistence_location {str(listener.persistence_location).rstrip('/')}/"
        )
    return f"""# The edge fleet's broker settings and mutual-TLS listener, by `edge fleet` at {stamp}; do not edit.
# mosquitto.conf includes it with: include_dir {broker}    Check it with `edge fleet doctor`.
# A box deletes an envelope only once the gateway's signed receipt for it arrives: whatever the broker loses costs a
# resend after telemetry.receipt_timeout_s, never data. The settings below make that rare (docs/gateway.md).
#
# The listener. Listener options apply only to a listener of the same file, so this fragment defines its own.
listener {listener.port}{bind}
certfile {certfile}
keyfile {keyfile}
cafile {fleet_dir / CA_CERT_FILE}
require_certificate true
# The certificate's CN is the username, and the username is the client id: no one takes over another's session.
use_identity_as_username true
use_username_as_clientid true
crlfile {broker / CRL_FILE}
allow_anonymous false
# Access rules: the dynamic-security plugin checks every publish, subscription and delivery. It loads
# {DYNSEC_FILE} at start; a running `edge gateway run` applies every registry change live ($CONTROL).
plugin {plugin}
plugin_opt_config_file {broker / DYNSEC_FILE}
#
# Delivery. Global options (per_listener_settings does not change them); a later file could override them.
# Sessions, their queued messages and retained receipts survive a restart (a SIGTERM saves everything first).
persistence true
{location}
# Saved every {AUTOSAVE_INTERVAL_S} s: a SIGKILL or power loss loses at most that (resent); each save is a full copy.
autosave_interval {AUTOSAVE_INTERVAL_S}
# By time, not per N changes: a count would rewrite the database most often exactly when the queues are longest.
autosave_on_changes false
# What the gateways have not taken yet waits for them (a gateway restart or outage, one box flooding its topic):
# mosquitto's default (1000) drops it within seconds at fleet rates. Explicit, not 0: some 2.0.x read 0 as nothing.
max_queued_messages {MAX_QUEUED_MESSAGES}
# The same queue in bytes: broker memory bounds it, so a flood of maximal envelopes is dropped (resent), not fatal.
max_queued_bytes {MAX_QUEUED_BYTES}
# Unacknowledged publishes a client may have in flight: at least a box's window (500); the default, 20, throttles.
max_inflight_messages {MAX_INFLIGHT_MESSAGES}
# The largest envelope plus headroom: a larger publish disconnects its sender. (Not message_size_limit, which would
# answer an envelope with an error the box retries for ever; mosquitto 2 recommends max_packet_size.)
max_packet_size {MAX_PACKET_BYTES}
# A session asking to be kept for ever is kept this long offline: longer than any outage, not for ever.
persistent_client_expiration {PERSISTENT_CLIENT_EXPIRATION}
# Receipts are retained (devices/<id>/receipts): a box that was offline gets the latest when it subscribes.
retain_available true
"""


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
        """Where the broker fragment, the plugin's state and the CRL live."""
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

    def _identities(self, file: str, default: tuple[str, ...]) -> tuple[str, ...]:
        path = self.broker_dir / file
        try:
            text = _read_small(path).decode("utf-8")
        except FileNotFoundError:
            return default
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{file} identities", str(path), f"a readable UTF-8 file ({e})") from e
        names = {line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")}
        return tuple(sorted(validate_device_id(n) for n in names))

    def gateway_ids(self) -> tuple[str, ...]:
        """The gateway identities (the broker's gateway role).

        Returns:
            The names in ``broker/gateways`` (sorted, deduplicated), or ``("gateway",)`` if the file is absent.

        Raises:
            ConfigError: the file is unreadable.
            InvalidDeviceIdError: a name in it is not a valid identity.
        """
        return self._identities(GATEWAYS_FILE, DEFAULT_GATEWAY_IDS)

    def operator_ids(self) -> tuple[str, ...]:
        """The operator identities (``edge fleet command``: commands and replies only).

        Returns:
            The names in ``broker/operators`` (sorted, deduplicated); none if the file is absent.

        Raises:
            ConfigError: the file is unreadable.
            InvalidDeviceIdError: a name in it is not a valid identity.
        """
        return self._identities(OPERATORS_FILE, ())

    def _add_identity(self, name: str, file: str, kind: str, others: tuple[str, ...], other_kind: str) -> None:
        validate_device_id(name)
        if self.store.device(name) is not None:
            raise EnrollmentError("reserved_id", f"{name!r} is an enrolled device; a {kind} identity must differ")
        if name in others:
            raise EnrollmentError("reserved_id", f"{name!r} is a {other_kind} identity; a {kind} identity must differ")
        path = self.broker_dir / file
        current = set(self._identities(file, ())) if path.exists() else set()
        names = sorted(current | {name})
        self.broker_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        header = f"# {kind.capitalize()} identities, one per line (edge fleet ca issue-client).\n"
        atomic_write(path, (header + "".join(f"{n}\n" for n in names)).encode())

    def add_gateway(self, name: str) -> tuple[str, ...]:
        """Record a gateway identity (``edge fleet ca issue-client`` calls this); the broker files are not rewritten.

        The first name added replaces the implicit default ("gateway") unless that is added too.

        Args:
            name: the identity (the CN of its client certificate).

        Returns:
            The gateway identities after the call.

        Raises:
            InvalidDeviceIdError: not a valid identity.
            EnrollmentError: an enrolled device or an operator has this name (reason ``reserved_id``).
        """
        self._add_identity(name, GATEWAYS_FILE, "gateway", self.operator_ids(), "operator")
        return self.gateway_ids()

    def add_operator(self, name: str) -> tuple[str, ...]:
        """Record an operator identity (``edge fleet ca issue-client --operator``); the broker files are not rewritten.

        Args:
            name: the identity (the CN of its client certificate).

        Returns:
            The operator identities after the call.

        Raises:
            InvalidDeviceIdError: not a valid identity.
            EnrollmentError: an enrolled device or a gateway has this name (reason ``reserved_id``).
        """
        self._add_identity(name, OPERATORS_FILE, "operator", self.gateway_ids(), "gateway")
        return self.operator_ids()

    def listener(self) -> BrokerListener:
        """The listener of the fragment (``broker/listener.json``, defaults if absent).

        Returns:
            The listener settings.

        Raises:
            ConfigError: the file is unreadable or holds invalid settings.
        """
        return load_listener(self.broker_dir)

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
            "dynsec_plugin": None if listener.dynsec_plugin is None else str(listener.dynsec_plugin),
            "persistence_location": None
            if listener.persistence_location is None
            else str(listener.persistence_location),
        }
        atomic_write(self.broker_dir / LISTENER_FILE, (json.dumps(body, indent=2) + "\n").encode())

    def dynsec_plugin(self, listener: BrokerListener | None = None) -> Path:
        """The dynamic-security plugin the fragment loads.

        Args:
            listener: the listener settings; None: ``listener()``.

        Returns:
            ``dynsec_plugin`` of the listener settings, else the first of ``dynsec_plugin_candidates()`` that exists.

        Raises:
            ConfigError: the configured plugin does not exist, or none was found (the message names the paths).
        """
        chosen = (listener or self.listener()).dynsec_plugin
        fix = "`edge fleet broker-config --dynsec-plugin PATH` (PATH: mosquitto_dynamic_security.so of mosquitto 2)"
        if chosen is not None:
            if not chosen.is_file():
                raise ConfigError("broker.dynsec_plugin", str(chosen), f"an existing file; set another with {fix}")
            return chosen
        candidates = dynsec_plugin_candidates()
        for p in candidates:
            if p.is_file():
                return p
        raise ConfigError(
            "broker.dynsec_plugin",
            None,
            f"mosquitto's dynamic-security plugin, which is in none of {', '.join(map(str, candidates))}: install "
            f"mosquitto 2 (Debian: apt install mosquitto) or name the plugin with {fix}",
        )

    # -- enrollment ---------------------------------------------------------------------------------------------

    def enroll(
        self,
        csr_pem: bytes,
        *,
        ca: FleetCA,
        now: datetime.datetime,
        days: int = 825,
    ) -> DeviceRecord:
        """Certify a device, register it, write its bundle and regenerate the broker files.

        Args:
            csr_pem: the device's CSR (untrusted).
            ca: the fleet CA.
            now: the enrollment time (timezone-aware).
            days: the certificate's validity.

        Returns:
            The stored record.

        Raises:
            EnrollmentError: the CSR fails a check (see ``FleetCA.sign_csr``), its id is a gateway or operator
                identity (``reserved_id``), or its key is enrolled already (``key_reused``).
            DeviceExistsError: the id is registered (revoked or not): a replaced box needs a new id.
            ConfigError: the broker files cannot be generated (e.g. no dynamic-security plugin); checked before
                anything is registered.
            StoreError: the database failed; nothing was registered.
        """
        self.dynsec_plugin()  # a broker configuration that cannot be written fails before the device is registered
        issued = ca.sign_csr(csr_pem, now=now, days=days)
        if issued.device_id in self.gateway_ids() or issued.device_id in self.operator_ids():
            raise EnrollmentError("reserved_id", f"{issued.device_id!r} is a gateway or operator identity")
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
        """Write (or rewrite) a device's bundle: its certificate, the fleet CA, the fleet command and receipt keys
        and, once the model repository exists, its newest root (the box's first trusted TUF root).

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
        atomic_write(directory / BUNDLE_RECEIPTS_FILE, receipt_public_pem(self.fleet_dir))
        root = self.fleet_dir / TUF_ROOT_SOURCE
        if root.is_file():
            atomic_write(directory / BUNDLE_TUF_ROOT_FILE, root.read_bytes())
        return directory

    def renew(self, csr_pem: bytes, *, device_id: str, ca: FleetCA, now: datetime.datetime, days: int) -> DeviceRecord:
        """Certify an enrolled device's key again (EST re-enroll): a new certificate, same id, same key.

        Args:
            csr_pem: the device's CSR (untrusted; proof of possession is checked).
            device_id: the device the caller authenticated (the CN of its current certificate).
            ca: the fleet CA.
            now: the renewal time (timezone-aware).
            days: the new certificate's validity.

        Returns:
            The record with the new certificate.

        Raises:
            EnrollmentError: the CSR fails a check, names another id (``device_id``) or another key (``key_changed``).
            UnknownDeviceError: the device is not registered, or is revoked.
            StoreError: the database failed.
        """
        record = self.store.device(device_id)
        if record is None or record.revoked_at is not None:
            state = "not registered" if record is None else "revoked"
            raise UnknownDeviceError(f"device {device_id!r} is {state}: it cannot renew its certificate")
        issued = ca.sign_csr(csr_pem, now=now, days=days)
        if issued.device_id != device_id:
            raise EnrollmentError(
                "device_id", f"the request is for {issued.device_id!r}, the certificate {device_id!r}"
            )
        if issued.did != record.did:
            # The ledger credits a did: a box that wants a new key is a new box, enrolled with a new claim.
            raise EnrollmentError("key_changed", "a renewal keeps the enrolled key; a new key needs a new claim")
        renewed = self.store.renew_device(device_id, issued.cert_pem)
        self.write_bundle(renewed, ca=ca)
        return renewed

    def revoke(self, device_id: str, *, ca: FleetCA, now: datetime.datetime) -> DeviceRecord:
        """Revoke a device: mark it in the store, then regenerate the broker files (the plugin's state without it,
        the CRL with it).

        The store comes first: a running gateway applies the revocation from it even if the files cannot be written.
        Idempotent: revoking again keeps the first revocation time and rewrites the same files.

        Args:
            device_id: the device.
            ca: the fleet CA (signs the CRL).
            now: the revocation time (timezone-aware).

        Returns:
            The record after the call.

        Raises:
            UnknownDeviceError: no such device.
            StoreError: the database failed.
            ConfigError: the broker files cannot be generated (the revocation is recorded).
        """
        record = self.store.revoke_device(device_id, now.timestamp())
        self.write_broker_fragment(ca, now=now)
        return record

    def lookup(self, device_id: str) -> Ed25519PublicKey | None:
        """The device's public key for the telemetry verifier (``edge.wire.chain.KeyLookup``).

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

    def _checked_state(
        self, gateway_ids: Sequence[str] | None = None, suspended: frozenset[str] = frozenset()
    ) -> tuple[BrokerState, list[DeviceRecord]]:
        gateways = {validate_device_id(g) for g in (self.gateway_ids() if gateway_ids is None else gateway_ids)}
        operators = set(self.operator_ids())
        devices = self.store.devices()
        ids = {d.device_id for d in devices}
        for kind, names, others in (
            ("gateway", gateways, ids | operators),
            ("operator", operators, ids),
        ):
            clash = sorted(names & others)
            if clash:
                raise ConfigError(f"{kind} identities", clash, "names that are not devices or other identities")
        active = [validate_device_id(d.device_id) for d in devices if d.revoked_at is None]
        return fleet_state(sorted(gateways), sorted(operators), active, suspended), devices

    def broker_state(self, now: float | None = None) -> BrokerState:
        """The dynamic-security state the registry grants (``edge.fleet.broker_sync.fleet_state``).

        Args:
            now: the gateway clock; the devices suspended at ``now`` (``edge.fleet.suspend``) are disabled. None
                ignores suspensions (the state the broker's file holds: a suspension is applied live).

        Returns:
            The state: the gateway and operator identities, and every enrolled, non-revoked device.

        Raises:
            ConfigError: identities of two kinds coincide, or an identity file is unreadable.
            InvalidDeviceIdError: an identity is not valid.
            StoreError: the database failed.
        """
        suspended = frozenset() if now is None else frozenset(x.device_id for x in self.store.suspensions(now=now))
        state, devices = self._checked_state(suspended=suspended)
        return dataclasses.replace(state, registered=len(devices))

    def write_broker_fragment(
        self,
        ca: FleetCA,
        *,
        gateway_ids: Sequence[str] | None = None,
        now: datetime.datetime,
    ) -> Path:
        """Regenerate ``broker/crl.pem``, ``broker/dynsec.json`` and ``broker/edge-fleet.conf`` from the registry.

        Args:
            ca: the fleet CA (signs the CRL; its certificate is the listener's ``cafile``).
            gateway_ids: the gateway identities; None: ``gateway_ids()``.
            now: the CRL's thisUpdate (timezone-aware).

        Returns:
            The path of ``edge-fleet.conf``.

        Raises:
            ConfigError: identities of two kinds coincide, the listener settings are invalid, or the
                dynamic-security plugin is missing (nothing is written).
            InvalidDeviceIdError: an identity is not valid (nothing is written).
            StoreError: the database failed.
        """
        state, devices = self._checked_state(gateway_ids)
        revoked = [(_serial(d), d.revoked_at) for d in devices if d.revoked_at is not None]
        listener = self.listener()
        plugin = self.dynsec_plugin(listener)
        broker = self.broker_dir
        broker.mkdir(mode=0o755, parents=True, exist_ok=True)
        conf = render_fragment(self.fleet_dir, listener, plugin, now=now)
        # The CRL first: a broker starting between two writes never lets a revoked device in under the old rules.
        atomic_write(broker / CRL_FILE, ca.crl([(s, at) for s, at in revoked if at is not None], now=now))
        atomic_write(broker / DYNSEC_FILE, config_json(state))
        atomic_write(broker / FRAGMENT_FILE, conf.encode())
        (broker / _LEGACY_ACL_FILE).unlink(missing_ok=True)
        return broker / FRAGMENT_FILE


def _serial(record: DeviceRecord) -> int:
    try:
        return int(x509.load_pem_x509_certificate(record.cert_pem.encode("ascii")).serial_number)
    except (ValueError, UnicodeEncodeError) as e:
        raise ConfigError(f"device {record.device_id} certificate", record.cert_pem[:40], "a PEM certificate") from e


# -- the registry as the broker sync's source ------------------------------------------------------------------


class RegistrySource:
    """The registry's state for the sync thread: its own store connection, opened when first needed."""

    def __init__(self, fleet_dir: Path, store_factory: Callable[[], Store]) -> None:
        self.fleet_dir = fleet_dir
        self.store_factory = store_factory
        self._store: Store | None = None
        # Rewritten (new inode) by every registry change, and by nothing else: the broker never writes them.
        self._stamp_files = [fleet_dir / BROKER_DIR / FRAGMENT_FILE, fleet_dir / BROKER_DIR / CRL_FILE]

    def state(self) -> BrokerState:
        try:
            return Registry(self._open(), self.fleet_dir).broker_state(now=time.time())
        except EdgeError:
            self.close()  # a failed database connection is opened again on the next sync
            raise

    def fingerprint(self) -> object:
        """Changes whenever the registry rewrites the broker files (every enroll, revoke, issue-client, ...) and
        whenever a suspension begins or ends (any gateway's, or the operator's ``edge fleet resume``)."""
        stamps: list[object] = [self._suspended()]
        for p in self._stamp_files:
            try:
                st = os.stat(p)
            except OSError:
                stamps.append(None)
                continue
            stamps.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stamps)

    def _open(self) -> Store:
        if self._store is None:
            self._store = self.store_factory()
        return self._store

    def _suspended(self) -> object:
        try:
            return tuple(x.device_id for x in self._open().suspensions(now=time.time()))
        except EdgeError as e:
            self.close()
            return ("unreadable", str(e))  # a sync then reads the registry and reports the failure

    def close(self) -> None:
        if self._store is not None:
            store, self._store = self._store, None
            store.close()


def broker_sync_for_fleet(fleet_dir: Path, store_factory: Callable[[], Store], **kwargs: Any) -> BrokerSync:
    """A ``BrokerSync`` of the registry of ``fleet_dir`` over the store ``store_factory`` opens.

    Args:
        fleet_dir: the fleet directory.
        store_factory: opens the fleet's store (called on the sync thread).
        **kwargs: ``interval_s``, ``resync_s``, ``timeout_s``.
    """
    source = RegistrySource(Path(fleet_dir), store_factory)
    return BrokerSync(source.state, source.fingerprint, close=source.close, **kwargs)
