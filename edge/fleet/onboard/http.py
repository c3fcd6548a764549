"""The enrollment endpoint over HTTPS: routes EST paths to ``EnrollService`` and guards the socket.

Every connection is untrusted: the TLS handshake runs in the connection's own thread with a deadline (a client that
stalls it holds one slot, not the accept loop); at most ``max_clients`` connections are served at once (more are
closed at once and counted); a request line, headers and body are bounded, and every socket read has a timeout.
A client certificate is optional at the TLS layer (a box that enrolls has none yet) and, when one is sent, must
verify against the fleet CA; the service decides what it may do.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final

from cryptography import x509

from edge._fs import atomic_write
from edge.fleet.onboard.service import EnrollService, Reply
from edge.fleet.pki.ca import FleetCA
from edge.log import event
from edge.wire.onboard import BUNDLE_PATH, CACERTS_PATH, REENROLL_PATH, SIMPLEENROLL_PATH

__all__ = ["EnrollServer", "ensure_server_certificate"]

log = logging.getLogger(__name__)

_MAX_BODY: Final = 64 * 1024  # an Ed25519 CSR is ~600 bytes base64
_MAX_DRAINED: Final = 1024 * 1024  # a larger body is not read at all: the connection is closed
_IO_TIMEOUT_S: Final = 10.0
_CONNECTION_S: Final = 30.0
_SERVER_CERT_DAYS: Final = 90
_RENEW_SERVER_CERT_S: Final = 30 * 86400.0


def ensure_server_certificate(
    directory: Path, ca: FleetCA, names: Sequence[str], *, now: datetime.datetime
) -> tuple[Path, Path]:
    """The endpoint's TLS certificate for ``names``, issued by the fleet CA: reused while it names the same hosts and
    has more than 30 days left, else issued again (so a long-running fleet never serves an expired one).

    Returns:
        (certificate path, key path) in ``directory``.
    """
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    wanted = sorted(names)
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        have = sorted([*san.get_values_for_type(x509.DNSName), *map(str, san.get_values_for_type(x509.IPAddress))])
        fresh = cert.not_valid_after_utc.timestamp() - now.timestamp() > _RENEW_SERVER_CERT_S
        if have == sorted(_canonical(n) for n in wanted) and fresh and key_path.is_file():
            return cert_path, key_path
    except (OSError, ValueError, x509.ExtensionNotFound):
        pass  # none yet, or unreadable: issue one
    cert_pem, key_pem = ca.issue_server(list(names), now=now, days=_SERVER_CERT_DAYS)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(key_path, key_pem, mode=0o600)
    atomic_write(cert_path, cert_pem)
    return cert_path, key_path


def _canonical(name: str) -> str:
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


class _Handler(BaseHTTPRequestHandler):
    server: EnrollServer
    protocol_version = "HTTP/1.1"
    server_version = "edge-enroll"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        """Requests go to our logger at debug level, never to stderr."""
        event(log, logging.DEBUG, "request", client=self.client_address[0], line=format % args)

    def _send(self, reply: Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        self.send_header("Connection", "close")
        for k, v in reply.headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(reply.body)
        self.close_connection = True

    def _body(self) -> bytes | None:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._send(Reply(411, b"a Content-Length is needed\n"))
            return None
        n = int(length)
        if n > _MAX_BODY:
            self.server.service.counters["too_large"] += 1
            if n <= _MAX_DRAINED:
                # Read it away first: closing with unread data makes TCP reset the connection, and the client would
                # see no answer instead of this one.
                while n > 0:
                    chunk = self.rfile.read(min(n, 65536))
                    if not chunk:
                        break
                    n -= len(chunk)
            self._send(Reply(413, f"at most {_MAX_BODY} bytes\n".encode()))
            return None
        return self.rfile.read(n)

    def _peer(self) -> bytes | None:
        conn = self.connection
        return conn.getpeercert(binary_form=True) if isinstance(conn, ssl.SSLSocket) else None

    def do_GET(self) -> None:
        """``/cacerts`` and the bundle."""
        service = self.server.service
        if self.path == CACERTS_PATH:
            self._send(service.cacerts())
        elif self.path == BUNDLE_PATH:
            self._send(service.bundle(self._peer()))
        else:
            self._send(Reply(404, b"not an enrollment path\n"))

    def do_POST(self) -> None:
        """Simple enroll and re-enroll."""
        service = self.server.service
        if self.path not in (SIMPLEENROLL_PATH, REENROLL_PATH):
            self._send(Reply(404, b"not an enrollment path\n"))
            return
        body = self._body()
        if body is None:
            return
        if self.path == SIMPLEENROLL_PATH:
            self._send(service.enroll(self.headers.get("Authorization"), body))
        else:
            self._send(service.reenroll(self._peer(), body))


class EnrollServer(ThreadingHTTPServer):
    """The HTTPS enrollment endpoint.

    Args:
        address: (host, port) to listen on; port 0 picks a free one (see ``server_address``).
        service: the logic.
        context: the server's TLS context (``server_context``).
        max_clients: connections served at once.
    """

    daemon_threads = True
    block_on_close = False

    def __init__(
        self, address: tuple[str, int], service: EnrollService, context: ssl.SSLContext, max_clients: int = 32
    ) -> None:
        self.service = service
        self.context = context
        self._slots = threading.BoundedSemaphore(max_clients)
        try:
            self.address_family = socket.AF_INET6 if ipaddress.ip_address(address[0]).version == 6 else socket.AF_INET
        except ValueError:
            self.address_family = socket.AF_INET
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve in a thread if a slot is free; else close the connection at once."""
        if not self._slots.acquire(blocking=False):
            self.service.counters["busy"] += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """The connection's thread; frees its slot at the end."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        """The TLS handshake (bounded in time), then the HTTP exchange."""
        request.settimeout(_IO_TIMEOUT_S)
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            self.service.counters["tls_failed"] += 1
            event(log, logging.INFO, "TLS handshake failed", client=client_address[0], error=str(e))
            return
        # Each read has a timeout; this bounds the whole exchange, so a client that trickles a byte at a time cannot
        # hold its slot for longer than this.
        deadline = threading.Timer(_CONNECTION_S, _shut, args=(tls,))
        deadline.start()
        try:
            _Handler(tls, client_address, self)
        except (OSError, ValueError) as e:  # a client that went away or sent garbage mid-request
            self.service.counters["broken_requests"] += 1
            event(log, logging.INFO, "request failed", client=client_address[0], error=str(e))
        finally:
            deadline.cancel()
            tls.close()


def _shut(sock: socket.socket) -> None:
    """Unblock and end a connection from another thread (a plain shutdown; the TLS object stays its thread's)."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def server_context(cert: Path, key: Path, ca_cert: Path) -> ssl.SSLContext:
    """The endpoint's TLS context: its certificate; client certificates optional, verified against the fleet CA."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca_cert))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx
