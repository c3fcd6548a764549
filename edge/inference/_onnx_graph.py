"""A minimal, bounded reader of the ONNX protobuf: just what the box needs that onnxruntime does not expose.

onnxruntime reports a model's inputs, outputs and metadata, but not its graph: the scale and zero point of a fused
uint8 input live in the ``DequantizeLinear`` node that consumes it, and ``edge model inspect`` counts operators. The
``onnx`` package can read both, but it is a development tool, not a runtime dependency of the box, so this module
walks the protobuf wire format itself (sans-IO: bytes in, values out).

Invariants: only the fields listed below are decoded; every other field is skipped by its length without being
parsed; every length is checked against the buffer before it is used, so a truncated or hostile file raises
``ValueError`` and never reads out of bounds or recurses without limit (the walk is at most three messages deep).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["GraphSummary", "Initializer", "Node", "read_graph"]

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


def _node(buf: memoryview, a: int, b: int) -> Node:
    inputs: list[str] = []
    outputs: list[str] = []
    op_type = ""
    for number, wire, x, y in _fields(buf, a, b):
        if wire != _LEN:
            continue
        if number == 1:
            inputs.append(_text(buf, x, y))
        elif number == 2:
            outputs.append(_text(buf, x, y))
        elif number == 4:
            op_type = _text(buf, x, y)
    return Node(op_type, tuple(inputs), tuple(outputs))


# Scales and zero points are scalars or per-channel vectors; anything larger is a weight, not worth decoding here.
_MAX_DECODED = 4096


def _initializer(buf: memoryview, a: int, b: int) -> Initializer:
    name = ""
    data_type = 0
    dims: list[int] = []
    raw: bytes | None = None
    floats: list[float] = []
    ints: list[int] = []
    external = False
    for number, wire, x, y in _fields(buf, a, b):
        if number == 1:
            if wire == _VARINT:
                dims.append(x)
            elif wire == _LEN:
                pos = x
                while pos < y:
                    d, pos = _varint(buf, pos, y)
                    dims.append(d)
        elif number == 2 and wire == _VARINT:
            data_type = x
        elif number == 4 and wire == _LEN and y - x <= 4 * _MAX_DECODED:
            floats.extend(v for (v,) in struct.iter_unpack("<f", bytes(buf[x:y])))
        elif number == 4 and wire == _I32:
            floats.append(struct.unpack("<f", bytes(buf[x:y]))[0])
        elif number in (5, 7) and wire == _LEN and y - x <= 10 * _MAX_DECODED:
            pos = x
            while pos < y:
                v, pos = _varint(buf, pos, y)
                ints.append(v - (1 << 64) if v >= 1 << 63 else v)
        elif number in (5, 7) and wire == _VARINT:
            ints.append(x - (1 << 64) if x >= 1 << 63 else x)
        elif number == 8 and wire == _LEN:
            name = _text(buf, x, y)
        elif number == 9 and wire == _LEN and y - x <= 8 * _MAX_DECODED:
            raw = bytes(buf[x:y])
        elif number == 14 and wire == _VARINT:
            external = x == 1
    values: tuple[float, ...] | None = None
    if not external:
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
        The graph summary (no weights are copied; only tensors of at most 4096 elements are decoded).

    Raises:
        ValueError: the bytes are not a well-formed protobuf message, or carry no graph.
    """
    buf = memoryview(data)
    graph: tuple[int, int] | None = None
    opsets: dict[str, int] = {}
    for number, wire, a, b in _fields(buf, 0, len(buf)):
        if number == 7 and wire == _LEN:
            graph = (a, b)
        elif number == 8 and wire == _LEN:
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
    for number, wire, a, b in _fields(buf, *graph):
        if wire != _LEN:
            continue
        if number == 1:
            nodes.append(_node(buf, a, b))
        elif number == 5:
            init = _initializer(buf, a, b)
            initializers[init.name] = init
        elif number == 11:
            for n2, w2, x, y in _fields(buf, a, b):
                if n2 == 1 and w2 == _LEN:
                    inputs.append(_text(buf, x, y))
    return GraphSummary(tuple(nodes), initializers, tuple(inputs), opsets)
