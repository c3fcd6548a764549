"""Build the bundled digits models: edge/models/digits-fp32.onnx, digits-int8.onnx and digits-test.npz.

Run with a Python that has torch 2.13, scikit-learn, onnx and onnxruntime (torch is a build-time tool only; the box
never imports it), from the repository root:

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch==2.13.0 numpy scikit-learn onnx onnxruntime
    /tmp/torchvenv/bin/python tools/models/build_digits.py

Reproducible: every random choice is seeded (split, renders, weight init, batch order), torch runs deterministic
single-process CPU kernels. The frames are rendered by edge.sensing.synthetic and preprocessed by the box's own
numpy preprocessing, so the model is trained on exactly the tensors the box feeds it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from edge.inference.model import Model  # noqa: E402
from edge.inference.preprocess import preprocess_image  # noqa: E402
from edge.inference.quantize import quantize_static_model  # noqa: E402
from edge.sensing import synthetic  # noqa: E402
from edge.sensing.frames import PixelFormat  # noqa: E402

SEED = 20261122
TEST_RENDER_SEED = 7_140_511
RENDERS_PER_DIGIT = 24
CALIBRATION_SAMPLES = 256
SIZE = (32, 32)
MEAN = [0.0, 0.0, 0.0]
STD = [255.0, 255.0, 255.0]
EPOCHS = 14
BATCH = 128
MODELS = ROOT / "edge" / "models"

METADATA = {
    "edge.name": "digits",
    "edge.version": "1.0.0",
    "edge.preprocess": json.dumps(
        {"mean": [0, 0, 0], "std": [255, 255, 255], "channel_order": "RGB", "layout": "NCHW", "size": list(SIZE)}
    ),
    "edge.labels": json.dumps([str(i) for i in range(10)]),
    "edge.output": "logits",
}


def preprocess(rgb: np.ndarray, *, dtype: str = "float32", scale: float | None = None, zero_point: int | None = None):
    """RGB frame -> model input, exactly as the box computes it (the numpy twin: bit-stable across machines)."""
    return preprocess_image(
        rgb,
        pixel_format=PixelFormat.RGB888,
        size=SIZE,
        mean=MEAN,
        std=STD,
        layout="NCHW",
        dtype=dtype,
        scale=scale,
        zero_point=zero_point,
        channel_order="RGB",
        backend="numpy",
    )


def split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # noqa: PLC0415
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    digits = load_digits()
    images = digits.images.astype(np.uint8)
    labels = digits.target.astype(np.int64)
    return train_test_split(images, labels, test_size=0.25, stratify=labels, random_state=seed)


def render_training_set(images: np.ndarray, labels: np.ndarray, renders: int, seed: int):
    rng = np.random.default_rng(seed)
    n = len(images) * renders
    x = np.empty((n, 3, *SIZE), dtype=np.float32)
    y = np.empty(n, dtype=np.int64)
    k = 0
    for _ in range(renders):
        for img, label in zip(images, labels, strict=True):
            x[k] = preprocess(synthetic.render_digit_frame(img, rng))[0]
            y[k] = label
            k += 1
    return x, y


def build_net():
    from torch import nn  # noqa: PLC0415

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, 16),
        nn.MaxPool2d(2),  # 16x16
        *block(16, 32),
        nn.MaxPool2d(2),  # 8x8
        *block(32, 48),
        nn.MaxPool2d(2),  # 4x4
        *block(48, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(64, 10),
    )


def train(x: np.ndarray, y: np.ndarray, seed: int, epochs: int):
    import torch  # noqa: PLC0415

    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)
    net = build_net()
    params = sum(p.numel() for p in net.parameters())
    print(f"net: {params} parameters")
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * ((len(x) + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.05)
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        correct = 0
        t0 = time.perf_counter()
        for i in range(0, len(x), BATCH):
            idx = perm[i : i + BATCH]
            logits = net(xt[idx])
            loss = loss_fn(logits, yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach().item() * len(idx)
            correct += int((logits.argmax(1) == yt[idx]).sum())
        print(
            f"epoch {epoch + 1}/{epochs}: loss {total / len(x):.4f} train acc {correct / len(x):.4f}"
            f" ({time.perf_counter() - t0:.1f}s)"
        )
    net.eval()
    return net, torch, params


def export(net, torch, path: Path) -> None:
    import onnx  # noqa: PLC0415

    tmp = path.with_suffix(".tmp.onnx")
    torch.onnx.export(
        net,
        (torch.zeros(1, 3, *SIZE),),
        str(tmp),
        input_names=["input"],
        output_names=["logits"],
        opset_version=17,
        dynamo=False,
        do_constant_folding=True,
    )
    model = onnx.load(str(tmp))
    tmp.unlink()
    model.producer_name = "edge/tools/models/build_digits.py"
    model.doc_string = "Digits CNN for the N3 Edge demo: 1x3x32x32 RGB in [0,1] -> 10 logits."
    del model.metadata_props[:]
    for k, v in METADATA.items():
        e = model.metadata_props.add()
        e.key, e.value = k, v
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def accuracy(model: Model, frames: list[tuple[np.ndarray, int]]) -> float:
    kw = model.preprocess_kwargs()
    correct = 0
    for rgb, label in frames:
        x = preprocess(rgb, dtype=kw["dtype"], scale=kw["scale"], zero_point=kw["zero_point"])
        correct += int(np.argmax(model.run(x)) == label)
    return correct / len(frames)


def latency_us(model: Model, runs: int = 2000) -> float:
    x = model.new_input()
    for _ in range(50):
        model.run(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        model.run(x)
        times.append(time.perf_counter_ns() - t0)
    return float(np.median(times)) / 1000.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=MODELS)
    parser.add_argument("--renders", type=int, default=RENDERS_PER_DIGIT)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    x_tr, x_te, y_tr, y_te = split(SEED)
    print(f"split: {len(x_tr)} train / {len(x_te)} held out")
    np.savez_compressed(out / "digits-test.npz", digits=x_te, labels=y_te, seed=np.int64(TEST_RENDER_SEED))

    t0 = time.perf_counter()
    x, y = render_training_set(x_tr, y_tr, args.renders, SEED + 1)
    print(f"rendered {len(x)} training frames in {time.perf_counter() - t0:.1f}s")

    net, torch, params = train(x, y, SEED + 2, args.epochs)
    fp32 = out / "digits-fp32.onnx"
    int8 = out / "digits-int8.onnx"
    export(net, torch, fp32)

    rng = np.random.default_rng(SEED + 3)
    calib = x[rng.choice(len(x), CALIBRATION_SAMPLES, replace=False)]
    quantize_static_model(fp32, int8, calib, per_channel=True, fuse_input=True)

    # The held-out frames exactly as tests and the demo render them (edge.sensing.synthetic from the package data).
    if out.resolve() != MODELS.resolve():
        print("note: --out is not edge/models, held-out frames are read from the package data")
    frames = list(synthetic.render_test_frames(PixelFormat.RGB888))
    results = {}
    for path in (fp32, int8):
        model = Model(path, threads=1)
        acc = accuracy(model, frames)
        lat = latency_us(model)
        results[path.name] = (acc, lat, path.stat().st_size)
        print(
            f"{path.name}: {path.stat().st_size} bytes, held-out accuracy {acc:.4f} ({len(frames)} frames),"
            f" run() median {lat:.1f} us (threads=1), input {model.input_spec}"
        )
    print(f"params {params}; sha256 fp32 {Model(fp32, warmup=0).sha256}, int8 {Model(int8, warmup=0).sha256}")
    return 0 if all(acc >= 0.97 for acc, _, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
