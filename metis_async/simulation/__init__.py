"""Simulated federations: a real policy and real training on a simulated clock.

`SimulatedFederation` drives any `Policy` with any `Learner`s and a scoring function, with
log-normal learner speeds, stragglers, latency and dropouts (`SpeedModel`), and no sleeping.
`run_digits` runs the reference digits task of ALGORITHMS.md with tuned settings per protocol.
"""

from __future__ import annotations

from metis_async.simulation.digits import policy_settings, run_digits
from metis_async.simulation.federation import Score, SimulatedFederation
from metis_async.simulation.learners import SimulatedLearner
from metis_async.simulation.result import EvaluationSchedule, HistoryPoint, SimulationResult
from metis_async.simulation.speeds import LearnerSpeed, SpeedModel

__all__ = [
    "EvaluationSchedule",
    "HistoryPoint",
    "LearnerSpeed",
    "Score",
    "SimulatedFederation",
    "SimulatedLearner",
    "SimulationResult",
    "SpeedModel",
    "policy_settings",
    "run_digits",
]
