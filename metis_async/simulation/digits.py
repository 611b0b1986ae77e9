"""The reference simulation: scikit-learn's digits over 50 non-IID learners with stragglers.

`run_digits` builds the federation of ALGORITHMS.md ("Reference simulation (digits)"): the digits
split per class by Dirichlet(α) over the learners, multinomial logistic regression trained by
minibatch SGD (batch 16), per-step time 0.01 s × exp(N(0, 1)), a tenth of the learners ten times
slower, 0.05 s latency per task. `metis_async.profiles.SIMULATION_PROFILES` holds the policy
settings tuned for it; the caller's settings override them field by field.
"""

from __future__ import annotations

from metis_async.aggregation.server_step import AggregationSettings
from metis_async.client.learner import NDArrays
from metis_async.examples import digits
from metis_async.profiles import SIMULATION_PROFILES
from metis_async.protocols import POLICIES, StalenessFunction, TrainSettings, make_policy
from metis_async.simulation.federation import SimulatedFederation
from metis_async.simulation.result import EvaluationSchedule, SimulationResult
from metis_async.simulation.speeds import SpeedModel


def policy_settings(protocol: str, seed: int = 0, **overrides: object) -> dict[str, object]:
    """The digits settings of `protocol`: its `SIMULATION_PROFILES` entry with `overrides` applied.

    A `staleness` given as text (`polynomial:0.5`, `constant`) is parsed; `train_*` keys
    (`train_local_steps=40`, `train_learning_rate=0.3`) change one field of the training settings.
    """
    if protocol not in POLICIES:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {sorted(POLICIES)}")
    settings = dict(SIMULATION_PROFILES[protocol])
    train_fields = {
        k.removeprefix("train_"): v for k, v in overrides.items() if k.startswith("train_")
    }
    settings.update({k: v for k, v in overrides.items() if not k.startswith("train_")})
    if isinstance(settings.get("staleness"), str):
        settings["staleness"] = StalenessFunction.parse(str(settings["staleness"]))
    if train_fields:
        base = settings.get("train", TrainSettings())
        assert isinstance(base, TrainSettings)
        settings["train"] = TrainSettings(**{**base.__dict__, **train_fields})
    settings.setdefault("seed", seed)
    quorum = settings.get("learners_per_round", settings.get("concurrency", 1))
    settings.setdefault("min_learners", quorum if isinstance(quorum, int) and quorum > 0 else 1)
    return settings


def run_digits(
    protocol: str,
    *,
    learners: int = 50,
    alpha: float = 0.5,
    stragglers: float = 0.1,
    slowdown: float = 10.0,
    dropout: float = 0.0,
    seconds: float = 20.0,
    seed: int = 0,
    evaluation: EvaluationSchedule | None = None,
    aggregation: AggregationSettings | None = None,
    **settings: object,
) -> SimulationResult:
    """Simulate `protocol` on the digits task for `seconds` of simulated time.

    Args:
        protocol: a name from `metis_async.protocols.POLICIES`.
        learners: number of learners, each with its own non-IID partition.
        alpha: Dirichlet concentration of the split (smaller is more non-IID).
        stragglers: fraction of learners that are `slowdown` times slower (0..1).
        slowdown: how many times slower a straggler's steps are.
        dropout: probability that a learner disconnects during a training task (0..1); it comes
            back after an exponential downtime of mean 5 s.
        seconds: simulated time to run (seconds).
        seed: seeds the split, the speeds, the learners' minibatches and the policy's sampler.
        evaluation: which versions are scored on the test set (default: every commit).
        aggregation: server optimizer, robust rule and clipping (default: FedAvg's mean).
        **settings: policy settings overriding the profile (see `policy_settings`).

    Returns:
        The result; its history holds the test accuracy of the scored versions.
    """
    federation = digits.load_digits_federated(learners, alpha=alpha, seed=seed)
    test_x, test_y = federation.test

    def score(parameters: NDArrays) -> float:
        return digits.evaluate_global(parameters, test_x, test_y)[1]

    policy = make_policy(protocol, **policy_settings(protocol, seed, **settings))
    simulated = SimulatedFederation(
        policy,
        [
            digits.DigitsLearner(x, y, seed=seed * 1_000_003 + i)
            for i, (x, y) in enumerate(federation.partitions)
        ],
        digits.initial_parameters(),
        score,
        speeds=SpeedModel(
            straggler_fraction=stragglers, straggler_slowdown=slowdown, dropout_probability=dropout
        ),
        evaluation=evaluation,
        aggregation=aggregation,
        seed=seed,
    )
    return simulated.run(seconds)
