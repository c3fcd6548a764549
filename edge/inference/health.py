"""The health gate: a candidate model must load, take the promised input, reproduce its golden outputs and meet its
latency budget on this machine. The box runs it before the updater may commit a release (``edge.ota.trial``); the
publisher runs it before ``edge fleet models publish`` signs one (``edge.fleet.models.precheck``).

Rules, checked in this order (the first failure is the verdict, a :class:`HealthCheckFailed`):

1. ``incompatible``: ``manifest.requires`` names a runtime minimum above the installed version (or a runtime this
   machine does not know, so cannot vouch for). Checked before anything is loaded.
2. ``load_failed``: the file is not a model onnxruntime accepts (or a golden inference raises inside onnxruntime).
3. ``input_mismatch``: the loaded input's name, shape or dtype differs from ``manifest.input`` (a float variant must
   match it apart from taking float32), or the golden inputs do not fit the model.
4. ``wrong_outputs``: any value of the model's first output, read as float32, differs from the expected one by more
   than the tolerance, or the share of samples whose argmax matches is below ``min_agreement``.
5. ``too_slow``: the p50 of up to ``runs`` timed inferences exceeds ``manifest.latency_budget_ms``. Timing stops
   early once at least 5 rounds ran and they took 100 ms: a large model's p50 is stable by then, and every extra
   round delays the commit (measured on the 14 MB MobileNetV2: 20 runs made the trial twice as long as 5).

The candidate runs in its own onnxruntime session, loaded from its own bytes, so a running session of the same file
is never touched. Golden inputs are stored in the primary model's input dtype; a float variant beside an int8 primary
receives them dequantized with the primary's input scale and zero point (:func:`adapt_inputs`), which is also how
``tools/models/ota_models.py`` computes the expected outputs of a float reference.

With an int8 and a float variant, both are evaluated (latency measured interleaved, so drift on a shared box hits
both alike); the int8 is kept only if it passes the golden check and is faster, else the float if it passes, else
the int8 if it passes, else the check fails with the int8's reason. The rejected session is dropped.

A module of the shared ground (``edge.inference``), not of the box's updater: the fleet may not import ``edge.ota``.
"""

from __future__ import annotations

import math
import platform
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edge._fs import TooLargeError, read_bounded
from edge.errors import InputError, ModelError
from edge.inference.model import InputSpec, Model
from edge.wire.errors import ManifestError
from edge.wire.manifest import MAX_GOLDEN_BYTES, GoldenSamples, InputInfo, ModelManifest, parse_golden, version_key

__all__ = [
    "HealthCheckFailed",
    "TrialResult",
    "adapt_inputs",
    "check_requires",
    "compare_outputs",
    "installed_versions",
    "load_golden",
    "run_health_check",
]

Variant = Literal["int8", "float"]
_MIN_TIMED_RUNS = 5
_TIMING_BUDGET_S = 0.1
_NUMERIC_PREFIX = re.compile(r"\d+(?:\.\d+){0,3}")


class HealthCheckFailed(InputError):  # noqa: N818 -- a verdict on the candidate model, which came from outside
    """The candidate model failed the health gate.

    Args:
        reason: ``incompatible``, ``load_failed``, ``input_mismatch``, ``wrong_outputs`` or ``too_slow``.
        detail: a sentence naming what failed (the sample and value, the measured and budgeted latency).
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class TrialResult:
    """A candidate that passed the health gate.

    Attributes:
        model: the loaded, warmed session of the chosen file (the service swaps it into the pipeline).
        variant: which file was chosen, ``"int8"`` or ``"float"``.
        path: the chosen file.
        latency_ms: p50 of one inference on this machine.
        max_error: largest ``|output - expected|`` over the golden samples (None without golden samples).
        agreement: share of golden samples whose argmax matches (None without golden samples).
        timings_ms: p50 per evaluated variant, e.g. ``{"int8": 0.21, "float": 0.35}``.
    """

    model: Model
    variant: Variant
    path: Path
    latency_ms: float
    max_error: float | None
    agreement: float | None
    timings_ms: Mapping[str, float]


@dataclass
class _Candidate:
    """One variant under evaluation; ``failure`` holds its verdict once it has failed a check."""

    variant: Variant
    path: Path
    model: Model | None = None
    inputs: npt.NDArray[Any] | None = None
    failure: HealthCheckFailed | None = None
    max_error: float | None = None
    agreement: float | None = None
    latency_ms: float | None = None


def installed_versions() -> dict[str, str]:
    """The runtime versions a manifest's ``requires`` may name: ``onnxruntime``, ``edge`` and ``python``."""
    import onnxruntime as ort  # noqa: PLC0415 -- the trial is the first place that needs it

    import edge  # noqa: PLC0415

    return {"onnxruntime": str(ort.__version__), "edge": str(edge.__version__), "python": platform.python_version()}


