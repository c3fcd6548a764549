"""The records the service emits: one per inference, one per sensor reading.

An inference record is the box's evidence of work: which model (id and SHA-256) saw which input (SHA-256 of the
frame's bytes) and what it said. The telemetry layer signs batches of them; until then a sink writes them out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["InferenceRecord", "ReadingRecord", "Record", "to_dict"]


@dataclass(frozen=True, slots=True)
class InferenceRecord:
    """One inference.

    Attributes:
        seq: the source's frame number.
        timestamp: capture time of the frame (seconds since the epoch).
        model_id: ``name@version`` of the model.
        model_sha256: hex SHA-256 of the model file.
        input_sha256: hex SHA-256 of the frame's bytes as the sensor delivered them.
        pixel_format: the frame's pixel format.
        top_k: (class, score) pairs, best first (empty for a scalar model).
        score: the scalar output of a score model, else None.
        label: the ground truth where the source knows it, else None.
        preprocess_us, inference_us: time spent in each stage.
        latency_us: from the frame leaving its source to the record being built.
        backend: the preprocessing path that produced the input tensor.
    """

    seq: int
    timestamp: float
    model_id: str
    model_sha256: str
    input_sha256: str
    pixel_format: str
    top_k: tuple[tuple[int, float], ...]
    score: float | None
    label: int | None
    preprocess_us: int
    inference_us: int
    latency_us: int
    backend: str


@dataclass(frozen=True, slots=True)
class ReadingRecord:
    """One scalar sensor reading, passed through unchanged."""

    channel: int
    value: float
    timestamp: float


Record = InferenceRecord | ReadingRecord


def to_dict(record: Record) -> dict[str, Any]:
    """A JSON-ready mapping of ``record`` with a ``type`` key ("inference" or "reading")."""
    if isinstance(record, ReadingRecord):
        return {"type": "reading", "channel": record.channel, "value": record.value, "ts": record.timestamp}
    out: dict[str, Any] = {
        "type": "inference",
        "seq": record.seq,
        "ts": record.timestamp,
        "model": record.model_id,
        "model_sha256": record.model_sha256,
        "input_sha256": record.input_sha256,
        "pixel_format": record.pixel_format,
        "top_k": [[c, round(s, 6)] for c, s in record.top_k],
        "timing_us": {
            "preprocess": record.preprocess_us,
            "inference": record.inference_us,
            "latency": record.latency_us,
        },
        "backend": record.backend,
    }
    if record.score is not None:
        out["score"] = record.score
    if record.label is not None:
        out["label"] = record.label
    return out
