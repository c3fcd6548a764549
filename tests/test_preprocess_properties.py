"""Property tests: random frames, strides, crops, sizes and options against the float64 reference."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from preprocess_reference import assert_close

from edge.inference import preprocess as pp

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw: st.DrawFn) -> dict[str, Any]:
    fmt = draw(st.sampled_from(["RGB888", "BGR888", "GRAY8", "YUYV", "NV12"]))
    even = fmt in ("YUYV", "NV12")
    h = draw(st.integers(1, 12)) * (2 if fmt == "NV12" else 1) + (0 if fmt == "NV12" else draw(st.integers(0, 12)))
    w = draw(st.integers(1, 14)) * 2 if even else draw(st.integers(1, 28))
    rows = h * 3 // 2 if fmt == "NV12" else h
    inner = {"RGB888": (3,), "BGR888": (3,), "YUYV": (2,), "GRAY8": (), "NV12": ()}[fmt]
    pad = draw(st.integers(0, 5))
    seed = draw(st.integers(0, 2**32 - 1))
    buf = np.random.default_rng(seed).integers(0, 256, (rows, w + pad, *inner), dtype=np.uint8)
    src = buf[:, :w]
    if draw(st.booleans()):
        src = src[::-1]
    if fmt == "GRAY8" and draw(st.booleans()):
        src = src[..., None]
    crop = None
    if draw(st.booleans()):
        cx = draw(st.integers(0, w - 1))
        cy = draw(st.integers(0, h - 1))
        crop = (cx, cy, draw(st.integers(1, w - cx)), draw(st.integers(1, h - cy)))
    size = (draw(st.integers(1, 30)), draw(st.integers(1, 30)))
    dtype = draw(st.sampled_from(["float32", "uint8", "int8"]))
    channels = 1 if fmt == "GRAY8" else 3
    mean = draw(st.one_of(st.floats(-50, 300), st.lists(st.floats(-50, 300), min_size=channels, max_size=channels)))
    std = draw(
        st.one_of(
            st.floats(0.5, 100),
            st.lists(st.floats(0.5, 100) | st.floats(-100, -0.5), min_size=channels, max_size=channels),
        )
    )
    kw: dict[str, Any] = dict(
        size=size,
        mean=mean,
        std=std,
        layout=draw(st.sampled_from(["NCHW", "NHWC"])),
        dtype=dtype,
        crop=crop,
        channel_order=draw(st.sampled_from(["RGB", "BGR"])),
        letterbox=draw(st.none() | st.floats(0, 255)),
    )
    if dtype == "int8":
        kw.update(scale=draw(st.floats(0.005, 4)), zero_point=draw(st.integers(-128, 127)))
    elif dtype == "uint8" and draw(st.booleans()):
        kw.update(scale=draw(st.floats(0.005, 4)), zero_point=draw(st.integers(0, 255)))
    return {"src": src, "fmt": fmt, "kw": kw}


@pytest.mark.parametrize("backend", pp.available_backends())
@SETTINGS
@given(case=cases())
def test_random_cases_match_reference(backend: str, case: dict[str, Any]) -> None:
    src, fmt, kw = case["src"], case["fmt"], case["kw"]
    got = pp.preprocess_image(src, pixel_format=fmt, backend=backend, **kw)
    assert_close(got, src.reshape(src.shape[0], src.shape[1], *src.shape[2:]), fmt, **kw)


@SETTINGS
@given(case=cases())
def test_all_backends_agree(case: dict[str, Any]) -> None:
    src, fmt, kw = case["src"], case["fmt"], case["kw"]
    outs = [pp.preprocess_image(src, pixel_format=fmt, backend=b, **kw) for b in pp.available_backends()]
    tol = 1.0 if kw["dtype"] != "float32" else 1e-3 * max(1.0, float(np.abs(outs[0]).max()))
    for o in outs[1:]:
        assert np.abs(o.astype(np.float64) - outs[0].astype(np.float64)).max() <= tol
