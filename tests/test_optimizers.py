"""Server optimizers (Rust, ``ServerOptimizer``) against a plain float32 numpy reference.

The reference applies the documented formulas elementwise in float32, with the hyperparameters
rounded to float32 once, in the same order of operations as the core. IEEE float32 arithmetic
then agrees almost everywhere to the bit; we still allow a few float32 ulps (``rtol=1e-6``) so
the tests check the rule, not the compiler's instruction choice.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.typing import NDArray

from metis_async.aggregation.optimizers import (
    HYPERPARAMETERS,
    AggregationError,
    ServerOptimizer,
    make_optimizer,
)

PARALLEL_MIN = 1 << 16  # the core switches to rayon at this length (rust/core/src/accumulate.rs)
KINDS = ("fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi")
DEFAULTS: dict[str, dict[str, float]] = {
    "fedavg": {"lr": 1.0},
    "fedavgm": {"lr": 1.0, "momentum": 0.9},
    "fedadagrad": {"lr": 0.01, "beta1": 0.9, "tau": 1e-3},
    "fedadam": {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "fedyogi": {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
}

F32 = NDArray[np.float32]


# --- reference ------------------------------------------------------------------------------


class ReferenceOptimizer:
    """The update rules of ALGORITHMS.md, written out in float32 numpy."""

    def __init__(self, kind: str, length: int, **hyper: float) -> None:
        self.kind = kind
        h = {**DEFAULTS[kind], **hyper}
        self.lr = np.float32(h["lr"])
        self.momentum = np.float32(h.get("momentum", 0.0))
        self.beta1, self.rest1 = np.float32(h.get("beta1", 0)), np.float32(1 - h.get("beta1", 0))
        self.beta2, self.rest2 = np.float32(h.get("beta2", 0)), np.float32(1 - h.get("beta2", 0))
        self.tau = np.float32(h.get("tau", 1.0))
        self.m = np.zeros(length, dtype=np.float32)
        self.v = np.full(length, np.float32(h.get("tau", 0.0) ** 2), dtype=np.float32)

    def step(self, x: F32, d: F32) -> F32:
        if self.kind == "fedavg":
            return float32(x + self.lr * d)
        if self.kind == "fedavgm":
            self.m = self.momentum * self.m + d
            return float32(x + self.lr * self.m)
        self.m = self.beta1 * self.m + self.rest1 * d
        d2 = d * d
        if self.kind == "fedadagrad":
            self.v = self.v + d2
        elif self.kind == "fedadam":
            self.v = self.beta2 * self.v + self.rest2 * d2
        else:
            self.v = self.v - self.rest2 * d2 * np.sign(self.v - d2)
        return float32(x + self.lr * self.m / (np.sqrt(self.v) + self.tau))


def float32(array: NDArray[Any]) -> F32:
    """``array``, checked to have stayed float32 (numpy's stubs widen scalar products)."""
    assert array.dtype == np.float32
    return array


def snapshot(opt: ServerOptimizer) -> tuple[int, dict[str, list[float]]]:
    return opt.steps, {name: array.tolist() for name, array in opt.state().items()}


def vector(seed: int, length: int, scale: float = 1.0) -> F32:
    return (np.random.default_rng(seed).standard_normal(length) * scale).astype(np.float32)


# --- strategies -----------------------------------------------------------------------------

lengths = st.one_of(st.integers(1, 300), st.integers(PARALLEL_MIN, PARALLEL_MIN + 40_000))
betas = st.floats(0.0, 0.999)


@st.composite
def kinds_and_hyperparameters(draw: st.DrawFn) -> tuple[str, dict[str, float]]:
    kind = draw(st.sampled_from(KINDS))
    ranges = {
        "lr": st.floats(1e-3, 2.0),
        "momentum": betas,
        "beta1": betas,
        "beta2": betas,
        "tau": st.floats(1e-6, 1e-1),
    }
    chosen = draw(st.sets(st.sampled_from(HYPERPARAMETERS[kind])))
    return kind, {name: draw(ranges[name]) for name in chosen}


# --- behaviour ------------------------------------------------------------------------------


@given(
    case=kinds_and_hyperparameters(),
    length=lengths,
    steps=st.integers(1, 4),
    scale=st.sampled_from([1e-4, 1.0, 1e3]),
    seed=st.integers(0, 2**32 - 1),
)
def test_steps_match_the_numpy_reference(
    case: tuple[str, dict[str, float]], length: int, steps: int, scale: float, seed: int
) -> None:
    kind, hyper = case
    opt = make_optimizer(kind, length, **hyper)
    reference = ReferenceOptimizer(kind, length, **hyper)
    x = vector(seed, length)
    expected = x.copy()

    for step in range(steps):
        delta = vector(seed + step + 1, length, scale)
        opt.step(x, delta)
        expected = reference.step(expected, delta)

    np.testing.assert_allclose(x, expected, rtol=1e-6, atol=1e-6 * float(np.abs(expected).max()))
    state = opt.state()
    if kind != "fedavg":
        np.testing.assert_allclose(state["m"], reference.m, rtol=1e-6, atol=1e-12)
    if kind in ("fedadagrad", "fedadam", "fedyogi"):
        np.testing.assert_allclose(state["v"], reference.v, rtol=1e-6)
    assert opt.steps == steps


def test_fedavg_with_lr_one_is_x_plus_d() -> None:
    x, d = vector(1, 1000), vector(2, 1000)
    expected = x + d
    opt = ServerOptimizer("fedavg", 1000)

    opt.step(x, d)

    np.testing.assert_array_equal(x, expected)


def test_fedavgm_starts_as_fedavg_then_accumulates_momentum() -> None:
    opt = make_optimizer("fedavgm", 2, momentum=0.5)
    x = np.zeros(2, dtype=np.float32)
    d = np.array([1.0, -2.0], dtype=np.float32)

    opt.step(x, d)
    after_one = x.copy()
    opt.step(x, d)

    np.testing.assert_array_equal(after_one, d)
    np.testing.assert_array_equal(x, d + 1.5 * d)  # m = 0.5·d + d


@pytest.mark.parametrize("kind", KINDS)
def test_defaults_and_fresh_state(kind: str) -> None:
    opt = make_optimizer(kind, 3)

    state = opt.state()

    assert opt.hyperparameters == DEFAULTS[kind]
    assert opt.kind == kind
    assert sorted(state) == {"fedavg": [], "fedavgm": ["m"]}.get(kind, ["m", "v"])
    if "m" in state:
        np.testing.assert_array_equal(state["m"], np.zeros(3, dtype=np.float32))
    if "v" in state:
        np.testing.assert_array_equal(state["v"], np.full(3, 1e-6, dtype=np.float32))


def test_sgd_is_an_alias_of_fedavg() -> None:
    opt = make_optimizer("sgd", 4, lr=0.5)

    assert (opt.kind, opt.hyperparameters) == ("fedavg", {"lr": 0.5})


def test_repr_and_len() -> None:
    opt = make_optimizer("fedadam", 7, lr=0.03)

    assert len(opt) == 7
    assert repr(opt) == (
        "ServerOptimizer(kind='fedadam', length=7, lr=0.03, beta1=0.9, beta2=0.99, tau=0.001, "
        "steps=0)"
    )


@pytest.mark.parametrize("kind", KINDS)
def test_load_state_then_step_equals_continuing(kind: str) -> None:
    original = make_optimizer(kind, 50)
    x = vector(3, 50)
    original.step(x, vector(4, 50))
    restored = make_optimizer(kind, 50)
    restored.load_state(original.state(), steps=original.steps)
    y = x.copy()

    original.step(x, vector(5, 50))
    restored.step(y, vector(5, 50))

    np.testing.assert_array_equal(x, y)
    assert snapshot(restored) == snapshot(original)


def test_state_is_a_copy() -> None:
    opt = make_optimizer("fedadam", 3)
    state = opt.state()

    state["m"][:] = 42.0

    np.testing.assert_array_equal(opt.state()["m"], np.zeros(3, dtype=np.float32))


# --- errors: each leaves the model and the state exactly as they were -------------------------


@pytest.fixture(params=KINDS)
def stepped(request: pytest.FixtureRequest) -> tuple[ServerOptimizer, F32]:
    """An optimizer of 10 parameters after one step, and its model."""
    opt = make_optimizer(request.param, 10)
    x = vector(0, 10)
    opt.step(x, vector(1, 10))
    return opt, x


def bad_deltas(length: int) -> list[tuple[str, Any]]:
    nan = vector(2, length)
    nan[length - 3] = np.nan
    return [
        (r"delta contains non-finite values \(first at index 7\)", nan),
        ("delta has 11 values, optimizer expects 10", vector(2, 11)),
        ("delta must be float32, got float64", vector(2, length).astype(np.float64)),
        ("C-contiguous", vector(2, 2 * length)[::2]),
        ("expected a numpy.ndarray, got list", [0.0] * length),
        ("expected a 1-D array, got 2-D", vector(2, length).reshape(2, -1)),
    ]


@pytest.mark.parametrize(("message", "delta"), bad_deltas(10))
def test_bad_delta(stepped: tuple[ServerOptimizer, F32], message: str, delta: Any) -> None:
    opt, x = stepped
    before, x_before = snapshot(opt), x.copy()

    with pytest.raises(AggregationError, match=message):
        opt.step(x, delta)

    assert snapshot(opt) == before
    np.testing.assert_array_equal(x, x_before)


def test_overflow_is_reported_and_changes_nothing(stepped: tuple[ServerOptimizer, F32]) -> None:
    opt, x = stepped
    x[:] = 3e38
    before, x_before = snapshot(opt), x.copy()
    huge = np.full(10, 3e38, dtype=np.float32)  # x + d overflows float32, and so does d²

    with pytest.raises(AggregationError, match="non-finite value at index 0"):
        opt.step(x, huge)

    assert snapshot(opt) == before
    np.testing.assert_array_equal(x, x_before)


def test_read_only_params(stepped: tuple[ServerOptimizer, F32]) -> None:
    opt, x = stepped
    before = snapshot(opt)
    x.flags.writeable = False

    with pytest.raises(AggregationError, match="not writeable"):
        opt.step(x, vector(2, 10))

    assert snapshot(opt) == before


def test_params_passed_as_delta(stepped: tuple[ServerOptimizer, F32]) -> None:
    opt, x = stepped
    before = snapshot(opt)

    with pytest.raises(AggregationError, match="already borrowed"):
        opt.step(x, x)

    assert snapshot(opt) == before


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"m": np.zeros(10, dtype=np.float32)}, "fedadam state needs 'v'"),
        ({"m": np.zeros(9, np.float32), "v": np.ones(10, np.float32)}, "m has 9 values"),
        ({"m": np.full(10, np.nan, np.float32), "v": np.ones(10, np.float32)}, "must be finite"),
        ({"m": np.zeros(10, np.float32), "v": -np.ones(10, np.float32)}, "must be finite and >="),
        ({"m": np.zeros(10), "v": np.ones(10)}, r"state\['m'\] must be float32, got float64"),
        ({"m": np.zeros(10, np.float32), "v": np.ones(10, np.float32), "w": 1}, "no 'w' state"),
    ],
)
def test_bad_state(state: dict[str, Any], message: str) -> None:
    opt = make_optimizer("fedadam", 10)
    opt.step(vector(0, 10), vector(1, 10))
    before = snapshot(opt)

    with pytest.raises(AggregationError, match=message):
        opt.load_state(state, steps=5)

    assert snapshot(opt) == before


