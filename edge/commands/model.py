"""``edge model``: quantize a float ONNX model for the box, and inspect any model the box would load."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add ``edge model quantize`` and ``edge model inspect``.

    Args:
        subparsers: the object ``argparse.ArgumentParser.add_subparsers`` returned.
    """
    parser = subparsers.add_parser("model", help="quantize or inspect ONNX models")
    sub = parser.add_subparsers(dest="model_command", required=True, metavar="ACTION")

    q = sub.add_parser(
        "quantize",
        help="static int8 quantization (U8S8 QDQ) with a calibration set",
        description="Quantize a float32 ONNX model to static U8S8 QDQ. By default the input is fused: the quantized "
        "model takes uint8 input that the preprocessor writes directly.",
    )
    q.add_argument("input", metavar="IN", help="float32 .onnx model")
    q.add_argument("output", metavar="OUT", help="where to write the quantized .onnx model")
    q.add_argument(
        "--calibration",
        required=True,
        metavar="DIR|NPZ",
        help="preprocessed inputs: an .npz (array 'inputs' (N,C,H,W), or one sample per array) or a directory of .npy",
    )
    q.add_argument("--no-fuse-input", dest="fuse_input", action="store_false", help="keep the float32 input")
    q.add_argument("--per-tensor", dest="per_channel", action="store_false", help="one weight scale per tensor")
    q.set_defaults(func=_quantize)

    i = sub.add_parser("inspect", help="show a model's identity, input spec, outputs and metadata")
    i.add_argument("model", metavar="MODEL", help=".onnx model")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=_inspect)


def _quantize(args: argparse.Namespace) -> int:
    from edge.inference.model import Model  # noqa: PLC0415 -- onnxruntime loads only for this command
    from edge.inference.quantize import load_calibration, quantize_static_model  # noqa: PLC0415

    calibration = load_calibration(args.calibration)
    quantize_static_model(
        args.input, args.output, calibration, per_channel=args.per_channel, fuse_input=args.fuse_input
    )
    # Loading the result proves it is usable by the box, and gives the figures worth printing.
    model = Model(args.output, warmup=1)
    spec = model.input_spec
    quant = f" scale={spec.scale:.8g} zero_point={spec.zero_point}" if spec.scale is not None else ""
    print(
        f"wrote {model.path} ({model.file_size} bytes, sha256 {model.sha256}) from {calibration.shape[0]} samples:"
        f" input {spec.name} {spec.dtype}{list(spec.shape)}{quant}"
    )
    return 0


def _format_text(info: dict[str, Any]) -> str:
    inp = info["input"]
    lines = [
        f"path:      {info['path']}",
        f"sha256:    {info['sha256']}",
        f"size:      {info['file_size']} bytes",
        f"model:     {info['model_id']} (name {info['name']!r}, version {info['version']!r})",
        f"input:     {inp['name']} {inp['dtype']} {inp['shape']} {inp['layout']}",
    ]
    if inp["scale"] is not None:
        lines.append(f"           quantized: scale={inp['scale']:.8g} zero_point={inp['zero_point']}")
    if inp["input_quantization"] is not None:
        iq = inp["input_quantization"]
        lines.append(f"           quantized by the graph: scale={iq['scale']:.8g} zero_point={iq['zero_point']}")
    for out in info["outputs"]:
        lines.append(f"output:    {out['name']} {out['type']} {out['shape']}")
    lines.append(f"kind:      {info['output_kind']}, {len(info['labels'])} labels")
    lines.append(f"preprocess: {json.dumps(info['preprocess'])}")
    ops = ", ".join(f"{k} {v}" for k, v in info["op_counts"].items())
    lines.append(f"ops:       {info['op_count']} ({ops})")
    lines.append(f"opsets:    {json.dumps(info['opsets'])}")
    lines.append("metadata:")
    lines.extend(f"  {k} = {v}" for k, v in sorted(info["metadata"].items()))
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> int:
    from edge.inference.model import Model  # noqa: PLC0415

    info = Model(args.model, warmup=0).describe()
    if args.json:
        json.dump(info, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print(_format_text(info))
    return 0
