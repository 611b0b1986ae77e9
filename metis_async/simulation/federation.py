"""A federation on a simulated clock: a real policy, real training, no sockets and no sleeping.

`SimulatedFederation` plays the part of the controller (`metis_async.federation.Federation`) and of
every learner at once. It delivers events to the policy one at a time and carries out its
decisions in order, folding accepted updates into the same `ServerStep` (the Rust accumulator) the
server uses, so a policy behaves here as it does in the server. Time is a priority queue of
occurrences (a task finishes, a learner drops out or comes back, the policy's wake-up), and the
clock jumps from one to the next.

Learners behave like the real learner client: each runs its tasks one at a time in arrival order;
a cancelled task that has not started is skipped, one that is running finishes and its result is
dropped (the client cannot interrupt `fit`). A training task takes the learner's step time × the
steps it runs plus the per-task latency; with a time budget it runs only the steps that fit. The
learner really trains, from the version the task names, when the task's simulated time is up
(work for cancelled or lost tasks is never computed).
"""

from __future__ import annotations

import heapq
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from metis_async import wire
from metis_async.aggregation.server_step import ServerStep
from metis_async.client.learner import EvaluateConfig, FitConfig, Learner, NDArrays
from metis_async.protocols import (
    AcceptUpdate,
    AssignTask,
    CancelTask,
    CommitVersion,
    Decision,
    DiscardAggregate,
    EvaluationArrived,
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
    UpdateArrived,
)
from metis_async.simulation.result import EvaluationSchedule, HistoryPoint, SimulationResult
from metis_async.simulation.speeds import LearnerSpeed, SpeedModel

Score = Callable[[NDArrays], float]
"""Scores a global model on held-out data (higher is better, e.g. accuracy 0..1)."""

_MAX_TICKS_AT_ONE_TIME = 1000  # a policy that keeps asking for a Tick "now" would never let go


@dataclass
class _Job:
    """A task handed to a simulated learner, with the model it starts from."""

    task: Task
    base: wire.FloatVector
    steps: int = 0
    cancelled: bool = False


