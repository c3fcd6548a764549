"""The exceptions of the OTA path, each naming the ``reason`` that telemetry and the fleet see.

A rejected update never stops the service: the updater records the reason, rolls back to the model it ran before
and reports the outcome in signed telemetry.
"""

from __future__ import annotations

from edge.errors import EdgeError, InputError

__all__ = [
    "IllegalTransition",
    "OtaError",
    "TrialFailed",
    "UpdateRejected",
]


class OtaError(EdgeError):
    """Base of the OTA errors; ``reason`` is a short snake_case word for telemetry and the rollout."""

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


class TrialFailed(OtaError):  # noqa: N818 -- a verdict
    """The candidate model failed its health check (``reason``: ``load_failed``, ``wrong_outputs``, ``too_slow``...)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class IllegalTransition(OtaError, RuntimeError):  # noqa: N818 -- names the bug
    """The updater's state machine was asked for a transition its table does not allow (a bug, never input)."""

    reason = "illegal_transition"