@pytest.mark.parametrize(
    ("name", "hyper", "message"),
    [
        ("adam", {}, "unknown server optimizer 'adam'; choose one of fedavg, sgd"),
        ("fedadagrad", {"beta2": 0.9}, "fedadagrad does not take beta2; it takes lr, beta1, tau"),
        ("fedavg", {"momentum": 0.9, "eta": 1.0}, "fedavg does not take eta, momentum"),
    ],
)
def test_make_optimizer_rejects_unknown_names(
    name: str, hyper: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_optimizer(name, 3, **hyper)


@pytest.mark.parametrize(
    ("hyper", "message"),
    [
        ({"lr": float("nan")}, "lr must be finite and > 0, got nan"),
        ({"lr": 0.0}, "lr must be finite and > 0, got 0.0"),
        ({"beta1": 1.0}, r"beta1 must be in \[0, 1\), got 1.0"),
        ({"beta2": -0.1}, r"beta2 must be in \[0, 1\), got -0.1"),
        ({"tau": float("inf")}, "tau must be finite and > 0, got inf"),
    ],
)
def test_out_of_range_hyperparameters(hyper: dict[str, float], message: str) -> None:
    with pytest.raises(AggregationError, match=message):
        make_optimizer("fedyogi", 3, **hyper)


def test_core_rejects_hyperparameters_the_kind_does_not_use() -> None:
    with pytest.raises(AggregationError, match="fedadam does not take momentum"):
        ServerOptimizer("fedadam", 3, momentum=0.9)