@dataclass
class _SimulatedLearner:
    learner_id: str
    learner: Learner
    speed: LearnerSpeed
    num_examples: int
    online: bool = False
    generation: int = 0  # bumped on every disconnect: occurrences of an older one are void
    queue: deque[_Job] = field(default_factory=deque)
    running: _Job | None = None


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
        seed: int = 0,
    ) -> None:
        self.policy = policy
        self.speeds = speeds or SpeedModel()
        self.evaluation = evaluation or EvaluationSchedule()
        self._score = score
        self._layout = wire.make_layout(initial_parameters)
        self._model = wire.flatten(initial_parameters, self._layout)
        self._step = ServerStep(self._model.size)
        speed_rng, order_rng, self._dropout_rng = (
            np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)
        )
        profiles = self.speeds.sample(len(learners), speed_rng)
        width = len(str(max(len(learners) - 1, 0)))
        self.learners = {
            f"learner-{i:0{width}d}": _SimulatedLearner(
                f"learner-{i:0{width}d}", learner, profiles[i], int(learner.num_examples())
            )
            for i, learner in enumerate(learners)
        }
        self._now = 0.0
        self._seq = 0
        self._queue: list[tuple[float, int, _Occurrence]] = []
        for index in order_rng.permutation(len(learners)).tolist():
            self._schedule(0.0, _Join(f"learner-{index:0{width}d}"))
        self._jobs: dict[str, _Job] = {}  # outstanding (not cancelled, not lost) tasks by id
        self._wakeup_token = 0
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
            self._deliver(Tick(self._now))

    def _schedule_wakeup(self) -> None:
        self._wakeup_token += 1
        when = self.policy.next_wakeup()
        if when is None or self._finished_at is not None:
            return
        when = max(when, self._now)
        last, count = self._ticks_at
        count = count + 1 if when == last else 1
        if count > _MAX_TICKS_AT_ONE_TIME:
            raise RuntimeError(f"{self.policy.name} keeps asking for a Tick at {when} s")
        self._ticks_at = (when, count)
        self._schedule(when, _Wakeup(self._wakeup_token))

    # ------------------------------------------------------------------------------ learners

    def _start_next(self, learner: _SimulatedLearner) -> None:
        """Start the learner's next task that was not cancelled, if it is idle."""
        while learner.running is None and learner.queue:
            job = learner.queue.popleft()
            if job.cancelled:
                continue
            learner.running = job
            seconds = self.speeds.latency_seconds
            if job.task.kind is TaskKind.TRAIN:
                job.steps = self._planned_steps(learner, job.task)
                seconds += job.steps * learner.speed.step_seconds
                if self.speeds.drops_out(self._dropout_rng):
                    lost_at = self._now + float(self._dropout_rng.random()) * seconds
                    self._schedule(lost_at, _Drop(learner.learner_id, learner.generation))
                    return
            self._schedule(self._now + seconds, _Done(learner.learner_id, learner.generation))

    def _planned_steps(self, learner: _SimulatedLearner, task: Task) -> int:
        """Local steps the task asks for, cut to those that fit its time budget."""
        settings = task.settings
        assert settings is not None, "a training task carries its settings"
        batches = math.ceil(max(learner.num_examples, 1) / max(settings.batch_size, 1))
        steps = settings.local_steps or settings.epochs * batches
        if task.time_budget_seconds > 0:
            fit = math.floor(task.time_budget_seconds / learner.speed.step_seconds)
            steps = min(steps, max(1, fit))
        return max(steps, 1)

    def _finish_job(self, learner: _SimulatedLearner) -> None:
        job = learner.running
        assert job is not None
        learner.running = None
        self._start_next(learner)
        if job.cancelled:
            return  # the round closed while the learner trained: the client does not upload
        del self._jobs[job.task.task_id]
        if job.task.kind is TaskKind.TRAIN:
            event, upload = self._train(learner, job)
            self._deliver(event, {job.task.task_id: (upload, job.task.version)})
        else:
            self._deliver(self._evaluate(learner, job))

    def _train(
        self, learner: _SimulatedLearner, job: _Job
    ) -> tuple[UpdateArrived, wire.FloatVector]:
        task, settings = job.task, job.task.settings
        assert settings is not None
        config = FitConfig(
            model_version=task.version,
            local_steps=job.steps,
            batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            proximal_mu=settings.proximal_mu,
            extra=dict(settings.extra),
        )
        params = [np.array(a) for a in wire.unflatten(job.base, self._layout)]
        trained, num_examples, metrics = learner.learner.fit(params, config)
        upload = wire.flatten(trained, self._layout)
        if task.upload_delta:
            np.subtract(upload, job.base, out=upload)
        steps = int(metrics.get("steps", job.steps))
        per_batch = learner.speed.step_seconds
        batches = math.ceil(max(int(num_examples), 1) / max(settings.batch_size, 1))
        event = UpdateArrived(
            now=self._now,
            learner_id=learner.learner_id,
            task_id=task.task_id,
            base_version=task.version,
            num_examples=int(num_examples),
            completed_steps=steps,
            train_seconds=steps * per_batch,
            metrics={k: float(v) for k, v in metrics.items()},
            seconds_per_batch=per_batch,
            seconds_per_epoch=per_batch * batches,
        )
        return event, upload

    def _evaluate(self, learner: _SimulatedLearner, job: _Job) -> EvaluationArrived:
        params = [np.array(a) for a in wire.unflatten(job.base, self._layout)]
        loss, num_examples, metrics = learner.learner.evaluate(
            params, EvaluateConfig(model_version=job.task.version)
        )
        values = {"loss": float(loss), **{k: float(v) for k, v in metrics.items()}}
        return EvaluationArrived(
            self._now, learner.learner_id, job.task.task_id, job.task.version, num_examples, values
        )

    def _drop(self, learner: _SimulatedLearner) -> None:
        """The learner disconnects: its tasks are void; it comes back after a downtime."""
        learner.online = False
        learner.generation += 1
        for job in [*learner.queue, *([learner.running] if learner.running else [])]:
            self._jobs.pop(job.task.task_id, None)
        learner.queue.clear()
        learner.running = None
        downtime = self.speeds.downtime(self._dropout_rng)
        self._schedule(self._now + downtime, _Join(learner.learner_id))
        self._deliver(LearnerLost(self._now, learner.learner_id, "simulated dropout"))

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
        job = _Job(task, self._model)  # commits make new arrays: this one stays as it is
        self._jobs[task.task_id] = job
        learner.queue.append(job)
        self._start_next(learner)
        return []

    def _commit(self, decision: CommitVersion) -> None:
        if self._step.count == 0:
            # The server logs this and keeps its model, then fails at the next assignment
            # because the policy counted a version the store lacks; fail here, where it happened.
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
