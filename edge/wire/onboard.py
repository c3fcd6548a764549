"""The onboarding contract between a box and the fleet's enrollment endpoint (docs/onboarding.md). Sans-IO.

A **claim code** is what an operator hands to a box owner (as text, a QR label or a file on the boot partition):

    edge-claim://HOST:PORT/SECRET[?id=DEVICE_ID]#FINGERPRINT

``HOST:PORT`` is the enrollment endpoint (HTTPS); ``SECRET`` is 128 random bits (26 base32
characters) that the fleet stores only hashed and accepts once; ``DEVICE_ID``, when the operator pinned one, is the
only id the box may enroll as; ``FINGERPRINT`` is the SHA-256 of the fleet CA
certificate (DER, 52 base32 characters). The fingerprint is how the box authenticates the server from the claim
itself, not on first use: it fetches the CA certificates (EST ``/cacerts``) over an unauthenticated TLS connection,
keeps only the certificate with that fingerprint, and then talks to the endpoint only over TLS verified against that
CA. A man in the middle can present neither the CA's key nor a certificate it issued.

The endpoint follows EST (RFC 7030) where its shapes fit: ``GET /.well-known/est/cacerts``, ``POST .../simpleenroll``
(the claim in HTTP Basic authentication, user ``claim``), ``POST .../simplereenroll`` (the box's current certificate
in TLS client authentication), PKCS#10 requests and PKCS#7 certs-only responses, base64-encoded, and ``202`` with
``Retry-After`` while an operator has not approved the claim yet. What EST has no shape for, the box's **bundle**
(the fleet's public keys and where its broker is), is a JSON document at ``GET .../edge/bundle``, served only to a
box that authenticates with its certificate.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from edge.errors import InputError
from edge.identity.errors import InvalidDeviceIdError
from edge.identity.keys import validate_device_id

__all__ = [
    "BUNDLE_PATH",
    "CACERTS_PATH",
    "CLAIM_SCHEME",
    "CLAIM_USER",
    "REENROLL_PATH",
    "SIMPLEENROLL_PATH",
    "Bundle",
    "ClaimCode",
    "ClaimError",
    "certificate_fingerprint",
    "decode_bundle",
    "encode_bundle",
    "new_secret",
    "parse_claim",
    "parse_secret",
    "secret_digest",
]

CLAIM_SCHEME: Final = "edge-claim"
CLAIM_USER: Final = "claim"
_EST: Final = "/.well-known/est"
CACERTS_PATH: Final = f"{_EST}/cacerts"
SIMPLEENROLL_PATH: Final = f"{_EST}/simpleenroll"
REENROLL_PATH: Final = f"{_EST}/simplereenroll"
BUNDLE_PATH: Final = f"{_EST}/edge/bundle"

_SECRET_BYTES: Final = 16
_SECRET_CHARS: Final = 26  # base32 of 16 bytes without padding
_FP_CHARS: Final = 52  # base32 of 32 bytes without padding
_B32: Final = re.compile(r"[A-Z2-7]+")
_MAX_CLAIM_CHARS: Final = 512
_MAX_BUNDLE_BYTES: Final = 256 * 1024  # four PEM files and a TUF root of a few keys
_MAX_PEM_CHARS: Final = 16 * 1024


class ClaimError(InputError):
    """A claim code, or a bundle from the endpoint, is malformed: the message says which part and why."""


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=")


def _unb32(text: str, chars: int, what: str) -> bytes:
    text = text.upper()
    if len(text) != chars or not _B32.fullmatch(text):
        raise ClaimError(f"the claim's {what} is not {chars} base32 characters (A-Z, 2-7)")
    padded = text + "=" * (-len(text) % 8)
    try:
        return base64.b32decode(padded)
    except binascii.Error as e:  # pragma: no cover -- the pattern and length above admit only decodable text
        raise ClaimError(f"the claim's {what} is not base32: {e}") from e


def parse_secret(text: str) -> bytes:
    """A claim secret as written in a code (26 base32 characters, any case).

    Raises:
        ClaimError: not such a text.
    """
    return _unb32(text, _SECRET_CHARS, "secret")


def certificate_fingerprint(cert_der: bytes) -> bytes:
    """The SHA-256 of a certificate's DER encoding: how a claim names the fleet CA."""
    return hashlib.sha256(cert_der).digest()


