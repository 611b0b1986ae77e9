"""Semi-synchronous rounds (MetisFL; Stripelis & Ambite, ACM TIST 2022).

Every round gets the same wall-clock training budget, λ × the slowest connected learner's measured
time per epoch, and each learner runs as many local steps as fit its own measured speed:
ceil(budget / its seconds per batch), capped by `max_local_steps` (very fast learners otherwise
drift on non-IID data). Speeds are re-measured every round, or kept from the first measurement,
by config.

A learner without a measurement yet gets a probe: one epoch (or `probe_steps` steps) with a time
budget of `partial_budget_fraction` × the time left in the round, after which it stops and
uploads what it did. A learner slower than the round is therefore still measured (and its partial
work counts), and from the next round on gets the steps that fit; without the budget it would be
cancelled at every deadline and never measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from metis_async.protocols.base import TrainSettings, UpdateArrived
from metis_async.protocols.synchronous import SynchronousPolicy, SynchronousSettings


@dataclass(frozen=True)
class SemiSynchronousSettings(SynchronousSettings):
    """Settings of `SemiSynchronousPolicy` (plus those of `SynchronousSettings`).

    Attributes:
        budget_factor: λ; the round budget is λ × the slowest learner's epoch time (seconds).
        max_local_steps: cap on the local steps of any learner.
        recompute_every_round: re-measure speeds from every round's results (else only once).
        round_deadline_seconds: here the slack added to the budget for transfers and start-up.
        probe_steps: local steps of an unmeasured learner's probe; 0 = one epoch. The probe
            always has a time budget that fits the round.
    """

    budget_factor: float = 2.0
    max_local_steps: int = 200
    recompute_every_round: bool = True
    probe_steps: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.budget_factor > 0:
            raise ValueError(f"budget_factor must be > 0, got {self.budget_factor}")
        if self.max_local_steps < 1:
            raise ValueError(f"max_local_steps must be >= 1, got {self.max_local_steps}")
        if self.probe_steps < 0:
            raise ValueError(f"probe_steps must be >= 0, got {self.probe_steps}")


class SemiSynchronousPolicy(SynchronousPolicy):
    """Rounds with a common time budget and per-learner local steps."""

    name = "semi_synchronous"
    checkpointed = (*SynchronousPolicy.checkpointed, "seconds_per_batch", "seconds_per_epoch")

    def __init__(self, settings: SemiSynchronousSettings | None = None) -> None:
        self.semi = settings or SemiSynchronousSettings()
        super().__init__(self.semi)
        self.seconds_per_batch: dict[str, float] = {}
        self.seconds_per_epoch: dict[str, float] = {}
        self.budget_seconds = 0.0
        self.assigned_steps: dict[str, int] = {}

    def observe(self, event: UpdateArrived) -> None:
        """Record the learner's measured speed."""
        lid = event.learner_id
        if lid in self.seconds_per_batch and not self.semi.recompute_every_round:
            return
        steps = max(event.completed_steps, 1)
        per_batch = event.seconds_per_batch or event.train_seconds / steps
        if per_batch <= 0 or not math.isfinite(per_batch):
            return
        batch = max(self.semi.train.batch_size, 1)
        per_epoch = event.seconds_per_epoch or per_batch * math.ceil(
            max(event.num_examples, 1) / batch
        )
        self.seconds_per_batch[lid] = per_batch
        self.seconds_per_epoch[lid] = per_epoch

    def round_started(self, now: float) -> None:
        """Fix this round's budget from the slowest connected, measured learner."""
        epochs = [
            self.seconds_per_epoch[lid] for lid in self._learners if lid in self.seconds_per_epoch
        ]
        self.budget_seconds = self.semi.budget_factor * max(epochs) if epochs else 0.0

    def round_seconds(self) -> float:
        """Budget plus slack; the first (measuring) round uses the slack alone."""
        return self.budget_seconds + self.semi.round_deadline_seconds

    def task_settings(self, learner_id: str, round_seconds: float) -> tuple[TrainSettings, float]:
        """ceil(budget / seconds per batch) steps, capped; a time-bounded probe if not measured."""
        per_batch = self.seconds_per_batch.get(learner_id)
        if per_batch is None or self.budget_seconds <= 0:
            self.assigned_steps[learner_id] = self.semi.probe_steps
            probe = replace(self.semi.train, local_steps=self.semi.probe_steps, epochs=1)
            return probe, round_seconds * self.semi.partial_budget_fraction
        steps = min(self.semi.max_local_steps, max(1, math.ceil(self.budget_seconds / per_batch)))
        self.assigned_steps[learner_id] = steps
        _, budget = super().task_settings(learner_id, round_seconds)
        return replace(self.semi.train, local_steps=steps), budget

    def describe(self) -> dict[str, object]:
        """Settings and counters, with the current budget."""
        info = super().describe()
        info["budget_seconds"] = self.budget_seconds
        return info
