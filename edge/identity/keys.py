"""The device key pair on disk: generate it once, load it safely.

Invariants:
- The private key (PKCS#8 PEM, unencrypted: the box boots unattended; the disk's protection is the file mode) is
  written through ``atomic_write`` with mode 0600 applied before any byte, so no reader ever sees a partial key or a
  key readable by others.
- The private key is written last: a crash part-way leaves no key, and the next run starts over; an existing key is
  never replaced unless the caller passes ``force``.
- ``load_private_key`` checks the mode of the file it actually opened (``fstat``, no check-then-open race) and
  refuses any group or other permission bit.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from edge._fs import atomic_write
from edge.identity.csr import build_csr
from edge.identity.did import did_key_from_public
from edge.identity.errors import InvalidDeviceIdError, KeyExistsError, KeyFileError, KeyPermissionError

__all__ = [
    "CSR_FILE",
    "DID_FILE",
    "PRIVATE_KEY_FILE",
    "PUBLIC_KEY_FILE",
    "DeviceIdentity",
    "generate_device_identity",
    "load_private_key",
    "load_public_key",
    "validate_device_id",
]

PRIVATE_KEY_FILE = "device.key"
PUBLIC_KEY_FILE = "device.pub"
DID_FILE = "device.did"
CSR_FILE = "device.csr"

# Device ids become MQTT topic levels and file names: no '/', '+', '#', no leading dot or dash, bounded length.
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# A PEM Ed25519 key is ~120 bytes; a bound stops a misconfigured path (a device node, a huge file) from being slurped.
_MAX_KEY_FILE_BYTES = 16 * 1024


def validate_device_id(device_id: object) -> str:
    """Check a device id.

    Args:
        device_id: the candidate.

    Returns:
        The device id, unchanged.

    Raises:
        InvalidDeviceIdError: not a string matching ``[A-Za-z0-9][A-Za-z0-9_.-]{0,63}``.
    """
    if not isinstance(device_id, str) or _DEVICE_ID.fullmatch(device_id) is None:
        raise InvalidDeviceIdError(f"invalid device id {device_id!r:.80}: expected [A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}")
    return device_id


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """What ``generate_device_identity`` wrote.

    Attributes:
        device_id: the device id (CSR subject CN, envelope kid).
        did: the did:key of the public key.
        private_key: path of the PKCS#8 PEM private key (mode 0600).
        public_key: path of the SubjectPublicKeyInfo PEM public key.
        did_file: path of a text file holding ``did`` and a newline.
        csr: path of the PEM CSR for the fleet CA.
    """

    device_id: str
    did: str
    private_key: Path
    public_key: Path
    did_file: Path
    csr: Path


def generate_device_identity(
    directory: str | os.PathLike[str], device_id: str, *, force: bool = False
) -> DeviceIdentity:
    """Create a new Ed25519 identity for a device in ``directory``.

    Args:
        directory: where to write the files; created with mode 0700 if missing.
        device_id: the device id.
        force: replace an existing identity (the old key is lost: the fleet must re-register the device).

    Returns:
        The did:key and the paths written.

    Raises:
        InvalidDeviceIdError: ``device_id`` is not valid.
        KeyExistsError: a private key exists and ``force`` is false.
        OSError: the directory cannot be created or written.
    """
    validate_device_id(device_id)
    root = Path(directory)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    ident = DeviceIdentity(
        device_id=device_id,
        did="",
        private_key=root / PRIVATE_KEY_FILE,
        public_key=root / PUBLIC_KEY_FILE,
        did_file=root / DID_FILE,
        csr=root / CSR_FILE,
    )
    if not force and (ident.private_key.exists() or ident.private_key.is_symlink()):
        raise KeyExistsError(ident.private_key)
    key = Ed25519PrivateKey.generate()
    public = key.public_key()
    did = did_key_from_public(public)
    atomic_write(ident.public_key, public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    atomic_write(ident.did_file, (did + "\n").encode("ascii"))
    atomic_write(ident.csr, build_csr(key, device_id))
    atomic_write(
        ident.private_key,
        key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
        mode=0o600,
    )
    return DeviceIdentity(device_id, did, ident.private_key, ident.public_key, ident.did_file, ident.csr)


def _read_key_file(path: Path, *, private: bool) -> bytes:
    try:
        # O_NOFOLLOW: a key path that is a symlink is refused rather than followed somewhere unexpected.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise KeyFileError(
            path, "an existing key file, but there is none (generate one with: edge keys generate)"
        ) from e
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise KeyFileError(path, "a regular file, but it is a symlink") from e
        raise KeyFileError(path, f"a readable key file ({e.strerror})") from e
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(path, "a regular file")
        if private and st.st_mode & 0o077:
            raise KeyPermissionError(path, stat.S_IMODE(st.st_mode))
        data = f.read(_MAX_KEY_FILE_BYTES + 1)
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise KeyFileError(path, f"a PEM key of at most {_MAX_KEY_FILE_BYTES} bytes")
    return data


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load the device's private key.

    Args:
        path: a PKCS#8 PEM Ed25519 private key, mode 0600 or stricter.

    Returns:
        The key.

    Raises:
        KeyPermissionError: group or others may read or write the file (the message names the path and mode).
        KeyFileError: the file is missing, a symlink, not a regular file, or not an unencrypted Ed25519 PEM key.
    """
    p = Path(path)
    data = _read_key_file(p, private=True)
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(p, "an unencrypted PKCS#8 PEM private key") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(p, f"an Ed25519 key, not {type(key).__name__}")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Load an Ed25519 public key (SubjectPublicKeyInfo PEM).

    Args:
        path: the PEM file.

    Returns:
        The key.

    Raises:
        KeyFileError: the file is missing, not a regular file, or not an Ed25519 PEM public key.
    """
    p = Path(path)
    data = _read_key_file(p, private=False)
    try:
        key = load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise KeyFileError(p, "a PEM public key") from e
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(p, f"an Ed25519 key, not {type(key).__name__}")
    return key
