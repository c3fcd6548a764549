"""The box's health gate before a commit: :mod:`edge.inference.health`, with its verdicts as OTA errors.

The rules (``incompatible``, ``load_failed``, ``input_mismatch``, ``wrong_outputs``, ``too_slow``), the int8-versus-
float choice and the timing live in :mod:`edge.inference.health`, shared with the publisher's check before
``edge fleet models publish`` signs a release: the same code passes a release on both sides. Here each verdict
becomes a :class:`~edge.ota.errors.TrialFailed`, the updater's rollback reason.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge.inference import health
from edge.inference.health import TrialResult, installed_versions, load_golden
from edge.inference.model import InputSpec
from edge.ota.errors import TrialFailed
from edge.wire.manifest import GoldenSamples, ModelManifest

__all__ = [
    "TrialResult",
    "adapt_inputs",
    "check_requires",
    "compare_outputs",
    "installed_versions",
    "load_golden",
    "run_trial",
]


@contextlib.contextmanager
def _as_trial_failure() -> Iterator[None]:
    try:
        yield
    except health.HealthCheckFailed as e:
        raise TrialFailed(e.reason, e.detail) from e


def check_requires(requires: Mapping[str, str], installed: Mapping[str, str]) -> None:
    """:func:`edge.inference.health.check_requires`, raising ``TrialFailed`` (``incompatible``)."""
    with _as_trial_failure():
        health.check_requires(requires, installed)


def adapt_inputs(inputs: npt.NDArray[Any], source: InputSpec, target: InputSpec) -> npt.NDArray[Any]:
    """:func:`edge.inference.health.adapt_inputs`, raising ``TrialFailed`` (``input_mismatch``)."""
    with _as_trial_failure():
        return health.adapt_inputs(inputs, source, target)


def compare_outputs(
    outputs: list[npt.NDArray[np.float32]], expected: npt.NDArray[np.float32], tolerance: float, min_agreement: float
) -> tuple[float, float]:
    """:func:`edge.inference.health.compare_outputs`, raising ``TrialFailed`` (``wrong_outputs``)."""
    with _as_trial_failure():
        return health.compare_outputs(outputs, expected, tolerance, min_agreement)


def run_trial(
    manifest: ModelManifest,
    files: Mapping[str, Path],
    golden: GoldenSamples | None,
    *,
    threads: int = 1,
    runs: int = 20,
    clock: Callable[[], float] = time.perf_counter,
) -> TrialResult:
    """Load a candidate release beside the running model and decide whether it may be committed.

    Args and Returns: as :func:`edge.inference.health.run_health_check`.

    Raises:
        TrialFailed: the candidate failed; ``reason`` is ``incompatible``, ``load_failed``, ``input_mismatch``,
            ``wrong_outputs`` or ``too_slow``.
        InputError: the arguments contradict the manifest (a caller's bug, not the candidate's fault).
    """
    with _as_trial_failure():
        return health.run_health_check(manifest, files, golden, threads=threads, runs=runs, clock=clock)