def check_requires(requires: Mapping[str, str], installed: Mapping[str, str]) -> None:
    """Check a manifest's minimum runtime versions against the installed ones.

    Installed versions are compared on their numeric prefix (``1.31.1rc2`` counts as ``1.31.1``).

    Args:
        requires: runtime -> minimum version, from the manifest.
        installed: runtime -> installed version (see :func:`installed_versions`).

    Raises:
        HealthCheckFailed: ``incompatible`` when a minimum is above the installed version, names an unknown runtime, or
            either version cannot be read.
    """
    for runtime, minimum in sorted(requires.items()):
        have = installed.get(runtime)
        if have is None:
            raise HealthCheckFailed(
                "incompatible", f"the model requires {runtime} >= {minimum}, unknown on this machine"
            )
        prefix = _NUMERIC_PREFIX.match(have)
        try:
            if prefix is None:
                raise ManifestError(f"installed {runtime} version {have!r} has no numeric prefix")
            if version_key(prefix.group()) < version_key(minimum):
                raise HealthCheckFailed(
                    "incompatible", f"the model requires {runtime} >= {minimum}, this machine has {have}"
                )
        except ManifestError as e:
            raise HealthCheckFailed("incompatible", f"cannot compare {runtime} versions: {e}") from e


def adapt_inputs(inputs: npt.NDArray[Any], source: InputSpec, target: InputSpec) -> npt.NDArray[Any]:
    """Convert golden inputs made for one model's input (``source``) to another's (``target``).

    Only the conversions an int8 release needs: the same dtype (unchanged), or quantized to float32 by
    ``real = (q - zero_point) * scale`` with the source's parameters.

    Args:
        inputs: ``(N, ...)`` tensors in ``source.dtype``.
        source: the input the tensors were made for.
        target: the input they are to be fed to.

    Returns:
        A C-contiguous ``(N, ...)`` array in ``target.dtype``.

    Raises:
        HealthCheckFailed: ``input_mismatch`` when there is no such conversion.
    """
    if str(inputs.dtype) == target.dtype:
        return np.ascontiguousarray(inputs)
    if target.dtype == "float32" and inputs.dtype in (np.uint8, np.int8) and source.scale is not None:
        zero = np.float32(source.zero_point or 0)
        real = (inputs.astype(np.float32) - zero) * np.float32(source.scale)
        return np.ascontiguousarray(real, dtype=np.float32)
    raise HealthCheckFailed(
        "input_mismatch", f"golden inputs of {inputs.dtype} cannot be fed to a {target.dtype} input"
    )


def run_health_check(
    manifest: ModelManifest,
    files: Mapping[str, Path],
    golden: GoldenSamples | None,
    *,
    threads: int = 1,
    runs: int = 20,
    clock: Callable[[], float] = time.perf_counter,
) -> TrialResult:
    """Load a candidate release beside the running model and decide whether it may be committed.

    Args:
        manifest: the release's signed manifest (input, requirements, tolerance, latency budget).
        files: variant -> local file: ``{manifest.quantization: path}``, plus ``"float"`` beside an int8 primary.
        golden: the release's golden samples, or None (then only load, input and latency are checked).
        threads: intra-op threads of the candidate session (as the service will run it).
        runs: timed inferences for the p50.
        clock: seconds, monotonic (``time.perf_counter``).

    Returns:
        The chosen, warmed model and what was measured.

    Raises:
        HealthCheckFailed: the candidate failed; ``reason`` is ``incompatible``, ``load_failed``, ``input_mismatch``,
            ``wrong_outputs`` or ``too_slow``.
        InputError: the arguments contradict the manifest (a caller's bug, not the candidate's fault).
    """
    candidates = _plan(manifest, files, golden, runs)
    check_requires(manifest.requires, installed_versions())
    primary = candidates[0]
    for cand in candidates:
        _load(cand, manifest, threads)
    for cand in candidates:
        if cand.model is not None and golden is not None:
            source = primary.model.input_spec if primary.model is not None else None
            _check_golden(cand, manifest, golden, source)
    _measure([c for c in candidates if c.model is not None], runs, clock)
    chosen = _choose(candidates)
    assert chosen.model is not None and chosen.latency_ms is not None
    budget = manifest.latency_budget_ms
    if budget is not None and chosen.latency_ms > budget:
        raise HealthCheckFailed(
            "too_slow",
            f"{chosen.variant} p50 {chosen.latency_ms:.3f} ms (up to {runs} runs) exceeds the budget of {budget:g} ms",
        )
    return TrialResult(
        model=chosen.model,
        variant=chosen.variant,
        path=chosen.path,
        latency_ms=chosen.latency_ms,
        max_error=chosen.max_error,
        agreement=chosen.agreement,
        timings_ms={c.variant: c.latency_ms for c in candidates if c.latency_ms is not None},
    )


