"""Errors of the telemetry layer, all bad input from outside (``InputError``): the sender is at fault.

``BadSignatureError`` and ``MalformedEnvelopeError`` concern the COSE_Sign1 container; ``MalformedRecordError`` its
signed contents (records and payload fields that violate the schema or a limit).
"""

from __future__ import annotations

from edge.errors import InputError

__all__ = [
    "BadSignatureError",
    "MalformedEnvelopeError",
    "MalformedRecordError",
    "ManifestError",
    "UnsupportedAlgorithmError",
]


class MalformedEnvelopeError(InputError):
    """Not a COSE_Sign1 of our profile: not CBOR, not tag 18, wrong shape, oversized, or a bad payload map."""


class UnsupportedAlgorithmError(MalformedEnvelopeError):
    """The protected header names an algorithm other than EdDSA (-8), or none, or critical headers we do not know."""


class BadSignatureError(InputError):
    """The signature does not verify under the public key over the bytes as received."""


class MalformedRecordError(InputError):
    """A telemetry record violates the schema (unknown type, wrong field type or range) or a limit."""


class ManifestError(InputError):
    """A release's model manifest (a TUF target's custom metadata) or a golden-sample file is malformed.

    ``reason`` is the word the box's OTA telemetry and the fleet's rollout report for it.
    """

    reason = "bad_manifest"
