"""The digits demo: a non-IID federation of scikit-learn's digits and a numpy learner.

The model is multinomial logistic regression on the 8x8 digit images (64 pixels scaled to [0, 1]
plus a bias column), one 65x10 weight matrix, trained by minibatch SGD on softmax cross-entropy
with a small L2 penalty. It is convex and tiny, so a federation of learners trains to about 0.95
test accuracy in seconds on a laptop, which is what a demo and the protocol tests need. The data
ship with scikit-learn; nothing is downloaded. The tuned demo and simulation settings are in
`metis_async.profiles`.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from metis_async.client.learner import (
    EvaluateConfig,
    EvaluateRes,
    FitConfig,
    FitRes,
    Learner,
    NDArrays,
)

Features = npt.NDArray[np.float32]
"""Examples as rows: 64 pixel intensities in [0, 1] followed by a constant 1 (the bias column)."""
Labels = npt.NDArray[np.int64]
"""Digit classes 0..9, one per row of `Features`."""
Weights = npt.NDArray[np.float64]

NUM_FEATURES = 65
NUM_CLASSES = 10
L2_PENALTY = 1e-4
"""Coefficient lambda of the penalty lambda/2 * ||W||^2 added to the mean cross-entropy."""

_MAX_SPLIT_ATTEMPTS = 10_000


@dataclass(frozen=True)
class DigitsFederation:
    """The digits data split across learners.

    Attributes:
        partitions: one `(X, y)` training set per learner, non-IID (Dirichlet over classes).
        test: the held-out `(X, y)` test set, disjoint from every partition.
    """

    partitions: list[tuple[Features, Labels]]
    test: tuple[Features, Labels]


def _load_digits_raw() -> tuple[Features, Labels]:
    """Load scikit-learn's bundled digits as (X scaled to [0, 1] with a bias column, y)."""
    # Imported lazily by name: only the demo needs scikit-learn, and it ships no type stubs.
    datasets = importlib.import_module("sklearn.datasets")
    bunch = datasets.load_digits()
    pixels = np.asarray(bunch.data, dtype=np.float32) / np.float32(16.0)
    features = np.hstack([pixels, np.ones((pixels.shape[0], 1), dtype=np.float32)])
    labels = np.asarray(bunch.target, dtype=np.int64)
    return features, labels


