"""Why a connection to the broker failed, named: the sans-IO classifier behind ``MqttTransport.last_failure``.

``classify_connect_error`` takes what one attempt showed (the exception of the TCP/TLS connect, the CONNACK's refusal,
the text paho reported for a socket error, the reason of a DISCONNECT, how many times the session was taken over
lately) and what the box knows about itself (``ConnectContext``: where it connects, its CA file, its certificate's CN
and expiry) and returns a ``ConnectFailure``: one of the causes below, whether a human must act (``permanent``), a
one-line detail naming the address and the file or setting at fault, and the fix. No I/O, no paho: the transport
(``edge.mqtt``) gathers the facts and logs the verdict.

    cause                 permanent  seen as
    wrong_ca              yes        the broker's certificate does not verify against our CA file (client side), or
                                     the broker does not accept our certificate's CA (alert "unknown ca" or
                                     "decrypt error")
    certificate_expired   yes        alert "certificate expired" from the broker, or our certificate's notAfter is
                                     past (local clock) and the broker ended the handshake without saying why
    certificate_revoked   yes        alert "certificate revoked" (our certificate is on the broker's CRL)
    client_id_mismatch    yes        CONNACK "Not authorized"/"Bad user name or password" and our client id is not
                                     our certificate's CN
    not_authorized        yes        the same refusal with matching ids: the fleet has not granted this identity
    identity_in_use       at 3/60 s  the broker ended the session for another connection with our identity
    unreachable           no         connection refused, timeouts, DNS failure, no route: any non-TLS OSError
    other                 no         anything else, with the raw reason

Measured against mosquitto 2.0.11 with OpenSSL 3 and TLS 1.3 (tests/test_connect_failures.py):
- A TLS 1.3 client finishes its handshake before the broker has checked its certificate, so the broker's alert
  ("certificate expired", "certificate revoked") arrives after ``connect`` returned. Once paho has sent CONNECT, the
  alert usually loses the race against the broker closing the socket: paho then reports "EOF occurred in violation of
  protocol" (6 of 8 tries). The transport therefore reads the broker's verdict before CONNECT is sent (it takes one
  round trip: the broker sends its session tickets or the alert); the local expiry check covers the rest.
- With TLS 1.2 the alert ends the handshake: ``connect`` raises ``ssl.SSLError`` whose ``reason`` is
  ``SSLV3_ALERT_CERTIFICATE_EXPIRED`` or ``SSLV3_ALERT_CERTIFICATE_REVOKED``.
- mosquitto 2.0.11 sends no DISCONNECT "Session taken over" (142) to the client whose session another connection took
  over: it closes the socket, and paho reports "Unspecified error", exactly as when the broker is stopped or killed.
  The transport therefore reconnects at once after such a silent close: a broker that died refuses that attempt
  (and any failed attempt restarts the count), a broker that gave our session to another connection accepts it.
  ``TAKEOVER_LIMIT`` silent closes within ``TAKEOVER_WINDOW_S`` with no failed attempt between them make
  ``identity_in_use`` (two boxes with one identity take the session from each other at every reconnect). A
  DISCONNECT 142 from a newer broker counts at once.
- mosquitto 2.0.11 binds no client id to a certificate identity at CONNECT (``use_identity_as_username``: a CONNECT
  with another client id is accepted; the fleet's ``use_username_as_clientid`` replaces it with the CN). A CONNACK
  refusal there means another rule of the broker refused the identity (``clientid_prefixes``, a plugin).
"""

from __future__ import annotations

import datetime
import logging
import re
import socket
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Final

__all__ = [
    "BROKER_SETTING_NAMES",
    "CAUSES",
    "SESSION_TAKEN_OVER",
    "TAKEOVER_LIMIT",
    "TAKEOVER_WINDOW_S",
    "ConnectContext",
    "ConnectFailure",
    "SettingNames",
    "TakeoverWatch",
    "certificate_facts",
    "classify_connect_error",
]

