"""The updater's state machine: states, events, the (state, event) -> state table, the persisted record and its codec.

Rules (the whole protocol; :data:`TRANSITIONS` holds exactly these, and :func:`next_state` enforces them):

- An update runs ``idle -> downloading -> verifying -> staged -> trial -> committed -> idle``, one event per step:
  ``start``, ``downloaded``, ``verified``, ``trial_started``, ``activated``, ``done``.
- ``failed`` ends any step before the ``active`` switch in ``rolled_back`` (the active model untouched, the staging
  slot cleared). ``committed`` has no ``failed`` exit: once ``active`` names the new slot, the commit stands, and a
  restart finishes it.
- A new update may ``start`` from ``idle``, ``committed`` or ``rolled_back``; ``done`` takes the last two to ``idle``.
- ``revert`` (``idle -> rolled_back``) is the fleet's revert of the committed model.
- A pair the table lacks is a bug and raises :class:`~edge.ota.errors.IllegalTransition` naming the state and event.

States are persisted by their value (``"rolled_back"``), so the state file written before the table had events
still loads. The core (:func:`next_state`, :func:`transition`, :func:`encode`, :func:`decode`) is sans-IO;
:class:`StateFile` alone touches the disk, through :func:`edge._fs.atomic_write` with a fault point after the temp
file is written and after the rename.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, Literal, cast

from edge._fs import atomic_write
from edge.errors import InputError
from edge.ota import _faults
from edge.ota.errors import IllegalTransition, OtaError

__all__ = [
    "ACTIVE_STATES",
    "STATES",
    "TRANSITIONS",
    "Event",
    "State",
    "StateCorrupt",
    "StateFile",
    "UpdateState",
    "decode",
    "encode",
    "next_state",
    "transition",
]


class State(StrEnum):
    """Where an update is; the value is what the state file and the ``ota.<state>`` telemetry events say."""

    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGED = "staged"
    TRIAL = "trial"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"


class Event(StrEnum):
    """What happened: the outcome of one step of the updater, or a request from outside (``start``, ``revert``)."""

    START = "start"
    DOWNLOADED = "downloaded"
    VERIFIED = "verified"
    TRIAL_STARTED = "trial_started"
    ACTIVATED = "activated"
    DONE = "done"
    FAILED = "failed"
    REVERT = "revert"


Previous = Literal["a", "b", "factory"]
SlotName = Literal["a", "b"]

STATES: Final[tuple[State, ...]] = tuple(State)

TRANSITIONS: Final[Mapping[tuple[State, Event], State]] = {
    # The update, step by step.
    (State.IDLE, Event.START): State.DOWNLOADING,
    (State.DOWNLOADING, Event.DOWNLOADED): State.VERIFYING,
    (State.VERIFYING, Event.VERIFIED): State.STAGED,
    (State.STAGED, Event.TRIAL_STARTED): State.TRIAL,
    (State.TRIAL, Event.ACTIVATED): State.COMMITTED,
    (State.COMMITTED, Event.DONE): State.IDLE,
    # A failure before the switch of `active`.
    (State.DOWNLOADING, Event.FAILED): State.ROLLED_BACK,
    (State.VERIFYING, Event.FAILED): State.ROLLED_BACK,
    (State.STAGED, Event.FAILED): State.ROLLED_BACK,
    (State.TRIAL, Event.FAILED): State.ROLLED_BACK,
    (State.ROLLED_BACK, Event.DONE): State.IDLE,
    # The next update need not wait for an outcome to be put to rest.
    (State.COMMITTED, Event.START): State.DOWNLOADING,
    (State.ROLLED_BACK, Event.START): State.DOWNLOADING,
    # The fleet's revert of the committed model.
    (State.IDLE, Event.REVERT): State.ROLLED_BACK,
}

#: States in the middle of an update: a restart must continue or roll back from them.
ACTIVE_STATES: Final[frozenset[State]] = frozenset({State.DOWNLOADING, State.VERIFYING, State.STAGED, State.TRIAL})

SCHEMA: Final = 1
MAX_STATE_BYTES: Final = 1 << 20
_MODEL_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}@[0-9][0-9.]{0,43}")
_REASON = re.compile(r"[a-z0-9_]{1,64}")
_KEYS: Final = frozenset(
    {"schema", "state", "name", "version", "slot", "previous", "reason", "attempts", "rollout", "failed", "updated_at"}
)


class StateCorrupt(OtaError, InputError):  # noqa: N818 -- names the condition, like IllegalTransition
    """The persisted state file cannot be read or does not decode; the updater keeps the active model."""

    reason = "corrupt_state"


@dataclass(frozen=True, slots=True)
class UpdateState:
    """The updater's persisted record.

    Attributes:
        state: where the update is.
        name, version: the model being installed (or last installed / rolled back); None when idle from the start.
        slot: the slot being written ("a" or "b"), or None.
        previous: what was active when the update started: "a", "b" or "factory".
        reason: why the last update rolled back (or was reverted), else None.
        attempts: trial attempts of the current update (a second interrupted trial rolls back).
        rollout: the fleet's rollout id that asked for the update, or None.
        failed: model ids ("name@version") that failed and are not retried unless forced.
        updated_at: epoch seconds of the last transition.
    """

    state: State = State.IDLE
    name: str | None = None
    version: str | None = None
    slot: SlotName | None = None
    previous: Previous | None = None
    reason: str | None = None
    attempts: int = 0
    rollout: str | None = None
    failed: frozenset[str] = field(default_factory=frozenset)
    updated_at: float = 0.0

    @property
    def model_id(self) -> str | None:
        """``name@version`` of the model this record is about, or None."""
        return f"{self.name}@{self.version}" if self.name and self.version else None


def next_state(state: State, event: Event) -> State:
    """The state that ``event`` leads to from ``state``, by :data:`TRANSITIONS`.

    Args:
        state: where the update is.
        event: what happened.

    Returns:
        The next state.

    Raises:
        IllegalTransition: the table has no entry for ``(state, event)``.
    """
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise IllegalTransition(f"illegal OTA transition: event {event} in state {state}") from None


def transition(current: UpdateState, event: Event, *, now: float, **changes: Any) -> UpdateState:
    """The record after ``event`` in ``current.state`` (with other fields changed as given).

    Args:
        current: the record now.
        event: what happened.
        now: the time of the transition (epoch seconds).
        **changes: other :class:`UpdateState` fields to set.

    Returns:
        The new record (nothing is persisted here).

    Raises:
        IllegalTransition: the table has no entry for ``(current.state, event)``.
    """
    return replace(current, state=next_state(current.state, event), updated_at=now, **changes)


def encode(state: UpdateState) -> bytes:
    """The record as canonical JSON bytes (sorted keys; ``failed`` sorted)."""
    body = {
        "schema": SCHEMA,
        "state": state.state.value,
        "name": state.name,
        "version": state.version,
        "slot": state.slot,
        "previous": state.previous,
        "reason": state.reason,
        "attempts": state.attempts,
        "rollout": state.rollout,
        "failed": sorted(state.failed),
        "updated_at": state.updated_at,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def decode(data: bytes) -> UpdateState:
    """Parse a record strictly: exact keys, exact types, known states.

    Raises:
        StateCorrupt: anything is malformed (the message says what).
    """
    if len(data) > MAX_STATE_BYTES:
        raise StateCorrupt(f"state file is {len(data)} bytes, more than {MAX_STATE_BYTES}")
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise StateCorrupt(f"state file is not JSON: {e}") from e
    if not isinstance(body, dict):
        raise StateCorrupt("state file must hold a JSON object")
    keys = set(body)
    if keys != _KEYS:
        raise StateCorrupt(f"state file keys: missing {sorted(_KEYS - keys)}, unknown {sorted(keys - _KEYS)}")
    if body["schema"] != SCHEMA:
        raise StateCorrupt(f"state file schema {body['schema']!r}, expected {SCHEMA}")
    if body["state"] not in STATES:
        raise StateCorrupt(f"unknown state {body['state']!r:.40}")
    state = State(body["state"])
    name, version = _opt_text(body, "name", 64), _opt_text(body, "version", 44)
    if (name is None) != (version is None):
        raise StateCorrupt("state file name and version must both be set or both be null")
    slot = body["slot"]
    if slot not in (None, "a", "b"):
        raise StateCorrupt(f"slot must be 'a', 'b' or null, got {slot!r:.40}")
    previous = body["previous"]
    if previous not in (None, "a", "b", "factory"):
        raise StateCorrupt(f"previous must be 'a', 'b', 'factory' or null, got {previous!r:.40}")
    reason = _opt_text(body, "reason", 64)
    if reason is not None and not _REASON.fullmatch(reason):
        raise StateCorrupt(f"reason must be a snake_case word, got {reason!r:.70}")
    attempts = body["attempts"]
    if isinstance(attempts, bool) or not isinstance(attempts, int) or not 0 <= attempts <= 100:
        raise StateCorrupt(f"attempts must be an integer in [0, 100], got {attempts!r:.40}")
    failed = body["failed"]
    if not isinstance(failed, list) or len(failed) > 10_000:
        raise StateCorrupt("failed must be a list of at most 10000 model ids")
    for item in failed:
        if not isinstance(item, str) or not _MODEL_ID.fullmatch(item):
            raise StateCorrupt(f"failed holds {item!r:.80}, not a name@version model id")
    updated_at = body["updated_at"]
    if isinstance(updated_at, bool) or not isinstance(updated_at, int | float) or not math.isfinite(updated_at):
        raise StateCorrupt(f"updated_at must be a finite number, got {updated_at!r:.40}")
    if state in ACTIVE_STATES and (name is None or slot is None or previous is None):
        raise StateCorrupt(f"state {state} needs name, version, slot and previous")
    return UpdateState(
        state=state,
        name=name,
        version=version,
        slot=cast("SlotName | None", slot),
        previous=cast("Previous | None", previous),
        reason=reason,
        attempts=attempts,
        rollout=_opt_text(body, "rollout", 128),
        failed=frozenset(failed),
        updated_at=float(updated_at),
    )


def _opt_text(body: Mapping[str, Any], key: str, limit: int) -> str | None:
    v = body[key]
    if v is None:
        return None
    if not isinstance(v, str) or not 0 < len(v) <= limit or not v.isprintable():
        raise StateCorrupt(f"{key} must be printable text of 1 to {limit} characters or null, got {v!r:.80}")
    return v


class StateFile:
    """The record on disk (``<data>/ota/state.json``), written atomically at every transition.

    Args:
        path: the state file; its directory is created when missing.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> UpdateState:
        """The persisted record, or a fresh idle one when there is none yet.

        Raises:
            StateCorrupt: the file exists but is unreadable or malformed.
        """
        self._remove_stale_temps()
        try:
            with self.path.open("rb") as f:
                data = f.read(MAX_STATE_BYTES + 1)  # bounded: decode refuses more, and a huge file is never loaded
        except FileNotFoundError:
            return UpdateState()
        except OSError as e:
            raise StateCorrupt(f"cannot read {self.path}: {e}") from e
        return decode(data)

    def save(self, state: UpdateState) -> None:
        """Persist ``state`` atomically and durably (fault points ``state.<state>.written`` / ``.renamed``)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        written, renamed = _faults.state_points(state.state.value)
        points = {"written": written, "renamed": renamed}
        atomic_write(self.path, encode(state), checkpoint=lambda step: _faults.checkpoint(points[step]))

    def _remove_stale_temps(self) -> None:
        # A process killed between writing and renaming leaves its temp file; it was never the state.
        if not self.path.parent.is_dir():
            return
        for tmp in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
