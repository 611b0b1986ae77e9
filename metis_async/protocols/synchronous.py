"""Synchronous rounds with a deadline (FedAvg and friends).

Each round selects learners, sends them the current version, and waits for their updates. A round
closes when the goal count of updates has arrived, when no selected learner is left working, or at
the deadline, whichever comes first; it commits if at least a minimum number of updates arrived and
is abandoned otherwise. A dead or slow learner therefore never stalls the federation (MetisFL's
synchronous barrier waits forever). Over-selection (Bonawitz et al. 2019) selects more learners
than the goal and cancels the slowest once the goal is met.

A round whose commit fails (`CommitFailed`) counts as abandoned, and the next round starts from
the unchanged version. Evaluation tasks go only to learners that joined with `can_evaluate`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from typing import Literal

from metis_async.protocols.base import (
    AcceptUpdate,
    AssignTask,
    CancelTask,
    CommitFailed,
    CommitVersion,
    Decision,
    DiscardAggregate,
    EvaluationArrived,
    Event,
    LearnerJoined,
    LearnerLost,
    Policy,
    RejectUpdate,
    Task,
    TaskFailed,
    TaskKind,
    Tick,
    TrainSettings,
    UpdateArrived,
)

Weighting = Literal["examples", "steps", "uniform"]
LatePolicy = Literal["drop", "accept_partial"]


@dataclass(frozen=True)
class SynchronousSettings:
    """Settings of `SynchronousPolicy`.

    Attributes:
        rounds: versions to commit before finishing; 0 runs until stopped.
        min_learners: connected learners needed before a round starts; a round also waits for
            `learners_per_round` learners when that is set.
        learners_per_round: goal count of updates per round; 0 means every connected learner.
        over_selection: select ceil(goal x this) learners (1.3 = 130 %);
            the rest are cancelled once the goal is met.
        round_deadline_seconds: a round closes this long after it starts, whatever arrived.
        min_update_fraction: a round commits only with at least ceil(goal x this) updates (min 1).
        weighting: weight updates by reported examples, completed local steps, or uniformly.
        late_learners: `drop` cancels learners still training at the deadline; `accept_partial`
            gives each task a time budget (a fraction `partial_budget_fraction` of the round
            deadline) after which the learner stops and uploads the work it has done (FedProx).
        evaluate_every: send evaluation tasks for every n-th version (0 = never).
        seed: seed of the learner sampler.
    """

    rounds: int = 0
    min_learners: int = 1
    learners_per_round: int = 0
    over_selection: float = 1.0
    round_deadline_seconds: float = 60.0
    min_update_fraction: float = 0.5
    weighting: Weighting = "examples"
    late_learners: LatePolicy = "drop"
    partial_budget_fraction: float = 0.8
    evaluate_every: int = 0
    seed: int = 0
    train: TrainSettings = field(default_factory=TrainSettings)

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds}")
        if self.min_learners < 1:
            raise ValueError(f"min_learners must be >= 1, got {self.min_learners}")
        if self.learners_per_round < 0:
            raise ValueError(f"learners_per_round must be >= 0, got {self.learners_per_round}")
        if self.over_selection < 1.0:
            raise ValueError(f"over_selection must be >= 1.0, got {self.over_selection}")
        if not self.round_deadline_seconds > 0:
            raise ValueError(
                f"round_deadline_seconds must be > 0, got {self.round_deadline_seconds}"
            )
        if not 0.0 <= self.min_update_fraction <= 1.0:
            raise ValueError(
                f"min_update_fraction must be in [0, 1], got {self.min_update_fraction}"
            )
        if self.weighting not in ("examples", "steps", "uniform"):
            raise ValueError(
                f"weighting must be 'examples', 'steps' or 'uniform', got {self.weighting!r}"
            )
        if self.late_learners not in ("drop", "accept_partial"):
            raise ValueError(
                f"late_learners must be 'drop' or 'accept_partial', got {self.late_learners!r}"
            )
        if not 0.0 < self.partial_budget_fraction <= 1.0:
            raise ValueError(
                f"partial_budget_fraction must be in (0, 1], got {self.partial_budget_fraction}"
            )


@dataclass
class _Round:
    number: int
    goal: int
    deadline: float
    outstanding: dict[str, str]  # task id -> learner id
    working: dict[str, str] = field(default_factory=dict)  # learner id -> its task id
    accepted: int = 0
    after_commit: int | None = None  # started in the same decision list as this version's commit

    def add(self, task_id: str, learner_id: str) -> None:
        self.outstanding[task_id] = learner_id
        self.working[learner_id] = task_id

    def remove(self, task_id: str) -> str | None:
        """Drop an outstanding task; returns its learner (None if it was not outstanding)."""
        learner_id = self.outstanding.pop(task_id, None)
        if learner_id is not None:
            self.working.pop(learner_id, None)
        return learner_id


class SynchronousPolicy(Policy):
    """Deadline-bounded synchronous rounds: FedAvg when the controller averages the updates."""

    name = "synchronous"
    checkpointed = (
        *Policy.checkpointed,
        "_rounds_started",
        "_task_seq",
        "rounds_committed",
        "rounds_abandoned",
    )

    def __init__(self, settings: SynchronousSettings | None = None) -> None:
        super().__init__()
        self.settings = settings or SynchronousSettings()
        self.rng = random.Random(self.settings.seed)
        self._learners: dict[str, int] = {}  # connected learner id -> examples held
        self._evaluators: set[str] = set()  # connected learners that can evaluate
        self._round: _Round | None = None
        self._rounds_started = 0
        self._task_seq = 0
        self.rounds_committed = 0
        self.rounds_abandoned = 0

    # ---------------------------------------------------------------------------------- events

    def handle(self, event: Event) -> list[Decision]:
        """React to one event (see `Policy.handle`)."""
        if isinstance(event, CommitFailed):
            return self._on_commit_failed(event)
        if self.finished:
            return self._after_finish(event)
        if isinstance(event, LearnerJoined):
            return self._on_joined(event)
        if isinstance(event, LearnerLost):
            return self._on_lost(event)
        if isinstance(event, UpdateArrived):
            return self._on_update(event)
        if isinstance(event, TaskFailed):
            return self._on_task_done(event.task_id, event.now)
        if isinstance(event, Tick):
            return self._on_tick(event)
        if isinstance(event, EvaluationArrived):
            return []
        raise TypeError(f"unknown event {event!r}")

    def next_wakeup(self) -> float | None:
        """The open round's deadline."""
        return self._round.deadline if self._round is not None else None

    def describe(self) -> dict[str, object]:
        """Settings and counters."""
        info = super().describe()
        info.update(
            connected=len(self._learners),
            round=self._round.number if self._round else None,
            rounds_committed=self.rounds_committed,
            rounds_abandoned=self.rounds_abandoned,
        )
        return info

    def _after_finish(self, event: Event) -> list[Decision]:
        if isinstance(event, UpdateArrived):
            return [RejectUpdate(event.task_id, "the federation has finished")]
        return []

    def _on_joined(self, event: LearnerJoined) -> list[Decision]:
        self._learners[event.learner_id] = event.num_examples
        if event.can_evaluate:
            self._evaluators.add(event.learner_id)
        else:
            self._evaluators.discard(event.learner_id)
        rnd = self._round
        if rnd is None:
            return self._maybe_start_round(event.now)
        # A learner that joins mid-round takes part at once when the round trains "everyone"
        # or is still short of its selection size.
        if event.learner_id in rnd.working:
            return []
        if not self.settings.learners_per_round:
            rnd.goal += 1
            return self._assign(rnd, [event.learner_id], event.now)
        wanted = self._selection_size(rnd.goal, len(self._learners))
        if len(rnd.outstanding) + rnd.accepted < wanted:
            return self._assign(rnd, [event.learner_id], event.now)
        return []

    def _on_lost(self, event: LearnerLost) -> list[Decision]:
        self._learners.pop(event.learner_id, None)
        self._evaluators.discard(event.learner_id)
        rnd = self._round
        if rnd is None:
            return []
        lost = rnd.working.get(event.learner_id)
        if lost is not None:
            rnd.remove(lost)
        if lost is not None and not rnd.outstanding:
            return self._close_round(event.now, "no selected learner left working")
        return []

    def _on_update(self, event: UpdateArrived) -> list[Decision]:
        rnd = self._round
        if event.resent:
            return self._on_resent(event)
        if rnd is None or event.task_id not in rnd.outstanding:
            return [RejectUpdate(event.task_id, "task is not part of the open round")]
        if event.base_version != self.version:
            rnd.remove(event.task_id)
            reject: list[Decision] = [
                RejectUpdate(
                    event.task_id,
                    f"update trained from version {event.base_version}, round uses {self.version}",
                )
            ]
            if not rnd.outstanding:  # nobody left to wait for: do not idle to the deadline
                reject += self._close_round(event.now, "no selected learner left working")
            return reject
        rnd.remove(event.task_id)
        rnd.accepted += 1
        self.observe(event)
        weight = self._weight(event)
        decisions: list[Decision] = [AcceptUpdate(event.task_id, weight)]
        if rnd.accepted >= rnd.goal:
            decisions += self._close_round(event.now, "goal reached")
        elif not rnd.outstanding:
            decisions += self._close_round(event.now, "all selected learners reported")
        return decisions

    def _on_resent(self, event: UpdateArrived) -> list[Decision]:
        """An update from before a controller restart answers the learner's task of the open
        round when both start from this version: that task is cancelled, not trained again."""
        rnd = self._round
        task_id = rnd.working.get(event.learner_id) if rnd is not None else None
        if rnd is None or task_id is None or event.base_version != self.version:
            return [RejectUpdate(event.task_id, "resent update fits no task of the open round")]
        replaced = replace(event, task_id=task_id, resent=False)
        return [
            CancelTask(event.learner_id, task_id, "answered by the update resent for it"),
            *self._substituted(self._on_update(replaced), task_id, event.task_id),
        ]

    @staticmethod
    def _substituted(decisions: list[Decision], task_id: str, resent_id: str) -> list[Decision]:
        return [
            AcceptUpdate(resent_id, d.weight)
            if isinstance(d, AcceptUpdate) and d.task_id == task_id
            else d
            for d in decisions
        ]

    def _weight(self, event: UpdateArrived) -> float:
        if self.settings.weighting == "examples":
            return float(max(event.num_examples, 1))
        if self.settings.weighting == "steps":
            return float(max(event.completed_steps, 1))
        return 1.0

    def observe(self, event: UpdateArrived) -> None:
        """Hook: an accepted update arrived (subclasses record learner speeds here)."""

    def task_settings(self, learner_id: str, round_seconds: float) -> tuple[TrainSettings, float]:
        """Hook: local settings and time budget (seconds, 0 = none) of `learner_id`'s task."""
        budget = 0.0
        if self.settings.late_learners == "accept_partial":
            budget = round_seconds * self.settings.partial_budget_fraction
        return self.settings.train, budget

    def round_seconds(self) -> float:
        """Hook: how long the next round may last (seconds)."""
        return self.settings.round_deadline_seconds

    def round_started(self, now: float) -> None:
        """Hook: a round is about to assign its tasks."""

    def _on_commit_failed(self, event: CommitFailed) -> list[Decision]:
        """The round's commit failed: abandon the round and start the next one at once.

        The decisions after the commit were dropped, so a round started in the same list never
        had its tasks sent: forget it (no CancelTask) and start afresh from the unchanged version.
        """
        if not self.undo_commit(event):
            return []
        self.rounds_committed -= 1
        self.rounds_abandoned += 1
        rnd = self._round
        if rnd is not None and rnd.after_commit == event.version:
            self._round = None
        if self.finished or self._round is not None:
            return []
        return self._maybe_start_round(event.now)

    def _on_task_done(self, task_id: str, now: float) -> list[Decision]:
        rnd = self._round
        if rnd is None or rnd.remove(task_id) is None:
            return []
        if not rnd.outstanding:
            return self._close_round(now, "all selected learners reported")
        return []

    def _on_tick(self, event: Tick) -> list[Decision]:
        rnd = self._round
        if rnd is not None and event.now >= rnd.deadline:
            return self._close_round(event.now, "deadline")
        if rnd is None:
            return self._maybe_start_round(event.now)
        return []

    # ---------------------------------------------------------------------------------- rounds

    def _selection_size(self, goal: int, available: int) -> int:
        return min(available, math.ceil(goal * self.settings.over_selection))

    def _maybe_start_round(self, now: float) -> list[Decision]:
        if len(self._learners) < max(self.settings.min_learners, self.settings.learners_per_round):
            return []  # checked before sorting: a join below the quorum costs O(1)
        available = sorted(self._learners)  # sorted: the pick depends on the seed, not on timing
        goal = self.settings.learners_per_round or len(available)
        goal = min(goal, len(available))
        self.round_started(now)
        chosen = self.rng.sample(available, self._selection_size(goal, len(available)))
        self._rounds_started += 1
        rnd = _Round(
            number=self._rounds_started,
            goal=goal,
            deadline=now + self.round_seconds(),
            outstanding={},
        )
        self._round = rnd
        decisions: list[Decision] = []
        every = self.settings.evaluate_every
        if every and self.version % every == 0:
            decisions += [
                AssignTask(Task(self._next_task_id(), lid, TaskKind.EVALUATE, self.version))
                for lid in chosen
                if lid in self._evaluators
            ]
        return decisions + self._assign(rnd, chosen, now)

    def _assign(self, rnd: _Round, learner_ids: list[str], now: float) -> list[Decision]:
        decisions: list[Decision] = []
        remaining = max(rnd.deadline - now, 0.0)
        for lid in learner_ids:
            task_id = self._next_task_id()
            rnd.add(task_id, lid)
            settings, budget = self.task_settings(lid, remaining)
            task = Task(
                task_id=task_id,
                learner_id=lid,
                kind=TaskKind.TRAIN,
                version=self.version,
                settings=settings,
                deadline_seconds=remaining,
                time_budget_seconds=budget,
            )
            decisions.append(AssignTask(task))
        return decisions

    def _next_task_id(self) -> str:
        self._task_seq += 1
        return f"v{self.version}-t{self._task_seq}"

    def _close_round(self, now: float, reason: str) -> list[Decision]:
        rnd = self._round
        assert rnd is not None
        self._round = None
        decisions: list[Decision] = [
            CancelTask(lid, task_id, f"round {rnd.number} closed: {reason}")
            for task_id, lid in rnd.outstanding.items()
        ]
        needed = max(1, math.ceil(rnd.goal * self.settings.min_update_fraction))
        if rnd.accepted >= needed:
            decisions.append(CommitVersion(f"round {rnd.number}: {reason}"))
            self.version += 1
            self.rounds_committed += 1
            if self.settings.rounds and self.version >= self.settings.rounds:
                return [*decisions, self.finish(f"{self.version} versions committed")]
            following = self._maybe_start_round(now)
            if self._round is not None:
                self._round.after_commit = self.version
            return decisions + following
        else:
            self.rounds_abandoned += 1
            decisions.append(
                DiscardAggregate(
                    f"round {rnd.number}: {reason} with {rnd.accepted} of {needed} needed updates"
                )
            )
        return decisions + self._maybe_start_round(now)
