"""Keeping the TUF repository fresh from the running gateway: re-sign the snapshot and timestamp before they expire.

A box refuses an expired timestamp (or snapshot), so someone must re-sign them well within their lifetimes (1 day
and 7 days by default). ``edge fleet models refresh`` does it by hand or from cron; a gateway whose fleet directory
holds the repository and the online keys (``tuf/keys/snapshot`` and ``tuf/keys/timestamp``) does it itself with a
:class:`TimestampKeeper`, calling the same ``FleetRepository.refresh``.

Invariants:
- Re-signed when less than ``REFRESH_FRACTION`` of a role's lifetime remains (or it has expired), never more often:
  every re-sign is a new version the boxes download.
- Every process that writes the repository holds :func:`repository_lock` from loading it to the last write, so a
  re-sign never interleaves with a publish (which would write a snapshot that drops the new release, a rollback the
  boxes refuse). The keeper never waits for the lock: a busy repository is retried on the next check.
- A failure (a missing key, an unreadable file, a full disk) is logged and counted, then retried; it never stops
  the gateway. Keys kept offline are not an error: the keeper says once that it cannot sign and keeps checking.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Final

from edge.errors import EdgeError
from edge.log import event

if TYPE_CHECKING:
    from edge.fleet.metrics import GatewayMetrics

__all__ = [
    "CHECK_MAX_S",
    "REFRESH_FRACTION",
    "TimestampKeeper",
    "check_interval",
    "hold_repository_lock",
    "refresh_due",
    "repository_lock",
]

log = logging.getLogger("edge.fleet.models.freshness")

REFRESH_FRACTION: Final = 1 / 3
CHECK_MAX_S: Final = 60.0
_FRESH_ROLES: Final = ("snapshot", "timestamp")  # what refresh re-signs, and the keys it needs
_LOCK_FILE: Final = Path("tuf") / ".lock"
_DAY_S: Final = 86_400.0
_BUSY_RETRY_S: Final = 1.0
_FAILED_RETRY_S: Final = 10.0  # soon after a failure (the operator may be fixing it), never busy-looping
# Descriptors locked by hold_repository_lock, kept open until the process exits (a command's lifetime).
_held: dict[Path, int] = {}


@contextlib.contextmanager
def repository_lock(fleet_dir: Path, *, blocking: bool = True) -> Iterator[bool]:
    """Hold the exclusive lock of the fleet's TUF repository (``tuf/.lock``, ``flock``) for the block.

    Args:
        fleet_dir: the fleet directory.
        blocking: wait for it; False: yield False at once if another process holds it.

    Yields:
        Whether the lock is held.
    """
    path = Path(fleet_dir) / _LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing releases the lock


def hold_repository_lock(fleet_dir: Path) -> None:
    """Take the repository lock for the rest of this process, waiting for it (a short command that loads the
    repository and may write it: ``edge fleet models ...``). A second call for the same directory does nothing.

    Raises:
        OSError: the lock file cannot be created (the fleet directory is read-only).
    """
    path = (Path(fleet_dir) / _LOCK_FILE).absolute()
    if path in _held or not path.parent.is_dir():  # no repository: nothing to exclude, and no directory to create
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    _held[path] = fd


def refresh_due(
    expiries: Mapping[str, datetime.datetime], lifetime_days: Mapping[str, float], now: datetime.datetime
) -> str | None:
    """Which of snapshot and timestamp needs re-signing now, if any (sans-IO).

    Args:
        expiries: when each role's current metadata expires (``FleetRepository.expiries``).
        lifetime_days: each role's lifetime (``FleetRepository.expiry_days``).
        now: the current time (UTC).

    Returns:
        ``timestamp`` or ``snapshot`` when less than ``REFRESH_FRACTION`` of its lifetime remains, else None.
    """
    for role in ("timestamp", "snapshot"):
        expires = expiries.get(role)
        if expires is None:
            continue
        remaining = (expires - now).total_seconds()
        if remaining < lifetime_days[role] * _DAY_S * REFRESH_FRACTION:
            return role
    return None


def check_interval(lifetime_days: Mapping[str, float]) -> float:
    """Seconds between two checks: a tenth of the timestamp's lifetime, at most ``CHECK_MAX_S``, at least 1."""
    return max(1.0, min(CHECK_MAX_S, lifetime_days.get("timestamp", 1.0) * _DAY_S / 10))


