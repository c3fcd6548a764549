"""The rollout driver: the I/O around ``edge.fleet.rollout.planner`` (files, store, signed commands, a timer).

Files, in the fleet directory:

- ``rollouts/<id>.json``: each rollout (``Rollout.encode``), written with ``atomic_write`` after every change.
- ``rollouts/current``: the id of the latest rollout; only it is driven.
- ``rollouts/.lock``: an exclusive ``flock`` held while a rollout is read, planned, sent and written back, by the
  gateway's driver and by ``edge fleet rollout start|abort``; two gateway processes on one fleet directory never
  drive the same tick twice (the one that finds the lock taken skips its tick).

A tick: load the current rollout (nothing to do unless it is running, or aborted and not finished), read the
outcome events received since its creation from the store, ``plan``, persist the result *before* publishing, sign
and publish the commands (QoS 1) on the gateway's connection, wait for the broker's acknowledgements, record the
confirmed ones with ``mark_sent`` and persist again. A command whose publish failed (not connected, no PUBACK in
time) stays unconfirmed and ``plan`` returns it again on the next tick; nothing else is ever re-sent.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from edge._fs import atomic_write
from edge.errors import EdgeError
from edge.fleet.rollout.planner import (
    DEFAULT_ABORT_ON,
    DEFAULT_DEVICE_TIMEOUT_S,
    FAILURE_KINDS,
    RUNNING,
    SUCCESS_KIND,
    Command,
    Rollout,
    RolloutConflictError,
    RolloutError,
    abort,
    mark_sent,
    new_rollout,
    plan,
)
from edge.fleet.store import DeviceEvent, Store
from edge.log import event

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edge.fleet.metrics import GatewayMetrics
    from edge.mqtt import Delivery

__all__ = [
    "CURRENT_FILE",
    "LOCK_FILE",
    "ROLLOUTS_DIR",
    "RolloutDriver",
    "RolloutFiles",
    "abort_rollout",
    "eligible_devices",
    "start_rollout",
]

log = logging.getLogger("edge.fleet.rollout.planner")

ROLLOUTS_DIR: Final = "rollouts"
CURRENT_FILE: Final = "current"
LOCK_FILE: Final = ".lock"
PUBACK_TIMEOUT_S: Final = 10.0
_EVENTS_LIMIT: Final = 100_000
_ID_RE = re.compile(r"[0-9a-f]{4,32}")


class RolloutFiles:
    """The rollout files of one fleet directory (see the module docstring).

    Args:
        fleet_dir: the fleet directory.
    """

    def __init__(self, fleet_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(fleet_dir) / ROLLOUTS_DIR

    @contextlib.contextmanager
    def lock(self, *, blocking: bool = True) -> Iterator[bool]:
        """Hold the exclusive rollout lock for the block.

        Args:
            blocking: wait for it; False: yield False at once if another process holds it.

        Yields:
            Whether the lock is held.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # closing releases the lock

    def current_id(self) -> str | None:
        """The id ``current`` names, or None.

        Raises:
            RolloutError: ``current`` does not hold a rollout id.
        """
        try:
            text = (self.dir / CURRENT_FILE).read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise RolloutError(f"cannot read {self.dir / CURRENT_FILE}: {e}") from e
        if _ID_RE.fullmatch(text) is None:
            raise RolloutError(f"{self.dir / CURRENT_FILE}: {text!r:.40} is not a rollout id")
        return text

    def load(self, rollout_id: str) -> Rollout:
        """Read one rollout.

        Raises:
            RolloutError: the id is invalid, the file is missing or corrupt.
        """
        if _ID_RE.fullmatch(rollout_id) is None:
            raise RolloutError(f"{rollout_id!r:.40} is not a rollout id")
        path = self.dir / f"{rollout_id}.json"
        try:
            data = path.read_bytes()
        except OSError as e:
            raise RolloutError(f"cannot read rollout {rollout_id}: {e}") from e
        try:
            rollout = Rollout.decode(data)
        except RolloutError as e:
            raise RolloutError(f"{path}: {e}") from e
        if rollout.id != rollout_id:
            raise RolloutError(f"{path} holds rollout {rollout.id}")
        return rollout

    def current(self) -> Rollout | None:
        """The rollout ``current`` names, or None if there is none.

        Raises:
            RolloutError: the files are corrupt.
        """
        rid = self.current_id()
        return None if rid is None else self.load(rid)

    def history(self) -> tuple[list[Rollout], list[str]]:
        """Every rollout of the directory, newest first (by ``created_at``), and what could not be read.

        Returns:
            (the rollouts, one message per unreadable or corrupt rollout file): one bad file does not hide the rest.
        """
        rollouts: list[Rollout] = []
        problems: list[str] = []
        try:
            names = sorted(p.name for p in self.dir.iterdir() if p.suffix == ".json")
        except FileNotFoundError:
            return [], []
        except OSError as e:
            raise RolloutError(f"cannot list {self.dir}: {e.strerror}") from e
        for name in names:
            try:
                rollouts.append(self.load(name.removesuffix(".json")))
            except RolloutError as e:
                problems.append(str(e))
        rollouts.sort(key=lambda r: (-r.created_at, r.id))
        return rollouts, problems

    def save(self, rollout: Rollout, *, make_current: bool = False) -> None:
        """Write a rollout atomically (and, for a new one, make it the current one afterwards)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.dir / f"{rollout.id}.json", rollout.encode())
        if make_current:
            atomic_write(self.dir / CURRENT_FILE, rollout.id.encode() + b"\n")


# -- operator actions -----------------------------------------------------------------------------------------------


def eligible_devices(store: Store, name: str, only: Sequence[str] | None = None) -> list[str]:
    """The devices a rollout of model ``name`` may command.

    Args:
        store: the fleet's store.
        name: the model name.
        only: the operator's explicit list; None: every enrolled, unrevoked device whose last status names a model
            ``name@...``.

    Returns:
        Device ids (unordered).

    Raises:
        RolloutError: a listed device is not enrolled or is revoked.
        StoreError: the database failed.
    """
    active = {d.device_id for d in store.devices() if d.revoked_at is None}
    if only is not None:
        unknown = sorted(set(only) - active)
        if unknown:
            raise RolloutError(f"not enrolled or revoked: {', '.join(unknown[:10])}")
        return list(dict.fromkeys(only))
    prefix = f"{name}@"
    return [s.device_id for s in store.statuses() if s.device_id in active and (s.model or "").startswith(prefix)]


def _check_release(fleet_dir: Path, name: str, version: str) -> None:
    """Refuse a release the fleet's TUF repository does not have (when the fleet has a repository)."""
    if not (fleet_dir / "repository" / "metadata").is_dir():
        return
    try:
        from edge.fleet.models.repository import FleetRepository  # noqa: PLC0415 -- the repository is optional
    except ImportError:
        return
    from edge.wire.manifest import version_key  # noqa: PLC0415

    releases = FleetRepository.load(fleet_dir).releases(name)
    if not any(version_key(m.version) == version_key(version) for m in releases):
        have = ", ".join(m.version for m in releases) or "none"
        raise RolloutError(f"{name} {version} is not published in the fleet repository (published: {have})")