def new_secret() -> bytes:
    """A fresh claim secret: 128 bits from the operating system's CSPRNG."""
    return secrets.token_bytes(_SECRET_BYTES)


def secret_digest(secret: bytes) -> bytes:
    """What the fleet stores of a claim secret (SHA-256): a stolen claims database redeems nothing.

    A fast hash is enough: the secret has 128 random bits, so there is nothing to brute-force as with a password.
    """
    return hashlib.sha256(b"edge-claim-v1\x00" + secret).digest()


@dataclass(frozen=True, slots=True)
class ClaimCode:
    """A parsed claim code.

    Attributes:
        host: the enrollment endpoint's host name or IP address.
        port: its TCP port.
        secret: the one-time secret (16 bytes).
        ca_fingerprint: SHA-256 of the fleet CA certificate's DER (32 bytes).
        device_id: the device id the claim is for, or None when the box chooses it.
    """

    host: str
    port: int
    secret: bytes
    ca_fingerprint: bytes
    device_id: str | None = None

    def __post_init__(self) -> None:
        if len(self.secret) != _SECRET_BYTES or len(self.ca_fingerprint) != 32:
            raise ClaimError("a claim needs a 16-byte secret and a 32-byte CA fingerprint")
        if not 1 <= self.port <= 65535:
            raise ClaimError(f"the claim's port {self.port} is not 1-65535")
        if self.device_id is not None:
            _checked_id(self.device_id)

    @property
    def claim_id(self) -> str:
        """The claim's public name (``claims list``, logs): the first 10 hex digits of its stored digest."""
        return secret_digest(self.secret).hex()[:10]

    @property
    def secret_text(self) -> str:
        """The secret as the code spells it (base32): what the box presents in its enrollment request."""
        return _b32(self.secret)

    @property
    def endpoint(self) -> str:
        """``HOST:PORT`` (an IPv6 address in brackets)."""
        return f"{_host_text(self.host)}:{self.port}"

    def text(self) -> str:
        """The claim code as text (see the module docstring); ``parse_claim`` reads it back."""
        query = f"?id={self.device_id}" if self.device_id else ""
        return f"{CLAIM_SCHEME}://{self.endpoint}/{self.secret_text}{query}#{_b32(self.ca_fingerprint)}"

    def redacted(self) -> str:
        """The code without its secret: safe for logs and error messages."""
        query = f"?id={self.device_id}" if self.device_id else ""
        return f"{CLAIM_SCHEME}://{self.endpoint}/<secret {self.claim_id}>{query}"


