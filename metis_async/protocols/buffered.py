"""FedBuff (Nguyen et al., AISTATS 2022): buffer K staleness-weighted deltas, then commit.

A learner trains from x_τ and uploads Δ = y − x_τ. The controller adds s(t − τ) · w · Δ to the
buffer (s(τ) = 1/√(1+τ) by default, w the learner's base weight) and after K updates commits
x ← x + η · buffer / Σ w (or hands that to a server optimizer), t ← t + 1. The buffer is divided
by the sum of the BASE weights, not of the staleness-scaled ones: s(τ) stays an absolute factor
(at K = 1 an update 100 versions stale moves the model 1/√101 as far as a fresh one), and with
uniform weights Σ w = K, the paper's buffer / K. `concurrency` learners train at all times; the
one that reported gets fresh work at once.

A failed commit (`CommitFailed`) empties the buffer count: the aggregate was dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from metis_async.protocols.base import (
    AcceptUpdate,
    CommitFailed,
    CommitVersion,
    Decision,
    UpdateArrived,
)
from metis_async.protocols.continuous import ContinuousPolicy, ContinuousSettings, Weighting
from metis_async.protocols.staleness import StalenessFunction


@dataclass(frozen=True)
class BufferedSettings(ContinuousSettings):
    """Settings of `BufferedPolicy` (see `ContinuousSettings` for the shared ones).

    Attributes:
        buffer_size: K, updates per committed version.
        server_learning_rate: η of the server step x ← x + η · buffer / K.
        weighting: base weight w of an update before staleness; uniform as in the paper.
        normalize_weights: divide the buffer by its total staleness-scaled weight Σ s(τ)·w (a
            weighted mean) instead of Σ w: staleness then only ranks the updates of a buffer
            against each other, and at K = 1 it has no effect at all.
    """

    buffer_size: int = 10
    server_learning_rate: float = 1.0
    weighting: Weighting = "uniform"
    normalize_weights: bool = False
    staleness: StalenessFunction = field(default_factory=lambda: StalenessFunction("inverse_sqrt"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {self.buffer_size}")
        if not self.server_learning_rate > 0:
            raise ValueError(f"server_learning_rate must be > 0, got {self.server_learning_rate}")
        if self.weighting not in ("examples", "steps", "uniform"):
            raise ValueError(f"weighting must be examples, steps or uniform, got {self.weighting}")


class BufferedPolicy(ContinuousPolicy):
    """FedBuff: a version every K staleness-weighted updates."""

    name = "buffered"

    def __init__(self, settings: BufferedSettings | None = None) -> None:
        self.settings = settings or BufferedSettings()
        super().__init__(self.settings)
        self.buffered = 0
        self.buffered_weight = 0.0  # Σ w (base weights, before staleness) of the buffer

    def on_update(self, event: UpdateArrived, staleness: int) -> list[Decision]:
        """Add the update to the buffer; commit when K have arrived."""
        s = self.settings
        base = self.weight_of(event, s.weighting)
        self.updates_accepted += 1
        self.buffered += 1
        self.buffered_weight += base
        decisions: list[Decision] = [AcceptUpdate(event.task_id, base * s.staleness(staleness))]
        if self.buffered >= s.buffer_size:
            scale = s.server_learning_rate
            if not s.normalize_weights:
                scale /= self.buffered_weight
            self.buffered = 0
            self.buffered_weight = 0.0
            self.version += 1
            decisions.append(
                CommitVersion(
                    f"buffer of {s.buffer_size} updates",
                    scale=scale,
                    normalize=s.normalize_weights,
                )
            )
        return decisions

    def on_commit_failed(self, event: CommitFailed) -> None:
        """The buffer's aggregate was dropped: start an empty buffer."""
        self.buffered = 0
        self.buffered_weight = 0.0
