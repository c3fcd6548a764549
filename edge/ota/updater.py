"""The box's model installer: drives the state machine of :mod:`edge.ota.state` over the slots of
:mod:`edge.ota.slots`, with the TUF client (:mod:`edge.ota.trust`) and the health gate (:mod:`edge.ota.trial`).

Order of writes (why every crash point ends with a valid model running):

1. ``downloading`` is persisted, then the inactive slot is emptied and marked "being written" (a manifest without a
   variant), then the files are fetched into it (each one renamed into place only after TUF verified it).
2. ``verifying``: every file's SHA-256 and length against the signed manifest, the runtime requirements.
3. The slot's manifest names the primary variant (staged, not committed), then ``staged`` is persisted.
4. ``trial`` is persisted with the attempt counter *before* the candidate is loaded: if the candidate kills the
   process, the restart retries once and then rolls back with ``trial_interrupted``.
5. Commit: the slot's manifest is rewritten with the chosen variant and a commit time, *then* ``active`` is switched
   atomically, *then* ``committed`` is persisted. A restart in ``trial`` that finds ``active`` already naming the
   slot (valid and committed) finishes the commit instead of trialling again.
6. Any failure persists ``rolled_back`` (with the model id added to ``failed`` unless the reason is transient),
   *then* clears the staging slot. ``active`` is never touched by a failed update.

The ``active`` link only ever names a slot whose committed manifest matches its file (checked again on every read),
so whatever the crash point, the box runs the old model or the new one, never a partial file.

A run is a loop over :data:`edge.ota.state.TRANSITIONS`: the step of the current state does its work and returns an
event (an exception before the ``active`` switch is ``failed``), the table names the next state, and that state is
persisted before the next step. A run ends in a state without a step: ``idle`` (committed) or ``rolled_back``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple, Protocol

from edge.errors import InputError, ModelError, ResourceError
from edge.log import event
from edge.ota import _faults
from edge.ota.errors import IllegalTransition, OtaError, OtaNotConfiguredError, UpdateRejected
from edge.ota.slots import ActiveModel, SlotInvalid, SlotName, SlotRecord, Slots, file_sha256, release_files
from edge.ota.state import ACTIVE_STATES, Event, State, StateCorrupt, StateFile, UpdateState, transition
from edge.wire.errors import ManifestError
from edge.wire.manifest import (
    FLOAT_FILE,
    GOLDEN_FILE,
    MODEL_FILE,
    ModelManifest,
    validate_name,
    version_key,
)

if TYPE_CHECKING:
    from edge.ota.trial import TrialResult
    from edge.wire.schema import EventValue

__all__ = ["TRANSIENT_REASONS", "Emit", "Outcome", "TrustSource", "Updater", "UpdaterBusy"]

log = logging.getLogger("edge.ota.updater")

#: Reasons that say nothing about the model: the version is not marked failed, and ``edge ota check`` retries it.
TRANSIENT_REASONS: Final = frozenset({"network", "io_error"})
_REASON = re.compile(r"[a-z0-9_]{1,64}")

Progress = Callable[[int, int], None]
Emit = Callable[[str, Mapping[str, "EventValue"]], None]


class TrustSource(Protocol):
    """What the updater needs from the TUF client (:class:`edge.ota.trust.TrustClient` provides it)."""

    def refresh(self) -> None:
        """Update the trusted metadata (raises ``UpdateRejected``)."""

    def release(self, name: str, version: str) -> ModelManifest:
        """The signed manifest of ``name@version`` (raises ``UpdateRejected``)."""

    def fetch(
        self, target_path: str, dest: Path, *, expected_sha256: str | None = None, progress: Progress | None = None
    ) -> Path:
        """Download a verified target to ``dest`` (raises ``UpdateRejected``)."""


class UpdaterBusy(OtaError, ResourceError):  # noqa: N818 -- names the condition: a lock another process holds
    """Another process (the service or ``edge ota``) holds the updater's lock."""

    reason = "busy"


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an update, a recovery or a revert ended.

    Attributes:
        state: ``committed``, ``rolled_back``, ``refused`` or ``unchanged``.
        model: the model id (``name@version``) it was about.
        reason: why it rolled back, was refused or did nothing; None when committed.
        variant: the committed variant ("int8" or "float"), else None.
        latency_ms: the committed model's p50 latency on this box, else None.
        timings: seconds per phase (``download``, ``verify``, ``trial``, ``commit``, ``total``).
    """

    state: Literal["committed", "rolled_back", "refused", "unchanged"]
    model: str | None
    reason: str | None = None
    variant: str | None = None
    latency_ms: float | None = None
    timings: Mapping[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (for ``edge ota ... --json`` and logs)."""
        return {
            "state": self.state,
            "model": self.model,
            "reason": self.reason,
            "variant": self.variant,
            "latency_ms": self.latency_ms,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }


