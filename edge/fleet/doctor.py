"""``edge fleet doctor``: checks a fleet directory and its running broker against what the delivery guarantees need.

Each check returns ``Finding`` values (severity, what, detail, fix); nothing here prints or exits. The checks proper
are sans-IO: they take the text or bytes of a file and an explicit ``now`` (``check_settings``, ``check_fragment``,
``check_certificate``, ``check_crl``, ``check_timestamp``, ``session_finding``). ``diagnose`` alone reads files,
stats directories and talks to the broker, and turns every missing or unreadable file into a finding, never an
exception.

What "lossless" needs from mosquitto (``edge.fleet.pki.registry.render_fragment`` writes it; docs/gateway.md):
persistence on with a directory the broker's user can write, saves every few seconds, queues large enough for a
gateway outage, a packet limit that admits every legal envelope, sessions kept long enough, retained messages (the
receipts). A box resends whatever has no receipt, so a broker that drops costs a resend, never data; these settings
make drops rare.

The gateway's session: the fleet's broker makes the client id the certificate's CN (``use_username_as_clientid``), so
a CONNECT with a gateway's certificate *is* that gateway and takes its session over, disconnecting the running
process (it reconnects after its backoff). The doctor therefore connects only when asked (``connect=True``); it then
sends CONNECT with clean_start=0 and Receive Maximum 1, reads the CONNACK's session-present flag, never acknowledges
the one message the broker may send (it is redelivered to the gateway), and disconnects; a session it created itself
(none was present) is ended with Session Expiry 0, so it leaves nothing behind. Without ``connect`` it does a TLS
handshake only, which touches no session.
"""

from __future__ import annotations

import datetime
import grp
import json
import pwd
import socket
import ssl
import stat
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge.errors import ConfigError
from edge.fleet.models.repository import DEFAULT_EXPIRY_DAYS, METADATA_DIR, REPOSITORY_DIR
from edge.fleet.pki.ca import CA_CERT_FILE
from edge.fleet.pki.registry import (
    AUTOSAVE_INTERVAL_S,
    BROKER_DIR,
    CRL_FILE,
    DEFAULT_GATEWAY_IDS,
    FRAGMENT_FILE,
    GATEWAY_DIR,
    GATEWAYS_FILE,
    MAX_INFLIGHT_MESSAGES,
    MAX_PACKET_BYTES,
    MAX_QUEUED_BYTES,
    MAX_QUEUED_MESSAGES,
    BrokerListener,
    dynsec_plugin_candidates,
    load_listener,
    render_fragment,
)
from edge.wire.schema import DEFAULT_LIMITS

__all__ = [
    "CERT_WARN_DAYS",
    "DEFAULT_SESSION_EXPIRY_S",
    "ConfOption",
    "Finding",
    "SessionProbe",
    "check_certificate",
    "check_crl",
    "check_fragment",
    "check_settings",
    "check_timestamp",
    "connect_packet",
    "diagnose",
    "exit_code",
    "parse_conf",
    "parse_connack",
    "probe_session",
    "read_broker_conf",
    "render",
    "session_finding",
]

Severity = Literal["ERROR", "WARN", "OK"]

CERT_WARN_DAYS: Final = 30  # a certificate or CRL closer than this to its end is a warning
# The repository's timestamp is signed for DEFAULT_EXPIRY_DAYS["timestamp"] (1 day): warn once less than half of that
# is left, i.e. the refresh timer missed its runs (every box refuses an expired timestamp, so no model updates).
TIMESTAMP_WARN: Final = datetime.timedelta(days=DEFAULT_EXPIRY_DAYS["timestamp"] / 2)
# The shortest offline time a persistent session must survive: a gateway down over a weekend night, a box offline.
MIN_CLIENT_EXPIRATION_S: Final = 86400
MAX_AUTOSAVE_S: Final = 60  # beyond this a broker crash costs minutes of resends (mosquitto's default: 1800 s)
MIN_INFLIGHT: Final = 500  # a box's publish window (edge.telemetry.publisher)
DEFAULT_SESSION_EXPIRY_S: Final = 86400  # the gateway's default session_expiry_s (edge.fleet.config)
_MAX_FILE_BYTES: Final = 1 << 20
_PROBE_TIMEOUT_S: Final = 5.0
# Options mosquitto reads as strings and refuses to see twice ("Duplicate persistence_location value").
_UNIQUE_OPTIONS: Final = frozenset({"persistence_location", "persistence_file", "pid_file"})
_DURATION_UNITS: Final = {"h": 3600, "d": 86400, "w": 7 * 86400, "m": 30 * 86400, "y": 365 * 86400}


