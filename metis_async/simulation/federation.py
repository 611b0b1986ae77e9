"""A federation on a simulated clock: the real federation core, real training, no sockets.

`SimulatedFederation` is a driver of `metis_async.federation.FederationCore`, like the gRPC
server: it plays the network and every learner, and carries out the core's effects on simulated
learners. The policy, the task table, the aggregation (the Rust accumulator through `ServerStep`)
and every commit are the production code's, so the evidence a simulation produces is evidence
about the controller. Time is a priority queue of occurrences (a task finishes, a learner drops
out or comes back, the core's wake-up), and the clock jumps from one to the next.

Learners behave like the real learner client (see `learners.SimulatedLearner`) and really train,
from the version the task names, when the task's simulated time is up; the work of cancelled and
lost tasks is never computed.
"""

from __future__ import annotations

import hashlib
import heapq
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from metis_async import wire
from metis_async.aggregation.server_step import AggregationSettings
from metis_async.client.learner import Learner, NDArrays
from metis_async.effects import (
    Effect,
    FederationFinished,
    SendCancel,
    SendNotice,
    SendTask,
    VersionCommitted,
)
from metis_async.federation import FederationCore, UpdateReport
from metis_async.protocols import Policy, TaskKind, UpdateArrived
from metis_async.simulation.learners import Job, SimulatedLearner
from metis_async.simulation.result import EvaluationSchedule, HistoryPoint, SimulationResult
from metis_async.simulation.speeds import SpeedModel

Score = Callable[[NDArrays], float]
"""Scores a global model on held-out data (higher is better, e.g. accuracy 0..1)."""

_EVENT_NAMES = {
    "learner_joined": "LearnerJoined",
    "learner_lost": "LearnerLost",
    "update_arrived": "UpdateArrived",
    "evaluation_arrived": "EvaluationArrived",
    "tick": "Tick",
}


@dataclass(frozen=True)
class TraceStep:
    """One event delivered to the federation core, and the state it left.

    Attributes:
        method: the `FederationCore` method called (`learner_joined`, `update_arrived`, ...).
        args: its arguments, the time first (uploads included as the exact arrays).
        version: the core's version after the event.
        model_digest: blake2b digest of the model's bytes after the event.
    """

    method: str
    args: tuple[object, ...]
    version: int
    model_digest: str


