"""edge.inference.quantize and ``edge model``: static U8S8 QDQ, the fused uint8 input, calibration sets, the CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge.cli import main as cli_main
from edge.errors import InputError, ModelError
from edge.inference.model import Model
from edge.inference.quantize import load_calibration, quantize_static_model

SHAPE = (1, 3, 16, 16)


def tiny_cnn(path, *, seed=0, metadata=True):
    """Conv(3->8) + ReLU + Conv(8->8, stride 2) + ReLU + GAP + Gemm(8->4): small enough to quantize in ~1 s."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.4).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32), "w2"),
        numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "b2"),
        numpy_helper.from_array((rng.standard_normal((4, 8)) * 0.5).astype(np.float32), "fc"),
        numpy_helper.from_array(np.zeros(4, dtype=np.float32), "fcb"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(SHAPE))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if metadata:
        helper.set_model_props(
            model,
            {
                "edge.name": "tiny",
                "edge.version": "2.1.0",
                "edge.preprocess": json.dumps({"mean": [0, 0, 0], "std": [255, 255, 255], "size": [16, 16]}),
                "edge.labels": json.dumps(["a", "b", "c", "d"]),
            },
        )
    onnx.save(model, str(path))
    return path


def calibration(n, seed=1):
    """Inputs in [0, 1], as the box's preprocessor makes them with std 255."""
    return np.random.default_rng(seed).uniform(0, 1, size=(n, *SHAPE[1:])).astype(np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_cnn(tmp_path_factory.mktemp("tiny") / "tiny.onnx")


@pytest.fixture(scope="module")
def tiny_int8(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_q") / "tiny-int8.onnx"
    quantize_static_model(tiny, out, calibration(32))
    return out


def quantize_input(x, spec):
    return np.clip(np.rint(x / spec.scale) + spec.zero_point, 0, 255).astype(np.uint8)


def test_fused_model_takes_uint8_input_with_the_calibrated_scale(tiny_int8):
    model = Model(tiny_int8, warmup=0)
    spec = model.input_spec
    assert spec.name == "input" and spec.dtype == "uint8" and spec.shape == SHAPE
    # MinMax over [0, 1] inputs: the uint8 range spans [0, ~1], i.e. q is about the pixel value itself.
    assert spec.zero_point == 0
    assert spec.scale == pytest.approx(1 / 255, rel=0.02)
    graph = onnx.load(str(tiny_int8)).graph
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    assert not any(n.op_type == "QuantizeLinear" and "input" in n.input for n in graph.node)
    assert any(n.op_type == "DequantizeLinear" and n.input[0] == "input" for n in graph.node)


def test_quantized_outputs_are_close_to_fp32(tiny, tiny_int8):
    fp32 = Model(tiny, warmup=0)
    int8 = Model(tiny_int8, warmup=0)
    xs = calibration(16, seed=99)
    ref = np.stack([fp32.run(x[None]) for x in xs])
    got = np.stack([int8.run(quantize_input(x[None], int8.input_spec)) for x in xs])
    spread = float(ref.max() - ref.min())
    assert np.abs(got - ref).max() <= 0.05 * spread
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_metadata_is_kept_and_the_recipe_recorded(tiny_int8):
    model = Model(tiny_int8, warmup=0)
    assert model.model_id == "tiny@2.1.0" and model.labels == ("a", "b", "c", "d")
    recipe = json.loads(model.metadata["edge.quantization"])
    assert recipe == {
        "activations": "uint8",
        "calibration_samples": 32,
        "format": "QDQ",
        "input_fused": True,
        "per_channel": True,
        "weights": "int8",
    }


def test_unfused_model_keeps_float_input_and_reports_its_quantization(tiny, tmp_path):
    out = tmp_path / "q.onnx"
    quantize_static_model(tiny, out, calibration(8), fuse_input=False, per_channel=False)
    spec = Model(out, warmup=0).input_spec
    assert spec.dtype == "float32" and spec.scale is None
    assert spec.input_quantization is not None
    scale, zero_point = spec.input_quantization
    assert scale == pytest.approx(1 / 255, rel=0.05) and zero_point == 0


def test_calibration_of_the_wrong_shape_is_rejected(tiny, tmp_path):
    with pytest.raises(InputError, match="shape"):
        quantize_static_model(tiny, tmp_path / "q.onnx", np.zeros((4, 3, 8, 8), dtype=np.float32))
    with pytest.raises(InputError, match="NaN"):
        quantize_static_model(tiny, tmp_path / "q.onnx", np.full((2, *SHAPE[1:]), np.nan, dtype=np.float32))
    assert not (tmp_path / "q.onnx").exists()


def test_quantizing_a_non_model_is_a_model_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 50)
    with pytest.raises(ModelError, match=str(bad)):
        quantize_static_model(bad, tmp_path / "q.onnx", calibration(2))
    with pytest.raises(ModelError, match="no such file"):
        quantize_static_model(tmp_path / "missing.onnx", tmp_path / "q.onnx", calibration(2))


# -- calibration sets ----------------------------------------------------------------------------------------------


def test_load_calibration_npz_inputs_array(tmp_path):
    x = calibration(5)
    np.savez(tmp_path / "c.npz", inputs=x)
    assert np.array_equal(load_calibration(tmp_path / "c.npz"), x)


def test_load_calibration_npz_one_sample_per_array(tmp_path):
    x = calibration(3)
    np.savez(tmp_path / "c.npz", a=x[0][None], b=x[1], c=x[2])
    got = load_calibration(tmp_path / "c.npz")
    assert got.shape == (3, *SHAPE[1:]) and np.array_equal(got, x)


def test_load_calibration_directory_of_npy(tmp_path):
    x = calibration(3)
    for i, s in enumerate(x):
        np.save(tmp_path / f"{i:03d}.npy", s.astype(np.float64))
    (tmp_path / "README").write_text("ignored")
    got = load_calibration(tmp_path)
    assert got.dtype == np.float32 and np.array_equal(got, x)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d, "no samples"),
        (lambda d: d / "missing.npz", "does not exist"),
        (
            lambda d: (np.save(d / "a.npy", np.zeros((3, 4, 4))), np.save(d / "b.npy", np.zeros((3, 5, 5))), d)[2],
            "shape",
        ),
        (lambda d: (np.savez(d / "c.npz", inputs=np.array([[1.0, np.inf]])), d / "c.npz")[1], "NaN or infinite"),
        (lambda d: (np.savez(d / "c.npz", inputs=np.array(["a", "b"])), d / "c.npz")[1], "dtype"),
        (lambda d: ((d / "c.npz").write_bytes(b"PK\x03\x04 not a zip"), d / "c.npz")[1], "not a readable"),
        (lambda d: (np.save(d / "x.npy", np.zeros(3)), d / "x.npy")[1], "single .npy"),
    ],
    ids=["empty-dir", "missing", "mixed-shapes", "inf", "strings", "corrupt-npz", "bare-npy"],
)
def test_bad_calibration_sets_raise_input_error(tmp_path, make, message):
    with pytest.raises(InputError, match=message):
        load_calibration(make(tmp_path))


