"""The box's pipeline: source → preprocess → model → postprocess → record → sink.

Three threads joined by bounded queues, so the stages overlap on a multi-core box and a slow stage pushes back
instead of growing memory:

- ``read``: pulls items from the source into the input queue (blocking when full, or dropping the oldest frame
  when ``on_full="drop_oldest"``, counted), and takes each frame's SHA-256 as the sensor delivered it (hashing
  releases the GIL and this stage is otherwise idle, so the digest costs the inference stage nothing).
- ``infer``: preprocesses each frame into one reused input buffer and runs the model. Only native code runs here
  between two queue operations (both release the GIL), so this stage is the time the model and the C preprocessing
  take and little more.
- ``emit``: postprocesses and builds records (with the digest the read stage took), handing them to the sink in
  batches.

Invariants: every frame that enters is either inferred, rejected (malformed, counted by reason) or dropped by the
queue policy (counted); records leave in the order frames arrived; ``stop()`` lets queued items finish.

Live model swap (an OTA commit): :meth:`Pipeline.swap_model` publishes the new model together with its own input
buffer and preprocessing arguments as one immutable :class:`_Active`, in a single attribute assignment. The infer
stage reads that attribute once per frame and uses what it read for the whole frame, so a frame is preprocessed and
inferred by one model, never a mix; the model travels with the frame to the emit stage, so each record names the
model (id and SHA-256) that actually produced it and is postprocessed by that model's output kind. Frames already
inferred when the swap happens finish with the old model. The hot path takes no lock.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, cast

import numpy as np
import numpy.typing as npt

from edge.inference.model import Model
from edge.inference.postprocess import Kind, scalar_score, topk
from edge.inference.preprocess import backend as preprocess_backend
from edge.inference.preprocess import preprocess_image
from edge.log import Throttle, event
from edge.sensing.frames import Frame, Reading
from edge.sensing.sources import Source
from edge.sinks import Sink
from edge.wire.records import InferenceRecord, ReadingRecord, Record

__all__ = ["Pipeline", "PipelineStats"]

log = logging.getLogger("edge.pipeline")

_END: Final = object()  # queue sentinel: no more items
# An item, the perf_counter_ns when its source handed it over, and for a frame the hex SHA-256 of its bytes.
_Entry = tuple[Frame | Reading, int, str]
_EMIT_BATCH: Final = 64
_LATENCY_WINDOW: Final = 10_000


@dataclass
class PipelineStats:
    """Counters of a pipeline run; read them from any thread (each is written by one stage only)."""

    frames_in: int = 0
    inferences: int = 0
    readings: int = 0
    dropped: int = 0
    source_dropped: int = 0  # frames the source lost before they reached the pipeline (Frame.dropped_before)
    rejected: dict[str, int] = field(default_factory=dict)
    latencies_us: deque[int] = field(default_factory=lambda: deque(maxlen=_LATENCY_WINDOW))
    correct: int = 0
    labelled: int = 0
    last_progress: float = field(default_factory=time.monotonic)

    @property
    def rejected_total(self) -> int:
        """Frames rejected as malformed, all reasons together."""
        return sum(self.rejected.values())

    def latency_percentiles(self, *qs: float) -> list[float]:
        """Latency percentiles in microseconds over the most recent records (empty window: zeros)."""
        if not self.latencies_us:
            return [0.0 for _ in qs]
        return [float(x) for x in np.percentile(np.fromiter(self.latencies_us, dtype=np.int64), qs)]


@dataclass(frozen=True, slots=True)
class _Active:
    """The model the infer stage uses, with the input buffer bound to it and its preprocessing arguments."""

    model: Model
    buffer: npt.NDArray[Any]
    kwargs: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class _Inferred:
    frame: Frame
    digest: str
    output: npt.NDArray[Any]
    model: Model
    acquired_ns: int
    preprocess_ns: int
    inference_ns: int


# What a frame carries once its lent buffer is given back (Frame.release): its pixels must not be read again.
_NO_PIXELS: Final = np.empty(0, dtype=np.uint8)


def _release(entry: object) -> None:
    """Give back the lent buffer of a frame the pipeline will not preprocess (dropped, or drained at the end)."""
    if isinstance(entry, tuple) and entry and isinstance(entry[0], Frame) and entry[0].release is not None:
        entry[0].release()


def _digest(frame: Frame) -> str:
    """SHA-256 of the frame's pixels, row after row without any row padding (the same for any stride)."""
    data = frame.data
    try:
        if (
            isinstance(data, np.ndarray)
            and data.ndim >= 2
            and not data.flags.c_contiguous
            and data[0].flags.c_contiguous
        ):
            # A capture buffer with padded rows: hash row by row rather than copy the whole frame.
            h = hashlib.sha256()
            for row in data:
                h.update(row.data)
            return h.hexdigest()
        return hashlib.sha256(np.ascontiguousarray(data).data).hexdigest()
    except (TypeError, ValueError):
        return ""  # not an array at all: the preprocessing rejects it with a proper reason


