"""Staged model rollouts: the planner (sans-IO). It takes a rollout, the OTA events the store holds and the time,
and returns the next rollout and the commands to send; ``edge.fleet.rollout.driver`` does the I/O.

The rules:

- A rollout updates model ``name`` to ``version`` on a fixed list of devices, ordered by sha256(rollout id + device
  id) (deterministic, and a different sample for every rollout). Stage k covers the first ceil(stages[k] x N)
  devices (at least 1); the last stage is 100 %.
- The devices of the current stage that were not commanded yet get ``models/update`` {name, version, rollout,
  force}. ``commanded_at`` is recorded in the returned rollout, which the driver persists *before* it publishes, so
  a crash never sends a command the rollout does not know about. The driver then reports a confirmed publish with
  ``mark_sent``; a command whose publish was not confirmed is sent again on the next plan (boxes apply
  ``models/update`` idempotently per (name, version), so a duplicate is harmless).
- Outcomes come from the boxes' signed OTA events (``DeviceEvent``) about (name, version) received at or after the
  device's command (gateway clock): ``ota.committed`` is success (a box already running the version answers with
  it again), ``ota.rolled_back`` and ``ota.refused`` are failures (reason from the event). An event naming another
  rollout id is ignored. A device without an outcome ``device_timeout_s`` after its command was sent is
  ``timed_out``; an event arriving later still records the real outcome.
- Abort: when failed + timed_out among the devices commanded so far reach ``abort_on`` x commanded (at least one
  failure): with 5 %, one failure among 20 or fewer commanded devices aborts. The operator may abort too
  (``abort``). An aborted rollout commands nothing new; every device that committed the version in this rollout
  (also one that commits after the abort) gets ``models/rollback`` {name, version (the one to leave), rollout}.
- A stage succeeds when each of its devices has an outcome and the threshold is not reached: the next stage starts
  at once; after the last one the rollout is ``completed``.
- ``finished_at`` is set once nothing is left to do (every device whose command was sent has an outcome, every
  rollback was sent); the driver then stops driving it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from edge.fleet.errors import GatewayInputError
from edge.fleet.store import DeviceEvent
from edge.identity.errors import InvalidDeviceIdError
from edge.identity.keys import validate_device_id
from edge.wire.errors import ManifestError
from edge.wire.manifest import validate_name, version_key

__all__ = [
    "DEFAULT_ABORT_ON",
    "DEFAULT_DEVICE_TIMEOUT_S",
    "FAILURE_KINDS",
    "RUNNING",
    "SUCCESS_KIND",
    "Command",
    "DeviceEntry",
    "Rollout",
    "RolloutConflictError",
    "RolloutError",
    "abort",
    "mark_sent",
    "new_rollout",
    "order_devices",
    "parse_percent",
    "parse_stages",
    "plan",
    "stage_sizes",
    "summary",
]

SCHEMA: Final = 1
RUNNING: Final = "running"
COMPLETED: Final = "completed"
ABORTED: Final = "aborted"
STATES: Final = (RUNNING, COMPLETED, ABORTED)
COMMITTED: Final = "committed"
FAILED: Final = "failed"
TIMED_OUT: Final = "timed_out"
OUTCOMES: Final = (COMMITTED, FAILED, TIMED_OUT)
# What ``summary`` says of a device without an outcome that was never commanded.
WAITING: Final = "waiting"
SKIPPED: Final = "skipped"
SUCCESS_KIND: Final = "ota.committed"
FAILURE_KINDS: Final = frozenset({"ota.rolled_back", "ota.refused"})
UPDATE: Final = "models/update"
ROLLBACK: Final = "models/rollback"
DEFAULT_ABORT_ON: Final = 0.05
DEFAULT_DEVICE_TIMEOUT_S: Final = 900.0
MAX_STAGES: Final = 20
_PPM: Final = 1_000_000  # fractions are compared in integer parts per million: 1/20 is exactly 5 %
_ID = re.compile(r"[0-9a-f]{4,32}")
_PERCENT = re.compile(r"(100|[0-9]{1,2})(\.[0-9]{1,4})?%?")
_MAX_REASON: Final = 256


class RolloutError(GatewayInputError):
    """A rollout argument or rollout file is invalid (bad stages, name, version, devices, or a corrupt file)."""


class RolloutConflictError(GatewayInputError):
    """The request conflicts with the rollouts' state: one is already running, or none is."""


