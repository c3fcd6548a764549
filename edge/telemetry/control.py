"""The box's command executor: what a verified fleet command may do, and the replies it gets.

Commands arrive on ``devices/<id>/commands`` as COSE_Sign1 messages signed by the fleet command key; the verifier
(``edge.wire.commands.CommandVerifier``) authenticates them before this module sees them. Here a verified
command is executed; the box then replies on ``devices/<id>/replies`` (QoS 1, not retained) with JSON:

- ``{"nonce": hex, "command": name, "ok": true, "result": {...}}``, or
- ``{"ok": false, "error": reason, "detail": text}`` (plus ``nonce`` and ``command`` when the command was
  authenticated before it was refused, so the gateway can match the reply).

Commands:

- ``ping``: ``{"pong": true, "ts": <box clock>}``.
- ``status``: re-publishes the retained status message now (fresh outbox backlog) and replies with it.
- ``set`` ``{"key": K, "value": V}``: changes a live setting. Only ``edge.config.LIVE_SETTINGS`` may change
  (``telemetry.batch_records``, ``telemetry.batch_age_s``, ``log.level``), each validated by the very converter the
  configuration file uses; another configuration key is ``not_live``, anything else ``unknown_key``; a bad value or
  missing argument is ``invalid_argument``. A live change lasts until the service restarts (the file is not
  rewritten: the configuration may be read-only).
- ``models/update`` ``{"name": N, "version": V, "rollout": ID (optional), "force": bool (optional)}``: queue an
  over-the-air update of model N to version V (docs/ota.md). The reply says it was accepted; the outcome follows in
  signed telemetry (``ota.*`` events), because an update takes longer than a reply may wait. ``force`` retries a
  version that failed on this box before. ``unavailable`` when updates are off.
- ``models/rollback`` ``{"name": N, "version": V, "rollout": ID (optional)}``: leave version V (a rollout was
  aborted): the model that ran before it becomes active again, and V is never retried unless forced.
- ``time/reset`` ``{"to": T}``: the fleet's recovery for a box whose time floors are wrongly in the future. Lowers
  the command floor and the OTA time floor to T (the fleet's true time; never below the box's own clock and build
  time), and from then on the box refuses every command issued before T. T must not be after the command's own
  issued-at (the fleet issues it at the box's reported floor, so that it is not expired there). docs/commands.md.

Invariants: nothing runs unless it verified; every refusal is a ``CommandRejected`` with a stable ``reason``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from edge.config import LIVE_SETTINGS, config_keys
from edge.errors import ConfigError
from edge.wire.commands import Command, CommandRejected, CommandsUnavailable, UnknownCommand
from edge.wire.errors import ManifestError
from edge.wire.manifest import validate_name, version_key

__all__ = [
    "COMMAND_NAMES",
    "CommandExecutor",
    "DeviceControls",
    "InvalidArgument",
    "TIME_RESET",
    "SettingNotLive",
    "UnknownSetting",
    "reply_for",
]

TIME_RESET: Final = "time/reset"
COMMAND_NAMES: Final = frozenset({"ping", "status", "set", "models/update", "models/rollback", TIME_RESET})


class SettingNotLive(CommandRejected):
    """``set`` named a configuration key that only a restart can change."""

    reason = "not_live"


class UnknownSetting(CommandRejected):
    """``set`` named no configuration key at all."""

    reason = "unknown_key"


class InvalidArgument(CommandRejected):
    """A command's arguments are missing, extra or out of range."""

    reason = "invalid_argument"


@dataclass(frozen=True, slots=True)
class DeviceControls:
    """What commands may act on; the running service supplies these.

    Attributes:
        republish_status: publish the retained status message now; returns the status body it published.
        set_batching: ``TelemetrySink.set_batching(batch_records, batch_age_s)``.
        set_log_level: change the level of the ``edge`` loggers ("debug", "info", "warning", "error").
        request_update: queue an update ``(name, version, force, rollout)``; returns the reply's result. None when
            over-the-air updates are off.
        request_rollback: queue leaving a version ``(name, version, rollout)``; None when updates are off.
        reset_time: apply ``time/reset`` to the box's floors ``(to)``; returns the reply's result (the floors
            afterwards). None: the box has no floors to reset (``unavailable``).
    """

    republish_status: Callable[[], Mapping[str, Any]]
    set_batching: Callable[[int | None, float | None], None]
    set_log_level: Callable[[str], None]
    request_update: Callable[[str, str, bool, str | None], Mapping[str, Any]] | None = None
    request_rollback: Callable[[str, str, str | None], Mapping[str, Any]] | None = None
    reset_time: Callable[[float], Mapping[str, Any]] | None = None


