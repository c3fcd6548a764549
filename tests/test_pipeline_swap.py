"""The pipeline's live model swap: records name the model that produced them, nothing is lost, reordered or mixed."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from edge.inference.model import Model
from edge.inference.postprocess import topk
from edge.inference.preprocess import preprocess_image
from edge.pipeline import Pipeline
from edge.sensing.frames import Frame, PixelFormat, Reading
from edge.sensing.synthetic import render_test_frames
from edge.wire.records import InferenceRecord, Record

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "models"))
import ota_models as om  # noqa: E402

# Every test runs on the default (native) preprocessing and on its numpy twin, through the pipeline's overrides.
BACKENDS = [pytest.param({}, id="default"), pytest.param({"backend": "numpy"}, id="numpy")]


class ListSink:
    """A sink that keeps what it is given."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def write(self, records: Sequence[Record]) -> None:
        self.records.extend(records)

    def close(self) -> None:
        pass


class HookedSource:
    """Frames in order; before yielding frame ``seq`` it calls ``hooks[seq]`` (a swap from the reader thread)."""

    def __init__(
        self, frames: list[np.ndarray], labels: list[int], hooks: dict[int, Callable[[], None]], fps: float = 0.0
    ) -> None:
        self._frames = frames
        self._labels = labels
        self._hooks = hooks
        self._period = 1.0 / fps if fps else 0.0
        self._stop = threading.Event()

    def items(self) -> Iterator[Frame | Reading]:
        for seq, (data, label) in enumerate(zip(self._frames, self._labels, strict=True)):
            if self._stop.is_set() or (self._period and self._stop.wait(self._period)):
                return
            if seq in self._hooks:
                self._hooks[seq]()
            yield Frame(data, PixelFormat.YUYV, seq, time.time(), label)

    def close(self) -> None:
        self._stop.set()

    @property
    def rejected(self) -> int:
        return 0