def _plan(
    manifest: ModelManifest, files: Mapping[str, Path], golden: GoldenSamples | None, runs: int
) -> list[_Candidate]:
    """The candidates to evaluate, primary first; rejects arguments that contradict the manifest."""
    if runs < 1:
        raise InputError(f"runs must be >= 1, got {runs}")
    allowed = {manifest.quantization} | ({"float"} if manifest.quantization == "int8" else set())
    if manifest.quantization not in files or not set(files) <= allowed:
        raise InputError(
            f"{manifest.model_id}: files must hold {manifest.quantization!r} (and 'float' beside an int8 primary), "
            f"got {sorted(files)}"
        )
    if golden is not None and manifest.golden is None:
        raise InputError(f"{manifest.model_id}: golden samples given but the manifest states no tolerance")
    primary: Variant = manifest.quantization
    out = [_Candidate(primary, Path(files[primary]))]
    if primary == "int8" and "float" in files:
        out.append(_Candidate("float", Path(files["float"])))
    return out


def _runtime_errors() -> tuple[type[BaseException], ...]:
    """onnxruntime's own exception types (they derive from ``Exception`` directly, not from ``RuntimeError``)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state  # noqa: PLC0415

    names = ("Fail", "InvalidArgument", "RuntimeException", "InvalidGraph", "NotImplemented", "EPFail")
    found = tuple(getattr(state, n) for n in names if isinstance(getattr(state, n, None), type))
    return (RuntimeError, *found)


def _load(cand: _Candidate, manifest: ModelManifest, threads: int) -> None:
    try:
        # One warm-up inference: the golden samples run next and warm the session anyway.
        model = Model(cand.path, threads=threads, warmup=1)
    except ModelError as e:
        cand.failure = HealthCheckFailed("load_failed", f"{cand.variant} {cand.path.name}: {e}")
        return
    except _runtime_errors() as e:  # the session loaded, but its warm-up inference failed inside onnxruntime
        cand.failure = HealthCheckFailed("load_failed", f"{cand.variant} {cand.path.name}: warm-up failed ({e})")
        return
    want = manifest.input
    dtype = want.dtype if cand.variant == manifest.quantization else "float32"
    spec = model.input_spec
    if (spec.name, spec.shape, spec.dtype) != (want.name, want.shape, dtype):
        cand.failure = HealthCheckFailed(
            "input_mismatch",
            f"{cand.variant} model takes {spec.name!r} {spec.dtype}{list(spec.shape)}, "
            f"the manifest promises {want.name!r} {dtype}{list(want.shape)}",
        )
        return
    cand.model = model


def _check_golden(cand: _Candidate, manifest: ModelManifest, golden: GoldenSamples, source: InputSpec | None) -> None:
    """Run the golden samples; record the verdict on ``cand`` (a failed candidate keeps its model for timing)."""
    assert cand.model is not None and manifest.golden is not None
    spec = cand.model.input_spec
    try:
        _check_golden_shape(golden, manifest.input)
        if source is None:
            raise HealthCheckFailed(
                "input_mismatch", "golden inputs are made for the primary model, which was rejected"
            )
        inputs = adapt_inputs(golden.inputs, source, spec)
    except HealthCheckFailed as e:
        cand.failure = e
        return
    cand.inputs = inputs
    outputs = []
    failures: tuple[type[BaseException], ...] = (InputError, *_runtime_errors())
    for i in range(len(golden)):
        try:
            out = cand.model.run(inputs[i : i + 1])
        except failures as e:
            cand.failure = HealthCheckFailed("load_failed", f"{cand.variant}: golden sample {i} cannot run ({e})")
            cand.model = None  # a session that fails on real inputs is not even worth timing
            return
        outputs.append(np.asarray(out, dtype=np.float32).reshape(-1))
    try:
        cand.max_error, cand.agreement = compare_outputs(
            outputs, golden.outputs, manifest.golden.tolerance, manifest.golden.min_agreement
        )
    except HealthCheckFailed as e:
        cand.failure = HealthCheckFailed(e.reason, f"{cand.variant}: {e.detail}")


def _check_golden_shape(golden: GoldenSamples, want: InputInfo) -> None:
    got_dtype, got_shape = str(golden.inputs.dtype), tuple(golden.inputs.shape[1:])
    if got_dtype != want.dtype or got_shape != tuple(want.shape[1:]):
        raise HealthCheckFailed(
            "input_mismatch",
            f"golden inputs are {got_dtype}{list(got_shape)}, the model takes {want.dtype}{list(want.shape[1:])}",
        )


def compare_outputs(
    outputs: list[npt.NDArray[np.float32]], expected: npt.NDArray[np.float32], tolerance: float, min_agreement: float
) -> tuple[float, float]:
    """Compare a model's outputs with the expected ones.

    Args:
        outputs: one flat float32 output per sample.
        expected: ``(N, K)`` float32.
        tolerance: largest allowed absolute difference of any value.
        min_agreement: least share of samples whose argmax must match.

    Returns:
        ``(max_error, agreement)``.

    Raises:
        HealthCheckFailed: ``wrong_outputs``, naming the first offending sample, value and error.
    """
    worst = 0.0
    agree = 0
    for i, (got, want) in enumerate(zip(outputs, expected, strict=True)):
        if got.shape != want.shape:
            raise HealthCheckFailed("wrong_outputs", f"sample {i}: {got.size} output values, expected {want.size}")
        err = np.abs(got.astype(np.float64) - want.astype(np.float64))
        # NaN compares false with everything, so a NaN on either side must count as an infinite error explicitly.
        err[~np.isfinite(err)] = math.inf
        j = int(np.argmax(err))
        if err[j] > tolerance:
            raise HealthCheckFailed(
                "wrong_outputs",
                f"sample {i}: output[{j}] = {float(got[j]):.6g}, expected {float(want[j]):.6g}, "
                f"error {float(err[j]):.3g} > tolerance {tolerance:g}",
            )
        worst = max(worst, float(err[j]))
        agree += int(np.argmax(got)) == int(np.argmax(want))
    agreement = agree / len(outputs)
    if agreement < min_agreement:
        raise HealthCheckFailed(
            "wrong_outputs",
            f"{agree} of {len(outputs)} samples agree on the top class ({agreement:.3f} < {min_agreement:g})",
        )
    return worst, agreement


def _measure(cands: list[_Candidate], runs: int, clock: Callable[[], float]) -> None:
    """Time ``runs`` inferences of each candidate, interleaved, and store each p50 in milliseconds."""
    # Filled through the bound buffer, as the pipeline feeds the model: that is the latency the box will see.
    bufs = [c.model.new_input() for c in cands if c.model is not None]
    times: list[list[float]] = [[] for _ in cands]
    # The early stop uses its own monotonic clock, not ``clock``: a scripted clock must see exactly one call per run.
    start = time.monotonic()
    for i in range(runs):
        for cand, buf, t in zip(cands, bufs, times, strict=True):
            assert cand.model is not None
            if cand.inputs is not None:
                np.copyto(buf, cand.inputs[i % len(cand.inputs)][None])
            t0 = clock()
            cand.model.run(buf)
            t.append(clock() - t0)
        if i + 1 >= _MIN_TIMED_RUNS and time.monotonic() - start >= _TIMING_BUDGET_S:
            break
    for cand, t in zip(cands, times, strict=True):
        cand.latency_ms = float(np.median(t)) * 1000.0


def _choose(cands: list[_Candidate]) -> _Candidate:
    """Apply the int8-versus-float rule (see the module docstring); raise the primary's failure if none passed."""
    passed = [c for c in cands if c.failure is None]
    int8 = next((c for c in passed if c.variant == "int8"), None)
    flt = next((c for c in passed if c.variant == "float"), None)
    if int8 is not None and flt is not None:
        assert int8.latency_ms is not None and flt.latency_ms is not None
        chosen = int8 if int8.latency_ms < flt.latency_ms else flt
    elif passed:
        chosen = passed[0]
    else:
        failure = cands[0].failure
        assert failure is not None
        raise failure
    for c in cands:
        if c is not chosen:
            c.model = None  # drop the rejected session now, not when the result is garbage-collected
    return chosen


def load_golden(path: str | Path, *, input_info: InputInfo | None = None) -> GoldenSamples:
    """Read a golden ``.npz`` file under ``MAX_GOLDEN_BYTES`` and parse it (``edge.wire.manifest.parse_golden``).

    Raises:
        ManifestError: the file cannot be read, is too large, or is not golden samples of ``input_info``.
    """
    p = Path(path)
    try:
        data = read_bounded(p, MAX_GOLDEN_BYTES)
    except TooLargeError as e:
        raise ManifestError(f"golden file {e}") from e
    except OSError as e:
        raise ManifestError(f"cannot read golden file {p}: {e}") from e
    return parse_golden(data, input_info=input_info, label=f"golden file {p}")
