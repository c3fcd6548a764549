"""Errors of the fleet gateway, placed in the fault tree of ``edge.errors``.

- ``StoreError``: the database failed (cannot connect, a statement failed, a schema from the future). Nothing of
  the failed call was committed.
- ``DeviceExistsError`` / ``UnknownDeviceError``: a registry operation named a device that does (not) exist.
- ``GatewayInputError``: an argument handed to the gateway from outside is invalid (a device record whose did:key
  does not match its key, a status that is not a JSON object, a day not in ``YYYY-MM-DD`` form).
- ``LedgerExportError``: a ledger export file does not verify; the message names the line or the total.

Bad telemetry is never an exception here: ingest turns it into a verdict and a quarantine row.
"""

from __future__ import annotations

from edge.errors import EdgeError, InputError

__all__ = [
    "DeviceExistsError",
    "GatewayError",
    "GatewayInputError",
    "LedgerExportError",
    "StoreError",
    "UnknownDeviceError",
]


class GatewayError(EdgeError):
    """Base of the errors the gateway raises on purpose."""


class StoreError(GatewayError):
    """The database failed or holds a schema this code does not know; the call changed nothing."""


class DeviceExistsError(GatewayError, ValueError):
    """A device with this id is already registered."""


class UnknownDeviceError(GatewayError, LookupError):
    """No device with this id is registered."""


class GatewayInputError(GatewayError, InputError):
    """An argument from outside is invalid: a device record, a status payload, a day or a range."""


class LedgerExportError(InputError):
    """A ledger export does not verify: a line is malformed, a signature or link fails, or a total disagrees."""
