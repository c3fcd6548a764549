"""The quantizer's inputs are bounded like the box's: a calibration set is refused from what it declares (npy
headers, zip members, file sizes) before anything of that size is allocated, and a model file from its size or its
external data before ``onnx`` parses or follows it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hostile_files import MAX_PEAK, TiB, npy_header, sparse_file, traced_peak, zip_of
from onnx import TensorProto, helper, numpy_helper

from edge.errors import InputError, ModelError
from edge.inference.model import MAX_MODEL_BYTES
from edge.inference.quantize import MAX_CALIBRATION_BYTES, load_calibration, quantize_static_model


def test_calibration_header_declaring_a_terabyte_is_refused_unallocated(tmp_path) -> None:
    path = tmp_path / "calib.npz"
    path.write_bytes(zip_of({"inputs.npy": npy_header((TiB // 4, 1), "<f4")}))
    with traced_peak() as peak, pytest.raises(InputError, match=rf"calib\.npz: array 'inputs': .* = {TiB} bytes"):
        load_calibration(path)
    assert peak[0] < MAX_PEAK


def test_calibration_directory_larger_than_the_limit_is_refused_before_reading(tmp_path) -> None:
    half = MAX_CALIBRATION_BYTES // 2 + 1
    for name in ("a.npy", "b.npy"):
        sparse_file(tmp_path / name, half, head=npy_header((half - 128,), "|u1"))
    with traced_peak() as peak, pytest.raises(InputError, match=rf"holds {2 * half} bytes of .npy files, limit"):
        load_calibration(tmp_path)
    assert peak[0] < MAX_PEAK


def test_pickled_calibration_sample_is_refused(tmp_path) -> None:
    np.save(tmp_path / "s.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="pickles are refused"):
        load_calibration(tmp_path)


def test_quantizer_refuses_an_oversized_model_before_parsing_it(tmp_path) -> None:
    path = sparse_file(tmp_path / "huge.onnx", MAX_MODEL_BYTES + 1, head=b"\x08\x07")
    with pytest.raises(ModelError, match=rf"huge\.onnx: the file is {MAX_MODEL_BYTES + 1} bytes, the limit is"):
        quantize_static_model(path, tmp_path / "q.onnx", np.zeros((2, 3, 4, 4), np.float32))


def test_quantizer_refuses_weights_in_external_files(tmp_path) -> None:
    weight = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "external.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, size_threshold=0)
    with pytest.raises(ModelError, match="weights stored in external files are not supported"):
        quantize_static_model(path, tmp_path / "q.onnx", np.zeros((2, 3, 4, 4), np.float32))