def _digest(model: wire.FloatVector) -> str:
    return hashlib.blake2b(np.ascontiguousarray(model).tobytes(), digest_size=16).hexdigest()


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
    """Runs `policy`, through the federation core, over simulated `learners` on a simulated clock.

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
        run_id: the core's run id (task ids are prefixed with it).
        record: keep every event delivered to the core in `trace` (with the version and a digest
            of the model after it), so the run can be replayed through another driver.
        rng: the generator of the policy's random choices; None keeps the policy's own, seeded
            from its settings (as the server does, so a trace replays identically).
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
        run_id: str = "sim",
        record: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        self.policy = policy
        self.speeds = speeds or SpeedModel()
        self.evaluation = evaluation or EvaluationSchedule()
        self._score = score
        self.core = FederationCore(policy, aggregation=aggregation, run_id=run_id, rng=rng)
        self.trace: list[TraceStep] | None = [] if record else None
        self._layout = wire.make_layout(initial_parameters)
        self._now = 0.0
        self._finished_at: float | None = None
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
        self._seq = 0
        self._queue: list[tuple[float, int, _Occurrence]] = []
        for index in order_rng.permutation(len(learners)).tolist():
            self._schedule(0.0, _Join(f"learner-{index:0{width}d}"))
        # outstanding (not cancelled, not lost) tasks by (learner id, wire task id)
        self._jobs: dict[tuple[str, str], Job] = {}
        self._wakeup_token = 0
        self._wakeup_at: float | None = None
        self._ticks_at: tuple[float, int] = (-1.0, 0)
        self._cpu_seconds = 0.0
        flat = wire.flatten(initial_parameters, self._layout)
        self._apply(self.core.initialize_model(0.0, self._layout, flat))
        self._history = [HistoryPoint(0.0, 0, self._score(self.parameters()))]
        self._staleness: Counter[int] = Counter()
        self._rejected = 0
        self._events: Counter[str] = Counter()

    # ------------------------------------------------------------------------------ public

    @property
    def now(self) -> float:
        """The simulated clock (seconds since the start)."""
        return self._now

    @property
    def version(self) -> int:
        """The newest committed model version."""
        return self.core.version

    def parameters(self) -> NDArrays:
        """A copy of the current global model as a list of arrays."""
        return [np.array(a) for a in wire.unflatten(self.core.plain_model, self._layout)]

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
        if self._history[-1].version != self.version:
            self._history.append(
                HistoryPoint(self._now, self.version, self._score(self.parameters()))
            )
        self._cpu_seconds += time.process_time() - started
        stats = self.core.stats
        staleness = sorted(self._staleness.elements())
        return SimulationResult(
            protocol=self.policy.name,
            history=list(self._history),
            simulated_seconds=self._now,
            cpu_seconds=self._cpu_seconds,
            versions=self.version,
            updates_accepted=stats.updates_accepted_total,
            updates_rejected=stats.updates_rejected_total,
            staleness=staleness,
            events=dict(self._events),
            finished=self._finished_at is not None,
            settings=self.policy.describe(),
            participation=self.core.participation(),
        )

    # ------------------------------------------------------------------------------ the clock

    def _schedule(self, when: float, occurrence: _Occurrence) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (when, self._seq, occurrence))

    def _occur(self, occurrence: _Occurrence) -> None:
        now = self._now
        if isinstance(occurrence, _Join):
            learner = self.learners[occurrence.learner_id]
            learner.online = True
            self._event("learner_joined", now, learner.learner_id, learner.num_examples)
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
        """Keep one live wake-up at the core's next wake-up (older ones are void by token)."""
        when = self.core.next_wakeup()
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
        self._event("tick", self._now)

    def _event(self, method: str, *args: object) -> None:
        """Deliver one event to the core (recording it when asked) and carry out its effects."""
        self._events[_EVENT_NAMES[method]] += 1
        effects = getattr(self.core, method)(*args)
        if self.trace is not None:
            self.trace.append(
                TraceStep(method, args, self.core.version, _digest(self.core.plain_model))
            )
        self._apply(effects)

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
        del self._jobs[job.task.learner_id, job.task.task_id]
        if job.task.kind is not TaskKind.TRAIN:
            e = learner.evaluate(job, self._now, self._layout)
            args = (learner.learner_id, job.task.task_id, e.num_examples, dict(e.metrics))
            self._event("evaluation_arrived", self._now, *args)
            return
        event, upload = learner.train(job, self._now, self._layout)
        if wire.first_non_finite(upload) is not None:
            # The server ends such a learner's session; the client reconnects later.
            self._drop(learner, "update contains NaN or infinite values")
            return
        staleness = self.version - job.task.version
        accepted = self.core.stats.updates_accepted_total
        self._event("update_arrived", self._now, learner.learner_id, _report(event), upload)
        if self.core.stats.updates_accepted_total > accepted:
            self._staleness[staleness] += 1

    def _drop(self, learner: SimulatedLearner, reason: str = "simulated dropout") -> None:
        """The learner disconnects: its tasks are void; it comes back after a downtime."""
        for job in learner.disconnect():
            self._jobs.pop((job.task.learner_id, job.task.task_id), None)
        downtime = self.speeds.downtime(self._dropout_rng)
        self._schedule(self._now + downtime, _Join(learner.learner_id))
        self._event("learner_lost", self._now, learner.learner_id, reason)

    # ------------------------------------------------------------------------------ effects

    def _apply(self, effects: list[Effect]) -> None:
        """Carry out the core's effects on the simulated learners."""
        for effect in effects:
            if isinstance(effect, SendTask):
                self._assign(effect)
            elif isinstance(effect, SendCancel):
                job = self._jobs.pop((effect.learner_id, effect.task_id), None)
                if job is not None:
                    job.cancelled = True
            elif isinstance(effect, SendNotice):
                self._rejected += 1
            elif isinstance(effect, VersionCommitted):
                self._committed(effect.record.version)
            elif isinstance(effect, FederationFinished):
                self._finished_at = self._now
            # SendModel: a simulated learner reads the version from its job; SendStatus,
            # RequestInitialModel, CommitRefused, Shutdown: nothing to simulate.
        self._schedule_wakeup()

    def _assign(self, effect: SendTask) -> None:
        task = effect.task
        learner = self.learners[task.learner_id]
        job = Job(task, self.core.plain_model)  # commits make new arrays: this one stays as it is
        self._jobs[task.learner_id, task.task_id] = job
        learner.queue.append(job)
        self._start_next(learner)

    def _committed(self, version: int) -> None:
        if version == 0:
            return
        last = self._history[-1]
        if self.evaluation.due(version - last.version, self._now - last.seconds):
            self._history.append(HistoryPoint(self._now, version, self._score(self.parameters())))


def _report(event: UpdateArrived) -> UpdateReport:
    return UpdateReport(
        task_id=event.task_id,
        base_version=event.base_version,
        num_examples=event.num_examples,
        completed_steps=event.completed_steps,
        train_seconds=event.train_seconds,
        seconds_per_batch=event.seconds_per_batch,
        seconds_per_epoch=event.seconds_per_epoch,
        metrics=dict(event.metrics),
    )
