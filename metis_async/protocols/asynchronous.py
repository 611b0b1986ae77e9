"""FedAsync (Xie, Koyejo, Gupta 2019): mix every update into the model as it arrives.

On an update x_new trained from version τ, at version t: α_t = α · s(t − τ) clamped to (0, 1], and
x ← (1 − α_t) x + α_t x_new, t ← t + 1. Learners upload full weights (not deltas) so the mixing is
exact whatever the staleness. The learner that reported gets fresh work at once. A failed commit
(`CommitFailed`) is uncounted and the federation just continues with the next update.
"""

from __future__ import annotations

from dataclasses import dataclass

from metis_async.protocols.base import AcceptUpdate, CommitVersion, Decision, UpdateArrived
from metis_async.protocols.continuous import ContinuousPolicy, ContinuousSettings


@dataclass(frozen=True)
class AsynchronousSettings(ContinuousSettings):
    """Settings of `AsynchronousPolicy` (see `ContinuousSettings` for the shared ones).

    Attributes:
        alpha: mixing rate α in (0, 1]; 0.6 by default (0.9 is faster but less stable).
    """

    alpha: float = 0.6

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")


class AsynchronousPolicy(ContinuousPolicy):
    """FedAsync: every acceptable update commits a new version, weighted by its staleness."""

    name = "asynchronous"
    mixes_full_models = True
    upload_delta = False

    def __init__(self, settings: AsynchronousSettings | None = None) -> None:
        self.settings = settings or AsynchronousSettings()
        super().__init__(self.settings)

    def on_update(self, event: UpdateArrived, staleness: int) -> list[Decision]:
        """Mix the update in with α_t = α · s(staleness)."""
        alpha_t = min(1.0, max(self.settings.alpha * self.settings.staleness(staleness), 1e-12))
        self.updates_accepted += 1
        self.version += 1
        return [
            AcceptUpdate(event.task_id, 1.0),
            CommitVersion(
                f"update {event.task_id} (staleness {staleness}, alpha {alpha_t:.3g})",
                scale=alpha_t,
                normalize=True,
                relative=True,
            ),
        ]
