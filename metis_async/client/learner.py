"""The learner API: a small base class that feels like Flower's NumPyClient.

A learner holds private data and trains the shared model on it. Subclass `Learner`, implement
`get_parameters`, `fit` and `evaluate` on lists of numpy arrays, and hand an instance to
`metis_async.client.run_learner`. Nothing here imports server code, uvloop or structlog, so a
learner runs on a small edge device with only grpcio, protobuf and numpy installed.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

NDArrays = list[npt.NDArray[np.generic]]
"""A model as a list of numpy arrays, in a fixed order (the same order on every call)."""

Metrics = Mapping[str, float]


@dataclass(frozen=True)
class FitConfig:
    """What the controller asks of one training task.

    Attributes:
        model_version: global version the parameters come from.
        local_steps: minibatch steps to run; 0 means run `epochs` full passes instead.
        epochs: full passes over the local data when `local_steps` is 0.
        batch_size: examples per minibatch.
        learning_rate: local SGD step size.
        proximal_mu: FedProx coefficient mu for the term mu/2 * ||w - w_global||^2; 0 disables it.
        extra: further numeric settings a policy or experiment passes through.
        time_budget_seconds: stop training after this long and return the work done (partial
            work is accepted; report the steps run as metrics["steps"]); 0 = no limit.
    """

    model_version: int = 0
    local_steps: int = 0
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.1
    proximal_mu: float = 0.0
    extra: Mapping[str, float] = field(default_factory=dict)
    time_budget_seconds: float = 0.0


@dataclass(frozen=True)
class EvaluateConfig:
    """What the controller asks of one evaluation task.

    Attributes:
        model_version: global version the parameters come from.
        batch_size: examples per evaluation batch; the default (256) stands for the learner's
            own choice when the controller leaves it at 0.
    """

    model_version: int = 0
    batch_size: int = 256


class FitRes(NamedTuple):
    """Result of `Learner.fit`. A plain 3-tuple `(parameters, num_examples, metrics)` works too."""

    parameters: NDArrays
    num_examples: int
    metrics: Metrics


class EvaluateRes(NamedTuple):
    """Result of `Learner.evaluate`. A plain 3-tuple `(loss, num_examples, metrics)` works too."""

    loss: float
    num_examples: int
    metrics: Metrics


class Learner(abc.ABC):
    """Base class for a learner: the code that trains on one participant's private data.

    The run loop calls these methods from one thread, one task at a time. Arrays passed in are
    fresh copies the learner may keep or modify.
    """

    @abc.abstractmethod
    def get_parameters(self) -> NDArrays:
        """Return the current local model (used when the controller has no model yet)."""

    @abc.abstractmethod
    def fit(
        self, parameters: NDArrays, config: FitConfig
    ) -> FitRes | tuple[NDArrays, int, Metrics]:
        """Train from `parameters` on local data; return trained parameters, examples, metrics."""

    @abc.abstractmethod
    def evaluate(
        self, parameters: NDArrays, config: EvaluateConfig
    ) -> EvaluateRes | tuple[float, int, Metrics]:
        """Evaluate `parameters` on local data; return loss, examples evaluated, metrics."""

    def num_examples(self) -> int:
        """Training examples this learner holds (reported to the controller for weighting)."""
        return 0

    def on_federation_finished(self, parameters: NDArrays, version: int) -> None:  # noqa: B027
        """Called once when the federation finishes and the learner holds its final model.

        The controller sends the final model before `Shutdown` FINISHED to learners that do not
        hold it yet; the run loop calls this after the stream has closed, from the thread that
        called `run_learner`, just before `run_learner` returns (the same arrays are in
        `RunSummary.final_parameters`). Not called when the run is stopped, or when the final
        model never arrived (e.g. an older controller). Override it to save or deploy the model;
        exceptions propagate out of `run_learner`. The default does nothing.

        Args:
            parameters: the final global model, in the layout's shapes and dtypes.
            version: its version number.
        """
