"""preprocess_image against the exact float64 reference and OpenCV, on every backend available here."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from preprocess_reference import assert_close, reference_pixels

from edge.inference import preprocess as pp
from edge.sensing.frames import PixelFormat

ROOT = Path(__file__).resolve().parent.parent
FORMATS = ["RGB888", "BGR888", "GRAY8", "YUYV", "NV12"]
QUANT: dict[str, dict[str, Any]] = {
    "float32": {},
    "uint8": {"scale": 0.03, "zero_point": 7},
    "int8": {"scale": 0.021, "zero_point": -5},
}
IMAGENET = {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}


@pytest.fixture(params=pp.available_backends())
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make_frame(
    fmt: str, h: int, w: int, seed: int = 0, *, pad: int = 0, flip: bool = False
) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """A random frame of the format's layout; pad adds bytes at each row end, flip makes the row stride negative."""
    rng = np.random.default_rng(seed)
    rows = h * 3 // 2 if fmt == "NV12" else h
    inner = {"RGB888": (3,), "BGR888": (3,), "YUYV": (2,), "GRAY8": (), "NV12": ()}[fmt]
    buf = rng.integers(0, 256, (rows, w + pad, *inner), dtype=np.uint8)
    frame = buf[:, :w]
    return frame[::-1] if flip else frame


def norm_for(fmt: str) -> dict[str, Any]:
    if fmt == "GRAY8":
        return {"mean": 120.0, "std": 55.0}
    return IMAGENET


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", list(QUANT))
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_matches_reference_with_crop(backend: str, fmt: str, dtype: str, layout: str, order: str) -> None:
    src = make_frame(fmt, 60, 82, seed=1)
    kw: dict[str, Any] = dict(
        size=(37, 29), layout=layout, dtype=dtype, crop=(3, 5, 71, 50), channel_order=order, **norm_for(fmt)
    )
    kw.update(QUANT[dtype])
    got = pp.preprocess_image(src, pixel_format=fmt, backend=backend, **kw)
    assert_close(got, src, fmt, **kw)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", list(QUANT))
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize(("frame", "size", "crop"), [((40, 64), (30, 30), None), ((24, 16), (50, 61), (1, 3, 13, 17))])
def test_letterbox_matches_reference(
    backend: str, fmt: str, dtype: str, layout: str, frame: tuple[int, int], size: tuple[int, int], crop: Any
) -> None:
    src = make_frame(fmt, *frame, seed=2)
    kw: dict[str, Any] = dict(size=size, layout=layout, dtype=dtype, crop=crop, letterbox=114.0, **norm_for(fmt))
    kw.update(QUANT[dtype])
    got = pp.preprocess_image(src, pixel_format=fmt, backend=backend, **kw)
    assert_close(got, src, fmt, **kw)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("frame", "size"),
    [
        ((8, 10), (33, 47)),  # upscaling both ways
        ((48, 64), (48, 64)),  # identity
        ((48, 64), (1, 1)),
        ((48, 64), (1, 37)),
        ((48, 64), (29, 1)),
        ((2, 2), (5, 7)),  # the smallest YUV frame
        ((2, 2), (1, 1)),
        ((30, 200), (7, 41)),  # strong downscaling
        ((480, 640), (224, 224)),  # the production shape
    ],
)
def test_scaling(backend: str, fmt: str, frame: tuple[int, int], size: tuple[int, int]) -> None:
    src = make_frame(fmt, *frame, seed=3)
    got = pp.preprocess_image(src, pixel_format=fmt, size=size, backend=backend)
    assert_close(got, src, fmt, size)


@pytest.mark.parametrize("fmt", ["RGB888", "NV12"])
@pytest.mark.parametrize("dtype", ["uint8", "int8"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_quantised_production_shape(backend: str, fmt: str, dtype: str, layout: str) -> None:
    # Wide rows exercise the vector kernels' 32-values-per-step quantising stores and their tails (224 = 7 x 32).
    src = make_frame(fmt, 480, 640, seed=14)
    for size in [(224, 224), (3, 250)]:
        kw: dict[str, Any] = dict(size=size, layout=layout, dtype=dtype, **QUANT[dtype], **IMAGENET)
        got = pp.preprocess_image(src, pixel_format=fmt, backend=backend, **kw)
        assert_close(got, src, fmt, **kw)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["padded", "negative", "padded-negative", "column-step", "mirrored"])
def test_strides_and_views(backend: str, fmt: str, kind: str) -> None:
    if kind in ("padded", "negative", "padded-negative"):
        src = make_frame(fmt, 26, 34, seed=4, pad=13 if "padded" in kind else 0, flip="negative" in kind)
        assert src.strides[0] != src.shape[1] * src.itemsize * (1 if src.ndim == 2 else src.shape[2]) or kind == (
            "negative"
        )
    elif kind == "column-step":
        # Every other pixel pair: pixels not packed inside the row, so the wrapper copies once.
        step = 4 if fmt in ("YUYV", "NV12") else 2
        src = make_frame(fmt, 26, 68, seed=5)[:, ::step]
        if fmt in ("YUYV", "NV12"):
            src = make_frame(fmt, 26, 68, seed=5)
            src = src[:, np.r_[0:68:4, 1:68:4].reshape(2, -1).T.reshape(-1)]
    else:
        # Negative pixel stride (np.fliplr): also copied. For YUV this swaps the meaning of bytes: still a valid frame.
        src = make_frame(fmt, 26, 34, seed=6)[:, ::-1]
    assert not (src.flags.c_contiguous and kind != "padded")
    got = pp.preprocess_image(src, pixel_format=fmt, size=(19, 23), crop=(1, 2, 16, 21), backend=backend)
    assert_close(got, src, fmt, (19, 23), crop=(1, 2, 16, 21))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("x", "y"), [(0, 0), (1, 1), (3, 2), (1, 3)])
