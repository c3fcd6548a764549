"""Generate a MobileNetV2-shaped benchmark model (fp32 and static U8S8 QDQ int8) without torch.

    python tools/models/make_mobilenetv2.py OUT_DIR [--force]

The standard 224x224x3 MobileNetV2 topology (Sandler et al. 2018, width 1.0): a 3x3/2 stem, 17 inverted residual
blocks (1x1 expand, 3x3 depthwise, 1x1 linear projection, residual where shape allows), a 1x1 conv to 1280, global
average pooling and a 1000-way classifier; BatchNorm is folded into the convolutions' biases as an exported model has
it, ReLU6 is Clip(0, 6). About 3.5 M parameters with seeded random weights: the latency and size of the real
network, not its accuracy. The int8 twin goes through edge.inference.quantize (the box's own recipe) with a small
seeded random calibration set.

The result is cached in OUT_DIR: a stamp file records the generator's parameters and the files' hashes, so a second
call returns at once; benchmarks call ``ensure(out_dir)``. Not committed (14 MB).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from edge.inference.quantize import quantize_static_model  # noqa: E402

SEED = 20260224
GENERATOR_VERSION = 1
CALIBRATION_SAMPLES = 8
NAME = "mobilenetv2-bench"
FILE_STEM = "mobilenetv2"  # OUT_DIR/mobilenetv2-{fp32,int8}.onnx and the stamp mobilenetv2.json
MEAN = [123.675, 116.28, 103.53]
STD = [58.395, 57.12, 57.375]
SIZE = 224
# (expansion t, output channels c, repeats n, first stride s), from the paper's Table 2.
BLOCKS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

METADATA = {
    "edge.name": NAME,
    "edge.version": "1.0.0",
    "edge.preprocess": json.dumps(
        {"mean": MEAN, "std": STD, "channel_order": "RGB", "layout": "NCHW", "size": [SIZE, SIZE]}
    ),
    "edge.labels": json.dumps([f"class_{i}" for i in range(1000)]),
    "edge.output": "logits",
}


class _Builder:
    def __init__(self, seed: int) -> None:
        from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415

        self.helper = helper
        self.numpy_helper = numpy_helper
        self.tp = TensorProto
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.inits: list = []
        self.params = 0
        self.count = 0
        self.add_init("relu6_min", np.array(0.0, dtype=np.float32))
        self.add_init("relu6_max", np.array(6.0, dtype=np.float32))

    def add_init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(self.numpy_helper.from_array(value, name))
        return name

    def fresh(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int, groups: int, act: bool, gain: float) -> str:
        fan_in = cin // groups * k * k
        w = (self.rng.standard_normal((cout, cin // groups, k, k)) * gain / np.sqrt(fan_in)).astype(np.float32)
        b = (self.rng.standard_normal(cout) * 0.05).astype(np.float32)
        self.params += w.size + b.size
        name = self.fresh("conv")
        wn = self.add_init(f"{name}_w", w)
        bn = self.add_init(f"{name}_b", b)
        out = f"{name}_out"
        pad = k // 2
        self.nodes.append(
            self.helper.make_node(
                "Conv",
                [x, wn, bn],
                [out],
                name=name,
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[pad, pad, pad, pad],
                group=groups,
            )
        )
        if not act:
            return out
        relu = f"{name}_relu6"
        self.nodes.append(self.helper.make_node("Clip", [out, "relu6_min", "relu6_max"], [relu], name=relu))
        return relu

    def inverted_residual(self, x: str, cin: int, cout: int, stride: int, t: int) -> str:
        hidden = cin * t
        h = x
        if t != 1:
            h = self.conv(h, cin, hidden, 1, 1, 1, act=True, gain=np.sqrt(2.0))
        h = self.conv(h, hidden, hidden, 3, stride, hidden, act=True, gain=np.sqrt(2.0))
        # A linear bottleneck with a damped gain keeps activations bounded through the residual chain.
        h = self.conv(h, hidden, cout, 1, 1, 1, act=False, gain=0.5)
        if stride == 1 and cin == cout:
            out = self.fresh("add")
            self.nodes.append(self.helper.make_node("Add", [x, h], [out], name=out))
            return out
        return h

    def build(self) -> object:
        helper = self.helper
        x = self.conv("input", 3, 32, 3, 2, 1, act=True, gain=np.sqrt(2.0))
        cin = 32
        for t, c, n, s in BLOCKS:
            for i in range(n):
                x = self.inverted_residual(x, cin, c, s if i == 0 else 1, t)
                cin = c
        x = self.conv(x, cin, 1280, 1, 1, 1, act=True, gain=np.sqrt(2.0))
        self.nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"], name="pool"))
        self.nodes.append(helper.make_node("Flatten", ["pooled"], ["features"], name="flatten", axis=1))
        w = (self.rng.standard_normal((1000, 1280)) / np.sqrt(1280)).astype(np.float32)
        b = np.zeros(1000, dtype=np.float32)
        self.params += w.size + b.size
        self.add_init("fc_w", w)
        self.add_init("fc_b", b)
        self.nodes.append(helper.make_node("Gemm", ["features", "fc_w", "fc_b"], ["logits"], name="fc", transB=1))
        graph = helper.make_graph(
            self.nodes,
            "mobilenetv2",
            [helper.make_tensor_value_info("input", self.tp.FLOAT, [1, 3, SIZE, SIZE])],
            [helper.make_tensor_value_info("logits", self.tp.FLOAT, [1, 1000])],
            initializer=self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name=f"edge/{NAME}")
        model.ir_version = 8
        for k, v in METADATA.items():
            e = model.metadata_props.add()
            e.key, e.value = k, v
        return model


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ensure(out_dir: Path, *, force: bool = False) -> tuple[Path, Path]:
    """Return (fp32, int8) model paths in out_dir, generating them unless a matching cache is there."""
    import onnx  # noqa: PLC0415

    out_dir.mkdir(parents=True, exist_ok=True)
    fp32 = out_dir / f"{FILE_STEM}-fp32.onnx"
    int8 = out_dir / f"{FILE_STEM}-int8.onnx"
    stamp = out_dir / f"{FILE_STEM}.json"
    want = {"generator_version": GENERATOR_VERSION, "seed": SEED, "calibration_samples": CALIBRATION_SAMPLES}
    if not force and stamp.is_file() and fp32.is_file() and int8.is_file():
        cached = json.loads(stamp.read_text())
        if all(cached.get(k) == v for k, v in want.items()) and cached.get("sha256") == {
            fp32.name: _sha256(fp32),
            int8.name: _sha256(int8),
        }:
            return fp32, int8

    t0 = time.perf_counter()
    builder = _Builder(SEED)
    model = builder.build()
    onnx.checker.check_model(model)
    onnx.save(model, str(fp32))
    rng = np.random.default_rng(SEED + 1)
    pixels = rng.uniform(0, 255, size=(CALIBRATION_SAMPLES, 3, SIZE, SIZE))
    calib = ((pixels - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]).astype(np.float32)
    quantize_static_model(fp32, int8, calib, per_channel=True, fuse_input=True)
    info = {
        **want,
        "params": builder.params,
        "sha256": {fp32.name: _sha256(fp32), int8.name: _sha256(int8)},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    stamp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return fp32, int8


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the MobileNetV2-shaped benchmark models (cached).")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    parser.add_argument("--force", action="store_true", help="regenerate even if the cache matches")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    fp32, int8 = ensure(args.out_dir, force=args.force)
    stamp = json.loads((args.out_dir / f"{FILE_STEM}.json").read_text())
    print(
        f"{fp32} ({fp32.stat().st_size} bytes), {int8} ({int8.stat().st_size} bytes),"
        f" {stamp['params']} params, {time.perf_counter() - t0:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
