"""edge.inference.model: the bundled models load with the right spec and accuracy; every bad model is a ModelError."""

from __future__ import annotations

import hashlib
import json
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest
from hostile_files import MAX_PEAK, sparse_file, traced_peak
from onnx import TensorProto, helper, numpy_helper

from edge.errors import InputError, ModelError
from edge.inference import _onnx_graph
from edge.inference.model import MAX_MODEL_BYTES, MAX_OUTPUT_VALUES, MAX_TENSOR_BYTES, Model
from edge.inference.preprocess import preprocess_image
from edge.sensing.frames import PixelFormat
from edge.sensing.synthetic import render_test_frames


@pytest.fixture(scope="module")
def fp32(digits_fp32) -> Model:
    return Model(digits_fp32)


@pytest.fixture(scope="module")
def int8(digits_int8) -> Model:
    return Model(digits_int8)


@pytest.fixture(scope="module")
def held_out() -> list[tuple[np.ndarray, int]]:
    return list(render_test_frames(PixelFormat.RGB888))


def save_graph(path, inputs, outputs, nodes, inits=(), metadata=None):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if metadata:
        helper.set_model_props(model, metadata)
    onnx.save(model, str(path))
    return path


def identity_model(path, shape, elem=TensorProto.FLOAT, metadata=None):
    """input -> Identity -> output: the smallest valid model with a given input signature."""
    return save_graph(
        path,
        [helper.make_tensor_value_info("x", elem, shape)],
        [helper.make_tensor_value_info("y", elem, shape)],
        [helper.make_node("Identity", ["x"], ["y"])],
        metadata=metadata,
    )


# -- the bundled models --------------------------------------------------------------------------------------------


def test_fp32_identity_and_spec(fp32, digits_fp32):
    assert (fp32.name, fp32.version, fp32.model_id) == ("digits", "1.0.0", "digits@1.0.0")
    spec = fp32.input_spec
    assert (spec.name, spec.shape, spec.layout, spec.dtype) == ("input", (1, 3, 32, 32), "NCHW", "float32")
    assert (spec.channels, spec.height, spec.width) == (3, 32, 32)
    assert spec.scale is None and spec.zero_point is None and spec.input_quantization is None
    assert fp32.labels == tuple(str(i) for i in range(10))
    assert fp32.output_kind == "logits"
    assert [o.name for o in fp32.outputs] == ["logits"] and fp32.outputs[0].shape == (1, 10)
    assert fp32.file_size == digits_fp32.stat().st_size < 2_000_000


def test_int8_fused_input_spec_matches_the_graph(int8, digits_int8):
    spec = int8.input_spec
    assert (spec.name, spec.shape, spec.dtype) == ("input", (1, 3, 32, 32), "uint8")
    graph = onnx.load(str(digits_int8)).graph
    dq = next(n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "input")
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    assert spec.scale == pytest.approx(float(inits[dq.input[1]]), rel=1e-7)
    assert spec.zero_point == int(inits[dq.input[2]])
    assert inits[dq.input[2]].dtype == np.uint8
    # Inputs were calibrated over [0, 1]: q is about the pixel value.
    assert spec.zero_point == 0 and spec.scale == pytest.approx(1 / 255, rel=0.02)
    assert int8.file_size == digits_int8.stat().st_size < 2_000_000


def test_preprocess_kwargs_come_from_metadata(fp32, int8):
    kw = fp32.preprocess_kwargs()
    assert kw == {
        "size": (32, 32),
        "layout": "NCHW",
        "dtype": "float32",
        "scale": None,
        "zero_point": None,
        "mean": (0.0, 0.0, 0.0),
        "std": (255.0, 255.0, 255.0),
        "channel_order": "RGB",
    }
    kq = int8.preprocess_kwargs()
    assert kq["dtype"] == "uint8" and kq["scale"] == int8.input_spec.scale and kq["zero_point"] == 0


def test_sha256_is_the_file_hash(fp32, int8, digits_fp32, digits_int8):
    assert fp32.sha256 == hashlib.sha256(digits_fp32.read_bytes()).hexdigest()
    assert int8.sha256 == hashlib.sha256(digits_int8.read_bytes()).hexdigest()


def test_warmup_runs_at_load(digits_fp32):
    assert Model(digits_fp32).warmup_runs == 3
    assert Model(digits_fp32, warmup=0).warmup_runs == 0
    assert Model(digits_fp32, warmup=5).warmup_runs == 5