def tiny_model(path: Path, size: int) -> Path:
    """A float model with a ``size`` x ``size`` input: channel means through a fixed dense layer to 10 logits."""
    rng = np.random.default_rng(5)
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], transB=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 10])],
        [
            numpy_helper.from_array(rng.standard_normal((10, 3)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = {
        "edge.name": "tiny",
        "edge.version": "1",
        "edge.preprocess": json.dumps({"mean": [0, 0, 0], "std": [255, 255, 255], "size": [size, size]}),
        "edge.output": "logits",
    }
    for k, v in meta.items():
        e = model.metadata_props.add()
        e.key, e.value = k, v
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def frames() -> tuple[list[np.ndarray], list[int]]:
    pairs = list(render_test_frames(PixelFormat.YUYV, count=120))
    return [f for f, _ in pairs], [label for _, label in pairs]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Model]:
    d = tmp_path_factory.mktemp("models")
    return {
        "v1": Model(om.DIGITS_INT8, warmup=1),
        "v2": Model(om.with_version(om.DIGITS_INT8, d / "v2.onnx", "2.0.0"), warmup=1),
        "fp32": Model(om.DIGITS_FP32, warmup=1),
        "tiny": Model(tiny_model(d / "tiny.onnx", 20), warmup=1),
    }


def records_of(sink: ListSink) -> list[InferenceRecord]:
    return [r for r in sink.records if isinstance(r, InferenceRecord)]


def check_records_match_their_model(
    records: list[InferenceRecord], frames: list[np.ndarray], by_sha: dict[str, Model], overrides: dict[str, str]
) -> None:
    """Each record's top-k is what the model its record names computes for its frame (no mixed model or input)."""
    for r in records:
        model = by_sha[r.model_sha256]
        assert r.model_id == model.model_id
        x = preprocess_image(frames[r.seq], pixel_format=PixelFormat.YUYV, **{**model.preprocess_kwargs(), **overrides})
        expected = topk(model.run(x), 3, kind=model.output_kind)
        assert [c for c, _ in r.top_k] == [c for c, _ in expected], r.seq
        assert [p for _, p in r.top_k] == pytest.approx([p for _, p in expected], rel=1e-6, abs=1e-9), r.seq


@pytest.mark.parametrize("overrides", BACKENDS)
def test_swap_mid_run_to_v2_switches_ids_once_and_loses_nothing(models, frames, overrides) -> None:
    data, labels = frames
    baseline = Pipeline(HookedSource(data, labels, {}), models["v1"], ListSink(), preprocess=overrides).run()

    sink = ListSink()
    hooks: dict[int, Callable[[], None]] = {}
    p = Pipeline(HookedSource(data, labels, hooks), models["v1"], sink, queue_size=4, preprocess=overrides)
    hooks[50] = lambda: p.swap_model(models["v2"])
    stats = p.run()

    records = records_of(sink)
    assert [r.seq for r in records] == list(range(len(data)))  # one record per frame, in order
    ids = [r.model_id for r in records]
    first_v2 = ids.index("digits@2.0.0")
    assert set(ids[:first_v2]) == {"digits@1.0.0"} and set(ids[first_v2:]) == {"digits@2.0.0"}
    # The swap happened before frame 50 was read, so every frame from 50 on ran on v2; a few earlier ones may too.
    assert 0 < first_v2 <= 50
    shas = [r.model_sha256 for r in records]
    assert shas[:first_v2] == [models["v1"].sha256] * first_v2
    assert shas[first_v2:] == [models["v2"].sha256] * (len(data) - first_v2)
    assert p.model is models["v2"]
    assert stats.inferences == len(data) and stats.rejected_total == 0
    assert stats.correct == baseline.correct and stats.labelled == baseline.labelled  # same weights, same answers


@pytest.mark.parametrize("overrides", BACKENDS)
@pytest.mark.parametrize("target", ["fp32", "tiny"], ids=["float-input", "other-input-shape"])
def test_swap_to_a_model_with_another_input(models, frames, overrides, target) -> None:
    data, labels = frames
    new = models[target]
    assert new.input_spec.dtype != "uint8" or new.input_spec.shape != models["v1"].input_spec.shape
    sink = ListSink()
    hooks: dict[int, Callable[[], None]] = {}
    p = Pipeline(HookedSource(data, labels, hooks), models["v1"], sink, queue_size=4, preprocess=overrides)
    hooks[40] = lambda: p.swap_model(new)
    stats = p.run()

    records = records_of(sink)
    assert [r.seq for r in records] == list(range(len(data)))
    assert stats.rejected_total == 0
    assert {r.model_sha256 for r in records[40:]} == {new.sha256}
    check_records_match_their_model(records, data, {m.sha256: m for m in models.values()}, overrides)
    if target == "fp32":  # the same network in float: accuracy stays where it was
        assert stats.correct / stats.labelled >= 0.9


def test_concurrent_swaps_never_mix_a_models_buffer_with_another_model(models, frames) -> None:
    data, labels = frames
    sink = ListSink()
    p = Pipeline(HookedSource(data, labels, {}, fps=400), models["v1"], sink, queue_size=2)
    p.start()
    swaps = 0
    order = [models["fp32"], models["tiny"], models["v1"]]
    while not p.done:  # swap as fast as possible from this thread while frames flow
        p.swap_model(order[swaps % 3])
        swaps += 1
        time.sleep(0.0005)
    p.join()
    records = records_of(sink)
    assert [r.seq for r in records] == list(range(len(data)))
    assert p.stats.rejected_total == 0
    assert len({r.model_sha256 for r in records}) == 3, swaps  # all three models served frames
    check_records_match_their_model(records, data, {m.sha256: m for m in models.values()}, {})


def test_swap_while_not_running_just_replaces_the_model(models, frames) -> None:
    data, labels = frames
    sink = ListSink()
    p = Pipeline(HookedSource(data[:10], labels[:10], {}), models["v1"], sink)
    p.swap_model(models["fp32"])
    assert p.model is models["fp32"]
    p.run()
    assert {r.model_sha256 for r in records_of(sink)} == {models["fp32"].sha256}
    p.swap_model(models["v2"])  # after the run: still just replaces it
    assert p.model is models["v2"]
