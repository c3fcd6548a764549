"""The model manifest: what a TUF target's custom metadata says about a model, and the golden-sample file format.

This is the contract between the fleet's repository (``edge fleet models publish`` writes it) and the box (the
updater reads it). It is sans-IO apart from :func:`load_golden`, which reads one file.

Targets of one release live under ``<name>/<version>/`` with fixed file names, so a box can ask for a release by
name and version without listing the repository:

- ``<name>/<version>/model.onnx``: the primary model (int8 when a float variant exists); its custom metadata is
  ``{"edge": {...}}`` as :meth:`ModelManifest.to_custom` writes it.
- ``<name>/<version>/model-float.onnx``: the optional float variant (custom ``{"edge": {"kind": "variant"}}``).
- ``<name>/<version>/golden.npz``: the optional golden samples (custom ``{"edge": {"kind": "golden"}}``).

Every one of them is a TUF target, so TUF checks its length and hashes; the manifest repeats the companions' SHA-256
and length so that a companion swapped under the same path is also caught by the box.

TUF signs canonical JSON, which has no floats: :meth:`ModelManifest.to_custom` writes an integral float as an int and
any other as its shortest decimal string (``0.05`` -> ``"0.05"``), and :meth:`ModelManifest.from_custom` reads such
strings back where it expects a number.

A golden file is an ``.npz`` (no pickles) with ``inputs``: N model input tensors stacked on the batch axis in the
model's input dtype (already preprocessed), and ``outputs``: the N expected raw outputs as float32. A candidate passes
when every output value is within ``tolerance`` of the expected one and the share of samples whose argmax matches is
at least ``min_agreement``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from edge.arrays import ArrayLimits, NpzArchive
from edge.errors import InputError
from edge.wire.errors import ManifestError

__all__ = [
    "FLOAT_FILE",
    "GOLDEN_FILE",
    "GOLDEN_LIMITS",
    "MAX_GOLDEN_BYTES",
    "MODEL_FILE",
    "Companion",
    "GoldenSamples",
    "GoldenSpec",
    "InputInfo",
    "ModelManifest",
    "parse_golden",
    "release_dir",
    "target_path",
    "validate_name",
    "version_key",
]

SCHEMA: Final = 1
MODEL_FILE: Final = "model.onnx"
FLOAT_FILE: Final = "model-float.onnx"
GOLDEN_FILE: Final = "golden.npz"
# The golden samples may take this much on disk and, once inflated, in memory: every array and all of them together.
MAX_GOLDEN_BYTES: Final = 64 * 2**20
GOLDEN_LIMITS: Final = ArrayLimits(
    max_file_bytes=MAX_GOLDEN_BYTES, max_array_bytes=MAX_GOLDEN_BYTES, max_total_bytes=MAX_GOLDEN_BYTES, max_arrays=8
)
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_VERSION = re.compile(r"(0|[1-9][0-9]{0,8})(\.(0|[1-9][0-9]{0,8})){0,3}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DTYPES = ("float32", "uint8", "int8")

Quantization = Literal["int8", "float"]


def validate_name(name: object) -> str:
    """Check a model name (``[a-z0-9][a-z0-9_-]{0,63}``); returns it or raises :class:`ManifestError`."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ManifestError(f"model name must match [a-z0-9][a-z0-9_-]{{0,63}}, got {name!r:.80}")
    return name


def version_key(version: object) -> tuple[int, ...]:
    """The sort key of a dotted numeric version (``"2"``, ``"1.10.3"``); raises :class:`ManifestError`.

    Trailing zeros do not count: ``"2"`` and ``"2.0.0"`` are the same version.
    """
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise ManifestError(f"version must be 1 to 4 dot-separated numbers like 2.0.1, got {version!r:.80}")
    parts = [int(p) for p in version.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def release_dir(name: str, version: str) -> str:
    """The target directory of one release, ``<name>/<version>``, after validating both."""
    validate_name(name)
    version_key(version)
    return f"{name}/{version}"


def target_path(name: str, version: str, filename: str = MODEL_FILE) -> str:
    """The TUF target path of one file of a release (``MODEL_FILE``, ``FLOAT_FILE`` or ``GOLDEN_FILE``)."""
    if filename not in (MODEL_FILE, FLOAT_FILE, GOLDEN_FILE):
        raise ManifestError(f"unknown release file {filename!r}")
    return f"{release_dir(name, version)}/{filename}"


@dataclass(frozen=True, slots=True)
class InputInfo:
    """The model's input as the manifest states it (the box checks it against the loaded model).

    Attributes:
        name: the graph input's name.
        shape: the static shape, batch first.
        dtype: "float32", "uint8" or "int8".
    """

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True, slots=True)
class Companion:
    """A companion file of the release (float variant or golden samples): its target path, SHA-256 and length."""

    path: str
    sha256: str
    length: int