def _no_emit(kind: str, data: Mapping[str, EventValue]) -> None:
    del kind, data


class _Rollback(Exception):  # noqa: N818 -- internal control flow: carries the reason out of a phase
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(slots=True)
class _Run:
    """What one run of the update carries from step to step; memory only, a resumed run re-derives it from disk."""

    record: UpdateState  # as last persisted
    slot: SlotName
    timings: dict[str, float] = field(default_factory=dict)
    manifest: ModelManifest | None = None  # the release in the slot, once downloaded or read back
    checked: bool = False  # the slot's files were verified in this run
    result: TrialResult | None = None
    variant: str | None = None
    latency_ms: float | None = None


class _Move(NamedTuple):
    """A step's outcome: the event for the table, and the record fields (or event extras) it sets."""

    event: Event
    changes: Mapping[str, Any] = MappingProxyType({})


def _failure(e: Exception) -> tuple[str, str]:
    """The rollback reason and detail of an exception raised by a step."""
    if isinstance(e, _Rollback):
        return e.reason, e.detail
    if isinstance(e, OtaError | ManifestError | ModelError):
        return getattr(e, "reason", "ota_error"), str(e)
    return "io_error", str(e)


class Updater:
    """Installs model releases into the A/B slots, persisting every transition.

    Args:
        data_dir: the box's data directory (``models/`` and ``ota/`` live below it).
        factory: the read-only factory model file.
        trust: the TUF client (None: only :meth:`status` works, e.g. on a box without a repository).
        trial: the health gate (``edge.ota.trial.run_trial`` by default).
        emit: receives every transition as ``(kind, data)``; the service sends them in signed telemetry.
        clock: epoch seconds (persisted timestamps, commit time).
        threads: intra-op threads of the trial session (as the service runs the model).

    Attributes:
        on_commit: called after a commit with the trial's result and the new active model (the service swaps its
            pipeline to ``result.model`` here). Not called when a restart finishes a commit the crashed process
            had already switched: the service loads :meth:`Slots.active` when it starts.
        on_revert: called after a fleet revert with the model now active (the service loads and swaps it).
    """

    def __init__(
        self,
        *,
        data_dir: Path,
        factory: Path,
        trust: TrustSource | None,
        trial: Callable[..., TrialResult] | None = None,
        emit: Emit = _no_emit,
        clock: Callable[[], float] = time.time,
        threads: int = 1,
    ) -> None:
        if trial is None:
            from edge.ota.trial import run_trial  # noqa: PLC0415 -- imports onnxruntime

            trial = run_trial
        self.data_dir = data_dir
        self.slots = Slots(data_dir / "models", factory)
        self.state_file = StateFile(data_dir / "ota" / "state.json")
        self._trust = trust
        self.trial = trial
        self.emit = emit
        self.clock = clock
        self.threads = threads
        self.on_commit: Callable[[TrialResult, ActiveModel], None] | None = None
        self.on_revert: Callable[[ActiveModel], None] | None = None
        self._factory_id: str | None = None
        self._from: str | None = None

    @property
    def trust(self) -> TrustSource:
        """The TUF client.

        Raises:
            OtaNotConfiguredError: none was configured (a ConfigError naming [ota] repository).
        """
        if self._trust is None:
            raise OtaNotConfiguredError
        return self._trust

    # -- public surface --------------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The state, the active model, failed versions and the last reason (JSON-ready; takes no lock)."""
        try:
            st = self.state_file.load()
            corrupt = None
        except StateCorrupt as e:
            st, corrupt = UpdateState(), str(e)
        active = self.slots.active()
        return {
            "state": st.state.value,
            "model": st.model_id,
            "slot": st.slot,
            "reason": st.reason if corrupt is None else "corrupt_state",
            "rollout": st.rollout,
            "attempts": st.attempts,
            "failed": sorted(st.failed),
            "updated_at": st.updated_at,
            "active": {
                "slot": active.slot,
                "model": self._model_id(active),
                "sha256": active.sha256,
                "path": str(active.path),
            },
            **({"error": corrupt} if corrupt else {}),
        }

    def recover(self) -> Outcome | None:
        """Continue or roll back the update a crash interrupted (call at start, before loading the model).

        Returns:
            The outcome of the interrupted update, or None when there was none.

        Raises:
            UpdaterBusy: another process holds the lock.
        """
        with self._locked():
            st, corrupt = self._load()
            if corrupt is not None:
                return corrupt
            return self._recover(st)

    def check(self) -> Outcome | None:
        """The periodic check: finish an interrupted update, refresh the metadata, retry a transient failure.

        Returns:
            The outcome of what it did, or None when there was nothing to do.

        Raises:
            UpdaterBusy: another process holds the lock.
        """
        outcome = self.recover()
        try:
            self.trust.refresh()
        except UpdateRejected as e:
            event(log, logging.WARNING, "OTA metadata refresh failed", reason=e.reason, detail=e.detail[:500])
            return outcome or Outcome("unchanged", None, e.reason)
        st, _ = self._load()
        if (
            st.state is State.ROLLED_BACK
            and st.reason in TRANSIENT_REASONS
            and st.name is not None
            and st.version is not None
            and st.model_id not in st.failed
        ):
            event(log, logging.INFO, "retrying an update that failed for a transient reason", model=st.model_id)
            return self.update(st.name, st.version, rollout=st.rollout)
        return outcome

    def update(self, name: str, version: str, *, force: bool = False, rollout: str | None = None) -> Outcome:
        """Install ``name@version`` into the inactive slot, trial it and commit it, or roll back.

        Args:
            name, version: the release.
            force: install even a version that failed before or is not newer than the active one.
            rollout: the fleet's rollout id, reported with every transition.

        Returns:
            ``committed``, ``rolled_back`` (with the reason) or ``refused`` (``failed_before`` / ``not_newer``).

        Raises:
            ManifestError: ``name`` or ``version`` is malformed.
            UpdaterBusy: another process holds the lock.
        """
        version_key(version)
        model_id = f"{name}@{version}"
        validate_name(name)
        with self._locked():
            st = self._settled()
            active = self.slots.active()
            self._from = self._model_id(active)
            if model_id in st.failed and not force:
                return self._refuse(name, version, "failed_before", rollout)
            if not force and self._not_newer(active, name, version):
                return self._refuse(name, version, "not_newer", rollout)
            started = time.monotonic()
            st = self._persist(
                st,
                Event.START,
                name=name,
                version=version,
                slot=self.slots.inactive_slot(),
                previous=active.slot,
                reason=None,
                attempts=0,
                rollout=rollout,
                failed=st.failed - {model_id} if force else st.failed,
            )
            return self._run(st, started)

    def revert(self, *, reason: str, rollout: str | None = None) -> Outcome:
        """The fleet's rollback: run the previous model again and never retry the current one unless forced.

        The other slot becomes active when it holds a valid committed model that has not failed, else the factory
        model. The reverted model id is added to ``failed``.

        Args:
            reason: snake_case word reported with the revert (e.g. ``rollout_aborted``).
            rollout: the fleet's rollout id.

        Returns:
            ``rolled_back`` with ``reason``, or ``unchanged`` (``nothing_to_revert``) when the factory model runs.

        Raises:
            InputError: ``reason`` is not a snake_case word.
            UpdaterBusy: another process holds the lock.
        """
        if not _REASON.fullmatch(reason):
            raise InputError(f"revert reason must be a snake_case word, got {reason!r:.80}")
        with self._locked():
            st = self._settled()
            active = self.slots.active()
            if active.slot == "factory" or active.manifest is None:
                return Outcome("unchanged", self._model_id(active), "nothing_to_revert")
            manifest = active.manifest
            self._from = manifest.model_id
            if st.state is not State.IDLE:
                st = self._persist(st, Event.DONE)
            st = self._persist(
                st,
                Event.REVERT,
                kind="ota.reverted",
                name=manifest.name,
                version=manifest.version,
                slot=active.slot,
                previous=active.slot,
                reason=reason,
                attempts=0,
                rollout=rollout,
                failed=st.failed | {manifest.model_id},
            )
            now_active = self._switch_away(active.slot, st.failed)
            if self.on_revert is not None:
                self._call_hook("on_revert", self.on_revert, now_active)
            return Outcome("rolled_back", manifest.model_id, reason)

    # -- the update --------------------------------------------------------------------------------------------------

    def _run(self, st: UpdateState, started: float) -> Outcome:
        """Drive ``st`` from wherever it is to idle (committed) or rolled_back: each step's event, through the table."""
        assert st.slot is not None and st.name is not None and st.version is not None
        run = _Run(record=st, slot=st.slot)
        steps: Mapping[State, Callable[[_Run], _Move]] = {
            State.DOWNLOADING: self._step_download,
            State.VERIFYING: self._step_verify,
            State.STAGED: self._step_start_trial,
            State.TRIAL: self._step_trial,
            State.COMMITTED: self._step_report_commit,
        }
        while (step := steps.get(run.record.state)) is not None:
            move: _Move | None = None
            try:
                move = step(run)
                run.record = self._persist(run.record, move.event, **move.changes)
            except IllegalTransition:
                raise  # a bug, not a property of the update
            except (_Rollback, OtaError, ManifestError, ModelError, OSError) as e:
                if run.record.state is State.COMMITTED or (move is not None and move.event is Event.ACTIVATED):
                    raise  # `active` names the new slot already: the commit stands, and a restart finishes it
                run.record = self._roll_back(run.record, *_failure(e))
        st = run.record
        if st.state is State.ROLLED_BACK:
            return Outcome("rolled_back", st.model_id, st.reason, timings=run.timings)
        run.timings["total"] = time.monotonic() - started
        event(
            log,
            logging.INFO,
            "model committed",
            model=st.model_id,
            slot=st.slot,
            variant=run.variant,
            latency_ms=run.latency_ms,
        )
        return Outcome("committed", st.model_id, None, run.variant, run.latency_ms, run.timings)

    def _step_download(self, run: _Run) -> _Move:
        t = time.monotonic()
        run.manifest = self._download(run.record)
        run.timings["download"] = time.monotonic() - t
        return _Move(Event.DOWNLOADED)

    def _step_verify(self, run: _Run) -> _Move:
        manifest = self._checked_manifest(run)
        self.slots.write_manifest(run.slot, manifest, variant=manifest.quantization, point="stage")
        return _Move(Event.VERIFIED)

    def _step_start_trial(self, run: _Run) -> _Move:
        self._checked_manifest(run)
        return _Move(Event.TRIAL_STARTED, {"attempts": 1})

    def _step_trial(self, run: _Run) -> _Move:
        st = run.record
        if not run.checked:  # the run starts in trial: a crash interrupted the trial or what came after it
            record = self._switched_record(st)
            if record is not None:
                run.variant = record.variant
                return _Move(Event.ACTIVATED, {"reason": None, "variant": run.variant, "latency_ms": None})
            self._checked_manifest(run)
            # The candidate itself may be what killed the process.
            if st.attempts >= 2:
                raise _Rollback("trial_interrupted", f"the trial of {st.model_id} was interrupted twice")
            run.record = self._save(st, attempts=st.attempts + 1)
        manifest = self._checked_manifest(run)
        t = time.monotonic()
        result = self._trial(run.slot, manifest)
        run.timings["trial"] = time.monotonic() - t
        _faults.checkpoint("trial.passed")
        t = time.monotonic()
        # The committed manifest goes first: `active` may only ever name a slot that says it is committed.
        self.slots.write_manifest(run.slot, manifest, variant=result.variant, committed_at=self.clock(), point="commit")
        self.slots.activate(run.slot)
        run.timings["commit"] = time.monotonic() - t
        run.result, run.variant, run.latency_ms = result, result.variant, round(result.latency_ms, 4)
        return _Move(Event.ACTIVATED, {"reason": None, "variant": run.variant, "latency_ms": run.latency_ms})

    def _step_report_commit(self, run: _Run) -> _Move:
        # A restart that only finishes the commit has no trial result: the service loads the active model anyway.
        if run.result is not None and self.on_commit is not None:
            self._call_hook("on_commit", self.on_commit, run.result, self.slots.active())
        _faults.checkpoint("commit.on_commit_done")
        return _Move(Event.DONE)

    def _checked_manifest(self, run: _Run) -> ModelManifest:
        """The release in the slot, its files verified once per run (a resumed run reads it from the slot first)."""
        st = run.record
        if run.manifest is None:
            manifest = self.slots.read_record(run.slot).manifest
            if manifest.model_id != st.model_id:
                raise _Rollback("slot_invalid", f"slot {run.slot} holds {manifest.model_id}, not {st.model_id}")
            run.manifest = manifest
        if not run.checked:
            t = time.monotonic()
            self._verify(run.slot, run.manifest)
            run.timings["verify"] = time.monotonic() - t
            run.checked = True
        return run.manifest

    def _download(self, st: UpdateState) -> ModelManifest:
        assert st.slot is not None and st.name is not None and st.version is not None
        slot = st.slot
        if slot == self.slots.active_slot():
            raise _Rollback("slot_invalid", f"slot {slot} is active; refusing to write it")
        self.trust.refresh()
        manifest = self.trust.release(st.name, st.version)
        if manifest.model_id != st.model_id:
            raise UpdateRejected(
                "bad_metadata", f"asked for {st.model_id}, the repository described {manifest.model_id}"
            )
        try:
            same = self.slots.read_record(slot).manifest == manifest
        except SlotInvalid:
            same = False
        if not same:
            # Mark before write: the slot says "being written" before its first byte changes.
            self.slots.clear(slot)
            self.slots.write_manifest(slot, manifest)
        slot_dir = self.slots.slot_dir(slot)
        for file, (target, sha256, length) in release_files(manifest).items():
            dest = slot_dir / file
            if _complete(dest, sha256, length):
                continue  # fetched before a restart: only the rest is transferred
            self.trust.fetch(target, dest, expected_sha256=sha256, progress=_progress_points(file == MODEL_FILE))
            if file == MODEL_FILE:
                _faults.checkpoint("download.model_done")
        return manifest

    def _verify(self, slot: SlotName, manifest: ModelManifest) -> None:
        from edge.ota.trial import check_requires, installed_versions  # noqa: PLC0415

        slot_dir = self.slots.slot_dir(slot)
        for file, (_, sha256, length) in release_files(manifest).items():
            if not _complete(slot_dir / file, sha256, length):
                raise UpdateRejected("hash_mismatch", f"{manifest.model_id}: {file} in slot {slot} does not match")
        check_requires(manifest.requires, installed_versions())

    def _trial(self, slot: SlotName, manifest: ModelManifest) -> TrialResult:
        slot_dir = self.slots.slot_dir(slot)
        files: dict[str, Path] = {manifest.quantization: slot_dir / MODEL_FILE}
        if manifest.float_variant is not None:
            files["float"] = slot_dir / FLOAT_FILE
        golden = None
        if manifest.golden is not None:
            from edge.ota.trial import load_golden  # noqa: PLC0415 -- the trial's module loads the model runtime

            golden = load_golden(slot_dir / GOLDEN_FILE, input_info=manifest.input)
        return self.trial(manifest, files, golden, threads=self.threads)

    def _roll_back(self, st: UpdateState, reason: str, detail: str) -> UpdateState:
        reason = reason if _REASON.fullmatch(reason) else "ota_error"
        model_id = st.model_id
        failed = st.failed if reason in TRANSIENT_REASONS or model_id is None else st.failed | {model_id}
        event(log, logging.WARNING, "update rolled back", model=model_id, reason=reason, detail=detail[:500])
        st = self._persist(st, Event.FAILED, reason=reason, failed=failed)
        self._clean_after_rollback(st)
        return st

    def _clean_after_rollback(self, st: UpdateState) -> None:
        # A transient failure keeps the slot's complete files: the retry then fetches only what is missing.
        if st.slot is not None and st.slot != self.slots.active_slot() and st.reason not in TRANSIENT_REASONS:
            self.slots.clear(st.slot)
        _faults.checkpoint("rollback.slot_cleared")

    # -- recovery ----------------------------------------------------------------------------------------------------

    def _recover(self, st: UpdateState) -> Outcome | None:
        if st.state in ACTIVE_STATES:
            event(log, logging.WARNING, "resuming an interrupted update", model=st.model_id, state=st.state.value)
            self._from = self._previous_id(st)
            return self._run(st, time.monotonic())
        if st.state is State.COMMITTED:
            self._persist(st, Event.DONE)
        elif st.state is State.ROLLED_BACK:
            self._clean_after_rollback(st)
            active = self.slots.active()
            if active.manifest is not None and active.manifest.model_id in st.failed:
                # A revert interrupted between persisting it and switching the link: finish it.
                now_active = self._switch_away(active.slot, st.failed)  # type: ignore[arg-type]
                if self.on_revert is not None:
                    self._call_hook("on_revert", self.on_revert, now_active)
        return None

    def _switched_record(self, st: UpdateState) -> SlotRecord | None:
        """The slot's committed record when a crash came after ``active`` was switched to it (the commit stands)."""
        if st.slot is None or self.slots.active_slot() != st.slot:
            return None
        try:
            record = self.slots.validate(st.slot)
        except SlotInvalid:
            return None
        return record if record.committed_at is not None and record.manifest.model_id == st.model_id else None

    # -- helpers -----------------------------------------------------------------------------------------------------

    def _switch_away(self, slot: SlotName, failed: frozenset[str]) -> ActiveModel:
        other: SlotName = "b" if slot == "a" else "a"
        try:
            record = self.slots.validate(other)
            usable = record.committed_at is not None and record.manifest.model_id not in failed
        except SlotInvalid:
            usable = False
        if usable:
            self.slots.activate(other)
        else:
            self.slots.activate_factory()
        now_active = self.slots.active()
        event(log, logging.WARNING, "model reverted", model=self._model_id(now_active), slot=now_active.slot)
        return now_active

    def _settled(self) -> UpdateState:
        """The persisted state after finishing (or rolling back) an update a crash interrupted."""
        st, _ = self._load()
        if st.state in ACTIVE_STATES:
            self._recover(st)
            st, _ = self._load()
        return st

    def _load(self) -> tuple[UpdateState, Outcome | None]:
        """The persisted state; a corrupt file becomes ``rolled_back`` / ``corrupt_state`` (active model kept)."""
        try:
            return self.state_file.load(), None
        except StateCorrupt as e:
            event(log, logging.ERROR, "OTA state file corrupt; keeping the active model", error=str(e))
            st = UpdateState(state=State.ROLLED_BACK, reason="corrupt_state", updated_at=self.clock())
            self.state_file.save(st)
            self._emit("ota.rolled_back", st, {})
            return st, Outcome("rolled_back", None, "corrupt_state")

    def _persist(self, st: UpdateState, on: Event, *, kind: str | None = None, **changes: Any) -> UpdateState:
        """Check ``on`` against the table, persist and report the transition (``variant``/``latency_ms`` go to the
        event only)."""
        extra: dict[str, EventValue] = {k: changes.pop(k) for k in ("variant", "latency_ms") if k in changes}
        new = transition(st, on, now=self.clock(), **changes)
        self.state_file.save(new)
        self._emit(kind or f"ota.{new.state.value}", new, extra)
        return new

    def _save(self, st: UpdateState, **changes: Any) -> UpdateState:
        """Persist a change within the same state (the trial attempt counter)."""
        from dataclasses import replace  # noqa: PLC0415

        new = replace(st, updated_at=self.clock(), **changes)
        self.state_file.save(new)
        return new

    def _emit(self, kind: str, st: UpdateState, extra: Mapping[str, EventValue]) -> None:
        data: dict[str, EventValue] = {
            "model": st.name,
            "version": st.version,
            "from": self._from,
            "slot": st.slot,
            "reason": st.reason,
            "rollout": st.rollout,
            **extra,
        }
        try:
            self.emit(kind, data)
        except Exception as e:  # reporting must never break an install half-way
            event(log, logging.ERROR, "OTA event not reported", kind=kind, error=f"{type(e).__name__}: {e}")

    def _refuse(self, name: str, version: str, reason: str, rollout: str | None) -> Outcome:
        event(log, logging.INFO, "update refused", model=f"{name}@{version}", reason=reason)
        data: dict[str, EventValue] = {
            "model": name,
            "version": version,
            "from": self._from,
            "slot": None,
            "reason": reason,
            "rollout": rollout,
        }
        try:
            self.emit("ota.refused", data)
        except Exception as e:  # as in _emit
            event(log, logging.ERROR, "OTA event not reported", kind="ota.refused", error=str(e))
        return Outcome("refused", f"{name}@{version}", reason)

    def _call_hook(self, name: str, hook: Callable[..., None], *args: Any) -> None:
        try:
            hook(*args)
        except Exception as e:  # the model is committed on disk; a restart loads it anyway
            event(log, logging.ERROR, f"{name} failed", error=f"{type(e).__name__}: {e}")

    def _not_newer(self, active: ActiveModel, name: str, version: str) -> bool:
        active_id = self._model_id(active)
        if active_id is None or "@" not in active_id:
            return False
        active_name, active_version = active_id.split("@", 1)
        if active_name != name:
            return False
        try:
            return version_key(version) <= version_key(active_version)
        except (OtaError, ManifestError):
            return False  # the factory model's version is not a release version: anything is newer

    def _model_id(self, active: ActiveModel) -> str | None:
        if active.manifest is not None:
            return active.manifest.model_id
        if self._factory_id is None:
            from edge.inference.model import Model  # noqa: PLC0415 -- onnxruntime, only when the factory runs

            try:
                self._factory_id = Model(active.path, warmup=0).model_id
            except ModelError as e:
                event(log, logging.ERROR, "factory model unreadable", error=str(e))
                return None
        return self._factory_id

    def _previous_id(self, st: UpdateState) -> str | None:
        if st.previous in ("a", "b"):
            try:
                return self.slots.read_record(st.previous).manifest.model_id
            except SlotInvalid:
                return None
        return self._model_id(ActiveModel("factory", self.slots.factory, None, ""))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock = self.data_dir / "ota" / "lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as e:
                raise UpdaterBusy("another process is updating the model") from e
            yield
        finally:
            os.close(fd)


def _complete(path: Path, sha256: str, length: int) -> bool:
    """Whether ``path`` exists with exactly this length and SHA-256."""
    try:
        return path.stat().st_size == length and file_sha256(path) == sha256
    except FileNotFoundError:
        return False


def _progress_points(primary: bool) -> Progress | None:
    """A progress callback with the download fault points (first chunk, half of the bytes) for the primary file."""
    if not primary:
        return None

    def progress(received: int, total: int) -> None:
        if received > 0:
            _faults.checkpoint("download.first_chunk")
        if total > 0 and received * 2 >= total:
            _faults.checkpoint("download.progress")

    return progress
