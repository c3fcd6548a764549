"""Model releases for the OTA tests and the fleet demo, derived from the bundled digits@1.0.0 models.

Importable (tests put ``tools/models`` on ``sys.path``) and runnable:

    python tools/models/ota_models.py OUTDIR [--slow-ms MS]

writes ``OUTDIR/digits/2.0.0/`` (a good v2: int8 ``model.onnx``, float ``model-float.onnx``, ``golden.npz`` whose
expected outputs come from the float model) and ``OUTDIR/digits/3.0.0/`` (a broken v3: scrambled int8 weights, and
the v2 golden samples, which it fails), with ``--slow-ms`` also ``OUTDIR/digits/4.0.0/`` (outputs identical to v2's
int8, but at least MS milliseconds slower per inference), and prints what it wrote.

Every builder is deterministic: the same source gives the same bytes (the slow model's depth is measured, so its
bytes depend on the machine's speed).
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

from edge._fs import atomic_write  # noqa: E402
from edge.inference.model import Model  # noqa: E402
from edge.inference.preprocess import preprocess_image  # noqa: E402
from edge.ota.trial import adapt_inputs  # noqa: E402
from edge.sensing.frames import PixelFormat  # noqa: E402
from edge.sensing.synthetic import render_test_frames  # noqa: E402
from edge.wire.manifest import FLOAT_FILE, GOLDEN_FILE, MODEL_FILE, GoldenSamples, release_dir  # noqa: E402

MODELS = ROOT / "edge" / "models"
DIGITS_INT8 = MODELS / "digits-int8.onnx"
DIGITS_FP32 = MODELS / "digits-fp32.onnx"
_SCRAMBLE_SEED = 3_000_003
_SLOW_WIDTH = 256  # side-branch matrices are WIDTH x WIDTH: ~33 MFLOP per layer, a stable unit of work

__all__ = [
    "DIGITS_FP32",
    "DIGITS_INT8",
    "broken",
    "corrupt",
    "golden",
    "p50_ms",
    "slow",
    "with_version",
]


def _save(model: onnx.ModelProto, dst: Path) -> Path:
    onnx.checker.check_model(model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dst, model.SerializeToString())
    return dst


def _set_version(model: onnx.ModelProto, version: str) -> None:
    for prop in model.metadata_props:
        if prop.key == "edge.version":
            prop.value = version
            return
    entry = model.metadata_props.add()
    entry.key, entry.value = "edge.version", version


def with_version(src: Path, dst: Path, version: str) -> Path:
    """Copy a model with its ``edge.version`` metadata rewritten (same weights: a good new release).

    Args:
        src: the source ``.onnx``.
        dst: where to write.
        version: the new ``edge.version``.

    Returns:
        ``dst``.
    """
    model = onnx.load(str(src))
    _set_version(model, version)
    return _save(model, dst)


def broken(src: Path, dst: Path, version: str) -> Path:
    """The same graph with every weight tensor's values permuted by a fixed seed: it loads and runs, outputs are wrong.

    Weight tensors are the initializers of rank 2 or more (convolution and dense kernels); scales, zero points,
    biases and shapes stay, so an int8 model stays a valid int8 model.

    Args:
        src: the source ``.onnx``.
        dst: where to write.
        version: the ``edge.version`` of the broken release.

    Returns:
        ``dst``.
    """
    model = onnx.load(str(src))
    rng = np.random.default_rng(_SCRAMBLE_SEED)
    for i, init in enumerate(model.graph.initializer):
        if len(init.dims) < 2:
            continue
        values = numpy_helper.to_array(init)
        scrambled = rng.permutation(values.reshape(-1)).reshape(values.shape)
        model.graph.initializer[i].CopyFrom(numpy_helper.from_array(scrambled, init.name))
    _set_version(model, version)
    return _save(model, dst)


def _with_side_branch(model: onnx.ModelProto, layers: int) -> onnx.ModelProto:
    """Add ``layers`` of WIDTH x WIDTH MatMul + Tanh that depend on the input and join the output times zero.

    The branch starts from the input's mean, so no constant folding can precompute it; it ends in a finite scalar
    (tanh keeps it bounded) multiplied by 0.0 and added to the first output, so every output value is bit-identical
    (``x + 0.0 == x`` and ``x + -0.0 == x`` for every float ``x``). onnxruntime has no rule that drops a product with
    zero, which is what keeps the work in (checked by :func:`slow`'s measurement).
    """
    out = model.graph.output[0].name
    inp = model.graph.input[0].name
    orig = f"{out}__before_slow"
    for node in model.graph.node:
        node.output[:] = [orig if o == out else o for o in node.output]
    rng = np.random.default_rng(_SCRAMBLE_SEED + 1)
    w = (rng.standard_normal((_SLOW_WIDTH, _SLOW_WIDTH)) / math.sqrt(_SLOW_WIDTH)).astype(np.float32)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(w, "slow__w"),
            numpy_helper.from_array(np.array([_SLOW_WIDTH, _SLOW_WIDTH], dtype=np.int64), "slow__shape"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "slow__zero"),
        ]
    )
    nodes = [
        helper.make_node("Cast", [inp], ["slow__x"], to=onnx.TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["slow__x"], ["slow__m"], keepdims=0),
        helper.make_node("Expand", ["slow__m", "slow__shape"], ["slow__h0"]),
    ]
    for k in range(layers):
        nodes.append(helper.make_node("MatMul", [f"slow__h{k}", "slow__w"], [f"slow__p{k}"]))
        nodes.append(helper.make_node("Tanh", [f"slow__p{k}"], [f"slow__h{k + 1}"]))
    nodes += [
        helper.make_node("ReduceMean", [f"slow__h{layers}"], ["slow__s"], keepdims=0),
        helper.make_node("Mul", ["slow__s", "slow__zero"], ["slow__nothing"]),
        helper.make_node("Add", [orig, "slow__nothing"], [out]),
    ]
    model.graph.node.extend(nodes)
    return model


def p50_ms(path: Path, runs: int = 30) -> float:
    """The median milliseconds of one ``Model.run`` of a zeroed input (one thread, after warm-up)."""
    model = Model(path, threads=1)
    x = model.new_input()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model.run(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0


def slow(src: Path, dst: Path, version: str, extra_ms: float) -> Path:
    """A model whose outputs equal the source's bit for bit but whose p50 is at least ``extra_ms`` higher here.

    The side branch's depth is calibrated by measurement on this machine and checked after the build.

    Args:
        src: the source ``.onnx``.
        dst: where to write.
        version: the ``edge.version`` of the slow release.
        extra_ms: the least extra p50 latency per inference.

    Returns:
        ``dst``.

    Raises:
        RuntimeError: the added latency could not be reached (after growing the branch several times).
    """
    base = p50_ms(src)
    layers = 2
    for _ in range(6):
        model = _with_side_branch(onnx.load(str(src)), layers)
        _set_version(model, version)
        _save(model, dst)
        added = p50_ms(dst) - base
        if added >= extra_ms:
            return dst
        per_layer = max(added / layers, 1e-3)
        # Aim 50% above the target: the machine is shared and the next measurement may be luckier than this one.
        layers = max(layers * 2, math.ceil(1.5 * extra_ms / per_layer))
    raise RuntimeError(f"could not make {src.name} {extra_ms} ms slower (last try: +{added:.2f} ms)")


def corrupt(src: Path, dst: Path) -> Path:
    """A garbled model file: the first 40% of the source's bytes with every 7th byte inverted.

    Returns:
        ``dst``.
    """
    data = bytearray(src.read_bytes()[: max(16, src.stat().st_size * 2 // 5)])
    for i in range(3, len(data), 7):
        data[i] ^= 0xFF
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dst, bytes(data))
    return dst


def golden_inputs(model: Model, n: int) -> np.ndarray[Any, Any]:
    """The first ``n`` held-out digits rendered as RGB frames and preprocessed as the pipeline does for ``model``.

    Returns:
        ``(n, ...)`` tensors in the model's input dtype.
    """
    kwargs = model.preprocess_kwargs()
    tensors = []
    for rgb, _ in render_test_frames(PixelFormat.RGB888, count=n):
        buf = model.new_input()
        preprocess_image(rgb, pixel_format=PixelFormat.RGB888, out=buf, **kwargs)
        tensors.append(buf)
    return np.concatenate(tensors)


def golden(model_path: Path, out: Path, n: int = 8, *, reference: Path | None = None) -> GoldenSamples:
    """Write a golden ``.npz``: inputs for ``model_path``, expected outputs from ``reference`` (default: itself).

    A float reference of an int8 model receives the inputs dequantized with the int8 model's input parameters,
    exactly as the box's trial feeds a float variant (:func:`edge.ota.trial.adapt_inputs`).

    Args:
        model_path: the model whose input the golden inputs are made for (the release's primary file).
        out: the ``.npz`` to write.
        n: how many samples.
        reference: the model whose outputs are expected (for a broken release: the good one).

    Returns:
        The samples written.
    """
    model = Model(model_path, warmup=0)
    ref = model if reference is None else Model(reference, warmup=0)
    inputs = golden_inputs(model, n)
    ref_inputs = adapt_inputs(inputs, model.input_spec, ref.input_spec)
    outputs = np.stack([np.asarray(ref.run(ref_inputs[i : i + 1]), dtype=np.float32).reshape(-1) for i in range(n)])
    buf = io.BytesIO()
    np.savez(buf, inputs=inputs, outputs=outputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, buf.getvalue())
    return GoldenSamples(inputs=inputs, outputs=outputs)


def max_error(model_path: Path, samples: GoldenSamples, primary: Path | None = None) -> float:
    """The largest ``|output - expected|`` of a model over golden samples (inputs adapted from ``primary``'s)."""
    model = Model(model_path, warmup=0)
    source = model if primary is None else Model(primary, warmup=0)
    inputs = adapt_inputs(samples.inputs, source.input_spec, model.input_spec)
    got = np.stack([np.asarray(model.run(inputs[i : i + 1]), np.float32).reshape(-1) for i in range(len(samples))])
    return float(np.max(np.abs(got.astype(np.float64) - samples.outputs)))


@dataclass(frozen=True)
class Release:
    """What :func:`write_demo_releases` wrote for one release: its directory, files and golden error per file."""

    name: str
    version: str
    directory: Path
    files: dict[str, Path]
    errors: dict[str, float]


def write_demo_releases(outdir: Path, *, slow_ms: float | None = None) -> list[Release]:
    """Write the demo's digits v2 (good, int8 + float + golden), v3 (broken) and optionally v4 (slow).

    Returns:
        One :class:`Release` per version written.
    """
    releases = []
    v2 = outdir / release_dir("digits", "2.0.0")
    int8 = with_version(DIGITS_INT8, v2 / MODEL_FILE, "2.0.0")
    flt = with_version(DIGITS_FP32, v2 / FLOAT_FILE, "2.0.0")
    g2 = golden(int8, v2 / GOLDEN_FILE, reference=flt)
    releases.append(
        Release(
            "digits",
            "2.0.0",
            v2,
            {"model": int8, "float": flt, "golden": v2 / GOLDEN_FILE},
            {"model": max_error(int8, g2), "float": max_error(flt, g2, primary=int8)},
        )
    )
    v3 = outdir / release_dir("digits", "3.0.0")
    bad = broken(DIGITS_INT8, v3 / MODEL_FILE, "3.0.0")
    g3 = golden(bad, v3 / GOLDEN_FILE, reference=flt)
    releases.append(
        Release("digits", "3.0.0", v3, {"model": bad, "golden": v3 / GOLDEN_FILE}, {"model": max_error(bad, g3)})
    )
    if slow_ms is not None:
        v4 = outdir / release_dir("digits", "4.0.0")
        sl = slow(DIGITS_INT8, v4 / MODEL_FILE, "4.0.0", slow_ms)
        g4 = golden(sl, v4 / GOLDEN_FILE, reference=flt)
        releases.append(
            Release("digits", "4.0.0", v4, {"model": sl, "golden": v4 / GOLDEN_FILE}, {"model": max_error(sl, g4)})
        )
    return releases


def main(argv: list[str] | None = None) -> int:
    """Command line: write the demo releases into OUTDIR and print what was written."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--slow-ms", type=float, default=None, help="also write a slow v4, this many ms slower")
    args = ap.parse_args(argv)
    releases = write_demo_releases(args.outdir, slow_ms=args.slow_ms)
    for r in releases:
        print(f"{r.name}@{r.version}: {r.directory}")
        for kind, path in r.files.items():
            err = r.errors.get(kind)
            note = "" if err is None else f"  max |output - golden| = {err:.6g}"
            print(f"  {kind:7} {path.name:18} {path.stat().st_size:8} bytes{note}")
    good = releases[0].errors["model"]
    print(f"suggested golden tolerance for digits@2.0.0: {max(1e-6, 2 * good):.3g} (twice the int8's largest error)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
