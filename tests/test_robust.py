"""Robust rules (Rust) against plain numpy references, and their resistance to outliers.

References compute in float64 (``np.median``, a sorted trimmed mean, Krum from explicit pairwise
distances); the core rounds its float64 results to float32 once, so results agree to a float32
ulp. Krum's distances are summed in float32 over short runs (see ``rust/core/src/robust/krum.rs``),
so scores agree to ~1e-6 relative.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from numpy.typing import NDArray

from metis_async import _core
from metis_async.aggregation.robust import (
    AggregationError,
    clip_by_norm,
    coordinate_median,
    krum,
    krum_scores,
    multi_krum,
    trimmed_mean,
)

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]
ULP = 2.0**-23  # float32 relative rounding, plus a margin: one ulp of the result


# --- references -----------------------------------------------------------------------------


def reference_median(stack: F32) -> F64:
    return cast(F64, np.median(stack.astype(np.float64), axis=0))


def reference_trimmed_mean(stack: F32, beta: float) -> F64:
    n = stack.shape[0]
    k = int(np.floor(beta * n))
    kept = np.sort(stack.astype(np.float64), axis=0)[k : n - k]
    return cast(F64, kept.mean(axis=0))


def reference_krum_scores(stack: F32, f: int) -> F64:
    n = stack.shape[0]
    x = stack.astype(np.float64)
    distances = np.array([[np.sum((x[i] - x[j]) ** 2) for j in range(n)] for i in range(n)])
    scores = []
    for i in range(n):
        others = np.sort(np.delete(distances[i], i))
        scores.append(others[: n - f - 2].sum())
    return np.array(scores)


def reference_clip(update: F32, max_norm: float) -> F64:
    x = update.astype(np.float64)
    norm = float(np.linalg.norm(x))
    return x * min(1.0, max_norm / norm) if norm > 0 else x


def stack_of(seed: int, n: int, d: int) -> F32:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def assert_f32_close(actual: F32, expected: F64) -> None:
    assert actual.dtype == np.float32
    scale = float(np.abs(expected).max(initial=0.0))
    np.testing.assert_allclose(actual, expected, rtol=ULP, atol=1e-12 * scale)


# --- strategies -----------------------------------------------------------------------------

counts = st.one_of(st.integers(1, 25), st.integers(250, 270))  # both sides of the network limit
widths = st.one_of(st.integers(1, 200), st.integers(3000, 5000))
seeds = st.integers(0, 2**32 - 1)


# --- agreement with the references ----------------------------------------------------------


@given(n=counts, d=widths, seed=seeds)
def test_median_matches_numpy(n: int, d: int, seed: int) -> None:
    assume(n * d < 400_000)
    stack = stack_of(seed, n, d)

    median = coordinate_median(stack)

    assert_f32_close(median, reference_median(stack))


@given(n=counts, d=widths, beta=st.floats(0.0, 0.499), seed=seeds)
def test_trimmed_mean_matches_numpy(n: int, d: int, beta: float, seed: int) -> None:
    assume(n * d < 400_000)
    stack = stack_of(seed, n, d)

    result = trimmed_mean(stack, beta)

    assert_f32_close(result, reference_trimmed_mean(stack, beta))


@given(f=st.integers(0, 4), extra=st.integers(0, 5), d=widths, seed=seeds)
def test_krum_matches_numpy(f: int, extra: int, d: int, seed: int) -> None:
    n = 2 * f + 3 + extra
    stack = stack_of(seed, n, d)
    expected = reference_krum_scores(stack, f)

    scores = krum_scores(stack, f)
    chosen = krum(stack, f)

    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    assert expected[chosen] <= expected.min() * (1 + 1e-5)


@given(f=st.integers(0, 4), extra=st.integers(0, 5), data=st.data(), d=widths, seed=seeds)
def test_multi_krum_matches_numpy(
    f: int, extra: int, data: st.DataObject, d: int, seed: int
) -> None:
    n = 2 * f + 3 + extra
    m = data.draw(st.one_of(st.none(), st.integers(1, n)))
    stack = stack_of(seed, n, d)
    scores = reference_krum_scores(stack, f)
    order = np.argsort(scores, kind="stable")
    count = n - f if m is None else m
    # Skip near-ties at the selection boundary: float rounding may pick either side.
    assume(count == n or scores[order[count]] - scores[order[count - 1]] > 1e-4 * scores.max())

    result = multi_krum(stack, f, m)

    assert_f32_close(result, stack[order[:count]].astype(np.float64).mean(axis=0))


@given(d=widths, max_norm=st.floats(1e-3, 1e3), seed=seeds)
def test_clip_matches_numpy(d: int, max_norm: float, seed: int) -> None:
    update = stack_of(seed, 1, d)[0]

    clipped = clip_by_norm(update, max_norm)

    np.testing.assert_allclose(clipped, reference_clip(update, max_norm), rtol=2 * ULP)
    assert np.linalg.norm(clipped.astype(np.float64)) <= max_norm * (1 + 1e-6)


# --- behaviour ------------------------------------------------------------------------------


@pytest.fixture
def attacked() -> tuple[F32, F32]:
    """20 updates near a true direction, 3 of them replaced by huge sign-flipped copies."""
    rng = np.random.default_rng(0)
    truth = rng.standard_normal(1000).astype(np.float32)
    stack = (truth + 0.1 * rng.standard_normal((20, 1000))).astype(np.float32)
    stack[:3] = -100.0 * stack[:3]
    return stack, truth


def distance(estimate: F32, truth: F32) -> float:
    return float(np.linalg.norm(estimate - truth) / np.linalg.norm(truth))


def test_the_mean_does_not_resist_the_attack(attacked: tuple[F32, F32]) -> None:
    stack, truth = attacked

    mean = stack.mean(axis=0)

    assert distance(mean, truth) > 10


@pytest.mark.parametrize(
    "rule",
    [
        coordinate_median,
        lambda s: trimmed_mean(s, 0.2),
        lambda s: multi_krum(s, 3),
        lambda s: s[krum(s, 3)],
    ],
    ids=["median", "trimmed_mean", "multi_krum", "krum"],
)
def test_robust_rules_resist_the_attack(attacked: tuple[F32, F32], rule: Any) -> None:
    stack, truth = attacked

    estimate = rule(stack)

    assert distance(estimate, truth) < 0.1


def test_multi_krum_leaves_the_attackers_out(attacked: tuple[F32, F32]) -> None:
    stack, _ = attacked

    scores = krum_scores(stack, 3)

    assert set(np.argsort(scores)[:17]) == set(range(3, 20))


def test_clip_bounds_an_attackers_norm() -> None:
    update = np.full(100, 50.0, dtype=np.float32)  # norm 500

    clipped = clip_by_norm(update, 5.0)

    np.testing.assert_allclose(np.linalg.norm(clipped), 5.0, rtol=1e-6)
    np.testing.assert_allclose(clipped, update / 100, rtol=1e-6)


def test_clip_returns_a_new_array() -> None:
    update = np.ones(4, dtype=np.float32)

    clipped = clip_by_norm(update, 10.0)

    clipped[0] = 7.0
    assert update[0] == 1.0


def test_a_list_of_rows_and_a_stack_give_the_same_result() -> None:
    stack = stack_of(1, 9, 300)

    from_list = [coordinate_median(list(stack)), multi_krum(list(stack), 2)]
    from_stack = [coordinate_median(stack), multi_krum(stack, 2)]

    np.testing.assert_array_equal(from_list[0], from_stack[0])
    np.testing.assert_array_equal(from_list[1], from_stack[1])


def test_facade_converts_other_float_dtypes_and_strided_views() -> None:
    stack = np.array([[1.0, 5.0], [2.0, 7.0], [9.0, 6.0]], dtype=np.float16)
    rows = [np.arange(8.0)[::2], np.arange(4.0), np.full(4, 10.0)]

    median_of_stack = coordinate_median(stack)
    median_of_rows = coordinate_median(rows)

    np.testing.assert_array_equal(median_of_stack, np.array([2.0, 6.0], dtype=np.float32))
    np.testing.assert_array_equal(median_of_rows, np.array([0.0, 2.0, 4.0, 6.0], np.float32))


def test_results_are_float32() -> None:
    stack = stack_of(2, 5, 10)

    results = [coordinate_median(stack), trimmed_mean(stack, 0.2), multi_krum(stack, 1)]

    assert [r.dtype for r in results] == [np.float32] * 3
    assert krum_scores(stack, 1).dtype == np.float64


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: coordinate_median([]), "robust rules need at least one update"),
        (
            lambda: trimmed_mean([np.ones(3, np.float32), np.ones(4, np.float32)], 0.1),
            r"updates\[1\] has 4 values, updates\[0\] has 3",
        ),
        (
            lambda: coordinate_median(np.array([[1, 2], [3, np.nan]], np.float32)),
            r"updates\[1\] contains non-finite values \(first at index 1\)",
        ),
        (lambda: trimmed_mean(stack_of(0, 5, 3), 0.5), r"beta must be in \[0, 0.5\), got 0.5"),
        (lambda: krum(stack_of(0, 6, 3), 2), "Krum with f=2 needs n >= 2f\\+3 = 7 updates, got 6"),
        (lambda: krum(stack_of(0, 6, 3), -1), "f must be >= 0, got -1"),
        (lambda: multi_krum(stack_of(0, 6, 3), 1, 0), r"m must be in 1..=6, got 0"),
        (lambda: multi_krum(stack_of(0, 6, 3), 1, 7), r"m must be in 1..=6, got 7"),
        (lambda: clip_by_norm(np.ones(3, np.float32), 0.0), "max_norm must be finite and > 0"),
        (
            lambda: clip_by_norm(np.array([1, np.inf], np.float32), 1.0),
            r"update contains non-finite values \(first at index 1\)",
        ),
        (lambda: coordinate_median(np.ones(3)), "expected a 2-D stack of updates, got 1-D"),
        (lambda: median_of_ints(), "expected a floating-point array, got int64"),
    ],
)
def test_invalid_input(call: Any, message: str) -> None:
    with pytest.raises(AggregationError, match=message):
        call()


def median_of_ints() -> F32:
    return coordinate_median([np.ones(3, dtype=np.int64)])


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        (np.ones(3, np.float32), "got a 1-D array"),
        (np.ones((2, 3)), "updates must be float32, got float64"),
        (np.ones((4, 3), np.float32)[:, ::2], "C-contiguous"),
        (5, "updates must be a 2-D float32 array or a sequence of 1-D float32 arrays, got int"),
        ([np.ones(3, np.float32), np.ones(3)], r"updates\[1\]: update must be float32"),
    ],
)
def test_core_documents_what_it_borrows(updates: Any, message: str) -> None:
    with pytest.raises(AggregationError, match=message):
        _core.coordinate_median(updates)
