"""Every invalid argument raises a clear TypeError or ValueError, on every backend and at the raw C entry."""

from __future__ import annotations

import contextlib
import random
from typing import Any

import numpy as np
import pytest

from edge.errors import FrameError
from edge.inference import preprocess as pp

RGB = np.zeros((8, 10, 3), dtype=np.uint8)
GOOD: dict[str, Any] = {"pixel_format": "RGB888", "size": (4, 5)}


@pytest.fixture(params=pp.available_backends())
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def call(src: Any = RGB, backend: str = "numpy", **overrides: Any) -> Any:
    kw = {**GOOD, **overrides}
    return pp.preprocess_image(src, backend=backend, **kw)


# (name, src, overrides, exception, text the message must contain)
CASES: list[tuple[str, Any, dict[str, Any], type[Exception], str]] = [
    ("src_float", RGB.astype(np.float32), {}, TypeError, "src"),
    ("src_int16", RGB.astype(np.int16), {}, TypeError, "src"),
    ("src_2d_for_rgb", np.zeros((8, 10), np.uint8), {}, FrameError, "src"),
    ("src_4_channels", np.zeros((8, 10, 4), np.uint8), {}, FrameError, "src"),
    ("src_empty", np.zeros((0, 10, 3), np.uint8), {}, FrameError, "src"),
    ("src_zero_width", np.zeros((8, 0, 3), np.uint8), {}, FrameError, "src"),
    ("gray_3d_wrong", np.zeros((8, 10, 2), np.uint8), {"pixel_format": "GRAY8"}, FrameError, "GRAY8"),
    ("yuyv_odd_width", np.zeros((8, 9, 2), np.uint8), {"pixel_format": "YUYV"}, FrameError, "even"),
    ("yuyv_wrong_channels", np.zeros((8, 10, 3), np.uint8), {"pixel_format": "YUYV"}, FrameError, "YUYV"),
    ("nv12_rows_not_3_halves", np.zeros((10, 10), np.uint8), {"pixel_format": "NV12"}, FrameError, "NV12"),
    ("nv12_rows_for_odd_height", np.zeros((4, 10), np.uint8), {"pixel_format": "NV12"}, FrameError, "NV12"),
    ("nv12_odd_width", np.zeros((12, 9), np.uint8), {"pixel_format": "NV12"}, FrameError, "even"),
    ("nv12_3d", np.zeros((12, 10, 1), np.uint8), {"pixel_format": "NV12"}, FrameError, "NV12"),
    ("pixel_format_unknown", RGB, {"pixel_format": "RGBA"}, ValueError, "pixel_format"),
    ("pixel_format_type", RGB, {"pixel_format": 3}, TypeError, "pixel_format"),
    ("size_zero", RGB, {"size": (0, 5)}, ValueError, "size"),
    ("size_negative", RGB, {"size": (4, -1)}, ValueError, "size"),
    ("size_float", RGB, {"size": (4.0, 5)}, TypeError, "size"),
    ("size_len", RGB, {"size": (4,)}, TypeError, "size"),
    ("size_none", RGB, {"size": None}, TypeError, "size"),
    ("mean_len", RGB, {"mean": [1.0, 2.0]}, ValueError, "mean"),
    ("mean_str", RGB, {"mean": "abc"}, TypeError, "mean"),
    ("mean_nan", RGB, {"mean": float("nan")}, ValueError, "mean"),
    ("std_zero", RGB, {"std": [1.0, 0.0, 1.0]}, ValueError, "std"),
    ("std_inf", RGB, {"std": float("inf")}, ValueError, "std"),
    ("std_tiny", RGB, {"std": 1e-300}, ValueError, "std"),
    ("std_gray_len", np.zeros((8, 10), np.uint8), {"pixel_format": "GRAY8", "std": [1.0, 2.0, 3.0]}, ValueError, "std"),
    ("dtype_name", RGB, {"dtype": "float16"}, ValueError, "dtype"),
    ("layout_name", RGB, {"layout": "CHW"}, ValueError, "layout"),
    ("order_name", RGB, {"channel_order": "RGBA"}, ValueError, "channel_order"),
    ("f32_with_scale", RGB, {"scale": 0.1}, ValueError, "scale"),
    ("f32_with_zero_point", RGB, {"zero_point": 1}, ValueError, "zero_point"),
    ("int8_no_scale", RGB, {"dtype": "int8"}, ValueError, "scale"),
    ("int8_no_zero_point", RGB, {"dtype": "int8", "scale": 0.1}, ValueError, "zero_point"),
    ("int8_zero_point_range", RGB, {"dtype": "int8", "scale": 0.1, "zero_point": 128}, ValueError, "zero_point"),
    ("int8_zero_point_float", RGB, {"dtype": "int8", "scale": 0.1, "zero_point": 1.5}, TypeError, "zero_point"),
    ("uint8_zero_point_range", RGB, {"dtype": "uint8", "scale": 0.1, "zero_point": -1}, ValueError, "zero_point"),
    ("uint8_zero_point_alone", RGB, {"dtype": "uint8", "zero_point": 3}, ValueError, "zero_point"),
    ("scale_zero", RGB, {"dtype": "int8", "scale": 0.0, "zero_point": 0}, ValueError, "scale"),
    ("scale_negative", RGB, {"dtype": "uint8", "scale": -1.0}, ValueError, "scale"),
    ("scale_nan", RGB, {"dtype": "uint8", "scale": float("nan")}, ValueError, "scale"),
    ("scale_str", RGB, {"dtype": "uint8", "scale": "1"}, TypeError, "scale"),
    ("crop_outside", RGB, {"crop": (5, 0, 6, 8)}, ValueError, "crop"),
    ("crop_negative", RGB, {"crop": (-1, 0, 5, 5)}, ValueError, "crop"),
    ("crop_empty", RGB, {"crop": (0, 0, 0, 5)}, ValueError, "crop"),
    ("crop_too_tall", RGB, {"crop": (0, 1, 5, 8)}, ValueError, "crop"),
    ("crop_float", RGB, {"crop": (0, 0, 5.0, 5)}, TypeError, "crop"),
    ("crop_len", RGB, {"crop": (0, 0, 5)}, TypeError, "crop"),
    ("letterbox_str", RGB, {"letterbox": "grey"}, TypeError, "letterbox"),
    ("letterbox_nan", RGB, {"letterbox": float("nan")}, ValueError, "letterbox"),
    ("out_shape", RGB, {"out": np.zeros((1, 3, 5, 4), np.float32)}, ValueError, "out"),
    ("out_layout", RGB, {"out": np.zeros((1, 4, 5, 3), np.float32)}, ValueError, "out"),
    ("out_dtype", RGB, {"out": np.zeros((1, 3, 4, 5), np.float64)}, TypeError, "out"),
    ("out_type", RGB, {"out": [[0.0]]}, TypeError, "out"),
    ("out_not_contiguous", RGB, {"out": np.zeros((1, 3, 4, 10), np.float32)[..., ::2]}, ValueError, "out"),
    ("out_readonly", RGB, {"out": np.broadcast_to(np.float32(0), (1, 3, 4, 5))}, ValueError, "out"),
    ("backend_unknown", RGB, {}, ValueError, "backend"),
]


