"""The box's HTTPS client of the fleet's enrollment endpoint (``edge.wire.onboard``: EST shapes).

Trust comes from the claim, never from first use: ``fetch_ca`` reads the CA certificates over a TLS connection that
verifies nothing, keeps only the one whose SHA-256 is the claim's fingerprint, and every later request verifies the
endpoint against that CA (and its host name against the claim's). A server that is not the fleet's fails one of the
two, and the box sends it nothing but a request for public certificates.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

from edge.errors import ConfigError, InputError, TransportError
from edge.log import event
from edge.wire.onboard import (
    BUNDLE_PATH,
    CACERTS_PATH,
    CLAIM_USER,
    REENROLL_PATH,
    SIMPLEENROLL_PATH,
    Bundle,
    ClaimError,
    certificate_fingerprint,
    decode_bundle,
)

__all__ = ["EndpointMismatchError", "EnrollClient", "EnrollRefusedError", "EnrollUnavailableError"]

log = logging.getLogger(__name__)

_MAX_RESPONSE: Final = 512 * 1024
_MAX_RETRY_AFTER_S: Final = 60.0


class EnrollRefusedError(InputError):
    """The endpoint refused the request (a 4xx): the claim, the CSR or the certificate is not accepted.

    Attributes:
        status: the HTTP status.
        detail: the endpoint's one-line reason.
    """

    def __init__(self, status: int, detail: str) -> None:
        """Create the error from the endpoint's status and reason."""
        self.status = status
        self.detail = detail
        super().__init__(f"the enrollment endpoint refused ({status}): {detail}")


class EndpointMismatchError(InputError):
    """The server is not the fleet the claim names: its CA has another fingerprint, or its certificate does not
    verify against the claim's CA (a man in the middle, or a claim for another fleet)."""


class EnrollUnavailableError(TransportError):
    """The endpoint cannot be reached or answered 5xx; the same request may work later."""


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: bytes
    retry_after: float | None


def _certificates(body: bytes) -> list[x509.Certificate]:
    """EST's certs-only answer (base64 DER PKCS#7) as certificates."""
    try:
        return list(pkcs7.load_der_pkcs7_certificates(base64.b64decode(body)))
    except (binascii.Error, ValueError) as e:
        raise EnrollUnavailableError(f"the endpoint's answer is not a PKCS#7 certificate list ({e})") from None


