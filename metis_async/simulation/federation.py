"""A federation on a simulated clock: a real policy, real training, no sockets and no sleeping.

`SimulatedFederation` plays the part of the controller (`metis_async.federation.Federation`) and of
every learner at once. It delivers events to the policy one at a time and carries out its
decisions in order, folding accepted updates into the same `ServerStep` (the Rust accumulator) the
server uses, so a policy behaves here as it does in the server. Time is a priority queue of
occurrences (a task finishes, a learner drops out or comes back, the policy's wake-up), and the
clock jumps from one to the next.

Learners behave like the real learner client (see `learners.SimulatedLearner`) and really train,
from the version the task names, when the task's simulated time is up; the work of cancelled and
lost tasks is never computed.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from metis_async import wire
from metis_async.aggregation.server_step import AggregationSettings, ServerStep
from metis_async.client.learner import Learner, NDArrays
from metis_async.protocols import (
    AcceptUpdate,
    AssignTask,
    CancelTask,
    CommitVersion,
    Decision,
    DiscardAggregate,
    Event,
    Finish,
    LearnerJoined,
    LearnerLost,
    Policy,
    RejectUpdate,
    Task,
    TaskFailed,
    TaskKind,
    Tick,
)
from metis_async.simulation.learners import Job, SimulatedLearner
from metis_async.simulation.result import EvaluationSchedule, HistoryPoint, SimulationResult
from metis_async.simulation.speeds import SpeedModel

Score = Callable[[NDArrays], float]
"""Scores a global model on held-out data (higher is better, e.g. accuracy 0..1)."""

_MAX_TICKS_AT_ONE_TIME = 1000  # a policy that keeps asking for a Tick "now" would never let go


@dataclass(frozen=True)
class _Join:
    learner_id: str


@dataclass(frozen=True)
class _Done:
    learner_id: str
    generation: int


@dataclass(frozen=True)
class _Drop:
    learner_id: str
    generation: int


@dataclass(frozen=True)
class _Wakeup:
    token: int


_Occurrence = _Join | _Done | _Drop | _Wakeup
_Updates = dict[str, tuple[wire.FloatVector, int]]  # task id -> (upload, base version)


class SimulatedFederation:
    """Runs `policy` over simulated `learners` on a simulated clock.

    Args:
        policy: the protocol under test; the same object the server would run.
        learners: the learners (anything implementing `Learner`); learner i is called
            `learner-<i>`. All join at time 0, in an order shuffled by `seed`.
        initial_parameters: the model at version 0.
        score: scores a model on held-out data; called on the versions `evaluation` selects.
        speeds: the learners' speeds, latency and dropouts.
        evaluation: which committed versions are scored.
        aggregation: server optimizer, robust rule and clipping, as in the server (FedAvg with a
            streaming mean by default).
        seed: seed of the speeds, the join order and the dropouts.
    """

    def __init__(
        self,
        policy: Policy,
        learners: Sequence[Learner],
        initial_parameters: NDArrays,
        score: Score,
        *,
        speeds: SpeedModel | None = None,
        evaluation: EvaluationSchedule | None = None,
        aggregation: AggregationSettings | None = None,
        seed: int = 0,
    ) -> None:
        self.policy = policy
        self.speeds = speeds or SpeedModel()
        self.evaluation = evaluation or EvaluationSchedule()
        self._score = score
        self._layout = wire.make_layout(initial_parameters)
        self._model = wire.flatten(initial_parameters, self._layout)
        self._step = ServerStep(self._model.size, aggregation)
        speed_rng, order_rng, self._dropout_rng = (
            np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)
        )
        profiles = self.speeds.sample(len(learners), speed_rng)
        width = len(str(max(len(learners) - 1, 0)))
        self.learners = {
            f"learner-{i:0{width}d}": SimulatedLearner(
                f"learner-{i:0{width}d}", learner, profiles[i], int(learner.num_examples())
            )
            for i, learner in enumerate(learners)
        }
        self._now = 0.0
        self._seq = 0
        self._queue: list[tuple[float, int, _Occurrence]] = []
        for index in order_rng.permutation(len(learners)).tolist():
            self._schedule(0.0, _Join(f"learner-{index:0{width}d}"))
        self._jobs: dict[str, Job] = {}  # outstanding (not cancelled, not lost) tasks by id
        self._wakeup_token = 0
        self._wakeup_at: float | None = None
        self._ticks_at: tuple[float, int] = (-1.0, 0)
        self._version = 0
        self._finished_at: float | None = None
        self._cpu_seconds = 0.0
        self._history = [HistoryPoint(0.0, 0, self._score(self.parameters()))]
        self._accepted = 0
        self._rejected = 0
        self._staleness: list[int] = []
        self._events: Counter[str] = Counter()
        self._decisions: Counter[str] = Counter()

    # ------------------------------------------------------------------------------ public

    @property
    def now(self) -> float:
        """The simulated clock (seconds since the start)."""
        return self._now

    @property
    def version(self) -> int:
        """The newest committed model version."""
        return self._version

    def parameters(self) -> NDArrays:
        """A copy of the current global model as a list of arrays."""
        return [np.array(a) for a in wire.unflatten(self._model, self._layout)]

    def run(self, seconds: float) -> SimulationResult:
        """Advance the clock to `seconds` (simulated, from the start) or until the policy finishes.

        May be called again with a later time to continue. Returns the result so far; the final
        model is always scored.
        """
        started = time.process_time()
        while self._queue and self._finished_at is None and self._queue[0][0] <= seconds:
            when, _, occurrence = heapq.heappop(self._queue)
            self._now = when
            self._occur(occurrence)
        if self._finished_at is None:
            self._now = max(self._now, seconds)
        if self._history[-1].version != self._version:
            self._history.append(
                HistoryPoint(self._now, self._version, self._score(self.parameters()))
            )
        self._cpu_seconds += time.process_time() - started
        return SimulationResult(
            protocol=self.policy.name,
            history=list(self._history),
            simulated_seconds=self._now,
            cpu_seconds=self._cpu_seconds,
            versions=self._version,
            updates_accepted=self._accepted,
            updates_rejected=self._rejected,
            staleness=list(self._staleness),
            events=dict(self._events),
            decisions=dict(self._decisions),
            finished=self._finished_at is not None,
            settings=self.policy.describe(),
        )

    # ------------------------------------------------------------------------------ the clock

    def _schedule(self, when: float, occurrence: _Occurrence) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (when, self._seq, occurrence))

    def _occur(self, occurrence: _Occurrence) -> None:
        if isinstance(occurrence, _Join):
            learner = self.learners[occurrence.learner_id]
            learner.online = True
            self._deliver(LearnerJoined(self._now, learner.learner_id, learner.num_examples))
        elif isinstance(occurrence, _Done):
            learner = self.learners[occurrence.learner_id]
            if occurrence.generation == learner.generation:
                self._finish_job(learner)
        elif isinstance(occurrence, _Drop):
            learner = self.learners[occurrence.learner_id]
            if occurrence.generation == learner.generation:
                self._drop(learner)
        elif occurrence.token == self._wakeup_token:
            self._tick()

    def _schedule_wakeup(self) -> None:
        """Keep one live wake-up at `policy.next_wakeup()` (older ones are void by token)."""
        when = self.policy.next_wakeup()
        if when is not None:
            when = max(when, self._now)
        if self._finished_at is not None:
            when = None
        if when == self._wakeup_at:
            return
        self._wakeup_token += 1
        self._wakeup_at = when
        if when is not None:
            self._schedule(when, _Wakeup(self._wakeup_token))

    def _tick(self) -> None:
        self._wakeup_at = None
        last, count = self._ticks_at
        count = count + 1 if self._now == last else 1
        if count > _MAX_TICKS_AT_ONE_TIME:
            raise RuntimeError(f"{self.policy.name} keeps asking for a Tick at {self._now} s")
        self._ticks_at = (self._now, count)
        self._deliver(Tick(self._now))

    # ------------------------------------------------------------------------------ learners

    def _start_next(self, learner: SimulatedLearner) -> None:
        """Start the learner's next task if it is idle; schedule its end, or its dropout."""
        seconds = learner.start_next(self.speeds.latency_seconds)
        if seconds is None:
            return
        running = learner.running
        assert running is not None
        if running.task.kind is TaskKind.TRAIN and self.speeds.drops_out(self._dropout_rng):
            lost_at = self._now + float(self._dropout_rng.random()) * seconds
            self._schedule(lost_at, _Drop(learner.learner_id, learner.generation))
        else:
            self._schedule(self._now + seconds, _Done(learner.learner_id, learner.generation))

    def _finish_job(self, learner: SimulatedLearner) -> None:
        job = learner.running
        assert job is not None
        learner.running = None
        self._start_next(learner)
        if job.cancelled:
            return  # the round closed while the learner trained: the client does not upload
        del self._jobs[job.task.task_id]
        if job.task.kind is TaskKind.TRAIN:
            event, upload = learner.train(job, self._now, self._layout)
            if not np.isfinite(upload).all():
                # The server ends such a learner's session; the client reconnects later.
                self._drop(learner, "update contains NaN or infinite values")
                return
            self._deliver(event, {job.task.task_id: (upload, job.task.version)})
        else:
            self._deliver(learner.evaluate(job, self._now, self._layout))

    def _drop(self, learner: SimulatedLearner, reason: str = "simulated dropout") -> None:
        """The learner disconnects: its tasks are void; it comes back after a downtime."""
        for job in learner.disconnect():
            self._jobs.pop(job.task.task_id, None)
        downtime = self.speeds.downtime(self._dropout_rng)
        self._schedule(self._now + downtime, _Join(learner.learner_id))
        self._deliver(LearnerLost(self._now, learner.learner_id, reason))

    # ------------------------------------------------------------------------------ the policy

    def _deliver(self, event: Event, updates: _Updates | None = None) -> None:
        """Hand one event to the policy and carry out its decisions, like `Federation`."""
        updates = updates if updates is not None else {}
        pending: list[Event] = [event]
        while pending and self._finished_at is None:
            current = pending.pop(0)
            self._events[type(current).__name__] += 1
            for decision in self.policy.handle(current):
                self._decisions[type(decision).__name__] += 1
                pending += self._execute(decision, updates)
        self._schedule_wakeup()

    def _execute(self, decision: Decision, updates: _Updates) -> list[Event]:
        """Carry out one decision; returns follow-up events (a task for a learner that is gone)."""
        if isinstance(decision, AssignTask):
            return self._assign(decision.task)
        if isinstance(decision, AcceptUpdate):
            upload, base_version = updates.pop(decision.task_id)
            self._step.add(upload, decision.weight)
            self._accepted += 1
            self._staleness.append(self._version - base_version)
        elif isinstance(decision, RejectUpdate):
            if updates.pop(decision.task_id, None) is not None:
                self._rejected += 1
        elif isinstance(decision, CancelTask):
            job = self._jobs.pop(decision.task_id, None)
            if job is not None:
                job.cancelled = True
        elif isinstance(decision, CommitVersion):
            self._commit(decision)
        elif isinstance(decision, DiscardAggregate):
            self._step.reset()
        elif isinstance(decision, Finish):
            self._finished_at = self._now
        return []

    def _assign(self, task: Task) -> list[Event]:
        learner = self.learners.get(task.learner_id)
        if learner is None or not learner.online:
            return [TaskFailed(self._now, task.learner_id, task.task_id, "learner gone")]
        if task.version != self._version:
            raise RuntimeError(
                f"policy assigned version {task.version}, the model is at {self._version}"
            )
        job = Job(task, self._model)  # commits make new arrays: this one stays as it is
        self._jobs[task.task_id] = job
        learner.queue.append(job)
        self._start_next(learner)
        return []

    def _commit(self, decision: CommitVersion) -> None:
        if self._step.count == 0:
            # The server logs this and commits the unchanged model as the next version; in a
            # simulation it is a policy bug, so fail here, where it happened.
            raise RuntimeError(f"{self.policy.name} committed an empty aggregate: {decision}")
        self._model = self._step.commit(
            self._model, decision.scale, decision.normalize, decision.relative
        )
        self._version += 1
        last = self._history[-1]
        if self.evaluation.due(self._version - last.version, self._now - last.seconds):
            self._history.append(
                HistoryPoint(self._now, self._version, self._score(self.parameters()))
            )
