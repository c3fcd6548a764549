"""Static int8 quantization of ONNX models for the box, and the calibration sets it needs.

The one recipe: onnxruntime's static QDQ quantizer, activations uint8 and weights int8 (U8S8), MinMax calibration
over representative preprocessed inputs. On x86 and ARM onnxruntime runs U8S8 QDQ through its QLinear/integer
kernels; S8S8 was measured 1.7x slower and dynamic quantization 11x slower (docs/models.md).

With ``fuse_input`` (the default) the graph is then rewritten so its input is the already-quantized uint8 tensor:
the ``QuantizeLinear`` fed by the float input is removed and its output becomes the graph input (keeping the input's
name and shape). The box's preprocessor writes quantized bytes straight into the model, so the float tensor is never
materialised. The input's scale and zero point stay in the graph, on the ``DequantizeLinear`` that now consumes the
input; :class:`edge.inference.model.Model` reads them from there.

Invariants: the output model keeps the source's ``metadata_props`` (plus ``edge.quantization``); the written file is
replaced atomically; an unusable model is a :class:`ModelError`, an unusable calibration set an :class:`InputError`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from edge._fs import atomic_write
from edge.arrays import ArrayLimits, NpzArchive, is_npy, read_npy
from edge.errors import ConfigError, InputError, ModelError
from edge.inference.limits import MAX_MODEL_BYTES

__all__ = ["load_calibration", "quantize_static_model"]

F32 = npt.NDArray[np.float32]

# Upper bounds on a calibration set: MinMax keeps every activation of every sample in memory while it runs, and the
# samples are stacked into one float32 array first. 2 GiB holds 3,500 float32 samples of 3 x 224 x 224, many more
# than MinMax needs (a few hundred).
MAX_CALIBRATION_SAMPLES: Final = 10_000
MAX_CALIBRATION_BYTES: Final = 2 * 2**30
CALIBRATION_LIMITS: Final = ArrayLimits(
    max_file_bytes=MAX_CALIBRATION_BYTES,
    max_array_bytes=MAX_CALIBRATION_BYTES,
    max_total_bytes=MAX_CALIBRATION_BYTES,
    max_arrays=MAX_CALIBRATION_SAMPLES,
)


def _finish_calibration(samples: list[npt.NDArray[Any]], source: str) -> F32:
    """Stack single samples into ``(N, ...)`` float32, checking they agree."""
    if not samples:
        raise InputError(f"calibration set {source} has no samples")
    if len(samples) > MAX_CALIBRATION_SAMPLES:
        raise InputError(f"calibration set {source} has {len(samples)} samples, the limit is {MAX_CALIBRATION_SAMPLES}")
    # A sample saved with its batch dimension, (1, C, H, W), is the same sample as (C, H, W).
    shaped = [s[0] if s.ndim == 4 and s.shape[0] == 1 else s for s in samples]
    first = shaped[0].shape
    for i, s in enumerate(shaped):
        if s.shape != first:
            raise InputError(f"calibration set {source}: sample {i} has shape {s.shape}, sample 0 has {first}")
    return _check_floats(np.stack(shaped), source)


def _check_floats(arr: npt.NDArray[Any], source: str) -> F32:
    if arr.dtype.kind not in "fiu":
        raise InputError(f"calibration set {source} has dtype {arr.dtype}, expected numbers")
    if arr.ndim < 2 or arr.shape[0] == 0:
        raise InputError(f"calibration set {source} has shape {arr.shape}, expected (N, ...) with N >= 1")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        raise InputError(f"calibration set {source} contains NaN or infinite values")
    return out


def load_calibration(path: str | os.PathLike[str]) -> F32:
    """Read a calibration set of preprocessed model inputs.

    Accepted layouts:

    - an ``.npz`` with an array named ``inputs`` of shape ``(N, C, H, W)`` (any ``(N, ...)``);
    - an ``.npz`` without ``inputs``: every array in it is one sample;
    - a directory of ``.npy`` files, one sample each (read in name order).

    A single sample may carry its batch dimension (``(1, C, H, W)``); it is dropped.

    Args:
        path: the ``.npz`` file or the directory.

    Returns:
        The samples, float32 ``(N, ...)``, C-contiguous.

    Raises:
        InputError: the path does not exist, cannot be parsed, is empty, holds non-numeric or non-finite values,
            samples of different shapes, or more than ``MAX_CALIBRATION_SAMPLES`` samples.
    """
    p = Path(path)
    source = str(p)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix == ".npy" and f.is_file())
        if len(files) > MAX_CALIBRATION_SAMPLES:
            raise InputError(
                f"calibration directory {source} has {len(files)} .npy files, limit {MAX_CALIBRATION_SAMPLES}"
            )
        # The files' sizes bound the arrays (each header must match its file), so their sum bounds the whole set.
        total = sum(f.stat().st_size for f in files)
        if total > MAX_CALIBRATION_BYTES:
            raise InputError(
                f"calibration directory {source} holds {total} bytes of .npy files, limit {MAX_CALIBRATION_BYTES}"
            )
        samples = []
        for f in files:
            try:
                samples.append(read_npy(f, CALIBRATION_LIMITS))
            except OSError as e:
                raise InputError(f"calibration sample {f} is not a readable .npy file: {e.strerror or e}") from e
        return _finish_calibration(samples, source)
    if not p.is_file():
        raise InputError(f"calibration set {source} does not exist")
    try:
        if is_npy(p):
            raise InputError(f"calibration set {source} is a single .npy array, expected an .npz or a directory")
        with NpzArchive(p, CALIBRATION_LIMITS, label=f"calibration set {source}") as data:
            if "inputs" in data.names:
                return _check_floats(data.read("inputs"), source)
            return _finish_calibration([data.read(k) for k in data.names], source)
    except OSError as e:
        raise InputError(f"calibration set {source} is not a readable .npz file: {e.strerror or e}") from e


def _load_onnx(path: Path) -> Any:
    """Parse a model file with ``onnx``, after bounding its size; weights stored outside the file are refused.

    Raises:
        ModelError: missing, larger than ``MAX_MODEL_BYTES``, not ONNX, or with external data.
    """
    import onnx  # noqa: PLC0415 -- only the quantizer needs onnx; the service never imports it

    try:
        size = path.stat().st_size
    except FileNotFoundError as e:
        raise ModelError(f"model {path}: no such file") from e
    except OSError as e:
        raise ModelError(f"model {path}: cannot read ({e.strerror or e})") from e
    if size > MAX_MODEL_BYTES:
        raise ModelError(f"model {path}: the file is {size} bytes, the limit is {MAX_MODEL_BYTES}")
    try:
        # External data would make onnx open any file the model names (any size, any place): the box loads models
        # from their bytes alone, so a model that needs them is refused below rather than followed.
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError as e:
        raise ModelError(f"model {path}: no such file") from e
    except Exception as e:  # onnx raises DecodeError and friends from protobuf: all mean "not a model"
        raise ModelError(f"model {path}: not a readable ONNX file ({type(e).__name__}: {e})") from e
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise ModelError(f"model {path}: weights stored in external files are not supported (save them in the model)")
    return model


def _static_input_shape(model: Any, path: Path) -> tuple[str, tuple[int, ...]]:
    """The single graph input's name and static shape (a symbolic batch dimension is taken as 1)."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ModelError(f"model {path}: expected exactly one input, found {len(inputs)}")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = []
    for axis, d in enumerate(dims):
        if d.HasField("dim_value") and d.dim_value > 0:
            shape.append(int(d.dim_value))
        elif axis == 0:
            shape.append(1)
        else:
            raise ModelError(f"model {path}: input dimension {axis} is dynamic; only the batch dimension may be")
    return inputs[0].name, tuple(shape)


