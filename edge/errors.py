"""The exceptions of edge, grouped by whose fault a failure is.

- ``InputError``: what came from outside is wrong (a malformed frame, serial packet, record or model file).
  The service rejects it, counts it, logs it and keeps running.
- ``TransportError``: a device or connection failed (a serial port closed, a broker went away).
- ``ConfigError``: the local configuration is wrong; the service refuses to start and names the key.

Dual bases (``ValueError`` beside ``EdgeError``) let callers that only know the standard library catch them too.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "EdgeError",
    "FrameError",
    "InputError",
    "ModelError",
    "ProtocolError",
    "TransportError",
]


class EdgeError(Exception):
    """Base of every error edge raises on purpose."""


class InputError(EdgeError, ValueError):
    """Input from outside the process is malformed or violates a limit."""


class FrameError(InputError):
    """A sensor frame cannot be used (wrong shape, size or pixel format)."""


class ProtocolError(InputError):
    """A serial packet violates the wire protocol (bad COBS, CRC, length or type)."""


class ModelError(InputError):
    """A model file cannot be loaded or does not have the shape the service needs."""


class TransportError(EdgeError):
    """A device, port or connection failed."""


class ConfigError(EdgeError, ValueError):
    """The configuration is invalid. The message names the key, the value and what was expected."""

    def __init__(self, key: str, value: object, expected: str) -> None:
        self.key = key
        self.value = value
        self.expected = expected
        super().__init__(f"config key {key!r}: got {value!r}, expected {expected}")