@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_held_out_accuracy_through_the_box_preprocessing(which, request, held_out):
    model: Model = request.getfixturevalue(which)
    kw = model.preprocess_kwargs()
    buf = model.new_input()
    correct = 0
    for frame, label in held_out:
        x = preprocess_image(frame, pixel_format=PixelFormat.RGB888, out=buf, **kw)
        correct += int(np.argmax(model.run(x)) == label)
    assert correct / len(held_out) >= 0.95


@pytest.mark.parametrize("fmt", [PixelFormat.YUYV, PixelFormat.NV12, PixelFormat.BGR888])
def test_int8_recognises_other_pixel_formats(int8, fmt):
    kw = int8.preprocess_kwargs()
    frames = list(render_test_frames(fmt, count=100))
    correct = sum(int(np.argmax(int8.run(preprocess_image(f, pixel_format=fmt, **kw))) == label) for f, label in frames)
    assert correct >= 90


def test_fp32_and_int8_agree(fp32, int8, held_out):
    agree = 0
    for frame, _ in held_out[:100]:
        a = fp32.run(preprocess_image(frame, pixel_format="RGB888", **fp32.preprocess_kwargs()))
        b = int8.run(preprocess_image(frame, pixel_format="RGB888", **int8.preprocess_kwargs()))
        agree += int(a.argmax() == b.argmax())
    assert agree >= 97


def test_session_options_follow_the_arguments(digits_fp32):
    default = Model(digits_fp32, warmup=0).session_options
    assert default.intra_op_num_threads == 1 and default.inter_op_num_threads == 1
    assert default.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert default.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    tuned = Model(digits_fp32, threads=2, spinning=True, warmup=0, optimization="basic").session_options
    assert tuned.intra_op_num_threads == 2
    assert tuned.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert tuned.get_session_config_entry("session.inter_op.allow_spinning") == "1"
    assert "BASIC" in str(tuned.graph_optimization_level)


def test_run_validates_the_tensor(int8, fp32):
    with pytest.raises(InputError, match="uint8"):
        int8.run(np.zeros((1, 3, 32, 32), dtype=np.float32))
    with pytest.raises(InputError):
        fp32.run(np.zeros((1, 32, 32, 3), dtype=np.float32))
    out = fp32.run(fp32.new_input())
    assert out.shape == (1, 10) and out.dtype == np.float32


def test_new_input_is_the_quantized_zero(int8, fp32):
    buf = int8.new_input()
    assert buf.dtype == np.uint8 and buf.shape == (1, 3, 32, 32) and buf.flags.c_contiguous
    assert (buf == int8.input_spec.zero_point).all()
    assert fp32.new_input().dtype == np.float32


@pytest.mark.parametrize(
    "bad_option", [{"threads": 0}, {"warmup": -1}, {"optimization": "fastest"}], ids=["threads", "warmup", "opt"]
)
def test_bad_options_are_input_errors(digits_fp32, bad_option):
    with pytest.raises(InputError):
        Model(digits_fp32, **bad_option)


# -- models without metadata, dynamic shapes -----------------------------------------------------------------------


def test_metadata_fallbacks(tmp_path):
    model = Model(identity_model(tmp_path / "plain.onnx", [1, 3, 8, 8]), warmup=1)
    assert (model.name, model.version, model.model_id) == ("plain", "0", "plain@0")
    kw = model.preprocess_kwargs()
    assert kw["mean"] == 0.0 and kw["std"] == 1.0 and kw["size"] == (8, 8) and kw["channel_order"] == "RGB"
    assert model.output_kind == "logits" and len(model.labels) == 192


def test_dynamic_batch_and_size_resolved_from_metadata(tmp_path):
    meta = {"edge.preprocess": json.dumps({"size": [24, 40], "layout": "NHWC"})}
    model = Model(identity_model(tmp_path / "dyn.onnx", ["N", "H", "W", 3], metadata=meta))
    spec = model.input_spec
    assert spec.shape == (1, 24, 40, 3) and spec.layout == "NHWC" and (spec.height, spec.width) == (24, 40)


def test_raw_uint8_input_without_dequantize_uses_identity_quantization(tmp_path):
    model = Model(identity_model(tmp_path / "u8.onnx", [1, 1, 4, 4], elem=TensorProto.UINT8))
    assert model.input_spec.dtype == "uint8" and (model.input_spec.scale, model.input_spec.zero_point) == (1.0, 0)


