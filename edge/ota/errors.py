"""The exceptions of the OTA path, each naming the ``reason`` that telemetry and the fleet see.

A rejected update never stops the service: the updater records the reason, rolls back to the model it ran before
and reports the outcome in signed telemetry.
"""

from __future__ import annotations

from edge.errors import ConfigError, EdgeError, InputError

__all__ = [
    "IllegalTransition",
    "OtaError",
    "OtaNotConfiguredError",
    "SlotBusyError",
    "TrialFailed",
    "UpdateRejected",
]


class OtaError(EdgeError):
    """Groups the OTA errors (caught, never raised: each subclass has its fault root); ``reason`` is a short
    snake_case word for telemetry and the rollout."""

    reason = "ota_error"


class UpdateRejected(OtaError, InputError):  # noqa: N818 -- a verdict, like CommandRejected
    """The repository, a download or the metadata failed a check; nothing from it is installed.

    Args:
        reason: what failed, e.g. ``hash_mismatch``, ``too_large``, ``expired``, ``rollback``, ``bad_signature``,
            ``not_found``, ``incompatible``, ``network``.
        detail: a sentence for the log.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class TrialFailed(OtaError, InputError):  # noqa: N818 -- a verdict on the candidate model, which came from outside
    """The candidate model failed its health check (``reason``: ``load_failed``, ``wrong_outputs``, ``too_slow``...)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class IllegalTransition(OtaError, RuntimeError):  # noqa: N818 -- names the bug: no fault root, on purpose
    """The updater's state machine was asked for a transition its table does not allow (a bug, never input)."""

    reason = "illegal_transition"


class OtaNotConfiguredError(OtaError, ConfigError):
    """An update was asked for, but no repository (``[ota] repository``) and trusted root are configured."""

    reason = "not_configured"

    def __init__(self) -> None:
        ConfigError.__init__(
            self, "ota.repository", "", "a repository URL and a trusted root (set [ota] repository and root)"
        )


class SlotBusyError(OtaError, RuntimeError):  # a bug: the updater never clears the slot it runs from
    """A slot that is in use (the active one) was to be cleared."""

    reason = "slot_busy"