@dataclass(frozen=True, slots=True)
class Finding:
    """One result of the doctor.

    Attributes:
        severity: ``ERROR`` (a guarantee is broken or about to be), ``WARN`` (costs resends or needs attention soon)
            or ``OK``.
        what: the thing checked, e.g. ``broker max_queued_messages`` or ``certificate gateway/gw-1.pem``.
        detail: what was found.
        fix: what to do ("" for OK).
    """

    severity: Severity
    what: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        """The one-line form: ``SEVERITY what: detail; fix: what to do``."""
        return f"{self.severity} {self.what}: {self.detail}" + (f"; fix: {self.fix}" if self.fix else "")

    def as_dict(self) -> dict[str, str]:
        """The JSON form."""
        return {"severity": self.severity, "what": self.what, "detail": self.detail, "fix": self.fix}


def _ok(what: str, detail: str) -> Finding:
    return Finding("OK", what, detail)


# -- mosquitto configuration ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfOption:
    """One option line of a mosquitto configuration file."""

    key: str
    value: str
    source: str  # "path:line"


def parse_conf(text: str, source: str) -> list[ConfOption]:
    """The options of one mosquitto configuration file, in order (comments and blank lines skipped).

    Args:
        text: the file's text.
        source: its path, for the findings.

    Returns:
        One ``ConfOption`` per option line.
    """
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        out.append(ConfOption(key, value.strip(), f"{source}:{n}"))
    return out