CAUSES: Final = (
    "wrong_ca",
    "certificate_expired",
    "certificate_revoked",
    "client_id_mismatch",
    "not_authorized",
    "identity_in_use",
    "unreachable",
    "other",
)
# Takeovers this close together are no longer a restart of our own process or a doctor's probe: another box holds
# the identity.
TAKEOVER_LIMIT: Final = 3
TAKEOVER_WINDOW_S: Final = 60.0

# Reason names as paho spells them (MQTT 5 reason codes 134, 135, 142).
_REFUSED_IDENTITY: Final = frozenset({"Not authorized", "Bad user name or password"})
SESSION_TAKEN_OVER: Final = "Session taken over"
# OpenSSL's reason for an alert, as ``ssl.SSLError.reason`` has it and paho's "failed to receive on socket" text
# quotes it: "[SSL: SSLV3_ALERT_CERTIFICATE_REVOKED] sslv3 alert certificate revoked (_ssl.c:2580)".
_SSL_REASON: Final = re.compile(r"\[SSL: ([A-Z0-9_]+)\]")
_ALERT_EXPIRED: Final = "SSLV3_ALERT_CERTIFICATE_EXPIRED"
_ALERT_REVOKED: Final = "SSLV3_ALERT_CERTIFICATE_REVOKED"
# The broker does not accept the CA of our certificate: "unknown ca" when it has no CA of that name, "decrypt error"
# when its CA of that name has another key (two fleets whose CAs share a name; measured with OpenSSL 3).
_ALERTS_FOREIGN_CA: Final = frozenset({"TLSV1_ALERT_UNKNOWN_CA", "TLSV1_ALERT_DECRYPT_ERROR"})
_VERIFY_FAILED: Final = "CERTIFICATE_VERIFY_FAILED"
_EOF_IN_HANDSHAKE: Final = "UNEXPECTED_EOF_WHILE_READING"
# X509_V_ERR_* codes of ``ssl.SSLCertVerificationError.verify_code`` that are not a CA mismatch.
_X509_NOT_YET_VALID: Final = 9
_X509_EXPIRED: Final = 10
_X509_HOSTNAME_MISMATCH: Final = 62
_X509_IP_MISMATCH: Final = 64

# The box's enrollment commands (docs/configuration.md): renewal needs a certificate that is still valid.
_CLAIM_AGAIN: Final = "claim the box again with a new claim code from the operator (`edge enroll --claim CODE`)"


@dataclass(frozen=True, slots=True)
class SettingNames:
    """The configuration keys a failure names, per part of the connection (the box's keys by default).

    Attributes:
        host: the broker's host. port: its port. ca: the fleet CA file. cert: our certificate file.
        client_id: what sets the MQTT client id. key: our private key file.
    """

    host: str = "telemetry.host"
    port: str = "telemetry.port"
    ca: str = "telemetry.ca"
    cert: str = "telemetry.cert"
    client_id: str = "device.id"
    key: str = "telemetry.key"


# The gateway's keys (docs/gateway.md, [broker]), for its connection's failures.
BROKER_SETTING_NAMES: Final = SettingNames(
    host="broker.host", port="broker.port", ca="broker.ca", cert="broker.cert", client_id="gateway.id", key="broker.key"
)


