"""A `Learner` for scikit-learn linear models: the federated parameters are `coef_, intercept_`.

    from sklearn.linear_model import SGDClassifier
    from metis_async.client.sklearn import SklearnLearner

    learner = SklearnLearner(SGDClassifier(loss="log_loss"), x, y, classes=range(10))

A linear model has no coefficients before its first fit, and its shapes depend on data it may
not hold (a learner whose labels miss a class would build a smaller `coef_`). So the shapes come
from the user: the number of features (the columns of `features`) and, for a classifier, every
class of the federation (`classes`). `initial_parameters` builds the same zero model without
data, for a controller's `initial_model`. Shapes, in the order they travel:

- classifier with k > 2 classes: `coef_` (k, n_features), `intercept_` (k,);
- binary classifier: `coef_` (1, n_features), `intercept_` (1,);
- regressor: `coef_` (n_features,) or (n_targets, n_features), `intercept_` (n_targets,).

How a task trains depends on what the estimator offers:

- `partial_fit` (SGDClassifier, SGDRegressor, Perceptron, ...): `FitConfig.local_steps`
  minibatches of `batch_size` (or `epochs` shuffled passes when `local_steps` is 0), each one
  `partial_fit` call, stopping early at `time_budget_seconds`;
- `warm_start` (LogisticRegression, ...): one `fit` on all local data starting from the global
  coefficients (`warm_start` is switched on); the estimator's `max_iter` bounds the work. Classes
  missing locally are added as zero-weight rows so the shapes stay the federation's;
- neither (LinearRegression, Ridge): one `fit` from scratch; the global model is not its start,
  so the federation averages local solutions.

The estimator's own solver settings rule: `FitConfig.learning_rate` is not applied, and
`proximal_mu` is ignored (logged once). Parameters travel as float64 arrays (the wire carries them
as float32); features are converted to float64 once, at construction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from sklearn.base import is_classifier
from sklearn.metrics import log_loss

from metis_async.client.learner import (
    EvaluateConfig,
    EvaluateRes,
    FitConfig,
    FitRes,
    Learner,
    NDArrays,
)

log = logging.getLogger("metis_async.client")

Array = npt.NDArray[np.float64]
"""Features (rows are examples), coefficients and intercepts, all float64."""
Targets = npt.NDArray[np.generic]
"""Labels (classifiers) or target values (regressors), one per example."""


class LinearEstimator(Protocol):
    """What the adapter needs of a scikit-learn linear model (scikit-learn ships no types).

    It also reads and writes the fitted attributes `coef_`, `intercept_` and `classes_`, and
    calls `partial_fit` or `predict_proba` where the estimator has them.
    """

    def fit(self, X: Array, y: Targets, sample_weight: Array | None = None) -> object:
        """Fit on all of `X, y` (scikit-learn's signature)."""

    def predict(self, X: Array) -> Targets:
        """Predict a class or value per row of `X`."""

    def get_params(self, deep: bool = True) -> dict[str, object]:
        """The estimator's constructor settings."""

    def set_params(self, **params: object) -> object:
        """Change constructor settings."""


def initial_parameters(
    n_features: int, classes: Iterable[object] | None = None, n_targets: int = 1
) -> NDArrays:
    """Return the zero model `[coef, intercept]` (float64) for a linear model.

    Args:
        n_features: input features (columns of the feature matrix).
        classes: every class of the federation for a classifier; None for a regressor.
        n_targets: outputs of a regressor (ignored for a classifier).

    Raises:
        ValueError: on fewer than 2 classes, or on a non-positive count.
    """
    if n_features < 1:
        raise ValueError(f"n_features must be >= 1, got {n_features}")
    if classes is not None:
        k = len(np.unique(np.asarray(list(classes))))
        if k < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {k}")
        rows = 1 if k == 2 else k
        return [np.zeros((rows, n_features)), np.zeros(rows)]
    if n_targets < 1:
        raise ValueError(f"n_targets must be >= 1, got {n_targets}")
    coef_shape = (n_features,) if n_targets == 1 else (n_targets, n_features)
    return [np.zeros(coef_shape), np.zeros(n_targets)]


class SklearnLearner(Learner):
    """A learner that federates a scikit-learn linear model (see the module docstring).

    Args:
        estimator: an unfitted linear model (or a fitted one: its coefficients, of the right
            shapes, are then the starting local model). `average=True` SGD is not supported.
        features: local training examples, shape (n, n_features).
        targets: local labels or values, shape (n,) (or (n, n_targets) for a regressor).
        classes: every class of the federation; required for a classifier.
        evaluation: held-out `(features, targets)` for `evaluate`; None scores the training data.
        seed: seed of the minibatch order (partial_fit estimators).

    Raises:
        ValueError: on inconsistent data, a classifier without `classes`, local labels outside
            `classes`, or an unsupported estimator setting.
    """

    def __init__(
        self,
        estimator: LinearEstimator,
        features: npt.ArrayLike,
        targets: npt.ArrayLike,
        *,
        classes: Iterable[object] | None = None,
        evaluation: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
        seed: int = 0,
    ) -> None:
        self.estimator = estimator
        self._model: Any = estimator  # its fitted attributes, untyped like all of scikit-learn
        self._x, self._y = _checked(features, targets)
        self._eval = _checked(*evaluation) if evaluation is not None else None
        self._rng = np.random.default_rng(seed)
        self._classifier = bool(is_classifier(estimator))
        params = estimator.get_params()
        if params.get("average"):
            raise ValueError("averaged SGD (average=True) keeps coefficients the adapter can't set")
        self._partial = hasattr(estimator, "partial_fit")
        if not self._partial and "warm_start" in params:
            estimator.set_params(warm_start=True)
        n_features = self._x.shape[1]
        if self._classifier:
            if classes is None:
                raise ValueError("a classifier needs `classes`: every class of the federation")
            self._classes: Targets | None = np.unique(np.asarray(list(classes)))
            unknown = np.setdiff1d(self._y, self._classes)
            if unknown.size:
                raise ValueError(f"local labels {unknown.tolist()} are not in `classes`")
            shapes = initial_parameters(n_features, self._classes)
        else:
            self._classes = None
            shapes = initial_parameters(n_features, n_targets=_targets_width(self._y))
        self._shapes = [p.shape for p in shapes]
        start = self._fitted_parameters() if hasattr(estimator, "coef_") else shapes
        self._prepare()
        self.set_parameters(start)
        self._warned_mu = False

    def _prepare(self) -> None:
        """Give the estimator the fitted state it needs before its coefficients are set."""
        est = self._model
        if self._partial and not hasattr(est, "coef_"):
            # One partial_fit on one example lets scikit-learn validate its settings and build
            # its internal state; the coefficients are overwritten right after.
            if self._classes is not None:
                est.partial_fit(self._x[:1], self._y[:1], classes=self._classes)
            else:
                est.partial_fit(self._x[:1], self._y[:1])
        else:  # what `predict` checks before the first fit
            est.n_features_in_ = self._x.shape[1]
            if self._classes is not None:
                est.classes_ = self._classes

    def _fitted_parameters(self) -> NDArrays:
        coef = np.array(self._model.coef_, dtype=np.float64)
        intercept = np.array(self._model.intercept_, dtype=np.float64, ndmin=1)
        fitted = [coef, intercept]
        if [p.size for p in fitted] != [int(np.prod(s)) for s in self._shapes]:
            shapes = [p.shape for p in fitted]
            raise ValueError(
                f"the estimator's coef_, intercept_ have shapes {shapes}, expected {self._shapes}"
            )
        return [p.reshape(s) for p, s in zip(fitted, self._shapes, strict=True)]

    def get_parameters(self) -> NDArrays:
        """Return `[coef_, intercept_]` as float64 copies (shapes in the module docstring)."""
        return self._fitted_parameters()

    def set_parameters(self, parameters: NDArrays) -> None:
        """Load `[coef, intercept]` into the estimator (copies; exact for float64 and float32).

        Raises:
            ValueError: unless there are two arrays of the learner's shapes.
        """
        shapes = [p.shape for p in parameters]
        if shapes != self._shapes:
            raise ValueError(f"expected [coef, intercept] of shapes {self._shapes}, got {shapes}")
        coef, intercept = parameters
        # C-ordered float64 copies: the SGD solvers update coef_ in place and need that layout.
        self._model.coef_ = np.array(coef, dtype=np.float64, order="C")
        self._model.intercept_ = np.array(intercept, dtype=np.float64, order="C")

    def fit(self, parameters: NDArrays, config: FitConfig) -> FitRes:
        """Train from `parameters` on the local data (how: the module docstring).

        Returns the trained `[coef, intercept]`, the number of local examples, and
        `{"steps": ...}`: minibatches run (partial_fit) or solver iterations (warm start, 0 when
        the estimator does not report them).
        """
        if config.proximal_mu > 0 and not self._warned_mu:
            self._warned_mu = True
            log.warning("proximal_mu_ignored learner=sklearn mu=%s", config.proximal_mu)
        self.set_parameters(parameters)
        steps = self._fit_minibatches(config) if self._partial else self._fit_whole()
        return FitRes(self.get_parameters(), self.num_examples(), {"steps": float(steps)})

    def _fit_minibatches(self, config: FitConfig) -> int:
        n = self._y.shape[0]
        batch_size = max(1, config.batch_size)
        steps = config.local_steps or config.epochs * -(-n // batch_size)
        stop_at = time.perf_counter() + config.time_budget_seconds
        partial_fit = self._model.partial_fit
        done = 0
        for batch in _minibatches(n, batch_size, self._rng):
            if done == steps or (config.time_budget_seconds > 0 and done and _past(stop_at)):
                break
            if self._classes is not None:
                partial_fit(self._x[batch], self._y[batch], classes=self._classes)
            else:
                partial_fit(self._x[batch], self._y[batch])
            done += 1
        return done

    def _fit_whole(self) -> int:
        x, y, weights = self._x, self._y, None
        if self._classes is not None:
            # Zero-weight rows for classes this learner lacks keep coef_ at the federation's
            # shape (scikit-learn sizes it by the classes present in y) and leave the loss as is.
            missing = np.setdiff1d(self._classes, y)
            if missing.size:
                x = np.vstack([x, np.zeros((missing.size, x.shape[1]))])
                y = np.concatenate([y, missing])
                weights = np.concatenate([np.ones(self._y.shape[0]), np.zeros(missing.size)])
        self.estimator.fit(x, y, sample_weight=weights)
        return int(np.max(getattr(self.estimator, "n_iter_", 0)))

    def evaluate(self, parameters: NDArrays, config: EvaluateConfig) -> EvaluateRes:
        """Score `parameters` on the evaluation data (the training data when none was given).

        Classifiers: loss is the mean log-loss (nats) when the estimator has `predict_proba`,
        else the error rate; metrics `{"accuracy": ...}`. Regressors: loss is the mean squared
        error; metrics `{"r2": ...}`.
        """
        self.set_parameters(parameters)
        x, y = self._eval if self._eval is not None else (self._x, self._y)
        predicted = self.estimator.predict(x)
        if self._classes is None:
            values = np.asarray(y, dtype=np.float64)
            error = float(np.mean((np.asarray(predicted, dtype=np.float64) - values) ** 2))
            spread = float(np.mean((values - np.mean(values, axis=0)) ** 2))
            r2 = 1.0 - error / spread if spread > 0 else 0.0
            return EvaluateRes(error, int(y.shape[0]), {"r2": r2})
        accuracy = float(np.mean(predicted == y))
        if hasattr(self.estimator, "predict_proba"):  # a property: absent for hinge loss
            proba = self._model.predict_proba(x)
            loss = float(log_loss(y, proba, labels=self._classes))
        else:
            loss = 1.0 - accuracy
        return EvaluateRes(loss, int(y.shape[0]), {"accuracy": accuracy})

    def num_examples(self) -> int:
        """Return the number of local training examples."""
        return int(self._y.shape[0])


def _checked(features: npt.ArrayLike, targets: npt.ArrayLike) -> tuple[Array, Targets]:
    """Return features as a 2-D float64 array and targets as an array of matching length."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(targets)
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D (examples x features), got shape {x.shape}")
    if y.ndim not in (1, 2) or y.shape[0] != x.shape[0]:
        raise ValueError(f"targets must have {x.shape[0]} rows, got shape {y.shape}")
    if x.shape[0] == 0:
        raise ValueError("a learner needs at least one example")
    return x, y


def _targets_width(targets: Targets) -> int:
    return 1 if targets.ndim == 1 else int(targets.shape[1])


def _past(deadline: float) -> bool:
    return time.perf_counter() >= deadline


def _minibatches(
    num_examples: int, batch_size: int, rng: np.random.Generator
) -> Iterator[npt.NDArray[np.intp]]:
    """Yield minibatch index arrays forever: shuffled passes, the last of a pass maybe smaller."""
    while True:
        order = rng.permutation(num_examples)
        for start in range(0, num_examples, batch_size):
            yield order[start : start + batch_size]
