"""The updater inside the running service: one thread, a bounded queue of fleet requests, and the periodic check.

Fleet commands (``models/update``, ``models/rollback``) arrive on the MQTT network thread, which must never wait
for an update: they are queued here and answered at once with ``accepted``; the outcome follows in signed telemetry
(``ota.*`` events). One thread runs every request and the periodic check in turn, so two updates never overlap
(the updater's file lock also keeps ``edge ota`` run by hand from overlapping with the service).

Nothing here stops the service: a failed request is logged and reported, and the thread goes on.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from edge.config import Config, data_path
from edge.errors import ConfigError
from edge.log import event
from edge.ota.clock import TimeFloor
from edge.ota.updater import Emit, Outcome, Updater, UpdaterBusy

__all__ = ["MAX_QUEUED", "EventEmitter", "OtaAgent", "open_updater", "ota_paths"]

log = logging.getLogger("edge.ota.agent")

MAX_QUEUED: Final = 8
_BUSY_RETRY_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class OtaPaths:
    """Where the TUF client and its time floor keep their files in the data directory (fixed; docs/ota.md; the
    updater itself keeps ``models/`` and ``ota/state.json``)."""

    state: Path
    metadata: Path
    downloads: Path
    time_floor: Path


def ota_paths(cfg: Config) -> OtaPaths:
    """The updater's paths for a configuration."""
    d = cfg.device.data_dir
    return OtaPaths(
        state=d / "ota",
        metadata=d / "tuf",
        downloads=d / "ota" / "downloads",
        time_floor=d / "ota" / "time-floor.json",
    )


def open_updater(
    cfg: Config,
    factory: Path,
    *,
    emit: Emit,
    repo_url: str | None = None,
    root: Path | None = None,
    data_dir: Path | None = None,
) -> tuple[Updater, TimeFloor | None]:
    """Build the updater (and its TUF client) the configuration describes.

    Args:
        cfg: the validated configuration.
        factory: the model that runs when no slot is active (the configured model or the factory one).
        emit: receives every transition.
        repo_url, root, data_dir: overrides of ``ota.repository``, ``ota.root`` and ``device.data_dir``.

    Returns:
        The updater, and the time floor its TUF client keeps (None without a repository: the updater then only
        reports its status and reverts).

    Raises:
        ConfigError: the trusted root cannot be read.
    """
    from edge.ota.trial import run_trial  # noqa: PLC0415 -- onnxruntime: only where an updater is built

    if data_dir is not None:
        from dataclasses import replace  # noqa: PLC0415

        cfg = replace(cfg, device=replace(cfg.device, data_dir=data_dir))
    paths = ota_paths(cfg)
    url = cfg.ota.repository if repo_url is None else repo_url
    trust = None
    floor = None
    if url:
        from edge.ota.trust import TrustClient  # noqa: PLC0415 -- tuf and urllib3 only when updates are on

        root_path = root if root is not None else data_path(cfg, cfg.ota.root)
        try:
            trusted_root = root_path.read_bytes()
        except OSError as e:
            raise ConfigError("ota.root", str(root_path), f"a readable trusted root.json ({e.strerror or e})") from e
        paths.state.mkdir(parents=True, exist_ok=True)
        floor = TimeFloor(paths.time_floor)
        if floor.ahead(time.time()):
            # A floor from before the horizon rule, or two sources that agreed on a wrong time: kept (the box cannot
            # tell), reported in the status, and lowered only by the fleet's time/reset (docs/ota.md, Clocks).
            event(
                log,
                logging.WARNING,
                "time floor is ahead of the box's clock: metadata may look expired until the fleet runs time/reset",
                path=str(paths.time_floor),
                floor=floor.floor(),
                source=floor.source,
            )
        trust = TrustClient(
            repo_url=url,
            metadata_dir=paths.metadata,
            downloads_dir=paths.downloads,
            trusted_root=trusted_root,
            time_floor=floor,
            max_target_bytes=int(cfg.ota.max_model_mb * 2**20),
        )
    updater = Updater(
        data_dir=cfg.device.data_dir,
        factory=factory,
        trust=trust,
        trial=functools.partial(run_trial, runs=cfg.ota.trial_runs),
        emit=emit,
        threads=cfg.model.threads,
    )
    return updater, floor


class EventEmitter:
    """Turns the updater's transitions into signed telemetry events (and log lines).

    Transitions that happen before the telemetry sink exists (the recovery at start, before the model loads) are
    held, up to ``limit``, and written when :meth:`attach` is called. Each event is sealed at once (``flush``): a
    rollout waits for it.
    """

    def __init__(self, limit: int = 64) -> None:
        self._sink: Any = None
        self._held: list[Any] = []
        self._limit = limit
        self._lock = threading.Lock()

    def attach(self, sink: Any) -> None:
        """Start writing to ``sink`` (a ``TelemetrySink``), first what was held."""
        with self._lock:
            self._sink = sink
            held, self._held = self._held, []
        if held:
            sink.write(held)
            sink.flush()

    def __call__(self, kind: str, data: Mapping[str, Any]) -> None:
        """Emit one transition (the updater's ``emit``)."""
        from edge.wire.schema import EventRecord  # noqa: PLC0415 -- cbor2 only where telemetry runs

        record = EventRecord(timestamp=time.time(), kind=kind, data=dict(data))
        event(log, logging.INFO, kind, **_flat(data))
        with self._lock:
            sink = self._sink
            if sink is None:
                if len(self._held) < self._limit:
                    self._held.append(record)
                return
        try:
            sink.write([record])
            sink.flush()
        except Exception as e:  # a full disk must not stop the update: the outcome is still in the state file and log
            event(log, logging.WARNING, "OTA event not sealed", kind=kind, error=str(e))