# -- every bad model is a ModelError naming the file ---------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        Model(tmp_path / "absent.onnx")


def test_garbage_bytes(tmp_path):
    p = tmp_path / "garbage.onnx"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelError, match=r"garbage\.onnx"):
        Model(p)


def test_not_onnx_at_all(tmp_path):
    p = tmp_path / "text.onnx"
    p.write_text("this is a README, not a model\n")
    with pytest.raises(ModelError, match=r"text\.onnx"):
        Model(p)


def test_truncated_file(tmp_path, digits_fp32):
    p = tmp_path / "truncated.onnx"
    data = digits_fp32.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"truncated\.onnx"):
        Model(p)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.onnx"
    p.write_bytes(b"")
    with pytest.raises(ModelError):
        Model(p)


def test_two_inputs(tmp_path):
    p = save_graph(
        tmp_path / "two.onnx",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 3, 8, 8]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 3, 8, 8]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_node("Add", ["a", "b"], ["y"])],
    )
    with pytest.raises(ModelError, match="exactly one input, found 2"):
        Model(p)


def test_zero_inputs(tmp_path):
    const = numpy_helper.from_array(np.ones((1, 10), dtype=np.float32), "c")
    p = save_graph(
        tmp_path / "none.onnx",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [helper.make_node("Identity", ["c"], ["y"])],
        inits=[const],
    )
    with pytest.raises(ModelError, match="found 0"):
        Model(p)


def test_unresolvable_dynamic_dimension(tmp_path):
    with pytest.raises(ModelError, match="dynamic"):
        Model(identity_model(tmp_path / "dyn.onnx", [1, 3, "H", "W"]))


def test_unsupported_input_dtype(tmp_path):
    with pytest.raises(ModelError, match="unsupported type"):
        Model(identity_model(tmp_path / "i32.onnx", [1, 3, 8, 8], elem=TensorProto.INT32))


def test_non_image_input(tmp_path):
    with pytest.raises(ModelError, match="rank 2"):
        Model(identity_model(tmp_path / "vec.onnx", [1, 16]))


@pytest.mark.parametrize(
    "metadata",
    [
        {"edge.preprocess": "{not json"},
        {"edge.preprocess": json.dumps({"std": [255, 0, 255]})},
        {"edge.preprocess": json.dumps({"size": [32]})},
        {"edge.labels": json.dumps(["only", "two"])},
        {"edge.output": "boxes"},
        {"edge.labels": "[" * 100_000},
    ],
    ids=["json", "std0", "size", "labels", "output-kind", "nested-too-deeply"],
)
def test_malformed_metadata(tmp_path, metadata):
    with pytest.raises(ModelError, match="metadata"):
        Model(identity_model(tmp_path / "meta.onnx", [1, 3, 8, 8], metadata=metadata))


# -- the per-frame path --------------------------------------------------------------------------------------------


def test_bound_buffer_and_any_other_tensor_give_the_same_result(int8, held_out):
    frame, _ = held_out[0]
    buf = int8.new_input()
    preprocess_image(frame, pixel_format="RGB888", out=buf, **int8.preprocess_kwargs())
    bound = int8.run(buf)
    other = int8.run(buf.copy())
    assert np.array_equal(bound, other)
    # The result is the caller's to keep: the next inference must not overwrite it.
    kept = bound.copy()
    buf.fill(0)
    int8.run(buf)
    assert np.array_equal(bound, kept)


def test_concurrent_runs_are_correct(fp32, held_out):
    kw = fp32.preprocess_kwargs()
    inputs = [preprocess_image(f, pixel_format="RGB888", **kw) for f, _ in held_out[:8]]
    expected = [fp32.run(x.copy()) for x in inputs]
    buf = fp32.new_input()

    def job(i: int) -> bool:
        if i % 2:
            return np.array_equal(fp32.run(inputs[i % 8]), expected[i % 8])
        np.copyto(buf, inputs[0])  # every even job writes the same bytes into the bound buffer
        return np.array_equal(fp32.run(buf), expected[0])

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(job, range(64)))


