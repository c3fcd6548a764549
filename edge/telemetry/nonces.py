"""The box's command nonce set on disk: a ``NonceSet`` (``edge.wire.commands``) persisted in one small file.

The file is rewritten atomically (``edge._fs.atomic_write``) before a command is accepted, so a reboot never reopens
a replay window; a file that cannot be read is an error, never an empty set.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from edge._fs import atomic_write
from edge.errors import ConfigError
from edge.wire.commands import DEFAULT_NONCE_CAPACITY, NONCE_ENTRY_BYTES, CommandsUnavailable, NonceSet

__all__ = ["FileNonceStore", "NonceFileError"]


class NonceFileError(ConfigError):
    """The persisted nonce set is unreadable or corrupt: commands stay refused until an operator looks."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        """Create the error.

        Args:
            path: the file.
            problem: what was expected of it.
        """
        self.path = os.fspath(path)
        ConfigError.__init__(self, "command nonce file", self.path, problem)


class FileNonceStore:
    """A ``NonceSet`` persisted in one small file, rewritten atomically before a command is accepted.

    Args:
        path: the file (its directory must exist); absent means empty.
        capacity: the most nonces held.

    Raises:
        NonceFileError: the file exists but cannot be read or is not a nonce set (never silently reset: that would
            reopen the replay window).
    """

    def __init__(self, path: str | os.PathLike[str], *, capacity: int = DEFAULT_NONCE_CAPACITY) -> None:
        self.path = Path(path)
        limit = 64 + max(capacity, 1) * NONCE_ENTRY_BYTES * 2
        try:
            with self.path.open("rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            self._set = NonceSet(capacity)
            return
        except OSError as e:
            raise NonceFileError(self.path, f"a readable file ({e.strerror})") from e
        if len(data) > limit:
            raise NonceFileError(self.path, f"at most {limit} bytes")
        try:
            self._set = NonceSet.decode(data, capacity)
        except ValueError as e:
            raise NonceFileError(self.path, f"a command nonce set ({e})") from e

    def __len__(self) -> int:
        """How many nonces are held."""
        return len(self._set)

    def floor(self) -> float:
        """The fleet time proven by accepted commands, 0.0 if none."""
        return self._set.floor()

    def not_before(self) -> float:
        """Commands issued before this are expired, 0.0 if never reset."""
        return self._set.not_before()

    def remember(self, nonce: bytes, *, issued_at: float, expires_at: float, limit: float = math.inf) -> None:
        """Record a nonce durably (see ``NonceSet.remember``); the file is written before this returns.

        Raises:
            CommandReplayed: the nonce is held.
            NonceStoreFull: the set is full of unexpired nonces.
            CommandsUnavailable: the file cannot be written (the nonce is not recorded and the command must not run).
        """
        candidate = self._set.copy()
        candidate.remember(nonce, issued_at=issued_at, expires_at=expires_at, limit=limit)
        self._commit(candidate, "the command nonce")

    def reset(self, to: float) -> bool:
        """Lower the floor durably (see ``NonceSet.reset``); the file is written before this returns.

        Raises:
            CommandsUnavailable: the file cannot be written (nothing changed).
        """
        candidate = self._set.copy()
        if not candidate.reset(to):
            return False
        self._commit(candidate, "the time reset")
        return True

    def _commit(self, candidate: NonceSet, what: str) -> None:
        try:
            atomic_write(self.path, candidate.encode(), mode=0o600)
        except OSError as e:
            raise CommandsUnavailable(f"cannot persist {what} to {self.path}: {e.strerror}") from e
        self._set = candidate
