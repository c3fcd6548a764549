"""The publisher's check before ``edge fleet models publish`` signs a release: the box's health gate, run here.

A box refuses a release whose golden samples it does not reproduce or whose latency budget it misses, and the
rollout aborts; finding that on the publisher's machine first costs seconds instead of a rollout. The rules and the
code are the box's (:mod:`edge.inference.health`): the same onnxruntime session, golden comparison and p50 timing.

The latency is measured on this machine, not on the box: a budget met here may still be missed on a slower box (the
box's own trial decides), but a budget missed here on a faster machine is a mistake worth stopping for. ``--force``
skips the check, for a release meant to fail (a demo of the box's rollback) or a budget only the box can judge.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from edge.errors import VerificationError
from edge.fleet.errors import GatewayError
from edge.wire.manifest import ModelManifest, parse_golden

if TYPE_CHECKING:
    from edge.inference.health import TrialResult

__all__ = ["ReleaseCheckFailed", "check_release"]


class ReleaseCheckFailed(GatewayError, VerificationError):  # noqa: N818 -- a verdict, like VerificationError
    """The release fails its own health check on the publisher's machine (exit status 3); nothing was signed.

    Attributes:
        reason: the health gate's reason (``wrong_outputs``, ``too_slow``, ``load_failed``...).
    """

    def __init__(self, model_id: str, reason: str, detail: str) -> None:
        super().__init__(
            f"{model_id} fails its health check on this machine, nothing was signed: {reason}: {detail}; fix the "
            "model, its golden samples or --latency-budget-ms, or publish it unchecked with --force"
        )
        self.reason = reason


def check_release(
    manifest: ModelManifest, files: Mapping[str, Path], golden: bytes | None, *, runs: int = 20
) -> TrialResult:
    """Run a release's golden samples and latency budget with the real model, as the box will.

    Args:
        manifest: the release's manifest, as it is about to be signed.
        files: variant -> file (``{manifest.quantization: path}``, plus ``"float"`` beside an int8 primary).
        golden: the golden file's bytes as they will be published, or None.
        runs: timed inferences for the p50.

    Returns:
        What was measured (the chosen variant, its p50, the largest golden error and the agreement).

    Raises:
        ReleaseCheckFailed: the release fails; the message names the sample or the measured and budgeted latency.
    """
    from edge.inference.health import HealthCheckFailed, run_health_check  # noqa: PLC0415 -- onnxruntime

    samples = None if golden is None else parse_golden(golden, input_info=manifest.input)
    try:
        return run_health_check(manifest, files, samples, runs=runs)
    except HealthCheckFailed as e:
        raise ReleaseCheckFailed(manifest.model_id, e.reason, e.detail) from e