class _Samples:
    """Feeds the calibration samples one at a time, each with the model's batch dimension of 1."""

    def __init__(self, name: str, samples: F32) -> None:
        self._name = name
        self._samples = samples
        self._it = self._iter()

    def _iter(self) -> Iterator[dict[str, F32]]:
        for i in range(self._samples.shape[0]):
            yield {self._name: self._samples[i : i + 1]}

    def get_next(self) -> dict[str, F32] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = self._iter()


def _fuse_input(model: Any, path: Path) -> None:
    """Make the graph input the output of the QuantizeLinear that consumes it (see the module docstring)."""
    from onnx import helper  # noqa: PLC0415

    graph = model.graph
    name, _ = _static_input_shape(model, path)
    graph_input = next(i for i in graph.input if i.name == name)
    consumers = [n for n in graph.node if name in n.input]
    if len(consumers) != 1 or consumers[0].op_type != "QuantizeLinear" or consumers[0].input[0] != name:
        kinds = [n.op_type for n in consumers]
        raise ModelError(
            f"model {path}: cannot fuse the input, it feeds {kinds} instead of one QuantizeLinear"
            " (quantize without fusing the input: --no-fuse-input)"
        )
    quant = consumers[0]
    inits = {t.name: t for t in graph.initializer}
    if len(quant.input) < 3 or quant.input[2] not in inits:
        raise ModelError(f"model {path}: the input's QuantizeLinear has no constant zero point")
    elem_type = inits[quant.input[2]].data_type
    q_out = quant.output[0]
    graph.node.remove(quant)
    # Renaming the quantized tensor to the input's name keeps the model's interface name ("input").
    for node in graph.node:
        for i, tensor in enumerate(node.input):
            if tensor == q_out:
                node.input[i] = name
    for out in graph.output:
        if out.name == q_out:
            out.name = name
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in graph_input.type.tensor_type.shape.dim]
    new_input = helper.make_tensor_value_info(name, elem_type, dims)
    index = list(graph.input).index(graph_input)
    graph.input.remove(graph_input)
    graph.input.insert(index, new_input)
    for vi in list(graph.value_info):
        if vi.name in (q_out, name):
            graph.value_info.remove(vi)
    used = {t for n in graph.node for t in n.input}
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)


