"""The model manifest (TUF custom metadata of a release) and the golden-sample format: round trips through canonical
JSON, and strict rejection of anything malformed or inconsistent, each with a ManifestError naming what is wrong."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
from hostile_files import MAX_PEAK, TiB, bomb, npy_header, sparse_file, traced_peak, zip_of
from securesystemslib.formats import encode_canonical

from edge.errors import InputError
from edge.ota.trial import load_golden
from edge.wire.errors import ManifestError
from edge.wire.manifest import (
    FLOAT_FILE,
    GOLDEN_FILE,
    MAX_GOLDEN_BYTES,
    Companion,
    GoldenSpec,
    InputInfo,
    ModelManifest,
    parse_golden,
    target_path,
    validate_name,
    version_key,
)

SHA = "ab" * 32
INPUT = InputInfo(name="input", shape=(1, 1, 8, 8), dtype="uint8")


def manifest(**changes: object) -> ModelManifest:
    base = ModelManifest(
        name="digits",
        version="2.0.0",
        sha256=SHA,
        length=1234,
        quantization="int8",
        input=INPUT,
        preprocess={"mean": [0.5, 1.0], "std": 0.25, "channel_order": "RGB"},
        latency_budget_ms=12.5,
        requires={"onnxruntime": "1.17", "edge": "0.1"},
        golden=GoldenSpec(Companion(target_path("digits", "2.0.0", GOLDEN_FILE), "cd" * 32, 99), 8, 0.05, 0.875),
        float_variant=Companion(target_path("digits", "2.0.0", FLOAT_FILE), "ef" * 32, 5678),
        publisher="acme",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def roundtrip(m: ModelManifest) -> ModelManifest:
    # Exactly what TUF does with custom metadata: canonical JSON bytes, parsed back.
    data = encode_canonical(m.to_custom())
    assert isinstance(data, str)
    return ModelManifest.from_custom(m.path, json.loads(data), length=m.length, sha256=m.sha256)


def test_round_trip_through_canonical_json() -> None:
    m = manifest()
    back = roundtrip(m)
    assert back == dataclasses.replace(m, preprocess=back.preprocess)
    assert back.preprocess == {"mean": [0.5, 1.0], "std": 0.25, "channel_order": "RGB"}
    assert back.model_id == "digits@2.0.0" and back.path == "digits/2.0.0/model.onnx"


def test_minimal_manifest_round_trips() -> None:
    m = manifest(golden=None, float_variant=None, latency_budget_ms=None, requires={}, preprocess={})
    assert roundtrip(m) == m


def test_non_finite_numbers_cannot_be_written() -> None:
    with pytest.raises(ManifestError, match="finite"):
        manifest(latency_budget_ms=float("inf")).to_custom()


def custom_with(**edits: object) -> dict:
    body = manifest().to_custom()["edge"]
    for key, value in edits.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return {"edge": body}


@pytest.mark.parametrize(
    ("edits", "match"),
    [
        ({"schema": 2}, "schema"),
        ({"kind": "golden"}, "kind"),
        ({"name": "Digits!"}, "model name"),
        ({"version": "2.0.0-rc1"}, "version"),
        ({"version": "3.0.0"}, "does not hold"),
        ({"sha256": "AB" * 32}, "sha256"),
        ({"length": 0}, "length"),
        ({"length": True}, "length"),
        ({"quantization": "fp16"}, "quantization"),
        ({"input": {"name": "x", "shape": [1, -3], "dtype": "uint8"}}, "shape"),
        ({"input": {"name": "x", "shape": [1, 3], "dtype": "float64"}}, "dtype"),
        ({"preprocess": [1, 2]}, "preprocess"),
        ({"latency_budget_ms": "fast"}, "latency_budget_ms"),
        ({"latency_budget_ms": -1}, "latency_budget_ms"),
        ({"requires": {"onnxruntime": "latest"}}, "version"),
        (
            {
                "golden": {
                    "path": "digits/2.0.0/other.npz",
                    "sha256": "cd" * 32,
                    "length": 9,
                    "count": 1,
                    "tolerance": 0,
                }
            },
            "golden path",
        ),
        (
            {
                "golden": {
                    "path": "digits/2.0.0/golden.npz",
                    "sha256": "cd" * 32,
                    "length": 9,
                    "count": 1,
                    "tolerance": "-0.5",
                }
            },
            "tolerance",
        ),
        (
            {
                "golden": {
                    "path": "digits/2.0.0/golden.npz",
                    "sha256": "cd" * 32,
                    "length": 9,
                    "count": 1,
                    "tolerance": 0,
                    "min_agreement": "1.5",
                }
            },
            "min_agreement",
        ),
        ({"float_variant": {"path": "digits/2.0.0/model.onnx", "sha256": "ef" * 32, "length": 5}}, "float_variant"),
        ({"publisher": 7}, "publisher"),
    ],
)
def test_malformed_manifests_are_rejected_by_name(edits: dict, match: str) -> None:
    m = manifest()
    with pytest.raises(ManifestError, match=match) as info:
        ModelManifest.from_custom(m.path, custom_with(**edits), length=m.length, sha256=m.sha256)
    assert isinstance(info.value, InputError)  # bad input, not a crash: the updater rejects the release


def test_manifest_must_match_the_signed_target() -> None:
    m = manifest()
    custom = m.to_custom()
    with pytest.raises(ManifestError, match="do not match"):
        ModelManifest.from_custom(m.path, custom, length=m.length + 1, sha256=m.sha256)
    with pytest.raises(ManifestError, match="do not match"):
        ModelManifest.from_custom(m.path, custom, length=m.length, sha256="00" * 32)
    with pytest.raises(ManifestError, match="does not hold"):
        ModelManifest.from_custom("digits/9.0.0/model.onnx", custom, length=m.length, sha256=m.sha256)
    with pytest.raises(ManifestError, match="no 'edge' manifest"):
        ModelManifest.from_custom(m.path, {"other": 1}, length=m.length, sha256=m.sha256)


def test_float_variant_only_beside_an_int8_primary() -> None:
    m = manifest(quantization="float")
    with pytest.raises(ManifestError, match="float variant"):
        roundtrip(m)


def test_versions_compare_numerically_and_ignore_trailing_zeros() -> None:
    assert version_key("1.10.0") > version_key("1.9.9")
    assert version_key("2") == version_key("2.0.0")
    assert version_key("0.0.1") < version_key("0.1")
    for bad in ("", "1.", "01.2", "1.2.3.4.5", "v1", 1, None):
        with pytest.raises(ManifestError):
            version_key(bad)


def test_names_and_paths() -> None:
    assert validate_name("mobilenetv2-bench") == "mobilenetv2-bench"
    for bad in ("", "Digits", "-x", "a/b", "x" * 65, None):
        with pytest.raises(ManifestError):
            validate_name(bad)
    assert target_path("digits", "2.0.0", GOLDEN_FILE) == "digits/2.0.0/golden.npz"
    with pytest.raises(ManifestError, match="unknown release file"):
        target_path("digits", "2.0.0", "../../etc/passwd")


def npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


GOOD_IN = np.zeros((3, 1, 8, 8), np.uint8)
GOOD_OUT = np.zeros((3, 10), np.float32)


def test_golden_samples_parse_and_check_the_input() -> None:
    g = parse_golden(npz(inputs=GOOD_IN, outputs=GOOD_OUT), input_info=INPUT)
    assert len(g) == 3 and g.outputs.dtype == np.float32


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"not a zip", "readable npz"),
        (npz(inputs=GOOD_IN), "exactly"),
        (npz(inputs=GOOD_IN, outputs=GOOD_OUT, extra=GOOD_OUT), "exactly"),
        (npz(inputs=GOOD_IN, outputs=GOOD_OUT.astype(np.float64)), "float32"),
        (npz(inputs=GOOD_IN, outputs=GOOD_OUT[:2]), "N = 3"),
        (npz(inputs=GOOD_IN, outputs=np.full((3, 10), np.nan, np.float32)), "finite"),
        (npz(inputs=GOOD_IN.astype(np.int64), outputs=GOOD_OUT), "dtype"),
        (npz(inputs=np.zeros((3, 1, 9, 9), np.uint8), outputs=GOOD_OUT), "the model takes"),
        (npz(inputs=GOOD_IN.astype(np.int8), outputs=GOOD_OUT), "the model takes"),
        (npz(inputs=np.zeros((0, 1, 8, 8), np.uint8), outputs=np.zeros((0, 10), np.float32)), "N >= 1"),
        (b"\0" * (MAX_GOLDEN_BYTES + 1), "more than"),
    ],
)
def test_malformed_golden_samples_are_rejected(data: bytes, match: str) -> None:
    with pytest.raises(ManifestError, match=match):
        parse_golden(data, input_info=INPUT)


def test_pickled_golden_samples_are_refused() -> None:
    buf = io.BytesIO()
    np.savez(buf, inputs=np.array([{"a": 1}], dtype=object), outputs=GOOD_OUT)
    with pytest.raises(ManifestError, match="pickles"):
        parse_golden(buf.getvalue())


# -- hostile golden files: refused from what they declare, before anything of that size is allocated ---------------


def test_golden_zip_bomb_is_refused_without_inflating() -> None:
    data = bomb(2 * MAX_GOLDEN_BYTES)  # 128 MiB of zeros in ~130 KiB
    assert len(data) < MAX_GOLDEN_BYTES // 100
    declared = rf"golden file: array 'inputs' declares \d+ bytes uncompressed, the limit is {MAX_GOLDEN_BYTES}"
    with traced_peak() as peak, pytest.raises(ManifestError, match=declared):
        parse_golden(data, input_info=INPUT)
    assert peak[0] < MAX_PEAK


def test_golden_header_declaring_a_terabyte_array_is_refused_unallocated(tmp_path) -> None:
    path = tmp_path / "golden.npz"
    path.write_bytes(zip_of({"inputs.npy": npy_header((TiB, 1, 1, 1), "|u1"), "outputs.npy": npy_header((1, 10))}))
    declared = rf"golden file {path}: array 'inputs': the .npy header declares .* = {TiB} bytes, the limit is"
    with traced_peak() as peak, pytest.raises(ManifestError, match=declared):
        load_golden(path, input_info=INPUT)
    assert peak[0] < MAX_PEAK


def test_oversized_golden_file_is_refused_before_it_is_read(tmp_path) -> None:
    path = sparse_file(tmp_path / "golden.npz", MAX_GOLDEN_BYTES + 1)
    with traced_peak() as peak, pytest.raises(ManifestError, match=rf"{path} is {MAX_GOLDEN_BYTES + 1} bytes, more"):
        load_golden(path)
    assert peak[0] < MAX_PEAK


def test_pickled_golden_arrays_are_refused_without_unpickling() -> None:
    # The "pickle" of a class whose unpickling would run code: refused from the header's dtype, never loaded.
    structured = np.zeros(3, dtype=[("x", "<f4"), ("payload", "O")])
    with pytest.raises(ManifestError, match="pickles are refused"):
        parse_golden(npz(inputs=structured, outputs=GOOD_OUT))
