"""Hostile input files for the bound tests: zip bombs, .npy headers declaring huge arrays, sparse oversized files,
and a way to measure what refusing them allocated."""

from __future__ import annotations

import io
import tracemalloc
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

MiB = 2**20
TiB = 2**40
# Refusing a hostile file needs a few KiB; reading one would need at least the size it declares.
MAX_PEAK = 1 * MiB


@contextmanager
def traced_peak() -> Iterator[list[int]]:
    """Collects (into the yielded list) the peak of the allocations made inside the block; numpy's data buffers are
    traced too."""
    peak: list[int] = []
    tracemalloc.start()
    try:
        yield peak
    finally:
        peak.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()


def npy_header(shape: tuple[int, ...], descr: str = "<f8", version: int = 1) -> bytes:
    """An .npy header as np.save writes it, for any shape (no data follows)."""
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"
    width = 2 if version == 1 else 4
    pad = -(6 + 2 + width + len(text) + 1) % 64
    body = (text + " " * pad + "\n").encode("latin1")
    return b"\x93NUMPY" + bytes([version, 0]) + len(body).to_bytes(width, "little") + body


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """The bytes np.savez writes for ``arrays``."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def zip_of(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    """A zip of the given members, written as they are."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def bomb(expanded: int, name: str = "inputs.npy") -> bytes:
    """An .npz whose one member is a valid uint8 array of ``expanded`` zero bytes, deflated to ~1/1000 of that."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf, zf.open(name, "w", force_zip64=True) as w:
        w.write(npy_header((expanded,), "|u1"))
        zeros = bytes(MiB)
        for _ in range(expanded // MiB):
            w.write(zeros)
    return buf.getvalue()


def sparse_file(path: Path, size: int, head: bytes = b"") -> Path:
    """A file of ``size`` bytes starting with ``head`` that takes no disk space (the rest is a hole)."""
    with path.open("wb") as f:
        f.write(head)
        f.truncate(size)
    return path