def test_yuv_odd_crop_uses_absolute_chroma(backend: str, fmt: str, x: int, y: int) -> None:
    src = make_frame(fmt, 20, 24, seed=7)
    crop = (x, y, 15, 13)
    got = pp.preprocess_image(src, pixel_format=fmt, size=(13, 15), crop=crop, backend=backend)
    assert_close(got, src, fmt, (13, 15), crop=crop)


def test_uint8_without_scale_rounds_pixels(backend: str) -> None:
    src = make_frame("RGB888", 30, 40, seed=8)
    got = pp.preprocess_image(src, pixel_format="RGB888", size=(17, 23), dtype="uint8", backend=backend)
    assert_close(got, src, "RGB888", (17, 23), dtype="uint8")
    same = pp.preprocess_image(src, pixel_format="RGB888", size=(30, 40), dtype="uint8", backend=backend)
    np.testing.assert_array_equal(same[0], np.moveaxis(src, -1, 0))


def test_quantisation_saturates_and_rounds_half_even(backend: str) -> None:
    src = np.array([[[0, 128, 255], [1, 3, 5]]], dtype=np.uint8)
    # v = pixel / 2: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2 (half to even); 127.5 saturates to 127 in int8 only after rounding
    got = pp.preprocess_image(
        src, pixel_format="RGB888", size=(1, 2), dtype="int8", scale=2.0, zero_point=0, backend=backend
    )
    np.testing.assert_array_equal(got[0, :, 0, :], [[0, 0], [64, 2], [127, 2]])
    low = pp.preprocess_image(
        src, pixel_format="RGB888", size=(1, 2), mean=255.0, dtype="int8", scale=1.0, zero_point=0, backend=backend
    )
    assert low.min() == -128
    u8 = pp.preprocess_image(src, pixel_format="RGB888", size=(1, 2), mean=-100.0, dtype="uint8", backend=backend)
    assert u8.max() == 255


def test_gray_hw1_and_pixel_format_enum(backend: str) -> None:
    src = make_frame("GRAY8", 21, 17, seed=9)
    a = pp.preprocess_image(src, pixel_format=PixelFormat.GRAY8, size=(9, 11), backend=backend)
    b = pp.preprocess_image(src[..., None], pixel_format="GRAY8", size=(9, 11), layout="NHWC", backend=backend)
    assert a.shape == (1, 1, 9, 11) and b.shape == (1, 9, 11, 1)
    np.testing.assert_array_equal(a[0, 0], b[0, ..., 0])


def test_backends_agree(backend: str) -> None:
    src = make_frame("NV12", 48, 64, seed=10)
    kw: dict[str, Any] = dict(pixel_format="NV12", size=(31, 45), crop=(3, 1, 57, 44), **IMAGENET)
    np.testing.assert_allclose(
        pp.preprocess_image(src, backend=backend, **kw), pp.preprocess_image(src, backend="numpy", **kw), atol=1e-4
    )


# ---------------------------------------------------------------- OpenCV as an independent oracle


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("frame", "size"), [((96, 128), (40, 50)), ((20, 30), (45, 61)), ((480, 640), (224, 224))])
def test_opencv_oracle(backend: str, fmt: str, frame: tuple[int, int], size: tuple[int, int]) -> None:
    # Here, not at module level: the box's ptest runs this file without OpenCV (a dev-only oracle); CI has it.
    cv2 = pytest.importorskip("cv2")
    src = make_frame(fmt, *frame, seed=11)
    # OpenCV clamps Y - 16 at 0 before the matrix; the documented formula does not, so keep to video range here.
    if fmt == "YUYV":
        src[..., 0] = np.clip(src[..., 0], 16, 235)
    elif fmt == "NV12":
        src[: frame[0]] = np.clip(src[: frame[0]], 16, 235)
    if fmt == "YUYV":
        rgb = cv2.cvtColor(np.ascontiguousarray(src), cv2.COLOR_YUV2RGB_YUYV)
    elif fmt == "NV12":
        rgb = cv2.cvtColor(np.ascontiguousarray(src), cv2.COLOR_YUV2RGB_NV12)
    elif fmt == "BGR888":
        rgb = src[..., ::-1]
    else:
        rgb = src
    want = cv2.resize(np.ascontiguousarray(rgb, dtype=np.float32), size[::-1], interpolation=cv2.INTER_LINEAR)
    if want.ndim == 2:
        want = want[..., None]
    got = pp.preprocess_image(src, pixel_format=fmt, size=size, layout="NHWC", backend=backend)[0]
    # OpenCV rounds YUV -> RGB to uint8 first: up to half a unit there, plus its fixed-point coordinates.
    assert np.abs(got - want).max() <= 1.0


