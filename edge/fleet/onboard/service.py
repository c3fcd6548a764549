"""The enrollment endpoint's logic, apart from HTTP: each call takes what a request carries and returns a ``Reply``.

- ``cacerts``: the fleet CA certificate (EST ``/cacerts``), which a box keeps only if its fingerprint is the claim's.
- ``enroll``: a claim (HTTP Basic) and a CSR: the claim is checked and bound to the CSR's key in one transaction
  (``ClaimBook.redeem``), then the registry certifies and registers the box and rewrites the broker's access rules;
  a running gateway applies them to the broker within seconds. Repeating a request with the key a claim is bound to
  returns that box's certificate again: a box whose power failed mid-enrollment finishes with the same code.
- ``reenroll``: the box's current certificate (verified by TLS against the fleet CA) and a CSR for the same id and
  key: a fresh certificate, unless the device is revoked.
- ``bundle``: for an authenticated box, what it needs besides its certificate (``edge.wire.onboard.Bundle``).

One enrollment runs at a time (the registry rewrites the broker files); enrollments are rare, so the lock costs
nothing, and a store is opened per request, so the handler threads share no connection.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, pkcs7

from edge.errors import EdgeError, InputError
from edge.fleet.errors import DeviceExistsError, UnknownDeviceError
from edge.fleet.onboard.claims import ClaimBook, ClaimRefused, Verdict
from edge.fleet.pki.ca import EnrollmentError, FleetCA
from edge.fleet.pki.receipt_key import receipt_public_pem
from edge.fleet.pki.registry import TUF_ROOT_SOURCE, Registry
from edge.fleet.store import Store
from edge.log import event
from edge.wire.onboard import CLAIM_USER, Bundle, ClaimError, encode_bundle, parse_secret

__all__ = ["EnrollService", "EndpointSettings", "Reply"]

log = logging.getLogger(__name__)

PKCS7: str = "application/pkcs7-mime; smime-type=certs-only"
_MAX_SECRET_CHARS = 64


@dataclass(frozen=True, slots=True)
class Reply:
    """An HTTP answer: status, content type, body and extra headers."""

    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


def _text(status: int, message: str, **headers: str) -> Reply:
    return Reply(status, (message + "\n").encode(), headers=headers)


def _certs_only(certs: list[x509.Certificate]) -> Reply:
    # EST's wire form: a degenerate PKCS#7 SignedData holding the certificates, DER, base64.
    der = pkcs7.serialize_certificates(certs, Encoding.DER)
    return Reply(200, base64.encodebytes(der), PKCS7, {"Content-Transfer-Encoding": "base64"})


@dataclass(frozen=True, slots=True)
class EndpointSettings:
    """What the endpoint hands out and how long certificates live.

    Attributes:
        broker_host, broker_port: the broker address written into every bundle.
        cert_days: the validity of the certificates it issues (boxes renew before the end).
        ota_repository: the model repository's base URL for bundles ("" for none).
        retry_after_s: what a box waiting for approval is told to wait between polls.
    """

    broker_host: str
    broker_port: int
    cert_days: int = 30
    ota_repository: str = ""
    retry_after_s: int = 5


class EnrollService:
    """The endpoint's logic.

    Args:
        fleet_dir: the fleet directory (its CA, registry files and model repository).
        ca: the fleet CA.
        claims: the claim book.
        open_store: opens the fleet's store (called per request).
        settings: see ``EndpointSettings``.
        clock: the wall clock (epoch seconds).
    """

    def __init__(
        self,
        *,
        fleet_dir: Path,
        ca: FleetCA,
        claims: ClaimBook,
        open_store: Callable[[], Store],
        settings: EndpointSettings,
        clock: Callable[[], float],
    ) -> None:
        self.fleet_dir = fleet_dir
        self.ca = ca
        self.claims = claims
        self.open_store = open_store
        self.settings = settings
        self.clock = clock
        self.counters: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)

    def _now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.clock(), datetime.UTC)

    def _refuse(self, status: int, reason: str, message: str, **fields: object) -> Reply:
        self.counters[f"refused_{reason}"] += 1
        event(log, logging.WARNING, "enrollment refused", reason=reason, detail=message, **fields)
        return _text(status, message)

    # -- EST -----------------------------------------------------------------------------------------------------

    def cacerts(self) -> Reply:
        """The fleet CA certificate, EST-style."""
        self.counters["cacerts"] += 1
        return _certs_only([self._ca_cert])

    def enroll(self, authorization: str | None, body: bytes) -> Reply:
        """A box redeems a claim with its CSR (EST simple enroll).

        Args:
            authorization: the request's ``Authorization`` header (``Basic base64(claim:SECRET)``).
            body: the CSR, base64 DER (EST) or PEM.

        Returns:
            200 with the certificate; 202 while an operator has not approved the claim; 400 a malformed request;
            401 no claim; 403 a claim refused (unknown, expired, revoked, used by another key, another id); 409 the id
            is taken; 503 the store failed.
        """
        secret = _claim_secret(authorization)
        if secret is None:
            return self._refuse(401, "no_claim", "a claim is needed: HTTP Basic authentication, user 'claim'")
        try:
            csr_pem = _csr_pem(body)
        except InputError as e:
            return self._refuse(400, "csr", f"the request is not a CSR: {e}")
        now = self._now()
        try:
            with self._lock:
                return self._enroll_locked(secret, csr_pem, now)
        except EdgeError as e:  # the store or the broker files failed: nothing the box can fix; it retries
            self.counters["errors"] += 1
            event(log, logging.ERROR, "enrollment failed", error=str(e))
            return _text(503, f"the fleet cannot enroll now ({type(e).__name__}); retry later", **{"Retry-After": "30"})

    def _enroll_locked(self, secret: bytes, csr_pem: bytes, now: datetime.datetime) -> Reply:
        try:
            issued = self.ca.sign_csr(csr_pem, now=now, days=self.settings.cert_days)
        except EnrollmentError as e:
            return self._refuse(400, f"csr_{e.reason}", str(e))
        store = self.open_store()
        try:
            # By key, not by id: a box that repeats its request after a power cut may ask for another id, and must
            # still get the identity it already has (its id comes from the certificate).
            existing = next((d for d in store.devices() if d.did == issued.did), None)
            if existing is not None and existing.revoked_at is not None:
                # Before the claim is touched: a revoked key must not use up the code its owner will need.
                return self._refuse(
                    403,
                    "revoked",
                    f"this key is device {existing.device_id!r}, which is revoked: enroll with a new key (move "
                    "the old key and certificate away) and a new claim code",
                    device=existing.device_id,
                )
            try:
                verdict, row = self.claims.redeem(
                    secret, did=issued.did, device_id=issued.device_id, now=now.timestamp()
                )
            except ClaimRefused as e:
                return self._refuse(403, e.reason, str(e), device=issued.device_id)
            if verdict is Verdict.WAIT:
                self.counters["waiting"] += 1
                event(log, logging.INFO, "enrollment waits for approval", claim=row.claim_id, device=issued.device_id)
                return _text(
                    202,
                    f"claim {row.claim_id} waits for the operator's approval (edge fleet claims approve "
                    f"{row.claim_id})",
                    **{"Retry-After": str(self.settings.retry_after_s)},
                )
            if existing is not None:
                # The key this claim is bound to, enrolled already: the box repeats a request it never saw answered.
                self.counters["repeated"] += 1
                event(log, logging.INFO, "enrollment repeated", claim=row.claim_id, device=existing.device_id)
                return _certs_only([x509.load_pem_x509_certificate(existing.cert_pem.encode())])
            try:
                record = Registry(store, self.fleet_dir).enroll(
                    csr_pem, ca=self.ca, now=now, days=self.settings.cert_days
                )
            except (DeviceExistsError, EnrollmentError) as e:
                self.claims.release(row.claim_id, issued.did)  # the box may retry the same code with another id
                reason = e.reason if isinstance(e, EnrollmentError) else "device_exists"
                return self._refuse(
                    409, reason, f"{e}: enroll with another device id (edge enroll --device-id ID)", claim=row.claim_id
                )
        finally:
            store.close()
        self.counters["enrolled"] += 1
        event(log, logging.INFO, "enrolled", claim=row.claim_id, device=record.device_id, did=record.did)
        return _certs_only([x509.load_pem_x509_certificate(record.cert_pem.encode())])

    def _authenticated(self, peer_der: bytes | None, store: Store) -> tuple[str, Reply | None]:
        """The device id of a verified client certificate, or a refusal (unknown, revoked, another key)."""
        if peer_der is None:
            return "", self._refuse(401, "no_certificate", "this needs the box's certificate (TLS client auth)")
        cert = x509.load_der_x509_certificate(peer_der)
        cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        device_id = str(cns[0].value) if len(cns) == 1 else ""
        record = store.device(device_id) if device_id else None
        raw = cert.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        if record is None or record.public_key != raw:
            return device_id, self._refuse(403, "unknown_device", f"{device_id!r} is not an enrolled device")
        if record.revoked_at is not None:
            return device_id, self._refuse(
                403, "revoked", f"device {device_id!r} is revoked: it needs a new claim code", device=device_id
            )
        return device_id, None

    def reenroll(self, peer_der: bytes | None, body: bytes) -> Reply:
        """A box renews its certificate (EST simple re-enroll): same id, same key, not revoked.

        Args:
            peer_der: the TLS client certificate (DER; verified against the fleet CA by TLS), or None.
            body: the CSR.
        """
        try:
            csr_pem = _csr_pem(body)
        except InputError as e:
            return self._refuse(400, "csr", f"the request is not a CSR: {e}")
        try:
            with self._lock:
                store = self.open_store()
                try:
                    device_id, refused = self._authenticated(peer_der, store)
                    if refused is not None:
                        return refused
                    try:
                        record = Registry(store, self.fleet_dir).renew(
                            csr_pem, device_id=device_id, ca=self.ca, now=self._now(), days=self.settings.cert_days
                        )
                    except EnrollmentError as e:
                        return self._refuse(400, f"csr_{e.reason}", str(e), device=device_id)
                    except UnknownDeviceError as e:
                        return self._refuse(403, "revoked", str(e), device=device_id)
                finally:
                    store.close()
        except EdgeError as e:
            self.counters["errors"] += 1
            event(log, logging.ERROR, "renewal failed", error=str(e))
            return _text(503, f"the fleet cannot renew now ({type(e).__name__}); retry later", **{"Retry-After": "30"})
        self.counters["renewed"] += 1
        event(log, logging.INFO, "renewed", device=device_id)
        return _certs_only([x509.load_pem_x509_certificate(record.cert_pem.encode())])

    def bundle(self, peer_der: bytes | None) -> Reply:
        """The bundle of the authenticated box."""
        try:
            store = self.open_store()
            try:
                device_id, refused = self._authenticated(peer_der, store)
            finally:
                store.close()
        except EdgeError as e:
            self.counters["errors"] += 1
            return _text(503, f"the fleet cannot answer now ({type(e).__name__}); retry later", **{"Retry-After": "30"})
        if refused is not None:
            return refused
        root = self.fleet_dir / TUF_ROOT_SOURCE
        bundle = Bundle(
            device_id=device_id,
            ca_pem=self.ca.cert_pem.decode(),
            commands_pub=self.ca.commands_public_pem.decode(),
            receipts_pub=receipt_public_pem(self.fleet_dir).decode(),
            broker_host=self.settings.broker_host,
            broker_port=self.settings.broker_port,
            tuf_root=root.read_text() if root.is_file() else None,
            ota_repository=self.settings.ota_repository,
        )
        self.counters["bundles"] += 1
        return Reply(200, encode_bundle(bundle), "application/json")


def _claim_secret(authorization: str | None) -> bytes | None:
    """The claim secret of ``Basic base64(claim:SECRET)``, or None (absent or malformed: the same 401)."""
    if not authorization or not authorization.startswith("Basic "):
        return None
    try:
        user, _, secret = base64.b64decode(authorization[6:].strip(), validate=True).decode("ascii").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    if user != CLAIM_USER or len(secret) > _MAX_SECRET_CHARS:
        return None
    try:
        return parse_secret(secret)
    except ClaimError:
        return None


def _csr_pem(body: bytes) -> bytes:
    """A CSR body (EST base64 DER, or PEM) as PEM for ``FleetCA.sign_csr``.

    Raises:
        InputError: neither form.
    """
    if body.lstrip().startswith(b"-----BEGIN"):
        return body
    try:
        der = base64.b64decode(body, validate=False)
        return x509.load_der_x509_csr(der).public_bytes(Encoding.PEM)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"neither base64 DER nor PEM PKCS#10 ({e})") from None
