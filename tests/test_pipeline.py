"""The pipeline with the real bundled model: ordering, evidence in records, rejects, backpressure, shutdown."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np
import pytest

from edge.errors import TransportError
from edge.inference.model import Model
from edge.pipeline import Pipeline
from edge.sensing.frames import Frame, PixelFormat, Reading
from edge.sensing.sources import ArraySource
from edge.sensing.synthetic import render_test_frames
from edge.wire.records import InferenceRecord, ReadingRecord, Record


class ListSink:
    """A sink that keeps what it is given (optionally slowly, to exercise backpressure)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.records: list[Record] = []
        self.delay = delay
        self.closed = False

    def write(self, records: Sequence[Record]) -> None:
        if self.delay:
            time.sleep(self.delay)
        self.records.extend(records)

    def close(self) -> None:
        self.closed = True


class ScriptedSource:
    """A source that yields a given list of items, then optionally fails like a device that vanished."""

    def __init__(self, items: list[Frame | Reading], fail: bool = False) -> None:
        self._items = items
        self._fail = fail
        self._stop = threading.Event()

    def items(self) -> Iterator[Frame | Reading]:
        for item in self._items:
            if self._stop.is_set():
                return
            yield item
        if self._fail:
            raise TransportError("serial port vanished")

    def close(self) -> None:
        self._stop.set()

    @property
    def rejected(self) -> int:
        return 0


@pytest.fixture(scope="module")
def model(digits_int8) -> Model:
    return Model(digits_int8, warmup=1)


@pytest.fixture(scope="module")
def yuyv_frames() -> tuple[list[np.ndarray], list[int]]:
    pairs = list(render_test_frames(PixelFormat.YUYV, count=40))
    return [f for f, _ in pairs], [label for _, label in pairs]


def inference_records(sink: ListSink) -> list[InferenceRecord]:
    return [r for r in sink.records if isinstance(r, InferenceRecord)]


def test_every_frame_inferred_in_order_with_evidence(model, yuyv_frames) -> None:
    frames, labels = yuyv_frames
    sink = ListSink()
    stats = Pipeline(ArraySource(frames, PixelFormat.YUYV, labels=labels), model, sink, queue_size=2).run()
    records = inference_records(sink)
    assert [r.seq for r in records] == list(range(len(frames)))
    assert stats.inferences == stats.frames_in == len(frames)
    for r, f in zip(records, frames, strict=True):
        assert r.input_sha256 == hashlib.sha256(f.tobytes()).hexdigest()
        assert r.model_sha256 == model.sha256 and r.model_id == model.model_id
        assert len(r.top_k) == 3 and r.top_k[0][1] >= r.top_k[1][1] >= r.top_k[2][1]
        assert r.preprocess_us >= 0 and r.inference_us > 0 and r.latency_us >= r.inference_us
        assert r.backend == Pipeline(ArraySource(frames, PixelFormat.YUYV), model, ListSink()).backend
    assert stats.labelled == len(frames)
    assert stats.correct / stats.labelled >= 0.9


def test_malformed_frames_are_rejected_counted_and_the_rest_still_run(model, yuyv_frames) -> None:
    good = yuyv_frames[0][:6]
    bad = [
        np.zeros((120, 159, 2), np.uint8),  # odd YUYV width
        np.zeros((120, 160, 2), np.float32),  # wrong dtype
        np.zeros((0, 160, 2), np.uint8),  # empty
        np.zeros((120, 160), np.uint8),  # wrong rank for YUYV
    ]
    items: list[Frame | Reading] = []
    for i, data in enumerate([good[0], bad[0], good[1], bad[1], good[2], bad[2], good[3], bad[3], good[4], good[5]]):
        items.append(Frame(data, PixelFormat.YUYV, i, time.time()))  # type: ignore[arg-type]
    sink = ListSink()
    stats = Pipeline(ScriptedSource(items), model, sink).run()
    assert stats.rejected_total == 4
    assert set(stats.rejected) <= {"FrameError", "ValueError", "TypeError"}
    assert [r.seq for r in inference_records(sink)] == [0, 2, 4, 6, 8, 9]


def test_readings_pass_through_in_order(model, yuyv_frames) -> None:
    f = yuyv_frames[0][0]
    items: list[Frame | Reading] = [
        Reading(1, 20.5, 1.0),
        Frame(f, PixelFormat.YUYV, 0, 2.0),
        Reading(2, -3.25, 3.0),
    ]
    sink = ListSink()
    stats = Pipeline(ScriptedSource(items), model, sink).run()
    assert stats.readings == 2 and stats.inferences == 1
    kinds = [type(r) for r in sink.records]
    assert kinds == [ReadingRecord, InferenceRecord, ReadingRecord]
    assert sink.records[2] == ReadingRecord(2, -3.25, 3.0)


def test_block_policy_loses_nothing_behind_a_slow_sink(model, yuyv_frames) -> None:
    frames, _ = yuyv_frames
    sink = ListSink(delay=0.01)
    stats = Pipeline(ArraySource(frames[:20], PixelFormat.YUYV), model, sink, queue_size=1).run()
    assert stats.dropped == 0 and stats.inferences == 20 == len(inference_records(sink))


def test_drop_oldest_policy_counts_every_drop(model, yuyv_frames) -> None:
    frames, _ = yuyv_frames
    sink = ListSink(delay=0.02)
    p = Pipeline(ArraySource(frames, PixelFormat.YUYV, count=200), model, sink, queue_size=1, on_full="drop_oldest")
    stats = p.run()
    assert stats.dropped > 0
    assert stats.frames_in == 200 == stats.inferences + stats.dropped + stats.rejected_total
    assert len(inference_records(sink)) == stats.inferences


def test_max_frames_stops_exactly(model, yuyv_frames) -> None:
    frames, _ = yuyv_frames
    sink = ListSink()
    stats = Pipeline(ArraySource(frames, PixelFormat.YUYV, loop=True), model, sink, max_frames=57).run()
    assert stats.inferences == 57 == len(inference_records(sink))


def test_stop_ends_an_endless_source_promptly(model, yuyv_frames) -> None:
    frames, _ = yuyv_frames
    sink = ListSink()
    p = Pipeline(ArraySource(frames, PixelFormat.YUYV, loop=True, fps=200), model, sink)
    p.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    p.stop()
    assert p.join(timeout=3)
    assert time.monotonic() - t0 < 1.0
    assert 0 < p.stats.inferences == len(inference_records(sink))


def test_a_failed_device_ends_the_run_with_its_error(model, yuyv_frames) -> None:
    f = yuyv_frames[0][0]
    items: list[Frame | Reading] = [Frame(f, PixelFormat.YUYV, i, 0.0) for i in range(3)]
    sink = ListSink()
    p = Pipeline(ScriptedSource(items, fail=True), model, sink)
    with pytest.raises(TransportError, match="vanished"):
        p.run()
    assert p.done
    assert len(inference_records(sink)) == 3