# ---------------------------------------------------------------- out=, the GIL, backend selection


def test_out_is_filled_in_place(backend: str) -> None:
    src = make_frame("RGB888", 30, 40, seed=12)
    for dtype, layout in [("float32", "NCHW"), ("int8", "NHWC"), ("uint8", "NCHW")]:
        shape = (1, 3, 15, 20) if layout == "NCHW" else (1, 15, 20, 3)
        out = np.full(shape, 99, dtype=dtype)
        kw: dict[str, Any] = dict(size=(15, 20), dtype=dtype, layout=layout, **QUANT[dtype])
        res = pp.preprocess_image(src, pixel_format="RGB888", out=out, backend=backend, **kw)
        assert res is out
        np.testing.assert_array_equal(out, pp.preprocess_image(src, pixel_format="RGB888", backend=backend, **kw))


def test_gil_is_released() -> None:
    if "native-scalar" not in pp.available_backends():
        pytest.skip("no native backend")
    # The slowest native path on a compute-heavy job, so the call lasts long enough to measure.
    src = make_frame("YUYV", 1000, 1000, seed=13)
    out = np.empty((1, 3200, 3200, 3), dtype=np.uint8)
    counter = 0
    stop = threading.Event()

    def count() -> None:
        nonlocal counter
        while not stop.is_set():
            counter += 1

    worker = threading.Thread(target=count)
    worker.start()
    try:
        c0 = counter
        time.sleep(0.05)
        rate = (counter - c0) / 0.05
        t0 = time.perf_counter()
        before = counter
        pp.preprocess_image(
            src, pixel_format="YUYV", size=(3200, 3200), layout="NHWC", dtype="uint8", out=out, backend="native-scalar"
        )
        after = counter
        duration = time.perf_counter() - t0
    finally:
        stop.set()
        worker.join()
    # Holding the GIL, the counter could only run for about two switch intervals (2 x 5 ms) around the call.
    assert duration > 0.05, duration
    assert after - before > 0.2 * rate * duration, (after - before, rate, duration)


def test_backend_is_native_when_required() -> None:
    if os.environ.get("EDGE_REQUIRE_NATIVE") != "1":
        pytest.skip("EDGE_REQUIRE_NATIVE is not set")
    assert pp.backend().startswith("native-")
    assert pp.backend() == pp.available_backends()[0]
    assert "native-scalar" in pp.available_backends()


def _backend_in_subprocess(**env: str) -> subprocess.CompletedProcess[str]:
    code = "from edge.inference import preprocess as p; print(p.backend())"
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )


def test_env_forces_numpy() -> None:
    res = _backend_in_subprocess(EDGE_PREPROCESS="numpy")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "numpy"


def test_env_forces_a_native_path() -> None:
    if "native-scalar" not in pp.available_backends():
        pytest.skip("no native backend")
    res = _backend_in_subprocess(EDGE_PREPROCESS="scalar")
    assert res.stdout.strip() == "native-scalar", res.stderr


def test_env_rejects_an_unknown_path() -> None:
    res = _backend_in_subprocess(EDGE_PREPROCESS="avx9000")
    assert res.returncode != 0
    assert "EDGE_PREPROCESS" in res.stderr


def test_reference_sanity() -> None:
    # The reference itself: a constant frame stays constant, and the YUV matrix maps grey to grey.
    flat = np.full((6, 8, 3), 77, dtype=np.uint8)
    assert np.all(reference_pixels(flat, "RGB888", (5, 13)) == 77.0)
    grey = np.full((6, 8, 2), 128, dtype=np.uint8)
    px = reference_pixels(grey, "YUYV", (3, 4))
    assert np.allclose(px, 1220542 / 2**20 * (128 - 16))


_NO_NATIVE = (
    "import sys; sys.modules['edge._native'] = None; from edge.inference import preprocess as p; print(p.backend())"
)


def test_missing_extension_falls_back_to_numpy_with_a_warning() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("EDGE_REQUIRE_NATIVE", "EDGE_PREPROCESS")}
    res = subprocess.run(
        [sys.executable, "-c", _NO_NATIVE],
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "numpy"
    assert "WARNING" in res.stderr or "numpy twin" in res.stderr


def test_missing_extension_is_an_error_when_native_is_required() -> None:
    res = subprocess.run(
        [sys.executable, "-c", _NO_NATIVE],
        env={**os.environ, "PYTHONPATH": str(ROOT), "EDGE_REQUIRE_NATIVE": "1"},
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert res.returncode != 0
    assert "ImportError" in res.stderr and "EDGE_REQUIRE_NATIVE" in res.stderr