def start_rollout(
    fleet_dir: str | os.PathLike[str],
    store: Store,
    name: str,
    version: str,
    stages: Sequence[float],
    *,
    now: float,
    abort_on: float = DEFAULT_ABORT_ON,
    devices: Sequence[str] | None = None,
    force: bool = False,
    rollout_id: str | None = None,
) -> Rollout:
    """Create a rollout and make it current; the gateway's driver sends its commands.

    Args:
        fleet_dir: the fleet directory.
        store: the fleet's store (for the eligible devices).
        name: the model name.
        version: the version.
        stages: fractions of the devices per stage.
        now: the creation time.
        abort_on: the failure rate that aborts.
        devices: explicit devices; None: those running ``name`` (see ``eligible_devices``).
        force: ask boxes to retry a version they refused before.
        rollout_id: the id (tests); None: random.

    Returns:
        The new rollout.

    Raises:
        RolloutConflictError: another rollout is running.
        RolloutError: invalid arguments, no eligible devices, or a release the repository does not have.
        StoreError: the database failed.
    """
    files = RolloutFiles(fleet_dir)
    fleet = Path(fleet_dir)
    _check_release(fleet, name, version)
    ids = eligible_devices(store, name, devices)
    if not ids:
        raise RolloutError(
            f"no eligible devices: none enrolled and unrevoked reports a {name}@... model (name them with --devices)"
        )
    with files.lock():
        current = files.current()
        if current is not None and current.state == RUNNING:
            raise RolloutConflictError(f"rollout {current.id} ({current.name} {current.version}) is still running")
        rollout = new_rollout(
            rollout_id or secrets.token_hex(4),
            name,
            version,
            stages,
            ids,
            now=now,
            abort_on=abort_on,
            force=force,
        )
        files.save(rollout, make_current=True)
    return rollout


def abort_rollout(fleet_dir: str | os.PathLike[str], *, reason: str = "operator") -> Rollout:
    """Abort the running rollout; the gateway's driver commands the rollbacks on its next tick.

    Raises:
        RolloutConflictError: no rollout is running.
        RolloutError: the rollout files are corrupt.
    """
    files = RolloutFiles(fleet_dir)
    with files.lock():
        current = files.current()
        if current is None:
            raise RolloutConflictError("no rollout was ever started")
        rollout = abort(current, reason)
        files.save(rollout)
    return rollout


# -- the driver -----------------------------------------------------------------------------------------------------


def outcome_events(store: Store, since: float) -> list[DeviceEvent]:
    """The OTA outcome events received since ``since`` (what ``plan`` reads)."""
    out: list[DeviceEvent] = []
    for kind in (SUCCESS_KIND, *sorted(FAILURE_KINDS)):
        out += store.events(kind_prefix=kind, since=since, limit=_EVENTS_LIMIT)
    return [e for e in out if e.kind == SUCCESS_KIND or e.kind in FAILURE_KINDS]


