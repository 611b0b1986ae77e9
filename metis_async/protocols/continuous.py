"""The shared base of round-less protocols (FedAsync, FedBuff): keep C learners busy.

There are no rounds: every learner that reports gets fresh work at once on the newest version,
and at most `concurrency` learners train at any time (the others wait idle). Staleness of an
update is the number of versions committed since the version it was trained from.

Every task has a deadline (`task_deadline_seconds` after assignment): a learner that keeps its
session alive but hangs in training would otherwise hold a concurrency slot forever. Deadlines
sit in a heap, so `next_wakeup` is O(1) and a `Tick` pops only the expired tasks: no event scans
every outstanding task. An expired task is cancelled; its learner becomes idle again, but is not
picked in the same fill, so a hanging learner does not get the freed slot straight back.

When a commit fails (`CommitFailed`), the tasks assigned after it in the same list were never
sent: they are forgotten, the version count is undone and the free slots are filled again.
"""

from __future__ import annotations

import abc
import heapq
import math
import random
from dataclasses import dataclass, field
from typing import Literal

from metis_async.protocols.base import (
    AssignTask,
    CancelTask,
    CommitFailed,
    CommitVersion,
    Decision,
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
from metis_async.protocols.staleness import StalenessFunction

Weighting = Literal["examples", "steps", "uniform"]


@dataclass(frozen=True)
class ContinuousSettings:
    """Settings shared by round-less protocols.

    Attributes:
        rounds: versions to commit before finishing; 0 runs until stopped.
        concurrency: learners training at once; 0 means every connected learner.
        max_staleness: updates older than this many versions are rejected; 0 disables the check.
        staleness: the staleness weighting s(τ).
        min_learners: connected learners needed before any work is handed out.
        seed: seed of the choice among idle learners.
        train: local training settings of every task.
        task_deadline_seconds: a task not reported this long after assignment is cancelled and
            its concurrency slot freed (seconds, > 0).
    """

    rounds: int = 0
    concurrency: int = 0
    max_staleness: int = 0
    staleness: StalenessFunction = field(default_factory=StalenessFunction)
    min_learners: int = 1
    seed: int = 0
    train: TrainSettings = field(default_factory=TrainSettings)
    task_deadline_seconds: float = 600.0

    def __post_init__(self) -> None:
        for name in ("rounds", "concurrency", "max_staleness"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.min_learners < 1:
            raise ValueError(f"min_learners must be >= 1, got {self.min_learners}")
        if not (self.task_deadline_seconds > 0 and math.isfinite(self.task_deadline_seconds)):
            raise ValueError(
                f"task_deadline_seconds must be finite and > 0, got {self.task_deadline_seconds}"
            )


class ContinuousPolicy(Policy):
    """Hands out work continuously; subclasses decide what an arriving update does.

    An update resent after a controller restart (`UpdateArrived.resent`) is taken like any
    other, weighted by its staleness; it holds no concurrency slot (its task is not ours).
    """

    checkpointed = (
        *Policy.checkpointed,
        "_task_seq",
        "updates_accepted",
        "updates_rejected",
        "tasks_expired",
        "staleness_sum",
        "staleness_max",
    )

    def __init__(self, settings: ContinuousSettings) -> None:
        super().__init__()
        self.base_settings = settings
        self.rng = random.Random(settings.seed)
        self._learners: dict[str, int] = {}  # connected learner id -> examples
        self._busy: dict[str, str] = {}  # learner id -> outstanding task id
        self._tasks: dict[str, str] = {}  # outstanding task id -> learner id
        # Connected learners without a task, with O(1) random removal (swap with the last):
        # choosing who trains next never scans every connected learner.
        self._idle: list[str] = []
        self._idle_at: dict[str, int] = {}
        # (deadline, task id) of outstanding tasks; entries of finished tasks are skipped lazily.
        self._deadlines: list[tuple[float, str]] = []
        self._now = 0.0  # time of the latest event
        self._task_seq = 0
        # Tasks assigned after the latest commit, in the same decision list: void if it fails.
        self._after_commit: tuple[int, list[str]] = (0, [])
        self.updates_accepted = 0
        self.updates_rejected = 0
        self.tasks_expired = 0
        self.staleness_sum = 0  # over accepted updates, in versions
        self.staleness_max = 0

    # ------------------------------------------------------------------------------ hooks

    @abc.abstractmethod
    def on_update(self, event: UpdateArrived, staleness: int) -> list[Decision]:
        """An update with acceptable staleness arrived: accept it and maybe commit."""

    # ------------------------------------------------------------------------------ events

    def on_commit_failed(self, event: CommitFailed) -> None:
        """Hook: the commit of `event.version` failed and was uncounted (reset buffers here)."""

    def handle(self, event: Event) -> list[Decision]:
        """React to one event (see `Policy.handle`)."""
        self._now = max(self._now, event.now)
        if isinstance(event, UpdateArrived):
            return self._on_update(event)
        if isinstance(event, CommitFailed):
            return self._on_commit_failed(event)
        if self.finished:
            return []
        if isinstance(event, LearnerJoined):
            self._learners[event.learner_id] = event.num_examples
            self._make_idle(event.learner_id)
            return self._fill()
        if isinstance(event, LearnerLost):
            self._learners.pop(event.learner_id, None)
            self._release(event.learner_id)
            self._drop_idle(event.learner_id)
            return self._fill()
        if isinstance(event, TaskFailed):
            if self._tasks.get(event.task_id) == event.learner_id:
                self._release(event.learner_id)
            return self._fill(exclude=event.learner_id)
        if isinstance(event, Tick):
            return self._expire(event.now)
        if isinstance(event, EvaluationArrived):
            return self._fill()
        raise TypeError(f"unknown event {event!r}")

    def next_wakeup(self) -> float | None:
        """The earliest deadline of an outstanding task (O(1) amortised)."""
        self._drop_finished_deadlines()
        return self._deadlines[0][0] if self._deadlines else None

    def _drop_finished_deadlines(self) -> None:
        heap = self._deadlines
        while heap and heap[0][1] not in self._tasks:
            heapq.heappop(heap)

    def _push_deadline(self, deadline: float, task_id: str) -> None:
        heap = self._deadlines
        if len(heap) > 2 * len(self._tasks) + 64:
            # Entries of reported tasks wait for their deadline to be popped; rebuild now and
            # then (amortised O(1) per task) so the heap stays O(outstanding tasks).
            heap[:] = [entry for entry in heap if entry[1] in self._tasks]
            heapq.heapify(heap)
        heapq.heappush(heap, (deadline, task_id))

    def _expire(self, now: float) -> list[Decision]:
        """Cancel the tasks whose deadline has passed; refill without re-picking their learners."""
        decisions: list[Decision] = []
        expired: list[str] = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, task_id = heapq.heappop(heap)
            learner_id = self._tasks.get(task_id)
            if learner_id is None:
                continue  # reported or dropped already
            self.tasks_expired += 1
            limit = self.base_settings.task_deadline_seconds
            decisions.append(CancelTask(learner_id, task_id, f"no result within {limit:g} s"))
            self._release(learner_id, idle=False)
            expired.append(learner_id)
        decisions += self._fill()
        for learner_id in expired:
            self._make_idle(learner_id)  # only if it is still connected
        # Slots nobody else could take go back to the expired learners (they may be alive).
        return decisions + self._fill() if expired else decisions

    def _on_commit_failed(self, event: CommitFailed) -> list[Decision]:
        if not self.undo_commit(event):
            return [] if self.finished else self._fill()
        version, assigned = self._after_commit
        if version == event.version:
            for task_id in assigned:  # never sent: the learner is idle again
                learner_id = self._tasks.get(task_id)
                if learner_id is not None:
                    self._release(learner_id)
        self._after_commit = (0, [])
        self.on_commit_failed(event)
        return [] if self.finished else self._fill()

    def describe(self) -> dict[str, object]:
        """Settings and counters."""
        info = super().describe()
        info.update(
            connected=len(self._learners),
            in_flight=len(self._busy),
            updates_accepted=self.updates_accepted,
            updates_rejected=self.updates_rejected,
            tasks_expired=self.tasks_expired,
            staleness_mean=self.staleness_sum / max(self.updates_accepted, 1),
            staleness_max=self.staleness_max,
        )
        return info

    def _on_update(self, event: UpdateArrived) -> list[Decision]:
        if not event.resent and self._tasks.get(event.task_id) != event.learner_id:
            return [RejectUpdate(event.task_id, "task is not outstanding")]
        if self.finished:
            if not event.resent:
                self._release(event.learner_id)
            return [RejectUpdate(event.task_id, "the federation has finished")]
        if not event.resent:
            # The reporter competes for new work only after the others (its task is done now).
            self._release(event.learner_id)
        staleness = self.version - event.base_version
        limit = self.base_settings.max_staleness
        if staleness < 0:
            decisions: list[Decision] = [
                RejectUpdate(event.task_id, f"base version {event.base_version} is in the future")
            ]
        elif limit and staleness > limit:
            self.updates_rejected += 1
            decisions = [
                RejectUpdate(
                    event.task_id,
                    f"update is {staleness} versions stale, max_staleness is {limit}",
                )
            ]
        else:
            self.staleness_sum += staleness
            self.staleness_max = max(self.staleness_max, staleness)
            decisions = self.on_update(event, staleness)
        committed = any(isinstance(d, CommitVersion) for d in decisions)
        if committed and self.base_settings.rounds and self.version >= self.base_settings.rounds:
            return [*decisions, self.finish(f"{self.version} versions committed")]
        following = self._fill()
        if committed:
            self._after_commit = (
                self.version,
                [d.task.task_id for d in following if isinstance(d, AssignTask)],
            )
        return decisions + following

    # ------------------------------------------------------------------------------ work

    def _release(self, learner_id: str, idle: bool = True) -> None:
        task_id = self._busy.pop(learner_id, None)
        if task_id is not None:
            self._tasks.pop(task_id, None)
        if idle:
            self._make_idle(learner_id)

    def _make_idle(self, learner_id: str) -> None:
        if (
            learner_id in self._learners
            and learner_id not in self._busy
            and learner_id not in self._idle_at
        ):
            self._idle_at[learner_id] = len(self._idle)
            self._idle.append(learner_id)

    def _drop_idle(self, learner_id: str) -> None:
        at = self._idle_at.pop(learner_id, None)
        if at is None:
            return
        last = self._idle.pop()
        if last != learner_id:
            self._idle[at] = last
            self._idle_at[last] = at

    def _fill(self, exclude: str | None = None) -> list[Decision]:
        """Assign work until `concurrency` learners are busy, picking idle learners at random.

        The learner that just reported competes with every other idle learner: with C below the
        number of learners, all of them (and all their data) take part over time.
        """
        if len(self._learners) < self.base_settings.min_learners:
            return []
        limit = self.base_settings.concurrency or len(self._learners)
        held_back = exclude is not None and exclude in self._idle_at
        if held_back:
            self._drop_idle(str(exclude))
        decisions: list[Decision] = []
        while self._idle and len(self._busy) < limit:
            lid = self._idle[self.rng.randrange(len(self._idle))]
            self._drop_idle(lid)
            self._task_seq += 1
            task_id = f"v{self.version}-t{self._task_seq}"
            self._busy[lid] = task_id
            self._tasks[task_id] = lid
            deadline = self.base_settings.task_deadline_seconds
            self._push_deadline(self._now + deadline, task_id)
            task = Task(
                task_id=task_id,
                learner_id=lid,
                kind=TaskKind.TRAIN,
                version=self.version,
                settings=self.base_settings.train,
                deadline_seconds=deadline,
                upload_delta=self.upload_delta,
            )
            decisions.append(AssignTask(task))
        if held_back:
            self._make_idle(str(exclude))
        return decisions

    def weight_of(self, event: UpdateArrived, weighting: Weighting) -> float:
        """Base weight of an update before staleness: examples, completed steps, or 1."""
        if weighting == "examples":
            return float(max(event.num_examples, 1))
        if weighting == "steps":
            return float(max(event.completed_steps, 1))
        return 1.0