class Pipeline:
    """Runs a model over a source's frames and hands records to a sink.

    Args:
        source: where frames and readings come from.
        model: the loaded model.
        sink: where records go.
        top_k: classes per inference record.
        queue_size: capacity of each queue between stages.
        on_full: "block" (backpressure to the source) or "drop_oldest" (a live camera: fresh frames win).
        max_frames: stop after this many inferences (0: until the source ends or ``stop()``).
        preprocess: overrides of the preprocessing arguments the model asks for (crop, letterbox, mean, std).
    """

    def __init__(
        self,
        source: Source,
        model: Model,
        sink: Sink,
        *,
        top_k: int = 3,
        queue_size: int = 8,
        on_full: str = "block",
        max_frames: int = 0,
        preprocess: Mapping[str, Any] | None = None,
    ) -> None:
        self.source = source
        self.sink = sink
        self.stats = PipelineStats()
        self._reject_log = Throttle(1.0, first=10)  # rejects are logged from the infer thread only
        self.backend = preprocess_backend()
        self._top_k = top_k
        self._drop_oldest = on_full == "drop_oldest"
        self._max_frames = max_frames
        self._overrides = dict(preprocess or {})
        self._swap_lock = threading.Lock()
        self._active = self._prepare(model)
        self._in: queue.Queue[object] = queue.Queue(queue_size)
        self._out: queue.Queue[object] = queue.Queue(queue_size)
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self._threads = [
            threading.Thread(target=self._guard, args=(stage, inbox), name=f"edge-{name}", daemon=True)
            for name, stage, inbox in (
                ("read", self._read, None),
                ("infer", self._infer, self._in),
                ("emit", self._emit, self._out),
            )
        ]

    # -- control ---------------------------------------------------------------------------------------------------

    @property
    def model(self) -> Model:
        """The model that the next frame will be inferred with."""
        return self._active.model

    def swap_model(self, model: Model) -> None:
        """Switch to another model without stopping: the next frame the infer stage takes uses it.

        Frames already inferred are emitted with the model that inferred them (their records carry its id and
        SHA-256). The new model gets its own input buffer and its own preprocessing arguments (with this pipeline's
        overrides applied again), so its input may differ in shape, dtype or layout. Safe to call from any thread,
        running or not.

        Args:
            model: the loaded, warmed model to run from now on.
        """
        with self._swap_lock:  # two swappers must not interleave; the infer stage never takes this lock
            old = self._active.model
            self._active = self._prepare(model)
        event(log, logging.INFO, "model swapped", old=old.model_id, new=model.model_id, sha256=model.sha256)

    def _prepare(self, model: Model) -> _Active:
        return _Active(model, model.new_input(), {**model.preprocess_kwargs(), **self._overrides})

    def start(self) -> None:
        """Start the three stage threads."""
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Ask the pipeline to finish: the source stops, queued items still complete."""
        self._stop.set()
        self.source.close()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the stages to finish; True when all did. Re-raises the first stage failure."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if self._errors:
            raise self._errors[0]
        return not any(t.is_alive() for t in self._threads)

    def run(self) -> PipelineStats:
        """Start, wait until the source ends, ``max_frames`` is reached or ``stop()`` is called, and return stats."""
        self.start()
        self.join()
        return self.stats

    @property
    def done(self) -> bool:
        """True once every stage has ended."""
        return not any(t.is_alive() for t in self._threads)

    # -- stages ----------------------------------------------------------------------------------------------------

    def _guard(self, stage: Callable[[], None], inbox: queue.Queue[object] | None) -> None:
        try:
            stage()
        except BaseException as e:
            # A failed stage (a device gone, a sink that cannot write, a bug) ends the run: the source stops, and
            # this stage keeps draining its inbox so the stages before it can finish and join() can raise.
            self._errors.append(e)
            event(log, logging.ERROR, "pipeline stage failed", stage=stage.__name__, error=repr(e))
            self.stop()
            if inbox is not None:
                self._drain(inbox)

    def _drain(self, inbox: queue.Queue[object]) -> None:
        upstream = self._threads[: 1 if inbox is self._in else 2]
        while any(t.is_alive() for t in upstream) or not inbox.empty():
            try:
                entry = inbox.get(timeout=0.05)
            except queue.Empty:
                continue
            if entry is _END:
                return
            _release(entry)

    def _read(self) -> None:
        stats = self.stats
        put = self._in.put
        try:
            for item in self.source.items():
                if self._stop.is_set():
                    if isinstance(item, Frame) and item.release is not None:
                        item.release()
                    break
                acquired = time.perf_counter_ns()
                digest = ""
                if isinstance(item, Frame):
                    stats.frames_in += 1
                    stats.source_dropped += item.dropped_before
                    digest = _digest(item)
                entry = (item, acquired, digest)
                if self._drop_oldest:
                    while True:
                        try:
                            self._in.put_nowait(entry)
                            break
                        except queue.Full:
                            try:
                                _release(self._in.get_nowait())
                                stats.dropped += 1
                            except queue.Empty:
                                pass
                else:
                    put(entry)
                # Not held while the source blocks for the next item: a lent capture buffer's memory (and the device
                # it maps) must be free once the pipeline is done with the frame.
                del item, entry
        finally:
            put(_END)

    def _infer(self) -> None:
        get, put = self._in.get, self._out.put
        clock = time.perf_counter_ns
        done = 0
        try:
            while True:
                entry = get()
                if entry is _END:
                    break
                item, acquired, digest = cast(_Entry, entry)
                del entry  # only item refers to the frame from here, and it is rebound once the pixels are read
                if isinstance(item, Reading):
                    put(item)
                    continue
                active = self._active  # read once: this frame uses one model throughout, whatever a swap does
                model, buf = active.model, active.buffer
                t0 = clock()
                try:
                    preprocess_image(item.data, pixel_format=item.pixel_format, out=buf, **active.kwargs)
                except (ValueError, TypeError) as e:
                    self._reject(type(e).__name__, item, e)
                    continue
                finally:
                    if item.release is not None:
                        item.release()  # the pixels are in buf now: a capture buffer goes back to its driver
                        # and the frame goes on without its view of that buffer
                        item = replace(item, data=_NO_PIXELS, release=None)
                t1 = clock()
                output = model.run(buf)
                t2 = clock()
                put(_Inferred(item, digest, output, model, acquired, t1 - t0, t2 - t1))
                del item  # see _read: nothing of a frame is kept while waiting for the next
                done += 1
                if done == self._max_frames:
                    self.stop()
                    # Frames already read stay unprocessed; the reader may be blocked on a full queue: unblock it.
                    self._drain(self._in)
                    break
        finally:
            put(_END)

    def _reject(self, reason: str, frame: Frame, error: Exception) -> None:
        counts = self.stats.rejected
        n = counts.get(reason, 0) + 1
        counts[reason] = n
        suppressed = self._reject_log.allow(reason)
        if suppressed is not None:  # the first few in full, then one a second: a flood must not flood the log
            event(
                log,
                logging.WARNING,
                "frame rejected",
                seq=frame.seq,
                reason=reason,
                error=str(error),
                count=n,
                suppressed=suppressed,
            )

    def _emit(self) -> None:
        get, get_nowait = self._out.get, self._out.get_nowait
        stats = self.stats
        batch: list[Record] = []
        finished = False
        while not finished:
            item = get()
            while True:
                if item is _END:
                    finished = True
                    break
                if isinstance(item, Reading):
                    batch.append(ReadingRecord(item.channel, item.value, item.timestamp))
                    stats.readings += 1
                else:
                    assert isinstance(item, _Inferred)
                    batch.append(self._record(item))
                    # Hand the GIL over at once if the infer stage is back from native code and waiting for it;
                    # otherwise it would wait out the interpreter's 5 ms switch interval (a convoy).
                    time.sleep(0)
                if len(batch) >= _EMIT_BATCH:
                    break
                try:
                    item = get_nowait()
                except queue.Empty:
                    break
            if batch:
                self.sink.write(batch)
                batch = []
                stats.last_progress = time.monotonic()

    def _record(self, r: _Inferred) -> InferenceRecord:
        stats = self.stats
        frame = r.frame
        kind: Kind = r.model.output_kind
        if kind == "score":
            ranked: tuple[tuple[int, float], ...] = ()
            score: float | None = scalar_score(r.output)
        else:
            ranked = tuple(topk(r.output, self._top_k, kind=kind))
            score = None
        latency = (time.perf_counter_ns() - r.acquired_ns) // 1000
        stats.inferences += 1
        stats.latencies_us.append(latency)
        if frame.label is not None and ranked:
            stats.labelled += 1
            stats.correct += ranked[0][0] == frame.label
        return InferenceRecord(
            seq=frame.seq,
            timestamp=frame.timestamp,
            model_id=r.model.model_id,
            model_sha256=r.model.sha256,
            input_sha256=r.digest,
            pixel_format=str(frame.pixel_format),
            top_k=ranked,
            score=score,
            label=frame.label,
            preprocess_us=r.preprocess_ns // 1000,
            inference_us=r.inference_ns // 1000,
            latency_us=latency,
            backend=self.backend,
        )