def _host_text(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


_HOST_NAME: Final = re.compile(
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def _parse_endpoint(text: str) -> tuple[str, int]:
    """``HOST:PORT`` of a claim: a DNS name, an IPv4 address, or an IPv6 address in brackets."""
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ClaimError(f"the claim's endpoint {text[:80]!r} is not HOST:PORT with a port 1-65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1])), int(port)
        except ValueError:
            raise ClaimError(f"the claim's host {host[:80]!r} is not an IPv6 address") from None
    if len(host) > 253 or not _HOST_NAME.fullmatch(host):
        raise ClaimError(f"the claim's host {host[:80]!r} is not a host name or an IP address")
    return host, int(port)


def _checked_id(device_id: str) -> str:
    try:
        return validate_device_id(device_id)
    except InvalidDeviceIdError as e:
        raise ClaimError(f"the claim's device id is invalid: {e}") from e


def parse_claim(text: str) -> ClaimCode:
    """Read a claim code; surrounding white space (a file's newline) is ignored.

    Raises:
        ClaimError: the code is malformed; the message names the part (never the secret).
    """
    text = text.strip()
    if len(text) > _MAX_CLAIM_CHARS:
        raise ClaimError(f"a claim code is at most {_MAX_CLAIM_CHARS} characters, this one {len(text)}")
    prefix = f"{CLAIM_SCHEME}://"
    if not text.startswith(prefix):
        raise ClaimError(f"a claim code starts with {prefix} (got {text[:16]!r}...)")
    rest, hash_sign, fragment = text[len(prefix) :].partition("#")
    if not hash_sign:
        raise ClaimError("the claim has no CA fingerprint (#... at its end): was it copied completely?")
    endpoint, slash, path = rest.partition("/")
    if not slash:
        raise ClaimError("the claim has no secret (/... after HOST:PORT)")
    host, port = _parse_endpoint(endpoint)
    path, question, query = path.partition("?")
    secret = parse_secret(path)
    fingerprint = _unb32(fragment, _FP_CHARS, "CA fingerprint")
    device_id = None
    if question:
        key, eq, value = query.partition("=")
        if key != "id" or not eq:
            raise ClaimError("a claim's query is only ?id=DEVICE_ID")
        device_id = _checked_id(value)
    return ClaimCode(host=host, port=port, secret=secret, ca_fingerprint=fingerprint, device_id=device_id)


@dataclass(frozen=True, slots=True)
class Bundle:
    """What an enrolled box receives besides its certificate (``GET .../edge/bundle``).

    Attributes:
        device_id: the id the certificate was issued to.
        ca_pem: the fleet CA certificate (the broker's and the endpoint's issuer).
        commands_pub: the fleet command key (PEM): the box executes commands signed with it only.
        receipts_pub: the fleet receipt key (PEM): an envelope leaves the outbox only under a receipt it signed.
        broker_host, broker_port: where the box publishes (MQTT over TLS).
        tuf_root: the model repository's root metadata (JSON text), or None before the fleet has a repository.
        ota_repository: the model repository's base URL, or "" when the fleet serves none.
    """

    device_id: str
    ca_pem: str
    commands_pub: str
    receipts_pub: str
    broker_host: str
    broker_port: int
    tuf_root: str | None = None
    ota_repository: str = ""


def encode_bundle(bundle: Bundle) -> bytes:
    """The bundle as the endpoint sends it (UTF-8 JSON)."""
    body: dict[str, Any] = {
        "version": 1,
        "device_id": bundle.device_id,
        "ca_pem": bundle.ca_pem,
        "commands_pub": bundle.commands_pub,
        "receipts_pub": bundle.receipts_pub,
        "broker": {"host": bundle.broker_host, "port": bundle.broker_port},
        "tuf_root": bundle.tuf_root,
        "ota_repository": bundle.ota_repository,
    }
    return json.dumps(body, sort_keys=True).encode()


def _text(doc: Mapping[str, Any], key: str, *, limit: int = _MAX_PEM_CHARS, empty: bool = False) -> str:
    v = doc.get(key)
    if not isinstance(v, str) or len(v) > limit or (not v and not empty):
        raise ClaimError(f"the bundle's {key!r} is not a {'' if empty else 'non-empty '}text of at most {limit} chars")
    return v


def decode_bundle(data: bytes) -> Bundle:
    """Read and check a bundle from the endpoint (untrusted until its PEMs are loaded by the caller).

    Raises:
        ClaimError: not a version-1 bundle, or a field is missing, of the wrong type or too large.
    """
    if len(data) > _MAX_BUNDLE_BYTES:
        raise ClaimError(f"the bundle is {len(data)} bytes, more than {_MAX_BUNDLE_BYTES}")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ClaimError(f"the bundle is not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("version") != 1:
        raise ClaimError("the bundle is not a version-1 JSON object")
    broker = doc.get("broker")
    if not isinstance(broker, dict):
        raise ClaimError("the bundle has no broker object")
    port = broker.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ClaimError(f"the bundle's broker port {port!r} is not 1-65535")
    root = doc.get("tuf_root")
    if root is not None and (not isinstance(root, str) or len(root) > _MAX_BUNDLE_BYTES):
        raise ClaimError("the bundle's tuf_root is not JSON text")
    return Bundle(
        device_id=_checked_id(_text(doc, "device_id", limit=64)),
        ca_pem=_text(doc, "ca_pem"),
        commands_pub=_text(doc, "commands_pub"),
        receipts_pub=_text(doc, "receipts_pub"),
        broker_host=_text(broker, "host", limit=253),
        broker_port=port,
        tuf_root=root,
        ota_repository=_text(doc, "ota_repository", limit=2048, empty=True),
    )
