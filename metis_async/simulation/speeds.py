"""How fast simulated learners train and how often they drop out.

Each learner gets a fixed time per local minibatch step for the whole run: a median step time times
a log-normal factor exp(N(0, σ²)), and a chosen fraction of learners (the stragglers) is slower by
a further factor. Every task also pays a fixed latency for fetching the model and uploading the
result. Dropouts disconnect a learner in the middle of a training task; it comes back after an
exponentially distributed downtime. All of it is drawn from seeded generators, so a run repeats
exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LearnerSpeed:
    """The speed of one simulated learner.

    Attributes:
        step_seconds: simulated time of one local minibatch step (seconds).
        straggler: whether the learner was made a straggler.
    """

    step_seconds: float
    straggler: bool


@dataclass(frozen=True)
class SpeedModel:
    """Speeds, latency and dropouts of a simulated population of learners.

    Attributes:
        step_seconds: median time of one minibatch step of a typical learner (seconds).
        spread: σ of the per-learner log-normal factor exp(N(0, σ²)); 0 makes all equally fast.
        straggler_fraction: fraction of learners (rounded to a count) made stragglers (0..1).
        straggler_slowdown: how many times slower a straggler's steps are (>= 1).
        latency_seconds: fixed time added to every task for model download and upload (seconds).
        dropout_probability: probability that a learner disconnects during a training task (0..1).
        downtime_seconds: mean of the exponential time a disconnected learner stays away
            (seconds).
    """

    step_seconds: float = 0.01
    spread: float = 1.0
    straggler_fraction: float = 0.1
    straggler_slowdown: float = 10.0
    latency_seconds: float = 0.05
    dropout_probability: float = 0.0
    downtime_seconds: float = 5.0

    def __post_init__(self) -> None:
        if not (self.step_seconds > 0 and math.isfinite(self.step_seconds)):
            raise ValueError(f"step_seconds must be finite and > 0, got {self.step_seconds}")
        if not (self.spread >= 0 and math.isfinite(self.spread)):
            raise ValueError(f"spread must be finite and >= 0, got {self.spread}")
        if not 0.0 <= self.straggler_fraction <= 1.0:
            raise ValueError(f"straggler_fraction must be in [0, 1], got {self.straggler_fraction}")
        if not (self.straggler_slowdown >= 1 and math.isfinite(self.straggler_slowdown)):
            raise ValueError(
                f"straggler_slowdown must be finite and >= 1, got {self.straggler_slowdown}"
            )
        if not (self.latency_seconds >= 0 and math.isfinite(self.latency_seconds)):
            raise ValueError(f"latency_seconds must be finite and >= 0, got {self.latency_seconds}")
        if not 0.0 <= self.dropout_probability <= 1.0:
            raise ValueError(
                f"dropout_probability must be in [0, 1], got {self.dropout_probability}"
            )
        if not (self.downtime_seconds >= 0 and math.isfinite(self.downtime_seconds)):
            raise ValueError(
                f"downtime_seconds must be finite and >= 0, got {self.downtime_seconds}"
            )

    def sample(self, count: int, rng: np.random.Generator) -> list[LearnerSpeed]:
        """Draw the speeds of `count` learners: round(count × straggler_fraction) stragglers."""
        factors = np.exp(rng.normal(0.0, self.spread, size=count))
        stragglers = set(
            rng.choice(count, size=round(count * self.straggler_fraction), replace=False).tolist()
        )
        return [
            LearnerSpeed(
                step_seconds=self.step_seconds
                * float(factors[i])
                * (self.straggler_slowdown if i in stragglers else 1.0),
                straggler=i in stragglers,
            )
            for i in range(count)
        ]

    def drops_out(self, rng: np.random.Generator) -> bool:
        """Whether the learner starting a training task disconnects before finishing it."""
        return self.dropout_probability > 0 and bool(rng.random() < self.dropout_probability)

    def downtime(self, rng: np.random.Generator) -> float:
        """How long a learner that disconnected stays away (seconds)."""
        return float(rng.exponential(self.downtime_seconds)) if self.downtime_seconds else 0.0
