"""The learner client: subclass `Learner`, then `run_learner(address, learner)`.

Needs only grpcio, protobuf and numpy, so it embeds on small edge devices.

    from metis_async.client import Learner, run_learner

    class MyLearner(Learner):
        def get_parameters(self): ...
        def fit(self, parameters, config): ...       # -> (parameters, num_examples, metrics)
        def evaluate(self, parameters, config): ...  # -> (loss, num_examples, metrics)
        def on_federation_finished(self, parameters, version): ...  # optional: the final model

    summary = run_learner("127.0.0.1:50051", MyLearner())
    summary.final_parameters  # the final model, when the controller delivered it
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
from metis_async.client.models import HeldModel
from metis_async.client.runner import (
    CAPABILITIES,
    DEFAULT_CODECS,
    LearnerRunner,
    LearnerStopped,
    run_learner,
    tls_credentials,
)
from metis_async.client.summary import Backoff, RunSummary
from metis_async.client.unacked import UNACKED_KEPT, UnackedUpdates

__all__ = [
    "CAPABILITIES",
    "DEFAULT_CODECS",
    "UNACKED_KEPT",
    "Backoff",
    "EvaluateConfig",
    "EvaluateRes",
    "FitConfig",
    "FitRes",
    "HeldModel",
    "Learner",
    "LearnerRunner",
    "LearnerStopped",
    "Metrics",
    "NDArrays",
    "RunSummary",
    "UnackedUpdates",
    "run_learner",
    "tls_credentials",
]
