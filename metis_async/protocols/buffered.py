"""FedBuff (Nguyen et al., AISTATS 2022): buffer K staleness-weighted deltas, then commit.

A learner trains from x_τ and uploads Δ = y − x_τ. The controller adds s(t − τ) · w · Δ to the
buffer (s(τ) = 1/√(1+τ) by default, w the learner's base weight) and after K updates commits
x ← x + η · buffer / K (or hands buffer / K to a server optimizer), t ← t + 1. `concurrency`
learners train at all times; the one that reported gets fresh work at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from metis_async.protocols.base import AcceptUpdate, CommitVersion, Decision, UpdateArrived
from metis_async.protocols.continuous import ContinuousPolicy, ContinuousSettings, Weighting
from metis_async.protocols.staleness import StalenessFunction


@dataclass(frozen=True)
class BufferedSettings(ContinuousSettings):
    """Settings of `BufferedPolicy` (see `ContinuousSettings` for the shared ones).

    Attributes:
        buffer_size: K, updates per committed version.
        server_learning_rate: η of the server step x ← x + η · buffer / K.
        weighting: base weight of an update before staleness; uniform as in the paper.
        normalize_weights: divide the buffer by its total weight instead of K (a weighted mean).
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
        if self.weighting != "uniform" and not self.normalize_weights:
            raise ValueError(
                f"weighting={self.weighting!r} scales deltas by example or step counts; "
                "set normalize_weights=True so the buffer is a weighted mean"
            )


class BufferedPolicy(ContinuousPolicy):
    """FedBuff: a version every K staleness-weighted updates."""

    name = "buffered"

    def __init__(self, settings: BufferedSettings | None = None) -> None:
        self.settings = settings or BufferedSettings()
        super().__init__(self.settings)
        self.buffered = 0

    def on_update(self, event: UpdateArrived, staleness: int) -> list[Decision]:
        """Add the update to the buffer; commit when K have arrived."""
        s = self.settings
        weight = self.weight_of(event, s.weighting) * s.staleness(staleness)
        self.updates_accepted += 1
        self.buffered += 1
        decisions: list[Decision] = [AcceptUpdate(event.task_id, weight)]
        if self.buffered >= s.buffer_size:
            self.buffered = 0
            self.version += 1
            scale = s.server_learning_rate
            if not s.normalize_weights:
                scale /= s.buffer_size
            decisions.append(
                CommitVersion(
                    f"buffer of {s.buffer_size} updates",
                    scale=scale,
                    normalize=s.normalize_weights,
                )
            )
        return decisions
