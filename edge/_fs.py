"""Atomic, durable file writes: the one helper every persistent write goes through.

A reader sees either the old file or the new one, never a partial write, even after a power cut: the data goes to a
temporary file in the same directory, is fsynced, renamed over the target, and the directory is fsynced so the
rename itself is durable.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from edge.errors import InputError

__all__ = ["atomic_write", "fsync_dir"]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries to stable storage (makes a preceding rename or create durable)."""
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    mode: int = 0o644,
    checkpoint: Callable[[str], None] | None = None,
) -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    Args:
        path: the target file; its directory must exist.
        data: the complete new contents.
        mode: permission bits of the new file, applied before any byte is written (so a key is never readable by
            others, not even for a moment).
        checkpoint: called with ``"written"`` once the temporary file is written and fsynced, and with ``"renamed"``
            right after the rename, before the directory fsync (crash tests stop the process at these points).
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if checkpoint is not None:
            checkpoint("written")
        os.replace(tmp, target)
        if checkpoint is not None:
            checkpoint("renamed")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


class TooLargeError(InputError):
    """A file is over the bound its reader set, or grew past it while it was read (input from outside)."""


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of ``path``, refusing a file over ``limit`` bytes before reading it.

    Raises:
        TooLargeError: the file is over ``limit``, or grew while it was read (the message names it and its size).
        OSError: it cannot be read (callers say whose fault that is).
    """
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise TooLargeError(f"{path} is {size} bytes, more than {limit}")
        # One byte past the size from the stat (read() allocates what it is asked for): a file that grows meanwhile
        # is refused, not read on without bound.
        data = f.read(size + 1)
    if len(data) > size:
        raise TooLargeError(f"{path} grew while it was read (it was {size} bytes)")
    return data