@dataclass(frozen=True, slots=True)
class ConnectContext:
    """What the classifier knows about the attempt besides its outcome.

    Attributes:
        host: the broker's host as configured.
        port: its port.
        ca: the CA file's path.
        cert: our certificate file's path.
        client_id: the client id we sent.
        cert_cn: our certificate's subject CN (None: unreadable or absent).
        cert_not_after: our certificate's notAfter, epoch seconds (None: unreadable).
        names: the configuration keys to name in messages.
    """

    host: str
    port: int
    ca: str
    cert: str
    client_id: str
    cert_cn: str | None = None
    cert_not_after: float | None = None
    names: SettingNames = SettingNames()  # frozen: one shared default is safe

    @property
    def address(self) -> str:
        """``host:port``."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ConnectFailure:
    """One failed connection, named.

    Attributes:
        cause: one of ``CAUSES``.
        permanent: True when retrying cannot help until a human acts (logged at ERROR, retried on the long
            schedule); False for what may pass by itself (WARNING, the usual backoff).
        detail: one line: what happened, the broker's address and the file or setting at fault.
        fix: one line: what to do.
        at: when, epoch seconds.
        after_connack: the broker accepted the connection and then refused our birth message: the identity has no
            rights on its own topics (not granted yet, suspended or revoked).
    """

    cause: str
    permanent: bool
    detail: str
    fix: str
    at: float
    after_connack: bool = False

    @property
    def level(self) -> int:
        """The log level: ERROR for a permanent failure, WARNING otherwise."""
        return logging.ERROR if self.permanent else logging.WARNING

    @property
    def message(self) -> str:
        """The log line: ``<cause>: <detail>; fix: <fix>``."""
        return f"{self.cause}: {self.detail}; fix: {self.fix}"


class TakeoverWatch:
    """Counts the sessions taken over within ``window_s`` (sans-IO: the caller passes a monotonic ``now``).

    Args:
        window_s: how far back takeovers count.
    """

    def __init__(self, window_s: float = TAKEOVER_WINDOW_S) -> None:
        self._window = window_s
        self._times: deque[float] = deque()

    def taken_over(self, now: float) -> int:
        """Record a takeover at ``now``.

        Returns:
            The takeovers within the window, this one included.
        """
        self._times.append(now)
        while self._times and self._times[0] < now - self._window:
            self._times.popleft()
        return len(self._times)

    def reset(self) -> None:
        """Forget them: an attempt failed for lack of a broker, so the closes before were its restart."""
        self._times.clear()

    @property
    def count(self) -> int:
        """The takeovers recorded within the window at the last ``taken_over`` (0 after ``reset``)."""
        return len(self._times)


def certificate_facts(pem: bytes) -> tuple[str | None, float | None]:
    """Our certificate's subject CN and notAfter (epoch seconds), from its PEM; (None, None) if it cannot be read.

    Args:
        pem: the certificate file's bytes (the first certificate of a chain is ours).
    """
    # Imported here: edge.mqtt loads this module on every box, and needs cryptography only once a connection failed.
    from cryptography import x509  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None, None
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = cns[0].value if cns else None
    return (cn if isinstance(cn, str) else None), cert.not_valid_after_utc.timestamp()


def classify_connect_error(
    exc: BaseException | None,
    refused_reason: str | None,
    *,
    context: ConnectContext,
    now: float,
    socket_error: str | None = None,
    disconnect_reason: str | None = None,
    takeovers: int = 0,
) -> ConnectFailure:
    """Name why one connection attempt failed.

    Args:
        exc: what connecting raised (TCP, TLS handshake) or the TLS alert read right after the handshake; None if
            nothing was raised.
        refused_reason: the CONNACK's reason name when the broker refused ("Not authorized"); None otherwise.
        context: where and as whom we connected.
        now: epoch seconds (compared with our certificate's notAfter; becomes ``at``).
        socket_error: the text paho reported when the connection failed later ("failed to receive on socket: ...").
        disconnect_reason: the reason name of the broker's DISCONNECT ("Session taken over"), if one came.
        takeovers: > 0 when the broker ended the session for another connection with our identity: how many times
            within ``TAKEOVER_WINDOW_S``, this one included.

    Returns:
        The failure; ``other`` with the raw reason when nothing more specific fits.
    """
    c, n = context, context.names
    identity = c.cert_cn or c.client_id

    def failure(cause: str, permanent: bool, detail: str, fix: str) -> ConnectFailure:
        return ConnectFailure(cause, permanent, detail, fix, now)

    # Taken over: the session was up, so nothing about TLS or CONNACK applies.
    if takeovers > 0 or disconnect_reason == SESSION_TAKEN_OVER:
        count = max(takeovers, 1)
        how = (
            f'the broker at {c.address} ended this session with "{SESSION_TAKEN_OVER}"'
            if disconnect_reason == SESSION_TAKEN_OVER
            else f"the broker at {c.address} closed this session without a reason and accepted our next one at once"
        )
        times = f"{count} time{'' if count == 1 else 's'} within {TAKEOVER_WINDOW_S:g} s"
        detail = f"{how} ({times}): another connection uses identity {identity!r} ({n.client_id}, {n.cert} {c.cert})"
        if count >= TAKEOVER_LIMIT:
            return failure(
                "identity_in_use",
                True,
                detail
                + ": another box uses this identity (the same key and certificate copied onto two boxes)"
                + ("" if disconnect_reason == SESSION_TAKEN_OVER else ", unless the broker was restarted that often"),
                "give each box its own identity: on the copy, remove the copied key and certificate and "
                f"{_CLAIM_AGAIN} (it generates a new key on the box); have the operator revoke {identity!r} if its "
                "key leaked",
            )
        return failure(
            "identity_in_use",
            False,
            detail,
            "none if it does not repeat (a restart of this service, `edge fleet doctor --connect`); if it repeats, "
            "find the other box or process with this identity",
        )

    reason = _ssl_reason(exc, socket_error)
    expired_locally = c.cert_not_after is not None and c.cert_not_after <= now
    if isinstance(exc, ssl.SSLCertVerificationError) or reason == _VERIFY_FAILED:
        return _broker_certificate_rejected(c, exc, now)
    if reason in _ALERTS_FOREIGN_CA:
        return failure(
            "wrong_ca",
            True,
            f"the broker at {c.address} does not know the CA of our certificate ({n.cert} {c.cert}): the box was "
            f"enrolled in another fleet, or {n.host} names another fleet's broker",
            f"re-enroll the box with this fleet: {_CLAIM_AGAIN}; or fix {n.host}",
        )
    if reason == _ALERT_EXPIRED or (expired_locally and _ended_in_handshake(exc, refused_reason)):
        return failure(
            "certificate_expired",
            True,
            f"our certificate ({n.cert} {c.cert}) expired"
            + (f" at {_utc(c.cert_not_after)}" if c.cert_not_after is not None else "")
            + f" and the broker at {c.address} "
            + ("refused it (TLS alert certificate expired)" if reason == _ALERT_EXPIRED else "ended the handshake"),
            f"renew it (`edge enroll --renew` works only while it is valid) or, once expired, {_CLAIM_AGAIN}; if "
            "notAfter is still ahead, correct the box's clock",
        )
    if reason == _ALERT_REVOKED:
        return failure(
            "certificate_revoked",
            True,
            f"the broker at {c.address} refused our certificate ({n.cert} {c.cert}) as revoked: the fleet revoked "
            f"box {identity!r} (its certificate is on the broker's CRL)",
            f"the box was revoked by the fleet: {_CLAIM_AGAIN}",
        )
    if refused_reason in _REFUSED_IDENTITY:
        if c.cert_cn is not None and c.cert_cn != c.client_id:
            return failure(
                "client_id_mismatch",
                True,
                f'the broker at {c.address} refused CONNECT ("{refused_reason}"): our client id {c.client_id!r} '
                f"({n.client_id}) is not our certificate's CN {c.cert_cn!r} ({n.cert} {c.cert}), and the broker "
                "binds the client id to the certificate",
                f"set {n.client_id} to {c.cert_cn!r}, or install this box's own certificate in {n.cert}",
            )
        return failure(
            "not_authorized",
            True,
            f'the broker at {c.address} refused identity {identity!r} ("{refused_reason}") after the TLS handshake '
            f"({n.cert} {c.cert}): the fleet has not granted it",
            "check on the fleet host (`edge fleet devices`) that the box is enrolled, not suspended or revoked, and "
            "that the enrollment reached the broker (a running gateway applies it within seconds; else restart "
            "the broker); a revoked box must be claimed again (`edge enroll --claim CODE`)",
        )
    if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError):
        return failure("unreachable", False, _unreachable_detail(c, exc), _unreachable_fix(c, exc))
    raw = refused_reason or (str(exc) if exc is not None else None) or socket_error or disconnect_reason
    if isinstance(exc, ssl.SSLEOFError) or reason == _EOF_IN_HANDSHAKE:
        # Seen in the fault harness: a proxy that accepts TCP while the broker behind it is down.
        return failure(
            "other",
            False,
            f"the broker at {c.address} closed the connection during the TLS handshake ({raw}): a proxy or load "
            f"balancer with no broker behind it, a broker restarting, or a refusal of our certificate ({n.cert} "
            f"{c.cert}) without an alert",
            "none if it passes: retrying with the usual backoff; if it lasts, see the broker's log for this client",
        )
    return failure(
        "other",
        False,
        f"connecting to {c.address} failed: {raw or 'the broker closed the connection before its CONNACK'}",
        "see the broker's log for this client at that time; retrying with the usual backoff",
    )


def _ssl_reason(exc: BaseException | None, socket_error: str | None) -> str | None:
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None)
        if isinstance(reason, str):
            return reason
        m = _SSL_REASON.search(str(exc))
        return m.group(1) if m else None
    m = _SSL_REASON.search(socket_error) if socket_error else None
    return m.group(1) if m else None


def _ended_in_handshake(exc: BaseException | None, refused_reason: str | None) -> bool:
    """Whether the broker ended the attempt the way it ends a TLS handshake it refuses without an alert we read.

    Not for a network failure (refused, timeout, DNS: the broker was never asked) or a CONNACK (TLS succeeded).
    """
    if refused_reason is not None:
        return False
    if isinstance(exc, ssl.SSLError) or exc is None:
        return True
    return isinstance(exc, ConnectionResetError | ConnectionAbortedError | BrokenPipeError)


def _broker_certificate_rejected(c: ConnectContext, exc: BaseException | None, now: float) -> ConnectFailure:
    n = c.names
    code = getattr(exc, "verify_code", None)
    why = getattr(exc, "verify_message", None) or "certificate verify failed"
    if code in (_X509_HOSTNAME_MISMATCH, _X509_IP_MISMATCH):
        detail = (
            f"the certificate of the broker at {c.address} does not name {c.host!r} ({why}): {n.host} names another "
            f"server, or the fleet CA ({n.ca} {c.ca}) is not the broker's"
        )
        fix = f"set {n.host} to the name in the broker's certificate (the fleet's broker address)"
    elif code in (_X509_EXPIRED, _X509_NOT_YET_VALID):
        detail = f"the certificate of the broker at {c.address} is not valid now ({why}), checked with {n.ca} {c.ca}"
        fix = "correct the box's clock if it is wrong; otherwise the fleet operator must renew the broker's certificate"
    else:
        detail = (
            f"the certificate of the broker at {c.address} does not verify against our CA file ({n.ca} {c.ca}): "
            f"{why}: the box's fleet CA does not match the broker's"
        )
        fix = f"re-enroll the box: {_CLAIM_AGAIN}; or fix {n.host} if it names another fleet's broker"
    return ConnectFailure("wrong_ca", True, detail, fix, now)


def _unreachable_detail(c: ConnectContext, exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host of {c.address} ({c.names.host}): {exc.strerror or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return f"nothing accepts connections at {c.address} ({c.names.host}, {c.names.port}): connection refused"
    if isinstance(exc, TimeoutError):
        return f"no answer from {c.address} ({c.names.host}, {c.names.port}) in time: {exc}"
    return f"cannot reach {c.address} ({c.names.host}, {c.names.port}): {exc}"


def _unreachable_fix(c: ConnectContext, exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return f"check {c.names.host} and the box's DNS; retrying with the usual backoff"
    return (
        f"none if it passes (network down, broker restarting): retrying with the usual backoff; if it lasts, check "
        f"the network, {c.names.host}/{c.names.port} and that the broker runs"
    )


def _utc(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
