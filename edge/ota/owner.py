"""Who owns the box's model slots: the running service for its whole lifetime, or ``edge ota`` for one command.

The owner holds an exclusive ``flock`` on ``<data_dir>/ota/owner.lock`` (:data:`OWNER_LOCK`). The lock, not the file,
is the truth: the kernel drops it when the process exits, however it exits (SIGKILL, a power cut), so a stale file
never blocks anyone, and a reused pid never fakes an owner. The file's content (``<role> <pid>``, written after the
lock is taken) only names the holder in messages.

Why a lock of its own beside the updater's ``ota/lock``: that one is held for one update at a time, so a service
between updates does not hold it. ``edge ota update`` run by hand beside a running service would change the disk
while the service keeps serving the old model; the owner lock makes it refuse instead (there is no local control
channel to route the request through: the fleet's signed commands are the service's way in).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final, Literal

from edge.errors import ResourceError
from edge.log import event

__all__ = ["OWNER_LOCK", "Holder", "OwnerBusy", "OwnerLock", "acquire", "hold_for_service", "owner_lock_path"]

log = logging.getLogger("edge.ota.owner")

OWNER_LOCK: Final = Path("ota") / "owner.lock"
_MAX_NOTE: Final = 64

Role = Literal["service", "edge-ota"]


def owner_lock_path(data_dir: Path) -> Path:
    """The owner lock of a data directory."""
    return data_dir / OWNER_LOCK


@dataclass(frozen=True, slots=True)
class Holder:
    """The process that holds the owner lock, as its note names it (``role`` and ``pid`` None if unreadable)."""

    path: Path
    role: str | None
    pid: int | None

    def describe(self) -> str:
        """``pid 1234 holds <path>`` (or ``a process holds <path>`` when the note is unreadable)."""
        who = f"pid {self.pid}" if self.pid is not None else "a process"
        return f"{who} holds {self.path}"


class OwnerBusy(ResourceError):  # noqa: N818 -- names the condition, like UpdaterBusy
    """Another process owns the model slots; the message says which and what to do."""

    def __init__(self, holder: Holder, message: str) -> None:
        super().__init__(message)
        self.holder = holder


class OwnerLock:
    """A held owner lock; :meth:`release` (or leaving the ``with`` block, or the process exiting) gives it up."""

    def __init__(self, path: Path, file: IO[bytes]) -> None:
        self.path = path
        self._file: IO[bytes] | None = file

    def release(self) -> None:
        """Give the lock up (idempotent)."""
        if self._file is not None:
            self._file.close()  # closing the last descriptor drops the flock
            self._file = None

    def __enter__(self) -> OwnerLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_note(path: Path) -> Holder:
    try:
        with path.open("rb") as f:
            note = f.read(_MAX_NOTE).decode("ascii", "replace").split()
    except OSError:
        note = []
    role = note[0] if note else None
    pid = int(note[1]) if len(note) > 1 and note[1].isdigit() else None
    return Holder(path, role, pid)


def acquire(data_dir: Path, role: Role) -> OwnerLock | Holder:
    """Take the owner lock of ``data_dir`` without waiting.

    Args:
        data_dir: the box's data directory (``ota/`` is created in it when missing).
        role: what the holder is, written into the lock file for the other side's message.

    Returns:
        The held lock, or the :class:`Holder` of the lock when another process holds it.

    Raises:
        OSError: ``ota/`` or the lock file cannot be created or opened (a read-only or foreign data directory).
    """
    path = owner_lock_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    # "a+b": create without truncating, so a holder's note survives a probe that fails to take the lock.
    file = path.open("a+b")
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        file.close()
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return _read_note(path)
        raise
    file.truncate(0)
    file.write(f"{role} {os.getpid()}\n".encode())
    file.flush()
    return OwnerLock(path, file)


def hold_for_service(data_dir: Path, *, ota_on: bool) -> OwnerLock | None:
    """The service's claim on the model slots, held until it exits (``edge.service.run_service``).

    A box without updates (``[ota] repository`` blank) still runs its committed slot and ``edge ota revert`` still
    changes it, so the service takes the lock whenever the data directory exists, and with updates on always.

    Args:
        data_dir: ``[device] data_dir``.
        ota_on: whether ``[ota] repository`` is set (the updater creates the directory anyway).

    Returns:
        The held lock, or None when the data directory does not exist (and updates are off) or cannot hold the lock
        file (a read-only data directory: nothing can change the slots there either).

    Raises:
        OwnerBusy: another process holds it (a second service on the same data directory, or ``edge ota`` now).
    """
    if not ota_on and not data_dir.is_dir():
        return None
    try:
        got = acquire(data_dir, "service")
    except OSError as e:
        event(log, logging.WARNING, "model slots not locked: edge ota cannot tell the service runs", error=str(e))
        return None
    if isinstance(got, OwnerLock):
        return got
    what = "another edge service" if got.role == "service" else "edge ota (changing the model by hand)"
    raise OwnerBusy(
        got,
        f"{what} owns the model slots of {data_dir} ({got.describe()}): "
        + ("stop it before starting another service on this data_dir" if got.role == "service" else "wait for it"),
    )
