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


class LendingSource:
    """A capture device's contract: a small ring of lent buffers, each frame a view of one, given back by release.

    It yields a frame only while it has a free buffer (as a V4L2 driver only fills queued buffers), so a pipeline
    that forgets a release stalls it; it records every release and fails on a double one.
    """

    def __init__(self, frames: list[np.ndarray], count: int, ring: int, bad_every: int = 0) -> None:
        self._frames, self._count, self._bad_every = frames, count, bad_every
        self.free = threading.Semaphore(ring)
        self.lent: set[int] = set()
        self.released: list[int] = []
        self.double: list[int] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def _release(self, seq: int) -> None:
        with self._lock:
            if seq not in self.lent:
                self.double.append(seq)
                return
            self.lent.discard(seq)
            self.released.append(seq)
        self.free.release()

    def items(self) -> Iterator[Frame | Reading]:
        for seq in range(self._count):
            while not self.free.acquire(timeout=0.05):
                if self._stop.is_set():
                    return
            data = self._frames[seq % len(self._frames)]
            if self._bad_every and seq % self._bad_every == 0:
                data = data[:, :-1]  # an odd YUYV width: rejected by the preprocessing
            with self._lock:
                self.lent.add(seq)
            yield Frame(data, PixelFormat.YUYV, seq, time.time(), release=lambda s=seq: self._release(s),
                        dropped_before=1 if seq == 5 else 0)  # fmt: skip

    def close(self) -> None:
        self._stop.set()

    @property
    def rejected(self) -> int:
        return 0


@pytest.mark.parametrize("on_full", ["block", "drop_oldest"])
def test_lent_buffers_go_back_once_whether_inferred_rejected_or_dropped(model, yuyv_frames, on_full) -> None:
    frames, _ = yuyv_frames
    source = LendingSource(frames, count=120, ring=4, bad_every=7)
    sink = ListSink(delay=0.005)
    stats = Pipeline(source, model, sink, queue_size=2, on_full=on_full).run()
    # Every frame came back exactly once, and the ring never ran dry for good (all 120 were lent).
    assert sorted(source.released) == list(range(120)) and source.double == [] and source.lent == set()
    assert stats.frames_in == 120 == stats.inferences + stats.dropped + stats.rejected_total
    assert stats.source_dropped == 1
    if on_full == "block":
        assert stats.dropped == 0 and stats.rejected_total == len(range(0, 120, 7))
    else:
        assert stats.dropped > 0 and 0 < stats.rejected_total <= len(range(0, 120, 7))


def test_a_stopped_pipeline_gives_back_what_it_holds(model, yuyv_frames) -> None:
    frames, _ = yuyv_frames
    source = LendingSource(frames, count=10**6, ring=3)
    p = Pipeline(source, model, ListSink(delay=0.05), queue_size=2)
    p.start()
    time.sleep(0.3)
    p.stop()
    assert p.join(timeout=5)
    assert source.double == [] and source.lent == set(), source.lent


class VanishingSource:
    """A camera that delivers some frames and then is unplugged: while it waits (inside ``items()``, as a source
    reopening its device does), nothing may still refer to a frame it lent, or its buffer's mapping would keep the
    device open and the camera could never come back."""

    def __init__(self, frames: list[np.ndarray], count: int) -> None:
        self._frames, self._count = frames, count
        self.lent: set[int] = set()
        self.still_referenced: list[int] | None = None
        self._lock = threading.Lock()

    def _release(self, seq: int) -> None:
        with self._lock:
            self.lent.discard(seq)

    def items(self) -> Iterator[Frame | Reading]:
        import weakref  # noqa: PLC0415

        refs: list[weakref.ref[np.ndarray]] = []
        for seq in range(self._count):
            view = self._frames[seq % len(self._frames)][:]  # a view: the frame's own array object
            refs.append(weakref.ref(view))
            with self._lock:
                self.lent.add(seq)
            yield Frame(view, PixelFormat.YUYV, seq, time.time(), release=lambda s=seq: self._release(s))
            del view
        deadline = time.monotonic() + 10
        while self.lent and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # the stages finish what they were doing with the last frame
        self.still_referenced = [i for i, r in enumerate(refs) if r() is not None]

    def close(self) -> None:
        pass

    @property
    def rejected(self) -> int:
        return 0


@pytest.mark.parametrize("on_full", ["block", "drop_oldest"])
def test_no_stage_keeps_a_lent_frame_while_the_source_waits(model, yuyv_frames, on_full) -> None:
    frames, _ = yuyv_frames
    source = VanishingSource(frames, count=12)
    stats = Pipeline(source, model, ListSink(), queue_size=2, on_full=on_full).run()
    assert stats.frames_in == 12 and source.lent == set()
    assert source.still_referenced == [], source.still_referenced