def _duration_s(text: str) -> int | None:
    """mosquitto's ``persistent_client_expiration`` (``14d``, ``1y``) in seconds; None if malformed."""
    if len(text) < 2 or text[-1] not in _DURATION_UNITS or not text[:-1].isdigit():
        return None
    return int(text[:-1]) * _DURATION_UNITS[text[-1]]


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def check_settings(options: Sequence[ConfOption], *, whole_config: bool, regenerate: str) -> list[Finding]:
    """Check the broker settings the delivery guarantees depend on, as mosquitto would apply them (the last
    occurrence of a global option wins; a second ``persistence_location`` stops it at start).

    Args:
        options: every option mosquitto reads, in its order (the whole configuration, or the fragment alone).
        whole_config: ``options`` is the whole configuration (else the fragment alone: what mosquitto.conf adds is
            unknown, so a persistence location not in the fragment is not an error).
        regenerate: the command that rewrites the fragment (named in the fixes).

    Returns:
        One finding per setting.
    """
    last: dict[str, ConfOption] = {}
    seen: dict[str, list[ConfOption]] = {}
    for o in options:
        last[o.key] = o
        seen.setdefault(o.key, []).append(o)
    out: list[Finding] = []
    restart = f"{regenerate}, then restart the broker"

    def value(key: str, default: str) -> tuple[str, str]:
        o = last.get(key)
        return (o.value, o.source) if o is not None else (default, "mosquitto's default")

    for key in sorted(_UNIQUE_OPTIONS):
        if len(seen.get(key, [])) > 1:
            where = ", ".join(o.source for o in seen[key])
            out.append(
                Finding(
                    "ERROR",
                    f"broker {key}",
                    f"set {len(seen[key])} times ({where}): mosquitto refuses to start (Duplicate {key} value)",
                    f"keep one: remove it from mosquitto.conf, or `{regenerate} --persistence-location ''`"
                    if key == "persistence_location"
                    else "keep one",
                )
            )

    v, src = value("persistence", "false")
    if v != "true":
        out.append(
            Finding(
                "ERROR",
                "broker persistence",
                f"{v} ({src}): a broker restart loses every queued message and session (the boxes resend)",
                restart,
            )
        )
    else:
        out.append(_ok("broker persistence", f"true ({src})"))
        loc = last.get("persistence_location")
        if loc is not None:
            out.append(_ok("broker persistence_location", f"{loc.value} ({loc.source})"))
        elif whole_config:
            out.append(
                Finding(
                    "ERROR",
                    "broker persistence_location",
                    "not set: mosquitto saves into its working directory (under systemd: /, which its user cannot "
                    "write), so nothing survives a restart",
                    f"add `persistence_location /var/lib/mosquitto/` to mosquitto.conf, or "
                    f"`{regenerate} --persistence-location DIR`",
                )
            )
        else:
            out.append(
                _ok(
                    "broker persistence_location",
                    "left to mosquitto.conf (Debian's default sets /var/lib/mosquitto/; "
                    "pass --broker-conf to check it)",
                )
            )

    v, src = value("autosave_interval", "1800")
    on_changes, _ = value("autosave_on_changes", "false")
    n = _int(v)
    if on_changes == "true":
        out.append(
            Finding(
                "WARN",
                "broker autosave_on_changes",
                f"true: autosave_interval ({v}) counts changes, so an idle broker may not save for a long time",
                restart,
            )
        )
    elif n is None or n <= 0 or n > MAX_AUTOSAVE_S:
        out.append(
            Finding(
                "ERROR",
                "broker autosave_interval",
                f"{v} ({src}): a SIGKILL or power loss loses "
                + ("everything since the start" if n == 0 else f"up to {v} s")
                + " of queued messages (the boxes resend them after telemetry.receipt_timeout_s)",
                f"{restart} (autosave_interval {AUTOSAVE_INTERVAL_S})",
            )
        )
    else:
        out.append(_ok("broker autosave_interval", f"{v} s ({src})"))

    v, src = value("max_queued_messages", "1000")
    n = _int(v)
    if n == 0:
        out.append(
            Finding(
                "WARN",
                "broker max_queued_messages",
                f"0 ({src}): unlimited in mosquitto 2.0.11, but some 2.0.x versions read 0 as a quota of nothing",
                f"{restart} (max_queued_messages {MAX_QUEUED_MESSAGES})",
            )
        )
    elif n is None or n < MAX_QUEUED_MESSAGES:
        out.append(
            Finding(
                "ERROR",
                "broker max_queued_messages",
                f"{v} ({src}): once a gateway falls that far behind (a restart, an outage, one box flooding its "
                "topic) the broker drops what it already acknowledged to the boxes",
                f"{restart} (max_queued_messages {MAX_QUEUED_MESSAGES})",
            )
        )
    else:
        out.append(_ok("broker max_queued_messages", f"{v} ({src})"))

    v, src = value("max_queued_bytes", "0")
    n = _int(v)
    if n == 0:
        out.append(
            Finding(
                "WARN",
                "broker max_queued_bytes",
                f"0 ({src}): no byte bound, so a flood of large envelopes can exhaust the broker's memory",
                f"{restart} (max_queued_bytes {MAX_QUEUED_BYTES})",
            )
        )
    elif n is None or n < MAX_QUEUED_BYTES:
        out.append(
            Finding(
                "WARN",
                "broker max_queued_bytes",
                f"{v} ({src}): a gateway outage fills it sooner than {MAX_QUEUED_BYTES} bytes, then the broker drops "
                "(the boxes resend)",
                f"{restart} (max_queued_bytes {MAX_QUEUED_BYTES})",
            )
        )
    else:
        out.append(_ok("broker max_queued_bytes", f"{v} ({src})"))

    v, src = value("max_inflight_messages", "20")
    n = _int(v)
    if n is None or 0 < n < MIN_INFLIGHT:
        out.append(
            Finding(
                "WARN",
                "broker max_inflight_messages",
                f"{v} ({src}): below a box's publish window ({MIN_INFLIGHT}), so every box is throttled",
                f"{restart} (max_inflight_messages {MAX_INFLIGHT_MESSAGES})",
            )
        )
    else:
        out.append(_ok("broker max_inflight_messages", f"{v} ({src})"))

    v, src = value("max_packet_size", "0")
    n = _int(v)
    if n == 0:
        out.append(
            Finding(
                "WARN",
                "broker max_packet_size",
                f"0 ({src}): no limit, so a hostile box can make the broker buffer huge messages",
                f"{restart} (max_packet_size {MAX_PACKET_BYTES})",
            )
        )
    elif n is None or n < MAX_PACKET_BYTES:
        out.append(
            Finding(
                "ERROR",
                "broker max_packet_size",
                f"{v} ({src}): smaller than the largest envelope plus its headers ({MAX_PACKET_BYTES}): such "
                "envelopes are refused and their box disconnected, for ever",
                f"{restart} (max_packet_size {MAX_PACKET_BYTES})",
            )
        )
    else:
        out.append(_ok("broker max_packet_size", f"{v} ({src})"))

    v, src = value("message_size_limit", "0")
    n = _int(v)
    if n is None or 0 < n < DEFAULT_LIMITS.max_envelope_bytes:
        out.append(
            Finding(
                "ERROR",
                "broker message_size_limit",
                f"{v} ({src}): smaller than the largest envelope ({DEFAULT_LIMITS.max_envelope_bytes} bytes): the "
                "broker answers such an envelope with an error and its box retries it for ever",
                f"remove message_size_limit ({src}); max_packet_size bounds messages",
            )
        )

    v, src = value("persistent_client_expiration", "")
    if not v:
        out.append(
            Finding(
                "WARN",
                "broker persistent_client_expiration",
                "not set: a session asking to be kept for ever is never removed, with its queue",
                f"{restart} (persistent_client_expiration 30d)",
            )
        )
    else:
        secs = _duration_s(v)
        if secs is None or secs < MIN_CLIENT_EXPIRATION_S:
            out.append(
                Finding(
                    "ERROR",
                    "broker persistent_client_expiration",
                    f"{v} ({src}): an offline gateway's or box's session (and its queue) is removed within a day",
                    f"{restart} (persistent_client_expiration 30d)",
                )
            )
        else:
            out.append(_ok("broker persistent_client_expiration", f"{v} ({src})"))

    v, src = value("retain_available", "true")
    if v != "true":
        out.append(
            Finding(
                "ERROR",
                "broker retain_available",
                f"{v} ({src}): the gateway's retained receipts are refused, so boxes resend everything",
                restart,
            )
        )
    else:
        out.append(_ok("broker retain_available", f"{v} ({src})"))
    return out


