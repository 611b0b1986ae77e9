"""Tests of the digits example: the federated split, the numpy model, the learner, and FedAvg."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest

from metis_async.client.learner import EvaluateConfig, FitConfig
from metis_async.examples.digits import (
    NUM_CLASSES,
    NUM_FEATURES,
    DigitsFederation,
    DigitsLearner,
    evaluate_global,
    initial_parameters,
    load_digits_federated,
    loss_and_gradient,
)
from metis_async.profiles import default_demo_settings

NUM_DIGITS = 1797


@pytest.fixture(scope="module")
def federation() -> DigitsFederation:
    return load_digits_federated(10, alpha=0.5, seed=0)


def _rows(features: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in features}


def _class_mix(labels: np.ndarray) -> np.ndarray:
    return np.bincount(labels, minlength=NUM_CLASSES) / labels.size


# --- the split ---


def test_split_is_deterministic_for_a_seed() -> None:
    first = load_digits_federated(10, seed=3)
    second = load_digits_federated(10, seed=3)

    for (x1, y1), (x2, y2) in zip(first.partitions, second.partitions, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(first.test[0], second.test[0])


def test_split_differs_between_seeds() -> None:
    sizes_a = [y.size for _, y in load_digits_federated(10, seed=0).partitions]
    sizes_b = [y.size for _, y in load_digits_federated(10, seed=1).partitions]

    assert sizes_a != sizes_b


def test_split_is_non_iid(federation: DigitsFederation) -> None:
    overall = _class_mix(np.concatenate([y for _, y in federation.partitions]))

    # Total-variation distance of each learner's class mix from the overall mix: about 0.4 for
    # Dirichlet(0.5) here, about 0.02 for an IID split.
    distances = [0.5 * np.abs(_class_mix(y) - overall).sum() for _, y in federation.partitions]

    assert np.mean(distances) > 0.2


@pytest.mark.parametrize("num_learners", [10, 50])
def test_every_learner_has_min_examples(num_learners: int) -> None:
    fed = load_digits_federated(num_learners, seed=1, min_examples=10)

    assert len(fed.partitions) == num_learners
    assert min(y.size for _, y in fed.partitions) >= 10


def test_partitions_and_test_set_are_disjoint_and_cover_the_data(
    federation: DigitsFederation,
) -> None:
    train_rows = [_rows(x) for x, _ in federation.partitions]
    test_rows = _rows(federation.test[0])

    # Every digits image is unique, so equal rows mean the same example.
    all_rows = set().union(*train_rows, test_rows)
    assert len(all_rows) == sum(len(r) for r in train_rows) + len(test_rows) == NUM_DIGITS


def test_test_set_is_stratified(federation: DigitsFederation) -> None:
    _, test_labels = federation.test
    train_labels = np.concatenate([y for _, y in federation.partitions])

    counts = np.bincount(test_labels, minlength=NUM_CLASSES)
    totals = counts + np.bincount(train_labels, minlength=NUM_CLASSES)
    np.testing.assert_allclose(counts / totals, 0.25, atol=0.01)


def test_features_are_scaled_with_a_bias_column(federation: DigitsFederation) -> None:
    features, labels = federation.partitions[0]

    assert features.dtype == np.float32
    assert features.shape == (labels.size, NUM_FEATURES)
    assert features[:, :64].min() >= 0.0
    assert features[:, :64].max() <= 1.0
    np.testing.assert_array_equal(features[:, 64], 1.0)


def test_impossible_min_examples_is_rejected() -> None:
    with pytest.raises(ValueError, match="cannot give"):
        load_digits_federated(100, min_examples=100)


# --- the model ---


def test_gradient_matches_finite_differences(federation: DigitsFederation) -> None:
    rng = np.random.default_rng(0)
    features, labels = federation.partitions[1]
    weights = rng.normal(scale=0.3, size=(NUM_FEATURES, NUM_CLASSES))
    _, gradient = loss_and_gradient(weights, features, labels)
    eps = 1e-6

    for i, j in zip(
        rng.integers(0, NUM_FEATURES, 20), rng.integers(0, NUM_CLASSES, 20), strict=True
    ):
        bump = np.zeros_like(weights)
        bump[i, j] = eps
        up, _ = loss_and_gradient(weights + bump, features, labels)
        down, _ = loss_and_gradient(weights - bump, features, labels)
        assert gradient[i, j] == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8)


def test_zero_model_scores_chance_loss(federation: DigitsFederation) -> None:
    loss, _ = evaluate_global(initial_parameters(), *federation.test)

    assert loss == pytest.approx(np.log(NUM_CLASSES))


# --- the learner ---


def _fit_weights(
    federation: DigitsFederation, config: FitConfig, start: np.ndarray | None = None
) -> np.ndarray:
    features, labels = federation.partitions[0]
    learner = DigitsLearner(features, labels, seed=7)
    params = [start] if start is not None else initial_parameters()
    return np.asarray(learner.fit(params, config).parameters[0], dtype=np.float64)


def test_fit_returns_float32_model_examples_and_loss(federation: DigitsFederation) -> None:
    features, labels = federation.partitions[0]
    learner = DigitsLearner(features, labels, seed=0)

    params, num_examples, metrics = learner.fit(initial_parameters(), FitConfig(local_steps=5))

    assert params[0].dtype == np.float32
    assert params[0].shape == (NUM_FEATURES, NUM_CLASSES)
    assert num_examples == labels.size == learner.num_examples()
    assert 0 < metrics["loss"] < np.log(NUM_CLASSES)


def test_fit_with_zero_local_steps_runs_whole_epochs(federation: DigitsFederation) -> None:
    features, _ = federation.partitions[0]
    steps_per_epoch = -(-features.shape[0] // 16)

    by_epochs = _fit_weights(federation, FitConfig(local_steps=0, epochs=2, batch_size=16))
    by_steps = _fit_weights(federation, FitConfig(local_steps=2 * steps_per_epoch, batch_size=16))

    np.testing.assert_array_equal(by_epochs, by_steps)


def test_fedprox_with_vanishing_mu_equals_plain_sgd(federation: DigitsFederation) -> None:
    config = FitConfig(local_steps=40, batch_size=32, learning_rate=0.5)

    plain = _fit_weights(federation, config)
    prox = _fit_weights(federation, replace(config, proximal_mu=1e-12))

    np.testing.assert_allclose(prox, plain, atol=1e-6)


def test_fedprox_shrinks_distance_to_global_model(federation: DigitsFederation) -> None:
    start = np.random.default_rng(1).normal(scale=0.1, size=(NUM_FEATURES, NUM_CLASSES))
    start = start.astype(np.float32)
    config = FitConfig(local_steps=40, batch_size=32, learning_rate=0.5)

    plain = _fit_weights(federation, config, start)
    prox = _fit_weights(federation, replace(config, proximal_mu=1.0), start)

    # Measured: 4.4 with mu = 0, 0.94 with mu = 1.
    assert np.linalg.norm(prox - start) < 0.5 * np.linalg.norm(plain - start)


def test_evaluate_reports_loss_examples_and_accuracy(federation: DigitsFederation) -> None:
    features, labels = federation.partitions[0]
    learner = DigitsLearner(features, labels)
    trained = learner.fit(initial_parameters(), FitConfig(local_steps=40, learning_rate=0.5))

    loss, num_examples, metrics = learner.evaluate(trained.parameters, EvaluateConfig())

    assert num_examples == labels.size
    assert loss == pytest.approx(trained.metrics["loss"])
    assert metrics["accuracy"] > 0.8


def test_fit_rejects_a_model_of_the_wrong_shape(federation: DigitsFederation) -> None:
    features, labels = federation.partitions[0]
    learner = DigitsLearner(features, labels)

    with pytest.raises(ValueError, match="shape"):
        learner.fit([np.zeros((64, 10), dtype=np.float32)], FitConfig(local_steps=1))


def test_step_delay_slows_each_step(federation: DigitsFederation) -> None:
    features, labels = federation.partitions[0]
    learner = DigitsLearner(features, labels, step_delay_seconds=0.01)

    started = time.perf_counter()
    learner.fit(initial_parameters(), FitConfig(local_steps=5))

    assert time.perf_counter() - started >= 0.05


# --- synchronous FedAvg with the demo defaults ---


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fedavg_with_demo_defaults_reaches_target_accuracy(seed: int) -> None:
    settings = default_demo_settings()
    fed = load_digits_federated(settings.num_learners, alpha=settings.alpha, seed=seed)
    learners = [DigitsLearner(x, y, seed=100 * seed + i) for i, (x, y) in enumerate(fed.partitions)]
    global_weights = initial_parameters()[0]

    for version in range(settings.rounds):
        results = [
            learner.fit([global_weights.copy()], settings.fit_config(version))
            for learner in learners[: settings.learners_per_round]
        ]
        weights = np.array([r.num_examples for r in results], dtype=np.float64)
        stacked = np.stack([r.parameters[0] for r in results]).astype(np.float64)
        global_weights = np.tensordot(weights / weights.sum(), stacked, axes=1).astype(np.float32)
    _, test_accuracy = evaluate_global([global_weights], *fed.test)

    # Seeds 0..9 (three learner seedings each) measured 0.936..0.968 after the default rounds.
    assert test_accuracy >= settings.target_accuracy


def test_time_budget_stops_training_early_and_reports_steps_run(
    federation: DigitsFederation,
) -> None:
    features, labels = federation.partitions[0]
    learner = DigitsLearner(features, labels, step_delay_seconds=0.01)
    config = FitConfig(local_steps=1000, learning_rate=0.5, time_budget_seconds=0.1)

    result = learner.fit(initial_parameters(), config)

    assert 1 <= result.metrics["steps"] < 100