class CommandExecutor:
    """Runs verified commands against the device's controls.

    Args:
        controls: the service's hooks.
    """

    def __init__(self, controls: DeviceControls) -> None:
        self._controls = controls
        self._config_keys = config_keys()

    @property
    def controls(self) -> DeviceControls:
        """The hooks this executor acts on."""
        return self._controls

    def execute(self, cmd: Command, now: float) -> dict[str, Any]:
        """Execute one verified command.

        Args:
            cmd: the command (its signature, device, lifetime and nonce were checked).
            now: the box's clock (epoch seconds).

        Returns:
            The reply's ``result``.

        Raises:
            CommandRejected: ``unknown_command``, ``invalid_argument``, ``not_live``, ``unknown_key``, or
                ``unavailable`` when the device could not act (e.g. the status could not be published).
        """
        if cmd.name == "ping":
            self._expect_args(cmd, set())
            return {"pong": True, "ts": now}
        if cmd.name == "status":
            self._expect_args(cmd, set())
            try:
                return dict(self._controls.republish_status())
            except Exception as e:  # a transport failure, a closed outbox: the reply says so, the service goes on
                raise CommandsUnavailable(f"status not published: {e}", command=cmd) from e
        if cmd.name == "set":
            return self._set(cmd)
        if cmd.name in ("models/update", "models/rollback"):
            return self._models(cmd)
        if cmd.name == TIME_RESET:
            return self._reset_time(cmd)
        raise UnknownCommand(f"unknown command {cmd.name!r} (known: {', '.join(sorted(COMMAND_NAMES))})", command=cmd)

    @staticmethod
    def _expect_args(cmd: Command, names: set[str]) -> None:
        if set(cmd.args) != names:
            want = ", ".join(sorted(names)) or "none"
            raise InvalidArgument(f"{cmd.name} takes arguments: {want}; got {sorted(cmd.args)}", command=cmd)

    def _set(self, cmd: Command) -> dict[str, Any]:
        self._expect_args(cmd, {"key", "value"})
        key, value = cmd.args["key"], cmd.args["value"]
        if not isinstance(key, str):
            raise InvalidArgument(f"set: key must be a string, got {key!r:.40}", command=cmd)
        convert = LIVE_SETTINGS.get(key)
        if convert is None:
            if key in self._config_keys:
                live = ", ".join(sorted(LIVE_SETTINGS))
                raise SettingNotLive(f"{key} changes only with a restart (live: {live})", command=cmd)
            raise UnknownSetting(f"no configuration key {key!r:.80}", command=cmd)
        try:
            checked = convert(key, value)
            if key == "telemetry.batch_records":
                self._controls.set_batching(checked, None)
            elif key == "telemetry.batch_age_s":
                self._controls.set_batching(None, checked)
            else:
                self._controls.set_log_level(checked)
        except ConfigError as e:
            raise InvalidArgument(str(e), command=cmd) from e
        return {"key": key, "value": checked}

    def _models(self, cmd: Command) -> dict[str, Any]:
        update = cmd.name == "models/update"
        allowed = {"name", "version", "rollout", "force"} if update else {"name", "version", "rollout"}
        if not {"name", "version"} <= set(cmd.args) <= allowed:
            raise InvalidArgument(
                f"{cmd.name} takes name, version and optionally {', '.join(sorted(allowed - {'name', 'version'}))}; "
                f"got {sorted(cmd.args)}",
                command=cmd,
            )
        name, version = cmd.args["name"], cmd.args["version"]
        rollout, force = cmd.args.get("rollout"), cmd.args.get("force", False)
        try:
            validate_name(name)
            version_key(version)
        except ManifestError as e:
            raise InvalidArgument(f"{cmd.name}: {e}", command=cmd) from e
        if rollout is not None and not isinstance(rollout, str):
            raise InvalidArgument(f"{cmd.name}: rollout must be a string, got {rollout!r:.40}", command=cmd)
        if not isinstance(force, bool):
            raise InvalidArgument(f"{cmd.name}: force must be true or false, got {force!r:.40}", command=cmd)
        assert isinstance(name, str) and isinstance(version, str)
        if update and self._controls.request_update is not None:
            return dict(self._controls.request_update(name, version, force, rollout))
        if not update and self._controls.request_rollback is not None:
            return dict(self._controls.request_rollback(name, version, rollout))
        raise CommandsUnavailable("over-the-air updates are off on this box (ota.repository is empty)", command=cmd)

    def _reset_time(self, cmd: Command) -> dict[str, Any]:
        self._expect_args(cmd, {"to"})
        to = cmd.args["to"]
        if isinstance(to, bool) or not isinstance(to, int | float) or not 0 <= to <= cmd.issued_at:
            raise InvalidArgument(
                f"time/reset: 'to' must be epoch seconds no later than the command's issued-at ({cmd.issued_at:.3f}), "
                f"got {to!r:.40}",
                command=cmd,
            )
        if self._controls.reset_time is None:
            raise CommandsUnavailable("time/reset: this box keeps no time floors", command=cmd)
        try:
            return dict(self._controls.reset_time(float(to)))
        except CommandRejected as e:  # the nonce file could not be written: the reply says so
            e.command = cmd
            raise


def reply_for(result: Mapping[str, Any] | CommandRejected, cmd: Command | None = None) -> dict[str, Any]:
    """The JSON body of a reply.

    Args:
        result: the executor's result, or the rejection.
        cmd: the executed command (for a result; a rejection carries its own, if any).

    Returns:
        The reply object (see the module docstring).
    """
    if isinstance(result, CommandRejected):
        body: dict[str, Any] = {"ok": False, "error": result.reason, "detail": str(result)}
        if result.command is not None:
            body = {"nonce": result.command.nonce.hex(), "command": result.command.name, **body}
        return body
    if cmd is None:
        raise ValueError("a successful reply needs its command")
    return {"nonce": cmd.nonce.hex(), "command": cmd.name, "ok": True, "result": dict(result)}
