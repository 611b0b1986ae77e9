"""What a simulated federation produced: accuracy over simulated time, and counters."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EvaluationSchedule:
    """When the simulator scores the global model on the held-out data.

    The model at version 0 and the final model are always scored. In between a committed version
    is scored when either rule says so; both 0 means only the first and the last.

    Attributes:
        every_versions: score every n-th committed version (1 = every commit; 0 = off).
        every_seconds: score the first commit at least this long after the last score
            (simulated seconds; 0 = off).
    """

    every_versions: int = 1
    every_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.every_versions < 0:
            raise ValueError(f"every_versions must be >= 0, got {self.every_versions}")
        if self.every_seconds < 0:
            raise ValueError(f"every_seconds must be >= 0, got {self.every_seconds}")

    def due(self, versions_since: int, seconds_since: float) -> bool:
        """Whether a commit `versions_since` versions and `seconds_since` seconds after the last
        score should be scored."""
        by_versions = self.every_versions > 0 and versions_since >= self.every_versions
        by_seconds = self.every_seconds > 0 and seconds_since >= self.every_seconds
        return by_versions or by_seconds


@dataclass(frozen=True)
class HistoryPoint:
    """The global model's score at one moment.

    Attributes:
        seconds: simulated time of the commit (seconds from the start).
        version: the model version scored.
        accuracy: its score on the held-out data (fraction 0..1 for accuracy).
    """

    seconds: float
    version: int
    accuracy: float


@dataclass
class SimulationResult:
    """The outcome of a simulated federation.

    Attributes:
        protocol: the policy's name.
        history: scores in time order, from version 0 to the final model.
        simulated_seconds: simulated time the run covered (seconds).
        cpu_seconds: CPU time the simulation used, training and scoring included (seconds).
        versions: committed versions.
        updates_accepted: updates folded into an aggregate.
        updates_rejected: updates the policy rejected.
        staleness: versions committed between each accepted update's base version and the
            version it was accepted into, in ascending order.
        events: events the driver delivered to the federation core, by event name.
        finished: whether the policy finished the federation before the time ran out.
        settings: the policy's `describe()` at the end.
        participation: per learner, tasks assigned and updates accepted/rejected: over-selection
            and round-less policies can silently exclude slow learners (and their data).
    """

    protocol: str
    history: list[HistoryPoint]
    simulated_seconds: float
    cpu_seconds: float
    versions: int
    updates_accepted: int
    updates_rejected: int
    staleness: list[int] = field(default_factory=list)
    events: dict[str, int] = field(default_factory=dict)
    finished: bool = False
    settings: dict[str, object] = field(default_factory=dict)
    participation: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def final_accuracy(self) -> float:
        """Score of the model the run ended with."""
        return self.history[-1].accuracy

    @property
    def mean_staleness(self) -> float | None:
        """Mean staleness of accepted updates (versions), None if none was accepted."""
        return statistics.fmean(self.staleness) if self.staleness else None

    @property
    def max_staleness(self) -> int | None:
        """Largest staleness of an accepted update (versions), None if none was accepted."""
        return max(self.staleness) if self.staleness else None

    def seconds_to_target(self, target: float) -> float | None:
        """Simulated seconds until a scored version first reached `target`, None if none did.

        The resolution is that of the `EvaluationSchedule`: with every commit scored it is exact.
        """
        return next((p.seconds for p in self.history if p.accuracy >= target), None)

    def accuracy_at(self, seconds: float) -> float:
        """Score of the newest version scored at or before `seconds` (simulated)."""
        current = self.history[0].accuracy
        for point in self.history:
            if point.seconds > seconds:
                break
            current = point.accuracy
        return current

    def mean_accuracy(self, since_seconds: float) -> float:
        """Time-weighted mean score from `since_seconds` to the end of the run.

        The score is a step function of simulated time (each scored version holds until the next),
        so a policy that commits often is not weighted more than one that commits rarely.
        """
        end = self.simulated_seconds
        if since_seconds >= end:
            return self.final_accuracy
        total = 0.0
        start, value = since_seconds, self.accuracy_at(since_seconds)
        for point in self.history:
            if since_seconds < point.seconds <= end:
                total += value * (point.seconds - start)
                start, value = point.seconds, point.accuracy
        total += value * (end - start)
        return total / (end - since_seconds)

    def participation_summary(self) -> dict[str, object]:
        """How evenly learners contributed (see `federation.summarize_participation`)."""
        from metis_async.federation import summarize_participation

        return summarize_participation(self.participation)

    def to_dict(self, target: float = 0.90) -> dict[str, object]:
        """A JSON-ready summary (with `seconds_to_target` for `target`) and the history."""
        return {
            "protocol": self.protocol,
            "target": target,
            "seconds_to_target": self.seconds_to_target(target),
            "final_accuracy": self.final_accuracy,
            "simulated_seconds": self.simulated_seconds,
            "cpu_seconds": self.cpu_seconds,
            "versions": self.versions,
            "updates_accepted": self.updates_accepted,
            "updates_rejected": self.updates_rejected,
            "mean_staleness": self.mean_staleness,
            "max_staleness": self.max_staleness,
            "finished": self.finished,
            "events": dict(self.events),
            "participation": self.participation_summary(),
            "history": [[p.seconds, p.version, p.accuracy] for p in self.history],
        }
