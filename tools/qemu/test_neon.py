"""The NEON path on aarch64: chosen at run time, reported by ``backend()``, equal to the scalar kernels bit for bit.

Run by ``make test-arm64`` under qemu-user (tools/qemu/tests.txt) and on a real board with
``EDGE_REQUIRE_NATIVE=1 python -m pytest tools/qemu/test_neon.py``. Elsewhere every test here skips: an x86 run has no
NEON path to check. Parity with the float64 reference and the numpy twin is ``tests/test_preprocess*.py``, whose
``backend`` fixture includes ``native-neon`` here; this file adds what those cannot see: that the vector kernels
(word loads near the row end, the narrow-frame fallback, vertical-pass tails, NHWC interleaving stores) compute
exactly what the scalar kernels compute, operation for operation.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from edge.inference import preprocess as pp

ON_ARM = platform.machine() in ("aarch64", "arm64")
needs_neon = pytest.mark.skipif("native-neon" not in pp.available_backends(), reason="no NEON path on this machine")

FORMATS = ["RGB888", "BGR888", "GRAY8", "YUYV", "NV12"]
QUANT: dict[str, dict[str, Any]] = {
    "float32": {},
    "uint8": {"scale": 0.03, "zero_point": 7},
    "int8": {"scale": 0.021, "zero_point": -5},
}


def make_frame(fmt: str, h: int, w: int, seed: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    rng = np.random.default_rng(seed)
    rows = h * 3 // 2 if fmt == "NV12" else h
    inner = {"RGB888": (3,), "BGR888": (3,), "YUYV": (2,), "GRAY8": (), "NV12": ()}[fmt]
    return rng.integers(0, 256, (rows, w, *inner), dtype=np.uint8)


def norm_for(fmt: str) -> dict[str, Any]:
    if fmt == "GRAY8":
        return {"mean": 120.0, "std": 55.0}
    return {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, -57.375]}


@pytest.mark.skipif(not ON_ARM, reason="only an aarch64 interpreter chooses NEON")
def test_neon_is_chosen_and_reported_on_aarch64() -> None:
    assert pp.available_backends() == ["native-neon", "native-scalar", "numpy"]
    if os.environ.get("EDGE_PREPROCESS", "") == "":
        assert pp.backend() == "native-neon"


# Geometry cases: (frame h, w), output size, crop. Each one aims at a branch of the vector kernels.
GEOMETRIES = [
    ((480, 640), (224, 224), None),  # production downscale: whole groups, 224 = 28 x 8 in the vertical pass
    ((30, 38), (29, 61), (3, 2, 35, 27)),  # upscale with a crop reaching the right edge: word loads moved back
    ((12, 8), (13, 37), None),  # the narrowest frame with vector horizontal passes for every format
    ((10, 6), (7, 19), None),  # narrower than one 8-byte word for GRAY8 / NV12: the scalar fallback
    ((2, 2), (5, 7), None),  # the smallest YUV frame
    ((40, 64), (33, 3), None),  # fewer columns than one vertical-pass group: scalar tail only
    ((48, 200), (7, 41), (1, 1, 199, 47)),  # strong downscale, odd crop: chroma of odd columns
]


@needs_neon
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", list(QUANT))
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize(("frame", "size", "crop"), GEOMETRIES)
def test_neon_equals_scalar_bit_for_bit(
    fmt: str, dtype: str, layout: str, frame: tuple[int, int], size: tuple[int, int], crop: Any
) -> None:
    src = make_frame(fmt, *frame, seed=FORMATS.index(fmt) * 1000 + frame[1])
    kw: dict[str, Any] = dict(pixel_format=fmt, size=size, layout=layout, dtype=dtype, crop=crop, **norm_for(fmt))
    kw.update(QUANT[dtype])
    neon = pp.preprocess_image(src, backend="native-neon", **kw)
    scalar = pp.preprocess_image(src, backend="native-scalar", **kw)
    np.testing.assert_array_equal(neon, scalar)


@needs_neon
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_neon_letterbox_and_channel_order_equal_scalar(fmt: str, layout: str) -> None:
    src = make_frame(fmt, 36, 52, seed=5)
    kw: dict[str, Any] = dict(
        pixel_format=fmt, size=(40, 40), layout=layout, letterbox=114.0, channel_order="BGR", **norm_for(fmt)
    )
    np.testing.assert_array_equal(
        pp.preprocess_image(src, backend="native-neon", **kw), pp.preprocess_image(src, backend="native-scalar", **kw)
    )


@needs_neon
@pytest.mark.parametrize(("dtype", "zero_point", "lo", "hi"), [("uint8", 10, 0, 255), ("int8", 100, -128, 127)])
def test_neon_quantisation_saturates_and_rounds_half_even(dtype: str, zero_point: int, lo: int, hi: int) -> None:
    # v = (pixel - 128) / 2 + zero_point, exact in float32, on a row wider than the vector groups: every odd pixel is
    # a tie (rounds to even), uint8 saturates at 0 below and int8 at 127 above.
    row = np.arange(256, dtype=np.uint8)
    src = np.repeat(row[None, :, None], 3, axis=2)
    got = pp.preprocess_image(
        src,
        pixel_format="RGB888",
        size=(1, 256),
        mean=128.0,
        dtype=dtype,
        scale=2.0,
        zero_point=zero_point,
        backend="native-neon",
    )
    want = np.clip(np.round((row.astype(np.float64) - 128.0) / 2.0) + zero_point, lo, hi)
    assert (lo if dtype == "uint8" else hi) in want  # the case saturates
    for c in range(3):
        np.testing.assert_array_equal(got[0, c, 0], want)


# ---------------------------------------------------------------- loads stay inside the frame

PAGE = mmap.PAGESIZE
PROT_NONE, PROT_READ_WRITE = 0, 3


@pytest.fixture
def guarded() -> Iterator[Callable[[tuple[int, ...]], np.ndarray[Any, np.dtype[np.uint8]]]]:
    """Arrays whose last byte ends a readable page followed by an unreadable one: a read past the end faults."""
    libc = ctypes.CDLL(None, use_errno=True)
    maps: list[tuple[mmap.mmap, int]] = []

    def make(shape: tuple[int, ...]) -> np.ndarray[Any, np.dtype[np.uint8]]:
        size = int(np.prod(shape))
        pages = (size + PAGE - 1) // PAGE + 1
        mm = mmap.mmap(-1, pages * PAGE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        if libc.mprotect(ctypes.c_void_p(base + (pages - 1) * PAGE), PAGE, PROT_NONE) != 0:
            raise OSError(ctypes.get_errno(), "mprotect")
        maps.append((mm, base + (pages - 1) * PAGE))
        arr = np.frombuffer(mm, dtype=np.uint8, count=size, offset=(pages - 1) * PAGE - size).reshape(shape)
        arr[...] = np.random.default_rng(size).integers(0, 256, shape, dtype=np.uint8)
        return arr

    yield make
    for _mm, guard in maps:
        libc.mprotect(ctypes.c_void_p(guard), PAGE, PROT_READ_WRITE)  # the arrays may outlive the test


NATIVE = [b for b in pp.available_backends() if b.startswith("native-")]


@pytest.mark.skipif(not NATIVE, reason="no native backend")
@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("flip", [False, True])
def test_vector_loads_never_read_past_the_frame(guarded: Any, backend: str, fmt: str, flip: bool) -> None:
    # The last row (NV12: of the UV plane) ends where the readable memory ends; 8-byte word loads of the last columns
    # must be moved back inside the row, or the test process faults. A negative stride puts row 0 last in memory.
    inner = {"RGB888": (3,), "BGR888": (3,), "YUYV": (2,), "GRAY8": (), "NV12": ()}[fmt]
    for h, w in [(6, 10), (8, 26), (4, 4)]:
        frame = guarded((h * 3 // 2 if fmt == "NV12" else h, w, *inner))
        src = frame[::-1] if flip else frame
        for size, crop in [((11, 37), None), ((3, 5), None), ((5, 9), (w // 2, h // 2, w - w // 2, h - h // 2))]:
            got = pp.preprocess_image(src, pixel_format=fmt, size=size, crop=crop, backend=backend)
            want = pp.preprocess_image(np.array(src), pixel_format=fmt, size=size, crop=crop, backend="numpy")
            np.testing.assert_allclose(got, want, atol=1e-3)