def _significant(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def check_fragment(actual: str, expected: str, *, path: str, regenerate: str) -> Finding:
    """Whether the fragment on disk is what ``broker-config`` writes now (comments, and so the time stamp, aside).

    Args:
        actual: the fragment's text.
        expected: ``render_fragment`` for the recorded settings.
        path: the fragment's path.
        regenerate: the command that rewrites it.
    """
    got, want = _significant(actual), _significant(expected)
    if got == want:
        return _ok("broker fragment", f"{path} is current")
    for i in range(max(len(got), len(want))):
        g = got[i] if i < len(got) else "(nothing)"
        w = want[i] if i < len(want) else "(nothing)"
        if g != w:
            break
    return Finding(
        "WARN",
        "broker fragment",
        f"{path} differs from what broker-config writes now (has {g!r} where {w!r} is due)",
        f"{regenerate}, then restart the broker",
    )


# -- certificates, CRL, TUF timestamp -------------------------------------------------------------------------------


def _remaining(end: datetime.datetime, now: datetime.datetime) -> str:
    left = end - now
    if left.total_seconds() < 0:
        return f"expired {end.isoformat(timespec='seconds')}"
    return f"valid until {end.isoformat(timespec='seconds')} ({left.days} days)"


def check_certificate(
    what: str, pem: bytes, *, ca: x509.Certificate | None, now: datetime.datetime, fix: str
) -> Finding:
    """A certificate's expiry and issuer.

    Args:
        what: what it is, e.g. ``certificate broker/server.pem``.
        pem: the certificate (PEM).
        ca: the fleet CA that must have issued it; None to skip that check (the CA itself).
        now: the current time (timezone-aware).
        fix: how to issue a new one.

    Returns:
        ERROR when unreadable, not the fleet CA's or expired; WARN within ``CERT_WARN_DAYS`` of its end.
    """
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        return Finding("ERROR", what, f"not a PEM certificate ({e})", fix)
    if ca is not None:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature) as e:
            return Finding("ERROR", what, f"not issued by the fleet CA ({type(e).__name__})", fix)
    end = cert.not_valid_after_utc
    if end <= now:
        return Finding("ERROR", what, _remaining(end, now), fix)
    if end - now < datetime.timedelta(days=CERT_WARN_DAYS):
        return Finding("WARN", what, _remaining(end, now), fix)
    if cert.not_valid_before_utc > now:
        return Finding("ERROR", what, f"not valid before {cert.not_valid_before_utc.isoformat()}", "check the clock")
    return _ok(what, _remaining(end, now))


def check_crl(pem: bytes, *, ca: x509.Certificate | None, now: datetime.datetime, path: str, fix: str) -> Finding:
    """The CRL the broker checks every client against: readable, signed by the fleet CA, nextUpdate not passed.

    OpenSSL refuses every client once the CRL's nextUpdate has passed: the whole fleet is locked out.

    Args:
        pem: the CRL (PEM).
        ca: the fleet CA (None: signature not checked).
        now: the current time (timezone-aware).
        path: its path, for the finding.
        fix: how to write a new one.
    """
    what = f"CRL {path}"
    try:
        crl = x509.load_pem_x509_crl(pem)
    except ValueError as e:
        return Finding("ERROR", what, f"not a PEM CRL ({e})", fix)
    if ca is not None:
        key = ca.public_key()
        if not isinstance(key, Ed25519PublicKey) or not crl.is_signature_valid(key):
            return Finding("ERROR", what, "not signed by the fleet CA: the broker refuses every client", fix)
    nxt = crl.next_update_utc
    if nxt is None:
        return _ok(what, f"{len(crl)} revoked, no nextUpdate")
    if nxt <= now:
        return Finding(
            "ERROR",
            what,
            f"nextUpdate {nxt.isoformat(timespec='seconds')} has passed: OpenSSL refuses every client",
            fix,
        )
    if nxt - now < datetime.timedelta(days=CERT_WARN_DAYS):
        return Finding("WARN", what, f"nextUpdate {nxt.isoformat(timespec='seconds')} is near", fix)
    return _ok(what, f"{len(crl)} revoked, nextUpdate {nxt.isoformat(timespec='seconds')}")


