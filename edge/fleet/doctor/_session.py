"""The gateway-session probe: talk to the broker as a gateway identity (``probe_session``) and judge what it found
(``session_finding``). The MQTT 5 CONNECT and CONNACK are built and read by hand (``connect_packet``,
``parse_connack``), over a plain TLS socket: only ``edge.mqtt`` imports paho, and the probe needs exactly one CONNECT
and one CONNACK. ``session_finding``, ``connect_packet`` and ``parse_connack`` are sans-IO; ``probe_session`` returns
network and TLS failures in its result, never raises them.

The gateway's session: the fleet's broker makes the client id the certificate's CN (``use_username_as_clientid``), so
a CONNECT with a gateway's certificate *is* that gateway and takes its session over, disconnecting the running
process (it reconnects after its backoff). The doctor therefore connects only when asked (``connect=True``); it then
sends CONNECT with clean_start=0 and Receive Maximum 1, reads the CONNACK's session-present flag, never acknowledges
the one message the broker may send (it is redelivered to the gateway), and disconnects; a session it created itself
(none was present) is ended with Session Expiry 0, so it leaves nothing behind. Without ``connect`` it does a TLS
handshake only, which touches no session.
"""

from __future__ import annotations

import socket
import ssl
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from edge.fleet.doctor._findings import Finding
from edge.fleet.doctor._findings import ok as _ok

__all__ = ["SessionProbe", "connect_packet", "parse_connack", "probe_session", "session_finding"]

_PROBE_TIMEOUT_S: Final = 5.0


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
