"""The certificate signing request a device sends the fleet CA at provisioning.

Subject CN = the device id; subjectAltName URI = the device's did:key; signed by the device's Ed25519 key, so the CA
sees proof of possession of the key it certifies.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from edge.identity.did import did_key_from_public

__all__ = ["build_csr"]


def build_csr(private_key: Ed25519PrivateKey, device_id: str) -> bytes:
    """Build and sign the CSR for a device.

    Args:
        private_key: the device key; it signs the request.
        device_id: a valid device id (see ``validate_device_id``); becomes the subject CN.

    Returns:
        The CSR as PEM bytes.
    """
    did = did_key_from_public(private_key.public_key())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(did)]), critical=False)
        # Ed25519 hashes internally: the API requires algorithm None.
        .sign(private_key, None)
    )
    return csr.public_bytes(Encoding.PEM)