def check_timestamp(data: bytes, *, now: datetime.datetime, path: str, fix: str) -> Finding:
    """The TUF repository's timestamp: every box refuses an expired one (no model updates).

    Args:
        data: ``timestamp.json``.
        now: the current time (timezone-aware).
        path: its path, for the finding.
        fix: how to sign a new one.
    """
    what = f"TUF timestamp {path}"
    try:
        doc: Any = json.loads(data)
        expires = datetime.datetime.fromisoformat(str(doc["signed"]["expires"]).replace("Z", "+00:00"))
    except (ValueError, KeyError, TypeError) as e:
        return Finding("ERROR", what, f"unreadable ({type(e).__name__}: {e})", fix)
    if expires.tzinfo is None:
        expires = expires.replace(tzinfo=datetime.UTC)
    if expires <= now:
        return Finding("ERROR", what, f"expired {expires.isoformat(timespec='seconds')}: boxes refuse updates", fix)
    if expires - now < TIMESTAMP_WARN:
        return Finding("WARN", what, f"expires {expires.isoformat(timespec='seconds')}", fix)
    return _ok(what, f"expires {expires.isoformat(timespec='seconds')}")


# -- the gateway's session ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionProbe:
    """What talking to the broker as a gateway identity found.

    Attributes:
        gateway: the identity used.
        address: ``host:port``.
        error: why the broker could not be reached or refused (None: it answered).
        tls: the TLS version negotiated ("" when no handshake).
        connected: a CONNECT was sent and the CONNACK read.
        reason_code: the CONNACK's reason code (0: success).
        session_present: the CONNACK's session-present flag.
    """

    gateway: str
    address: str
    error: str | None = None
    tls: str = ""
    connected: bool = False
    reason_code: int = 0
    session_present: bool = False


def session_finding(probe: SessionProbe, *, forced_client_id: bool) -> Finding:
    """Turn a probe into a finding.

    Args:
        probe: the result.
        forced_client_id: the broker makes the client id the certificate's CN (so a CONNECT needed ``--connect``).
    """
    what = f"gateway session {probe.gateway}@{probe.address}"
    if probe.error is not None:
        return Finding("ERROR", what, probe.error, "start the broker, or check its address, port and certificates")
    if not probe.connected:
        why = (
            "the broker makes the client id the certificate's CN, so a CONNECT would take over the running gateway's "
            "session (it reconnects); pass --connect to check it"
            if forced_client_id
            else "pass --connect to check the broker's answer to a CONNECT"
        )
        return _ok(what, f"the broker answers TLS ({probe.tls}); session not checked: {why}")
    if probe.reason_code != 0:
        return Finding(
            "ERROR",
            what,
            f"the broker refused the CONNECT (reason code 0x{probe.reason_code:02x})",
            "check the gateway identity's rights: `edge fleet ca issue-client NAME`, then restart the broker or a "
            "running gateway applies them",
        )
    if not forced_client_id:
        return _ok(what, "the broker accepted a CONNECT (another client id: the gateway's session not checked)")
    if probe.session_present:
        return _ok(what, "the broker keeps a persistent session for it (queued telemetry waits there)")
    return Finding(
        "WARN",
        what,
        "no persistent session: telemetry published while no gateway of the share group was ever connected is "
        "answered 'No matching subscribers' (the boxes keep it and resend)",
        "start `edge gateway run` once with this identity; with persistence on, its session then survives restarts",
    )


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _mqtt_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def connect_packet(client_id: str, *, clean_start: bool, session_expiry: int, keepalive: int = 10) -> bytes:
    """An MQTT 5 CONNECT with a Session Expiry Interval and Receive Maximum 1 (the broker sends at most one message
    we then never acknowledge: it is redelivered to the session's owner).

    Args:
        client_id: the client id (the broker may replace it with the certificate's CN).
        clean_start: the Clean Start flag.
        session_expiry: seconds the session outlives the connection.
        keepalive: seconds.
    """
    props = b"\x11" + struct.pack("!I", session_expiry) + b"\x21" + struct.pack("!H", 1)
    var = _mqtt_string("MQTT") + bytes([5, 0x02 if clean_start else 0x00]) + struct.pack("!H", keepalive)
    body = var + _varint(len(props)) + props + _mqtt_string(client_id)
    return b"\x10" + _varint(len(body)) + body


def parse_connack(packet: bytes) -> tuple[bool, int]:
    """(session present, reason code) of an MQTT 5 CONNACK (fixed header included).

    Raises:
        ValueError: not a CONNACK.
    """
    if len(packet) < 4 or packet[0] != 0x20:
        raise ValueError(f"expected a CONNACK, got {packet[:8].hex()}")
    i = 1
    while packet[i] & 0x80:  # the remaining length's varint
        i += 1
    return bool(packet[i + 1] & 0x01), packet[i + 2]


def _read_packet(sock: ssl.SSLSocket) -> bytes:
    head = sock.recv(1)
    if not head:
        raise ConnectionError("the broker closed the connection")
    length, mult, raw = 0, 1, bytearray()
    while True:
        b = sock.recv(1)
        if not b:
            raise ConnectionError("the broker closed the connection")
        raw += b
        length += (b[0] & 0x7F) * mult
        mult *= 128
        if not b[0] & 0x80:
            break
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        body += chunk
    return head + bytes(raw) + body


