"""The device id a certificate names: its subject CN.

The fleet CA issues each box's certificate with CN = the device id (``edge.identity.csr``), and the broker makes that
CN the client's id and the root of its topic rights. So the certificate, not a setting, says who a box is.

Invariants:
- The file is read bounded (``MAX_CERTIFICATE_BYTES``) before it is parsed.
- The id returned is a valid device id (``validate_device_id``); anything else raises ``CertificateFileError``
  naming the file.
- Nothing here checks the certificate's signature or validity dates: the TLS handshake and the broker do. This only
  reads the name the broker will see.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from edge._fs import TooLargeError, read_bounded
from edge.identity.errors import CertificateFileError, CertificateMissingError, InvalidDeviceIdError
from edge.identity.keys import validate_device_id

__all__ = ["MAX_CERTIFICATE_BYTES", "device_id_from_certificate"]

# A device certificate is ~700 bytes of PEM; with a CA chain behind it a few KiB. The bound stops a misconfigured
# path (a device node, a huge file) from being read whole.
MAX_CERTIFICATE_BYTES = 64 * 1024


def device_id_from_certificate(path: str | os.PathLike[str]) -> str:
    """The device id in a PEM certificate: the subject CN of the first certificate in the file.

    The first one is the box's own: a file that also holds the CA chain lists it after the leaf, as TLS sends it.

    Args:
        path: the certificate file (``telemetry.cert``).

    Returns:
        The CN, a valid device id.

    Raises:
        CertificateMissingError: the file does not exist.
        CertificateFileError: it cannot be read, is over ``MAX_CERTIFICATE_BYTES``, is not a PEM X.509 certificate,
            its subject has no single CN, or the CN is not a device id (``[A-Za-z0-9][A-Za-z0-9_.-]{0,63}``).
    """
    p = Path(path)
    try:
        data = read_bounded(p, MAX_CERTIFICATE_BYTES)
    except FileNotFoundError:
        raise CertificateMissingError(p) from None
    except TooLargeError as e:
        raise CertificateFileError(p, f"a PEM certificate of at most {MAX_CERTIFICATE_BYTES} bytes ({e})") from e
    except OSError as e:
        raise CertificateFileError(p, f"a readable certificate file ({e})") from e
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError as e:
        raise CertificateFileError(p, f"a PEM X.509 certificate ({e})") from e
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        subject = cert.subject.rfc4514_string()
        raise CertificateFileError(
            p, f"a certificate whose subject has one CN, the device id (its subject: {subject!r})"
        )
    cn = names[0].value
    try:
        return validate_device_id(cn)
    except InvalidDeviceIdError as e:
        raise CertificateFileError(p, f"a certificate whose subject CN is a device id ({e})") from e
