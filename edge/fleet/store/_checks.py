"""Checks and derivations on what callers hand the store: times, days, device records. Pure functions (topics are
parsed by ``edge.wire.topics``).

Invariants: times are finite epoch seconds in [0, 1e11] (the range the telemetry schema allows); days are
``YYYY-MM-DD`` UTC days; a device record's did:key names exactly its public key.
"""

from __future__ import annotations

import datetime
import math
import re
import time
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge.fleet.errors import GatewayInputError
from edge.fleet.store.types import DeviceRecord
from edge.identity.did import did_key_from_public
from edge.identity.errors import InvalidDeviceIdError
from edge.identity.keys import validate_device_id
from edge.log import redact  # the one redactor of URLs and secrets: store URLs go through it too
from edge.wire._bounds import MAX_EPOCH

__all__ = [
    "check_day",
    "check_device",
    "check_device_id",
    "check_time",
    "iso",
    "redact",
    "utc_day",
]

MAX_TIME: Final = MAX_EPOCH
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


def utc_day(t: float) -> str:
    """The UTC day of an epoch time, ``YYYY-MM-DD``."""
    return time.strftime("%Y-%m-%d", time.gmtime(t))


def iso(t: float) -> str:
    """An epoch time as ISO 8601 UTC with milliseconds (for messages)."""
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="milliseconds")


def check_time(t: object, what: str) -> float:
    """Check an epoch time.

    Args:
        t: the candidate.
        what: its name, for the message.

    Returns:
        ``t`` as a float.

    Raises:
        GatewayInputError: not a finite number in [0, 1e11] (booleans are not numbers here).
    """
    if not isinstance(t, float | int) or isinstance(t, bool) or not math.isfinite(t) or not 0 <= t <= MAX_TIME:
        raise GatewayInputError(f"{what} {t!r:.40}: expected epoch seconds in [0, 1e11]")
    return float(t)


def check_day(day: object, what: str) -> str | None:
    """Check an optional day bound.

    Args:
        day: None or the candidate.
        what: its name, for the message.

    Returns:
        The day, or None.

    Raises:
        GatewayInputError: not a calendar day written ``YYYY-MM-DD``.
    """
    if day is None:
        return None
    try:
        if not isinstance(day, str) or _DAY.fullmatch(day) is None:
            raise ValueError("not YYYY-MM-DD")
        datetime.date.fromisoformat(day)
    except ValueError as e:
        raise GatewayInputError(f"{what} {day!r:.40}: expected a day YYYY-MM-DD") from e
    return day


def check_device_id(device_id: object) -> str:
    """Check a device id.

    Raises:
        GatewayInputError: not ``[A-Za-z0-9][A-Za-z0-9_.-]{0,63}``.
    """
    try:
        return validate_device_id(device_id)
    except InvalidDeviceIdError as e:
        raise GatewayInputError(str(e)) from e


def check_device(d: DeviceRecord) -> None:
    """Check a device record before it is registered.

    Raises:
        GatewayInputError: invalid id, a key that is not 32 raw bytes, a did:key of another key, a certificate
            that is not text, or invalid times.
    """
    check_device_id(d.device_id)
    if type(d.public_key) is not bytes or len(d.public_key) != 32:
        raise GatewayInputError(f"device {d.device_id!r}: public_key must be 32 raw Ed25519 bytes")
    if d.did != did_key_from_public(Ed25519PublicKey.from_public_bytes(d.public_key)):
        raise GatewayInputError(f"device {d.device_id!r}: did {d.did!r:.80} does not name its public key")
    if not isinstance(d.cert_pem, str):
        raise GatewayInputError(f"device {d.device_id!r}: cert_pem must be text")
    check_time(d.enrolled_at, "enrolled_at")
    if d.revoked_at is not None:
        check_time(d.revoked_at, "revoked_at")
