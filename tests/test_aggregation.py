"""The Rust aggregation core (built extension) against a plain numpy reference.

The reference sums in float64 in the same order as the core, so results agree to float32
rounding of the final value: we allow one float32 ulp (``rtol=2**-23``) plus an absolute slack of
float64 rounding in the sum (``n * 2**-52 * Σ|w·x| / Σw``) for values that cancel towards zero.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from metis_async import _core
from metis_async._core import first_non_finite
from metis_async.aggregation import Accumulator, AggregationError, weighted_average

PARALLEL_MIN = 1 << 16  # the core switches to rayon at this length (rust/core/src/accumulate.rs)

F32 = NDArray[np.float32]
Updates = list[NDArray[np.floating]]


# --- reference ------------------------------------------------------------------------------


def reference_sum(updates: Updates, weights: Sequence[float]) -> NDArray[np.float64]:
    total = np.zeros(updates[0].shape[0], dtype=np.float64)
    for update, weight in zip(updates, weights, strict=True):
        total += weight * update.astype(np.float64)
    return total


def reference_mean(updates: Updates, weights: Sequence[float]) -> NDArray[np.float64]:
    return reference_sum(updates, weights) / sum(weights)


def magnitude(updates: Updates, weights: Sequence[float]) -> float:
    """``Σ |w|·max|x|``: bounds the terms a float64 sum rounds along the way."""
    return sum(
        abs(w) * float(np.abs(u).max(initial=0.0)) for u, w in zip(updates, weights, strict=True)
    )


def assert_close(actual: F32, expected: NDArray[np.float64], terms: int, scale: float) -> None:
    """Equal up to one float32 ulp, plus float64 rounding of ``terms`` terms of size ``scale``."""
    assert actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=2.0**-23, atol=terms * 2.0**-52 * scale)


def make_updates(seed: int, count: int, length: int, dtype: type[np.floating]) -> Updates:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(length) * 100).astype(dtype) for _ in range(count)]


def filled(updates: Updates, weights: Sequence[float]) -> Accumulator:
    acc = Accumulator(updates[0].shape[0])
    for update, weight in zip(updates, weights, strict=True):
        acc.add(update, weight)
    return acc


def snapshot(acc: Accumulator) -> tuple[int, float, list[float]]:
    return acc.count, acc.total_weight, acc.weighted_sum().tolist()


# --- strategies -----------------------------------------------------------------------------

lengths = st.one_of(st.integers(1, 300), st.integers(PARALLEL_MIN, PARALLEL_MIN + 70_000))
weight_lists = st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=5)
dtypes = st.sampled_from([np.float32, np.float64])
seeds = st.integers(0, 2**32 - 1)


# --- behaviour ------------------------------------------------------------------------------


@settings(deadline=None)
@given(length=lengths, weights=weight_lists, dtype=dtypes, seed=seeds)
def test_mean_matches_reference(
    length: int, weights: list[float], dtype: type[np.floating], seed: int
) -> None:
    updates = make_updates(seed, len(weights), length, dtype)

    mean = filled(updates, weights).mean()

    assert_close(
        mean,
        reference_mean(updates, weights),
        len(updates),
        magnitude(updates, weights) / sum(weights),
    )


@settings(deadline=None)
@given(length=lengths, weights=weight_lists, dtype=dtypes, seed=seeds)
def test_weighted_sum_matches_reference(
    length: int, weights: list[float], dtype: type[np.floating], seed: int
) -> None:
    updates = make_updates(seed, len(weights), length, dtype)

    total = filled(updates, weights).weighted_sum()

    assert_close(total, reference_sum(updates, weights), len(updates), magnitude(updates, weights))


@settings(deadline=None)
@given(
    length=lengths,
    weights=weight_lists,
    seed=seeds,
    scale=st.floats(-2.0, 2.0),
    normalize=st.booleans(),
)
def test_apply_matches_reference(
    length: int, weights: list[float], seed: int, scale: float, normalize: bool
) -> None:
    updates = make_updates(seed, len(weights), length, np.float32)
    base = make_updates(seed + 1, 1, length, np.float32)[0]
    delta = reference_mean(updates, weights) if normalize else reference_sum(updates, weights)

    model = filled(updates, weights).apply(base, scale, normalize)

    expected = base.astype(np.float64) + scale * delta
    delta_size = magnitude(updates, weights) / (sum(weights) if normalize else 1.0)
    assert_close(
        model, expected, len(updates) + 2, magnitude([base], [1.0]) + abs(scale) * delta_size
    )


@settings(deadline=None)
@given(length=lengths, weights=weight_lists, dtype=dtypes, seed=seeds)
def test_batch_average_matches_reference(
    length: int, weights: list[float], dtype: type[np.floating], seed: int
) -> None:
    updates = make_updates(seed, len(weights), length, dtype)

    average = weighted_average(updates, weights)

    assert_close(
        average,
        reference_mean(updates, weights),
        len(updates),
        magnitude(updates, weights) / sum(weights),
    )


@settings(deadline=None)
@given(length=lengths, weights=weight_lists, seed=seeds)
def test_batch_average_is_bit_identical_to_streaming_mean(
    length: int, weights: list[float], seed: int
) -> None:
    updates = make_updates(seed, len(weights), length, np.float32)

    average = weighted_average(updates, weights)

    np.testing.assert_array_equal(average, filled(updates, weights).mean())


def test_batch_average_accepts_a_2d_stack_of_any_float_dtype() -> None:
    stack = np.array([[1.0, 2.0], [3.0, 6.0]], dtype=np.float16)

    average = weighted_average(stack, np.array([1.0, 3.0]))

    np.testing.assert_array_equal(average, np.array([2.5, 5.0], dtype=np.float32))


def test_batch_average_converts_mixed_dtypes_and_strided_views() -> None:
    updates = [np.arange(8.0)[::2], np.arange(4, dtype=np.float32)]

    average = weighted_average(updates, [1.0, 1.0])

    np.testing.assert_array_equal(average, np.array([0.0, 1.5, 3.0, 4.5], dtype=np.float32))


def test_counters_track_adds() -> None:
    acc = Accumulator(3)

    acc.add(np.ones(3, dtype=np.float32), 2.0)
    acc.add(np.ones(3, dtype=np.float64), 0.5)

    assert (acc.count, acc.total_weight, len(acc)) == (2, 2.5, 3)
    assert repr(acc) == "Accumulator(length=3, count=2, total_weight=2.5)"


def test_reset_clears_sum_and_counters() -> None:
    acc = filled(make_updates(0, 2, PARALLEL_MIN + 1, np.float32), [1.0, 2.0])

    acc.reset()

    assert snapshot(acc) == snapshot(Accumulator(PARALLEL_MIN + 1))


def test_module_metadata() -> None:
    assert _core.__version__
    assert _core.build_profile in ("debug", "release")
    assert issubclass(AggregationError, ValueError)


def test_concurrent_adds_equal_sequential_adds() -> None:
    # Small integers and power-of-two weights make every sum exact, so the order in which the
    # threads' adds land cannot change the bits.
    rng = np.random.default_rng(7)
    updates = [rng.integers(-100, 100, PARALLEL_MIN * 2).astype(np.float32) for _ in range(16)]
    weights = [2.0 ** (i % 4) for i in range(16)]
    acc = Accumulator(PARALLEL_MIN * 2)

    def worker(first: int) -> None:
        for i in range(first, 16, 4):
            acc.add(updates[i], weights[i])

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    sequential = filled(updates, weights)
    assert acc.count == sequential.count == 16
    assert acc.total_weight == sequential.total_weight
    np.testing.assert_array_equal(acc.weighted_sum(), sequential.weighted_sum())


# --- errors: each leaves the accumulator exactly as it was ----------------------------------


@pytest.fixture
def acc() -> Accumulator:
    """An accumulator of 10 parameters holding one update, so a stray partial add would show."""
    accumulator = Accumulator(10)
    accumulator.add(np.arange(10, dtype=np.float32), 1.0)
    return accumulator


def test_length_mismatch(acc: Accumulator) -> None:
    before = snapshot(acc)

    with pytest.raises(AggregationError, match="update has 12 values, accumulator expects 10"):
        acc.add(np.full(12, 100.0, dtype=np.float32), 1.0)

    assert snapshot(acc) == before


@pytest.mark.parametrize("dtype", [np.int64, np.float16, np.complex64, np.bool_])
def test_wrong_dtype(acc: Accumulator, dtype: type[np.generic]) -> None:
    before = snapshot(acc)

    with pytest.raises(AggregationError, match="expected a float32 or float64 array, got"):
        acc.add(np.ones(10, dtype=dtype), 1.0)

    assert snapshot(acc) == before


def test_not_an_array(acc: Accumulator) -> None:
    before = snapshot(acc)

    with pytest.raises(AggregationError, match=r"expected a numpy\.ndarray, got list"):
        acc.add([1.0] * 10, 1.0)  # type: ignore[arg-type]

    assert snapshot(acc) == before


def test_not_one_dimensional(acc: Accumulator) -> None:
    before = snapshot(acc)

    with pytest.raises(AggregationError, match="expected a 1-D array, got 2-D"):
        acc.add(np.ones((2, 5), dtype=np.float32), 1.0)

    assert snapshot(acc) == before


def test_non_contiguous(acc: Accumulator) -> None:
    before = snapshot(acc)

    with pytest.raises(AggregationError, match="C-contiguous"):
        acc.add(np.full(20, 100.0, dtype=np.float32)[::2], 1.0)

    assert snapshot(acc) == before


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("length", [10, PARALLEL_MIN + 10])
def test_non_finite_value(bad: float, length: int) -> None:
    acc = Accumulator(length)
    acc.add(np.ones(length, dtype=np.float32), 1.0)
    before = snapshot(acc)
    update = np.full(length, 100.0, dtype=np.float32)
    update[length - 7] = bad

    with pytest.raises(
        AggregationError, match=rf"non-finite values \(first at index {length - 7}\)"
    ):
        acc.add(update, 1.0)

    assert snapshot(acc) == before


@pytest.mark.parametrize("weight", [np.nan, np.inf, 0.0, -1.0])
def test_bad_weight(acc: Accumulator, weight: float) -> None:
    before = snapshot(acc)

    with pytest.raises(AggregationError, match="weight must be finite and > 0, got"):
        acc.add(np.full(10, 100.0, dtype=np.float32), weight)

    assert snapshot(acc) == before


def test_mean_of_nothing() -> None:
    acc = Accumulator(4)

    with pytest.raises(AggregationError, match="no updates have been added"):
        acc.mean()

    assert (acc.count, acc.total_weight) == (0, 0.0)


def test_apply_rejects_float64_base(acc: Accumulator) -> None:
    before = snapshot(acc)

    with pytest.raises(AggregationError, match="base must be a float32 array, got float64"):
        acc.apply(np.zeros(10))  # type: ignore[arg-type]

    assert snapshot(acc) == before


def test_weighted_sum_overflowing_float32() -> None:
    acc = Accumulator(2)
    acc.add(np.array([1.0, 3e38], dtype=np.float32), 4.0)

    with pytest.raises(AggregationError, match="not finite at index 1"):
        acc.weighted_sum()


@pytest.mark.parametrize(
    ("updates", "weights", "message"),
    [
        ([], [], "at least one update"),
        ([np.ones(3, dtype=np.float32)], [1.0, 2.0], "got 1 updates but 2 weights"),
        (
            [np.ones(3, dtype=np.float32), np.ones(4, dtype=np.float32)],
            [1.0, 1.0],
            r"updates\[1\] has 4 values, updates\[0\] has 3",
        ),
        ([np.ones(3, dtype=np.float32)] * 2, [1.0, 0.0], r"updates\[1\]: weight must be"),
        (
            [np.ones(3, dtype=np.float32), np.array([0, np.nan, 0], dtype=np.float32)],
            [1.0, 1.0],
            r"updates\[1\]: update contains non-finite values \(first at index 1\)",
        ),
        ([np.ones(3, dtype=np.float32), np.ones(3)], [1.0, 1.0], "mix float32 and float64"),
    ],
)
def test_core_weighted_average_errors(updates: Updates, weights: list[float], message: str) -> None:
    with pytest.raises(AggregationError, match=message):
        _core.weighted_average(updates, weights)


def test_facade_rejects_integer_updates() -> None:
    with pytest.raises(AggregationError, match="expected a floating-point array, got int32"):
        weighted_average([np.ones(3, dtype=np.int32)], [1.0])


def test_add_many_equals_adding_one_by_one() -> None:
    rng = np.random.default_rng(5)
    updates = [rng.standard_normal(70_000).astype(np.float32) for _ in range(5)]
    weights = [0.5, 1.0, 2.0, 3.5, 1.25]
    grouped, single = Accumulator(70_000), Accumulator(70_000)

    grouped.add_many(updates, weights)
    for update, weight in zip(updates, weights, strict=True):
        single.add(update, weight)

    np.testing.assert_array_equal(grouped.mean(), single.mean())
    assert grouped.count == single.count == 5


def test_add_many_names_the_bad_update_and_changes_nothing() -> None:
    good = np.ones(4, dtype=np.float32)
    bad = np.array([1, 2, np.inf, 4], dtype=np.float32)
    acc = Accumulator(4)

    with pytest.raises(AggregationError, match=r"updates\[1\]"):
        acc.add_many([good, bad], [1.0, 1.0])

    assert acc.count == 0


def test_first_non_finite_finds_the_first_bad_value_or_none() -> None:
    values = np.zeros(100_000, dtype=np.float32)
    assert first_non_finite(values) is None
    values[70_001] = np.inf
    values[90_000] = np.nan

    assert first_non_finite(values) == 70_001


# --- partial sums: export / merge -----------------------------------------------------------


@settings(deadline=None)
@given(length=lengths, weights=weight_lists, seed=seeds, cut=st.integers(0, 5))
def test_merged_partials_equal_one_accumulator(
    length: int, weights: list[float], seed: int, cut: int
) -> None:
    updates = make_updates(seed, len(weights), length, np.float32)
    cut = min(cut, len(weights))
    left, right = Accumulator(length), Accumulator(length)
    for i, (update, weight) in enumerate(zip(updates, weights, strict=True)):
        (left if i < cut else right).add(update, weight)

    left.merge(*right.export())

    assert left.count == len(weights)
    assert_close(
        left.mean(), reference_mean(updates, weights), len(weights), magnitude(updates, weights)
    )


def test_export_is_a_float64_copy_of_the_sum() -> None:
    acc = filled([np.array([1.0, 2.0], dtype=np.float32)], [0.5])

    total, total_weight, count = acc.export()
    total[0] = 99.0

    np.testing.assert_array_equal(acc.export()[0], [0.5, 1.0])
    assert total.dtype == np.float64
    assert (total_weight, count) == (0.5, 1)


def test_merge_into_an_empty_accumulator_is_exact() -> None:
    updates = make_updates(3, 3, 1000, np.float32)
    full = filled(updates, [1.0, 2.0, 3.0])
    empty = Accumulator(1000)

    empty.merge_from(full)

    np.testing.assert_array_equal(empty.export()[0], full.export()[0])
    assert (empty.count, empty.total_weight) == (3, 6.0)


def test_merge_from_itself_doubles() -> None:
    acc = filled([np.array([1.0, -2.0], dtype=np.float32)], [2.0])

    acc.merge_from(acc)

    np.testing.assert_array_equal(acc.export()[0], [4.0, -8.0])
    assert (acc.count, acc.total_weight) == (2, 4.0)


@pytest.mark.parametrize(
    ("total", "total_weight", "count", "message"),
    [
        (np.zeros(3), 1.0, 1, "sum has 3 values, accumulator expects 4"),
        (np.array([0, 0, np.nan, 0]), 1.0, 1, r"non-finite values \(first at index 2\)"),
        (np.zeros(4), 0.0, 1, "total_weight must be finite and > 0"),
        (np.zeros(4), np.inf, 1, "total_weight must be finite and > 0"),
        (np.zeros(4), 1.0, 0, "total_weight must be finite and > 0"),
        (np.ones(4), 0.0, 0, "partial sum of 0 updates is not zero"),
        (np.zeros(4, dtype=np.float32), 1.0, 1, "sum must be float64, got float32"),
    ],
)
def test_merge_validates_before_changing_anything(
    total: NDArray[np.floating], total_weight: float, count: int, message: str
) -> None:
    acc = filled([np.ones(4, dtype=np.float32)], [1.0])
    before = snapshot(acc)

    with pytest.raises(AggregationError, match=message):
        acc.merge(total, total_weight, count)  # type: ignore[arg-type]  # float32 on purpose

    assert snapshot(acc) == before