def _stratified_split(
    labels: Labels, test_fraction: float, rng: np.random.Generator
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Return (train indices, test indices), taking `test_fraction` of each class for test."""
    train: list[npt.NDArray[np.intp]] = []
    test: list[npt.NDArray[np.intp]] = []
    for cls in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_test = round(test_fraction * idx.size)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _dirichlet_split(
    labels: Labels, num_learners: int, alpha: float, min_examples: int, rng: np.random.Generator
) -> list[npt.NDArray[np.intp]]:
    """Split example positions across learners with a per-class Dirichlet(alpha) over learners.

    Resamples the whole split until every learner holds at least `min_examples` examples.
    """
    for _ in range(_MAX_SPLIT_ATTEMPTS):
        shares: list[list[npt.NDArray[np.intp]]] = [[] for _ in range(num_learners)]
        for cls in range(NUM_CLASSES):
            idx = rng.permutation(np.flatnonzero(labels == cls))
            proportions = rng.dirichlet(np.full(num_learners, alpha))
            cuts = (np.cumsum(proportions)[:-1] * idx.size).astype(np.intp)
            for learner, part in enumerate(np.split(idx, cuts)):
                shares[learner].append(part)
        parts = [np.sort(np.concatenate(s)) for s in shares]
        if min(p.size for p in parts) >= min_examples:
            return parts
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split of {labels.size} examples over {num_learners} "
        f"learners gave each >= {min_examples} examples in {_MAX_SPLIT_ATTEMPTS} attempts"
    )


def load_digits_federated(
    num_learners: int,
    alpha: float = 0.5,
    seed: int = 0,
    test_fraction: float = 0.25,
    min_examples: int = 10,
) -> DigitsFederation:
    """Split scikit-learn's digits (1797 images) into a non-IID federation and a test set.

    The test set is a stratified `test_fraction` of each class. The rest is split across
    learners class by class: each class's examples go to learners in Dirichlet(alpha)
    proportions, resampled until every learner has at least `min_examples` examples.
    The same arguments always give the same federation.

    Args:
        num_learners: number of training partitions.
        alpha: Dirichlet concentration; small values (0.1) make very skewed class mixes, large
            values (100) nearly IID ones.
        seed: seed of the split.
        test_fraction: fraction of each class held out for testing (0..1).
        min_examples: fewest training examples any learner may hold.

    Raises:
        ValueError: on invalid arguments, or if no split satisfies `min_examples`.
    """
    if num_learners < 1:
        raise ValueError(f"num_learners must be >= 1, got {num_learners}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    features, labels = _load_digits_raw()
    rng = np.random.default_rng(seed)
    train_idx, test_idx = _stratified_split(labels, test_fraction, rng)
    if num_learners * min_examples > train_idx.size:
        raise ValueError(
            f"{train_idx.size} training examples cannot give {num_learners} learners "
            f">= {min_examples} each"
        )
    parts = _dirichlet_split(labels[train_idx], num_learners, alpha, min_examples, rng)
    partitions = [(features[train_idx[p]], labels[train_idx[p]]) for p in parts]
    return DigitsFederation(partitions=partitions, test=(features[test_idx], labels[test_idx]))


def initial_parameters() -> NDArrays:
    """Return the starting model: `[W]` with W a zero 65x10 float32 matrix."""
    return [np.zeros((NUM_FEATURES, NUM_CLASSES), dtype=np.float32)]


def _weights_from(parameters: NDArrays) -> Weights:
    """Check `parameters` is `[W]` with W of shape 65x10 and return W as a float64 copy."""
    if len(parameters) != 1 or parameters[0].shape != (NUM_FEATURES, NUM_CLASSES):
        shapes = [p.shape for p in parameters]
        raise ValueError(f"expected [W] with W of shape (65, 10), got shapes {shapes}")
    return np.array(parameters[0], dtype=np.float64)


def _log_softmax(weights: Weights, features: npt.NDArray[np.floating]) -> Weights:
    """Return log class probabilities, one row per example."""
    logits = features.astype(np.float64) @ weights
    logits -= logits.max(axis=1, keepdims=True)
    result: Weights = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return result


def loss_and_gradient(
    weights: Weights,
    features: npt.NDArray[np.floating],
    labels: Labels,
    l2: float = L2_PENALTY,
) -> tuple[float, Weights]:
    """Return the objective and its gradient in W, computed in float64.

    The objective is the mean softmax cross-entropy (nats) over the examples plus
    l2/2 * ||W||^2 (the penalty covers the bias row too, which keeps the code simple and is
    harmless at this size).
    """
    log_probs = _log_softmax(weights, features)
    n = labels.size
    rows = np.arange(n)
    loss = -float(log_probs[rows, labels].mean()) + 0.5 * l2 * float(np.sum(weights * weights))
    residual = np.exp(log_probs)
    residual[rows, labels] -= 1.0
    gradient: Weights = features.astype(np.float64).T @ residual / n + l2 * weights
    return loss, gradient


def cross_entropy(weights: Weights, features: npt.NDArray[np.floating], labels: Labels) -> float:
    """Return the mean softmax cross-entropy of `weights` on the examples (nats, no penalty)."""
    log_probs = _log_softmax(weights, features)
    return -float(log_probs[np.arange(labels.size), labels].mean())


def accuracy(weights: Weights, features: npt.NDArray[np.floating], labels: Labels) -> float:
    """Return the fraction of examples whose highest-scoring class is the label (0..1)."""
    predictions = np.argmax(features.astype(np.float64) @ weights, axis=1)
    return float(np.mean(predictions == labels))


def evaluate_global(
    parameters: NDArrays, features: npt.NDArray[np.floating], labels: Labels
) -> tuple[float, float]:
    """Score a model on held-out data: return (mean cross-entropy in nats, accuracy 0..1)."""
    weights = _weights_from(parameters)
    return cross_entropy(weights, features, labels), accuracy(weights, features, labels)


def _minibatches(
    num_examples: int, batch_size: int, rng: np.random.Generator
) -> Iterator[npt.NDArray[np.intp]]:
    """Yield minibatch index arrays forever: shuffled passes over the data, reshuffled each pass.

    The last batch of a pass may be smaller than `batch_size`.
    """
    while True:
        order = rng.permutation(num_examples)
        for start in range(0, num_examples, batch_size):
            yield order[start : start + batch_size]


def sgd(
    weights: Weights,
    features: npt.NDArray[np.floating],
    labels: Labels,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    rng: np.random.Generator,
    proximal_mu: float = 0.0,
    step_delay_seconds: float = 0.0,
    time_budget_seconds: float = 0.0,
) -> tuple[Weights, int]:
    """Run up to `steps` minibatch SGD steps from `weights`; return the new weights and steps run.

    With `proximal_mu` > 0 each step also follows the gradient of the FedProx term
    mu/2 * ||W - W_start||^2, which pulls the weights back toward where training started (the
    global model). `step_delay_seconds` sleeps that long after every step, to play a slow
    device. With `time_budget_seconds` > 0 training stops once that much time has passed (at
    least one step runs): partial work.
    """
    anchor = weights.copy()
    current = weights.copy()
    batches = _minibatches(labels.size, batch_size, rng)
    stop_at = time.perf_counter() + time_budget_seconds if time_budget_seconds > 0 else None
    done = 0
    for _ in range(steps):
        if stop_at is not None and done and time.perf_counter() >= stop_at:
            break
        done += 1
        batch = next(batches)
        _, gradient = loss_and_gradient(current, features[batch], labels[batch])
        if proximal_mu > 0:
            gradient += proximal_mu * (current - anchor)
        current -= learning_rate * gradient
        if step_delay_seconds > 0:
            time.sleep(step_delay_seconds)
    return current, done


class DigitsLearner(Learner):
    """A learner that trains the digits model on its own partition.

    Args:
        features: the partition's examples, shape (n, 65).
        labels: the partition's labels, shape (n,).
        seed: seed of the minibatch order; the learner keeps one generator across tasks.
        step_delay_seconds: sleep after every SGD step, to simulate a slow device (seconds).
    """

    def __init__(
        self,
        features: Features,
        labels: Labels,
        seed: int = 0,
        step_delay_seconds: float = 0.0,
    ) -> None:
        if features.ndim != 2 or features.shape[1] != NUM_FEATURES:
            raise ValueError(f"features must have shape (n, 65), got {features.shape}")
        if labels.shape != (features.shape[0],):
            raise ValueError(f"labels must have shape ({features.shape[0]},), got {labels.shape}")
        if labels.size == 0:
            raise ValueError("a learner needs at least one example")
        if step_delay_seconds < 0:
            raise ValueError(f"step_delay_seconds must be >= 0, got {step_delay_seconds}")
        self._features = features
        self._labels = labels
        self._rng = np.random.default_rng(seed)
        self._step_delay_seconds = step_delay_seconds
        self._parameters = initial_parameters()

    def get_parameters(self) -> NDArrays:
        """Return the model from the last `fit` (zeros before the first)."""
        return [p.copy() for p in self._parameters]

    def fit(self, parameters: NDArrays, config: FitConfig) -> FitRes:
        """Train from `parameters` with minibatch SGD on the local partition.

        Runs `config.local_steps` steps, or `config.epochs` passes when `local_steps` is 0,
        with FedProx when `config.proximal_mu` > 0. Returns the trained `[W]` (float32), the
        number of local examples, and `{"loss": ...}`, the trained model's mean cross-entropy
        on the local data (nats).
        """
        weights = _weights_from(parameters)
        n = self._labels.size
        batch_size = max(1, config.batch_size)
        if config.local_steps > 0:
            steps = config.local_steps
        else:
            steps = config.epochs * -(-n // batch_size)
        trained, done = sgd(
            weights,
            self._features,
            self._labels,
            steps=steps,
            batch_size=batch_size,
            learning_rate=config.learning_rate,
            rng=self._rng,
            proximal_mu=config.proximal_mu,
            step_delay_seconds=self._step_delay_seconds,
            time_budget_seconds=config.time_budget_seconds,
        )
        self._parameters = [trained.astype(np.float32)]
        loss = cross_entropy(trained, self._features, self._labels)
        return FitRes(self.get_parameters(), n, {"loss": loss, "steps": float(done)})

    def evaluate(self, parameters: NDArrays, config: EvaluateConfig) -> EvaluateRes:
        """Score `parameters` on the local data: (cross-entropy in nats, examples, accuracy)."""
        loss, acc = evaluate_global(parameters, self._features, self._labels)
        return EvaluateRes(loss, int(self._labels.size), {"accuracy": acc})

    def num_examples(self) -> int:
        """Return the number of local training examples."""
        return int(self._labels.size)