def probe_session(
    host: str,
    port: int,
    *,
    gateway: str,
    ca: Path,
    cert: Path,
    key: Path,
    connect: bool,
    forced_client_id: bool,
    session_expiry: int,
    timeout: float = _PROBE_TIMEOUT_S,
) -> SessionProbe:
    """Talk to the broker as ``gateway``: a TLS handshake, and with ``connect`` a CONNECT (see the module docstring).

    Returns:
        The probe; network and TLS failures are in its ``error``, never raised.
    """
    address = f"{host}:{port}"
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as e:
        return SessionProbe(gateway, address, error=f"cannot load {ca}, {cert} or {key} ({e})")
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            ctx.wrap_socket(raw, server_hostname=host) as sock,
        ):
            tls = sock.version() or "TLS"
            if not connect:
                return SessionProbe(gateway, address, tls=tls)
            # With the client id forced to the CN, clean_start=0 asks for the gateway's own session; otherwise a
            # client id of our own, clean, so nothing of the gateway's is touched.
            client_id = gateway if forced_client_id else f"{gateway}-doctor"
            sock.sendall(
                connect_packet(
                    client_id,
                    clean_start=not forced_client_id,
                    session_expiry=session_expiry if forced_client_id else 0,
                )
            )
            present, code = parse_connack(_read_packet(sock))
            if code == 0:
                # DISCONNECT; a session this CONNECT created (none was present) is ended with it (Session Expiry 0).
                if forced_client_id and not present:
                    sock.sendall(b"\xe0\x07\x00\x05\x11\x00\x00\x00\x00")
                else:
                    sock.sendall(b"\xe0\x00")
            return SessionProbe(gateway, address, tls=tls, connected=True, reason_code=code, session_present=present)
    except (OSError, ValueError) as e:  # ssl.SSLError, timeouts and refused connections are OSErrors
        return SessionProbe(gateway, address, error=f"{type(e).__name__}: {e}")


# -- the I/O shell ----------------------------------------------------------------------------------------------------


def _read(path: Path) -> bytes:
    with path.open("rb") as f:
        data = f.read(_MAX_FILE_BYTES + 1)
    if len(data) > _MAX_FILE_BYTES:
        raise OSError(f"larger than {_MAX_FILE_BYTES} bytes")
    return data


def _missing(what: str, path: Path, e: OSError, fix: str, severity: Severity = "ERROR") -> Finding:
    why = "missing" if isinstance(e, FileNotFoundError) else f"unreadable ({e.strerror or e})"
    return Finding(severity, what, f"{path} is {why}", fix)


def read_broker_conf(path: Path) -> tuple[list[ConfOption], list[Path], list[Finding]]:
    """Read a mosquitto.conf and the ``*.conf`` files of its ``include_dir`` lines, in mosquitto's order.

    Returns:
        (the options, the included files, findings for what could not be read).
    """
    findings: list[Finding] = []
    try:
        text = _read(path).decode("utf-8", "replace")
    except OSError as e:
        return [], [], [_missing("broker config", path, e, "pass the mosquitto.conf the broker runs with")]
    options: list[ConfOption] = []
    included: list[Path] = []
    for o in parse_conf(text, str(path)):
        if o.key != "include_dir":
            options.append(o)
            continue
        directory = Path(o.value)
        try:
            # mosquitto sorts case-sensitively, upper case before the lower case of the same letter.
            files = sorted(
                (p for p in directory.iterdir() if p.name.endswith(".conf")),
                key=lambda p: [(c.lower(), c.islower()) for c in p.name],
            )
        except OSError as e:
            findings.append(_missing("broker include_dir", directory, e, f"fix {o.source}: mosquitto refuses to start"))
            continue
        for f in files:
            try:
                options.extend(parse_conf(_read(f).decode("utf-8", "replace"), str(f)))
                included.append(f)
            except OSError as e:
                findings.append(_missing("broker config", f, e, "make it readable"))
    return options, included, findings


def _broker_user(options: Sequence[ConfOption]) -> str:
    user = "mosquitto"  # mosquitto's default when started as root (Debian's unit starts it as root)
    for o in options:
        if o.key == "user":
            user = o.value
    return user


