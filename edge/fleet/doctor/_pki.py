"""The fleet's certificates, its CRL and the TUF repository's timestamp, sans-IO: each check takes the PEM or JSON
bytes and an explicit ``now`` and returns one ``Finding`` (``check_certificate``, ``check_crl``, ``check_timestamp``).

Expired is an ERROR, within ``CERT_WARN_DAYS`` of its end a WARN. A CRL whose nextUpdate has passed locks the whole
fleet out (OpenSSL refuses every client); an expired timestamp stops every model update (every box refuses it).
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge.fleet.doctor._findings import Finding
from edge.fleet.doctor._findings import ok as _ok
from edge.fleet.models.repository import DEFAULT_EXPIRY_DAYS

__all__ = ["CERT_WARN_DAYS", "TIMESTAMP_WARN", "check_certificate", "check_crl", "check_timestamp"]

CERT_WARN_DAYS: Final = 30  # a certificate or CRL closer than this to its end is a warning
# The repository's timestamp is signed for DEFAULT_EXPIRY_DAYS["timestamp"] (1 day): warn once less than half of that
# is left, i.e. the refresh timer missed its runs (every box refuses an expired timestamp, so no model updates).
TIMESTAMP_WARN: Final = datetime.timedelta(days=DEFAULT_EXPIRY_DAYS["timestamp"] / 2)


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
