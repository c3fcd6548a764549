"""The health gate against real models: good, broken, slow, corrupt, mismatched and incompatible releases of digits."""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from hostile_files import MAX_PEAK, sparse_file, traced_peak
from onnx import helper, numpy_helper

from edge.errors import InputError
from edge.inference.model import MAX_MODEL_BYTES, Model
from edge.ota.errors import TrialFailed
from edge.ota.trial import check_requires, load_golden, run_trial
from edge.wire.manifest import (
    FLOAT_FILE,
    GOLDEN_FILE,
    Companion,
    GoldenSamples,
    GoldenSpec,
    InputInfo,
    ModelManifest,
    target_path,
)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "models"))
import ota_models as om  # noqa: E402


@dataclass(frozen=True)
class Releases:
    """Files built once for the module from the bundled digits@1.0.0."""

    int8: Path  # digits@2.0.0, int8
    float: Path  # digits@2.0.0, float
    broken_int8: Path
    broken_float: Path
    slow_int8: Path
    corrupt: Path
    golden_self: Path  # inputs for the int8, outputs from the int8 itself
    golden_float: Path  # inputs for the int8, outputs from the float model


@pytest.fixture(scope="module")
def rel(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    d = tmp_path_factory.mktemp("releases")
    int8 = om.with_version(om.DIGITS_INT8, d / "v2" / "model.onnx", "2.0.0")
    flt = om.with_version(om.DIGITS_FP32, d / "v2" / "model-float.onnx", "2.0.0")
    om.golden(int8, d / "golden-self.npz")
    om.golden(int8, d / "golden-float.npz", reference=flt)
    return Releases(
        int8=int8,
        float=flt,
        broken_int8=om.broken(om.DIGITS_INT8, d / "v3" / "model.onnx", "3.0.0"),
        broken_float=om.broken(om.DIGITS_FP32, d / "v3" / "model-float.onnx", "3.0.0"),
        slow_int8=om.slow(om.DIGITS_INT8, d / "v4" / "model.onnx", "4.0.0", extra_ms=3.0),
        corrupt=om.corrupt(om.DIGITS_INT8, d / "v5" / "model.onnx"),
        golden_self=d / "golden-self.npz",
        golden_float=d / "golden-float.npz",
    )


def _companion(path: Path, filename: str, version: str) -> Companion:
    data = path.read_bytes()
    return Companion(target_path("digits", version, filename), hashlib.sha256(data).hexdigest(), len(data))


def manifest_for(
    model: Path,
    *,
    golden: Path | None = None,
    tolerance: float = 1e-6,
    min_agreement: float = 1.0,
    budget_ms: float | None = None,
    float_variant: Path | None = None,
    version: str = "2.0.0",
    requires: dict[str, str] | None = None,
) -> ModelManifest:
    """The manifest a publisher would sign for these files (input taken from the good digits int8 model)."""
    data = model.read_bytes()
    return ModelManifest(
        name="digits",
        version=version,
        sha256=hashlib.sha256(data).hexdigest(),
        length=len(data),
        quantization="int8",
        input=InputInfo("input", (1, 3, 32, 32), "uint8"),
        latency_budget_ms=budget_ms,
        requires=requires or {},
        golden=None
        if golden is None
        else GoldenSpec(_companion(golden, GOLDEN_FILE, version), 8, tolerance, min_agreement),
        float_variant=None if float_variant is None else _companion(float_variant, FLOAT_FILE, version),
    )


def golden_of(m: ModelManifest, path: Path) -> GoldenSamples:
    return load_golden(path, input_info=m.input)


def expect_failure(reason: str, fn: Callable[[], object]) -> TrialFailed:
    with pytest.raises(TrialFailed) as info:
        fn()
    assert info.value.reason == reason, info.value
    return info.value


# -- single file -------------------------------------------------------------------------------------------------


def test_good_model_passes_with_zero_error_against_its_own_golden(rel: Releases) -> None:
    m = manifest_for(rel.int8, golden=rel.golden_self, tolerance=0.0)
    result = run_trial(m, {"int8": rel.int8}, golden_of(m, rel.golden_self))
    assert result.variant == "int8" and result.path == rel.int8
    assert result.max_error == 0.0 and result.agreement == 1.0
    assert result.latency_ms > 0 and result.timings_ms == {"int8": result.latency_ms}
    assert result.model.model_id == "digits@2.0.0" and result.model.sha256 == m.sha256
    # The returned session is ready to serve: the same outputs as the golden file says.
    g = golden_of(m, rel.golden_self)
    assert np.array_equal(result.model.run(g.inputs[:1]).reshape(-1), g.outputs[0])


def test_broken_weights_are_wrong_outputs(rel: Releases) -> None:
    m = manifest_for(rel.broken_int8, golden=rel.golden_self, tolerance=1.0, version="3.0.0")
    err = expect_failure(
        "wrong_outputs", lambda: run_trial(m, {"int8": rel.broken_int8}, golden_of(m, rel.golden_self))
    )
    assert "sample 0" in err.detail and "tolerance 1" in err.detail


def test_disagreeing_top_class_is_wrong_outputs_even_inside_a_loose_tolerance(rel: Releases) -> None:
    m = manifest_for(rel.broken_int8, golden=rel.golden_self, tolerance=1e9, version="3.0.0")
    err = expect_failure(
        "wrong_outputs", lambda: run_trial(m, {"int8": rel.broken_int8}, golden_of(m, rel.golden_self))
    )
    assert "agree on the top class" in err.detail


def test_a_nan_comparison_never_passes(rel: Releases) -> None:
    m = manifest_for(rel.int8, golden=rel.golden_self, tolerance=1e9, min_agreement=0.0)
    g = golden_of(m, rel.golden_self)
    poisoned = GoldenSamples(g.inputs, np.full_like(g.outputs, np.nan))
    expect_failure("wrong_outputs", lambda: run_trial(m, {"int8": rel.int8}, poisoned))


def test_slow_model_over_its_budget_is_too_slow(rel: Releases) -> None:
    good_m = manifest_for(rel.int8, golden=rel.golden_self)
    slow_m = manifest_for(rel.slow_int8, golden=rel.golden_self, version="4.0.0")
    g = golden_of(good_m, rel.golden_self)
    good = run_trial(good_m, {"int8": rel.int8}, g).latency_ms
    slow = run_trial(slow_m, {"int8": rel.slow_int8}, g)
    assert slow.max_error == 0.0  # identical outputs: only its speed can fail it
    assert slow.latency_ms > 2 * good, (good, slow.latency_ms)
    budget = (good + slow.latency_ms) / 2
    err = expect_failure(
        "too_slow", lambda: run_trial(replace(slow_m, latency_budget_ms=budget), {"int8": rel.slow_int8}, g)
    )
    assert "exceeds the budget" in err.detail
    assert run_trial(replace(good_m, latency_budget_ms=budget), {"int8": rel.int8}, g).latency_ms <= budget


def test_corrupt_file_is_load_failed(rel: Releases) -> None:
    m = manifest_for(rel.corrupt, golden=rel.golden_self)
    err = expect_failure("load_failed", lambda: run_trial(m, {"int8": rel.corrupt}, golden_of(m, rel.golden_self)))
    assert "onnxruntime cannot load it" in err.detail


def fails_on_real_inputs(path: Path) -> Path:
    """A digits-shaped model that runs on zeros (its warm-up) but indexes out of range on any bright pixel."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMax", ["input"], ["peak"], keepdims=0),
            helper.make_node("Cast", ["peak"], ["index"], to=onnx.TensorProto.INT64),
            helper.make_node("Gather", ["table", "index"], ["row"]),
            helper.make_node("Reshape", ["row", "shape"], ["logits"]),
        ],
        "fails",
        [helper.make_tensor_value_info("input", onnx.TensorProto.UINT8, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 10])],
        [
            numpy_helper.from_array(np.zeros((2, 10), np.float32), "table"),
            numpy_helper.from_array(np.array([1, 10], np.int64), "shape"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_a_model_failing_inside_onnxruntime_on_golden_inputs_is_load_failed(rel: Releases, tmp_path: Path) -> None:
    bad = fails_on_real_inputs(tmp_path / "model.onnx")
    m = manifest_for(bad, golden=rel.golden_self)
    err = expect_failure("load_failed", lambda: run_trial(m, {"int8": bad}, golden_of(m, rel.golden_self)))
    assert "golden sample 0 cannot run" in err.detail


def test_missing_file_is_load_failed(rel: Releases, tmp_path: Path) -> None:
    m = manifest_for(rel.int8)
    expect_failure("load_failed", lambda: run_trial(m, {"int8": tmp_path / "gone.onnx"}, None))


@pytest.mark.parametrize(
    "promised",
    [
        InputInfo("input", (1, 3, 28, 28), "uint8"),
        InputInfo("image", (1, 3, 32, 32), "uint8"),
        InputInfo("input", (1, 3, 32, 32), "float32"),
    ],
    ids=["shape", "name", "dtype"],
)
def test_model_input_differing_from_the_manifest_is_input_mismatch(rel: Releases, promised: InputInfo) -> None:
    m = replace(manifest_for(rel.int8), input=promised)
    err = expect_failure("input_mismatch", lambda: run_trial(m, {"int8": rel.int8}, None))
    assert "the manifest promises" in err.detail


def test_golden_inputs_of_the_wrong_dtype_are_input_mismatch(rel: Releases) -> None:
    m = manifest_for(rel.int8, golden=rel.golden_self)
    g = golden_of(m, rel.golden_self)
    as_float = GoldenSamples(g.inputs.astype(np.float32), g.outputs)
    err = expect_failure("input_mismatch", lambda: run_trial(m, {"int8": rel.int8}, as_float))
    assert "golden inputs are float32" in err.detail


def test_golden_inputs_of_the_wrong_shape_are_input_mismatch(rel: Releases) -> None:
    m = manifest_for(rel.int8, golden=rel.golden_self)
    g = golden_of(m, rel.golden_self)
    cropped = GoldenSamples(np.ascontiguousarray(g.inputs[:, :, :16, :16]), g.outputs)
    expect_failure("input_mismatch", lambda: run_trial(m, {"int8": rel.int8}, cropped))


@pytest.mark.parametrize(
    "requires",
    [{"onnxruntime": "999"}, {"edge": "999.0.1"}, {"python": "4"}, {"cuda": "12.1"}],
    ids=["onnxruntime", "edge", "python", "unknown-runtime"],
)
def test_a_runtime_requirement_above_this_box_is_incompatible(rel: Releases, requires: dict[str, str]) -> None:
    m = manifest_for(rel.int8, requires=requires)
    err = expect_failure("incompatible", lambda: run_trial(m, {"int8": rel.int8}, None))
    assert next(iter(requires)) in err.detail


def test_requirements_this_box_meets_pass(rel: Releases) -> None:
    m = manifest_for(rel.int8, requires={"onnxruntime": "1.10", "edge": "0.1", "python": "3.11"})
    assert run_trial(m, {"int8": rel.int8}, None).variant == "int8"


def test_installed_versions_compare_on_their_numeric_prefix() -> None:
    check_requires({"onnxruntime": "1.31.1"}, {"onnxruntime": "1.31.1rc2"})
    check_requires({"onnxruntime": "1.31"}, {"onnxruntime": "1.31.0+cpu"})
    with pytest.raises(TrialFailed, match="incompatible"):
        check_requires({"onnxruntime": "1.31.2"}, {"onnxruntime": "1.31.1rc2"})
    with pytest.raises(TrialFailed, match="no numeric prefix"):
        check_requires({"edge": "1"}, {"edge": "dev"})


def test_without_golden_only_load_input_and_latency_are_checked(rel: Releases) -> None:
    calls = 0

    def counting_clock() -> float:
        nonlocal calls
        calls += 1
        return time.perf_counter()

    m = manifest_for(rel.broken_int8, version="3.0.0")  # broken outputs go unnoticed without golden samples
    result = run_trial(m, {"int8": rel.broken_int8}, None, runs=7, clock=counting_clock)
    assert result.max_error is None and result.agreement is None
    assert result.latency_ms > 0 and calls == 2 * 7


def test_arguments_contradicting_the_manifest_are_refused(rel: Releases) -> None:
    m = manifest_for(rel.int8, golden=rel.golden_self)
    g = golden_of(m, rel.golden_self)
    with pytest.raises(InputError):
        run_trial(m, {"float": rel.float}, g)
    with pytest.raises(InputError):
        run_trial(replace(m, golden=None), {"int8": rel.int8}, g)
    with pytest.raises(InputError):
        run_trial(m, {"int8": rel.int8}, g, runs=0)


# -- int8 against float ------------------------------------------------------------------------------------------


def both(rel: Releases, int8: Path, flt: Path, tolerance: float) -> tuple[ModelManifest, GoldenSamples]:
    m = manifest_for(int8, golden=rel.golden_float, tolerance=tolerance, float_variant=flt)
    return m, golden_of(m, rel.golden_float)


def test_both_good_keeps_the_int8_only_when_it_is_faster(rel: Releases) -> None:
    m, g = both(rel, rel.int8, rel.float, tolerance=2.0)
    result = run_trial(m, {"int8": rel.int8, "float": rel.float}, g, runs=30)
    assert set(result.timings_ms) == {"int8", "float"}
    expected = "int8" if result.timings_ms["int8"] < result.timings_ms["float"] else "float"
    assert result.variant == expected and result.latency_ms == result.timings_ms[expected]
    assert result.path == (rel.int8 if expected == "int8" else rel.float)
    assert result.model.input_spec.dtype == ("uint8" if expected == "int8" else "float32")


def scripted_clock(int8_s: float, float_s: float) -> Callable[[], float]:
    """A clock under which each int8 inference takes ``int8_s`` and each float one ``float_s`` (runs interleave)."""
    now = 0.0
    step = 0

    def clock() -> float:
        nonlocal now, step
        # Calls come in fours per run: int8 start, int8 end, float start, float end.
        phase = step % 4
        step += 1
        if phase == 1:
            now += int8_s
        elif phase == 3:
            now += float_s
        return now

    return clock


@pytest.mark.parametrize(("int8_s", "float_s", "winner"), [(0.001, 0.002, "int8"), (0.002, 0.001, "float")])
def test_the_faster_of_two_good_variants_wins(rel: Releases, int8_s: float, float_s: float, winner: str) -> None:
    m, g = both(rel, rel.int8, rel.float, tolerance=2.0)
    result = run_trial(m, {"int8": rel.int8, "float": rel.float}, g, clock=scripted_clock(int8_s, float_s))
    assert result.variant == winner
    assert result.timings_ms == pytest.approx({"int8": int8_s * 1000, "float": float_s * 1000})


def test_int8_outside_the_tolerance_falls_back_to_the_float(rel: Releases) -> None:
    m, g = both(rel, rel.int8, rel.float, tolerance=1e-9)
    result = run_trial(m, {"int8": rel.int8, "float": rel.float}, g, clock=scripted_clock(0.001, 0.002))
    assert result.variant == "float" and result.max_error == 0.0 and result.agreement == 1.0
    assert set(result.timings_ms) == {"int8", "float"}  # the int8 was faster, and still not kept


def test_corrupt_int8_falls_back_to_a_good_float(rel: Releases) -> None:
    m, g = both(rel, rel.corrupt, rel.float, tolerance=2.0)
    # The golden inputs are quantized for the int8 input; the float variant can only be fed them through the int8's
    # input parameters, which a corrupt int8 cannot give: the float is not trusted blindly, the trial fails.
    expect_failure("load_failed", lambda: run_trial(m, {"int8": rel.corrupt, "float": rel.float}, g))
    # Without golden samples there is nothing to adapt, and the float is kept.
    result = run_trial(replace(m, golden=None), {"int8": rel.corrupt, "float": rel.float}, None)
    assert result.variant == "float" and set(result.timings_ms) == {"float"}


def test_both_variants_wrong_fails_with_the_int8_reason(rel: Releases) -> None:
    m, g = both(rel, rel.broken_int8, rel.broken_float, tolerance=2.0)
    err = expect_failure("wrong_outputs", lambda: run_trial(m, {"int8": rel.broken_int8, "float": rel.broken_float}, g))
    assert err.detail.startswith("int8:")


def test_a_good_int8_is_kept_beside_a_broken_float(rel: Releases) -> None:
    m, g = both(rel, rel.int8, rel.broken_float, tolerance=2.0)
    result = run_trial(m, {"int8": rel.int8, "float": rel.broken_float}, g, clock=scripted_clock(0.002, 0.001))
    assert result.variant == "int8"


# -- beside the running model ------------------------------------------------------------------------------------


def test_the_trial_session_does_not_disturb_the_running_one(rel: Releases) -> None:
    running = Model(om.DIGITS_INT8)
    m = manifest_for(om.DIGITS_INT8, golden=rel.golden_self, version="1.0.0")
    g = golden_of(m, rel.golden_self)
    buf = running.new_input()
    expected = [running.run(g.inputs[i : i + 1]).copy() for i in range(len(g))]
    stop = threading.Event()
    served = 0
    wrong: list[int] = []

    def serve() -> None:
        nonlocal served
        while not stop.is_set():
            i = served % len(g)
            np.copyto(buf, g.inputs[i : i + 1])
            if not np.array_equal(running.run(buf), expected[i]):
                wrong.append(i)
            served += 1

    t = threading.Thread(target=serve)
    t.start()
    try:
        while served < 20:  # the running model is busy before the trial starts
            time.sleep(0.001)
        before = served
        result = run_trial(m, {"int8": om.DIGITS_INT8}, g, runs=50)  # the very file the running model came from
        during = served - before
    finally:
        stop.set()
        t.join()
    assert result.model is not running and result.max_error == 0.0
    assert during > 0 and wrong == []
    assert np.array_equal(running.run(g.inputs[:1]), expected[0])


def test_oversized_candidate_is_load_failed_without_being_read(rel: Releases, tmp_path: Path) -> None:
    # A slot file swapped for a huge one after download: the size is refused before a byte is read.
    m = manifest_for(rel.int8)
    huge = sparse_file(tmp_path / "model.onnx", MAX_MODEL_BYTES + 1, head=rel.int8.read_bytes())
    with traced_peak() as peak:
        err = expect_failure("load_failed", lambda: run_trial(m, {"int8": huge}, None))
    assert peak[0] < MAX_PEAK
    assert f"the file is {MAX_MODEL_BYTES + 1} bytes, the limit is {MAX_MODEL_BYTES}" in err.detail
