"""The V4L2 source's parts that need no camera: the kernel ABI against the C header, format negotiation, dropped-frame
accounting, and the zero-copy view of a capture buffer fed to the preprocessing (on every backend).

The capture itself, against a real V4L2 device (the kernel's vivid driver), runs in the emulated box:
tests/system/test_system.py::test_camera_vivid (docs/system.md).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.errors import ConfigError
from edge.inference import preprocess as pp
from edge.sensing.v4l2 import _abi as abi
from edge.sensing.v4l2.device import Format
from edge.sensing.v4l2.negotiate import NegotiationError, Offer, choose, describe_offers
from edge.sensing.v4l2.sequence import SequenceTracker
from edge.sensing.v4l2.source import frame_array

STRUCTS = (
    "v4l2_capability",
    "v4l2_fmtdesc",
    "v4l2_frmsizeenum",
    "v4l2_frmivalenum",
    "v4l2_format",
    "v4l2_streamparm",
    "v4l2_requestbuffers",
    "v4l2_buffer",
)


def test_every_structure_size_and_ioctl_number_matches_the_c_header(tmp_path: Path) -> None:
    """The C compiler is the oracle: what videodev2.h says on this machine, printed by a program gcc builds."""
    lines = [f'printf("{name} %zu\\n", sizeof(struct {name}));' for name in STRUCTS]
    lines += [f'printf("VIDIOC_{name} %lu\\n", (unsigned long)VIDIOC_{name});' for name in abi.VIDIOC]
    lines += [
        f'printf("{n} %lu\\n", (unsigned long){n});'
        for n in ("V4L2_CAP_VIDEO_CAPTURE", "V4L2_CAP_STREAMING", "V4L2_BUF_FLAG_ERROR", "V4L2_PIX_FMT_NV12")
    ]
    src = tmp_path / "abi.c"
    src.write_text("#include <stdio.h>\n#include <linux/videodev2.h>\nint main(void) {\n" + "\n".join(lines) + "}\n")
    gcc = shutil.which("gcc")
    assert gcc is not None
    subprocess.run([gcc, "-o", str(tmp_path / "abi"), str(src)], check=True)
    out = subprocess.run([str(tmp_path / "abi")], capture_output=True, text=True, check=True).stdout
    c = {k: int(v) for k, v in (line.split() for line in out.splitlines())}
    for name in STRUCTS:
        assert ctypes.sizeof(getattr(abi, name)) == c[name], name
    for name, number in abi.VIDIOC.items():
        assert number == c[f"VIDIOC_{name}"], name
    assert c["V4L2_CAP_VIDEO_CAPTURE"] == abi.CAP_VIDEO_CAPTURE and c["V4L2_CAP_STREAMING"] == abi.CAP_STREAMING
    assert c["V4L2_BUF_FLAG_ERROR"] == abi.BUF_FLAG_ERROR and abi.fourcc("NV12") == c["V4L2_PIX_FMT_NV12"]


def test_fourcc_round_trips_and_unprintable_codes_are_shown_safely() -> None:
    assert abi.fourcc_name(abi.fourcc("YUYV")) == "YUYV"
    assert abi.fourcc_name(0x0A0D0000 | ord("A")) == "A???"
    with pytest.raises(ValueError, match="4 characters"):
        abi.fourcc("NV1")


# A webcam as such cameras enumerate: raw YUYV only at small sizes, MJPG up to 1080p, several rates each.
WEBCAM = [
    Offer("YUYV", 160, 120, (Fraction(1, 30), Fraction(1, 15))),
    Offer("YUYV", 640, 480, (Fraction(1, 30), Fraction(1, 15))),
    Offer("YUYV", 1280, 720, (Fraction(1, 10),)),
    Offer("MJPG", 640, 480, (Fraction(1, 30),)),
    Offer("MJPG", 1920, 1080, (Fraction(1, 30), Fraction(1, 25))),
    Offer("H264", 1920, 1080, (Fraction(1, 30),)),
]


def test_auto_takes_the_cheapest_raw_format_at_the_smallest_size_that_covers_the_model() -> None:
    c = choose(WEBCAM, model_size=(224, 224))
    assert (c.fourcc, c.width, c.height, c.interval) == ("YUYV", 640, 480, None)
    small = choose(WEBCAM, model_size=(32, 32))
    assert (small.fourcc, small.width, small.height) == ("YUYV", 160, 120)
    nv12 = choose([*WEBCAM, Offer("NV12", 640, 480)], model_size=(224, 224))
    assert nv12.fourcc == "NV12"


def test_a_model_larger_than_every_raw_size_is_read_as_mjpg() -> None:
    c = choose(WEBCAM, model_size=(1600, 900))
    assert (c.fourcc, c.width, c.height) == ("MJPG", 1920, 1080)
    # Nothing covers it at all: the largest size, raw preferred on a tie.
    huge = choose(WEBCAM, model_size=(4000, 3000))
    assert (huge.fourcc, huge.width, huge.height) == ("MJPG", 1920, 1080)


def test_configured_format_size_and_rate_are_honoured() -> None:
    c = choose(WEBCAM, capture_format="MJPG", width=640, height=480, fps=30, model_size=(224, 224))
    assert (c.fourcc, c.width, c.height, c.interval, c.fps) == ("MJPG", 640, 480, Fraction(1, 30), 30.0)
    assert choose(WEBCAM, width=1280, fps=24).interval == Fraction(1, 10)  # the only rate at that size
    assert choose(WEBCAM, fps=20, model_size=(224, 224)).interval == Fraction(1, 15)  # nearest: 15 (5 away), not 30


@pytest.mark.parametrize(
    ("kwargs", "key", "named"),
    [
        ({"capture_format": "NV12"}, "source.capture_format", "YUYV 160x120 (30, 15 fps), 640x480"),
        ({"width": 800, "height": 600}, "source.width", "YUYV 160x120"),
        ({"capture_format": "MJPG", "height": 720}, "source.height", "MJPG 640x480 (30 fps), 1920x1080 (30, 25 fps)"),
    ],
)
def test_what_the_device_does_not_offer_is_a_configuration_error_listing_what_it_does(
    kwargs: dict[str, Any], key: str, named: str
) -> None:
    with pytest.raises(NegotiationError) as err:
        choose(WEBCAM, device="/dev/video7", **kwargs)
    assert isinstance(err.value, ConfigError) and err.value.key == key
    assert "/dev/video7" in str(err.value) and named in str(err.value)


def test_a_device_with_no_format_edge_reads_is_refused_naming_what_it_has() -> None:
    with pytest.raises(NegotiationError, match=r"H264 1920x1080 \(30 fps\)"):
        choose([Offer("H264", 1920, 1080, (Fraction(1, 30),))])
    assert describe_offers([]) == "nothing"
    assert describe_offers([Offer("GREY", 8, 8, (Fraction(1001, 30000),))]) == "GREY 8x8 (29.97 fps)"


def test_sequence_gaps_are_counted_across_wraps_and_restarts_are_not_gaps() -> None:
    t = SequenceTracker()
    assert [t.observe(s) for s in (0, 1, 2, 5, 6, 10)] == [0, 0, 0, 2, 0, 3]
    assert t.dropped == 5
    assert [t.observe(s) for s in (2**32 - 2, 2**32 - 1, 1)] == [0, 0, 1]  # went back: a driver restart; then a wrap
    t.restart()
    assert t.observe(0) == 0 and t.dropped == 6
    with pytest.raises(ValueError, match="32 bits"):
        t.observe(2**32)


@pytest.fixture(params=pp.available_backends())
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize(
    ("fourcc", "pixel_format", "channels"),
    [("YUYV", "YUYV", 2), ("NV12", "NV12", 1), ("RGB3", "RGB888", 3), ("BGR3", "BGR888", 3), ("GREY", "GRAY8", 1)],
)
def test_a_capture_buffer_with_a_padded_stride_is_read_in_place(
    backend: str, fourcc: str, pixel_format: str, channels: int
) -> None:
    """The driver's buffer (here a bytearray standing for the mapped memory) becomes the preprocessing's input
    without a copy, whatever its stride, and preprocesses exactly as a contiguous copy of the same pixels."""
    w, h, pad = 64, 48, 40
    rows = h * 3 // 2 if fourcc == "NV12" else h
    stride = w * channels + pad
    rng = np.random.default_rng(1)
    memory = bytearray(rng.integers(0, 256, stride * rows + 100, dtype=np.uint8).tobytes())
    fmt = Format(fourcc, w, h, stride, stride * rows)
    view = frame_array(memoryview(memory), fmt)
    assert np.shares_memory(view, np.frombuffer(memory, dtype=np.uint8))  # no copy of the pixels
    dense = np.ascontiguousarray(view)
    assert not np.shares_memory(dense, view)
    kw: dict[str, Any] = {"size": (32, 32), "scale": 0.02, "zero_point": 3}
    got = pp.preprocess_image(view, pixel_format=pixel_format, backend=backend, dtype="int8", **kw)
    want = pp.preprocess_image(dense, pixel_format=pixel_format, backend=backend, dtype="int8", **kw)
    np.testing.assert_array_equal(got, want)


def test_a_truncated_capture_buffer_is_refused_not_read_past_its_end() -> None:
    fmt = Format("YUYV", 64, 48, 128, 128 * 48)
    with pytest.raises(ValueError, match="needs 6144 bytes, the buffer holds 6000"):
        frame_array(memoryview(bytearray(6000)), fmt)
    with pytest.raises(ValueError, match="NV12"):
        frame_array(memoryview(bytearray(10)), Format("NV12", 64, 48, 64, 64 * 72))


def test_a_missing_camera_is_waited_for_with_backoff_and_the_wait_shows_the_watchdog_it_is_alive(
    tmp_path: Path,
) -> None:
    """No device node at all (an unplugged camera): no error, retries with backoff, ``alive_at`` moving, and
    ``close()`` ends the wait promptly."""
    import threading  # noqa: PLC0415
    import time  # noqa: PLC0415

    from edge.sensing.v4l2.source import V4l2Source  # noqa: PLC0415

    source = V4l2Source(str(tmp_path / "video0"), reconnect_max_s=1.0)
    got: list[object] = []
    t = threading.Thread(target=lambda: got.extend(source.items()))
    start = source.alive_at
    t.start()
    time.sleep(2.5)
    assert source.alive_at > start + 1.0  # ticks while it backs off
    t0 = time.monotonic()
    source.close()
    t.join(timeout=3)
    assert not t.is_alive() and time.monotonic() - t0 < 1.5
    assert got == []


@pytest.mark.parametrize("kind", ["regular file", "/dev/null"])
def test_a_device_path_that_is_no_camera_is_a_configuration_error_naming_the_key(tmp_path: Path, kind: str) -> None:
    from edge.sensing.v4l2.source import V4l2Source  # noqa: PLC0415

    path = tmp_path / "video0"
    if kind == "regular file":
        path.write_bytes(b"not a camera")
    else:
        path = Path("/dev/null")
    source = V4l2Source(str(path))
    with pytest.raises(ConfigError) as err:
        next(iter(source.items()))
    assert err.value.key == "source.device" and str(path) in str(err.value)


def test_an_mjpg_frame_is_decoded_by_libjpeg_turbo_and_a_damaged_one_is_refused() -> None:
    """A webcam's MJPG buffer (here a JPEG libjpeg-turbo encoded) decodes to RGB; garbage is a ValueError, which the
    source counts as a rejected frame."""
    import simplejpeg  # noqa: PLC0415

    from edge.sensing.v4l2.source import _decode_jpeg  # noqa: PLC0415

    rng = np.random.default_rng(3)
    rgb = np.repeat(np.repeat(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), 8, axis=0), 8, axis=1)
    jpeg = simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), quality=95, colorspace="RGB")
    got = _decode_jpeg(memoryview(bytearray(jpeg)))
    assert got.shape == (96, 128, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - rgb.astype(int)).mean() < 4  # lossy, but the same picture
    with pytest.raises(ValueError, match="not a decodable JPEG"):
        _decode_jpeg(memoryview(bytearray(b"\xff\xd8\xff not a jpeg at all")))