class EnrollClient:
    """Requests to one enrollment endpoint.

    Args:
        host, port: the endpoint (from the claim, or the enrollment record for a renewal).
        timeout_s: per connection and read.
        sleep: how to wait between polls (injected by tests).
    """

    def __init__(
        self, host: str, port: int, *, timeout_s: float = 10.0, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self.sleep = sleep

    @property
    def where(self) -> str:
        """``host:port`` for messages."""
        return f"{self.host}:{self.port}"

    def _request(
        self,
        ctx: ssl.SSLContext,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> _Answer:
        conn = http.client.HTTPSConnection(self.host, self.port, context=ctx, timeout=self.timeout_s)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read(_MAX_RESPONSE + 1)
            retry = resp.getheader("Retry-After")
        except ssl.SSLCertVerificationError as e:
            raise EndpointMismatchError(
                f"the server at {self.where} is not the fleet's enrollment endpoint: its certificate does not verify "
                f"against the fleet CA the claim names ({e.verify_message}); a man in the middle, or a wrong address"
            ) from None
        except (OSError, http.client.HTTPException) as e:
            raise EnrollUnavailableError(f"cannot reach the enrollment endpoint {self.where}: {e}") from None
        finally:
            conn.close()
        if len(data) > _MAX_RESPONSE:
            raise EnrollUnavailableError(f"the endpoint {self.where} sent more than {_MAX_RESPONSE} bytes")
        try:
            retry_after = min(_MAX_RETRY_AFTER_S, max(0.5, float(retry))) if retry else None
        except ValueError:
            retry_after = None
        return _Answer(resp.status, data, retry_after)

    def _check(self, answer: _Answer) -> None:
        detail = answer.body[:300].decode("utf-8", "replace").strip()
        if 400 <= answer.status < 500:
            raise EnrollRefusedError(answer.status, detail)
        if answer.status != 200:
            raise EnrollUnavailableError(f"the endpoint {self.where} answered {answer.status}: {detail}")

    def fetch_ca(self, fingerprint: bytes) -> x509.Certificate:
        """The fleet CA certificate whose SHA-256 is ``fingerprint`` (the claim's).

        Raises:
            EndpointMismatchError: the endpoint offers no certificate with that fingerprint.
            EnrollUnavailableError: the endpoint cannot be reached.
        """
        # Verifies nothing on purpose: what it reads is public, and it is trusted only through the fingerprint.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        answer = self._request(ctx, "GET", CACERTS_PATH)
        self._check(answer)
        certs = _certificates(answer.body)
        for cert in certs:
            if certificate_fingerprint(cert.public_bytes(Encoding.DER)) == fingerprint:
                return cert
        raise EndpointMismatchError(
            f"the server at {self.where} offers {len(certs)} CA certificate(s), none with the claim's fingerprint: it "
            "is not the fleet the claim was made for (a man in the middle, or a claim for another fleet)"
        )

    def context(self, ca: x509.Certificate, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        """A TLS context that trusts only the fleet CA and checks the endpoint's host name; with the box's
        certificate and key for the authenticated requests."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca.public_bytes(Encoding.PEM).decode())
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert is not None and key is not None:
            try:
                ctx.load_cert_chain(str(cert), str(key))
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(
                    "telemetry.cert", f"{cert}, {key}", f"the box's certificate and its key, readable ({e})"
                ) from None
        return ctx

    def simple_enroll(
        self, ctx: ssl.SSLContext, secret_text: str, csr_der: bytes, *, deadline: float
    ) -> x509.Certificate:
        """Redeem the claim: POST the CSR until the certificate comes (polling while approval is pending).

        Args:
            ctx: from ``context(ca)``.
            secret_text: the claim's secret as written in the code.
            csr_der: the CSR (DER).
            deadline: ``time.monotonic()`` after which waiting for approval stops.

        Raises:
            EnrollRefusedError: the claim or the CSR is refused.
            EnrollUnavailableError: unreachable, or still waiting for approval at the deadline.
        """
        auth = base64.b64encode(f"{CLAIM_USER}:{secret_text}".encode()).decode()
        headers = {
            "Authorization": f"Basic {auth}",
            "Content-Type": "application/pkcs10",
            "Content-Transfer-Encoding": "base64",
        }
        body = base64.encodebytes(csr_der)
        while True:
            answer = self._request(ctx, "POST", SIMPLEENROLL_PATH, body, headers)
            if answer.status != 202:
                break
            wait = answer.retry_after or 5.0
            if time.monotonic() + wait > deadline:
                raise EnrollUnavailableError(
                    f"the claim still waits for the operator's approval at {self.where}: ask them to run "
                    "`edge fleet claims approve ID`, then run edge enroll again with the same code"
                )
            event(log, logging.INFO, "waiting for the operator's approval", endpoint=self.where, retry_s=wait)
            self.sleep(wait)
        self._check(answer)
        return _one(_certificates(answer.body), self.where)

    def reenroll(self, ctx: ssl.SSLContext, csr_der: bytes) -> x509.Certificate:
        """Renew: POST the CSR, authenticated by the current certificate in ``ctx``.

        Raises:
            EnrollRefusedError: refused (revoked, another key) or, as a TLS failure, an expired certificate.
            EnrollUnavailableError: unreachable.
        """
        headers = {"Content-Type": "application/pkcs10", "Content-Transfer-Encoding": "base64"}
        try:
            answer = self._request(ctx, "POST", REENROLL_PATH, base64.encodebytes(csr_der), headers)
        except EnrollUnavailableError as e:
            if "CERTIFICATE_EXPIRED" in str(e).upper() or "certificate expired" in str(e):
                raise EnrollRefusedError(
                    401, "this box's certificate has expired: the box must be claimed again (edge enroll --claim CODE)"
                ) from None
            raise
        self._check(answer)
        return _one(_certificates(answer.body), self.where)

    def bundle(self, ctx: ssl.SSLContext) -> Bundle:
        """The box's bundle (authenticated by its certificate in ``ctx``).

        Raises:
            EnrollRefusedError, EnrollUnavailableError: as above; ``ClaimError`` for a malformed bundle.
        """
        answer = self._request(ctx, "GET", BUNDLE_PATH)
        self._check(answer)
        try:
            return decode_bundle(answer.body)
        except ClaimError as e:
            raise EnrollUnavailableError(f"the endpoint {self.where} sent a malformed bundle: {e}") from None


def _one(certs: list[x509.Certificate], where: str) -> x509.Certificate:
    if len(certs) != 1:
        raise EnrollUnavailableError(f"the endpoint {where} answered {len(certs)} certificates, not the box's one")
    return certs[0]
