"""COSE_Sign1 (RFC 9052 section 4.2) with EdDSA (Ed25519), on cbor2 and cryptography.

``COSE_Sign1 = #6.18([protected: bstr, unprotected: {}, payload: bstr, signature: bstr])``, signed over
``Sig_structure = ["Signature1", protected, external_aad, payload]``.

Invariants:
- The signature is checked over the protected header bytes exactly as received (never a re-encoding of the decoded
  map), and before anything looks inside the payload.
- Only the outer structure and the protected header are decoded before the signature check: the header must be
  read to know the algorithm (RFC 9052 section 4.4). Both are decoded strictly (no tags beyond the outer 18, no
  duplicate keys, no indefinite lengths, bounded depth, no trailing bytes).
- Only EdDSA (-8) is accepted, from the protected header; an algorithm in the unprotected header, a label in both
  headers, or any critical header (label 2) is refused, since we understand none.
- Detached payloads (nil) are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge.wire._cbor import DECODE_ERRORS, loads_strict
from edge.wire.errors import BadSignatureError, MalformedEnvelopeError, UnsupportedAlgorithmError

__all__ = [
    "ALG_EDDSA",
    "COSE_SIGN1_TAG",
    "HEADER_ALG",
    "HEADER_CRIT",
    "HEADER_KID",
    "Sign1Message",
    "decode_sign1",
    "sig_structure",
    "sign1",
    "verify1",
]

COSE_SIGN1_TAG: Final = 18
ALG_EDDSA: Final = -8
HEADER_ALG: Final = 1
HEADER_CRIT: Final = 2
HEADER_KID: Final = 4
_SIGNATURE_LEN: Final = 64
# The outer array holds only byte strings and the unprotected map; headers are flat maps in every profile we know.
_OUTER_MAX_DEPTH: Final = 4
_HEADER_MAX_DEPTH: Final = 2


def sig_structure(protected: bytes, payload: bytes, external_aad: bytes = b"") -> bytes:
    """The bytes Ed25519 signs (``ToBeSigned``, RFC 9052 section 4.4).

    Args:
        protected: the protected header bucket exactly as it appears in the message.
        payload: the payload bytes.
        external_aad: application-supplied data bound into the signature.

    Returns:
        ``["Signature1", protected, external_aad, payload]`` encoded as CBOR.
    """
    return cbor2.dumps(["Signature1", protected, external_aad, payload])


def _encode_header(header: Mapping[int, Any]) -> bytes:
    # An empty protected bucket is the zero-length string, not an encoded empty map (RFC 9052 section 3).
    return cbor2.dumps(dict(header), canonical=True) if header else b""


def sign1(
    payload: bytes,
    key: Ed25519PrivateKey,
    *,
    protected: Mapping[int, Any],
    unprotected: Mapping[int, Any],
    external_aad: bytes = b"",
) -> bytes:
    """Build and sign a tagged COSE_Sign1 message with EdDSA.

    Args:
        payload: the content to sign.
        key: the Ed25519 signing key.
        protected: the protected header; must hold ``{1: -8}`` (alg EdDSA). Encoded canonically.
        unprotected: the unprotected header; must not repeat a protected label.
        external_aad: data bound into the signature but not carried.

    Returns:
        The encoded ``#6.18([...])`` bytes.

    Raises:
        ValueError: the headers do not name EdDSA in the protected bucket or share a label.
    """
    if protected.get(HEADER_ALG) != ALG_EDDSA:
        raise ValueError(f"protected header must hold alg EdDSA ({{1: -8}}), got {dict(protected)!r}")
    if protected.keys() & unprotected.keys():
        raise ValueError(f"labels in both header buckets: {sorted(protected.keys() & unprotected.keys())}")
    protected_bytes = _encode_header(protected)
    signature = key.sign(sig_structure(protected_bytes, payload, external_aad))
    return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, [protected_bytes, dict(unprotected), payload, signature]))


@dataclass(frozen=True, slots=True)
class Sign1Message:
    """A COSE_Sign1 whose structure and headers were checked but whose signature was NOT yet verified.

    Attributes:
        protected_bytes: the protected bucket exactly as received (what the signature covers).
        protected: its decoded map.
        unprotected: the unprotected map (not covered by the signature).
        payload: the payload bytes, not decoded.
        signature: the 64-byte signature.
    """

    protected_bytes: bytes
    protected: dict[Any, Any]
    unprotected: dict[Any, Any]
    payload: bytes
    signature: bytes

    def verify(self, public_key: Ed25519PublicKey, external_aad: bytes = b"") -> None:
        """Check the signature over the Sig_structure built from the bytes as received.

        Args:
            public_key: the signer's key.
            external_aad: the same external data the signer bound in.

        Raises:
            BadSignatureError: the signature does not verify.
        """
        try:
            public_key.verify(self.signature, sig_structure(self.protected_bytes, self.payload, external_aad))
        except InvalidSignature as e:
            raise BadSignatureError("COSE_Sign1 signature does not verify") from e


def decode_sign1(data: bytes) -> Sign1Message:
    """Check the structure and headers of a tagged COSE_Sign1, without verifying the signature.

    Args:
        data: the message bytes (bound their size before calling).

    Returns:
        The parts, with the payload still undecoded.

    Raises:
        MalformedEnvelopeError: not strict CBOR, not tag 18, not a 4-array of the right types, a detached payload,
            a signature that is not 64 bytes, or a header that is not a map.
        UnsupportedAlgorithmError: alg is not EdDSA in the protected header, alg is unprotected, a label is in both
            buckets, or a critical header is present.
    """
    if not isinstance(data, bytes):
        raise MalformedEnvelopeError(f"COSE_Sign1 must be bytes, got {type(data).__name__}")
    try:
        outer = loads_strict(data, _OUTER_MAX_DEPTH, allow_tag=COSE_SIGN1_TAG)
    except DECODE_ERRORS as e:
        raise MalformedEnvelopeError(f"not well-formed CBOR: {e}") from e
    if not isinstance(outer, cbor2.CBORTag) or outer.tag != COSE_SIGN1_TAG:
        raise MalformedEnvelopeError("not a tagged COSE_Sign1 (CBOR tag 18)")
    parts = outer.value
    if not isinstance(parts, list | tuple) or len(parts) != 4:
        raise MalformedEnvelopeError("COSE_Sign1 must be an array of 4 elements")
    protected_bytes, unprotected, payload, signature = parts
    if type(protected_bytes) is not bytes:
        raise MalformedEnvelopeError("COSE_Sign1 protected header must be a byte string")
    if not isinstance(unprotected, Mapping):
        raise MalformedEnvelopeError("COSE_Sign1 unprotected header must be a map")
    if payload is None:
        raise MalformedEnvelopeError("detached COSE_Sign1 payloads are not supported")
    if type(payload) is not bytes:
        raise MalformedEnvelopeError("COSE_Sign1 payload must be a byte string")
    if type(signature) is not bytes or len(signature) != _SIGNATURE_LEN:
        raise MalformedEnvelopeError(f"COSE_Sign1 signature must be {_SIGNATURE_LEN} bytes (Ed25519)")
    if protected_bytes:
        try:
            protected = loads_strict(protected_bytes, _HEADER_MAX_DEPTH)
        except DECODE_ERRORS as e:
            raise MalformedEnvelopeError(f"protected header is not well-formed CBOR: {e}") from e
        if type(protected) is not dict:
            raise MalformedEnvelopeError("protected header must be a map")
    else:
        protected = {}
    unprotected = dict(unprotected)
    alg = protected.get(HEADER_ALG)
    if HEADER_ALG in unprotected:
        raise UnsupportedAlgorithmError("alg must be in the protected header, found in the unprotected one")
    if type(alg) is not int or alg != ALG_EDDSA:
        raise UnsupportedAlgorithmError(f"algorithm {alg!r} is not EdDSA (-8)")
    if HEADER_CRIT in protected or HEADER_CRIT in unprotected:
        raise UnsupportedAlgorithmError("critical headers (label 2) are not supported")
    if protected.keys() & unprotected.keys():
        raise UnsupportedAlgorithmError(
            f"labels in both header buckets: {sorted(protected.keys() & unprotected.keys())}"
        )
    return Sign1Message(protected_bytes, protected, unprotected, payload, signature)


def verify1(
    data: bytes, public_key: Ed25519PublicKey, *, external_aad: bytes = b""
) -> tuple[dict[Any, Any], dict[Any, Any], bytes]:
    """Verify a tagged COSE_Sign1 signed with EdDSA.

    Args:
        data: the message bytes (bound their size before calling).
        public_key: the signer's key.
        external_aad: the external data the signer bound in.

    Returns:
        (protected header map, unprotected header map, payload bytes); the payload is not decoded.

    Raises:
        MalformedEnvelopeError: see ``decode_sign1``.
        UnsupportedAlgorithmError: see ``decode_sign1``.
        BadSignatureError: the signature does not verify.
    """
    msg = decode_sign1(data)
    msg.verify(public_key, external_aad)
    return msg.protected, msg.unprotected, msg.payload