def _has_keys(fleet_dir: Path) -> bool:
    from edge.fleet.models._tuf_keys import KEYS_DIR  # noqa: PLC0415 -- tuf and cryptography load with the keeper

    return all(any((fleet_dir / KEYS_DIR / role).glob("*.pem")) for role in _FRESH_ROLES)


class TimestampKeeper:
    """Checks the fleet's repository on a daemon thread and re-signs snapshot and timestamp when due.

    Args:
        fleet_dir: the fleet directory.
        metrics: counts the re-signs (``edge_gateway_tuf_refreshes_total``) and exports the timestamp's expiry.
        clock: the wall clock (UTC), injected for tests.
    """

    def __init__(
        self,
        fleet_dir: Path,
        metrics: GatewayMetrics | None = None,
        *,
        clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
    ) -> None:
        self.fleet_dir = Path(fleet_dir)
        self._metrics = metrics
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._said: str | None = None  # the last "cannot sign" state logged, so it is said once, not every check
        self.interval_s = CHECK_MAX_S

    def start(self) -> None:
        """Start checking on a daemon thread (the first check at once)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="tuf-keeper", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current check."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            outcome = "failed"
            try:
                outcome = self.check()
            # A key, a file, the disk (or the fleet extra's tuf not installed): log, count, retry soon.
            except (EdgeError, OSError, ValueError, ImportError) as e:
                event(
                    log,
                    logging.ERROR,
                    "tuf refresh failed",
                    dir=str(self.fleet_dir),
                    error=str(e),
                    retry_s=min(_FAILED_RETRY_S, self.interval_s),
                )
                self._count("failed")
            retry = {"busy": _BUSY_RETRY_S, "failed": _FAILED_RETRY_S}.get(outcome, self.interval_s)
            self._stop.wait(min(retry, self.interval_s))

    def check(self) -> str:
        """Re-sign snapshot and timestamp if due; what happened.

        Returns:
            ``refreshed``, ``fresh``, ``busy`` (another process writes the repository), ``no-repository`` or
            ``no-keys``.

        Raises:
            RepositoryError: the repository's files are inconsistent.
            KeyFileError: a key file is unsafe or does not match.
            OSError: the disk failed.
        """
        from edge.fleet.models.repository import METADATA_DIR, REPOSITORY_DIR, FleetRepository  # noqa: PLC0415

        if not (self.fleet_dir / REPOSITORY_DIR / METADATA_DIR / "timestamp.json").is_file():
            return self._cannot("no-repository", logging.DEBUG, "no TUF repository: nothing to keep fresh")
        if not _has_keys(self.fleet_dir):
            # Still export when it expires: whoever re-signs elsewhere is watched by the same alert.
            repo = FleetRepository.load(self.fleet_dir)
            self.interval_s = check_interval(repo.expiry_days)
            self._export(repo.expiries())
            return self._cannot(
                "no-keys", logging.INFO, "snapshot or timestamp key not here: re-sign with edge fleet models refresh"
            )
        self._said = None
        with repository_lock(self.fleet_dir, blocking=False) as held:
            if not held:
                return "busy"
            repo = FleetRepository.load(self.fleet_dir)
            self.interval_s = check_interval(repo.expiry_days)
            now = self._clock()
            expiries = repo.expiries()
            role = refresh_due(expiries, repo.expiry_days, now)
            if role is not None:
                repo.refresh(now=now)
                old, expiries = expiries, repo.expiries()
                event(
                    log,
                    logging.INFO,
                    "tuf timestamp re-signed",
                    due=role,
                    was_valid_until=old[role].isoformat(timespec="seconds"),
                    valid_until=expiries["timestamp"].isoformat(timespec="seconds"),
                    snapshot_valid_until=expiries["snapshot"].isoformat(timespec="seconds"),
                )
                self._count("ok")
        self._export(expiries)
        return "fresh" if role is None else "refreshed"

    def _export(self, expiries: Mapping[str, datetime.datetime]) -> None:
        if self._metrics is not None:
            self._metrics.tuf_timestamp_expiry.set(expiries["timestamp"].timestamp())

    def _cannot(self, state: str, level: int, message: str) -> str:
        if self._said != state:
            self._said = state
            event(log, level, message, dir=str(self.fleet_dir))
        return state

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.tuf_refreshes.labels(result=result).inc()