@dataclass(frozen=True, slots=True)
class Command:
    """A command the driver signs and publishes to one device.

    Attributes:
        device_id: the device.
        name: ``models/update`` or ``models/rollback``.
        args: the command's arguments.
    """

    device_id: str
    name: str
    args: Mapping[str, str | bool]


@dataclass(frozen=True, slots=True)
class DeviceEntry:
    """One device of a rollout (times are the gateway's clock).

    Attributes:
        device_id: the device.
        commanded_at: when ``models/update`` was first planned for it, None before.
        sent_at: when its latest publish was confirmed by the broker, None if not (yet).
        outcome: ``committed``, ``failed`` or ``timed_out``; None while pending.
        reason: the failure's reason as the box reported it, or why it timed out.
        outcome_at: when the outcome was recorded.
        rollback_at: when ``models/rollback`` was planned for it (after an abort), None if never.
        rollback_sent_at: when that publish was confirmed.
    """

    device_id: str
    commanded_at: float | None = None
    sent_at: float | None = None
    outcome: str | None = None
    reason: str | None = None
    outcome_at: float | None = None
    rollback_at: float | None = None
    rollback_sent_at: float | None = None


@dataclass(frozen=True, slots=True)
class Rollout:
    """A rollout and where it stands.

    Attributes:
        id: short lower-case hex.
        name: the model name.
        version: the version to install.
        stages: increasing fractions of the devices, the last 1.0.
        abort_on: the failure rate (0..1) at which it aborts.
        created_at: when it was started (gateway clock); events before it are never read.
        devices: the devices in rollout order.
        force: sent as the update's ``force`` (retry a version the box refused before).
        state: ``running``, ``completed`` or ``aborted``.
        stage: the index of the current stage.
        reason: why it aborted (``threshold: ...`` or ``operator``), else None.
        finished_at: when nothing was left to do, else None.
    """

    id: str
    name: str
    version: str
    stages: tuple[float, ...]
    abort_on: float
    created_at: float
    devices: tuple[DeviceEntry, ...]
    force: bool = False
    state: str = RUNNING
    stage: int = 0
    reason: str | None = None
    finished_at: float | None = None

    def encode(self) -> bytes:
        """The rollout as JSON (what ``decode`` reads back)."""
        body: dict[str, Any] = {"schema": SCHEMA, **dataclasses.asdict(self)}
        body["stages"] = list(self.stages)
        body["devices"] = [dataclasses.asdict(d) for d in self.devices]
        return (json.dumps(body, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes) -> Rollout:
        """Parse and check a rollout file strictly.

        Args:
            data: the file's bytes.

        Returns:
            The rollout.

        Raises:
            RolloutError: not JSON, a missing or unknown key, a wrong type, or values that break the invariants.
        """
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise RolloutError(f"rollout file is not JSON: {e}") from e
        _keys(body, {"schema", *(f.name for f in dataclasses.fields(cls))}, "rollout")
        if body["schema"] != SCHEMA or type(body["schema"]) is not int:
            raise RolloutError(f"rollout file schema {body['schema']!r:.20}, this code reads {SCHEMA}")
        if type(body["devices"]) is not list:
            raise RolloutError("rollout devices must be a list")
        devices = tuple(_device_entry(d) for d in body["devices"])
        rollout = cls(
            id=_str(body["id"], "id"),
            name=_str(body["name"], "name"),
            version=_str(body["version"], "version"),
            stages=tuple(_num(s, "stages") for s in _list(body["stages"], "stages")),
            abort_on=_num(body["abort_on"], "abort_on"),
            created_at=_num(body["created_at"], "created_at"),
            devices=devices,
            force=_bool(body["force"], "force"),
            state=_str(body["state"], "state"),
            stage=_int(body["stage"], "stage"),
            reason=_opt(body["reason"], _str, "reason"),
            finished_at=_opt(body["finished_at"], _num, "finished_at"),
        )
        _check(rollout)
        return rollout

    def stage_size(self, k: int) -> int:
        """How many devices (from the front of ``devices``) stage ``k`` covers."""
        return stage_sizes(len(self.devices), self.stages)[k]


# -- creating -------------------------------------------------------------------------------------------------------


def parse_percent(text: str, what: str = "percentage") -> float:
    """``"5%"`` (or ``"5"``, ``"2.5%"``) as a fraction in 0..1.

    Raises:
        RolloutError: not a percentage from 0 to 100.
    """
    if not isinstance(text, str) or _PERCENT.fullmatch(text.strip()) is None:
        raise RolloutError(f"{what} {text!r:.40}: expected a percentage like 5% (0..100)")
    value = float(text.strip().rstrip("%")) / 100
    if value > 1:
        raise RolloutError(f"{what} {text!r}: more than 100%")
    return value


def parse_stages(text: str) -> tuple[float, ...]:
    """``"10%,50%,100%"`` as fractions; checked as ``new_rollout`` checks them.

    Raises:
        RolloutError: not a comma-separated list of increasing percentages ending at 100%.
    """
    stages = tuple(parse_percent(s, "stage") for s in str(text).split(","))
    _check_stages(stages)
    return stages


def order_devices(rollout_id: str, device_ids: Iterable[str]) -> tuple[str, ...]:
    """The devices in rollout order: sorted by sha256(rollout id + device id), then id (a stable tie-break)."""
    return tuple(sorted(set(device_ids), key=lambda d: (hashlib.sha256((rollout_id + d).encode()).digest(), d)))


def stage_sizes(n: int, stages: Sequence[float]) -> tuple[int, ...]:
    """Devices covered by each stage: ceil(fraction x n), at least 1, at most n (integer math in ppm)."""
    return tuple(min(n, max(1, -(-round(s * _PPM) * n // _PPM))) for s in stages)


def new_rollout(
    rollout_id: str,
    name: str,
    version: str,
    stages: Sequence[float],
    device_ids: Iterable[str],
    *,
    now: float,
    abort_on: float = DEFAULT_ABORT_ON,
    force: bool = False,
) -> Rollout:
    """A new running rollout at stage 0 with nothing commanded (``plan`` sends the first commands).

    Args:
        rollout_id: short lower-case hex (4..32 characters).
        name: the model name.
        version: the version to install.
        stages: increasing fractions (0 < s <= 1), the last 1.0.
        device_ids: the eligible devices (at least one; duplicates are dropped).
        now: the creation time (gateway clock).
        abort_on: the failure rate that aborts (0..1).
        force: ask boxes to retry a version they refused before.

    Returns:
        The rollout, its devices in rollout order.

    Raises:
        RolloutError: an argument is invalid, or there are no devices.
    """
    order = order_devices(rollout_id, device_ids)
    rollout = Rollout(
        id=rollout_id,
        name=name,
        version=version,
        stages=tuple(float(s) for s in stages),
        abort_on=float(abort_on),
        created_at=float(now),
        devices=tuple(DeviceEntry(d) for d in order),
        force=force,
    )
    _check(rollout)
    return rollout


# -- planning -------------------------------------------------------------------------------------------------------


def plan(
    rollout: Rollout,
    events: Iterable[DeviceEvent],
    now: float,
    *,
    device_timeout_s: float = DEFAULT_DEVICE_TIMEOUT_S,
) -> tuple[Rollout, list[Command]]:
    """One step: record outcomes and timeouts, abort or advance, and say what to send.

    Args:
        rollout: the rollout as persisted.
        events: OTA events received since the rollout's creation (any order; others are ignored).
        now: the gateway's clock.
        device_timeout_s: how long a device may take to report an outcome after its command was sent.

    Returns:
        The new rollout (persist it before sending anything) and the commands to send.
    """
    if rollout.finished_at is not None:
        return rollout, []
    devices = _apply_events(rollout, events)
    devices = [_timeout(d, now, device_timeout_s) for d in devices]
    r = dataclasses.replace(rollout, devices=tuple(devices))
    if r.state == RUNNING:
        reason = _threshold_passed(r)
        if reason is not None:
            r = dataclasses.replace(r, state=ABORTED, reason=reason)
    if r.state == RUNNING:
        r = _advance(r)
    commands: list[Command] = []
    out: list[DeviceEntry] = []
    size = r.stage_size(r.stage)
    for i, entry in enumerate(r.devices):
        d = entry
        if r.state == RUNNING and i < size and (d.commanded_at is None or (d.sent_at is None and d.outcome is None)):
            d = dataclasses.replace(d, commanded_at=d.commanded_at if d.commanded_at is not None else now)
            commands.append(Command(d.device_id, UPDATE, _update_args(r)))
        elif r.state == ABORTED and d.outcome == COMMITTED and d.rollback_sent_at is None:
            d = dataclasses.replace(d, rollback_at=d.rollback_at if d.rollback_at is not None else now)
            commands.append(Command(d.device_id, ROLLBACK, {"name": r.name, "version": r.version, "rollout": r.id}))
        out.append(d)
    r = dataclasses.replace(r, devices=tuple(out))
    # A command never confirmed sent cannot be waited for: the box may never have received it.
    if r.state != RUNNING and not commands and all(d.sent_at is None or d.outcome for d in r.devices):
        r = dataclasses.replace(r, finished_at=now)
    return r, commands


def mark_sent(rollout: Rollout, command: Command, at: float) -> Rollout:
    """Record that the broker confirmed the publish of ``command`` (so it is not sent again).

    Args:
        rollout: the rollout ``plan`` returned.
        command: one of the commands it returned.
        at: when the broker confirmed it.

    Returns:
        The rollout with the device's ``sent_at`` (update) or ``rollback_sent_at`` (rollback) set.
    """

    def sent(d: DeviceEntry) -> DeviceEntry:
        if d.device_id != command.device_id:
            return d
        return (
            dataclasses.replace(d, sent_at=at)
            if command.name == UPDATE
            else dataclasses.replace(d, rollback_sent_at=at)
        )

    devices = tuple(sent(d) for d in rollout.devices)
    return dataclasses.replace(rollout, devices=devices)


def abort(rollout: Rollout, reason: str = "operator") -> Rollout:
    """Abort a running rollout on request; the next ``plan`` commands the rollbacks (and stamps them).

    Args:
        rollout: the rollout.
        reason: why (shown by ``status``).

    Returns:
        The aborted rollout.

    Raises:
        RolloutConflictError: it is not running (completed or aborted already).
    """
    if rollout.state != RUNNING:
        raise RolloutConflictError(f"rollout {rollout.id} is {rollout.state}, not running")
    return dataclasses.replace(rollout, state=ABORTED, reason=reason[:_MAX_REASON])


def summary(rollout: Rollout) -> dict[str, Any]:
    """What ``edge fleet rollout status --json`` prints: the rollout, counts per stage, each device's outcome.

    A device's ``outcome`` is ``waiting`` (not commanded yet), ``skipped`` (never commanded, and never will be: the
    rollout was aborted first), ``commanded`` (no outcome yet), or its outcome; ``rollback`` is None, ``pending``
    (planned, publish not confirmed) or ``sent``.
    """
    sizes = stage_sizes(len(rollout.devices), rollout.stages)
    stages = []
    lo = 0
    for k, (fraction, size) in enumerate(zip(rollout.stages, sizes, strict=True)):
        members = rollout.devices[lo:size]
        counts = dict.fromkeys((WAITING, SKIPPED, "commanded", *OUTCOMES), 0)
        for d in members:
            counts[_device_outcome(rollout, d)] += 1
        stages.append({"stage": k + 1, "percent": round(fraction * 100, 4), "devices": size, "new": len(members)}
                      | counts)  # fmt: skip
        lo = max(lo, size)
    devices = [
        {
            "device_id": d.device_id,
            "stage": next(k + 1 for k, s in enumerate(sizes) if i < s),
            "outcome": _device_outcome(rollout, d),
            "reason": d.reason,
            "commanded_at": d.commanded_at,
            "outcome_at": d.outcome_at,
            "rollback": None if d.rollback_at is None else ("sent" if d.rollback_sent_at is not None else "pending"),
        }
        for i, d in enumerate(rollout.devices)
    ]
    return {
        "id": rollout.id,
        "name": rollout.name,
        "version": rollout.version,
        "state": rollout.state,
        "reason": rollout.reason,
        "stage": rollout.stage + 1,
        "stages": stages,
        "abort_on_percent": round(rollout.abort_on * 100, 4),
        "created_at": rollout.created_at,
        "finished_at": rollout.finished_at,
        "devices": devices,
    }


# -- the rules ------------------------------------------------------------------------------------------------------


def _device_outcome(r: Rollout, d: DeviceEntry) -> str:
    if d.outcome is not None:
        return d.outcome
    if d.commanded_at is None:
        # An aborted rollout commands nothing new: its devices not reached yet never will be.
        return SKIPPED if r.state == ABORTED else WAITING
    return "commanded"


def _update_args(r: Rollout) -> dict[str, str | bool]:
    return {"name": r.name, "version": r.version, "rollout": r.id, "force": r.force}


def _apply_events(r: Rollout, events: Iterable[DeviceEvent]) -> list[DeviceEntry]:
    """The devices with the first outcome event about this release since their command (timed-out ones too)."""
    index = {d.device_id: i for i, d in enumerate(r.devices)}
    devices = list(r.devices)
    for e in sorted(events, key=lambda e: (e.received_at, e.device_id, e.counter)):
        i = index.get(e.device_id)
        if i is None or (e.kind != SUCCESS_KIND and e.kind not in FAILURE_KINDS):
            continue
        d = devices[i]
        if d.commanded_at is None or e.received_at < d.commanded_at or d.outcome in (COMMITTED, FAILED):
            continue
        data = e.data
        if data.get("model") != r.name or not _same_version(data.get("version"), r.version):
            continue
        if data.get("rollout") not in (None, r.id):
            continue
        if e.kind == SUCCESS_KIND:
            devices[i] = dataclasses.replace(d, outcome=COMMITTED, reason=None, outcome_at=e.received_at)
        else:
            why = data.get("reason")
            reason = f"{e.kind.removeprefix('ota.')}: {why}" if isinstance(why, str) else e.kind.removeprefix("ota.")
            devices[i] = dataclasses.replace(d, outcome=FAILED, reason=reason[:_MAX_REASON], outcome_at=e.received_at)
    return devices


def _same_version(got: object, want: str) -> bool:
    if not isinstance(got, str):
        return False
    try:
        return version_key(got) == version_key(want)
    except ManifestError:
        return False


def _timeout(d: DeviceEntry, now: float, timeout_s: float) -> DeviceEntry:
    if d.outcome is None and d.sent_at is not None and now - d.sent_at >= timeout_s:
        return dataclasses.replace(d, outcome=TIMED_OUT, reason=f"no outcome within {timeout_s:g} s", outcome_at=now)
    return d


def _threshold_passed(r: Rollout) -> str | None:
    commanded = sum(d.commanded_at is not None for d in r.devices)
    bad = sum(d.outcome in (FAILED, TIMED_OUT) for d in r.devices if d.commanded_at is not None)
    if bad and bad * _PPM >= round(r.abort_on * _PPM) * commanded:
        return f"threshold: {bad} of {commanded} commanded devices failed (abort at {r.abort_on * 100:g}%)"
    return None


def _advance(r: Rollout) -> Rollout:
    """Move past every stage whose devices all have an outcome; complete after the last."""
    stage = r.stage
    while True:
        size = r.stage_size(stage)
        if any(d.outcome is None for d in r.devices[:size]):
            return dataclasses.replace(r, stage=stage)
        if stage == len(r.stages) - 1:
            return dataclasses.replace(r, stage=stage, state=COMPLETED)
        stage += 1


# -- strict decoding ------------------------------------------------------------------------------------------------


def _check_stages(stages: Sequence[float]) -> None:
    if not 1 <= len(stages) <= MAX_STAGES:
        raise RolloutError(f"{len(stages)} stages: expected 1 to {MAX_STAGES}")
    if any(not (0 < s <= 1) for s in stages):
        raise RolloutError(f"stages {list(stages)}: each must be above 0% and at most 100%")
    if any(b <= a for a, b in itertools.pairwise(stages)):
        raise RolloutError(f"stages {list(stages)}: must increase")
    if round(stages[-1] * _PPM) != _PPM:
        raise RolloutError(f"stages {list(stages)}: the last stage must be 100%")


def _check(r: Rollout) -> None:
    if _ID.fullmatch(r.id) is None:
        raise RolloutError(f"rollout id {r.id!r:.40}: expected 4 to 32 lower-case hex digits")
    try:
        validate_name(r.name)
        version_key(r.version)
    except ManifestError as e:
        raise RolloutError(str(e)) from e
    _check_stages(r.stages)
    if not 0 <= r.abort_on <= 1:
        raise RolloutError(f"abort_on {r.abort_on}: expected 0..1")
    if not r.devices:
        raise RolloutError(f"rollout {r.id}: no devices")
    try:
        for d in r.devices:
            validate_device_id(d.device_id)
    except InvalidDeviceIdError as e:
        raise RolloutError(str(e)) from e
    if len({d.device_id for d in r.devices}) != len(r.devices):
        raise RolloutError(f"rollout {r.id}: a device is listed twice")
    if r.state not in STATES:
        raise RolloutError(f"rollout state {r.state!r:.40}: expected one of {', '.join(STATES)}")
    if not 0 <= r.stage < len(r.stages):
        raise RolloutError(f"rollout stage {r.stage}: expected 0..{len(r.stages) - 1}")
    for d in r.devices:
        if d.outcome is not None and d.outcome not in OUTCOMES:
            raise RolloutError(f"device {d.device_id}: outcome {d.outcome!r:.40} is not one of {', '.join(OUTCOMES)}")
        if d.commanded_at is None and (d.sent_at is not None or d.outcome is not None):
            raise RolloutError(f"device {d.device_id}: an outcome or publish without a command")


def _keys(body: object, want: set[str], what: str) -> dict[str, Any]:
    if type(body) is not dict:
        raise RolloutError(f"{what} must be a JSON object")
    if set(body) != want:
        missing, extra = sorted(want - set(body)), sorted(set(body) - want)[:5]
        raise RolloutError(f"{what} keys: missing {missing}, unknown {extra}")
    return body


def _device_entry(body: object) -> DeviceEntry:
    b = _keys(body, {f.name for f in dataclasses.fields(DeviceEntry)}, "rollout device")
    return DeviceEntry(
        device_id=_str(b["device_id"], "device_id"),
        commanded_at=_opt(b["commanded_at"], _num, "commanded_at"),
        sent_at=_opt(b["sent_at"], _num, "sent_at"),
        outcome=_opt(b["outcome"], _str, "outcome"),
        reason=_opt(b["reason"], _str, "reason"),
        outcome_at=_opt(b["outcome_at"], _num, "outcome_at"),
        rollback_at=_opt(b["rollback_at"], _num, "rollback_at"),
        rollback_sent_at=_opt(b["rollback_sent_at"], _num, "rollback_sent_at"),
    )


def _str(v: object, what: str) -> str:
    if type(v) is not str or len(v) > _MAX_REASON:
        raise RolloutError(f"rollout {what}: expected text of at most {_MAX_REASON} characters, got {v!r:.40}")
    return v


def _num(v: object, what: str) -> float:
    if type(v) not in (int, float):
        raise RolloutError(f"rollout {what}: expected a number, got {v!r:.40}")
    f = float(v)  # type: ignore[arg-type]
    if not math.isfinite(f) or f < 0:
        raise RolloutError(f"rollout {what}: expected a finite number >= 0, got {v!r:.40}")
    return f


def _int(v: object, what: str) -> int:
    if type(v) is not int:
        raise RolloutError(f"rollout {what}: expected an integer, got {v!r:.40}")
    return v


def _bool(v: object, what: str) -> bool:
    if type(v) is not bool:
        raise RolloutError(f"rollout {what}: expected true or false, got {v!r:.40}")
    return v


def _list(v: object, what: str) -> list[Any]:
    if type(v) is not list:
        raise RolloutError(f"rollout {what}: expected a list, got {v!r:.40}")
    return v


def _opt(v: object, conv: Any, what: str) -> Any:
    return None if v is None else conv(v, what)
