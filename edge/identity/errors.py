"""Errors of the identity layer, placed in the fault tree of ``edge.errors``.

A key file with loose permissions or unreadable contents, or a certificate the box cannot take its id from, is local
misconfiguration (``ConfigError``); a malformed did:key or device id handed in from outside is bad input
(``InputError``).
"""

from __future__ import annotations

import os

from edge.errors import ConfigError, InputError

__all__ = [
    "CertificateFileError",
    "CertificateMissingError",
    "InvalidDeviceIdError",
    "InvalidDidError",
    "KeyExistsError",
    "KeyFileError",
    "KeyPermissionError",
]


class KeyFileError(ConfigError):
    """A key file is missing, unreadable or does not hold the expected key."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = os.fspath(path)
        ConfigError.__init__(self, "key file", self.path, problem)


class KeyPermissionError(KeyFileError):
    """A private key file may be read or written by group or others (``mode & 0o077``)."""

    def __init__(self, path: str | os.PathLike[str], mode: int) -> None:
        self.mode = mode
        super().__init__(
            path,
            f"a file only its owner can read or write, but its mode is {mode:04o}"
            f" (fix with: chmod 600 {os.fspath(path)})",
        )


class KeyExistsError(KeyFileError):
    """Generating an identity would overwrite an existing private key and ``force`` was not given."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path, "no existing key (refusing to overwrite it; pass force to replace the identity)")


class CertificateFileError(ConfigError):
    """The device certificate cannot be read, is not a PEM X.509 certificate, or its subject CN is no device id."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = os.fspath(path)
        ConfigError.__init__(self, "certificate file", self.path, problem)


class CertificateMissingError(CertificateFileError):
    """The device certificate does not exist (a box not enrolled yet)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path, "an existing certificate file")


class InvalidDidError(InputError):
    """A string is not an Ed25519 did:key."""


class InvalidDeviceIdError(InputError):
    """A device id is not ``[A-Za-z0-9][A-Za-z0-9_.-]{0,63}``."""
