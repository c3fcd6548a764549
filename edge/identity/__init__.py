"""Device identity: the Ed25519 key pair, its did:key, the CSR for the fleet CA, and the device id its certificate
names.

Invariants: the private key file is created with mode 0600 before any byte is written, written atomically, never
overwritten unless asked, and never loaded when group or others may read or write it.
"""

from __future__ import annotations

from edge.identity.certificate import device_id_from_certificate
from edge.identity.csr import build_csr
from edge.identity.did import did_key_from_public, public_from_did_key
from edge.identity.errors import (
    CertificateFileError,
    CertificateMissingError,
    InvalidDeviceIdError,
    InvalidDidError,
    KeyExistsError,
    KeyFileError,
    KeyPermissionError,
)
from edge.identity.keys import (
    DeviceIdentity,
    generate_device_identity,
    load_private_key,
    load_public_key,
    validate_device_id,
)

__all__ = [
    "CertificateFileError",
    "CertificateMissingError",
    "DeviceIdentity",
    "InvalidDeviceIdError",
    "InvalidDidError",
    "KeyExistsError",
    "KeyFileError",
    "KeyPermissionError",
    "build_csr",
    "device_id_from_certificate",
    "did_key_from_public",
    "generate_device_identity",
    "load_private_key",
    "load_public_key",
    "public_from_did_key",
    "validate_device_id",
]
