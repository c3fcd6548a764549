"""edge.inference.postprocess: stable softmax and top-k against a float64 reference; ties, k beyond the classes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edge.errors import InputError
from edge.inference.postprocess import scalar_score, softmax, topk

finite32 = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32)
logit_vectors = arrays(np.float32, st.integers(1, 200), elements=finite32)


def reference_softmax(z: np.ndarray) -> list[float]:
    """Textbook softmax in exact-ish float64, shifted by the max so it cannot overflow."""
    z64 = [float(v) for v in z.reshape(-1)]
    top = max(z64)
    exps = [math.exp(v - top) for v in z64]
    total = math.fsum(exps)
    return [e / total for e in exps]


def reference_topk(scores: list[float], k: int) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


@settings(max_examples=150, deadline=None)
@given(logit_vectors)
def test_softmax_matches_float64_reference(z):
    p = softmax(z)
    ref = reference_softmax(z)
    assert p.dtype == np.float64 and p.shape == (z.size,)
    assert np.all(p >= 0) and np.all(p <= 1)
    assert math.isclose(float(p.sum()), 1.0, rel_tol=1e-9)
    np.testing.assert_allclose(p, ref, rtol=1e-9, atol=1e-300)


@settings(max_examples=150, deadline=None)
@given(logit_vectors, st.integers(1, 250))
def test_topk_matches_reference_order_and_scores(z, k):
    result = topk(z[None, :], k)
    ref_scores = softmax(z).tolist()
    expected = reference_topk(ref_scores, k)
    assert [i for i, _ in result] == expected
    assert len(result) == min(k, z.size)
    for i, score in result:
        assert score == pytest.approx(reference_softmax(z)[i], rel=1e-9, abs=1e-300)
    scores = [s for _, s in result]
    assert scores == sorted(scores, reverse=True)


@settings(max_examples=100, deadline=None)
@given(arrays(np.float32, st.integers(1, 150), elements=st.floats(0, 1, width=32)), st.integers(1, 160))
def test_topk_probabilities_are_used_as_they_are(p, k):
    result = topk(p, k, kind="probabilities")
    expected = reference_topk([float(v) for v in p], k)
    assert [i for i, _ in result] == expected
    assert all(s == float(p[i]) for i, s in result)


@pytest.mark.parametrize("n", [10, 100])
def test_ties_are_broken_by_lowest_index(n):
    z = np.zeros(n, dtype=np.float32)
    z[[7, 3, 5]] = 2.0
    assert [i for i, _ in topk(z, 2)] == [3, 5]
    assert [i for i, _ in topk(z, 4)] == [3, 5, 7, 0]


def test_k_larger_than_classes_returns_every_class():
    z = np.array([[0.1, 3.0, -2.0]], dtype=np.float32)
    result = topk(z, 10)
    assert [i for i, _ in result] == [1, 0, 2]
    assert math.isclose(sum(s for _, s in result), 1.0)


def test_huge_logits_do_not_overflow():
    z = np.array([1e30, 1e30 - 1e24, -1e30], dtype=np.float32)
    (best, p), *_ = topk(z, 3)
    assert best == 0 and math.isfinite(p) and 0.5 <= p <= 1.0


def test_infinite_logits_share_the_mass():
    p = softmax(np.array([np.inf, 0.0, np.inf]))
    assert p.tolist() == [0.5, 0.0, 0.5]
    assert softmax(np.array([-np.inf, -np.inf])).tolist() == [0.5, 0.5]


@pytest.mark.parametrize("bad", [np.array([]), np.array([1.0, np.nan])])
def test_empty_or_nan_output_is_rejected(bad):
    with pytest.raises(InputError):
        topk(bad, 1)
    with pytest.raises(InputError):
        topk(bad, 1, kind="probabilities")


def test_bad_k_and_kind_are_rejected():
    with pytest.raises(InputError):
        topk(np.zeros(3), 0)
    with pytest.raises(InputError):
        topk(np.zeros(3), 1, kind="bogus")  # type: ignore[arg-type]


def test_scalar_score():
    assert scalar_score(np.array([[0.25]], dtype=np.float32)) == 0.25
    with pytest.raises(InputError):
        scalar_score(np.zeros((1, 2)))
    with pytest.raises(InputError):
        scalar_score(np.array([np.nan]))
