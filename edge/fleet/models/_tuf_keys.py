"""The fleet repository's signing keys on disk: one PEM file per key, grouped by TUF role.

Layout (below the fleet directory)::

    tuf/keys/<role>/<keyid>.pem     Ed25519 private keys (PKCS#8 PEM, unencrypted, 0600; directories 0700)
    tuf/publishers/<name>.pub       publishers' public keys (SubjectPublicKeyInfo PEM), as registered

Invariants:
- A key file is named after its TUF key id (``SSlibKey.from_crypto``'s), so the root metadata alone says which files
  sign a role; a file whose key does not match its name is refused.
- Private keys are written through ``atomic_write`` with mode 0600 before any byte, and read through
  ``edge.identity.keys.load_private_key`` (refuses group/other permission bits and symlinks).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from securesystemslib.signer import CryptoSigner, SSlibKey  # type: ignore[attr-defined]

from edge._fs import atomic_write
from edge.identity.errors import KeyFileError
from edge.identity.keys import load_private_key

__all__ = [
    "KEYS_DIR",
    "PUBLISHERS_DIR",
    "delete_role_key",
    "load_role_signers",
    "private_pem",
    "public_pem",
    "sslib_key",
    "write_role_key",
]

KEYS_DIR: Final = Path("tuf") / "keys"
PUBLISHERS_DIR: Final = Path("tuf") / "publishers"


def sslib_key(public_key: Ed25519PublicKey) -> SSlibKey:
    """The TUF key of an Ed25519 public key (scheme ``ed25519``; its key id is the hash of its canonical form)."""
    return SSlibKey.from_crypto(public_key)


def private_pem(key: Ed25519PrivateKey) -> bytes:
    """The PKCS#8 PEM (unencrypted) of a private key."""
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


def public_pem(key: Ed25519PublicKey) -> bytes:
    """The SubjectPublicKeyInfo PEM of a public key."""
    return key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def _role_dir(fleet_dir: Path, role: str) -> Path:
    return fleet_dir / KEYS_DIR / role


def write_role_key(fleet_dir: Path, role: str, key: Ed25519PrivateKey) -> str:
    """Store a role's private key as ``tuf/keys/<role>/<keyid>.pem`` (0600).

    Args:
        fleet_dir: the fleet directory.
        role: the TUF role the key signs.
        key: the private key.

    Returns:
        The key's TUF key id.
    """
    keyid = sslib_key(key.public_key()).keyid
    d = _role_dir(fleet_dir, role)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(fleet_dir / KEYS_DIR, 0o700)
    atomic_write(d / f"{keyid}.pem", private_pem(key), mode=0o600)
    return keyid


def load_role_signers(fleet_dir: Path, role: str, keyids: list[str]) -> list[CryptoSigner]:
    """The signers of the given key ids of a role, from ``tuf/keys/<role>/``.

    Raises:
        KeyFileError: a key file is missing, readable by others, not Ed25519, or holds another key than its name says.
    """
    signers = []
    for keyid in keyids:
        path = _role_dir(fleet_dir, role) / f"{keyid}.pem"
        key = load_private_key(path)
        public = sslib_key(key.public_key())
        if public.keyid != keyid:
            raise KeyFileError(path, f"the key {keyid}, but it holds {public.keyid}")
        signers.append(CryptoSigner(key, public))
    return signers


def delete_role_key(fleet_dir: Path, role: str, keyid: str) -> None:
    """Remove a retired private key of a role (missing is fine: a rerun after a crash)."""
    (_role_dir(fleet_dir, role) / f"{keyid}.pem").unlink(missing_ok=True)