def test_graph_reader_is_bounded_on_truncated_or_hostile_bytes(digits_int8):
    data = digits_int8.read_bytes()
    summary = _onnx_graph.read_graph(data)
    assert sum(n.op_type == "DequantizeLinear" for n in summary.nodes) == 21
    for cut in (1, 7, len(data) // 3, len(data) - 1):
        with pytest.raises(ValueError):
            _onnx_graph.read_graph(data[:cut])
    # A length prefix claiming far more bytes than exist must not be trusted.
    with pytest.raises(ValueError, match="past"):
        _onnx_graph.read_graph(b"\x3a\xff\xff\xff\xff\x0f")


# -- bounds on what a model file declares ----------------------------------------------------------------------------


def test_oversized_model_file_is_refused_before_it_is_read(tmp_path):
    import onnxruntime  # noqa: F401,PLC0415 -- imported before tracing, so the peak is what refusing costs

    path = sparse_file(tmp_path / "huge.onnx", MAX_MODEL_BYTES + 1, head=b"\x08\x07")
    with (
        traced_peak() as peak,
        pytest.raises(
            ModelError, match=rf"huge\.onnx: the file is {MAX_MODEL_BYTES + 1} bytes, the limit is {MAX_MODEL_BYTES}"
        ),
    ):
        Model(path)
    assert peak[0] < MAX_PEAK


def test_input_declaring_a_huge_tensor_is_refused_before_it_is_allocated(tmp_path):
    path = save_graph(
        tmp_path / "wide.onnx",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 20000, 20000])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 1, 1])],
        [helper.make_node("GlobalAveragePool", ["x"], ["y"])],
    )
    with pytest.raises(
        ModelError,
        match=rf"input 'x' declares shape \[1, 3, 20000, 20000\] = 4800000000 bytes, the limit is {MAX_TENSOR_BYTES}",
    ):
        Model(path, warmup=0)


def test_output_declaring_more_classes_than_the_limit_is_refused(tmp_path):
    path = identity_model(tmp_path / "many.onnx", [1, 1, 2048, 1024], elem=TensorProto.UINT8)
    with pytest.raises(ModelError, match=rf"output 'y' declares 2097152 values, the limit is {MAX_OUTPUT_VALUES}"):
        Model(path, warmup=0)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    key, length = (number << 3) | 2, len(payload)
    out = bytearray([key])
    while True:
        out.append((length & 0x7F) | (0x80 if length > 0x7F else 0))
        length >>= 7
        if not length:
            return bytes(out + payload)


@pytest.mark.parametrize(
    ("graph", "match"),
    [
        (_field(1, b"") * (_onnx_graph.MAX_ENTRIES + 1), f"more than {_onnx_graph.MAX_ENTRIES} nodes"),
        (
            _field(1, _field(1, b"") * (_onnx_graph.MAX_NODE_NAMES + 1)),
            f"more than {_onnx_graph.MAX_NODE_NAMES} inputs",
        ),
        (_field(5, b"\x08\x01" * (_onnx_graph.MAX_DIMS + 1)), f"more than {_onnx_graph.MAX_DIMS} dimensions"),
        (_field(5, b"") * (_onnx_graph.MAX_ENTRIES + 1), f"more than {_onnx_graph.MAX_ENTRIES} initializers"),
        (
            _field(11, _field(1, b"") * (_onnx_graph.MAX_ENTRIES + 1)),
            f"more than {_onnx_graph.MAX_ENTRIES} graph inputs",
        ),
    ],
    ids=["nodes", "node-inputs", "dims", "initializers", "graph-inputs"],
)
def test_graph_reader_refuses_a_small_file_that_would_expand_into_many_objects(graph, match):
    # Two bytes per entry in the file; kept, each would be a Python object of ~100 bytes.
    with pytest.raises(ValueError, match=match):
        _onnx_graph.read_graph(_field(7, graph))


def test_graph_reader_leaves_large_unpacked_tensors_undecoded():
    floats = b"".join(b"\x25" + struct.pack("<f", 1.5) for _ in range(_onnx_graph.MAX_DECODED + 1))  # field 4, fixed32
    small = b"".join(b"\x25" + struct.pack("<f", 1.5) for _ in range(3))
    summary = _onnx_graph.read_graph(
        _field(7, _field(5, floats + _field(8, b"w")) + _field(5, small + _field(8, b"s")))
    )
    assert summary.initializers["w"].values is None
    assert summary.initializers["s"].values == (1.5, 1.5, 1.5)


def test_graph_reader_refuses_packed_floats_of_a_partial_width():
    with pytest.raises(ValueError, match="not a multiple of 4"):
        _onnx_graph.read_graph(_field(7, _field(5, _field(4, b"\x00" * 6))))
