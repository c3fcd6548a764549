"""did:key for Ed25519 public keys (W3C did:key method, multibase base58btc, multicodec ``ed25519-pub``).

``did:key:z`` + base58btc(0xED 0x01 || 32-byte raw public key). Every Ed25519 did:key therefore starts with
``did:key:z6Mk``. Parsing is strict: one canonical spelling per key (re-encoding must reproduce the input), so a
did:key can serve as a database key.
"""

from __future__ import annotations

import base58
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edge.identity.errors import InvalidDidError

__all__ = ["DID_KEY_PREFIX", "did_key_from_public", "public_from_did_key"]

DID_KEY_PREFIX = "did:key:z"
_ED25519_PUB_MULTICODEC = b"\xed\x01"
# 34 bytes in base58 are at most 47 characters; anything longer is not ours and is refused before decoding.
_MAX_DID_LEN = len(DID_KEY_PREFIX) + 48


def did_key_from_public(public_key: Ed25519PublicKey) -> str:
    """The did:key of an Ed25519 public key.

    Args:
        public_key: the key.

    Returns:
        ``did:key:z6Mk…``.
    """
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return DID_KEY_PREFIX + base58.b58encode(_ED25519_PUB_MULTICODEC + raw).decode("ascii")


def public_from_did_key(did: str) -> Ed25519PublicKey:
    """The Ed25519 public key a did:key names.

    Args:
        did: a did:key string.

    Returns:
        The public key.

    Raises:
        InvalidDidError: not a did:key, not base58btc, not the Ed25519 multicodec, wrong length, or not canonical.
    """
    if not isinstance(did, str) or not did.startswith(DID_KEY_PREFIX) or len(did) > _MAX_DID_LEN:
        raise InvalidDidError(f"not an Ed25519 did:key (expected 'did:key:z6Mk…'): {did!r:.80}")
    encoded = did[len(DID_KEY_PREFIX) :]
    try:
        raw = base58.b58decode(encoded)
    except ValueError as e:
        raise InvalidDidError(f"did:key is not base58btc: {did!r}") from e
    if raw[:2] != _ED25519_PUB_MULTICODEC:
        raise InvalidDidError(f"did:key multicodec is not ed25519-pub (0xed 0x01): {did!r}")
    if len(raw) != 34:
        raise InvalidDidError(f"did:key holds {len(raw) - 2} key bytes, expected 32: {did!r}")
    if base58.b58encode(raw).decode("ascii") != encoded:
        raise InvalidDidError(f"did:key is not canonical base58btc: {did!r}")
    return Ed25519PublicKey.from_public_bytes(raw[2:])