def _can(path: Path, user: str, bit_owner: int, bit_group: int, bit_other: int) -> bool | None:
    """Whether ``user`` has the permission on ``path`` by its mode (None: no such user here)."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return None
    st = path.stat()
    if pw.pw_uid == 0:
        return True
    if st.st_uid == pw.pw_uid:
        return bool(st.st_mode & bit_owner)
    groups = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    if st.st_gid in groups:
        return bool(st.st_mode & bit_group)
    return bool(st.st_mode & bit_other)


def _check_location(location: str, user: str) -> Finding:
    what = "broker persistence directory"
    path = Path(location)
    fix = f"create it and give it to the broker's user: `install -d -o {user} {path}`"
    if not path.is_dir():
        return Finding("ERROR", what, f"{path} is not a directory: mosquitto cannot save (it only logs)", fix)
    writable = _can(path, user, stat.S_IWUSR, stat.S_IWGRP, stat.S_IWOTH)
    if writable is None:
        return _ok(what, f"{path} exists (no user {user!r} on this host: its rights not checked)")
    if not writable:
        return Finding("ERROR", what, f"{path} is not writable by {user!r}: mosquitto cannot save (it only logs)", fix)
    return _ok(what, f"{path} is writable by {user!r}")


def _check_key(path: Path, user: str) -> Finding:
    what = f"server key {path}"
    try:
        readable = _can(path, user, stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH)
    except OSError as e:
        return _missing(what, path, e, "`edge fleet ca issue-server --host HOST`")
    if readable is None:
        return _ok(what, f"present (no user {user!r} on this host: its rights not checked)")
    if not readable:
        return Finding(
            "ERROR",
            what,
            f"not readable by {user!r}, the user mosquitto drops to before it loads its key: the listener fails",
            f"`chgrp {user} {path} && chmod 0640 {path}` (edge fleet ca issue-server does it for group mosquitto)",
        )
    return _ok(what, f"readable by {user!r}")


def _gateway_ids(broker_dir: Path) -> tuple[str, ...]:
    try:
        text = _read(broker_dir / GATEWAYS_FILE).decode("utf-8", "replace")
    except OSError:
        return DEFAULT_GATEWAY_IDS
    return tuple(sorted({n.strip() for n in text.splitlines() if n.strip() and not n.lstrip().startswith("#")}))


def _expected_fragment(fleet_dir: Path, listener: BrokerListener, now: datetime.datetime) -> str | None:
    plugin = listener.dynsec_plugin or next((p for p in dynsec_plugin_candidates() if p.is_file()), None)
    return None if plugin is None else render_fragment(fleet_dir, listener, plugin, now=now)


def diagnose(
    fleet_dir: Path,
    *,
    now: datetime.datetime,
    broker_conf: Path | None = None,
    connect: bool = False,
    gateway: str | None = None,
    host: str | None = None,
    session_expiry: int = DEFAULT_SESSION_EXPIRY_S,
) -> list[Finding]:
    """Check a fleet directory and its broker (see the module docstring).

    Args:
        fleet_dir: the fleet directory.
        now: the current time (timezone-aware).
        broker_conf: the broker's mosquitto.conf (read with its includes); None: the fragment alone.
        connect: send a CONNECT as the gateway identity (takes over its session while it runs; see above).
        gateway: the gateway identity to probe with; None: the first with a certificate in ``gateway/``.
        host: the broker's address; None: the listener's bind address, else 127.0.0.1.
        session_expiry: the Session Expiry Interval a CONNECT asks for (the gateway's ``session_expiry_s``).

    Returns:
        The findings, in the order checked.
    """
    regenerate = f"edge fleet --dir {fleet_dir} broker-config"
    if not fleet_dir.is_dir():
        return [Finding("ERROR", "fleet directory", f"{fleet_dir} does not exist", "pass --dir, or `ca init`")]
    out: list[Finding] = []
    broker_dir = fleet_dir / BROKER_DIR
    try:
        listener = load_listener(broker_dir)
    except ConfigError as e:
        out.append(Finding("ERROR", "broker listener", str(e), f"{regenerate} --port PORT"))
        listener = BrokerListener()

    # The fragment: present, current, and the settings the guarantees need.
    fragment = broker_dir / FRAGMENT_FILE
    options: list[ConfOption] = []
    try:
        text = _read(fragment).decode("utf-8", "replace")
        options = parse_conf(text, str(fragment))
        expected = _expected_fragment(fleet_dir, listener, now)
        if expected is None:
            out.append(
                Finding(
                    "ERROR",
                    "broker dynamic-security plugin",
                    "mosquitto_dynamic_security.so not found",
                    f"install mosquitto 2, or {regenerate} --dynsec-plugin PATH",
                )
            )
        else:
            out.append(check_fragment(text, expected, path=str(fragment), regenerate=regenerate))
    except OSError as e:
        out.append(_missing("broker fragment", fragment, e, regenerate))
    whole = broker_conf is not None
    if broker_conf is not None:
        options, included, found = read_broker_conf(broker_conf)
        out += found
        if fragment.exists() and fragment.resolve() not in {p.resolve() for p in included}:
            out.append(
                Finding(
                    "ERROR",
                    "broker config",
                    f"{broker_conf} does not include {fragment}",
                    f"add `include_dir {broker_dir}` to {broker_conf} and restart the broker",
                )
            )
    if options:
        out += check_settings(options, whole_config=whole, regenerate=regenerate)
        location = next((o.value for o in reversed(options) if o.key == "persistence_location"), None)
        if location is not None:
            out.append(_check_location(location, _broker_user(options)))
    user = _broker_user(options)

    # Certificates, the CRL.
    ca_path = fleet_dir / CA_CERT_FILE
    ca: x509.Certificate | None = None
    try:
        ca_pem = _read(ca_path)
        out.append(check_certificate(f"CA {ca_path}", ca_pem, ca=None, now=now, fix="a new CA: `ca init --force`"))
        try:
            ca = x509.load_pem_x509_certificate(ca_pem)
        except ValueError:
            ca = None
    except OSError as e:
        out.append(_missing("CA", ca_path, e, f"edge fleet --dir {fleet_dir} ca init"))
    server_cert = listener.certfile or broker_dir / "server.pem"
    server_key = listener.keyfile or broker_dir / "server.key"
    issue_server = f"edge fleet --dir {fleet_dir} ca issue-server --host HOST"
    try:
        out.append(
            check_certificate(f"certificate {server_cert}", _read(server_cert), ca=ca, now=now, fix=issue_server)
        )
    except OSError as e:
        out.append(_missing(f"certificate {server_cert}", server_cert, e, issue_server))
    out.append(_check_key(server_key, user))
    crl_path = broker_dir / CRL_FILE
    try:
        out.append(check_crl(_read(crl_path), ca=ca, now=now, path=str(crl_path), fix=f"{regenerate}, then reload"))
    except OSError as e:
        out.append(_missing(f"CRL {crl_path}", crl_path, e, f"{regenerate}, then reload the broker"))
    probe_with: tuple[str, Path, Path] | None = None
    for name in _gateway_ids(broker_dir):
        cert, key = fleet_dir / GATEWAY_DIR / f"{name}.pem", fleet_dir / GATEWAY_DIR / f"{name}.key"
        issue = f"edge fleet --dir {fleet_dir} ca issue-client {name}"
        try:
            out.append(check_certificate(f"certificate {cert}", _read(cert), ca=ca, now=now, fix=issue))
        except OSError as e:
            out.append(
                _missing(f"certificate {cert}", cert, e, f"check it where gateway {name} runs, or {issue}", "WARN")
            )
            continue
        if key.is_file() and (probe_with is None or name == gateway):
            probe_with = (name, cert, key)

    # The TUF repository's timestamp.
    ts = fleet_dir / REPOSITORY_DIR / METADATA_DIR / "timestamp.json"
    if ts.parent.is_dir():
        refresh = f"edge fleet --dir {fleet_dir} models refresh (from a timer)"
        try:
            out.append(check_timestamp(_read(ts), now=now, path=str(ts), fix=refresh))
        except OSError as e:
            out.append(_missing(f"TUF timestamp {ts}", ts, e, refresh))
    else:
        out.append(_ok("TUF repository", f"{ts.parent.parent} not set up (no model updates)"))

    # The broker itself, as a gateway.
    forced = next((o.value for o in reversed(options) if o.key == "use_username_as_clientid"), "false") == "true"
    if gateway is not None and (probe_with is None or probe_with[0] != gateway):
        out.append(
            Finding(
                "ERROR",
                f"gateway session {gateway}",
                f"no certificate and key for gateway {gateway!r} in {fleet_dir / GATEWAY_DIR}",
                "name a gateway identity listed in broker/gateways whose files are here",
            )
        )
    elif probe_with is None:
        out.append(
            Finding(
                "WARN",
                "gateway session",
                f"no gateway certificate and key in {fleet_dir / GATEWAY_DIR}: the broker was not contacted",
                f"edge fleet --dir {fleet_dir} ca issue-client NAME",
            )
        )
    else:
        name, cert, key = probe_with
        address = host or listener.bind or "127.0.0.1"
        probe = probe_session(
            address,
            listener.port,
            gateway=name,
            ca=ca_path,
            cert=cert,
            key=key,
            connect=connect,
            forced_client_id=forced,
            session_expiry=session_expiry,
        )
        out.append(session_finding(probe, forced_client_id=forced))
    return out


def exit_code(findings: Iterable[Finding]) -> int:
    """1 when a finding is an ERROR, else 0."""
    return 1 if any(f.severity == "ERROR" for f in findings) else 0


def render(findings: Sequence[Finding], *, as_json: bool) -> str:
    """The findings as lines (``SEVERITY what: detail; fix: ...``) or as a JSON array."""
    if as_json:
        return json.dumps([f.as_dict() for f in findings], indent=2)
    return "\n".join(f.line() for f in findings)
