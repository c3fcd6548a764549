"""Errors of the fleet gateway, placed in the fault tree of ``edge.errors``.

- ``StoreError``: the database failed (a statement failed, a schema from the future). Nothing of the failed call was
  committed. Its subclass ``StoreUnavailableError`` says the database could not be reached or was busy (connection
  lost, lock timeout, disk I/O): the same call may succeed later. Any other ``StoreError`` of an ingest call means
  this input could not be stored, however often it is retried.
- ``IngestFailedError``: the gateway's ingest cannot go on (the store stayed unavailable past its deadline, or its
  worker failed); the process exits non-zero so its supervisor restarts it.
- ``DeviceExistsError`` / ``UnknownDeviceError``: a registry operation named a device that does (not) exist (the
  operator's input).
- ``GatewayInputError``: an argument handed to the gateway from outside is invalid (a device record whose did:key
  does not match its key, a status that is not a JSON object, a day not in ``YYYY-MM-DD`` form).
- ``LedgerExportError``: a ledger export file does not verify; the message names the line or the total.

Bad telemetry is never an exception here: ingest turns it into a verdict and a quarantine row.
"""

from __future__ import annotations

from edge.errors import EdgeError, InputError, TransportError

__all__ = [
    "DeviceExistsError",
    "GatewayError",
    "GatewayInputError",
    "IngestFailedError",
    "LedgerExportError",
    "StoreError",
    "StoreUnavailableError",
    "UnknownDeviceError",
]


class GatewayError(EdgeError):
    """Groups the fleet's errors (caught, never raised: each subclass also has its fault root)."""


class StoreError(GatewayError, TransportError):
    """The database failed or holds a schema this code does not know; the call changed nothing."""


class StoreUnavailableError(StoreError):
    """The database could not be reached or was busy; the same call may succeed later."""


class IngestFailedError(GatewayError, TransportError):
    """Ingest cannot go on: the store stayed unavailable past its deadline, or the worker failed unexpectedly."""


class DeviceExistsError(GatewayError, InputError):
    """A device with this id is already registered."""


class UnknownDeviceError(GatewayError, InputError, LookupError):
    """No device with this id is registered."""


class GatewayInputError(GatewayError, InputError):
    """An argument from outside is invalid: a device record, a status payload, a day or a range."""


class LedgerExportError(InputError):
    """A ledger export does not verify: a line is malformed, a signature or link fails, or a total disagrees."""
