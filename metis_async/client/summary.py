"""What a learner run reports, and how it waits between connection attempts."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from metis_async.client.learner import NDArrays


@dataclass(frozen=True)
class Backoff:
    """Jittered exponential backoff between connection attempts.

    The n-th consecutive failure waits a uniform time in [d/2, d] with d = min(cap, initial·2^n)
    seconds, so thousands of learners reconnecting after a controller restart spread out. After
    `Shutdown` DRAINING the wait is the controller's `retry_after_seconds` plus one such delay.
    """

    initial_seconds: float = 0.5
    max_seconds: float = 30.0
    max_attempts: int | None = None  # consecutive failures before giving up; None = never

    def delay(self, failures: int, rng: random.Random) -> float:
        """Seconds to wait after `failures` consecutive failed attempts (≥ 1)."""
        ceiling = min(self.max_seconds, self.initial_seconds * 2 ** min(failures - 1, 30))
        return float(ceiling / 2 + rng.uniform(0, ceiling / 2))


@dataclass
class RunSummary:
    """What one `run_learner` call did.

    Attributes:
        learner_id: the identity used (assigned by the controller when none was given).
        tasks_completed: results uploaded.
        tasks_failed: tasks reported as failed (the learner's code raised, or no model).
        sessions: streams the controller welcomed (more than one after reconnects).
        last_version: newest model version received.
        shutdown_reason: why the federation finished ("" if the run was stopped).
        errors: stream and contract errors met on the way, oldest first.
        final_parameters: the federation's final model, in the layout's shapes and dtypes, when
            the controller delivered it (or the learner held it) before `Shutdown` FINISHED.
        final_version: the version of `final_parameters`.
        updates_acknowledged: train results the controller acknowledged as durably counted.
        updates_resent: kept, unacknowledged results sent again after a reconnect.
    """

    learner_id: str = ""
    tasks_completed: int = 0
    tasks_failed: int = 0
    sessions: int = 0
    last_version: int | None = None
    shutdown_reason: str = ""
    errors: list[str] = field(default_factory=list)
    final_parameters: NDArrays | None = field(default=None, repr=False)
    final_version: int | None = None
    updates_acknowledged: int = 0
    updates_resent: int = 0

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready summary: the final model is given by its tensor shapes, not values."""
        fields = dict(self.__dict__)
        params = fields.pop("final_parameters")
        fields["final_shapes"] = None if params is None else [list(a.shape) for a in params]
        return fields