# -- the command line ----------------------------------------------------------------------------------------------


def test_cli_quantize_then_inspect_json(tiny, tmp_path, capsys):
    np.savez(tmp_path / "calib.npz", inputs=calibration(8))
    out = tmp_path / "tiny-int8.onnx"
    assert cli_main(["model", "quantize", str(tiny), str(out), "--calibration", str(tmp_path / "calib.npz")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert cli_main(["model", "inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["input"]["dtype"] == "uint8" and info["input"]["zero_point"] == 0
    assert info["model_id"] == "tiny@2.1.0"
    assert info["op_counts"]["DequantizeLinear"] >= 3 and info["op_count"] == sum(info["op_counts"].values())
    assert info["outputs"] == [{"name": "logits", "shape": [1, 4], "type": "tensor(float)"}]


def test_cli_quantize_per_tensor_without_fusing(tiny, tmp_path, capsys):
    for i, x in enumerate(calibration(4)):
        np.save(tmp_path / f"{i}.npy", x)
    out = tmp_path / "q.onnx"
    argv = ["model", "quantize", str(tiny), str(out), "--calibration", str(tmp_path), "--no-fuse-input", "--per-tensor"]
    assert cli_main(argv) == 0
    recipe = json.loads(Model(out, warmup=0).metadata["edge.quantization"])
    assert recipe["per_channel"] is False and recipe["input_fused"] is False


def test_cli_user_errors_exit_1_naming_the_path(tiny, tmp_path, capsys):
    assert cli_main(["model", "quantize", str(tiny), str(tmp_path / "q.onnx"), "--calibration", "/nonexistent"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["model", "inspect", str(tmp_path / "nope.onnx")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_subprocess_inspect(edge_cli, tiny_int8):
    text = edge_cli("model", "inspect", str(tiny_int8))
    assert text.returncode == 0, text.stderr
    assert "tiny@2.1.0" in text.stdout and "uint8" in text.stdout and "scale=" in text.stdout
    js = edge_cli("model", "inspect", str(tiny_int8), "--json")
    assert js.returncode == 0, js.stderr
    assert json.loads(js.stdout)["sha256"] == Model(tiny_int8, warmup=0).sha256


def test_subprocess_quantize(edge_cli, tiny, tmp_path):
    np.savez(tmp_path / "calib.npz", inputs=calibration(4))
    out = tmp_path / "q.onnx"
    r = edge_cli("model", "quantize", str(tiny), str(out), "--calibration", str(tmp_path / "calib.npz"))
    assert r.returncode == 0, r.stderr
    assert Model(out, warmup=0).input_spec.dtype == "uint8"
