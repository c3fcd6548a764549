"""The exceptions of edge, grouped by whose fault a failure is: every error class has exactly one of four roots.

- ``InputError``: what came from outside is wrong (a malformed frame, serial packet, record, model file, release,
  a command, an operator's request that names what does not exist). The service rejects it, counts it, logs it and
  keeps running.
- ``TransportError``: a device, connection or database failed (a serial port closed, a broker went away, a
  statement failed). The same call may work later.
- ``ConfigError``: the local configuration is wrong; the service refuses to start and names the key.
- ``ResourceError``: a local resource is exhausted or held: a disk or bounded store full, a lock another process
  holds. Nobody's input is wrong; waiting, freeing space or stopping the other process fixes it.

A bug is a plain ``RuntimeError`` (an illegal state transition, a precondition broken by our own code) and has none
of the roots, so no handler of the four mistakes it for a property of the input. Grouping classes (``EdgeError``,
``edge.ota.errors.OtaError``, ``edge.fleet.errors.GatewayError``, ``edge.telemetry.outbox.OutboxError``) are only
ever caught, never raised. tests/test_errors.py walks the tree and checks all of this.

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
    "ResourceError",
    "TransportError",
    "VerificationError",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_UNVERIFIED",
    "EXIT_USAGE",
]

# The command line's exit statuses (docs/cli.md), the contract scripts act on.
EXIT_OK = 0  # done, including an empty state (no devices, nothing waiting)
EXIT_FAILURE = 1  # anything else: a broker or database down, a path the process cannot write
EXIT_USAGE = 2  # the command line or the configuration is wrong (argparse's own status for usage errors)
EXIT_UNVERIFIED = 3  # what was checked does not verify: a ledger export, a release, a signature


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


class VerificationError(InputError):
    """What the operator asked to check does not verify (a ledger export, a release, a signature): exit status 3."""


class TransportError(EdgeError):
    """A device, port or connection failed."""


class ResourceError(EdgeError):
    """A local resource is exhausted or held by another process: a full disk or bounded store, a busy lock."""


class ConfigError(EdgeError, ValueError):
    """The configuration is invalid. The message names the key, the value and what was expected."""

    def __init__(self, key: str, value: object, expected: str) -> None:
        self.key = key
        self.value = value
        self.expected = expected
        super().__init__(f"config key {key!r}: got {value!r}, expected {expected}")