@pytest.mark.parametrize(("name", "src", "overrides", "exc", "text"), CASES, ids=[c[0] for c in CASES])
def test_invalid_argument_raises(
    backend: str, name: str, src: Any, overrides: dict[str, Any], exc: type[Exception], text: str
) -> None:
    if name == "backend_unknown":
        backend = "native-avx9000"
    with pytest.raises(exc, match=text):
        call(src, backend=backend, **overrides)


def test_frame_error_is_a_value_error() -> None:
    assert issubclass(FrameError, ValueError)


# ---------------------------------------------------------------- the raw C entry

native = pytest.importorskip("edge._native")


def raw_args(**kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(
        src=np.zeros((8, 10, 3), np.uint8),
        out=np.zeros((1, 3, 4, 5), np.float32),
        fmt=0,
        crop=(0, 0, 10, 8),
        inner=(0, 0, 4, 5),
        order=0,
        alpha=(1.0, 1.0, 1.0),
        beta=(0.0, 0.0, 0.0),
        fill=0.0,
        dtype=0,
        layout=0,
    )
    args.update(kw)
    return args


def test_raw_entry_accepts_valid_arguments() -> None:
    assert native.preprocess(**raw_args()) is None
    for path in native.simd_paths():
        native.preprocess(**raw_args(), path=path)


RAW_CASES: list[tuple[dict[str, Any], type[Exception]]] = [
    ({"fmt": 5}, ValueError),
    ({"fmt": -1}, ValueError),
    ({"dtype": 3}, ValueError),
    ({"layout": 2}, ValueError),
    ({"order": 2}, ValueError),
    ({"alpha": (float("inf"), 1.0, 1.0)}, ValueError),
    ({"beta": (0.0, float("nan"), 0.0)}, ValueError),
    ({"fill": float("inf")}, ValueError),
    ({"alpha": (1.0, 1.0)}, TypeError),
    ({"crop": (0, 0, 11, 8)}, ValueError),
    ({"crop": (-1, 0, 5, 5)}, ValueError),
    ({"crop": (0, 0, 0, 5)}, ValueError),
    ({"crop": (2**31 - 1, 0, 5, 5)}, ValueError),
    ({"inner": (0, 0, 5, 5)}, ValueError),
    ({"inner": (1, 0, 4, 5)}, ValueError),
    ({"inner": (0, 0, 0, 5)}, ValueError),
    ({"src": np.zeros((8, 10, 3), np.float32)}, TypeError),
    ({"src": np.zeros((8, 10), np.uint8)}, ValueError),
    ({"src": np.zeros((8, 10, 3), np.uint8)[:, ::2]}, ValueError),
    ({"src": b"\x00" * 240}, ValueError),
    ({"src": 3}, TypeError),
    ({"src": np.zeros((8, 10, 3), np.uint8), "fmt": 3}, ValueError),
    ({"src": np.zeros((8, 9, 2), np.uint8), "fmt": 3, "crop": (0, 0, 9, 8)}, ValueError),
    ({"src": np.zeros((10, 10), np.uint8), "fmt": 4}, ValueError),
    ({"out": np.zeros((1, 3, 4, 5), np.float64)}, TypeError),
    ({"out": np.zeros((1, 3, 4, 5), np.uint8)}, TypeError),
    ({"out": np.zeros((1, 1, 4, 5), np.float32)}, ValueError),
    ({"out": np.zeros((3, 4, 5), np.float32)}, ValueError),
    ({"out": np.zeros((1, 3, 4, 10), np.float32)[..., ::2]}, Exception),
    ({"out": np.zeros((1, 3, 4, 5), np.float32).view(np.uint32)}, TypeError),
    ({"out": b"\x00" * 240}, Exception),
    ({"out": None}, TypeError),
    ({"path": "avx9000"}, ValueError),
]


@pytest.mark.parametrize(("overrides", "exc"), RAW_CASES)
def test_raw_entry_rejects(overrides: dict[str, Any], exc: type[Exception]) -> None:
    with pytest.raises(exc):
        native.preprocess(**raw_args(**overrides))


def _garbage(rng: random.Random) -> Any:
    choices: list[Any] = [
        None,
        rng.randint(-(2**40), 2**40),
        rng.random() * 1e6 - 5e5,
        float("nan"),
        "RGB",
        b"\x00" * rng.randint(0, 64),
        bytearray(rng.randint(0, 64)),
        (rng.randint(-5, 50), rng.randint(-5, 50), rng.randint(-5, 50), rng.randint(-5, 50)),
        (1.0, 2.0, 3.0),
        np.zeros(
            tuple(rng.randint(0, 9) for _ in range(rng.randint(0, 4))), dtype=rng.choice(["u1", "i1", "f4", "f8"])
        ),
        np.zeros((rng.randint(1, 12), rng.randint(1, 12), rng.randint(1, 3)), np.uint8)[:: rng.choice([1, -1, 2])],
        np.zeros((1, rng.randint(1, 4), rng.randint(1, 6), rng.randint(1, 6)), rng.choice(["f4", "u1", "i1"])),
        memoryview(b"\x00" * 16).cast("B", (4, 4)),
        [1, 2, 3],
    ]
    return rng.choice(choices)


def test_raw_entry_fuzz_never_crashes() -> None:
    rng = random.Random(1234)
    names = ["src", "out", "fmt", "crop", "inner", "order", "alpha", "beta", "fill", "dtype", "layout"]
    for _ in range(3000):
        args = raw_args(
            src=np.zeros((rng.randint(1, 12), rng.randint(1, 12), rng.choice([1, 2, 3])), np.uint8),
            out=np.zeros((1, 3, rng.randint(1, 6), rng.randint(1, 6)), rng.choice(["f4", "u1", "i1"])),
            fmt=rng.randint(0, 4),
            dtype=rng.randint(0, 2),
            layout=rng.randint(0, 1),
            crop=tuple(rng.randint(-2, 12) for _ in range(4)),
            inner=tuple(rng.randint(-2, 6) for _ in range(4)),
        )
        for name in rng.sample(names, rng.randint(0, 3)):
            args[name] = _garbage(rng)
        positional = [args[n] for n in names]
        if rng.random() < 0.1:
            positional = positional[: rng.randint(0, len(positional))]
        # Any of these is a clean rejection; a crash or another exception type fails the test.
        with contextlib.suppress(TypeError, ValueError, BufferError, OverflowError):
            native.preprocess(*positional)


def test_plan_cache_keeps_type_errors(backend: str) -> None:
    # A valid call caches its plan; arguments equal in value but of a rejected type must still be rejected.
    call(backend=backend, size=(4, 5), mean=1.0, crop=(0, 0, 10, 8))
    with pytest.raises(TypeError, match="size"):
        call(backend=backend, size=(4.0, 5), mean=1.0, crop=(0, 0, 10, 8))
    with pytest.raises(TypeError, match="mean"):
        call(backend=backend, size=(4, 5), mean=True, crop=(0, 0, 10, 8))
    with pytest.raises(TypeError, match="crop"):
        call(backend=backend, size=(4, 5), mean=1.0, crop=(0, 0, 10.0, 8))