@dataclass(frozen=True, slots=True)
class GoldenSpec:
    """Where the golden samples are and how close a candidate must come.

    Attributes:
        file: the golden ``.npz`` target.
        count: how many samples it holds.
        tolerance: largest allowed absolute difference of any output value.
        min_agreement: least share of samples whose argmax must match (1.0: all).
    """

    file: Companion
    count: int
    tolerance: float
    min_agreement: float = 1.0


@dataclass(frozen=True, slots=True)
class ModelManifest:
    """One release of one model, as its publisher described it and signed it.

    Attributes:
        name, version: identity (``name@version`` is the model id the box reports).
        sha256, length: of the primary model file (``<name>/<version>/model.onnx``).
        quantization: the primary file's kind: "int8" or "float".
        input: the input the model expects.
        preprocess: the preprocessing parameters (the model's ``edge.preprocess`` metadata, as JSON).
        latency_budget_ms: the p50 latency of one inference the box must reach, or None for no budget.
        requires: minimum runtime versions, e.g. ``{"onnxruntime": "1.17", "edge": "0.1"}``.
        golden: the golden samples, or None.
        float_variant: the float variant when the primary is int8, or None.
        publisher: the publisher (delegated TUF role) that signed it.
    """

    name: str
    version: str
    sha256: str
    length: int
    quantization: Quantization
    input: InputInfo
    preprocess: Mapping[str, Any] = field(default_factory=dict)
    latency_budget_ms: float | None = None
    requires: Mapping[str, str] = field(default_factory=dict)
    golden: GoldenSpec | None = None
    float_variant: Companion | None = None
    publisher: str = ""

    @property
    def model_id(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"

    @property
    def path(self) -> str:
        """The primary model's target path."""
        return target_path(self.name, self.version, MODEL_FILE)

    def to_custom(self) -> dict[str, Any]:
        """The TUF target custom metadata of the primary model file: ``{"edge": {...}}`` (canonical-JSON-ready)."""
        body: dict[str, Any] = {
            "schema": SCHEMA,
            "kind": "model",
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "length": self.length,
            "quantization": self.quantization,
            "input": {"name": self.input.name, "shape": list(self.input.shape), "dtype": self.input.dtype},
            "preprocess": dict(self.preprocess),
            "latency_budget_ms": self.latency_budget_ms,
            "requires": dict(self.requires),
            "publisher": self.publisher,
        }
        if self.golden is not None:
            g = self.golden
            body["golden"] = {
                **_companion_json(g.file),
                "count": g.count,
                "tolerance": g.tolerance,
                "min_agreement": g.min_agreement,
            }
        if self.float_variant is not None:
            body["float_variant"] = _companion_json(self.float_variant)
        return {"edge": _canonical(body)}

    @classmethod
    def from_custom(cls, path: str, custom: Mapping[str, Any], *, length: int, sha256: str) -> ModelManifest:
        """Parse and check the manifest of target ``path`` from its custom metadata.

        Args:
            path: the target path (must be ``<name>/<version>/model.onnx`` of the manifest's name and version).
            custom: the target's custom metadata.
            length, sha256: the target's length and SHA-256 from TUF (must equal the manifest's).

        Raises:
            ManifestError: anything is missing, malformed or inconsistent.
        """
        body = custom.get("edge") if isinstance(custom, Mapping) else None
        if not isinstance(body, Mapping):
            raise ManifestError(f"target {path!r:.120} has no 'edge' manifest in its custom metadata")
        body = _numbers_back(body)
        if body.get("schema") != SCHEMA or body.get("kind") != "model":
            raise ManifestError(
                f"target {path!r:.120}: manifest schema {body.get('schema')!r} kind {body.get('kind')!r}"
            )
        name = validate_name(body.get("name"))
        version = body.get("version")
        version_key(version)
        assert isinstance(version, str)
        if path != target_path(name, version):
            raise ManifestError(
                f"target {path!r:.120} does not hold {name}@{version} (expected {target_path(name, version)})"
            )
        m = cls(
            name=name,
            version=version,
            sha256=_sha256(body.get("sha256"), "sha256"),
            length=_length(body.get("length"), "length"),
            quantization=_choice(body.get("quantization"), ("int8", "float"), "quantization"),  # type: ignore[arg-type]
            input=_input(body.get("input")),
            preprocess=_mapping(body.get("preprocess", {}), "preprocess"),
            latency_budget_ms=_optional_positive(body.get("latency_budget_ms"), "latency_budget_ms"),
            requires=_requires(body.get("requires", {})),
            golden=_golden(body.get("golden"), name, version),
            float_variant=_companion(
                body.get("float_variant"), target_path(name, version, FLOAT_FILE), "float_variant"
            ),
            publisher=_text(body.get("publisher", ""), "publisher"),
        )
        if m.sha256 != sha256.lower() or m.length != length:
            raise ManifestError(f"{m.model_id}: the manifest's sha256/length do not match the target's")
        if m.float_variant is not None and m.quantization != "int8":
            raise ManifestError(f"{m.model_id}: a float variant is only offered beside an int8 primary")
        return m


@dataclass(frozen=True, slots=True)
class GoldenSamples:
    """Golden samples as loaded: ``inputs`` (N, ...) in the model's input dtype, ``outputs`` (N, K) float32."""

    inputs: npt.NDArray[Any]
    outputs: npt.NDArray[np.float32]

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


def parse_golden(data: bytes, *, input_info: InputInfo | None = None, label: str = "golden file") -> GoldenSamples:
    """Parse golden samples from the bytes of an ``.npz`` file (no pickles).

    Every size the file declares is checked before anything is allocated from it (:data:`GOLDEN_LIMITS`, see
    :mod:`edge.arrays`): the file, each member's uncompressed size and their sum, each array's shape x dtype.

    Args:
        data: the file's contents.
        input_info: when given, every sample must match its shape (batch axis excepted) and dtype.
        label: how messages name the file.

    Raises:
        ManifestError: not an npz, pickled or missing arrays, a declared size over the limits, wrong dtypes or
            shapes, non-finite values.
    """
    if len(data) > MAX_GOLDEN_BYTES:
        raise ManifestError(f"{label} is {len(data)} bytes, more than {MAX_GOLDEN_BYTES}")
    try:
        with NpzArchive(data, GOLDEN_LIMITS, label=label) as z:
            if set(z.names) != {"inputs", "outputs"}:
                raise ManifestError(f"{label} must hold exactly 'inputs' and 'outputs', found {sorted(z.names)}")
            inputs = z.read("inputs")
            outputs = z.read("outputs")
    except ManifestError:
        raise
    except InputError as e:
        # The reader's message names the file, the declared size and the limit; only the error's type changes.
        raise ManifestError(str(e)) from e
    if inputs.ndim < 2 or inputs.shape[0] < 1:
        raise ManifestError(f"golden inputs must be (N, ...) with N >= 1, got shape {inputs.shape}")
    if outputs.dtype != np.float32 or outputs.ndim != 2 or outputs.shape[0] != inputs.shape[0]:
        raise ManifestError(
            f"golden outputs must be float32 (N, K) with N = {inputs.shape[0]}, got {outputs.dtype} {outputs.shape}"
        )
    if not np.isfinite(outputs).all():
        raise ManifestError("golden outputs must be finite")
    if str(inputs.dtype) not in _DTYPES:
        raise ManifestError(f"golden inputs dtype must be one of {_DTYPES}, got {inputs.dtype}")
    if inputs.dtype == np.float32 and not np.isfinite(inputs).all():
        raise ManifestError("golden inputs must be finite")
    if input_info is not None:
        want = tuple(input_info.shape[1:])
        if str(inputs.dtype) != input_info.dtype or tuple(inputs.shape[1:]) != want:
            raise ManifestError(
                f"golden inputs are {inputs.dtype}{list(inputs.shape[1:])}, "
                f"the model takes {input_info.dtype}{list(want)}"
            )
    return GoldenSamples(inputs=inputs, outputs=outputs)


# -- canonical JSON: no floats ---------------------------------------------------------------------------------------


def _canonical(value: Any) -> Any:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ManifestError(f"manifest numbers must be finite, got {value!r}")
        return int(value) if value.is_integer() else repr(value)
    if isinstance(value, Mapping):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


_DECIMAL = re.compile(r"-?(0|[1-9][0-9]{0,17})(\.[0-9]{1,17})?(e-?[0-9]{1,3})?")


def _decimal(v: Any) -> Any:
    """A decimal string written by ``_canonical`` as a float; anything else as it is (the field check names it)."""
    if isinstance(v, str) and _DECIMAL.fullmatch(v):
        return float(v)
    if isinstance(v, list):
        return [_decimal(x) for x in v]
    return v


def _numbers_back(body: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(body)
    if "latency_budget_ms" in out:
        out["latency_budget_ms"] = _decimal(out["latency_budget_ms"])
    for section, keys in (("golden", ("tolerance", "min_agreement")), ("preprocess", ("mean", "std"))):
        if isinstance(out.get(section), Mapping):
            inner = dict(out[section])
            for key in keys:
                if key in inner:
                    inner[key] = _decimal(inner[key])
            out[section] = inner
    return out


# -- field checks -----------------------------------------------------------------------------------------------------


def _companion_json(c: Companion) -> dict[str, Any]:
    return {"path": c.path, "sha256": c.sha256, "length": c.length}


def _text(v: object, key: str, limit: int = 128) -> str:
    if not isinstance(v, str) or len(v) > limit:
        raise ManifestError(f"manifest {key} must be text of at most {limit} characters, got {v!r:.80}")
    return v


def _sha256(v: object, key: str) -> str:
    if not isinstance(v, str) or not _SHA256.fullmatch(v):
        raise ManifestError(f"manifest {key} must be 64 lower-case hex digits, got {v!r:.80}")
    return v


def _length(v: object, key: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ManifestError(f"manifest {key} must be a positive integer, got {v!r:.40}")
    return v


def _choice(v: object, options: tuple[str, ...], key: str) -> str:
    if v not in options:
        raise ManifestError(f"manifest {key} must be one of {options}, got {v!r:.40}")
    assert isinstance(v, str)
    return v


def _mapping(v: object, key: str) -> dict[str, Any]:
    if not isinstance(v, Mapping):
        raise ManifestError(f"manifest {key} must be an object, got {type(v).__name__}")
    return dict(v)


def _optional_positive(v: object, key: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
        raise ManifestError(f"manifest {key} must be a positive number or null, got {v!r:.40}")
    return float(v)


def _fraction(v: object, key: str, *, allow_zero: bool) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ManifestError(f"manifest {key} must be a number, got {v!r:.40}")
    low_ok = v >= 0 if allow_zero else v > 0
    if not low_ok or v > 1:
        raise ManifestError(f"manifest {key} must be in {'[0' if allow_zero else '(0'}, 1], got {v!r:.40}")
    return float(v)


def _input(v: object) -> InputInfo:
    if not isinstance(v, Mapping):
        raise ManifestError("manifest input must be an object with name, shape and dtype")
    shape = v.get("shape")
    if not (
        isinstance(shape, list)
        and 1 <= len(shape) <= 8
        and all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 1 << 20 for d in shape)
    ):
        raise ManifestError(f"manifest input shape must be 1 to 8 positive integers, got {shape!r:.80}")
    return InputInfo(
        name=_text(v.get("name"), "input name"),
        shape=tuple(shape),
        dtype=_choice(v.get("dtype"), _DTYPES, "input dtype"),
    )


def _requires(v: object) -> dict[str, str]:
    if not isinstance(v, Mapping) or len(v) > 8:
        raise ManifestError("manifest requires must be an object of at most 8 runtime: minimum-version entries")
    out: dict[str, str] = {}
    for k, ver in v.items():
        key = _text(k, "requires key", 32)
        version_key(ver)
        out[key] = str(ver)
    return out


def _companion(v: object, expected_path: str, key: str) -> Companion | None:
    if v is None:
        return None
    if not isinstance(v, Mapping):
        raise ManifestError(f"manifest {key} must be an object with path, sha256 and length")
    if v.get("path") != expected_path:
        raise ManifestError(f"manifest {key} path must be {expected_path!r}, got {v.get('path')!r:.120}")
    return Companion(
        path=expected_path,
        sha256=_sha256(v.get("sha256"), f"{key} sha256"),
        length=_length(v.get("length"), f"{key} length"),
    )


def _golden(v: object, name: str, version: str) -> GoldenSpec | None:
    if v is None:
        return None
    file = _companion(v, target_path(name, version, GOLDEN_FILE), "golden")
    assert file is not None and isinstance(v, Mapping)
    tol = v.get("tolerance")
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not math.isfinite(tol) or tol < 0:
        raise ManifestError(f"manifest golden tolerance must be a finite number >= 0, got {tol!r:.40}")
    return GoldenSpec(
        file=file,
        count=_length(v.get("count"), "golden count"),
        tolerance=float(tol),
        min_agreement=_fraction(v.get("min_agreement", 1.0), "golden min_agreement", allow_zero=True),
    )
