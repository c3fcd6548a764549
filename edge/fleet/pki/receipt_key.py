"""The fleet receipt key: signs delivery receipts (``edge.wire.receipts``); its public half is on every box.

It is a key of its own, beside the CA key and the command key: a gateway holds it to sign receipts, and a gateway
that can say "stored" need not be able to command boxes or certify them.

Files in the fleet directory: ``receipts.key`` (0600) and ``receipts.pub``; every device bundle carries
``fleet-receipts.pub`` (the box's ``telemetry.receipt_key`` default). A fleet directory made before receipts existed
gets its key on first use (``ensure_receipt_key``): enrolling a box or starting a gateway creates it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from edge._fs import atomic_write
from edge.errors import ConfigError
from edge.identity.keys import load_private_key

__all__ = ["RECEIPTS_KEY_FILE", "RECEIPTS_PUBLIC_FILE", "ensure_receipt_key", "receipt_public_pem"]

RECEIPTS_KEY_FILE: Final = "receipts.key"
RECEIPTS_PUBLIC_FILE: Final = "receipts.pub"


def ensure_receipt_key(fleet_dir: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The fleet receipt key, created (0600, with ``receipts.pub``) if the fleet directory has none yet.

    Args:
        fleet_dir: the fleet directory.

    Returns:
        The key.

    Raises:
        KeyFileError: the key file exists but is unreadable, readable by others, or not Ed25519.
        ConfigError: the key is missing and cannot be written (the message names the path and the fix).
    """
    root = Path(fleet_dir)
    path = root / RECEIPTS_KEY_FILE
    if not path.exists() and not path.is_symlink():
        key = Ed25519PrivateKey.generate()
        try:
            # The public half first: a crash between the two leaves no private key, and the next call starts over.
            atomic_write(root / RECEIPTS_PUBLIC_FILE, _public_pem(key))
            atomic_write(path, key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()), mode=0o600)
        except OSError as e:
            raise ConfigError(
                "fleet receipt key",
                str(path),
                f"a writable fleet directory ({e.strerror}); run `edge fleet enroll` or the gateway once as the "
                "fleet directory's owner to create it",
            ) from e
        return key
    key = load_private_key(path)
    public = root / RECEIPTS_PUBLIC_FILE
    if not public.exists():
        atomic_write(public, _public_pem(key))
    return key


def receipt_public_pem(fleet_dir: str | os.PathLike[str]) -> bytes:
    """The receipt key's public half as SubjectPublicKeyInfo PEM (what a box trusts), creating the key if needed."""
    return _public_pem(ensure_receipt_key(fleet_dir))


def _public_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
