"""The learner client: subclass `Learner`, then `run_learner(address, learner)`.

Needs only grpcio, protobuf and numpy, so it embeds on small edge devices.

    from metis_async.client import Learner, run_learner

    class MyLearner(Learner):
        def get_parameters(self): ...
        def fit(self, parameters, config): ...       # -> (parameters, num_examples, metrics)
        def evaluate(self, parameters, config): ...  # -> (loss, num_examples, metrics)

    run_learner("127.0.0.1:50051", MyLearner())
"""

from __future__ import annotations

from metis_async.client.learner import (
    EvaluateConfig,
    EvaluateRes,
    FitConfig,
    FitRes,
    Learner,
    Metrics,
    NDArrays,
)
from metis_async.client.runner import (
    Backoff,
    LearnerRunner,
    LearnerStopped,
    RunSummary,
    run_learner,
)

__all__ = [
    "Backoff",
    "EvaluateConfig",
    "EvaluateRes",
    "FitConfig",
    "FitRes",
    "Learner",
    "LearnerRunner",
    "LearnerStopped",
    "Metrics",
    "NDArrays",
    "RunSummary",
    "run_learner",
]