def quantize_static_model(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    calibration: F32,
    *,
    per_channel: bool = True,
    fuse_input: bool = True,
) -> None:
    """Quantize a float ONNX model to static U8S8 QDQ, optionally with its input fused to uint8.

    Args:
        in_path: the float32 model (one input, static shape apart from the batch dimension).
        out_path: where to write the quantized model (replaced atomically).
        calibration: representative preprocessed inputs, float32 ``(N, ...)`` where ``...`` is the model's input
            shape without its batch dimension, as the box's preprocessor produces them.
        per_channel: per-output-channel weight scales (more accurate, same speed); ``False`` for per-tensor.
        fuse_input: rewrite the graph so its input is the quantized uint8 tensor (see the module docstring).

    Raises:
        ModelError: the model cannot be read, has not exactly one input, a dynamic non-batch dimension, or cannot
            be quantized or fused.
        ConfigError: the ``onnx`` package the quantizer needs is not installed.
        InputError: the calibration set does not match the model's input shape or holds non-finite values.
    """
    try:
        from onnxruntime.quantization import (  # noqa: PLC0415 -- keep the quantizer out of the service's imports
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quant_pre_process,
            quantize_static,
        )
    except ImportError as e:
        # The box's runtime has onnxruntime but not onnx, which the quantizer needs: quantize on a workstation.
        raise ConfigError("python package", e.name or "onnx", "installed to quantize (pip install onnx)") from e

    src = Path(in_path)
    dst = Path(out_path)
    model = _load_onnx(src)
    name, shape = _static_input_shape(model, src)
    calib = _check_floats(np.asarray(calibration), "array")
    if calib.shape[1:] != shape[1:]:
        raise InputError(
            f"calibration samples have shape {calib.shape[1:]}, the model input {name!r} needs {shape[1:]}"
        )
    metadata = {p.key: p.value for p in model.metadata_props}

    with tempfile.TemporaryDirectory(prefix="edge-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quantized = Path(tmp) / "quant.onnx"
        try:
            # Shape inference and graph optimisation first: the quantizer needs shapes, and folding BatchNorm etc.
            # before calibration avoids quantizing tensors that the runtime would fold away. The input is static
            # (checked above), so ONNX shape inference suffices; the symbolic pass would need sympy on the box.
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            quantize_static(
                str(pre),
                str(quantized),
                _Samples(name, calib),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
        except (InputError, ModelError):
            raise
        except Exception as e:  # the quantizer raises anything from protobuf, numpy and onnxruntime
            raise ModelError(f"model {src}: quantization failed ({type(e).__name__}: {e})") from e
        out = _load_onnx(quantized)

    if fuse_input:
        _fuse_input(out, src)
    metadata["edge.quantization"] = json.dumps(
        {
            "format": "QDQ",
            "activations": "uint8",
            "weights": "int8",
            "per_channel": per_channel,
            "input_fused": fuse_input,
            "calibration_samples": int(calib.shape[0]),
        },
        sort_keys=True,
    )
    del out.metadata_props[:]
    for key, value in metadata.items():
        entry = out.metadata_props.add()
        entry.key = key
        entry.value = value
    import onnx  # noqa: PLC0415

    try:
        onnx.checker.check_model(out)
    except Exception as e:
        raise ModelError(f"model {src}: the quantized graph does not validate ({e})") from e
    atomic_write(dst, out.SerializeToString())