class RolloutDriver:
    """Drives the current rollout on a timer (a daemon thread) inside ``edge gateway run``.

    Args:
        fleet_dir: the fleet directory.
        store_factory: opens a store; called on the driver's thread (a store is not thread-safe).
        publish: publishes ``(topic, payload)`` at QoS 1 and returns the delivery (``MqttTransport.publish``); may
            raise ``EdgeError`` (not connected).
        signing_key: returns the fleet command key; called only when there is something to send.
        interval_s: seconds between ticks.
        device_timeout_s: how long a device may take to report an outcome.
        command_ttl_s: the signed commands' lifetime.
        metrics: the gateway's metrics, or None.
        clock: the wall clock (epoch seconds).
    """

    def __init__(
        self,
        fleet_dir: str | os.PathLike[str],
        store_factory: Callable[[], Store],
        publish: Callable[[str, bytes], Delivery],
        signing_key: Callable[[], Ed25519PrivateKey],
        *,
        interval_s: float = 2.0,
        device_timeout_s: float = DEFAULT_DEVICE_TIMEOUT_S,
        command_ttl_s: float = 900.0,
        metrics: GatewayMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.files = RolloutFiles(fleet_dir)
        self._store_factory = store_factory
        self._publish = publish
        self._signing_key = signing_key
        self._key: Ed25519PrivateKey | None = None
        self.interval_s = interval_s
        self.device_timeout_s = device_timeout_s
        self.command_ttl_s = command_ttl_s
        self._metrics = metrics
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store: Store | None = None

    def start(self) -> None:
        """Start ticking on a daemon thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rollout-driver", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop after the current tick (a tick waits at most ``PUBACK_TIMEOUT_S`` for the broker)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                try:
                    self.tick()
                except EdgeError as e:  # a corrupt file, the database or the key: log, retry next tick
                    event(log, logging.ERROR, "rollout tick failed", error=str(e))
                    if self._metrics is not None:
                        self._metrics.rollout_errors.inc()
                    self._close_store()
        finally:
            self._close_store()

    def _close_store(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def tick(self) -> Rollout | None:
        """One round: plan the current rollout, persist, publish, record what the broker took.

        Returns:
            The rollout after the round, or None if there was nothing to drive or another process held the lock.

        Raises:
            RolloutError: the rollout files are corrupt.
            StoreError: the database failed.
            KeyFileError: the fleet command key cannot be loaded.
        """
        if not (self.files.dir / CURRENT_FILE).exists():
            return None  # no rollout was ever started: no lock file, no directory created
        with self.files.lock(blocking=False) as held:
            if not held:
                return None
            rollout = self.files.current()
            if rollout is None or rollout.finished_at is not None:
                return None
            if self._store is None:
                self._store = self._store_factory()
            events = outcome_events(self._store, rollout.created_at)
            now = self._clock()
            new, commands = plan(rollout, events, now, device_timeout_s=self.device_timeout_s)
            if new != rollout:
                self.files.save(new)  # before publishing: a command is never sent that the file does not record
                self._log_changes(rollout, new)
            if commands:
                new = self._send(new, commands)
                self.files.save(new)
            return new

    def _send(self, rollout: Rollout, commands: Iterable[Command]) -> Rollout:
        from edge.wire.commands import sign_command  # noqa: PLC0415
        from edge.wire.topics import device_topics  # noqa: PLC0415

        if self._key is None:
            self._key = self._signing_key()
        pending: list[tuple[Command, Delivery]] = []
        for c in commands:
            payload = sign_command(self._key, c.device_id, c.name, c.args, now=self._clock(), ttl_s=self.command_ttl_s)
            try:
                pending.append((c, self._publish(device_topics(c.device_id)["commands"], payload)))
            except EdgeError as e:
                event(log, logging.WARNING, "rollout command not sent", device=c.device_id, error=str(e))
                self._count(c, ok=False)
        deadline = time.monotonic() + PUBACK_TIMEOUT_S
        for c, delivery in pending:
            if delivery.wait(max(0.0, deadline - time.monotonic())) and delivery.ok:
                rollout = mark_sent(rollout, c, self._clock())
                self._count(c, ok=True)
                event(log, logging.INFO, "rollout command sent", rollout=rollout.id, device=c.device_id, command=c.name)
            else:
                self._count(c, ok=False)
                event(log, logging.WARNING, "rollout command not acknowledged", device=c.device_id, why=delivery.reason)
        return rollout

    def _count(self, c: Command, *, ok: bool) -> None:
        if self._metrics is not None:
            self._metrics.rollout_commands.labels(command=c.name, result="sent" if ok else "failed").inc()

    def _log_changes(self, old: Rollout, new: Rollout) -> None:
        if (old.state, old.stage) != (new.state, new.stage):
            event(log, logging.INFO, "rollout", rollout=new.id, state=new.state, stage=new.stage + 1, reason=new.reason)
            if self._metrics is not None and new.state != old.state:
                self._metrics.rollouts.labels(state=new.state).inc()
        for a, b in zip(old.devices, new.devices, strict=True):
            if a.outcome != b.outcome and b.outcome is not None:
                event(log, logging.INFO, "rollout device", rollout=new.id, device=b.device_id, outcome=b.outcome,
                      reason=b.reason)  # fmt: skip