_STOP: Final = object()


@dataclass(frozen=True, slots=True)
class _Request:
    kind: str  # "update" | "rollback"
    name: str
    version: str
    force: bool
    rollout: str | None


class OtaAgent:
    """Runs an :class:`Updater` on its own thread.

    Args:
        updater: the updater (its ``on_commit``/``on_revert`` hooks are the service's).
        check_interval_s: seconds between periodic checks (the first runs at start).
        time_floor: the TUF client's time floor, offered verified commands' issue times (None: no repository).
    """

    def __init__(self, updater: Updater, *, check_interval_s: float, time_floor: TimeFloor | None = None) -> None:
        self.updater = updater
        self._interval = check_interval_s
        self._floor = time_floor
        self._queue: queue.Queue[object] = queue.Queue()
        self._pending: set[_Request] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="edge-ota", daemon=True)
        self.outcomes: list[Outcome] = []

    # -- the service's side -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread: it finishes an interrupted update and runs the first check at once."""
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the request in progress (an update in its trial may take a few seconds)."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def request_update(self, name: str, version: str, force: bool, rollout: str | None) -> dict[str, Any]:
        """Queue an update (the ``models/update`` command's hook); returns the reply's result."""
        return self._submit(_Request("update", name, version, force, rollout))

    def request_rollback(self, name: str, version: str, rollout: str | None) -> dict[str, Any]:
        """Queue leaving ``name@version`` (the ``models/rollback`` command's hook); returns the reply's result."""
        return self._submit(_Request("rollback", name, version, False, rollout))

    @property
    def time_floor(self) -> TimeFloor | None:
        """The TUF client's time floor (None without a repository)."""
        return self._floor

    def prove_time(self, issued_at: float, clock: float | None = None) -> None:
        """Offer a verified command's issue time (signed by the fleet command key) to the time floor, which believes
        it within its horizon, or beyond it once a TUF timestamp agrees (``edge.ota.clock``).

        Args:
            issued_at: the command's issued-at.
            clock: the box's clock when the command arrived (None: now).
        """
        if self._floor is not None:
            try:
                self._floor.prove(issued_at, "command", kind="command", clock=time.time() if clock is None else clock)
            except OSError as e:
                event(log, logging.WARNING, "time floor not saved", path=str(self._floor.path), error=str(e))

    # -- the thread -----------------------------------------------------------------------------------------------

    def _submit(self, req: _Request) -> dict[str, Any]:
        with self._lock:
            if req in self._pending:
                return {"accepted": True, "queued": len(self._pending), "duplicate": True}
            if len(self._pending) >= MAX_QUEUED:
                return {"accepted": False, "reason": "busy", "queued": len(self._pending)}
            self._pending.add(req)
            self._queue.put(req)
            return {"accepted": True, "queued": len(self._pending)}

    def _run(self) -> None:
        next_check = time.monotonic()
        while True:
            try:
                job = self._queue.get(timeout=max(0.0, next_check - time.monotonic()))
            except queue.Empty:
                job = None
            if job is _STOP:
                return
            if job is None:
                self._guarded("check", self.updater.check)
                next_check = time.monotonic() + self._interval
                continue
            assert isinstance(job, _Request)
            done = self._guarded(job.kind, functools.partial(self._execute, job))
            if not done:
                # Another process (``edge ota`` by hand) holds the updater: try again shortly, keep the request.
                retry = threading.Timer(_BUSY_RETRY_S, self._queue.put, args=(job,))
                retry.daemon = True  # a pending retry must not hold up the service's exit
                retry.start()
                continue
            with self._lock:
                self._pending.discard(job)

    def _execute(self, req: _Request) -> Outcome | None:
        wanted = f"{req.name}@{req.version}"
        active_now = self.updater.status()["active"]
        active = active_now["model"]
        if req.kind == "update":
            if active == wanted and not req.force:
                # Already there (an earlier command, a repeated rollout): the fleet counts this as success, so it is
                # reported as committed rather than refused as not newer.
                self.updater.emit(
                    "ota.committed",
                    {
                        "model": req.name,
                        "version": req.version,
                        "from": active,
                        "slot": active_now["slot"],
                        "reason": "already_active",
                        "rollout": req.rollout,
                    },
                )
                return Outcome("unchanged", active, "already_active")
            return self.updater.update(req.name, req.version, force=req.force, rollout=req.rollout)
        if active != wanted:
            event(
                log,
                logging.INFO,
                "rollback: that version is not active",
                asked=f"{req.name}@{req.version}",
                active=active,
            )
            return Outcome("unchanged", active, "not_active")
        return self.updater.revert(reason="fleet_rollback", rollout=req.rollout)

    def _guarded(self, what: str, run: Callable[[], Outcome | None]) -> bool:
        """Run one job; False when the updater was busy (retry later). Every other failure is logged, not raised."""
        try:
            outcome = run()
        except UpdaterBusy as e:
            event(log, logging.INFO, "updater busy", job=what, detail=str(e))
            return False
        except Exception as e:  # the service outlives any update: log it with its traceback and go on
            log.exception("OTA %s failed: %s", what, e)
            return True
        if outcome is not None:
            self.outcomes.append(outcome)
            event(log, logging.INFO, f"OTA {what} done", **_flat(outcome.as_dict()))
        return True


def _flat(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, str | int | float | bool) or v is None}
