"""A minimal, bounded reader of the ONNX protobuf: just what the box needs that onnxruntime does not expose.

onnxruntime reports a model's inputs, outputs and metadata, but not its graph: the scale and zero point of a fused
uint8 input live in the ``DequantizeLinear`` node that consumes it, and ``edge model inspect`` counts operators. The
``onnx`` package can read both, but it is a development tool, not a runtime dependency of the box, so this module
walks the protobuf wire format itself (sans-IO: bytes in, values out).

Invariants: only the fields listed below are decoded; every other field is skipped by its length without being
parsed; every length is checked against the buffer before it is used, so a truncated or hostile file raises
``ValueError`` and never reads out of bounds or recurses without limit (the walk is at most three messages deep).
What is kept is bounded too, so a small file cannot expand into many objects: at most ``MAX_ENTRIES`` nodes,
initializers and graph inputs, ``MAX_NODE_NAMES`` inputs or outputs per node, ``MAX_DIMS`` dimensions per tensor and
``MAX_OPSETS`` operator sets (each violation a ``ValueError`` naming the count and the limit), and only tensors of at
most ``MAX_DECODED`` values are decoded. The file's size is bounded by the caller (``edge.inference.model``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sized
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "MAX_DECODED",
    "MAX_DIMS",
    "MAX_ENTRIES",
    "MAX_NODE_NAMES",
    "MAX_OPSETS",
    "GraphSummary",
    "Initializer",
    "Node",
    "read_graph",
]

# Bounds on what the walk keeps. Real models are far below them: a large transformer has tens of thousands of nodes,
# a Concat a few dozen inputs, a tensor at most 8 dimensions, a model a handful of opset imports.
MAX_ENTRIES: Final = 200_000
MAX_NODE_NAMES: Final = 4096
MAX_DIMS: Final = 64
MAX_OPSETS: Final = 64
# Scales and zero points are scalars or per-channel vectors; anything larger is a weight, not worth decoding here.
MAX_DECODED: Final = 4096

# ONNX TensorProto.DataType values the box uses.
FLOAT = 1
UINT8 = 2
INT8 = 3
INT32 = 6
INT64 = 7

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


@dataclass(frozen=True, slots=True)
class Node:
    """One graph node: its operator type and the tensor names it reads and writes."""

    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Initializer:
    """A constant tensor of the graph, decoded only when small (scales and zero points)."""

    name: str
    data_type: int
    dims: tuple[int, ...]
    values: tuple[float, ...] | None  # None when the tensor is large or stored externally


@dataclass(frozen=True, slots=True)
class GraphSummary:
    """What :func:`read_graph` extracts from a model."""

    nodes: tuple[Node, ...]
    initializers: dict[str, Initializer] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()
    opsets: dict[str, int] = field(default_factory=dict)


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield ``(field_number, wire_type, a, b)``: the value ``a`` for varints, else the byte span ``[a, b)``."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value, pos
        elif wire == _LEN:
            length, pos = _varint(buf, pos, end)
            if length > end - pos:
                raise ValueError("length-delimited field runs past its message")
            yield number, wire, pos, pos + length
            pos += length
        elif wire in (_I64, _I32):
            width = 8 if wire == _I64 else 4
            if width > end - pos:
                raise ValueError("fixed-width field runs past its message")
            yield number, wire, pos, pos + width
            pos += width
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _text(buf: memoryview, a: int, b: int) -> str:
    return bytes(buf[a:b]).decode("utf-8", errors="replace")


def _bounded(items: Sized, limit: int, what: str) -> None:
    """Refuse one more entry once ``items`` holds ``limit`` of them."""
    if len(items) >= limit:
        raise ValueError(f"more than {limit} {what} (the limit)")


def _node(buf: memoryview, a: int, b: int) -> Node:
    inputs: list[str] = []
    outputs: list[str] = []
    op_type = ""
    for number, wire, x, y in _fields(buf, a, b):
        if wire != _LEN:
            continue
        if number == 1:
            _bounded(inputs, MAX_NODE_NAMES, "inputs in a node")
            inputs.append(_text(buf, x, y))
        elif number == 2:
            _bounded(outputs, MAX_NODE_NAMES, "outputs in a node")
            outputs.append(_text(buf, x, y))
        elif number == 4:
            op_type = _text(buf, x, y)
    return Node(op_type, tuple(inputs), tuple(outputs))


def _initializer(buf: memoryview, a: int, b: int) -> Initializer:
    name = ""
    data_type = 0
    dims: list[int] = []
    raw: bytes | None = None
    floats: list[float] = []
    ints: list[int] = []
    external = False
    too_many = False  # more than MAX_DECODED values: a weight, left undecoded (values None)
    for number, wire, x, y in _fields(buf, a, b):
        if number == 1:
            if wire == _VARINT:
                _bounded(dims, MAX_DIMS, "dimensions in a tensor")
                dims.append(x)
            elif wire == _LEN:
                pos = x
                while pos < y:
                    _bounded(dims, MAX_DIMS, "dimensions in a tensor")
                    d, pos = _varint(buf, pos, y)
                    dims.append(d)
        elif number == 2 and wire == _VARINT:
            data_type = x
        elif number == 8 and wire == _LEN:
            name = _text(buf, x, y)
        elif number == 14 and wire == _VARINT:
            external = x == 1
        elif too_many:
            continue
        elif number == 4 and wire == _LEN:
            if (y - x) % 4:
                raise ValueError(f"packed float data of {y - x} bytes is not a multiple of 4")
            if y - x > 4 * (MAX_DECODED - len(floats)):
                too_many = True
            else:
                floats.extend(v for (v,) in struct.iter_unpack("<f", bytes(buf[x:y])))
        elif number == 4 and wire == _I32:
            too_many = len(floats) >= MAX_DECODED
            if not too_many:
                floats.append(struct.unpack("<f", bytes(buf[x:y]))[0])
        elif number in (5, 7) and wire == _LEN:
            pos = x
            while pos < y and not too_many:
                v, pos = _varint(buf, pos, y)
                ints.append(v - (1 << 64) if v >= 1 << 63 else v)
                too_many = len(ints) > MAX_DECODED
        elif number in (5, 7) and wire == _VARINT:
            too_many = len(ints) >= MAX_DECODED
            if not too_many:
                ints.append(x - (1 << 64) if x >= 1 << 63 else x)
        elif number == 9 and wire == _LEN:
            if y - x > 8 * MAX_DECODED:
                too_many = True
            else:
                raw = bytes(buf[x:y])
    values: tuple[float, ...] | None = None
    if not external and not too_many:
        if raw is not None:
            values = _decode_raw(raw, data_type)
        elif floats:
            values = tuple(floats)
        elif ints:
            values = tuple(float(v) for v in ints)
    return Initializer(name, data_type, tuple(dims), values)


_RAW_FORMATS = {FLOAT: "f", UINT8: "B", INT8: "b", INT32: "i", INT64: "q"}


def _decode_raw(raw: bytes, data_type: int) -> tuple[float, ...] | None:
    code = _RAW_FORMATS.get(data_type)
    if code is None:
        return None
    size = struct.calcsize(code)
    if len(raw) % size:
        raise ValueError(f"raw tensor data of {len(raw)} bytes is not a multiple of {size}")
    return tuple(float(v) for v in struct.unpack(f"<{len(raw) // size}{code}", raw))


def read_graph(data: bytes) -> GraphSummary:
    """Extract nodes, small initializers, graph input names and opsets from a serialized ONNX ``ModelProto``.

    Args:
        data: the model file's bytes.

    Returns:
        The graph summary (no weights are copied; only tensors of at most ``MAX_DECODED`` values are decoded).

    Raises:
        ValueError: the bytes are not a well-formed protobuf message, carry no graph, or hold more entries than the
            bounds of the module docstring.
    """
    buf = memoryview(data)
    graph: tuple[int, int] | None = None
    opsets: dict[str, int] = {}
    for number, wire, a, b in _fields(buf, 0, len(buf)):
        if number == 7 and wire == _LEN:
            graph = (a, b)
        elif number == 8 and wire == _LEN:
            _bounded(opsets, MAX_OPSETS, "operator set imports")
            domain, version = "", 0
            for n2, w2, x, y in _fields(buf, a, b):
                if n2 == 1 and w2 == _LEN:
                    domain = _text(buf, x, y)
                elif n2 == 2 and w2 == _VARINT:
                    version = x
            opsets[domain or "ai.onnx"] = version
    if graph is None:
        raise ValueError("no graph in the model")
    nodes: list[Node] = []
    initializers: dict[str, Initializer] = {}
    inputs: list[str] = []
    decoded = 0  # initializers read, including any that repeat a name
    for number, wire, a, b in _fields(buf, *graph):
        if wire != _LEN:
            continue
        if number == 1:
            _bounded(nodes, MAX_ENTRIES, "nodes in the graph")
            nodes.append(_node(buf, a, b))
        elif number == 5:
            if decoded >= MAX_ENTRIES:
                raise ValueError(f"more than {MAX_ENTRIES} initializers in the graph (the limit)")
            decoded += 1
            init = _initializer(buf, a, b)
            initializers[init.name] = init
        elif number == 11:
            for n2, w2, x, y in _fields(buf, a, b):
                if n2 == 1 and w2 == _LEN:
                    _bounded(inputs, MAX_ENTRIES, "graph inputs")
                    inputs.append(_text(buf, x, y))
    return GraphSummary(tuple(nodes), initializers, tuple(inputs), opsets)
